// Persistent recurrence kernels: one cooperative launch runs every step of a
// layer (both directions), with the block's slice of W_hh resident in shared
// memory for the whole pass and one grid-wide barrier per step.
//
// Work split: direction d = blockIdx.x / blocks_per_dir owns hidden units
// [j0, j0 + J). Rows are visited in the order `perm` (lengths descending), so
// at step s the running rows are a prefix and whole tiles of finished rows
// are skipped. Nothing is atomic: every sum has a fixed order, so results are
// bitwise identical run to run.
//
// Exchange between blocks goes through global memory written with plain
// stores before grid.sync() and read with __ldcg (L2, never a stale L1 line)
// after it. Row conventions: see pointwise.cuh.
#pragma once

#ifndef VARLEN_RNN_HOST_EMULATION  // a test harness may run these kernels on CPU threads
#include <cooperative_groups.h>
#endif

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cstdint>
#include <type_traits>

#include "gate_math.h"
#include "mma_matvec.cuh"
#include "pointwise.cuh"

namespace varlen_rnn {
namespace cuda {

// A load that bypasses L1 (data other blocks wrote before the grid barrier).
template <typename T>
__device__ __forceinline__ T load_cg(const T* p) {
  return __ldcg(p);
}
template <>
__device__ __forceinline__ c10::Half load_cg(const c10::Half* p) {
  return c10::Half(__ldcg(reinterpret_cast<const unsigned short*>(p)), c10::Half::from_bits());
}
template <>
__device__ __forceinline__ c10::BFloat16 load_cg(const c10::BFloat16* p) {
  return c10::BFloat16(__ldcg(reinterpret_cast<const unsigned short*>(p)),
                       c10::BFloat16::from_bits());
}

#ifndef VARLEN_RNN_HOST_EMULATION
__device__ __forceinline__ unsigned char* dynamic_smem() {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  return smem_raw;
}
#endif

constexpr int kPersistThreads = 256;
constexpr int kPersistWarps = kPersistThreads / 32;
// Rows per warp work item: the warp reduces kRows x NG dot products at once
// and lanes 0..kRows-1 finish one row each.
constexpr int kRows = 8;

// How a persistent launch is cut; chosen on the host from the device's limits.
struct PersistentShape {
  int J;               // hidden units per block
  int blocks_per_dir;  // ceil(H / J)
  int tile_rows;       // rows staged per tile: kRows * (work items per unit group)
  int kc;              // columns of the staged tile (K is walked in chunks)
};

// Items per tile: U unit groups times the row groups of a tile.
__device__ __forceinline__ int tile_items(int U, const PersistentShape& ps) {
  return U * (ps.tile_rows / kRows);
}

// Sums a[g][r] over the warp's 32 lanes so that lane r (and r + kRows, ...)
// ends with row r's sums in a[g][0], for every g: a reduce-scatter. Each of
// the log2(kRows) halving steps sends half of the rows a lane still holds to
// the partner lane ^ off and keeps the other half (the rows whose bit matches
// the lane's bit), then two butterfly steps add up the 32 / kRows lanes that
// hold the same row. NG * (kRows/2 + kRows/4 + ... + 1 + 2) = 27 shuffles for
// NG = 3 instead of the butterfly's 5 * NG * kRows = 120. Every lane runs the
// same shuffles (full mask), and each sum has a fixed order, so the result is
// bitwise the same every run.
template <int NG, typename acc_t>
__device__ __forceinline__ void warp_reduce_scatter(acc_t (&a)[NG][kRows], int lane) {
  static_assert((kRows & (kRows - 1)) == 0 && kRows <= 32, "kRows must be a power of two <= 32");
  // Invariant: after the step with offset off, a[g][m] holds the partial sum of
  // row (lane & (2*off - 1)) + m * 2*off over the lanes that differ from this
  // one in bits below 2*off.
#pragma unroll
  for (int off = 1, n = kRows; off < kRows; off *= 2, n /= 2) {
    const bool upper = (lane & off) != 0;
#pragma unroll
    for (int m = 0; m < kRows / 2; ++m) {
      if (2 * m < n) {  // compile-time after unrolling
#pragma unroll
        for (int g = 0; g < NG; ++g) {
          const acc_t lo = a[g][2 * m], hi = a[g][2 * m + 1];
          const acc_t keep = upper ? hi : lo;
          const acc_t recv = __shfl_xor_sync(0xffffffffu, upper ? lo : hi, off);
          a[g][m] = keep + recv;
        }
      }
    }
  }
#pragma unroll
  for (int off = kRows; off < 32; off *= 2)
#pragma unroll
    for (int g = 0; g < NG; ++g) a[g][0] += __shfl_xor_sync(0xffffffffu, a[g][0], off);
}

// Copies kc values of one tile row from src into dst (zeros when src is
// null, i.e. the row is inactive), the warp's lanes striding over the columns.
// kCg: src was written by other blocks before the grid barrier (read through
// L2). fp32 rows go as 16-byte loads where src, dst and kc allow it.
template <bool kCg, typename acc_t, typename T>
__device__ __forceinline__ void stage_row(acc_t* dst, const T* src, int kc, int lane) {
  if (src == nullptr) {
    for (int k = lane; k < kc; k += 32) dst[k] = acc_t(0);
    return;
  }
  if constexpr (std::is_same<T, float>::value && std::is_same<acc_t, float>::value) {
    const uintptr_t addr = reinterpret_cast<uintptr_t>(src) | reinterpret_cast<uintptr_t>(dst);
    if ((kc & 3) == 0 && (addr & 15) == 0) {
      const float4* s4 = reinterpret_cast<const float4*>(src);
      float4* d4 = reinterpret_cast<float4*>(dst);
      for (int k = lane; k < kc / 4; k += 32) d4[k] = kCg ? __ldcg(s4 + k) : s4[k];
      return;
    }
  }
  for (int k = lane; k < kc; k += 32) dst[k] = static_cast<acc_t>(kCg ? load_cg(src + k) : src[k]);
}

// For every work item = sub*U + u of the block and g < NG, r < kRows:
//   acc_s[item][g][r] = sum_k w_s[(g*g_rows + u*u_rows)*K + k] * X[sub*kRows + r][k]
// i.e. NG rows of the on-chip weights against kRows rows of X, so each value
// read from shared memory feeds NG (or kRows) FMAs. X is fetched chunk by
// chunk into `tile`: warp w stages rows w, w + kPersistWarps, ... through
// stage(dst, row, k0, kc, lane), which looks the row's source up once and
// copies columns k0 .. k0+kc-1 (see stage_row). Ends with __syncthreads.
template <int NG, typename acc_t, typename w_t, typename Stage>
__device__ __forceinline__ void tile_matvec(const w_t* w_s, int U, int g_rows, int u_rows, int K,
                                            const PersistentShape& ps, acc_t* tile, acc_t* acc_s,
                                            Stage stage) {
  const int warp = threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  const int items = tile_items(U, ps);
  for (int k0 = 0; k0 < K; k0 += ps.kc) {
    const int kc = min(ps.kc, K - k0);
    for (int r = warp; r < ps.tile_rows; r += kPersistWarps) {
      stage(tile + r * ps.kc, r, k0, kc, lane);
    }
    __syncthreads();
    for (int item = warp; item < items; item += kPersistWarps) {
      const int row0 = (item % U) * u_rows;
      const acc_t* x = tile + (item / U) * kRows * ps.kc;
      acc_t a[NG][kRows];
#pragma unroll
      for (int g = 0; g < NG; ++g)
#pragma unroll
        for (int r = 0; r < kRows; ++r) a[g][r] = acc_t(0);
      for (int k = lane; k < kc; k += 32) {
        acc_t w[NG];
#pragma unroll
        for (int g = 0; g < NG; ++g)
          w[g] = static_cast<acc_t>(w_s[static_cast<int64_t>(g * g_rows + row0) * K + k0 + k]);
#pragma unroll
        for (int r = 0; r < kRows; ++r) {
          const acc_t xv = x[r * ps.kc + k];
#pragma unroll
          for (int g = 0; g < NG; ++g) a[g][r] += w[g] * xv;
        }
      }
      warp_reduce_scatter<NG>(a, lane);
      if (lane < kRows) {
#pragma unroll
        for (int g = 0; g < NG; ++g) {
          acc_t* dst = acc_s + (item * NG + g) * kRows + lane;
          *dst = (k0 == 0 ? acc_t(0) : *dst) + a[g][0];
        }
      }
    }
    __syncthreads();
  }
}

// The recurrent product of a step: exact in acc_t on CUDA cores (tile_matvec), or with kMma on
// tensor cores (mma_matvec.cuh: operands rounded to TF32 for float, taken as they are for the
// 2-byte types, sums in fp32) - the precision cuBLAS gives the fallback path's GEMMs.
template <typename scalar_t>
constexpr tc::Kind mma_kind = std::is_same<scalar_t, c10::BFloat16>::value ? tc::Kind::bf16
                              : std::is_same<scalar_t, c10::Half>::value   ? tc::Kind::f16
                                                                           : tc::Kind::tf32;
template <bool kMma, typename w_t, typename acc_t, typename Stage>
__device__ __forceinline__ void recurrent_matvec(const w_t* w_s, int U, int g_rows, int u_rows,
                                                 int K, const PersistentShape& ps, acc_t* tile,
                                                 acc_t* acc_s, Stage stage) {
  if constexpr (kMma) {
    static_assert(std::is_same<acc_t, float>::value, "tensor cores: float, half or bfloat16");
    tile_matvec_mma<3, kPersistWarps, mma_kind<w_t>>(w_s, U, g_rows, u_rows, K, ps.tile_rows, ps.kc,
                                                     tile, acc_s, stage);
  } else {
    tile_matvec<3>(w_s, U, g_rows, u_rows, K, ps, tile, acc_s, stage);
  }
}

// What both persistent kernels get besides their tensors: the schedule, the
// row layout and the launch shape (filled once, by the launcher's helper).
struct PersistentCommonArgs {
  const int* lens;    // [B]
  const int* perm;    // [B] rows by length, descending, stable
  const int* sorted;  // [B] lens[perm[i]]
  RowMap rows;        // (t, b) -> row of every per-position buffer (pointwise.cuh)
  int64_t R;          // rows per direction: T*B padded, N ragged
  int T, B, H, D;     // T: the padded time dimension (padding's zeros only)
  PersistentShape ps;
};

template <typename scalar_t, typename acc_t>
struct PersistentForwardArgs : PersistentCommonArgs {
  const scalar_t* gx;    // [R, D*3H]
  const scalar_t* w_hh;  // [D, 3H, H]
  const scalar_t* b_hh;  // [D, 3H] or nullptr
  const scalar_t* hx;    // [D, B, H]
  acc_t* hbuf;           // [2, D, B, H] state exchange, ping-pong by step parity
  scalar_t* out;         // [R, D*H]
  scalar_t* h_n;         // [D, B, H]
  acc_t* ws;             // [D, R, 4H] or nullptr
};

// Dynamic shared memory: tile [tile_rows][kc] acc_t | acc_s [items][3][kRows]
// acc_t | w_s [3][J][H] scalar_t (acc_t first keeps every part aligned).
template <typename scalar_t, typename acc_t, bool kMma = false>
__global__ void __launch_bounds__(kPersistThreads)
    persistent_forward_kernel(const PersistentForwardArgs<scalar_t, acc_t> a) {
  unsigned char* smem_raw = dynamic_smem();
  const PersistentShape ps = a.ps;
  const int J = ps.J, H = a.H, B = a.B;
  const int d = blockIdx.x / ps.blocks_per_dir;
  const int j0 = (blockIdx.x % ps.blocks_per_dir) * J;
  const int items = tile_items(J, ps);
  acc_t* tile = reinterpret_cast<acc_t*>(smem_raw);
  acc_t* acc_s = tile + ps.tile_rows * ps.kc;
  scalar_t* w_s = reinterpret_cast<scalar_t*>(acc_s + items * 3 * kRows);

  // Prologue (block-local, so no grid barrier): the W_hh slice (zero rows past
  // H), the zeros of padded outputs, h_n of zero-length rows.
  const bool padded = has_padding(a.rows);
  const int64_t DH = static_cast<int64_t>(a.D) * H;
  for (int e = threadIdx.x; e < 3 * J * H; e += blockDim.x) {
    const int g = e / (J * H), jl = (e / H) % J, k = e % H;
    const int j = j0 + jl;
    w_s[e] = j < H ? a.w_hh[(static_cast<int64_t>(d) * 3 * H + g * H + j) * H + k] : scalar_t(0);
  }
  for (int e = threadIdx.x; e < B * J; e += blockDim.x) {
    const int b = e / J, j = j0 + e % J;
    if (j >= H) continue;
    const int len = a.lens[b];
    for (int t = padded ? len : a.T; t < a.T; ++t) {
      a.out[a.rows.row(t, b) * DH + static_cast<int64_t>(d) * H + j] = scalar_t(0);
    }
    if (len == 0)
      a.h_n[(static_cast<int64_t>(d) * B + b) * H + j] =
          a.hx[(static_cast<int64_t>(d) * B + b) * H + j];
  }
  __syncthreads();

  const scalar_t* hx_d = a.hx + static_cast<int64_t>(d) * B * H;
  const int64_t buf_stride = static_cast<int64_t>(a.D) * B * H;
  const int max_len = a.sorted[0];
  cooperative_groups::grid_group grid = cooperative_groups::this_grid();
  for (int s = 0; s < max_len; ++s) {
    const acc_t* cur = a.hbuf + (s & 1) * buf_stride + static_cast<int64_t>(d) * B * H;
    acc_t* nxt = a.hbuf + ((s + 1) & 1) * buf_stride + static_cast<int64_t>(d) * B * H;
    for (int base = 0; base < B && a.sorted[base] > s; base += ps.tile_rows) {
      auto stage = [&](acc_t* dst, int r, int k0, int kc, int lane) {
        const int i = base + r;
        const bool active = i < B && a.sorted[i] > s;
        const int64_t off = active ? static_cast<int64_t>(a.perm[i]) * H + k0 : 0;
        if (s == 0) {
          stage_row<false>(dst, active ? hx_d + off : nullptr, kc, lane);
        } else {
          stage_row<true>(dst, active ? cur + off : nullptr, kc, lane);
        }
      };
      recurrent_matvec<kMma>(w_s, J, J, 1, H, ps, tile, acc_s, stage);
      for (int e = threadIdx.x; e < items * kRows; e += blockDim.x) {
        const int item = e / kRows, r = e % kRows;
        const int j = j0 + item % J;
        const int i = base + (item / J) * kRows + r;
        if (j >= H || i >= B || a.sorted[i] <= s) continue;
        const int b = a.perm[i], len = a.sorted[i];
        const int t = step_time(d, len, s);
        const int64_t row = a.rows.row(t, b);
        const scalar_t* gxr = a.gx + row * 3 * DH + static_cast<int64_t>(d) * 3 * H;
        const acc_t* acc = acc_s + item * 3 * kRows + r;
        acc_t gh[3];
#pragma unroll
        for (int g = 0; g < 3; ++g) {
          gh[g] = acc[g * kRows];
          if (a.b_hh != nullptr) gh[g] += static_cast<acc_t>(a.b_hh[d * 3 * H + g * H + j]);
        }
        const int64_t hoff = static_cast<int64_t>(b) * H + j;
        const acc_t hp = s == 0 ? static_cast<acc_t>(hx_d[hoff]) : __ldcg(cur + hoff);
        GruCellSaved<acc_t> sv;
        const acc_t hn = gru_cell_forward<acc_t>(
            static_cast<acc_t>(gxr[j]), static_cast<acc_t>(gxr[H + j]),
            static_cast<acc_t>(gxr[2 * H + j]), gh[0], gh[1], gh[2], hp, sv);
        nxt[hoff] = hn;
        a.out[row * DH + static_cast<int64_t>(d) * H + j] = static_cast<scalar_t>(hn);
        if (s == len - 1) a.h_n[static_cast<int64_t>(d) * B * H + hoff] = static_cast<scalar_t>(hn);
        if (a.ws != nullptr) {
          store_saved(a.ws + (static_cast<int64_t>(d) * a.R + row) * 4 * H, j, H, sv);
        }
      }
    }
    grid.sync();
  }
}

template <typename scalar_t, typename acc_t>
struct PersistentBackwardArgs : PersistentCommonArgs {
  const scalar_t* grad_out;  // [R, D*H]
  const scalar_t* out;       // [R, D*H] forward output
  const scalar_t* hx;        // [D, B, H]
  const scalar_t* grad_h_n;  // [D, B, H]
  const acc_t* ws;           // [D, R, 4H]
  const scalar_t* w_hh;      // [D, 3H, H]
  acc_t* dh;                 // [D, B, H] gradient reaching the state; each block its slice
  scalar_t* dgx;             // [R, D*3H]
  scalar_t* dgh;             // [D, R, 3H], also the exchange between blocks
  scalar_t* hprev;           // [D, R, H]
  scalar_t* grad_hx;         // [D, B, H]
};

// Per step (s = max_len-1 .. 0): phase 1 turns the block's own dh slice into
// gate gradients (pointwise), grid barrier, phase 2 adds dgh_s @ W_hh[:, own]
// to the own dh slice. Phase 2 only feeds the same block's next phase 1, and
// each step writes its own dgh rows, so one barrier per step suffices.
// Phase 2 groups the block's units by three (U = ceil(J/3) groups), so its dot
// products have the forward's shape: 3 weight rows x kRows rows of dgh.
// Shared memory: tile | acc_s [items][3][kRows] | w_s [3U][3H] (W_hh^T slice,
// zero rows past J).
template <typename scalar_t, typename acc_t, bool kMma = false>
__global__ void __launch_bounds__(kPersistThreads)
    persistent_backward_kernel(const PersistentBackwardArgs<scalar_t, acc_t> a) {
  unsigned char* smem_raw = dynamic_smem();
  const PersistentShape ps = a.ps;
  const int J = ps.J, H = a.H, B = a.B, T = a.T;
  const int d = blockIdx.x / ps.blocks_per_dir;
  const int j0 = (blockIdx.x % ps.blocks_per_dir) * J;
  const int U = (J + 2) / 3;
  const int items = tile_items(U, ps);
  acc_t* tile = reinterpret_cast<acc_t*>(smem_raw);
  acc_t* acc_s = tile + ps.tile_rows * ps.kc;
  scalar_t* w_s = reinterpret_cast<scalar_t*>(acc_s + items * 3 * kRows);
  const int64_t dBH = static_cast<int64_t>(d) * B * H;
  const int64_t DH = static_cast<int64_t>(a.D) * H;
  const bool padded = has_padding(a.rows);

  for (int e = threadIdx.x; e < 3 * H * 3 * U; e += blockDim.x) {
    const int jl = e % (3 * U), m = e / (3 * U), j = j0 + jl;
    w_s[static_cast<int64_t>(jl) * 3 * H + m] =
        jl < J && j < H ? a.w_hh[(static_cast<int64_t>(d) * 3 * H + m) * H + j] : scalar_t(0);
  }
  for (int e = threadIdx.x; e < B * J; e += blockDim.x) {
    const int b = e / J, j = j0 + e % J;
    if (j >= H) continue;
    a.dh[dBH + static_cast<int64_t>(b) * H + j] =
        static_cast<acc_t>(a.grad_h_n[dBH + static_cast<int64_t>(b) * H + j]);
    for (int t = padded ? a.lens[b] : T; t < T; ++t) {  // padded (t, b): zero gradients
      const int64_t row = a.rows.row(t, b);
      store_gate_grads(a.dgx + row * 3 * DH + static_cast<int64_t>(d) * 3 * H,
                       a.dgh + (static_cast<int64_t>(d) * a.R + row) * 3 * H, j, H,
                       GruCellGrad<acc_t>{});
      a.hprev[(static_cast<int64_t>(d) * a.R + row) * H + j] = scalar_t(0);
    }
  }
  __syncthreads();

  cooperative_groups::grid_group grid = cooperative_groups::this_grid();
  for (int s = a.sorted[0] - 1; s >= 0; --s) {
    for (int e = threadIdx.x; e < B * J; e += blockDim.x) {
      const int i = e / J, j = j0 + e % J;
      if (a.sorted[i] <= s) break;  // sorted descending: the rest are finished too
      if (j >= H) continue;
      const int b = a.perm[i], len = a.sorted[i];
      const int t = step_time(d, len, s);
      const int64_t col = static_cast<int64_t>(d) * H + j;
      const int64_t hoff = dBH + static_cast<int64_t>(b) * H + j;
      const int64_t row = a.rows.row(t, b);
      const acc_t dh_tot = a.dh[hoff] + static_cast<acc_t>(a.grad_out[row * DH + col]);
      const scalar_t h_prev_s =
          s == 0 ? a.hx[hoff] : a.out[a.rows.row(prev_time(d, t), b) * DH + col];
      const int64_t drow = static_cast<int64_t>(d) * a.R + row;
      const GruCellSaved<acc_t> sv = load_saved(a.ws + drow * 4 * H, j, H);
      const GruCellGrad<acc_t> g =
          gru_cell_backward<acc_t>(dh_tot, static_cast<acc_t>(h_prev_s), sv);
      store_gate_grads(a.dgx + row * 3 * DH + static_cast<int64_t>(d) * 3 * H, a.dgh + drow * 3 * H,
                       j, H, g);
      a.hprev[drow * H + j] = h_prev_s;
      a.dh[hoff] = g.dh_prev;
    }
    grid.sync();
    const scalar_t* dgh_d = a.dgh + static_cast<int64_t>(d) * a.R * 3 * H;
    for (int base = 0; base < B && a.sorted[base] > s; base += ps.tile_rows) {
      auto stage = [&](acc_t* dst, int r, int k0, int kc, int lane) {
        const int i = base + r;
        const bool active = i < B && a.sorted[i] > s;
        const int64_t off =
            active ? a.rows.row(step_time(d, a.sorted[i], s), a.perm[i]) * 3 * H + k0 : 0;
        stage_row<true>(dst, active ? dgh_d + off : nullptr, kc, lane);
      };
      recurrent_matvec<kMma>(w_s, U, 1, 3, 3 * H, ps, tile, acc_s, stage);
      for (int e = threadIdx.x; e < items * 3 * kRows; e += blockDim.x) {
        const int item = e / (3 * kRows), g = (e / kRows) % 3, r = e % kRows;
        const int jl = (item % U) * 3 + g, j = j0 + jl;
        const int i = base + (item / U) * kRows + r;
        if (jl >= J || j >= H || i >= B || a.sorted[i] <= s) continue;
        a.dh[dBH + static_cast<int64_t>(a.perm[i]) * H + j] += acc_s[e];
      }
    }
    __syncthreads();
  }
  for (int e = threadIdx.x; e < B * J; e += blockDim.x) {
    const int b = e / J, j = j0 + e % J;
    if (j >= H) continue;
    const int64_t hoff = dBH + static_cast<int64_t>(b) * H + j;
    a.grad_hx[hoff] = static_cast<scalar_t>(a.dh[hoff]);
  }
}

}  // namespace cuda
}  // namespace varlen_rnn
