// Shared declarations and argument checks for the varlen_rnn kernels.
//
// Shape legend, used in every shape comment:
//   T  time steps (padded length)      B  batch
//   I  input features                  H  hidden features
//   D  directions (1, or 2 if bidirectional)
//   G  gates of the cell (GRU 3: r|z|n, LSTM 4: i|f|g|o, RNN 1; torch.nn's order)
//   S  values per unit the workspace keeps for the backward (cells/cell.h kWorkspaceSaved)
//   P  the state and output width: the LSTM's proj_size, else H
//   N  sum of lengths: the valid (t, b) positions
// Padded tensors are time-major [T, B, ...] unless batch_first ([B, T, ...]).
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/core/impl/LocalDispatchKeySet.h>
#include <c10/util/Exception.h>

#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "cells/cell.h"

namespace varlen_rnn {

struct LayerDims {
  int64_t T, B, I, H, D;
  bool batch_first;
  int64_t G = 3, S = 4;  // the cell's gates and workspace values (GRU unless set)
  int64_t P = 0;         // state width: H, or the LSTM's proj_size
  // output's shape: [T, B, D*P], or [B, T, D*P] if batch_first.
  std::vector<int64_t> output_sizes() const {
    return batch_first ? std::vector<int64_t>{B, T, D * P} : std::vector<int64_t>{T, B, D * P};
  }
  // Element strides of (t, b) in a padded tensor with `features` columns.
  int64_t stride_t(int64_t features) const { return batch_first ? features : B * features; }
  int64_t stride_b(int64_t features) const { return batch_first ? T * features : features; }
};

// Half types are computed in float (their op-math type): the state, the gates
// and every accumulation. The one C++ statement of that rule.
inline at::ScalarType opmath_dtype(at::ScalarType t) {
  return (t == at::kHalf || t == at::kBFloat16) ? at::kFloat : t;
}

// The workspace's dtype (the saved values the backward reads): the op-math
// one, but bfloat16 for a bfloat16 input, where the forward rounds each saved
// value once as it stores it (cpu/rows.h Workspace; the CUDA kernels'
// workspace_t), as nn's bfloat16 CPU path keeps its saved values in bfloat16.
inline at::ScalarType workspace_dtype(at::ScalarType input) {
  return input == at::kBFloat16 ? input : opmath_dtype(input);
}

// Kernels call ATen GEMMs internally; under torch.autocast those would be
// re-cast behind the kernel's back. Every kernel entry holds this guard: the
// module applies nn.GRU's autocast policy before calling the ops.
struct NoAutocastGuard {
  c10::impl::ExcludeDispatchKeyGuard guard{c10::autocast_dispatch_keyset};
};

// The workspace a backward op may write over (its gate gradients dG: the CPU's
// cpu/recurrence.h backward_impl, CUDA's cuda/entries.h set_backward_buffers):
// set, for its own call of the backward op only, by the node an eager call
// records (recording.cpp), where autograd frees the workspace right after that
// call (the graph is not kept) and nothing else holds it. The backward
// consumes only the tensor whose data is at this address; every other call
// (the op called directly, the registered autograd's backward, a kept graph)
// leaves its workspace unmodified, as the schema says. Not in the schema: no
// caller but that node may ask it.
class ConsumableWorkspace {
 public:
  explicit ConsumableWorkspace(const void* data) : saved_(current_) { current_ = data; }
  ~ConsumableWorkspace() { current_ = saved_; }
  ConsumableWorkspace(const ConsumableWorkspace&) = delete;
  ConsumableWorkspace& operator=(const ConsumableWorkspace&) = delete;
  // Whether the backward op now running may consume this workspace.
  static bool allows(const at::Tensor& workspace) {
    return current_ != nullptr && workspace.defined() && workspace.numel() > 0 &&
           workspace.const_data_ptr() == current_;
  }

 private:
  const void* const saved_;
  static inline thread_local const void* current_ = nullptr;
};

inline void check_same_device_dtype(const at::Tensor& ref, const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.device() == ref.device(), name, " must be on the input's device ", ref.device(),
              ", got ", t.device());
  TORCH_CHECK(t.scalar_type() == ref.scalar_type(), name, " must have the input's dtype ",
              ref.scalar_type(), ", got ", t.scalar_type());
}

// What the checks know of the layer's cell, and the LSTM's extra tensors. The
// default is the GRU's.
struct CellArgs {
  int64_t gates = 3;                                // Cell::kGates
  int64_t saved = 4;                                // kWorkspaceSaved<Cell> (cells/cell.h)
  const at::Tensor* cx = nullptr;                   // [D, B, H] for a cell with c (LSTM)
  const std::optional<at::Tensor>* w_hr = nullptr;  // [D, P, H] or None (LSTM's projection)

  template <typename Cell>
  static CellArgs of(const at::Tensor* cx = nullptr,
                     const std::optional<at::Tensor>* w_hr = nullptr) {
    return CellArgs{Cell::kGates, kWorkspaceSaved<Cell>, cx, w_hr};
  }
  bool has_c() const { return cx != nullptr; }
};

// "3H" for G = 3, "H" for G = 1: how the messages spell a gate block's rows.
inline std::string gate_rows(int64_t G) { return G == 1 ? "H" : std::to_string(G) + "H"; }

// The RNN's nonlinearity argument: true for "relu", false for "tanh".
inline bool check_nonlinearity(std::string_view nonlinearity) {
  TORCH_CHECK(nonlinearity == "tanh" || nonlinearity == "relu",
              "nonlinearity must be 'tanh' or 'relu', got '", nonlinearity, "'");
  return nonlinearity == "relu";
}

// Checks a [D, B, width] state tensor (hx, cx, grad_h_n, grad_c_n).
inline void check_state(const LayerDims& dims, const at::Tensor& input, const at::Tensor& t,
                        const char* name, int64_t width, const char* width_name) {
  TORCH_CHECK(t.dim() == 3 && t.size(0) == dims.D && t.size(1) == dims.B && t.size(2) == width,
              name, " must be [D, B, ", width_name, "] = [", dims.D, ", ", dims.B, ", ", width,
              "], got shape ", t.sizes());
  check_same_device_dtype(input, t, name);
}

// The checks of the weights, biases and states that every layer op shares. I
// is the input's feature count, B the batch; fills dims.D, H, P, G and S.
inline void check_weight_args(LayerDims& dims, const at::Tensor& input, const at::Tensor& hx,
                              const at::Tensor& w_ih, const at::Tensor& w_hh,
                              const std::optional<at::Tensor>& b_ih,
                              const std::optional<at::Tensor>& b_hh,
                              const CellArgs& cell = CellArgs{}) {
  const int64_t G = cell.gates;
  const std::string GH = gate_rows(G);
  dims.G = G;
  dims.S = cell.saved;
  TORCH_CHECK(w_ih.dim() == 3 && (w_ih.size(0) == 1 || w_ih.size(0) == 2) &&
                  w_ih.size(1) % G == 0 && w_ih.size(2) == dims.I,
              "w_ih must be [D, ", GH, ", I] with D in {1, 2} and I=", dims.I, ", got shape ",
              w_ih.sizes());
  dims.D = w_ih.size(0);
  dims.H = w_ih.size(1) / G;
  TORCH_CHECK(dims.H > 0, "hidden size must be positive, got w_ih of shape ", w_ih.sizes());
  check_same_device_dtype(input, w_ih, "w_ih");
  dims.P = dims.H;
  // The LSTM names its state width P (proj_size, or H without a projection).
  const char* P_name = cell.has_c() ? "P" : "H";
  if (cell.w_hr != nullptr && cell.w_hr->has_value()) {
    const at::Tensor& w_hr = **cell.w_hr;
    TORCH_CHECK(
        w_hr.dim() == 3 && w_hr.size(0) == dims.D && w_hr.size(1) > 0 && w_hr.size(2) == dims.H,
        "w_hr must be [D, P, H] = [", dims.D, ", P, ", dims.H,
        "] with P > 0 (proj_size; None without a projection), got shape ", w_hr.sizes());
    check_same_device_dtype(input, w_hr, "w_hr");
    dims.P = w_hr.size(1);
  }
  TORCH_CHECK(w_hh.dim() == 3 && w_hh.size(0) == dims.D && w_hh.size(1) == G * dims.H &&
                  w_hh.size(2) == dims.P,
              "w_hh must be [D, ", GH, ", ", P_name, "] = [", dims.D, ", ", G * dims.H, ", ",
              dims.P, "], got shape ", w_hh.sizes());
  check_same_device_dtype(input, w_hh, "w_hh");
  TORCH_CHECK(b_ih.has_value() == b_hh.has_value(),
              "b_ih and b_hh must be given together or both be None");
  for (const auto* b : {&b_ih, &b_hh}) {
    if (!b->has_value()) continue;
    const char* name = b == &b_ih ? "b_ih" : "b_hh";
    TORCH_CHECK((*b)->dim() == 2 && (*b)->size(0) == dims.D && (*b)->size(1) == G * dims.H, name,
                " must be [D, ", GH, "] = [", dims.D, ", ", G * dims.H, "], got shape ",
                (*b)->sizes());
    check_same_device_dtype(input, **b, name);
  }
  check_state(dims, input, hx, "hx", dims.P, P_name);
  if (cell.has_c()) check_state(dims, input, *cell.cx, "cx", dims.H, "H");
}

// Checks everything that shapes and dtypes alone decide. The values of
// `lengths` (0 <= length <= T) are checked by each backend: on the host where
// they live on the CPU, else by the kernel.
inline LayerDims check_layer_args(const at::Tensor& input, const at::Tensor& lengths,
                                  const at::Tensor& hx, const at::Tensor& w_ih,
                                  const at::Tensor& w_hh, const std::optional<at::Tensor>& b_ih,
                                  const std::optional<at::Tensor>& b_hh, bool batch_first,
                                  const CellArgs& cell = CellArgs{}) {
  TORCH_CHECK(input.dim() == 3, "input must be 3-D ", batch_first ? "[B, T, I]" : "[T, B, I]",
              ", got shape ", input.sizes());
  TORCH_CHECK(at::isFloatingType(input.scalar_type()),
              "input must be a floating point tensor, got ", input.scalar_type());
  LayerDims dims;
  dims.batch_first = batch_first;
  dims.T = input.size(batch_first ? 1 : 0);
  dims.B = input.size(batch_first ? 0 : 1);
  dims.I = input.size(2);
  check_weight_args(dims, input, hx, w_ih, w_hh, b_ih, b_hh, cell);
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

// ---- The ragged ops (ops.cpp's gru_layer_ragged_*) ---------------------------
//
// layout 0 "offsets": seq_index = offsets [B+1]; layout 1 "packed": seq_index =
// batch_sizes [T] on the CPU, with sorted_indices [B] or None. RowMap in
// layout.h says where (t, b) lives.

// T is max_len (the step loop's bound), not a tensor dimension.
struct RaggedDims : LayerDims {
  int64_t N = 0;       // input.size(0): the valid positions
  int32_t layout = 0;  // 0 offsets, 1 packed
  std::vector<int64_t> output_sizes() const { return {N, D * P}; }
};

// Checks everything that shapes, dtypes and devices decide. The values of
// seq_index and sorted_indices are checked where a backend reads them (the
// check_*_values functions below, on host copies).
inline RaggedDims check_ragged_args(const at::Tensor& input, const at::Tensor& seq_index,
                                    const std::optional<at::Tensor>& sorted_indices, int64_t layout,
                                    int64_t max_len, const at::Tensor& hx, const at::Tensor& w_ih,
                                    const at::Tensor& w_hh, const std::optional<at::Tensor>& b_ih,
                                    const std::optional<at::Tensor>& b_hh,
                                    const CellArgs& cell = CellArgs{}) {
  TORCH_CHECK(input.dim() == 2, "input must be 2-D [N, I] (the valid rows), got shape ",
              input.sizes());
  TORCH_CHECK(at::isFloatingType(input.scalar_type()),
              "input must be a floating point tensor, got ", input.scalar_type());
  TORCH_CHECK(layout == 0 || layout == 1,
              "layout must be 0 (offsets, sequence-major) or 1 (packed, time-major), got ", layout);
  TORCH_CHECK(seq_index.scalar_type() == at::kLong || seq_index.scalar_type() == at::kInt,
              "seq_index must be an int64 or int32 tensor, got ", seq_index.scalar_type());
  TORCH_CHECK(max_len >= 0, "max_len must be >= 0, got ", max_len);
  RaggedDims dims;
  dims.layout = static_cast<int32_t>(layout);
  dims.batch_first = false;
  dims.N = input.size(0);
  dims.I = input.size(1);
  dims.T = max_len;
  if (layout == 0) {
    TORCH_CHECK(seq_index.dim() == 1 && seq_index.size(0) >= 1,
                "seq_index (offsets) must be 1-D of size B+1 >= 1, got shape ", seq_index.sizes());
    TORCH_CHECK(seq_index.device() == input.device() || seq_index.is_cpu(),
                "seq_index (offsets) must be on the input's device ", input.device(),
                " or the CPU, got ", seq_index.device());
    TORCH_CHECK(!sorted_indices.has_value(),
                "sorted_indices must be None for layout 0 (offsets): the offsets give each "
                "sequence's rows in order");
    dims.B = seq_index.size(0) - 1;
  } else {
    TORCH_CHECK(seq_index.dim() == 1, "seq_index (batch_sizes) must be 1-D [T], got shape ",
                seq_index.sizes());
    TORCH_CHECK(seq_index.is_cpu(),
                "seq_index (batch_sizes) must be on the CPU, as PackedSequence keeps it, got ",
                seq_index.device());
    TORCH_CHECK(max_len >= seq_index.size(0),
                "max_len must be >= batch_sizes.size(0)=", seq_index.size(0),
                " (the longest length), got ", max_len);
    TORCH_CHECK(hx.dim() == 3, "hx must be 3-D [D, B, ", cell.has_c() ? "P" : "H", "], got shape ",
                hx.sizes());
    dims.B = hx.size(1);  // batch_sizes[0], checked with the values
    if (sorted_indices.has_value()) {
      const at::Tensor& si = *sorted_indices;
      TORCH_CHECK(si.dim() == 1 && si.size(0) == dims.B,
                  "sorted_indices must be 1-D of size B=", dims.B, " (hx.size(1)), got shape ",
                  si.sizes());
      TORCH_CHECK(si.scalar_type() == at::kLong, "sorted_indices must be an int64 tensor, got ",
                  si.scalar_type());
      TORCH_CHECK(si.device() == input.device() || si.is_cpu(),
                  "sorted_indices must be on the input's device ", input.device(),
                  " or the CPU, got ", si.device());
    }
  }
  check_weight_args(dims, input, hx, w_ih, w_hh, b_ih, b_hh, cell);
  return dims;
}

// The value checks of seq_index and sorted_indices, on host int64 copies: the
// CPU backend runs them always, CUDA where the values live on the CPU.

// offsets [B+1]
inline void check_offsets_values(const int64_t* offsets, int64_t B, int64_t N, int64_t max_len) {
  TORCH_CHECK(offsets[0] == 0, "offsets[0] must be 0, got seq_index (offsets)[0]=", offsets[0]);
  for (int64_t b = 0; b < B; ++b) {
    TORCH_CHECK(offsets[b] <= offsets[b + 1],
                "seq_index (offsets) must be non-decreasing, got "
                "offsets[",
                b, "]=", offsets[b], " > offsets[", b + 1, "]=", offsets[b + 1]);
  }
  TORCH_CHECK(offsets[B] == N, "offsets[B] must equal input.size(0)=", N, ", got offsets[", B,
              "]=", offsets[B]);
  for (int64_t b = 0; b < B; ++b) {
    const int64_t len = offsets[b + 1] - offsets[b];
    TORCH_CHECK(len <= max_len, "max_len=", max_len, " must be >= every length, got length ", len,
                " for sequence ", b, " (offsets[", b + 1, "] - offsets[", b, "])");
  }
}

// batch_sizes [T]
inline void check_batch_sizes_values(const int64_t* batch_sizes, int64_t T, int64_t B, int64_t N) {
  int64_t sum = 0;
  for (int64_t t = 0; t < T; ++t) {
    TORCH_CHECK(batch_sizes[t] >= 1, "seq_index (batch_sizes) must be >= 1, got batch_sizes[", t,
                "]=", batch_sizes[t]);
    TORCH_CHECK(t == 0 || batch_sizes[t] <= batch_sizes[t - 1],
                "seq_index (batch_sizes) must be non-increasing, got batch_sizes[", t - 1,
                "]=", batch_sizes[t - 1], " < batch_sizes[", t, "]=", batch_sizes[t]);
    sum += batch_sizes[t];
  }
  TORCH_CHECK(T == 0 || batch_sizes[0] == B, "batch_sizes[0] must equal B=", B,
              " (hx.size(1)), got ", batch_sizes[0]);
  TORCH_CHECK(sum == N, "seq_index (batch_sizes) must sum to input.size(0)=", N, ", got ", sum);
}

// sorted_indices [B]
inline void check_sorted_indices_values(const int64_t* sorted_indices, int64_t B) {
  std::vector<bool> seen(B, false);
  for (int64_t i = 0; i < B; ++i) {
    const int64_t b = sorted_indices[i];
    TORCH_CHECK(b >= 0 && b < B && !seen[b],
                "sorted_indices must be a permutation of 0..B-1 (B=", B, "), got sorted_indices[",
                i, "]=", b, (b >= 0 && b < B) ? " twice" : " out of range");
    seen[b] = true;
  }
}

// Extra checks of the backward's tensors against the forward's dims, the same
// for every backend (padded or ragged). workspace_rows: how many rows the
// backend's forward gives the workspace. grad_c_n: the LSTM's [D, B, H], null
// for the other cells. grad_output None: zero (ops.cpp).
template <typename Dims>  // LayerDims or RaggedDims
inline void check_backward_args(const Dims& dims, const at::Tensor& input,
                                const std::optional<at::Tensor>& grad_output,
                                const at::Tensor& grad_h_n, const at::Tensor& output,
                                const at::Tensor& workspace, int64_t workspace_rows,
                                const at::Tensor* grad_c_n = nullptr) {
  const auto out_sizes = dims.output_sizes();
  const c10::IntArrayRef want(out_sizes);  // prints as [a, b, c]
  if (grad_output.has_value()) {
    TORCH_CHECK(grad_output->sizes() == want, "grad_output must have shape ", want, ", got ",
                grad_output->sizes());
    check_same_device_dtype(input, *grad_output, "grad_output");
  }
  TORCH_CHECK(output.sizes() == want, "output must have shape ", want, ", got ", output.sizes());
  check_same_device_dtype(input, output, "output");
  const bool has_c = grad_c_n != nullptr;
  check_state(dims, input, grad_h_n, "grad_h_n", dims.P, has_c ? "P" : "H");
  if (has_c) check_state(dims, input, *grad_c_n, "grad_c_n", dims.H, "H");
  const std::string SH = dims.S == 0 ? "0" : gate_rows(dims.S);
  TORCH_CHECK(workspace.dim() == 3 && workspace.size(0) == dims.D &&
                  workspace.size(1) == workspace_rows && workspace.size(2) == dims.S * dims.H,
              "workspace must be [D, ", workspace_rows, ", ", SH,
              "] as this backend's "
              "forward (need_workspace=True) returns it, got shape ",
              workspace.sizes());
  const auto ws_dtype = workspace_dtype(input.scalar_type());
  TORCH_CHECK(workspace.device() == input.device() && workspace.scalar_type() == ws_dtype,
              "workspace must be a ", ws_dtype, " tensor on ", input.device(),
              " as the forward returns it, got ", workspace.scalar_type(), " on ",
              workspace.device());
}

}  // namespace varlen_rnn
