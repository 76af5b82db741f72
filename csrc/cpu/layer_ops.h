// The CPU layer ops of any cell, padded and ragged, forward and backward: the
// argument checks, allocation, dtype dispatch and the results in the input's
// dtype around cpu/recurrence.h. Each cell's op file (gru_cpu.cpp,
// lstm_cpu.cpp, rnn_cpu.cpp) maps its schema (ops.cpp) onto these.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>

#include <array>
#include <cstdint>
#include <optional>
#include <utility>

#include "cpu/layer_args.h"
#include "cpu/recurrence.h"
#include "layer.h"

namespace varlen_rnn {
namespace cpu {

// c_n is undefined for cells without c.
struct ForwardResult {
  at::Tensor output, h_n, c_n, workspace;
};

// grad_cx is undefined for cells without c; grad_w_hr is [0] without a
// projection (ops.cpp's schema).
struct BackwardResult {
  at::Tensor grad_input, grad_hx, grad_cx, grad_w_ih, grad_w_hh, grad_b_ih, grad_b_hh, grad_w_hr;
};

// The part of each forward op after its arguments are set and its output is
// allocated: the results in the input's dtype.
template <typename Cell>
ForwardResult run_forward(ForwardArgs& args, at::ScalarType dtype, bool need_workspace) {
  const LayerDims& dims = args.dims;
  const auto opts = args.opts();
  args.h_n = at::empty({dims.D, dims.B, dims.P}, opts);
  if (Cell::kHasC) args.c_n = at::empty({dims.D, dims.B, dims.H}, opts);
  const auto opts_ws = opts.dtype(workspace_dtype(dtype));
  args.workspace = need_workspace ? empty_large({dims.D, args.sched.N(), dims.S * dims.H}, opts_ws)
                                  : at::empty({0}, opts_ws);
  AT_DISPATCH_FLOATING_TYPES(args.hx.scalar_type(), "varlen_rnn_layer_forward_cpu",
                             [&] { forward_impl<Cell, scalar_t>(args); });
  auto result = [dtype](const at::Tensor& t) {  // a dispatcher call only to round
    return t.scalar_type() == dtype ? t : contiguous_large(t, dtype);
  };
  return {result(args.output), result(args.h_n), Cell::kHasC ? result(args.c_n) : at::Tensor(),
          args.workspace};
}

// The same for each backward op, after its arguments are set and checked.
template <typename Cell>
BackwardResult run_backward(BackwardArgs& args, const at::Tensor& input,
                            const std::optional<at::Tensor>& grad_output,
                            const at::Tensor& grad_h_n, const at::Tensor* grad_c_n,
                            const at::Tensor& output, const at::Tensor& workspace) {
  const LayerDims& dims = args.dims;
  const int64_t D = dims.D, B = dims.B, H = dims.H, P = dims.P, G = Cell::kGates * H;
  // None (a zero gradient): undefined, read as zeros (OutputRows)
  if (grad_output.has_value()) args.grad_output = backward_operand(*grad_output, args.bf16);
  args.grad_h_n = opmath_contiguous(grad_h_n);
  if (Cell::kHasC) args.grad_c_n = opmath_contiguous(*grad_c_n);
  args.output = backward_operand(output, args.bf16);
  args.workspace = workspace.contiguous();
  args.consume_workspace =
      ConsumableWorkspace::allows(workspace) && args.workspace.is_same(workspace);
  const auto opts = args.opts();
  args.grad_hx = at::empty({D, B, P}, opts);
  if (Cell::kHasC) args.grad_cx = at::empty({D, B, H}, opts);
  if (args.want_weights) {
    // bfloat16 where the products are (cpu/backward_bf16.h writes them in
    // place): no float32 copy to round at the end.
    const auto opts_w = args.bf16 ? opts.dtype(at::kBFloat16) : opts;
    args.grad_w_ih = at::empty({D, G, dims.I}, opts_w);
    args.grad_w_hh = at::empty({D, G, P}, opts_w);
    args.grad_b_ih = at::empty({D, G}, opts);
    args.grad_b_hh = at::empty({D, G}, opts);
    if (args.w_hr.defined()) args.grad_w_hr = at::empty({D, P, H}, opts);
  }
  AT_DISPATCH_FLOATING_TYPES(args.hx.scalar_type(), "varlen_rnn_layer_backward_cpu",
                             [&] { backward_impl<Cell, scalar_t>(args); });
  const auto dtype = input.scalar_type();
  // What was not computed (masked, or grad_w_hr without a projection) is [0].
  auto result = [&](const at::Tensor& t) {
    return t.defined() ? contiguous_large(t, dtype) : at::empty({0}, input.options());
  };
  const at::Tensor& g_in = args.grad_input2d;
  return {result(g_in.defined() ? g_in.view(input.sizes()) : g_in),
          result(args.grad_hx),
          Cell::kHasC ? result(args.grad_cx) : at::Tensor(),
          result(args.grad_w_ih),
          result(args.grad_w_hh),
          result(args.grad_b_ih),
          result(args.grad_b_hh),
          result(args.grad_w_hr)};
}

// The ops' arguments and results, with their shapes, are documented once in
// ops.cpp's schemas; WeightInputs and the Args structs repeat the shapes.
template <typename Cell>
ForwardResult layer_forward(const at::Tensor& input, const at::Tensor& lengths,
                            const WeightInputs& w, bool batch_first, bool need_workspace) {
  const NoAutocastGuard no_autocast;
  ForwardArgs args;
  set_layer_args(args, CellArgs::of<Cell>(w.cx, w.w_hr), input, lengths, w, batch_first);
  const LayerDims& dims = args.dims;
  args.output = empty_large(dims.output_sizes(), args.output_opts());
  if (args.sched.N() < dims.T * dims.B) {  // zeros at the padding
    args.output.view({-1, dims.D * dims.P})
        .index_fill_(0, padding_rows(args.sched, args.out_rows, dims.T), 0);
  }
  return run_forward<Cell>(args, input.scalar_type(), need_workspace);
}

// w's biases are not read (the backward needs none).
template <typename Cell>
BackwardResult layer_backward(const std::optional<at::Tensor>& grad_output,
                              const at::Tensor& grad_h_n, const at::Tensor* grad_c_n,
                              const at::Tensor& input, const at::Tensor& lengths,
                              const WeightInputs& w, const at::Tensor& output,
                              const at::Tensor& workspace, bool batch_first,
                              std::array<bool, 2> output_mask) {
  const NoAutocastGuard no_autocast;
  BackwardArgs args;
  args.set_output_mask(output_mask);
  set_layer_args(args, CellArgs::of<Cell>(w.cx, w.w_hr), input, lengths, w, batch_first);
  check_backward_args(args.dims, input, grad_output, grad_h_n, output, workspace, args.sched.N(),
                      grad_c_n);
  return run_backward<Cell>(args, input, grad_output, grad_h_n, grad_c_n, output, workspace);
}

// Every output row is a valid position: nothing to zero.
template <typename Cell>
ForwardResult ragged_forward(const at::Tensor& input, const at::Tensor& seq_index,
                             const std::optional<at::Tensor>& sorted_indices, int64_t layout,
                             int64_t max_len, const WeightInputs& w, bool need_workspace) {
  const NoAutocastGuard no_autocast;
  ForwardArgs args;
  const RaggedDims dims = set_ragged_args(args, CellArgs::of<Cell>(w.cx, w.w_hr), input, seq_index,
                                          sorted_indices, layout, max_len, w);
  args.output = empty_large(dims.output_sizes(), args.output_opts());
  return run_forward<Cell>(args, input.scalar_type(), need_workspace);
}

template <typename Cell>
BackwardResult ragged_backward(const std::optional<at::Tensor>& grad_output,
                               const at::Tensor& grad_h_n, const at::Tensor* grad_c_n,
                               const at::Tensor& input, const at::Tensor& seq_index,
                               const std::optional<at::Tensor>& sorted_indices, int64_t layout,
                               int64_t max_len, const WeightInputs& w, const at::Tensor& output,
                               const at::Tensor& workspace, std::array<bool, 2> output_mask) {
  const NoAutocastGuard no_autocast;
  BackwardArgs args;
  args.set_output_mask(output_mask);
  const RaggedDims dims = set_ragged_args(args, CellArgs::of<Cell>(w.cx, w.w_hr), input, seq_index,
                                          sorted_indices, layout, max_len, w);
  check_backward_args(dims, input, grad_output, grad_h_n, output, workspace, dims.N, grad_c_n);
  return run_backward<Cell>(args, input, grad_output, grad_h_n, grad_c_n, output, workspace);
}

}  // namespace cpu
}  // namespace varlen_rnn
