// CUDA backend of varlen_rnn: launchers + TORCH_LIBRARY_IMPL(varlen_rnn, CUDA).
//
// Per layer: the input projection of every step and both directions is one
// GEMM (cuBLAS via ATen). The recurrence then runs on one of two paths:
//   persistent  one cooperative launch for all steps (persistent.cuh), W_hh
//               resident on chip, a grid barrier per step;
//   fallback    per step one batched GEMM (both directions) + one fused
//               pointwise kernel (pointwise.cuh).
// plan.h chooses (VARLEN_RNN_CUDA_PATH=auto: the path its cost model of B, H,
// D, dtype and the SM count says is faster) and cuts the persistent launch;
// launch.h holds the knobs, the per-device kernel facts, the refused-launch
// fallback, the TF32 policy and the lengths check; rows.h puts the rows and
// lengths of either op on the device. The backward mirrors the forward, then
// forms the weight gradients as GEMMs over all steps. With lengths (offsets)
// on the device nothing is copied to the host, so the ops are CUDA-graph
// capturable.
//
// The ragged ops run the same kernels: every per-position buffer (gx, output,
// workspace, dgx, dgh, hprev) has the input's rows through layout.h's RowMap,
// N of them (input.size(0), known without a host sync) instead of T*B. The
// persistent kernel's step loop ends at the longest length, read on the
// device; the fallback's host loop runs max_len steps.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>
#include <ATen/cuda/CUDAContext.h>
#include <ATen/ops/addmm.h>
#include <ATen/ops/arange.h>
#include <ATen/ops/baddbmm.h>
#include <ATen/ops/bmm.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/index_select.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/sum.h>
#include <ATen/ops/zeros.h>
#include <ATen/ops/zeros_like.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <tuple>
#include <utility>
#include <vector>

#include "gru.h"
#include "launch.h"
#include "layout.h"
#include "persistent.cuh"
#include "plan.h"
#include "pointwise.cuh"
#include "rows.h"

namespace varlen_rnn {
namespace cuda {
namespace {

using at::Tensor;
static_assert(plan::kThreads == kPersistThreads && plan::kRowsPerItem == kRows,
              "plan.h must model the kernels' geometry (persistent.cuh)");

// ---- What forward and backward share -----------------------------------------
struct LayerCall {
  LayerDims dims;
  at::TensorOptions opts;   // the input's
  at::ScalarType acc_type;  // op-math dtype: the state, saved gates, sums
  bool tf32 = false;        // float32 GEMMs may use TF32 (nn.GRU's cuDNN policy)
  bool mma = false;         // the persistent kernels' recurrent products on tensor cores
  cudaStream_t stream;
  DeviceRows rows;  // the rows of every per-position buffer, the lengths (rows.h)
  Tensor hx, w_hh;  // contiguous [D, B, H] (rank order when packed), [D, 3H, H]
};

// dims.T is the step loop's bound: the padded time dimension, or max_len.
void set_layer_call(LayerCall& c, const LayerDims& dims, const Tensor& input, const Tensor& hx,
                    const Tensor& w_hh) {
  c.dims = dims;
  c.opts = input.options();
  c.acc_type = opmath_dtype(input.scalar_type());
  c.tf32 = input.scalar_type() == at::kFloat && cudnn_rnn_allows_tf32();
  // Tensor cores (sm_80+) where the fallback's cuBLAS GEMMs would use them too: the half
  // types, and float32 where TF32 is allowed; float64 and exact float32 stay on CUDA cores.
  c.mma = knobs().tensor_cores != 0 && input.scalar_type() != at::kDouble &&
          (input.scalar_type() != at::kFloat || c.tf32) &&
          at::cuda::getCurrentDeviceProperties()->major >= 8;
  c.stream = at::cuda::getCurrentCUDAStream();
  c.hx = hx.contiguous();
  c.w_hh = w_hh.contiguous();
}

struct ForwardCall : LayerCall {
  Tensor gx;            // [R, D*3H] input projection incl. b_ih, the input's rows
  Tensor b_hh;          // [D, 3H] contiguous, or undefined
  Tensor out, h_n, ws;  // outputs: [R, D*H] rows, [D, B, H], [D, R, 4H] or [0]
  bool need_workspace = false;
};

struct BackwardCall : LayerCall {
  Tensor grad_out, out, grad_h_n, ws;  // contiguous, as the forward gave them
  Tensor dgx;                          // [R, D*3H] the input's rows
  Tensor dgh;                          // [D, R, 3H] storage dtype (only feeds GEMMs)
  Tensor hprev;                        // [D, R, H]
  Tensor grad_hx;                      // [D, B, H]
};

// The path of one pass; errors when persistent is forced but cannot run, so tests
// that compare the paths never compare the fallback with itself. kernel_of(mma) is
// the persistent kernel's instantiation. Where the call may use tensor cores
// (c.mma), the tensor-core and the exact persistent kernel are both priced and the
// faster one runs: the model (plan.h) finds the tensor-core kernel slower where its
// fragment loads conflict in shared memory, and auto never picks a slower path.
template <typename KernelOf>
plan::Choice choose(const LayerCall& c, KernelOf kernel_of, plan::Pass pass, int64_t storage_bytes,
                    int64_t acc_bytes) {
  const plan::Path requested = requested_path();
  if (requested == plan::Path::kFallback) return plan::Choice{};
  auto one = [&](bool mma) {
    const KernelFacts facts = kernel_facts(kernel_of(mma));
    plan::Device dev = facts.dev;
    if (!facts.unavailable.empty()) dev.cooperative = false;
    const plan::Problem p{
        c.dims.B, c.dims.H, c.dims.D, pass, storage_bytes, acc_bytes, storage_bytes != 4 || c.tf32,
        mma};
    plan::Choice choice = plan::choose_path(p, dev, requested, knobs().max_kc.load());
    if (!facts.unavailable.empty()) choice.why = facts.unavailable;
    choice.mma = mma;
    return choice;
  };
  plan::Choice choice = one(false);
  if (c.mma) {
    plan::Choice tc = one(true);
    const bool tc_runs = tc.path == plan::Path::kPersistent;
    const bool exact_runs = choice.path == plan::Path::kPersistent;
    const bool forced = knobs().tensor_cores == 1;
    if (tc_runs && (forced || !exact_runs || tc.persistent_us <= choice.persistent_us)) {
      choice = tc;
    }
  }
  TORCH_CHECK(choice.fits || requested == plan::Path::kAuto,
              "VARLEN_RNN_CUDA_PATH=persistent but the persistent kernel cannot run: ", choice.why);
  return choice;
}

PersistentShape shape_of(const plan::Cut& cut) {
  return PersistentShape{static_cast<int>(cut.J), static_cast<int>(cut.blocks_per_dir),
                         static_cast<int>(cut.tile_rows), static_cast<int>(cut.kc)};
}

// The fields both persistent launches share (see PersistentCommonArgs).
void fill_common(PersistentCommonArgs& a, const LayerCall& c, const Lengths& l,
                 const plan::Cut& cut) {
  a.lens = l.lens.data_ptr<int>();
  a.perm = l.perm.data_ptr<int>();
  a.sorted = l.sorted.data_ptr<int>();
  a.rows = c.rows.map;
  a.R = c.rows.R;
  a.T = static_cast<int>(c.dims.T);
  a.B = static_cast<int>(c.dims.B);
  a.H = static_cast<int>(c.dims.H);
  a.D = static_cast<int>(c.dims.D);
  a.ps = shape_of(cut);
}

// A refused launch leaves every output untouched; the caller runs the fallback
// (or, when persistent was forced, reports it).
bool launched_or_allowed_to_fall_back(bool launched) {
  TORCH_CHECK(launched || requested_path() != plan::Path::kPersistent,
              "VARLEN_RNN_CUDA_PATH=persistent but the persistent kernel cannot run: the driver "
              "refused its cooperative launch");
  return launched;
}

// gx = x @ w_ih^T + b_ih: [T*B, D*3H], rows in the input's layout, one GEMM for all
// steps and directions. ATen may run an addmm with a bias through cuBLASLt, which takes
// TF32 from the global matmul flag alone (NoTF32Guard does not reach it): where TF32
// must be off but that flag is on, the bias is added on its own.
Tensor input_projection(const LayerCall& c, const Tensor& x2d, const Tensor& w_ih2d,
                        const std::optional<Tensor>& b_ih) {
  if (!b_ih.has_value()) return at::mm(x2d, w_ih2d.t());
  const Tensor b = b_ih->contiguous().view({-1});
  const bool float32 = c.opts.dtype().toScalarType() == at::kFloat;
  if (float32 && !c.tf32 && at::globalContext().allowTF32CuBLAS()) {
    return at::mm(x2d, w_ih2d.t()).add_(b);
  }
  return at::addmm(b, x2d, w_ih2d.t());
}

// The persistent kernel instantiation for the call: kMma (tensor cores) or not.
template <typename scalar_t>
const void* forward_kernel(bool mma) {
  using acc_t = at::opmath_type<scalar_t>;
  if constexpr (std::is_same<acc_t, float>::value) {
    if (mma) {
      return reinterpret_cast<const void*>(persistent_forward_kernel<scalar_t, acc_t, true>);
    }
  }
  return reinterpret_cast<const void*>(persistent_forward_kernel<scalar_t, acc_t>);
}
template <typename scalar_t>
const void* backward_kernel(bool mma) {
  using acc_t = at::opmath_type<scalar_t>;
  if constexpr (std::is_same<acc_t, float>::value) {
    if (mma) {
      return reinterpret_cast<const void*>(persistent_backward_kernel<scalar_t, acc_t, true>);
    }
  }
  return reinterpret_cast<const void*>(persistent_backward_kernel<scalar_t, acc_t>);
}

// ---- Forward: one function per path -------------------------------------------
template <typename scalar_t>
bool persistent_forward(const ForwardCall& c, const plan::Choice& choice) {
  const plan::Cut& cut = choice.cut;
  using acc_t = at::opmath_type<scalar_t>;
  const LayerDims& dims = c.dims;
  const Lengths l = prepare_lengths(c.rows.lengths, dims.T, true, c.stream);
  Tensor hbuf = at::empty({2, dims.D, dims.B, dims.H}, c.opts.dtype(c.acc_type));
  PersistentForwardArgs<scalar_t, acc_t> a{};
  a.gx = c.gx.data_ptr<scalar_t>();
  a.w_hh = c.w_hh.data_ptr<scalar_t>();
  a.b_hh = c.b_hh.defined() ? c.b_hh.data_ptr<scalar_t>() : nullptr;
  a.hx = c.hx.data_ptr<scalar_t>();
  a.hbuf = hbuf.data_ptr<acc_t>();
  a.out = c.out.data_ptr<scalar_t>();
  a.h_n = c.h_n.data_ptr<scalar_t>();
  a.ws = c.need_workspace ? c.ws.data_ptr<acc_t>() : nullptr;
  fill_common(a, c, l, cut);
  return launch_cooperative(forward_kernel<scalar_t>(choice.mma), cut.blocks, cut.smem, &a,
                            c.stream);
}

// The state h stays in acc_t; the GEMM runs in the storage dtype (tensor cores for
// half types, on a rounded copy h_lo that the step kernel keeps).
template <typename scalar_t>
void fallback_forward(const ForwardCall& c) {
  using acc_t = at::opmath_type<scalar_t>;
  const LayerDims& dims = c.dims;
  const int64_t T = dims.T, B = dims.B, H = dims.H, D = dims.D;
  const Lengths l = prepare_lengths(c.rows.lengths, T, false, c.stream);
  const bool half = c.acc_type != c.opts.dtype().toScalarType();
  Tensor h = at::empty({D, B, H}, c.opts.dtype(c.acc_type));
  h.copy_(c.hx);
  Tensor h_lo = half ? c.hx.clone() : h;
  const Tensor w_hh_t = c.w_hh.transpose(1, 2);  // [D, H, 3H]
  const Tensor bias =
      c.b_hh.defined() ? c.b_hh.view({D, 1, 3 * H}).expand({D, B, 3 * H}) : Tensor();  // [D, B, 3H]
  Tensor gh = at::empty({D, B, 3 * H}, c.opts);
  const int blocks = static_cast<int>(plan::ceil_div(D * B * H, kPointwiseThreads));
  for (int64_t s = 0; s < T; ++s) {
    if (bias.defined()) {
      at::baddbmm_out(gh, bias, h_lo, w_hh_t);
    } else {
      at::bmm_out(gh, h_lo, w_hh_t);
    }
    fallback_forward_step_kernel<scalar_t, acc_t><<<blocks, kPointwiseThreads, 0, c.stream>>>(
        c.gx.data_ptr<scalar_t>(), gh.data_ptr<scalar_t>(), l.lens.data_ptr<int>(),
        h.data_ptr<acc_t>(), half ? h_lo.data_ptr<scalar_t>() : nullptr, c.out.data_ptr<scalar_t>(),
        c.need_workspace ? c.ws.data_ptr<acc_t>() : nullptr, static_cast<int>(s),
        static_cast<int>(B), static_cast<int>(H), static_cast<int>(D), c.rows.map, c.rows.R);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  c.h_n.copy_(h);
}

// The recurrence of one forward call (c.gx, the outputs and the rows set), on
// the path plan.h chooses.
void run_forward(const ForwardCall& c) {
  const plan::Pass pass = c.need_workspace ? plan::Pass::kTraining : plan::Pass::kInference;
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, c.opts.dtype().toScalarType(), "varlen_rnn_gru_forward_cuda", [&] {
        using acc_t = at::opmath_type<scalar_t>;
        const plan::Choice choice =
            choose(c, forward_kernel<scalar_t>, pass, sizeof(scalar_t), sizeof(acc_t));
        if (choice.path == plan::Path::kPersistent &&
            launched_or_allowed_to_fall_back(persistent_forward<scalar_t>(c, choice))) {
          return;
        }
        fallback_forward<scalar_t>(c);
      });
}

// Outputs of a forward call: out [rows, D*H] shaped out_sizes, h_n, workspace.
void make_forward_outputs(ForwardCall& c, const std::vector<int64_t>& out_sizes,
                          bool need_workspace) {
  const LayerDims& dims = c.dims;
  c.need_workspace = need_workspace;
  c.out = at::empty(out_sizes, c.opts);
  c.h_n = at::empty({dims.D, dims.B, dims.H}, c.opts);
  c.ws = need_workspace ? at::empty({dims.D, c.rows.R, 4 * dims.H}, c.opts.dtype(c.acc_type))
                        : at::empty({0}, c.opts.dtype(c.acc_type));
}

std::tuple<Tensor, Tensor, Tensor> gru_layer_forward_cuda(const Tensor& input,
                                                          const Tensor& lengths, const Tensor& hx,
                                                          const Tensor& w_ih, const Tensor& w_hh,
                                                          const std::optional<Tensor>& b_ih,
                                                          const std::optional<Tensor>& b_hh,
                                                          bool batch_first, bool need_workspace) {
  const NoAutocastGuard no_autocast;
  const LayerDims dims = check_layer_args(input, lengths, hx, w_ih, w_hh, b_ih, b_hh, batch_first);
  const int64_t T = dims.T, B = dims.B, I = dims.I, H = dims.H, D = dims.D;
  TORCH_CHECK(T * B < (int64_t{1} << 31) && B < (int64_t{1} << 30),
              "T*B must be below 2^31, got T=", T, ", B=", B);
  c10::cuda::CUDAGuard guard(input.device());
  ForwardCall c;
  set_layer_call(c, dims, input, hx, w_hh);
  c.rows = padded_rows(dims, lengths, input.device());
  const MatmulTf32Guard tf32(input.scalar_type() == at::kFloat, c.tf32);
  make_forward_outputs(c, dims.output_sizes(), need_workspace);
  if (B == 0) return {c.out, c.h_n, c.ws};
  if (T == 0) {
    prepare_lengths(c.rows.lengths, T, false, c.stream);  // device lengths: still asserts == 0
    c.h_n.copy_(hx);
    return {c.out, c.h_n, c.ws};
  }
  const Tensor x2d = input.contiguous().view({T * B, I});
  const Tensor w_ih2d = w_ih.contiguous().view({D * 3 * H, I});
  c.gx = input_projection(c, x2d, w_ih2d, b_ih);
  if (b_hh.has_value()) c.b_hh = b_hh->contiguous();
  run_forward(c);
  return {c.out, c.h_n, c.ws};
}

// Ragged input [N, I]: the same kernels over N rows; max_len bounds the steps.
std::tuple<Tensor, Tensor, Tensor> gru_layer_ragged_forward_cuda(
    const Tensor& input, const Tensor& seq_index, const std::optional<Tensor>& sorted_indices,
    int64_t layout, c10::SymInt max_len, const Tensor& hx, const Tensor& w_ih, const Tensor& w_hh,
    const std::optional<Tensor>& b_ih, const std::optional<Tensor>& b_hh, bool need_workspace) {
  const NoAutocastGuard no_autocast;
  const RaggedDims dims = check_ragged_args(input, seq_index, sorted_indices, layout,
                                            max_len.expect_int(), hx, w_ih, w_hh, b_ih, b_hh);
  const int64_t B = dims.B, N = dims.N, H = dims.H, D = dims.D;
  TORCH_CHECK(dims.T < (int64_t{1} << 31) && B < (int64_t{1} << 30),
              "max_len must be below 2^31 and B below 2^30, got max_len=", dims.T, ", B=", B);
  c10::cuda::CUDAGuard guard(input.device());
  ForwardCall c;
  set_layer_call(c, dims, input, hx, w_hh);
  const MatmulTf32Guard tf32(input.scalar_type() == at::kFloat, c.tf32);
  c.rows = ragged_rows(dims, seq_index, sorted_indices, input.device(), c.stream);
  make_forward_outputs(c, dims.output_sizes(), need_workspace);
  if (N == 0 || dims.T == 0) {  // every length is 0 (the offsets kernel asserts it)
    c.h_n.copy_(hx);
    return {c.out, c.h_n, c.ws};
  }
  c.hx = to_rank_order(c.rows, hx);
  const Tensor w_ih2d = w_ih.contiguous().view({D * 3 * H, dims.I});
  c.gx = input_projection(c, input.contiguous(), w_ih2d, b_ih);
  if (b_hh.has_value()) c.b_hh = b_hh->contiguous();
  run_forward(c);
  return {c.out, to_sequence_order(c.rows, c.h_n), c.ws};
}

// ---- Backward: one function per path ------------------------------------------
template <typename scalar_t>
bool persistent_backward(const BackwardCall& c, const plan::Choice& choice) {
  const plan::Cut& cut = choice.cut;
  using acc_t = at::opmath_type<scalar_t>;
  const LayerDims& dims = c.dims;
  const Lengths l = prepare_lengths(c.rows.lengths, dims.T, true, c.stream);
  Tensor dh = at::empty({dims.D, dims.B, dims.H}, c.opts.dtype(c.acc_type));
  PersistentBackwardArgs<scalar_t, acc_t> a{};
  a.grad_out = c.grad_out.data_ptr<scalar_t>();
  a.out = c.out.data_ptr<scalar_t>();
  a.hx = c.hx.data_ptr<scalar_t>();
  a.grad_h_n = c.grad_h_n.data_ptr<scalar_t>();
  a.ws = c.ws.data_ptr<acc_t>();
  a.w_hh = c.w_hh.data_ptr<scalar_t>();
  a.dh = dh.data_ptr<acc_t>();
  a.dgx = c.dgx.data_ptr<scalar_t>();
  a.dgh = c.dgh.data_ptr<scalar_t>();
  a.hprev = c.hprev.data_ptr<scalar_t>();
  a.grad_hx = c.grad_hx.data_ptr<scalar_t>();
  fill_common(a, c, l, cut);
  return launch_cooperative(backward_kernel<scalar_t>(choice.mma), cut.blocks, cut.smem, &a,
                            c.stream);
}

// dh after step s = dh_a (direct part, acc_t) + dh_b (dgh_{s+1} @ W_hh, a GEMM in the
// storage dtype); the step kernel reads both, writes the next direct part and the
// step's dgh rows [D, B, 3H] for that GEMM.
template <typename scalar_t>
void fallback_backward(const BackwardCall& c) {
  using acc_t = at::opmath_type<scalar_t>;
  const LayerDims& dims = c.dims;
  const int64_t T = dims.T, B = dims.B, H = dims.H, D = dims.D;
  const Lengths l = prepare_lengths(c.rows.lengths, T, false, c.stream);
  Tensor dh_a = at::empty({D, B, H}, c.opts.dtype(c.acc_type));
  dh_a.copy_(c.grad_h_n);
  Tensor dh_a_next = at::empty({D, B, H}, c.opts.dtype(c.acc_type));
  Tensor dh_b = at::zeros({D, B, H}, c.opts);
  Tensor dgh_step = at::empty({D, B, 3 * H}, c.opts);
  const int blocks = static_cast<int>(plan::ceil_div(D * B * H, kPointwiseThreads));
  for (int64_t s = T - 1; s >= 0; --s) {
    fallback_backward_step_kernel<scalar_t, acc_t><<<blocks, kPointwiseThreads, 0, c.stream>>>(
        c.grad_out.data_ptr<scalar_t>(), c.out.data_ptr<scalar_t>(), c.hx.data_ptr<scalar_t>(),
        c.ws.data_ptr<acc_t>(), l.lens.data_ptr<int>(), dh_a.data_ptr<acc_t>(),
        dh_b.data_ptr<scalar_t>(), dh_a_next.data_ptr<acc_t>(), c.dgx.data_ptr<scalar_t>(),
        c.dgh.data_ptr<scalar_t>(), dgh_step.data_ptr<scalar_t>(), c.hprev.data_ptr<scalar_t>(),
        static_cast<int>(s), static_cast<int>(B), static_cast<int>(H), static_cast<int>(D),
        c.rows.map, c.rows.R);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    std::swap(dh_a, dh_a_next);
    at::bmm_out(dh_b, dgh_step, c.w_hh);  // [D, B, 3H] @ [D, 3H, H]
  }
  c.grad_hx.copy_(dh_a.add_(dh_b));
}

// The recurrence of one backward call (inputs, rows and the R-row buffers set),
// then the weight and input gradients as GEMMs over all R rows (no atomics).
// x_rows [R, I]: the input's rows, padded ones zeroed.
std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> run_backward(BackwardCall& c,
                                                                        const Tensor& x_rows,
                                                                        const Tensor& w_ih) {
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, c.opts.dtype().toScalarType(), "varlen_rnn_gru_backward_cuda", [&] {
        using acc_t = at::opmath_type<scalar_t>;
        const plan::Choice choice = choose(c, backward_kernel<scalar_t>, plan::Pass::kBackward,
                                           sizeof(scalar_t), sizeof(acc_t));
        if (choice.path == plan::Path::kPersistent &&
            launched_or_allowed_to_fall_back(persistent_backward<scalar_t>(c, choice))) {
          return;
        }
        fallback_backward<scalar_t>(c);
      });
  const int64_t I = c.dims.I, H = c.dims.H, D = c.dims.D;
  const auto dtype = c.opts.dtype().toScalarType();
  const Tensor w_ih2d = w_ih.contiguous().view({D * 3 * H, I});
  const Tensor grad_input = at::mm(c.dgx, w_ih2d);  // [R, I]
  const Tensor grad_w_ih = at::mm(c.dgx.t(), x_rows).view({D, 3 * H, I});
  const Tensor grad_b_ih = at::sum(c.dgx, {0}, false, c.acc_type).view({D, 3 * H}).to(dtype);
  const Tensor grad_w_hh = at::bmm(c.dgh.transpose(1, 2), c.hprev);
  const Tensor grad_b_hh = at::sum(c.dgh, {1}, false, c.acc_type).to(dtype);
  return {grad_input, c.grad_hx, grad_w_ih, grad_w_hh, grad_b_ih, grad_b_hh};
}

// The backward's saved and incoming tensors, contiguous, and its R-row buffers.
void set_backward_buffers(BackwardCall& c, const Tensor& grad_output, const Tensor& grad_h_n,
                          const Tensor& output, const Tensor& workspace) {
  const int64_t D = c.dims.D, H = c.dims.H, B = c.dims.B;
  c.grad_out = grad_output.contiguous();
  c.out = output.contiguous();
  c.grad_h_n = to_rank_order(c.rows, grad_h_n);
  c.ws = workspace.contiguous();
  c.grad_hx = at::empty({D, B, H}, c.opts);
  c.dgx = at::empty({c.rows.R, D * 3 * H}, c.opts);
  c.dgh = at::empty({D, c.rows.R, 3 * H}, c.opts);
  c.hprev = at::empty({D, c.rows.R, H}, c.opts);
}

// The gradients where no step runs (B, T or N is 0).
std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> empty_backward(const LayerCall& c,
                                                                          const Tensor& input,
                                                                          const Tensor& grad_h_n,
                                                                          const Tensor& w_ih) {
  const int64_t D = c.dims.D, H = c.dims.H;
  return {at::zeros_like(input, at::MemoryFormat::Contiguous),
          grad_h_n.clone(at::MemoryFormat::Contiguous),
          at::zeros_like(w_ih),
          at::zeros_like(c.w_hh),
          at::zeros({D, 3 * H}, c.opts),
          at::zeros({D, 3 * H}, c.opts)};
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> gru_layer_backward_cuda(
    const Tensor& grad_output, const Tensor& grad_h_n, const Tensor& input, const Tensor& lengths,
    const Tensor& hx, const Tensor& w_ih, const Tensor& w_hh, const Tensor& output,
    const Tensor& workspace, bool batch_first) {
  const NoAutocastGuard no_autocast;
  const LayerDims dims =
      check_layer_args(input, lengths, hx, w_ih, w_hh, std::nullopt, std::nullopt, batch_first);
  check_backward_args(dims, input, grad_output, grad_h_n, output, workspace, dims.T * dims.B);
  const int64_t T = dims.T, B = dims.B, I = dims.I;
  c10::cuda::CUDAGuard guard(input.device());
  BackwardCall c;
  set_layer_call(c, dims, input, hx, w_hh);
  c.rows = padded_rows(dims, lengths, input.device());
  const MatmulTf32Guard tf32(input.scalar_type() == at::kFloat, c.tf32);
  if (B == 0 || T == 0) {
    if (B > 0) prepare_lengths(c.rows.lengths, T, false, c.stream);
    return empty_backward(c, input, grad_h_n, w_ih);
  }
  set_backward_buffers(c, grad_output, grad_h_n, output, workspace);
  // Padded positions of x are never read, whatever they hold (NaN included): their dgx rows
  // are 0, but 0 * NaN is not, so the GEMM sees them zeroed (a mask built on the device).
  const Tensor& lengths_d = c.rows.lengths;
  const Tensor valid =
      at::arange(T, lengths_d.options()).unsqueeze(1).lt(lengths_d.unsqueeze(0));  // [T, B]
  const Tensor x_valid =
      input.contiguous()
          .masked_fill((batch_first ? valid.t() : valid).logical_not().unsqueeze(2), 0)
          .view({T * B, I});
  auto grads = run_backward(c, x_valid, w_ih);
  std::get<0>(grads) = std::get<0>(grads).view(input.sizes());
  return grads;
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> gru_layer_ragged_backward_cuda(
    const Tensor& grad_output, const Tensor& grad_h_n, const Tensor& input, const Tensor& seq_index,
    const std::optional<Tensor>& sorted_indices, int64_t layout, c10::SymInt max_len,
    const Tensor& hx, const Tensor& w_ih, const Tensor& w_hh, const Tensor& output,
    const Tensor& workspace) {
  const NoAutocastGuard no_autocast;
  const RaggedDims dims =
      check_ragged_args(input, seq_index, sorted_indices, layout, max_len.expect_int(), hx, w_ih,
                        w_hh, std::nullopt, std::nullopt);
  check_backward_args(dims, input, grad_output, grad_h_n, output, workspace, dims.N);
  TORCH_CHECK(dims.T < (int64_t{1} << 31) && dims.B < (int64_t{1} << 30),
              "max_len must be below 2^31 and B below 2^30, got max_len=", dims.T, ", B=", dims.B);
  c10::cuda::CUDAGuard guard(input.device());
  BackwardCall c;
  set_layer_call(c, dims, input, hx, w_hh);
  const MatmulTf32Guard tf32(input.scalar_type() == at::kFloat, c.tf32);
  c.rows = ragged_rows(dims, seq_index, sorted_indices, input.device(), c.stream);
  if (dims.N == 0 || dims.T == 0) return empty_backward(c, input, grad_h_n, w_ih);
  c.hx = to_rank_order(c.rows, hx);
  set_backward_buffers(c, grad_output, grad_h_n, output, workspace);
  auto grads = run_backward(c, input.contiguous(), w_ih);
  std::get<1>(grads) = to_sequence_order(c.rows, std::get<1>(grads));
  return grads;
}

}  // namespace
}  // namespace cuda
}  // namespace varlen_rnn

// Test hook (ctypes, tests/test_cuda.py): sets the knobs that the environment
// gives once per process. path: "auto" | "persistent" | "fallback"; max_kc <= 0
// lifts the cap; oversubscribe != 0 launches persistent grids too large to be
// co-resident, which the driver must refuse. Returns 0, or -1 for a bad path.
extern "C" __attribute__((visibility("default"))) int varlen_rnn_cuda_set_knobs_for_testing(
    const char* path, long long max_kc, int oversubscribe) {
  varlen_rnn::plan::Path p;
  if (!varlen_rnn::cuda::parse_path(path, p)) return -1;
  varlen_rnn::cuda::Knobs& k = varlen_rnn::cuda::knobs();
  k.path = static_cast<int>(p);
  k.max_kc = max_kc > 0 ? max_kc : 0;
  k.oversubscribe = oversubscribe != 0;
  return 0;
}

TORCH_LIBRARY_IMPL(varlen_rnn, CUDA, m) {
  m.impl("gru_layer_forward", TORCH_FN(varlen_rnn::cuda::gru_layer_forward_cuda));
  m.impl("gru_layer_backward", TORCH_FN(varlen_rnn::cuda::gru_layer_backward_cuda));
  m.impl("gru_layer_ragged_forward", TORCH_FN(varlen_rnn::cuda::gru_layer_ragged_forward_cuda));
  m.impl("gru_layer_ragged_backward", TORCH_FN(varlen_rnn::cuda::gru_layer_ragged_backward_cuda));
}
