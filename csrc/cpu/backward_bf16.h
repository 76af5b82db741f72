// A bfloat16 layer's gate gradients over positions and the weight and input
// gradients formed from them (args.bf16; cpu/recurrence.h's backward_impl).
//
// The step loops (the per-step one in cpu/recurrence.h, the split ones in
// cpu/split_backward.h) keep each row's float32 gate gradients only while
// they handle that row: keep_row_bf16 rounds them into bfloat16 rows over the
// positions (backward_impl's dgx and dghn, bfloat16 here, or, where the
// backward may consume it, the workspace, which is bfloat16 too: each row's
// dG over the saved values it was computed from), which the products after
// the loops read, and the bias gradients are sums of the float32 values taken
// as the loops go (in float64, in a fixed order; below). So the buffers over
// positions are half the bytes of float32 ones (B=64 T=100 H=256: the GRU's
// dG and dn*r 25.0 -> 12.5 MiB), or none, and the values the products read
// are the same roundings either way (one rounding of each float32 value to
// nearest even).
//
// The products, a direction at a time, on bfloat16 operands with float32
// accumulation and one rounding of the result: the weight gradients dG^T x
// and dG^T h_prev by ATen's bfloat16 GEMM (oneDNN, on the matrix unit where
// there is one), over few positions by our own (cpu/weight_grad.h); the
// input gradient dx = sum over d of dG_d W_ih[d] by ATen's or by ours
// (below). The weight gradients are written in bfloat16 where they are
// returned (their tensors are bfloat16, cpu/layer_ops.h), so that rounding is
// the one they get anyway; h_prev and the input are bfloat16 values already.
//
// dx and oneDNN: its AMX matmul in torch 2.14.1 (oneDNN issue 5717) reads the
// values past each row of its left operand up to the next multiple of 32
// where that row's K (here G*H) is over 32 and not a multiple of 32
// (onednn_reach; no further: with NaN from there on and other values before
// it, 1416 products, K 34-1542 and N 1-3000 rows, came out finite and right),
// and multiplies them by zeros: values there that decode to
// NaN or inf made whole rows of dx NaN (found by tests/test_cpu_fuzz.py on a
// Xeon with AMX: a bfloat16 LSTM at H=129 with a projection), and handed
// contiguous rows, a position's NaN gradient reached its neighbour's dx. So
// dx takes ATen's product (one direction) only on rows whose columns up to
// onednn_reach are their own position's: dG's own buffer pads each row with
// zeros (dg16_rows), and a workspace row holds, after dG, the same
// position's dn*r (GRU) or c (LSTM), finite wherever its dG is. Otherwise
// (two directions: one rounding of both directions' sum, which two ATen
// products in bfloat16 would not give; or a workspace row too short) dx is
// our product, which reads no row past K (cpu/bf16_gemm.h
// bf16_gemm_sum_rounded; tests/test_cpu_bf16.py puts NaN there). dG^T, the
// weight gradients' left operand, is dG's memory transposed: there NaN after
// each row's G*H values leaves oneDNN's product finite (checked with torch
// 2.14.1 on the Xeon, K = N from 64 to 1000 positions, G*H from 54 to 768).
// Measured there (2 threads, [3200, 768] x [768, 256]): ATen's product 3.5
// ms, ours 5.6 ms, hence ATen's where it is safe.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <vector>

#include "cpu/bf16_gemm.h"
#include "cpu/large_tensors.h"
#include "cpu/layer_args.h"
#include "cpu/weight_grad.h"

namespace varlen_rnn {
namespace cpu {

// The columns of a row of K bfloat16 values oneDNN's matmul reads as its left
// operand (above): K, or K rounded up to a multiple of 32 where K > 32.
inline int64_t onednn_reach(int64_t K) { return K > 32 ? (K + 31) / 32 * 32 : K; }

// A bfloat16 dG over positions in a buffer of its own: [N, K] with each row
// padded by zeros to onednn_reach(K) (the row stride).
inline at::Tensor dg16_rows(int64_t N, int64_t K, const at::TensorOptions& opts) {
  const int64_t ld = onednn_reach(K);
  at::Tensor rows = empty_large({N, ld}, opts.dtype(at::kBFloat16));
  if (ld > K) rows.narrow(1, K, ld - K).zero_();
  return rows.narrow(1, 0, K);
}

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
// the sums, then dW_hh = dG^T h_prev in bfloat16. sums: [G*H + Hn] its bias
// sums; dg16: [N, G*H] its dG; dghn: [N, H] the GRU's hidden-side n
// gradients, else undefined (both bfloat16, rows strided: their own buffers'
// or the workspace's); hp16: [N, P] bfloat16 h_prev.
template <typename Cell>
void hidden_weight_grads_bf16(BackwardArgs& args, int64_t d, const at::Tensor& sums,
                              const at::Tensor& dg16, const at::Tensor& dghn,
                              const at::Tensor& hp16) {
  constexpr bool kDiffer = Cell::kHiddenGradsDiffer;
  const int64_t H = args.dims.H, G = Cell::kGates * H;
  const int64_t G_same = kDiffer ? G - H : G;  // the gates whose dgh is dgx
  at::Tensor gb_ih = args.grad_b_ih[d];        // db_hh: the same sums but dghn's gate
  gb_ih.copy_(sums.narrow(0, 0, G));
  args.grad_b_hh[d].narrow(0, 0, G_same).copy_(gb_ih.narrow(0, 0, G_same));
  weight_grad(args.grad_w_hh[d].narrow(0, 0, G_same), dg16.narrow(1, 0, G_same), hp16);
  if (kDiffer) {
    args.grad_b_hh[d].narrow(0, G_same, H).copy_(sums.narrow(0, G, H));
    weight_grad(args.grad_w_hh[d].narrow(0, G_same, H), dghn, hp16);
  }
}

// The input gradient over positions, dx = sum over directions d of dG_d
// W_ih[d] ([N, I] bfloat16, zero rows nowhere: set_grad_input places them),
// each dG_d = dg_of(d) ([N, G*H] bfloat16, rows strided: dg16_rows' or the
// workspace's) read in place, float32 sums rounded once: ATen's product for
// one direction whose rows oneDNN may read to its reach, else ours
// (cpu/bf16_gemm.h bf16_gemm_sum_rounded).
template <typename DgOf>
at::Tensor input_grad_bf16(const BackwardArgs& args, const DgOf& dg_of) {
  const int64_t D = args.dims.D, I = args.dims.I;
  if (D == 1) {
    const at::Tensor dg = dg_of(0);  // [N, G*H]
    if (onednn_reach(dg.size(1)) <= dg.stride(0)) {
      at::Tensor dxp = empty_large({dg.size(0), I}, dg.options());  // [N, I]
      at::mm_out(dxp, dg, args.w_ih[0]);
      return dxp;
    }
  }
  std::vector<at::Tensor> dg(D);
  std::vector<PackedB16> w(D);
  std::vector<Bf16Term> terms;
  for (int64_t d = 0; d < D; ++d) {
    dg[d] = dg_of(d);
    const at::Tensor w_d = args.w_ih[d];  // [G*H, I] bfloat16: b[k, j] = W_ih[d][k, j]
    w[d] = pack_b16(w_d.size(0), I, w_d.const_data_ptr<at::BFloat16>(), I, 1);
  }
  for (int64_t d = 0; d < D; ++d) {
    terms.push_back({dg[d].const_data_ptr<at::BFloat16>(), dg[d].stride(0), &w[d]});
  }
  const int64_t N = dg[0].size(0);
  at::Tensor dxp = empty_large({N, I}, dg[0].options());  // [N, I]
  bf16_gemm_sum_rounded(N, terms, dxp.data_ptr<at::BFloat16>(), I);
  return dxp;
}

}  // namespace cpu
}  // namespace varlen_rnn
