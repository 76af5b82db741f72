// The backward's step loop split by hidden units across a persistent team of
// threads, as the forward's is (cpu/split_steps.h); cpu/recurrence.h picks it
// or the per-step GEMM loop (step_loops). The team is all threads, or half of
// them while the other half runs the other direction (concurrent_backward).
//
// Thread k owns hidden units [u0, u1) (slice_of) and the same columns of dh.
// Each step it runs the gate pass of its own units for every running row
// (backward_units: a unit's gradients read and write only that unit's
// columns), writing their columns of the step's dG [n, G*H]; after a barrier
// it computes dh_prev[:, u0:u1] = dG W_hh[:, u0:u1] with one single-threaded
// BLAS call (in float32 the micro-kernel of cpu/small_gemm.h) against its own
// panel of W_hh, packed once per call. The next
// step's gate pass of unit j reads dh[:, j] only, which the same thread just
// wrote, so dG is the one buffer read across threads: it alternates between
// two buffers (step s writes dgbuf[s % 2]; a thread that runs ahead writes the
// other one while the rest still read this one), and one barrier per step
// suffices. Where dG is dgx itself (the forward direction of the packed
// orders, not the GRU), each step writes its own rows of dgx: no copy.
//
// The LSTM's projection splits dh (width P) by P columns and h' by H units:
// per step, (A) thread k adds grad_output to its columns of dh_state, barrier,
// (B) dh'[:, u0:u1] = dh_state W_hr[:, u0:u1] and the gate pass of its units,
// barrier, (C) dh[:, p0:p1] = dG W_hh[:, p0:p1], which the next step's (A)
// reads on the same thread. dh_state is read across threads in (B) and
// written in (C); dG is written in (B) and read in (C): the two barriers
// separate both, so neither needs a second buffer.
//
// With args.bf16 the dh product takes bfloat16 operands (cpu/bf16_gemm.h):
// each thread packs its columns of W_hh for the matrix unit, and the gate
// pass rounds its units' columns of dG into a bfloat16 step buffer, which is
// then the one buffer read across threads (alternating likewise). A row's
// float32 gate gradients live only in the thread's own scratch: rounded once
// into the step buffer and copied into the bfloat16 rows over positions
// (cpu/backward_bf16.h keep_row_bf16), and
// summed for the biases into the loop's own float64 sums, each column by the
// one thread that owns its unit, over the loop's rows in a fixed order (steps
// from the last, rows in sorted order). split_backward adds the loops' sums
// in the order of their rows: one team's sums are exactly the per-step
// loop's; several teams' agree with them to float64 rounding.
//
// Like the forward's, a loop runs a range of the sorted rows (all, or one
// team's own where team_layout splits the batch: then each team runs its
// rows' steps with no synchronisation with the others, and a team of one
// thread with no barrier at all).
//
// The loop fills dgx, dghn (with args.bf16 their bfloat16 rows), and hprev,
// dh_state, h', exactly as the per-step loop does, so the weight gradients
// after it are the same GEMMs. Every value is computed by one thread in a
// fixed order: deterministic.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <deque>
#include <type_traits>
#include <vector>

#include "cpu/backward_bf16.h"  // keep_row_bf16
#include "cpu/bf16_gemm.h"
#include "cpu/layer_args.h"
#include "cpu/rows.h"
#include "cpu/small_gemm.h"
#include "cpu/team.h"  // run_teams, team_parts, gemm_rm, slice_of
#include "layout.h"    // step_time, prev_time

namespace varlen_rnn {
namespace cpu {

// backward_impl's buffers over the N positions (gx_rows' order), which the
// weight gradients after the step loop read.
template <typename scalar_t>
struct BackwardBuffers {
  scalar_t* dgx = nullptr;    // [N, G*H] this direction's dG, row stride ldx (null with args.bf16)
  int64_t ldx = 0;            // (dgx's columns of the direction, or its workspace rows)
  scalar_t* dghn = nullptr;   // [N, H] the GRU's hidden-side n gradient, row stride ldn, else null
  int64_t ldn = 0;            // (and with args.bf16)
  scalar_t* hprev = nullptr;  // [N, P] one direction (projection), else null: gathered later
  scalar_t* dhs = nullptr;    // [N, P] dh_state (projection), else null
  scalar_t* hout = nullptr;   // [N, H] h' (projection), else null
  // With args.bf16 the same two in bfloat16 (row strides ldx and ldn), and
  // the bias sums (cpu/backward_bf16.h), else null:
  at::BFloat16* dgx16 = nullptr;   // [N, G*H] this direction's dG
  at::BFloat16* dghn16 = nullptr;  // [N, H] the GRU's dn*r
  double* sums = nullptr;          // [G*H + Hn] this direction's bias sums
};

// One step's product of a thread: c[n, cols] (ldc) = a[n, k] (lda) b[k, cols]
// (ldb: a panel) (+ c if accumulate), by the BLAS; float32 takes the
// micro-kernel instead where use_small_gemm() says so.
template <typename scalar_t>
inline void backward_step_gemm(int64_t n, int64_t cols, int64_t k, const scalar_t* a, int64_t lda,
                               const scalar_t* b, int64_t ldb, scalar_t* c, int64_t ldc,
                               bool accumulate) {
  if (cols == 0) return;
  gemm_rm(n, cols, k, a, lda, b, ldb, c, ldc, accumulate ? scalar_t(1) : scalar_t(0));
}

// One direction d of backward_impl's step loop, set up for a team of
// `threads` threads, run by that team (inside run_teams), as SplitSteps is.
// dh: [B, P] sorted order (in: grad_h_n, out: grad_hx); dc: [B, H] likewise
// (Cell::kHasC); buf: this direction's buffers;
// dgh_in_dgx: dG is this direction's dgx at rows offset[s] + i;
// rows: the sorted rows this loop runs (their rows of dh and dc only).
template <typename Cell, typename scalar_t>
class SplitBackward {
 public:
  SplitBackward(BackwardArgs& args, int64_t d, const BackwardBuffers<scalar_t>& buf,
                bool dgh_in_dgx, at::Tensor& dh, at::Tensor& dc, int64_t threads,
                const RowRange& rows)
      : args_(args), d_(d), buf_(buf), dgh_in_dgx_(dgh_in_dgx), rows_(rows) {
    const LayerDims& dims = args.dims;
    const int64_t H = dims.H, P = dims.P, G = Cell::kGates * H, R = rows.size();
    proj_ = args.w_hr.defined();
    TORCH_INTERNAL_ASSERT(!dgh_in_dgx || !Cell::kHiddenGradsDiffer);
    TORCH_INTERNAL_ASSERT(proj_ || P == H);
    const auto opts = dh.options();
    parts_ = team_parts(H, threads);
    // Panels per slice, copied once per call so each stays in its core's
    // cache across steps: W_hh[:, p0:p1] as [G*H, Ps] and, with a projection,
    // W_hr[:, u0:u1] as [P, Hs]. In float32 the micro-kernel
    // (cpu/small_gemm.h) may run the dh product instead: each thread then
    // packs its panel from W_hh's columns itself.
    // With args.bf16 the matrix unit's product runs it, packed the same way.
    bf16_ = std::is_same_v<scalar_t, float> && args.bf16;
    kernel_ = !bf16_ && std::is_same_v<scalar_t, float> && use_small_gemm();
    w_hh_d_ = args.w_hh[d].contiguous();  // [G*H, P]
    packed_.resize(kernel_ ? parts_ : 0);
    // The micro-kernel takes (B) dh' = dh_state W_hr too (each element's
    // chain then does not depend on the team's slices).
    if (proj_ && kernel_) w_hr_d_ = args.w_hr[d].contiguous();  // [P, H]
    packed_r_.resize(proj_ && kernel_ ? parts_ : 0);
    packed16_.resize(bf16_ ? parts_ : 0);
    for (int64_t k = 0; k < parts_; ++k) {
      const auto [p0, p1] = slice_of(P, parts_, k);
      const bool own_pack = kernel_ || bf16_;
      panels_.push_back(own_pack ? at::Tensor() : w_hh_d_.narrow(1, p0, p1 - p0).contiguous());
      if (proj_ && !kernel_) {
        const auto [u0, u1] = slice_of(H, parts_, k);
        panels_r_.push_back(args.w_hr[d].narrow(1, u0, u1 - u0).contiguous());
      }
    }
    // dG [R, G*H] per step: two alternating buffers without a projection,
    // one with it, none when it is dgx. With bf16 that is the bfloat16 dG's
    // count, and the float values are each thread's own scratch (run).
    const int64_t nbuf = proj_ ? 1 : 2;
    if (bf16_) dgb_ = at::empty({nbuf, R, G}, opts.dtype(at::kBFloat16));
    dgbuf_ = at::empty({bf16_ || dgh_in_dgx ? 0 : nbuf, R, G}, opts);
    sums_.assign(bf16_ ? G + (Cell::kHiddenGradsDiffer ? H : 0) : 0, 0.0);
    if (proj_) dhp_ = at::empty({R, H}, opts);  // [R, H] dh'
    // From the range's first row: the loop's row r0 + j is their row j.
    dh_p_ = dh.data_ptr<scalar_t>() + rows.r0 * P;
    dc_p_ = Cell::kHasC ? dc.data_ptr<scalar_t>() + rows.r0 * H : nullptr;
  }

  void run(const Team& team);

  // With args.bf16, after every loop of the direction has run: adds this
  // loop's bias sums to the direction's (split_backward, in the loops' order).
  void add_sums() const {
    for (size_t c = 0; c < sums_.size(); ++c) buf_.sums[c] += sums_[c];
  }

 private:
  BackwardArgs& args_;
  const int64_t d_;
  const BackwardBuffers<scalar_t> buf_;
  const bool dgh_in_dgx_;
  const RowRange rows_;
  int64_t parts_ = 1;
  bool kernel_ = false, proj_ = false, bf16_ = false;
  at::Tensor w_hh_d_, dgbuf_, dhp_;  // [G*H, P], [nbuf or 0, R, G*H], [R, H] (R rows in the range)
  at::Tensor dgb_;                   // [nbuf, R, G*H] bfloat16 dG (bf16)
  std::vector<double> sums_;         // [G*H + Hn] this loop's bias sums (bf16)
  std::vector<at::Tensor> panels_, panels_r_;
  std::vector<PackedB> packed_, packed_r_;  // W_hh[:, p0:p1]; W_hr[:, u0:u1] (kernel_)
  std::vector<PackedB16> packed16_;
  at::Tensor w_hr_d_;  // [P, H] (kernel_ with a projection)
  scalar_t *dh_p_ = nullptr, *dc_p_ = nullptr;
};

template <typename Cell, typename scalar_t>
void SplitBackward<Cell, scalar_t>::run(const Team& team) {
  constexpr bool kDiffer = Cell::kHiddenGradsDiffer;
  const BackwardArgs& args = args_;
  const LayerDims& dims = args.dims;
  const Schedule& sched = args.sched;
  const int64_t H = dims.H, P = dims.P, G = Cell::kGates * H;
  const int64_t d = d_, parts = parts_, tid = team.rank, nth = team.size;
  const int64_t r0 = rows_.r0, R = rows_.size();
  const bool proj = proj_, kernel = kernel_, bf16 = bf16_, dgh_in_dgx = dgh_in_dgx_;
  const Bf16GemmScope bf16_scope(bf16);
  const BackwardBuffers<scalar_t>& buf = buf_;
  scalar_t* dgbuf_p = dgbuf_.data_ptr<scalar_t>();
  at::BFloat16* dgb_p = bf16 ? dgb_.data_ptr<at::BFloat16>() : nullptr;
  scalar_t* dh_p = dh_p_;
  scalar_t* dc_p = dc_p_;
  scalar_t* dhp_p = proj ? dhp_.data_ptr<scalar_t>() : nullptr;
  const OutputRows<scalar_t> go_rows(args.grad_output, std::max(H, P)), out_rows(args.output);
  const scalar_t* hx_p = args.hx.const_data_ptr<scalar_t>();
  const Workspace<scalar_t> ws = workspace_of<scalar_t>(args, d);
  // This thread's converted pieces of a bfloat16 layer's grad_output and h_prev.
  const int64_t wide = std::max(H, P);
  std::vector<scalar_t> stage(go_rows.converts() || out_rows.converts() ? 2 * wide : 0);
  // With bf16 a row's float gate gradients: dgx [G*H], dgh [G*H], dghn [H]
  // (the last two the GRU's), each unit at its own columns.
  std::vector<scalar_t> scratch(bf16 ? (kDiffer ? 2 * G + H : G) : 0);
  scalar_t* const sx = scratch.data();
  double* const sums = sums_.data();
  // grad_output of sorted row i at time t, values [a, b)
  auto go_of = [&](int64_t t, int64_t i, int64_t a, int64_t b) {
    return go_rows.at(output_offset(args, t, i, d) + a, b - a, stage.data());
  };
  // h_prev of sorted row i at step s (time t), values [a, b) of its P
  auto prev_of = [&](int64_t s, int64_t t, int64_t i, int64_t a, int64_t b) {
    return s == 0 ? hx_p + (d * dims.B + sched.perm[i]) * P + a
                  : out_rows.at(output_offset(args, prev_time(d, t), i, d) + a, b - a,
                                stage.data() + wide);
  };
  if constexpr (std::is_same_v<scalar_t, float>) {
    for (int64_t k = tid; k < (kernel ? parts : 0); k += nth) {
      const auto [p0, p1] = slice_of(P, parts, k);
      if (p1 > p0) packed_[k] = pack_b(G, p1 - p0, w_hh_d_.const_data_ptr<float>() + p0, P, 1);
    }
    for (int64_t k = tid; k < (bf16 ? parts : 0); k += nth) {
      const auto [p0, p1] = slice_of(P, parts, k);
      if (p1 > p0)
        packed16_[k] = pack_b16(G, p1 - p0, w_hh_d_.const_data_ptr<at::BFloat16>() + p0, P, 1);
    }
    for (int64_t k = tid; k < (kernel && proj ? parts : 0); k += nth) {
      const auto [u0, u1] = slice_of(H, parts, k);  // b[p, j] = W_hr[p, u0 + j]
      packed_r_[k] = pack_b(P, u1 - u0, w_hr_d_.const_data_ptr<float>() + u0, H, 1);
    }
  }
  for (int64_t s = sched.max_len - 1; s >= 0; --s) {
    const int64_t n = rows_.active(sched, s);  // rows r0 .. r0 + n - 1 run
    if (n == 0) continue;                      // the same for every thread of the team
    scalar_t* dg = dgh_in_dgx ? buf.dgx + (sched.offset[s] + r0) * buf.ldx
                              : dgbuf_p + (proj || bf16 ? 0 : s % 2) * R * G;
    const int64_t ld = dgh_in_dgx ? buf.ldx : G;
    at::BFloat16* dgb = bf16 ? dgb_p + (proj ? 0 : s % 2) * R * G : nullptr;  // [n, G*H]
    if (proj) {  // (A) dh_state = dh + grad_output, kept for dW_hr; h_prev
      for (int64_t k = tid; k < parts; k += nth) {
        const auto [p0, p1] = slice_of(P, parts, k);
        for (int64_t j = 0; j < n; ++j) {  // the loop's row j: sorted row i
          const int64_t i = r0 + j, t = step_time(d, sched.len[i], s);
          const int64_t pos = args.gx_rows.row(t, i);
          const scalar_t* go = go_of(t, i, p0, p1);  // [p1 - p0]
          scalar_t* dhi = dh_p + j * P;
          for (int64_t p = p0; p < p1; ++p) dhi[p] += go[p - p0];
          std::copy(dhi + p0, dhi + p1, buf.dhs + pos * P + p0);
          std::copy_n(prev_of(s, t, i, p0, p1), p1 - p0, buf.hprev + pos * P + p0);
        }
      }
      team.sync();
    }
    for (int64_t k = tid; k < parts; k += nth) {  // the gate pass of the own units
      const auto [u0, u1] = slice_of(H, parts, k);
      const int64_t Hs = u1 - u0;
      if (proj) {  // (B) dh'[:, u0:u1] = dh_state W_hr[:, u0:u1]
        if (kernel) {
          if constexpr (std::is_same_v<scalar_t, float>)
            small_gemm(n, dh_p, P, packed_r_[k], dhp_p + u0, H, false);
        } else {
          backward_step_gemm(n, Hs, P, dh_p, P, panels_r_[k].const_data_ptr<scalar_t>(), Hs,
                             dhp_p + u0, H, false);
        }
      }
      for (int64_t j = 0; j < n; ++j) {
        const int64_t i = r0 + j, t = step_time(d, sched.len[i], s);
        const int64_t pos = args.gx_rows.row(t, i);
        BackwardRow<scalar_t> row;
        row.dh = (proj ? dhp_p : dh_p) + j * H + u0;
        row.go = proj ? nullptr : go_of(t, i, u0, u1);
        row.dc = Cell::kHasC ? dc_p + j * H + u0 : nullptr;
        row.prev = Cell::kReadsHPrev ? prev_of(s, t, i, u0, u1) : nullptr;
        if constexpr (Cell::kSavedIsOutput) {  // kWorkspaceSaved: no workspace columns
          out_rows.point(row, output_offset(args, t, i, d) + u0);
        } else {
          ws.point(row, pos, u0);
        }
        row.dgx = bf16 ? sx + u0 : buf.dgx + pos * buf.ldx + u0;
        row.dgh = !kDiffer ? nullptr : bf16 ? sx + G + u0 : dg + j * ld + u0;
        row.dghn = !kDiffer ? nullptr : bf16 ? sx + 2 * G + u0 : buf.dghn + pos * buf.ldn + u0;
        row.hout = proj ? buf.hout + pos * H + u0 : nullptr;
        backward_units(Cell{}, row, Hs, H);
        if (bf16) {  // the product's operand dgb, and dG over positions
          keep_row_bf16<Cell::kGates, kDiffer>(
              row.dgx, row.dghn, Hs, H, dgb + j * G + u0, buf.dgx16 + pos * buf.ldx + u0,
              kDiffer ? buf.dghn16 + pos * buf.ldn + u0 : nullptr, sums + u0);
        } else if (!kDiffer && !dgh_in_dgx) {
          for (int64_t g = 0; g < Cell::kGates; ++g) {
            std::copy_n(row.dgx + g * H, Hs, dg + j * ld + g * H + u0);
          }
        }
      }
    }
    team.sync();
    for (int64_t k = tid; k < parts; k += nth) {  // dh_prev[:, own columns] = dG W_hh[:, own]
      const auto [p0, p1] = slice_of(P, parts, k);
      // kReadsHPrev: the gate pass left the direct part in dh (accumulate).
      if constexpr (std::is_same_v<scalar_t, float>) {
        if (kernel) {
          if (p1 > p0) small_gemm(n, dg, ld, packed_[k], dh_p + p0, P, Cell::kReadsHPrev);
          continue;
        }
        if (bf16) {
          if (p1 > p0) bf16_gemm(n, dgb, G, packed16_[k], dh_p + p0, P, Cell::kReadsHPrev);
          continue;
        }
      }
      backward_step_gemm(n, p1 - p0, G, dg, ld, panels_[k].const_data_ptr<scalar_t>(), p1 - p0,
                         dh_p + p0, P, Cell::kReadsHPrev);
    }
  }
}

// Direction d's step loop on all threads (the directions in turn).
template <typename Cell, typename scalar_t>
void split_backward(BackwardArgs& args, int64_t d, const BackwardBuffers<scalar_t>& buf,
                    bool dgh_in_dgx, at::Tensor& dh, at::Tensor& dc) {
  using Loop = SplitBackward<Cell, scalar_t>;
  const std::deque<Loop> loops = run_split_loops<Loop>(
      args.dims, args.sched, product_bytes<scalar_t>(args), {{d, at::get_num_threads()}},
      [&](std::deque<Loop>& l, int64_t, int64_t threads, const RowRange& rows) {
        l.emplace_back(args, d, buf, dgh_in_dgx, dh, dc, threads, rows);
      });
  for (const Loop& loop : loops) loop.add_sums();
}

// Both directions' step loops at once, each on its half of the threads
// (direction_halves); the arguments are split_backward's per direction
// (buf[d]: direction d's buffers; dG is dgx for d = 0 only, if dgh_in_dgx).
template <typename Cell, typename scalar_t>
void concurrent_backward(BackwardArgs& args, const BackwardBuffers<scalar_t>* buf, bool dgh_in_dgx,
                         at::Tensor* dh, at::Tensor* dc) {
  using Loop = SplitBackward<Cell, scalar_t>;
  const std::vector<int64_t> halves = direction_halves();
  const std::deque<Loop> loops = run_split_loops<Loop>(
      args.dims, args.sched, product_bytes<scalar_t>(args), {{0, halves[0]}, {1, halves[1]}},
      [&](std::deque<Loop>& l, int64_t d, int64_t threads, const RowRange& rows) {
        l.emplace_back(args, d, buf[d], dgh_in_dgx && d == 0, dh[d], dc[d], threads, rows);
      });
  for (const Loop& loop : loops) loop.add_sums();  // each into its direction's
}

}  // namespace cpu
}  // namespace varlen_rnn
