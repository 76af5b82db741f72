// What the CPU recurrence (cpu/recurrence.h) reads and writes, and how an op's
// arguments become it: checked, in the op-math dtype, contiguous, with the
// schedule and the two RowMaps through which one recurrence serves every
// layout (padded time-/batch-major, ragged offsets and packed).
#pragma once

#include <ATen/ATen.h>

#include <algorithm>
#include <array>
#include <cstdint>
#include <optional>
#include <type_traits>
#include <utility>
#include <vector>

#include "cpu/bf16_gemm.h"
#include "cpu/large_tensors.h"
#include "cpu/rows.h"
#include "cpu/schedule.h"
#include "layer.h"
#include "layout.h"

namespace varlen_rnn {
namespace cpu {

// What the forward reads and writes; the backward reads the same and adds
// its gradients (BackwardArgs). Tensors are contiguous, in the op-math dtype
// (but a bfloat16 layer's input, W_ih and W_hh: see bf16).
// G = gates, S = saved values, P = state width (layer.h's legend).
struct ForwardArgs {
  LayerDims dims;  // ragged: T = max_len, batch_first false
  Schedule sched;
  // (t, sorted row i) -> row. gx_rows: of xp (projection_input) and of the
  // buffers over positions (gx, dgx, hprev, ...); out_rows: of output's
  // [rows, D*P] view. They point into sched (ForwardArgs is never copied).
  RowMap gx_rows, out_rows;
  // padded: [N] input2d row of each position, or none where that row is the
  // position itself (packed_rows); ragged: none
  at::Tensor gather;
  // [T*B, I] (or [B*T, I] if batch_first); ragged [N, I]. In the op-math
  // dtype, but bfloat16 as given where bf16 is set.
  at::Tensor input2d;
  // The products take bfloat16 operands (cpu/bf16_gemm.h; bf16_gemm_for says
  // where): the forward's input projection and per-step W_hh product, the
  // backward's per-step dG W_hh and its weight and input gradients. Then
  // w_ih and w_hh are the layer's bfloat16 weights as given: every product
  // packs or reads them as they are, and no float32 copy is made.
  bool bf16 = false;
  at::Tensor hx;                         // [D, B, P]
  at::Tensor cx;                         // [D, B, H] for a cell with c (LSTM), else undefined
  at::Tensor w_ih;                       // [D, G*H, I] (bfloat16 where bf16)
  at::Tensor w_hh;                       // [D, G*H, P] (bfloat16 where bf16)
  at::Tensor w_hr;                       // [D, P, H] the LSTM's projection, or undefined
  std::optional<at::Tensor> b_ih, b_hh;  // [D, G*H]; the backward needs neither
  at::Tensor output;                     // [T, B, D*P] (or [B, T, D*P]); ragged [N, D*P]
                                         // (forward: output_opts())
  at::Tensor h_n;                        // [D, B, P]; the backward needs none
  at::Tensor c_n;                        // [D, B, H] (LSTM); the backward needs none
  at::Tensor workspace;                  // [D, N, S*H] saved values; [0] in inference
                                         // (bfloat16 for a bfloat16 input: workspace_of)

  // The op-math tensors' options (hx's: input2d may be bfloat16).
  at::TensorOptions opts() const { return hx.options(); }
  // The forward's output: bfloat16 where bf16, written from the rounded copy
  // of h that the next step's product reads (the op returns bfloat16 anyway;
  // a float32 output converted at the end cost ~8% of a bfloat16 LSTM's
  // inference, B=64 T=100 H=256, 1 thread), else op-math.
  at::TensorOptions output_opts() const { return bf16 ? opts().dtype(at::kBFloat16) : opts(); }
};

struct BackwardArgs : ForwardArgs {
  at::Tensor grad_output;   // like output; undefined: zero (the op's None)
  at::Tensor grad_h_n;      // [D, B, P]
  at::Tensor grad_c_n;      // [D, B, H] (LSTM)
  at::Tensor grad_input2d;  // like input2d
  at::Tensor grad_hx;       // [D, B, P]
  at::Tensor grad_cx;       // [D, B, H] (LSTM)
  at::Tensor grad_w_ih;     // [D, G*H, I] (bfloat16 where bf16)
  at::Tensor grad_w_hh;     // [D, G*H, P] (bfloat16 where bf16)
  at::Tensor grad_b_ih;     // [D, G*H]
  at::Tensor grad_b_hh;     // [D, G*H]
  at::Tensor grad_w_hr;     // [D, P, H] with a projection
  // The op's output_mask (ops.cpp): grad_input, and the weight and bias
  // gradients, are computed only where wanted (else their tensors stay
  // undefined). The recurrence runs alike either way.
  bool want_input = true, want_weights = true;
  // The workspace is this call's to write over (layer.h ConsumableWorkspace).
  bool consume_workspace = false;
  void set_output_mask(std::array<bool, 2> mask) {
    want_input = mask[0];
    want_weights = mask[1];
  }
};

// Direction d's rows of args.workspace (dims.S * H values each), bfloat16 or
// op-math as the forward allocated it (cpu/layer_ops.h); none in inference.
template <typename scalar_t>
Workspace<scalar_t> workspace_of(const ForwardArgs& args, int64_t d) {
  Workspace<scalar_t> w;
  w.S = args.dims.S * args.dims.H;
  if (args.workspace.numel() == 0) return w;
  const int64_t first = d * args.sched.N() * w.S;
  if (args.workspace.scalar_type() == at::kBFloat16) {
    w.ws16 = args.workspace.data_ptr<at::BFloat16>() + first;
  } else {
    w.ws = args.workspace.data_ptr<scalar_t>() + first;
  }
  return w;
}

// Half types run in float (layer.h's opmath_dtype) and round at the end.
// The common case, already so, returns t without a dispatcher call: a
// one-step call reads a dozen tensors through here.
inline at::Tensor opmath_contiguous(const at::Tensor& t) {
  return contiguous_large(t, opmath_dtype(t.scalar_type()));
}

// The backward's output and grad_output as OutputRows reads them: a bfloat16
// layer's as given (contiguous), else op-math.
inline at::Tensor backward_operand(const at::Tensor& t, bool bf16) {
  return bf16 && t.scalar_type() == at::kBFloat16 ? t.contiguous() : opmath_contiguous(t);
}

// A None for the optional tensors an op does not take.
inline const std::optional<at::Tensor> kNone;

// The size of a layer's product operands (the split loops' weight panels):
// 2 with bfloat16 products, else the op-math type's.
template <typename scalar_t>
size_t product_bytes(const ForwardArgs& args) {
  return args.bf16 ? 2 : sizeof(scalar_t);
}

// The state and weights every layer op takes; cx and w_hr are the LSTM's
// (null / None for the other cells).
struct WeightInputs {
  const at::Tensor* hx;                   // [D, B, P]
  const at::Tensor* cx;                   // [D, B, H] or null
  const at::Tensor* w_ih;                 // [D, G*H, I]
  const at::Tensor* w_hh;                 // [D, G*H, P]
  const std::optional<at::Tensor>* b_ih;  // [D, G*H] or None
  const std::optional<at::Tensor>* b_hh;  // [D, G*H] or None
  const std::optional<at::Tensor>* w_hr;  // [D, P, H] or None
};

// The op-math, contiguous states and weights; a bfloat16 layer's W_ih and
// W_hh contiguous as given (the checks made them the input's dtype).
inline void set_weight_args(ForwardArgs& args, const WeightInputs& w) {
  args.hx = opmath_contiguous(*w.hx);
  if (w.cx != nullptr) args.cx = opmath_contiguous(*w.cx);
  if (args.bf16) {
    TORCH_INTERNAL_ASSERT(w.w_ih->scalar_type() == at::kBFloat16 &&
                          w.w_hh->scalar_type() == at::kBFloat16);
    args.w_ih = w.w_ih->contiguous();
    args.w_hh = w.w_hh->contiguous();
  } else {
    args.w_ih = opmath_contiguous(*w.w_ih);
    args.w_hh = opmath_contiguous(*w.w_hh);
  }
  if (w.w_hr->has_value()) args.w_hr = opmath_contiguous(**w.w_hr);
  if (w.b_ih->has_value()) args.b_ih = opmath_contiguous(**w.b_ih);
  if (w.b_hh->has_value()) args.b_hh = opmath_contiguous(**w.b_hh);
}

// The input as the layer reads it: bfloat16 as given for the bfloat16
// products (both passes decide alike: bf16_gemm_for). Before
// set_weight_args, which reads args.bf16.
inline void set_input(ForwardArgs& args, const at::Tensor& input) {
  args.bf16 = bf16_gemm_for(input.scalar_type(), args.dims.I, args.dims.P);
  args.input2d = args.bf16 ? input.contiguous() : opmath_contiguous(input);
}

// Checks the padded layer's arguments (shapes as in ops.cpp's schemas) and
// fills the fields both passes read.
inline void set_layer_args(ForwardArgs& args, const CellArgs& cell, const at::Tensor& input,
                           const at::Tensor& lengths, const WeightInputs& w, bool batch_first) {
  args.dims = check_layer_args(input, lengths, *w.hx, *w.w_ih, *w.w_hh, *w.b_ih, *w.b_hh,
                               batch_first, cell);
  args.sched = make_schedule(lengths, args.dims.T);
  const LayerDims& dims = args.dims;
  // The projection runs on the N valid positions, gathered in packed order.
  args.gx_rows = packed_map(args.sched.offset.data(), nullptr);
  args.out_rows = padded_map(batch_first, dims.T, dims.B, args.sched.perm.data());
  args.gather = packed_rows(args.sched, args.out_rows, dims.T);
  set_input(args, input);
  set_weight_args(args, w);
  args.input2d = args.input2d.view({-1, dims.I});
}

// The ragged ops' version; returns the dims with N and the layout.
inline RaggedDims set_ragged_args(ForwardArgs& args, const CellArgs& cell, const at::Tensor& input,
                                  const at::Tensor& seq_index,
                                  const std::optional<at::Tensor>& sorted_indices, int64_t layout,
                                  int64_t max_len, const WeightInputs& w) {
  const RaggedDims dims = check_ragged_args(input, seq_index, sorted_indices, layout, max_len,
                                            *w.hx, *w.w_ih, *w.w_hh, *w.b_ih, *w.b_hh, cell);
  args.dims = dims;
  args.sched = make_ragged_schedule(dims, seq_index, sorted_indices);
  // Packed input is in the schedule's own order: its rows are the positions.
  args.gx_rows = dims.layout == kOffsets
                     ? offsets_map(args.sched.seq_offsets.data(), args.sched.perm.data())
                     : packed_map(args.sched.offset.data(), nullptr);
  args.out_rows = args.gx_rows;
  set_input(args, input);
  set_weight_args(args, w);
  return dims;
}

// [N, I]: the input rows the projection GEMMs run on, in gx_rows' order.
inline at::Tensor projection_input(const ForwardArgs& args) {
  if (!args.gather.defined()) return args.input2d;
  at::Tensor xp = empty_large({args.gather.size(0), args.input2d.size(1)}, args.input2d.options());
  return at::index_select_out(xp, args.input2d, 0, args.gather);
}

// grad_input from dxp [N, I], the gradient of projection_input's rows:
// ragged input's rows are the positions; a padded input's are scattered
// back, zero at padding. The caller frees its step buffers first: grad_input
// is allocated last (peak memory).
inline void set_grad_input(BackwardArgs& args, at::Tensor dxp) {
  if (!args.gather.defined()) {
    args.grad_input2d = std::move(dxp);
    return;
  }
  args.grad_input2d = empty_large({args.input2d.size(0), args.dims.I}, dxp.options());
  if (args.sched.N() < args.input2d.size(0)) {  // zeros at the padding
    args.grad_input2d.index_fill_(0, padding_rows(args.sched, args.out_rows, args.dims.T), 0);
  }
  args.grad_input2d.index_copy_(0, args.gather, dxp);
}

// Whether step s's positions are the consecutive rows offset[s] + i of the
// buffers over positions (the packed order; not with the offsets layout).
inline bool steps_are_contiguous(const ForwardArgs& args) {
  return args.gx_rows.kind == kPacked && args.gx_rows.order == nullptr;
}

// Rows per parallel task: ~4K elements, about ten microseconds of gate math
// (memory-bound on gx). Between two GEMMs the BLAS threads are still awake, so
// handing them rows costs less than that; measured 3-7% faster forward than
// 8K-element tasks at B=16..128, H=128..512 on 2 threads (GRU).
inline int64_t row_grain(int64_t H) { return std::max<int64_t>(1, 4096 / H); }

// Offset of direction d's [P] part at (t, sorted row i) in an output-shaped
// tensor.
inline int64_t output_offset(const ForwardArgs& args, int64_t t, int64_t i, int64_t d) {
  return args.out_rows.row(t, i) * args.dims.D * args.dims.P + d * args.dims.P;
}

// The forward's output as the step loops write it: op-math, or bfloat16
// (ForwardArgs::output_opts), then copied from hb, the rounded copy of h that
// the next step's product reads.
template <typename scalar_t>
struct OutputWriter {
  explicit OutputWriter(const at::Tensor& output) {
    if (output.scalar_type() == at::kBFloat16) {
      out16 = output.data_ptr<at::BFloat16>();
    } else {
      out = output.data_ptr<scalar_t>();
    }
  }
  bool bf16() const { return out16 != nullptr; }
  // n values at element offset `at` (output_offset): h's, or hb's where bf16.
  void write(int64_t at, const scalar_t* h, const at::BFloat16* hb, int64_t n) const {
    if (out16 != nullptr) {
      std::copy_n(hb, n, out16 + at);
    } else {
      std::copy_n(h, n, out + at);
    }
  }
  scalar_t* out = nullptr;        // op-math output, or null
  at::BFloat16* out16 = nullptr;  // bfloat16 output, or null
};

// The backward's reads of a layer's output and grad_output (output-shaped,
// at output_offset), OutputWriter's twin. In op-math they are read in place;
// in a bfloat16 layer (scalar_t float) straight from the bfloat16 tensors,
// each piece a step reads converted into the reader's buffer, so the backward
// holds no float32 copy of either (2 * [T, B, D*P] floats). A float16 layer,
// float32 throughout, reads op-math copies (backward_operand). An undefined
// tensor (grad_output None) reads as zeros: up to zeros_width values a read,
// from one row of them held here.
template <typename scalar_t>
class OutputRows {
 public:
  explicit OutputRows(const at::Tensor& t, int64_t zeros_width = 0) {
    if (!t.defined()) {
      zeros_.assign(zeros_width, scalar_t(0));
    } else if (t.scalar_type() == at::kBFloat16 && std::is_same_v<scalar_t, float>) {
      p16_ = t.const_data_ptr<at::BFloat16>();
    } else {
      p_ = t.const_data_ptr<scalar_t>();
    }
  }
  // Whether reads convert (and so need a buffer).
  bool converts() const { return p16_ != nullptr; }
  // Values [off, off + n) as scalar_t: in place, zeros, or converted into
  // buf ([n]).
  const scalar_t* at(int64_t off, int64_t n, scalar_t* buf) const {
    if (p_ != nullptr) return p_ + off;
    if (p16_ == nullptr) {
      TORCH_INTERNAL_ASSERT(n <= static_cast<int64_t>(zeros_.size()));
      return zeros_.data();
    }
    const at::BFloat16* src = p16_ + off;
    for (int64_t k = 0; k < n; ++k) buf[k] = static_cast<scalar_t>(src[k]);
    return buf;
  }
  // The bfloat16 values themselves (converts() only).
  const at::BFloat16* bf16(int64_t off) const { return p16_ + off; }
  // A backward row's saved values at offset off, where they are the output
  // (Cell::kSavedIsOutput): in place, as scalar_t or bfloat16.
  template <typename Row>
  void point(Row& row, int64_t off) const {
    row.ws = p_ != nullptr ? p_ + off : nullptr;
    row.ws16 = p16_ != nullptr ? p16_ + off : nullptr;
  }

 private:
  const scalar_t* p_ = nullptr;
  const at::BFloat16* p16_ = nullptr;
  std::vector<scalar_t> zeros_;  // [zeros_width] where t is undefined
};

}  // namespace cpu
}  // namespace varlen_rnn
