// The row gate passes declared in rows.h, one loop each for every cell, and
// the ISA dispatch of the float ones.
#include "cpu/rows.h"

#include "cpu/vec_math.h"

#include <type_traits>

namespace varlen_rnn {
namespace {

// Each clone of the float rows gets its own copy of the loops below, built
// for its ISA: GCC's flatten (VR_CPU_CLONES) inlines them, clang's always_inline.
#if defined(__clang__)
#define VR_ROW_INLINE __attribute__((always_inline)) inline
#else
#define VR_ROW_INLINE inline
#endif

// The rows of one call never overlap: ivdep tells GCC so (assume_safety
// clang), and it vectorizes without run-time alias checks (the loops have too
// many pointers for those).
#if defined(__clang__)
#define VR_IVDEP _Pragma("clang loop vectorize(assume_safety)")
#elif defined(__GNUC__)
#define VR_IVDEP _Pragma("GCC ivdep")
#else
#define VR_IVDEP
#endif

// units: how many units the row's pointers cover; H: the gate stride of bx,
// bh and ws; gh_ld and gx_ld: those of gh and gx (a thread's own slices in
// cpu/split_steps.h and cpu/chunked_projection.h).
// W: the workspace's type (T, or bfloat16: c10's rounding to nearest even,
// which GCC vectorizes as integer operations).
template <typename T, typename Cell, typename Math, bool kSave, typename W = T>
VR_ROW_INLINE void forward_loop(const ForwardRow<T>& row, W* ws, int64_t units, int64_t H,
                                int64_t gh_ld, int64_t gx_ld) {
  constexpr int G = Cell::kGates, S = Cell::kSaved;
  VR_IVDEP
  for (int64_t j = 0; j < units; ++j) {
    T gx[G], gh[G], bx[G], bh[G], saved[S];
    load_cols<G>(row.gx, j, gx_ld, gx);
    load_cols<G>(row.gh, j, gh_ld, gh);
    load_cols<G>(row.bx, j, H, bx);
    load_cols<G>(row.bh, j, H, bh);
    VR_UNROLL
    for (int k = 0; k < G; ++k) {
      gx[k] += bx[k];
      gh[k] += bh[k];
    }
    CellState<T> prev, next;
    if constexpr (Cell::kReadsHPrev) prev.h = row.h[j];
    if constexpr (Cell::kHasC) prev.c = row.c[j];
    Cell::template forward<T, Math>(gx, gh, prev, next, saved);
    row.h[j] = next.h;
    row.out[j] = next.h;
    if constexpr (Cell::kHasC) row.c[j] = next.c;
    if constexpr (kSave) store_cols<S>(ws, j, H, saved);
  }
}

template <typename T, typename Cell, typename Math>
VR_ROW_INLINE void forward_any(const ForwardRow<T>& row, int64_t units, int64_t H, int64_t gh_ld,
                               int64_t gx_ld) {
  if constexpr (std::is_same_v<T, float>) {
    if (row.ws16 != nullptr) {
      forward_loop<T, Cell, Math, true>(row, row.ws16, units, H, gh_ld, gx_ld);
      return;
    }
  }
  if (row.ws != nullptr) {
    forward_loop<T, Cell, Math, true>(row, row.ws, units, H, gh_ld, gx_ld);
  } else {
    forward_loop<T, Cell, Math, false>(row, row.ws, units, H, gh_ld, gx_ld);
  }
}

// kProj: the LSTM's projection; grad_output is already in dh, and h' is
// recomputed for dW_hr. units: how many units the row's pointers cover; H: the
// gate stride of ws, dgx and dgh. Each unit's gradients read and write only
// that unit's columns, so a slice of units (cpu/split_backward.h) gets exactly
// the whole row's values for them.
template <typename T, typename Cell, typename Math, bool kProj, typename W = T>
VR_ROW_INLINE void backward_loop(const BackwardRow<T>& row, const W* ws, int64_t units, int64_t H) {
  constexpr int G = Cell::kGates, S = Cell::kSaved;
  VR_IVDEP
  for (int64_t j = 0; j < units; ++j) {
    T saved[S], dgx[G], dgh[G];
    load_cols<S>(ws, j, H, saved);
    CellState<T> grad, grad_prev;
    if constexpr (kProj) {
      grad.h = row.dh[j];
    } else {
      grad.h = row.dh[j] + row.go[j];
    }
    if constexpr (Cell::kHasC) grad.c = row.dc[j];
    const T h_prev = Cell::kReadsHPrev ? row.prev[j] : T(0);
    Cell::template backward<T, Math>(grad, h_prev, saved, dgx, dgh, grad_prev);
    store_cols<G>(row.dgx, j, H, dgx);
    if constexpr (Cell::kHiddenGradsDiffer) {
      store_cols<G>(row.dgh, j, H, dgh);
      row.dghn[j] = dgh[G - 1];
    }
    if constexpr (Cell::kReadsHPrev) row.dh[j] = grad_prev.h;
    if constexpr (Cell::kHasC) row.dc[j] = grad_prev.c;
    if constexpr (kProj) row.hout[j] = Cell::template output_from_saved<T, Math>(saved);
  }
}

template <typename T, typename Cell, typename Math, typename W>
VR_ROW_INLINE void backward_ws(const BackwardRow<T>& row, const W* ws, int64_t units, int64_t H) {
  if constexpr (Cell::kHasC) {  // only the LSTM has a projection
    if (row.hout != nullptr) {
      backward_loop<T, Cell, Math, true>(row, ws, units, H);
      return;
    }
  }
  backward_loop<T, Cell, Math, false>(row, ws, units, H);
}

template <typename T, typename Cell, typename Math>
VR_ROW_INLINE void backward_any(const BackwardRow<T>& row, int64_t units, int64_t H) {
  if constexpr (std::is_same_v<T, float>) {
    if (row.ws16 != nullptr) {
      backward_ws<T, Cell, Math>(row, row.ws16, units, H);
      return;
    }
  }
  backward_ws<T, Cell, Math>(row, row.ws, units, H);
}

}  // namespace

// float rows are compiled for several ISAs and picked at load time
// (target_clones, VR_CLONE_ISAS in rows.h), so one wheel runs everywhere and
// uses AVX-512/AVX2 where present. flatten inlines the loop and the cell math
// into each clone; clang refuses flatten beside target_clones, and there the
// loops are always_inline (VR_ROW_INLINE). The overloads are plain functions
// (not templates), which target_clones needs.
#if defined(__clang__)
#define VR_CPU_CLONES VR_ROWS_CLONES
#elif defined(__GNUC__) && defined(__x86_64__)
#define VR_CPU_CLONES __attribute__((flatten, VR_CLONE_ISAS))
#else
#define VR_CPU_CLONES
#endif

// double keeps libm's exp/tanh: the precision gradcheck needs.
#define VR_DEFINE_ROWS(Cell)                                                                       \
  VR_CPU_CLONES void forward_row(Cell, const ForwardRow<float>& row, int64_t H) {                  \
    forward_any<float, Cell, VecMathF32>(row, H, H, H, H);                                         \
  }                                                                                                \
  VR_CPU_CLONES void forward_units(Cell, const ForwardRow<float>& row, int64_t units, int64_t H,   \
                                   int64_t gh_ld, int64_t gx_ld) {                                 \
    forward_any<float, Cell, VecMathF32>(row, units, H, gh_ld, gx_ld);                             \
  }                                                                                                \
  VR_CPU_CLONES void backward_row(Cell, const BackwardRow<float>& row, int64_t H) {                \
    backward_any<float, Cell, VecMathF32>(row, H, H);                                              \
  }                                                                                                \
  VR_CPU_CLONES void backward_units(Cell, const BackwardRow<float>& row, int64_t units,            \
                                    int64_t H) {                                                   \
    backward_any<float, Cell, VecMathF32>(row, units, H);                                          \
  }                                                                                                \
  void forward_row(Cell, const ForwardRow<double>& row, int64_t H) {                               \
    forward_any<double, Cell, PreciseMath>(row, H, H, H, H);                                       \
  }                                                                                                \
  void forward_units(Cell, const ForwardRow<double>& row, int64_t units, int64_t H, int64_t gh_ld, \
                     int64_t gx_ld) {                                                              \
    forward_any<double, Cell, PreciseMath>(row, units, H, gh_ld, gx_ld);                           \
  }                                                                                                \
  void backward_row(Cell, const BackwardRow<double>& row, int64_t H) {                             \
    backward_any<double, Cell, PreciseMath>(row, H, H);                                            \
  }                                                                                                \
  void backward_units(Cell, const BackwardRow<double>& row, int64_t units, int64_t H) {            \
    backward_any<double, Cell, PreciseMath>(row, units, H);                                        \
  }

VR_DEFINE_ROWS(GruCell)
VR_DEFINE_ROWS(LstmCell)
VR_DEFINE_ROWS(RnnTanhCell)
VR_DEFINE_ROWS(RnnReluCell)

}  // namespace varlen_rnn
