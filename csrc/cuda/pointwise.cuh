// Small CUDA kernels: lengths preparation and the fallback path's per-step
// fused pointwise passes. Shape legend in gru.h; these tensors are all
// contiguous and indexed with int64 offsets.
//
// Row conventions shared with the persistent kernels (persistent.cuh):
//   gx / dgx   [T*B, D*3H]  rows in the input's layout: (t, b) -> t*sx_t + b*sx_b
//   workspace  [D, T*B, 4H] rows t*B + b, columns r | z | n | gh_n, op-math
//   dgh, hprev [D, T*B, 3H] / [D, T*B, H] rows s*B + b, s = the step index,
//              in the storage dtype (they only feed GEMMs: tensor cores for
//              half types); zero where row b is inactive at step s, so the
//              weight-gradient GEMMs can run over all rows.
#pragma once

#include <c10/macros/Macros.h>

#include "gate_math.h"

namespace varlen_rnn {
namespace cuda {

constexpr int kPointwiseThreads = 256;

// Element strides of a padded [T, B, F] (or [B, T, F]) tensor.
struct RowStrides {
  int64_t t, b;
  __host__ __device__ int64_t at(int64_t t_, int64_t b_) const { return t_ * t + b_ * b; }
};

// Validates lengths (device assert, no host sync), converts them to int32 and,
// when `perm` is given, writes a stable descending order: perm[rank] = b and
// sorted[rank] = lengths[b]. rank counts the rows that sort before b, so the
// result needs no atomics and is the same every run. O(B^2) over the grid:
// negligible for the batch sizes an RNN sees (B = 4096 is 16M compares).
template <typename len_t>
__global__ void lengths_prep_kernel(const len_t* __restrict__ lengths, int B, int T,
                                    int* __restrict__ lens32, int* __restrict__ perm,
                                    int* __restrict__ sorted) {
  const int b = blockIdx.x * blockDim.x + threadIdx.x;
  if (b >= B) return;
  const int64_t raw = static_cast<int64_t>(lengths[b]);
  CUDA_KERNEL_ASSERT(raw >= 0 && raw <= T && "varlen_rnn: lengths must be in [0, T]");
  // Clamped so that a build without device asserts still never reads or
  // writes out of bounds.
  const int len = static_cast<int>(raw < 0 ? 0 : (raw > T ? T : raw));
  lens32[b] = len;
  if (perm == nullptr) return;
  int rank = 0;
  for (int o = 0; o < B; ++o) {
    const int64_t ro = static_cast<int64_t>(lengths[o]);
    const int lo = static_cast<int>(ro < 0 ? 0 : (ro > T ? T : ro));
    rank += (lo > len) || (lo == len && o < b);
  }
  perm[rank] = b;
  sorted[rank] = len;
}

// One forward step of the fallback path, for every (d, b, j). gh already
// holds h @ W_hh^T + b_hh for all rows, from a GEMM in the storage dtype (tensor
// cores for half types, which therefore also get a rounded copy h_lo of the
// state to multiply; the state itself stays in acc_t). Rows past their length
// keep their state and write the zero of the padded position t = s (every
// padded position t >= length is visited exactly once that way, at step s = t).
template <typename scalar_t, typename acc_t>
__global__ void fallback_forward_step_kernel(
    const scalar_t* __restrict__ gx,  // [T*B, D*3H]
    const scalar_t* __restrict__ gh,  // [D, B, 3H]
    const int* __restrict__ lens,     // [B]
    acc_t* __restrict__ h,            // [D, B, H], updated in place
    scalar_t* __restrict__ h_lo,      // [D, B, H] copy of h for the GEMM, or nullptr
    scalar_t* __restrict__ out,       // [T, B, D*H] or [B, T, D*H]
    acc_t* __restrict__ ws,           // [D, T*B, 4H] or nullptr
    int s, int T, int B, int H, int D, RowStrides xs, RowStrides os) {
  const int64_t idx = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (idx >= static_cast<int64_t>(D) * B * H) return;
  const int j = static_cast<int>(idx % H);
  const int b = static_cast<int>((idx / H) % B);
  const int d = static_cast<int>(idx / (static_cast<int64_t>(H) * B));
  const int len = lens[b];
  if (s >= len) {
    out[os.at(s, b) + static_cast<int64_t>(d) * H + j] = scalar_t(0);
    return;
  }
  const int t = step_time(d, len, s);
  const scalar_t* gxr = gx + xs.at(t, b) + static_cast<int64_t>(d) * 3 * H;
  const scalar_t* ghr = gh + (static_cast<int64_t>(d) * B + b) * 3 * H;
  GruCellSaved<acc_t> sv;
  const acc_t hp = h[idx];
  const acc_t hn = gru_cell_forward<acc_t>(
      static_cast<acc_t>(gxr[j]), static_cast<acc_t>(gxr[H + j]),
      static_cast<acc_t>(gxr[2 * H + j]), static_cast<acc_t>(ghr[j]),
      static_cast<acc_t>(ghr[H + j]), static_cast<acc_t>(ghr[2 * H + j]), hp, sv);
  h[idx] = hn;
  if (h_lo != nullptr) h_lo[idx] = static_cast<scalar_t>(hn);
  out[os.at(t, b) + static_cast<int64_t>(d) * H + j] = static_cast<scalar_t>(hn);
  if (ws != nullptr) store_saved(ws + ((static_cast<int64_t>(d) * T + t) * B + b) * 4 * H, j, H, sv);
}

// One backward step of the fallback path (steps run s = T-1 .. 0). The
// gradient reaching h after step s comes in two parts: dh_in (acc_t, the
// direct part and grad_h_n) and dh_gemm (the previous step's dgh @ W_hh, a
// GEMM in the storage dtype). Writes the gate gradients of step s and the
// direct part of dh_prev to dh_out; the next GEMM adds the W_hh^T part.
template <typename scalar_t, typename acc_t>
__global__ void fallback_backward_step_kernel(
    const scalar_t* __restrict__ grad_out,  // like output
    const scalar_t* __restrict__ out,       // forward output (h of valid steps)
    const scalar_t* __restrict__ hx,        // [D, B, H]
    const acc_t* __restrict__ ws,           // [D, T*B, 4H]
    const int* __restrict__ lens,           // [B]
    const acc_t* __restrict__ dh_in,        // [D, B, H]
    const scalar_t* __restrict__ dh_gemm,   // [D, B, H]
    acc_t* __restrict__ dh_out,             // [D, B, H]
    scalar_t* __restrict__ dgx,             // [T*B, D*3H]
    scalar_t* __restrict__ dgh,             // [D, T*B, 3H]
    scalar_t* __restrict__ hprev,           // [D, T*B, H]
    int s, int T, int B, int H, int D, RowStrides xs, RowStrides os) {
  const int64_t idx = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (idx >= static_cast<int64_t>(D) * B * H) return;
  const int j = static_cast<int>(idx % H);
  const int b = static_cast<int>((idx / H) % B);
  const int d = static_cast<int>(idx / (static_cast<int64_t>(H) * B));
  const int len = lens[b];
  scalar_t* dghr = dgh + ((static_cast<int64_t>(d) * T + s) * B + b) * 3 * H;
  scalar_t* hpr = hprev + ((static_cast<int64_t>(d) * T + s) * B + b) * H;
  const acc_t dh = dh_in[idx] + static_cast<acc_t>(dh_gemm[idx]);
  if (s >= len) {
    store_gate_grads(dgx + xs.at(s, b) + static_cast<int64_t>(d) * 3 * H, dghr, j, H,
                     GruCellGrad<acc_t>{});
    hpr[j] = scalar_t(0);
    dh_out[idx] = dh;
    return;
  }
  const int t = step_time(d, len, s);
  const int64_t col = static_cast<int64_t>(d) * H + j;
  const acc_t dh_tot = dh + static_cast<acc_t>(grad_out[os.at(t, b) + col]);
  const scalar_t h_prev = s == 0 ? hx[idx] : out[os.at(prev_time(d, t), b) + col];
  const GruCellSaved<acc_t> sv =
      load_saved(ws + ((static_cast<int64_t>(d) * T + t) * B + b) * 4 * H, j, H);
  const GruCellGrad<acc_t> g = gru_cell_backward<acc_t>(dh_tot, static_cast<acc_t>(h_prev), sv);
  store_gate_grads(dgx + xs.at(t, b) + static_cast<int64_t>(d) * 3 * H, dghr, j, H, g);
  hpr[j] = h_prev;
  dh_out[idx] = g.dh_prev;
}

}  // namespace cuda
}  // namespace varlen_rnn
