// The CUDA backend's op bodies, written once for every cell (templates on the
// cell policy, csrc/cells/): argument checks, outputs, the rows of padded or
// ragged input, then the launchers of paths.cuh / paths_backward.cuh.
// ops_cuda.cu wraps them into the ops' signatures and registers them.
// Included by ops_cuda.cu only (one translation unit, internal linkage).
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/ops/arange.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <ATen/ops/zeros_like.h>

#include <array>
#include <optional>
#include <vector>

#include "call.h"
#include "cells/cell.h"
#include "layer.h"
#include "launch.h"
#include "layout.h"
#include "paths.cuh"
#include "paths_backward.cuh"
#include "plan.h"
#include "rows.h"
#include "runtime.h"

namespace varlen_rnn {
namespace cuda {
namespace {

using at::Tensor;

// What the LSTM adds to a call: cx [D, B, H] and w_hr [D, P, H] or None. Null
// pointers for the other cells.
struct CellInputs {
  const Tensor* cx = nullptr;
  const std::optional<Tensor>* w_hr = nullptr;
  template <typename Cell>
  CellArgs args() const {
    return CellArgs::of<Cell>(cx, w_hr);
  }
};

struct ForwardResult {
  Tensor out, h_n, c_n, ws;  // c_n undefined without kHasC
};

template <typename Cell>
void set_cell_inputs(LayerCall& c, const CellInputs& in) {
  if constexpr (Cell::kHasC) c.cx = in.cx->contiguous();
  if (in.w_hr != nullptr && in.w_hr->has_value()) c.w_hr = (*in.w_hr)->contiguous();
}

// Outputs of a forward call: out [rows, D*P] shaped out_sizes, h_n, c_n, workspace.
template <typename Cell>
void make_forward_outputs(ForwardCall& c, const std::vector<int64_t>& out_sizes,
                          bool need_workspace) {
  const LayerDims& dims = c.dims;
  c.need_workspace = need_workspace;
  c.out = at::empty(out_sizes, c.opts);
  c.h_n = at::empty({dims.D, dims.B, c.P}, c.opts);
  if constexpr (Cell::kHasC) c.c_n = at::empty({dims.D, dims.B, dims.H}, c.opts);
  const auto ws_opts = c.opts.dtype(workspace_dtype(c.opts.dtype().toScalarType()));
  c.ws = need_workspace ? at::empty({dims.D, c.rows.R, dims.S * dims.H}, ws_opts)
                        : at::empty({0}, ws_opts);
}

// Where no step runs: h_n = hx, c_n = cx.
template <typename Cell>
ForwardResult no_step_forward(ForwardCall& c, const Tensor& hx, const CellInputs& in) {
  c.h_n.copy_(hx);
  if constexpr (Cell::kHasC) c.c_n.copy_(*in.cx);
  return {c.out, c.h_n, c.c_n, c.ws};
}

template <typename Cell>
ForwardResult padded_forward(const Tensor& input, const Tensor& lengths, const Tensor& hx,
                             const CellInputs& in, const Tensor& w_ih, const Tensor& w_hh,
                             const std::optional<Tensor>& b_ih, const std::optional<Tensor>& b_hh,
                             bool batch_first, bool need_workspace) {
  const NoAutocastGuard no_autocast;
  const LayerDims dims = check_layer_args(input, lengths, hx, w_ih, w_hh, b_ih, b_hh, batch_first,
                                          in.template args<Cell>());
  const int64_t T = dims.T, B = dims.B, I = dims.I, H = dims.H, D = dims.D;
  TORCH_CHECK(T * B < (int64_t{1} << 31) && B < (int64_t{1} << 30),
              "T*B must be below 2^31, got T=", T, ", B=", B);
  const DeviceGuard guard(input.device());
  ForwardCall c;
  set_layer_call(c, dims, input, hx, w_hh);
  set_cell_inputs<Cell>(c, in);
  c.rows = padded_rows(dims, lengths, input.device());
  const MatmulTf32Guard tf32(input.scalar_type() == at::kFloat, c.tf32);
  make_forward_outputs<Cell>(c, dims.output_sizes(), need_workspace);
  if (B == 0) return {c.out, c.h_n, c.c_n, c.ws};
  if (T == 0) {
    prepare_lengths(c.rows.lengths, T, false, c.stream);  // device lengths: still asserts == 0
    return no_step_forward<Cell>(c, hx, in);
  }
  const Tensor x2d = input.contiguous().view({T * B, I});
  const Tensor w_ih2d = w_ih.contiguous().view({D * Cell::kGates * H, I});
  c.gx = input_projection(x2d, w_ih2d, b_ih);
  if (b_hh.has_value()) c.b_hh = b_hh->contiguous();
  run_forward<Cell>(c);
  return {c.out, c.h_n, c.c_n, c.ws};
}

// Ragged input [N, I]: the same kernels over N rows; max_len bounds the steps.
template <typename Cell>
ForwardResult ragged_forward(const Tensor& input, const Tensor& seq_index,
                             const std::optional<Tensor>& sorted_indices, int64_t layout,
                             int64_t max_len, const Tensor& hx, const CellInputs& in,
                             const Tensor& w_ih, const Tensor& w_hh,
                             const std::optional<Tensor>& b_ih, const std::optional<Tensor>& b_hh,
                             bool need_workspace) {
  const NoAutocastGuard no_autocast;
  const RaggedDims dims = check_ragged_args(input, seq_index, sorted_indices, layout, max_len, hx,
                                            w_ih, w_hh, b_ih, b_hh, in.template args<Cell>());
  const int64_t B = dims.B, N = dims.N, H = dims.H, D = dims.D;
  TORCH_CHECK(dims.T < (int64_t{1} << 31) && B < (int64_t{1} << 30),
              "max_len must be below 2^31 and B below 2^30, got max_len=", dims.T, ", B=", B);
  const DeviceGuard guard(input.device());
  ForwardCall c;
  set_layer_call(c, dims, input, hx, w_hh);
  set_cell_inputs<Cell>(c, in);
  const MatmulTf32Guard tf32(input.scalar_type() == at::kFloat, c.tf32);
  c.rows = ragged_rows(dims, seq_index, sorted_indices, input.device(), c.stream);
  make_forward_outputs<Cell>(c, dims.output_sizes(), need_workspace);
  // No step: every length is 0 (the offsets kernel asserts it), or no sequence at all (B = 0
  // with N > 0: offsets the kernel refuses; no zero-block launch may hide its assert).
  if (N == 0 || dims.T == 0 || B == 0) {
    return no_step_forward<Cell>(c, hx, in);
  }
  c.hx = to_rank_order(c.rows, hx);
  if constexpr (Cell::kHasC) c.cx = to_rank_order(c.rows, *in.cx);
  const Tensor w_ih2d = w_ih.contiguous().view({D * Cell::kGates * H, dims.I});
  c.gx = input_projection(input.contiguous(), w_ih2d, b_ih);
  if (b_hh.has_value()) c.b_hh = b_hh->contiguous();
  run_forward<Cell>(c);
  ForwardResult r{c.out, to_sequence_order(c.rows, c.h_n), c.c_n, c.ws};
  if constexpr (Cell::kHasC) r.c_n = to_sequence_order(c.rows, c.c_n);
  return r;
}

// What the backward gets besides the forward's inputs: grad_output (None:
// zero), grad_h_n, grad_c_n [D, B, H] for a kHasC cell (else null), output,
// workspace.
struct BackwardInputs {
  const std::optional<Tensor>* grad_output;
  const Tensor *grad_h_n, *grad_c_n, *output, *workspace;
  std::array<bool, 2> output_mask;  // [input, weights] (ops.cpp)
};

// The backward's saved and incoming tensors, contiguous (rank order when
// packed), and its R-row buffers.
template <typename Cell>
void set_backward_buffers(BackwardCall& c, const BackwardInputs& g) {
  const int64_t D = c.dims.D, H = c.dims.H, B = c.dims.B, GH = Cell::kGates * H;
  c.want_input = g.output_mask[0];
  c.want_weights = g.output_mask[1];
  if (g.grad_output->has_value()) c.grad_out = (*g.grad_output)->contiguous();
  c.out = g.output->contiguous();
  c.grad_h_n = to_rank_order(c.rows, *g.grad_h_n);
  c.ws = g.workspace->contiguous();
  c.grad_hx = at::empty({D, B, c.P}, c.opts);
  if constexpr (Cell::kHasC) {
    c.grad_c_n = to_rank_order(c.rows, *g.grad_c_n);
    c.grad_cx = at::empty({D, B, H}, c.opts);
  }
  // dG's columns per row: dgx's G*H, then a GRU's dghn's H. Where autograd frees the
  // workspace after this call (layer.h ConsumableWorkspace) and it holds the storage dtype,
  // dG goes to its first columns: a unit's saved values are read by the thread that then
  // writes its gradients to the same row (pointwise.cuh, persistent.cuh), and the columns
  // past them (an LSTM's c) are never written. dG then takes no memory of its own.
  const int64_t width = GH + (Cell::kHiddenGradsDiffer ? H : 0);
  const bool in_ws = ConsumableWorkspace::allows(*g.workspace) && c.ws.is_same(*g.workspace) &&
                     c.ws.scalar_type() == c.opts.dtype().toScalarType() &&
                     kWorkspaceSaved<Cell> * H >= width;
  c.dg = in_ws ? c.ws.narrow(2, 0, width) : at::empty({D, c.rows.R, width}, c.opts);
  c.ldg = c.dg.stride(1);
  c.hprev = at::empty({D, c.rows.R, c.P}, c.opts);
  if (c.proj()) {
    c.dhr = at::empty({D, c.rows.R, c.P}, c.opts);
    c.hcell = at::empty({D, c.rows.R, H}, c.opts);
  }
}

// The gradients where no step runs (B, T or N is 0).
template <typename Cell>
LayerGrads empty_backward(const LayerCall& c, const Tensor& input, const BackwardInputs& g,
                          const Tensor& w_ih) {
  const int64_t D = c.dims.D, GH = Cell::kGates * c.dims.H;
  LayerGrads r;
  if (g.output_mask[0]) r.grad_input = at::zeros_like(input, at::MemoryFormat::Contiguous);
  r.grad_hx = g.grad_h_n->clone(at::MemoryFormat::Contiguous);
  if constexpr (Cell::kHasC) r.grad_cx = g.grad_c_n->clone(at::MemoryFormat::Contiguous);
  if (!g.output_mask[1]) return r;
  r.grad_w_ih = at::zeros_like(w_ih);
  r.grad_w_hh = at::zeros_like(c.w_hh);
  r.grad_b_ih = at::zeros({D, GH}, c.opts);
  r.grad_b_hh = at::zeros({D, GH}, c.opts);
  if (c.proj()) r.grad_w_hr = at::zeros_like(c.w_hr);
  return r;
}

template <typename Cell>
LayerGrads padded_backward(const BackwardInputs& g, const Tensor& input, const Tensor& lengths,
                           const Tensor& hx, const CellInputs& in, const Tensor& w_ih,
                           const Tensor& w_hh, bool batch_first) {
  const NoAutocastGuard no_autocast;
  const LayerDims dims = check_layer_args(input, lengths, hx, w_ih, w_hh, std::nullopt,
                                          std::nullopt, batch_first, in.template args<Cell>());
  check_backward_args(dims, input, *g.grad_output, *g.grad_h_n, *g.output, *g.workspace,
                      dims.T * dims.B, g.grad_c_n);
  const int64_t T = dims.T, B = dims.B, I = dims.I;
  TORCH_CHECK(T * B < (int64_t{1} << 31) && B < (int64_t{1} << 30),  // as the forward's
              "T*B must be below 2^31, got T=", T, ", B=", B);
  const DeviceGuard guard(input.device());
  BackwardCall c;
  set_layer_call(c, dims, input, hx, w_hh);
  set_cell_inputs<Cell>(c, in);
  c.rows = padded_rows(dims, lengths, input.device());
  const MatmulTf32Guard tf32(input.scalar_type() == at::kFloat, c.tf32);
  if (B == 0 || T == 0) {
    if (B > 0) prepare_lengths(c.rows.lengths, T, false, c.stream);
    return empty_backward<Cell>(c, input, g, w_ih);
  }
  set_backward_buffers<Cell>(c, g);
  // Padded positions of x are never read, whatever they hold (NaN included): their dG rows
  // are 0, but 0 * NaN is not, so the GEMM sees them zeroed (a mask built on the device).
  // Only dW_ih reads x.
  Tensor x_valid;
  if (c.want_weights) {
    const Tensor& lengths_d = c.rows.lengths;
    const Tensor valid =
        at::arange(T, lengths_d.options()).unsqueeze(1).lt(lengths_d.unsqueeze(0));  // [T, B]
    x_valid = input.contiguous()
                  .masked_fill((batch_first ? valid.t() : valid).logical_not().unsqueeze(2), 0)
                  .view({T * B, I});
  }
  LayerGrads r = run_backward<Cell>(c, x_valid, w_ih);
  if (r.grad_input.defined()) r.grad_input = r.grad_input.view(input.sizes());
  return r;
}

template <typename Cell>
LayerGrads ragged_backward(const BackwardInputs& g, const Tensor& input, const Tensor& seq_index,
                           const std::optional<Tensor>& sorted_indices, int64_t layout,
                           int64_t max_len, const Tensor& hx, const CellInputs& in,
                           const Tensor& w_ih, const Tensor& w_hh) {
  const NoAutocastGuard no_autocast;
  const RaggedDims dims =
      check_ragged_args(input, seq_index, sorted_indices, layout, max_len, hx, w_ih, w_hh,
                        std::nullopt, std::nullopt, in.template args<Cell>());
  check_backward_args(dims, input, *g.grad_output, *g.grad_h_n, *g.output, *g.workspace, dims.N,
                      g.grad_c_n);
  TORCH_CHECK(dims.T < (int64_t{1} << 31) && dims.B < (int64_t{1} << 30),
              "max_len must be below 2^31 and B below 2^30, got max_len=", dims.T, ", B=", dims.B);
  const DeviceGuard guard(input.device());
  BackwardCall c;
  set_layer_call(c, dims, input, hx, w_hh);
  set_cell_inputs<Cell>(c, in);
  const MatmulTf32Guard tf32(input.scalar_type() == at::kFloat, c.tf32);
  c.rows = ragged_rows(dims, seq_index, sorted_indices, input.device(), c.stream);
  if (dims.N == 0 || dims.T == 0 || dims.B == 0) return empty_backward<Cell>(c, input, g, w_ih);
  c.hx = to_rank_order(c.rows, hx);
  set_backward_buffers<Cell>(c, g);
  LayerGrads r = run_backward<Cell>(c, c.want_weights ? input.contiguous() : Tensor(), w_ih);
  r.grad_hx = to_sequence_order(c.rows, r.grad_hx);
  if constexpr (Cell::kHasC) r.grad_cx = to_sequence_order(c.rows, r.grad_cx);
  return r;
}

}  // namespace
}  // namespace cuda
}  // namespace varlen_rnn
