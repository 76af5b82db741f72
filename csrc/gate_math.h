// The GRU cell math, written once for the CPU and CUDA kernels.
//
// Gate order r|z|n as torch.nn.GRU. With gx = W_ih x + b_ih and
// gh = W_hh h + b_hh (each split into r|z|n thirds):
//   r  = sigmoid(gx_r + gh_r)
//   z  = sigmoid(gx_z + gh_z)
//   n  = tanh(gx_n + r * gh_n)
//   h' = (1 - z) * n + z * h   computed as n + z * (h - n), as ATen does
// The forward keeps (r, z, n, gh_n) per row and step: exactly what the
// backward needs besides h, so nothing is recomputed.
#pragma once

#include "cells/cell.h"  // VR_HOST_DEVICE, PreciseMath, sigmoid

namespace varlen_rnn {

// What the forward of one cell element saves for the backward.
template <typename T>
struct GruCellSaved {
  T r, z, n, hn;  // hn = gh_n, the hidden-side n pre-activation incl. b_hn
};

template <typename T, typename Math = PreciseMath>
VR_HOST_DEVICE T gru_cell_forward(T gx_r, T gx_z, T gx_n, T gh_r, T gh_z, T gh_n, T h_prev,
                                  GruCellSaved<T>& s) {
  s.r = sigmoid<T, Math>(gx_r + gh_r);
  s.z = sigmoid<T, Math>(gx_z + gh_z);
  s.hn = gh_n;
  s.n = Math::tanh(gx_n + s.r * gh_n);
  return s.n + s.z * (h_prev - s.n);
}

// Gradients of one cell element. dh is the total gradient reaching h'.
// Outputs the pre-activation gradients: d_gx = (dr, dz, dn) for the input
// side, d_gh_n = dn * r for the hidden side (its r and z parts equal dr, dz),
// and the direct part of dh_prev (the W_hh^T part is a GEMM).
template <typename T>
struct GruCellGrad {
  T dr, dz, dn, dhn, dh_prev;
};

template <typename T>
VR_HOST_DEVICE GruCellGrad<T> gru_cell_backward(T dh, T h_prev, const GruCellSaved<T>& s) {
  GruCellGrad<T> g;
  const T dn_act = dh * (T(1) - s.z);
  const T dz_act = dh * (h_prev - s.n);
  g.dn = dn_act * (T(1) - s.n * s.n);
  g.dz = dz_act * s.z * (T(1) - s.z);
  g.dhn = g.dn * s.r;
  const T dr_act = g.dn * s.hn;
  g.dr = dr_act * s.r * (T(1) - s.r);
  g.dh_prev = dh * s.z;
  return g;
}

// ---- The saved-gate layout and step order, shared by every backend ---------
//
// A workspace row holds 4H op-math values r | z | n | gh_n for one (d, t, b);
// feature j of gate g sits at [g*H + j]. The gate gradients go to two rows:
// dgx [3H] (input side: dr | dz | dn) and dgh [3H] (hidden side, the operand
// of the W_hh^T GEMM: dr | dz | dn*r).

template <typename T, typename Idx>
VR_HOST_DEVICE void store_saved(T* ws_row, Idx j, Idx H, const GruCellSaved<T>& s) {
  ws_row[j] = s.r;
  ws_row[H + j] = s.z;
  ws_row[2 * H + j] = s.n;
  ws_row[3 * H + j] = s.hn;
}

template <typename T, typename Idx>
VR_HOST_DEVICE GruCellSaved<T> load_saved(const T* ws_row, Idx j, Idx H) {
  return GruCellSaved<T>{ws_row[j], ws_row[H + j], ws_row[2 * H + j], ws_row[3 * H + j]};
}

// Writes one element's input-side gate gradients dr | dz | dn to a dgx row,
// converted to the row's dtype.
template <typename T, typename A, typename Idx>
VR_HOST_DEVICE void store_input_gate_grads(T* dgx_row, Idx j, Idx H, const GruCellGrad<A>& g) {
  dgx_row[j] = static_cast<T>(g.dr);
  dgx_row[H + j] = static_cast<T>(g.dz);
  dgx_row[2 * H + j] = static_cast<T>(g.dn);
}

// Writes one element's hidden-side gate gradients dr | dz | dn*r to a dgh row.
template <typename T, typename A, typename Idx>
VR_HOST_DEVICE void store_hidden_gate_grads(T* dgh_row, Idx j, Idx H, const GruCellGrad<A>& g) {
  dgh_row[j] = static_cast<T>(g.dr);
  dgh_row[H + j] = static_cast<T>(g.dz);
  dgh_row[2 * H + j] = static_cast<T>(g.dhn);
}

// Both of the above. Either row may be null when a backend keeps only one of
// them; a loop that must vectorize calls the two above (GCC does not
// vectorize a loop with these branches).
template <typename T, typename A, typename Idx>
VR_HOST_DEVICE void store_gate_grads(T* dgx_row, T* dgh_row, Idx j, Idx H,
                                     const GruCellGrad<A>& g) {
  if (dgx_row != nullptr) store_input_gate_grads(dgx_row, j, H, g);
  if (dgh_row != nullptr) store_hidden_gate_grads(dgh_row, j, H, g);
}

// The time index of step s in direction d (0 forward, 1 reverse) for a
// sequence of length len: the reverse direction starts at the sequence's own
// last valid step, not at T-1.
template <typename Idx>
VR_HOST_DEVICE Idx step_time(int d, Idx len, Idx s) {
  return d == 1 ? len - 1 - s : s;
}

// The time of the state that step s reads (h_prev), for s > 0.
template <typename Idx>
VR_HOST_DEVICE Idx prev_time(int d, Idx t) {
  return d == 1 ? t + 1 : t - 1;
}

}  // namespace varlen_rnn
