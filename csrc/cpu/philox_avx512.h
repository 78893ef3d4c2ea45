// Philox words for the CPU kernels on AVX-512 machines (philox_avx512.cpp).
#pragma once

#include <cstdint>

namespace pege {

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define PEGE_HAVE_AVX512_PHILOX 1
// words[4 * g + k] = word k of group j0 + g, for g < groups (a multiple of
// 64); all the groups share j's high word (j0 >> 32).
void philox_words_avx512(uint32_t* words, uint64_t j0, int64_t groups, uint64_t seed,
                         uint64_t offset);
#endif

}  // namespace pege
