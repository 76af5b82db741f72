// The gate pass of one sorted row at one step: the elementwise part of the
// CPU recurrence, between two GEMMs (see cpu/recurrence.h). Each row is a few
// contiguous vectors; these functions run a cell's math (csrc/cells/) over
// them, unit by unit. One overload per cell and type, picked by the cell's
// tag (forward_row(GruCell{}, row, H)); the float ones are compiled for several
// ISAs (rows.cpp).
#pragma once

#include <c10/util/BFloat16.h>

#include <cstdint>

#include "cells/gru.h"
#include "cells/lstm.h"
#include "cells/rnn.h"

namespace varlen_rnn {

// The forward's rows at one (d, s, i). G = Cell::kGates, S = Cell::kSaved; a
// row of G (or S) values per unit holds value k of unit j at k*H + j.
template <typename T>
struct ForwardRow {
  const T* gx;  // [G*H] input projection W_ih x, without the bias
  const T* gh;  // [G*H] W_hh h, without the bias
  const T* bx;  // [G*H] b_ih (zeros without biases)
  const T* bh;  // [G*H] b_hh (zeros without biases)
  T* h;         // [H] h_prev in (read only if Cell::kReadsHPrev), h' out
  T* out;       // [H] also set to h'; may be h itself
  T* c;         // [H] c in, c' out (Cell::kHasC); unused otherwise
  T* ws;        // [S*H] the saved values, or null (inference, or ws16)
  // [S*H] the saved values rounded to bfloat16 (a bfloat16 layer's Workspace)
  c10::BFloat16* ws16 = nullptr;
};

// The backward's rows at one (d, s, i).
template <typename T>
struct BackwardRow {
  T* dh;          // [H] in: the gradient reaching h' from later steps (and the
                  //     projection); out, if Cell::kReadsHPrev: its direct part
                  //     for h_prev (the W_hh^T part is a GEMM)
  const T* go;    // [H] grad_output row added to dh; null with a projection
                  //     (grad_output is then in dh already)
  T* dc;          // [H] (Cell::kHasC) in: the gradient reaching c'; out: c's
  const T* prev;  // [H] h_prev (read only if Cell::kReadsHPrev)
  const T* ws;    // [S*H] the forward's saved values (null with ws16)
  // [S*H] the same as bfloat16 (a bfloat16 layer's Workspace)
  const c10::BFloat16* ws16 = nullptr;
  T* dgx;   // [G*H] input-side gate gradients; with dghn, possibly over ws's
            //     own columns (a last backward: cpu/recurrence.h), so a
            //     unit's saved values are read before its gradients are
            //     written, and no other unit's columns are touched
  T* dgh;   // [G*H] hidden-side gate gradients, the operand of this
            //     step's GEMM: written only if Cell::kHiddenGradsDiffer
            //     (otherwise they equal dgx)
  T* dghn;  // [H] (kHiddenGradsDiffer) the last gate's hidden-side
            //     gradient, kept over all steps for dW_hh (GRU's dn*r)
  T* hout;  // [H] h' recomputed from ws, kept for dW_hr: with a
            //     projection (Cell::kHasC cells only), else null
};

// A direction's workspace ([N, S*H]): op-math values, or, for a bfloat16
// layer, bfloat16 ones (each float32 value rounded to nearest even as the
// gate pass stores it, read back exact), as nn's bfloat16 CPU path keeps its
// saved values: half the training memory of the saved values. Null in
// inference. point(row, r, u0) sets a row struct's ws or ws16 to row r's
// unit u0.
template <typename T>
struct Workspace {
  T* ws = nullptr;
  c10::BFloat16* ws16 = nullptr;
  int64_t S = 0;  // values per row (the layer's dims.S * H)

  template <typename Row>
  void point(Row& row, int64_t r, int64_t u0 = 0) const {
    row.ws = ws != nullptr ? ws + r * S + u0 : nullptr;
    row.ws16 = ws16 != nullptr ? ws16 + r * S + u0 : nullptr;
  }
};

// The float overloads are compiled for each ISA of VR_CLONE_ISAS and picked
// at load time (rows.cpp). Clang wants target_clones on every declaration of
// such a function (without it here it quietly built one baseline version),
// GCC on the definition. Clang's (16) resolver takes "arch=x86-64-v4" for a
// CPU model and picked the baseline clone on an AVX-512 CPU: there the clones
// are by feature (its avx512f implies FMA, its avx2 does not). Clang 14's
// clones of these functions returned without writing their rows (zeros out,
// every test of the gate passes failing): before clang 16 there are none, and
// the rows run the baseline's SSE2 code; nor where there are no ifuncs to pick
// a clone (clang's clones are ELF ifuncs: Linux only).
#if defined(__clang__) && defined(__x86_64__) && defined(__linux__) && __clang_major__ >= 16
#define VR_CLONE_ISAS target_clones("avx512f", "avx2", "default")
#define VR_ROWS_CLONES __attribute__((VR_CLONE_ISAS))
#elif defined(__clang__)
#define VR_ROWS_CLONES
#else
#define VR_CLONE_ISAS target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")
#define VR_ROWS_CLONES
#endif

// forward_units: the same over `units` units from the row's pointers (a slice
// of the row: gx, bx, bh, ws, h, out, c already offset to its first unit), gate
// stride H everywhere but gh's, which is gh_ld, and gx's, which is gx_ld. backward_units: likewise
// (every pointer offset to the slice's first unit, gate stride H); the gradients of those units are
// exactly backward_row's.
#define VR_DECLARE_ROWS(Cell)                                                                      \
  VR_ROWS_CLONES void forward_row(Cell, const ForwardRow<float>& row, int64_t H);                  \
  void forward_row(Cell, const ForwardRow<double>& row, int64_t H);                                \
  VR_ROWS_CLONES void forward_units(Cell, const ForwardRow<float>& row, int64_t units, int64_t H,  \
                                    int64_t gh_ld, int64_t gx_ld);                                 \
  void forward_units(Cell, const ForwardRow<double>& row, int64_t units, int64_t H, int64_t gh_ld, \
                     int64_t gx_ld);                                                               \
  VR_ROWS_CLONES void backward_row(Cell, const BackwardRow<float>& row, int64_t H);                \
  void backward_row(Cell, const BackwardRow<double>& row, int64_t H);                              \
  VR_ROWS_CLONES void backward_units(Cell, const BackwardRow<float>& row, int64_t units,           \
                                     int64_t H);                                                   \
  void backward_units(Cell, const BackwardRow<double>& row, int64_t units, int64_t H);

VR_DECLARE_ROWS(GruCell)
VR_DECLARE_ROWS(LstmCell)
VR_DECLARE_ROWS(RnnTanhCell)
VR_DECLARE_ROWS(RnnReluCell)

#undef VR_DECLARE_ROWS

}  // namespace varlen_rnn
