// The Elman RNN cell (torch.nn.RNN), one gate:
//   h' = act(gx + gh),  act = tanh (nonlinearity='tanh') or relu ('relu')
// Saved h' itself: act'(.) is 1 - h'^2 for tanh and [h' > 0] for relu. The
// policy's contract: cells/cell.h.
#pragma once

#include "cells/cell.h"

namespace varlen_rnn {

template <bool kRelu>
struct RnnCell {
  static constexpr int kGates = 1;
  static constexpr int kSaved = 1;
  static constexpr bool kSavedIsOutput = true;  // h' (no projection)
  static constexpr bool kHasC = false;
  static constexpr bool kHiddenGradsDiffer = false;
  static constexpr bool kReadsHPrev = false;

  template <typename T, typename Math = PreciseMath>
  static VR_HOST_DEVICE void forward(const T (&gx)[1], const T (&gh)[1],
                                     const CellState<T>& /*prev*/, CellState<T>& next,
                                     T (&saved)[1]) {
    const T a = gx[0] + gh[0];
    if constexpr (kRelu) {
      // As torch.relu: a NaN stays NaN (and -0 stays -0).
      next.h = a < T(0) ? T(0) : a;
    } else {
      next.h = Math::tanh(a);
    }
    saved[0] = next.h;
  }

  template <typename T, typename Math = PreciseMath>
  static VR_HOST_DEVICE void backward(const CellState<T>& grad, T /*h_prev*/, const T (&saved)[1],
                                      T (&dgx)[1], T (&dgh)[1], CellState<T>& grad_prev) {
    const T h = saved[0];
    if constexpr (kRelu) {
      // As relu's backward (threshold_backward): 0 where h <= 0, else the
      // gradient (a NaN h passes it on).
      dgx[0] = h <= T(0) ? T(0) : grad.h;
    } else {
      dgx[0] = grad.h * (T(1) - h * h);
    }
    dgh[0] = dgx[0];
    grad_prev.h = T(0);
  }
};

using RnnTanhCell = RnnCell<false>;
using RnnReluCell = RnnCell<true>;

}  // namespace varlen_rnn
