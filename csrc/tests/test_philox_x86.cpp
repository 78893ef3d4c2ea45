// CTest of the CPU kernels' x86 Philox routines against pege_math.h's
// mask_words, for those the machine runs: group counts with and without a
// partial last pass, and keys, counters and offsets with high bits set
// (j's high word is beyond what a tensor's elements reach in the op tests).
#include <cstdio>
#include <cstdlib>
#include <vector>

#include "../cpu/philox_x86.h"
#include "../pege_math.h"

#ifdef PEGE_HAVE_X86_PHILOX
using namespace pege;

typedef void (*Routine)(uint32_t*, uint64_t, int64_t, uint64_t, uint64_t);

static int check(const char* name, Routine routine, int64_t groups) {
  const uint64_t seeds[3] = {0, 0x0123456789abcdefull, ~0ull};
  const uint64_t j0s[3] = {0, 0x00000007fffff000ull, 0xffffffff00000000ull};
  int failures = 0;
  std::vector<uint32_t> words(4 * groups);
  for (uint64_t seed : seeds)
    for (uint64_t j0 : j0s) {
      const uint64_t offset = seed ^ 0x5555aaaa5555aaaaull;
      routine(words.data(), j0, groups, seed, offset);
      for (int64_t g = 0; g < groups; ++g) {
        const U32x4 w = mask_words(j0 + g, seed, offset);
        for (int k = 0; k < 4; ++k)
          if (words[4 * g + k] != w.v[k]) {
            std::printf("FAILED %s: groups %lld, seed %llx, j %llx, word %d\n", name,
                        static_cast<long long>(groups), static_cast<unsigned long long>(seed),
                        static_cast<unsigned long long>(j0 + g), k);
            ++failures;
          }
      }
    }
  return failures;
}

int main() {
  __builtin_cpu_init();
  int failures = 0, ran = 0;
  if (__builtin_cpu_supports("avx2")) {
    for (int64_t groups : {4, 8, 12, 16, 24, 64, 256}) failures += check("avx2", philox_words_avx2, groups);
    ++ran;
  }
  if (__builtin_cpu_supports("avx512f")) {
    for (int64_t groups : {64, 256}) failures += check("avx512", philox_words_avx512, groups);
    ++ran;
  }
  if (failures == 0) std::printf("philox_x86: %d routine(s) checked, all words equal\n", ran);
  return failures == 0 ? EXIT_SUCCESS : EXIT_FAILURE;
}
#else
int main() {
  std::printf("philox_x86: no x86 routines in this build\n");
  return EXIT_SUCCESS;
}
#endif
