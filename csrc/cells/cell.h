// What every cell policy provides, and the column helpers the recurrences use
// to move a cell's values between their rows and registers.
//
// A cell is a struct of constants and two static functions over one hidden
// unit j of one row (csrc/cells/gru.h, lstm.h, rnn.h). Everything else (rows,
// layouts, schedules, GEMMs, kernels) is the recurrence's and is written once
// for all cells: a recurrence is a template on the cell.
//
//   kGates   gate blocks of W_ih / W_hh / b_*: their rows are [kGates*H, ...],
//            gate g of unit j at row g*H + j (torch.nn's gate order)
//   kSaved   values the forward saves per unit for the backward: the
//            workspace is [D, rows, kSaved*H], value k of unit j at k*H + j
//            (op-math, but a bfloat16 layer's are stored as bfloat16:
//            layer.h workspace_dtype)
//   kSavedIsOutput
//            the saved values are the cell's output h' itself (the RNN's), so
//            the backends read them from the layer's output instead and the
//            workspace has no columns (kWorkspaceSaved)
//   kHasC    the cell carries a second state c beside h (LSTM)
//   kHiddenGradsDiffer
//            the hidden-side gate gradients (the operand of the W_hh^T GEMM
//            and of dW_hh) differ from the input-side ones (GRU: the n gate's
//            is dn * r); otherwise one gradient row serves both sides
//   kReadsHPrev
//            the cell's own math reads h_prev (GRU's z * h term); otherwise
//            h_prev only enters through W_hh h
//
//   forward<T, Math>(gx, gh, prev, next, saved)
//       gx [kGates]: W_ih x + b_ih at unit j; gh [kGates]: W_hh h + b_hh
//       prev: the state before the step; next: after it (next.h is the
//       cell's output, before any projection); saved [kSaved]
//   backward<T, Math>(grad, prev_h, saved, dgx, dgh, grad_prev)
//       grad: the total gradient reaching next (h and, with kHasC, c);
//       prev_h: h_prev (read only if kReadsHPrev); saved as the forward wrote
//       it; dgx / dgh [kGates]: gradients of the input- and hidden-side
//       pre-activations (equal unless kHiddenGradsDiffer); grad_prev: the
//       direct parts of the gradient of prev (the W_hh^T part is a GEMM);
//       Math: the forward's, where the backward recomputes a value rather
//       than saving it (the LSTM's tanh(c'))
//
// The state and gradients are op-math values (float for half types).
#pragma once

#include <cmath>

#if defined(__CUDACC__)
#define VR_HOST_DEVICE __host__ __device__ __forceinline__
#elif defined(__clang__)
// clang's inliner left the LSTM's forward (five exp) a call, which kept the
// CPU's gate loop (cpu/rows.cpp) scalar; GCC's flatten inlines it there.
#define VR_HOST_DEVICE inline __attribute__((always_inline))
#else
#define VR_HOST_DEVICE inline
#endif

// Full unrolling of the short loops over a cell's gates or saved values.
#if defined(__CUDACC__)
#define VR_UNROLL _Pragma("unroll")
#elif defined(__clang__)
#define VR_UNROLL _Pragma("unroll")
#elif defined(__GNUC__)
#define VR_UNROLL _Pragma("GCC unroll 8")
#else
#define VR_UNROLL
#endif

namespace varlen_rnn {

// The transcendental functions, as a policy so a backend can swap in a
// vectorizable or fast-math version without touching the cell math (the CPU's
// float rows use cpu/vec_math.h's VecMathF32).
struct PreciseMath {
  template <typename T>
  static VR_HOST_DEVICE T exp(T x) {
    using std::exp;
    return exp(x);
  }
  template <typename T>
  static VR_HOST_DEVICE T tanh(T x) {
    using std::tanh;
    return tanh(x);
  }
};

template <typename T, typename Math = PreciseMath>
VR_HOST_DEVICE T sigmoid(T x) {
  return T(1) / (T(1) + Math::exp(-x));
}

// One unit's state: h, and c for cells with kHasC (unused otherwise).
template <typename T>
struct CellState {
  T h = T(0);
  T c = T(0);
};

// The values per unit the workspace holds: the cell's saved values, or none
// where they are its output (kSavedIsOutput: the backward reads the output
// it is given, which is then not held twice; the RNN at B=64 T=100 H=256:
// 6.25 MiB in float32).
template <typename Cell>
constexpr int kWorkspaceSaved = Cell::kSavedIsOutput ? 0 : Cell::kSaved;

// Reads values k = 0..K-1 of unit j from a row laid out [K*H] (value k at
// k*H + j), converted to A.
template <int K, typename A, typename S, typename Idx>
VR_HOST_DEVICE void load_cols(const S* row, Idx j, Idx H, A (&v)[K]) {
  VR_UNROLL
  for (int k = 0; k < K; ++k) v[k] = static_cast<A>(row[k * H + j]);
}

// Writes values k = 0..K-1 of unit j to a row laid out [K*H], converted to
// the row's type.
template <int K, typename S, typename A, typename Idx>
VR_HOST_DEVICE void store_cols(S* row, Idx j, Idx H, const A (&v)[K]) {
  VR_UNROLL
  for (int k = 0; k < K; ++k) row[k * H + j] = static_cast<S>(v[k]);
}

}  // namespace varlen_rnn
