// Host emulation of the CUDA kernels in csrc/cuda/*.cuh, for machines without a GPU: every CUDA
// thread is a std::thread, __syncthreads and grid.sync() are std::barriers, warp shuffles go
// through a per-warp exchange. It runs the real kernel code (float64) so tests can check the
// index math, padding, sorting and the one-barrier-per-step schemes against the CPU kernels.
// Test-only; see tests/test_cuda_emulated.py.
#include <torch/extension.h>
#include <barrier>
#include <cassert>
#include <memory>
#include <thread>
#include <vector>
#include <algorithm>

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

struct EmuIdx { int x = 0, y = 0, z = 0; };
thread_local EmuIdx threadIdx, blockIdx, blockDim, gridDim;
struct EmuWarp { std::barrier<> bar{32}; double slot[32]; };
struct EmuBlock {
  explicit EmuBlock(int n, size_t smem) : bar(n), smem(smem + 16, 0xCD), warps(n / 32) {}
  std::barrier<> bar;
  std::vector<unsigned char> smem;
  std::vector<EmuWarp> warps;
};
thread_local EmuBlock* tl_block = nullptr;
thread_local std::barrier<>* tl_grid = nullptr;
inline void __syncthreads() { tl_block->bar.arrive_and_wait(); }
inline unsigned char* dynamic_smem() { return tl_block->smem.data(); }
template <typename T> inline T __ldcg(const T* p) { return *p; }
inline int min(int a, int b) { return a < b ? a : b; }
template <typename T> inline T __shfl_xor_sync(unsigned, T v, int off) {
  EmuWarp& w = tl_block->warps[threadIdx.x / 32];
  const int lane = threadIdx.x % 32;
  w.slot[lane] = static_cast<double>(v);
  w.bar.arrive_and_wait();
  T r = static_cast<T>(w.slot[lane ^ off]);
  w.bar.arrive_and_wait();
  return r;
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

std::vector<torch::Tensor> forward(torch::Tensor gx, torch::Tensor w_hh, c10::optional<torch::Tensor> b_hh,
                                   torch::Tensor hx, torch::Tensor lengths, int64_t T, bool bf,
                                   bool persistent, int64_t sms, int64_t kc_cap, int64_t R_force) {
  const int64_t D = w_hh.size(0), H = w_hh.size(2), B = hx.size(1);
  auto opts = gx.options();
  auto out = torch::full(bf ? std::vector<int64_t>{B, T, D * H} : std::vector<int64_t>{T, B, D * H}, 777.0, opts);
  auto h_n = torch::full({D, B, H}, 777.0, opts);
  auto ws = torch::full({D, T * B, 4 * H}, 777.0, opts);
  Lens l = prep(lengths, (int)T);
  RowStrides xs = xs_of(bf, T, B, D * 3 * H), os = xs_of(bf, T, B, D * H);
  using scalar_t = double;
  if (persistent) {
    Plan p = plan(H, D, false, 8, 8, (int)sms, (int)kc_cap, (int)R_force);
    auto hbuf = torch::full({2, D, B, H}, 777.0, opts);
    PersistentForwardArgs<scalar_t, scalar_t> a{};
    a.gx = gx.data_ptr<double>(); a.w_hh = w_hh.data_ptr<double>();
    a.b_hh = b_hh ? b_hh->data_ptr<double>() : nullptr; a.hx = hx.data_ptr<double>();
    a.lens = l.lens.data(); a.perm = l.perm.data(); a.sorted = l.sorted.data();
    a.hbuf = hbuf.data_ptr<double>(); a.out = out.data_ptr<double>(); a.h_n = h_n.data_ptr<double>();
    a.ws = ws.data_ptr<double>(); a.xs = xs; a.os = os; a.T = T; a.B = B; a.H = H; a.D = D; a.ps = p.ps;
    emu_launch(p.blocks, kPersistThreads, p.smem, [&] { persistent_forward_kernel<scalar_t, scalar_t>(a); });
  } else {
    auto h = hx.clone();
    auto w_t = w_hh.transpose(1, 2);
    auto gh = torch::empty({D, B, 3 * H}, opts);
    for (int64_t s = 0; s < T; ++s) {
      if (b_hh) gh.copy_(torch::baddbmm(b_hh->view({D, 1, 3 * H}).expand({D, B, 3 * H}), h, w_t));
      else gh.copy_(torch::bmm(h, w_t));
      emu_launch_seq((D * B * H + 255) / 256, 256, [&] {
        fallback_forward_step_kernel<scalar_t, scalar_t>(gx.data_ptr<double>(), gh.data_ptr<double>(), l.lens.data(),
            h.data_ptr<double>(), nullptr, out.data_ptr<double>(), ws.data_ptr<double>(), s, T, B, H, D, xs, os);
      });
    }
    h_n.copy_(h);
  }
  return {out, h_n, ws};
}

std::vector<torch::Tensor> backward(torch::Tensor go, torch::Tensor ghn, torch::Tensor out, torch::Tensor hx,
                                    torch::Tensor ws, torch::Tensor w_hh, torch::Tensor lengths, int64_t T, bool bf,
                                    bool persistent, int64_t sms, int64_t kc_cap, int64_t R_force) {
  const int64_t D = w_hh.size(0), H = w_hh.size(2), B = hx.size(1);
  auto opts = go.options();
  auto dgx = torch::full({T * B, D * 3 * H}, 777.0, opts);
  auto dgh = torch::full({D, T * B, 3 * H}, 777.0, opts);
  auto hprev = torch::full({D, T * B, H}, 777.0, opts);
  auto grad_hx = torch::full({D, B, H}, 777.0, opts);
  Lens l = prep(lengths, (int)T);
  RowStrides xs = xs_of(bf, T, B, D * 3 * H), os = xs_of(bf, T, B, D * H);
  using scalar_t = double;
  if (persistent) {
    Plan p = plan(H, D, true, 8, 8, (int)sms, (int)kc_cap, (int)R_force);
    auto dh = torch::full({D, B, H}, 777.0, opts);
    PersistentBackwardArgs<scalar_t, scalar_t> a{};
    a.grad_out = go.data_ptr<double>(); a.out = out.data_ptr<double>(); a.hx = hx.data_ptr<double>();
    a.grad_h_n = ghn.data_ptr<double>(); a.ws = ws.data_ptr<double>(); a.w_hh = w_hh.data_ptr<double>();
    a.lens = l.lens.data(); a.perm = l.perm.data(); a.sorted = l.sorted.data();
    a.dh = dh.data_ptr<double>(); a.dgx = dgx.data_ptr<double>(); a.dgh = dgh.data_ptr<double>();
    a.hprev = hprev.data_ptr<double>(); a.grad_hx = grad_hx.data_ptr<double>();
    a.xs = xs; a.os = os; a.T = T; a.B = B; a.H = H; a.D = D; a.ps = p.ps;
    emu_launch(p.blocks, kPersistThreads, p.smem, [&] { persistent_backward_kernel<scalar_t, scalar_t>(a); });
  } else {
    auto dh_a = ghn.clone();
    auto dh_a_next = torch::full_like(dh_a, 777.0);
    auto dh_b = torch::zeros_like(dh_a);
    auto dgh4 = dgh.view({D, T, B, 3 * H});
    for (int64_t s = T - 1; s >= 0; --s) {
      emu_launch_seq((D * B * H + 255) / 256, 256, [&] {
        fallback_backward_step_kernel<scalar_t, scalar_t>(go.data_ptr<double>(), out.data_ptr<double>(),
            hx.data_ptr<double>(), ws.data_ptr<double>(), l.lens.data(), dh_a.data_ptr<double>(),
            dh_b.data_ptr<double>(), dh_a_next.data_ptr<double>(), dgx.data_ptr<double>(),
            dgh.data_ptr<double>(), hprev.data_ptr<double>(), s, T, B, H, D, xs, os);
      });
      std::swap(dh_a, dh_a_next);
      dh_b.copy_(torch::bmm(dgh4.select(1, s), w_hh));
    }
    grad_hx.copy_(dh_a.add_(dh_b));
  }
  return {dgx, dgh, hprev, grad_hx};
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("forward", &forward);
  m.def("backward", &backward);
}
