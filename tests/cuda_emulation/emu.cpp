// Host emulation of the CUDA kernels in csrc/cuda/*.cuh, for machines without a GPU: every CUDA
// thread is a std::thread, __syncthreads and grid.sync() are std::barriers, warp shuffles go
// through a per-warp exchange. It runs the real kernel code in every dtype the CUDA build
// dispatches (double, float, c10::Half, c10::BFloat16 with float op-math), so tests can check
// the index math, padding, sorting, the half-type bit-cast loads and the one-barrier-per-step
// schemes against the CPU kernels; the tensor-core path (kMma) through the emulated mma.sync of
// mma_emu.h. Test-only; see tests/test_cuda_emulated.py.
#include <ATen/OpMathType.h>
#include <torch/extension.h>
#include <barrier>
#include <cassert>
#include <memory>
#include <thread>
#include <vector>
#include <algorithm>
#include <type_traits>

#define VARLEN_RNN_HOST_EMULATION 1
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(x)
#define __align__(n) alignas(n)
#ifndef CUDA_KERNEL_ASSERT
#define CUDA_KERNEL_ASSERT(c) assert(c)
#endif

struct alignas(16) float4 { float x, y, z, w; };  // CUDA's vector type, for 16-byte loads
struct EmuIdx { int x = 0, y = 0, z = 0; };
thread_local EmuIdx threadIdx, blockIdx, blockDim, gridDim;
#include "mma_emu.h"
struct EmuWarp { std::barrier<> bar{32}; double slot[2][32]; varlen_rnn::cuda::tc::MmaExchange mma; };
struct EmuBlock {
  explicit EmuBlock(int n, size_t smem) : bar(n), smem(smem + 16, 0xCD), warps(n / 32) {}
  std::barrier<> bar;
  std::vector<unsigned char> smem;
  std::vector<EmuWarp> warps;
};
thread_local EmuBlock* tl_block = nullptr;
thread_local std::barrier<>* tl_grid = nullptr;
inline void __syncthreads() { tl_block->bar.arrive_and_wait(); }
varlen_rnn::cuda::tc::MmaExchange& varlen_rnn::cuda::tc::emu_mma_exchange() {
  return tl_block->warps[threadIdx.x / 32].mma;
}
inline unsigned char* dynamic_smem() { return tl_block->smem.data(); }
template <typename T> inline T __ldcg(const T* p) { return *p; }
inline int min(int a, int b) { return a < b ? a : b; }
// Every lane of the warp must call it (the kernels use the full mask): each shuffle is one
// barrier of all 32 lanes. Consecutive shuffles alternate between two slot arrays, so a lane
// writing shuffle i+2's value cannot overwrite one that a slower lane still reads for shuffle i
// (everyone has passed shuffle i+1's barrier, hence finished reading shuffle i).
thread_local unsigned tl_shfl_phase = 0;
template <typename T> inline T __shfl_xor_sync(unsigned mask, T v, int off) {
  assert(mask == 0xffffffffu);
  EmuWarp& w = tl_block->warps[threadIdx.x / 32];
  const int lane = threadIdx.x % 32;
  double* slot = w.slot[tl_shfl_phase++ & 1];
  slot[lane] = static_cast<double>(v);  // exact for float and double
  w.bar.arrive_and_wait();
  return static_cast<T>(slot[lane ^ off]);
}
namespace cooperative_groups {
struct grid_group { void sync() const { tl_grid->arrive_and_wait(); } };
inline grid_group this_grid() { return {}; }
}

#include "cuda/persistent.cuh"
using namespace varlen_rnn::cuda;

template <typename F>
void emu_launch(int grid, int block, size_t smem, F body) {
  std::barrier<> gbar(grid * block);
  std::vector<std::unique_ptr<EmuBlock>> blocks;
  for (int b = 0; b < grid; ++b) blocks.emplace_back(new EmuBlock(block, smem));
  std::vector<std::thread> th;
  for (int b = 0; b < grid; ++b)
    for (int t = 0; t < block; ++t)
      th.emplace_back([&, b, t] {
        threadIdx.x = t; blockIdx.x = b; blockDim.x = block; gridDim.x = grid;
        tl_block = blocks[b].get(); tl_grid = &gbar;
        body();
      });
  for (auto& t : th) t.join();
}

// Sequential launch for kernels without barriers.
template <typename F>
void emu_launch_seq(int grid, int block, F body) {
  for (int b = 0; b < grid; ++b)
    for (int t = 0; t < block; ++t) {
      threadIdx.x = t; blockIdx.x = b; blockDim.x = block; gridDim.x = grid;
      body();
    }
}

// The cut plan_persistent (gru_cuda.cu) makes, for a pretend SM count; kc_cap and R_force
// reach the K-chunked and few-rows-per-tile variants with tiny shapes.
struct Plan { PersistentShape ps; int blocks; size_t smem; };
Plan plan(int64_t H, int64_t D, bool backward, size_t accb, size_t wb, int sms, int kc_cap, int R_force) {
  auto cd = [](int64_t a, int64_t b) { return (a + b - 1) / b; };
  int64_t bpd = cd(H, cd(H, std::max<int64_t>(1, sms / D)));
  int64_t J = cd(H, bpd);
  int64_t U = backward ? cd(J, 3) : J;
  int64_t K = backward ? 3 * H : H;
  int64_t R = R_force > 0 ? R_force : std::min<int64_t>(4, cd(kPersistWarps, U));
  int64_t kc = K;
  if (kc_cap > 0 && kc_cap < kc) kc = kc_cap;
  Plan p;
  p.ps = PersistentShape{(int)J, (int)bpd, (int)(kRows * R), (int)kc};
  p.blocks = (int)(D * bpd);
  p.smem = (size_t)(kRows * R * kc) * accb + (size_t)(U * R * 3 * kRows) * accb +
           (size_t)((backward ? 3 * U : 3 * J) * K) * wb;
  return p;
}

struct Lens { std::vector<int> lens, perm, sorted; };
Lens prep(const torch::Tensor& lengths, int T) {
  int B = lengths.size(0);
  Lens l{std::vector<int>(B), std::vector<int>(B), std::vector<int>(B)};
  auto src = lengths.contiguous();
  emu_launch_seq((B + 255) / 256, 256, [&] {
    lengths_prep_kernel<int64_t>(src.data_ptr<int64_t>(), B, T, l.lens.data(), l.perm.data(), l.sorted.data());
  });
  return l;
}

RowStrides xs_of(bool bf, int64_t T, int64_t B, int64_t F) { return bf ? RowStrides{F, T * F} : RowStrides{B * F, F}; }

// The launchers' tensor set-up (gru_cuda.cu), in the storage dtype scalar_t with acc_t state,
// workspace and exchange buffers, around the emulated kernels.
template <typename scalar_t>
std::vector<torch::Tensor> forward_t(const torch::Tensor& gx, const torch::Tensor& w_hh,
                                     const c10::optional<torch::Tensor>& b_hh, const torch::Tensor& hx,
                                     const torch::Tensor& lengths, int64_t T, bool bf, bool persistent,
                                     int64_t sms, int64_t kc_cap, int64_t R_force, bool mma) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t D = w_hh.size(0), H = w_hh.size(2), B = hx.size(1);
  const at::TensorOptions opts = gx.options();
  const at::TensorOptions acc_opts = opts.dtype(c10::CppTypeToScalarType<acc_t>::value);
  const bool half = !std::is_same<scalar_t, acc_t>::value;
  torch::Tensor out = torch::full(bf ? std::vector<int64_t>{B, T, D * H} : std::vector<int64_t>{T, B, D * H}, 777.0, opts);
  torch::Tensor h_n = torch::full({D, B, H}, 777.0, opts);
  torch::Tensor ws = torch::full({D, T * B, 4 * H}, 777.0, acc_opts);
  Lens l = prep(lengths, (int)T);
  RowStrides xs = xs_of(bf, T, B, D * 3 * H), os = xs_of(bf, T, B, D * H);
  if (persistent) {
    Plan p = plan(H, D, false, sizeof(acc_t), sizeof(scalar_t), (int)sms, (int)kc_cap, (int)R_force);
    torch::Tensor hbuf = torch::full({2, D, B, H}, 777.0, acc_opts);
    PersistentForwardArgs<scalar_t, acc_t> a{};
    a.gx = gx.data_ptr<scalar_t>(); a.w_hh = w_hh.data_ptr<scalar_t>();
    a.b_hh = b_hh ? b_hh->data_ptr<scalar_t>() : nullptr; a.hx = hx.data_ptr<scalar_t>();
    a.lens = l.lens.data(); a.perm = l.perm.data(); a.sorted = l.sorted.data();
    a.hbuf = hbuf.data_ptr<acc_t>(); a.out = out.data_ptr<scalar_t>(); a.h_n = h_n.data_ptr<scalar_t>();
    a.ws = ws.data_ptr<acc_t>(); a.xs = xs; a.os = os; a.T = T; a.B = B; a.H = H; a.D = D; a.ps = p.ps;
    if constexpr (std::is_same<acc_t, float>::value) {
      if (mma) {
        emu_launch(p.blocks, kPersistThreads, p.smem, [&] { persistent_forward_kernel<scalar_t, acc_t, true>(a); });
        return {out, h_n, ws};
      }
    }
    TORCH_CHECK(!mma, "the tensor-core path takes float32, float16 or bfloat16");
    emu_launch(p.blocks, kPersistThreads, p.smem, [&] { persistent_forward_kernel<scalar_t, acc_t>(a); });
  } else {
    torch::Tensor h = hx.to(acc_opts.dtype(), false, /*copy=*/true);  // updated in place
    torch::Tensor h_lo = half ? hx.clone() : h;  // the GEMM's operand, rounded for half types
    torch::Tensor w_t = w_hh.transpose(1, 2);
    torch::Tensor gh = torch::empty({D, B, 3 * H}, opts);
    for (int64_t s = 0; s < T; ++s) {
      if (b_hh) torch::baddbmm_out(gh, b_hh->view({D, 1, 3 * H}).expand({D, B, 3 * H}), h_lo, w_t);
      else torch::bmm_out(gh, h_lo, w_t);
      emu_launch_seq((D * B * H + 255) / 256, 256, [&] {
        fallback_forward_step_kernel<scalar_t, acc_t>(gx.data_ptr<scalar_t>(), gh.data_ptr<scalar_t>(),
            l.lens.data(), h.data_ptr<acc_t>(), half ? h_lo.data_ptr<scalar_t>() : nullptr,
            out.data_ptr<scalar_t>(), ws.data_ptr<acc_t>(), s, T, B, H, D, xs, os);
      });
    }
    h_n.copy_(h);
  }
  return {out, h_n, ws};
}

template <typename scalar_t>
std::vector<torch::Tensor> backward_t(const torch::Tensor& go, const torch::Tensor& ghn, const torch::Tensor& out,
                                      const torch::Tensor& hx, const torch::Tensor& ws, const torch::Tensor& w_hh,
                                      const torch::Tensor& lengths, int64_t T, bool bf, bool persistent,
                                      int64_t sms, int64_t kc_cap, int64_t R_force, bool mma) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t D = w_hh.size(0), H = w_hh.size(2), B = hx.size(1);
  const at::TensorOptions opts = go.options();
  const at::TensorOptions acc_opts = opts.dtype(c10::CppTypeToScalarType<acc_t>::value);
  torch::Tensor dgx = torch::full({T * B, D * 3 * H}, 777.0, opts);
  torch::Tensor dgh = torch::full({D, T * B, 3 * H}, 777.0, opts);
  torch::Tensor hprev = torch::full({D, T * B, H}, 777.0, opts);
  torch::Tensor grad_hx = torch::full({D, B, H}, 777.0, opts);
  Lens l = prep(lengths, (int)T);
  RowStrides xs = xs_of(bf, T, B, D * 3 * H), os = xs_of(bf, T, B, D * H);
  if (persistent) {
    Plan p = plan(H, D, true, sizeof(acc_t), sizeof(scalar_t), (int)sms, (int)kc_cap, (int)R_force);
    torch::Tensor dh = torch::full({D, B, H}, 777.0, acc_opts);
    PersistentBackwardArgs<scalar_t, acc_t> a{};
    a.grad_out = go.data_ptr<scalar_t>(); a.out = out.data_ptr<scalar_t>(); a.hx = hx.data_ptr<scalar_t>();
    a.grad_h_n = ghn.data_ptr<scalar_t>(); a.ws = ws.data_ptr<acc_t>(); a.w_hh = w_hh.data_ptr<scalar_t>();
    a.lens = l.lens.data(); a.perm = l.perm.data(); a.sorted = l.sorted.data();
    a.dh = dh.data_ptr<acc_t>(); a.dgx = dgx.data_ptr<scalar_t>(); a.dgh = dgh.data_ptr<scalar_t>();
    a.hprev = hprev.data_ptr<scalar_t>(); a.grad_hx = grad_hx.data_ptr<scalar_t>();
    a.xs = xs; a.os = os; a.T = T; a.B = B; a.H = H; a.D = D; a.ps = p.ps;
    if constexpr (std::is_same<acc_t, float>::value) {
      if (mma) {
        emu_launch(p.blocks, kPersistThreads, p.smem, [&] { persistent_backward_kernel<scalar_t, acc_t, true>(a); });
        return {dgx, dgh, hprev, grad_hx};
      }
    }
    TORCH_CHECK(!mma, "the tensor-core path takes float32, float16 or bfloat16");
    emu_launch(p.blocks, kPersistThreads, p.smem, [&] { persistent_backward_kernel<scalar_t, acc_t>(a); });
  } else {
    torch::Tensor dh_a = ghn.to(acc_opts.dtype(), false, /*copy=*/true);
    torch::Tensor dh_a_next = torch::full_like(dh_a, 777.0);
    torch::Tensor dh_b = torch::zeros_like(ghn);  // the GEMM part, in the storage dtype
    torch::Tensor dgh4 = dgh.view({D, T, B, 3 * H});
    for (int64_t s = T - 1; s >= 0; --s) {
      emu_launch_seq((D * B * H + 255) / 256, 256, [&] {
        fallback_backward_step_kernel<scalar_t, acc_t>(go.data_ptr<scalar_t>(), out.data_ptr<scalar_t>(),
            hx.data_ptr<scalar_t>(), ws.data_ptr<acc_t>(), l.lens.data(), dh_a.data_ptr<acc_t>(),
            dh_b.data_ptr<scalar_t>(), dh_a_next.data_ptr<acc_t>(), dgx.data_ptr<scalar_t>(),
            dgh.data_ptr<scalar_t>(), hprev.data_ptr<scalar_t>(), s, T, B, H, D, xs, os);
      });
      std::swap(dh_a, dh_a_next);
      torch::bmm_out(dh_b, dgh4.select(1, s), w_hh);
    }
    grad_hx.copy_(dh_a.add_(dh_b));
  }
  return {dgx, dgh, hprev, grad_hx};
}

std::vector<torch::Tensor> forward(torch::Tensor gx, torch::Tensor w_hh, c10::optional<torch::Tensor> b_hh,
                                   torch::Tensor hx, torch::Tensor lengths, int64_t T, bool bf,
                                   bool persistent, int64_t sms, int64_t kc_cap, int64_t R_force, bool mma) {
  std::vector<torch::Tensor> r;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, gx.scalar_type(), "emu_forward", [&] {
    r = forward_t<scalar_t>(gx, w_hh, b_hh, hx, lengths, T, bf, persistent, sms, kc_cap, R_force, mma);
  });
  return r;
}

std::vector<torch::Tensor> backward(torch::Tensor go, torch::Tensor ghn, torch::Tensor out, torch::Tensor hx,
                                    torch::Tensor ws, torch::Tensor w_hh, torch::Tensor lengths, int64_t T, bool bf,
                                    bool persistent, int64_t sms, int64_t kc_cap, int64_t R_force, bool mma) {
  std::vector<torch::Tensor> r;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, go.scalar_type(), "emu_backward", [&] {
    r = backward_t<scalar_t>(go, ghn, out, hx, ws, w_hh, lengths, T, bf, persistent, sms, kc_cap, R_force, mma);
  });
  return r;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("forward", &forward);
  m.def("backward", &backward);
}
