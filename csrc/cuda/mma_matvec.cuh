// The persistent kernels' recurrent product on tensor cores: the contract of tile_matvec
// (persistent.cuh) with mma.sync (mma.cuh) doing the multiply-adds.
//
// For every work item = sub*U + u of the block and g < NG, r < kRowsT (= 8, the mma's N):
//   acc_s[(item*NG + g)*8 + r] = sum_k W[(g*g_rows + u*u_rows)*K + k] * X[sub*8 + r][k]
// The NG*U weight rows form the mma's A operand (M = 16 rows per fragment), the 8 staged rows
// of a sub-tile its B operand (B(k, n) = X[n][k]): one warp task is 16 weight rows x 8 staged
// rows, walking K in steps of the mma's K. Two row orders are supported, the two the kernels
// use: u_rows == 1 with g_rows == U (forward: row g*U + u) and g_rows == 1 with u_rows == NG
// (backward: row u*NG + g).
// Precision: the staged rows (fp32) are rounded to the kind's input type as fragments are filled
// (cvt.rna to TF32, cvt.rn to bf16/f16); 2-byte weights are taken as the kind's raw bits, float
// weights rounded like X. Products are exact and summed in fp32, chunk sums added in fp32.
// Columns past K or past the staged chunk enter as zeros.
#pragma once

#include <cstdint>

#include "mma.cuh"

namespace varlen_rnn {
namespace cuda {

// A weight's element bits: 2-byte types (bfloat16/half storage) are taken as they are.
template <tc::Kind k, typename w_t>
__device__ __forceinline__ uint32_t weight_bits(const w_t* p) {
  if constexpr (sizeof(w_t) == 2) {
    return *reinterpret_cast<const uint16_t*>(p);
  } else {
    return tc::to_bits<k>(static_cast<float>(*p));
  }
}

// kc_max: the tile's row stride (columns staged per chunk at most); tile_rows: rows staged
// (a multiple of 8). stage(dst, row, k0, kc, lane) as in tile_matvec; ends with __syncthreads.
template <int NG, int kWarps, tc::Kind k, typename w_t, typename Stage>
__device__ __forceinline__ void tile_matvec_mma(const w_t* w_s, int U, int g_rows, int u_rows,
                                                int K, int tile_rows, int kc_max, float* tile,
                                                float* acc_s, Stage stage) {
  using S = tc::Shape<k>;
  constexpr int kN = S::N;  // staged rows per sub-tile
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int w_rows = NG * U, m_tiles = (w_rows + S::M - 1) / S::M, subs = tile_rows / kN;
  const bool g_major = u_rows == 1;  // forward order: row g*U + u
  for (int k0 = 0; k0 < K; k0 += kc_max) {
    const int kc = min(kc_max, K - k0);
    for (int r = warp; r < tile_rows; r += kWarps) stage(tile + r * kc_max, r, k0, kc, lane);
    __syncthreads();
    for (int task = warp; task < m_tiles * subs; task += kWarps) {  // warp-uniform
      const int m0 = (task % m_tiles) * S::M, sub = task / m_tiles;
      const float* x = tile + sub * kN * kc_max;
      tc::FragC acc = {};
      for (int kk = 0; kk < kc; kk += S::K) {
        tc::FragA<k> fa;
        tc::FragB<k> fb;
#pragma unroll
        for (int i = 0; i < S::kAElems; ++i) {
          const int w = m0 + tc::a_row<k>(lane, i), c = kk + tc::a_col<k>(lane, i);
          tc::set_bits<k>(fa, i,
                          w < w_rows && c < kc
                              ? weight_bits<k>(w_s + static_cast<int64_t>(w) * K + k0 + c)
                              : 0u);
        }
#pragma unroll
        for (int i = 0; i < S::kBElems; ++i) {
          const int c = kk + tc::b_row<k>(lane, i);
          tc::set(fb, i, c < kc ? x[tc::b_col<k>(lane, i) * kc_max + c] : 0.f);
        }
        tc::mma(acc, fa, fb, acc);
      }
#pragma unroll
      for (int i = 0; i < S::kCElems; ++i) {
        const int w = m0 + tc::c_row(lane, i), r = tc::c_col(lane, i);
        if (w >= w_rows) continue;
        const int g = g_major ? w / U : w % NG, u = g_major ? w % U : w / NG;
        float* dst = acc_s + ((sub * U + u) * NG + g) * kN + r;
        *dst = (k0 == 0 ? 0.f : *dst) + acc.x[i];
      }
    }
    __syncthreads();
  }
}

}  // namespace cuda
}  // namespace varlen_rnn
