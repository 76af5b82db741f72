// The micro-kernels declared in small_gemm.h, one per ISA, and the packing.
//
// One template (tile, driver) written with GCC's vector extensions, compiled
// into one function per ISA through target attributes: a vector of W floats
// becomes a zmm (W = 16, AVX-512), a ymm (W = 8, AVX2) or an xmm/NEON register
// (W = 4). `acc += a * b` on vectors compiles to FMA where the target has it
// (GCC and clang contract it; in the AVX-512 loop each k is, per row, one
// vbroadcastss and NV vfmadd231ps, most with the strip as a memory operand).
#include "cpu/small_gemm.h"

#include "cpu/dot_rows.h"

#include "cpu/team.h"  // gemm_rm, blas_available: the BLAS side of the op

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <string>

namespace varlen_rnn {
namespace cpu {
namespace {

#if defined(__GNUC__)
#define VR_INLINE inline __attribute__((always_inline))
#else
#define VR_INLINE inline
#endif

// Loads and stores through these may be unaligned (aligned(4)): c and a are
// the caller's slices; the packed strips are 64-byte aligned anyway.
// Without GCC's vector extensions (MSVC) the portable kernel runs on plain
// floats (W = 1).
#if defined(__GNUC__)
template <int W>
struct Vec {
  typedef float type __attribute__((vector_size(W * sizeof(float)), aligned(4)));
};
constexpr int kPortableW = 4;
#else
template <int W>
struct Vec {
  static_assert(W == 1, "plain floats only");
  using type = float;
};
constexpr int kPortableW = 1;
#endif

// One tile: R rows x (NU vectors of W) of c, over kc values of k: from R rows
// of a (offset to the block's first k) and one packed strip's block (NV
// vectors wide; NU < NV for the last strip's tail, so its zero padding costs
// no FMAs). The accumulators start from c (load_c: a later k block, or
// accumulate) or 0. Only the first `cols` <= NU * W columns of c are read or
// written.
template <int W, int NV, int R, int NU>
VR_INLINE void tile(int64_t kc, const float* a, int64_t lda, const float* strip, float* c,
                    int64_t ldc, int64_t cols, bool load_c) {
  using V = typename Vec<W>::type;
  constexpr int NR = W * NV, NC = W * NU;
  V acc[R][NU];
  if (!load_c) {
#pragma GCC unroll 16
    for (int r = 0; r < R; ++r) {
#pragma GCC unroll 8
      for (int v = 0; v < NU; ++v) acc[r][v] = V{};
    }
  } else if (cols == NC) {
#pragma GCC unroll 16
    for (int r = 0; r < R; ++r) {
#pragma GCC unroll 8
      for (int v = 0; v < NU; ++v) acc[r][v] = *reinterpret_cast<const V*>(c + r * ldc + v * W);
    }
  } else {
    for (int r = 0; r < R; ++r) {
      float buf[NC] = {};
      std::memcpy(buf, c + r * ldc, cols * sizeof(float));
      std::memcpy(acc[r], buf, sizeof buf);
    }
  }
  const float* ar[R];
#pragma GCC unroll 16
  for (int r = 0; r < R; ++r) ar[r] = a + r * lda;
  for (int64_t k = 0; k < kc; ++k) {
    V b[NU];
#pragma GCC unroll 8
    for (int v = 0; v < NU; ++v) b[v] = *reinterpret_cast<const V*>(strip + k * NR + v * W);
#pragma GCC unroll 16
    for (int r = 0; r < R; ++r) {
      const float x = ar[r][k];
#pragma GCC unroll 8
      for (int v = 0; v < NU; ++v) acc[r][v] += x * b[v];
    }
  }
  if (cols == NC) {
#pragma GCC unroll 16
    for (int r = 0; r < R; ++r) {
#pragma GCC unroll 8
      for (int v = 0; v < NU; ++v) *reinterpret_cast<V*>(c + r * ldc + v * W) = acc[r][v];
    }
    return;
  }
  for (int r = 0; r < R; ++r) std::memcpy(c + r * ldc, acc[r], cols * sizeof(float));
}

// tile for the vectors `cols` needs: NV, or fewer in the last strip.
template <int W, int NV, int R>
VR_INLINE void tile_cols(int64_t kc, const float* a, int64_t lda, const float* strip, float* c,
                         int64_t ldc, int64_t cols, bool load_c) {
  static_assert(NV >= 1 && NV <= 4, "tails of 1..3 vectors");
  const int64_t nu = (cols + W - 1) / W;
  if constexpr (NV > 1) {
    if (nu == 1) return tile<W, NV, R, 1>(kc, a, lda, strip, c, ldc, cols, load_c);
  }
  if constexpr (NV > 2) {
    if (nu == 2) return tile<W, NV, R, 2>(kc, a, lda, strip, c, ldc, cols, load_c);
  }
  if constexpr (NV > 3) {
    if (nu == 3) return tile<W, NV, R, 3>(kc, a, lda, strip, c, ldc, cols, load_c);
  }
  tile<W, NV, R, NV>(kc, a, lda, strip, c, ldc, cols, load_c);
}

// Strips outermost, then blocks of kc values of k, then row tiles: a strip's
// block (kc x NR) is loaded from L2 once per call and reused from L1 by every
// row tile, so the panel crosses L2 -> L1 once per step whatever m. A tile
// resumes from the partial sums the previous block left in c: floats stored
// and reloaded exactly, so c[i, j] is still one FMA chain over k in order.
template <int W, int NV, int MR>
VR_INLINE void driver(int64_t m, const float* a, int64_t lda, const float* packed, int64_t K,
                      int64_t N, int64_t kc, float* c, int64_t ldc, bool accumulate) {
  constexpr int NR = W * NV;
  static_assert(MR >= 1 && MR <= 8, "the row switch below covers 1..8 rows");
  // m rows in ceil(m / MR) tiles of near-equal size (9 rows: 5 + 4, not
  // 8 + 1): a tile of R rows keeps 3R FMA chains in flight, and one or two
  // rows alone are bound by the FMA latency.
  const int64_t tiles = (m + MR - 1) / MR;
  const auto rows_of = [&](int64_t t) { return m / tiles + (t < m % tiles ? 1 : 0); };
  for (int64_t j0 = 0; j0 < N; j0 += NR) {
    const float* strip = packed + j0 * K;  // strip j0 / NR starts at (j0 / NR) * K * NR
    const int64_t cols = std::min<int64_t>(NR, N - j0);
    for (int64_t k0 = 0; k0 < K || k0 == 0; k0 += kc) {
      const int64_t kn = std::min(kc, K - k0);
      const bool load_c = accumulate || k0 > 0;
      const float* sk = strip + k0 * NR;
      int64_t i0 = 0;
      for (int64_t t = 0; t < tiles; ++t) {
        const int64_t rows = rows_of(t);
        const float* ai = a + i0 * lda + k0;
        float* cij = c + i0 * ldc + j0;
        i0 += rows;
        switch (rows) {  // 1..MR <= 8 rows
#define VR_ROWS(r)                                                                       \
  case r:                                                                                \
    if constexpr (r <= MR) tile_cols<W, NV, r>(kn, ai, lda, sk, cij, ldc, cols, load_c); \
    break;
          VR_ROWS(1)
          VR_ROWS(2)
          VR_ROWS(3)
          VR_ROWS(4)
          VR_ROWS(5)
          VR_ROWS(6)
          VR_ROWS(7)
          VR_ROWS(8)
#undef VR_ROWS
          default:
            break;
        }
      }
    }
  }
}

// Tiles per ISA, from the register file: AVX-512 has 32 zmm; 8 rows x 3
// vectors is 24 accumulators + 3 strip vectors + 1 broadcast, and per k it
// issues 24 FMAs against 8 broadcasts + 3 loads, within the two load ports'
// budget; 48 columns divide the split loop's 3 * 128 and 3 * 256. AVX2 and
// SSE/NEON have 16 registers: 6 x 2 vectors (12 accumulators).
constexpr int kAvx512Nv = 3, kAvx512Mr = 8;
constexpr int kAvx2Nv = 2, kAvx2Mr = 6;
constexpr int kPortableNv = 2, kPortableMr = 6;

#define VR_KERNEL_ARGS                                                                           \
  int64_t m, const float *a, int64_t lda, const float *packed, int64_t K, int64_t N, int64_t kc, \
      float *c, int64_t ldc, bool accumulate
#define VR_KERNEL_PASS m, a, lda, packed, K, N, kc, c, ldc, accumulate

#if defined(__GNUC__) && defined(__x86_64__)
#define VR_HAVE_X86_KERNELS 1
__attribute__((target("arch=x86-64-v4"))) void kernel_avx512(VR_KERNEL_ARGS) {
  driver<16, kAvx512Nv, kAvx512Mr>(VR_KERNEL_PASS);
}
__attribute__((target("arch=x86-64-v3"))) void kernel_avx2(VR_KERNEL_ARGS) {
  driver<8, kAvx2Nv, kAvx2Mr>(VR_KERNEL_PASS);
}
#else
#define VR_HAVE_X86_KERNELS 0
#endif
void kernel_portable(VR_KERNEL_ARGS) {
  driver<kPortableW, kPortableNv, kPortableMr>(VR_KERNEL_PASS);
}

SmallGemmIsa best_isa() {
#if VR_HAVE_X86_KERNELS
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512vl") &&
      __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512dq")) {
    return SmallGemmIsa::kAvx512;
  }
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return SmallGemmIsa::kAvx2;
#endif
  return SmallGemmIsa::kPortable;
}

}  // namespace

bool small_gemm_supports(SmallGemmIsa isa) {
  static const SmallGemmIsa best = best_isa();
  switch (isa) {
    case SmallGemmIsa::kAuto:
    case SmallGemmIsa::kPortable:
      return true;
    case SmallGemmIsa::kAvx2:
      return best == SmallGemmIsa::kAvx2 || best == SmallGemmIsa::kAvx512;
    case SmallGemmIsa::kAvx512:
      return best == SmallGemmIsa::kAvx512;
  }
  return false;
}

PackedB pack_b(int64_t K, int64_t N, const float* b, const BLayout& layout, SmallGemmIsa isa) {
  TORCH_CHECK(small_gemm_supports(isa), "pack_b: this CPU or build lacks the requested kernel");
  if (isa == SmallGemmIsa::kAuto) isa = best_isa();
  PackedB p;
  p.K = K;
  p.N = N;
  p.isa = isa;
  switch (isa) {
#if VR_HAVE_X86_KERNELS
    case SmallGemmIsa::kAvx512:
      p.nr = 16 * kAvx512Nv;
      p.kernel = kernel_avx512;
      break;
    case SmallGemmIsa::kAvx2:
      p.nr = 8 * kAvx2Nv;
      p.kernel = kernel_avx2;
      break;
#endif
    default:
      p.nr = kPortableW * kPortableNv;
      p.kernel = kernel_portable;
      break;
  }
  // A strip's k block takes kStripBlockBytes of L1 (48 KiB on recent x86),
  // the rest is for a's rows and c's tiles.
  constexpr int64_t kStripBlockBytes = 24 * 1024;
  p.kc = std::max<int64_t>(1, kStripBlockBytes / (p.nr * static_cast<int64_t>(sizeof(float))));
  // The transposes where the CPU runs AVX (the AVX2 and AVX-512 kernels').
  p.strips = pack_strips(K, N, p.nr, b, layout, isa != SmallGemmIsa::kPortable);
  return p;
}

// The default: the micro-kernel where AVX-512 or AVX2+FMA runs, the BLAS
// elsewhere (the portable kernel was not measured against a BLAS on a machine
// of its own). With the BLAS, whose rounding depends on the number of rows,
// row groups (cpu/team.h) did not give one team's results bit for bit
// (test_cpu_row_groups.py failed on an AVX2 EPYC until the AVX2 kernel
// became its default).
// - AVX2, a 2-core AMD EPYC (Zen 3, no AVX-512), bench_small_gemm.py
//   (benchmarks/results/small-gemm_cpu_20261130-102409.md): whole inference forwards
//   through the split loop 1.16-1.92x faster than with MKL (GRU, LSTM, RNN at
//   B=64 H=256 and B=16 H=512); single calls 71-87 GFLOP/s against MKL's
//   46-75, but 63 vs 72 at K=512 n=64.
// - AVX-512: measured on this project's 2-core Xeon (243 GFLOP/s FP32 per core
//   by an FMA loop), shared with other work, so as minima:
// - In the layer (float32 inference, split loop, 2 threads; a temporary timer
//   around each step's product, min per step over 30 runs, summed): GRU B=64
//   T=100 I=H=256: 3.7 ms kernel vs 4.7-4.9 ms BLAS per thread; B=16 T=200
//   I=256 H=512: 9.2 vs 10.3-11.2 ms. Whole-layer times were noise-bound.
// - Single calls, one thread (benchmarks/bench_small_gemm.py): 70-88% of peak
//   for both, within noise of each other, while the panel fits L2; the
//   LSTM's H=512 panel (K=512, N=1024: 2 MiB, L2's size), which the kernel
//   reads once per call: 124 vs 95 GFLOP/s at n=8, 154 vs 117 at 16, 183 vs
//   159 at 64. Small layers: K=64 N=96 n=4: 192 vs 143, n=16: 205 vs 196;
//   K=128 N=384 n=4: 180 vs 188.
bool use_small_gemm() {
  if (const char* env = std::getenv("VARLEN_RNN_CPU_GEMM")) {
    if (std::strcmp(env, "kernel") == 0) return true;
    if (std::strcmp(env, "mkl") == 0) return false;
  }
  static const bool x86_kernel = best_isa() != SmallGemmIsa::kPortable;
  return x86_kernel;
}

void f32_rows_times(int64_t m, const float* a, int64_t lda, const float* w, int64_t K, int64_t N,
                    float* c, int64_t ldc, bool accumulate) {
  if (m <= 0 || N <= 0) return;
#if VR_HAVE_X86_KERNELS
  const SmallGemmIsa isa = best_isa();
  TORCH_INTERNAL_ASSERT(isa == SmallGemmIsa::kAvx512 || isa == SmallGemmIsa::kAvx2,
                        "f32_rows_times: needs AVX-512 or AVX2");  // (f32_rows_times_for holds)
  // Tasks of 64 columns, all rows (cpu/dot_rows.h row_tiles, row_tiles_avx2).
  // Where the rows need more than one register tile (kRowTile) and a task's
  // columns of w (K x 64 floats) pass 256 KiB, the task takes them kKc values
  // of k at a time, every tile of rows over each piece before the next (each
  // c[i, j] the same chain over k, resumed from c, so the same bits): a piece
  // (64 KiB) is read once from memory and by the later tiles from the caches,
  // where all K x 64 were read again for each tile. Measured on the Xeon
  // (bench_small_gemm.py --part stored, 2 threads, min of 15): W_hh 1536 x
  // 512 at 8 rows 115 -> 86 us, at 64 rows 655 -> 357; 2048 x 512 at 64 rows
  // 1082 -> 444 (pieces of 128 values: 356 and 468; of 512: 323 and 466);
  // rows within one tile, and weights of at most 256 KiB a task (W_hh 768 x
  // 256, 1024 x 256), keep one piece, as they gained nothing.
  constexpr int64_t kKc = 256;
  const int64_t kc = m > kRowTile && K * 64 * 4 > 256 * 1024 ? kKc : std::max<int64_t>(K, 1);
  at::parallel_for(0, (N + 63) / 64, 1, [&](int64_t b0, int64_t b1) {
    for (int64_t j0 = b0 * 64; j0 < std::min(N, b1 * 64); j0 += 64) {
      const int64_t cols = std::min<int64_t>(64, N - j0);
      for (int64_t k0 = 0; k0 < K || k0 == 0; k0 += kc) {  // (K = 0: one empty piece)
        const int64_t steps = std::min(kc, K - k0);
        const bool resume = accumulate || k0 > 0;
        if (isa == SmallGemmIsa::kAvx512) {
          row_tiles(m, steps, a + k0, lda, w + k0 * N + j0, N, c + j0, ldc, cols, resume);
        } else {
          row_tiles_avx2(m, steps, a + k0, AStrides{lda, 1}, w + k0 * N + j0, N, c + j0, ldc, cols,
                         resume);
        }
      }
    }
  });
#else
  TORCH_INTERNAL_ASSERT(false, "f32_rows_times: needs an x86-64 build with AVX-512 or AVX2");
#endif
}

bool cpu_is_intel() {
#if defined(__x86_64__) && defined(__GNUC__)
  static const bool intel = [] {
    __builtin_cpu_init();
    return __builtin_cpu_is("intel") != 0;
  }();
  return intel;
#else
  return false;
#endif
}

namespace {

// rows within `limit` (-1: this CPU runs none) and VARLEN_RNN_CPU_GEMM not
// mkl; with kernel_only, only where it is kernel.
bool stored_products_for(int64_t rows, int64_t limit, bool kernel_only = false) {
  if (rows > limit) return false;
  const char* env = std::getenv("VARLEN_RNN_CPU_GEMM");
  if (env == nullptr) return !kernel_only;
  return kernel_only ? std::strcmp(env, "kernel") == 0 : std::strcmp(env, "mkl") != 0;
}
}  // namespace

bool f32_dots_for(int64_t rows) {
  static const int64_t limit = best_isa() == SmallGemmIsa::kAvx512 ? kF32DotRows
                               : best_isa() == SmallGemmIsa::kAvx2 ? kF32DotRowsAvx2
                                                                   : -1;
  return stored_products_for(rows, limit);
}

bool f32_rows_times_for(int64_t rows) {
  static const int64_t limit = best_isa() == SmallGemmIsa::kAvx512 ? kF32DotRows
                               : best_isa() == SmallGemmIsa::kAvx2 ? kF32RowsTimesAvx2
                                                                   : -1;
  // On Intel's CPUs MKL's GEMM takes the backward's products unless
  // VARLEN_RNN_CPU_GEMM=kernel (small_gemm.h has the measurements).
  return stored_products_for(rows, limit, cpu_is_intel());
}

void f32_dot_rows(int64_t m, const float* a, int64_t lda, const float* w, int64_t J, int64_t K,
                  float* c, int64_t ldc) {
#if VR_HAVE_X86_KERNELS
  switch (best_isa()) {
    case SmallGemmIsa::kAvx512:
      return dot_rows(m, a, lda, w, J, K, c, ldc);
    case SmallGemmIsa::kAvx2:
      return dot_rows_avx2(m, a, lda, w, J, K, c, ldc);
    default:
      break;
  }
#endif
  TORCH_INTERNAL_ASSERT(false, "f32_dot_rows: needs an x86-64 build and AVX2 or AVX-512");
}

namespace {

SmallGemmIsa isa_named(const std::string& name) {
  if (name == "auto") return SmallGemmIsa::kAuto;
  if (name == "avx512") return SmallGemmIsa::kAvx512;
  if (name == "avx2") return SmallGemmIsa::kAvx2;
  if (name == "portable") return SmallGemmIsa::kPortable;
  TORCH_CHECK(false,
              "_small_gemm: kernel must be auto, avx512, avx2, portable, blas, dots or rows, got '",
              name, "'");
}

// The test and benchmark entry (ops.cpp's _small_gemm).
at::Tensor small_gemm_op(const at::Tensor& a, const at::Tensor& b,
                         const std::optional<at::Tensor>& c, const std::string& kernel,
                         int64_t repeats) {
  TORCH_CHECK(a.dim() == 2 && a.scalar_type() == at::kFloat,
              "_small_gemm: a must be a 2-D float32 tensor [m, K], got ", a.sizes(), " ",
              a.scalar_type());
  TORCH_CHECK(
      (b.dim() == 2 || b.dim() == 3) && b.scalar_type() == at::kFloat && b.size(-2) == a.size(1),
      "_small_gemm: b must be a float32 [K, N] or [groups, K, n] with K = a.size(1) = ", a.size(1),
      ", got ", b.sizes(), " ", b.scalar_type());
  TORCH_CHECK(b.dim() == 2 || (kernel != "blas" && kernel != "dots" && kernel != "rows"),
              "_small_gemm: kernel '", kernel, "' takes a 2-D b");
  TORCH_CHECK(repeats >= 0, "_small_gemm: repeats must be >= 0, got ", repeats);
  const bool blas = kernel == "blas", dots = kernel == "dots", rows = kernel == "rows";
  const SmallGemmIsa isa = blas   ? SmallGemmIsa::kAuto
                           : dots ? SmallGemmIsa::kAvx2  // AVX2 or AVX-512
                           : rows ? SmallGemmIsa::kAvx2  // AVX2 or AVX-512
                                  : isa_named(kernel);
  TORCH_CHECK(small_gemm_supports(isa), "_small_gemm: this CPU does not run kernel '", kernel, "'");
  TORCH_CHECK(!blas || blas_available(), "_small_gemm: this build has no BLAS for kernel 'blas'");
  TORCH_CHECK(!((blas || dots) && c), "_small_gemm: kernel '", kernel, "' takes no c");
  const int64_t m = a.size(0), K = a.size(1), N = b.dim() == 2 ? b.size(1) : b.size(0) * b.size(2);
  // c is computed inside a NaN-filled [m + 1, N + 5] buffer (ldc = N + 5, odd,
  // so rows start unaligned): what the kernel writes past its [m, N] shows.
  at::Tensor out = at::full({m + 1, N + 5}, std::numeric_limits<float>::quiet_NaN(), a.options());
  if (c) {
    TORCH_CHECK(c->sizes() == at::IntArrayRef({m, N}) && c->scalar_type() == at::kFloat,
                "_small_gemm: c must be float32 [m, N] = [", m, ", ", N, "], got ", c->sizes(), " ",
                c->scalar_type());
    out.narrow(0, 0, m).narrow(1, 0, N).copy_(*c);
  }
  // a keeps its row stride (rows may be padded); its columns must be unit-stride.
  const at::Tensor ac = a.stride(1) == 1 && a.stride(0) >= K ? a : a.contiguous();
  const float* a_p = ac.const_data_ptr<float>();
  const int64_t lda = std::max<int64_t>(ac.stride(0), 1), ldc = N + 5;
  float* c_p = out.data_ptr<float>();
  if (blas) {
    const at::Tensor bc = b.contiguous();  // [K, N], as the step loops pass it
    for (int64_t r = 0; r < repeats && m > 0 && N > 0; ++r) {
      gemm_rm(m, N, K, a_p, lda, bc.const_data_ptr<float>(), std::max<int64_t>(N, 1), c_p, ldc);
    }
    return out;
  }
  if (rows) {
    const at::Tensor w = b.contiguous();  // [K, N], a weight as stored
    for (int64_t r = 0; r < repeats; ++r) {
      f32_rows_times(m, a_p, lda, w.const_data_ptr<float>(), K, N, c_p, ldc, c.has_value());
    }
    return out;
  }
  if (dots) {
    const at::Tensor w = b.t().contiguous();  // [N, K], a weight as stored
    for (int64_t r = 0; r < repeats; ++r) {
      f32_dot_rows(m, a_p, lda, w.const_data_ptr<float>(), N, K, c_p, ldc);
    }
    return out;
  }
  const PackedB packed = pack_b(K, N, b.const_data_ptr<float>(), layout_of(b), isa);
  for (int64_t r = 0; r < repeats; ++r) small_gemm(m, a_p, lda, packed, c_p, ldc, c.has_value());
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(varlen_rnn, CPU, m) { m.impl("_small_gemm", &small_gemm_op); }

}  // namespace cpu
}  // namespace varlen_rnn
