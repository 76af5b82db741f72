// The Elman RNN ops on the CPU: ops.cpp's rnn_layer_* schemas mapped onto the
// recurrence written once for every cell (cpu/layer_ops.h, cpu/recurrence.h)
// with the RNN's cell policy (cells/rnn.h), its nonlinearity a template
// parameter chosen once per call.
#include <torch/library.h>

#include <array>
#include <optional>
#include <string_view>
#include <tuple>

#include "cells/rnn.h"
#include "cpu/layer_ops.h"

namespace varlen_rnn {
namespace {

using cpu::kNone;
using Forward = std::tuple<at::Tensor, at::Tensor, at::Tensor>;
using Backward = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

Forward forward_tuple(const cpu::ForwardResult& r) { return {r.output, r.h_n, r.workspace}; }

Backward backward_tuple(const cpu::BackwardResult& r) {
  return {r.grad_input, r.grad_hx, r.grad_w_ih, r.grad_w_hh, r.grad_b_ih, r.grad_b_hh};
}

// Calls f(RnnTanhCell{}) or f(RnnReluCell{}) as nonlinearity says.
template <typename F>
auto with_nonlinearity(std::string_view nonlinearity, F&& f) {
  return check_nonlinearity(nonlinearity) ? f(RnnReluCell{}) : f(RnnTanhCell{});
}

// The arguments and results, with their shapes: ops.cpp's schemas.
Forward rnn_layer_forward_cpu(const at::Tensor& input, const at::Tensor& lengths,
                              const at::Tensor& hx, const at::Tensor& w_ih, const at::Tensor& w_hh,
                              const std::optional<at::Tensor>& b_ih,
                              const std::optional<at::Tensor>& b_hh, c10::string_view nonlinearity,
                              bool batch_first, bool need_workspace) {
  const cpu::WeightInputs w{&hx, nullptr, &w_ih, &w_hh, &b_ih, &b_hh, &kNone};
  return with_nonlinearity(nonlinearity, [&](auto cell) {
    using Cell = decltype(cell);
    return forward_tuple(cpu::layer_forward<Cell>(input, lengths, w, batch_first, need_workspace));
  });
}

Backward rnn_layer_backward_cpu(const std::optional<at::Tensor>& grad_output,
                                const at::Tensor& grad_h_n, const at::Tensor& input,
                                const at::Tensor& lengths, const at::Tensor& hx,
                                const at::Tensor& w_ih, const at::Tensor& w_hh,
                                const at::Tensor& output, const at::Tensor& workspace,
                                c10::string_view nonlinearity, bool batch_first,
                                std::array<bool, 2> output_mask) {
  const cpu::WeightInputs w{&hx, nullptr, &w_ih, &w_hh, &kNone, &kNone, &kNone};
  return with_nonlinearity(nonlinearity, [&](auto cell) {
    using Cell = decltype(cell);
    return backward_tuple(cpu::layer_backward<Cell>(grad_output, grad_h_n, nullptr, input, lengths,
                                                    w, output, workspace, batch_first,
                                                    output_mask));
  });
}

Forward rnn_layer_ragged_forward_cpu(const at::Tensor& input, const at::Tensor& seq_index,
                                     const std::optional<at::Tensor>& sorted_indices,
                                     int64_t layout, int64_t max_len, const at::Tensor& hx,
                                     const at::Tensor& w_ih, const at::Tensor& w_hh,
                                     const std::optional<at::Tensor>& b_ih,
                                     const std::optional<at::Tensor>& b_hh,
                                     c10::string_view nonlinearity, bool need_workspace) {
  const cpu::WeightInputs w{&hx, nullptr, &w_ih, &w_hh, &b_ih, &b_hh, &kNone};
  return with_nonlinearity(nonlinearity, [&](auto cell) {
    using Cell = decltype(cell);
    return forward_tuple(cpu::ragged_forward<Cell>(input, seq_index, sorted_indices, layout,
                                                   max_len, w, need_workspace));
  });
}

Backward rnn_layer_ragged_backward_cpu(
    const std::optional<at::Tensor>& grad_output, const at::Tensor& grad_h_n,
    const at::Tensor& input, const at::Tensor& seq_index,
    const std::optional<at::Tensor>& sorted_indices, int64_t layout, int64_t max_len,
    const at::Tensor& hx, const at::Tensor& w_ih, const at::Tensor& w_hh, const at::Tensor& output,
    const at::Tensor& workspace, c10::string_view nonlinearity, std::array<bool, 2> output_mask) {
  const cpu::WeightInputs w{&hx, nullptr, &w_ih, &w_hh, &kNone, &kNone, &kNone};
  return with_nonlinearity(nonlinearity, [&](auto cell) {
    using Cell = decltype(cell);
    return backward_tuple(cpu::ragged_backward<Cell>(grad_output, grad_h_n, nullptr, input,
                                                     seq_index, sorted_indices, layout, max_len, w,
                                                     output, workspace, output_mask));
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(varlen_rnn, CPU, m) {
  m.impl("rnn_layer_forward", &rnn_layer_forward_cpu);
  m.impl("rnn_layer_backward", &rnn_layer_backward_cpu);
  m.impl("rnn_layer_ragged_forward", &rnn_layer_ragged_forward_cpu);
  m.impl("rnn_layer_ragged_backward", &rnn_layer_ragged_backward_cpu);
}

}  // namespace varlen_rnn
