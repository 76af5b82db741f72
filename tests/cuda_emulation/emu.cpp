// Host emulation of the CUDA kernels in csrc/cuda/*.cuh, for machines without a GPU: every CUDA
// thread is a fiber, __syncthreads and grid.sync() are its barriers (fibers.h), warp shuffles go
// through a per-warp exchange (emu_runtime.h). It runs the real kernel code in every dtype the
// CUDA build dispatches (double, float, c10::Half, c10::BFloat16 with float op-math) and for
// every cell (GRU, LSTM with and without a projection, RNN tanh and relu), so tests can check
// the index math, padding, sorting, the half-type bit-cast loads, the cells' gate and state
// handling and the one-barrier-per-step schemes against CPU references, for padded and ragged
// (offsets, packed) rows. The persistent launches are cut by csrc/cuda/plan.h's persistent_cut
// for a pretend device, as on a GPU. Two ways in: the kernel-level harness below writes the
// launchers' tensor set-up out around the kernels (tests hand them gx and read back the workspace,
// dgh, hprev and the cut), and emu_backend.h binds the backend's own op entries (ops_cuda.cu,
// included whole: launchers, GEMMs, checks) with csrc/cuda/runtime.h's names defined on the CPU
// by emu_runtime.h. The tensor-core path (kMma) runs through the emulated mma.sync of
// mma_emu.h. Test-only; see tests/test_cuda_emulated.py, tests/test_cuda_emulated_cells.py and
// tests/test_cuda_emulated_backend.py.
#include "emu_runtime.h"

#include "cells/gru.h"
#include "cells/lstm.h"
#include "cells/rnn.h"
#include "cuda/ops_cuda.cu"  // the whole backend, bound below as backend_* (emu_backend)
#include "cuda/persistent.cuh"
#include "cuda/plan.h"

// The kernel-level harness: the launchers' tensor set-up written out around the kernels, so
// tests can hand the kernels gx and read back what the launchers keep internal (workspace,
// dgh, hprev, the cut) on a pretend device of their choosing.
namespace harness {
using namespace varlen_rnn;
using namespace varlen_rnn::cuda;

bool g_pad_smem = true;  // plan.h's padded strides for the tensor-core kernels (set_smem_padding)

#include "emu_rows.h"

// An optional tensor's data, or nullptr.
template <typename T>
T* ptr_or_null(const at::Tensor& t) {
  return t.defined() && t.numel() > 0 ? t.data_ptr<T>() : nullptr;
}
at::Tensor or_empty(const at::Tensor& t) { return t.defined() ? t : at::empty({0}); }

// The launchers' tensor set-up (paths.cuh), in the storage dtype scalar_t with acc_t state,
// workspace and exchange buffers, around the emulated kernels. hx [D, B, P], cx [D, B, H]
// (kHasC, else empty), h_n, c_n in sequence order; w_hr [D, P, H] or empty (no projection).
// Returns out, h_n, c_n (or empty), ws, the persistent cut.
template <typename Cell, typename scalar_t>
std::vector<at::Tensor> forward_t(const at::Tensor& gx, const at::Tensor& w_hh,
                                  const c10::optional<at::Tensor>& b_hh, const at::Tensor& hx_b,
                                  const at::Tensor& cx_b, const at::Tensor& w_hr, const Rows& r,
                                  int64_t T, bool persistent, int64_t sms, int64_t smem,
                                  int64_t max_kc, bool mma) {
  using acc_t = at::opmath_type<scalar_t>;
  constexpr int64_t G = Cell::kGates, S = kWorkspaceSaved<Cell>;
  using ws_t = workspace_t<scalar_t, acc_t>;
  const int64_t D = w_hh.size(0), H = w_hh.size(1) / G, B = hx_b.size(1), P = hx_b.size(2);
  const bool proj = w_hr.numel() > 0;
  const at::TensorOptions opts = gx.options();
  const at::TensorOptions acc_opts = opts.dtype(c10::CppTypeToScalarType<acc_t>::value);
  const bool half = !std::is_same<scalar_t, acc_t>::value;
  const at::Tensor hx = to_rank(r, hx_b);
  const at::Tensor cx = Cell::kHasC ? to_rank(r, cx_b) : at::Tensor();
  at::Tensor out = at::full({r.R, D * P}, 777.0, opts);
  at::Tensor h_n = at::full({D, B, P}, 777.0, opts);
  at::Tensor c_n = Cell::kHasC ? at::full({D, B, H}, 777.0, opts) : at::Tensor();
  at::Tensor ws =
      at::full({D, r.R, S * H}, 777.0, opts.dtype(c10::CppTypeToScalarType<ws_t>::value));
  at::Tensor cut_info = at::empty({0}, at::kLong);
  if (persistent) {
    TORCH_CHECK(!proj, "an LSTM with a projection has no persistent kernel");
    const plan::Cut cut = cut_of(B, H, D, plan::Pass::kTraining, sizeof(scalar_t), sizeof(acc_t),
                                 sms, smem, max_kc, G, mma, g_pad_smem);
    cut_info = cut_tensor(cut);
    // As paths.cuh: the exchange in the storage type on 16-bit tensor cores, the own units'
    // exact state beside it where the cell reads h.
    const bool half_exchange = mma && sizeof(scalar_t) == 2;
    at::Tensor hbuf = at::full({2, D, B, H}, 777.0, half_exchange ? opts : acc_opts);
    at::Tensor hown =
        half_exchange && Cell::kReadsHPrev ? at::full({D, B, H}, 777.0, acc_opts) : at::Tensor();
    at::Tensor cbuf = Cell::kHasC ? at::full({D, B, H}, 777.0, acc_opts) : at::Tensor();
    PersistentForwardArgs<scalar_t, acc_t> a{};
    a.gx = gx.data_ptr<scalar_t>();
    a.w_hh = w_hh.data_ptr<scalar_t>();
    a.b_hh = b_hh ? b_hh->data_ptr<scalar_t>() : nullptr;
    a.hx = hx.data_ptr<scalar_t>();
    a.hbuf = hbuf.data_ptr();
    a.hown = ptr_or_null<acc_t>(hown);
    a.out = out.data_ptr<scalar_t>();
    a.h_n = h_n.data_ptr<scalar_t>();
    a.ws = ptr_or_null<ws_t>(ws);
    a.cx = ptr_or_null<scalar_t>(cx);
    a.cbuf = ptr_or_null<acc_t>(cbuf);
    a.c_n = ptr_or_null<scalar_t>(c_n);
    fill_common<scalar_t, acc_t>(a, r, cut, T, B, H, D);
    bool done = false;
    if constexpr (std::is_same<acc_t, float>::value) {
      if (mma) {
        emu_launch(cut.blocks, kPersistThreads, cut.smem,
                   [&] { persistent_forward_kernel<Cell, scalar_t, acc_t, true>(a); });
        done = true;
      }
    }
    if (!done) {
      TORCH_CHECK(!mma, "the tensor-core path takes float32, float16 or bfloat16");
      emu_launch(cut.blocks, kPersistThreads, cut.smem,
                 [&] { persistent_forward_kernel<Cell, scalar_t, acc_t>(a); });
    }
  } else {
    at::Tensor h = hx.to(acc_opts.dtype(), false, /*copy=*/true);  // updated in place
    at::Tensor h_lo = half ? hx.clone() : h;  // the GEMM's operand, rounded for half types
    at::Tensor c = Cell::kHasC ? cx.to(acc_opts.dtype(), false, true) : at::Tensor();
    at::Tensor w_t = w_hh.transpose(1, 2);
    at::Tensor gh = at::empty({D, B, G * H}, opts);
    at::Tensor hcell = at::full({D, B, H}, 777.0, opts);
    at::Tensor hr = at::empty({D, B, P}, opts);
    for (int64_t s = 0; s < T; ++s) {
      at::bmm_out(gh, h_lo, w_t);
      auto step = [&](auto proj_tag) {
        constexpr bool kProj = decltype(proj_tag)::value;
        emu_launch_seq((D * B * H + 255) / 256, 256, [&] {
          fallback_forward_step_kernel<Cell, kProj, scalar_t, acc_t>(
              gx.data_ptr<scalar_t>(), gh.data_ptr<scalar_t>(),
              b_hh ? b_hh->data_ptr<scalar_t>() : nullptr, r.l.lens.data(), h.data_ptr<acc_t>(),
              half ? h_lo.data_ptr<scalar_t>() : nullptr, ptr_or_null<acc_t>(c),
              kProj ? hcell.data_ptr<scalar_t>() : out.data_ptr<scalar_t>(), ptr_or_null<ws_t>(ws),
              s, B, H, D, r.map, r.R);
        });
      };
      if constexpr (Cell::kHasC) {
        if (proj) {
          step(std::true_type{});
          at::bmm_out(hr, hcell, w_hr.transpose(1, 2));
          emu_launch_seq((D * B * P + 255) / 256, 256, [&] {
            fallback_proj_forward_kernel<scalar_t, acc_t>(
                hr.data_ptr<scalar_t>(), r.l.lens.data(), h.data_ptr<acc_t>(),
                half ? h_lo.data_ptr<scalar_t>() : nullptr, out.data_ptr<scalar_t>(), s, B, P, D,
                r.map);
          });
          continue;
        }
      }
      step(std::false_type{});
    }
    h_n.copy_(h);
    if (Cell::kHasC) c_n.copy_(c);
  }
  return {out, to_sequence(r, h_n), Cell::kHasC ? to_sequence(r, c_n) : at::empty({0}), ws,
          cut_info};
}

// The backward launchers' set-up (paths_backward.cuh). grad_c_n [D, B, H] (kHasC, else
// empty). Returns dgx, dgh, hprev, grad_hx, grad_cx (or empty), dhr and hcell (the
// projection's [D, R, P] and [D, R, H] rows, or empty), the persistent cut.
template <typename Cell, typename scalar_t>
std::vector<at::Tensor> backward_t(const at::Tensor& go, const at::Tensor& ghn_b,
                                   const at::Tensor& gcn_b, const at::Tensor& out,
                                   const at::Tensor& hx_b, const at::Tensor& ws,
                                   const at::Tensor& w_hh, const at::Tensor& w_hr, const Rows& r,
                                   int64_t T, bool persistent, int64_t sms, int64_t smem,
                                   int64_t max_kc, bool mma) {
  using acc_t = at::opmath_type<scalar_t>;
  using ws_t = workspace_t<scalar_t, acc_t>;
  constexpr int64_t G = Cell::kGates;
  const int64_t D = w_hh.size(0), H = w_hh.size(1) / G, B = hx_b.size(1), P = hx_b.size(2);
  const bool proj = w_hr.numel() > 0;
  const at::TensorOptions opts = go.options();
  const at::TensorOptions acc_opts = opts.dtype(c10::CppTypeToScalarType<acc_t>::value);
  const at::Tensor hx = to_rank(r, hx_b), ghn = to_rank(r, ghn_b);
  const at::Tensor gcn = Cell::kHasC ? to_rank(r, gcn_b) : at::Tensor();
  at::Tensor dgx = at::full({r.R, D * G * H}, 777.0, opts);
  at::Tensor dgh = at::full({D, r.R, G * H}, 777.0, opts);
  at::Tensor hprev = at::full({D, r.R, P}, 777.0, opts);
  at::Tensor grad_hx = at::full({D, B, P}, 777.0, opts);
  at::Tensor grad_cx = Cell::kHasC ? at::full({D, B, H}, 777.0, opts) : at::Tensor();
  at::Tensor dhr = proj ? at::full({D, r.R, P}, 777.0, opts) : at::Tensor();
  at::Tensor hcell_rows = proj ? at::full({D, r.R, H}, 777.0, opts) : at::Tensor();
  at::Tensor cut_info = at::empty({0}, at::kLong);
  if (persistent) {
    TORCH_CHECK(!proj, "an LSTM with a projection has no persistent kernel");
    const plan::Cut cut = cut_of(B, H, D, plan::Pass::kBackward, sizeof(scalar_t), sizeof(acc_t),
                                 sms, smem, max_kc, G, mma, g_pad_smem);
    cut_info = cut_tensor(cut);
    at::Tensor dh = at::full({D, B, H}, 777.0, acc_opts);
    at::Tensor dc = Cell::kHasC ? at::full({D, B, H}, 777.0, acc_opts) : at::Tensor();
    PersistentBackwardArgs<scalar_t, acc_t> a{};
    a.grad_out = go.data_ptr<scalar_t>();
    a.out = out.data_ptr<scalar_t>();
    a.hx = hx.data_ptr<scalar_t>();
    a.grad_h_n = ghn.data_ptr<scalar_t>();
    a.ws = ptr_or_null<ws_t>(ws);
    a.w_hh = w_hh.data_ptr<scalar_t>();
    a.dh = dh.data_ptr<acc_t>();
    a.dgx = dgx.data_ptr<scalar_t>();
    a.dgh = dgh.data_ptr<scalar_t>();
    a.hprev = hprev.data_ptr<scalar_t>();
    a.grad_hx = grad_hx.data_ptr<scalar_t>();
    a.grad_c_n = ptr_or_null<scalar_t>(gcn);
    a.dc = ptr_or_null<acc_t>(dc);
    a.grad_cx = ptr_or_null<scalar_t>(grad_cx);
    fill_common<scalar_t, acc_t>(a, r, cut, T, B, H, D);
    bool done = false;
    if constexpr (std::is_same<acc_t, float>::value) {
      if (mma) {
        emu_launch(cut.blocks, kPersistThreads, cut.smem,
                   [&] { persistent_backward_kernel<Cell, scalar_t, acc_t, true>(a); });
        done = true;
      }
    }
    if (!done) {
      TORCH_CHECK(!mma, "the tensor-core path takes float32, float16 or bfloat16");
      emu_launch(cut.blocks, kPersistThreads, cut.smem,
                 [&] { persistent_backward_kernel<Cell, scalar_t, acc_t>(a); });
    }
  } else {
    at::Tensor dh_a = ghn.to(acc_opts.dtype(), false, /*copy=*/true);
    at::Tensor dh_a_next = at::full_like(dh_a, 777.0);
    at::Tensor dh_b = at::zeros_like(ghn);  // the GEMM part, in the storage dtype
    at::Tensor dgh_step = at::full({D, B, G * H}, 777.0, opts);
    at::Tensor dc = Cell::kHasC ? gcn.to(acc_opts.dtype(), false, true) : at::Tensor();
    at::Tensor dhr_step = at::full({D, B, P}, 777.0, opts);
    at::Tensor dhcell = at::full({D, B, H}, 777.0, opts);
    for (int64_t s = T - 1; s >= 0; --s) {
      auto step = [&](auto proj_tag) {
        constexpr bool kProj = decltype(proj_tag)::value;
        emu_launch_seq((D * B * H + 255) / 256, 256, [&] {
          fallback_backward_step_kernel<Cell, kProj, scalar_t, acc_t>(
              go.data_ptr<scalar_t>(), out.data_ptr<scalar_t>(), hx.data_ptr<scalar_t>(),
              ptr_or_null<ws_t>(ws), r.l.lens.data(), kProj ? nullptr : dh_a.data_ptr<acc_t>(),
              kProj ? dhcell.data_ptr<scalar_t>() : dh_b.data_ptr<scalar_t>(),
              kProj ? nullptr : dh_a_next.data_ptr<acc_t>(), ptr_or_null<acc_t>(dc),
              dgx.data_ptr<scalar_t>(), dgh.data_ptr<scalar_t>(), dgh_step.data_ptr<scalar_t>(),
              kProj ? nullptr : hprev.data_ptr<scalar_t>(),
              kProj ? hcell_rows.data_ptr<scalar_t>() : nullptr, s, B, H, D, r.map, r.R);
        });
      };
      bool stepped = false;
      if constexpr (Cell::kHasC) {
        if (proj) {
          emu_launch_seq((D * B * P + 255) / 256, 256, [&] {
            fallback_proj_backward_kernel<scalar_t, acc_t>(
                go.data_ptr<scalar_t>(), out.data_ptr<scalar_t>(), hx.data_ptr<scalar_t>(),
                r.l.lens.data(), dh_a.data_ptr<acc_t>(), dh_b.data_ptr<scalar_t>(),
                dh_a_next.data_ptr<acc_t>(), dhr.data_ptr<scalar_t>(),
                dhr_step.data_ptr<scalar_t>(), hprev.data_ptr<scalar_t>(), s, B, P, D, r.map, r.R);
          });
          at::bmm_out(dhcell, dhr_step, w_hr);
          step(std::true_type{});
          stepped = true;
        }
      }
      if (!stepped) step(std::false_type{});
      std::swap(dh_a, dh_a_next);
      at::bmm_out(dh_b, dgh_step, w_hh);
    }
    grad_hx.copy_(dh_a.add_(dh_b));
    if (Cell::kHasC) grad_cx.copy_(dc);
  }
  return {dgx,
          dgh,
          hprev,
          to_sequence(r, grad_hx),
          Cell::kHasC ? to_sequence(r, grad_cx) : at::empty({0}),
          or_empty(dhr),
          or_empty(hcell_rows),
          cut_info};
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

// layout, seq_index, sorted_indices, T, bf: see rows_of. The knobs: persistent or fallback;
// the pretend device's SM count and shared memory per block; the K-chunk cap. cx, grad_c_n
// and w_hr: empty tensors where the cell has no c or no projection.
std::vector<at::Tensor> cell_forward(int64_t cell, at::Tensor gx, at::Tensor w_hh,
                                     c10::optional<at::Tensor> b_hh, at::Tensor hx, at::Tensor cx,
                                     at::Tensor w_hr, int64_t layout, at::Tensor seq_index,
                                     at::Tensor sorted_indices, int64_t T, bool bf, bool persistent,
                                     int64_t sms, int64_t smem, int64_t max_kc, bool mma) {
  const Rows r =
      rows_of(layout, seq_index, sorted_indices, T, bf, hx.size(1), layout == 2 ? 0 : gx.size(0));
  std::vector<at::Tensor> res;
  with_cell(cell, [&](auto c) {
    using Cell = decltype(c);
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, gx.scalar_type(), "emu_forward", [&] {
      res = forward_t<Cell, scalar_t>(gx, w_hh, b_hh, hx, cx, w_hr, r, T, persistent, sms, smem,
                                      max_kc, mma);
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
  const Rows r =
      rows_of(layout, seq_index, sorted_indices, T, bf, hx.size(1), layout == 2 ? 0 : go.size(0));
  std::vector<at::Tensor> res;
  with_cell(cell, [&](auto c) {
    using Cell = decltype(c);
    AT_DISPATCH_FLOATING_TYPES_AND2(
        at::kHalf, at::kBFloat16, go.scalar_type(), "emu_backward", [&] {
          res = backward_t<Cell, scalar_t>(go, ghn, gcn, out, hx, ws, w_hh, w_hr, r, T, persistent,
                                           sms, smem, max_kc, mma);
        });
  });
  return res;
}

// The GRU's entry points (tests/test_cuda_emulated.py): cell_forward / cell_backward of cell 0,
// returning out, h_n, ws, cut and dgx, dgh, hprev, grad_hx, cut.
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
// misaligned (accesses check_aligned found off their size's alignment).
std::map<std::string, int64_t> stats(bool reset) {
  EmuStats& s = emu_stats();
  std::map<std::string, int64_t> out{{"vector_rows", s.vector_rows.load()},
                                     {"scalar_rows", s.scalar_rows.load()},
                                     {"fragment_ways", s.fragment_ways.load()},
                                     {"misaligned", s.misaligned.load()}};
  if (reset) {
    s.vector_rows = 0;
    s.scalar_rows = 0;
    s.fragment_ways = 0;
    s.misaligned = 0;
  }
  return out;
}

// Whether the tensor-core cuts pad their shared-memory rows (plan.h's padded_stride); returns
// the setting before the call.
bool set_smem_padding(bool pad) {
  const bool before = g_pad_smem;
  g_pad_smem = pad;
  return before;
}

}  // namespace harness

#include "emu_backend.h"

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  using namespace harness;
  m.def("stats", &stats);
  m.def("set_smem_padding", &set_smem_padding);
  m.def("forward", &forward);
  m.def("backward", &backward);
  m.def("cell_forward", &cell_forward);
  m.def("cell_backward", &cell_backward);
  bind_backend(m);
}
