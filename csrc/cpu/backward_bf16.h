// The weight and input gradients of a bfloat16 layer's backward
// (args.bf16; cpu/recurrence.h's backward_impl calls these after the step
// loops): ATen's bfloat16 GEMM (oneDNN, on the matrix unit where there is
// one: float32 accumulation, one rounding of the result) on bfloat16
// operands, and over few positions our own (cpu/weight_grad.h). The weight
// gradients are written in bfloat16 where they are returned (their tensors
// are bfloat16, cpu/layer_ops.h), so that rounding is the one they get
// anyway; the operands dgx and dghn are rounded once (dG is, by
// the same rounding, the step loops' product operand), h_prev and the input
// are bfloat16 values already. The bias gradients sum the float32 values.
//
// dgx and dghn are rounded in place (round_rows_bf16): each row's bfloat16
// values in the first half of its own bytes, so no buffer over positions is
// added; the float32 values are gone afterwards, so each direction's are
// rounded after its bias sums, and once its step loop is over.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <cstdint>
#include <cstring>
#include <utility>

#include "cpu/bf16_gemm.h"
#include "cpu/layer_args.h"
#include "cpu/weight_grad.h"

namespace varlen_rnn {
namespace cpu {

// Direction d's hidden-side gradients after its step loop: db_ih, db_hh from
// the float32 values, then dW_hh = dG^T h_prev in bfloat16. dgx: [N, D*G*H]
// float32 (direction d's columns are rounded here); dghn: [N, H] float32 the
// GRU's hidden-side n gradient (rounded here), else undefined; hp16: [N, P]
// bfloat16 h_prev.
template <typename Cell>
void hidden_weight_grads_bf16(BackwardArgs& args, int64_t d, const at::Tensor& dgx,
                              const at::Tensor& dghn, const at::Tensor& hp16) {
  constexpr bool kDiffer = Cell::kHiddenGradsDiffer;
  const int64_t H = args.dims.H, G = Cell::kGates * H, DG = args.dims.D * G, N = dgx.size(0);
  const int64_t G_same = kDiffer ? G - H : G;  // the gates whose dgh is dgx
  at::Tensor gb_ih = args.grad_b_ih[d];        // db_hh: the same sums but dghn's gate
  at::sum_out(gb_ih, dgx.narrow(1, d * G, G), {0});
  args.grad_b_hh[d].narrow(0, 0, G_same).copy_(gb_ih.narrow(0, 0, G_same));
  const at::Tensor dg16 = round_rows_bf16(dgx.data_ptr<float>() + d * G, N, G, DG);  // [N, G*H]
  weight_grad(args.grad_w_hh[d].narrow(0, 0, G_same), dg16.narrow(1, 0, G_same), hp16);
  if (kDiffer) {
    at::Tensor gb_last = args.grad_b_hh[d].narrow(0, G_same, H);
    at::sum_out(gb_last, dghn, {0});
    const at::Tensor dn16 = round_rows_bf16(dghn.data_ptr<float>(), N, H, H);  // [N, H]
    weight_grad(args.grad_w_hh[d].narrow(0, G_same, H), dn16, hp16);
  }
}

// After every direction's hidden_weight_grads_bf16: dW_ih = dgx^T x and
// grad_input (dx = dgx W_ih, zero at padding), both bfloat16, each where
// args wants it. dgx: [N, D*G*H] as hidden_weight_grads_bf16 left it (or,
// with the weights masked, rounded alike); released here (before grad_input
// is allocated: peak memory).
inline void input_grads_bf16(BackwardArgs& args, at::Tensor& dgx, int64_t G) {
  const LayerDims& dims = args.dims;
  if (!args.want_weights && !args.want_input) return;
  const int64_t DG = dims.D * G, N = dgx.size(0), I = dims.I;
  // Direction d's bfloat16 values start at bfloat16 column 2*d*G of a row:
  // moved to d*G, the rows are one [N, D*G] matrix (row stride 2*D*G), and the
  // rest of each row, [D*G, 2*D*G), is zeroed. ATen's bfloat16 GEMM (oneDNN's
  // AMX matmul in torch 2.14.1; oneDNN issue 5717) reads up to 31 values past
  // a row's K = D*G where K > 32 is not a multiple of 32, and multiplies them
  // by zeros: the rounded-over float32 bits left there made whole rows of dx
  // NaN where they decoded to NaN or inf (found by tests/test_cpu_fuzz.py on
  // a Xeon with AMX: a bfloat16 LSTM at H=129 with a projection), and with
  // the rows contiguous a position's NaN reached its neighbour's dx. Zeros
  // past each row keep every row's dx its own.
  auto* base = reinterpret_cast<at::BFloat16*>(dgx.data_ptr<float>());
  at::parallel_for(0, N, 256, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      at::BFloat16* row = base + r * 2 * DG;
      if (dims.D == 2) std::memcpy(row + G, row + 2 * G, G * sizeof(at::BFloat16));
      std::fill_n(row + DG, DG, at::BFloat16(0.0f));
    }
  });
  const at::Tensor dg16 =
      at::from_blob(base, {N, DG}, {2 * DG, 1}, dgx.options().dtype(at::kBFloat16));
  if (args.want_weights) {
    at::Tensor xp = projection_input(args);  // [N, I] bfloat16
    weight_grad(args.grad_w_ih.view({DG, I}), dg16, xp);
  }
  if (!args.want_input) return;
  at::Tensor dxp = empty_large({N, I}, dg16.options());  // [N, I] bfloat16
  at::mm_out(dxp, dg16, args.w_ih.reshape({DG, I}));
  dgx.reset();
  set_grad_input(args, std::move(dxp));
}

}  // namespace cpu
}  // namespace varlen_rnn
