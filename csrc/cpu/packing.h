// Packing a product's b[K, N] into strips for the CPU micro-kernels, once per
// call: the float32 kernel's (pack_b in cpu/small_gemm.h) and the bfloat16
// units' (pack_b16 in cpu/bf16_gemm.h), which choose the kernel or unit and
// call these.
//
// BLayout says where b is: b[k, j] = base[k * stride_k + col(j)], col(j) =
// (j / group) * group_stride + (j % group) * stride_n.
//
// One group is a plain strided matrix: a row-major [K, N] panel is
// (stride_k, stride_n) = (N, 1); a row-major [N, K] weight's transpose is
// (1, K). Several groups are the split step loops' slices of a gate-stacked
// weight (unit_columns): read where the weight is stored, no copy of its rows.
#pragma once

#include <ATen/core/Tensor.h>

#include <algorithm>
#include <cstdint>
#include <limits>

namespace varlen_rnn {
namespace cpu {

struct BLayout {
  int64_t stride_k = 0, stride_n = 0;
  int64_t group = std::numeric_limits<int64_t>::max(), group_stride = 0;

  int64_t col(int64_t j) const { return (j / group) * group_stride + (j % group) * stride_n; }
  // Whether columns [0, n) are evenly strided (stride_n apart).
  bool even(int64_t n) const { return n <= group; }
};

inline BLayout strided(int64_t stride_k, int64_t stride_n) { return {stride_k, stride_n}; }

// Units [u0, u1) of every gate of a row-major weight w [gates * H, K] as b's
// columns, b[k, j] = w[g * H + u0 + i, k] for j = g * (u1 - u0) + i (a slice
// of the gate columns the step loops own): base w + u0 * K, N = gates *
// (u1 - u0).
inline BLayout unit_columns(int64_t H, int64_t K, int64_t u0, int64_t u1) {
  return {1, K, std::max<int64_t>(1, u1 - u0), H * K};
}

// The test ops' b (_small_gemm, _bf16_gemm): a [K, N] matrix with any
// strides, or a stack of column groups [groups, K, n] (N = groups * n,
// b[k, g * n + i] = b3[g, k, i]: a weight's gate slices as the step loops
// read them, e.g. w.view(G, H, K)[:, u0:u1].transpose(1, 2)).
inline BLayout layout_of(const at::Tensor& b) {
  if (b.dim() == 2) return strided(b.stride(0), b.stride(1));
  return {b.stride(1), b.stride(2), std::max<int64_t>(1, b.size(2)), b.stride(0)};
}

// The float32 kernel's strips, [ceil(N / nr), K, nr]: strip s holds
// b[k, s * nr + j] at [s][k][j], zeros past N. avx: the CPU runs AVX (8 x 8
// transposes in registers where b's values of k are adjacent).
at::Tensor pack_strips(int64_t K, int64_t N, int64_t nr, const float* b, const BLayout& layout,
                       bool avx);

// The bfloat16 kernels' strips, [ceil(N / S), K, S] bfloat16 in pairs: strip
// s's pair of k q at [s][q][S][2], each column's values 2q and 2q + 1 side by
// side, zeros past N (S a multiple of 16, K even), on all threads by AVX-512
// permutes (b's rows contiguous: stride_n 1, one group) or gathers (its
// values of k adjacent: stride_k 1). Undefined where b is neither or this is
// not an x86 build; the caller's CPU must run AVX512-BF16.
at::Tensor pack_pairs(int64_t K, int64_t N, int64_t S, const at::BFloat16* b,
                      const BLayout& layout);

}  // namespace cpu
}  // namespace varlen_rnn
