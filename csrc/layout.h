// How a valid position (t, b) maps to a row of a 2-D [rows, features] view,
// for every layout the kernels read: the one statement of it, shared by the
// CPU and CUDA recurrences so that they and the gate math stay written once.
//
//   kOffsets          sequence-major ragged (a jagged nested tensor's values):
//                     row = offsets[b] + t, starts = offsets [B+1]
//   kPacked           time-major ragged (PackedSequence.data, and the CPU's
//                     packed buffers): row = starts[t] + b, b the rank in
//                     longest-first order, starts [T+1] the exclusive cumsum of
//                     batch_sizes
//   kPaddedTimeMajor  [T, B, ...]: row = t * B + b
//   kPaddedBatchMajor [B, T, ...]: row = b * T + t
//
// A kernel that visits sequences in its own order (the CPU schedule's
// longest-first rows) passes `order`: its j-th sequence is b = order[j]; null
// means b = j. The kind is switched once per row, outside the feature loops.
#pragma once

#include <cstdint>

#include "cells/cell.h"  // VR_HOST_DEVICE

namespace varlen_rnn {

// The values of the ragged ops' `layout` argument (ops.cpp) come first.
enum RowLayout : int32_t {
  kOffsets = 0,
  kPacked = 1,
  kPaddedTimeMajor = 2,
  kPaddedBatchMajor = 3,
};

// Number of layouts the ragged ops accept (0 and 1).
constexpr int64_t kNumRaggedLayouts = 2;

struct RowMap {
  int32_t kind = kPaddedTimeMajor;
  const int64_t* starts = nullptr;  // kOffsets: [B+1]; kPacked: [T+1]; padded: unused
  const int64_t* order = nullptr;   // [B] the kernel's j-th sequence, or null
  int64_t T = 0;                    // padded time dimension (kPaddedBatchMajor)
  int64_t B = 0;                    // padded batch dimension (kPaddedTimeMajor)

  // Row of (t, the kernel's j-th sequence).
  VR_HOST_DEVICE int64_t row(int64_t t, int64_t j) const {
    const int64_t b = order != nullptr ? order[j] : j;
    switch (kind) {
      case kOffsets:
        return starts[b] + t;
      case kPacked:
        return starts[t] + b;
      case kPaddedTimeMajor:
        return t * B + b;
      default:
        return b * T + t;
    }
  }
};

inline RowMap offsets_map(const int64_t* offsets, const int64_t* order) {
  RowMap m;
  m.kind = kOffsets;
  m.starts = offsets;
  m.order = order;
  return m;
}

inline RowMap packed_map(const int64_t* step_starts, const int64_t* order) {
  RowMap m;
  m.kind = kPacked;
  m.starts = step_starts;
  m.order = order;
  return m;
}

inline RowMap padded_map(bool batch_first, int64_t T, int64_t B, const int64_t* order) {
  RowMap m;
  m.kind = batch_first ? kPaddedBatchMajor : kPaddedTimeMajor;
  m.order = order;
  m.T = T;
  m.B = B;
  return m;
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
