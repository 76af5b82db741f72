// The per-path launchers of the CUDA backend: the input projection GEMM, then
// the recurrence of a forward or backward call on the persistent kernel
// (persistent.cuh) or the fallback (per-step GEMM + pointwise.cuh), as
// choose() (call.h) decides, and the backward's weight-gradient GEMMs.
// Included by gru_cuda.cu only (one translation unit, internal linkage).
#pragma once

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/addmm.h>
#include <ATen/ops/baddbmm.h>
#include <ATen/ops/bmm.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/sum.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAException.h>

#include <optional>
#include <tuple>
#include <type_traits>
#include <utility>

#include "call.h"
#include "launch.h"
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

}  // namespace
}  // namespace cuda
}  // namespace varlen_rnn
