// The per-path launchers of the CUDA backend's backward: the recurrence of a
// backward call on the persistent kernel (persistent.cuh) or the fallback
// (per-step GEMM + pointwise.cuh), as choose() (call.h) decides, then the
// weight and input gradients as GEMMs over all rows. Templates on the cell
// policy, like the forward's (paths.cuh). Included by ops_cuda.cu only (one
// translation unit, internal linkage).
#pragma once

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/bmm.h>
#include <ATen/ops/cat.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/addmm.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/sum.h>
#include <ATen/ops/zeros.h>

#include <utility>

#include "call.h"
#include "launch.h"
#include "paths.cuh"
#include "persistent.cuh"
#include "plan.h"
#include "pointwise.cuh"
#include "rows.h"
#include "runtime.h"

namespace varlen_rnn {
namespace cuda {
namespace {

using at::Tensor;

// Every gradient of a layer; grad_cx and grad_w_hr stay undefined where the
// cell has no c or no projection.
struct LayerGrads {
  Tensor grad_input, grad_hx, grad_cx, grad_w_ih, grad_w_hh, grad_b_ih, grad_b_hh, grad_w_hr;
};

template <typename Cell, typename scalar_t>
bool persistent_backward(const BackwardCall& c, const plan::Choice& choice) {
  const plan::Cut& cut = choice.cut;
  using acc_t = at::opmath_type<scalar_t>;
  const LayerDims& dims = c.dims;
  const Lengths l = prepare_lengths(c.rows.lengths, dims.T, true, c.stream);
  Tensor dh = at::empty({dims.D, dims.B, dims.H}, c.opts.dtype(c.acc_type));
  Tensor dc =
      Cell::kHasC ? at::empty({dims.D, dims.B, dims.H}, c.opts.dtype(c.acc_type)) : Tensor();
  PersistentBackwardArgs<scalar_t, acc_t> a{};
  a.grad_out = ptr_or_null<scalar_t>(c.grad_out);
  a.out = c.out.data_ptr<scalar_t>();
  a.hx = c.hx.data_ptr<scalar_t>();
  a.grad_h_n = c.grad_h_n.data_ptr<scalar_t>();
  a.ws = c.ws.data_ptr<workspace_t<scalar_t, acc_t>>();
  a.w_hh = c.w_hh.data_ptr<scalar_t>();
  a.dh = dh.data_ptr<acc_t>();
  a.dg = c.dg.data_ptr<scalar_t>();
  a.ldg = c.ldg;
  a.hprev = c.hprev.data_ptr<scalar_t>();
  a.grad_hx = c.grad_hx.data_ptr<scalar_t>();
  a.grad_c_n = ptr_or_null<scalar_t>(c.grad_c_n);
  a.dc = ptr_or_null<acc_t>(dc);
  a.grad_cx = ptr_or_null<scalar_t>(c.grad_cx);
  // dgh_s in words of value and tag by step parity where the exchange is tagged (launch.h)
  const Tensor tagged = tagged_exchange<scalar_t>(choice)
                            ? at::empty({2, dims.D, dims.B, c.G * dims.H}, c.opts.dtype(at::kLong))
                            : Tensor();
  a.tagged = tagged.defined() ? static_cast<uint64_t*>(tagged.data_ptr()) : nullptr;
  fill_common(a, c, l, cut);
  return launch_cooperative(backward_kernel<Cell, scalar_t>(choice.mma), cut.blocks, cut.smem, &a,
                            c.stream);
}

// dh after step s = dh_a (direct part, acc_t) + dh_b (dgh_{s+1} @ W_hh, a GEMM in the
// storage dtype); the step kernel reads both, writes the next direct part and the
// step's dgh rows [D, B, GH] for that GEMM. c's gradient dc stays in acc_t, in place.
// With a projection (kProj) the same carry runs in the P-wide state: per step the
// projection kernel forms dhr (-> c.dhr rows, dhr_step), the GEMM dhr_step @ W_hr
// gives the gradient reaching the cell's h', the cell kernel runs on it.
template <typename Cell, bool kProj, typename scalar_t>
void fallback_backward(const BackwardCall& c) {
  using acc_t = at::opmath_type<scalar_t>;
  const LayerDims& dims = c.dims;
  const int64_t T = dims.T, B = dims.B, H = dims.H, D = dims.D, G = c.G, P = c.P;
  const Lengths l = prepare_lengths(c.rows.lengths, T, false, c.stream);
  Tensor dh_a = at::empty({D, B, P}, c.opts.dtype(c.acc_type));
  dh_a.copy_(c.grad_h_n);
  Tensor dh_a_next = at::empty({D, B, P}, c.opts.dtype(c.acc_type));
  Tensor dh_b = at::zeros({D, B, P}, c.opts);
  Tensor dgh_step = at::empty({D, B, G * H}, c.opts);
  Tensor dc;
  if constexpr (Cell::kHasC) {
    dc = at::empty({D, B, H}, c.opts.dtype(c.acc_type));
    dc.copy_(c.grad_c_n);
  }
  Tensor dhr_step = kProj ? at::empty({D, B, P}, c.opts) : Tensor();
  Tensor dhcell = kProj ? at::empty({D, B, H}, c.opts) : Tensor();
  const int blocks = static_cast<int>(plan::ceil_div(D * B * H, kPointwiseThreads));
  const int proj_blocks = static_cast<int>(plan::ceil_div(D * B * P, kPointwiseThreads));
  for (int64_t s = T - 1; s >= 0; --s) {
    if constexpr (kProj) {
      launch_kernel(fallback_proj_backward_kernel<scalar_t, acc_t>, proj_blocks, kPointwiseThreads,
                    c.stream, ptr_or_null<scalar_t>(c.grad_out), c.out.data_ptr<scalar_t>(),
                    c.hx.data_ptr<scalar_t>(), l.lens.data_ptr<int>(), dh_a.data_ptr<acc_t>(),
                    dh_b.data_ptr<scalar_t>(), dh_a_next.data_ptr<acc_t>(),
                    c.dhr.data_ptr<scalar_t>(), dhr_step.data_ptr<scalar_t>(),
                    c.hprev.data_ptr<scalar_t>(), static_cast<int>(s), static_cast<int>(B),
                    static_cast<int>(P), static_cast<int>(D), c.rows.map, c.rows.R);
      at::bmm_out(dhcell, dhr_step, c.w_hr);  // [D, B, P] @ [D, P, H]
    }
    launch_kernel(
        fallback_backward_step_kernel<Cell, kProj, scalar_t, acc_t>, blocks, kPointwiseThreads,
        c.stream, ptr_or_null<scalar_t>(c.grad_out), c.out.data_ptr<scalar_t>(),
        c.hx.data_ptr<scalar_t>(), c.ws.data_ptr<workspace_t<scalar_t, acc_t>>(),
        l.lens.data_ptr<int>(), kProj ? nullptr : dh_a.data_ptr<acc_t>(),
        kProj ? dhcell.data_ptr<scalar_t>() : dh_b.data_ptr<scalar_t>(),
        kProj ? nullptr : dh_a_next.data_ptr<acc_t>(), ptr_or_null<acc_t>(dc),
        c.dg.data_ptr<scalar_t>(), c.ldg, dgh_step.data_ptr<scalar_t>(),
        kProj ? nullptr : c.hprev.data_ptr<scalar_t>(),
        kProj ? c.hcell.data_ptr<scalar_t>() : nullptr, static_cast<int>(s), static_cast<int>(B),
        static_cast<int>(H), static_cast<int>(D), c.rows.map, c.rows.R);
    std::swap(dh_a, dh_a_next);
    at::bmm_out(dh_b, dgh_step, c.w_hh);  // [D, B, GH] @ [D, GH, P]
  }
  c.grad_hx.copy_(dh_a.add_(dh_b));
  if constexpr (Cell::kHasC) c.grad_cx.copy_(dc);
}

// The fallback's backward, with the projection's GEMMs and kernels where the LSTM has one.
template <typename Cell, typename scalar_t>
void run_fallback_backward(const BackwardCall& c) {
  if constexpr (Cell::kHasC) {
    if (c.proj()) return fallback_backward<Cell, true, scalar_t>(c);
  }
  fallback_backward<Cell, false, scalar_t>(c);
}

// The recurrence of one backward call (inputs, rows and the R-row buffers set),
// then the weight and input gradients as GEMMs over all R rows (no atomics),
// one direction at a time (dg's rows are direction-major and may be the
// workspace's, whose row stride is not G*H: the same products either way).
// x_rows [R, I]: the input's rows, padded ones zeroed (undefined when the
// weights are masked). dW_hh = dgh^T h_prev, dgh being dgx's columns of dg
// (read in place) but for a GRU's last gate, whose hidden side is dghn
// (pointwise.cuh); db_hh sums the same. With a projection, dW_hr = dhr^T h'
// over all rows. What c's output_mask masks stays undefined.
template <typename Cell>
LayerGrads run_backward(BackwardCall& c, const Tensor& x_rows, const Tensor& w_ih) {
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, c.opts.dtype().toScalarType(), "varlen_rnn_backward_cuda", [&] {
        using acc_t = at::opmath_type<scalar_t>;
        const plan::Choice choice = choose(c, backward_kernel<Cell, scalar_t>,
                                           plan::Pass::kBackward, sizeof(scalar_t), sizeof(acc_t));
        if (choice.path == plan::Path::kPersistent &&
            launched_or_allowed_to_fall_back(persistent_backward<Cell, scalar_t>(c, choice))) {
          note_exchange(
              true,
              exchange_of(true, choice.mma, sizeof(scalar_t), tagged_exchange<scalar_t>(choice)),
              choice.cut.row_slices);
          return;
        }
        note_exchange(true, Exchange::kFallback);
        run_fallback_backward<Cell, scalar_t>(c);
      });
  const int64_t I = c.dims.I, H = c.dims.H, GH = c.G * H, D = c.dims.D;
  const auto dtype = c.opts.dtype().toScalarType();
  LayerGrads g;
  const Tensor dgx = c.dg.narrow(2, 0, GH);  // [D, R, GH], row stride ldg
  if (c.want_input) {
    const Tensor w = w_ih.contiguous().view({D, GH, I});
    g.grad_input = at::mm(dgx[0], w[0]);  // [R, I]
    for (int64_t d = 1; d < D; ++d) g.grad_input.addmm_(dgx[d], w[d]);
  }
  g.grad_hx = c.grad_hx;
  g.grad_cx = c.grad_cx;
  if (!c.want_weights) return g;
  g.grad_w_ih = at::empty({D, GH, I}, c.opts);
  for (int64_t d = 0; d < D; ++d) {
    Tensor out_d = g.grad_w_ih[d];  // [GH, I]
    at::mm_out(out_d, dgx[d].t(), x_rows);
  }
  g.grad_b_ih = at::sum(dgx, {1}, false, c.acc_type).to(dtype);  // [D, GH]
  constexpr bool kDiffer = Cell::kHiddenGradsDiffer;
  const int64_t shared = kDiffer ? GH - H : GH;  // dgh's columns that are dgx's
  const Tensor dgh_shared = dgx.narrow(2, 0, shared);
  g.grad_w_hh = at::bmm(dgh_shared.transpose(1, 2), c.hprev);  // [D, shared, P]
  g.grad_b_hh = g.grad_b_ih.narrow(1, 0, shared);
  if constexpr (kDiffer) {
    const Tensor dghn = c.dg.narrow(2, GH, H);  // [D, R, H]
    g.grad_w_hh = at::cat({g.grad_w_hh, at::bmm(dghn.transpose(1, 2), c.hprev)}, 1);
    g.grad_b_hh = at::cat({g.grad_b_hh, at::sum(dghn, {1}, false, c.acc_type).to(dtype)}, 1);
  } else {
    g.grad_b_hh = g.grad_b_hh.clone();
  }
  if (c.proj()) g.grad_w_hr = at::bmm(c.dhr.transpose(1, 2), c.hcell);  // [D, P, H]
  return g;
}

}  // namespace
}  // namespace cuda
}  // namespace varlen_rnn
