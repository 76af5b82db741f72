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
// nothing for padding. Ragged input (make_ragged_schedule) gets the same
// schedule; packed input is already in this order.
#pragma once

#include <ATen/ATen.h>

#include <algorithm>
#include <cstring>
#include <cstdint>
#include <numeric>
#include <optional>
#include <utility>
#include <vector>

#include "layer.h"
#include "layout.h"

namespace varlen_rnn {

struct Schedule {
  std::vector<int64_t> perm;         // [B] perm[i]: sequence (index of hx/h_n) of sorted row i
  std::vector<int64_t> len;          // [B] len[i]: length of sorted row i, descending
  std::vector<int64_t> active;       // [max_len] rows with length > s
  std::vector<int64_t> offset;       // [max_len + 1] packed row of (s, 0); offset[max_len] = N
  std::vector<int64_t> seq_offsets;  // [B+1] the offsets layout's offsets, else empty
  int64_t max_len = 0;
  int64_t N() const { return offset.back(); }
};

// Fills active and offset from len (descending) and sets max_len.
inline void finish_schedule(Schedule& sched) {
  const int64_t B = static_cast<int64_t>(sched.len.size());
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
}

// The schedule of B sequences of (already checked) lengths p[b]: a stable
// longest-first sort.
inline Schedule schedule_from_lengths(const int64_t* p, int64_t B) {
  Schedule sched;
  sched.perm.resize(B);
  std::iota(sched.perm.begin(), sched.perm.end(), 0);
  std::stable_sort(sched.perm.begin(), sched.perm.end(),
                   [p](int64_t a, int64_t b) { return p[a] > p[b]; });
  sched.len.resize(B);
  for (int64_t i = 0; i < B; ++i) sched.len[i] = p[sched.perm[i]];
  finish_schedule(sched);
  return sched;
}

// lengths [B] int64 or int32; checks each value is in [0, T].
inline Schedule make_schedule(const at::Tensor& lengths, int64_t T) {
  const at::Tensor l = lengths.to(at::kLong).contiguous();
  const int64_t* p = l.const_data_ptr<int64_t>();
  const int64_t B = l.numel();
  for (int64_t b = 0; b < B; ++b) {
    TORCH_CHECK(p[b] >= 0 && p[b] <= T, "lengths must be in [0, T] with T=", T,
                " (the input's time dimension), got lengths[", b, "]=", p[b]);
  }
  return schedule_from_lengths(p, B);
}

// [n] int64 host copy of a 1-D index tensor on any device.
inline std::vector<int64_t> host_values(const at::Tensor& t) {
  const at::Tensor c = t.to(at::kCPU, at::kLong).contiguous();
  const int64_t* p = c.const_data_ptr<int64_t>();
  return std::vector<int64_t>(p, p + c.numel());
}

// The ragged ops' schedule (dims from check_ragged_args), after checking the
// values of seq_index and sorted_indices.
//   offsets: the lengths' longest-first sort, as for padded input.
//   packed: the ranks are already longest-first, so sorted row i is rank i and
//   the packed rows (t, i) are exactly the schedule's offset[t] + i;
//   perm = sorted_indices (rank -> sequence).
inline Schedule make_ragged_schedule(const RaggedDims& dims, const at::Tensor& seq_index,
                                     const std::optional<at::Tensor>& sorted_indices) {
  std::vector<int64_t> idx = host_values(seq_index);
  if (dims.layout == 0) {
    check_offsets_values(idx.data(), dims.B, dims.N, dims.T);
    std::vector<int64_t> lengths(dims.B);
    for (int64_t b = 0; b < dims.B; ++b) lengths[b] = idx[b + 1] - idx[b];
    Schedule sched = schedule_from_lengths(lengths.data(), dims.B);
    sched.seq_offsets = std::move(idx);
    return sched;
  }
  const int64_t T = static_cast<int64_t>(idx.size());
  check_batch_sizes_values(idx.data(), T, dims.B, dims.N);
  Schedule sched;
  if (sorted_indices.has_value()) {
    sched.perm = host_values(*sorted_indices);
    check_sorted_indices_values(sched.perm.data(), dims.B);
  } else {
    sched.perm.resize(dims.B);
    std::iota(sched.perm.begin(), sched.perm.end(), 0);
  }
  // len[i] = #{t : batch_sizes[t] > i}: count where each run of ranks ends.
  sched.len.assign(dims.B, 0);
  for (int64_t t = 0; t < T; ++t) sched.len[idx[t] - 1] += 1;
  for (int64_t i = dims.B - 2; i >= 0; --i) sched.len[i] += sched.len[i + 1];
  finish_schedule(sched);
  return sched;
}

// A range [r0, r1) of the schedule's sorted rows: the rows one team of a
// split step loop runs (cpu/split_steps.h, cpu/split_backward.h; the whole
// batch unless the loop splits the rows between teams, row_ranges). Its
// running rows at step s are r0 .. r0 + active(s) - 1: the sorted order keeps
// them a contiguous block, as the whole batch's are.
struct RowRange {
  int64_t r0 = 0, r1 = 0;
  int64_t size() const { return r1 - r0; }
  int64_t active(const Schedule& sched, int64_t s) const {
    return std::clamp<int64_t>(sched.active[s] - r0, 0, r1 - r0);
  }
  // [max_len + 1] this range's own offsets: step s's running row r0 + j is
  // the range's position offsets[s] + j (the schedule's offset for all rows).
  std::vector<int64_t> offsets(const Schedule& sched) const {
    std::vector<int64_t> o(sched.max_len + 1, 0);
    for (int64_t s = 0; s < sched.max_len; ++s) o[s + 1] = o[s] + active(sched, s);
    return o;
  }
};

// `groups` consecutive ranges of the sorted rows, with near-equal work: the
// sum of their lengths (a step of a row costs about the same at any step).
// The sorted order puts the longest first, so the first ranges have fewer
// rows. A range may be empty (more groups than rows with work).
inline std::vector<RowRange> row_ranges(const Schedule& sched, int64_t groups) {
  const int64_t B = static_cast<int64_t>(sched.len.size());
  std::vector<RowRange> ranges(groups);
  int64_t total = 0;
  for (int64_t l : sched.len) total += l;
  int64_t i = 0, done = 0;
  for (int64_t g = 0; g < groups; ++g) {
    ranges[g].r0 = i;
    // Take rows while the work done stays at or below this group's share;
    // the last group takes the rest (zero-length rows included).
    const int64_t until = g + 1 == groups ? total : total * (g + 1) / groups;
    while (i < B && (g + 1 == groups || done + sched.len[i] <= until ||
                     (ranges[g].r0 == i && done < until))) {
      done += sched.len[i];
      ++i;
    }
    ranges[g].r1 = i;
  }
  ranges.back().r1 = B;
  return ranges;
}

// [N] int64: the row in `rows` (a padded map over the schedule's sorted rows)
// of each packed position offset[t] + i; undefined where the positions are
// all T*B rows, each its own (full lengths, time-major or of one step or one
// sequence): the input is then read in place, not gathered.
inline at::Tensor packed_rows(const Schedule& sched, const RowMap& rows, int64_t T) {
  at::Tensor idx = at::empty({sched.N()}, at::kLong);
  int64_t* q = idx.data_ptr<int64_t>();
  bool identity = sched.N() == T * static_cast<int64_t>(sched.len.size());
  for (int64_t t = 0; t < sched.max_len; ++t) {
    for (int64_t i = 0; i < sched.active[t]; ++i) {
      const int64_t pos = sched.offset[t] + i;
      q[pos] = rows.row(t, i);
      identity = identity && q[pos] == pos;
    }
  }
  return identity ? at::Tensor() : idx;
}

// [T*B - N] int64: the padded rows (of `rows`, as above) at the positions
// t >= length: the only rows of output / grad_input that no kernel writes, so
// the only ones zeroed.
inline at::Tensor padding_rows(const Schedule& sched, const RowMap& rows, int64_t T) {
  const int64_t B = static_cast<int64_t>(sched.len.size());
  at::Tensor idx = at::empty({T * B - sched.N()}, at::kLong);
  int64_t* q = idx.data_ptr<int64_t>();
  for (int64_t i = 0; i < B; ++i) {
    for (int64_t t = sched.len[i]; t < T; ++t) *q++ = rows.row(t, i);
  }
  return idx;
}

// Moves [B, ...] per-sequence tensors (states and their gradients) between
// the caller's order b and the schedule's sorted order i = perm^-1(b). Where
// perm is the identity (equal or already descending lengths, one sequence)
// that is a copy, with no index tensor: a call of one step at small B pays
// for every ATen op it runs.
class SortedOrder {
 public:
  explicit SortedOrder(const Schedule& sched)
      : identity_(std::is_sorted(sched.perm.begin(), sched.perm.end())) {
    // A permutation of 0..B-1 in ascending order is the identity.
    if (!identity_) perm_ = at::tensor(sched.perm, at::TensorOptions().dtype(at::kLong));
  }
  // Direction d of all [D, B, X] (contiguous): [B, X] contiguous, sorted
  // order, row i = all[d][perm[i]]. The identity's copy is a memcpy: a
  // decoder's one-step call does this for every state, and each ATen call
  // (select, clone's empty_like and copy_) costs it more than the copy.
  at::Tensor gather(const at::Tensor& all, int64_t d) const {
    TORCH_INTERNAL_ASSERT(all.dim() == 3 && all.is_contiguous());
    if (!identity_) return all[d].index_select(0, perm_);
    at::Tensor out = at::empty({all.size(1), all.size(2)}, all.options());
    const size_t bytes = out.nbytes();
    if (bytes)
      std::memcpy(out.data_ptr(), static_cast<const char*>(all.const_data_ptr()) + d * bytes,
                  bytes);
    return out;
  }
  // all[d][perm[i]] = src[i] for all [D, B, X] (contiguous) and src [B, X].
  void scatter(const at::Tensor& all, int64_t d, const at::Tensor& src) const {
    TORCH_INTERNAL_ASSERT(all.dim() == 3 && all.is_contiguous());
    if (!identity_) {
      all[d].index_copy_(0, perm_, src);
      return;
    }
    TORCH_INTERNAL_ASSERT(src.is_contiguous() && src.scalar_type() == all.scalar_type() &&
                          src.numel() == all.size(1) * all.size(2));
    const size_t bytes = src.nbytes();
    if (bytes)
      std::memcpy(static_cast<char*>(all.data_ptr()) + d * bytes, src.const_data_ptr(), bytes);
  }

 private:
  bool identity_;
  at::Tensor perm_;  // [B] int64 where not the identity
};

}  // namespace varlen_rnn
