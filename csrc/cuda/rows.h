// The rows and lengths the CUDA kernels read, put on the device: the padded
// op's lengths, the ragged ops' offsets, batch_sizes and sorted_indices. Index
// values on the CPU are checked on the host (layer.h's checks, the CPU backend's
// messages) and copied; values on the device are checked by pointwise.cuh's
// kernels (device asserts, values clamped), without a host sync. Included by
// ops_cuda.cu only (it launches kernels).
#pragma once

#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/sort.h>
#include <ATen/ops/zeros.h>

#include <optional>
#include <tuple>

#include "layer.h"
#include "launch.h"
#include "layout.h"
#include "plan.h"
#include "pointwise.cuh"
#include "runtime.h"

namespace varlen_rnn {
namespace cuda {

struct Lengths {
  at::Tensor lens, perm, sorted;  // int32 [B]; perm/sorted only when asked
};

// Up to this batch the order comes from the counting kernel (O(B^2) compares, one
// launch); beyond it from ATen's device sort. Both are stable and sync-free.
constexpr int64_t kRankSortMaxB = 8192;

// lengths: [B] on the device.
inline Lengths prepare_lengths(const at::Tensor& lengths, int64_t T, bool with_perm,
                               cudaStream_t stream) {
  const int64_t B = lengths.size(0);
  const auto opts = lengths.options().dtype(at::kInt);
  Lengths l;
  l.lens = at::empty({B}, opts);
  const bool big = with_perm && B > kRankSortMaxB;
  if (with_perm && !big) {
    l.perm = at::empty({B}, opts);
    l.sorted = at::empty({B}, opts);
  }
  const at::Tensor src = lengths.contiguous();
  const int blocks = static_cast<int>(plan::ceil_div(B, kPointwiseThreads));
  AT_DISPATCH_INDEX_TYPES(src.scalar_type(), "varlen_rnn_lengths_prep", [&] {
    launch_kernel(lengths_prep_kernel<index_t>, blocks, kPointwiseThreads, stream,
                  src.data_ptr<index_t>(), static_cast<int>(B), static_cast<int>(T),
                  l.lens.data_ptr<int>(), l.perm.defined() ? l.perm.data_ptr<int>() : nullptr,
                  l.sorted.defined() ? l.sorted.data_ptr<int>() : nullptr);
  });
  if (big) {
    auto sorted = at::sort(l.lens, /*stable=*/true, /*dim=*/0, /*descending=*/true);
    l.sorted = std::get<0>(sorted).contiguous();
    l.perm = std::get<1>(sorted).to(at::kInt).contiguous();
  }
  return l;
}

// Where every per-position buffer's rows are (pointwise.cuh's conventions),
// and the lengths, on the device.
struct DeviceRows {
  RowMap map;          // (t, b) -> row
  int64_t R = 0;       // rows per direction: T*B padded, N ragged
  at::Tensor lengths;  // [B] int64 or int32, each <= the step bound
  at::Tensor starts;   // ragged: what map.starts points to
  at::Tensor order;    // packed: sorted_indices (rank -> sequence b), or undefined: identity
};

// lengths [B] on the CPU or the device; T the padded time dimension.
inline DeviceRows padded_rows(const LayerDims& dims, const at::Tensor& lengths, at::Device device) {
  DeviceRows r;
  r.lengths = lengths_on_device(lengths, dims.T, device);
  r.map = padded_map(dims.batch_first, dims.T, dims.B, nullptr);
  r.R = dims.T * dims.B;
  return r;
}

// sorted_indices [B] int64 on the device, checked to be a permutation by two
// sync-free kernels (device asserts); returned with its values clamped.
inline at::Tensor checked_permutation(const at::Tensor& sorted_indices, cudaStream_t stream) {
  const int64_t B = sorted_indices.size(0);
  const at::Tensor idx = sorted_indices.contiguous();
  at::Tensor order = at::empty({B}, idx.options());
  if (B == 0) return order;
  at::Tensor count = at::zeros({B}, idx.options().dtype(at::kInt));
  const int blocks = static_cast<int>(plan::ceil_div(B, kPointwiseThreads));
  launch_kernel(permutation_count_kernel, blocks, kPointwiseThreads, stream,
                idx.data_ptr<int64_t>(), B, count.data_ptr<int>(), order.data_ptr<int64_t>());
  launch_kernel(permutation_check_kernel, blocks, kPointwiseThreads, stream, count.data_ptr<int>(),
                B);
  return order;
}

// The ragged layouts (dims from check_ragged_args; dims.T = max_len). Offsets
// on the device need no host sync; batch_sizes lives on the CPU, so the packed
// layout's step starts and rank lengths are computed there and copied, and its
// kernels run in rank order (b = rank: hx in and h_n / grad_hx out go through
// to_rank_order / to_sequence_order).
inline DeviceRows ragged_rows(const RaggedDims& dims, const at::Tensor& seq_index,
                              const std::optional<at::Tensor>& sorted_indices, at::Device device,
                              cudaStream_t stream) {
  const int64_t B = dims.B, N = dims.N, max_len = dims.T;
  const auto long_opts = at::TensorOptions().dtype(at::kLong);
  DeviceRows r;
  r.R = N;
  if (dims.layout == kOffsets) {
    at::Tensor offsets = seq_index;
    if (offsets.is_cpu()) {
      offsets = host_checked_copy(seq_index, "seq_index (offsets)", [&](const int64_t* p) {
        check_offsets_values(p, B, N, max_len);
      });
      offsets = pinned_to_device(offsets, device);
    }
    offsets = offsets.contiguous();
    r.starts = at::empty({B + 1}, long_opts.device(device));
    r.lengths = at::empty({B}, long_opts.device(device));
    const int blocks = static_cast<int>(plan::ceil_div(B + 1, kPointwiseThreads));
    AT_DISPATCH_INDEX_TYPES(offsets.scalar_type(), "varlen_rnn_offsets_prep", [&] {
      launch_kernel(offsets_prep_kernel<index_t>, blocks, kPointwiseThreads, stream,
                    offsets.data_ptr<index_t>(), B, N, max_len, r.starts.data_ptr<int64_t>(),
                    r.lengths.data_ptr<int64_t>());
    });
    r.map = offsets_map(r.starts.data_ptr<int64_t>(), nullptr);
    return r;
  }
  const int64_t T = seq_index.size(0);
  check_not_capturing("seq_index (batch_sizes)");                    // before any pinned allocation
  const at::Tensor host_rows = pinned_like({T + 1 + B}, at::kLong);  // starts [T+1] | lengths [B]
  host_checked_copy(
      seq_index, "seq_index (batch_sizes)",
      [&](const int64_t* p) {
        check_batch_sizes_values(p, T, B, N);
        packed_rows(p, T, B, host_rows.data_ptr<int64_t>(), host_rows.data_ptr<int64_t>() + T + 1);
      },
      /*pinned=*/false);
  const at::Tensor dev_rows = pinned_to_device(host_rows, device);
  r.starts = dev_rows.narrow(0, 0, T + 1);
  r.lengths = dev_rows.narrow(0, T + 1, B);
  r.map = packed_map(r.starts.data_ptr<int64_t>(), nullptr);
  if (sorted_indices.has_value()) {
    r.order =
        sorted_indices->is_cpu()
            ? pinned_to_device(
                  host_checked_copy(*sorted_indices, "sorted_indices",
                                    [&](const int64_t* p) { check_sorted_indices_values(p, B); }),
                  device)
            : checked_permutation(*sorted_indices, stream);
  }
  return r;
}

// [D, B, H] in sequence order b -> the kernels' order (rank order when packed), and back.
inline at::Tensor to_rank_order(const DeviceRows& r, const at::Tensor& t) {
  return r.order.defined() ? t.index_select(1, r.order).contiguous() : t.contiguous();
}
inline at::Tensor to_sequence_order(const DeviceRows& r, const at::Tensor& t) {
  return r.order.defined() ? at::empty_like(t).index_copy_(1, r.order, t) : t;
}

}  // namespace cuda
}  // namespace varlen_rnn
