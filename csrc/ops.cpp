// The one schema file: every varlen_rnn operator, documented. Kernels live in
// cpu/gru_cpu.cpp and cuda/gru_cuda.cu and register with TORCH_LIBRARY_IMPL.
//
// Shape legend (see gru.h): T time steps, B batch, I input features, H hidden,
// D directions (1 or 2). Gate order r|z|n as torch.nn.GRU. Tensors are
// time-major [T, B, ...] unless batch_first, then [B, T, ...].
#include <torch/library.h>

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
  //   workspace [D, rows, 4H] in the op-math dtype when need_workspace, else
  //             [0]: what the backward needs. Its rows and their layout are
  //             the backend's: N = sum(lengths) on the CPU (nothing for
  //             padding), T*B on CUDA (N is not known without a host sync).
  m.def(
      "gru_layer_forward(Tensor input, Tensor lengths, Tensor hx, Tensor w_ih, "
      "Tensor w_hh, Tensor? b_ih, Tensor? b_hh, bool batch_first, "
      "bool need_workspace) -> (Tensor output, Tensor h_n, Tensor workspace)");
  // The gradient of gru_layer_forward. grad_output/output like the forward's
  // output, grad_h_n like h_n, workspace as the forward returned it.
  // Returns grad_input, grad_hx, grad_w_ih, grad_w_hh, and grad_b_ih,
  // grad_b_hh of shape [D, 3H] (computed whether or not the layer has biases).
  m.def(
      "gru_layer_backward(Tensor grad_output, Tensor grad_h_n, Tensor input, "
      "Tensor lengths, Tensor hx, Tensor w_ih, Tensor w_hh, Tensor output, "
      "Tensor workspace, bool batch_first) -> (Tensor grad_input, "
      "Tensor grad_hx, Tensor grad_w_ih, Tensor grad_w_hh, Tensor grad_b_ih, "
      "Tensor grad_b_hh)");
}
