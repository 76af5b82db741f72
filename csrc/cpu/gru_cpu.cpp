// The CPU recurrence: one GRU layer (both directions) over a padded batch
// driven by lengths, or over ragged rows (offsets or packed), forward and
// backward, + TORCH_LIBRARY_IMPL(CPU). One recurrence serves every layout: it
// finds its rows through two layout.h RowMaps (ForwardArgs).
//
// Each step is one GEMM over the running rows (W_hh h, or dh W_hh in the
// backward) and one parallel gate pass over them (cpu/rows.h). Rows run in the
// schedule's longest-first order (cpu/schedule.h). Each direction's input
// projection is one GEMM over the N valid positions (no work on padding), and
// the workspace ([D, N, 4H]: nothing for padding) stores direction d's step s
// at rows offset[s] + i, so the backward's weight GEMMs cover exactly N rows.
// Ragged input needs no gather: its own N rows are the projection's rows.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <optional>
#include <tuple>

#include "cpu/rows.h"
#include "cpu/schedule.h"
#include "gate_math.h"
#include "gru.h"
#include "layout.h"

namespace varlen_rnn {
namespace {

// What the forward reads and writes; the backward reads the same and adds
// its gradients (BackwardArgs). Tensors are contiguous, in the op-math dtype.
struct ForwardArgs {
  LayerDims dims;  // ragged: T = max_len, batch_first false
  Schedule sched;
  // (t, sorted row i) -> row. gx_rows: of xp (projection_input) and of the
  // buffers over positions (gx, dgx, hprev, dghn); out_rows: of output's
  // [rows, D*H] view. They point into sched (ForwardArgs is never copied).
  RowMap gx_rows, out_rows;
  at::Tensor gather;                     // padded: [N] input2d row of each position; ragged: none
  at::Tensor input2d;                    // [T*B, I] (or [B*T, I] if batch_first); ragged [N, I]
  at::Tensor hx;                         // [D, B, H]
  at::Tensor w_ih;                       // [D, 3H, I]
  at::Tensor w_hh;                       // [D, 3H, H]
  std::optional<at::Tensor> b_ih, b_hh;  // [D, 3H]; the backward needs neither
  at::Tensor output;                     // [T, B, D*H] (or [B, T, D*H]); ragged [N, D*H]
  at::Tensor h_n;                        // [D, B, H]; the backward needs none
  at::Tensor workspace;                  // [D, N, 4H] saved gates; [0] in inference
};

struct BackwardArgs : ForwardArgs {
  at::Tensor grad_output;   // like output
  at::Tensor grad_h_n;      // [D, B, H]
  at::Tensor grad_input2d;  // like input2d
  at::Tensor grad_hx;       // [D, B, H]
  at::Tensor grad_w_ih;     // [D, 3H, I]
  at::Tensor grad_w_hh;     // [D, 3H, H]
  at::Tensor grad_b_ih;     // [D, 3H]
  at::Tensor grad_b_hh;     // [D, 3H]
};

// Half types run in float (gru.h's opmath_dtype) and round at the end.
at::Tensor opmath_contiguous(const at::Tensor& t) {
  return t.to(opmath_dtype(t.scalar_type())).contiguous();
}

// The op-math, contiguous hx and weights.
void set_weight_args(ForwardArgs& args, const at::Tensor& hx, const at::Tensor& w_ih,
                     const at::Tensor& w_hh, const std::optional<at::Tensor>& b_ih,
                     const std::optional<at::Tensor>& b_hh) {
  args.hx = opmath_contiguous(hx);
  args.w_ih = opmath_contiguous(w_ih);
  args.w_hh = opmath_contiguous(w_hh);
  if (b_ih) args.b_ih = opmath_contiguous(*b_ih);
  if (b_hh) args.b_hh = opmath_contiguous(*b_hh);
}

// Checks the layer's arguments (shapes as in ops.cpp's schema) and fills the
// fields both passes read.
void set_layer_args(ForwardArgs& args, const at::Tensor& input, const at::Tensor& lengths,
                    const at::Tensor& hx, const at::Tensor& w_ih, const at::Tensor& w_hh,
                    const std::optional<at::Tensor>& b_ih, const std::optional<at::Tensor>& b_hh,
                    bool batch_first) {
  args.dims = check_layer_args(input, lengths, hx, w_ih, w_hh, b_ih, b_hh, batch_first);
  args.sched = make_schedule(lengths, args.dims.T);
  const LayerDims& dims = args.dims;
  // The projection runs on the N valid positions, gathered in packed order.
  args.gx_rows = packed_map(args.sched.offset.data(), nullptr);
  args.out_rows = padded_map(batch_first, dims.T, dims.B, args.sched.perm.data());
  args.gather = packed_rows(args.sched, args.out_rows);
  args.input2d = opmath_contiguous(input).view({-1, dims.I});
  set_weight_args(args, hx, w_ih, w_hh, b_ih, b_hh);
}

// The ragged ops' version; returns the dims with N and the layout.
RaggedDims set_ragged_args(ForwardArgs& args, const at::Tensor& input,
                           const at::Tensor& seq_index,
                           const std::optional<at::Tensor>& sorted_indices, int64_t layout,
                           int64_t max_len, const at::Tensor& hx, const at::Tensor& w_ih,
                           const at::Tensor& w_hh, const std::optional<at::Tensor>& b_ih,
                           const std::optional<at::Tensor>& b_hh) {
  const RaggedDims dims = check_ragged_args(input, seq_index, sorted_indices, layout, max_len,
                                            hx, w_ih, w_hh, b_ih, b_hh);
  args.dims = dims;
  args.sched = make_ragged_schedule(dims, seq_index, sorted_indices);
  // Packed input is in the schedule's own order: its rows are the positions.
  args.gx_rows = dims.layout == kOffsets
                     ? offsets_map(args.sched.seq_offsets.data(), args.sched.perm.data())
                     : packed_map(args.sched.offset.data(), nullptr);
  args.out_rows = args.gx_rows;
  args.input2d = opmath_contiguous(input);
  set_weight_args(args, hx, w_ih, w_hh, b_ih, b_hh);
  return dims;
}

// [N, I]: the input rows the projection GEMMs run on, in gx_rows' order.
at::Tensor projection_input(const ForwardArgs& args) {
  return args.gather.defined() ? args.input2d.index_select(0, args.gather) : args.input2d;
}

// Rows per parallel task: ~4K elements, about ten microseconds of gate math
// (memory-bound on gx). Between two GEMMs the BLAS threads are still awake, so
// handing them rows costs less than that; measured 3-7% faster forward than
// 8K-element tasks at B=16..128, H=128..512 on 2 threads.
int64_t row_grain(int64_t H) { return std::max<int64_t>(1, 4096 / H); }

// Offset of direction d's [H] part at (t, sorted row i) in an output-shaped
// tensor.
int64_t output_offset(const ForwardArgs& args, int64_t t, int64_t i, int64_t d) {
  return args.out_rows.row(t, i) * args.dims.D * args.dims.H + d * args.dims.H;
}

template <typename scalar_t>
void forward_impl(ForwardArgs& args) {
  const LayerDims& dims = args.dims;
  const Schedule& sched = args.sched;
  const int64_t H = dims.H, G = 3 * H, N = sched.N();
  const auto opts = args.input2d.options();
  at::Tensor xp = projection_input(args);  // [N, I]
  const at::Tensor perm = perm_tensor(sched);
  at::Tensor gh = at::empty({dims.B, G}, opts);  // [B, 3H] one step's W_hh h
  const at::Tensor b_hh = args.b_hh ? *args.b_hh : at::zeros({dims.D, G}, opts);  // [D, 3H]
  const scalar_t* gh_p = gh.const_data_ptr<scalar_t>();
  scalar_t* out_p = args.output.data_ptr<scalar_t>();
  const bool save = args.workspace.numel() > 0;

  for (int64_t d = 0; d < dims.D; ++d) {
    // [N, 3H]: this direction's input projection, one GEMM over the valid
    // positions (one direction at a time: half the memory of both at once).
    // Weights are transposed once per call: BLAS runs ~1.1-1.5x faster on a
    // contiguous [K, N] right operand than on a transposed view (measured, MKL).
    const at::Tensor w_ih_t = args.w_ih[d].t().contiguous();  // [I, 3H]
    const at::Tensor gx = args.b_ih ? at::addmm((*args.b_ih)[d], xp, w_ih_t) : at::mm(xp, w_ih_t);
    if (d == dims.D - 1) xp.reset();
    const at::Tensor w_hh_t = args.w_hh[d].t().contiguous();  // [H, 3H]
    at::Tensor h = args.hx[d].index_select(0, perm);           // [B, H] sorted order
    const scalar_t* gx_p = gx.const_data_ptr<scalar_t>();
    const scalar_t* bh_p = b_hh.const_data_ptr<scalar_t>() + d * G;
    scalar_t* h_p = h.data_ptr<scalar_t>();
    scalar_t* ws_p = save ? args.workspace.data_ptr<scalar_t>() + d * N * 4 * H : nullptr;
    for (int64_t s = 0; s < sched.max_len; ++s) {
      const int64_t n = sched.active[s];
      at::Tensor gh_s = gh.narrow(0, 0, n);
      at::mm_out(gh_s, h.narrow(0, 0, n), w_hh_t);
      at::parallel_for(0, n, row_grain(H), [&](int64_t i0, int64_t i1) {
        for (int64_t i = i0; i < i1; ++i) {
          const int64_t t = step_time(d, sched.len[i], s);
          ForwardRow<scalar_t> row;
          row.gx = gx_p + args.gx_rows.row(t, i) * G;
          row.gh = gh_p + i * G;
          row.bh = bh_p;
          row.h = h_p + i * H;
          row.out = out_p + output_offset(args, t, i, d);
          row.ws = save ? ws_p + (sched.offset[s] + i) * 4 * H : nullptr;
          forward_row(row, H);
        }
      });
    }
    args.h_n[d].index_copy_(0, perm, h);
  }
}

template <typename scalar_t>
void backward_impl(BackwardArgs& args) {
  const LayerDims& dims = args.dims;
  const Schedule& sched = args.sched;
  const int64_t H = dims.H, G = 3 * H, DG = dims.D * G, N = sched.N();
  const auto opts = args.input2d.options();
  const at::Tensor perm = perm_tensor(sched);
  // Buffers over the N valid positions (gx_rows' order), so the weight
  // gradients are GEMMs over exactly the valid positions. Only the
  // per-step GEMM's operand dgh is step-sized: peak memory stays near the
  // forward's.
  at::Tensor dgx = at::empty({N, DG}, opts);      // [N, D*3H]
  at::Tensor dghn = at::empty({N, H}, opts);      // [N, H] one direction
  at::Tensor hprev = at::empty({N, H}, opts);     // [N, H] one direction
  at::Tensor dgh = at::empty({dims.B, G}, opts);  // [B, 3H] one step
  const scalar_t* go_p = args.grad_output.const_data_ptr<scalar_t>();
  const scalar_t* out_p = args.output.const_data_ptr<scalar_t>();
  const scalar_t* hx_p = args.hx.const_data_ptr<scalar_t>();
  scalar_t* dgx_p = dgx.data_ptr<scalar_t>();
  scalar_t* dghn_p = dghn.data_ptr<scalar_t>();
  scalar_t* dgh_p = dgh.data_ptr<scalar_t>();
  scalar_t* hp_p = hprev.data_ptr<scalar_t>();

  for (int64_t d = 0; d < dims.D; ++d) {
    at::Tensor dh = args.grad_h_n[d].index_select(0, perm);  // [B, H] sorted order
    scalar_t* dh_p = dh.data_ptr<scalar_t>();
    const scalar_t* ws_p = args.workspace.const_data_ptr<scalar_t>() + d * N * 4 * H;
    const at::Tensor w_hh_d = args.w_hh[d];  // [3H, H]
    for (int64_t s = sched.max_len - 1; s >= 0; --s) {
      const int64_t n = sched.active[s];
      at::parallel_for(0, n, row_grain(H), [&](int64_t i0, int64_t i1) {
        for (int64_t i = i0; i < i1; ++i) {
          const int64_t t = step_time(d, sched.len[i], s);
          const int64_t pos = args.gx_rows.row(t, i);
          BackwardRow<scalar_t> row;
          row.dh = dh_p + i * H;
          row.go = go_p + output_offset(args, t, i, d);
          row.prev = s == 0 ? hx_p + (d * dims.B + sched.perm[i]) * H
                            : out_p + output_offset(args, prev_time(d, t), i, d);
          row.ws = ws_p + (sched.offset[s] + i) * 4 * H;
          row.dgx = dgx_p + pos * DG + d * G;
          row.dgh = dgh_p + i * G;
          row.dghn = dghn_p + pos * H;
          row.hp = hp_p + pos * H;
          backward_row(row, H);
        }
      });
      dh.narrow(0, 0, n).addmm_(dgh.narrow(0, 0, n), w_hh_d);
    }
    args.grad_hx[d].index_copy_(0, perm, dh);
    // dW_hh = dgh^T hprev over all positions: the r|z rows from dgx's columns.
    const at::Tensor dgx_rz = dgx.narrow(1, d * G, 2 * H);  // [N, 2H]
    at::Tensor gw_rz = args.grad_w_hh[d].narrow(0, 0, 2 * H);
    at::Tensor gw_n = args.grad_w_hh[d].narrow(0, 2 * H, H);
    at::Tensor gb_rz = args.grad_b_hh[d].narrow(0, 0, 2 * H);
    at::Tensor gb_n = args.grad_b_hh[d].narrow(0, 2 * H, H);
    at::mm_out(gw_rz, dgx_rz.t(), hprev);
    at::mm_out(gw_n, dghn.t(), hprev);
    at::sum_out(gb_rz, dgx_rz, {0});
    at::sum_out(gb_n, dghn, {0});
  }
  dghn.reset();
  hprev.reset();
  at::Tensor xp = projection_input(args);  // [N, I]
  at::Tensor gw = args.grad_w_ih.view({DG, dims.I}), gb = args.grad_b_ih.view({DG});
  at::mm_out(gw, dgx.t(), xp);
  xp.reset();
  at::sum_out(gb, dgx, {0});
  at::Tensor dxp = at::mm(dgx, args.w_ih.reshape({DG, dims.I}));  // [N, I]
  dgx.reset();
  if (!args.gather.defined()) {  // ragged: the positions are grad_input's rows
    args.grad_input2d = std::move(dxp);
    return;
  }
  // grad_input is allocated last, when the step buffers are gone: peak memory.
  args.grad_input2d = at::empty({args.input2d.size(0), dims.I}, opts);
  args.grad_input2d.index_fill_(0, padding_rows(sched, args.out_rows, dims.T), 0);
  args.grad_input2d.index_copy_(0, args.gather, dxp);
}

using Forward = std::tuple<at::Tensor, at::Tensor, at::Tensor>;
using Backward =
    std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

// The part of each forward op after its arguments are set and its output is
// allocated: the results in the input's dtype.
Forward run_forward(ForwardArgs& args, at::ScalarType dtype, bool need_workspace) {
  const LayerDims& dims = args.dims;
  const auto opts = args.input2d.options();
  args.h_n = at::empty({dims.D, dims.B, dims.H}, opts);
  args.workspace = need_workspace ? at::empty({dims.D, args.sched.N(), 4 * dims.H}, opts)
                                  : at::empty({0}, opts);
  AT_DISPATCH_FLOATING_TYPES(args.input2d.scalar_type(), "gru_layer_forward_cpu",
                             [&] { forward_impl<scalar_t>(args); });
  return {args.output.to(dtype), args.h_n.to(dtype), args.workspace};
}

// The same for each backward op, after its arguments are set and checked.
Backward run_backward(BackwardArgs& args, const at::Tensor& input, const at::Tensor& grad_output,
                      const at::Tensor& grad_h_n, const at::Tensor& output,
                      const at::Tensor& workspace) {
  const LayerDims& dims = args.dims;
  args.grad_output = opmath_contiguous(grad_output);
  args.grad_h_n = opmath_contiguous(grad_h_n);
  args.output = opmath_contiguous(output);
  args.workspace = workspace.contiguous();
  const auto opts = args.input2d.options();
  args.grad_hx = at::empty({dims.D, dims.B, dims.H}, opts);
  args.grad_w_ih = at::empty({dims.D, 3 * dims.H, dims.I}, opts);
  args.grad_w_hh = at::empty({dims.D, 3 * dims.H, dims.H}, opts);
  args.grad_b_ih = at::empty({dims.D, 3 * dims.H}, opts);
  args.grad_b_hh = at::empty({dims.D, 3 * dims.H}, opts);
  AT_DISPATCH_FLOATING_TYPES(args.input2d.scalar_type(), "gru_layer_backward_cpu",
                             [&] { backward_impl<scalar_t>(args); });
  const auto dtype = input.scalar_type();
  return {args.grad_input2d.view(input.sizes()).to(dtype),
          args.grad_hx.to(dtype),
          args.grad_w_ih.to(dtype),
          args.grad_w_hh.to(dtype),
          args.grad_b_ih.to(dtype),
          args.grad_b_hh.to(dtype)};
}

// The ops' arguments and results, with their shapes, are documented once in
// ops.cpp's schemas; the structs above repeat the shapes.
Forward gru_layer_forward_cpu(const at::Tensor& input, const at::Tensor& lengths,
                              const at::Tensor& hx, const at::Tensor& w_ih,
                              const at::Tensor& w_hh, const std::optional<at::Tensor>& b_ih,
                              const std::optional<at::Tensor>& b_hh, bool batch_first,
                              bool need_workspace) {
  const NoAutocastGuard no_autocast;
  ForwardArgs args;
  set_layer_args(args, input, lengths, hx, w_ih, w_hh, b_ih, b_hh, batch_first);
  const LayerDims& dims = args.dims;
  args.output = at::empty(dims.output_sizes(), args.input2d.options());
  args.output.view({-1, dims.D * dims.H})
      .index_fill_(0, padding_rows(args.sched, args.out_rows, dims.T), 0);
  return run_forward(args, input.scalar_type(), need_workspace);
}

Backward gru_layer_backward_cpu(const at::Tensor& grad_output, const at::Tensor& grad_h_n,
                                const at::Tensor& input, const at::Tensor& lengths,
                                const at::Tensor& hx, const at::Tensor& w_ih,
                                const at::Tensor& w_hh, const at::Tensor& output,
                                const at::Tensor& workspace, bool batch_first) {
  const NoAutocastGuard no_autocast;
  BackwardArgs args;
  set_layer_args(args, input, lengths, hx, w_ih, w_hh, std::nullopt, std::nullopt, batch_first);
  check_backward_args(args.dims, input, grad_output, grad_h_n, output, workspace,
                      args.sched.N());
  return run_backward(args, input, grad_output, grad_h_n, output, workspace);
}

// Every output row is a valid position: nothing to zero.
Forward gru_layer_ragged_forward_cpu(const at::Tensor& input, const at::Tensor& seq_index,
                                     const std::optional<at::Tensor>& sorted_indices,
                                     int64_t layout, int64_t max_len, const at::Tensor& hx,
                                     const at::Tensor& w_ih, const at::Tensor& w_hh,
                                     const std::optional<at::Tensor>& b_ih,
                                     const std::optional<at::Tensor>& b_hh,
                                     bool need_workspace) {
  const NoAutocastGuard no_autocast;
  ForwardArgs args;
  const RaggedDims dims = set_ragged_args(args, input, seq_index, sorted_indices, layout,
                                          max_len, hx, w_ih, w_hh, b_ih, b_hh);
  args.output = at::empty(dims.output_sizes(), args.input2d.options());
  return run_forward(args, input.scalar_type(), need_workspace);
}

Backward gru_layer_ragged_backward_cpu(const at::Tensor& grad_output, const at::Tensor& grad_h_n,
                                       const at::Tensor& input, const at::Tensor& seq_index,
                                       const std::optional<at::Tensor>& sorted_indices,
                                       int64_t layout, int64_t max_len, const at::Tensor& hx,
                                       const at::Tensor& w_ih, const at::Tensor& w_hh,
                                       const at::Tensor& output, const at::Tensor& workspace) {
  const NoAutocastGuard no_autocast;
  BackwardArgs args;
  const RaggedDims dims = set_ragged_args(args, input, seq_index, sorted_indices, layout,
                                          max_len, hx, w_ih, w_hh, std::nullopt, std::nullopt);
  check_backward_args(dims, input, grad_output, grad_h_n, output, workspace, dims.N);
  return run_backward(args, input, grad_output, grad_h_n, output, workspace);
}

}  // namespace

TORCH_LIBRARY_IMPL(varlen_rnn, CPU, m) {
  m.impl("gru_layer_forward", &gru_layer_forward_cpu);
  m.impl("gru_layer_backward", &gru_layer_backward_cpu);
  m.impl("gru_layer_ragged_forward", &gru_layer_ragged_forward_cpu);
  m.impl("gru_layer_ragged_backward", &gru_layer_ragged_backward_cpu);
}

}  // namespace varlen_rnn
