// Large buffers over positions (the workspace, the output, the backward's
// gate gradients, the gathered input): allocated by torch's CPU allocator as
// any tensor (so memory profiles and limits see them), then, from 32 MiB on,
// advised for transparent huge pages where Linux offers them on request.
//
// Why: glibc serves a block of 32 MiB or more with a fresh mmap whenever its
// heap has no free space that large, and unmaps it when freed, so a training
// step of a large batch could fault in its biggest buffers anew at every
// step, 4 KiB at a time, and on a virtual machine each fault is costly. On the 2-core AMD EPYC VM
// (THP "madvise"), full-length float32 training steps of GRU/LSTM at B=512 T=50 H=128 and GRU B=128
// T=200 H=256 took 28-77 thousand faults each; with the advice 2-18 thousand, and the steps
// ran 1.17-1.44x faster (benchmarks/bench_huge_pages.py, two runs). Smaller blocks get no advice:
// glibc's mmap threshold rises to the size of a block freed (up to 32 MiB), after which it may
// serve them from its heap, where advice would outlive the buffer (the runs counted no faults in
// calls whose buffers were all smaller). Only the buffer's whole 2 MiB blocks are advised. The
// advice is a hint (a kernel with huge pages "never" ignores it; "always" needs none) and changes
// no value. VARLEN_RNN_CPU_HUGE_PAGES=0 turns it off.
#pragma once

#include <ATen/ATen.h>

namespace varlen_rnn {
namespace cpu {

// Whether empty_large advises: VARLEN_RNN_CPU_HUGE_PAGES=0 turns it off (=1,
// or unset: on; anything else is an error).
bool huge_page_advice();

// at::empty(sizes, opts), with its whole 2 MiB blocks advised for huge pages
// when it holds 32 MiB or more (Linux; elsewhere plain at::empty).
at::Tensor empty_large(at::IntArrayRef sizes, const at::TensorOptions& opts);

// t in dtype and contiguous: t itself if it is so already, else a copy in
// empty_large's memory (the values of t.to(dtype).contiguous()).
at::Tensor contiguous_large(const at::Tensor& t, at::ScalarType dtype);

}  // namespace cpu
}  // namespace varlen_rnn
