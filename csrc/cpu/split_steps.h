// The forward's step loop split by hidden units across a persistent team of
// threads (cpu/recurrence.h picks it or the per-step GEMM loop: use_split_loops).
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
#include <type_traits>
#include <vector>

#include "cpu/layer_args.h"
#include "cpu/rows.h"
#include "cpu/small_gemm.h"
#include "cpu/team.h"  // gemm_rm, blas_available, slice_of
#include "layout.h"    // step_time

#if defined(_OPENMP)
#include <omp.h>
#endif

namespace varlen_rnn {
namespace cpu {

// One direction d of forward_impl's step loop. h: [B, P] sorted order (in:
// h0, out: h_n); c: [B, H] (Cell::kHasC); gx_p: [N, G*H] this direction's
// input projection; ws_p: this direction's workspace or null.
template <typename Cell, typename scalar_t>
void split_steps(ForwardArgs& args, int64_t d, const scalar_t* gx_p, const scalar_t* bh_p,
                 at::Tensor& h, at::Tensor& c, scalar_t* ws_p) {
  const LayerDims& dims = args.dims;
  const Schedule& sched = args.sched;
  const int64_t H = dims.H, P = dims.P, G = Cell::kGates * H, S = Cell::kSaved * H;
  const bool proj = args.w_hr.defined();
  const auto opts = h.options();
  const int64_t parts = team_parts(H);
  // float32 may take the register-blocked micro-kernel (cpu/small_gemm.h)
  // instead of the BLAS: each slice's panel is then packed once per call from
  // its [G*Hs, P] rows of W_hh, by the thread that uses it (so it lands in
  // that core's cache).
  const bool kernel = std::is_same_v<scalar_t, float> && use_small_gemm();
  std::vector<at::Tensor> panels, gh;  // [P, G*Hs] ([G*Hs, P] for the kernel), [B, G*Hs]
  std::vector<PackedB> packed(kernel ? parts : 0);
  const at::Tensor w3 = args.w_hh[d].view({Cell::kGates, H, P});
  for (int64_t k = 0; k < parts; ++k) {
    const auto [u0, u1] = slice_of(H, parts, k);
    const at::Tensor rows = w3.narrow(1, u0, u1 - u0).reshape({-1, P});  // [G*Hs, P]
    panels.push_back(kernel ? rows : rows.t().contiguous());
    gh.push_back(at::empty({dims.B, rows.size(0)}, opts));
  }
  const at::Tensor w_hr_t = proj ? args.w_hr[d].t().contiguous() : at::Tensor();  // [H, P]
  at::Tensor hraw = proj ? at::empty({dims.B, H}, opts) : at::Tensor();           // [B, H] h'
  // Without a projection, step s reads hbuf[s % 2] and writes hbuf[(s + 1) % 2]
  // (a row's final state is in hbuf[len % 2]); with one, h' is hraw and the
  // state is rewritten in place after the barrier.
  at::Tensor h2 = proj ? at::Tensor() : at::empty_like(h);  // [B, P]
  scalar_t* h_p = h.data_ptr<scalar_t>();
  scalar_t* const hbuf[2] = {h_p, proj ? h_p : h2.data_ptr<scalar_t>()};
  scalar_t* c_p = Cell::kHasC ? c.data_ptr<scalar_t>() : nullptr;
  scalar_t* hraw_p = proj ? hraw.data_ptr<scalar_t>() : nullptr;
  const scalar_t* wr_p = proj ? w_hr_t.const_data_ptr<scalar_t>() : nullptr;
  scalar_t* out_p = args.output.data_ptr<scalar_t>();

#pragma omp parallel num_threads(parts)
  {
#if defined(_OPENMP)
    const int64_t tid = omp_get_thread_num(), nth = omp_get_num_threads();
#else
    const int64_t tid = 0, nth = 1;
#endif
    if constexpr (std::is_same_v<scalar_t, float>) {
      for (int64_t k = tid; k < (kernel ? parts : 0); k += nth) {
        const int64_t cols = panels[k].size(0);  // G*Hs; b[p, col] = rows[col, p]
        packed[k] = pack_b(P, cols, panels[k].const_data_ptr<float>(), 1, P);
      }
    }
    for (int64_t s = 0; s < sched.max_len; ++s) {
      const int64_t n = sched.active[s];
      if (n == 0) continue;  // the same for every thread
      const scalar_t* h_cur = hbuf[s % 2];
      scalar_t* h_next = hbuf[(s + 1) % 2];
      for (int64_t k = tid; k < parts; k += nth) {
        const auto [u0, u1] = slice_of(H, parts, k);
        const int64_t Hs = u1 - u0, ld = Cell::kGates * Hs;
        scalar_t* ghk = gh[k].data_ptr<scalar_t>();
        if constexpr (std::is_same_v<scalar_t, float>) {
          if (kernel) small_gemm(n, h_cur, P, packed[k], ghk, ld, false);
        }
        if (!kernel) gemm_rm(n, ld, P, h_cur, P, panels[k].const_data_ptr<scalar_t>(), ld, ghk, ld);
        for (int64_t i = 0; i < n; ++i) {
          const int64_t t = step_time(d, sched.len[i], s);
          scalar_t* hi = (proj ? hraw_p : h_next) + i * H + u0;
          // The gate pass updates h in place: it starts from h_prev.
          if (Cell::kReadsHPrev && !proj) std::copy_n(h_cur + i * H + u0, Hs, hi);
          ForwardRow<scalar_t> row;
          row.gx = gx_p + args.gx_rows.row(t, i) * G + u0;
          row.gh = ghk + i * ld;
          row.bh = bh_p + u0;
          row.h = hi;
          row.out = proj ? row.h : out_p + output_offset(args, t, i, d) + u0;
          row.c = Cell::kHasC ? c_p + i * H + u0 : nullptr;
          row.ws = ws_p ? ws_p + (sched.offset[s] + i) * S + u0 : nullptr;
          forward_units(Cell{}, row, Hs, H, Hs);
        }
      }
#pragma omp barrier
      if (proj) {  // h_state[:, p0:p1] = h' W_hr^T[:, p0:p1], also the output
        for (int64_t k = tid; k < parts; k += nth) {
          const auto [p0, p1] = slice_of(P, parts, k);
          if (p1 == p0) continue;
          gemm_rm(n, p1 - p0, H, hraw_p, H, wr_p + p0, P, h_p + p0, P);
          for (int64_t i = 0; i < n; ++i) {
            const int64_t t = step_time(d, sched.len[i], s);
            std::copy_n(h_p + i * P + p0, p1 - p0, out_p + output_offset(args, t, i, d) + p0);
          }
        }
#pragma omp barrier
      }
    }
  }
  if (!proj) {  // rows whose last step wrote h2 (odd lengths) take their state from it
    for (int64_t i = 0; i < dims.B; ++i) {
      if (sched.len[i] % 2 == 1) std::copy_n(hbuf[1] + i * P, P, h_p + i * P);
    }
  }
}

}  // namespace cpu
}  // namespace varlen_rnn
