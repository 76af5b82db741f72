// Rows of a against the rows of a weight as stored, on all threads:
// c[i, j] = sum_k a[i, k] w[j, k] for i < m, j < J; a [m, K] (lda), w [J, K]
// row-major (a torch weight, read in place: no packing, no transposed copy),
// c float32 (ldc). The products of a call of few steps, where packing the
// weight for a GEMM costs more than the steps' products (cpu/recurrence.h):
// - bfloat16 a and w: AVX512-BF16's dot products of pairs (vdpbf16ps), K
//   even (bf16_dot_rows, cpu/bf16_gemm.h);
// - float32: AVX-512 FMAs (f32_dot_rows, cpu/small_gemm.h), or AVX2 FMAs
//   on a CPU without AVX-512 (dot_rows8_avx2: the same loop on 8 lanes).
// Written once for both (DotTraits): eight rows of w against three rows of a
// at a time, each pair with its own sum over k, each row's k values loaded
// once for the other side's rows; a task is a group of 8 rows of w, whose
// rows stay in L1 while a's rows pass them. Every c[i, j] is one sum in a
// fixed order (lanes of k, then the lanes' reduction), whatever m, the rows
// beside it or the thread: deterministic.
//
// Below it, the other form, written once for both too: rows of a times an
// operand whose rows are k (row_tiles), register tiles of rows x 64 columns.
// The AVX512-BF16 unit's strips (cpu/bf16_gemm.cpp strip_avx512), the
// backward's dG W_hh on W_hh as stored (cpu/small_gemm.cpp f32_rows_times)
// and the weight gradients of few positions (cpu/weight_grad.cpp) run on it;
// dG W_hh on AVX2 too (row_tiles_avx2: the same tiles on 8 lanes).
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#endif

#include <algorithm>
#include <array>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <utility>

namespace varlen_rnn {
namespace cpu {

#if defined(__x86_64__) && defined(__GNUC__)
#define VR_DOT_TARGET __attribute__((target("avx512f,avx512bw,avx512dq,avx512vl,avx512bf16")))

// What differs between the element types: values of k per vector, the
// masked load of a vector of k and the multiply-add into float32 lanes.
template <typename T>
struct DotTraits;

// kPair: values of k one float32 lane multiplies (a pair for vdpbf16ps);
// lanes: the masked load of 16 lanes' worth (16 columns of a row-tile's
// operand); bcast: a's kPair values at p in every lane.
template <>
struct DotTraits<at::BFloat16> {
  static constexpr int64_t kStep = 32, kPair = 2;
  using Mask = __mmask32;
  // Integer vectors, the bfloat16 type only at vdpbf16ps: clang (16) cannot
  // hold a bfloat16 vector in an asm register operand (dot_rows8_tile's).
  using Vec = __m512i;
  VR_DOT_TARGET static Vec load(Mask m, const at::BFloat16* p) {
    return _mm512_maskz_loadu_epi16(m, p);
  }
  VR_DOT_TARGET static Vec lanes(__mmask16 m, const at::BFloat16* p) {
    return _mm512_maskz_loadu_epi32(m, p);
  }
  VR_DOT_TARGET static Vec bcast(const at::BFloat16* p) {
    int32_t pair;
    std::memcpy(&pair, p, sizeof pair);
    __m512i v = _mm512_set1_epi32(pair);
#if defined(__clang__)
    // Hidden from clang's optimizer, whose vector combining (clang 16) recursed
    // until its stack overflowed on this broadcast feeding vdpbf16ps. GCC folds
    // it into the multiply-add as a {1to16} memory operand.
    asm("" : "+v"(v));
#endif
    return v;
  }
  VR_DOT_TARGET static __m512 madd(__m512 acc, Vec a, Vec w) {
    return _mm512_dpbf16_ps(acc, reinterpret_cast<__m512bh>(a), reinterpret_cast<__m512bh>(w));
  }
};

template <>
struct DotTraits<float> {
  static constexpr int64_t kStep = 16, kPair = 1;
  using Mask = __mmask16;
  using Vec = __m512;
  VR_DOT_TARGET static Vec load(Mask m, const float* p) { return _mm512_maskz_loadu_ps(m, p); }
  VR_DOT_TARGET static Vec lanes(__mmask16 m, const float* p) {
    return _mm512_maskz_loadu_ps(m, p);
  }
  VR_DOT_TARGET static Vec bcast(const float* p) { return _mm512_set1_ps(*p); }
  VR_DOT_TARGET static __m512 madd(__m512 acc, Vec a, Vec w) { return _mm512_fmadd_ps(a, w, acc); }
};

// The 8 lane sums of acc[0..8) (an 8-row group's sums for one row of a):
// sums[q] = acc[q]'s 16 lanes summed, the same tree for every row and group.
// Pairs of vectors halve their lanes together (quarters of 4 lanes moved by
// one shuffle each): 8 vectors of 16 -> 4 of 2 x 8 -> 2 of 4 x 4 -> 1 of
// 8 x 2 -> the sums, 16 shuffles and 8 adds (a vector's halves added first,
// then hadd rounds, took 22 shuffles and 15 adds).
struct Sums8 {
  __m512 v[8];
};
VR_DOT_TARGET inline __attribute__((always_inline)) __m256 lane_sums8(Sums8 a) {
  const __m512* acc = a.v;
  __m512 s[4];  // s[p]: acc[2p]'s 8 partial sums in the low half, acc[2p+1]'s in the high
  for (int p = 0; p < 4; ++p) {
    s[p] = _mm512_add_ps(_mm512_shuffle_f32x4(acc[2 * p], acc[2 * p + 1], 0x44),
                         _mm512_shuffle_f32x4(acc[2 * p], acc[2 * p + 1], 0xEE));
  }
  // t[u]: quarter j holds acc[4u + j]'s 4 partial sums
  __m512 t[2];
  for (int u = 0; u < 2; ++u) {
    t[u] = _mm512_add_ps(_mm512_shuffle_f32x4(s[2 * u], s[2 * u + 1], 0x88),
                         _mm512_shuffle_f32x4(s[2 * u], s[2 * u + 1], 0xDD));
  }
  // x: quarter j holds acc[j]'s 2 partial sums, then acc[j + 4]'s
  const __m512d t0 = _mm512_castps_pd(t[0]), t1 = _mm512_castps_pd(t[1]);
  const __m512 x = _mm512_add_ps(_mm512_castpd_ps(_mm512_unpacklo_pd(t0, t1)),
                                 _mm512_castpd_ps(_mm512_unpackhi_pd(t0, t1)));
  // y: lane 4j acc[j]'s sum, lane 4j + 2 acc[j + 4]'s
  const __m512 y = _mm512_add_ps(x, _mm512_permute_ps(x, 0xB1));
  const __m512i order = _mm512_setr_epi32(0, 4, 8, 12, 2, 6, 10, 14, 0, 0, 0, 0, 0, 0, 0, 0);
  return _mm512_castps512_ps256(_mm512_permutexvar_ps(order, y));
}

// c[i + r, j0 + q] for kA rows of a from row i and q < rows (<= 8) of w from
// w8 (row j0): an independent sum per pair of rows (one chain would wait on
// each multiply-add's latency), each row of w's kStep values of k loaded
// once for the kA rows of a (three rows of a: 11 loads for 24 multiply-adds,
// where one row took 9 for 8 and the loads bound it), the tail of K masked;
// then each row's lane sums reduced (lane_sums8) and stored at once. kFull:
// rows is 8, known at compile time (the loop over w's rows unrolled, its sums
// in registers). A row's sums do not depend on kA: the same bits alone or
// beside another row.
template <typename T, bool kFull, int kA>
VR_DOT_TARGET inline __attribute__((always_inline)) void dot_rows8_tile(int64_t i, const T* a,
                                                                        int64_t lda, const T* w8,
                                                                        int rows_given, int64_t K,
                                                                        float* c8, int64_t ldc) {
  using D = DotTraits<T>;
  using Mask = typename D::Mask;
  const int rows = kFull ? 8 : rows_given;
  const int64_t full = K / D::kStep * D::kStep;
  const Mask tail = static_cast<Mask>((uint64_t{1} << (K - full)) - 1);
  Sums8 acc[kA];
#pragma GCC unroll 3
  for (int r = 0; r < kA; ++r) {
#pragma GCC unroll 8
    for (int q = 0; q < 8; ++q) acc[r].v[q] = _mm512_setzero_ps();
  }
  for (int64_t k = 0; k < K; k += D::kStep) {
    const Mask mask = k < full ? static_cast<Mask>(~Mask{0}) : tail;
    typename D::Vec av[kA];
#pragma GCC unroll 3
    for (int r = 0; r < kA; ++r) av[r] = D::load(mask, a + (i + r) * lda + k);
#pragma GCC unroll 8
    for (int q = 0; q < rows; ++q) {
      typename D::Vec wv = D::load(mask, w8 + q * K + k);
      // In a register for the kA rows: folded into each multiply-add as a
      // memory operand (what the compiler does unasked) it is loaded kA times.
      if constexpr (kA > 1) asm("" : "+v"(wv));
#pragma GCC unroll 3
      for (int r = 0; r < kA; ++r) acc[r].v[q] = D::madd(acc[r].v[q], av[r], wv);
    }
  }
#pragma GCC unroll 3
  for (int r = 0; r < kA; ++r) {
    _mm256_mask_storeu_ps(c8 + (i + r) * ldc, static_cast<__mmask8>((1u << rows) - 1),
                          lane_sums8(acc[r]));
  }
}

// Rows i0..i1 of a against the 8-row group w8: three rows at a time, then
// the last two or one.
template <typename T, bool kFull>
VR_DOT_TARGET void dot_rows8(int64_t i0, int64_t i1, const T* a, int64_t lda, const T* w8,
                             int rows_given, int64_t K, float* c8, int64_t ldc) {
  int64_t i = i0;
  for (; i + 3 <= i1; i += 3) dot_rows8_tile<T, kFull, 3>(i, a, lda, w8, rows_given, K, c8, ldc);
  if (i + 2 <= i1) {
    dot_rows8_tile<T, kFull, 2>(i, a, lda, w8, rows_given, K, c8, ldc);
  } else if (i < i1) {
    dot_rows8_tile<T, kFull, 1>(i, a, lda, w8, rows_given, K, c8, ldc);
  }
}

// AVX2 has no mask registers: the mask of the first n of 8 lanes (0..8) is an
// integer vector, n ones (-1) then zeros, read from kAvx2Lanes + 8 - n.
alignas(32) inline constexpr int32_t kAvx2Lanes[16] = {-1, -1, -1, -1, -1, -1, -1, -1,
                                                       0,  0,  0,  0,  0,  0,  0,  0};
__attribute__((target("avx2"))) inline __m256i avx2_lanes(int64_t n) {
  return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(kAvx2Lanes + 8 - n));
}

// dot_rows8 on AVX2 (float32 only: AVX2 has no bfloat16 products): the same
// sums on 8 lanes, the tail of K loaded through an integer mask vector (no
// mask registers), and the same pairwise reduction from the 8 lanes on.
template <bool kFull>
__attribute__((target("avx2,fma"))) void dot_rows8_avx2(int64_t i0, int64_t i1, const float* a,
                                                        int64_t lda, const float* w8,
                                                        int rows_given, int64_t K, float* c8,
                                                        int64_t ldc) {
  const int rows = kFull ? 8 : rows_given;
  const int64_t full = K / 8 * 8;
  const __m256i all = _mm256_set1_epi32(-1);
  const __m256i tail = avx2_lanes(K - full);
  const __m256i store = avx2_lanes(rows);
  for (int64_t i = i0; i < i1; ++i) {
    const float* ai = a + i * lda;
    __m256 acc[8];
    for (int q = 0; q < 8; ++q) acc[q] = _mm256_setzero_ps();
    for (int64_t k = 0; k < K; k += 8) {
      const __m256i mask = k < full ? all : tail;
      const __m256 av = _mm256_maskload_ps(ai + k, mask);
      for (int q = 0; q < rows; ++q) {
        acc[q] = _mm256_fmadd_ps(av, _mm256_maskload_ps(w8 + q * K + k, mask), acc[q]);
      }
    }
    const __m256 t0 =
        _mm256_hadd_ps(_mm256_hadd_ps(acc[0], acc[1]), _mm256_hadd_ps(acc[2], acc[3]));
    const __m256 t1 =
        _mm256_hadd_ps(_mm256_hadd_ps(acc[4], acc[5]), _mm256_hadd_ps(acc[6], acc[7]));
    const __m256 sums =
        _mm256_add_ps(_mm256_permute2f128_ps(t0, t1, 0x20), _mm256_permute2f128_ps(t0, t1, 0x31));
    if (kFull) {  // (a masked store is slow on AMD's Zen cores)
      _mm256_storeu_ps(c8 + i * ldc, sums);
    } else {
      _mm256_maskstore_ps(c8 + i * ldc, store, sums);
    }
  }
}

// The whole product on all threads, by groups of 8 rows of w through one
// ISA's 8-row function (full: 8 rows, part: fewer). Tasks of 8-row groups of
// w (~64 rows, 32 KiB of bfloat16 at K = 256).
template <typename T>
using DotRows8 = void (*)(int64_t, int64_t, const T*, int64_t, const T*, int, int64_t, float*,
                          int64_t);
template <typename T>
void dot_rows_with(DotRows8<T> full, DotRows8<T> part, int64_t m, const T* a, int64_t lda,
                   const T* w, int64_t J, int64_t K, float* c, int64_t ldc) {
  if (m <= 0 || J <= 0) return;
  const int64_t groups = (J + 7) / 8;
  const int64_t grain = std::max<int64_t>(2, 2048 * 2 / sizeof(T) / std::max<int64_t>(K, 1));
  at::parallel_for(0, groups, grain, [&](int64_t g0, int64_t g1) {
    for (int64_t g = g0; g < g1; ++g) {
      const int64_t j0 = g * 8;
      if (J - j0 >= 8) {
        full(0, m, a, lda, w + j0 * K, 8, K, c + j0, ldc);
      } else {
        part(0, m, a, lda, w + j0 * K, static_cast<int>(J - j0), K, c + j0, ldc);
      }
    }
  });
}

// The AVX-512 product (the caller checks the CPU runs it).
template <typename T>
void dot_rows(int64_t m, const T* a, int64_t lda, const T* w, int64_t J, int64_t K, float* c,
              int64_t ldc) {
  dot_rows_with<T>(&dot_rows8<T, true>, &dot_rows8<T, false>, m, a, lda, w, J, K, c, ldc);
}

// The AVX2 one, float32 (the caller checks the CPU runs it).
inline void dot_rows_avx2(int64_t m, const float* a, int64_t lda, const float* w, int64_t J,
                          int64_t K, float* c, int64_t ldc) {
  dot_rows_with<float>(&dot_rows8_avx2<true>, &dot_rows8_avx2<false>, m, a, lda, w, J, K, c, ldc);
}

// The other form, rows times an operand whose rows are k (a packed strip, or
// a weight [K, N] as stored): c[i, j] (=|+=) sum_k a[i, k] b[k, j] for R
// rows and NU vectors of 16 columns, over `steps` steps of kPair values of
// k. Row i's kPair values of step q are at a + i * as.row + q * as.step
// (as.step = kPair for a row-major a; a weight gradient's a^T reads a's
// columns: cpu/weight_grad.cpp). Step q reads b's 16 * NU lanes at b + q *
// ldb (bfloat16: a strip's pairs [q][kStrip][2]; float32: a weight's row q),
// masked past `cols`, once for the R rows, each row's kPair values
// broadcast. The accumulators start from c (load_c, float32 c only) or 0,
// only c's first `cols` columns are read or written, and each c[i, j] is
// one chain over k in order, stored as float32 or rounded once to bfloat16
// (Out).
struct AStrides {
  int64_t row, step;
};

template <typename T, typename Out, int R, int NU>
VR_DOT_TARGET inline __attribute__((always_inline)) void row_tile(int64_t steps, const T* a,
                                                                  AStrides as, const T* b,
                                                                  int64_t ldb, Out* c, int64_t ldc,
                                                                  int64_t cols, bool load_c) {
  using D = DotTraits<T>;
  constexpr int64_t kLane = 16 * D::kPair;  // values of T per 16 columns
  __mmask16 mask[NU];
#pragma GCC unroll 4
  for (int v = 0; v < NU; ++v) {
    mask[v] = static_cast<__mmask16>((1u << std::clamp<int64_t>(cols - 16 * v, 0, 16)) - 1);
  }
  __m512 acc[R][NU];
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r) {
#pragma GCC unroll 4
    for (int v = 0; v < NU; ++v) {
      if constexpr (std::is_same_v<Out, float>) {
        acc[r][v] =
            load_c ? _mm512_maskz_loadu_ps(mask[v], c + r * ldc + 16 * v) : _mm512_setzero_ps();
      } else {
        acc[r][v] = _mm512_setzero_ps();
      }
    }
  }
  for (int64_t q = 0; q < steps; ++q) {
    typename D::Vec bv[NU];
#pragma GCC unroll 4
    for (int v = 0; v < NU; ++v) bv[v] = D::lanes(mask[v], b + q * ldb + kLane * v);
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) {
      const typename D::Vec av = D::bcast(a + r * as.row + q * as.step);
#pragma GCC unroll 4
      for (int v = 0; v < NU; ++v) acc[r][v] = D::madd(acc[r][v], av, bv[v]);
    }
  }
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r) {
#pragma GCC unroll 4
    for (int v = 0; v < NU; ++v) {
      if constexpr (std::is_same_v<Out, float>) {
        _mm512_mask_storeu_ps(c + r * ldc + 16 * v, mask[v], acc[r][v]);
      } else {  // rounded to nearest even (subnormals flushed)
        const __m256bh h = _mm512_cvtneps_pbh(acc[r][v]);
        _mm256_mask_storeu_epi16(c + r * ldc + 16 * v, mask[v],
                                 reinterpret_cast<const __m256i&>(h));
      }
    }
  }
}

// row_tile for R rows and the vectors `cols` (1..64) needs.
template <typename T, typename Out, int R>
VR_DOT_TARGET inline __attribute__((always_inline)) void row_tile_cols(int64_t steps, const T* a,
                                                                       AStrides as, const T* b,
                                                                       int64_t ldb, Out* c,
                                                                       int64_t ldc, int64_t cols,
                                                                       bool load_c) {
  const int64_t nu = (cols + 15) / 16;
  if (nu == 1) return row_tile<T, Out, R, 1>(steps, a, as, b, ldb, c, ldc, cols, load_c);
  if (nu == 2) return row_tile<T, Out, R, 2>(steps, a, as, b, ldb, c, ldc, cols, load_c);
  if (nu == 3) return row_tile<T, Out, R, 3>(steps, a, as, b, ldb, c, ldc, cols, load_c);
  row_tile<T, Out, R, 4>(steps, a, as, b, ldb, c, ldc, cols, load_c);
}

// row_tile_cols for `rows` (1..sizeof...(Rm1)) rows: Rm1 + 1 == rows picks.
template <typename T, typename Out, int... Rm1>
VR_DOT_TARGET inline __attribute__((always_inline)) void row_tile_of(
    std::integer_sequence<int, Rm1...>, int64_t rows, int64_t steps, const T* a, AStrides as,
    const T* b, int64_t ldb, Out* c, int64_t ldc, int64_t cols, bool load_c) {
  (void)((rows == Rm1 + 1
              ? (row_tile_cols<T, Out, Rm1 + 1>(steps, a, as, b, ldb, c, ldc, cols, load_c), true)
              : false) ||
         ...);
}

// Rows of a register tile at most (row_tiles, row_tiles_avx2).
constexpr int kRowTile = 6;

// All m rows, in near-equal tiles of at most kRowTile rows (24 accumulators,
// 4 vectors of b and a broadcast: 29 of the 32 registers), one thread.
template <typename T, typename Out = float>
VR_DOT_TARGET inline void row_tiles(int64_t m, int64_t steps, const T* a, AStrides as, const T* b,
                                    int64_t ldb, Out* c, int64_t ldc, int64_t cols, bool load_c) {
  constexpr int kMr = kRowTile;
  const int64_t tiles = (m + kMr - 1) / kMr;
  for (int64_t t = 0, i0 = 0; t < tiles; ++t) {
    const int64_t rows = m / tiles + (t < m % tiles ? 1 : 0);
    row_tile_of<T, Out>(std::make_integer_sequence<int, kMr>{}, rows, steps, a + i0 * as.row, as, b,
                        ldb, c + i0 * ldc, ldc, cols, load_c);
    i0 += rows;
  }
}

// The same for a row-major a (row i's values of k at a + i * lda).
template <typename T>
VR_DOT_TARGET inline void row_tiles(int64_t m, int64_t steps, const T* a, int64_t lda, const T* b,
                                    int64_t ldb, float* c, int64_t ldc, int64_t cols, bool load_c) {
  row_tiles<T, float>(m, steps, a, AStrides{lda, DotTraits<T>::kPair}, b, ldb, c, ldc, cols,
                      load_c);
}

// A load of 8 lanes, masked or plain.
template <bool kMasked>
__attribute__((target("avx2"), always_inline)) inline __m256 avx2_load(const float* p,
                                                                       __m256i mask) {
  return kMasked ? _mm256_maskload_ps(p, mask) : _mm256_loadu_ps(p);
}

// row_tile on AVX2, float32 (a CPU without AVX-512; GCC cannot compile one
// intrinsic template for both targets): R rows x NU vectors of 8 columns, R *
// NU accumulators, NU vectors of b and a's broadcast value (at most 15 of the
// 16 registers). kMasked: the columns past `cols` masked by integer vectors,
// else all 8 * NU columns taken with plain loads and stores (AMD's Zen cores
// run a masked store slowly: the weight gradient at one position, all
// stores, took 3.6x MKL's time with masks throughout). The same sums as
// row_tile's: each c[i, j] one chain over k in order, from c (load_c) or 0.
template <int R, int NU, bool kMasked>
__attribute__((target("avx2,fma"))) void row_tile_avx2(int64_t steps, const float* a, AStrides as,
                                                       const float* b, int64_t ldb, float* c,
                                                       int64_t ldc, int64_t cols, bool load_c) {
  __m256i mask[NU];
#pragma GCC unroll 2
  for (int v = 0; v < NU; ++v) mask[v] = avx2_lanes(std::clamp<int64_t>(cols - 8 * v, 0, 8));
  __m256 acc[R][NU];
#pragma GCC unroll 6
  for (int r = 0; r < R; ++r) {
#pragma GCC unroll 2
    for (int v = 0; v < NU; ++v) {
      acc[r][v] = load_c ? avx2_load<kMasked>(c + r * ldc + 8 * v, mask[v]) : _mm256_setzero_ps();
    }
  }
  for (int64_t q = 0; q < steps; ++q) {
    __m256 bv[NU];
#pragma GCC unroll 2
    for (int v = 0; v < NU; ++v) bv[v] = avx2_load<kMasked>(b + q * ldb + 8 * v, mask[v]);
#pragma GCC unroll 6
    for (int r = 0; r < R; ++r) {
      const __m256 av = _mm256_broadcast_ss(a + r * as.row + q * as.step);
#pragma GCC unroll 2
      for (int v = 0; v < NU; ++v) acc[r][v] = _mm256_fmadd_ps(av, bv[v], acc[r][v]);
    }
  }
#pragma GCC unroll 6
  for (int r = 0; r < R; ++r) {
#pragma GCC unroll 2
    for (int v = 0; v < NU; ++v) {
      if (kMasked) {
        _mm256_maskstore_ps(c + r * ldc + 8 * v, mask[v], acc[r][v]);
      } else {
        _mm256_storeu_ps(c + r * ldc + 8 * v, acc[r][v]);
      }
    }
  }
}

// All m rows and `cols` columns on AVX2, one thread: blocks of 16 columns
// (2 vectors; the last masked unless whole vectors), each over all rows in
// near-equal tiles of at most 6 rows (as row_tiles), so a block's 16
// columns of b are read once per tile.
using RowTileAvx2 = void (*)(int64_t, const float*, AStrides, const float*, int64_t, float*,
                             int64_t, int64_t, bool);
// [R - 1][NU - 1][kMasked]
template <int... Rm1>
constexpr std::array<std::array<std::array<RowTileAvx2, 2>, 2>, sizeof...(Rm1)>
row_tiles_avx2_table(std::integer_sequence<int, Rm1...>) {
  return {{{{{&row_tile_avx2<Rm1 + 1, 1, false>, &row_tile_avx2<Rm1 + 1, 1, true>},
             {&row_tile_avx2<Rm1 + 1, 2, false>, &row_tile_avx2<Rm1 + 1, 2, true>}}}...}};
}

inline void row_tiles_avx2(int64_t m, int64_t steps, const float* a, AStrides as, const float* b,
                           int64_t ldb, float* c, int64_t ldc, int64_t cols, bool load_c) {
  constexpr int kMr = kRowTile;
  static constexpr auto kTiles = row_tiles_avx2_table(std::make_integer_sequence<int, kMr>{});
  const int64_t tiles = (m + kMr - 1) / kMr;
  for (int64_t j0 = 0; j0 < cols; j0 += 16) {
    const int64_t w = std::min<int64_t>(16, cols - j0), nu = (w + 7) / 8;
    for (int64_t t = 0, i0 = 0; t < tiles; ++t) {
      const int64_t rows = m / tiles + (t < m % tiles ? 1 : 0);
      kTiles[rows - 1][nu - 1][w % 8 != 0](steps, a + i0 * as.row, as, b + j0, ldb,
                                           c + i0 * ldc + j0, ldc, w, load_c);
      i0 += rows;
    }
  }
}
#endif

}  // namespace cpu
}  // namespace varlen_rnn
