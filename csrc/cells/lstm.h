// The LSTM cell (torch.nn.LSTM), gate order i|f|g|o. With gx = W_ih x + b_ih
// and gh = W_hh h + b_hh:
//   i = sigmoid(gx_i + gh_i)   f = sigmoid(gx_f + gh_f)
//   g = tanh(gx_g + gh_g)      o = sigmoid(gx_o + gh_o)
//   c' = f * c + i * g
//   h' = o * tanh(c')
// With proj_size > 0 the recurrence (not the cell) maps h' to the state and
// output W_hr h' ([P] per row); the cell sees only its own h' and c.
// Saved i | f | g | o | c (the previous c): five values, and the backward
// needs no other state (the previous c is saved rather than read from the
// previous step's row, so a backward step reads one workspace row). tanh(c')
// is recomputed there from the same c' (next_c: the forward's expression, so
// the same bits where it is compiled alike) rather than saved: a sixth value
// per unit would make the LSTM's workspace a fifth larger (training memory),
// for one tanh per unit in a backward whose time is its GEMMs'. The policy's
// contract: cells/cell.h.
#pragma once

#include "cells/cell.h"

namespace varlen_rnn {

struct LstmCell {
  static constexpr int kGates = 4;
  static constexpr int kSaved = 5;
  static constexpr bool kSavedIsOutput = false;
  static constexpr bool kHasC = true;
  static constexpr bool kHiddenGradsDiffer = false;
  static constexpr bool kReadsHPrev = false;

  // c' = f * c + i * g: the forward's and the backward's recomputation are
  // this one expression.
  template <typename T>
  static VR_HOST_DEVICE T next_c(T i, T f, T g, T c) {
    return f * c + i * g;
  }

  template <typename T, typename Math = PreciseMath>
  static VR_HOST_DEVICE void forward(const T (&gx)[4], const T (&gh)[4], const CellState<T>& prev,
                                     CellState<T>& next, T (&saved)[5]) {
    const T i = sigmoid<T, Math>(gx[0] + gh[0]);
    const T f = sigmoid<T, Math>(gx[1] + gh[1]);
    const T g = Math::tanh(gx[2] + gh[2]);
    const T o = sigmoid<T, Math>(gx[3] + gh[3]);
    next.c = next_c(i, f, g, prev.c);
    next.h = o * Math::tanh(next.c);
    saved[0] = i;
    saved[1] = f;
    saved[2] = g;
    saved[3] = o;
    saved[4] = prev.c;
  }

  // h' = o * tanh(c') again, from the saved values: the projection's backward
  // needs it at every position (dW_hr = sum dh_state^T h'), and recomputing
  // it costs less than saving it.
  template <typename T, typename Math = PreciseMath>
  static VR_HOST_DEVICE T output_from_saved(const T (&saved)[5]) {
    return saved[3] * Math::tanh(next_c(saved[0], saved[1], saved[2], saved[4]));
  }

  template <typename T, typename Math = PreciseMath>
  static VR_HOST_DEVICE void backward(const CellState<T>& grad, T /*h_prev*/, const T (&saved)[5],
                                      T (&dgx)[4], T (&dgh)[4], CellState<T>& grad_prev) {
    const T i = saved[0], f = saved[1], g = saved[2], o = saved[3], c = saved[4];
    const T tc = Math::tanh(next_c(i, f, g, c));
    const T dc = grad.c + grad.h * o * (T(1) - tc * tc);
    dgx[0] = dgh[0] = dc * g * i * (T(1) - i);
    dgx[1] = dgh[1] = dc * c * f * (T(1) - f);
    dgx[2] = dgh[2] = dc * i * (T(1) - g * g);
    dgx[3] = dgh[3] = grad.h * tc * o * (T(1) - o);
    grad_prev.h = T(0);
    grad_prev.c = dc * f;
  }
};

}  // namespace varlen_rnn
