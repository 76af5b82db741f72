// The gate pass of one sorted row at one step: the elementwise part of the
// CPU recurrence, between two GEMMs (see gru_cpu.cpp). Each row is a few
// contiguous vectors; these functions run the cell math of gate_math.h over
// them. The float ones are compiled for several ISAs (rows.cpp).
#pragma once

#include <cstdint>

namespace varlen_rnn {

// The forward's rows at one (d, s, i). The workspace row takes the layout of
// gate_math.h's store_saved.
template <typename T>
struct ForwardRow {
  const T* gx;  // [3H] input projection W_ih x + b_ih
  const T* gh;  // [3H] W_hh h, without the bias
  const T* bh;  // [3H] b_hh (zeros without biases)
  T* h;         // [H] the state: h_prev in, h' out
  T* out;       // [H] the output row, set to h'
  T* ws;        // [4H] the saved gates r|z|n|gh_n, or null in inference
};

// The backward's rows at one (d, s, i).
template <typename T>
struct BackwardRow {
  T* dh;          // [H] in: the gradient reaching h' from later steps;
                  //     out: its direct part for h_prev (the W_hh^T part is a GEMM)
  const T* go;    // [H] grad_output row
  const T* prev;  // [H] h_prev, the state before the step
  const T* ws;    // [4H] the forward's saved gates
  T* dgx;         // [3H] input-side gate gradients dr|dz|dn
  T* dgh;         // [3H] hidden-side dr|dz|dn*r: the operand of this step's GEMM
  T* dghn;        // [H] dgh's n part again, kept over all steps for dW_hh
  T* hp;          // [H] set to prev, kept over all steps for dW_hh
};

void forward_row(const ForwardRow<float>& row, int64_t H);
void forward_row(const ForwardRow<double>& row, int64_t H);
void backward_row(const BackwardRow<float>& row, int64_t H);
void backward_row(const BackwardRow<double>& row, int64_t H);

}  // namespace varlen_rnn
