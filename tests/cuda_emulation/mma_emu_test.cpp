// The tensor-core wrapper's test kernels (mma_tile.cuh) on CPU threads, through the emulated
// mma() of mma_emu.h: each block's threads run as fibers (fibers.h: a warp's lanes meet in mma()
// and the block in __syncthreads), blocks one after another. Test-only; see
// tests/test_mma_emulated.py.
// Not torch/extension.h: its C++ frontend doubled this file's compile time (emu_runtime.h).
#include <ATen/ATen.h>
#include <torch/csrc/utils/pybind.h>

#include <atomic>
#include <cmath>
#include <memory>
#include <vector>

#include "fibers.h"

#define VARLEN_RNN_HOST_EMULATION 1
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline

// The running thread's block barrier and warp exchange: emu::tl_own's block and grid.
inline void __syncthreads() { static_cast<emu::Barrier*>(emu::tl_own.block)->arrive_and_wait(); }
inline int min(int a, int b) { return a < b ? a : b; }

#include "mma_emu.h"
namespace varlen_rnn::cuda {  // copy_async.cuh's wait: these tests' stages copy rows themselves
inline void copy_async_wait() {}
}  // namespace varlen_rnn::cuda
#include "mma_tile.cuh"

using namespace varlen_rnn::cuda;

// Accesses mma_matvec.cuh's check_aligned found off their size's alignment (a GPU faults on
// each); read and reset by misaligned().
std::atomic<long> g_misaligned{0};
namespace varlen_rnn::cuda {
void emu_note_fragment_ways(int) {}  // the kernels' strides are checked in emu.cpp
void emu_note_misaligned(const void*, int) { ++g_misaligned; }
}  // namespace varlen_rnn::cuda

tc::MmaExchange& tc::emu_mma_exchange() {
  return static_cast<tc::MmaExchange*>(emu::tl_own.grid)[threadIdx.x / 32];
}

template <typename F>
void emu_launch(int grid, int block, F body) {
  TORCH_CHECK(block % 32 == 0, "block must be whole warps, got ", block);
  for (int b = 0; b < grid; ++b) {
    emu::Barrier block_barrier(block);
    std::vector<tc::MmaExchange> warps(block / 32);
    emu::run(block, [&](int t) {
      threadIdx = {t, 0, 0};
      blockIdx = {b, 0, 0};
      blockDim = {block, 1, 1};
      gridDim = {grid, 1, 1};
      emu::tl_own = {&block_barrier, warps.data(), 0};
      body();
    });
  }
}

// a [M, K], b [K, N], c [M, N] float32 -> d [M, N]: tile_gemm_kernel<kind, variant>.
at::Tensor tile_gemm(int64_t kind, int64_t variant, at::Tensor a, at::Tensor b, at::Tensor c) {
  TORCH_CHECK(a.dim() == 2 && b.dim() == 2 && c.dim() == 2, "a, b, c must be 2-D");
  const int64_t M = a.size(0), K = a.size(1), N = b.size(1);
  TORCH_CHECK(M % 16 == 0 && N % 8 == 0 && K % tc_test::k_step(kind) == 0 && b.size(0) == K &&
                  c.size(0) == M && c.size(1) == N,
              "shapes: a [M, K], b [K, N], c [M, N] with M % 16, N % 8, K % k_step == 0; got ",
              a.sizes(), b.sizes(), c.sizes());
  auto a32 = a.to(at::kFloat).contiguous(), b32 = b.to(at::kFloat).contiguous();
  auto c32 = c.to(at::kFloat).contiguous();
  auto d = at::full({M, N}, 777.0f, a32.options());
  const float *pa = a32.data_ptr<float>(), *pb = b32.data_ptr<float>(), *pc = c32.data_ptr<float>();
  float* pd = d.data_ptr<float>();
  const bool ok = tc_test::dispatch(kind, variant, [&](auto kc, auto vc) {
    emu_launch(M / 16, 4 * N, [&] {
      tc_test::tile_gemm_kernel<decltype(kc)::value, decltype(vc)::value>(pa, pb, pc, pd, N, K);
    });
  });
  TORCH_CHECK(ok, "kind must be 0..2 and variant 0..3, got ", kind, ", ", variant);
  return d;
}

// x float32 [n] -> int64 [n]: the element bits to_bits<kind> gives each value.
at::Tensor to_bits(int64_t kind, at::Tensor x) {
  auto x32 = x.to(at::kFloat).contiguous();
  const int n = x32.numel();
  std::vector<uint32_t> y(n);
  const float* px = x32.data_ptr<float>();
  const bool ok = tc_test::dispatch(kind, 0, [&](auto kc, auto) {
    for (int i = 0; i < n; ++i) {
      threadIdx.x = i;
      blockIdx.x = 0;
      blockDim.x = n;  // no barriers: one thread after another
      tc_test::to_bits_kernel<decltype(kc)::value>(px, y.data(), n);
    }
  });
  TORCH_CHECK(ok, "kind must be 0..2, got ", kind);
  return at::tensor(std::vector<int64_t>(y.begin(), y.end()), at::kLong);
}

// w [3U, K] (float32 rounded to TF32 for kind 0, int16 bits for 1/2), x [tile_rows, K] float32 ->
// acc [tile_rows / 8, U, 3, 8]: matvec_kernel<kind>, the tile chunked by kc_max columns.
at::Tensor matvec(int64_t kind, at::Tensor w, at::Tensor x, int64_t U, bool g_major,
                  int64_t kc_max) {
  const int64_t K = w.size(1), rows = x.size(0);
  TORCH_CHECK(w.size(0) == 3 * U && x.size(1) == K && rows % 8 == 0 && kc_max > 0,
              "matvec: w [3U, K], x [rows, K] with rows % 8 == 0; got ", w.sizes(), x.sizes());
  TORCH_CHECK(w.scalar_type() == (kind == 0 ? at::kFloat : at::kShort),
              "matvec: w must be float32 for TF32 and int16 bits for bf16/f16");
  const int64_t w_stride = kind == 0 ? K : (K + 1) / 2 * 2;
  auto wc = at::zeros({3 * U, w_stride}, w.options());
  wc.narrow(1, 0, K).copy_(w);
  auto xc = x.to(at::kFloat).contiguous();
  auto tile =
      at::full({tc_test::matvec_scratch_floats(static_cast<int>(rows), static_cast<int>(kc_max))},
               std::nanf(""), xc.options());
  auto acc = at::full({rows / 8, U, 3, 8}, 777.0f, xc.options());
  const float* px = xc.data_ptr<float>();
  float *pt = tile.data_ptr<float>(), *pa = acc.data_ptr<float>();
  tc_test::dispatch(kind, 0, [&](auto kc, auto) {
    constexpr tc::Kind k = decltype(kc)::value;
    emu_launch(1, 32 * tc_test::kMatvecWarps, [&] {
      if constexpr (k == tc::Kind::tf32) {
        tc_test::matvec_kernel<k>(wc.data_ptr<float>(), K, px, pt, pa, U, g_major, K, rows, kc_max);
      } else {  // rows of 2-byte bits: an even stride, so pairs load as aligned words
        const auto* pw = reinterpret_cast<const uint16_t*>(wc.data_ptr<int16_t>());
        tc_test::matvec_kernel<k>(pw, w_stride, px, pt, pa, U, g_major, K, rows, kc_max);
      }
    });
  });
  return acc;
}

// The wrapper's fragment layouts for kind: {"A", "B", "C"} -> int64 [32, elements, 2] of (row,
// col).
std::map<std::string, at::Tensor> layout(int64_t kind) {
  std::map<std::string, at::Tensor> out;
  tc_test::dispatch(kind, 0, [&](auto kc, auto) {
    constexpr tc::Kind k = decltype(kc)::value;
    using S = tc::Shape<k>;
    auto t = [](int elems, auto row, auto col) {
      auto r = at::empty({32, elems, 2}, at::kLong);
      for (int l = 0; l < 32; ++l)
        for (int i = 0; i < elems; ++i) {
          r[l][i][0] = row(l, i);
          r[l][i][1] = col(l, i);
        }
      return r;
    };
    out["A"] = t(S::kAElems, tc::a_row<k>, tc::a_col<k>);
    out["B"] = t(S::kBElems, tc::b_row<k>, tc::b_col<k>);
    out["C"] = t(S::kCElems, tc::c_row, tc::c_col);
  });
  TORCH_CHECK(!out.empty(), "kind must be 0..2, got ", kind);
  return out;
}

// Misaligned accesses since the last call.
int64_t misaligned() { return g_misaligned.exchange(0); }

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("misaligned", &misaligned);
  m.def("tile_gemm", &tile_gemm);
  m.def("to_bits", &to_bits);
  m.def("layout", &layout);
  m.def("matvec", &matvec);
}
