// Output allocation for the memory-bound CPU kernels.
//
// A large output is written once, right after it is allocated, into pages the process has never touched:
// glibc serves allocations this size with a fresh mmap, so every 4 KB page costs a fault in which the kernel
// zeroes it first. For a 64 MB softmax output that is 16k faults, about 15 ms on the 2-core machine, several
// times the kernel's own reads and writes. Asking for transparent huge pages on the untouched buffer turns
// them into ~32 faults of 2 MB. (Torch's CPU allocator does the same for every allocation when the
// environment sets THP_MEM_ALLOC_ENABLE=1; here it applies to these kernels' outputs only.)
#pragma once
#include <ATen/ATen.h>

#include <cstdint>

#if defined(__linux__)
#include <sys/mman.h>
#endif

namespace gptfast::cpu {

// Below this an output has too few pages for the fault cost to matter.
constexpr size_t kHugePageMinBytes = size_t(8) << 20;

// Advises the kernel to back t's whole 2 MB-aligned interior with huge pages; t must not be written yet for
// it to take effect. Only a hint: a kernel without THP, or memory that is already mapped, is left as it was.
inline at::Tensor with_huge_pages(at::Tensor t) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  constexpr uintptr_t kHuge = uintptr_t(2) << 20;
  const size_t bytes = t.nbytes();
  if (bytes >= kHugePageMinBytes) {
    const uintptr_t p = reinterpret_cast<uintptr_t>(t.data_ptr());
    const uintptr_t begin = (p + kHuge - 1) & ~(kHuge - 1), end = (p + bytes) & ~(kHuge - 1);
    if (end > begin) madvise(reinterpret_cast<void*>(begin), end - begin, MADV_HUGEPAGE);
  }
#endif
  return t;
}

// at::empty_like for an output the kernel writes in full.
inline at::Tensor empty_output_like(const at::Tensor& t) {
  return with_huge_pages(at::empty_like(t, at::MemoryFormat::Contiguous));
}

}  // namespace gptfast::cpu
