// Philox words for the CPU kernels from x86 SIMD registers, chosen at run
// time: philox_avx512.cpp (64 counters in four zmm) and philox_avx2.cpp (16
// counters in two ymm). Both compute pege_math.h's rounds; philox_simd.h has
// what they share.
#pragma once

#include <cstdint>

namespace pege {

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define PEGE_HAVE_X86_PHILOX 1
// words[4 * g + k] = word k of group j0 + g, for g < groups (a multiple of
// 64, or 16 for avx2); all the groups share j's high word (j0 >> 32).
void philox_words_avx512(uint32_t* words, uint64_t j0, int64_t groups, uint64_t seed,
                         uint64_t offset);
void philox_words_avx2(uint32_t* words, uint64_t j0, int64_t groups, uint64_t seed,
                       uint64_t offset);
#endif

}  // namespace pege
