// The persistent kernels' recurrent product on tensor cores: the contract of tile_matvec
// (persistent.cuh) with mma.sync (mma.cuh) doing the multiply-adds.
//
// For every work item = sub*U + u of the block and g < NG, r < kRowsT (= 8, the mma's N):
//   acc_s[(item*NG + g)*8 + r] = sum_k W[(g*g_rows + u*u_rows)*K + k] * X[sub*8 + r][k]
// The NG*U weight rows form the mma's A operand (M = 16 rows per fragment), the 8 staged rows
// of a sub-tile its B operand (B(k, n) = X[n][k]): one warp task is 16 weight rows x 8 staged
// rows, walking K in steps of the mma's K. Two row orders are supported, the two the kernels
// use: u_rows == 1 with g_rows == U (forward: row g*U + u) and g_rows == 1 with u_rows == NG
// (backward: row u*NG + g).
// Precision: for TF32 the staged rows are fp32, rounded by cvt.rna as fragments are filled, and
// the weights fp32 already rounded to TF32 where they were put in shared memory
// (tc::tf32_rounded), their bits taken as they are; for bf16/f16 both are already in the kind's
// type in shared memory (the kernels stage h and dgh in it: round-to-nearest-even once, as cvt.rn
// would as the fragments are filled) and go in as raw bits, two per 32-bit load. Products are exact
// and summed in fp32, chunk sums added in fp32. Columns past K or past the staged chunk enter as
// zeros.
//
// Latency, not the tensor cores' rate, bounds a warp's chain of mmas (each waits for its fragment
// loads and for the previous mma's sum): the H200's first run found the kernel slower than the
// exact CUDA-core one nearly everywhere, most at small B where a block has one or two tasks (16
// weight rows x 8 staged rows) for its 8 warps, each task's whole K on one warp while the others
// wait. So the K steps of a task are split among kWarps / tasks warps where there are fewer
// tasks than warps (each warp's partial sums go to part_s and the first warp of the task adds
// them in order: deterministic, as every sum here), and a warp keeps two accumulators, the even
// and the odd K steps, so that two independent chains overlap.
#pragma once

#include <cstdint>
#include <type_traits>

#include "copy_async.cuh"
#include "mma.cuh"

namespace varlen_rnn {
namespace cuda {

// The tile's element type for kind k: fp32 for TF32 (cvt.rna rounds it as fragments are
// filled), the kind's own 16-bit type otherwise (bf16 and f16 are stored as c10's types).
template <tc::Kind k>
using tile_elem_bytes = std::integral_constant<int, k == tc::Kind::tf32 ? 4 : 2>;

// Fragment register `reg` of lane `lane` as a 32-bit load from a row-major array with row
// stride `stride` elements: the (row, col) of its first element. A 16-bit register holds two
// elements of one row at columns col and col + 1 (a_col / b_row of 2*reg and 2*reg + 1), so
// one word load fills it; a TF32 register is one fp32 element.
template <tc::Kind k>
__host__ __device__ constexpr int a_reg_row(int lane, int reg) {
  return tc::a_row<k>(lane, reg * tc::Shape<k>::kPerReg);
}
template <tc::Kind k>
__host__ __device__ constexpr int a_reg_col(int lane, int reg) {
  return tc::a_col<k>(lane, reg * tc::Shape<k>::kPerReg);
}
// B(kk, n) is X[n][kk]: the staged row is b_col, the column b_row.
template <tc::Kind k>
__host__ __device__ constexpr int b_reg_row(int lane, int reg) {
  return tc::b_col<k>(lane, reg * tc::Shape<k>::kPerReg);
}
template <tc::Kind k>
__host__ __device__ constexpr int b_reg_col(int lane, int reg) {
  return tc::b_row<k>(lane, reg * tc::Shape<k>::kPerReg);
}

// Bank conflicts of the fragment loads (the why of the padded strides in plan.h): shared
// memory has 32 banks of one 32-bit word; a warp-wide load takes as many cycles as the most
// distinct words any one bank must serve. Every register above is loaded from word
//   (row * stride + col) * bytes / 4,  row = lane/4 (+ 8 for the second half of A), col = the
// register's column base + (lane % 4) words
// so lane (g = lane/4, t = lane%4) reads bank (g * S + t + c0) % 32 with S the stride in words
// (the 16-bit kinds' pairs are t words apart just like TF32's single elements). For S a
// multiple of 32 the 8 row groups land in the same 4 banks: 8 words per bank, 8 cycles. For
// S = 4 (mod 8) the rows start 4, 12, 20, ... banks apart, g*S % 32 takes the 8 values
// {0, 4, ..., 28} and adding t < 4 covers all 32 banks once: one cycle. plan.h's
// padded_stride picks such S for the weight slice (A) and the staged tile (B).
// fragment_load_ways returns the worst ways over all registers of both operands, computed
// with the kernel's own address helpers; the host emulation checks it on every call.
template <tc::Kind k>
__host__ __device__ inline int fragment_load_ways(int64_t a_stride, int a_bytes, int64_t b_stride) {
  using S = tc::Shape<k>;
  const int b_bytes = tile_elem_bytes<k>::value;
  int worst = 1;
  for (int op = 0; op < 2; ++op) {
    const int regs = op == 0 ? S::kAElems / S::kPerReg : S::kBElems / S::kPerReg;
    for (int reg = 0; reg < regs; ++reg) {
      int64_t words[32];
      for (int lane = 0; lane < 32; ++lane) {
        const int64_t e = op == 0 ? a_reg_row<k>(lane, reg) * a_stride + a_reg_col<k>(lane, reg)
                                  : b_reg_row<k>(lane, reg) * b_stride + b_reg_col<k>(lane, reg);
        words[lane] = e * (op == 0 ? a_bytes : b_bytes) / 4;
      }
      for (int bank = 0; bank < 32; ++bank) {
        int n = 0;
        for (int l = 0; l < 32; ++l) {
          bool first = words[l] % 32 == bank;
          for (int m = 0; m < l && first; ++m) first = words[m] != words[l];
          n += first;
        }
        worst = n > worst ? n : worst;
      }
    }
  }
  return worst;
}

#ifdef VARLEN_RNN_HOST_EMULATION
// Defined by the emulation: records the worst fragment-load bank conflict of a call.
void emu_note_fragment_ways(int ways);
// Defined by the emulation: counts an access at p that is not `bytes`-aligned.
void emu_note_misaligned(const void* p, int bytes);
#endif

// A GPU faults on a load or store that is not aligned to its size (misaligned address, which
// kills the context); x86, where the host emulation runs these kernels, forgives it. So every
// access the kernels widen or reinterpret (16-byte staging, 32-bit fragment pairs) and every
// part of the dynamic shared memory is checked there; on the device this is nothing.
__host__ __device__ __forceinline__ void check_aligned(const void* p, int bytes) {
#ifdef VARLEN_RNN_HOST_EMULATION
  if ((reinterpret_cast<uintptr_t>(p) & static_cast<uintptr_t>(bytes - 1)) != 0) {
    emu_note_misaligned(p, bytes);
  }
#else
  (void)p;
  (void)bytes;
#endif
}

// Register `reg` of a fragment from a row-major array p (row stride `stride` elements) at
// (row, col): rows >= n_rows and columns >= n_cols enter as zeros. T: float (rounded by cvt, or
// with kRounded already TF32 and taken as bits) or a 16-bit type taken as raw bits, a pair per
// 32-bit load (stride and col even).
template <tc::Kind k, bool kRounded, typename T>
__device__ __forceinline__ uint32_t frag_reg(const T* p, int64_t stride, int row, int col,
                                             int n_rows, int n_cols) {
  if (row >= n_rows || col >= n_cols) return 0u;
  if constexpr (sizeof(T) == 2) {
    check_aligned(p + row * stride + col, 4);  // even stride and col, 4-byte aligned p
    const uint32_t pair = *reinterpret_cast<const uint32_t*>(p + row * stride + col);
    return col + 1 < n_cols ? pair : pair & 0xFFFFu;  // past the end: zero, not the pad
  } else if constexpr (kRounded) {
    return tc::as_bits(static_cast<float>(p[row * stride + col]));
  } else {
    return tc::to_bits<k>(static_cast<float>(p[row * stride + col]));
  }
}

// Floats of part_s, tile_matvec_mma's scratch for the split of K: a C fragment (4 floats a
// lane in every shape) per warp.
template <int kWarps>
constexpr int kMmaPartFloats = kWarps * 32 * 4;

// How a chunk's tasks are spread over the warps: `splits` warps share each task's K steps when
// there are fewer tasks than warps (never more warps than K steps), else one warp a task.
__host__ __device__ constexpr int mma_splits(int tasks, int warps, int k_steps) {
  return tasks >= warps ? 1 : (warps / tasks < k_steps ? warps / tasks : k_steps);
}

// kc_max: columns staged per chunk at most; kc_stride (>= kc_max) and w_stride (>= K): the
// tile's and the weights' row strides in elements (even for 16-bit kinds). tile_rows: rows
// staged (a multiple of 8, at most kMaxRows). The tile holds float for TF32 and the kind's
// 16-bit type otherwise (x_t); weights w_t likewise (float already rounded to TF32, or 16-bit
// raw). part_s: kMmaPartFloats<kWarps> floats of scratch. locate(row) -> int64_t is called
// once per staged row and tile, its result handed to stage(dst, handle, k0, kc, lane) for
// every chunk (the row's source looked up once). Ends with __syncthreads.
template <int NG, int kWarps, int kMaxRows, tc::Kind k, typename w_t, typename x_t, typename Locate,
          typename Stage>
__device__ __forceinline__ void tile_matvec_mma(const w_t* w_s, int64_t w_stride, int U, int g_rows,
                                                int u_rows, int K, int tile_rows, int kc_max,
                                                int64_t kc_stride, x_t* tile, float* acc_s,
                                                float* part_s, Locate locate, Stage stage) {
  using S = tc::Shape<k>;
  static_assert(sizeof(x_t) == tile_elem_bytes<k>::value && sizeof(w_t) == sizeof(x_t),
                "TF32 takes float weights and tile, the 16-bit kinds their own type");
  constexpr int kN = S::N;  // staged rows per sub-tile
  constexpr int kRegsA = S::kAElems / S::kPerReg, kRegsB = S::kBElems / S::kPerReg;
  constexpr int kRowsPerWarp = (kMaxRows + kWarps - 1) / kWarps;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int w_rows = NG * U, m_tiles = (w_rows + S::M - 1) / S::M, subs = tile_rows / kN;
  const int tasks = m_tiles * subs;
  const int splits = mma_splits(tasks, kWarps, (kc_max + S::K - 1) / S::K);
  const bool g_major = u_rows == 1;  // forward order: row g*U + u
#ifdef VARLEN_RNN_HOST_EMULATION
  if (threadIdx.x == 0) {
    emu_note_fragment_ways(fragment_load_ways<k>(w_stride, sizeof(w_t), kc_stride));
  }
#endif
  // A task's sums (this lane's C elements) into acc_s: the chunk's, added to the earlier ones.
  auto emit = [&](int task, int k0, const float (&x)[S::kCElems]) {
    const int m0 = (task % m_tiles) * S::M, sub = task / m_tiles;
#pragma unroll
    for (int i = 0; i < S::kCElems; ++i) {
      const int w = m0 + tc::c_row(lane, i), r = tc::c_col(lane, i);
      if (w >= w_rows) continue;
      const int g = g_major ? w / U : w % NG, u = g_major ? w % U : w / NG;
      float* dst = acc_s + ((sub * U + u) * NG + g) * kN + r;
      *dst = (k0 == 0 ? 0.f : *dst) + x[i];
    }
  };
  int64_t src[kRowsPerWarp];
#pragma unroll
  for (int q = 0; q < kRowsPerWarp; ++q) {
    const int r = warp + q * kWarps;
    src[q] = r < tile_rows ? locate(r) : -1;
  }
  for (int k0 = 0; k0 < K; k0 += kc_max) {
    const int kc = min(kc_max, K - k0);
    const int steps = (kc + S::K - 1) / S::K;
#pragma unroll
    for (int q = 0; q < kRowsPerWarp; ++q) {
      const int r = warp + q * kWarps;
      if (r < tile_rows) stage(tile + r * kc_stride, src[q], k0, kc, lane);
    }
    copy_async_wait();  // the staging's copies (stage_row), before the barrier shows them
    __syncthreads();
    for (int slot = warp; slot < tasks * splits; slot += kWarps) {  // warp-uniform
      const int task = slot / splits, part = slot % splits;
      const int m0 = (task % m_tiles) * S::M, sub = task / m_tiles;
      const w_t* wa = w_s + m0 * w_stride + k0;
      const x_t* x = tile + sub * kN * kc_stride;
      // K step s of the chunk into acc: its fragments loaded, one mma.
      auto step = [&](int s, tc::FragC& acc) {
        const int kk = s * S::K;
        tc::FragA<k> fa;
        tc::FragB<k> fb;
#pragma unroll
        for (int r = 0; r < kRegsA; ++r) {
          fa.reg[r] = frag_reg<k, true>(wa, w_stride, a_reg_row<k>(lane, r),
                                        kk + a_reg_col<k>(lane, r), w_rows - m0, kc);
        }
#pragma unroll
        for (int r = 0; r < kRegsB; ++r) {
          fb.reg[r] = frag_reg<k, false>(x, kc_stride, b_reg_row<k>(lane, r),
                                         kk + b_reg_col<k>(lane, r), kN, kc);
        }
        tc::mma(acc, fa, fb, acc);
      };
      // This warp's K steps [s0, s1) of the chunk's `steps`, balanced over the task's warps,
      // alternately into two accumulators (named, not indexed: an indexed pair would live in
      // local memory).
      const int s0 = part * steps / splits, s1 = (part + 1) * steps / splits;
      tc::FragC even = {}, odd = {};
      int s = s0;
      for (; s + 1 < s1; s += 2) {
        step(s, even);
        step(s + 1, odd);
      }
      if (s < s1) step(s, even);
      float sum[S::kCElems];
#pragma unroll
      for (int i = 0; i < S::kCElems; ++i) sum[i] = even.x[i] + odd.x[i];
      if (splits == 1) {
        emit(task, k0, sum);
      } else {
#pragma unroll
        for (int i = 0; i < S::kCElems; ++i) part_s[(slot * S::kCElems + i) * 32 + lane] = sum[i];
      }
    }
    if (splits > 1) {
      __syncthreads();
      // The task's first warp adds its parts in order: the same sums whatever the timing.
      for (int slot = warp; slot < tasks * splits; slot += kWarps) {
        if (slot % splits != 0) continue;
        float sum[S::kCElems];
#pragma unroll
        for (int i = 0; i < S::kCElems; ++i) {
          sum[i] = part_s[(slot * S::kCElems + i) * 32 + lane];
          for (int p = 1; p < splits; ++p)
            sum[i] += part_s[((slot + p) * S::kCElems + i) * 32 + lane];
        }
        emit(slot / splits, k0, sum);
      }
    }
    __syncthreads();
  }
}

}  // namespace cuda
}  // namespace varlen_rnn
