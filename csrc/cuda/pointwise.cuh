// Small CUDA kernels: lengths and ragged-index preparation and the fallback
// path's per-step fused pointwise passes. Shape legend in gru.h; these tensors
// are all contiguous and indexed with int64 offsets.
//
// Row conventions shared with the persistent kernels (persistent.cuh). Every
// per-position buffer has the input's rows: RowMap `rows` (layout.h) maps a
// valid position (t, b) to a row, R rows per direction (T*B for padded input,
// N for ragged input):
//   gx / dgx   [R, D*3H]    row rows.row(t, b), direction d at columns d*3H
//   output     [R, D*H]     row rows.row(t, b), direction d at columns d*H
//   workspace  [D, R, 4H]   columns r | z | n | gh_n, op-math
//   dgh, hprev [D, R, 3H] / [D, R, H] in the storage dtype (they only feed
//              GEMMs: tensor cores for half types)
// Padded input has positions t >= length: the kernels write 0 there in
// output, dgx, dgh and hprev, so that the output is defined and the
// weight-gradient GEMMs can run over all rows. Ragged input has none.
// For the packed layout b is the rank (longest first): the launcher permutes
// hx in and h_n / grad_hx out by sorted_indices.
#pragma once

#include <c10/macros/Macros.h>

#include "gate_math.h"
#include "layout.h"

namespace varlen_rnn {
namespace cuda {

constexpr int kPointwiseThreads = 256;

// Whether the layout has padded positions (t >= length) to write zeros to.
__host__ __device__ inline bool has_padding(const RowMap& rows) {
  return rows.kind == kPaddedTimeMajor || rows.kind == kPaddedBatchMajor;
}

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

// Validates offsets [B+1] (device assert, no host sync) and writes what the
// kernels read: starts [B+1] int64 and the lengths [B] int64 (for
// lengths_prep_kernel). Every value is clamped so that a build without device
// asserts still never reads or writes out of bounds: starts within [0, N],
// non-decreasing, and lengths within [0, max_len] with start + length <= N.
template <typename index_t>
__global__ void offsets_prep_kernel(const index_t* __restrict__ offsets, int64_t B, int64_t N,
                                    int64_t max_len, int64_t* __restrict__ starts,
                                    int64_t* __restrict__ lengths) {
  const int64_t b = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (b > B) return;
  const int64_t lo = static_cast<int64_t>(offsets[b]);
  CUDA_KERNEL_ASSERT((b > 0 || lo == 0) && "varlen_rnn: offsets[0] must be 0");
  CUDA_KERNEL_ASSERT((b < B || lo == N) && "varlen_rnn: offsets[B] must equal input.size(0)");
  const int64_t start = lo < 0 ? 0 : (lo > N ? N : lo);
  starts[b] = start;
  if (b == B) return;
  const int64_t hi = static_cast<int64_t>(offsets[b + 1]);
  CUDA_KERNEL_ASSERT(hi >= lo && "varlen_rnn: seq_index (offsets) must be non-decreasing");
  CUDA_KERNEL_ASSERT(hi - lo <= max_len && "varlen_rnn: max_len must be >= every length");
  const int64_t end = hi < start ? start : (hi > N ? N : hi);
  lengths[b] = end - start < max_len ? end - start : max_len;
}

// Checks sorted_indices [B] on the device (one launch over count [B] int32,
// zeroed, then one over the counts): a device assert unless it is a
// permutation of 0..B-1. order gets the values clamped into [0, B), so a
// build without device asserts still indexes within bounds.
__global__ void permutation_count_kernel(const int64_t* __restrict__ idx, int64_t B,
                                         int* __restrict__ count, int64_t* __restrict__ order) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= B) return;
  const int64_t v = idx[i];
  CUDA_KERNEL_ASSERT(v >= 0 && v < B && "varlen_rnn: sorted_indices must be in [0, B)");
  const int64_t c = v < 0 ? 0 : (v >= B ? B - 1 : v);
  order[i] = c;
  atomicAdd(count + c, 1);
}

__global__ void permutation_check_kernel(const int* __restrict__ count, int64_t B) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= B) return;
  CUDA_KERNEL_ASSERT(count[i] == 1 && "varlen_rnn: sorted_indices must be a permutation");
}

// Host side of the packed layout, from batch_sizes [T] (checked): the step
// starts [T+1] (row of (t, rank 0); starts[T] = N) and each rank's length [B]
// (#{t : batch_sizes[t] > i}, non-increasing, so the ranks are already sorted).
inline void packed_rows(const int64_t* batch_sizes, int64_t T, int64_t B, int64_t* starts,
                        int64_t* rank_lengths) {
  starts[0] = 0;
  for (int64_t t = 0; t < T; ++t) starts[t + 1] = starts[t] + batch_sizes[t];
  int64_t t = T;
  for (int64_t i = 0; i < B; ++i) {
    while (t > 0 && batch_sizes[t - 1] <= i) --t;
    rank_lengths[i] = t;
  }
}

// One forward step of the fallback path, for every (d, b, j). gh already
// holds h @ W_hh^T + b_hh for all rows, from a GEMM in the storage dtype (tensor
// cores for half types, which therefore also get a rounded copy h_lo of the
// state to multiply; the state itself stays in acc_t). Rows past their length
// keep their state; with padding they write the zero of the padded position
// t = s (every padded position t >= length is visited exactly once that way,
// at step s = t).
template <typename scalar_t, typename acc_t>
__global__ void fallback_forward_step_kernel(
    const scalar_t* __restrict__ gx,  // [R, D*3H]
    const scalar_t* __restrict__ gh,  // [D, B, 3H]
    const int* __restrict__ lens,     // [B]
    acc_t* __restrict__ h,            // [D, B, H], updated in place
    scalar_t* __restrict__ h_lo,      // [D, B, H] copy of h for the GEMM, or nullptr
    scalar_t* __restrict__ out,       // [R, D*H]
    acc_t* __restrict__ ws,           // [D, R, 4H] or nullptr
    int s, int B, int H, int D, RowMap rows, int64_t R) {
  const int64_t idx = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (idx >= static_cast<int64_t>(D) * B * H) return;
  const int j = static_cast<int>(idx % H);
  const int b = static_cast<int>((idx / H) % B);
  const int d = static_cast<int>(idx / (static_cast<int64_t>(H) * B));
  const int len = lens[b];
  const int64_t G = static_cast<int64_t>(D) * 3 * H;
  if (s >= len) {
    if (has_padding(rows)) {
      out[rows.row(s, b) * D * H + static_cast<int64_t>(d) * H + j] = scalar_t(0);
    }
    return;
  }
  const int t = step_time(d, len, s);
  const int64_t row = rows.row(t, b);
  const scalar_t* gxr = gx + row * G + static_cast<int64_t>(d) * 3 * H;
  const scalar_t* ghr = gh + (static_cast<int64_t>(d) * B + b) * 3 * H;
  GruCellSaved<acc_t> sv;
  const acc_t hp = h[idx];
  const acc_t hn = gru_cell_forward<acc_t>(
      static_cast<acc_t>(gxr[j]), static_cast<acc_t>(gxr[H + j]),
      static_cast<acc_t>(gxr[2 * H + j]), static_cast<acc_t>(ghr[j]),
      static_cast<acc_t>(ghr[H + j]), static_cast<acc_t>(ghr[2 * H + j]), hp, sv);
  h[idx] = hn;
  if (h_lo != nullptr) h_lo[idx] = static_cast<scalar_t>(hn);
  out[row * D * H + static_cast<int64_t>(d) * H + j] = static_cast<scalar_t>(hn);
  if (ws != nullptr) store_saved(ws + (static_cast<int64_t>(d) * R + row) * 4 * H, j, H, sv);
}

// One backward step of the fallback path (steps run s = T-1 .. 0). The
// gradient reaching h after step s comes in two parts: dh_in (acc_t, the
// direct part and grad_h_n) and dh_gemm (the previous step's dgh @ W_hh, a
// GEMM in the storage dtype). Writes the gate gradients of step s (to the
// position's rows of dgx and dgh, and to dgh_step, the next GEMM's operand:
// 0 for finished rows) and the direct part of dh_prev to dh_out; the next GEMM
// adds the W_hh^T part.
template <typename scalar_t, typename acc_t>
__global__ void fallback_backward_step_kernel(
    const scalar_t* __restrict__ grad_out,  // [R, D*H]
    const scalar_t* __restrict__ out,       // [R, D*H] forward output (h of valid steps)
    const scalar_t* __restrict__ hx,        // [D, B, H]
    const acc_t* __restrict__ ws,           // [D, R, 4H]
    const int* __restrict__ lens,           // [B]
    const acc_t* __restrict__ dh_in,        // [D, B, H]
    const scalar_t* __restrict__ dh_gemm,   // [D, B, H]
    acc_t* __restrict__ dh_out,             // [D, B, H]
    scalar_t* __restrict__ dgx,             // [R, D*3H]
    scalar_t* __restrict__ dgh,             // [D, R, 3H]
    scalar_t* __restrict__ dgh_step,        // [D, B, 3H]
    scalar_t* __restrict__ hprev,           // [D, R, H]
    int s, int B, int H, int D, RowMap rows, int64_t R) {
  const int64_t idx = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (idx >= static_cast<int64_t>(D) * B * H) return;
  const int j = static_cast<int>(idx % H);
  const int b = static_cast<int>((idx / H) % B);
  const int d = static_cast<int>(idx / (static_cast<int64_t>(H) * B));
  const int len = lens[b];
  const int64_t G = static_cast<int64_t>(D) * 3 * H;
  scalar_t* dgh_s = dgh_step + idx / H * 3 * H;
  const acc_t dh = dh_in[idx] + static_cast<acc_t>(dh_gemm[idx]);
  if (s >= len) {
    store_hidden_gate_grads(dgh_s, j, H, GruCellGrad<acc_t>{});
    if (has_padding(rows)) {
      const int64_t row = rows.row(s, b);
      store_gate_grads(dgx + row * G + static_cast<int64_t>(d) * 3 * H,
                       dgh + (static_cast<int64_t>(d) * R + row) * 3 * H, j, H,
                       GruCellGrad<acc_t>{});
      hprev[(static_cast<int64_t>(d) * R + row) * H + j] = scalar_t(0);
    }
    dh_out[idx] = dh;
    return;
  }
  const int t = step_time(d, len, s);
  const int64_t row = rows.row(t, b);
  const int64_t col = static_cast<int64_t>(d) * H + j;
  const acc_t dh_tot = dh + static_cast<acc_t>(grad_out[row * D * H + col]);
  const scalar_t h_prev = s == 0 ? hx[idx] : out[rows.row(prev_time(d, t), b) * D * H + col];
  const GruCellSaved<acc_t> sv = load_saved(ws + (static_cast<int64_t>(d) * R + row) * 4 * H, j, H);
  const GruCellGrad<acc_t> g = gru_cell_backward<acc_t>(dh_tot, static_cast<acc_t>(h_prev), sv);
  store_gate_grads(dgx + row * G + static_cast<int64_t>(d) * 3 * H,
                   dgh + (static_cast<int64_t>(d) * R + row) * 3 * H, j, H, g);
  store_hidden_gate_grads(dgh_s, j, H, g);
  hprev[(static_cast<int64_t>(d) * R + row) * H + j] = h_prev;
  dh_out[idx] = g.dh_prev;
}

}  // namespace cuda
}  // namespace varlen_rnn
