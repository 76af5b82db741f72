// CUDA backend of varlen_rnn: the op entry points of every cell (GRU, LSTM,
// RNN) + TORCH_LIBRARY_IMPL(varlen_rnn, CUDA). entries.h holds the op bodies
// (argument checks, outputs, the rows of padded or ragged input), templates on
// the cell policy (csrc/cells/); call.h a call's state and the path choice,
// paths.cuh / paths_backward.cuh the per-path launchers; all are headers so the
// backend stays one translation unit.
//
// Per layer: the input projection of every step and both directions is one
// GEMM (cuBLAS via ATen). The recurrence then runs on one of two paths:
//   persistent  one cooperative launch for all steps (persistent.cuh), W_hh
//               resident on chip, a grid barrier per step;
//   fallback    per step one batched GEMM (both directions) + one fused
//               pointwise kernel (pointwise.cuh).
// plan.h chooses (VARLEN_RNN_CUDA_PATH=auto: the path its cost model of B, H,
// D, dtype and the SM count says is faster) and cuts the persistent launch;
// An LSTM with a projection (proj_size > 0) always takes the fallback, with a
// projection GEMM per step (its state is W_hr h). launch.h holds the knobs,
// the per-device kernel facts, the refused-launch
// fallback, the TF32 policy and the lengths check; rows.h puts the rows and
// lengths of either op on the device. The backward mirrors the forward, then
// forms the weight gradients as GEMMs over all steps. With lengths (offsets)
// on the device nothing is copied to the host, so the ops are CUDA-graph
// capturable.
//
// The ragged ops run the same kernels: every per-position buffer (gx, output,
// workspace, dg, hprev) has the input's rows through layout.h's RowMap,
// N of them (input.size(0), known without a host sync) instead of T*B. The
// persistent kernel's step loop ends at the longest length, read on the
// device; the fallback's host loop runs max_len steps.
#include <ATen/core/Tensor.h>
#include <torch/library.h>

#include <array>
#include <optional>
#include <string_view>
#include <tuple>

#include "cells/gru.h"
#include "cells/lstm.h"
#include "cells/rnn.h"
#include "entries.h"
#include "layer.h"
#include "launch.h"
#include "plan.h"

namespace varlen_rnn {
namespace cuda {
namespace {

using at::Tensor;
using Grads6 = std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor>;
using Grads8 = std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor>;

// What was not computed (output_mask, or grad_w_hr without a projection) is [0].
Tensor or_empty(const Tensor& t, const Tensor& input) {
  return t.defined() ? t : at::empty({0}, input.options());
}
Grads6 grads6(const LayerGrads& g, const Tensor& input) {
  auto e = [&](const Tensor& t) { return or_empty(t, input); };
  return {e(g.grad_input), g.grad_hx,      e(g.grad_w_ih),
          e(g.grad_w_hh),  e(g.grad_b_ih), e(g.grad_b_hh)};
}
// The LSTM's.
Grads8 grads8(const LayerGrads& g, const Tensor& input) {
  auto e = [&](const Tensor& t) { return or_empty(t, input); };
  return {e(g.grad_input), g.grad_hx,      g.grad_cx,      e(g.grad_w_ih),
          e(g.grad_w_hh),  e(g.grad_b_ih), e(g.grad_b_hh), e(g.grad_w_hr)};
}

// The RNN's nonlinearity as a cell (a compile-time choice in the kernels).
template <typename F>
auto with_rnn_cell(std::string_view nonlinearity, F f) {
  return check_nonlinearity(nonlinearity) ? f(RnnReluCell{}) : f(RnnTanhCell{});
}

// ---- GRU --------------------------------------------------------------------
std::tuple<Tensor, Tensor, Tensor> gru_layer_forward_cuda(const Tensor& input,
                                                          const Tensor& lengths, const Tensor& hx,
                                                          const Tensor& w_ih, const Tensor& w_hh,
                                                          const std::optional<Tensor>& b_ih,
                                                          const std::optional<Tensor>& b_hh,
                                                          bool batch_first, bool need_workspace) {
  const ForwardResult r = padded_forward<GruCell>(input, lengths, hx, {}, w_ih, w_hh, b_ih, b_hh,
                                                  batch_first, need_workspace);
  return {r.out, r.h_n, r.ws};
}

std::tuple<Tensor, Tensor, Tensor> gru_layer_ragged_forward_cuda(
    const Tensor& input, const Tensor& seq_index, const std::optional<Tensor>& sorted_indices,
    int64_t layout, c10::SymInt max_len, const Tensor& hx, const Tensor& w_ih, const Tensor& w_hh,
    const std::optional<Tensor>& b_ih, const std::optional<Tensor>& b_hh, bool need_workspace) {
  const ForwardResult r =
      ragged_forward<GruCell>(input, seq_index, sorted_indices, layout, max_len.expect_int(), hx,
                              {}, w_ih, w_hh, b_ih, b_hh, need_workspace);
  return {r.out, r.h_n, r.ws};
}

Grads6 gru_layer_backward_cuda(const std::optional<Tensor>& grad_output, const Tensor& grad_h_n,
                               const Tensor& input, const Tensor& lengths, const Tensor& hx,
                               const Tensor& w_ih, const Tensor& w_hh, const Tensor& output,
                               const Tensor& workspace, bool batch_first,
                               std::array<bool, 2> output_mask) {
  const BackwardInputs g{&grad_output, &grad_h_n, nullptr, &output, &workspace, output_mask};
  return grads6(padded_backward<GruCell>(g, input, lengths, hx, {}, w_ih, w_hh, batch_first),
                input);
}

Grads6 gru_layer_ragged_backward_cuda(const std::optional<Tensor>& grad_output,
                                      const Tensor& grad_h_n, const Tensor& input,
                                      const Tensor& seq_index,
                                      const std::optional<Tensor>& sorted_indices, int64_t layout,
                                      c10::SymInt max_len, const Tensor& hx, const Tensor& w_ih,
                                      const Tensor& w_hh, const Tensor& output,
                                      const Tensor& workspace, std::array<bool, 2> output_mask) {
  const BackwardInputs g{&grad_output, &grad_h_n, nullptr, &output, &workspace, output_mask};
  return grads6(ragged_backward<GruCell>(g, input, seq_index, sorted_indices, layout,
                                         max_len.expect_int(), hx, {}, w_ih, w_hh),
                input);
}

// ---- LSTM -------------------------------------------------------------------
std::tuple<Tensor, Tensor, Tensor, Tensor> lstm_layer_forward_cuda(
    const Tensor& input, const Tensor& lengths, const Tensor& hx, const Tensor& cx,
    const Tensor& w_ih, const Tensor& w_hh, const std::optional<Tensor>& b_ih,
    const std::optional<Tensor>& b_hh, const std::optional<Tensor>& w_hr, bool batch_first,
    bool need_workspace) {
  const ForwardResult r = padded_forward<LstmCell>(input, lengths, hx, {&cx, &w_hr}, w_ih, w_hh,
                                                   b_ih, b_hh, batch_first, need_workspace);
  return {r.out, r.h_n, r.c_n, r.ws};
}

std::tuple<Tensor, Tensor, Tensor, Tensor> lstm_layer_ragged_forward_cuda(
    const Tensor& input, const Tensor& seq_index, const std::optional<Tensor>& sorted_indices,
    int64_t layout, c10::SymInt max_len, const Tensor& hx, const Tensor& cx, const Tensor& w_ih,
    const Tensor& w_hh, const std::optional<Tensor>& b_ih, const std::optional<Tensor>& b_hh,
    const std::optional<Tensor>& w_hr, bool need_workspace) {
  const ForwardResult r =
      ragged_forward<LstmCell>(input, seq_index, sorted_indices, layout, max_len.expect_int(), hx,
                               {&cx, &w_hr}, w_ih, w_hh, b_ih, b_hh, need_workspace);
  return {r.out, r.h_n, r.c_n, r.ws};
}

Grads8 lstm_layer_backward_cuda(const std::optional<Tensor>& grad_output, const Tensor& grad_h_n,
                                const Tensor& grad_c_n, const Tensor& input, const Tensor& lengths,
                                const Tensor& hx, const Tensor& cx, const Tensor& w_ih,
                                const Tensor& w_hh, const std::optional<Tensor>& w_hr,
                                const Tensor& output, const Tensor& workspace, bool batch_first,
                                std::array<bool, 2> output_mask) {
  const BackwardInputs g{&grad_output, &grad_h_n, &grad_c_n, &output, &workspace, output_mask};
  return grads8(
      padded_backward<LstmCell>(g, input, lengths, hx, {&cx, &w_hr}, w_ih, w_hh, batch_first),
      input);
}

Grads8 lstm_layer_ragged_backward_cuda(const std::optional<Tensor>& grad_output,
                                       const Tensor& grad_h_n, const Tensor& grad_c_n,
                                       const Tensor& input, const Tensor& seq_index,
                                       const std::optional<Tensor>& sorted_indices, int64_t layout,
                                       c10::SymInt max_len, const Tensor& hx, const Tensor& cx,
                                       const Tensor& w_ih, const Tensor& w_hh,
                                       const std::optional<Tensor>& w_hr, const Tensor& output,
                                       const Tensor& workspace, std::array<bool, 2> output_mask) {
  const BackwardInputs g{&grad_output, &grad_h_n, &grad_c_n, &output, &workspace, output_mask};
  return grads8(ragged_backward<LstmCell>(g, input, seq_index, sorted_indices, layout,
                                          max_len.expect_int(), hx, {&cx, &w_hr}, w_ih, w_hh),
                input);
}

// ---- RNN --------------------------------------------------------------------
std::tuple<Tensor, Tensor, Tensor> rnn_layer_forward_cuda(
    const Tensor& input, const Tensor& lengths, const Tensor& hx, const Tensor& w_ih,
    const Tensor& w_hh, const std::optional<Tensor>& b_ih, const std::optional<Tensor>& b_hh,
    std::string_view nonlinearity, bool batch_first, bool need_workspace) {
  return with_rnn_cell(nonlinearity, [&](auto cell) {
    const ForwardResult r = padded_forward<decltype(cell)>(input, lengths, hx, {}, w_ih, w_hh, b_ih,
                                                           b_hh, batch_first, need_workspace);
    return std::tuple<Tensor, Tensor, Tensor>{r.out, r.h_n, r.ws};
  });
}

std::tuple<Tensor, Tensor, Tensor> rnn_layer_ragged_forward_cuda(
    const Tensor& input, const Tensor& seq_index, const std::optional<Tensor>& sorted_indices,
    int64_t layout, c10::SymInt max_len, const Tensor& hx, const Tensor& w_ih, const Tensor& w_hh,
    const std::optional<Tensor>& b_ih, const std::optional<Tensor>& b_hh,
    std::string_view nonlinearity, bool need_workspace) {
  return with_rnn_cell(nonlinearity, [&](auto cell) {
    const ForwardResult r = ragged_forward<decltype(cell)>(input, seq_index, sorted_indices, layout,
                                                           max_len.expect_int(), hx, {}, w_ih, w_hh,
                                                           b_ih, b_hh, need_workspace);
    return std::tuple<Tensor, Tensor, Tensor>{r.out, r.h_n, r.ws};
  });
}

Grads6 rnn_layer_backward_cuda(const std::optional<Tensor>& grad_output, const Tensor& grad_h_n,
                               const Tensor& input, const Tensor& lengths, const Tensor& hx,
                               const Tensor& w_ih, const Tensor& w_hh, const Tensor& output,
                               const Tensor& workspace, std::string_view nonlinearity,
                               bool batch_first, std::array<bool, 2> output_mask) {
  const BackwardInputs g{&grad_output, &grad_h_n, nullptr, &output, &workspace, output_mask};
  return with_rnn_cell(nonlinearity, [&](auto cell) {
    return grads6(
        padded_backward<decltype(cell)>(g, input, lengths, hx, {}, w_ih, w_hh, batch_first), input);
  });
}

Grads6 rnn_layer_ragged_backward_cuda(const std::optional<Tensor>& grad_output,
                                      const Tensor& grad_h_n, const Tensor& input,
                                      const Tensor& seq_index,
                                      const std::optional<Tensor>& sorted_indices, int64_t layout,
                                      c10::SymInt max_len, const Tensor& hx, const Tensor& w_ih,
                                      const Tensor& w_hh, const Tensor& output,
                                      const Tensor& workspace, std::string_view nonlinearity,
                                      std::array<bool, 2> output_mask) {
  const BackwardInputs g{&grad_output, &grad_h_n, nullptr, &output, &workspace, output_mask};
  return with_rnn_cell(nonlinearity, [&](auto cell) {
    return grads6(ragged_backward<decltype(cell)>(g, input, seq_index, sorted_indices, layout,
                                                  max_len.expect_int(), hx, {}, w_ih, w_hh),
                  input);
  });
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
  return varlen_rnn::cuda::set_knobs_for_testing(path, max_kc, oversubscribe != 0) ? 0 : -1;
}

#ifndef VARLEN_RNN_HOST_EMULATION  // tests/cuda_emulation/emu.cpp binds the entries itself
TORCH_LIBRARY_IMPL(varlen_rnn, CUDA, m) {
  m.impl("gru_layer_forward", TORCH_FN(varlen_rnn::cuda::gru_layer_forward_cuda));
  m.impl("gru_layer_backward", TORCH_FN(varlen_rnn::cuda::gru_layer_backward_cuda));
  m.impl("gru_layer_ragged_forward", TORCH_FN(varlen_rnn::cuda::gru_layer_ragged_forward_cuda));
  m.impl("gru_layer_ragged_backward", TORCH_FN(varlen_rnn::cuda::gru_layer_ragged_backward_cuda));
  m.impl("lstm_layer_forward", TORCH_FN(varlen_rnn::cuda::lstm_layer_forward_cuda));
  m.impl("lstm_layer_backward", TORCH_FN(varlen_rnn::cuda::lstm_layer_backward_cuda));
  m.impl("lstm_layer_ragged_forward", TORCH_FN(varlen_rnn::cuda::lstm_layer_ragged_forward_cuda));
  m.impl("lstm_layer_ragged_backward", TORCH_FN(varlen_rnn::cuda::lstm_layer_ragged_backward_cuda));
  m.impl("rnn_layer_forward", TORCH_FN(varlen_rnn::cuda::rnn_layer_forward_cuda));
  m.impl("rnn_layer_backward", TORCH_FN(varlen_rnn::cuda::rnn_layer_backward_cuda));
  m.impl("rnn_layer_ragged_forward", TORCH_FN(varlen_rnn::cuda::rnn_layer_ragged_forward_cuda));
  m.impl("rnn_layer_ragged_backward", TORCH_FN(varlen_rnn::cuda::rnn_layer_ragged_backward_cuda));
}
#endif  // VARLEN_RNN_HOST_EMULATION
