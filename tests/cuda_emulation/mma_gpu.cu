// The tensor-core wrapper's test kernels (mma_tile.cuh) on a GPU behind a C interface for ctypes
// (tests/test_mma_gpu.py). No torch headers, so nvcc builds it in seconds. Pointers are host
// memory; each call copies in, launches, copies out. Returns 0, -1 for bad arguments, or a
// cudaError_t (mma_error_string names it).
#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>
#include <type_traits>

#include "mma_tile.cuh"

using namespace varlen_rnn::cuda;

namespace {
struct DeviceBuffer {
  void* p = nullptr;
  ~DeviceBuffer() {
    if (p) cudaFree(p);
  }
};
}  // namespace

#define MMA_GPU_CHECK(expr)               \
  do {                                    \
    const cudaError_t err_ = (expr);      \
    if (err_ != cudaSuccess) return err_; \
  } while (0)

// a [M, K], b [K, N], c [M, N] -> d [M, N], all float32 row-major.
extern "C" int mma_tile_gemm(int kind, int variant, const float* a, const float* b, const float* c,
                             float* d, int M, int N, int K) {
  if (kind < 0 || kind > 2 || M <= 0 || N <= 0 || K <= 0 || M % 16 || N % 8 || N > 256 ||
      K % tc_test::k_step(kind))
    return -1;
  const size_t sa = sizeof(float) * M * K, sb = sizeof(float) * K * N, sc = sizeof(float) * M * N;
  DeviceBuffer da, db, dc, dd;
  MMA_GPU_CHECK(cudaMalloc(&da.p, sa));
  MMA_GPU_CHECK(cudaMalloc(&db.p, sb));
  MMA_GPU_CHECK(cudaMalloc(&dc.p, sc));
  MMA_GPU_CHECK(cudaMalloc(&dd.p, sc));
  MMA_GPU_CHECK(cudaMemcpy(da.p, a, sa, cudaMemcpyHostToDevice));
  MMA_GPU_CHECK(cudaMemcpy(db.p, b, sb, cudaMemcpyHostToDevice));
  MMA_GPU_CHECK(cudaMemcpy(dc.p, c, sc, cudaMemcpyHostToDevice));
  MMA_GPU_CHECK(cudaMemset(dd.p, 0xFF, sc));  // NaN everywhere a kernel forgets to write
  const bool ok = tc_test::dispatch(kind, variant, [&](auto kc, auto vc) {
    tc_test::tile_gemm_kernel<decltype(kc)::value, decltype(vc)::value>
        <<<M / 16, 4 * N>>>(static_cast<const float*>(da.p), static_cast<const float*>(db.p),
                            static_cast<const float*>(dc.p), static_cast<float*>(dd.p), N, K);
  });
  if (!ok) return -1;
  MMA_GPU_CHECK(cudaGetLastError());
  MMA_GPU_CHECK(cudaMemcpy(d, dd.p, sc, cudaMemcpyDeviceToHost));
  return 0;
}

// y[i] = the element bits of x[i] in kind's type, as to_bits() converts it.
extern "C" int mma_to_bits(int kind, const float* x, uint32_t* y, int n) {
  if (kind < 0 || kind > 2 || n <= 0) return -1;
  DeviceBuffer dx, dy;
  MMA_GPU_CHECK(cudaMalloc(&dx.p, sizeof(float) * n));
  MMA_GPU_CHECK(cudaMalloc(&dy.p, sizeof(uint32_t) * n));
  MMA_GPU_CHECK(cudaMemcpy(dx.p, x, sizeof(float) * n, cudaMemcpyHostToDevice));
  tc_test::dispatch(kind, 0, [&](auto kc, auto) {
    tc_test::to_bits_kernel<decltype(kc)::value><<<(n + 255) / 256, 256>>>(
        static_cast<const float*>(dx.p), static_cast<uint32_t*>(dy.p), n);
  });
  MMA_GPU_CHECK(cudaGetLastError());
  MMA_GPU_CHECK(cudaMemcpy(y, dy.p, sizeof(uint32_t) * n, cudaMemcpyDeviceToHost));
  return 0;
}

// w [3U, K] (float for kind 0, 2-byte element bits otherwise), x [rows, K] -> acc [rows/8, U, 3,
// 8]: matvec_kernel, the tile chunked by kc_max columns.
extern "C" int mma_matvec(int kind, const void* w, const float* x, float* acc, int U, int g_major,
                          int K, int rows, int kc_max) {
  if (kind < 0 || kind > 2 || U <= 0 || K <= 0 || rows <= 0 || rows % 8 || kc_max <= 0) return -1;
  // 2-byte bits get rows of an even stride (zero-padded), so pairs load as aligned words.
  const int w_stride = kind == 0 ? K : (K + 1) / 2 * 2;
  const size_t es = kind == 0 ? sizeof(float) : sizeof(uint16_t);
  const size_t sw = es * 3 * U * w_stride;
  const size_t sx = sizeof(float) * rows * K, sa = sizeof(float) * 3 * U * rows;
  DeviceBuffer dw, dx, dt, da;
  MMA_GPU_CHECK(cudaMalloc(&dw.p, sw));
  MMA_GPU_CHECK(cudaMalloc(&dx.p, sx));
  const size_t st = sizeof(float) * tc_test::matvec_scratch_floats(rows, kc_max);
  MMA_GPU_CHECK(cudaMalloc(&dt.p, st));
  MMA_GPU_CHECK(cudaMalloc(&da.p, sa));
  MMA_GPU_CHECK(cudaMemset(dw.p, 0, sw));
  MMA_GPU_CHECK(cudaMemcpy2D(dw.p, es * w_stride, w, es * K, es * K, 3 * U,
                             cudaMemcpyHostToDevice));
  MMA_GPU_CHECK(cudaMemcpy(dx.p, x, sx, cudaMemcpyHostToDevice));
  MMA_GPU_CHECK(cudaMemset(dt.p, 0xFF, st));  // NaN past each chunk
  MMA_GPU_CHECK(cudaMemset(da.p, 0xFF, sa));
  tc_test::dispatch(kind, 0, [&](auto kc, auto) {
    constexpr tc::Kind k = decltype(kc)::value;
    using w_t = std::conditional_t<k == tc::Kind::tf32, float, uint16_t>;
    tc_test::matvec_kernel<k><<<1, 32 * tc_test::kMatvecWarps>>>(
        static_cast<const w_t*>(dw.p), w_stride, static_cast<const float*>(dx.p),
        static_cast<float*>(dt.p),
        static_cast<float*>(da.p), U, g_major, K, rows, kc_max);
  });
  MMA_GPU_CHECK(cudaGetLastError());
  MMA_GPU_CHECK(cudaMemcpy(acc, da.p, sa, cudaMemcpyDeviceToHost));
  return 0;
}

extern "C" const char* mma_error_string(int err) {
  return err < 0 ? "bad arguments" : cudaGetErrorString(static_cast<cudaError_t>(err));
}
