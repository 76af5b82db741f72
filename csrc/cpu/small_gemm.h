// A register-blocked float32 GEMM for the CPU step loops' per-step product:
// few rows (m = the running rows, 1..~128) times a weight panel that is the
// same at every step of a call, c[m, N] (=|+=) a[m, K] b[K, N].
//
// b is packed once per call (pack_b) into column strips of nr floats, k-major
// (strip j holds b[k, j*nr .. j*nr + nr) for k = 0..K-1, zero-padded past N),
// so the inner loop streams one strip contiguously while a tile of up to mr
// rows x nr columns of c stays in registers; a's rows are read in place (lda)
// and broadcast per k. Strips go outermost, then blocks of kc values of k,
// then row tiles: each strip block is loaded into L1 once per call and reused
// by every row tile. The tile is fixed per ISA, picked when packing: AVX-512
// (x86-64-v4) 8 x 48, AVX2+FMA (x86-64-v3) 6 x 16, otherwise 4-wide vectors
// 6 x 8 (small_gemm.cpp says why). Rows past m and columns past N of c are
// never read or written, so c may be a slice of a larger buffer and a may
// end at row m - 1.
//
// Every c[i, j] is one multiply-add chain (fused where the ISA has FMA) over
// k = 0..K-1 in order, from 0 or, with accumulate, from c's value, whatever
// m, the row's position in its tile or the thread: results are
// deterministic and row i's do not depend on the other rows. They may differ
// from a BLAS's by rounding (a BLAS may split k).
//
// The forward's split step loop (cpu/split_steps.h) computes gh[:, own gate
// columns] = h W_hh^T[:, cols] with it; the backward's per-step
// dh[:, own cols] (+)= dG W_hh[:, own cols] fits the same call
// (pack_b(G*H, cols, w_hh + p0, P, 1), accumulate = true where dh holds the
// direct part already).
#pragma once

#include <ATen/ATen.h>

#include <cstdint>

#include "cpu/packing.h"

namespace varlen_rnn {
namespace cpu {

// The micro-kernels this build carries; kAuto picks the best the CPU runs.
enum class SmallGemmIsa { kAuto, kAvx512, kAvx2, kPortable };

// c[m, N] (ldc) = (or += with accumulate) a[m, K] (lda) b[K, N], one thread.
// kc: the k block (small_gemm.cpp's driver).
using SmallGemmFn = void (*)(int64_t m, const float* a, int64_t lda, const float* packed, int64_t K,
                             int64_t N, int64_t kc, float* c, int64_t ldc, bool accumulate);

// b[K, N] packed for one ISA's kernel: immutable, cheap to move; one per
// weight panel per call, shared read-only by the threads that use it.
struct PackedB {
  int64_t K = 0, N = 0;
  int64_t nr = 0;     // strip width (floats)
  int64_t kc = 1;     // k block: a strip's kc x nr block fits L1 beside a's rows
  at::Tensor strips;  // [ceil(N / nr), K, nr] float32, 64-byte aligned
  SmallGemmFn kernel = nullptr;
  SmallGemmIsa isa = SmallGemmIsa::kPortable;
};

// Packs b[k, j] = b[k * stride_k + layout.col(j)] (cpu/packing.h: any
// strides, or a weight's gate slices read in place). Throws if isa is not
// one this CPU and build run.
PackedB pack_b(int64_t K, int64_t N, const float* b, const BLayout& layout,
               SmallGemmIsa isa = SmallGemmIsa::kAuto);
// b[k, j] = b[k * stride_k + j * stride_n]: a row-major [K, N] panel is
// (N, 1); the transpose of a row-major [N, K] weight is (1, K).
inline PackedB pack_b(int64_t K, int64_t N, const float* b, int64_t stride_k, int64_t stride_n,
                      SmallGemmIsa isa = SmallGemmIsa::kAuto) {
  return pack_b(K, N, b, strided(stride_k, stride_n), isa);
}

// c[m, N] (ldc) = a[m, K] (lda) b[K, N], or c += a b with accumulate. m may
// be 0; lda >= K and ldc >= N are the caller's to ensure.
inline void small_gemm(int64_t m, const float* a, int64_t lda, const PackedB& b, float* c,
                       int64_t ldc, bool accumulate) {
  if (m > 0)
    b.kernel(m, a, lda, b.strips.const_data_ptr<float>(), b.K, b.N, b.kc, c, ldc, accumulate);
}

// Whether this CPU and build run isa (kAuto: always).
bool small_gemm_supports(SmallGemmIsa isa);

// The one place the step loops choose between the micro-kernel and the BLAS
// (float32 only: float64 always takes the BLAS). VARLEN_RNN_CPU_GEMM=kernel or
// =mkl forces one (tests run both); otherwise the measured default in
// small_gemm.cpp decides.
bool use_small_gemm();

// A float32 call of few steps (cpu/team.h few_steps) takes its products on
// the weights as stored (cpu/dot_rows.h: AVX-512 or AVX2 dot products, no
// packing, no transposed view for the BLAS) where the rows (positions) are at
// most kF32DotRows (AVX-512) or kF32DotRowsAvx2 (AVX2) (f32_dots_for); its
// backward's dh = dG W_hh on W_hh as stored where the rows are at most
// kF32DotRows (AVX-512) or kF32RowsTimesAvx2 (AVX2) (f32_rows_times_for),
// except on Intel's CPUs, where MKL's GEMM takes the backward's products
// (dh, and the weight gradients of few positions, cpu/weight_grad.h) unless
// VARLEN_RNN_CPU_GEMM=kernel: in the layer it won there. A decoder's
// teacher-forced step (one-step calls, one backward through 20 of them, 2
// threads, bench_decoder_loop.py --gemm kernel mkl: the settings in one
// process, each round in another order, medians of 7 rounds; the Xeon with
// AMX, benchmarks/results/decoder-loop_cpu_20261202-120658.md), us per step,
// =kernel -> as built: I=H=512 GRU B=1 947 -> 884, B=8 1161 -> 1067, B=32
// 1787 -> 1736, LSTM 1168 -> 1023, 1526 -> 1322, 2223 -> 2111; at I=H=256
// (-120519.md) within 6% either way (GRU 201 -> 197, 333 -> 346, 527 ->
// 540, LSTM 264 -> 249). Hot, in a loop of the product alone, our dh won 1.1-2.9x at 256
// columns but lost 0.3-0.8x at 512 (bench_small_gemm.py --part stored), and
// our weight gradients lost 0.43-0.99x at both (in a layer's step the
// weights come from farther than in that loop, presumably). VARLEN_RNN_CPU_GEMM=mkl keeps
// the BLAS for both, for tests and measurement. MKL's GEMM on the transposed
// weight is slow at few rows on an AMD EPYC (Zen 4, 2 threads, weights
// [768, 256] to [2048, 512]: 19-94 us at one row, 20-22 GFLOP/s). Measured
// there (the test op's "dots" against torch.mm(a, w.t()), 2 threads): 5-34
// against 20-130 us at 1 row, 22-133 vs 50-279 at 8, 39-232 vs 69-370 at 16,
// 79-450 vs 106-598 at 32; and again (min of 15, 20 calls each) 78-398 vs
// 148-642 us at 32 rows, 148-766 vs 286-1157 at 64, 287-1492 vs 563-2447 at
// 128, 574-3034 vs 993-3723 at 256 (1.2-2.1x; at 512 and 1024 rows MKL ties
// or wins one of the four). The backward's f32_rows_times against
// torch.mm(dG, W_hh) there, dG [m, G*H], W_hh [768, 256] to [2048, 512]:
// 1.50-1.64x at 32 rows, 1.32-1.37x at 64, 1.22-1.25x at 128, 1.17-1.20x at
// 256. Hence the limit. On a Xeon (AVX-512 and AMX, the same rule), after
// dot_rows8 took three rows of a per tile (min of 15,
// bench_small_gemm.py --part dots): 1.37-2.06x at 1 row, 1.32-1.54x at 8,
// 1.17-1.58x at 32, 0.93-1.16x at 64, 0.82-1.01x at 256 (2 threads; 0.61-0.71x
// at 256 with one row per tile), and MKL's GEMM there packs nothing either
// (its "nocopy" kernels). On AVX2 (a 2-core EPYC, Zen 3, no AVX-512; the same
// comparison, min of 15, 20 calls each) the dot products won at few rows
// only: 24-78 against 32-134 us at 1 row, 31-151 vs 75-359 at 4 (2.1-2.4x),
// 61-274 vs 89-402 at 8, 0.92-1.10x at 16, 0.79-1.13x at 32, 0.68-1.08x at
// 64 and 0.54-0.93x from 128 rows on: hence kF32DotRowsAvx2. There
// f32_rows_times (row_tiles_avx2) against the BLAS's dG W_hh, W_hh [768,
// 256] to [2048, 512] (benchmarks/bench_small_gemm.py --part stored, min of
// 15, timed inside the op): 1.27-1.67x at 1 row, 2.31-2.86x at 4, 1.30-1.75x
// at 8, 0.98-1.49x at 16, 0.78-1.22x at 32, 0.57-1.05x at 64: hence
// kF32RowsTimesAvx2.
constexpr int64_t kF32DotRows = 256, kF32DotRowsAvx2 = 16, kF32RowsTimesAvx2 = 16;
bool f32_dots_for(int64_t rows);
// Whether the CPU is Intel's (x86 with GCC or clang; false elsewhere; asked
// once): MKL's GEMM takes some products there (f32_rows_times_for,
// chunked_projection).
bool cpu_is_intel();
bool f32_rows_times_for(int64_t rows);

// c[m, J] (ldc) = a[m, K] (lda) w[J, K]^T, w row-major as stored, on all
// threads (f32_dots_for must hold).
void f32_dot_rows(int64_t m, const float* a, int64_t lda, const float* w, int64_t J, int64_t K,
                  float* c, int64_t ldc);

// c[m, N] (ldc) = a[m, K] (lda) w[K, N] (or c += with accumulate), w
// row-major as stored (not transposed: the backward's dh = dG W_hh reads
// W_hh [G*H, P] so), on all threads (tasks of 64 columns; f32_rows_times_for
// must hold). Each c[i, j] is one FMA chain over k in order.
void f32_rows_times(int64_t m, const float* a, int64_t lda, const float* w, int64_t K, int64_t N,
                    float* c, int64_t ldc, bool accumulate);

}  // namespace cpu
}  // namespace varlen_rnn
