// Test kernels for the tensor-core wrapper csrc/cuda/mma.cuh. The same source is built for the
// GPU (mma_gpu.cu, tests/test_mma_gpu.py) and for the CPU emulation (mma_emu_test.cpp,
// tests/test_mma_emulated.py), so both check exactly this code.
#pragma once

#include <type_traits>

#include "cuda/mma.cuh"
#include "cuda/mma_matvec.cuh"

namespace varlen_rnn {
namespace cuda {
namespace tc_test {

using namespace tc;

// Fragment layouts a kernel could get wrong, so the tests can show that each one is caught.
enum Variant : int {
  kCorrect = 0,
  kARowsSwapped = 1,      // A rows g and g + 8 exchanged (a1/a2 confused in TF32)
  kBOtherKind = 2,        // B's k index taken from the other precision's table
  kCPairsTransposed = 3,  // C/D elements 1 and 2 exchanged
  kVariants = 4,
};

template <Kind k, int V>
__device__ __forceinline__ int load_a_row(int lane, int i) {
  return V == kARowsSwapped ? a_row<k>(lane, i) ^ 8 : a_row<k>(lane, i);
}
template <Kind k, int V>
__device__ __forceinline__ int load_b_row(int lane, int i) {
  constexpr Kind other = k == Kind::tf32 ? Kind::bf16 : Kind::tf32;
  return V == kBOtherKind ? b_row<other>(lane, i) : b_row<k>(lane, i);
}
template <int V>
__device__ __forceinline__ int load_c_row(int lane, int i) {
  return V == kCPairsTransposed ? (lane >> 2) + 8 * (i & 1) : c_row(lane, i);
}
template <int V>
__device__ __forceinline__ int load_c_col(int lane, int i) {
  return V == kCPairsTransposed ? 2 * (lane & 3) + (i >> 1) : c_col(lane, i);
}

// D = A * B + C with fp32 operands in memory, converted to kind k as the fragments are filled.
// A [M, K], B [K, N], C and D [M, N], row-major; M % 16 == 0, N % 8 == 0, K % Shape<k>::K == 0.
// Block b computes rows 16b..16b+15; warp w of the block columns 8w..8w+7 (blockDim.x = 4N).
template <Kind k, int V>
__global__ void tile_gemm_kernel(const float* A, const float* B, const float* C, float* D, int N,
                                 int K) {
  using S = Shape<k>;
  const int lane = threadIdx.x % 32, n0 = 8 * (threadIdx.x / 32), m0 = 16 * blockIdx.x;
  FragC acc;
  for (int i = 0; i < S::kCElems; ++i)
    acc.x[i] = C[(m0 + load_c_row<V>(lane, i)) * N + n0 + load_c_col<V>(lane, i)];
  for (int k0 = 0; k0 < K; k0 += S::K) {
    FragA<k> a;
    FragB<k> b;
    for (int i = 0; i < S::kAElems; ++i)
      set(a, i, A[(m0 + load_a_row<k, V>(lane, i)) * K + k0 + a_col<k>(lane, i)]);
    for (int i = 0; i < S::kBElems; ++i)
      set(b, i, B[(k0 + load_b_row<k, V>(lane, i)) * N + n0 + b_col<k>(lane, i)]);
    mma(acc, a, b, acc);
  }
  for (int i = 0; i < S::kCElems; ++i)
    D[(m0 + load_c_row<V>(lane, i)) * N + n0 + load_c_col<V>(lane, i)] = acc.x[i];
}

// y[i] = the element bits of x[i] in kind k's type (the conversion set() applies).
template <Kind k>
__global__ void to_bits_kernel(const float* x, uint32_t* y, int n) {
  const int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i < n) y[i] = to_bits<k>(x[i]);
}

// Calls f(kind constant, variant constant) for runtime kind (0 tf32, 1 bf16, 2 f16) and variant;
// returns false for values out of range.
template <typename F>
bool dispatch(int kind, int variant, F&& f) {
  auto with_kind = [&](auto kc) {
    switch (variant) {
      case kCorrect:
        f(kc, std::integral_constant<int, kCorrect>{});
        return true;
      case kARowsSwapped:
        f(kc, std::integral_constant<int, kARowsSwapped>{});
        return true;
      case kBOtherKind:
        f(kc, std::integral_constant<int, kBOtherKind>{});
        return true;
      case kCPairsTransposed:
        f(kc, std::integral_constant<int, kCPairsTransposed>{});
        return true;
      default:
        return false;
    }
  };
  switch (kind) {
    case 0:
      return with_kind(std::integral_constant<Kind, Kind::tf32>{});
    case 1:
      return with_kind(std::integral_constant<Kind, Kind::bf16>{});
    case 2:
      return with_kind(std::integral_constant<Kind, Kind::f16>{});
    default:
      return false;
  }
}

constexpr int kMatvecWarps = 4;

// tile_matvec_mma (mma_matvec.cuh) with NG = 3 in one block of kMatvecWarps warps:
//   acc [(sub*U + u)*3 + g][8] from W [3U, K] (w_t: float, or the kind's 2-byte bits; row
//   stride w_stride, even for 2-byte bits) and the staged rows X [tile_rows, K] fp32, staged
//   into the tile in the kernel's tile type (fp32 for TF32, else rounded to the kind's bits);
//   row order g*U + u (g_major) or u*3 + g. TF32 weights already rounded (tc::tf32_rounded),
//   as the kernels keep them. tile: scratch of matvec_scratch_floats(tile_rows, kc_max).
// The tile and, after it, the split's partial sums (kMmaPartFloats).
inline int matvec_scratch_floats(int tile_rows, int kc_max) {
  return tile_rows * kc_max + kMmaPartFloats<kMatvecWarps>;
}

template <Kind k, typename w_t>
__global__ void matvec_kernel(const w_t* w, int w_stride, const float* X, float* tile, float* acc,
                              int U, int g_major, int K, int tile_rows, int kc_max) {
  using x_t = std::conditional_t<k == Kind::tf32, float, uint16_t>;
  const int kc_stride = k == Kind::tf32 ? kc_max : (kc_max + 1) / 2 * 2;
  auto locate = [&](int r) -> int64_t { return r; };
  auto stage = [&](x_t* dst, int64_t r, int k0, int kc, int lane) {
    for (int c = lane; c < kc; c += 32) {
      const float v = X[r * K + k0 + c];
      if constexpr (k == Kind::tf32) {
        dst[c] = v;
      } else {
        dst[c] = static_cast<uint16_t>(to_bits<k>(v));
      }
    }
  };
  tile_matvec_mma<3, kMatvecWarps, 32, k>(w, w_stride, U, g_major ? U : 1, g_major ? 1 : 3, K,
                                          tile_rows, kc_max, kc_stride,
                                          reinterpret_cast<x_t*>(tile), acc,
                                          tile + tile_rows * kc_max, locate, stage);
}

inline int k_step(int kind) { return kind == 0 ? 8 : 16; }

}  // namespace tc_test
}  // namespace cuda
}  // namespace varlen_rnn
