// cpu/bf16_gemm.h's products on oneDNN's BRGeMM micro-kernel (through
// at::native::cpublas), and the test op that checks them.
#include "cpu/bf16_gemm.h"

#include "cpu/dot_rows.h"

#include <ATen/Parallel.h>
#include <ATen/native/CPUBlas.h>
#include <torch/library.h>

#if defined(__x86_64__)
#include <immintrin.h>
#endif

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <optional>
#include <type_traits>
#include <vector>

namespace varlen_rnn {
namespace cpu {

namespace cpublas = at::native::cpublas;

namespace {

bool amx_available() { return cpublas::could_pack(at::kBFloat16); }

bool avx512bf16_available() {
#if defined(__x86_64__) && defined(__GNUC__)
  static const bool yes = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                          __builtin_cpu_supports("avx512bf16");
  return yes;
#else
  return false;
#endif
}

}  // namespace

Bf16Unit bf16_unit() {
  if (const char* env = std::getenv("VARLEN_RNN_CPU_BF16")) {
    if (std::strcmp(env, "float") == 0) return Bf16Unit::kFloat;
    if (std::strcmp(env, "amx") == 0) {
      TORCH_CHECK(amx_available(),
                  "VARLEN_RNN_CPU_BF16=amx: this CPU or build has no bfloat16 matrix unit "
                  "(AMX) with oneDNN enabled");
      return Bf16Unit::kAmx;
    }
    if (std::strcmp(env, "avx512") == 0) {
      TORCH_CHECK(avx512bf16_available(),
                  "VARLEN_RNN_CPU_BF16=avx512: this CPU or build has no AVX512-BF16");
      return Bf16Unit::kAvx512;
    }
    TORCH_CHECK(std::strcmp(env, "auto") == 0,
                "VARLEN_RNN_CPU_BF16 must be auto, amx, avx512 or float, got '", env, "'");
  }
  if (amx_available()) return Bf16Unit::kAmx;
  if (avx512bf16_available()) return Bf16Unit::kAvx512;
  return Bf16Unit::kFloat;
}

bool bf16_gemm_for(at::ScalarType input_dtype, int64_t I, int64_t P) {
  if (input_dtype != at::kBFloat16 || I % 2 != 0 || P % 2 != 0) return false;
  return bf16_unit() != Bf16Unit::kFloat;
}

namespace {

// Whether oneDNN's packing for the matrix unit (cpublas::pack) writes the
// layout the AVX512-BF16 kernel reads, each strip [K/2][kStrip][2] (AMX's
// bfloat16 B tiles hold pairs of k side by side, as vdpbf16ps reads them):
// then both units take the same packing by permutes and gathers (below), 2.7x
// faster than a rounded copy through cpublas::pack for a [3072, 1024]
// weight's transpose (the Xeon, one thread: 10.2 -> 4.0 ms). Checked once,
// on one strip of distinct values; a different layout keeps cpublas::pack.
bool amx_packs_pairs() {
  static const bool same = [] {
    constexpr int64_t S = PackedB16::kStrip, K = 6;
    std::vector<at::BFloat16> plain(K * S), pairs(K * S);
    for (int64_t i = 0; i < K * S; ++i) plain[i] = at::BFloat16(static_cast<float>(i % 256));
    for (int64_t k = 0; k < K; ++k) {
      for (int64_t j = 0; j < S; ++j) pairs[(k / 2 * S + j) * 2 + k % 2] = plain[k * S + j];
    }
    at::Tensor packed = at::empty({K, S}, at::TensorOptions().dtype(at::kBFloat16));
    cpublas::pack(K, S, S, S, at::kBFloat16, at::kBFloat16, plain.data(), packed.data_ptr());
    return std::memcmp(packed.const_data_ptr(), pairs.data(), K * S * sizeof(at::BFloat16)) == 0;
  }();
  return same;
}

// pack_b16 for either source type (float32 values are rounded to nearest
// even, bfloat16 ones copied), for the matrix unit (its own packing kernel)
// or the AVX512-BF16 kernel (strip j's pair of k q at [q][kStrip][2]: each
// column's two values of k side by side, what vdpbf16ps multiplies).
template <typename src_t>
PackedB16 pack_b16_from(int64_t K, int64_t N, const src_t* b, const BLayout& layout) {
  constexpr int64_t S = PackedB16::kStrip;
  TORCH_CHECK(K % 2 == 0, "pack_b16: K must be even (k pairs), got ", K);
  PackedB16 p;
  p.K = K;
  p.N = N;
  p.unit = bf16_unit();
  TORCH_INTERNAL_ASSERT(p.unit != Bf16Unit::kFloat, "pack_b16: no bfloat16 unit");
  const int64_t strips = (N + S - 1) / S, stride_k = layout.stride_k;
  const auto opts = at::TensorOptions().dtype(at::kBFloat16);
  if constexpr (std::is_same_v<src_t, at::BFloat16>) {
    // Where both units read the same pairs: by permutes or gathers, on all
    // threads (a decoding step's backward packs its W_hh at every call).
    const bool pair_layout =
        p.unit == Bf16Unit::kAvx512 || (p.unit == Bf16Unit::kAmx && amx_packs_pairs());
    if (pair_layout && avx512bf16_available()) {
      p.strips = pack_pairs(K, N, S, b, layout);
      if (p.strips.defined()) return p;
    }
  }
  p.strips = at::zeros({strips, K, S}, opts);
  if (p.unit == Bf16Unit::kAvx512) {
    at::BFloat16* out = p.strips.data_ptr<at::BFloat16>();
    for (int64_t j = 0; j < strips; ++j) {
      const int64_t j0 = j * S, nj = std::min(S, N - j0);
      for (int64_t jj = 0; jj < nj; ++jj) {
        const src_t* bj = b + layout.col(j0 + jj);
        for (int64_t k = 0; k < K; ++k) {
          out[j * K * S + (k / 2) * 2 * S + (k % 2) + 2 * jj] =
              static_cast<at::BFloat16>(bj[k * stride_k]);
        }
      }
    }
    return p;
  }
  // One strip at a time: rounded into a zero-padded row-major [K, S], then
  // interleaved by the packing kernel.
  at::Tensor plain = at::zeros({K, S}, opts);
  at::BFloat16* pl = plain.data_ptr<at::BFloat16>();
  for (int64_t j = 0; j < (K > 0 ? strips : 0); ++j) {
    const int64_t j0 = j * S, nj = std::min(S, N - j0);
    for (int64_t jj = 0; jj < nj; ++jj) {
      const src_t* bj = b + layout.col(j0 + jj);
      for (int64_t k = 0; k < K; ++k) pl[k * S + jj] = static_cast<at::BFloat16>(bj[k * stride_k]);
    }
    for (int64_t k = 0; k < K; ++k)
      std::fill(pl + k * S + nj, pl + (k + 1) * S, at::BFloat16(0.0f));
    cpublas::pack(K, S, S, S, at::kBFloat16, at::kBFloat16, pl, p.strips[j].data_ptr());
  }
  return p;
}

#if defined(__x86_64__) && defined(__GNUC__)
// One strip on the AVX512-BF16 unit, what one BRGeMM call does on the matrix
// unit: c[m, nj] (ldc) = (or += with accumulate) a[m, K] (lda) strip, nj <=
// kStrip, K even. Blocks of kKc pairs of k (the strip's block stays in L1
// while every row tile passes it), each by row_tiles (cpu/dot_rows.h). A
// tile resumes from the partial sums the previous block left in c (floats
// stored and reloaded exactly), so each c[i, j] is one chain of pair
// products over k in order, whatever m.
VR_DOT_TARGET void strip_avx512(int64_t m, int64_t nj, int64_t K, int64_t lda, int64_t ldc,
                                bool accumulate, const at::BFloat16* a, const at::BFloat16* strip,
                                float* c) {
  constexpr int64_t S = PackedB16::kStrip, kKc = 96;  // 96 pairs: 24 KiB of strip
  for (int64_t q0 = 0; q0 < K / 2; q0 += kKc) {
    row_tiles(m, std::min(kKc, K / 2 - q0), a + 2 * q0, lda, strip + q0 * 2 * S, 2 * S, c, ldc, nj,
              accumulate || q0 > 0);
  }
}
#endif

// One strip's product (c[m, nj] (=|+=) a[m, K] strip, K > 0) on a unit.
void strip_product(Bf16Unit unit, int64_t m, int64_t nj, int64_t K, int64_t lda, int64_t ldc,
                   bool accumulate, const at::BFloat16* a, const at::BFloat16* strip, float* c) {
  if (unit == Bf16Unit::kAmx) {
    cpublas::brgemm(m, nj, K, lda, PackedB16::kStrip, ldc, accumulate, a, strip, c, true);
    return;
  }
#if defined(__x86_64__) && defined(__GNUC__)
  TORCH_INTERNAL_ASSERT(unit == Bf16Unit::kAvx512 && avx512bf16_available());
  strip_avx512(m, nj, K, lda, ldc, accumulate, a, strip, c);
#else
  TORCH_INTERNAL_ASSERT(false, "bfloat16 products: no unit in this build");
#endif
}

}  // namespace

PackedB16 pack_b16(int64_t K, int64_t N, const float* b, const BLayout& layout) {
  return pack_b16_from(K, N, b, layout);
}

PackedB16 pack_b16(int64_t K, int64_t N, const at::BFloat16* b, const BLayout& layout) {
  return pack_b16_from(K, N, b, layout);
}

void bf16_gemm(int64_t m, const at::BFloat16* a, int64_t lda, const PackedB16& b, float* c,
               int64_t ldc, bool accumulate) {
  constexpr int64_t S = PackedB16::kStrip;
  if (m <= 0 || b.N <= 0) return;
  const at::BFloat16* strips = b.strips.const_data_ptr<at::BFloat16>();
  const int64_t strip_size = b.strips.size(1) * S;
  for (int64_t j0 = 0, j = 0; j0 < b.N; j0 += S, ++j) {
    const int64_t nj = std::min(S, b.N - j0);
    if (b.K == 0) {  // an empty sum
      for (int64_t i = 0; i < m && !accumulate; ++i) std::fill_n(c + i * ldc + j0, nj, 0.0f);
      continue;
    }
    strip_product(b.unit, m, nj, b.K, lda, ldc, accumulate, a, strips + j * strip_size, c + j0);
  }
}

#if defined(__x86_64__) && defined(__GNUC__)
__attribute__((target("avx512f,avx512bf16"))) static void round_bf16_avx512(const float* x,
                                                                            int64_t n,
                                                                            at::BFloat16* y) {
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) {
    const __m256bh v = _mm512_cvtneps_pbh(_mm512_loadu_ps(x + i));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(y + i), reinterpret_cast<const __m256i&>(v));
  }
  for (; i < n; ++i) y[i] = static_cast<at::BFloat16>(x[i]);
}
#endif

void round_bf16(const float* x, int64_t n, at::BFloat16* y) {
#if defined(__x86_64__) && defined(__GNUC__)
  static const bool avx512bf16 = __builtin_cpu_supports("avx512bf16");
  if (avx512bf16) return round_bf16_avx512(x, n, y);
#endif
  for (int64_t i = 0; i < n; ++i) y[i] = static_cast<at::BFloat16>(x[i]);
}

void bf16_dot_rows(int64_t m, const at::BFloat16* a, int64_t lda, const at::BFloat16* w, int64_t J,
                   int64_t K, float* c, int64_t ldc) {
  TORCH_INTERNAL_ASSERT(K % 2 == 0, "bf16_dot_rows: K must be even");
  if (m <= 0 || J <= 0) return;
#if defined(__x86_64__) && defined(__GNUC__)
  TORCH_INTERNAL_ASSERT(avx512bf16_available(),
                        "bf16_dot_rows: needs AVX512-BF16 (every AMX CPU has it)");
  dot_rows(m, a, lda, w, J, K, c, ldc);
#else
  TORCH_INTERNAL_ASSERT(false, "bf16_dot_rows: needs an x86-64 build with AVX512-BF16");
#endif
}

namespace {

constexpr int64_t kBlock = 64;  // c^T's blocks: rows of w, and positions (one strip)

// c[i, r] = block[r, i] for r < rows, i < n (block [kBlock, kBlock], every
// value initialised), c's rows ldc apart.
void store_transposed(const float* block, int64_t rows, int64_t n, float* c, int64_t ldc) {
  for (int64_t i = 0; i < n; ++i) {
    for (int64_t r = 0; r < rows; ++r) c[i * ldc + r] = block[r * kBlock + i];
  }
}

#if defined(__x86_64__) && defined(__GNUC__)
// The same, 16 x 16 tiles transposed in registers: rows unpacked in pairs,
// then pairs of pairs, then 128-bit lanes exchanged twice; the last tile's
// rows past `rows` masked off at the store.
__attribute__((target("avx512f"))) void store_transposed_avx512(const float* block, int64_t rows,
                                                                int64_t n, float* c, int64_t ldc) {
  for (int64_t i0 = 0; i0 < n; i0 += 16) {
    for (int64_t r0 = 0; r0 < rows; r0 += 16) {
      __m512 x[16], t[16];
      for (int q = 0; q < 16; ++q) x[q] = _mm512_loadu_ps(block + (r0 + q) * kBlock + i0);
      for (int q = 0; q < 8; ++q) {
        t[2 * q] = _mm512_unpacklo_ps(x[2 * q], x[2 * q + 1]);
        t[2 * q + 1] = _mm512_unpackhi_ps(x[2 * q], x[2 * q + 1]);
      }
      // x[4q + j], lane L: column 4L + j of rows 4q..4q+3.
      for (int q = 0; q < 4; ++q) {
        const __m512d a = _mm512_castps_pd(t[4 * q]), b = _mm512_castps_pd(t[4 * q + 1]);
        const __m512d c2 = _mm512_castps_pd(t[4 * q + 2]), d = _mm512_castps_pd(t[4 * q + 3]);
        x[4 * q] = _mm512_castpd_ps(_mm512_unpacklo_pd(a, c2));
        x[4 * q + 1] = _mm512_castpd_ps(_mm512_unpackhi_pd(a, c2));
        x[4 * q + 2] = _mm512_castpd_ps(_mm512_unpacklo_pd(b, d));
        x[4 * q + 3] = _mm512_castpd_ps(_mm512_unpackhi_pd(b, d));
      }
      const __mmask16 mask =
          static_cast<__mmask16>(rows - r0 >= 16 ? 0xFFFF : (1u << (rows - r0)) - 1);
      const int64_t cols = std::min<int64_t>(16, n - i0);
      for (int j = 0; j < 4; ++j) {
        const __m512 u0 = _mm512_shuffle_f32x4(x[j], x[4 + j], 0x88);
        const __m512 u1 = _mm512_shuffle_f32x4(x[j], x[4 + j], 0xDD);
        const __m512 u2 = _mm512_shuffle_f32x4(x[8 + j], x[12 + j], 0x88);
        const __m512 u3 = _mm512_shuffle_f32x4(x[8 + j], x[12 + j], 0xDD);
        const __m512 col[4] = {
            _mm512_shuffle_f32x4(u0, u2, 0x88), _mm512_shuffle_f32x4(u1, u3, 0x88),
            _mm512_shuffle_f32x4(u0, u2, 0xDD), _mm512_shuffle_f32x4(u1, u3, 0xDD)};
        for (int L = 0; L < 4; ++L) {  // column 4L + j of the tile
          const int64_t i = 4 * L + j;
          if (i < cols) _mm512_mask_storeu_ps(c + (i0 + i) * ldc + r0, mask, col[L]);
        }
      }
    }
  }
}
#endif

}  // namespace

void bf16_weight_product_swapped(int64_t m, const at::BFloat16* a, int64_t lda,
                                 const at::BFloat16* w, int64_t J, int64_t K, float* c,
                                 int64_t ldc) {
  constexpr int64_t S = PackedB16::kStrip;  // positions per strip of a^T
  static_assert(S == kBlock, "a task's block is one strip of positions wide");
  if (m <= 0 || J <= 0) return;
  if (K == 0) {  // an empty sum
    for (int64_t i = 0; i < m; ++i) std::fill_n(c + i * ldc, J, 0.0f);
    return;
  }
#if defined(__x86_64__) && defined(__GNUC__)
  static const bool avx512 = __builtin_cpu_supports("avx512f");
  const auto store = avx512 ? store_transposed_avx512 : store_transposed;
#else
  const auto store = store_transposed;
#endif
  // a^T [K, m]: b[k, i] = a[i * lda + k].
  const PackedB16 at = pack_b16(K, m, a, 1, lda);
  const at::BFloat16* sp = at.strips.const_data_ptr<at::BFloat16>();
  const int64_t strips = (m + S - 1) / S, blocks = (J + kBlock - 1) / kBlock;
  at::parallel_for(0, blocks * strips, 1, [&](int64_t t0, int64_t t1) {
    const Bf16GemmScope scope(true);
    // c^T's [rows of w, positions]; zeroed once, so a tile past a short
    // block's rows or positions reads values, not garbage.
    alignas(64) float block[kBlock * kBlock] = {};
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t r0 = (t / strips) * kBlock, i0 = (t % strips) * S;
      const int64_t rows = std::min(kBlock, J - r0), n = std::min(S, m - i0);
      strip_product(at.unit, rows, n, K, K, kBlock, false, w + r0 * K, sp + (t % strips) * K * S,
                    block);
      store(block, rows, n, c + i0 * ldc + r0, ldc);
    }
  });
}

void bf16_weight_product(int64_t m, const at::BFloat16* a, int64_t lda, const at::BFloat16* w,
                         int64_t J, int64_t K, float* c, int64_t ldc) {
  const int64_t dots = bf16_unit() == Bf16Unit::kAmx ? kDotRows : kDotRowsAvx512;
  if (m <= dots) return bf16_dot_rows(m, a, lda, w, J, K, c, ldc);
  bf16_weight_product_swapped(m, a, lda, w, J, K, c, ldc);
}

void bf16_gemm_release() {
  if (amx_available()) cpublas::brgemm_release(true);
}

void bf16_gemm_parallel(int64_t m, const at::BFloat16* a, int64_t lda, const PackedB16& b, float* c,
                        int64_t ldc, const float* bias, bool accumulate) {
  TORCH_INTERNAL_ASSERT(!(accumulate && bias != nullptr), "bf16_gemm_parallel: bias or accumulate");
  constexpr int64_t S = PackedB16::kStrip;
  // Row blocks of 256 (one A block stays in L2 while the strips stream past
  // it); a task is one block times one strip.
  constexpr int64_t kRows = 256;
  if (m <= 0 || b.N <= 0) return;
  const int64_t strips = (b.N + S - 1) / S, blocks = (m + kRows - 1) / kRows;
  const at::BFloat16* sp = b.strips.const_data_ptr<at::BFloat16>();
  const int64_t strip_size = b.strips.size(1) * S;
  at::parallel_for(0, blocks * strips, 1, [&](int64_t t0, int64_t t1) {
    const Bf16GemmScope scope(true);
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t r0 = (t / strips) * kRows, j0 = (t % strips) * S;
      const int64_t mb = std::min(kRows, m - r0), nj = std::min(S, b.N - j0);
      float* cb = c + r0 * ldc + j0;
      for (int64_t i = 0; i < mb && !accumulate && (bias != nullptr || b.K == 0); ++i) {
        if (bias != nullptr) {
          std::copy_n(bias + j0, nj, cb + i * ldc);
        } else {
          std::fill_n(cb + i * ldc, nj, 0.0f);
        }
      }
      if (b.K > 0) {
        strip_product(b.unit, mb, nj, b.K, lda, ldc, accumulate || bias != nullptr, a + r0 * lda,
                      sp + (t % strips) * strip_size, cb);
      }
    }
  });
}

void bf16_gemm_sum_rounded(int64_t m, c10::ArrayRef<Bf16Term> terms, at::BFloat16* y, int64_t ldy) {
  constexpr int64_t S = PackedB16::kStrip, kRows = 256;
  if (m <= 0 || terms.empty() || terms[0].b->N <= 0) return;
  const int64_t N = terms[0].b->N;
  for (const Bf16Term& t : terms) TORCH_INTERNAL_ASSERT(t.b->N == N);
  const int64_t strips = (N + S - 1) / S, blocks = (m + kRows - 1) / kRows;
  at::parallel_for(0, blocks * strips, 1, [&](int64_t t0, int64_t t1) {
    const Bf16GemmScope scope(true);
    std::vector<float> tile(kRows * S);  // [mb, nj] of the task, row stride S
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t r0 = (t / strips) * kRows, j = t % strips, j0 = j * S;
      const int64_t mb = std::min(kRows, m - r0), nj = std::min(S, N - j0);
      bool written = false;
      for (const Bf16Term& term : terms) {
        const PackedB16& b = *term.b;
        if (b.K == 0) continue;  // an empty sum
        const at::BFloat16* strip =
            b.strips.const_data_ptr<at::BFloat16>() + j * b.strips.size(1) * S;
        strip_product(b.unit, mb, nj, b.K, term.lda, S, written, term.a + r0 * term.lda, strip,
                      tile.data());
        written = true;
      }
      if (!written) std::fill(tile.begin(), tile.end(), 0.0f);
      for (int64_t i = 0; i < mb; ++i) round_bf16(tile.data() + i * S, nj, y + (r0 + i) * ldy + j0);
    }
  });
}

at::Tensor round_rows_bf16(float* x, int64_t rows, int64_t cols, int64_t ld) {
  // Chunks of kChunk values go through local buffers with memcpy (no float
  // and bfloat16 pointers into the same bytes). Chunk j's result lands in
  // bytes that held chunks j / 2 and before: already read.
  constexpr int64_t kChunk = 256;
  at::parallel_for(0, rows, std::max<int64_t>(1, 16384 / std::max<int64_t>(cols, 1)),
                   [&](int64_t r0, int64_t r1) {
                     float in[kChunk];
                     at::BFloat16 out[kChunk];
                     for (int64_t r = r0; r < r1; ++r) {
                       char* row = reinterpret_cast<char*>(x + r * ld);
                       for (int64_t j0 = 0; j0 < cols; j0 += kChunk) {
                         const int64_t nj = std::min(kChunk, cols - j0);
                         std::memcpy(in, row + j0 * sizeof(float), nj * sizeof(float));
                         round_bf16(in, nj, out);
                         std::memcpy(row + j0 * sizeof(at::BFloat16), out,
                                     nj * sizeof(at::BFloat16));
                       }
                     }
                   });
  return at::from_blob(x, {rows, cols}, {2 * ld, 1}, at::TensorOptions().dtype(at::kBFloat16));
}

namespace {

// The test entry (ops.cpp's _bf16_gemm): a [m, K] bfloat16 times b [K, N]
// float32 (rounded to bfloat16 by the packing) or bfloat16, any strides, plus c [m, N] float32 when
// given (one thread) or plus bias [N] on every row (all threads), computed
// inside a NaN-filled [m + 1, N + 5] buffer, so a write past [m, N] shows.
at::Tensor bf16_gemm_op(const at::Tensor& a, const at::Tensor& b,
                        const std::optional<at::Tensor>& c, const std::optional<at::Tensor>& bias,
                        bool parallel) {
  TORCH_CHECK(bf16_unit() != Bf16Unit::kFloat,
              "_bf16_gemm: no bfloat16 unit (neither AMX nor AVX512-BF16, or "
              "VARLEN_RNN_CPU_BF16=float)");
  TORCH_CHECK(a.dim() == 2 && a.scalar_type() == at::kBFloat16,
              "_bf16_gemm: a must be a 2-D bfloat16 tensor [m, K], got ", a.sizes(), " ",
              a.scalar_type());
  TORCH_CHECK((b.dim() == 2 || b.dim() == 3) &&
                  (b.scalar_type() == at::kFloat || b.scalar_type() == at::kBFloat16) &&
                  b.size(-2) == a.size(1),
              "_bf16_gemm: b must be a float32 or bfloat16 [K, N] or [groups, K, n] with K = "
              "a.size(1) = ",
              a.size(1), ", got ", b.sizes(), " ", b.scalar_type());
  TORCH_CHECK(a.size(1) % 2 == 0, "_bf16_gemm: K must be even, got ", a.size(1));
  TORCH_CHECK(!(c && parallel), "_bf16_gemm: c is for the one-thread product, bias for parallel");
  TORCH_CHECK(!(bias && !parallel), "_bf16_gemm: bias is for the parallel product");
  const int64_t m = a.size(0), K = a.size(1), N = b.dim() == 2 ? b.size(1) : b.size(0) * b.size(2);
  at::Tensor out = at::full({m + 1, N + 5}, std::numeric_limits<float>::quiet_NaN(),
                            a.options().dtype(at::kFloat));
  if (c) {
    TORCH_CHECK(c->sizes() == at::IntArrayRef({m, N}) && c->scalar_type() == at::kFloat,
                "_bf16_gemm: c must be float32 [m, N] = [", m, ", ", N, "], got ", c->sizes());
    out.narrow(0, 0, m).narrow(1, 0, N).copy_(*c);
  }
  at::Tensor bias_c;
  if (bias) {
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == N && bias->scalar_type() == at::kFloat,
                "_bf16_gemm: bias must be float32 [N] = [", N, "], got ", bias->sizes());
    bias_c = bias->contiguous();
  }
  const at::Tensor ac = a.stride(1) == 1 && a.stride(0) >= K ? a : a.contiguous();
  const int64_t lda = std::max<int64_t>(ac.stride(0), 1), ldc = N + 5;
  const PackedB16 packed = b.scalar_type() == at::kFloat
                               ? pack_b16(K, N, b.const_data_ptr<float>(), layout_of(b))
                               : pack_b16(K, N, b.const_data_ptr<at::BFloat16>(), layout_of(b));
  const at::BFloat16* a_p = ac.const_data_ptr<at::BFloat16>();
  float* c_p = out.data_ptr<float>();
  if (parallel) {
    bf16_gemm_parallel(m, a_p, lda, packed, c_p, ldc,
                       bias_c.defined() ? bias_c.const_data_ptr<float>() : nullptr);
  } else {
    const Bf16GemmScope scope(true);
    bf16_gemm(m, a_p, lda, packed, c_p, ldc, c.has_value());
  }
  return out;
}

// The test entry (ops.cpp's _bf16_weight_product): a [m, K] bfloat16 times
// w [J, K] bfloat16 transposed, by method (0: bf16_weight_product's choice,
// 1: the dot products, 2: the swapped product on bf16_unit()), computed inside a NaN-filled
// [m + 1, J + 5] buffer, so a write past [m, J] shows.
at::Tensor bf16_weight_product_op(const at::Tensor& a, const at::Tensor& w, int64_t method) {
  TORCH_CHECK(bf16_unit() != Bf16Unit::kFloat,
              "_bf16_weight_product: no bfloat16 unit (neither AMX nor AVX512-BF16, or "
              "VARLEN_RNN_CPU_BF16=float)");
  TORCH_CHECK(a.dim() == 2 && a.scalar_type() == at::kBFloat16,
              "_bf16_weight_product: a must be a 2-D bfloat16 tensor [m, K], got ", a.sizes(), " ",
              a.scalar_type());
  TORCH_CHECK(w.dim() == 2 && w.scalar_type() == at::kBFloat16 && w.size(1) == a.size(1),
              "_bf16_weight_product: w must be a bfloat16 [J, K] with K = a.size(1) = ", a.size(1),
              ", got ", w.sizes(), " ", w.scalar_type());
  TORCH_CHECK(a.size(1) % 2 == 0, "_bf16_weight_product: K must be even, got ", a.size(1));
  TORCH_CHECK(method >= 0 && method <= 2,
              "_bf16_weight_product: method must be 0 (auto), 1 (dots) or 2 (swapped), got ",
              method);
  const int64_t m = a.size(0), K = a.size(1), J = w.size(0), ldc = J + 5;
  at::Tensor out = at::full({m + 1, ldc}, std::numeric_limits<float>::quiet_NaN(),
                            a.options().dtype(at::kFloat));
  const at::Tensor ac = a.stride(1) == 1 && a.stride(0) >= K ? a : a.contiguous();
  const at::Tensor wc = w.contiguous();
  const int64_t lda = std::max<int64_t>(ac.stride(0), 1);
  const at::BFloat16* a_p = ac.const_data_ptr<at::BFloat16>();
  const at::BFloat16* w_p = wc.const_data_ptr<at::BFloat16>();
  float* c_p = out.data_ptr<float>();
  if (method == 0) bf16_weight_product(m, a_p, lda, w_p, J, K, c_p, ldc);
  if (method == 1) bf16_dot_rows(m, a_p, lda, w_p, J, K, c_p, ldc);
  if (method == 2) bf16_weight_product_swapped(m, a_p, lda, w_p, J, K, c_p, ldc);
  return out;
}

// The test entry (ops.cpp's _bf16_gemm_sum_rounded): the sum of a[i] [m, K_i]
// bfloat16 (rows may stride past K_i) times b[i] [K_i, N] bfloat16, rounded
// once (bf16_gemm_sum_rounded), inside a NaN-filled [m + 1, N + 5] bfloat16
// buffer, so a write past [m, N] shows.
at::Tensor bf16_gemm_sum_rounded_op(at::TensorList a, at::TensorList b) {
  TORCH_CHECK(bf16_unit() != Bf16Unit::kFloat,
              "_bf16_gemm_sum_rounded: no bfloat16 unit (neither AMX nor AVX512-BF16, or "
              "VARLEN_RNN_CPU_BF16=float)");
  TORCH_CHECK(!a.empty() && a.size() == b.size(),
              "_bf16_gemm_sum_rounded: a and b must be as many tensors, at least one, got ",
              a.size(), " and ", b.size());
  const int64_t m = a[0].size(0), N = b[0].size(1);
  std::vector<at::Tensor> kept;
  std::vector<PackedB16> packed;
  for (size_t i = 0; i < a.size(); ++i) {
    TORCH_CHECK(a[i].dim() == 2 && a[i].scalar_type() == at::kBFloat16 && a[i].size(0) == m &&
                    a[i].stride(1) == 1 && a[i].stride(0) >= a[i].size(1),
                "_bf16_gemm_sum_rounded: a[", i, "] must be a bfloat16 [m, K] with m = ", m,
                " and rows in place, got ", a[i].sizes(), " ", a[i].strides());
    TORCH_CHECK(b[i].dim() == 2 && b[i].scalar_type() == at::kBFloat16 &&
                    b[i].size(0) == a[i].size(1) && b[i].size(1) == N && b[i].size(0) % 2 == 0,
                "_bf16_gemm_sum_rounded: b[", i,
                "] must be a bfloat16 [K, N] with K = ", a[i].size(1), " (even) and N = ", N,
                ", got ", b[i].sizes());
    kept.push_back(a[i]);
    packed.push_back(
        pack_b16(b[i].size(0), N, b[i].const_data_ptr<at::BFloat16>(), layout_of(b[i])));
  }
  std::vector<Bf16Term> terms;
  for (size_t i = 0; i < a.size(); ++i) {
    terms.push_back({kept[i].const_data_ptr<at::BFloat16>(),
                     std::max<int64_t>(kept[i].stride(0), 1), &packed[i]});
  }
  at::Tensor out = at::full({m + 1, N + 5}, std::numeric_limits<float>::quiet_NaN(),
                            a[0].options().dtype(at::kBFloat16));
  bf16_gemm_sum_rounded(m, terms, out.data_ptr<at::BFloat16>(), N + 5);
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(varlen_rnn, CPU, m) {
  m.impl("_bf16_gemm", &bf16_gemm_op);
  m.impl("_bf16_gemm_sum_rounded", &bf16_gemm_sum_rounded_op);
  m.impl("_bf16_weight_product", &bf16_weight_product_op);
}

}  // namespace cpu
}  // namespace varlen_rnn
