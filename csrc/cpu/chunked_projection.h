// The forward's input projection: in the split loops computed by each thread
// for its own gate columns, a chunk of steps at a time (cpu/split_steps.h),
// else one GEMM over all N positions before the steps (whole_projection; the
// choice: chunked_projection).
//
// Thread k of a split loop owns units [u0, u1) with all their gates; the gate
// pass of those units reads only gx[:, g*H + u0 .. g*H + u1) for each gate g.
// So at the first step of each chunk the thread computes gx for the chunk's
// running rows and its columns into a buffer of its own ([chunk rows, G*Hs],
// gate g of unit u0 + j at column g*Hs + j), whose result stays in that
// core's L2 until the chunk's steps read it: with bfloat16 products one
// matrix-unit GEMM on the matching rows of W_ih packed once per call (like
// its W_hh panel); in float32 where use_small_gemm() holds, the micro-kernel
// on those rows packed the same way; otherwise one single-threaded BLAS call
// per gate on those rows of W_ih in place (transposed operand: no per-call
// copy, which at B=8 T=16 H=256 cost ~10% of a float32 call). The
// [N, G*H] projection (26 MB for a bfloat16 LSTM at B=64 T=100 H=256) is then
// never written to memory and read back, nor held at the forward's peak, and
// neither is the [N, I] gathered input: the chunk's rows are read from the
// layer's input in place where they are consecutive there (time-major padded
// input at full lengths, packed input's forward direction), else gathered
// into a [chunk rows, I] buffer of the thread's (a copy of I values per row,
// small next to the row's G*Hs*I multiply-adds). Where the thread's W_ih
// panel outgrows the L2, chunk_steps lets a chunk's buffers grow to the
// panel's size (they leave the L2 then too, but stay far below [N, G*H]).
//
// A chunk's rows are its steps' running rows of the loop's row range (all
// rows, or a team's own: cpu/schedule.h RowRange) in the schedule's order:
// step s's row r0 + j is chunk row (o[s] - o[s0]) + j with o the range's
// offsets (the schedule's own for all rows, as in the buffers over
// positions), and its input is the position gx_rows.row(step_time(d, len[i],
// s), i), whichever the direction.
#pragma once

#include <ATen/ATen.h>

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <string>
#include <type_traits>
#include <vector>

#include "cpu/bf16_gemm.h"
#include "cpu/layer_args.h"
#include "cpu/small_gemm.h"
#include "cpu/team.h"  // gemm_rm, slice_of
#include "layout.h"    // step_time

namespace varlen_rnn {
namespace cpu {

// Whether a thread's panel of W_ih ([I, cols] float32 values: its units'
// gate columns) outgrows its core's L2 (l2_bytes).
inline bool panel_outgrows_l2(int64_t I, int64_t cols) {
  return I * cols * static_cast<int64_t>(sizeof(float)) > l2_bytes();
}

// The one place that decides whether the forward's split loops project in
// chunks (else one GEMM over all positions before the loop):
// VARLEN_RNN_CPU_PROJECTION=whole or =chunked forces one (read at every call,
// for tests and measurement); otherwise chunks, but for one case on Intel's
// CPUs (below). Measured on the 2-core Xeon, inference, B=64 T=100 I=H=256,
// full / uniform random lengths, min of 15-20 interleaved repeats, load
// average ~1.5 (benchmarks/bench_chunked_projection.py), chunked vs whole:
// bfloat16 (AMX) 2 threads LSTM 1.50x / 1.28x, GRU 1.52x / 1.44x; the split
// loop forced on 1 thread LSTM 1.25x / 1.16x, GRU 1.52x / 1.45x; float32 2
// threads LSTM 1.07x / 1.05x, GRU 1.00x / 0.99x, 1 thread 0.98x-1.05x (a
// tie: MKL's big GEMM is no faster than the chunks'); float32 B=8 T=16 1
// thread 0.99x-1.04x; float64 (load ~5, a guide) 1.05x-1.24x. The forward's
// peak memory falls by the [N, G*H] projection and the [N, I] gathered
// input: bfloat16 LSTM 37.3 -> 12.3 MiB (nn.LSTM 18.0), GRU 30.2 -> 11.1 MiB
// (nn.GRU 15.7); float32 LSTM 37.8 -> 9.3 MiB (nn 34.9), GRU 31.4 -> 8.7 MiB
// (nn 31.3).
// The case: float32 products on an Intel CPU where each thread's W_ih panel
// outgrows the L2 (panel_outgrows_l2, with the direction's G*H columns over
// `threads`) and the [N, G*H] projection is at most the direction's weights
// (N <= I + P: the memory it costs stays within what the layer already
// holds). There MKL's one GEMM beat the chunks (the 2-core Xeon, float32, 2
// threads, full lengths, the two forced in one process, min of 7 rotating
// rounds; ad hoc, 2026-12-02), whole vs chunked: inference LSTM I=H=1024
// B=64 T=20 1.12-1.17x, B=8 T=50 1.12x, B=1 T=200 1.04x; GRU 1.12x, 1.07x,
// 1.02x; a training step (forward and backward) LSTM and GRU at B=64 T=20
// 1.02x and 1.03x; on one thread (a panel of all G*H columns: wide from
// I=H=512) inference GRU I=H=512 B=8 T=50 1.05x, LSTM B=16 T=50 1.06x, GRU
// I=H=1024 B=8 T=50 1.11x, the LSTM's training step 1.04x. Outside it
// they tied or the chunks won (GRU I=H=768 B=32 T=50, N = 1600: 0.96x;
// LSTM I=1024 H=512 B=16 T=100, N = 1600: 1.00x), and on the Zen 3 (AMD,
// 512 KiB of L2) the chunks won at I=H=1024 B=64 T=20 (1.09x, chunk_steps).
//
// N: the positions; threads: the threads over one direction's units.
inline bool chunked_projection(const LayerDims& dims, int64_t N, bool f32_products,
                               int64_t threads) {
  if (const char* env = std::getenv("VARLEN_RNN_CPU_PROJECTION")) {
    if (std::strcmp(env, "whole") == 0) return false;
    if (std::strcmp(env, "chunked") == 0) return true;
  }
  const int64_t cols = (dims.G * dims.H + threads - 1) / std::max<int64_t>(threads, 1);
  return !(cpu_is_intel() && f32_products && panel_outgrows_l2(dims.I, cols) &&
           N <= dims.I + dims.P);
}

// [N, G*H]: direction d's input projection W_ih x (without b_ih) where it is
// not chunked, one GEMM over the valid positions xp ([N, I], bfloat16 where
// args.bf16), on W_ih^T as a view: MKL runs it as fast as on a transposed
// copy from N ~ 256 rows on, and a copy costs more than the difference below
// (I=256, G*H=768, 1 thread: the copy 150-400 us; the view's GEMM 17 vs 10 us
// at N=1, 174 vs 147 at 64, 2175 vs 2184 at 1024). G: the cell's G*H; few:
// the call has few_steps (cpu/team.h).
template <typename scalar_t>
at::Tensor whole_projection(const ForwardArgs& args, const at::Tensor& xp, int64_t d, int64_t G,
                            bool few) {
  if constexpr (std::is_same_v<scalar_t, float>) {
    if (args.bf16) {
      const at::BFloat16* w = args.w_ih[d].const_data_ptr<at::BFloat16>();  // [G*H, I]
      const int64_t I = args.dims.I, N = xp.size(0);
      at::Tensor gx = empty_large({N, G}, args.opts());
      // A call of few steps (cpu/team.h few_steps): on W_ih as stored, no
      // packing of it.
      if (few) {
        bf16_weight_product(N, xp.const_data_ptr<at::BFloat16>(), I, w, G, I, gx.data_ptr<float>(),
                            G);
        return gx;
      }
      const PackedB16 b = pack_b16(I, G, w, 1, I);  // b[i, j] = w_ih[d][j, i]
      bf16_gemm_parallel(N, xp.const_data_ptr<at::BFloat16>(), I, b, gx.data_ptr<float>(), G,
                         nullptr);
      return gx;
    }
    // float32, few steps of few rows: on W_ih as stored (f32_dots_for).
    if (few && f32_dots_for(xp.size(0))) {
      const at::Tensor a = xp.contiguous();  // [N, I]
      const int64_t I = args.dims.I, N = a.size(0);
      at::Tensor gx = at::empty({N, G}, args.opts());
      // W_ih [D, G*H, I] contiguous: direction d's, without a select of it
      f32_dot_rows(N, a.const_data_ptr<float>(), I, args.w_ih.const_data_ptr<float>() + d * G * I,
                   G, I, gx.data_ptr<float>(), G);
      return gx;
    }
  }
  at::Tensor gx = empty_large({xp.size(0), G}, args.opts());
  return at::mm_out(gx, xp, args.w_ih[d].t());  // [N, I] [I, G*H]
}

// Steps per chunk: the chunk's gx buffer of one thread (B rows a step, cols
// = G*Hs values of gx_bytes each) about kChunkBytes, which with the
// thread's W_ih and W_hh panels and its gh slice fits a 2 MB L2 (the
// bfloat16 LSTM above: 4 steps at 2 threads; 2 to 8 steps timed alike).
// In float32 (wide: scalar_t float without bfloat16 products) each chunk
// also streams the thread's W_ih panel (I x cols floats) through its core
// once: where that panel does not fit the L2 (l2_bytes), a chunk of R rows
// reads 4*I*cols bytes of weights where a whole projection writes and reads
// back 8*R*cols bytes of gx, so a chunk spans enough steps for R = I/2 rows
// while all B rows run (fewer once rows end), but its buffers (gx and the
// gathered input, R*(cols + I) floats) at most the panel's size. Measured on
// the 2-core Zen 3 (512 KiB of L2; float32 inference, 2 threads, full
// lengths, alternating runs, min of 3): LSTM I=H=1024 B=64 T=20 1.18x faster
// than with 1 step a chunk (1.09x the whole projection), B=8 T=50 1.21x than
// with 8 steps; GRU I=H=1024 B=64 1.10x, LSTM I=H=512 B=1 T=200 1.10x than
// with 32 steps; at I=H=256 B=64 (panel within the L2) the chunks of 4 steps
// stay, 1.09x faster than the whole projection. bfloat16 products (no
// bfloat16 unit on that CPU) and float64 keep the L2 rule alone.
// VARLEN_RNN_CPU_CHUNK_STEPS=n forces n (tests put chunk boundaries where
// they want them).
inline int64_t chunk_steps(int64_t B, int64_t cols, int64_t gx_bytes, int64_t I, bool wide) {
  const char* env = std::getenv("VARLEN_RNN_CPU_CHUNK_STEPS");
  if (env != nullptr && std::atoll(env) > 0) return std::atoll(env);
  constexpr int64_t kChunkBytes = 512 * 1024;
  const int64_t row_bytes = std::max<int64_t>(1, B * cols * gx_bytes);
  const int64_t steps = std::clamp<int64_t>(kChunkBytes / row_bytes, 1, 32);
  if (!wide || B == 0 || cols == 0 || !panel_outgrows_l2(I, cols)) return steps;
  const int64_t rows = std::min((I + 1) / 2, I * cols / (cols + I));
  return std::max(steps, (rows + B - 1) / B);
}

// Direction d's projection for a split loop of `parts` slices of H over the
// sorted rows `rows`. Part k's members are used only by the thread that owns
// it, from prepare on.
template <typename scalar_t>
class ChunkedProjection {
 public:
  // gates: the cell's G; bf16: bfloat16 products (scalar_t float, input2d
  // bfloat16); otherwise, in float32 where use_small_gemm() says so, the
  // micro-kernel of cpu/small_gemm.h on the thread's rows of W_ih packed once
  // per call (as its W_hh panel), else a single-threaded BLAS call per gate.
  // With the kernel every float32 product of the split forward is one chain
  // per element whatever the team (the BLAS's rounding may depend on the
  // slice); on the AMD EPYC it timed as the BLAS calls did (2 threads,
  // inference, LSTM/GRU at B=64 T=100 H=256 and B=16/32 H=512, alternating
  // builds, within the runs' spread of about 10%).
  ChunkedProjection(const ForwardArgs& args, int64_t d, int64_t gates, int64_t parts, bool bf16,
                    const RowRange& rows)
      : args_(args),
        d_(d),
        gates_(gates),
        bf16_(bf16),
        kernel_(!bf16 && std::is_same_v<scalar_t, float> && use_small_gemm()),
        rows_(rows),
        offsets_(rows.offsets(args.sched)) {
    const int64_t H = args.dims.H;
    const Schedule& sched = args.sched;
    parts_.resize(parts);
    // Active counts never grow: the first chunk has the most rows.
    int64_t widest = 0;
    for (int64_t k = 0; k < parts; ++k) {
      const auto [u0, u1] = slice_of(H, parts, k);
      widest = std::max(widest, gates * (u1 - u0));
    }
    steps_ = chunk_steps(rows.size(), widest, sizeof(scalar_t), args.dims.I,
                         std::is_same_v<scalar_t, float> && !bf16);
    max_rows_ = offsets_[std::min(steps_, sched.max_len)];
    for (int64_t k = 0; k < parts; ++k) {
      const auto [u0, u1] = slice_of(H, parts, k);
      Part& p = parts_[k];
      p.u0 = u0;
      p.cols = gates * (u1 - u0);
    }
  }

  int64_t steps() const { return steps_; }

  // Part k's packed panel and buffers, allocated by the thread that uses them.
  void prepare(int64_t k) {
    Part& p = parts_[k];
    const int64_t I = args_.dims.I;
    if (p.cols == 0) return;
    if constexpr (std::is_same_v<scalar_t, float>) {
      // b[i, g*Hs + j] = W_ih[g*H + u0 + j, i], read where it is
      const int64_t H = args_.dims.H, u1 = p.u0 + p.cols / gates_;
      const BLayout cols = unit_columns(H, I, p.u0, u1);
      const at::Tensor& w = args_.w_ih[d_];
      if (bf16_)
        p.packed16 = pack_b16(I, p.cols, w.const_data_ptr<at::BFloat16>() + p.u0 * I, cols);
      if (kernel_) p.packed = pack_b(I, p.cols, w.const_data_ptr<float>() + p.u0 * I, cols);
    }
    p.gx = at::empty({max_rows_, p.cols}, args_.opts());
    p.x = at::empty({max_rows_, I}, args_.input2d.options());
    p.rows.resize(max_rows_);
  }

  // Part k's gx for the chunk that starts at step s, if one does (a no-op at
  // the chunk's other steps).
  void step(int64_t k, int64_t s) {
    if (s % steps_ != 0) return;
    Part& p = parts_[k];
    if (p.cols == 0) return;
    const Schedule& sched = args_.sched;
    const int64_t s1 = std::min(s + steps_, sched.max_len), m = offsets_[s1] - offsets_[s];
    const int64_t* gather =
        args_.gather.defined() ? args_.gather.template const_data_ptr<int64_t>() : nullptr;
    bool consecutive = true;
    for (int64_t ss = s; ss < s1; ++ss) {
      int64_t* r = p.rows.data() + (offsets_[ss] - offsets_[s]);
      for (int64_t j = 0, n = rows_.active(sched, ss); j < n; ++j) {
        const int64_t i = rows_.r0 + j;
        const int64_t pos = args_.gx_rows.row(step_time(d_, sched.len[i], ss), i);
        r[j] = gather != nullptr ? gather[pos] : pos;
      }
    }
    for (int64_t j = 1; j < m && consecutive; ++j) consecutive = p.rows[j] == p.rows[0] + j;
    if (bf16_) {
      if constexpr (std::is_same_v<scalar_t, float>) {
        const at::BFloat16* a = input_rows<at::BFloat16>(p, m, consecutive);
        bf16_gemm(m, a, args_.dims.I, p.packed16, p.gx.template data_ptr<float>(), p.cols, false);
      }
      return;
    }
    const scalar_t* a = input_rows<scalar_t>(p, m, consecutive);
    if constexpr (std::is_same_v<scalar_t, float>) {
      if (kernel_) {
        small_gemm(m, a, args_.dims.I, p.packed, p.gx.template data_ptr<float>(), p.cols, false);
        return;
      }
    }
    const int64_t H = args_.dims.H, I = args_.dims.I, Hs = p.cols / gates_;
    const scalar_t* w = args_.w_ih.template const_data_ptr<scalar_t>() + d_ * gates_ * H * I;
    for (int64_t g = 0; g < gates_; ++g) {  // gx[:, g*Hs ..] = a W_ih[g*H + u0 .., :]^T
      gemm_rm(m, Hs, I, a, I, w + (g * H + p.u0) * I, I,
              p.gx.template data_ptr<scalar_t>() + g * Hs, p.cols, scalar_t(0), true);
    }
  }

  // Part k's gx row of step s's running row i ([G*Hs], gate stride Hs; i in
  // the range), in the chunk step(k, s) (or an earlier step of its chunk)
  // computed.
  const scalar_t* gx(int64_t k, int64_t s, int64_t i) const {
    const int64_t row = offsets_[s] - offsets_[s - s % steps_] + (i - rows_.r0);
    return parts_[k].gx.template const_data_ptr<scalar_t>() + row * parts_[k].cols;
  }

 private:
  struct Part {
    int64_t u0 = 0, cols = 0;  // first unit, G*Hs
    PackedB16 packed16;
    PackedB packed;
    at::Tensor gx;              // [max rows, G*Hs] this chunk's projection
    at::Tensor x;               // [max rows, I] this chunk's input, where gathered
    std::vector<int64_t> rows;  // [max rows] input2d row of each chunk row
  };

  // [m, I] the chunk's input rows: in place, or gathered into p.x.
  template <typename in_t>
  const in_t* input_rows(Part& p, int64_t m, bool consecutive) const {
    const int64_t I = args_.dims.I;
    const in_t* in = args_.input2d.template const_data_ptr<in_t>();
    if (consecutive) return in + (m > 0 ? p.rows[0] * I : 0);
    in_t* x = p.x.template data_ptr<in_t>();
    for (int64_t j = 0; j < m; ++j) std::memcpy(x + j * I, in + p.rows[j] * I, I * sizeof(in_t));
    return x;
  }

  const ForwardArgs& args_;
  const int64_t d_, gates_;
  const bool bf16_, kernel_;
  const RowRange rows_;
  const std::vector<int64_t> offsets_;  // [max_len + 1] rows_.offsets
  int64_t steps_ = 1, max_rows_ = 0;
  std::vector<Part> parts_;
};

}  // namespace cpu
}  // namespace varlen_rnn
