// The state of one layer call on the CUDA backend: what forward and backward
// share (LayerCall: dims, dtypes, TF32 and tensor-core policy, stream, rows),
// what each adds (ForwardCall, BackwardCall), and choose(), the path of one
// pass. Included by ops_cuda.cu only, so the whole backend stays one
// translation unit; the names keep its internal linkage.
#pragma once

#include <ATen/core/Tensor.h>

#include "layer.h"
#include "launch.h"
#include "plan.h"
#include "rows.h"
#include "runtime.h"

namespace varlen_rnn {
namespace cuda {
namespace {

using at::Tensor;

// ---- What forward and backward share -----------------------------------------
struct LayerCall {
  LayerDims dims;
  at::TensorOptions opts;   // the input's
  at::ScalarType acc_type;  // op-math dtype: the state, saved gates, sums
  bool tf32 = false;        // float32 GEMMs may use TF32 (nn.GRU's cuDNN policy)
  bool mma = false;         // the persistent kernels' recurrent products on tensor cores
  cudaStream_t stream;
  DeviceRows rows;  // the rows of every per-position buffer, the lengths (rows.h)
  Tensor hx, w_hh;  // contiguous [D, B, P] (rank order when packed), [D, GH, P]
  // The cell's gate count G, and P, the state's width: H, or an LSTM's proj_size.
  int64_t G = 3, P = 0;
  Tensor cx;    // kHasC: [D, B, H] contiguous, rank order when packed
  Tensor w_hr;  // [D, P, H] contiguous when the LSTM has a projection, else undefined
  bool proj() const { return w_hr.defined(); }
};

// dims.T is the step loop's bound: the padded time dimension, or max_len.
void set_layer_call(LayerCall& c, const LayerDims& dims, const Tensor& input, const Tensor& hx,
                    const Tensor& w_hh) {
  c.dims = dims;
  c.G = w_hh.size(1) / dims.H;
  c.P = hx.size(2);
  c.opts = input.options();
  c.acc_type = opmath_dtype(input.scalar_type());
  c.tf32 = input.scalar_type() == at::kFloat && cudnn_rnn_allows_tf32();
  // Tensor cores (sm_80+) where the fallback's cuBLAS GEMMs would use them too: the half
  // types, and float32 where TF32 is allowed; float64 and exact float32 stay on CUDA cores.
  c.mma = knobs().tensor_cores != 0 && input.scalar_type() != at::kDouble &&
          (input.scalar_type() != at::kFloat || c.tf32) && device_properties().major >= 8;
  c.stream = current_stream();
  c.hx = hx.contiguous();
  c.w_hh = w_hh.contiguous();
}

struct ForwardCall : LayerCall {
  Tensor gx;            // [R, D*GH] input projection incl. b_ih, the input's rows
  Tensor b_hh;          // [D, GH] contiguous, or undefined
  Tensor out, h_n, ws;  // outputs: [R, D*P] rows, [D, B, P], [D, R, SH] or [0]
  Tensor c_n;           // kHasC: [D, B, H]
  bool need_workspace = false;
};

struct BackwardCall : LayerCall {
  Tensor grad_out, out, grad_h_n, ws;  // contiguous, as given (grad_out undefined: None)
  Tensor grad_c_n;                     // kHasC: [D, B, H] contiguous, rank order
  // [D, R, GH (+H)] a view with row stride ldg: the gate gradients dG of each
  // direction's rows (dgx), then a GRU's hidden-side last-gate gradients (dghn,
  // pointwise.cuh). Its own buffer, or the first columns of the forward's
  // workspace where this backward may write over it (set_backward_buffers).
  Tensor dg;
  int64_t ldg = 0;  // dg's row stride: (G + 1) * H for a GRU, G * H otherwise, or the workspace's
  Tensor hprev;     // [D, R, P]
  Tensor grad_hx, grad_cx;  // [D, B, P], kHasC: [D, B, H]
  Tensor dhr, hcell;        // with a projection: [D, R, P] and [D, R, H], dW_hr's operands
  // The op's output_mask (ops.cpp): the GEMMs of grad_input and of the weight
  // gradients run only where wanted; the recurrence runs alike.
  bool want_input = true, want_weights = true;
};

// The path of one pass; errors when persistent is forced but cannot run, so tests
// that compare the paths never compare the fallback with itself. kernel_of(mma) is
// the persistent kernel's instantiation. Where the call may use tensor cores
// (c.mma), the tensor-core and the exact persistent kernel are both priced and
// plan::prefer_tensor_cores picks.
template <typename KernelOf>
plan::Choice choose(const LayerCall& c, KernelOf kernel_of, plan::Pass pass, int64_t storage_bytes,
                    int64_t acc_bytes) {
  const plan::Path requested = requested_path();
  // An LSTM with a projection has no persistent kernel (plan.h): it runs the
  // fallback whatever VARLEN_RNN_CUDA_PATH asks, rather than failing every call.
  if (requested == plan::Path::kFallback || c.proj()) return plan::Choice{};
  auto one = [&](bool mma) {
    const KernelFacts facts = kernel_facts(reinterpret_cast<const void*>(kernel_of(mma)));
    plan::Device dev = facts.dev;
    if (!facts.unavailable.empty()) dev.cooperative = false;
    plan::Problem p{
        c.dims.B, c.dims.H, c.dims.D, pass, storage_bytes, acc_bytes, storage_bytes != 4 || c.tf32,
        mma,      c.G,      c.proj()};
    p.pad_smem = knobs().pad_smem;
    p.max_tile_rows = knobs().max_rows;
    p.row_slices = knobs().row_slices;
    plan::Choice choice = plan::choose_path(p, dev, requested, knobs().max_kc.load());
    if (!facts.unavailable.empty()) choice.why = facts.unavailable;
    choice.mma = mma;
    return choice;
  };
  plan::Choice choice = one(false);
  if (c.mma) choice = plan::prefer_tensor_cores(choice, one(true), knobs().tensor_cores == 1);
  TORCH_CHECK(choice.fits || requested == plan::Path::kAuto,
              "VARLEN_RNN_CUDA_PATH=persistent but the persistent kernel cannot run: ", choice.why);
  return choice;
}

}  // namespace
}  // namespace cuda
}  // namespace varlen_rnn
