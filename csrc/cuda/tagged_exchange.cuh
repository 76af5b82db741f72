// The tagged exchange: what the persistent kernels share between blocks each step (the forward's
// h, the backward's dgh) without a grid barrier per step (VARLEN_RNN_EXCHANGE=tagged; launch.h).
// Each value travels with the step that wrote it, in one 64-bit word (value bits low, tag high),
// stored and loaded whole: a naturally aligned 64-bit access is single-copy atomic in the PTX
// memory model, so a reader that sees the tag it waits for sees that step's value, with no fence
// between the data and a flag.
// A block stages the rows it needs by polling their words until every tag is the step's: the
// wait for the other blocks and the read of their data are one trip to L2, where grid.sync() is
// a fence, an atomic, a poll of the barrier word and then the read.
//
// Why two buffers by step parity suffice without a barrier (the forward; the backward is the same
// with dgh and s descending): a block writes h_{s+2} over h_s of a row only after it has read
// h_{s+1} of that row from every block, and every block wrote its part of h_{s+1} only after it
// had read all of h_s of that row (its product over the row comes before its pointwise part). The
// fences make that order hold on a weak memory model: a thread fences after its polls (acquire) and
// before its stores of the next state (release), so a block's reads of h_s happen before its stores
// of h_{s+1}, which happen before any block's overwrite of h_s. Tags are 1 + the step that wrote
// them; the launch sets both buffers' words to tag 0 before its first step (and one grid.sync()
// makes that visible), so a word left by an earlier launch on the same memory never passes for this
// one's. Every block of a cooperative launch is resident, so a poll always ends; a wait past
// kMaxPolls polls traps (a launch error, not a hang).
#pragma once

#include <cstdint>
#include <cstring>

namespace varlen_rnn {
namespace cuda {

constexpr int kTagBatch = 8;  // words a lane has in flight while staging a row
#ifdef VARLEN_RNN_HOST_EMULATION
constexpr long long kMaxPolls = 1ll << 20;  // each a switch to another fiber: a few seconds
#else
constexpr long long kMaxPolls = 1ll << 26;  // ~1 minute of polls of L2
#endif

__host__ __device__ __forceinline__ uint64_t tag_word(float v, uint32_t tag) {
  uint32_t bits;
  std::memcpy(&bits, &v, 4);
  return (static_cast<uint64_t>(tag) << 32) | bits;
}
__host__ __device__ __forceinline__ float tagged_value(uint64_t w) {
  const uint32_t bits = static_cast<uint32_t>(w);
  float v;
  std::memcpy(&v, &bits, 4);
  return v;
}
__host__ __device__ __forceinline__ uint32_t word_tag(uint64_t w) {
  return static_cast<uint32_t>(w >> 32);
}

#ifndef VARLEN_RNN_HOST_EMULATION  // the emulation defines these on CPU atomics (emu_runtime.h)
__device__ __forceinline__ uint64_t load_tagged(const uint64_t* p) {
  uint64_t v = 0;
#if defined(__CUDA_ARCH__)
  asm volatile("ld.relaxed.gpu.global.u64 %0, [%1];" : "=l"(v) : "l"(p) : "memory");
#endif
  return v;
}
__device__ __forceinline__ void store_tagged(uint64_t* p, uint64_t v) {
#if defined(__CUDA_ARCH__)
  asm volatile("st.relaxed.gpu.global.u64 [%0], %1;" ::"l"(p), "l"(v) : "memory");
#endif
}
// fence.acq_rel at GPU scope: after relaxed polls an acquire, before relaxed stores a release.
__device__ __forceinline__ void fence_tagged() {
#if defined(__CUDA_ARCH__)
  asm volatile("fence.acq_rel.gpu;" ::: "memory");
#endif
}
__device__ __forceinline__ void poll_pause() {}
__device__ __forceinline__ void tagged_wait_timed_out() {
#if defined(__CUDA_ARCH__)
  __trap();
#endif
}
#endif

// Copies kc values of one tile row from the tagged words at src into dst, waiting until each
// word holds tag `want` (zeros, with no wait, when src is null: the row does not run). The
// lane's words go out kTagBatch at a time before any is checked, so one trip to L2 covers them.
// Ends with the acquire fence.
__device__ __forceinline__ void stage_row_tagged(float* dst, const uint64_t* src, int kc, int lane,
                                                 uint32_t want) {
  if (src == nullptr) {
    for (int k = lane; k < kc; k += 32) dst[k] = 0.0f;
    return;
  }
  for (int k = lane; k < kc; k += 32 * kTagBatch) {
    uint64_t w[kTagBatch];
#pragma unroll
    for (int u = 0; u < kTagBatch; ++u) {
      const int kk = k + 32 * u;
      w[u] = kk < kc ? load_tagged(src + kk) : tag_word(0.0f, want);
    }
#pragma unroll
    for (int u = 0; u < kTagBatch; ++u) {
      const int kk = k + 32 * u;
      for (long long polls = 0; word_tag(w[u]) != want; ++polls) {
        if (polls == kMaxPolls) tagged_wait_timed_out();
        poll_pause();
        w[u] = load_tagged(src + kk);
      }
      if (kk < kc) dst[kk] = tagged_value(w[u]);
    }
  }
  fence_tagged();
}

}  // namespace cuda
}  // namespace varlen_rnn
