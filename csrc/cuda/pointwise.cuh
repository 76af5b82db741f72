// Small CUDA kernels: lengths and ragged-index preparation and the fallback
// path's per-step fused pointwise passes. Shape legend in layer.h; these tensors
// are all contiguous and indexed with int64 offsets.
//
// Row conventions shared with the persistent kernels (persistent.cuh). Every
// per-position buffer has the input's rows: RowMap `rows` (layout.h) maps a
// valid position (t, b) to a row, R rows per direction (T*B for padded input,
// N for ragged input):
//   gx         [R, D*GH]    row rows.row(t, b), direction d at columns d*GH
//   output     [R, D*H]     row rows.row(t, b), direction d at columns d*H
//   workspace  [D, R, SH]   the cell's saved values (cells/cell.h kWorkspaceSaved:
//              none for the RNN, whose backward reads them from output), in
//              workspace_t: op-math, bfloat16 for bfloat16 (layer.h workspace_dtype);
//              0 at padded positions, as the output
//   dg         [D, R, >= GH] row stride ldg, in the storage dtype (it only
//              feeds GEMMs: tensor cores for half types): the gate gradients
//              dgx at columns [0, GH); a GRU's dghn at [GH, GH + H). The
//              hidden-side gate gradients dgh (the operand of dW_hh and of the
//              backward's dgh @ W_hh) are dgx's values but for a GRU's last gate
//              (Cell::kHiddenGradsDiffer: dn * r), so only that gate is kept
//              apart, in dghn; the other cells have none. dg is its own buffer
//              (ldg = GH (+ H)) or the workspace's first columns (ldg = SH),
//              written over where the backward may consume it (entries.h): the
//              thread that reads a unit's saved values at a position writes its
//              gradients there, after reading, and nothing reads them again
//   hprev      [D, R, H] in the storage dtype
// G = Cell::kGates, S = kWorkspaceSaved<Cell>; an LSTM with a projection has P-wide
// output, hprev and state (P for H in those three).
// Padded input has positions t >= length: the kernels write 0 there in
// output, dg and hprev, so that the output is defined and the
// weight-gradient GEMMs can run over all rows. Ragged input has none.
// For the packed layout b is the rank (longest first): the launcher permutes
// hx in and h_n / grad_hx out by sorted_indices.
#pragma once

#include <c10/macros/Macros.h>
#include <c10/util/BFloat16.h>

#include <type_traits>

#include "cells/cell.h"
#include "layout.h"

namespace varlen_rnn {
namespace cuda {

constexpr int kPointwiseThreads = 256;

// The workspace's element type (layer.h workspace_dtype): bfloat16 for a
// bfloat16 layer (each saved value rounded once as it is stored, as on the
// CPU), acc_t otherwise.
template <typename scalar_t, typename acc_t>
using workspace_t =
    std::conditional_t<std::is_same<scalar_t, c10::BFloat16>::value, scalar_t, acc_t>;

// Writes unit j's saved values to workspace row drow (d * R + row: rows of
// kWorkspaceSaved * H values), where the cell keeps any and the call wants
// them (ws not null).
template <typename Cell, typename W, typename A>
__host__ __device__ __forceinline__ void store_saved(W* ws, int64_t drow, int j, int H,
                                                     const A (&saved)[Cell::kSaved]) {
  if constexpr (kWorkspaceSaved<Cell> > 0) {
    if (ws != nullptr) store_cols(ws + drow * kWorkspaceSaved<Cell> * H, j, H, saved);
  }
}

// Reads unit j's saved values at a position: from workspace row drow, or, for
// a cell whose saved values are its output (kSavedIsOutput: one value, h';
// its workspace has no columns), from the output at out + out_off (the
// position's row, at its direction's columns).
template <typename Cell, typename W, typename S, typename A>
__host__ __device__ __forceinline__ void load_saved(const W* ws, int64_t drow, const S* out,
                                                    int64_t out_off, int j, int H,
                                                    A (&saved)[Cell::kSaved]) {
  if constexpr (Cell::kSavedIsOutput) {
    static_assert(Cell::kSaved == 1, "a cell's output is one value per unit");
    saved[0] = static_cast<A>(out[out_off + j]);
  } else {
    load_cols<Cell::kSaved>(ws + drow * kWorkspaceSaved<Cell> * H, j, H, saved);
  }
}

// Stores unit j's gate gradients to dg_row, a row of dg (pointwise.cuh's
// header): dgx's G values at columns g*H + j, then a GRU's hidden-side
// gradient of its last gate (dgh[G-1], dghn) at G*H + j; the cells whose dgh
// is dgx keep no more.
template <typename Cell, typename S, typename A>
__host__ __device__ __forceinline__ void store_gate_grads(S* dg_row, int j, int H,
                                                          const A (&dgx)[Cell::kGates],
                                                          const A (&dgh)[Cell::kGates]) {
  store_cols(dg_row, j, H, dgx);
  if constexpr (Cell::kHiddenGradsDiffer)
    dg_row[static_cast<int64_t>(Cell::kGates) * H + j] = static_cast<S>(dgh[Cell::kGates - 1]);
}

// grad_output's value at i as acc_t; 0 where the op was given None (null: the
// output is not used, and no zero tensor of its size exists).
template <typename A, typename S>
__host__ __device__ __forceinline__ A grad_output_at(const S* grad_out, int64_t i) {
  return grad_out != nullptr ? static_cast<A>(grad_out[i]) : A(0);
}

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
// holds h @ W_hh^T for all rows, from a GEMM in the storage dtype (tensor
// cores for half types, which therefore also get a rounded copy h_lo of the
// state to multiply; the state itself stays in acc_t); b_hh is added here, in
// acc_t, as the persistent kernel adds it (a GEMM with the bias as its C
// operand would first copy the broadcast bias into gh: one more kernel per
// step). Rows past their length
// keep their state (and c); with padding they write the zeros of the padded
// position t = s, its output and its workspace row (every padded position
// t >= length is visited exactly once that way, at step s = t).
// kProj (an LSTM with proj_size > 0): the cell's output h' goes to `out` =
// hcell [D, B, H] (0 for rows that do not run), the operand of the projection
// GEMM, and h / h_lo are not touched: fallback_proj_forward_kernel makes the
// projected state and output from that GEMM.
template <typename Cell, bool kProj, typename scalar_t, typename acc_t>
__global__ void fallback_forward_step_kernel(
    const scalar_t* __restrict__ gx,    // [R, D*GH]
    const scalar_t* __restrict__ gh,    // [D, B, GH]
    const scalar_t* __restrict__ b_hh,  // [D, GH] or nullptr
    const int* __restrict__ lens,       // [B]
    acc_t* __restrict__ h,              // [D, B, H], updated in place (not kProj)
    scalar_t* __restrict__ h_lo,        // [D, B, H] copy of h for the GEMM, or nullptr
    acc_t* __restrict__ c,              // [D, B, H] updated in place (kHasC), else nullptr
    scalar_t* __restrict__ out,         // [R, D*H]; kProj: hcell [D, B, H]
    workspace_t<scalar_t, acc_t>* __restrict__ ws,  // [D, R, SH] or nullptr
    int s, int B, int H, int D, RowMap rows, int64_t R) {
  constexpr int G = Cell::kGates;
  static_assert(!kProj || !Cell::kReadsHPrev, "a projected state cannot enter the cell's math");
  const int64_t idx = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (idx >= static_cast<int64_t>(D) * B * H) return;
  const int j = static_cast<int>(idx % H);
  const int b = static_cast<int>((idx / H) % B);
  const int d = static_cast<int>(idx / (static_cast<int64_t>(H) * B));
  const int len = lens[b];
  const int64_t GH = static_cast<int64_t>(G) * H;
  if (s >= len) {
    if (has_padding(rows)) {  // the padded position t = s: a zero output and workspace row
      const int64_t row = rows.row(s, b);
      if constexpr (!kProj) out[row * D * H + static_cast<int64_t>(d) * H + j] = scalar_t(0);
      const acc_t no_saved[Cell::kSaved] = {};
      store_saved<Cell>(ws, static_cast<int64_t>(d) * R + row, j, H, no_saved);
    }
    if constexpr (kProj) out[idx] = scalar_t(0);
    return;
  }
  const int t = step_time(d, len, s);
  const int64_t row = rows.row(t, b);
  acc_t gxv[G], ghv[G];
  load_cols<G>(gx + row * D * GH + d * GH, j, H, gxv);
  load_cols<G>(gh + (static_cast<int64_t>(d) * B + b) * GH, j, H, ghv);
  if (b_hh != nullptr) {
    acc_t bias[G];
    load_cols<G>(b_hh + d * GH, j, H, bias);
    VR_UNROLL
    for (int g = 0; g < G; ++g) ghv[g] += bias[g];
  }
  CellState<acc_t> prev, next;
  if constexpr (Cell::kReadsHPrev) prev.h = h[idx];
  if constexpr (Cell::kHasC) prev.c = c[idx];
  acc_t saved[Cell::kSaved];
  Cell::template forward<acc_t>(gxv, ghv, prev, next, saved);
  if constexpr (Cell::kHasC) c[idx] = next.c;
  if constexpr (kProj) {
    out[idx] = static_cast<scalar_t>(next.h);
  } else {
    h[idx] = next.h;
    if (h_lo != nullptr) h_lo[idx] = static_cast<scalar_t>(next.h);
    out[row * D * H + static_cast<int64_t>(d) * H + j] = static_cast<scalar_t>(next.h);
  }
  store_saved<Cell>(ws, static_cast<int64_t>(d) * R + row, j, H, saved);
}

// kProj's second pass of a forward step, for every (d, b, p): the projected
// state hr = hcell @ W_hr^T (a GEMM in the storage dtype) becomes the state
// and the output of the rows that ran; the others keep theirs.
template <typename scalar_t, typename acc_t>
__global__ void fallback_proj_forward_kernel(const scalar_t* __restrict__ hr,  // [D, B, P]
                                             const int* __restrict__ lens,     // [B]
                                             acc_t* __restrict__ h,            // [D, B, P]
                                             scalar_t* __restrict__ h_lo,  // [D, B, P] or nullptr
                                             scalar_t* __restrict__ out,   // [R, D*P]
                                             int s, int B, int P, int D, RowMap rows) {
  const int64_t idx = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (idx >= static_cast<int64_t>(D) * B * P) return;
  const int p = static_cast<int>(idx % P);
  const int b = static_cast<int>((idx / P) % B);
  const int d = static_cast<int>(idx / (static_cast<int64_t>(P) * B));
  const int len = lens[b];
  if (s >= len) {
    if (has_padding(rows))
      out[rows.row(s, b) * D * P + static_cast<int64_t>(d) * P + p] = scalar_t(0);
    return;
  }
  const int64_t row = rows.row(step_time(d, len, s), b);
  const scalar_t v = hr[idx];
  h[idx] = static_cast<acc_t>(v);
  if (h_lo != nullptr) h_lo[idx] = v;
  out[row * D * P + static_cast<int64_t>(d) * P + p] = v;
}

// One backward step of the fallback path (steps run s = T-1 .. 0). The
// gradient reaching h after step s comes in two parts: dh_in (acc_t, the
// direct part and grad_h_n) and dh_gemm (the previous step's dgh @ W_hh, a
// GEMM in the storage dtype). Writes the gate gradients of step s (to the
// position's row of dg, and dgh to dgh_step, the next GEMM's operand:
// 0 for finished rows) and the direct part of dh_prev to dh_out; the next GEMM
// adds the W_hh^T part. dc (kHasC) is the gradient reaching c, updated in
// place: c never goes through a GEMM.
// kProj: dh_gemm is the whole gradient reaching the cell's h' (dhr @ W_hr,
// from fallback_proj_backward_kernel's dhr_step, which already holds
// grad_out); dh_in, dh_out and hprev are unused (the P-wide state's rows are
// the projection kernel's), and hcell gets h' of the position (the cell's
// output_from_saved; 0 where padded), the dW_hr GEMM's other operand.
// ws and dg are not __restrict__: dg may be the workspace's first columns.
template <typename Cell, bool kProj, typename scalar_t, typename acc_t>
__global__ void fallback_backward_step_kernel(
    const scalar_t* __restrict__ grad_out,   // [R, D*H] (not kProj), or null: zero
    const scalar_t* __restrict__ out,        // [R, D*H] forward output (h of valid steps)
    const scalar_t* __restrict__ hx,         // [D, B, H]
    const workspace_t<scalar_t, acc_t>* ws,  // [D, R, SH]
    const int* __restrict__ lens,            // [B]
    const acc_t* __restrict__ dh_in,         // [D, B, H] (not kProj)
    const scalar_t* __restrict__ dh_gemm,    // [D, B, H]
    acc_t* __restrict__ dh_out,              // [D, B, H] (not kProj)
    acc_t* __restrict__ dc,                  // [D, B, H] (kHasC), else nullptr
    scalar_t* dg,                            // [D, R, >= GH], row stride ldg
    int64_t ldg,
    scalar_t* __restrict__ dgh_step,  // [D, B, GH]
    scalar_t* __restrict__ hprev,     // [D, R, H] (not kProj)
    scalar_t* __restrict__ hcell,     // [D, R, H] (kProj), else nullptr
    int s, int B, int H, int D, RowMap rows, int64_t R) {
  constexpr int G = Cell::kGates;
  static_assert(!kProj || !Cell::kReadsHPrev, "a projected state cannot enter the cell's math");
  const int64_t idx = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (idx >= static_cast<int64_t>(D) * B * H) return;
  const int j = static_cast<int>(idx % H);
  const int b = static_cast<int>((idx / H) % B);
  const int d = static_cast<int>(idx / (static_cast<int64_t>(H) * B));
  const int len = lens[b];
  const int64_t GH = static_cast<int64_t>(G) * H;
  const acc_t zeros[G] = {};
  scalar_t* dgh_s = dgh_step + idx / H * GH;
  const acc_t dh =
      kProj ? static_cast<acc_t>(dh_gemm[idx]) : dh_in[idx] + static_cast<acc_t>(dh_gemm[idx]);
  if (s >= len) {
    store_cols(dgh_s, j, H, zeros);
    if (has_padding(rows)) {
      const int64_t row = rows.row(s, b);
      store_gate_grads<Cell>(dg + (static_cast<int64_t>(d) * R + row) * ldg, j, H, zeros, zeros);
      const int64_t hrow = (static_cast<int64_t>(d) * R + row) * H + j;
      if constexpr (kProj) {
        hcell[hrow] = scalar_t(0);
      } else {
        hprev[hrow] = scalar_t(0);
      }
    }
    if constexpr (!kProj) dh_out[idx] = dh;
    return;
  }
  const int t = step_time(d, len, s);
  const int64_t row = rows.row(t, b);
  const int64_t col = static_cast<int64_t>(d) * H + j;
  CellState<acc_t> grad, grad_prev;
  grad.h = kProj ? dh : dh + grad_output_at<acc_t>(grad_out, row * D * H + col);
  if constexpr (Cell::kHasC) grad.c = dc[idx];
  scalar_t h_prev = scalar_t(0);
  if constexpr (!kProj) {
    h_prev = s == 0 ? hx[idx] : out[rows.row(prev_time(d, t), b) * D * H + col];
  }
  acc_t saved[Cell::kSaved], dgxv[G], dghv[G];
  load_saved<Cell>(ws, static_cast<int64_t>(d) * R + row, out,
                   row * D * H + static_cast<int64_t>(d) * H, j, H, saved);
  Cell::backward(grad, static_cast<acc_t>(h_prev), saved, dgxv, dghv, grad_prev);
  store_gate_grads<Cell>(dg + (static_cast<int64_t>(d) * R + row) * ldg, j, H, dgxv, dghv);
  store_cols(dgh_s, j, H, dghv);
  if constexpr (kProj) {
    hcell[(static_cast<int64_t>(d) * R + row) * H + j] =
        static_cast<scalar_t>(Cell::output_from_saved(saved));
  } else {
    hprev[(static_cast<int64_t>(d) * R + row) * H + j] = h_prev;
    dh_out[idx] = grad_prev.h;
  }
  if constexpr (Cell::kHasC) dc[idx] = grad_prev.c;
}

// kProj's first pass of a backward step, for every (d, b, p): the gradient
// reaching the state hr after step s is dhr_in (acc_t: grad_h_n, and what
// finished rows carry) + dhr_gemm (the previous step's dgh @ W_hh) + grad_out
// at (t, b). It goes to drows (the dW_hr GEMM's operand, 0 at padding) and to
// dhr_step (the operand of the GEMM dhr @ W_hr that gives the gradient
// reaching h'; 0 for rows that do not run); hprev gets the state the step
// read. A running row's direct part for the next step is 0 (hr_prev enters
// the step only through W_hh); a finished row carries its gradient on.
// grad_out null: zero (grad_output_at).
template <typename scalar_t, typename acc_t>
__global__ void fallback_proj_backward_kernel(const scalar_t* __restrict__ grad_out,  // [R, D*P]
                                              const scalar_t* __restrict__ out,       // [R, D*P]
                                              const scalar_t* __restrict__ hx,        // [D, B, P]
                                              const int* __restrict__ lens,           // [B]
                                              const acc_t* __restrict__ dhr_in,       // [D, B, P]
                                              const scalar_t* __restrict__ dhr_gemm,  // [D, B, P]
                                              acc_t* __restrict__ dhr_out,            // [D, B, P]
                                              scalar_t* __restrict__ drows,           // [D, R, P]
                                              scalar_t* __restrict__ dhr_step,        // [D, B, P]
                                              scalar_t* __restrict__ hprev,           // [D, R, P]
                                              int s, int B, int P, int D, RowMap rows, int64_t R) {
  const int64_t idx = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (idx >= static_cast<int64_t>(D) * B * P) return;
  const int p = static_cast<int>(idx % P);
  const int b = static_cast<int>((idx / P) % B);
  const int d = static_cast<int>(idx / (static_cast<int64_t>(P) * B));
  const int len = lens[b];
  const acc_t dhr = dhr_in[idx] + static_cast<acc_t>(dhr_gemm[idx]);
  if (s >= len) {
    dhr_step[idx] = scalar_t(0);
    if (has_padding(rows)) {
      const int64_t prow = (static_cast<int64_t>(d) * R + rows.row(s, b)) * P + p;
      drows[prow] = scalar_t(0);
      hprev[prow] = scalar_t(0);
    }
    dhr_out[idx] = dhr;
    return;
  }
  const int t = step_time(d, len, s);
  const int64_t row = rows.row(t, b);
  const int64_t col = static_cast<int64_t>(d) * P + p;
  const scalar_t g =
      static_cast<scalar_t>(dhr + grad_output_at<acc_t>(grad_out, row * D * P + col));
  drows[(static_cast<int64_t>(d) * R + row) * P + p] = g;
  dhr_step[idx] = g;
  hprev[(static_cast<int64_t>(d) * R + row) * P + p] =
      s == 0 ? hx[idx] : out[rows.row(prev_time(d, t), b) * D * P + col];
  dhr_out[idx] = acc_t(0);
}

}  // namespace cuda
}  // namespace varlen_rnn
