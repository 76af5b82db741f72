// Host emulation of the CUDA kernels in csrc/cuda/*.cuh, for machines without a GPU: every CUDA
// thread is a std::thread, __syncthreads and grid.sync() are std::barriers, warp shuffles go
// through a per-warp exchange. It runs the real kernel code in every dtype the CUDA build
// dispatches (double, float, c10::Half, c10::BFloat16 with float op-math), so tests can check
// the index math, padding, sorting, the half-type bit-cast loads and the one-barrier-per-step
// schemes against the CPU kernels, for padded and ragged (offsets, packed) rows. The persistent
// launches are cut by csrc/cuda/plan.h's persistent_cut for a pretend device, as on a GPU; the
// launchers' host set-up (gru_cuda.cu) is mirrored here around the kernels. The tensor-core path
// (kMma) runs through the emulated mma.sync of mma_emu.h. Test-only; see
// tests/test_cuda_emulated.py.
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

struct alignas(16) float4 {
  float x, y, z, w;
};  // CUDA's vector type, for 16-byte loads
struct EmuIdx {
  int x = 0, y = 0, z = 0;
};
thread_local EmuIdx threadIdx, blockIdx, blockDim, gridDim;
#include "mma_emu.h"
struct EmuWarp {
  std::barrier<> bar{32};
  double slot[2][32];
  varlen_rnn::cuda::tc::MmaExchange mma;
};
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
template <typename T>
inline T __ldcg(const T* p) {
  return *p;
}
inline int atomicAdd(int* p, int v) {
  const int old = *p;
  *p += v;
  return old;
}  // sequential launches
inline int min(int a, int b) { return a < b ? a : b; }
// Every lane of the warp must call it (the kernels use the full mask): each shuffle is one
// barrier of all 32 lanes. Consecutive shuffles alternate between two slot arrays, so a lane
// writing shuffle i+2's value cannot overwrite one that a slower lane still reads for shuffle i
// (everyone has passed shuffle i+1's barrier, hence finished reading shuffle i).
thread_local unsigned tl_shfl_phase = 0;
template <typename T>
inline T __shfl_xor_sync(unsigned mask, T v, int off) {
  assert(mask == 0xffffffffu);
  EmuWarp& w = tl_block->warps[threadIdx.x / 32];
  const int lane = threadIdx.x % 32;
  double* slot = w.slot[tl_shfl_phase++ & 1];
  slot[lane] = static_cast<double>(v);  // exact for float and double
  w.bar.arrive_and_wait();
  return static_cast<T>(slot[lane ^ off]);
}
namespace cooperative_groups {
struct grid_group {
  void sync() const { tl_grid->arrive_and_wait(); }
};
inline grid_group this_grid() { return {}; }
}  // namespace cooperative_groups

#include "cuda/persistent.cuh"
#include "cuda/plan.h"
using namespace varlen_rnn;
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
        threadIdx.x = t;
        blockIdx.x = b;
        blockDim.x = block;
        gridDim.x = grid;
        tl_block = blocks[b].get();
        tl_grid = &gbar;
        body();
      });
  for (auto& t : th) t.join();
}

// Sequential launch for kernels without barriers.
template <typename F>
void emu_launch_seq(int grid, int block, F body) {
  for (int b = 0; b < grid; ++b)
    for (int t = 0; t < block; ++t) {
      threadIdx.x = t;
      blockIdx.x = b;
      blockDim.x = block;
      gridDim.x = grid;
      body();
    }
}

// The persistent cut the launcher would take on a device with `sms` SMs and `smem` bytes of
// dynamic shared memory per block (max_kc: VARLEN_RNN_PERSISTENT_MAX_KC).
plan::Cut cut_of(int64_t B, int64_t H, int64_t D, plan::Pass pass, int64_t sb, int64_t ab,
                 int64_t sms, int64_t smem, int64_t max_kc) {
  const plan::Problem p{B, H, D, pass, sb, ab, true};
  const plan::Device dev{sms, smem, true, true};
  plan::Cut cut;
  std::string why;
  TORCH_CHECK(plan::persistent_cut(p, dev, max_kc, cut, why), "no persistent cut: ", why);
  return cut;
}

torch::Tensor cut_tensor(const plan::Cut& c) {
  return torch::tensor({c.J, c.blocks_per_dir, c.tile_rows, c.kc, c.blocks}, torch::kLong);
}

struct Lens {
  std::vector<int> lens, perm, sorted;
};
Lens prep(const int64_t* lengths, int B, int T) {
  Lens l{std::vector<int>(B), std::vector<int>(B), std::vector<int>(B)};
  emu_launch_seq((B + 255) / 256, 256, [&] {
    lengths_prep_kernel<int64_t>(lengths, B, T, l.lens.data(), l.perm.data(), l.sorted.data());
  });
  return l;
}

// The launcher's rows (gru_cuda.cu: set_padded_rows / set_ragged_rows). layout: 0 offsets
// (seq_index = offsets [B+1]), 1 packed (batch_sizes [T], sorted_indices or an empty tensor),
// 2 padded (seq_index = lengths [B], bf: batch-major). T: the padded time dimension or max_len.
struct Rows {
  RowMap map;
  int64_t R = 0;
  std::vector<int64_t> starts, lengths;
  torch::Tensor order;  // packed: rank -> sequence, or undefined
  Lens l;
};
Rows rows_of(int64_t layout, const torch::Tensor& seq_index, const torch::Tensor& sorted_indices,
             int64_t T, bool bf, int64_t B, int64_t N) {
  Rows r;
  const torch::Tensor idx = seq_index.to(torch::kLong).contiguous();
  const int64_t* p = idx.data_ptr<int64_t>();
  if (layout == 2) {
    r.map = padded_map(bf, T, B, nullptr);
    r.R = T * B;
    r.lengths.assign(p, p + B);
  } else if (layout == 0) {
    r.R = N;
    r.starts.resize(B + 1);
    r.lengths.resize(B);
    emu_launch_seq((B + 256) / 256, 256, [&] {
      offsets_prep_kernel<int64_t>(p, B, N, T, r.starts.data(), r.lengths.data());
    });
    r.map = offsets_map(r.starts.data(), nullptr);
  } else {
    const int64_t steps = idx.size(0);
    r.R = N;
    r.starts.resize(steps + 1);
    r.lengths.resize(B);
    packed_rows(p, steps, B, r.starts.data(), r.lengths.data());
    r.map = packed_map(r.starts.data(), nullptr);
    if (sorted_indices.numel() > 0) {
      const torch::Tensor si = sorted_indices.contiguous();
      std::vector<int> count(B, 0);
      r.order = torch::empty({B}, torch::kLong);
      emu_launch_seq((B + 255) / 256, 256, [&] {
        permutation_count_kernel(si.data_ptr<int64_t>(), B, count.data(),
                                 r.order.data_ptr<int64_t>());
      });
      emu_launch_seq((B + 255) / 256, 256, [&] { permutation_check_kernel(count.data(), B); });
    }
  }
  r.l = prep(r.lengths.data(), (int)B, (int)T);
  return r;
}

torch::Tensor to_rank(const Rows& r, const torch::Tensor& t) {
  return r.order.defined() ? t.index_select(1, r.order).contiguous() : t.contiguous();
}
torch::Tensor to_sequence(const Rows& r, const torch::Tensor& t) {
  return r.order.defined() ? torch::empty_like(t).index_copy_(1, r.order, t) : t;
}

template <typename scalar_t, typename acc_t>
void fill_common(PersistentCommonArgs& a, const Rows& r, const plan::Cut& cut, int64_t T, int64_t B,
                 int64_t H, int64_t D) {
  a.lens = r.l.lens.data();
  a.perm = r.l.perm.data();
  a.sorted = r.l.sorted.data();
  a.rows = r.map;
  a.R = r.R;
  a.T = T;
  a.B = B;
  a.H = H;
  a.D = D;
  a.ps = PersistentShape{(int)cut.J, (int)cut.blocks_per_dir, (int)cut.tile_rows, (int)cut.kc};
}

// The launchers' tensor set-up (gru_cuda.cu), in the storage dtype scalar_t with acc_t state,
// workspace and exchange buffers, around the emulated kernels. hx, h_n in sequence order.
template <typename scalar_t>
std::vector<torch::Tensor> forward_t(const torch::Tensor& gx, const torch::Tensor& w_hh,
                                     const c10::optional<torch::Tensor>& b_hh,
                                     const torch::Tensor& hx_b, const Rows& r, int64_t T,
                                     bool persistent, int64_t sms, int64_t smem, int64_t max_kc,
                                     bool mma) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t D = w_hh.size(0), H = w_hh.size(2), B = hx_b.size(1);
  const at::TensorOptions opts = gx.options();
  const at::TensorOptions acc_opts = opts.dtype(c10::CppTypeToScalarType<acc_t>::value);
  const bool half = !std::is_same<scalar_t, acc_t>::value;
  const torch::Tensor hx = to_rank(r, hx_b);
  torch::Tensor out = torch::full({r.R, D * H}, 777.0, opts);
  torch::Tensor h_n = torch::full({D, B, H}, 777.0, opts);
  torch::Tensor ws = torch::full({D, r.R, 4 * H}, 777.0, acc_opts);
  torch::Tensor cut_info = torch::empty({0}, torch::kLong);
  if (persistent) {
    const plan::Cut cut =
        cut_of(B, H, D, plan::Pass::kTraining, sizeof(scalar_t), sizeof(acc_t), sms, smem, max_kc);
    cut_info = cut_tensor(cut);
    torch::Tensor hbuf = torch::full({2, D, B, H}, 777.0, acc_opts);
    PersistentForwardArgs<scalar_t, acc_t> a{};
    a.gx = gx.data_ptr<scalar_t>();
    a.w_hh = w_hh.data_ptr<scalar_t>();
    a.b_hh = b_hh ? b_hh->data_ptr<scalar_t>() : nullptr;
    a.hx = hx.data_ptr<scalar_t>();
    a.hbuf = hbuf.data_ptr<acc_t>();
    a.out = out.data_ptr<scalar_t>();
    a.h_n = h_n.data_ptr<scalar_t>();
    a.ws = ws.data_ptr<acc_t>();
    fill_common<scalar_t, acc_t>(a, r, cut, T, B, H, D);
    if constexpr (std::is_same<acc_t, float>::value) {
      if (mma) {
        emu_launch(cut.blocks, kPersistThreads, cut.smem,
                   [&] { persistent_forward_kernel<scalar_t, acc_t, true>(a); });
        return {out, to_sequence(r, h_n), ws, cut_info};
      }
    }
    TORCH_CHECK(!mma, "the tensor-core path takes float32, float16 or bfloat16");
    emu_launch(cut.blocks, kPersistThreads, cut.smem,
               [&] { persistent_forward_kernel<scalar_t, acc_t>(a); });
  } else {
    torch::Tensor h = hx.to(acc_opts.dtype(), false, /*copy=*/true);  // updated in place
    torch::Tensor h_lo = half ? hx.clone() : h;  // the GEMM's operand, rounded for half types
    torch::Tensor w_t = w_hh.transpose(1, 2);
    torch::Tensor gh = torch::empty({D, B, 3 * H}, opts);
    for (int64_t s = 0; s < T; ++s) {
      if (b_hh)
        torch::baddbmm_out(gh, b_hh->view({D, 1, 3 * H}).expand({D, B, 3 * H}), h_lo, w_t);
      else
        torch::bmm_out(gh, h_lo, w_t);
      emu_launch_seq((D * B * H + 255) / 256, 256, [&] {
        fallback_forward_step_kernel<scalar_t, acc_t>(
            gx.data_ptr<scalar_t>(), gh.data_ptr<scalar_t>(), r.l.lens.data(), h.data_ptr<acc_t>(),
            half ? h_lo.data_ptr<scalar_t>() : nullptr, out.data_ptr<scalar_t>(),
            ws.data_ptr<acc_t>(), s, B, H, D, r.map, r.R);
      });
    }
    h_n.copy_(h);
  }
  return {out, to_sequence(r, h_n), ws, cut_info};
}

template <typename scalar_t>
std::vector<torch::Tensor> backward_t(const torch::Tensor& go, const torch::Tensor& ghn_b,
                                      const torch::Tensor& out, const torch::Tensor& hx_b,
                                      const torch::Tensor& ws, const torch::Tensor& w_hh,
                                      const Rows& r, int64_t T, bool persistent, int64_t sms,
                                      int64_t smem, int64_t max_kc, bool mma) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t D = w_hh.size(0), H = w_hh.size(2), B = hx_b.size(1);
  const at::TensorOptions opts = go.options();
  const at::TensorOptions acc_opts = opts.dtype(c10::CppTypeToScalarType<acc_t>::value);
  const torch::Tensor hx = to_rank(r, hx_b), ghn = to_rank(r, ghn_b);
  torch::Tensor dgx = torch::full({r.R, D * 3 * H}, 777.0, opts);
  torch::Tensor dgh = torch::full({D, r.R, 3 * H}, 777.0, opts);
  torch::Tensor hprev = torch::full({D, r.R, H}, 777.0, opts);
  torch::Tensor grad_hx = torch::full({D, B, H}, 777.0, opts);
  torch::Tensor cut_info = torch::empty({0}, torch::kLong);
  if (persistent) {
    const plan::Cut cut =
        cut_of(B, H, D, plan::Pass::kBackward, sizeof(scalar_t), sizeof(acc_t), sms, smem, max_kc);
    cut_info = cut_tensor(cut);
    torch::Tensor dh = torch::full({D, B, H}, 777.0, acc_opts);
    PersistentBackwardArgs<scalar_t, acc_t> a{};
    a.grad_out = go.data_ptr<scalar_t>();
    a.out = out.data_ptr<scalar_t>();
    a.hx = hx.data_ptr<scalar_t>();
    a.grad_h_n = ghn.data_ptr<scalar_t>();
    a.ws = ws.data_ptr<acc_t>();
    a.w_hh = w_hh.data_ptr<scalar_t>();
    a.dh = dh.data_ptr<acc_t>();
    a.dgx = dgx.data_ptr<scalar_t>();
    a.dgh = dgh.data_ptr<scalar_t>();
    a.hprev = hprev.data_ptr<scalar_t>();
    a.grad_hx = grad_hx.data_ptr<scalar_t>();
    fill_common<scalar_t, acc_t>(a, r, cut, T, B, H, D);
    if constexpr (std::is_same<acc_t, float>::value) {
      if (mma) {
        emu_launch(cut.blocks, kPersistThreads, cut.smem,
                   [&] { persistent_backward_kernel<scalar_t, acc_t, true>(a); });
        return {dgx, dgh, hprev, to_sequence(r, grad_hx), cut_info};
      }
    }
    TORCH_CHECK(!mma, "the tensor-core path takes float32, float16 or bfloat16");
    emu_launch(cut.blocks, kPersistThreads, cut.smem,
               [&] { persistent_backward_kernel<scalar_t, acc_t>(a); });
  } else {
    torch::Tensor dh_a = ghn.to(acc_opts.dtype(), false, /*copy=*/true);
    torch::Tensor dh_a_next = torch::full_like(dh_a, 777.0);
    torch::Tensor dh_b = torch::zeros_like(ghn);  // the GEMM part, in the storage dtype
    torch::Tensor dgh_step = torch::full({D, B, 3 * H}, 777.0, opts);
    for (int64_t s = T - 1; s >= 0; --s) {
      emu_launch_seq((D * B * H + 255) / 256, 256, [&] {
        fallback_backward_step_kernel<scalar_t, acc_t>(
            go.data_ptr<scalar_t>(), out.data_ptr<scalar_t>(), hx.data_ptr<scalar_t>(),
            ws.data_ptr<acc_t>(), r.l.lens.data(), dh_a.data_ptr<acc_t>(),
            dh_b.data_ptr<scalar_t>(), dh_a_next.data_ptr<acc_t>(), dgx.data_ptr<scalar_t>(),
            dgh.data_ptr<scalar_t>(), dgh_step.data_ptr<scalar_t>(), hprev.data_ptr<scalar_t>(), s,
            B, H, D, r.map, r.R);
      });
      std::swap(dh_a, dh_a_next);
      torch::bmm_out(dh_b, dgh_step, w_hh);
    }
    grad_hx.copy_(dh_a.add_(dh_b));
  }
  return {dgx, dgh, hprev, to_sequence(r, grad_hx), cut_info};
}

// layout, seq_index, sorted_indices, T, bf: see rows_of. The knobs: persistent or fallback;
// the pretend device's SM count and shared memory per block; the K-chunk cap.
std::vector<torch::Tensor> forward(torch::Tensor gx, torch::Tensor w_hh,
                                   c10::optional<torch::Tensor> b_hh, torch::Tensor hx,
                                   int64_t layout, torch::Tensor seq_index,
                                   torch::Tensor sorted_indices, int64_t T, bool bf,
                                   bool persistent, int64_t sms, int64_t smem, int64_t max_kc,
                                   bool mma) {
  const Rows r =
      rows_of(layout, seq_index, sorted_indices, T, bf, hx.size(1), layout == 2 ? 0 : gx.size(0));
  std::vector<torch::Tensor> res;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, gx.scalar_type(), "emu_forward", [&] {
    res = forward_t<scalar_t>(gx, w_hh, b_hh, hx, r, T, persistent, sms, smem, max_kc, mma);
  });
  return res;
}

std::vector<torch::Tensor> backward(torch::Tensor go, torch::Tensor ghn, torch::Tensor out,
                                    torch::Tensor hx, torch::Tensor ws, torch::Tensor w_hh,
                                    int64_t layout, torch::Tensor seq_index,
                                    torch::Tensor sorted_indices, int64_t T, bool bf,
                                    bool persistent, int64_t sms, int64_t smem, int64_t max_kc,
                                    bool mma) {
  const Rows r =
      rows_of(layout, seq_index, sorted_indices, T, bf, hx.size(1), layout == 2 ? 0 : go.size(0));
  std::vector<torch::Tensor> res;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, go.scalar_type(), "emu_backward", [&] {
    res =
        backward_t<scalar_t>(go, ghn, out, hx, ws, w_hh, r, T, persistent, sms, smem, max_kc, mma);
  });
  return res;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("forward", &forward);
  m.def("backward", &backward);
}
