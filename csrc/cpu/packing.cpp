// Packing a product's b into the CPU micro-kernels' strips (cpu/packing.h).

#include "cpu/packing.h"

#include "cpu/dot_rows.h"  // VR_DOT_TARGET, <immintrin.h> on x86

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <vector>

namespace varlen_rnn {
namespace cpu {
namespace {

#if defined(__GNUC__) && defined(__x86_64__)
#define VR_PACK_X86 1
// dst[k * ldd + j] = src[j * lds + k] for j, k < 8: an 8 x 8 block of a
// weight's transpose, in registers (pack_strips' columns read along k).
__attribute__((target("avx"))) void transpose8(const float* src, int64_t lds, float* dst,
                                               int64_t ldd) {
  __m256 r[8], t[8], u[8];
  for (int i = 0; i < 8; ++i) r[i] = _mm256_loadu_ps(src + i * lds);  // row j = i, k = 0..7
  for (int i = 0; i < 8; i += 2) {  // [r_i[0], r_i+1[0], r_i[1], r_i+1[1] | same at 4, 5]
    t[i] = _mm256_unpacklo_ps(r[i], r[i + 1]);
    t[i + 1] = _mm256_unpackhi_ps(r[i], r[i + 1]);  // ... at 2, 3 | 6, 7
  }
  for (int i = 0; i < 8; i += 4) {  // u[i + q]: k = q | q + 4 of rows i .. i + 3
    u[i] = _mm256_shuffle_ps(t[i], t[i + 2], _MM_SHUFFLE(1, 0, 1, 0));
    u[i + 1] = _mm256_shuffle_ps(t[i], t[i + 2], _MM_SHUFFLE(3, 2, 3, 2));
    u[i + 2] = _mm256_shuffle_ps(t[i + 1], t[i + 3], _MM_SHUFFLE(1, 0, 1, 0));
    u[i + 3] = _mm256_shuffle_ps(t[i + 1], t[i + 3], _MM_SHUFFLE(3, 2, 3, 2));
  }
  for (int q = 0; q < 4; ++q) {
    _mm256_storeu_ps(dst + q * ldd, _mm256_permute2f128_ps(u[q], u[q + 4], 0x20));
    _mm256_storeu_ps(dst + (q + 4) * ldd, _mm256_permute2f128_ps(u[q], u[q + 4], 0x31));
  }
}

// One strip's pair of rows of a row-major bfloat16 b, interleaved: out[2 jj
// + e] = (e ? r1 : r0)[jj] for jj < nj, 0 for nj <= jj < S (every value of
// the pair's S x 2 written).
VR_DOT_TARGET void interleave_pair(const at::BFloat16* r0, const at::BFloat16* r1, int64_t nj,
                                   int64_t S, at::BFloat16* out) {
  // Lane 2i takes r0[i] (word i of the first operand), lane 2i + 1 r1[i]
  // (word i of the second: index 32 + i); the upper halves are never read.
  alignas(64) static const uint16_t kOrder[32] = {0,  32, 1,  33, 2,  34, 3,  35, 4,  36, 5,
                                                  37, 6,  38, 7,  39, 8,  40, 9,  41, 10, 42,
                                                  11, 43, 12, 44, 13, 45, 14, 46, 15, 47};
  const __m512i order = _mm512_load_si512(kOrder);
  for (int64_t jj = 0; jj < S; jj += 16) {
    const auto m = static_cast<__mmask16>((1u << std::clamp<int64_t>(nj - jj, 0, 16)) - 1);
    const __m512i a = _mm512_castsi256_si512(_mm256_maskz_loadu_epi16(m, r0 + jj));
    const __m512i b = _mm512_castsi256_si512(_mm256_maskz_loadu_epi16(m, r1 + jj));
    _mm512_storeu_si512(out + 2 * jj, _mm512_permutex2var_epi16(a, order, b));
  }
}

// The same pair of a weight's transpose, b[k, j] = w[j, k] (k's pairs side
// by side in each row of w): out[2 jj + e] = p[offs[jj] + 2q + e] for jj < nj,
// 0 past nj, 16 rows' pairs per gather. p: where the strip's first row
// starts; offs: each of its rows' offset from p (S of them, those past nj
// unread).
VR_DOT_TARGET void gather_pairs(const at::BFloat16* p, const int32_t* offs, int64_t nj, int64_t S,
                                at::BFloat16* out) {
  for (int64_t jj = 0; jj < S; jj += 16) {
    const auto m = static_cast<__mmask16>((1u << std::clamp<int64_t>(nj - jj, 0, 16)) - 1);
    const __m512i rows = _mm512_maskz_loadu_epi32(m, offs + jj);
    const __m512i v = _mm512_mask_i32gather_epi32(_mm512_setzero_si512(), m, rows, p, 2);
    _mm512_storeu_si512(out + 2 * jj, v);
  }
}
#else
#define VR_PACK_X86 0
#endif

}  // namespace

at::Tensor pack_strips(int64_t K, int64_t N, int64_t nr, const float* b, const BLayout& layout,
                       [[maybe_unused]] bool avx) {
  const int64_t strips = (N + nr - 1) / nr, stride_k = layout.stride_k;
  // Every value is written below (the last strip's columns past N as zeros),
  // so the strips are not zeroed first: one pass over them, not two.
  at::Tensor packed = at::empty({strips, K, nr}, at::kFloat);
  float* out = packed.data_ptr<float>();
  // The inner loop walks b's smaller stride (a transposed weight is read
  // along its rows).
  const bool k_inner = std::abs(stride_k) < std::abs(layout.stride_n);
  std::vector<int64_t> col(nr);
  for (int64_t s = 0; s < strips; ++s) {
    const int64_t cols = std::min(nr, N - s * nr);
    for (int64_t j = 0; j < cols; ++j) col[j] = layout.col(s * nr + j);
    float* dst = out + s * K * nr;
    if (k_inner) {
      // Blocks of 8 values of k (the block's rows of the strip stay in L1),
      // by 8 x 8 transposes in registers where 8 columns lie evenly and their
      // values of k are adjacent (a weight's rows, each read along k),
      // element by element elsewhere. One thread, [3072, 1024] on the Xeon:
      // 10.4-11.4 ms column by column over all of K, 3.8-4.2 ms so.
      for (int64_t k0 = 0; k0 < K; k0 += 8) {
        const int64_t k1 = std::min(K, k0 + 8);
        for (int64_t jb = 0; jb < cols; jb += 8) {
          const int64_t je = std::min(cols, jb + 8);
#if VR_PACK_X86
          if (avx && stride_k == 1 && k1 - k0 == 8 && je - jb == 8 &&
              col[jb + 7] - col[jb] == 7 * layout.stride_n) {
            transpose8(b + col[jb] + k0, layout.stride_n, dst + k0 * nr + jb, nr);
            continue;
          }
#endif
          for (int64_t j = jb; j < je; ++j) {
            const float* src = b + col[j];
            for (int64_t k = k0; k < k1; ++k) dst[k * nr + j] = src[k * stride_k];
          }
        }
      }
    } else if (layout.stride_n == 1 && col[cols - 1] - col[0] == cols - 1) {
      for (int64_t k = 0; k < K; ++k) {  // the strip's columns side by side in b
        std::memcpy(dst + k * nr, b + k * stride_k + col[0], cols * sizeof(float));
      }
    } else {
      for (int64_t k = 0; k < K; ++k) {
        const float* src = b + k * stride_k;
        for (int64_t j = 0; j < cols; ++j) dst[k * nr + j] = src[col[j]];
      }
    }
    for (int64_t k = 0; k < (cols < nr ? K : 0); ++k)
      std::fill(dst + k * nr + cols, dst + (k + 1) * nr, 0.0f);
  }
  return packed;
}

at::Tensor pack_pairs([[maybe_unused]] int64_t K, [[maybe_unused]] int64_t N,
                      [[maybe_unused]] int64_t S, [[maybe_unused]] const at::BFloat16* b,
                      [[maybe_unused]] const BLayout& layout) {
#if VR_PACK_X86
  const int64_t stride_k = layout.stride_k, strips = (N + S - 1) / S, pairs = K / 2;
  // Rows of b (the backward's W_hh as stored) interleaved in pairs by vector
  // permutes; a weight's transpose (the forward's panels, gate slices too)
  // by gathers of each column's pairs, 16 columns at a time (offsets in
  // int32).
  const bool rows = layout.stride_n == 1 && layout.even(N),
             transposed = stride_k == 1 && N > 0 && layout.col(N - 1) < (int64_t{1} << 31);
  if (!rows && !transposed) return at::Tensor();
  at::Tensor packed = at::empty({strips, K, S}, at::TensorOptions().dtype(at::kBFloat16));
  at::BFloat16* out = packed.data_ptr<at::BFloat16>();
  // Each strip's rows' offsets from its first (the transposed case).
  std::vector<int32_t> offs(rows ? 0 : strips * S, 0);
  for (int64_t j = 0; j < (rows ? 0 : N); ++j) {
    offs[j] = static_cast<int32_t>(layout.col(j) - layout.col(j / S * S));
  }
  at::parallel_for(0, strips * pairs, 64, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t j = t / pairs, q = t % pairs, j0 = j * S, nj = std::min(S, N - j0);
      at::BFloat16* o = out + (j * pairs + q) * 2 * S;
      if (rows) {
        const at::BFloat16* r0 = b + 2 * q * stride_k + j0;
        interleave_pair(r0, r0 + stride_k, nj, S, o);
      } else {
        gather_pairs(b + layout.col(j0) + 2 * q, offs.data() + j0, nj, S, o);
      }
    }
  });
  return packed;
#else
  return at::Tensor();
#endif
}

}  // namespace cpu
}  // namespace varlen_rnn
