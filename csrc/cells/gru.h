// The GRU cell (torch.nn.GRU), gate order r|z|n. With gx = W_ih x + b_ih and
// gh = W_hh h + b_hh:
//   r  = sigmoid(gx_r + gh_r)
//   z  = sigmoid(gx_z + gh_z)
//   n  = tanh(gx_n + r * gh_n)
//   h' = (1 - z) * n + z * h   computed as n + z * (h - n), as ATen does
// Saved r | z | n | gh_n: with h_prev, all the backward needs. The policy's
// contract: cells/cell.h.
#pragma once

#include "cells/cell.h"

namespace varlen_rnn {

struct GruCell {
  static constexpr int kGates = 3;
  static constexpr int kSaved = 4;
  static constexpr bool kSavedIsOutput = false;
  static constexpr bool kHasC = false;
  static constexpr bool kHiddenGradsDiffer = true;  // hidden-side n: dn * r
  static constexpr bool kReadsHPrev = true;

  template <typename T, typename Math = PreciseMath>
  static VR_HOST_DEVICE void forward(const T (&gx)[3], const T (&gh)[3], const CellState<T>& prev,
                                     CellState<T>& next, T (&saved)[4]) {
    const T r = sigmoid<T, Math>(gx[0] + gh[0]);
    const T z = sigmoid<T, Math>(gx[1] + gh[1]);
    const T n = Math::tanh(gx[2] + r * gh[2]);
    saved[0] = r;
    saved[1] = z;
    saved[2] = n;
    saved[3] = gh[2];
    next.h = n + z * (prev.h - n);
  }

  template <typename T, typename Math = PreciseMath>
  static VR_HOST_DEVICE void backward(const CellState<T>& grad, T h_prev, const T (&saved)[4],
                                      T (&dgx)[3], T (&dgh)[3], CellState<T>& grad_prev) {
    const T r = saved[0], z = saved[1], n = saved[2], ghn = saved[3];
    const T dh = grad.h;
    const T dn = dh * (T(1) - z) * (T(1) - n * n);
    const T dz = dh * (h_prev - n) * z * (T(1) - z);
    const T dr = dn * ghn * r * (T(1) - r);
    dgx[0] = dgh[0] = dr;
    dgx[1] = dgh[1] = dz;
    dgx[2] = dn;
    dgh[2] = dn * r;
    grad_prev.h = dh * z;
  }
};

}  // namespace varlen_rnn
