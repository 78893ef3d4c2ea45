// Memory of the CPU ops' large outputs (y, dx).
//
// A fresh output pays a page fault per 4 KiB page on its first write, and
// the kernel zeroes each page before the op writes it: at 16M fp32 elements
// that costs as much as the op. Two remedies, both on by default:
// - huge pages: the block is 2 MiB-aligned and advised MADV_HUGEPAGE (where
//   transparent huge pages are in "madvise" mode, the usual default): 512
//   times fewer faults. PEGE_NO_HUGEPAGES=1 turns the advice off.
// - reuse: a freed output's block is kept (up to PEGE_CPU_CACHE_MB in all,
//   default 1024; 0 keeps none) and handed to the next output of the same
//   rounded size, so a training loop's outputs stop faulting after its first
//   step. release_cpu_cache() frees what is kept.
// Outputs under 4 MiB come from torch's allocator as before.
#include <ATen/ATen.h>

#include <cstdint>
#include <cstdlib>
#include <mutex>
#include <vector>

#if defined(__linux__)
#include <sys/mman.h>
#endif

#include "../pege_ops.h"

namespace pege {
namespace {

constexpr size_t kHuge = size_t{2} << 20;

bool env_flag(const char* name) {
  const char* v = std::getenv(name);
  return v != nullptr && v[0] != '\0' && v[0] != '0';
}

struct Cache {
  std::mutex mutex;
  std::vector<std::pair<size_t, void*>> blocks;  // free blocks: (bytes, address)
  size_t held = 0;
  size_t cap = 0;
  bool huge = true;
};

Cache& cache() {
  // Never destroyed: outputs may outlive static destruction at exit.
  static Cache* c = [] {
    auto* k = new Cache;
    const char* mb = std::getenv("PEGE_CPU_CACHE_MB");
    k->cap = (mb != nullptr && mb[0] != '\0' ? std::strtoull(mb, nullptr, 10) : 1024) << 20;
    k->huge = !env_flag("PEGE_NO_HUGEPAGES");
    return k;
  }();
  return *c;
}

void release(void* p, size_t bytes) {
  Cache& c = cache();
  {
    std::lock_guard<std::mutex> lock(c.mutex);
    if (c.held + bytes <= c.cap) {
      c.blocks.emplace_back(bytes, p);
      c.held += bytes;
      return;
    }
  }
  std::free(p);
}

}  // namespace

at::Tensor new_output(const at::Tensor& like) {
  const size_t nbytes = static_cast<size_t>(like.numel()) * like.element_size();
  if (!like.is_cpu() || nbytes < 2 * kHuge) return at::empty(like.sizes(), like.options());
  const size_t bytes = (nbytes + kHuge - 1) / kHuge * kHuge;
  Cache& c = cache();
  void* p = nullptr;
  {
    std::lock_guard<std::mutex> lock(c.mutex);
    for (size_t k = c.blocks.size(); k-- > 0;) {  // the most recently freed first
      if (c.blocks[k].first == bytes) {
        p = c.blocks[k].second;
        c.blocks.erase(c.blocks.begin() + static_cast<std::ptrdiff_t>(k));
        c.held -= bytes;
        break;
      }
    }
  }
  if (p == nullptr) {
    p = std::aligned_alloc(kHuge, bytes);
    if (p == nullptr) return at::empty(like.sizes(), like.options());
#if defined(__linux__) && defined(MADV_HUGEPAGE)
    if (c.huge) madvise(p, bytes, MADV_HUGEPAGE);  // a hint: best effort
#endif
  }
  return at::from_blob(p, like.sizes(), [bytes](void* q) { release(q, bytes); },
                       like.options());
}

int64_t release_cpu_cache() {
  Cache& c = cache();
  std::vector<std::pair<size_t, void*>> blocks;
  {
    std::lock_guard<std::mutex> lock(c.mutex);
    blocks.swap(c.blocks);
    c.held = 0;
  }
  int64_t freed = 0;
  for (const auto& [bytes, p] : blocks) {
    std::free(p);
    freed += static_cast<int64_t>(bytes);
  }
  return freed;
}

}  // namespace pege
