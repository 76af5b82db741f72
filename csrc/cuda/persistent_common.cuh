// What both persistent recurrence kernels (persistent.cuh) share: the load
// through L2, the block geometry (kPersistThreads, kRows, PersistentShape),
// the staging of a tile of rows, the warp's dot products over it on CUDA cores
// or tensor cores (recurrent_matvec), and the argument fields both get.
//
// Exchange between blocks goes through global memory written with plain
// stores before grid.sync() and read with __ldcg (L2, never a stale L1 line)
// after it. That is enough on a GPU's weak memory model: cooperative_groups'
// grid.sync() is __syncthreads, then one thread per block adds to the grid's
// barrier word with atom.release.gpu and polls it with ld.acquire.gpu, then
// __syncthreads again, so every store of every block before it happens-before
// every load after it. Its barrier word flips its top bit once per generation,
// so it serves any number of steps and launches with no reset. The
// cooperative launch (launch.h) is refused unless all blocks fit on the device
// at once and then keeps them resident together, so no block waits on one
// that never runs (tests/test_cuda_device.py launches on busy streams). Nothing else
// crosses blocks: c, hown and dh are each read only by the block that writes
// them. Row conventions: see pointwise.cuh.
#pragma once

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cstdint>
#include <type_traits>

#include "cells/cell.h"
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
// Blocks per SM the persistent kernels are built for (__launch_bounds__'s second argument):
// one, since a launch has at most one block per SM (plan.h), so ptxas may give each thread up
// to 255 registers (they take 80-166). Without it, nvcc 13.0 gave some of them 64-128 and
// they spilled to local memory, on every step: 14 kernels on sm_90, 26 on sm_80, up to 68
// bytes per thread. tests/test_build.py compiles ops_cuda.cu with ptxas -v and fails on any
// spill.
constexpr int kPersistMinBlocks = 1;
// Rows per warp work item: the warp reduces kRows x NG dot products at once
// and lanes 0..kRows-1 finish one row each.
constexpr int kRows = 8;
// The backward's work item: the W_hh^T rows of this many hidden units (its NG,
// whatever the cell), so its dot products have the GRU forward's shape.
constexpr int kUnitsPerItem = 3;
// Rows of a tile at most (plan.h: kMaxRowGroups row groups of kRows on CUDA cores,
// kMaxRowGroupsMma on tensor cores, whose warps keep their rows' sources in registers).
constexpr int kMaxTileRows = 128;
constexpr int kMaxTileRowsMma = 32;

// How a persistent launch is cut; chosen on the host from the device's limits (plan.h).
struct PersistentShape {
  int J;               // hidden units per block
  int blocks_per_dir;  // row_slices * ceil(H / J)
  int tile_rows;       // rows staged per tile: kRows * (work items per unit group)
  int kc;              // columns of the staged tile (K is walked in chunks)
  int kc_stride;       // the tile's row stride in elements (>= kc; padded on tensor cores)
  int w_stride;        // the weight slice's row stride in elements (>= K; likewise)
  int row_slices;      // the direction's rows are split between this many blocks per unit slice
};

// What one block of a persistent launch owns: direction d, hidden units [j0, j0 + J), and the
// rows of row slice q of Q: the rows by length (perm / sorted) at positions q, q + Q, q + 2Q...,
// its m-th row at pos(m), n of them. Interleaved, so that every slice keeps about B / Q of the
// rows still running at any step (the rows by length run as a prefix). Each block stages only
// its own rows' h (backward: dgh) each step, a Q-th of what one block would stage for all B.
struct BlockPart {
  int d, j0, q, Q, n;
  __device__ __forceinline__ int pos(int m) const { return q + Q * m; }
};
__device__ __forceinline__ BlockPart block_part(const PersistentShape& ps, int B) {
  const int in_dir = blockIdx.x % ps.blocks_per_dir;
  const int unit_slices = ps.blocks_per_dir / ps.row_slices;
  BlockPart p;
  p.d = blockIdx.x / ps.blocks_per_dir;
  p.j0 = (in_dir % unit_slices) * ps.J;
  p.q = in_dir / unit_slices;
  p.Q = ps.row_slices;
  p.n = p.q < B ? (B - p.q + p.Q - 1) / p.Q : 0;
  return p;
}

// Items per tile: U unit groups times the row groups of a tile.
__device__ __forceinline__ int tile_items(int U, const PersistentShape& ps) {
  return U * (ps.tile_rows / kRows);
}

// Sums a[g][r] over the warp's 32 lanes so that lane r (and r + R, ...) ends with row r's sums
// in a[g][0], for every g: a reduce-scatter. Each of the log2(R) halving steps sends half of the
// rows a lane still holds to the partner lane ^ off and keeps the other half (the rows whose bit
// matches the lane's bit), then butterfly steps add up the 32 / R lanes that hold the same row.
// NG * (R/2 + R/4 + ... + 1 + log2(32/R)) shuffles: 27 for NG = 3 and R = 8 instead of the
// butterfly's 5 * NG * R = 120. Every lane runs the same shuffles (full mask), and each sum has
// a fixed order. Whatever R, row r's total is the same tree over the lanes, pairs differing in
// bit 0 first, then bit 1, ... bit 4 (a halving step adds the same two partial sums a butterfly
// step would), so a row's bits do not depend on R: tile_matvec takes R from the rows in use.
template <int NG, int R, typename acc_t>
__device__ __forceinline__ void warp_reduce_scatter(acc_t (&a)[NG][R], int lane) {
  static_assert((R & (R - 1)) == 0 && R <= 32, "R must be a power of two <= 32");
  // Invariant: after the step with offset off, a[g][m] holds the partial sum of
  // row (lane & (2*off - 1)) + m * 2*off over the lanes that differ from this
  // one in bits below 2*off.
#pragma unroll
  for (int off = 1, n = R; off < R; off *= 2, n /= 2) {
    const bool upper = (lane & off) != 0;
#pragma unroll
    for (int m = 0; m < R / 2; ++m) {
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
  for (int off = R; off < 32; off *= 2)
#pragma unroll
    for (int g = 0; g < NG; ++g) a[g][0] += __shfl_xor_sync(0xffffffffu, a[g][0], off);
}

#ifdef VARLEN_RNN_HOST_EMULATION
void emu_note_staging(bool vector);  // defined by the emulation: counts stage_row's two ways
#endif

// Copies kc values of one tile row from src into dst (zeros when src is null, i.e. the row is
// inactive), the warp's lanes striding over the columns. kCg: src was written by other blocks
// before the grid barrier (read through L2). Where kc fills whole 16-byte vectors and src and
// dst are 16-byte aligned (a row length H or 3H that is a multiple of 8 halves, 4 floats or 2
// doubles), every lane moves 16 bytes per load: copied as they are when the types agree (by
// copy_async_16: the caller waits with copy_async_wait before its barrier), 8 halves widened to
// 8 floats when the exact kernel stages a 16-bit row in fp32. Otherwise one element per lane
// and load.
template <bool kCg, typename dst_t, typename T>
__device__ __forceinline__ void stage_row(dst_t* dst, const T* src, int kc, int lane) {
  if (src == nullptr) {
    for (int k = lane; k < kc; k += 32) dst[k] = dst_t(0);
    return;
  }
  constexpr bool kSame = std::is_same<T, dst_t>::value;
  constexpr bool kWiden = sizeof(T) == 2 && std::is_same<dst_t, float>::value;
  constexpr int kVec = 16 / sizeof(T);  // elements per 16-byte load
  const uintptr_t addr = reinterpret_cast<uintptr_t>(src) | reinterpret_cast<uintptr_t>(dst);
  const bool vector = (kSame || kWiden) && kc % kVec == 0 && (addr & 15) == 0;
#ifdef VARLEN_RNN_HOST_EMULATION
  if (lane == 0) emu_note_staging(vector);
#endif
  if constexpr (kSame || kWiden) {
    if (vector) {
      check_aligned(src, 16);
      check_aligned(dst, 16);
      const uint4* s4 = reinterpret_cast<const uint4*>(src);
      for (int k = lane; k < kc / kVec; k += 32) {
        if constexpr (kSame) {
          copy_async_16(reinterpret_cast<uint4*>(dst) + k, s4 + k);  // through L2 either way
        } else {
          const uint4 v = kCg ? __ldcg(s4 + k) : s4[k];
          const T* h = reinterpret_cast<const T*>(&v);
          float4* d4 = reinterpret_cast<float4*>(dst) + 2 * k;
          d4[0] = float4{static_cast<float>(h[0]), static_cast<float>(h[1]),
                         static_cast<float>(h[2]), static_cast<float>(h[3])};
          d4[1] = float4{static_cast<float>(h[4]), static_cast<float>(h[5]),
                         static_cast<float>(h[6]), static_cast<float>(h[7])};
        }
      }
      return;
    }
  }
  for (int k = lane; k < kc; k += 32) {
    dst[k] = static_cast<dst_t>(kCg ? load_cg(src + k) : src[k]);
  }
}

// One work item's product over a chunk, added to acc_item (its kRows x NG accumulators): NG
// weight rows (w, g_stride elements apart) against the first R rows of the staged tile x
// (kc_stride apart), columns lane, lane + 32, ... < kc. Lane r < R adds row r's sums (after
// warp_reduce_scatter), lanes R .. kRows-1 add zero (rows past those in use).
template <int R, int NG, typename acc_t, typename w_t>
__device__ __forceinline__ void item_product(const w_t* w, int64_t g_stride, const acc_t* x,
                                             int kc_stride, int kc, int k0, int lane,
                                             acc_t* acc_item) {
  acc_t a[NG][R];
#pragma unroll
  for (int g = 0; g < NG; ++g)
#pragma unroll
    for (int r = 0; r < R; ++r) a[g][r] = acc_t(0);
  for (int k = lane; k < kc; k += 32) {
    acc_t wv[NG];
#pragma unroll
    for (int g = 0; g < NG; ++g) wv[g] = static_cast<acc_t>(w[g * g_stride + k]);
#pragma unroll
    for (int r = 0; r < R; ++r) {
      const acc_t xv = x[r * kc_stride + k];
#pragma unroll
      for (int g = 0; g < NG; ++g) a[g][r] += wv[g] * xv;
    }
  }
  warp_reduce_scatter<NG, R>(a, lane);
  if (lane < kRows) {
#pragma unroll
    for (int g = 0; g < NG; ++g) {
      acc_t* dst = acc_item + g * kRows + lane;
      *dst = (k0 == 0 ? acc_t(0) : *dst) + (lane < R ? a[g][0] : acc_t(0));
    }
  }
}

// The rows of a row group the product needs: 1 + the last running one (bit r of `running`: the
// group's row r runs; the others are staged as zeros), rounded up to 1, 2, 4 or kRows.
__device__ __forceinline__ int rows_in_use(unsigned running) {
  static_assert(kRows == 8, "rows_in_use rounds to 1, 2, 4 or 8");
  running &= (1u << kRows) - 1;
  return running == 0 ? 0 : running < 2 ? 1 : running < 4 ? 2 : running < 16 ? 4 : kRows;
}

// For every work item = sub*U + u of the block and g < NG, r < kRows:
//   acc_s[item][g][r] = sum_k w_s[(g*g_rows + u*u_rows)*K + k] * X[sub*kRows + r][k]
// (w_s rows ps.w_stride elements apart) i.e. NG rows of the on-chip weights
// against kRows rows of X, so each value read from shared memory feeds NG (or
// kRows) FMAs. X is fetched chunk by chunk into `tile` (rows ps.kc_stride
// apart): warp w stages rows w, w + kPersistWarps, ..., each row's source
// looked up by locate(r) (negative: the row does not run, staged as zeros)
// and its columns k0 .. k0+kc-1 copied per chunk by stage(dst, handle, k0, kc,
// lane) (see stage_row; copies in flight together). locate runs again in each
// chunk (a few cached loads) rather than holding up to 16 sources a warp in
// registers. An item's product covers only the
// rows of its group up to the last running one (1, 2, 4 or all kRows:
// rows_in_use), the rest of its accumulators set to zero: at B = 1 one row of
// eight, at a step where most rows have finished their few. A row's sums are
// the same bits either way (warp_reduce_scatter). Ends with __syncthreads.
template <int NG, typename acc_t, typename w_t, typename Locate, typename Stage>
__device__ __forceinline__ void tile_matvec(const w_t* w_s, int U, int g_rows, int u_rows, int K,
                                            const PersistentShape& ps, acc_t* tile, acc_t* acc_s,
                                            Locate locate, Stage stage) {
  const int warp = threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  const int items = tile_items(U, ps);
  const int64_t g_stride = static_cast<int64_t>(g_rows) * ps.w_stride;
  for (int k0 = 0; k0 < K; k0 += ps.kc) {
    const int kc = min(ps.kc, K - k0);
    for (int r = warp; r < ps.tile_rows; r += kPersistWarps)
      stage(tile + r * ps.kc_stride, locate(r), k0, kc, lane);
    copy_async_wait();
    __syncthreads();
    for (int item = warp; item < items; item += kPersistWarps) {  // warp-uniform
      const int sub = item / U;
      const w_t* w = w_s + static_cast<int64_t>((item % U) * u_rows) * ps.w_stride + k0;
      const acc_t* x = tile + sub * kRows * ps.kc_stride;
      acc_t* acc_item = acc_s + item * NG * kRows;
      // Bit r: row r of the item's group runs (lane r asks for it).
      const unsigned running =
          __ballot_sync(0xffffffffu, lane < kRows && locate(sub * kRows + lane) >= 0);
      const int rows = rows_in_use(running);
      const int stride = ps.kc_stride;
      if (rows == kRows) {
        item_product<kRows, NG>(w, g_stride, x, stride, kc, k0, lane, acc_item);
      } else if (rows == 4) {
        item_product<4, NG>(w, g_stride, x, stride, kc, k0, lane, acc_item);
      } else if (rows == 2) {
        item_product<2, NG>(w, g_stride, x, stride, kc, k0, lane, acc_item);
      } else if (rows == 1) {
        item_product<1, NG>(w, g_stride, x, stride, kc, k0, lane, acc_item);
      } else if (lane < kRows) {  // no row of the group runs
#pragma unroll
        for (int g = 0; g < NG; ++g) acc_item[g * kRows + lane] = acc_t(0);
      }
    }
    __syncthreads();
  }
}

// The dynamic shared memory's parts each start aligned for their element type: plan.h sizes the
// tile as whole rows of 8 (kRows) and the accumulators likewise, so no part needs padding between
// them (checked in the emulation; see check_aligned).
template <typename x_t, typename acc_t, typename w_t>
__device__ __forceinline__ void check_smem_parts(const x_t* tile, const acc_t* acc_s,
                                                 const w_t* w_s) {
  check_aligned(tile, 16);
  check_aligned(acc_s, sizeof(acc_t));
  check_aligned(w_s, sizeof(w_t) == 2 ? 4 : sizeof(w_t));  // 16-bit weights: loaded in pairs
}

// The recurrent product of a step: exact in acc_t on CUDA cores (tile_matvec), or with kMma on
// tensor cores (mma_matvec.cuh: operands rounded to TF32 for float, taken as they are for the
// 2-byte types, sums in fp32) - the precision cuBLAS gives the fallback path's GEMMs.
template <typename scalar_t>
constexpr tc::Kind mma_kind = std::is_same<scalar_t, c10::BFloat16>::value ? tc::Kind::bf16
                              : std::is_same<scalar_t, c10::Half>::value   ? tc::Kind::f16
                                                                           : tc::Kind::tf32;
// The staged tile's element type: the 16-bit storage type on tensor cores (the mma's operand
// type, so a fragment register is one 32-bit load of two elements), else acc_t.
template <bool kMma, typename scalar_t, typename acc_t>
using tile_t = std::conditional_t<kMma && sizeof(scalar_t) == 2, scalar_t, acc_t>;
// The bytes of dynamic shared memory before the tile: the tensor-core product's scratch
// (mma_matvec.cuh's part_s; plan.h's kMmaPartBytes), none on CUDA cores.
template <bool kMma>
constexpr int kPartBytes = kMma ? kMmaPartFloats<kPersistWarps> * 4 : 0;
// A weight as the kernel keeps it in shared memory: rounded to TF32 once for the tensor cores'
// float32 product (mma_matvec.cuh takes its bits as they are), else as it is.
template <bool kMma, typename scalar_t>
__device__ __forceinline__ scalar_t smem_weight(scalar_t w) {
  if constexpr (kMma && std::is_same<scalar_t, float>::value) {
    return tc::tf32_rounded(w);
  } else {
    return w;
  }
}
// NG weight rows per work item: the cell's kGates in the forward, kUnitsPerItem in the backward.
// part_s: kPartBytes<kMma> bytes of scratch.
template <int NG, bool kMma, typename w_t, typename x_t, typename acc_t, typename Locate,
          typename Stage>
__device__ __forceinline__ void recurrent_matvec(const w_t* w_s, int U, int g_rows, int u_rows,
                                                 int K, const PersistentShape& ps, x_t* tile,
                                                 acc_t* acc_s, float* part_s, Locate locate,
                                                 Stage stage) {
  if constexpr (kMma) {
    static_assert(std::is_same<acc_t, float>::value, "tensor cores: float, half or bfloat16");
    tile_matvec_mma<NG, kPersistWarps, kMaxTileRowsMma, mma_kind<w_t>>(
        w_s, ps.w_stride, U, g_rows, u_rows, K, ps.tile_rows, ps.kc, ps.kc_stride, tile, acc_s,
        part_s, locate, stage);
  } else {
    (void)part_s;
    tile_matvec<NG>(w_s, U, g_rows, u_rows, K, ps, tile, acc_s, locate, stage);
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

}  // namespace cuda
}  // namespace varlen_rnn
