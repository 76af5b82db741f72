// The one schema file: every varlen_rnn operator, documented. Kernels live in
// cpu/{gru,lstm,rnn}_cpu.cpp and cuda/ops_cuda.cu, which register them with
// TORCH_LIBRARY_IMPL; one recurrence per backend is templated on the cell
// (csrc/cells/).
//
// Shape legend (see layer.h): T time steps, B batch, I input features, H hidden,
// D directions (1 or 2), G gates (GRU 3: r|z|n, LSTM 4: i|f|g|o, RNN 1, in
// torch.nn's order), P the LSTM's state width (proj_size, or H without a
// projection), S the values a cell saves per unit (csrc/cells/: GRU 4,
// LSTM 5, RNN none: it reads h' from the output). Tensors are
// time-major [T, B, ...] unless batch_first, then [B, T, ...]; ragged
// tensors are [N, ...] (N valid positions).
#include <torch/library.h>

#include <string>

#include "layer.h"  // ConsumableWorkspace

namespace {

bool workspace_consumable(const at::Tensor& workspace) {
  return varlen_rnn::ConsumableWorkspace::allows(workspace);
}

// s with `part` (which must be there) replaced by `by`.
std::string replaced(std::string s, const std::string& part, const std::string& by) {
  const auto at = s.find(part);
  TORCH_CHECK(at != std::string::npos, "varlen_rnn: no '", part, "' in ", s);
  return s.replace(at, part.size(), by);
}

// The schema of a layer op that decides need_workspace itself (below) from
// its forward's: "<name>_forward(..., bool need_workspace) -> (..., Tensor
// workspace)" becomes "<name>(...) -> (...)".
std::string deciding_workspace(const std::string& forward) {
  const std::string s = replaced(forward, "_forward", "");
  return replaced(replaced(s, ", bool need_workspace", ""), ", Tensor workspace", "");
}

// The schema of a layer op's recording op (below) from its forward's:
// "<name>_forward(..., bool need_workspace) -> (..., Tensor workspace)"
// becomes "<name>_recording(..., bool squeezed) -> (...)".
std::string recording(const std::string& forward) {
  const std::string s = replaced(forward, "_forward(", "_recording(");
  return replaced(replaced(s, "bool need_workspace", "bool squeezed"), ", Tensor workspace", "");
}

}  // namespace

TORCH_LIBRARY(varlen_rnn, m) {
  // One GRU layer over a padded batch, both directions when D == 2.
  //   input    [T, B, I] (or [B, T, I] if batch_first)
  //   lengths  [B] int64 on input's device, values in [0, T], any order
  //   hx       [D, B, H] initial state
  //   w_ih     [D, 3H, I], w_hh [D, 3H, H], b_ih/b_hh [D, 3H] or None
  // Returns
  //   output    [T, B, D*H] (or [B, T, D*H]); 0 at positions t >= lengths[b]
  //   h_n       [D, B, H]: state after each row's own last valid step
  //             (the reverse direction starts at that step), hx where length 0
  //   workspace [D, rows, 4H] when need_workspace (the op-math dtype, but
  //             bfloat16 for a bfloat16 input: layer.h), else
  //             [0]: what the backward needs. Its rows and their layout are
  //             the backend's: N = sum(lengths) on the CPU (nothing for
  //             padding), T*B on CUDA (N is not known without a host sync),
  //             where the rows of padded positions hold 0, as the output's.
  const std::string gru_layer =
      "gru_layer_forward(Tensor input, Tensor lengths, Tensor hx, Tensor w_ih, "
      "Tensor w_hh, Tensor? b_ih, Tensor? b_hh, bool batch_first, "
      "bool need_workspace) -> (Tensor output, Tensor h_n, Tensor workspace)";
  m.def(gru_layer.c_str());
  // The gradient of gru_layer_forward. grad_output/output like the forward's
  // output, grad_h_n like h_n, workspace as the forward returned it.
  // grad_output None: a zero gradient (the output is not used, as in a
  // classifier that reads only h_n), read as zeros without an output-sized
  // tensor of them.
  // Returns grad_input, grad_hx, grad_w_ih, grad_w_hh, and grad_b_ih,
  // grad_b_hh of shape [D, 3H] (computed whether or not the layer has biases).
  // output_mask = [input, weights] says which are wanted (cuDNN's
  // _cudnn_rnn_backward has the same): grad_input, or the weight and bias
  // gradients, where masked are not computed and come back as [0] tensors
  // (the first input of a model is often data, its weights frozen in
  // fine-tuning). grad_hx is always computed: the recurrence gives it.
  m.def(
      "gru_layer_backward(Tensor? grad_output, Tensor grad_h_n, Tensor input, "
      "Tensor lengths, Tensor hx, Tensor w_ih, Tensor w_hh, Tensor output, "
      "Tensor workspace, bool batch_first, bool[2] output_mask=[True, True]) -> (Tensor "
      "grad_input, "
      "Tensor grad_hx, Tensor grad_w_ih, Tensor grad_w_hh, Tensor grad_b_ih, "
      "Tensor grad_b_hh)");

  // One GRU layer over ragged rows: `input` holds only the N valid positions,
  // nothing padded. How (t, b) maps to a row is csrc/layout.h's RowMap.
  //   input       [N, I], rows in the layout's order (N = input.size(0))
  //   layout      0 "offsets" (sequence-major, a jagged nested tensor's values):
  //                 seq_index = offsets [B+1] int64/int32 on input's device or
  //                 the CPU, non-decreasing, offsets[0] = 0, offsets[B] = N;
  //                 row of (b, t) = offsets[b] + t; length of b =
  //                 offsets[b+1] - offsets[b] (0 allowed). sorted_indices
  //                 must be None.
  //               1 "packed" (time-major, PackedSequence.data): seq_index =
  //                 batch_sizes [T] int64 on the CPU, non-increasing, >= 1,
  //                 batch_sizes[0] = B, summing to N; sorted_indices [B] int64
  //                 (None: identity) maps rank i to sequence b; row of
  //                 (rank i, t) = sum(batch_sizes[:t]) + i.
  //   max_len     >= every length: the step loop's bound (layout 1:
  //               batch_sizes.size(0)); checked by each backend.
  //   hx          [D, B, H] in sequence order b (not rank order)
  //   w_ih, w_hh, b_ih, b_hh as gru_layer_forward
  // Returns
  //   output    [N, D*H], the input's row order
  //   h_n       [D, B, H] in sequence order b: each sequence's state after
  //             its own last step, hx where the length is 0
  //   workspace [D, N, 4H] when need_workspace (dtype as above), else
  //             [0]; its row order is the backend's.
  const std::string gru_layer_ragged =
      "gru_layer_ragged_forward(Tensor input, Tensor seq_index, "
      "Tensor? sorted_indices, int layout, SymInt max_len, Tensor hx, "
      "Tensor w_ih, Tensor w_hh, Tensor? b_ih, Tensor? b_hh, "
      "bool need_workspace) -> (Tensor output, Tensor h_n, Tensor workspace)";
  m.def(gru_layer_ragged.c_str());
  // The gradient of gru_layer_ragged_forward, shaped like
  // gru_layer_backward's: grad_input [N, I], grad_hx [D, B, H], and the
  // weight and bias gradients (grad_b_* [D, 3H] whether or not the layer has
  // biases).
  m.def(
      "gru_layer_ragged_backward(Tensor? grad_output, Tensor grad_h_n, "
      "Tensor input, Tensor seq_index, Tensor? sorted_indices, int layout, "
      "SymInt max_len, Tensor hx, Tensor w_ih, Tensor w_hh, Tensor output, "
      "Tensor workspace, bool[2] output_mask=[True, True]) -> (Tensor grad_input, Tensor grad_hx, "
      "Tensor grad_w_ih, Tensor grad_w_hh, Tensor grad_b_ih, Tensor grad_b_hh)");

  // ---- LSTM and RNN: the GRU ops' contract with another cell --------------
  // Each op below is its gru_* namesake with the cell changed; everything not
  // stated is as documented there (lengths, layouts, padding zeros, h_n of
  // zero-length rows, workspace rows per backend, grad_b_* always computed).

  // One LSTM layer (torch.nn.LSTM), optionally with a projection.
  //   hx [D, B, P], cx [D, B, H]; w_ih [D, 4H, I], w_hh [D, 4H, P],
  //   b_ih/b_hh [D, 4H] or None, w_hr [D, P, H] or None (proj_size = 0).
  // Returns output [T, B, D*P] (or [B, T, D*P]), h_n [D, B, P], c_n [D, B, H],
  // workspace [D, rows, 5H].
  const std::string lstm_layer =
      "lstm_layer_forward(Tensor input, Tensor lengths, Tensor hx, Tensor cx, "
      "Tensor w_ih, Tensor w_hh, Tensor? b_ih, Tensor? b_hh, Tensor? w_hr, "
      "bool batch_first, bool need_workspace) -> (Tensor output, Tensor h_n, "
      "Tensor c_n, Tensor workspace)";
  m.def(lstm_layer.c_str());
  // grad_w_hr [D, P, H], or [0] when w_hr is None.
  m.def(
      "lstm_layer_backward(Tensor? grad_output, Tensor grad_h_n, Tensor grad_c_n, "
      "Tensor input, Tensor lengths, Tensor hx, Tensor cx, Tensor w_ih, "
      "Tensor w_hh, Tensor? w_hr, Tensor output, Tensor workspace, "
      "bool batch_first, bool[2] output_mask=[True, True]) -> (Tensor grad_input, Tensor grad_hx, "
      "Tensor grad_cx, "
      "Tensor grad_w_ih, Tensor grad_w_hh, Tensor grad_b_ih, Tensor grad_b_hh, "
      "Tensor grad_w_hr)");
  const std::string lstm_layer_ragged =
      "lstm_layer_ragged_forward(Tensor input, Tensor seq_index, "
      "Tensor? sorted_indices, int layout, SymInt max_len, Tensor hx, Tensor cx, "
      "Tensor w_ih, Tensor w_hh, Tensor? b_ih, Tensor? b_hh, Tensor? w_hr, "
      "bool need_workspace) -> (Tensor output, Tensor h_n, Tensor c_n, "
      "Tensor workspace)";
  m.def(lstm_layer_ragged.c_str());
  m.def(
      "lstm_layer_ragged_backward(Tensor? grad_output, Tensor grad_h_n, "
      "Tensor grad_c_n, Tensor input, Tensor seq_index, Tensor? sorted_indices, "
      "int layout, SymInt max_len, Tensor hx, Tensor cx, Tensor w_ih, "
      "Tensor w_hh, Tensor? w_hr, Tensor output, Tensor workspace, bool[2] output_mask=[True, "
      "True]) -> "
      "(Tensor grad_input, Tensor grad_hx, Tensor grad_cx, Tensor grad_w_ih, "
      "Tensor grad_w_hh, Tensor grad_b_ih, Tensor grad_b_hh, Tensor grad_w_hr)");

  // One Elman RNN layer (torch.nn.RNN): nonlinearity "tanh" or "relu".
  //   w_ih [D, H, I], w_hh [D, H, H], b_ih/b_hh [D, H] or None.
  // Returns as gru_layer_forward, workspace [D, rows, 0]: the backward reads
  // h' (what the cell saves) from the output it is given.
  const std::string rnn_layer =
      "rnn_layer_forward(Tensor input, Tensor lengths, Tensor hx, Tensor w_ih, "
      "Tensor w_hh, Tensor? b_ih, Tensor? b_hh, str nonlinearity, "
      "bool batch_first, bool need_workspace) -> (Tensor output, Tensor h_n, "
      "Tensor workspace)";
  m.def(rnn_layer.c_str());
  m.def(
      "rnn_layer_backward(Tensor? grad_output, Tensor grad_h_n, Tensor input, "
      "Tensor lengths, Tensor hx, Tensor w_ih, Tensor w_hh, Tensor output, "
      "Tensor workspace, str nonlinearity, bool batch_first, bool[2] output_mask=[True, True]) -> "
      "(Tensor grad_input, Tensor grad_hx, Tensor grad_w_ih, Tensor grad_w_hh, "
      "Tensor grad_b_ih, Tensor grad_b_hh)");
  const std::string rnn_layer_ragged =
      "rnn_layer_ragged_forward(Tensor input, Tensor seq_index, "
      "Tensor? sorted_indices, int layout, SymInt max_len, Tensor hx, "
      "Tensor w_ih, Tensor w_hh, Tensor? b_ih, Tensor? b_hh, str nonlinearity, "
      "bool need_workspace) -> (Tensor output, Tensor h_n, Tensor workspace)";
  m.def(rnn_layer_ragged.c_str());
  m.def(
      "rnn_layer_ragged_backward(Tensor? grad_output, Tensor grad_h_n, "
      "Tensor input, Tensor seq_index, Tensor? sorted_indices, int layout, "
      "SymInt max_len, Tensor hx, Tensor w_ih, Tensor w_hh, Tensor output, "
      "Tensor workspace, str nonlinearity, bool[2] output_mask=[True, True]) -> (Tensor "
      "grad_input, "
      "Tensor grad_hx, Tensor grad_w_ih, Tensor grad_w_hh, Tensor grad_b_ih, "
      "Tensor grad_b_hh)");
  // ---- The layers deciding need_workspace themselves ----------------------
  // {gru,lstm,rnn}_layer[_ragged]: the forward op's arguments without
  // need_workspace, its results without the workspace. Whether to keep what
  // the backward needs is decided when the op runs (a gradient is wanted:
  // grad mode on and an input requiring one), as for torch.nn's RNN ops, so
  // a torch.jit.trace of a layer runs for training or inference alike. With
  // packed rows (layout 1) max_len is batch_sizes.size(0), whatever is passed:
  // a trace holds the traced call's max_len as a constant.
  // CompositeImplicitAutograd (csrc/deciding_workspace.cpp): the forward op
  // with its autograd does the work.
  for (const std::string* forward : {&gru_layer, &gru_layer_ragged, &lstm_layer, &lstm_layer_ragged,
                                     &rnn_layer, &rnn_layer_ragged}) {
    m.def(deciding_workspace(*forward).c_str());
    m.def(recording(*forward).c_str());  // the recording ops: below
  }
  // {gru,lstm,rnn}_layer[_ragged]_recording: what an eager call that records a
  // graph runs (varlen_rnn/ops.py _layer; not a public op). The forward op's
  // arguments, need_workspace's place taking `bool squeezed`: true where one
  // direction's weights come without their D dimension of 1 (w_ih [G*H, I],
  // b_ih [G*H], ...: a module's parameters as they are), whose gradients are
  // then returned so. Returns the forward's results but the workspace, which
  // the recorded node keeps. Its Autograd kernel (csrc/recording.cpp) runs the
  // forward op below autograd and records one C++ node whose backward calls the
  // backward op; below autograd it is the forward op without a workspace.
  // (Defined in the loop above, beside the deciding ops.)
  // Tests and benchmarks only (not a public op): a [m, K] @ b [K, N] (+ c
  // [m, N] when given) through the CPU step loops' float32 micro-kernel
  // (cpu/small_gemm.h), b packed first. kernel: "auto", "avx512", "avx2" or
  // "portable" (an error where the CPU lacks it), "blas": the step loops'
  // single-threaded BLAS call instead (no c), "dots": the product on b^T as
  // a stored weight, f32_dot_rows on all threads (AVX-512 or AVX2; no c), or "rows":
  // on b as a stored [K, N] weight, f32_rows_times (AVX-512 or AVX2). The product
  // runs `repeats` times into the same output, a timing loop: c + repeats * a b with c
  // (repeats = 0 packs only). b may also be a stack of column groups
  // [groups, K, n] (N = groups * n; the micro-kernels only): a weight's gate
  // slices read where they are, as the split step loops pack them. Returns
  // [m + 1, N + 5]: the result in [:m, :N], NaN elsewhere unless the kernel
  // wrote past its output.
  m.def(
      "_small_gemm(Tensor a, Tensor b, Tensor? c, str kernel, int repeats=1) -> "
      "Tensor");
  // Tests only: a [m, K] bfloat16 @ b [K, N] or [groups, K, n] as _small_gemm's
  // (float32 rounded to bfloat16, or bfloat16),
  // accumulated in float32 (cpu/bf16_gemm.h), on one thread (+ c [m, N] when
  // given) or on all (parallel, + bias [N] on every row when given). Returns
  // [m + 1, N + 5] float32: the result in [:m, :N], NaN elsewhere.
  m.def("_bf16_gemm(Tensor a, Tensor b, Tensor? c, Tensor? bias, bool parallel) -> Tensor");
  // Tests only: sum over i of a[i] [m, K_i] @ b[i] [K_i, N], all bfloat16,
  // float32 sums rounded to bfloat16 once (cpu/bf16_gemm.h
  // bf16_gemm_sum_rounded: a bfloat16 layer's dx over its directions).
  // Returns [m + 1, N + 5] bfloat16: the result in [:m, :N], NaN elsewhere.
  m.def("_bf16_gemm_sum_rounded(Tensor[] a, Tensor[] b) -> Tensor");
  // Test entry: a [m, K] bfloat16 times w [J, K] bfloat16 transposed, the
  // product on a weight as stored (cpu/bf16_gemm.h bf16_weight_product) by
  // method: 0 its own choice, 1 the dot products, 2 the swapped product on
  // the unit VARLEN_RNN_CPU_BF16 gives (cpu/bf16_gemm.h bf16_unit). Returns
  // [m + 1, J + 5] float32: the result in [:m, :J], NaN elsewhere.
  m.def("_bf16_weight_product(Tensor a, Tensor w, int method) -> Tensor");
  // Test entry: a [n, G] and b [n, P], both bfloat16 or both float32, a^T b
  // over few positions (cpu/weight_grad.cpp: bf16_weight_grad for n <=
  // kGradRows, f32_weight_grad for n <= kF32GradRows). Returns [G + 1, P + 5]
  // of their dtype: the result in [:G, :P], NaN elsewhere.
  m.def("_weight_grad(Tensor a, Tensor b) -> Tensor");
  // Tests only: whether a backward op running now may write over `workspace`
  // (layer.h ConsumableWorkspace, set by the node an eager call records). The
  // emulated CUDA backend (tests/emulation.py), a module of its own, passes it
  // on to its own copy of the setting.
  m.def("_workspace_consumable(Tensor workspace) -> bool", &workspace_consumable);
}
