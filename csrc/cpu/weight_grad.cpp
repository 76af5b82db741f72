// The weight gradients over few positions (cpu/weight_grad.h): one kernel
// written for bfloat16 and float32, and the choice.
#include "cpu/weight_grad.h"

#include "cpu/dot_rows.h"
#include "cpu/small_gemm.h"

#include <ATen/Parallel.h>
#include <ATen/record_function.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <limits>

namespace varlen_rnn {
namespace cpu {

namespace {

#if defined(__x86_64__) && defined(__GNUC__)
// c's rows g0..g1 on one thread: c[g, j] = sum_q a[q, g] b[q, j] over the
// steps q, one float32 sum per element in q's order, by the row tiles the
// steps' products use (cpu/dot_rows.h row_tiles), reading a's columns (a
// row of c is a column of a). float32: q is a position, one fused
// multiply-add each, stored as float32. bfloat16: q is a pair of positions,
// a and b with their pairs of rows interleaved (pair q, column g of a: the
// values (a[2q, g], a[2q + 1, g]) side by side, a zero row past n),
// vdpbf16ps's exact products of pairs (the unit's own order within a pair,
// subnormals flushed), rounded once to nearest even. In blocks of 64
// columns (row_tiles' widest tile).
template <typename T>
void grad_rows(int64_t g0, int64_t g1, int64_t steps, const T* a, AStrides as, const T* b,
               int64_t ldb, int64_t P, T* c, int64_t ldc) {
  constexpr int64_t kCols = 64, kPair = DotTraits<T>::kPair;
  for (int64_t j0 = 0; j0 < P; j0 += kCols) {
    row_tiles<T, T>(g1 - g0, steps, a + g0 * as.row, as, b + j0 * kPair, ldb, c + g0 * ldc + j0,
                    ldc, std::min(kCols, P - j0), false);
  }
}

// The product on all threads: tasks of rows of c, about 64 KiB of results.
template <typename T>
void grad_all(int64_t steps, const T* a, AStrides as, int64_t G, const T* b, int64_t ldb, int64_t P,
              T* c, int64_t ldc) {
  const int64_t grain = std::max<int64_t>(1, 65536 / static_cast<int64_t>(sizeof(T)) / P);
  at::parallel_for(0, G, grain, [&](int64_t g0, int64_t g1) {
    grad_rows<T>(g0, g1, steps, a, as, b, ldb, P, c, ldc);
  });
}

// Rows 2q and 2q + 1 of x (ld values apart; the second 0 past n) as one row
// of 32-bit words, for q < ceil(n / 2): out[q * cols + j] = (x[2q, j],
// x[2q + 1, j]).
void interleave_rows(int64_t n, const at::BFloat16* x, int64_t ld, int64_t cols, uint32_t* out) {
  for (int64_t q = 0; 2 * q < n; ++q) {
    const at::BFloat16* r0 = x + 2 * q * ld;
    for (int64_t j = 0; j < cols; ++j) {
      const uint32_t lo = r0[j].x, hi = 2 * q + 1 < n ? r0[ld + j].x : 0;
      out[q * cols + j] = lo | (hi << 16);
    }
  }
}
#endif

}  // namespace

bool bf16_weight_grad_for(int64_t n) {
#if defined(__x86_64__) && defined(__GNUC__)
  static const bool avx512bf16 = __builtin_cpu_supports("avx512bf16");
  return n <= kGradRows && avx512bf16;
#else
  (void)n;
  return false;
#endif
}

void bf16_weight_grad(int64_t n, const at::BFloat16* a, int64_t lda, int64_t G,
                      const at::BFloat16* b, int64_t ldb, int64_t P, at::BFloat16* c, int64_t ldc) {
  TORCH_INTERNAL_ASSERT(bf16_weight_grad_for(n), "bf16_weight_grad: n = ", n,
                        " rows, or no AVX512-BF16");
  if (G <= 0 || P <= 0) return;
#if defined(__x86_64__) && defined(__GNUC__)
  // a's and b's rows paired once (n G + n P values): what the tiles
  // broadcast and load.
  const int64_t pairs = (n + 1) / 2;
  const at::Tensor paired = at::empty({pairs, G + P}, at::TensorOptions().dtype(at::kInt));
  auto* a2 = reinterpret_cast<uint32_t*>(paired.data_ptr<int32_t>());
  uint32_t* b2 = a2 + pairs * G;
  interleave_rows(n, a, lda, G, a2);
  interleave_rows(n, b, ldb, P, b2);
  const auto* a16 = reinterpret_cast<const at::BFloat16*>(a2);  // [pairs, G, 2]
  const auto* b16 = reinterpret_cast<const at::BFloat16*>(b2);  // [pairs, P, 2]
  grad_all<at::BFloat16>(pairs, a16, AStrides{2, 2 * G}, G, b16, 2 * P, P, c, ldc);
#else
  (void)a, (void)lda, (void)b, (void)ldb, (void)c, (void)ldc;
#endif
}

void weight_grad(at::Tensor c, const at::Tensor& a, const at::Tensor& b) {
  const int64_t N = a.size(0), G = a.size(1), P = b.size(1);
  TORCH_INTERNAL_ASSERT(
      a.dim() == 2 && b.dim() == 2 && b.size(0) == N && c.dim() == 2 && c.size(0) == G &&
          c.size(1) == P && a.stride(1) == 1 && b.stride(1) == 1 && c.stride(1) == 1 &&
          a.scalar_type() == c.scalar_type() && b.scalar_type() == c.scalar_type(),
      "weight_grad: c [G, P] = a [N, G]^T b [N, P], unit column strides, one "
      "dtype");
  const int64_t lda = std::max<int64_t>(a.stride(0), 1), ldb = std::max<int64_t>(b.stride(0), 1);
  // Named for profiles as the GEMM they replace is (tests count the products).
  if (c.scalar_type() == at::kBFloat16 && bf16_weight_grad_for(N)) {
    RECORD_FUNCTION("varlen_rnn::bf16_weight_grad", std::vector<c10::IValue>());
    bf16_weight_grad(N, a.const_data_ptr<at::BFloat16>(), lda, G, b.const_data_ptr<at::BFloat16>(),
                     ldb, P, c.data_ptr<at::BFloat16>(), c.stride(0));
    return;
  }
  if (c.scalar_type() == at::kFloat && f32_weight_grad_for(N)) {
    RECORD_FUNCTION("varlen_rnn::f32_weight_grad", std::vector<c10::IValue>());
    f32_weight_grad(N, a.const_data_ptr<float>(), lda, G, b.const_data_ptr<float>(), ldb, P,
                    c.data_ptr<float>(), c.stride(0));
    return;
  }
  at::mm_out(c, a.t(), b);
}

bool f32_weight_grad_runs(int64_t n) {
  // AVX-512 only: on AVX2 (Zen 3) the same tiles took 1.0-2.2x MKL's time (weight_grad.h).
  static const bool avx512 = small_gemm_supports(SmallGemmIsa::kAvx512);
  return avx512 && n <= kF32GradRows;
}

bool f32_weight_grad_for(int64_t n) { return f32_weight_grad_runs(n) && f32_rows_times_for(n); }

void f32_weight_grad(int64_t n, const float* a, int64_t lda, int64_t G, const float* b, int64_t ldb,
                     int64_t P, float* c, int64_t ldc) {
  TORCH_INTERNAL_ASSERT(f32_weight_grad_runs(n), "f32_weight_grad: n = ", n,
                        " rows, or no AVX-512");
  if (G <= 0 || P <= 0) return;
#if defined(__x86_64__) && defined(__GNUC__)
  grad_all<float>(n, a, AStrides{1, lda}, G, b, ldb, P, c, ldc);
#else
  (void)a, (void)lda, (void)b, (void)ldb, (void)c, (void)ldc;
#endif
}

namespace {

// The test entry (ops.cpp's _weight_grad): a [n, G] and b [n, P], both
// bfloat16 or both float32, any row strides; c = a^T b computed inside a
// NaN-filled [G + 1, P + 5] buffer of their dtype, so a write past [G, P]
// shows.
at::Tensor weight_grad_op(const at::Tensor& a, const at::Tensor& b) {
  const auto dtype = a.scalar_type();
  TORCH_CHECK(a.dim() == 2 && (dtype == at::kBFloat16 || dtype == at::kFloat) && a.stride(1) == 1,
              "_weight_grad: a must be a 2-D bfloat16 or float32 tensor [n, G] with unit column "
              "stride, got ",
              a.sizes(), " ", a.scalar_type(), " strides ", a.strides());
  TORCH_CHECK(
      b.dim() == 2 && b.scalar_type() == dtype && b.stride(1) == 1 && b.size(0) == a.size(0),
      "_weight_grad: b must be a ", dtype, " [n, P] with n = a.size(0) = ", a.size(0),
      " and unit column stride, got ", b.sizes(), " ", b.scalar_type());
  const int64_t n = a.size(0), G = a.size(1), P = b.size(1);
  if (dtype == at::kBFloat16) {
    TORCH_CHECK(bf16_weight_grad_for(n), "_weight_grad: takes at most ", kGradRows,
                " bfloat16 rows on a CPU with AVX512-BF16, got ", n);
  } else {
    TORCH_CHECK(f32_weight_grad_runs(n), "_weight_grad: takes at most ", kF32GradRows,
                " float32 rows on a CPU with AVX-512, got ", n);
  }
  at::Tensor out = at::full({G + 1, P + 5}, std::numeric_limits<float>::quiet_NaN(), a.options());
  if (dtype == at::kBFloat16) {
    weight_grad(out.narrow(0, 0, G).narrow(1, 0, P), a, b);  // our kernel: checked above
  } else {  // our kernel whatever the layers' choice (f32_weight_grad_for)
    f32_weight_grad(n, a.const_data_ptr<float>(), std::max<int64_t>(a.stride(0), 1), G,
                    b.const_data_ptr<float>(), std::max<int64_t>(b.stride(0), 1), P,
                    out.data_ptr<float>(), out.stride(0));
  }
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(varlen_rnn, CPU, m) { m.impl("_weight_grad", &weight_grad_op); }

}  // namespace cpu
}  // namespace varlen_rnn
