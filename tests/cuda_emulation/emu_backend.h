// The CUDA backend itself on the CPU, for tests/test_cuda_emulated_backend.py: ops_cuda.cu's op
// entries (argument checks, rows and lengths, path choice, launchers, the GEMMs around the
// recurrence) bound as they are, called with CPU tensors, on the pretend device of
// emu_runtime.h; the knobs are the backend's own (launch.h). Included by emu.cpp after
// ops_cuda.cu.
#pragma once

#include <cstdint>
#include <map>
#include <string>

namespace emu_backend {

// VARLEN_RNN_CUDA_PATH, VARLEN_RNN_PERSISTENT_MAX_KC, the oversubscribing test launch,
// VARLEN_RNN_TENSOR_CORES (0, 1, 2 = auto) and VARLEN_RNN_PERSISTENT_PAD, as the backend's
// testing hooks set them on a GPU.
// Set here, in this module's own knobs (emulation.py builds it with hidden symbols, so neither
// these nor the testing hooks' names reach the real extension's).
inline void set_knobs(const std::string& path, int64_t max_kc, bool oversubscribe,
                      int64_t tensor_cores, bool pad_smem) {
  TORCH_CHECK(varlen_rnn::cuda::set_knobs_for_testing(path.c_str(), max_kc, oversubscribe),
              "path must be auto, persistent or fallback, got ", path);
  varlen_rnn::cuda::Knobs& k = varlen_rnn::cuda::knobs();
  k.tensor_cores = static_cast<int>(tensor_cores);
  k.pad_smem = pad_smem;
}

// What the last calls ran: the exchange of the last forward and backward pass (launch.h's
// Exchange: 0 fallback, 1 exact, 2 TF32, 3 16-bit), the last cooperative grid and its shared
// memory.
inline std::map<std::string, int64_t> last_launch() {
  const varlen_rnn::cuda::Knobs& k = varlen_rnn::cuda::knobs();
  return {{"forward_exchange", k.last_exchange[0].load()},
          {"backward_exchange", k.last_exchange[1].load()},
          {"blocks", emu_device().last_blocks},
          {"smem", emu_device().last_smem}};
}

// Calls f() as the node an eager call records calls a backward op where autograd frees the
// workspace after it (csrc/recording.cpp): with layer.h's ConsumableWorkspace set to ws, which
// the backward may then write over. This module's ConsumableWorkspace is its own (hidden
// symbols), so the real extension's setting does not reach it; emulation.py's
// cuda_backend_on_cpu passes it on through this.
inline pybind11::object consuming(const at::Tensor& ws, const pybind11::function& f) {
  const varlen_rnn::ConsumableWorkspace consume(ws.const_data_ptr());
  return f();
}

}  // namespace emu_backend

inline void bind_backend(pybind11::module_& m) {
  namespace vc = varlen_rnn::cuda;
  pybind11::module_ b = m.def_submodule("backend", "ops_cuda.cu's entries on the CPU");
  b.def("set_device", &emu_set_device);
  b.def("set_knobs", &emu_backend::set_knobs);
  b.def("last_launch", &emu_backend::last_launch);
  b.def("consuming", &emu_backend::consuming);
  b.def("gru_layer_forward", &vc::gru_layer_forward_cuda);
  b.def("gru_layer_backward", &vc::gru_layer_backward_cuda);
  b.def("gru_layer_ragged_forward", &vc::gru_layer_ragged_forward_cuda);
  b.def("gru_layer_ragged_backward", &vc::gru_layer_ragged_backward_cuda);
  b.def("lstm_layer_forward", &vc::lstm_layer_forward_cuda);
  b.def("lstm_layer_backward", &vc::lstm_layer_backward_cuda);
  b.def("lstm_layer_ragged_forward", &vc::lstm_layer_ragged_forward_cuda);
  b.def("lstm_layer_ragged_backward", &vc::lstm_layer_ragged_backward_cuda);
  b.def("rnn_layer_forward", &vc::rnn_layer_forward_cuda);
  b.def("rnn_layer_backward", &vc::rnn_layer_backward_cuda);
  b.def("rnn_layer_ragged_forward", &vc::rnn_layer_ragged_forward_cuda);
  b.def("rnn_layer_ragged_backward", &vc::rnn_layer_ragged_backward_cuda);
}
