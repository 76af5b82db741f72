// Shared declarations and argument checks for the varlen_rnn kernels.
//
// Shape legend, used in every shape comment:
//   T  time steps (padded length)      B  batch
//   I  input features                  H  hidden features
//   D  directions (1, or 2 if bidirectional); gate order r|z|n as torch.nn.GRU
//   N  sum of lengths: the valid (t, b) positions
// Padded tensors are time-major [T, B, ...] unless batch_first ([B, T, ...]).
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/core/impl/LocalDispatchKeySet.h>
#include <c10/util/Exception.h>

#include <optional>
#include <vector>

namespace varlen_rnn {

struct LayerDims {
  int64_t T, B, I, H, D;
  bool batch_first;
  // output's shape: [T, B, D*H], or [B, T, D*H] if batch_first.
  std::vector<int64_t> output_sizes() const {
    return batch_first ? std::vector<int64_t>{B, T, D * H} : std::vector<int64_t>{T, B, D * H};
  }
  // Element strides of (t, b) in a padded tensor with `features` columns.
  int64_t stride_t(int64_t features) const { return batch_first ? features : B * features; }
  int64_t stride_b(int64_t features) const { return batch_first ? T * features : features; }
};

// Half types are computed in float (their op-math type): the state, the saved
// gates and every accumulation. The one C++ statement of that rule.
inline at::ScalarType opmath_dtype(at::ScalarType t) {
  return (t == at::kHalf || t == at::kBFloat16) ? at::kFloat : t;
}

// Kernels call ATen GEMMs internally; under torch.autocast those would be
// re-cast behind the kernel's back. Every kernel entry holds this guard: the
// module applies nn.GRU's autocast policy before calling the ops.
struct NoAutocastGuard {
  c10::impl::ExcludeDispatchKeyGuard guard{c10::autocast_dispatch_keyset};
};

inline void check_same_device_dtype(const at::Tensor& ref, const at::Tensor& t,
                                    const char* name) {
  TORCH_CHECK(t.device() == ref.device(), name, " must be on the input's device ",
              ref.device(), ", got ", t.device());
  TORCH_CHECK(t.scalar_type() == ref.scalar_type(), name,
              " must have the input's dtype ", ref.scalar_type(), ", got ",
              t.scalar_type());
}

// Checks everything that shapes and dtypes alone decide. The values of
// `lengths` (0 <= length <= T) are checked by each backend: on the host where
// they live on the CPU, else by the kernel.
inline LayerDims check_layer_args(const at::Tensor& input,
                                  const at::Tensor& lengths,
                                  const at::Tensor& hx, const at::Tensor& w_ih,
                                  const at::Tensor& w_hh,
                                  const std::optional<at::Tensor>& b_ih,
                                  const std::optional<at::Tensor>& b_hh,
                                  bool batch_first) {
  TORCH_CHECK(input.dim() == 3, "input must be 3-D ", batch_first ? "[B, T, I]" : "[T, B, I]",
              ", got shape ", input.sizes());
  TORCH_CHECK(at::isFloatingType(input.scalar_type()),
              "input must be a floating point tensor, got ", input.scalar_type());
  LayerDims dims;
  dims.batch_first = batch_first;
  dims.T = input.size(batch_first ? 1 : 0);
  dims.B = input.size(batch_first ? 0 : 1);
  dims.I = input.size(2);
  TORCH_CHECK(w_ih.dim() == 3 && (w_ih.size(0) == 1 || w_ih.size(0) == 2) &&
                  w_ih.size(1) % 3 == 0 && w_ih.size(2) == dims.I,
              "w_ih must be [D, 3H, I] with D in {1, 2} and I=", dims.I, ", got shape ",
              w_ih.sizes());
  dims.D = w_ih.size(0);
  dims.H = w_ih.size(1) / 3;
  TORCH_CHECK(dims.H > 0, "hidden size must be positive, got w_ih of shape ", w_ih.sizes());
  TORCH_CHECK(w_hh.dim() == 3 && w_hh.size(0) == dims.D && w_hh.size(1) == 3 * dims.H &&
                  w_hh.size(2) == dims.H,
              "w_hh must be [D, 3H, H] = [", dims.D, ", ", 3 * dims.H, ", ", dims.H,
              "], got shape ", w_hh.sizes());
  check_same_device_dtype(input, w_ih, "w_ih");
  check_same_device_dtype(input, w_hh, "w_hh");
  TORCH_CHECK(b_ih.has_value() == b_hh.has_value(),
              "b_ih and b_hh must be given together or both be None");
  for (const auto* b : {&b_ih, &b_hh}) {
    if (!b->has_value()) continue;
    const char* name = b == &b_ih ? "b_ih" : "b_hh";
    TORCH_CHECK((*b)->dim() == 2 && (*b)->size(0) == dims.D && (*b)->size(1) == 3 * dims.H,
                name, " must be [D, 3H] = [", dims.D, ", ", 3 * dims.H, "], got shape ",
                (*b)->sizes());
    check_same_device_dtype(input, **b, name);
  }
  TORCH_CHECK(hx.dim() == 3 && hx.size(0) == dims.D && hx.size(1) == dims.B && hx.size(2) == dims.H,
              "hx must be [D, B, H] = [", dims.D, ", ", dims.B, ", ", dims.H, "], got shape ",
              hx.sizes());
  check_same_device_dtype(input, hx, "hx");
  TORCH_CHECK(lengths.dim() == 1 && lengths.size(0) == dims.B,
              "lengths must be 1-D of size B=", dims.B, ", got shape ", lengths.sizes());
  TORCH_CHECK(lengths.scalar_type() == at::kLong || lengths.scalar_type() == at::kInt,
              "lengths must be an int64 or int32 tensor, got ", lengths.scalar_type());
  // On the CPU (where pack_padded_sequence keeps them) or on the input's
  // device; a CUDA backend checks CPU lengths on the host (cuda/launch.h).
  TORCH_CHECK(lengths.device() == input.device() || lengths.device().is_cpu(),
              "lengths must be on the CPU or on the input's device ", input.device(), ", got ",
              lengths.device());
  return dims;
}

// Extra checks of the backward's tensors against the forward's dims, the same
// for every backend. workspace_rows: how many rows the backend's forward gives
// the workspace.
inline void check_backward_args(const LayerDims& dims, const at::Tensor& input,
                                const at::Tensor& grad_output, const at::Tensor& grad_h_n,
                                const at::Tensor& output, const at::Tensor& workspace,
                                int64_t workspace_rows) {
  const auto out_sizes = dims.output_sizes();
  TORCH_CHECK(grad_output.sizes() == out_sizes, "grad_output must have shape ", out_sizes,
              ", got ", grad_output.sizes());
  TORCH_CHECK(output.sizes() == out_sizes, "output must have shape ", out_sizes, ", got ",
              output.sizes());
  TORCH_CHECK(grad_h_n.dim() == 3 && grad_h_n.size(0) == dims.D && grad_h_n.size(1) == dims.B &&
                  grad_h_n.size(2) == dims.H,
              "grad_h_n must be [D, B, H] = [", dims.D, ", ", dims.B, ", ", dims.H, "], got ",
              grad_h_n.sizes());
  check_same_device_dtype(input, grad_output, "grad_output");
  check_same_device_dtype(input, grad_h_n, "grad_h_n");
  check_same_device_dtype(input, output, "output");
  TORCH_CHECK(workspace.dim() == 3 && workspace.size(0) == dims.D &&
                  workspace.size(1) == workspace_rows && workspace.size(2) == 4 * dims.H,
              "workspace must be [D, ", workspace_rows, ", 4H] as this backend's "
              "gru_layer_forward(need_workspace=True) returns it, got shape ",
              workspace.sizes());
  const auto ws_dtype = opmath_dtype(input.scalar_type());
  TORCH_CHECK(workspace.device() == input.device() && workspace.scalar_type() == ws_dtype,
              "workspace must be a ", ws_dtype, " tensor on ", input.device(),
              " as gru_layer_forward returns it, got ", workspace.scalar_type(), " on ",
              workspace.device());
}

}  // namespace varlen_rnn
