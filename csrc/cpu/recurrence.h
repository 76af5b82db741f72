// The CPU recurrence: one layer (both directions) of any cell (csrc/cells/),
// forward and backward, over the rows cpu/layer_args.h sets up. Written once,
// a template on the cell; the ops (gru_cpu.cpp, lstm_cpu.cpp, rnn_cpu.cpp)
// instantiate it.
//
// Each step is one GEMM over the running rows (W_hh h, or dgh W_hh in the
// backward) and one parallel gate pass over them (cpu/rows.h), or, where
// step_loops (cpu/team.h) picks it, both split by hidden units across a
// persistent thread team (cpu/split_steps.h, cpu/split_backward.h), or by
// rows between teams (team_layout), for each direction in turn or for both
// at once, each on half of the threads;
// the LSTM's projection adds one GEMM per step (h' W_hr^T, or dh_state W_hr).
// Rows run in the schedule's longest-first order (cpu/schedule.h). Each
// direction's input projection covers the N valid positions only: in the
// split loops per thread, a chunk of steps at a time, else one GEMM before
// the steps (cpu/chunked_projection.h). The workspace ([D, N, S*H], bfloat16
// for a bfloat16 layer: cpu/rows.h Workspace) stores a position's saved
// values at its row of the projection (gx_rows), in both directions, as the
// backward's dG over the positions is laid out: so the last backward can
// write dG over the values it reads (backward_impl), and the weight GEMMs
// cover exactly N rows. Ragged input needs no gather: its own N rows are the
// projection's rows.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/record_function.h>

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <type_traits>

#include "cpu/backward_bf16.h"
#include "cpu/bf16_gemm.h"
#include "cpu/chunked_projection.h"
#include "cpu/layer_args.h"
#include "cpu/rows.h"
#include "cpu/split_backward.h"
#include "cpu/split_steps.h"
#include "cpu/weight_grad.h"
#include "layout.h"  // step_time, prev_time

namespace varlen_rnn {
namespace cpu {

// [D, 2, G]: direction d's b_ih then b_hh (G = the cell's G*H), zeros without
// biases; copied rather than at::stack'ed, which costs several times more on
// a call of one step.
template <typename scalar_t>
at::Tensor gate_biases(const ForwardArgs& args, int64_t G) {
  if (!args.b_ih) return at::zeros({args.dims.D, 2, G}, args.opts());
  at::Tensor bias = at::empty({args.dims.D, 2, G}, args.opts());
  scalar_t* p = bias.data_ptr<scalar_t>();
  const scalar_t* b_ih = args.b_ih->const_data_ptr<scalar_t>();  // [D, G] contiguous
  const scalar_t* b_hh = args.b_hh->const_data_ptr<scalar_t>();
  for (int64_t d = 0; d < args.dims.D; ++d) {
    std::copy_n(b_ih + d * G, G, p + 2 * d * G);
    std::copy_n(b_hh + d * G, G, p + (2 * d + 1) * G);
  }
  return bias;
}

template <typename Cell, typename scalar_t>
void forward_impl(ForwardArgs& args) {
  const LayerDims& dims = args.dims;
  const Schedule& sched = args.sched;
  const int64_t H = dims.H, P = dims.P, G = Cell::kGates * H;
  const bool proj = args.w_hr.defined();
  const auto opts = args.opts();
  const SortedOrder order(sched);
  // A float32 forward that keeps no workspace: few_steps' longer limits.
  const bool f32_inference =
      std::is_same_v<scalar_t, float> && !args.bf16 && args.workspace.numel() == 0;
  const StepLoops loops =
      step_loops(dims, sched.max_len, sizeof(scalar_t), args.bf16, args.bf16, f32_inference);
  const bool gemm_loop = loops == StepLoops::kGemm;
  // The split loops may compute the projection themselves, a chunk of steps
  // at a time per thread (cpu/chunked_projection.h): then neither xp nor gx.
  const int64_t threads = at::get_num_threads();
  const bool chunked =
      !gemm_loop &&
      chunked_projection(dims, sched.N(), std::is_same_v<scalar_t, float> && !args.bf16,
                         loops == StepLoops::kConcurrent ? (threads + 1) / 2 : threads);
  // [N, I] (bfloat16 where args.bf16)
  at::Tensor xp = chunked ? at::Tensor() : projection_input(args);
  const bool few = few_steps(dims, sched.max_len, args.bf16, f32_inference);
  // A bfloat16 layer's call of few steps (a decoding step) takes its
  // products on the bfloat16 weights as stored (bf16_weight_product), with
  // no packing of them either.
  const bool stored = args.bf16 && gemm_loop && few;
  // A float32 one's W_hh products too, at few rows (f32_dots_for, per step).
  const bool dots = std::is_same_v<scalar_t, float> && !args.bf16 && gemm_loop && few;
  at::Tensor gh = gemm_loop ? at::empty({dims.B, G}, opts) : at::Tensor();  // [B, G*H] W_hh h
  // [B, H] one step's h' before the projection (h_state = h' W_hr^T)
  at::Tensor hraw = proj && gemm_loop ? at::empty({dims.B, H}, opts) : at::Tensor();
  // [D, 2, G*H]: direction d's b_ih then b_hh (zeros without biases). The
  // gate pass adds both: a bias folded into the projection GEMM (addmm)
  // costs a broadcast write of the whole [N, G*H] result before the GEMM
  // reads it back, ~5% of an LSTM layer's forward at B=64 H=256.
  const at::Tensor bias = gate_biases<scalar_t>(args, G);
  const scalar_t* gh_p = gemm_loop ? gh.const_data_ptr<scalar_t>() : nullptr;
  scalar_t* hraw_p = hraw.defined() ? hraw.data_ptr<scalar_t>() : nullptr;
  const OutputWriter<scalar_t> out(args.output);
  // [N, G*H], or none where chunked; where stored, on W_ih as stored too
  // (whole_projection with few).
  auto projection = [&](int64_t d) {
    return chunked ? at::Tensor() : whole_projection<scalar_t>(args, xp, d, G, few);
  };

  if (loops == StepLoops::kConcurrent) {
    // Both directions at once (cpu/split_steps.h); whole projections are
    // held both: [N, G*H] more than the directions in turn at the peak.
    const at::Tensor gx[2] = {projection(0), projection(1)};
    xp.reset();
    at::Tensor h[2], c[2];  // [B, P], [B, H] sorted order
    for (int64_t d = 0; d < 2; ++d) {
      h[d] = order.gather(args.hx, d);
      if (Cell::kHasC) c[d] = order.gather(args.cx, d);
    }
    const scalar_t* const gx_p[2] = {chunked ? nullptr : gx[0].const_data_ptr<scalar_t>(),
                                     chunked ? nullptr : gx[1].const_data_ptr<scalar_t>()};
    const Workspace<scalar_t> ws[2] = {workspace_of<scalar_t>(args, 0),
                                       workspace_of<scalar_t>(args, 1)};
    concurrent_steps<Cell, scalar_t>(args, gx_p, bias.const_data_ptr<scalar_t>(), h, c, ws);
    for (int64_t d = 0; d < 2; ++d) {
      order.scatter(args.h_n, d, h[d]);
      if (Cell::kHasC) order.scatter(args.c_n, d, c[d]);
    }
    return;
  }
  for (int64_t d = 0; d < dims.D; ++d) {
    // One direction at a time: half the memory of both projections at once.
    const at::Tensor gx = projection(d);  // [N, G*H], or none where chunked
    if (d == dims.D - 1) xp.reset();
    // The per-step GEMM loop's right operands (the split loop packs its own
    // panels); with args.bf16 W_hh^T packed (few steps: W_hh as stored) and
    // h rounded for each step.
    const bool bf16 = gemm_loop && args.bf16;
    // float32/64: W_hh^T (and W_hr^T) copied contiguous where the steps
    // amortize the copy (MKL's GEMM on the view is slower per step), else the
    // views (few_steps in cpu/team.h has the measurements).
    auto transposed = [&](const at::Tensor& w) {  // [rows, cols] -> [cols, rows]
      return few ? w.t() : w.t().contiguous();
    };
    // Where every step's product is f32_dot_rows (at most B rows, the first step's), W_hh
    // is read as stored and no view of it is made.
    const bool all_dots = dots && f32_dots_for(dims.B);
    const at::Tensor w_hh_t =
        gemm_loop && !bf16 && !all_dots ? transposed(args.w_hh[d]) : at::Tensor();  // [P, G*H]
    const PackedB16 w_hh_packed =
        bf16 && !stored ? pack_b16(P, G, args.w_hh[d].const_data_ptr<at::BFloat16>(), 1, P)
                        : PackedB16{};
    const at::Tensor w_hr_t =
        gemm_loop && proj ? transposed(args.w_hr[d]) : at::Tensor();       // [H, P]
    at::Tensor h = order.gather(args.hx, d);                               // [B, P] sorted order
    at::Tensor c = Cell::kHasC ? order.gather(args.cx, d) : at::Tensor();  // [B, H]
    // [B, P] h rounded for the next step's product: h0 here, then by each
    // step's gate pass (or, with a projection, after it) while h is in cache.
    at::Tensor hb = bf16 ? h.to(at::kBFloat16) : at::Tensor();
    at::BFloat16* hb_p = bf16 ? hb.data_ptr<at::BFloat16>() : nullptr;
    const scalar_t* gx_p = chunked ? nullptr : gx.const_data_ptr<scalar_t>();
    const scalar_t* bias_p = bias.const_data_ptr<scalar_t>() + d * 2 * G;
    scalar_t* h_p = h.data_ptr<scalar_t>();
    scalar_t* c_p = Cell::kHasC ? c.data_ptr<scalar_t>() : nullptr;
    const Workspace<scalar_t> ws = workspace_of<scalar_t>(args, d);  // none in inference
    if (!gemm_loop) {  // the same steps, split by units or rows (cpu/split_steps.h)
      split_steps<Cell, scalar_t>(args, d, gx_p, bias_p, h, c, ws);
    }
    for (int64_t s = 0; s < (gemm_loop ? sched.max_len : 0); ++s) {
      const int64_t n = sched.active[s];
      bool done = false;
      if constexpr (std::is_same_v<scalar_t, float>) {
        if (dots && f32_dots_for(n)) {  // W_hh [D, G*H, P] contiguous: direction d's
          f32_dot_rows(n, h_p, P, args.w_hh.const_data_ptr<float>() + d * G * P, G, P,
                       gh.data_ptr<float>(), G);
          done = true;
        }
        if (stored) {
          bf16_weight_product(n, hb.const_data_ptr<at::BFloat16>(), P,
                              args.w_hh[d].const_data_ptr<at::BFloat16>(), G, P,
                              gh.data_ptr<float>(), G);
        } else if (bf16) {
          bf16_gemm_parallel(n, hb.const_data_ptr<at::BFloat16>(), P, w_hh_packed,
                             gh.data_ptr<float>(), G, nullptr);
        }
      }
      if (!bf16 && !done) {  // float32/64
        at::Tensor gh_s = gh.narrow(0, 0, n);
        at::mm_out(gh_s, h.narrow(0, 0, n), w_hh_t);
      }
      at::parallel_for(0, n, row_grain(H), [&](int64_t i0, int64_t i1) {
        for (int64_t i = i0; i < i1; ++i) {
          const int64_t t = step_time(d, sched.len[i], s);
          ForwardRow<scalar_t> row;
          row.gx = gx_p + args.gx_rows.row(t, i) * G;
          row.gh = gh_p + i * G;
          row.bx = bias_p;
          row.bh = bias_p + G;
          // With a projection h' goes to hraw; the state and output follow.
          row.h = proj ? hraw_p + i * H : h_p + i * H;
          // The gate pass writes an op-math output itself (row.h twice otherwise).
          row.out = proj || out.bf16() ? row.h : out.out + output_offset(args, t, i, d);
          row.c = Cell::kHasC ? c_p + i * H : nullptr;
          ws.point(row, args.gx_rows.row(t, i));
          forward_row(Cell{}, row, H);
          if (bf16 && !proj) round_bf16(row.h, H, hb_p + i * P);
          if (out.bf16() && !proj) out.write(output_offset(args, t, i, d), row.h, hb_p + i * P, H);
        }
      });
      if (proj) {
        at::Tensor h_s = h.narrow(0, 0, n);
        at::mm_out(h_s, hraw.narrow(0, 0, n), w_hr_t);
        at::parallel_for(0, n, row_grain(P), [&](int64_t i0, int64_t i1) {
          for (int64_t i = i0; i < i1; ++i) {
            const int64_t t = step_time(d, sched.len[i], s);
            if (bf16) round_bf16(h_p + i * P, P, hb_p + i * P);
            out.write(output_offset(args, t, i, d), h_p + i * P, hb_p + i * P, P);
          }
        });
      }
    }
    order.scatter(args.h_n, d, h);
    if (Cell::kHasC) order.scatter(args.c_n, d, c);
  }
}

// h_prev of direction d's positions r0 <= r < r1 (rows of gx_rows' order;
// row r of them at hprev + (r - r0) * P), the right operand of dW_hh: hx at
// a row's first step, else the output at its previous time. Gathered after
// the step loop, so the loop runs without it. out_t bfloat16: for the
// bfloat16 product (a bfloat16 layer's output and hx are bfloat16 values: no
// rounding).
template <typename scalar_t, typename out_t = scalar_t>
void gather_hprev(const BackwardArgs& args, int64_t d, out_t* hprev, int64_t r0, int64_t r1) {
  const Schedule& sched = args.sched;
  const int64_t B = args.dims.B, P = args.dims.P;
  const OutputRows<scalar_t> out(args.output);
  const scalar_t* hx_p = args.hx.const_data_ptr<scalar_t>();
  at::parallel_for(0, sched.max_len, 1, [&](int64_t s0, int64_t s1) {
    std::vector<scalar_t> buf(out.converts() ? P : 0);
    for (int64_t s = s0; s < s1; ++s) {
      for (int64_t i = 0; i < sched.active[s]; ++i) {
        const int64_t t = step_time(d, sched.len[i], s), r = args.gx_rows.row(t, i);
        if (r < r0 || r >= r1) continue;
        out_t* dst = hprev + (r - r0) * P;
        if constexpr (std::is_same_v<out_t, at::BFloat16>) {
          if (s > 0 && out.converts()) {  // bfloat16 values already
            std::copy_n(out.bf16(output_offset(args, prev_time(d, t), i, d)), P, dst);
            continue;
          }
        }
        const scalar_t* prev =
            s == 0 ? hx_p + (d * B + sched.perm[i]) * P
                   : out.at(output_offset(args, prev_time(d, t), i, d), P, buf.data());
        if constexpr (std::is_same_v<out_t, scalar_t>) {
          std::copy_n(prev, P, dst);
        } else {
          round_bf16(prev, P, dst);
        }
      }
    }
  });
}

// Positions per chunk of h_prev for dW_hh (hidden_weight_grads below): 1
// MiB of rows, at least 256 (a GEMM over fewer wastes its packing of the
// operands), N split evenly; N itself where that takes one chunk (then the
// product is the one GEMM, or weight_grad's own kernel over few positions, as
// before chunks). VARLEN_RNN_CPU_HPREV_ROWS=n forces n (tests put chunk
// boundaries where they want them).
inline int64_t hprev_chunk_rows(int64_t N, int64_t P, int64_t elem_bytes) {
  const char* env = std::getenv("VARLEN_RNN_CPU_HPREV_ROWS");
  if (env != nullptr && std::atoll(env) > 0) return std::atoll(env);
  const int64_t row_bytes = std::max<int64_t>(1, P * elem_bytes);
  const int64_t most = std::max<int64_t>(256, (int64_t(1) << 20) / row_bytes);
  if (N <= most) return std::max<int64_t>(N, 1);
  const int64_t chunks = (N + most - 1) / most;
  return (N + chunks - 1) / chunks;
}

template <typename Cell, typename scalar_t>
void backward_impl(BackwardArgs& args) {
  // The hidden-side gate gradients differ from dgx (GRU) in the last gate
  // only: that part is kept apart (dghn), the rest read from dgx.
  constexpr bool kDiffer = Cell::kHiddenGradsDiffer;
  const LayerDims& dims = args.dims;
  const Schedule& sched = args.sched;
  const int64_t H = dims.H, P = dims.P, G = Cell::kGates * H;
  const int64_t DG = dims.D * G, N = sched.N();
  const bool proj = args.w_hr.defined();
  // The projection is the LSTM's, whose cell math does not read h_prev: the
  // state's gradient reaches h_prev through W_hh alone.
  TORCH_INTERNAL_ASSERT(!proj || !Cell::kReadsHPrev);
  const auto opts = args.opts();
  const SortedOrder order(sched);
  // Buffers over the N valid positions (gx_rows' order), so the weight
  // gradients are GEMMs over exactly the valid positions. Only the per-step
  // GEMMs' operands are step-sized: peak memory stays near the forward's.
  // Without a projection h_prev is gathered after each direction's step loop
  // (gather_hprev), so it does not add to the loop's peak, and in chunks of
  // positions (hprev_chunk_rows), so it adds little to the weight
  // gradients'; with one the loop copies h_state's previous value as it
  // goes. The buffers of one direction are held once per direction whose loop
  // runs at the same time.
  // The float32 rules also for bfloat16 products, but few_steps's: the
  // split-always rule is measured for the forward only.
  const StepLoops loops = step_loops(dims, args.sched.max_len, sizeof(scalar_t), false, args.bf16);
  const bool split = loops != StepLoops::kGemm;
  const bool few = few_steps(dims, sched.max_len, args.bf16);
  const int64_t held = loops == StepLoops::kConcurrent ? dims.D : 1;
  // bfloat16 products (cpu/bf16_gemm.h): the per-step dG W_hh on a bfloat16
  // copy of the step's dG; dW_ih, dW_hh and dx by ATen's bfloat16 GEMM, the
  // weights' over few positions by ours (cpu/weight_grad.h) (float32
  // accumulation, one rounding of the result, which is bfloat16 anyway) on
  // dgx and dghn kept as bfloat16 over the positions, the bias gradients
  // summed from their float32 values as the loops go (cpu/backward_bf16.h),
  // and h_prev, rounded in place. The projection's products (dh' and dW_hr)
  // stay float32, as the forward's h' W_hr^T does.
  const bool bf16 = std::is_same_v<scalar_t, float> && args.bf16;
  // When dgh = dgx and step s's positions are the consecutive rows
  // offset[s] + i, the step's GEMM reads dgx in place; otherwise the gate pass
  // fills a step buffer. Positions are numbered by time, so only the forward
  // direction's steps are consecutive.
  const bool dgx_in_place = !bf16 && !kDiffer && steps_are_contiguous(args);
  const auto opts16 = opts.dtype(at::kBFloat16);
  // dG over the positions is bfloat16 where the products are (bf16: the
  // float32 values only a row or a step at a time, cpu/backward_bf16.h).
  const auto opts_dg = bf16 ? opts16 : opts;
  const at::ScalarType dg_dtype = bf16 ? at::kBFloat16 : c10::CppTypeToScalarType<scalar_t>::value;
  // bf16: the bias sums, [D, G*H + Hn] (cpu/backward_bf16.h)
  at::Tensor sums16 =
      bf16 ? at::zeros({dims.D, G + (kDiffer ? H : 0)}, opts.dtype(at::kDouble)) : at::Tensor();
  // Where the workspace is this call's to consume (args.consume_workspace:
  // autograd frees it after this backward), dG is written over it: a row's
  // gate gradients (and the GRU's dghn) go to the columns of the saved values
  // they come from, in the same row, which the gate pass has read by then (a
  // unit's values are read before its gradients are written, and no other
  // unit's columns are touched). dgx and dghn then take no memory of their
  // own: they were the backward's largest buffers (the GRU's [N, 4H] of the
  // 4H per unit the workspace holds). A bfloat16 layer's workspace is
  // bfloat16, as its dG is.
  const bool in_ws = args.consume_workspace && !Cell::kSavedIsOutput &&
                     args.workspace.scalar_type() == dg_dtype &&
                     dims.S >= Cell::kGates + (kDiffer ? 1 : 0);
  at::Tensor dgx = in_ws  ? at::Tensor()
                   : bf16 ? dg16_rows(N, DG, opts)       // (rows padded: cpu/backward_bf16.h)
                          : empty_large({N, DG}, opts);  // [N, D*G*H]
  at::Tensor dghn =
      kDiffer && !in_ws ? empty_large({held, N, H}, opts_dg) : at::Tensor();  // [held, N, H]
  // Direction d's dG [N, G*H] and the GRU's dghn [N, H] (its k-th held
  // buffer), views with their row strides.
  auto dgx_of = [&](int64_t d) {
    return in_ws ? args.workspace[d].narrow(1, 0, G) : dgx.narrow(1, d * G, G);
  };
  auto dghn_of = [&](int64_t d, int64_t k) {
    return in_ws ? args.workspace[d].narrow(1, G, H) : dghn[k];
  };
  at::Tensor hprev = proj ? empty_large({held, N, P}, opts) : at::Tensor();  // [held, N, P]
  at::Tensor dhs = proj ? empty_large({held, N, P}, opts) : at::Tensor();   // [held, N, P] dh_state
  at::Tensor hout = proj ? empty_large({held, N, H}, opts) : at::Tensor();  // [held, N, H] h'
  // The per-step loop's step buffers (the split loop has its own). With bf16
  // the step's float gradients: dgx in dgf; the GRU's dgh in dgh, dghn in dgn.
  const bool need_dgh = !split && (bf16 ? kDiffer : !(dgx_in_place && dims.D == 1));
  at::Tensor dgh = need_dgh ? at::empty({dims.B, G}, opts) : at::Tensor();  // [B, G*H] one step
  const bool step_f = bf16 && !split;
  at::Tensor dgf = step_f ? at::empty({dims.B, G}, opts) : at::Tensor();             // [B, G*H]
  at::Tensor dgn = step_f && kDiffer ? at::empty({dims.B, H}, opts) : at::Tensor();  // [B, H]
  at::Tensor dgb = step_f ? at::empty({dims.B, G}, opts16) : at::Tensor();           // [B, G*H]
  at::Tensor dhp = proj && !split ? at::empty({dims.B, H}, opts) : at::Tensor();     // [B, H] dh'
  const OutputRows<scalar_t> go_rows(args.grad_output, std::max(H, P)), out_rows(args.output);
  const scalar_t* hx_p = args.hx.const_data_ptr<scalar_t>();
  scalar_t* dgh_p = need_dgh ? dgh.data_ptr<scalar_t>() : nullptr;
  scalar_t* dgf_p = step_f ? dgf.data_ptr<scalar_t>() : nullptr;
  scalar_t* dgn_p = dgn.defined() ? dgn.data_ptr<scalar_t>() : nullptr;
  scalar_t* dhp_p = dhp.defined() ? dhp.data_ptr<scalar_t>() : nullptr;
  at::BFloat16* dgb_p = dgb.defined() ? dgb.data_ptr<at::BFloat16>() : nullptr;
  // the k-th of the held directions' buffers, for direction d
  auto bufs_of = [&](int64_t k, int64_t d) {
    auto at_k = [k](const at::Tensor& t) {
      return t.defined() ? t[k].data_ptr<scalar_t>() : nullptr;
    };
    BackwardBuffers<scalar_t> b{};
    const at::Tensor gd = dgx_of(d);
    b.ldx = gd.stride(0);
    if (bf16) {
      b.dgx16 = gd.data_ptr<at::BFloat16>();
      b.sums = sums16[d].data_ptr<double>();
    } else {
      b.dgx = gd.data_ptr<scalar_t>();
    }
    if (kDiffer) {
      const at::Tensor gn = dghn_of(d, k);
      b.ldn = gn.stride(0);
      if (bf16) {
        b.dghn16 = gn.data_ptr<at::BFloat16>();
      } else {
        b.dghn = gn.data_ptr<scalar_t>();
      }
    }
    b.hprev = at_k(hprev);
    b.dhs = at_k(dhs);
    b.hout = at_k(hout);
    return b;
  };
  // Direction d's hidden-side weight gradients from the k-th held buffers,
  // after its loop: dW_hh = dgh^T hprev over all positions (dgh is dgx but
  // for kDiffer's last gate); dW_hr = dh_state^T h'.
  auto hidden_weight_grads = [&](int64_t d, int64_t k) {
    if (!args.want_weights) return;  // masked: nothing to form
    if (bf16) {                      // cpu/backward_bf16.h; h_prev is bfloat16 values: no rounding
      const at::Tensor hp16 = proj ? round_rows_bf16(hprev[k].data_ptr<scalar_t>(), N, P, P)
                                   : empty_large({N, P}, opts16);  // [N, P]
      if (!proj) gather_hprev<scalar_t>(args, d, hp16.data_ptr<at::BFloat16>(), 0, N);
      hidden_weight_grads_bf16<Cell>(args, d, sums16[d], dgx_of(d),
                                     kDiffer ? dghn_of(d, k) : at::Tensor(), hp16);
      if (proj) {
        at::Tensor gw_hr = args.grad_w_hr[d];
        at::mm_out(gw_hr, dhs[k].t(), hout[k]);
      }
      return;
    }
    const int64_t G_same = kDiffer ? G - H : G;
    const at::Tensor dgx_same = dgx_of(d).narrow(1, 0, G_same);        // [N, G_same]
    const at::Tensor dghn_d = kDiffer ? dghn_of(d, k) : at::Tensor();  // [N, H]
    at::Tensor gw_same = args.grad_w_hh[d].narrow(0, 0, G_same);
    at::Tensor gw_last = kDiffer ? args.grad_w_hh[d].narrow(0, G_same, H) : at::Tensor();
    if (proj) {  // the loop kept h_prev: [N, P]
      weight_grad(gw_same, dgx_same, hprev[k]);
      if (kDiffer) weight_grad(gw_last, dghn_d, hprev[k]);
    } else {
      // Without a projection h_prev is gathered now (the loop ran without
      // it), hprev_chunk_rows positions at a time, each chunk's product
      // added to the first's: its [N, P] is never whole (it was the GRU's
      // training peak's last buffer: "Memory" in benchmarks/README.md).
      // N = 0 takes one empty chunk (the product's zeros).
      const int64_t rows = hprev_chunk_rows(N, P, sizeof(scalar_t));
      at::Tensor hp = empty_large({std::min(rows, N), P}, opts);  // [rows, P]
      for (int64_t r0 = 0; r0 == 0 || r0 < N; r0 += rows) {
        const int64_t n = std::min(rows, N - r0);
        const at::Tensor hpc = hp.narrow(0, 0, n);
        gather_hprev<scalar_t>(args, d, hpc.data_ptr<scalar_t>(), r0, r0 + n);
        const at::Tensor dgc = dgx_same.narrow(0, r0, n);
        if (r0 == 0) {
          weight_grad(gw_same, dgc, hpc);
          if (kDiffer) weight_grad(gw_last, dghn_d.narrow(0, 0, n), hpc);
        } else {
          gw_same.addmm_(dgc.t(), hpc);
          if (kDiffer) gw_last.addmm_(dghn_d.narrow(0, r0, n).t(), hpc);
        }
      }
    }
    // db_ih sums every gate's dgx; db_hh is the same sums but for a GRU's
    // last gate, whose hidden side has dghn.
    at::Tensor gb_ih = args.grad_b_ih[d];
    at::sum_out(gb_ih, dgx_of(d), {0});
    args.grad_b_hh[d].narrow(0, 0, G_same).copy_(gb_ih.narrow(0, 0, G_same));
    if (kDiffer) {
      at::Tensor gb_last = args.grad_b_hh[d].narrow(0, G_same, H);
      at::sum_out(gb_last, dghn_d, {0});
    }
    if (proj) {
      at::Tensor gw_hr = args.grad_w_hr[d];
      at::mm_out(gw_hr, dhs[k].t(), hout[k]);
    }
  };

  if (loops == StepLoops::kConcurrent) {  // cpu/split_backward.h
    at::Tensor dh[2], dc[2];              // [B, P], [B, H] sorted order
    for (int64_t d = 0; d < 2; ++d) {
      dh[d] = order.gather(args.grad_h_n, d);
      if (Cell::kHasC) dc[d] = order.gather(args.grad_c_n, d);
    }
    const BackwardBuffers<scalar_t> bufs[2] = {bufs_of(0, 0), bufs_of(1, 1)};
    concurrent_backward<Cell, scalar_t>(args, bufs, dgx_in_place, dh, dc);
    for (int64_t d = 0; d < 2; ++d) {
      order.scatter(args.grad_hx, d, dh[d]);
      if (Cell::kHasC) order.scatter(args.grad_cx, d, dc[d]);
      hidden_weight_grads(d, d);
    }
  }
  // Otherwise the directions in turn, on the split loop or the per-step one.
  const int64_t in_turn = loops == StepLoops::kConcurrent ? 0 : dims.D;
  for (int64_t d = 0; d < in_turn; ++d) {
    const BackwardBuffers<scalar_t> bufs = bufs_of(0, d);
    scalar_t* hp_p = bufs.hprev;
    scalar_t* dhs_p = bufs.dhs;
    scalar_t* hout_p = bufs.hout;
    const bool dgh_in_dgx = dgx_in_place && d == 0;
    const at::Tensor dgx_d = dgh_in_dgx ? dgx_of(d) : at::Tensor();  // [N, G*H] the steps' dG
    at::Tensor dh = order.gather(args.grad_h_n, d);                  // [B, P] sorted order
    at::Tensor dc = Cell::kHasC ? order.gather(args.grad_c_n, d) : at::Tensor();  // [B, H]
    scalar_t* dh_p = dh.data_ptr<scalar_t>();
    scalar_t* dc_p = Cell::kHasC ? dc.data_ptr<scalar_t>() : nullptr;
    const Workspace<scalar_t> ws = workspace_of<scalar_t>(args, d);
    const at::Tensor w_hh_d = args.w_hh[d];  // [G*H, P]
    const PackedB16 w_hh16 =
        bf16 && !split ? pack_b16(G, P, w_hh_d.const_data_ptr<at::BFloat16>(), P, 1) : PackedB16{};
    const at::Tensor w_hr_d = proj ? args.w_hr[d] : at::Tensor();  // [P, H]
    if (split) {  // the same steps, split by units or rows (cpu/split_backward.h)
      split_backward<Cell, scalar_t>(args, d, bufs, dgh_in_dgx, dh, dc);
    }
    for (int64_t s = split ? -1 : sched.max_len - 1; s >= 0; --s) {
      const int64_t n = sched.active[s];
      if (proj) {  // dh_state = dh + grad_output; dh' = dh_state W_hr
        at::parallel_for(0, n, row_grain(P), [&](int64_t i0, int64_t i1) {
          std::vector<scalar_t> buf(go_rows.converts() ? P : 0);
          for (int64_t i = i0; i < i1; ++i) {
            const int64_t t = step_time(d, sched.len[i], s);
            const scalar_t* go = go_rows.at(output_offset(args, t, i, d), P, buf.data());
            scalar_t* dhi = dh_p + i * P;
            for (int64_t k = 0; k < P; ++k) dhi[k] += go[k];
            std::copy_n(dhi, P, dhs_p + args.gx_rows.row(t, i) * P);
          }
        });
        at::Tensor dhp_s = dhp.narrow(0, 0, n);
        at::mm_out(dhp_s, dh.narrow(0, 0, n), w_hr_d);
      }
      at::parallel_for(0, n, row_grain(H), [&](int64_t i0, int64_t i1) {
        // converted grad_output [H] and h_prev [P] of a bfloat16 layer's row
        std::vector<scalar_t> buf(go_rows.converts() || out_rows.converts() ? H + P : 0);
        for (int64_t i = i0; i < i1; ++i) {
          const int64_t t = step_time(d, sched.len[i], s);
          const int64_t pos = args.gx_rows.row(t, i);
          BackwardRow<scalar_t> row;
          row.dh = proj ? dhp_p + i * H : dh_p + i * H;
          row.go = proj ? nullptr : go_rows.at(output_offset(args, t, i, d), H, buf.data());
          row.dc = Cell::kHasC ? dc_p + i * H : nullptr;
          const bool reads_prev = Cell::kReadsHPrev || proj;
          row.prev = s == 0       ? hx_p + (d * dims.B + sched.perm[i]) * P
                     : reads_prev ? out_rows.at(output_offset(args, prev_time(d, t), i, d), P,
                                                buf.data() + H)
                                  : nullptr;
          if constexpr (Cell::kSavedIsOutput) {  // kWorkspaceSaved: no workspace columns
            out_rows.point(row, output_offset(args, t, i, d));
          } else {
            ws.point(row, pos);
          }
          row.dgx = bf16 ? dgf_p + i * G : bufs.dgx + pos * bufs.ldx;
          row.dgh = kDiffer ? dgh_p + i * G : nullptr;
          row.dghn = !kDiffer ? nullptr : bf16 ? dgn_p + i * H : bufs.dghn + pos * bufs.ldn;
          row.hout = proj ? hout_p + pos * H : nullptr;
          if (proj) std::copy_n(row.prev, P, hp_p + pos * P);
          backward_row(Cell{}, row, H);
          if (bf16) {  // the bias sums: below, per column
            keep_row_bf16<Cell::kGates, kDiffer>(
                row.dgx, row.dghn, H, H, dgb_p + i * G, bufs.dgx16 + pos * bufs.ldx,
                kDiffer ? bufs.dghn16 + pos * bufs.ldn : nullptr, nullptr);
          } else if (!kDiffer && !dgh_in_dgx) {
            std::copy_n(row.dgx, G, dgh_p + i * G);
          }
        }
      });
      if constexpr (std::is_same_v<scalar_t, float>) {
        if (bf16) {  // the step's rows added to the bias sums, then dh_prev (+)= dG W_hh
          sum_step_rows(n, dgf_p, G, dgn_p, kDiffer ? H : 0, bufs.sums);
          bf16_gemm_parallel(n, dgb_p, G, w_hh16, dh_p, P, nullptr, Cell::kReadsHPrev);
          continue;
        }
      }
      const at::Tensor dgh_s =
          dgh_in_dgx ? dgx_d.narrow(0, sched.offset[s], n) : dgh.narrow(0, 0, n);  // [n, G*H]
      at::Tensor dh_s = dh.narrow(0, 0, n);
      if constexpr (std::is_same_v<scalar_t, float>) {
        // A call of few steps at few rows: on W_hh as stored, as the
        // forward's dot products (cpu/small_gemm.h f32_rows_times).
        if (few && f32_rows_times_for(n)) {
          f32_rows_times(n, dgh_s.const_data_ptr<float>(), dgh_s.stride(0),
                         w_hh_d.const_data_ptr<float>(), G, P, dh_p, P, Cell::kReadsHPrev);
          continue;
        }
      }
      if (Cell::kReadsHPrev) {  // the gate pass left the direct part in dh
        dh_s.addmm_(dgh_s, w_hh_d);
      } else {
        at::mm_out(dh_s, dgh_s, w_hh_d);
      }
    }
    order.scatter(args.grad_hx, d, dh);
    if (Cell::kHasC) order.scatter(args.grad_cx, d, dc);
    hidden_weight_grads(d, 0);
  }
  dghn.reset();
  hprev.reset();
  dhs.reset();
  hout.reset();
  // The input side's GEMMs, a direction at a time (its dG against its rows of
  // W_ih, dx summed over the directions): the same sums whether dG is in dgx
  // or in the workspace.
  if (args.want_weights) {
    at::Tensor xp = projection_input(args);  // [N, I] (bfloat16 where bf16)
    for (int64_t d = 0; d < dims.D; ++d) weight_grad(args.grad_w_ih[d], dgx_of(d), xp);
    xp.reset();  // db_ih: hidden_weight_grads
  }
  if (!args.want_input) return;
  if (bf16) {
    at::Tensor dxp = input_grad_bf16(args, dgx_of);  // [N, I] bfloat16
    dgx.reset();
    set_grad_input(args, std::move(dxp));
    return;
  }
  at::Tensor dxp = empty_large({N, dims.I}, opts);  // [N, I]
  for (int64_t d = 0; d < dims.D; ++d) {
    const at::Tensor a = dgx_of(d);     // [N, G*H]
    const at::Tensor w = args.w_ih[d];  // [G*H, I]
    if constexpr (std::is_same_v<scalar_t, float>) {
      // Over few positions on W_ih as stored, as the steps' dh (f32_rows_times).
      if (f32_rows_times_for(N)) {
        RECORD_FUNCTION("varlen_rnn::f32_rows_times", std::vector<c10::IValue>());  // profiles
        f32_rows_times(N, a.const_data_ptr<float>(), a.stride(0), w.const_data_ptr<float>(), G,
                       dims.I, dxp.data_ptr<float>(), dims.I, d > 0);
        continue;
      }
    }
    if (d == 0) {
      at::mm_out(dxp, a, w);
    } else {
      dxp.addmm_(a, w);
    }
  }
  dgx.reset();
  set_grad_input(args, std::move(dxp));
}

}  // namespace cpu
}  // namespace varlen_rnn
