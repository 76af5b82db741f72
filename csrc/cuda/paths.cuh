// The per-path launchers of the CUDA backend's forward: the input projection
// GEMM, then the recurrence of a forward call on the persistent kernel
// (persistent.cuh) or the fallback (per-step GEMM + pointwise.cuh), as
// choose() (call.h) decides. The backward's are paths_backward.cuh. Every
// launcher is a template on the cell policy (csrc/cells/); the recurrence is
// written once. Included by ops_cuda.cu only (one translation unit, internal
// linkage).
#pragma once

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/addmm.h>
#include <ATen/ops/bmm.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/sum.h>
#include <ATen/ops/zeros.h>

#include <optional>
#include <tuple>
#include <type_traits>
#include <utility>

#include "call.h"
#include "launch.h"
#include "persistent.cuh"
#include "plan.h"
#include "pointwise.cuh"
#include "rows.h"
#include "runtime.h"

namespace varlen_rnn {
namespace cuda {
namespace {

using at::Tensor;
static_assert(plan::kThreads == kPersistThreads && plan::kRowsPerItem == kRows &&
                  plan::kUnitsPerItem == kUnitsPerItem,
              "plan.h must model the kernels' geometry (persistent.cuh)");

static_assert(plan::kMmaPartBytes == kPartBytes<true>,
              "plan.h must reserve the tensor-core product's scratch (mma_matvec.cuh)");
static_assert(
    [] {
      for (int tasks = 1; tasks <= 2 * kPersistWarps; ++tasks)
        for (int steps = 1; steps <= 2 * kPersistWarps; ++steps)
          if (plan::mma_splits(tasks, kPersistWarps, steps) !=
              mma_splits(tasks, kPersistWarps, steps))
            return false;
      return true;
    }(),
    "plan.h must model the tensor-core product's split of K (mma_matvec.cuh)");

static_assert(plan::kMaxRowGroups * plan::kRowsPerItem == kMaxTileRows &&
                  plan::kMaxRowGroupsMma * plan::kRowsPerItem == kMaxTileRowsMma,
              "plan.h's largest tiles must be the kernels' (persistent_common.cuh)");

PersistentShape shape_of(const plan::Cut& cut) {
  return PersistentShape{static_cast<int>(cut.J),         static_cast<int>(cut.blocks_per_dir),
                         static_cast<int>(cut.tile_rows), static_cast<int>(cut.kc),
                         static_cast<int>(cut.kc_stride), static_cast<int>(cut.w_stride),
                         static_cast<int>(cut.row_slices)};
}

// The fields both persistent launches share (see PersistentCommonArgs).
void fill_common(PersistentCommonArgs& a, const LayerCall& c, const Lengths& l,
                 const plan::Cut& cut) {
  a.lens = l.lens.data_ptr<int>();
  a.perm = l.perm.data_ptr<int>();
  a.sorted = l.sorted.data_ptr<int>();
  a.rows = c.rows.map;
  a.R = c.rows.R;
  a.T = static_cast<int>(c.dims.T);
  a.B = static_cast<int>(c.dims.B);
  a.H = static_cast<int>(c.dims.H);
  a.D = static_cast<int>(c.dims.D);
  a.ps = shape_of(cut);
}

// A refused launch leaves every output untouched; the caller runs the fallback
// (or, when persistent was forced, reports it).
bool launched_or_allowed_to_fall_back(bool launched) {
  TORCH_CHECK(launched || requested_path() != plan::Path::kPersistent,
              "VARLEN_RNN_CUDA_PATH=persistent but the persistent kernel cannot run: the driver "
              "refused its cooperative launch");
  return launched;
}

// gx = x @ w_ih^T + b_ih: [T*B, D*GH], rows in the input's layout, one GEMM for all
// steps and directions (float32: under the call's MatmulTf32Guard).
Tensor input_projection(const Tensor& x2d, const Tensor& w_ih2d,
                        const std::optional<Tensor>& b_ih) {
  if (!b_ih.has_value()) return at::mm(x2d, w_ih2d.t());
  return at::addmm(b_ih->contiguous().view({-1}), x2d, w_ih2d.t());
}

// The persistent kernel instantiation for the call: kMma (tensor cores) or not.
template <typename scalar_t>
using ForwardKernel = void (*)(PersistentForwardArgs<scalar_t, at::opmath_type<scalar_t>>);
template <typename scalar_t>
using BackwardKernel = void (*)(PersistentBackwardArgs<scalar_t, at::opmath_type<scalar_t>>);
template <typename Cell, typename scalar_t>
ForwardKernel<scalar_t> forward_kernel(bool mma) {
  using acc_t = at::opmath_type<scalar_t>;
  if constexpr (std::is_same<acc_t, float>::value) {
    if (mma) return persistent_forward_kernel<Cell, scalar_t, acc_t, true>;
  }
  return persistent_forward_kernel<Cell, scalar_t, acc_t>;
}
template <typename Cell, typename scalar_t>
BackwardKernel<scalar_t> backward_kernel(bool mma) {
  using acc_t = at::opmath_type<scalar_t>;
  if constexpr (std::is_same<acc_t, float>::value) {
    if (mma) return persistent_backward_kernel<Cell, scalar_t, acc_t, true>;
  }
  return persistent_backward_kernel<Cell, scalar_t, acc_t>;
}

// Whether a persistent pass shares h (dgh) through the tagged exchange (VARLEN_RNN_EXCHANGE):
// the exact kernels with a float state only (persistent.cuh's kTaggable).
template <typename scalar_t>
bool tagged_exchange(const plan::Choice& choice) {
  return knobs().tagged && !choice.mma && std::is_same<at::opmath_type<scalar_t>, float>::value;
}

// A kHasC cell's c state in acc_t [D, B, H], starting at c.cx; else undefined.
template <typename Cell>
Tensor c_state(const LayerCall& c) {
  if constexpr (!Cell::kHasC) return Tensor();
  Tensor cs = at::empty(c.cx.sizes(), c.opts.dtype(c.acc_type));
  cs.copy_(c.cx);
  return cs;
}

template <typename T>
T* ptr_or_null(const Tensor& t) {
  return t.defined() ? t.data_ptr<T>() : nullptr;
}

// ---- Forward: one function per path -------------------------------------------
template <typename Cell, typename scalar_t>
bool persistent_forward(const ForwardCall& c, const plan::Choice& choice) {
  const plan::Cut& cut = choice.cut;
  using acc_t = at::opmath_type<scalar_t>;
  const LayerDims& dims = c.dims;
  const Lengths l = prepare_lengths(c.rows.lengths, dims.T, true, c.stream);
  // The exchange in the storage type on 16-bit tensor cores (persistent.cuh: tile_t), with the
  // exact state of each block's own units beside it where the cell reads h.
  const bool half_exchange = choice.mma && sizeof(scalar_t) == 2;
  const bool tagged = tagged_exchange<scalar_t>(choice);
  Tensor hbuf = at::empty({2, dims.D, dims.B, dims.H},
                          tagged ? c.opts.dtype(at::kLong)  // 64-bit words of value and tag
                          : half_exchange ? c.opts
                                          : c.opts.dtype(c.acc_type));
  Tensor hown = half_exchange && Cell::kReadsHPrev
                    ? at::empty({dims.D, dims.B, dims.H}, c.opts.dtype(c.acc_type))
                    : Tensor();
  Tensor cbuf =
      Cell::kHasC ? at::empty({dims.D, dims.B, dims.H}, c.opts.dtype(c.acc_type)) : Tensor();
  PersistentForwardArgs<scalar_t, acc_t> a{};
  a.gx = c.gx.data_ptr<scalar_t>();
  a.w_hh = c.w_hh.data_ptr<scalar_t>();
  a.b_hh = ptr_or_null<scalar_t>(c.b_hh);
  a.hx = c.hx.data_ptr<scalar_t>();
  a.hbuf = hbuf.data_ptr();
  a.tagged = tagged;
  a.hown = ptr_or_null<acc_t>(hown);
  a.out = c.out.data_ptr<scalar_t>();
  a.h_n = c.h_n.data_ptr<scalar_t>();
  a.ws = c.need_workspace ? c.ws.data_ptr<workspace_t<scalar_t, acc_t>>() : nullptr;
  a.cx = ptr_or_null<scalar_t>(c.cx);
  a.cbuf = ptr_or_null<acc_t>(cbuf);
  a.c_n = ptr_or_null<scalar_t>(c.c_n);
  fill_common(a, c, l, cut);
  return launch_cooperative(forward_kernel<Cell, scalar_t>(choice.mma), cut.blocks, cut.smem, &a,
                            c.stream);
}

// The state h stays in acc_t; the GEMM runs in the storage dtype (tensor cores for
// half types, on a rounded copy h_lo that the step kernel keeps). With a projection
// (c.proj()) a step is GEMM, cell kernel, projection GEMM hcell @ W_hr^T, and the
// kernel that makes that the state and the output (pointwise.cuh's kProj).
template <typename Cell, bool kProj, typename scalar_t>
void fallback_forward(const ForwardCall& c) {
  using acc_t = at::opmath_type<scalar_t>;
  const LayerDims& dims = c.dims;
  const int64_t T = dims.T, B = dims.B, H = dims.H, D = dims.D, G = c.G, P = c.P;
  const Lengths l = prepare_lengths(c.rows.lengths, T, false, c.stream);
  const bool half = c.acc_type != c.opts.dtype().toScalarType();
  Tensor h = at::empty({D, B, P}, c.opts.dtype(c.acc_type));
  h.copy_(c.hx);
  Tensor h_lo = half ? c.hx.clone() : h;
  Tensor cs = c_state<Cell>(c);
  const Tensor w_hh_t = c.w_hh.transpose(1, 2);  // [D, P, GH]
  Tensor gh = at::empty({D, B, G * H}, c.opts);
  Tensor hcell = kProj ? at::empty({D, B, H}, c.opts) : Tensor();
  Tensor hr = kProj ? at::empty({D, B, P}, c.opts) : Tensor();
  const Tensor w_hr_t = kProj ? c.w_hr.transpose(1, 2) : Tensor();  // [D, H, P]
  const int blocks = static_cast<int>(plan::ceil_div(D * B * H, kPointwiseThreads));
  const int proj_blocks = static_cast<int>(plan::ceil_div(D * B * P, kPointwiseThreads));
  for (int64_t s = 0; s < T; ++s) {
    at::bmm_out(gh, h_lo, w_hh_t);  // b_hh: added by the step kernel
    launch_kernel(fallback_forward_step_kernel<Cell, kProj, scalar_t, acc_t>, blocks,
                  kPointwiseThreads, c.stream, c.gx.data_ptr<scalar_t>(), gh.data_ptr<scalar_t>(),
                  ptr_or_null<scalar_t>(c.b_hh), l.lens.data_ptr<int>(), h.data_ptr<acc_t>(),
                  half ? h_lo.data_ptr<scalar_t>() : nullptr, ptr_or_null<acc_t>(cs),
                  kProj ? hcell.data_ptr<scalar_t>() : c.out.data_ptr<scalar_t>(),
                  c.need_workspace ? c.ws.data_ptr<workspace_t<scalar_t, acc_t>>() : nullptr,
                  static_cast<int>(s), static_cast<int>(B), static_cast<int>(H),
                  static_cast<int>(D), c.rows.map, c.rows.R);
    if constexpr (kProj) {
      at::bmm_out(hr, hcell, w_hr_t);  // [D, B, H] @ [D, H, P]
      launch_kernel(fallback_proj_forward_kernel<scalar_t, acc_t>, proj_blocks, kPointwiseThreads,
                    c.stream, hr.data_ptr<scalar_t>(), l.lens.data_ptr<int>(), h.data_ptr<acc_t>(),
                    half ? h_lo.data_ptr<scalar_t>() : nullptr, c.out.data_ptr<scalar_t>(),
                    static_cast<int>(s), static_cast<int>(B), static_cast<int>(P),
                    static_cast<int>(D), c.rows.map);
    }
  }
  c.h_n.copy_(h);
  if constexpr (Cell::kHasC) c.c_n.copy_(cs);
}

// The fallback's forward, with the projection's GEMMs and kernels where the LSTM has one.
template <typename Cell, typename scalar_t>
void run_fallback_forward(const ForwardCall& c) {
  if constexpr (Cell::kHasC) {
    if (c.proj()) return fallback_forward<Cell, true, scalar_t>(c);
  }
  fallback_forward<Cell, false, scalar_t>(c);
}

// The recurrence of one forward call (c.gx, the outputs and the rows set), on
// the path plan.h chooses.
template <typename Cell>
void run_forward(const ForwardCall& c) {
  const plan::Pass pass = c.need_workspace ? plan::Pass::kTraining : plan::Pass::kInference;
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, c.opts.dtype().toScalarType(), "varlen_rnn_forward_cuda", [&] {
        using acc_t = at::opmath_type<scalar_t>;
        const plan::Choice choice =
            choose(c, forward_kernel<Cell, scalar_t>, pass, sizeof(scalar_t), sizeof(acc_t));
        if (choice.path == plan::Path::kPersistent &&
            launched_or_allowed_to_fall_back(persistent_forward<Cell, scalar_t>(c, choice))) {
          note_exchange(
              false,
              exchange_of(true, choice.mma, sizeof(scalar_t), tagged_exchange<scalar_t>(choice)),
              choice.cut.row_slices);
          return;
        }
        note_exchange(false, Exchange::kFallback);
        run_fallback_forward<Cell, scalar_t>(c);
      });
}

}  // namespace
}  // namespace cuda
}  // namespace varlen_rnn
