// The LSTM ops on the CPU: ops.cpp's lstm_layer_* schemas mapped onto the
// recurrence written once for every cell (cpu/layer_ops.h, cpu/recurrence.h)
// with the LSTM's cell policy (cells/lstm.h) and its optional projection w_hr.
#include <torch/library.h>

#include <array>
#include <optional>
#include <tuple>

#include "cells/lstm.h"
#include "cpu/layer_ops.h"

namespace varlen_rnn {
namespace {

using cpu::kNone;
using Forward = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>;
using Backward = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor,
                            at::Tensor, at::Tensor>;

Forward forward_tuple(const cpu::ForwardResult& r) { return {r.output, r.h_n, r.c_n, r.workspace}; }

Backward backward_tuple(const cpu::BackwardResult& r) {
  return {r.grad_input, r.grad_hx,   r.grad_cx,   r.grad_w_ih,
          r.grad_w_hh,  r.grad_b_ih, r.grad_b_hh, r.grad_w_hr};
}

// The arguments and results, with their shapes: ops.cpp's schemas.
Forward lstm_layer_forward_cpu(const at::Tensor& input, const at::Tensor& lengths,
                               const at::Tensor& hx, const at::Tensor& cx, const at::Tensor& w_ih,
                               const at::Tensor& w_hh, const std::optional<at::Tensor>& b_ih,
                               const std::optional<at::Tensor>& b_hh,
                               const std::optional<at::Tensor>& w_hr, bool batch_first,
                               bool need_workspace) {
  const cpu::WeightInputs w{&hx, &cx, &w_ih, &w_hh, &b_ih, &b_hh, &w_hr};
  return forward_tuple(
      cpu::layer_forward<LstmCell>(input, lengths, w, batch_first, need_workspace));
}

Backward lstm_layer_backward_cpu(const std::optional<at::Tensor>& grad_output,
                                 const at::Tensor& grad_h_n, const at::Tensor& grad_c_n,
                                 const at::Tensor& input, const at::Tensor& lengths,
                                 const at::Tensor& hx, const at::Tensor& cx, const at::Tensor& w_ih,
                                 const at::Tensor& w_hh, const std::optional<at::Tensor>& w_hr,
                                 const at::Tensor& output, const at::Tensor& workspace,
                                 bool batch_first, std::array<bool, 2> output_mask) {
  const cpu::WeightInputs w{&hx, &cx, &w_ih, &w_hh, &kNone, &kNone, &w_hr};
  return backward_tuple(cpu::layer_backward<LstmCell>(grad_output, grad_h_n, &grad_c_n, input,
                                                      lengths, w, output, workspace, batch_first,
                                                      output_mask));
}

Forward lstm_layer_ragged_forward_cpu(const at::Tensor& input, const at::Tensor& seq_index,
                                      const std::optional<at::Tensor>& sorted_indices,
                                      int64_t layout, int64_t max_len, const at::Tensor& hx,
                                      const at::Tensor& cx, const at::Tensor& w_ih,
                                      const at::Tensor& w_hh, const std::optional<at::Tensor>& b_ih,
                                      const std::optional<at::Tensor>& b_hh,
                                      const std::optional<at::Tensor>& w_hr, bool need_workspace) {
  const cpu::WeightInputs w{&hx, &cx, &w_ih, &w_hh, &b_ih, &b_hh, &w_hr};
  return forward_tuple(cpu::ragged_forward<LstmCell>(input, seq_index, sorted_indices, layout,
                                                     max_len, w, need_workspace));
}

Backward lstm_layer_ragged_backward_cpu(
    const std::optional<at::Tensor>& grad_output, const at::Tensor& grad_h_n,
    const at::Tensor& grad_c_n, const at::Tensor& input, const at::Tensor& seq_index,
    const std::optional<at::Tensor>& sorted_indices, int64_t layout, int64_t max_len,
    const at::Tensor& hx, const at::Tensor& cx, const at::Tensor& w_ih, const at::Tensor& w_hh,
    const std::optional<at::Tensor>& w_hr, const at::Tensor& output, const at::Tensor& workspace,
    std::array<bool, 2> output_mask) {
  const cpu::WeightInputs w{&hx, &cx, &w_ih, &w_hh, &kNone, &kNone, &w_hr};
  return backward_tuple(cpu::ragged_backward<LstmCell>(grad_output, grad_h_n, &grad_c_n, input,
                                                       seq_index, sorted_indices, layout, max_len,
                                                       w, output, workspace, output_mask));
}

}  // namespace

TORCH_LIBRARY_IMPL(varlen_rnn, CPU, m) {
  m.impl("lstm_layer_forward", &lstm_layer_forward_cpu);
  m.impl("lstm_layer_backward", &lstm_layer_backward_cpu);
  m.impl("lstm_layer_ragged_forward", &lstm_layer_ragged_forward_cpu);
  m.impl("lstm_layer_ragged_backward", &lstm_layer_ragged_backward_cpu);
}

}  // namespace varlen_rnn
