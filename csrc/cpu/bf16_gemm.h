// bfloat16 products with float32 accumulation for the CPU layers of bfloat16
// models: c[m, N] (=|+=) a[m, K] b[K, N], a and b bfloat16, c float32, on
// one of two units (Bf16Unit):
// - the CPU's matrix units (AMX) through oneDNN's BRGeMM micro-kernel as ATen
//   exposes it (at::native::cpublas::brgemm, the kernel under PyTorch's own
//   CPU flash attention): Intel Xeon from Sapphire Rapids on;
// - AVX512-BF16's pair dot products (vdpbf16ps) in a register-blocked
//   micro-kernel of our own, where there is no matrix unit: AMD EPYC from
//   Zen 4 on, Intel Cooper Lake.
//
// What it changes in a layer (the choice is bf16_gemm_for, the one place):
// with a bfloat16 input the input projection and the per-step W_hh product
// read the weights and the state rounded to bfloat16, as torch.nn.GRU's
// bfloat16 CPU path does; the products accumulate, and the state, the gates
// and everything after them stay, in float32 (torch.nn's path rounds those
// to bfloat16 too). The weights of a bfloat16 model are bfloat16 already, so
// the one rounding added to the float32 path is h's, once per step.
//
// b is packed once per call into column strips of kStrip columns in the
// pair-interleaved (VNNI) layout, zero-padded past N; a strip is what one
// kernel call reads. a's rows are read in place (lda). Rows past m and
// columns past N of c are never touched. On either unit every product of
// two bfloat16 values is exact and the sums are float32, with denormals
// flushed; the order of the sums is the unit's own.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>

#include "cpu/packing.h"

namespace varlen_rnn {
namespace cpu {

// Where the products run: kFloat means nowhere (the layer stays float32).
enum class Bf16Unit { kFloat, kAmx, kAvx512 };

// b[K, N] packed for one unit: [ceil(N / kStrip), K, kStrip] bfloat16. K is
// even: both units multiply pairs of k (oneDNN's kernel faults on an odd K),
// so a layer takes these products only where I and P are even
// (bf16_gemm_for).
struct PackedB16 {
  static constexpr int64_t kStrip = 64;  // the widest packed B oneDNN's kernel takes
  int64_t K = 0, N = 0;
  Bf16Unit unit = Bf16Unit::kFloat;  // the unit it was packed for
  at::Tensor strips;
};

// The unit this CPU, build and VARLEN_RNN_CPU_BF16 give (read at every call):
// unset or =auto the matrix unit where there is one (a CPU with AMX and
// torch's oneDNN enabled: torch.backends.mkldnn.enabled), else AVX512-BF16
// where the CPU has it, else kFloat; =float kFloat, keeping every bfloat16
// layer's products in float32 (its workspace is bfloat16 all the same:
// layer.h workspace_dtype); =amx and =avx512 insist on one (an error where
// unavailable; the AVX512-BF16 kernel runs on every CPU with AMX too, so
// tests there cover both).
Bf16Unit bf16_unit();

// Whether a layer with this input dtype and inner sizes (I and P, the
// products' K) runs its products in bfloat16: a bfloat16 input with even I
// and P where bf16_unit() is not kFloat. The backward's per-step product
// dG W_hh has K = G*H, even then too: P = H without a projection, and the
// LSTM's (the one cell with a projection) G*H = 4H.
bool bf16_gemm_for(at::ScalarType input_dtype, int64_t I, int64_t P);

// Packs b[k, j] = b[k * stride_k + layout.col(j)] (float32, rounded to
// bfloat16, or bfloat16 as it is; K even; cpu/packing.h) for bf16_unit()
// (not kFloat); the second pair takes b[k * stride_k + j * stride_n] (a
// row-major [N, K] weight's transpose is (1, K)).
PackedB16 pack_b16(int64_t K, int64_t N, const float* b, const BLayout& layout);
PackedB16 pack_b16(int64_t K, int64_t N, const at::BFloat16* b, const BLayout& layout);
template <typename src_t>
PackedB16 pack_b16(int64_t K, int64_t N, const src_t* b, int64_t stride_k, int64_t stride_n) {
  return pack_b16(K, N, b, strided(stride_k, stride_n));
}

// One thread: c[m, N] (ldc) = a[m, K] (lda) b, or c += a b with accumulate,
// on the unit b was packed for. The thread must call bf16_gemm_release()
// when its run of products ends (Bf16GemmScope).
void bf16_gemm(int64_t m, const at::BFloat16* a, int64_t lda, const PackedB16& b, float* c,
               int64_t ldc, bool accumulate);

// y[0, n) = x[0, n) rounded to nearest even (the step loops' h for the next
// product); AVX512-BF16 where the CPU has it (every AMX CPU does).
void round_bf16(const float* x, int64_t n, at::BFloat16* y);
// float64 layers never take the bfloat16 products (the step loops are
// templates on the op-math type, so they name this).
inline void round_bf16(const double*, int64_t, at::BFloat16*) {
  TORCH_INTERNAL_ASSERT(false, "bfloat16 products in a float64 layer");
}

// Rows against a bfloat16 weight as stored: c[i, j] = sum_k a[i, k] w[j, k]
// for i < m, a [m, K] bfloat16 (lda), w [J, K] bfloat16 row-major (a torch
// weight), c float32 (ldc), K even; on all threads. Exact products, float32
// sums, denormals flushed as on the matrix unit. A bfloat16 layer's call of
// few steps (a decoding step) takes its products so: no float32 copy of the
// weights and no packing of them (cpu/recurrence.h forward_impl).
// - m <= kDotRows (the matrix unit) or kDotRowsAvx512: bf16_dot_rows;
// - more rows: bf16_weight_product_swapped on bf16_unit().
// Measured (the test op, 2 threads, min of 5; J x K = 768 x 256, 1024 x 256,
// 1536 x 512): on an Intel Xeon with AMX the dot products take 7-17 us at
// m = 1 against the matrix unit's 17-36 (its per-call set-up), tie at m = 4
// (17-52 vs 19-40), and at m = 32 take 108-363 us against 42-70; float32
// GEMMs on weights already float32 took 63-322 us there, 82-394 with the
// weights' conversion. On an AMD EPYC (Zen 4, AVX512-BF16 only) the swapped
// kernel broadcasts the weight's pairs one at a time (load-bound at few
// positions): 24-77 us at m = 1 against the dots' 6-14, 26-81 vs 17-55 at
// m = 8, 28-82 vs 31-110 at m = 16, 47-147 vs 56-191 at m = 32.
constexpr int64_t kDotRows = 3;
constexpr int64_t kDotRowsAvx512 = 12;
void bf16_weight_product(int64_t m, const at::BFloat16* a, int64_t lda, const at::BFloat16* w,
                         int64_t J, int64_t K, float* c, int64_t ldc);

// AVX512-BF16 dot products of pairs (every AMX CPU has them): eight rows of
// w at a time, each with its own sum, over j; a row of a passes them at a
// time (m rows: m passes over w).
void bf16_dot_rows(int64_t m, const at::BFloat16* a, int64_t lda, const at::BFloat16* w, int64_t J,
                   int64_t K, float* c, int64_t ldc);

// The unit's kernel with the operands' roles swapped, c^T = w a^T: w is the
// left operand, which the kernel reads in place, and a^T the right one,
// packed per call (m K values, not the weight's J K); each task's block of
// c^T (64 rows of w by 64 rows of a) is transposed into c.
void bf16_weight_product_swapped(int64_t m, const at::BFloat16* a, int64_t lda,
                                 const at::BFloat16* w, int64_t J, int64_t K, float* c,
                                 int64_t ldc);

// Frees the calling thread's matrix-unit state (after its last bf16_gemm;
// nothing to free on the AVX512-BF16 unit).
void bf16_gemm_release();

// Calls bf16_gemm_release when the scope ends, by return or by exception: a
// thread left configured would have ATen skip the next kernel's set-up on it,
// after another oneDNN kernel had changed the tiles.
struct Bf16GemmScope {
  bool active;
  explicit Bf16GemmScope(bool active_) : active(active_) {}
  Bf16GemmScope(const Bf16GemmScope&) = delete;
  Bf16GemmScope& operator=(const Bf16GemmScope&) = delete;
  ~Bf16GemmScope() {
    if (active) bf16_gemm_release();
  }
};

// All threads (at::parallel_for over row blocks and strips): c[m, N] (ldc)
// = a[m, K] (lda) b (+ bias[N] on every row, when bias is not null), or
// c += a b with accumulate (then bias must be null).
void bf16_gemm_parallel(int64_t m, const at::BFloat16* a, int64_t lda, const PackedB16& b, float* c,
                        int64_t ldc, const float* bias, bool accumulate = false);

// One term a[m, K] (lda) b of bf16_gemm_sum_rounded.
struct Bf16Term {
  const at::BFloat16* a;
  int64_t lda;
  const PackedB16* b;
};

// All threads: y[m, N] (ldy, bfloat16) = the sum of the terms' products
// (every b of the same N, any K), each element's float32 sum over the terms
// in order rounded to nearest even once: a bfloat16 layer's input gradient
// dx = sum over directions of dG_d W_ih[d], each dG_d read in place (a
// direction's columns of dG, or its rows of the workspace, which the
// backward wrote dG over). Tasks of 256 rows by one strip, each with a
// float32 tile of its own: no float32 [m, N] buffer. Neither unit reads a's
// rows past K (oneDNN's matmul did: cpu/backward_bf16.h).
void bf16_gemm_sum_rounded(int64_t m, c10::ArrayRef<Bf16Term> terms, at::BFloat16* y, int64_t ldy);

// x's rows [rows, cols] (ld floats apart) rounded to bfloat16 in place, on
// all threads: row r's values land in the first half of its own bytes, so
// the result is a bfloat16 [rows, cols] matrix with row stride 2 * ld, which
// the returned view (not owning x's memory: keep x's tensor alive) reads.
// The rows' float values are gone afterwards. For the backward's h_prev over
// positions with a projection (float32, the projection's copy of the state),
// the operand of a bfloat16 dW_hh: no second buffer.
at::Tensor round_rows_bf16(float* x, int64_t rows, int64_t cols, int64_t ld);
inline at::Tensor round_rows_bf16(double*, int64_t, int64_t, int64_t) {
  TORCH_INTERNAL_ASSERT(false, "bfloat16 products in a float64 layer");
}

}  // namespace cpu
}  // namespace varlen_rnn
