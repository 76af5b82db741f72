// A bfloat16 layer's gate gradients over positions and the weight and input
// gradients formed from them (args.bf16; cpu/recurrence.h's backward_impl).
//
// The step loops (the per-step one in cpu/recurrence.h, the split ones in
// cpu/split_backward.h) keep each row's float32 gate gradients only while
// they handle that row: keep_row_bf16 rounds them into Bf16GateGrads'
// bfloat16 rows over the positions, which the products after the loops read,
// and the bias gradients are sums of the float32 values taken as the loops
// go (in float64, in a fixed order; below). So the buffers over positions
// are half the bytes of float32 ones (B=64 T=100 H=256: the GRU's dG and dn*r
// 25.0 -> 12.5 MiB), and the values the products read are the same
// roundings as before (one rounding of each float32 value to nearest even).
//
// The products: ATen's bfloat16 GEMM (oneDNN, on the matrix unit where there
// is one: float32 accumulation, one rounding of the result) on bfloat16
// operands, and over few positions our own (cpu/weight_grad.h). The weight
// gradients are written in bfloat16 where they are returned (their tensors
// are bfloat16, cpu/layer_ops.h), so that rounding is the one they get
// anyway; h_prev and the input are bfloat16 values already.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <utility>

#include "cpu/bf16_gemm.h"
#include "cpu/large_tensors.h"
#include "cpu/layer_args.h"
#include "cpu/weight_grad.h"

namespace varlen_rnn {
namespace cpu {

// The gate gradients of every direction over the N positions (gx_rows'
// order), as bfloat16, and their float32 values' sums.
//
// ATen's bfloat16 GEMM (oneDNN's AMX matmul in torch 2.14.1; oneDNN issue
// 5717) reads up to 31 values past a row's K = D*G where K > 32 is not a
// multiple of 32, and multiplies them by zeros: values there that decode to
// NaN or inf made whole rows of dx NaN (found by tests/test_cpu_fuzz.py on a
// Xeon with AMX: a bfloat16 LSTM at H=129 with a projection), and a
// position's NaN gradient would reach its neighbour's dx. So each row of dgx
// is padded with zeros to a multiple of 32 values, and 32 more follow the
// last row: every row's dx is its own.
struct Bf16GateGrads {
  at::Tensor dgx;   // [N, D*G*H] bfloat16 (row stride ld): the input-side dG
  at::Tensor dghn;  // [held, N, H] bfloat16: the GRU's hidden-side n gradient dn*r, else undefined
  at::Tensor sums;  // [D, G*H + Hn] float64: db_ih's sums, then (GRU, Hn = H) dghn's
  int64_t ld = 0;

  Bf16GateGrads(int64_t N, int64_t D, int64_t G, int64_t H, int64_t held, bool differ,
                const at::TensorOptions& opts) {
    const int64_t DG = D * G;
    ld = DG > 32 && DG % 32 != 0 ? (DG + 31) / 32 * 32 : DG;
    const auto opts16 = opts.dtype(at::kBFloat16);
    at::Tensor flat = empty_large({N * ld + 32}, opts16);
    auto* p = flat.data_ptr<at::BFloat16>();
    if (ld > DG) {
      at::parallel_for(0, N, 4096, [&](int64_t r0, int64_t r1) {
        for (int64_t r = r0; r < r1; ++r) std::fill(p + r * ld + DG, p + (r + 1) * ld, 0.0f);
      });
    }
    std::fill_n(p + N * ld, 32, at::BFloat16(0.0f));
    dgx = flat.as_strided({N, DG}, {ld, 1});
    if (differ) dghn = empty_large({held, N, H}, opts16);
    sums = at::zeros({D, G + (differ ? H : 0)}, opts.dtype(at::kDouble));
  }
};

// One row's gate gradients of `units` units (gate stride H; every pointer at
// the first of them), each value rounded to bfloat16 once: the hidden-side
// dG (dgx, but the GRU's last gate dghn) into dgb, the step's product
// operand, and copied from there into dgx16 (and dghn16) over positions; the
// GRU's input-side last gate rounded into dgx16 apart. Their float values
// added to sums (db_ih's, then dghn's at G*H) unless sums is null (the
// per-step loop sums a step's rows apart).
template <int kGates, bool kDiffer, typename T>
inline void keep_row_bf16(const T* dgx, const T* dghn, int64_t units, int64_t H, at::BFloat16* dgb,
                          at::BFloat16* dgx16, at::BFloat16* dghn16, double* sums) {
  for (int64_t g = 0; g < kGates; ++g) {
    const bool apart = kDiffer && g == kGates - 1;  // dgh differs from dgx here
    round_bf16(apart ? dghn : dgx + g * H, units, dgb + g * H);
    if (apart) {
      std::copy_n(dgb + g * H, units, dghn16);
      round_bf16(dgx + g * H, units, dgx16 + g * H);
    } else {
      std::copy_n(dgb + g * H, units, dgx16 + g * H);
    }
    if (sums == nullptr) continue;
    for (int64_t k = 0; k < units; ++k) sums[g * H + k] += dgx[g * H + k];
    if (apart) {
      for (int64_t k = 0; k < units; ++k) sums[kGates * H + k] += dghn[k];
    }
  }
}

// The per-step loop's bias sums, after a step's gate pass: sums[c] += a[i, c]
// over the step's rows i < n in order (a [n, ga]), then sums[ga + c] +=
// b[i, c] (b [n, gb], gb = 0 without one). Each column is one thread's, in
// the order the split loops sum theirs.
template <typename T>
inline void sum_step_rows(int64_t n, const T* a, int64_t ga, const T* b, int64_t gb, double* sums) {
  at::parallel_for(0, ga + gb, 1024, [&](int64_t c0, int64_t c1) {
    const int64_t a1 = std::min(c1, ga), b0 = std::max(c0, ga);
    for (int64_t i = 0; i < n; ++i) {
      for (int64_t c = c0; c < a1; ++c) sums[c] += a[i * ga + c];
      for (int64_t c = b0; c < c1; ++c) sums[c] += b[i * gb + c - ga];
    }
  });
}

// Direction d's hidden-side gradients after its step loop: db_ih, db_hh from
// the sums, then dW_hh = dG^T h_prev in bfloat16. dghn: [N, H] the GRU's
// hidden-side n gradients, else undefined; hp16: [N, P] bfloat16 h_prev.
template <typename Cell>
void hidden_weight_grads_bf16(BackwardArgs& args, int64_t d, const Bf16GateGrads& g16,
                              const at::Tensor& dghn, const at::Tensor& hp16) {
  constexpr bool kDiffer = Cell::kHiddenGradsDiffer;
  const int64_t H = args.dims.H, G = Cell::kGates * H;
  const int64_t G_same = kDiffer ? G - H : G;  // the gates whose dgh is dgx
  const at::Tensor sums = g16.sums[d];         // [G + Hn]
  at::Tensor gb_ih = args.grad_b_ih[d];        // db_hh: the same sums but dghn's gate
  gb_ih.copy_(sums.narrow(0, 0, G));
  args.grad_b_hh[d].narrow(0, 0, G_same).copy_(gb_ih.narrow(0, 0, G_same));
  const at::Tensor dg16 = g16.dgx.narrow(1, d * G, G_same);  // [N, G_same]
  weight_grad(args.grad_w_hh[d].narrow(0, 0, G_same), dg16, hp16);
  if (kDiffer) {
    args.grad_b_hh[d].narrow(0, G_same, H).copy_(sums.narrow(0, G, H));
    weight_grad(args.grad_w_hh[d].narrow(0, G_same, H), dghn, hp16);
  }
}

// After every direction's step loop: dW_ih = dgx^T x and grad_input (dx =
// dgx W_ih, zero at padding), both bfloat16, each where args wants it. dgx
// is released here, before grad_input's layout is formed (peak memory).
inline void input_grads_bf16(BackwardArgs& args, Bf16GateGrads& g16) {
  const int64_t N = g16.dgx.size(0), DG = g16.dgx.size(1), I = args.dims.I;
  if (args.want_weights) {
    at::Tensor xp = projection_input(args);  // [N, I] bfloat16
    weight_grad(args.grad_w_ih.view({DG, I}), g16.dgx, xp);
  }
  if (!args.want_input) return;
  at::Tensor dxp = empty_large({N, I}, g16.dgx.options());  // [N, I]
  at::mm_out(dxp, g16.dgx, args.w_ih.reshape({DG, I}));
  g16.dgx.reset();
  set_grad_input(args, std::move(dxp));
}

}  // namespace cpu
}  // namespace varlen_rnn
