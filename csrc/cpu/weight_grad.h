// A layer's weight gradients over few positions (a decoding step's
// backward), c = a^T b with K = n positions, where a GEMM library's set-up
// or small-k kernel costs more than the n G P products: kernels of our own
// in bfloat16 and float32 (cpu/weight_grad.cpp, written once for both), and
// weight_grad, the one place that chooses between them and ATen's GEMM.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>

namespace varlen_rnn {
namespace cpu {

// c [G, P] (rows contiguous, row stride c.stride(0): a slice of a weight's
// gradient) = a^T b for a [N, G] and b [N, P] with unit column strides, all
// of c's dtype: bf16_weight_grad or f32_weight_grad where they run (N
// positions at most kGradRows or kF32GradRows), else ATen's GEMM.
void weight_grad(at::Tensor c, const at::Tensor& a, const at::Tensor& b);

// bfloat16: c[g, j] = sum_{r < n} a[r, g] b[r, j] for g < G, j < P: a [n, G]
// (lda) and b [n, P] (ldb) bfloat16, c [G, P] bfloat16 (ldc), on all
// threads. Exact products, one float32 sum per element over the pairs of r
// in order (AVX512-BF16's dot products of pairs, as the unit's strips), one
// rounding to nearest even (subnormals flushed). Measured on the AMD EPYC (2
// threads, the test op with its NaN fill of the result, against
// torch.mm(a.t(), b, out=c) on the same operands): G x P = 768 x 256 12 us
// against 24 at n = 1, 20 vs 29 at 8, 28 vs 35 at 16, 46 vs 51 at 32, 122 vs
// 87 at 64; 1536 x 512 39 vs 43 at 1, 65 vs 62 at 8, 98 vs 104 at 16, 198 vs
// 152 at 32. So up to 16. bf16_weight_grad_for(n): n <= kGradRows on a CPU
// with AVX512-BF16 (every bfloat16 unit's CPU has it).
constexpr int64_t kGradRows = 16;
bool bf16_weight_grad_for(int64_t n);
void bf16_weight_grad(int64_t n, const at::BFloat16* a, int64_t lda, int64_t G,
                      const at::BFloat16* b, int64_t ldb, int64_t P, at::BFloat16* c, int64_t ldc);

// float32, the same product: one fused multiply-add chain per element over r
// in order. Measured as above against MKL's sgemm (the fill, 8-40 us,
// subtracted): 768 x 256 10 us against 19 at n = 1, 22 vs 33 at 8, 35 vs 44
// at 16; 1536 x 512 34 vs 63 at 1, 82 vs 138 at 8, 141 vs 186 at 16.
// f32_weight_grad_for(n): n <= kF32GradRows and f32_rows_times_for(n) (AVX-512,
// VARLEN_RNN_CPU_GEMM not mkl, and on Intel's CPUs =kernel: there MKL's GEMM
// won in the layer, cpu/small_gemm.h). On AVX2 the same tiles on 8 lanes
// (cpu/dot_rows.h row_tiles_avx2) lost to MKL on a 2-core Zen 3 EPYC (2
// threads, G x P = 768 x 256 to 2048 x 512, n = 1-16, min of 15 x 20 calls,
// 2026-11-30): 0.46-0.97x, so there the weight gradients keep the BLAS.
// f32_weight_grad_runs(n): this CPU runs it for n rows (the test op's check).
constexpr int64_t kF32GradRows = 16;
bool f32_weight_grad_runs(int64_t n);
bool f32_weight_grad_for(int64_t n);
void f32_weight_grad(int64_t n, const float* a, int64_t lda, int64_t G, const float* b, int64_t ldb,
                     int64_t P, float* c, int64_t ldc);

}  // namespace cpu
}  // namespace varlen_rnn
