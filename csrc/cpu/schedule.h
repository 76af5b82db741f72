// The CPU recurrence's schedule: which rows run at each step, and where each
// valid (t, b) position lives in the packed buffers.
//
// Rows are visited longest-first through `perm`, a stable argsort of the B
// lengths; the caller's tensors are never permuted. The recurrence keeps its
// state in that sorted order, so at step s the running rows are exactly the
// first active[s] rows: the per-step GEMM runs on a contiguous block and
// finished sequences cost nothing. Both directions use the same schedule: at
// step s sorted row i is at time step_time(d, len[i], s).
//
// Packed layout. The valid positions (t, i) are numbered offset[t] + i (the
// PackedSequence order), so buffers over positions hold exactly N rows and
// nothing for padding.
#pragma once

#include <ATen/ATen.h>

#include <algorithm>
#include <cstdint>
#include <numeric>
#include <vector>

#include "gru.h"

namespace varlen_rnn {

struct Schedule {
  std::vector<int64_t> perm;    // [B] perm[i]: batch row of the i-th longest sequence
  std::vector<int64_t> len;     // [B] len[i] = lengths[perm[i]], descending
  std::vector<int64_t> active;  // [max_len] rows with length > s
  std::vector<int64_t> offset;  // [max_len + 1] packed row of (s, 0); offset[max_len] = N
  int64_t max_len = 0;
  int64_t N() const { return offset.back(); }
};

// lengths [B] int64 or int32; checks each value is in [0, T].
inline Schedule make_schedule(const at::Tensor& lengths, int64_t T) {
  const at::Tensor l = lengths.to(at::kLong).contiguous();
  const int64_t* p = l.const_data_ptr<int64_t>();
  const int64_t B = l.numel();
  for (int64_t b = 0; b < B; ++b) {
    TORCH_CHECK(p[b] >= 0 && p[b] <= T, "lengths must be in [0, T] with T=", T,
                " (the input's time dimension), got lengths[", b, "]=", p[b]);
  }
  Schedule sched;
  sched.perm.resize(B);
  std::iota(sched.perm.begin(), sched.perm.end(), 0);
  std::stable_sort(sched.perm.begin(), sched.perm.end(),
                   [p](int64_t a, int64_t b) { return p[a] > p[b]; });
  sched.len.resize(B);
  for (int64_t i = 0; i < B; ++i) sched.len[i] = p[sched.perm[i]];
  sched.max_len = B > 0 ? sched.len[0] : 0;
  sched.active.assign(sched.max_len, 0);
  int64_t i = B;
  for (int64_t s = 0; s < sched.max_len; ++s) {
    while (i > 0 && sched.len[i - 1] <= s) --i;
    sched.active[s] = i;
  }
  sched.offset.assign(sched.max_len + 1, 0);
  for (int64_t s = 0; s < sched.max_len; ++s) {
    sched.offset[s + 1] = sched.offset[s] + sched.active[s];
  }
  return sched;
}

// Row of (t, batch row b) in a 2-D view [T*B, F] (or [B*T, F] if batch_first)
// of a padded tensor.
inline int64_t padded_row(const LayerDims& dims, int64_t t, int64_t b) {
  return dims.batch_first ? b * dims.T + t : t * dims.B + b;
}

// [N] int64: the padded row (see padded_row) of each packed position.
inline at::Tensor packed_rows(const Schedule& sched, const LayerDims& dims) {
  at::Tensor idx = at::empty({sched.N()}, at::kLong);
  int64_t* q = idx.data_ptr<int64_t>();
  for (int64_t t = 0; t < sched.max_len; ++t) {
    for (int64_t i = 0; i < sched.active[t]; ++i) {
      q[sched.offset[t] + i] = padded_row(dims, t, sched.perm[i]);
    }
  }
  return idx;
}

// [T*B - N] int64: the padded rows at the positions t >= length: the only
// rows of output / grad_input that no kernel writes, so the only ones zeroed.
inline at::Tensor padding_rows(const Schedule& sched, const LayerDims& dims) {
  at::Tensor idx = at::empty({dims.T * dims.B - sched.N()}, at::kLong);
  int64_t* q = idx.data_ptr<int64_t>();
  for (int64_t i = 0; i < dims.B; ++i) {
    for (int64_t t = sched.len[i]; t < dims.T; ++t) *q++ = padded_row(dims, t, sched.perm[i]);
  }
  return idx;
}

// [B] int64: perm as a tensor, for index_select / index_copy_.
inline at::Tensor perm_tensor(const Schedule& sched) {
  return at::tensor(sched.perm, at::TensorOptions().dtype(at::kLong));
}

}  // namespace varlen_rnn
