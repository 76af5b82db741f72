#include "cpu/large_tensors.h"

#include <c10/util/Exception.h>

#include <cstdint>
#include <cstdlib>
#include <cstring>

#if defined(__linux__)
#include <sys/mman.h>
#endif

namespace varlen_rnn {
namespace cpu {

bool huge_page_advice() {
  const char* env = std::getenv("VARLEN_RNN_CPU_HUGE_PAGES");
  if (env == nullptr) return true;
  TORCH_CHECK(std::strcmp(env, "0") == 0 || std::strcmp(env, "1") == 0,
              "VARLEN_RNN_CPU_HUGE_PAGES must be 0 or 1, got '", env, "'");
  return env[0] == '1';
}

at::Tensor empty_large(at::IntArrayRef sizes, const at::TensorOptions& opts) {
  at::Tensor t = at::empty(sizes, opts);
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  constexpr uintptr_t kHuge = uintptr_t(2) << 20;  // x86-64's and aarch64's (4 KiB base) size
  // glibc may serve smaller blocks from its heap (its mmap threshold adapts
  // to blocks freed, up to 32 MiB on 64-bit), where advice would outlive the
  // buffer; from 32 MiB on a block is a fresh mapping, unmapped when freed,
  // unless the heap has that much free (then the advice stays on that memory:
  // harmless, huge pages are what it would get anyway).
  constexpr size_t kFreshMmap = size_t(32) << 20;
  const auto p = reinterpret_cast<uintptr_t>(t.data_ptr());
  const uintptr_t first = (p + kHuge - 1) & ~(kHuge - 1), last = (p + t.nbytes()) & ~(kHuge - 1);
  // A hint: where the kernel declines it (huge pages "never", or no THP at
  // all) the pages stay small and nothing else changes, so its result is
  // not checked.
  if (t.nbytes() >= kFreshMmap && last > first && huge_page_advice())
    madvise(reinterpret_cast<void*>(first), last - first, MADV_HUGEPAGE);
#endif
  return t;
}

at::Tensor contiguous_large(const at::Tensor& t, at::ScalarType dtype) {
  if (t.scalar_type() == dtype && t.is_contiguous()) return t;
  return empty_large(t.sizes(), t.options().dtype(dtype)).copy_(t);
}

}  // namespace cpu
}  // namespace varlen_rnn
