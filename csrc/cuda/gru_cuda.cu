// CUDA backend of varlen_rnn: the op entry points (argument checks, outputs,
// the rows of padded or ragged input) + TORCH_LIBRARY_IMPL(varlen_rnn, CUDA).
// call.h holds a call's state and the path choice, paths.cuh the per-path
// launchers; both are headers so the backend stays one translation unit.
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
#include <ATen/core/Tensor.h>
#include <ATen/cuda/CUDAContext.h>
#include <ATen/ops/arange.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/index_select.h>
#include <ATen/ops/zeros.h>
#include <ATen/ops/zeros_like.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <tuple>
#include <vector>

#include "call.h"
#include "gru.h"
#include "launch.h"
#include "layout.h"
#include "paths.cuh"
#include "plan.h"
#include "rows.h"

namespace varlen_rnn {
namespace cuda {
namespace {

using at::Tensor;

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
