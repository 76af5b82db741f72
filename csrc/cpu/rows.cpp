// The row gate passes declared in rows.h, and the ISA dispatch of the float
// ones.
#include "cpu/rows.h"

#include "cpu/vec_math.h"
#include "gate_math.h"

namespace varlen_rnn {
namespace {

// The rows of one call never overlap: ivdep tells GCC so, and it vectorizes
// without run-time alias checks (the loops have too many pointers for those).
#if defined(__GNUC__) && !defined(__clang__)
#define VR_IVDEP _Pragma("GCC ivdep")
#else
#define VR_IVDEP
#endif

template <typename T, typename Math, bool kSave>
inline void forward_loop(const ForwardRow<T>& row, int64_t H) {
  const T* gx = row.gx;
  const T* gh = row.gh;
  const T* bh = row.bh;
  VR_IVDEP
  for (int64_t j = 0; j < H; ++j) {
    GruCellSaved<T> saved;
    const T h_new = gru_cell_forward<T, Math>(gx[j], gx[H + j], gx[2 * H + j], gh[j] + bh[j],
                                              gh[H + j] + bh[H + j], gh[2 * H + j] + bh[2 * H + j],
                                              row.h[j], saved);
    row.h[j] = h_new;
    row.out[j] = h_new;
    if constexpr (kSave) store_saved(row.ws, j, H, saved);
  }
}

template <typename T, typename Math>
inline void forward_any(const ForwardRow<T>& row, int64_t H) {
  if (row.ws != nullptr) {
    forward_loop<T, Math, true>(row, H);
  } else {
    forward_loop<T, Math, false>(row, H);
  }
}

template <typename T>
inline void backward_any(const BackwardRow<T>& row, int64_t H) {
  VR_IVDEP
  for (int64_t j = 0; j < H; ++j) {
    const auto g =
        gru_cell_backward<T>(row.dh[j] + row.go[j], row.prev[j], load_saved(row.ws, j, H));
    store_input_gate_grads(row.dgx, j, H, g);
    store_hidden_gate_grads(row.dgh, j, H, g);
    row.dghn[j] = g.dhn;
    row.hp[j] = row.prev[j];
    row.dh[j] = g.dh_prev;
  }
}

}  // namespace

// float rows are compiled for several ISAs and picked at load time (GCC
// target_clones), so one wheel runs everywhere and uses AVX-512/AVX2 where
// present. flatten inlines the loop and the cell math into each clone.
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
#define VR_CPU_CLONES \
  __attribute__((flatten, target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define VR_CPU_CLONES
#endif

VR_CPU_CLONES void forward_row(const ForwardRow<float>& row, int64_t H) {
  forward_any<float, VecMathF32>(row, H);
}
VR_CPU_CLONES void backward_row(const BackwardRow<float>& row, int64_t H) {
  backward_any<float>(row, H);
}

// double keeps libm's exp/tanh: the precision gradcheck needs.
void forward_row(const ForwardRow<double>& row, int64_t H) {
  forward_any<double, PreciseMath>(row, H);
}
void backward_row(const BackwardRow<double>& row, int64_t H) { backward_any<double>(row, H); }

}  // namespace varlen_rnn
