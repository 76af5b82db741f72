// CUDA backend of varlen_rnn: launchers + TORCH_LIBRARY_IMPL(varlen_rnn, CUDA).
//
// Per layer: the input projection of every step and both directions is one
// GEMM (cuBLAS via ATen). The recurrence then runs on one of two paths:
//   persistent  one cooperative launch for all steps (persistent.cuh), W_hh
//               resident on chip, a grid barrier per step;
//   fallback    per step one batched GEMM (both directions) + one fused
//               pointwise kernel (pointwise.cuh), for shapes that do not fit.
// VARLEN_RNN_CUDA_PATH=auto|persistent|fallback picks (auto: persistent when it
// fits; VARLEN_RNN_PERSISTENT_MAX_KC caps its K chunk, for tests). The backward mirrors this, then forms the weight gradients as GEMMs
// over all steps. Nothing copies lengths to the host: lengths are validated
// and sorted on the device, so both ops are CUDA-graph capturable.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>
#include <ATen/cuda/CUDAContext.h>
#include <ATen/ops/addmm.h>
#include <ATen/ops/arange.h>
#include <ATen/ops/baddbmm.h>
#include <ATen/ops/bmm.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/sort.h>
#include <ATen/ops/sum.h>
#include <ATen/ops/zeros.h>
#include <ATen/ops/zeros_like.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <cstdlib>
#include <cstring>
#include <map>
#include <mutex>
#include <string>
#include <tuple>
#include <utility>
#include <vector>

#include "gru.h"
#include "persistent.cuh"
#include "pointwise.cuh"

namespace varlen_rnn {
namespace cuda {
namespace {

using at::Tensor;

enum class Path { kAuto, kPersistent, kFallback };

Path requested_path() {
  const char* env = std::getenv("VARLEN_RNN_CUDA_PATH");
  if (env == nullptr || *env == '\0' || std::strcmp(env, "auto") == 0) return Path::kAuto;
  if (std::strcmp(env, "persistent") == 0) return Path::kPersistent;
  if (std::strcmp(env, "fallback") == 0) return Path::kFallback;
  TORCH_CHECK(false, "VARLEN_RNN_CUDA_PATH must be auto, persistent or fallback, got '", env, "'");
}

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// The cut of a persistent launch that fits the current device, or why none
// does. The block count never exceeds the SM count, so one block per SM must
// be resident; the cooperative launch itself verifies co-residency again.
struct PersistentPlan {
  bool ok = false;
  bool cacheable = true;  // false after a CUDA API error: plan again next call
  std::string why;
  PersistentShape ps{};
  int blocks = 0;
  size_t smem = 0;
};

template <typename Kernel>
PersistentPlan plan_persistent(Kernel kernel, int64_t H, int64_t D, bool backward,
                               size_t w_bytes, size_t acc_bytes) {
  PersistentPlan p;
  const cudaDeviceProp* prop = at::cuda::getCurrentDeviceProperties();
  if (!prop->cooperativeLaunch) {
    p.why = "the device does not support cooperative launches";
    return p;
  }
  const int64_t sms = prop->multiProcessorCount;
  // The fewest units per block that keeps every block on its own SM, then
  // the same block count with balanced slices.
  const int64_t bpd = ceil_div(H, ceil_div(H, std::max<int64_t>(1, sms / D)));
  const int64_t J_bal = ceil_div(H, bpd);
  // Matches the kernels' layout (persistent.cuh): forward items are single
  // units with 3 gate rows of length H; backward items group 3 units, rows of
  // length 3H. Both reduce 3 x kRows dot products per warp item.
  const int64_t U = backward ? ceil_div(J_bal, 3) : J_bal;
  const int64_t K = backward ? 3 * H : H;
  // What this kernel can launch with: its register use caps the block size,
  // and any static shared memory comes off the opt-in dynamic limit (asking
  // cudaFuncSetAttribute for more than optin - static is an error).
  cudaFuncAttributes attr{};
  if (cudaFuncGetAttributes(&attr, kernel) != cudaSuccess) {
    (void)cudaGetLastError();  // not sticky: clear it, fall back
    p.why = "cudaFuncGetAttributes failed";
    p.cacheable = false;
    return p;
  }
  if (attr.maxThreadsPerBlock < kPersistThreads) {
    p.why = "the kernel uses too many registers for " + std::to_string(kPersistThreads) +
            " threads per block";
    return p;
  }
  if (prop->sharedMemPerBlockOptin <= attr.sharedSizeBytes) {
    p.why = "no dynamic shared memory left beside the kernel's static shared memory";
    return p;
  }
  const size_t optin = prop->sharedMemPerBlockOptin - attr.sharedSizeBytes;
  const size_t w_smem = static_cast<size_t>((backward ? 3 * U : 3 * J_bal) * K) * w_bytes;
  for (int64_t R = std::min<int64_t>(4, ceil_div(kPersistWarps, U)); R >= 1; --R) {
    const int64_t rows = kRows * R;
    const size_t acc_smem = static_cast<size_t>(U * R * 3 * kRows) * acc_bytes;
    if (w_smem + acc_smem >= optin) continue;
    int64_t kc = static_cast<int64_t>((optin - w_smem - acc_smem) / (rows * acc_bytes));
    if (kc < K) kc = kc / 32 * 32;
    kc = std::min(kc, K);
    // Test knob: a smaller K chunk, so small shapes exercise the chunked path.
    if (const char* cap = std::getenv("VARLEN_RNN_PERSISTENT_MAX_KC")) {
      const int64_t c = std::max<int64_t>(32, std::atoll(cap) / 32 * 32);
      if (std::atoll(cap) > 0 && c < kc) kc = c;
    }
    if (kc < std::min<int64_t>(K, 32)) continue;
    p.ps = PersistentShape{static_cast<int>(J_bal), static_cast<int>(bpd),
                           static_cast<int>(rows), static_cast<int>(kc)};
    p.blocks = static_cast<int>(D * bpd);
    p.smem = static_cast<size_t>(rows * kc) * acc_bytes + acc_smem + w_smem;
    // The device's limit rather than p.smem: plans of other shapes are cached
    // and launch later without setting the attribute again.
    // A failure here makes the plan "does not fit" (auto falls back; forced
    // persistent reports why) instead of failing every call of the op.
    cudaError_t err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                           static_cast<int>(optin));
    int per_sm = 0;
    if (err == cudaSuccess) {
      err = cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, kPersistThreads, p.smem);
    }
    if (err != cudaSuccess) {
      (void)cudaGetLastError();
      p.why = std::string("setting up the launch failed: ") + cudaGetErrorString(err);
      p.cacheable = false;
      return p;
    }
    if (static_cast<int64_t>(per_sm) * sms < p.blocks) {
      p.why = "not enough blocks resident (" + std::to_string(per_sm) + " per SM)";
      return p;
    }
    p.ok = true;
    return p;
  }
  p.why = "W_hh slice of " + std::to_string(w_smem) + " bytes per block does not fit in " +
          std::to_string(optin) + " bytes of shared memory";
  return p;
}

// Decides the path; errors when persistent is forced but impossible, so tests
// that compare the paths never compare the fallback with itself.
template <typename Kernel>
bool use_persistent(Kernel kernel, int64_t H, int64_t D, bool backward, size_t w_bytes,
                    size_t acc_bytes, PersistentPlan& plan) {
  const Path path = requested_path();
  if (path == Path::kFallback) return false;
  // Cached per device and shape: after a warm-up, a CUDA-graph capture makes no
  // attribute or occupancy calls at all.
  const char* cap = std::getenv("VARLEN_RNN_PERSISTENT_MAX_KC");
  const auto key = std::make_tuple(static_cast<int>(c10::cuda::current_device()),
                                   reinterpret_cast<const void*>(kernel), H, D, backward,
                                   std::string(cap == nullptr ? "" : cap));
  static std::mutex mutex;
  static std::map<decltype(key), PersistentPlan> cache;
  {
    std::lock_guard<std::mutex> lock(mutex);
    auto it = cache.find(key);
    if (it == cache.end()) {
      it = cache.emplace(key, plan_persistent(kernel, H, D, backward, w_bytes, acc_bytes)).first;
    }
    plan = it->second;
    if (!plan.cacheable) cache.erase(it);
  }
  TORCH_CHECK(plan.ok || path == Path::kAuto,
              "VARLEN_RNN_CUDA_PATH=persistent but the persistent kernel cannot run: ", plan.why);
  return plan.ok;
}

struct Lengths {
  Tensor lens, perm, sorted;  // int32 [B]; perm/sorted only when asked
};

// Up to this batch the order comes from the counting kernel (O(B^2) compares, one
// launch); beyond it from ATen's device sort. Both are stable and sync-free.
constexpr int64_t kRankSortMaxB = 8192;

Lengths prepare_lengths(const Tensor& lengths, int64_t T, bool with_perm, cudaStream_t stream) {
  const int64_t B = lengths.size(0);
  const auto opts = lengths.options().dtype(at::kInt);
  Lengths l;
  l.lens = at::empty({B}, opts);
  const bool big = with_perm && B > kRankSortMaxB;
  if (with_perm && !big) {
    l.perm = at::empty({B}, opts);
    l.sorted = at::empty({B}, opts);
  }
  const Tensor src = lengths.contiguous();
  const int blocks = static_cast<int>(ceil_div(B, kPointwiseThreads));
  AT_DISPATCH_INDEX_TYPES(src.scalar_type(), "varlen_rnn_lengths_prep", [&] {
    lengths_prep_kernel<index_t><<<blocks, kPointwiseThreads, 0, stream>>>(
        src.data_ptr<index_t>(), static_cast<int>(B), static_cast<int>(T),
        l.lens.data_ptr<int>(), l.perm.defined() ? l.perm.data_ptr<int>() : nullptr,
        l.sorted.defined() ? l.sorted.data_ptr<int>() : nullptr);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  if (big) {
    auto sorted = at::sort(l.lens, /*stable=*/true, /*dim=*/0, /*descending=*/true);
    l.sorted = std::get<0>(sorted).contiguous();
    l.perm = std::get<1>(sorted).to(at::kInt).contiguous();
  }
  return l;
}

void launch_cooperative(const void* kernel, int blocks, size_t smem, void* args,
                        cudaStream_t stream) {
  void* arg_list[] = {args};
  C10_CUDA_CHECK(cudaLaunchCooperativeKernel(kernel, dim3(blocks), dim3(kPersistThreads), arg_list,
                                             smem, stream));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// The fields both persistent launches share (see PersistentCommonArgs).
void fill_common(PersistentCommonArgs& a, const Lengths& l, RowStrides xs, RowStrides os,
                 int64_t T, int64_t B, int64_t H, int64_t D, const PersistentShape& ps) {
  a.lens = l.lens.data_ptr<int>();
  a.perm = l.perm.data_ptr<int>();
  a.sorted = l.sorted.data_ptr<int>();
  a.xs = xs;
  a.os = os;
  a.T = static_cast<int>(T);
  a.B = static_cast<int>(B);
  a.H = static_cast<int>(H);
  a.D = static_cast<int>(D);
  a.ps = ps;
}

std::tuple<Tensor, Tensor, Tensor> gru_layer_forward_cuda(
    const Tensor& input, const Tensor& lengths, const Tensor& hx, const Tensor& w_ih,
    const Tensor& w_hh, const std::optional<Tensor>& b_ih, const std::optional<Tensor>& b_hh,
    bool batch_first, bool need_workspace) {
  const NoAutocastGuard no_autocast;
  const LayerDims dm = check_layer_args(input, lengths, hx, w_ih, w_hh, b_ih, b_hh, batch_first);
  const int64_t T = dm.T, B = dm.B, I = dm.I, H = dm.H, D = dm.D;
  TORCH_CHECK(T * B < (int64_t{1} << 31) && B < (int64_t{1} << 30),
              "T*B must be below 2^31, got T=", T, ", B=", B);
  c10::cuda::CUDAGuard guard(input.device());
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const auto acc_type = opmath_dtype(input.scalar_type());
  const auto opts = input.options();
  const std::vector<int64_t> out_sizes =
      batch_first ? std::vector<int64_t>{B, T, D * H} : std::vector<int64_t>{T, B, D * H};
  Tensor out = at::empty(out_sizes, opts);
  Tensor h_n = at::empty({D, B, H}, opts);
  Tensor ws = need_workspace ? at::empty({D, T * B, 4 * H}, opts.dtype(acc_type))
                             : at::empty({0}, opts.dtype(acc_type));
  if (B == 0) return {out, h_n, ws};
  if (T == 0) {
    prepare_lengths(lengths, T, false, stream);  // still asserts lengths == 0
    h_n.copy_(hx);
    return {out, h_n, ws};
  }
  // gx rows follow the input's layout: one GEMM for all steps and directions.
  const Tensor x2d = input.contiguous().view({T * B, I});
  const Tensor w_ih2d = w_ih.contiguous().view({D * 3 * H, I});
  const Tensor gx = b_ih.has_value() ? at::addmm(b_ih->contiguous().view({D * 3 * H}), x2d, w_ih2d.t())
                                     : at::mm(x2d, w_ih2d.t());  // [T*B, D*3H]
  const RowStrides xs = batch_first ? RowStrides{D * 3 * H, T * D * 3 * H}
                                    : RowStrides{B * D * 3 * H, D * 3 * H};
  const RowStrides os{dm.stride_t(D * H), dm.stride_b(D * H)};
  const Tensor hx_c = hx.contiguous();
  const Tensor w_hh_c = w_hh.contiguous();
  const Tensor b_hh_c = b_hh.has_value() ? b_hh->contiguous() : Tensor();

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(),
                                  "varlen_rnn_gru_forward_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    auto kernel = persistent_forward_kernel<scalar_t, acc_t>;
    PersistentPlan plan;
    if (use_persistent(kernel, H, D, false, sizeof(scalar_t), sizeof(acc_t), plan)) {
      const Lengths l = prepare_lengths(lengths, T, true, stream);
      Tensor hbuf = at::empty({2, D, B, H}, opts.dtype(acc_type));
      PersistentForwardArgs<scalar_t, acc_t> a{};
      a.gx = gx.data_ptr<scalar_t>();
      a.w_hh = w_hh_c.data_ptr<scalar_t>();
      a.b_hh = b_hh_c.defined() ? b_hh_c.data_ptr<scalar_t>() : nullptr;
      a.hx = hx_c.data_ptr<scalar_t>();
      a.hbuf = hbuf.data_ptr<acc_t>();
      a.out = out.data_ptr<scalar_t>();
      a.h_n = h_n.data_ptr<scalar_t>();
      a.ws = need_workspace ? ws.data_ptr<acc_t>() : nullptr;
      fill_common(a, l, xs, os, T, B, H, D, plan.ps);
      launch_cooperative(reinterpret_cast<const void*>(kernel), plan.blocks, plan.smem, &a, stream);
      return;
    }
    // The state h stays in acc_t; the GEMM runs in the storage dtype (tensor cores for
    // half types, on a rounded copy h_lo that the step kernel keeps).
    const Lengths l = prepare_lengths(lengths, T, false, stream);
    const bool half = acc_type != input.scalar_type();
    Tensor h = at::empty({D, B, H}, opts.dtype(acc_type));
    h.copy_(hx);
    Tensor h_lo = half ? hx_c.clone() : h;
    const Tensor w_hh_t = w_hh_c.transpose(1, 2);  // [D, H, 3H]
    const Tensor bias = b_hh_c.defined() ? b_hh_c.view({D, 1, 3 * H}).expand({D, B, 3 * H}) : Tensor();
    Tensor gh = at::empty({D, B, 3 * H}, opts);
    const int blocks = static_cast<int>(ceil_div(D * B * H, kPointwiseThreads));
    for (int64_t s = 0; s < T; ++s) {
      if (bias.defined()) {
        at::baddbmm_out(gh, bias, h_lo, w_hh_t);
      } else {
        at::bmm_out(gh, h_lo, w_hh_t);
      }
      fallback_forward_step_kernel<scalar_t, acc_t><<<blocks, kPointwiseThreads, 0, stream>>>(
          gx.data_ptr<scalar_t>(), gh.data_ptr<scalar_t>(), l.lens.data_ptr<int>(),
          h.data_ptr<acc_t>(), half ? h_lo.data_ptr<scalar_t>() : nullptr, out.data_ptr<scalar_t>(),
          need_workspace ? ws.data_ptr<acc_t>() : nullptr, static_cast<int>(s),
          static_cast<int>(T), static_cast<int>(B), static_cast<int>(H), static_cast<int>(D), xs, os);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
    h_n.copy_(h);
  });
  return {out, h_n, ws};
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> gru_layer_backward_cuda(
    const Tensor& grad_output, const Tensor& grad_h_n, const Tensor& input,
    const Tensor& lengths, const Tensor& hx, const Tensor& w_ih, const Tensor& w_hh,
    const Tensor& output, const Tensor& workspace, bool batch_first) {
  const NoAutocastGuard no_autocast;
  const LayerDims dm =
      check_layer_args(input, lengths, hx, w_ih, w_hh, std::nullopt, std::nullopt, batch_first);
  check_backward_args(dm, input, grad_output, grad_h_n, output, workspace, dm.T * dm.B);
  const int64_t T = dm.T, B = dm.B, I = dm.I, H = dm.H, D = dm.D;
  const auto acc_type = opmath_dtype(input.scalar_type());
  c10::cuda::CUDAGuard guard(input.device());
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const auto opts = input.options();

  Tensor grad_hx = at::empty({D, B, H}, opts);
  if (B == 0 || T == 0) {
    if (B > 0) prepare_lengths(lengths, T, false, stream);
    grad_hx.copy_(grad_h_n);
    return {at::zeros_like(input, at::MemoryFormat::Contiguous), grad_hx, at::zeros_like(w_ih),
            at::zeros_like(w_hh), at::zeros({D, 3 * H}, opts), at::zeros({D, 3 * H}, opts)};
  }
  const Tensor go = grad_output.contiguous();
  const Tensor out = output.contiguous();
  const Tensor ws = workspace.contiguous();
  const Tensor hx_c = hx.contiguous();
  const Tensor w_hh_c = w_hh.contiguous();
  const Tensor x2d = input.contiguous().view({T * B, I});
  const Tensor w_ih2d = w_ih.contiguous().view({D * 3 * H, I});
  const RowStrides xs = batch_first ? RowStrides{D * 3 * H, T * D * 3 * H}
                                    : RowStrides{B * D * 3 * H, D * 3 * H};
  const RowStrides os{dm.stride_t(D * H), dm.stride_b(D * H)};
  Tensor dgx = at::empty({T * B, D * 3 * H}, opts);                    // input-layout rows
  // Gate gradients only feed GEMMs: kept in the storage dtype (tensor cores for half types).
  Tensor dgh = at::empty({D, T * B, 3 * H}, opts);  // step-major rows
  Tensor hprev = at::empty({D, T * B, H}, opts);

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(),
                                  "varlen_rnn_gru_backward_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    auto kernel = persistent_backward_kernel<scalar_t, acc_t>;
    PersistentPlan plan;
    if (use_persistent(kernel, H, D, true, sizeof(scalar_t), sizeof(acc_t), plan)) {
      const Lengths l = prepare_lengths(lengths, T, true, stream);
      const Tensor ghn = grad_h_n.contiguous();
      Tensor dh = at::empty({D, B, H}, opts.dtype(acc_type));
      PersistentBackwardArgs<scalar_t, acc_t> a{};
      a.grad_out = go.data_ptr<scalar_t>();
      a.out = out.data_ptr<scalar_t>();
      a.hx = hx_c.data_ptr<scalar_t>();
      a.grad_h_n = ghn.data_ptr<scalar_t>();
      a.ws = ws.data_ptr<acc_t>();
      a.w_hh = w_hh_c.data_ptr<scalar_t>();
      a.dh = dh.data_ptr<acc_t>();
      a.dgx = dgx.data_ptr<scalar_t>();
      a.dgh = dgh.data_ptr<scalar_t>();
      a.hprev = hprev.data_ptr<scalar_t>();
      a.grad_hx = grad_hx.data_ptr<scalar_t>();
      fill_common(a, l, xs, os, T, B, H, D, plan.ps);
      launch_cooperative(reinterpret_cast<const void*>(kernel), plan.blocks, plan.smem, &a, stream);
      return;
    }
    // dh after step s = dh_a (direct part, acc_t) + dh_b (dgh_{s+1} @ W_hh, a GEMM in the
    // storage dtype); the step kernel reads both and writes the next direct part.
    const Lengths l = prepare_lengths(lengths, T, false, stream);
    Tensor dh_a = at::empty({D, B, H}, opts.dtype(acc_type));
    dh_a.copy_(grad_h_n);
    Tensor dh_a_next = at::empty({D, B, H}, opts.dtype(acc_type));
    Tensor dh_b = at::zeros({D, B, H}, opts);
    const Tensor dgh4 = dgh.view({D, T, B, 3 * H});
    const int blocks = static_cast<int>(ceil_div(D * B * H, kPointwiseThreads));
    for (int64_t s = T - 1; s >= 0; --s) {
      fallback_backward_step_kernel<scalar_t, acc_t><<<blocks, kPointwiseThreads, 0, stream>>>(
          go.data_ptr<scalar_t>(), out.data_ptr<scalar_t>(), hx_c.data_ptr<scalar_t>(),
          ws.data_ptr<acc_t>(), l.lens.data_ptr<int>(), dh_a.data_ptr<acc_t>(),
          dh_b.data_ptr<scalar_t>(), dh_a_next.data_ptr<acc_t>(), dgx.data_ptr<scalar_t>(),
          dgh.data_ptr<scalar_t>(), hprev.data_ptr<scalar_t>(), static_cast<int>(s),
          static_cast<int>(T), static_cast<int>(B), static_cast<int>(H), static_cast<int>(D), xs, os);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      std::swap(dh_a, dh_a_next);
      at::bmm_out(dh_b, dgh4.select(1, s), w_hh_c);  // [D, B, 3H] @ [D, 3H, H]
    }
    grad_hx.copy_(dh_a.add_(dh_b));
  });

  // Weight and input gradients: GEMMs over all steps, no atomics.
  const Tensor grad_input = at::mm(dgx, w_ih2d).view(input.sizes());
  // Padded positions of x are never read, whatever they hold (NaN included): their dgx rows
  // are 0, but 0 * NaN is not, so the GEMM sees them zeroed (a mask built on the device).
  const Tensor valid = at::arange(T, lengths.options()).unsqueeze(1).lt(lengths.unsqueeze(0));
  const Tensor x_valid = x2d.view(input.sizes())
                             .masked_fill((batch_first ? valid.t() : valid).logical_not().unsqueeze(2), 0)
                             .view({T * B, I});
  const Tensor grad_w_ih = at::mm(dgx.t(), x_valid).view({D, 3 * H, I});
  const Tensor grad_b_ih = at::sum(dgx, {0}, false, acc_type).view({D, 3 * H}).to(input.scalar_type());
  const Tensor grad_w_hh = at::bmm(dgh.transpose(1, 2), hprev);
  const Tensor grad_b_hh = at::sum(dgh, {1}, false, acc_type).to(input.scalar_type());
  return {grad_input, grad_hx, grad_w_ih, grad_w_hh, grad_b_ih, grad_b_hh};
}

}  // namespace
}  // namespace cuda
}  // namespace varlen_rnn

TORCH_LIBRARY_IMPL(varlen_rnn, CUDA, m) {
  m.impl("gru_layer_forward", TORCH_FN(varlen_rnn::cuda::gru_layer_forward_cuda));
  m.impl("gru_layer_backward", TORCH_FN(varlen_rnn::cuda::gru_layer_backward_cuda));
}
