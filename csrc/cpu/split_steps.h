// The forward's step loop split by hidden units across a persistent team of
// threads (cpu/recurrence.h picks it or the per-step GEMM loop: step_loops).
// The team is all threads (the directions in turn: split_steps) or half of
// them, while the other half runs the other direction (concurrent_steps); a
// team of one thread runs its direction with no barrier.
//
// Thread k owns a slice of the hidden units with all of their gates: a column
// panel of W_hh^T packed once per call ([P, G*Hs], gate g of unit u0 + j at
// column g*Hs + j), which stays in that core's L2 across steps. Each step it
// computes its gh slice with a single-threaded BLAS call (inside the parallel
// region the BLAS runs sequentially), or in float32 with the micro-kernel of
// cpu/small_gemm.h on a panel packed for it, and runs the gate pass for its
// own units, so there is no per-step BLAS fork/join and no separate gate pass over
// [rows, G*H]. h ping-pongs between two buffers (step s reads one and writes
// the other), so one barrier per step suffices: the next step reads all of h.
// With the LSTM's projection the gate pass writes h' (not read by the GEMM)
// and a second barrier follows the projection, which is split by columns of
// h_state the same way.
//
// With gx_p null each thread computes its own gate columns of the input
// projection in chunks of steps (cpu/chunked_projection.h).
//
// A loop runs a range of the sorted rows (cpu/schedule.h RowRange): all of
// them, or, where team_layout (cpu/team.h) splits the batch, one team's own,
// while other teams run the other ranges as loops of their own. Rows never
// read each other's state, so the teams do not synchronise at all; a team
// of one thread runs its rows' steps with no barrier, all units of a row in
// one gate pass.
//
// Every output element is computed by one thread in a fixed order, so the
// results are deterministic (they may differ from the per-step loop's by the
// BLAS's rounding in float32; the cell math is the same code).
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <deque>
#include <optional>
#include <type_traits>
#include <vector>

#include "cpu/bf16_gemm.h"
#include "cpu/chunked_projection.h"
#include "cpu/layer_args.h"
#include "cpu/rows.h"
#include "cpu/small_gemm.h"
#include "cpu/team.h"  // gemm_rm, blas_available, slice_of
#include "layout.h"    // step_time

namespace varlen_rnn {
namespace cpu {

// One direction d of forward_impl's step loop, set up for a team of
// `threads` threads (its slices and panels), run by that team (run, inside
// run_teams: one team for the directions in turn, two for both at once), then
// finished. h: [B, P] sorted order (in: h0, out: h_n); c: [B, H]
// (Cell::kHasC); gx_p: [N, G*H] this direction's input projection (without
// b_ih), or null: computed in chunks by the loop (ChunkedProjection); bias_p: [2, G*H] its b_ih
// then b_hh; ws: this direction's workspace rows (none in inference); rows: the sorted
// rows this loop runs (their rows of h and c only are read and written).
template <typename Cell, typename scalar_t>
class SplitSteps {
 public:
  SplitSteps(ForwardArgs& args, int64_t d, const scalar_t* gx_p, const scalar_t* bias_p,
             at::Tensor& h, at::Tensor& c, const Workspace<scalar_t>& ws, int64_t threads,
             const RowRange& rows)
      : args_(args), d_(d), gx_p_(gx_p), bias_p_(bias_p), ws_(ws), rows_(rows) {
    const int64_t H = args.dims.H, P = args.dims.P, R = rows.size();
    const auto opts = h.options();
    parts_ = team_parts(H, threads);
    // float32 may take the register-blocked micro-kernel (cpu/small_gemm.h)
    // instead of the BLAS: each slice's panel is then packed once per call
    // from its [G*Hs, P] rows of W_hh, by the thread that uses it (so it
    // lands in that core's cache).
    // With args.bf16 the product takes bfloat16 operands (cpu/bf16_gemm.h):
    // the panels packed for it the same way, and h rounded into hb_ as the
    // gate pass (or the projection) writes it.
    bf16_ = std::is_same_v<scalar_t, float> && args.bf16;
    kernel_ = !bf16_ && std::is_same_v<scalar_t, float> && use_small_gemm();
    packed_.resize(kernel_ ? parts_ : 0);
    packed16_.resize(bf16_ ? parts_ : 0);
    if (gx_p == nullptr) chunks_.emplace(args, d, Cell::kGates, parts_, bf16_, rows);
    for (int64_t k = 0; k < parts_; ++k) {
      const auto [u0, u1] = slice_of(H, parts_, k);
      // The BLAS takes the slice's W_hh^T [P, G*Hs] copied; the packings
      // read W_hh where it is (unit_columns).
      if (!kernel_ && !bf16_) panels_.push_back(unit_rows_t(args.w_hh[d], Cell::kGates, u0, u1));
      gh_.push_back(at::empty({R, Cell::kGates * (u1 - u0)}, opts));
    }
    proj_ = args.w_hr.defined();
    if (proj_) {
      // With the micro-kernel the projection takes it too: each element of
      // h_state is then one multiply-add chain over H in order, however the
      // team slices P (a BLAS's rounding may depend on the slice's width).
      if (kernel_) {
        w_hr_ = args.w_hr[d].contiguous();  // [P, H]
        packed_r_.resize(parts_);
      } else {
        w_hr_t_ = args.w_hr[d].t().contiguous();  // [H, P]
      }
      hraw_ = at::empty({R, H}, opts);  // [R, H] h'
    } else {
      h2_ = at::empty({R, P}, opts);  // [R, P]
    }
    // Without a projection, step s reads hbuf[s % 2] and writes
    // hbuf[(s + 1) % 2] (a row's final state is in hbuf[len % 2]); with one,
    // h' is hraw and the state is rewritten in place after the barrier.
    // All of them start at the range's first row: the loop's row r0 + j is
    // their row j.
    scalar_t* h_p = h.data_ptr<scalar_t>() + rows.r0 * P;
    hbuf_[0] = h_p;
    hbuf_[1] = proj_ ? h_p : h2_.data_ptr<scalar_t>();
    c_p_ = Cell::kHasC ? c.data_ptr<scalar_t>() + rows.r0 * H : nullptr;
    if (bf16_) {  // [R, P] each: h0 rounded, then what the steps write
      hb_store_[0] = h.narrow(0, rows.r0, R).to(at::kBFloat16).contiguous();
      hb_store_[1] = proj_ ? hb_store_[0] : at::empty_like(hb_store_[0]);
      for (int k = 0; k < 2; ++k) hb_[k] = hb_store_[k].data_ptr<at::BFloat16>();
    }
  }

  void run(const Team& team);

  // Rows whose last step wrote h2 (odd lengths) take their state from it.
  void finish() {
    if (proj_) return;
    const int64_t P = args_.dims.P;
    for (int64_t j = 0; j < rows_.size(); ++j) {
      if (args_.sched.len[rows_.r0 + j] % 2 == 1)
        std::copy_n(hbuf_[1] + j * P, P, hbuf_[0] + j * P);
    }
  }

 private:
  ForwardArgs& args_;
  const int64_t d_;
  const scalar_t *const gx_p_, *const bias_p_;
  const Workspace<scalar_t> ws_;
  const RowRange rows_;
  int64_t parts_ = 1;
  bool kernel_ = false, proj_ = false, bf16_ = false;
  // [P, G*Hs] ([G*Hs, P] for the kernel and bf16), [R, G*Hs] (R rows in the range)
  std::vector<at::Tensor> panels_, gh_;
  std::vector<PackedB> packed_;
  std::vector<PackedB16> packed16_;
  std::optional<ChunkedProjection<scalar_t>> chunks_;  // where gx_p_ is null
  at::Tensor hb_store_[2];  // [R, P] bfloat16 h, ping-ponging like hbuf_ (one with proj)
  at::BFloat16* hb_[2] = {nullptr, nullptr};
  std::vector<PackedB> packed_r_;         // kernel_: W_hr^T[:, p0:p1] per part
  at::Tensor w_hr_, w_hr_t_, hraw_, h2_;  // [P, H] (kernel_) or [H, P], [R, H], [R, P]
  scalar_t* hbuf_[2] = {nullptr, nullptr};
  scalar_t* c_p_ = nullptr;
};

template <typename Cell, typename scalar_t>
void SplitSteps<Cell, scalar_t>::run(const Team& team) {
  const LayerDims& dims = args_.dims;
  const Schedule& sched = args_.sched;
  const int64_t H = dims.H, P = dims.P, G = Cell::kGates * H;
  const int64_t d = d_, parts = parts_, tid = team.rank, nth = team.size, r0 = rows_.r0;
  const bool proj = proj_, kernel = kernel_, bf16 = bf16_;
  const Bf16GemmScope bf16_scope(bf16);
  scalar_t* h_p = hbuf_[0];
  scalar_t* hraw_p = proj ? hraw_.data_ptr<scalar_t>() : nullptr;
  const scalar_t* wr_p = w_hr_t_.defined() ? w_hr_t_.const_data_ptr<scalar_t>() : nullptr;
  const OutputWriter<scalar_t> out(args_.output);
  ChunkedProjection<scalar_t>* chunks = chunks_ ? &*chunks_ : nullptr;
  for (int64_t k = tid; k < (chunks ? parts : 0); k += nth) chunks->prepare(k);
  if constexpr (std::is_same_v<scalar_t, float>) {
    // b[p, g*Hs + i] = W_hh[g*H + u0 + i, p], read where W_hh is
    for (int64_t k = tid; k < (kernel || bf16 ? parts : 0); k += nth) {
      const auto [u0, u1] = slice_of(H, parts, k);
      const int64_t cols = Cell::kGates * (u1 - u0);
      const BLayout layout = unit_columns(H, P, u0, u1);
      const at::Tensor& w = args_.w_hh[d];
      if (kernel) packed_[k] = pack_b(P, cols, w.const_data_ptr<float>() + u0 * P, layout);
      if (bf16) packed16_[k] = pack_b16(P, cols, w.const_data_ptr<at::BFloat16>() + u0 * P, layout);
    }
    for (int64_t k = tid; k < (kernel && proj ? parts : 0); k += nth) {
      // b[h, j] = W_hr[p0 + j, h]
      const auto [p0, p1] = slice_of(P, parts, k);
      packed_r_[k] = pack_b(H, p1 - p0, w_hr_.const_data_ptr<float>() + p0 * H, 1, H);
    }
  }
  for (int64_t s = 0; s < sched.max_len; ++s) {
    const int64_t n = rows_.active(sched, s);  // rows r0 .. r0 + n - 1 run
    if (n == 0) continue;                      // the same for every thread of the team
    const scalar_t* h_cur = hbuf_[s % 2];
    scalar_t* h_next = hbuf_[(s + 1) % 2];
    for (int64_t k = tid; k < parts; k += nth) {
      const auto [u0, u1] = slice_of(H, parts, k);
      const int64_t Hs = u1 - u0, ld = Cell::kGates * Hs;
      scalar_t* ghk = gh_[k].data_ptr<scalar_t>();
      if (chunks) chunks->step(k, s);
      if constexpr (std::is_same_v<scalar_t, float>) {
        if (kernel) small_gemm(n, h_cur, P, packed_[k], ghk, ld, false);
        if (bf16) bf16_gemm(n, hb_[s % 2], P, packed16_[k], ghk, ld, false);
      }
      if (!kernel && !bf16)
        gemm_rm(n, ld, P, h_cur, P, panels_[k].const_data_ptr<scalar_t>(), ld, ghk, ld);
      for (int64_t j = 0; j < n; ++j) {  // the loop's row j: sorted row i
        const int64_t i = r0 + j, t = step_time(d, sched.len[i], s);
        scalar_t* hi = (proj ? hraw_p : h_next) + j * H + u0;
        // The gate pass updates h in place: it starts from h_prev.
        if (Cell::kReadsHPrev && !proj) std::copy_n(h_cur + j * H + u0, Hs, hi);
        ForwardRow<scalar_t> row;
        row.gx = chunks ? chunks->gx(k, s, i) : gx_p_ + args_.gx_rows.row(t, i) * G + u0;
        row.gh = ghk + j * ld;
        row.bx = bias_p_ + u0;
        row.bh = bias_p_ + G + u0;
        row.h = hi;
        // The gate pass writes an op-math output itself (row.h twice otherwise).
        row.out = proj || out.bf16() ? row.h : out.out + output_offset(args_, t, i, d) + u0;
        row.c = Cell::kHasC ? c_p_ + j * H + u0 : nullptr;
        ws_.point(row, args_.gx_rows.row(t, i), u0);
        forward_units(Cell{}, row, Hs, H, Hs, chunks ? Hs : H);
        if (bf16 && !proj) round_bf16(hi, Hs, hb_[(s + 1) % 2] + j * P + u0);
        if (out.bf16() && !proj) {
          out.write(output_offset(args_, t, i, d) + u0, hi, hb_[(s + 1) % 2] + j * P + u0, Hs);
        }
      }
    }
    team.sync();
    if (proj) {  // h_state[:, p0:p1] = h' W_hr^T[:, p0:p1], also the output
      for (int64_t k = tid; k < parts; k += nth) {
        const auto [p0, p1] = slice_of(P, parts, k);
        if (p1 == p0) continue;
        if (kernel) {
          if constexpr (std::is_same_v<scalar_t, float>)
            small_gemm(n, hraw_p, H, packed_r_[k], h_p + p0, P, false);
        } else {
          gemm_rm(n, p1 - p0, H, hraw_p, H, wr_p + p0, P, h_p + p0, P);
        }
        for (int64_t j = 0; j < n; ++j) {
          const int64_t i = r0 + j, t = step_time(d, sched.len[i], s);
          if (bf16) round_bf16(h_p + j * P + p0, p1 - p0, hb_[0] + j * P + p0);
          out.write(output_offset(args_, t, i, d) + p0, h_p + j * P + p0, hb_[0] + j * P + p0,
                    p1 - p0);
        }
      }
      team.sync();
    }
  }
}

// Direction d's step loop on all threads (the directions in turn).
template <typename Cell, typename scalar_t>
void split_steps(ForwardArgs& args, int64_t d, const scalar_t* gx_p, const scalar_t* bias_p,
                 at::Tensor& h, at::Tensor& c, const Workspace<scalar_t>& ws) {
  using Loop = SplitSteps<Cell, scalar_t>;
  auto loops = run_split_loops<Loop>(
      args.dims, args.sched, product_bytes<scalar_t>(args), {{d, at::get_num_threads()}},
      [&](std::deque<Loop>& l, int64_t, int64_t threads, const RowRange& rows) {
        l.emplace_back(args, d, gx_p, bias_p, h, c, ws, threads, rows);
      });
  for (Loop& loop : loops) loop.finish();
}

// Both directions' step loops at once, each on its half of the threads
// (direction_halves); the arguments are split_steps' per direction (bias_p:
// [D, 2, G*H], both directions' biases).
template <typename Cell, typename scalar_t>
void concurrent_steps(ForwardArgs& args, const scalar_t* const gx_p[2], const scalar_t* bias_p,
                      at::Tensor* h, at::Tensor* c, const Workspace<scalar_t> ws[2]) {
  using Loop = SplitSteps<Cell, scalar_t>;
  const std::vector<int64_t> halves = direction_halves();
  const int64_t G = Cell::kGates * args.dims.H;
  auto loops = run_split_loops<Loop>(
      args.dims, args.sched, product_bytes<scalar_t>(args), {{0, halves[0]}, {1, halves[1]}},
      [&](std::deque<Loop>& l, int64_t d, int64_t threads, const RowRange& rows) {
        l.emplace_back(args, d, gx_p[d], bias_p + d * 2 * G, h[d], c[d], ws[d], threads, rows);
      });
  for (Loop& loop : loops) loop.finish();
}

}  // namespace cpu
}  // namespace varlen_rnn
