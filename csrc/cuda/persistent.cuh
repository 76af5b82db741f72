// Persistent recurrence kernels: one cooperative launch runs every step of a
// layer (both directions), with the block's slice of W_hh resident in shared
// memory for the whole pass and one grid-wide barrier per step.
//
// Work split (persistent_common.cuh's block_part): a block of direction d owns
// hidden units [j0, j0 + J) of the rows of its row slice. Rows are visited in
// the order `perm` (lengths descending), so at step s the running rows are a
// prefix (of each slice's rows too) and whole tiles of finished rows are
// skipped. Nothing is atomic: every sum has a fixed order, so results are
// bitwise identical run to run.
//
// Both kernels are templates on the cell policy (csrc/cells/): the forward's
// work item is one unit's Cell::kGates rows of W_hh, the pointwise part is
// Cell::forward / Cell::backward, the workspace holds the cell's saved values
// per unit (none where they are the output: pointwise.cuh load_saved). A cell
// with kHasC (LSTM) keeps c, and its gradient, in a buffer [D, B, H] of which
// each block reads and writes only its own units: c never crosses blocks, so
// it needs no exchange and no barrier of its own.
//
// The pieces both kernels share (staging, tile_matvec, the common args):
// persistent_common.cuh. Row conventions: see pointwise.cuh.
#pragma once

#ifndef VARLEN_RNN_HOST_EMULATION  // a test harness may run these kernels on CPU threads
#include <cooperative_groups.h>
#endif

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cstdint>
#include <type_traits>

#include "cells/cell.h"
#include "persistent_common.cuh"
#include "pointwise.cuh"
#include "tagged_exchange.cuh"

namespace varlen_rnn {
namespace cuda {

template <typename scalar_t, typename acc_t>
struct PersistentForwardArgs : PersistentCommonArgs {
  const scalar_t* gx;    // [R, D*GH]
  const scalar_t* w_hh;  // [D, GH, H]
  const scalar_t* b_hh;  // [D, GH] or nullptr
  const scalar_t* hx;    // [D, B, H]
  // [2, D, B, H] the state published for the other blocks, ping-pong by step parity, in
  // tile_t<kMma, scalar_t, acc_t>: acc_t, or the 16-bit storage type on tensor cores (the
  // mma rounds its operand to that type anyway, so the half-size copy changes no result);
  // words of value and tag (tagged_exchange.cuh) where `tagged`.
  void* hbuf;
  bool tagged;    // the exchange without a barrier per step (exact kernels, float acc_t only)
  acc_t* hown;    // [D, B, H] the state of each block's own units where hbuf is 16-bit
                  // and the cell reads h (kReadsHPrev), else nullptr
  scalar_t* out;  // [R, D*H]
  scalar_t* h_n;  // [D, B, H]
  workspace_t<scalar_t, acc_t>* ws;  // [D, R, SH] (pointwise.cuh) or nullptr
  const scalar_t* cx;                // [D, B, H] (kHasC), else nullptr
  acc_t* cbuf;                       // [D, B, H] c, each block its own units (kHasC)
  scalar_t* c_n;                     // [D, B, H] (kHasC)
};

// Dynamic shared memory: part_s (tensor cores: kPartBytes) | tile [tile_rows][kc_stride] x_t |
// acc_s [items][G][kRows] acc_t | w_s [G][J][w_stride] scalar_t (plan.h keeps every part
// 16-byte aligned).
template <typename Cell, typename scalar_t, typename acc_t, bool kMma = false>
__global__ void __launch_bounds__(kPersistThreads, kPersistMinBlocks)
    persistent_forward_kernel(const PersistentForwardArgs<scalar_t, acc_t> a) {
  constexpr int G = Cell::kGates;
  using x_t = tile_t<kMma, scalar_t, acc_t>;  // the staged tile's and hbuf's type
  constexpr bool kOwnState = !std::is_same<x_t, acc_t>::value;
  unsigned char* smem_raw = dynamic_smem();
  const PersistentShape ps = a.ps;
  const int J = ps.J, H = a.H, B = a.B, W = ps.w_stride;
  const BlockPart part = block_part(ps, B);
  const int d = part.d, j0 = part.j0, n = part.n;  // n rows: the m-th at position part.pos(m)
  const int items = tile_items(J, ps);
  float* part_s = reinterpret_cast<float*>(smem_raw);
  x_t* tile = reinterpret_cast<x_t*>(smem_raw + kPartBytes<kMma>);
  acc_t* acc_s = reinterpret_cast<acc_t*>(tile + ps.tile_rows * ps.kc_stride);
  scalar_t* w_s = reinterpret_cast<scalar_t*>(acc_s + items * G * kRows);
  check_smem_parts(tile, acc_s, w_s);

  // Prologue (block-local, so no grid barrier): the W_hh slice (zero rows past
  // H, zero padding past column H), then for the own rows and units the zeros
  // of padded outputs and of their workspace rows, h_n (and c_n) of
  // zero-length rows, c.
  const bool padded = has_padding(a.rows);
  const int64_t DH = static_cast<int64_t>(a.D) * H;
  for (int e = threadIdx.x; e < G * J * W; e += blockDim.x) {
    const int g = e / (J * W), jl = (e / W) % J, k = e % W;
    const int j = j0 + jl;
    w_s[e] = j < H && k < H
                 ? smem_weight<kMma>(a.w_hh[(static_cast<int64_t>(d) * G * H + g * H + j) * H + k])
                 : scalar_t(0);
  }
  // The tagged exchange (tagged_exchange.cuh): on CUDA cores with a float state only.
  constexpr bool kTaggable = !kMma && std::is_same<acc_t, float>::value;
  const bool tagged = kTaggable && a.tagged;
  const acc_t no_saved[Cell::kSaved] = {};
  for (int e = threadIdx.x; e < n * J; e += blockDim.x) {
    const int i = part.pos(e / J), j = j0 + e % J;
    if (j >= H) continue;
    const int b = a.perm[i], len = a.sorted[i];
    for (int t = padded ? len : a.T; t < a.T; ++t) {
      const int64_t row = a.rows.row(t, b);
      a.out[row * DH + static_cast<int64_t>(d) * H + j] = scalar_t(0);
      store_saved<Cell>(a.ws, static_cast<int64_t>(d) * a.R + row, j, H, no_saved);
    }
    const int64_t off = (static_cast<int64_t>(d) * B + b) * H + j;
    if (len == 0) a.h_n[off] = a.hx[off];
    if constexpr (Cell::kHasC) {
      a.cbuf[off] = static_cast<acc_t>(a.cx[off]);
      if (len == 0) a.c_n[off] = a.cx[off];
    }
    if (tagged) {  // tag 0 in both buffers: no earlier launch's word passes for this one's
      uint64_t* words = static_cast<uint64_t*>(a.hbuf);
      words[off] = 0;
      words[static_cast<int64_t>(a.D) * B * H + off] = 0;
    }
  }
  __syncthreads();

  const scalar_t* hx_d = a.hx + static_cast<int64_t>(d) * B * H;
  const int64_t buf_stride = static_cast<int64_t>(a.D) * B * H;
  const int max_len = a.sorted[0];
  // The exact kernel with K in one chunk still holds every running row's whole state in its tile
  // after the product: the cell's h_prev is read there, not from L2 (a trip per step saved).
  const bool h_in_tile = !kMma && ps.kc >= H;
  cooperative_groups::grid_group grid = cooperative_groups::this_grid();
  if (tagged) grid.sync();  // the zeroed tags, before any block's first poll
  for (int s = 0; s < max_len; ++s) {
    const int64_t cur_off = (s & 1) * buf_stride + static_cast<int64_t>(d) * B * H;
    const int64_t nxt_off = ((s + 1) & 1) * buf_stride + static_cast<int64_t>(d) * B * H;
    const x_t* cur = static_cast<const x_t*>(a.hbuf) + cur_off;
    x_t* nxt = static_cast<x_t*>(a.hbuf) + nxt_off;
    uint64_t* const words = tagged ? static_cast<uint64_t*>(a.hbuf) : nullptr;
    const uint64_t* cur_tagged = tagged ? words + cur_off : nullptr;
    uint64_t* nxt_tagged = tagged ? words + nxt_off : nullptr;
    // The own rows m = base .. base + tile_rows - 1, a tile at a time, while they run.
    for (int base = 0; base < n && a.sorted[part.pos(base)] > s; base += ps.tile_rows) {
      auto locate = [&](int r) -> int64_t {  // a tile row's h offset (tile_matvec: per K chunk)
        const int m = base + r;
        if (m >= n) return -1;
        const int i = part.pos(m);
        return a.sorted[i] > s ? static_cast<int64_t>(a.perm[i]) * H : -1;
      };
      auto stage = [&](x_t* dst, int64_t off, int k0, int kc, int lane) {
        if (s == 0) {
          stage_row<false>(dst, off < 0 ? nullptr : hx_d + off + k0, kc, lane);
        } else if (tagged) {
          if constexpr (kTaggable)  // h_s: the words step s - 1 wrote, tag s
            stage_row_tagged(dst, off < 0 ? nullptr : cur_tagged + off + k0, kc, lane, s);
        } else {
          stage_row<true>(dst, off < 0 ? nullptr : cur + off + k0, kc, lane);
        }
      };
      // Pointwise element e of the tile: unit j's own row m, its position's row.
      auto unit_of = [&](int e) { return j0 + (e / kRows) % J; };
      auto slot_of = [&](int e) { return base + (e / kRows / J) * kRows + e % kRows; };
      auto runs = [&](int j, int m) { return j < H && m < n && a.sorted[part.pos(m)] > s; };
      auto row_of = [&](int m) {
        const int i = part.pos(m);
        return a.rows.row(step_time(d, a.sorted[i], s), a.perm[i]);
      };
      // A running element's gate inputs: gx, and b_hh (zero where there is none).
      auto gate_inputs = [&](int j, int64_t row, acc_t(&gx)[G], acc_t(&bias)[G]) {
        load_cols<G>(a.gx + row * G * DH + static_cast<int64_t>(d) * G * H, j, H, gx);
        VR_UNROLL
        for (int g = 0; g < G; ++g)
          bias[g] =
              a.b_hh != nullptr ? static_cast<acc_t>(a.b_hh[d * G * H + g * H + j]) : acc_t(0);
      };
      // The thread's first element's gate inputs are loaded before the product, so that their
      // trip to memory overlaps the staging's instead of following the product.
      const int e0 = threadIdx.x;
      acc_t gx0[G] = {}, bias0[G] = {};
      if (e0 < items * kRows && runs(unit_of(e0), slot_of(e0)))
        gate_inputs(unit_of(e0), row_of(slot_of(e0)), gx0, bias0);
      recurrent_matvec<G, kMma>(w_s, J, J, 1, H, ps, tile, acc_s, part_s, locate, stage);
      if (tagged) fence_tagged();  // release: the block's reads of h_s before its words of h_s+1
      for (int e = e0; e < items * kRows; e += blockDim.x) {
        const int j = unit_of(e), m = slot_of(e);
        if (!runs(j, m)) continue;
        const int i = part.pos(m), b = a.perm[i], len = a.sorted[i];
        const int64_t row = row_of(m);
        acc_t gx[G], bias[G];
        if (e == e0) {
          VR_UNROLL
          for (int g = 0; g < G; ++g) gx[g] = gx0[g], bias[g] = bias0[g];
        } else {
          gate_inputs(j, row, gx, bias);
        }
        const acc_t* acc = acc_s + (e / kRows) * G * kRows + e % kRows;
        acc_t gh[G];
        VR_UNROLL
        for (int g = 0; g < G; ++g) {
          gh[g] = acc[g * kRows];
          if (a.b_hh != nullptr) gh[g] += bias[g];
        }
        const int64_t hoff = static_cast<int64_t>(b) * H + j;
        CellState<acc_t> prev, next;
        const int64_t coff = static_cast<int64_t>(d) * B * H + hoff;
        if constexpr (Cell::kReadsHPrev) {
          if constexpr (kOwnState) {
            prev.h = s == 0 ? static_cast<acc_t>(hx_d[hoff]) : a.hown[coff];  // not the 16-bit copy
          } else if (h_in_tile) {
            prev.h = tile[(m - base) * ps.kc_stride + j];  // as staged: cur's, or hx's at s = 0
          } else if (s == 0) {
            prev.h = static_cast<acc_t>(hx_d[hoff]);
          } else if (tagged) {  // the thread's own word of the last step
            prev.h = static_cast<acc_t>(tagged_value(load_tagged(cur_tagged + hoff)));
          } else {
            prev.h = __ldcg(cur + hoff);
          }
        }
        if constexpr (Cell::kHasC) prev.c = a.cbuf[coff];
        acc_t saved[Cell::kSaved];
        Cell::template forward<acc_t>(gx, gh, prev, next, saved);
        if (tagged) {
          store_tagged(nxt_tagged + hoff, tag_word(static_cast<float>(next.h), s + 1));
        } else {
          nxt[hoff] = static_cast<x_t>(next.h);
        }
        if constexpr (kOwnState && Cell::kReadsHPrev) a.hown[coff] = next.h;
        a.out[row * DH + static_cast<int64_t>(d) * H + j] = static_cast<scalar_t>(next.h);
        if (s == len - 1) a.h_n[coff] = static_cast<scalar_t>(next.h);
        if constexpr (Cell::kHasC) {
          a.cbuf[coff] = next.c;
          if (s == len - 1) a.c_n[coff] = static_cast<scalar_t>(next.c);
        }
        store_saved<Cell>(a.ws, static_cast<int64_t>(d) * a.R + row, j, H, saved);
      }
      // The next tile's staging overwrites this one, which the loop above may still read.
      if (h_in_tile && base + ps.tile_rows < n && a.sorted[part.pos(base + ps.tile_rows)] > s)
        __syncthreads();
    }
    if (tagged) {
      __syncthreads();  // the tile and accumulators, which the next step's staging overwrites
    } else {
      grid.sync();
    }
  }
}

template <typename scalar_t, typename acc_t>
struct PersistentBackwardArgs : PersistentCommonArgs {
  const scalar_t* grad_out;                // [R, D*H], or null: zero
  const scalar_t* out;                     // [R, D*H] forward output
  const scalar_t* hx;                      // [D, B, H]
  const scalar_t* grad_h_n;                // [D, B, H]
  const workspace_t<scalar_t, acc_t>* ws;  // [D, R, SH] (pointwise.cuh)
  const scalar_t* w_hh;                    // [D, GH, H]
  acc_t* dh;     // [D, B, H] gradient reaching the state; each block its slice
  scalar_t* dg;  // [D, R, >= GH] row stride ldg (pointwise.cuh): the exchange too
  int64_t ldg;
  scalar_t* hprev;           // [D, R, H]
  scalar_t* grad_hx;         // [D, B, H]
  const scalar_t* grad_c_n;  // [D, B, H] (kHasC), else nullptr
  acc_t* dc;                 // [D, B, H] gradient reaching c, each block its units (kHasC)
  scalar_t* grad_cx;         // [D, B, H] (kHasC)
  // [2, D, B, GH] the exchange of dgh_s in words of value and tag (tagged_exchange.cuh), by step
  // parity, each row in the order phase 2 stages it; nullptr: through dg and the grid barrier.
  uint64_t* tagged;
};

// Per step (s = max_len-1 .. 0): phase 1 turns the block's own dh (and dc)
// slice into gate gradients (pointwise), grid barrier, phase 2 adds
// dgh_s @ W_hh[:, own] to the own dh slice. Phase 2 only feeds the same
// block's next phase 1, and each step writes its own dgh rows, so one barrier
// per step suffices; dc never leaves the block. Phase 2 groups the block's
// units by kUnitsPerItem (U = ceil(J/3) groups), so its dot products have the
// GRU forward's shape whatever the cell: 3 weight rows x kRows rows of dgh.
// Shared memory: part_s (tensor cores) | tile | acc_s [items][3][kRows] | w_s [3U][w_stride]
// (W_hh^T slice, zero rows past J, zero columns past GH). dgh is the exchange, kept
// where the weight gradients read it (dg's rows: dgx's columns, and dghn's for
// a GRU's last gate: pointwise.cuh): already in the storage type, staged as it
// is on 16-bit tensor cores. dg may be the workspace's first columns: phase 1's
// thread of a unit and position reads its saved values, then writes its
// gradients over them; phase 2 reads only gradients, after the barrier.
template <typename Cell, typename scalar_t, typename acc_t, bool kMma = false>
__global__ void __launch_bounds__(kPersistThreads, kPersistMinBlocks)
    persistent_backward_kernel(const PersistentBackwardArgs<scalar_t, acc_t> a) {
  constexpr int G = Cell::kGates, NU = kUnitsPerItem;
  using x_t = tile_t<kMma, scalar_t, acc_t>;
  unsigned char* smem_raw = dynamic_smem();
  const PersistentShape ps = a.ps;
  const int J = ps.J, H = a.H, B = a.B, T = a.T, W = ps.w_stride;
  const BlockPart part = block_part(ps, B);
  const int d = part.d, j0 = part.j0, n = part.n;  // n rows: the m-th at position part.pos(m)
  const int U = (J + NU - 1) / NU;
  const int items = tile_items(U, ps);
  float* part_s = reinterpret_cast<float*>(smem_raw);
  x_t* tile = reinterpret_cast<x_t*>(smem_raw + kPartBytes<kMma>);
  acc_t* acc_s = reinterpret_cast<acc_t*>(tile + ps.tile_rows * ps.kc_stride);
  scalar_t* w_s = reinterpret_cast<scalar_t*>(acc_s + items * NU * kRows);
  check_smem_parts(tile, acc_s, w_s);
  const int64_t dBH = static_cast<int64_t>(d) * B * H;
  const int64_t DH = static_cast<int64_t>(a.D) * H;
  const int64_t GH = static_cast<int64_t>(G) * H;
  const bool padded = has_padding(a.rows);
  const acc_t zeros[G] = {};
  const int64_t dR = static_cast<int64_t>(d) * a.R;  // direction d's first row of [D, R, .]
  // The exchange: dgh's columns below `shared` are dgx's (the first of a dg row), the rest
  // (a GRU's last gate) dghn's, which follow dgx's GH columns.
  const scalar_t* dg_d = a.dg + dR * a.ldg;  // direction d's row 0
  const int shared = Cell::kHiddenGradsDiffer ? (G - 1) * H : G * H;
  // The tagged exchange (tagged_exchange.cuh): on CUDA cores with a float state only. A row of
  // words holds dgh_s as phase 2 stages it: dgx's columns below `shared`, then dghn's.
  constexpr bool kTaggable = !kMma && std::is_same<acc_t, float>::value;
  const bool tagged = kTaggable && a.tagged != nullptr;
  const int64_t tag_stride = static_cast<int64_t>(a.D) * B * GH;  // one parity's words

  for (int e = threadIdx.x; e < W * NU * U; e += blockDim.x) {
    const int jl = e % (NU * U), m = e / (NU * U), j = j0 + jl;
    w_s[static_cast<int64_t>(jl) * W + m] =
        jl < J && j < H && m < GH
            ? smem_weight<kMma>(a.w_hh[(static_cast<int64_t>(d) * GH + m) * H + j])
            : scalar_t(0);
  }
  for (int e = threadIdx.x; e < n * J; e += blockDim.x) {  // the own rows and units
    const int i = part.pos(e / J), j = j0 + e % J;
    if (j >= H) continue;
    const int b = a.perm[i];
    const int64_t off = dBH + static_cast<int64_t>(b) * H + j;
    a.dh[off] = static_cast<acc_t>(a.grad_h_n[off]);
    if constexpr (Cell::kHasC) a.dc[off] = static_cast<acc_t>(a.grad_c_n[off]);
    for (int t = padded ? a.sorted[i] : T; t < T; ++t) {  // padded (t, b): zero gradients
      const int64_t row = a.rows.row(t, b);
      store_gate_grads<Cell>(a.dg + (dR + row) * a.ldg, j, H, zeros, zeros);
      a.hprev[(dR + row) * H + j] = scalar_t(0);
    }
    if (tagged) {  // tag 0 in both buffers: no earlier launch's word passes for this one's
      for (int g = 0; g < G; ++g) {
        const int64_t w = (static_cast<int64_t>(d) * B + b) * GH + g * H + j;
        a.tagged[w] = 0;
        a.tagged[tag_stride + w] = 0;
      }
    }
  }
  __syncthreads();

  cooperative_groups::grid_group grid = cooperative_groups::this_grid();
  if (tagged) grid.sync();  // the zeroed tags, before any block's first poll
  for (int s = a.sorted[0] - 1; s >= 0; --s) {
    // dgh_s's words: step s writes them with tag s + 1, by parity
    uint64_t* words =
        tagged ? a.tagged + (s & 1) * tag_stride + static_cast<int64_t>(d) * B * GH : nullptr;
    if (tagged) fence_tagged();  // release: the last step's reads of dgh before these words
    for (int e = threadIdx.x; e < n * J; e += blockDim.x) {
      const int i = part.pos(e / J), j = j0 + e % J;
      if (a.sorted[i] <= s) break;  // sorted descending: the rest are finished too
      if (j >= H) continue;
      const int b = a.perm[i], len = a.sorted[i];
      const int t = step_time(d, len, s);
      const int64_t col = static_cast<int64_t>(d) * H + j;
      const int64_t hoff = dBH + static_cast<int64_t>(b) * H + j;
      const int64_t row = a.rows.row(t, b);
      CellState<acc_t> grad, grad_prev;
      grad.h = a.dh[hoff] + grad_output_at<acc_t>(a.grad_out, row * DH + col);
      if constexpr (Cell::kHasC) grad.c = a.dc[hoff];
      const scalar_t h_prev_s =
          s == 0 ? a.hx[hoff] : a.out[a.rows.row(prev_time(d, t), b) * DH + col];
      const int64_t drow = dR + row;
      acc_t saved[Cell::kSaved], dgx[G], dgh[G];
      load_saved<Cell>(a.ws, drow, a.out, row * DH + static_cast<int64_t>(d) * H, j, H, saved);
      Cell::backward(grad, static_cast<acc_t>(h_prev_s), saved, dgx, dgh, grad_prev);
      if (tagged) {  // the words first: the staging of other blocks waits on them
        VR_UNROLL
        for (int g = 0; g < G; ++g) {
          const acc_t v = Cell::kHiddenGradsDiffer && g == G - 1 ? dgh[g] : dgx[g];
          const float staged = static_cast<float>(static_cast<scalar_t>(v));  // as dg holds it
          store_tagged(words + static_cast<int64_t>(b) * GH + g * H + j, tag_word(staged, s + 1));
        }
      }
      store_gate_grads<Cell>(a.dg + drow * a.ldg, j, H, dgx, dgh);
      a.hprev[drow * H + j] = h_prev_s;
      a.dh[hoff] = grad_prev.h;
      if constexpr (Cell::kHasC) a.dc[hoff] = grad_prev.c;
    }
    if (tagged) {
      __syncthreads();  // dh, which phase 2 adds to, from phase 1's threads
    } else {
      grid.sync();
    }
    for (int base = 0; base < n && a.sorted[part.pos(base)] > s; base += ps.tile_rows) {
      auto locate = [&](int r) -> int64_t {  // a tile row's position (tile_matvec: per K chunk)
        const int m = base + r;              // (tagged: the row's words, by batch index)
        if (m >= n) return -1;
        const int i = part.pos(m);
        if (a.sorted[i] <= s) return -1;
        return tagged ? static_cast<int64_t>(a.perm[i]) * GH
                      : a.rows.row(step_time(d, a.sorted[i], s), a.perm[i]);
      };
      // A row of dgh_s, columns [k0, k0 + kc): dg's row up to `shared`, then (a GRU's last
      // gate) its dghn columns from GH on; or its words, in that order already.
      auto stage = [&](x_t* dst, int64_t row, int k0, int kc, int lane) {
        if (tagged) {
          if constexpr (kTaggable)
            stage_row_tagged(dst, row < 0 ? nullptr : words + row + k0, kc, lane, s + 1);
          return;
        }
        if (row < 0) return stage_row<true>(dst, static_cast<const scalar_t*>(nullptr), kc, lane);
        const int n = shared <= k0 ? 0 : min(kc, shared - k0);  // columns from dgx
        const scalar_t* dg_row = dg_d + row * a.ldg;
        if (n > 0) stage_row<true>(dst, dg_row + k0, n, lane);
        if constexpr (Cell::kHiddenGradsDiffer) {
          if (n < kc) stage_row<true>(dst + n, dg_row + GH + (k0 + n - shared), kc - n, lane);
        }
      };
      recurrent_matvec<NU, kMma>(w_s, U, 1, NU, static_cast<int>(GH), ps, tile, acc_s, part_s,
                                 locate, stage);
      for (int e = threadIdx.x; e < items * NU * kRows; e += blockDim.x) {
        const int item = e / (NU * kRows), g = (e / kRows) % NU, r = e % kRows;
        const int jl = (item % U) * NU + g, j = j0 + jl;
        const int m = base + (item / U) * kRows + r;
        if (jl >= J || j >= H || m >= n) continue;
        const int i = part.pos(m);
        if (a.sorted[i] <= s) continue;
        a.dh[dBH + static_cast<int64_t>(a.perm[i]) * H + j] += acc_s[e];
      }
    }
    __syncthreads();
  }
  for (int e = threadIdx.x; e < n * J; e += blockDim.x) {
    const int b = a.perm[part.pos(e / J)], j = j0 + e % J;
    if (j >= H) continue;
    const int64_t hoff = dBH + static_cast<int64_t>(b) * H + j;
    a.grad_hx[hoff] = static_cast<scalar_t>(a.dh[hoff]);
    if constexpr (Cell::kHasC) a.grad_cx[hoff] = static_cast<scalar_t>(a.dc[hoff]);
  }
}

}  // namespace cuda
}  // namespace varlen_rnn
