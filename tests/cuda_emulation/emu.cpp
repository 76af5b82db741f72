// Host emulation of the CUDA kernels in csrc/cuda/*.cuh, for machines without a GPU: every CUDA
// thread is a fiber, __syncthreads and grid.sync() are its barriers (fibers.h), warp shuffles go
// through a per-warp exchange (emu_runtime.h). It runs the real kernel code in every dtype the
// CUDA build dispatches (double, float, c10::Half, c10::BFloat16 with float op-math) and for
// every cell (GRU, LSTM with and without a projection, RNN tanh and relu), so tests can check
// the index math, padding, sorting, the half-type bit-cast loads, the cells' gate and state
// handling and the one-barrier-per-step schemes against CPU references, for padded and ragged
// (offsets, packed) rows. The persistent launches are cut by csrc/cuda/plan.h's persistent_cut
// for a pretend device, as on a GPU. ops_cuda.cu is included whole, with csrc/cuda/runtime.h's
// names defined on the CPU by emu_runtime.h, and entered two ways: the kernel-level harness below
// calls the backend's launchers on a call it sets up (tests hand the kernels gx and read back the
// workspace, dghn, hprev and the cut), and emu_backend.h binds the op entries themselves
// (launchers, GEMMs, checks). The tensor-core path (kMma) runs through the emulated mma.sync of
// mma_emu.h. Test-only; see tests/test_cuda_emulated.py, tests/test_cuda_emulated_cells.py and
// tests/test_cuda_emulated_backend.py.
#include "emu_runtime.h"

#include "cells/gru.h"
#include "cells/lstm.h"
#include "cells/rnn.h"
#include "cuda/ops_cuda.cu"  // the whole backend: the harness's launchers, emu_backend.h's entries
#include "cuda/persistent.cuh"
#include "cuda/plan.h"

// The kernel-level harness: the backend's own launchers (paths.cuh, paths_backward.cuh) called
// on a call the harness sets up itself, so tests can hand the kernels gx, choose the path, the
// cut's pretend device and the tensor-core kernel directly, and read back what the launchers keep
// internal (workspace, dghn, hprev, the cut). Outputs start as 777 where nothing was written.
namespace harness {
using namespace varlen_rnn;
using namespace varlen_rnn::cuda;

// The persistent cut the launcher would take on a device with `sms` SMs and `smem` bytes of
// dynamic shared memory per block (max_kc: VARLEN_RNN_PERSISTENT_MAX_KC). mma: the tensor-core
// kernel's cut (its padded strides, its tile type); the padding is knobs().pad_smem
// (set_smem_padding; off only to show the conflicts it removes).
plan::Choice persistent_choice(const LayerCall& c, plan::Pass pass, int64_t storage_bytes,
                               int64_t acc_bytes, int64_t sms, int64_t smem, int64_t max_kc,
                               bool mma) {
  TORCH_CHECK(!c.proj(), "an LSTM with a projection has no persistent kernel");
  plan::Problem p{c.dims.B, c.dims.H, c.dims.D, pass, storage_bytes, acc_bytes, true};
  p.gates = c.G;
  p.persistent_mma = mma;
  p.pad_smem = knobs().pad_smem;
  p.max_tile_rows = knobs().max_rows;
  p.row_slices = knobs().row_slices;
  const plan::Device dev{sms, smem, true, true};
  plan::Choice choice;
  choice.path = plan::Path::kPersistent;
  choice.mma = mma;
  std::string why;
  choice.fits = plan::persistent_cut(p, dev, max_kc, choice.cut, why);
  TORCH_CHECK(choice.fits, "no persistent cut: ", why);
  return choice;
}

at::Tensor cut_tensor(const plan::Cut& c) {
  return at::tensor({c.J, c.blocks_per_dir, c.tile_rows, c.kc, c.blocks, c.row_slices}, at::kLong);
}

// The call's dims, rows and states as the ops set them (entries.h), on the pretend device
// (`sms` SMs, `smem` bytes of shared memory per block). layout: 0 offsets (seq_index = offsets
// [B+1]), 1 packed (batch_sizes [T], sorted_indices or an empty tensor), 2 padded (seq_index =
// lengths [B], bf: batch-major); T the padded time dimension or max_len; N the ragged rows.
// hx [D, B, P] and cx [D, B, H] (kHasC) in sequence order; w_hr [D, P, H] or empty.
template <typename Cell>
void set_call(LayerCall& c, const at::Tensor& like, const at::Tensor& w_hh, const at::Tensor& hx,
              const at::Tensor& cx, const at::Tensor& w_hr, int64_t layout,
              const at::Tensor& seq_index, const at::Tensor& sorted_indices, int64_t T, bool bf,
              int64_t N, int64_t sms, int64_t smem) {
  emu_set_device(sms, smem, 9);
  RaggedDims dims;
  dims.T = T, dims.B = hx.size(1), dims.I = 0, dims.H = w_hh.size(1) / Cell::kGates;
  dims.D = w_hh.size(0), dims.batch_first = bf, dims.G = Cell::kGates;
  dims.S = kWorkspaceSaved<Cell>, dims.P = hx.size(2), dims.N = N;
  dims.layout = static_cast<int32_t>(layout);
  set_layer_call(c, dims, like, hx, w_hh);
  if (layout == 2) {
    c.rows = padded_rows(dims, seq_index, like.device());
  } else {
    c.rows = ragged_rows(dims, seq_index, std::nullopt, like.device(), c.stream);
    // sorted_indices through the device's check (rows.h's kernels), not the host's.
    if (sorted_indices.numel() > 0) c.rows.order = checked_permutation(sorted_indices, c.stream);
  }
  c.hx = to_rank_order(c.rows, hx);
  if constexpr (Cell::kHasC) {
    if (cx.defined()) c.cx = to_rank_order(c.rows, cx);
  }
  if (w_hr.numel() > 0) c.w_hr = w_hr.contiguous();
}

at::Tensor sentinel(at::IntArrayRef sizes, const at::TensorOptions& opts) {
  return at::full(sizes, 777.0, opts);
}

// The forward launchers on gx [R, D*G*H]. Returns out [R, D*P], h_n, c_n (or empty) in
// sequence order, the workspace, the persistent cut (or empty).
template <typename Cell, typename scalar_t>
std::vector<at::Tensor> forward_t(const at::Tensor& gx, const at::Tensor& w_hh,
                                  const c10::optional<at::Tensor>& b_hh, const at::Tensor& hx,
                                  const at::Tensor& cx, const at::Tensor& w_hr, int64_t layout,
                                  const at::Tensor& seq_index, const at::Tensor& sorted_indices,
                                  int64_t T, bool bf, bool persistent, int64_t sms, int64_t smem,
                                  int64_t max_kc, bool mma) {
  using acc_t = at::opmath_type<scalar_t>;
  ForwardCall c;
  set_call<Cell>(c, gx, w_hh, hx, cx, w_hr, layout, seq_index, sorted_indices, T, bf, gx.size(0),
                 sms, smem);
  const LayerDims& d = c.dims;
  const int64_t R = c.rows.R;
  c.gx = gx.contiguous();
  if (b_hh.has_value()) c.b_hh = b_hh->contiguous();
  c.need_workspace = true;
  c.out = sentinel({R, d.D * c.P}, c.opts);
  c.h_n = sentinel({d.D, d.B, c.P}, c.opts);
  if constexpr (Cell::kHasC) c.c_n = sentinel({d.D, d.B, d.H}, c.opts);
  c.ws =
      sentinel({d.D, R, d.S * d.H}, c.opts.dtype(workspace_dtype(c.opts.dtype().toScalarType())));
  at::Tensor cut = at::empty({0}, at::kLong);
  if (persistent) {
    const plan::Choice choice = persistent_choice(c, plan::Pass::kTraining, sizeof(scalar_t),
                                                  sizeof(acc_t), sms, smem, max_kc, mma);
    cut = cut_tensor(choice.cut);
    const bool launched = persistent_forward<Cell, scalar_t>(c, choice);
    TORCH_CHECK(launched, "the pretend device refused the cooperative launch");
  } else {
    TORCH_CHECK(!mma, "the tensor-core path is the persistent kernels'");
    run_fallback_forward<Cell, scalar_t>(c);
  }
  return {c.out, to_sequence_order(c.rows, c.h_n),
          Cell::kHasC ? to_sequence_order(c.rows, c.c_n) : at::empty({0}), c.ws, cut};
}

// The backward launchers' recurrence. grad_c_n [D, B, H] (kHasC, else empty). Returns dgx,
// dghn (a GRU's, else empty), hprev, grad_hx, grad_cx (or empty), dhr and hcell (the projection's
// [D, R, P] and [D, R, H] rows, or empty), the persistent cut (or empty).
template <typename Cell, typename scalar_t>
std::vector<at::Tensor> backward_t(const at::Tensor& go, const at::Tensor& ghn,
                                   const at::Tensor& gcn, const at::Tensor& out,
                                   const at::Tensor& hx, const at::Tensor& ws,
                                   const at::Tensor& w_hh, const at::Tensor& w_hr, int64_t layout,
                                   const at::Tensor& seq_index, const at::Tensor& sorted_indices,
                                   int64_t T, bool bf, bool persistent, int64_t sms, int64_t smem,
                                   int64_t max_kc, bool mma) {
  using acc_t = at::opmath_type<scalar_t>;
  BackwardCall c;
  // The backward reads no cx: c's first state comes from the workspace's rows.
  set_call<Cell>(c, go, w_hh, hx, at::Tensor(), w_hr, layout, seq_index, sorted_indices, T, bf,
                 go.size(0), sms, smem);
  const LayerDims& d = c.dims;
  const int64_t R = c.rows.R, GH = c.G * d.H;
  c.grad_out = go.contiguous();
  c.out = out.contiguous();
  c.grad_h_n = to_rank_order(c.rows, ghn);
  c.ws = ws.contiguous();
  const int64_t width = GH + (Cell::kHiddenGradsDiffer ? d.H : 0);
  c.dg = sentinel({d.D, R, width}, c.opts);  // [D, R, GH (+H)], as set_backward_buffers makes it
  c.ldg = width;
  c.hprev = sentinel({d.D, R, c.P}, c.opts);
  c.grad_hx = sentinel({d.D, d.B, c.P}, c.opts);
  if constexpr (Cell::kHasC) {
    c.grad_c_n = to_rank_order(c.rows, gcn);
    c.grad_cx = sentinel({d.D, d.B, d.H}, c.opts);
  }
  if (c.proj()) {
    c.dhr = sentinel({d.D, R, c.P}, c.opts);
    c.hcell = sentinel({d.D, R, d.H}, c.opts);
  }
  at::Tensor cut = at::empty({0}, at::kLong);
  if (persistent) {
    const plan::Choice choice = persistent_choice(c, plan::Pass::kBackward, sizeof(scalar_t),
                                                  sizeof(acc_t), sms, smem, max_kc, mma);
    cut = cut_tensor(choice.cut);
    const bool launched = persistent_backward<Cell, scalar_t>(c, choice);
    TORCH_CHECK(launched, "the pretend device refused the cooperative launch");
  } else {
    TORCH_CHECK(!mma, "the tensor-core path is the persistent kernels'");
    run_fallback_backward<Cell, scalar_t>(c);
  }
  auto or_empty = [](const at::Tensor& t) { return t.defined() ? t : at::empty({0}); };
  // dgx as the tests take it, [R, D*GH] (direction d at columns d*GH), and a GRU's dghn [D, R, H]
  const at::Tensor dgx = c.dg.narrow(2, 0, GH).transpose(0, 1).reshape({R, d.D * GH});
  return {dgx,
          Cell::kHiddenGradsDiffer ? c.dg.narrow(2, GH, d.H).contiguous() : at::empty({0}),
          c.hprev,
          to_sequence_order(c.rows, c.grad_hx),
          Cell::kHasC ? to_sequence_order(c.rows, c.grad_cx) : at::empty({0}),
          or_empty(c.dhr),
          or_empty(c.hcell),
          cut};
}

// The cells by number, as the tests name them.
enum CellId { kGru = 0, kLstm = 1, kRnnTanh = 2, kRnnRelu = 3 };
template <typename F>
void with_cell(int64_t cell, F f) {
  switch (cell) {
    case kGru:
      return f(GruCell{});
    case kLstm:
      return f(LstmCell{});
    case kRnnTanh:
      return f(RnnTanhCell{});
    case kRnnRelu:
      return f(RnnReluCell{});
    default:
      TORCH_CHECK(false, "cell must be 0 (GRU), 1 (LSTM), 2 (RNN tanh) or 3 (RNN relu), got ",
                  cell);
  }
}

// layout, seq_index, sorted_indices, T, bf: see set_call. The knobs: persistent or fallback;
// the pretend device's SM count and shared memory per block; the K-chunk cap. cx, grad_c_n
// and w_hr: empty tensors where the cell has no c or no projection.
std::vector<at::Tensor> cell_forward(int64_t cell, at::Tensor gx, at::Tensor w_hh,
                                     c10::optional<at::Tensor> b_hh, at::Tensor hx, at::Tensor cx,
                                     at::Tensor w_hr, int64_t layout, at::Tensor seq_index,
                                     at::Tensor sorted_indices, int64_t T, bool bf, bool persistent,
                                     int64_t sms, int64_t smem, int64_t max_kc, bool mma) {
  std::vector<at::Tensor> res;
  with_cell(cell, [&](auto c) {
    using Cell = decltype(c);
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, gx.scalar_type(), "emu_forward", [&] {
      res = forward_t<Cell, scalar_t>(gx, w_hh, b_hh, hx, cx, w_hr, layout, seq_index,
                                      sorted_indices, T, bf, persistent, sms, smem, max_kc, mma);
    });
  });
  return res;
}

std::vector<at::Tensor> cell_backward(int64_t cell, at::Tensor go, at::Tensor ghn, at::Tensor gcn,
                                      at::Tensor out, at::Tensor hx, at::Tensor ws, at::Tensor w_hh,
                                      at::Tensor w_hr, int64_t layout, at::Tensor seq_index,
                                      at::Tensor sorted_indices, int64_t T, bool bf,
                                      bool persistent, int64_t sms, int64_t smem, int64_t max_kc,
                                      bool mma) {
  std::vector<at::Tensor> res;
  with_cell(cell, [&](auto c) {
    using Cell = decltype(c);
    AT_DISPATCH_FLOATING_TYPES_AND2(
        at::kHalf, at::kBFloat16, go.scalar_type(), "emu_backward", [&] {
          res =
              backward_t<Cell, scalar_t>(go, ghn, gcn, out, hx, ws, w_hh, w_hr, layout, seq_index,
                                         sorted_indices, T, bf, persistent, sms, smem, max_kc, mma);
        });
  });
  return res;
}

// The GRU's entry points (tests/test_cuda_emulated.py): cell_forward / cell_backward of cell 0,
// returning out, h_n, ws, cut and dgx, dghn, hprev, grad_hx, cut.
std::vector<at::Tensor> forward(at::Tensor gx, at::Tensor w_hh, c10::optional<at::Tensor> b_hh,
                                at::Tensor hx, int64_t layout, at::Tensor seq_index,
                                at::Tensor sorted_indices, int64_t T, bool bf, bool persistent,
                                int64_t sms, int64_t smem, int64_t max_kc, bool mma) {
  const at::Tensor none = at::empty({0}, gx.options());
  auto r = cell_forward(kGru, gx, w_hh, b_hh, hx, none, none, layout, seq_index, sorted_indices, T,
                        bf, persistent, sms, smem, max_kc, mma);
  return {r[0], r[1], r[3], r[4]};
}

std::vector<at::Tensor> backward(at::Tensor go, at::Tensor ghn, at::Tensor out, at::Tensor hx,
                                 at::Tensor ws, at::Tensor w_hh, int64_t layout,
                                 at::Tensor seq_index, at::Tensor sorted_indices, int64_t T,
                                 bool bf, bool persistent, int64_t sms, int64_t smem,
                                 int64_t max_kc, bool mma) {
  const at::Tensor none = at::empty({0}, go.options());
  auto r = cell_backward(kGru, go, ghn, none, out, hx, ws, w_hh, none, layout, seq_index,
                         sorted_indices, T, bf, persistent, sms, smem, max_kc, mma);
  return {r[0], r[1], r[2], r[3], r[7]};
}

// The emulation hooks' counts since the last reset: vector_rows and scalar_rows (stage_row's
// two ways), fragment_ways (the worst bank conflict of a tensor-core fragment load),
// misaligned (accesses check_aligned found off their size's alignment), tagged_loads (words
// of the tagged exchange loaded), async_copies (16-byte copies stage_row left to land at
// copy_async_wait).
std::map<std::string, int64_t> stats(bool reset) {
  EmuStats& s = emu_stats();
  std::map<std::string, int64_t> out{
      {"vector_rows", s.vector_rows.load()},     {"scalar_rows", s.scalar_rows.load()},
      {"fragment_ways", s.fragment_ways.load()}, {"misaligned", s.misaligned.load()},
      {"tagged_loads", s.tagged_loads.load()},   {"async_copies", s.async_copies.load()}};
  if (reset) {
    s.vector_rows = 0;
    s.scalar_rows = 0;
    s.fragment_ways = 0;
    s.misaligned = 0;
    s.tagged_loads = 0;
    s.async_copies = 0;
  }
  return out;
}

// Whether the tensor-core cuts pad their shared-memory rows (plan.h's padded_stride); returns
// the setting before the call.
bool set_smem_padding(bool pad) {
  const bool before = knobs().pad_smem;
  knobs().pad_smem = pad;
  return before;
}

// The persistent tiles' rows at most (VARLEN_RNN_PERSISTENT_MAX_ROWS; 0: plan.h's own limit);
// returns the setting before the call.
int64_t set_max_tile_rows(int64_t rows) {
  const int64_t before = knobs().max_rows;
  knobs().max_rows = rows > 0 ? rows : 0;
  return before;
}

// The persistent launches' row slices (VARLEN_RNN_PERSISTENT_ROW_SLICES; 0: the cost model's
// choice); returns the setting before the call.
int64_t set_row_slices(int64_t slices) {
  const int64_t before = knobs().row_slices;
  knobs().row_slices = slices > 0 ? slices : 0;
  return before;
}

// Whether persistent forwards share h through the tagged exchange (VARLEN_RNN_EXCHANGE=tagged);
// returns the setting before the call.
bool set_tagged_exchange(bool tagged) {
  const bool before = knobs().tagged;
  knobs().tagged = tagged;
  return before;
}

}  // namespace harness

#include "emu_backend.h"

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  using namespace harness;
  m.def("stats", &stats);
  m.def("set_smem_padding", &set_smem_padding);
  m.def("set_tagged_exchange", &set_tagged_exchange);
  m.def("set_max_tile_rows", &set_max_tile_rows);
  m.def("set_row_slices", &set_row_slices);
  m.def("forward", &forward);
  m.def("backward", &backward);
  m.def("cell_forward", &cell_forward);
  m.def("cell_backward", &cell_backward);
  bind_backend(m);
}
