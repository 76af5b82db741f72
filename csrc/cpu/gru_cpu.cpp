// CPU kernels for varlen_rnn: one GRU layer (both directions) over a padded
// batch driven by lengths, forward and backward, + TORCH_LIBRARY_IMPL(CPU).
//
// Schedule. Rows are visited longest-first through `perm`, a stable argsort of
// the B lengths; the caller's tensors are never permuted. The hidden state is
// kept in that sorted order, so at step s the running rows are exactly the
// first active[s] rows: the per-step GEMM runs on a contiguous block and
// finished sequences cost nothing. The reverse direction uses the same
// schedule: at step s row i is at time len[i]-1-s.
//
// Packed layout. Valid positions (t, i) are numbered offset[t] + i (the
// PackedSequence order). The input projection runs once over the N packed rows
// (no work on padding), and the workspace ([D, N, 4H]: nothing for padding)
// stores each direction's step s at rows offset[s] + i, so the backward's
// weight GEMMs cover exactly N rows.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <numeric>
#if __has_include(<bit>)
#include <bit>
#endif
#include <type_traits>
#include <vector>

#include "gate_math.h"
#include "gru.h"

namespace varlen_rnn {
namespace {

struct Schedule {
  std::vector<int64_t> perm;    // [B] perm[i]: batch row of the i-th longest sequence
  std::vector<int64_t> len;     // [B] len[i] = lengths[perm[i]], descending
  std::vector<int64_t> active;  // [max_len] rows with length > s
  std::vector<int64_t> offset;  // [max_len + 1] packed row of (s, 0); offset[max_len] = N
  int64_t max_len = 0;
  int64_t N() const { return offset.back(); }
};

Schedule make_schedule(const at::Tensor& lengths, int64_t T) {
  const at::Tensor l = lengths.to(at::kLong).contiguous();
  const int64_t* p = l.const_data_ptr<int64_t>();
  const int64_t B = l.numel();
  for (int64_t b = 0; b < B; ++b) {
    TORCH_CHECK(p[b] >= 0 && p[b] <= T, "lengths must be in [0, T] with T=", T,
                " (the input's time dimension), got lengths[", b, "]=", p[b]);
  }
  Schedule s;
  s.perm.resize(B);
  std::iota(s.perm.begin(), s.perm.end(), 0);
  std::stable_sort(s.perm.begin(), s.perm.end(),
                   [p](int64_t a, int64_t b) { return p[a] > p[b]; });
  s.len.resize(B);
  for (int64_t i = 0; i < B; ++i) s.len[i] = p[s.perm[i]];
  s.max_len = B > 0 ? s.len[0] : 0;
  s.active.assign(s.max_len, 0);
  int64_t i = B;
  for (int64_t t = 0; t < s.max_len; ++t) {
    while (i > 0 && s.len[i - 1] <= t) --i;
    s.active[t] = i;
  }
  s.offset.assign(s.max_len + 1, 0);
  for (int64_t t = 0; t < s.max_len; ++t) s.offset[t + 1] = s.offset[t] + s.active[t];
  return s;
}

// Row of the 2-D input view [T*B or B*T, I] for each packed position.
at::Tensor packed_rows(const Schedule& s, const LayerDims& d) {
  at::Tensor idx = at::empty({s.N()}, at::kLong);
  int64_t* q = idx.data_ptr<int64_t>();
  for (int64_t t = 0; t < s.max_len; ++t)
    for (int64_t i = 0; i < s.active[t]; ++i)
      q[s.offset[t] + i] = d.batch_first ? s.perm[i] * d.T + t : t * d.B + s.perm[i];
  return idx;
}

// Rows of a 2-D padded view at the padding positions t >= length: the only
// rows of output / grad_input that no kernel writes, so the only ones zeroed.
at::Tensor padding_rows(const Schedule& s, const LayerDims& d) {
  at::Tensor idx = at::empty({d.T * d.B - s.N()}, at::kLong);
  int64_t* q = idx.data_ptr<int64_t>();
  for (int64_t i = 0; i < d.B; ++i)
    for (int64_t t = s.len[i]; t < d.T; ++t)
      *q++ = d.batch_first ? s.perm[i] * d.T + t : t * d.B + s.perm[i];
  return idx;
}

at::Tensor perm_tensor(const Schedule& s) {
  return at::tensor(s.perm, at::TensorOptions().dtype(at::kLong));
}

// Rows per parallel task: ~4K elements, about ten microseconds of gate math
// (memory-bound on gx). Between two GEMMs the BLAS threads are still awake, so
// handing them rows costs less than that; measured 3-7% faster forward than
// 8K-element tasks at B=16..128, H=128..512 on 2 threads.
int64_t row_grain(int64_t H) { return std::max<int64_t>(1, 4096 / H); }

// Time of sorted row i at step s of direction `reverse`.
inline int64_t time_of(const Schedule& s, int64_t i, int64_t step, bool reverse) {
  return reverse ? s.len[i] - 1 - step : step;
}

// exp and tanh for float in plain arithmetic, so that GCC vectorizes the gate
// loops (a call into libm keeps a loop scalar). Cody-Waite range reduction and
// the Cephes degree-6 polynomial: within a few ulp of expf. No selects after
// the math (GCC won't if-convert them): the clamps are chosen so that the edge
// cases come out exact by themselves, matching nn.GRU on non-finite input.
struct VecMathF32 {
  // std::bit_cast is C++20, but torch < 2.13 builds extensions with -std=c++17
  // (the GPU machine's torch 2.11 does): there the same bits go through memcpy,
  // which GCC folds to a register move, so the loops still vectorize.
  static inline float as_float(int32_t i) {
#if defined(__cpp_lib_bit_cast)
    return std::bit_cast<float>(i);
#else
    float f;
    std::memcpy(&f, &i, sizeof f);
    return f;
#endif
  }
  static inline float exp(float x) {
    // Up to 89, past expf's overflow at 88.72: 2^k is applied in two halves, so
    // exp(89) and exp(+inf) overflow to inf as expf does (sigmoid(-inf) = 0).
    x = x > 89.0f ? 89.0f : x;
    x = x < -87.0f ? -87.0f : x;
    const float t = x * 1.44269504088896341f;  // round(x / ln 2), without a libm call
    const int32_t k = static_cast<int32_t>(t + (t >= 0.0f ? 0.5f : -0.5f));
    const float kf = static_cast<float>(k);
    const float r = x - kf * 0.693359375f + kf * 2.12194440e-4f;
    float p = 1.9875691500e-4f;
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    p = p * r * r + r + 1.0f;
    const int32_t k1 = k >> 1;
    return p * as_float((k1 + 127) << 23) * as_float((k - k1 + 127) << 23);
  }
  static inline float tanh(float x) {
    // At |x| = 10 the formula rounds to exactly +-1, as tanhf does from 9.01 on.
    x = x > 10.0f ? 10.0f : x;
    x = x < -10.0f ? -10.0f : x;
    return 1.0f - 2.0f / (exp(2.0f * x) + 1.0f);
  }
};


// The forward gate pass of one row at one step. gx [3H] input projection,
// gh [3H] = W_hh h (no bias), bh [3H] = b_hh, h [H] updated in place,
// out [H] the output row, ws [4H] (r|z|n|hn) or null in inference.
template <typename T, typename Math, bool kSave>
inline void forward_row(const T* __restrict gx, const T* __restrict gh, const T* __restrict bh,
                        T* __restrict h, T* __restrict out, T* __restrict ws, int64_t H) {
  for (int64_t j = 0; j < H; ++j) {
    GruCellSaved<T> sv;
    const T hnew = gru_cell_forward<T, Math>(gx[j], gx[H + j], gx[2 * H + j], gh[j] + bh[j],
                                             gh[H + j] + bh[H + j], gh[2 * H + j] + bh[2 * H + j],
                                             h[j], sv);
    h[j] = hnew;
    out[j] = hnew;
    if constexpr (kSave) {
      ws[j] = sv.r;
      ws[H + j] = sv.z;
      ws[2 * H + j] = sv.n;
      ws[3 * H + j] = sv.hn;
    }
  }
}

template <typename T, typename Math>
inline void forward_row(const T* gx, const T* gh, const T* bh, T* h, T* out, T* ws, int64_t H) {
  if (ws != nullptr) {
    forward_row<T, Math, true>(gx, gh, bh, h, out, ws, H);
  } else {
    forward_row<T, Math, false>(gx, gh, bh, h, out, ws, H);
  }
}

// The backward gate pass of one row at one step. dh [H] in: gradient reaching
// h' from later steps, out: its direct part for h (the W_hh^T part is a GEMM);
// go [H] grad_output row; prev [H] h before the step; ws [4H] the forward's
// saved gates. Writes the pre-activation gradients dgx [3H] (input side),
// dgh [3H] (hidden side, for this step's GEMM), dghn [H] (its n part, kept
// for dW_hh; the r|z parts equal dgx's) and hp [H] = prev (for dW_hh).
template <typename T>
inline void backward_row(T* __restrict dh, const T* __restrict go, const T* __restrict prev,
                         const T* __restrict ws, T* __restrict dgx, T* __restrict dgh,
                         T* __restrict dghn, T* __restrict hp, int64_t H) {
  for (int64_t j = 0; j < H; ++j) {
    const GruCellSaved<T> sv{ws[j], ws[H + j], ws[2 * H + j], ws[3 * H + j]};
    const auto g = gru_cell_backward<T>(dh[j] + go[j], prev[j], sv);
    dgx[j] = dgh[j] = g.dr;
    dgx[H + j] = dgh[H + j] = g.dz;
    dgx[2 * H + j] = g.dn;
    dgh[2 * H + j] = dghn[j] = g.dhn;
    hp[j] = prev[j];
    dh[j] = g.dh_prev;
  }
}

// float rows are compiled for several ISAs and picked at load time (GCC
// target_clones), so one wheel runs everywhere and uses AVX-512/AVX2 where present.
// setup.py adds -fno-trapping-math, without which GCC won't if-convert the clamps.
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
#define VR_CPU_CLONES \
  __attribute__((flatten, target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define VR_CPU_CLONES
#endif

VR_CPU_CLONES void forward_row_f32(const float* gx, const float* gh, const float* bh, float* h,
                                   float* out, float* ws, int64_t H) {
  forward_row<float, VecMathF32>(gx, gh, bh, h, out, ws, H);
}
VR_CPU_CLONES void backward_row_f32(float* dh, const float* go, const float* prev,
                                    const float* ws, float* dgx, float* dgh, float* dghn,
                                    float* hp, int64_t H) {
  backward_row<float>(dh, go, prev, ws, dgx, dgh, dghn, hp, H);
}

template <typename T>
void forward_row_any(const T* gx, const T* gh, const T* bh, T* h, T* out, T* ws, int64_t H) {
  if constexpr (std::is_same_v<T, float>) {
    forward_row_f32(gx, gh, bh, h, out, ws, H);
  } else {
    forward_row<T, PreciseMath>(gx, gh, bh, h, out, ws, H);
  }
}
template <typename T>
void backward_row_any(T* dh, const T* go, const T* prev, const T* ws, T* dgx, T* dgh, T* dghn,
                      T* hp, int64_t H) {
  if constexpr (std::is_same_v<T, float>) {
    backward_row_f32(dh, go, prev, ws, dgx, dgh, dghn, hp, H);
  } else {
    backward_row<T>(dh, go, prev, ws, dgx, dgh, dghn, hp, H);
  }
}

template <typename scalar_t>
void forward_impl(const LayerDims& d, const Schedule& s, const at::Tensor& input2d,
                  const at::Tensor& hx, const at::Tensor& w_ih, const at::Tensor& w_hh,
                  const std::optional<at::Tensor>& b_ih, const std::optional<at::Tensor>& b_hh,
                  at::Tensor& output, at::Tensor& h_n, at::Tensor* workspace) {
  const int64_t H = d.H, G = 3 * H, N = s.N();
  at::Tensor xp = input2d.index_select(0, packed_rows(s, d));  // [N, I]
  const at::Tensor perm = perm_tensor(s);
  const int64_t st = d.stride_t(d.D * H), sb = d.stride_b(d.D * H);
  scalar_t* out_p = output.data_ptr<scalar_t>();
  at::Tensor gh = at::empty({d.B, G}, input2d.options());  // [B, 3H] per-step W_hh h
  const at::Tensor b_hh_all = b_hh ? *b_hh : at::zeros({d.D, G}, input2d.options());
  const scalar_t* b_hh_p = b_hh_all.const_data_ptr<scalar_t>();

  for (int64_t dir = 0; dir < d.D; ++dir) {
    const bool reverse = dir == 1;
    // [N, 3H]: this direction's input projection, one GEMM over the valid
    // positions (one direction at a time: half the memory of both at once).
    // Weights are transposed once per call: BLAS runs ~1.1-1.5x faster on a
    // contiguous [K, N] right operand than on a transposed view (measured, MKL).
    const at::Tensor w_ih_t = w_ih[dir].t().contiguous();  // [I, 3H]
    const at::Tensor gx = b_ih ? at::addmm((*b_ih)[dir], xp, w_ih_t) : at::mm(xp, w_ih_t);
    if (dir == d.D - 1) xp.reset();
    const scalar_t* gx_p = gx.const_data_ptr<scalar_t>();
    at::Tensor h = hx[dir].index_select(0, perm);  // [B, H] sorted order
    const at::Tensor w_hh_t = w_hh[dir].t().contiguous();  // [H, 3H]
    const scalar_t* bhh = b_hh_p + dir * G;
    scalar_t* h_p = h.data_ptr<scalar_t>();
    const scalar_t* gh_p = gh.const_data_ptr<scalar_t>();
    scalar_t* ws_p = workspace ? workspace->data_ptr<scalar_t>() + dir * N * 4 * H : nullptr;
    for (int64_t step = 0; step < s.max_len; ++step) {
      const int64_t n = s.active[step];
      at::Tensor gh_n = gh.narrow(0, 0, n);
      at::mm_out(gh_n, h.narrow(0, 0, n), w_hh_t);
      at::parallel_for(0, n, row_grain(H), [&](int64_t i0, int64_t i1) {
        for (int64_t i = i0; i < i1; ++i) {
          const int64_t t = time_of(s, i, step, reverse);
          const scalar_t* gxr = gx_p + (s.offset[t] + i) * G;
          const scalar_t* ghr = gh_p + i * G;
          scalar_t* hr = h_p + i * H;
          scalar_t* outr = out_p + t * st + s.perm[i] * sb + dir * H;
          scalar_t* wsr = ws_p ? ws_p + (s.offset[step] + i) * 4 * H : nullptr;
          forward_row_any<scalar_t>(gxr, ghr, bhh, hr, outr, wsr, H);
        }
      });
    }
    h_n[dir].index_copy_(0, perm, h);
  }
}

template <typename scalar_t>
void backward_impl(const LayerDims& d, const Schedule& s, const at::Tensor& grad_output,
                   const at::Tensor& grad_h_n, const at::Tensor& input2d, const at::Tensor& hx,
                   const at::Tensor& w_ih, const at::Tensor& w_hh, const at::Tensor& output,
                   const at::Tensor& workspace, at::Tensor& grad_input2d, at::Tensor& grad_hx,
                   at::Tensor& grad_w_ih, at::Tensor& grad_w_hh, at::Tensor& grad_b_ih,
                   at::Tensor& grad_b_hh) {
  const int64_t H = d.H, G = 3 * H, DG = d.D * G, N = s.N();
  const at::Tensor perm = perm_tensor(s);
  const int64_t st = d.stride_t(d.D * H), sb = d.stride_b(d.D * H);
  // Buffers over the N valid positions in time order (row offset[t] + i), so
  // the weight gradients are GEMMs over exactly the valid positions. Only the
  // per-step GEMM's operand dgh is step-sized: peak memory stays near the
  // forward's.
  at::Tensor dgx = at::empty({N, DG}, input2d.options());   // [N, D*3H]
  at::Tensor dghn = at::empty({N, H}, input2d.options());   // [N, H] one dir
  at::Tensor hprev = at::empty({N, H}, input2d.options());  // [N, H] one dir
  at::Tensor dgh = at::empty({d.B, G}, input2d.options());  // [B, 3H] one step
  const scalar_t* go_p = grad_output.const_data_ptr<scalar_t>();
  const scalar_t* out_p = output.const_data_ptr<scalar_t>();
  const scalar_t* hx_p = hx.const_data_ptr<scalar_t>();
  scalar_t* dgx_p = dgx.data_ptr<scalar_t>();
  scalar_t* dghn_p = dghn.data_ptr<scalar_t>();
  scalar_t* dgh_p = dgh.data_ptr<scalar_t>();
  scalar_t* hp_p = hprev.data_ptr<scalar_t>();

  for (int64_t dir = 0; dir < d.D; ++dir) {
    const bool reverse = dir == 1;
    at::Tensor dh = grad_h_n[dir].index_select(0, perm);  // [B, H] sorted order
    scalar_t* dh_p = dh.data_ptr<scalar_t>();
    const scalar_t* ws_p = workspace.const_data_ptr<scalar_t>() + dir * N * 4 * H;
    const at::Tensor w_hh_d = w_hh[dir];  // [3H, H]
    for (int64_t step = s.max_len - 1; step >= 0; --step) {
      const int64_t n = s.active[step];
      at::parallel_for(0, n, row_grain(H), [&](int64_t i0, int64_t i1) {
        for (int64_t i = i0; i < i1; ++i) {
          const int64_t t = time_of(s, i, step, reverse), b = s.perm[i];
          const bool first = reverse ? t == s.len[i] - 1 : t == 0;
          const scalar_t* prev =
              first ? hx_p + (dir * d.B + b) * H
                    : out_p + (reverse ? t + 1 : t - 1) * st + b * sb + dir * H;
          const scalar_t* gor = go_p + t * st + b * sb + dir * H;
          const int64_t row = s.offset[t] + i;
          backward_row_any<scalar_t>(dh_p + i * H, gor, prev,
                                     ws_p + (s.offset[step] + i) * 4 * H, dgx_p + row * DG + dir * G,
                                     dgh_p + i * G, dghn_p + row * H, hp_p + row * H, H);
        }
      });
      dh.narrow(0, 0, n).addmm_(dgh.narrow(0, 0, n), w_hh_d);
    }
    grad_hx[dir].index_copy_(0, perm, dh);
    // dW_hh = dgh^T hprev over all positions: the r|z rows from dgx's columns.
    const at::Tensor dgx_rz = dgx.narrow(1, dir * G, 2 * H);  // [N, 2H]
    at::Tensor gw_rz = grad_w_hh[dir].narrow(0, 0, 2 * H), gw_n = grad_w_hh[dir].narrow(0, 2 * H, H);
    at::Tensor gb_rz = grad_b_hh[dir].narrow(0, 0, 2 * H), gb_n = grad_b_hh[dir].narrow(0, 2 * H, H);
    at::mm_out(gw_rz, dgx_rz.t(), hprev);
    at::mm_out(gw_n, dghn.t(), hprev);
    at::sum_out(gb_rz, dgx_rz, {0});
    at::sum_out(gb_n, dghn, {0});
  }
  dghn.reset();
  hprev.reset();
  const at::Tensor rows = packed_rows(s, d);
  at::Tensor xp = input2d.index_select(0, rows);  // [N, I]
  at::Tensor gw = grad_w_ih.view({DG, d.I}), gb = grad_b_ih.view({DG});
  at::mm_out(gw, dgx.t(), xp);
  xp.reset();
  at::sum_out(gb, dgx, {0});
  at::Tensor dxp = at::mm(dgx, w_ih.reshape({DG, d.I}));  // [N, I]
  dgx.reset();
  // grad_input is allocated last, when the step buffers are gone: peak memory.
  grad_input2d = at::empty({input2d.size(0), d.I}, input2d.options());
  grad_input2d.index_fill_(0, padding_rows(s, d), 0);
  grad_input2d.index_copy_(0, rows, dxp);
}

// Half types run in float (their op-math type) and round at the end.
bool is_half(const at::Tensor& t) {
  return t.scalar_type() == at::kHalf || t.scalar_type() == at::kBFloat16;
}
at::Tensor opmath(const at::Tensor& t) { return is_half(t) ? t.to(at::kFloat) : t; }

std::tuple<at::Tensor, at::Tensor, at::Tensor> gru_layer_forward_cpu(
    const at::Tensor& input, const at::Tensor& lengths, const at::Tensor& hx,
    const at::Tensor& w_ih, const at::Tensor& w_hh, const std::optional<at::Tensor>& b_ih,
    const std::optional<at::Tensor>& b_hh, bool batch_first, bool need_workspace) {
  const NoAutocastGuard no_autocast;
  const LayerDims d = check_layer_args(input, lengths, hx, w_ih, w_hh, b_ih, b_hh, batch_first);
  const Schedule s = make_schedule(lengths, d.T);
  const at::Tensor x = opmath(input).contiguous();
  const auto ws_opts = x.options();
  at::Tensor output = at::empty(batch_first ? std::vector<int64_t>{d.B, d.T, d.D * d.H}
                                            : std::vector<int64_t>{d.T, d.B, d.D * d.H},
                                ws_opts);
  output.view({-1, d.D * d.H}).index_fill_(0, padding_rows(s, d), 0);
  at::Tensor h_n = at::empty({d.D, d.B, d.H}, ws_opts);
  at::Tensor workspace = need_workspace ? at::empty({d.D, s.N(), 4 * d.H}, ws_opts)
                                        : at::empty({0}, ws_opts);
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "gru_layer_forward_cpu", [&] {
    forward_impl<scalar_t>(d, s, x.view({-1, d.I}), opmath(hx).contiguous(),
                           opmath(w_ih).contiguous(), opmath(w_hh).contiguous(),
                           b_ih ? std::optional<at::Tensor>(opmath(*b_ih).contiguous()) : std::nullopt,
                           b_hh ? std::optional<at::Tensor>(opmath(*b_hh).contiguous()) : std::nullopt,
                           output, h_n, need_workspace ? &workspace : nullptr);
  });
  return {output.to(input.scalar_type()), h_n.to(input.scalar_type()), workspace};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
gru_layer_backward_cpu(const at::Tensor& grad_output, const at::Tensor& grad_h_n,
                       const at::Tensor& input, const at::Tensor& lengths, const at::Tensor& hx,
                       const at::Tensor& w_ih, const at::Tensor& w_hh, const at::Tensor& output,
                       const at::Tensor& workspace, bool batch_first) {
  const NoAutocastGuard no_autocast;
  const LayerDims d =
      check_layer_args(input, lengths, hx, w_ih, w_hh, std::nullopt, std::nullopt, batch_first);
  const Schedule s = make_schedule(lengths, d.T);
  check_backward_args(d, input, grad_output, grad_h_n, output, workspace, s.N());
  const at::Tensor x = opmath(input).contiguous();
  const auto opts = x.options();
  at::Tensor grad_input2d;  // [T*B or B*T, I], allocated by backward_impl
  at::Tensor grad_hx = at::empty({d.D, d.B, d.H}, opts);
  at::Tensor grad_w_ih = at::empty({d.D, 3 * d.H, d.I}, opts);
  at::Tensor grad_w_hh = at::empty({d.D, 3 * d.H, d.H}, opts);
  at::Tensor grad_b_ih = at::empty({d.D, 3 * d.H}, opts);
  at::Tensor grad_b_hh = at::empty({d.D, 3 * d.H}, opts);
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "gru_layer_backward_cpu", [&] {
    backward_impl<scalar_t>(d, s, opmath(grad_output).contiguous(), opmath(grad_h_n).contiguous(),
                            x.view({-1, d.I}), opmath(hx).contiguous(), opmath(w_ih).contiguous(),
                            opmath(w_hh).contiguous(), opmath(output).contiguous(),
                            workspace.contiguous(), grad_input2d, grad_hx, grad_w_ih, grad_w_hh,
                            grad_b_ih, grad_b_hh);
  });
  const at::Tensor grad_input = grad_input2d.view(x.sizes());
  const auto dt = input.scalar_type();
  return {grad_input.to(dt), grad_hx.to(dt), grad_w_ih.to(dt),
          grad_w_hh.to(dt), grad_b_ih.to(dt), grad_b_hh.to(dt)};
}

}  // namespace

TORCH_LIBRARY_IMPL(varlen_rnn, CPU, m) {
  m.impl("gru_layer_forward", &gru_layer_forward_cpu);
  m.impl("gru_layer_backward", &gru_layer_backward_cpu);
}

}  // namespace varlen_rnn
