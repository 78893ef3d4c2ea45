// Philox words for the CPU kernels from x86 SIMD registers, chosen at run
// time: philox_avx512.cpp (64 counters in four zmm, through pege_math.h's
// rounds) and philox_avx2.cpp (12 counters in three sets of ymm, its rounds
// in asm). Tests: csrc/tests/test_philox_x86.cpp and tests/test_philox.py.
#pragma once

#include <cstdint>

namespace pege {

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define PEGE_HAVE_X86_PHILOX 1
// words[4 * g + k] = word k of group j0 + g, for g < groups (a multiple of
// 64, or of 4 for avx2); all the groups share j's high word (j0 >> 32).
void philox_words_avx512(uint32_t* words, uint64_t j0, int64_t groups, uint64_t seed,
                         uint64_t offset);
void philox_words_avx2(uint32_t* words, uint64_t j0, int64_t groups, uint64_t seed,
                       uint64_t offset);
#endif

}  // namespace pege
