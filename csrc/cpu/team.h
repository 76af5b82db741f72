// Helpers shared by the CPU step loops that run split by hidden units across
// a persistent thread team (cpu/split_steps.h forward, cpu/split_backward.h
// backward): which loops run (step_loops), how a direction's threads form
// teams over ranges of rows (team_layout, run_split_loops), the teams and
// their barrier (run_teams), the single-threaded BLAS call and the slices.
#pragma once

#include <ATen/Parallel.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <deque>
#include <exception>
#include <initializer_list>
#include <mutex>
#include <stdexcept>
#include <string>
#include <thread>
#include <utility>
#include <vector>

#include "cpu/schedule.h"    // Schedule, RowRange, row_ranges
#include "cpu/small_gemm.h"  // f32_dots_for
#include "layer.h"           // LayerDims

#if defined(_OPENMP)
#include <omp.h>
#elif defined(__linux__) && defined(__GNUC__)
// Built without OpenMP (clang: its -fopenmp would bring LLVM's runtime, a
// second one beside torch's, whose idle threads spin while torch's work): the
// teams' parallel region goes through the GNU entry points of the OpenMP
// runtime torch has loaded, as GCC's -fopenmp build does (libgomp in torch's
// Linux wheels; LLVM's and Intel's runtimes export them too). Weak: without
// such a runtime the teams run on one thread.
extern "C" {
void GOMP_parallel(void (*fn)(void*), void* data, unsigned num_threads, unsigned flags)
    __attribute__((weak));
int omp_get_thread_num() __attribute__((weak));
int omp_get_num_threads() __attribute__((weak));
}
#define VR_GOMP_ENTRY 1
#endif
#if __has_include(<unistd.h>)
#include <unistd.h>  // sysconf: the L2's size
#endif

// The Fortran BLAS that torch's CPU build carries (MKL in the x86 wheels).
// Weak: where a build lacks it, the split loop is not used (blas_available).
extern "C" {
void sgemm_(const char*, const char*, const int*, const int*, const int*, const float*,
            const float*, const int*, const float*, const int*, const float*, float*, const int*)
    __attribute__((weak));
void dgemm_(const char*, const char*, const int*, const int*, const int*, const double*,
            const double*, const int*, const double*, const int*, const double*, double*,
            const int*) __attribute__((weak));
}

namespace varlen_rnn {
namespace cpu {

// Row-major c[m, n] (ldc) = a[m, k] (lda) b[k, n] (ldb) + beta c, one thread.
// With b_t, b is the transpose of a row-major w[n, k] (ldb its row stride):
// a weight's rows read in place.
inline void gemm_rm(int64_t m, int64_t n, int64_t k, const float* a, int64_t lda, const float* b,
                    int64_t ldb, float* c, int64_t ldc, float beta = 0, bool b_t = false) {
  const int M = static_cast<int>(n), N = static_cast<int>(m), K = static_cast<int>(k);
  const int la = static_cast<int>(ldb), lb = static_cast<int>(lda), lc = static_cast<int>(ldc);
  const float one = 1;
  sgemm_(b_t ? "T" : "N", "N", &M, &N, &K, &one, b, &la, a, &lb, &beta, c, &lc);
}
inline void gemm_rm(int64_t m, int64_t n, int64_t k, const double* a, int64_t lda, const double* b,
                    int64_t ldb, double* c, int64_t ldc, double beta = 0, bool b_t = false) {
  const int M = static_cast<int>(n), N = static_cast<int>(m), K = static_cast<int>(k);
  const int la = static_cast<int>(ldb), lb = static_cast<int>(lda), lc = static_cast<int>(ldc);
  const double one = 1;
  dgemm_(b_t ? "T" : "N", "N", &M, &N, &K, &one, b, &la, a, &lb, &beta, c, &lc);
}

// Whether run_teams has threads: OpenMP, or the entry points above.
inline bool parallel_region_available() {
#if defined(_OPENMP)
  return true;
#elif defined(VR_GOMP_ENTRY)
  return GOMP_parallel != nullptr && omp_get_thread_num != nullptr &&
         omp_get_num_threads != nullptr;
#else
  return false;
#endif
}

inline bool blas_available() {
  return parallel_region_available() && sgemm_ != nullptr && dgemm_ != nullptr;
}

// The values a step reads from the recurrent weights of one direction:
// W_hh ([G*H, P]) and, with a projection, W_hr ([P, H]).
inline int64_t recurrent_weights(const LayerDims& dims) {
  return dims.G * dims.H * dims.P + (dims.P != dims.H ? dims.P * dims.H : 0);
}

// Whether a call has too few steps for the split loops' set-up to pay: each
// of their threads packs its panel of W_hh once per call (a transposing copy
// of the weights, ~150-400 us at H=256 here), which the per-step GEMM loop
// skips on few steps by reading W_hh^T as a view (cpu/recurrence.h's
// forward_impl). Measured (float32 GRU forward, B=1/8/32 at
// H=128/256/512, T=1..32, 1 and 2 threads; load ~1.5, min of 5): the split
// loop is faster from T = 12/24/28 at B=1, 4-20 at B=8, 4-8 at B=32; below
// that the GEMM loop on the view was up to 4.5x faster (B=1 T=1 H=256: 54 vs
// 235 us at 2 threads). The backward's split loop packs its panels too: on
// one thread (load ~1-2, min of 7, GRU and LSTM, H=128/256/512, B=1/8/32)
// its GEMM loop was 1.0-3.2x faster at T=1 and 4, 0.96-1.25x at T=16.
// Measured again after the packing became 2.5-3x faster (e8e033b; the Xeon,
// float32 inference, GRU and LSTM at H=256/512, B=1/8/32, both loops forced
// in one process, min of 8 rounds of 5 calls): the split loop still lost
// below these limits (B=1: 0.31-0.70x up to T=16; B=8: 0.87-0.95x at T=8,
// 1.43-1.89x at T=12; B=32: 0.84-1.05x at T=4, 1.10-1.45x at T=8).
// Measured again after the dot products took three rows per tile (0e4cedb;
// the Xeon, float32 GRU and LSTM at H=256/512, B=1/8/32, few_steps forced
// true by a temporary switch against VARLEN_RNN_CPU_STEPS=split, one process,
// min of 8 alternating rounds of 5 calls; ad hoc, 2026-12-02), per-step loop
// / split: inference crosses over later than these limits (GRU H=256 B=1 at
// T=48-64, 1.34x at T=24; B=8 at T=12-14; B=32 at T=8-12; at H=512 later
// still, 1.28x at B=1 T=64), training near them (GRU H=256 B=1 1.04x at
// T=24, 1.00x at 32, 0.86x at 64; B=8 0.97x at T=10; B=32 1.00x at T=6;
// H=512 B=1 1.14x at T=24, 1.00x at 48). So a float32 inference forward
// takes its own, longer limits (f32_inference), kept short of the crossovers
// measured (LSTM H=256 B=8 0.93x at T=18), and training keeps these.
// steps: the call's longest length (Schedule::max_len).
// With bfloat16 products (bf16: the layer's products take bfloat16 operands)
// the calls of few steps take theirs on the weights as stored (dot products,
// or the swapped product; cpu/bf16_gemm.h bf16_weight_product), and they win
// over more steps, the more the wider the state: measured (the AMD EPYC, 2
// threads, GRU and LSTM, min of 10 x 10 calls, both forced by a temporary
// switch; ad hoc at 17bb803) inference at H=256 from B=1 T=24 (1.21-1.51x)
// to T=48 (0.91-1.02x), B=8 T=10 (0.99-1.22x) to T=16 (0.84-0.88x), B=32
// T=6 (1.04-1.06x) to T=12 (0.95-1.08x), B=64 T=4 (1.04-1.11x) to T=8
// (0.86-0.99x, where the limit, 9, keeps few); at H=512 from B=1 T=48 (1.45-2.40x)
// to T=96 (0.93-1.11x), B=8 T=16 (1.05x) to T=32 (0.87-0.88x), B=32 T=12
// (1.07-1.14x) to T=24 (0.99-1.05x), B=64 T=8 (1.05-1.07x) to T=16
// (0.97-0.98x); a training step (forward and backward) within 0.78-1.11x
// at H=256 and 0.98-1.86x at H=512 over the same calls. So the float32
// limit times 1.5 at H=256 and 3 at H=512 (not measured past H=512 or
// below H=256, where the float32 rule stays). The RNN's weights are a third
// of the GRU's at the same H, and its calls lost there (as built against the
// split loops forced, the same machine, 2026-12-04: H=256 0.74-1.23x in
// inference, 8 of 15 points under 0.95x, 0.89-1.04x in training; H=512
// 0.96-1.57x and 0.89-1.27x, its last points, just under 3x, 0.89-1.06x but
// one; benchmarks/results/few-steps-inference_cpu_20261204-032600.md), so H
// counts no further than a GRU's with as many recurrent weights
// (sqrt(recurrent_weights / 3)): the RNN at H=256 keeps the float32 rule,
// at H=512 takes 1.73x (then 1.07-1.37x in inference, 0.80-1.15x in
// training, the same file); an LSTM with a projection under 0.6 H counts
// less than H too (not measured).
// f32_inference: a float32 forward that keeps no workspace (float32
// products, no backward to follow), whose per-step loop wins longer (above):
// under 32 steps at B = 1, 13 at B = 8 (160 / (B + 4)), 6 as before from
// B = 19 (benchmarks/results/few-steps-inference_cpu_20261202-125300.md),
// where a direction's recurrent weights (recurrent_weights) are at most 1 MiB
// of float32. Past that, where the step's products are the dot products on
// W_hh as stored (f32_dots_for: AVX-512 up to 256 rows, AVX2 up to 16;
// elsewhere the BLAS's, not measured past these limits), the limits grow
// with the weights up to twice at 2 MiB: GRU H=384 1.7x, LSTM H=384 and
// H >= 512, GRU H >= 512 and RNN H >= 724 2x (under 64 steps at B = 1, 26
// at B = 8, 16 at B = 16, 8 at B = 32). Measured on the AMD EPYC (Zen 4, 2
// threads, min of 10 rounds of 5 calls, as built against the split loops
// forced; benchmarks/results/few-steps-inference_cpu_20261204-032600.md)
// where the per-step loop now runs and the split loops ran before (from the
// old limit to the new; GRU and LSTM at H=384, 512, 1024, the RNN at 768
// and 1024, B = 1-32, and bidirectional at H=512): 0.94-1.99x, median 1.13x
// over 169 points, 16 of them under 1.00x (B = 4 from T = 30, whose 4 rows
// make a 3-row tile and a 1-row one; H=1024 B=8 T=25; single points). The
// RNN at H=384 and 512 (0.56 and 1 MiB) lost there in two runs of three
// (0.83-0.98x), and so keeps the old limits, as do smaller layers: H=128
// crossed over near them (GRU B=1 T=24-32, B=8 T=13-20), H=64 earlier (B=1
// T=8-12), H=32 later (B=1 past T=12). The Xeon's B=1 at H=512 agrees (1.28x
// at T=64, above); its B >= 2 past the old limits was not measured. A
// float32 training step past its limits at H=384-1024 (the same file) was
// mixed, 0.73-1.23x (losing at small B, winning at B = 16-32), so training
// keeps them.
inline bool few_steps(const LayerDims& dims, int64_t steps, bool bf16, bool f32_inference = false) {
  const int64_t limit = std::clamp<int64_t>(128 / (dims.B + 4), 6, 24);
  if (bf16) {
    // H, or a GRU's with as many recurrent weights where that is smaller (the RNN's)
    const int64_t h =
        std::min<int64_t>(dims.H, std::llround(std::sqrt(recurrent_weights(dims) / 3.0)));
    if (h >= 256) return steps < limit * 3 * std::min<int64_t>(h, 512) / 512;
  }
  if (f32_inference) {
    // 1024..2048: the limits' scale in 1024ths, the weights' KiB of float32 (1-2 MiB)
    const int64_t kib = recurrent_weights(dims) * 4 / 1024;
    const int64_t s = kib > 1024 && f32_dots_for(dims.B) ? std::min<int64_t>(kib, 2048) : 1024;
    return steps < std::clamp<int64_t>(160 * s / (1024 * (dims.B + 4)), 6, 32 * s / 1024);
  }
  return steps < limit;
}

// The one place the step loops (forward and backward) are chosen.
// VARLEN_RNN_CPU_STEPS=split or =gemm forces both (tests exercise both);
// otherwise (auto) the per-step GEMM loop runs a call of few_steps, the split
// loops run on one or two threads, with bfloat16 products, and on more
// threads at H >= 256 or B <= 32.
// Measured on the 2-core AMD EPYC (float32, unidirectional, T=50, lengths
// uniform in [1, T], 8 interleaved rounds in one process, medians), split vs
// per-step GEMM loop, where the old rule (2+ threads: H >= 256 or B <= 32)
// took the GEMM loop: inference 1.37x / 1.44x / 1.31x at B=64 / 128 / 256
// H=128, 1.14x at B=512 H=128, 1.34x at B=128 H=64, 1.35x at B=64 H=192,
// LSTM 1.33x at B=128 H=128; training 1.13x / 1.07x / 1.02x / 1.07x, 1.07x,
// 1.09x, LSTM 1.11x. More threads keep the old rule: not measured there.
// Measured on the 2-core Xeon, split vs per-step GEMM loop:
// - forward (float32 inference): 1.21x at B=16 H=512, 1.02x at B=64 H=256,
//   1.20x at B=16 H=128, 1.33x at B=32 H=64; at B >= 128 with H = 128 the two
//   tie (0.97-1.01x): there the per-step BLAS call already keeps both cores
//   busy; on one thread (load ~1.5, min of 5) 1.02x at B=64 T=100 H=256,
//   1.25x at B=16 T=200 H=512, 1.07x at B=128 T=50 H=128, 1.08x at B=256
//   T=20 H=128, 1.13x at B=4 T=200 H=256;
// - backward (float32 training step, machine shared with other jobs at load
//   ~4, so a guide only, min of 15-25 interleaved repeats): GRU 1.25x at B=64
//   H=256, 1.29x at B=16 H=512, 1.45x at B=16 H=128, 1.01x at B=32 H=64; LSTM
//   1.20x / 1.11x and RNN 2.4x / 1.39x at the first two; the projected LSTM
//   (B=64 H=256 P=128) 1.11x; 0.95x at B=128 H=128 (2 layers, bidirectional)
//   and 1.02x at B=64 H=128; on one thread (load ~2, min of 5) GRU 1.04-1.09x
//   and LSTM 0.99-1.04x at B=64 T=100 H=256, B=16 T=200 H=512, B=128 T=50
//   H=128 and B=8 T=50 H=128.
// With bfloat16 products (cpu/bf16_gemm.h) the product is a small part of a
// step and the split loop always won at 2 threads (full-length bfloat16 GRU
// inference, load ~1, medians of 1 s: 12.8 vs 19.6 ms at B=64 H=256, 18.6 vs
// 20.9 ms at B=16 H=512, B=128 H=128 2 layers bidirectional 21.6 vs 23.9 ms)
// and, with the projection chunked (cpu/chunked_projection.h), on one thread
// (B=64 T=100 I=H=256, load ~1.5, min of 15-20: LSTM 19.6 -> 12.7 ms at full
// lengths, 11.7 -> 12.0 uniform; GRU 13.5 -> 11.0 and 9.5 -> 8.2 ms),
// except on few steps, where the GEMM loop's products run as float32 GEMMs
// on the bfloat16 values, with no packing (cpu/recurrence.h).
// bf16: the split loops always (the forward's rule); bf16_products: the
// products take bfloat16 operands (few_steps).
inline bool use_split_loops(const LayerDims& dims, int64_t steps, bool bf16, bool bf16_products,
                            bool f32_inference = false) {
  if (!blas_available() || at::in_parallel_region()) return false;
  const char* env = std::getenv("VARLEN_RNN_CPU_STEPS");
  if (env != nullptr && std::strcmp(env, "split") == 0) return true;
  if (env != nullptr && std::strcmp(env, "gemm") == 0) return false;
  const int threads = at::get_num_threads();
  if (few_steps(dims, steps, bf16_products, f32_inference)) return false;
  return bf16 || threads <= 2 || dims.H >= 256 || dims.B <= 32;
}

// A core's L2 in bytes as the OS reports it (sysconf on Linux), 1 MiB where
// it reports none. The rules below keep a thread's recurrent weights within
// it; their limits were measured where the L2 is 1 MiB (AMD EPYC, Zen 4) and
// 2 MiB (Xeon), and are capped at the L2 where it is smaller: on an EPYC with
// 512 KiB (Zen 3) the limits measured elsewhere lost (GRU H=256, 768 KiB of
// W_hh: two row groups 0.82-0.94x of one team at B=16 and 0.93x at B=64 in
// inference, benchmarks/results/row-groups_cpu_20261130-103734.md; the
// directions at once 0.78-0.96x at B=16 and 0.81x at B=64 in inference, ad hoc).
inline int64_t l2_bytes() {
  static const int64_t bytes = [] {
#if defined(_SC_LEVEL2_CACHE_SIZE)
    const long reported = sysconf(_SC_LEVEL2_CACHE_SIZE);
    if (reported > 0) return static_cast<int64_t>(reported);
#endif
    return int64_t{1} << 20;
  }();
  return bytes;
}

// Whether a bidirectional layer's two directions run at once, each on its
// half of the threads (the first (threads + 1) / 2 run d = 0), with the split
// loops over each half: a half of one thread runs its direction alone, with
// no per-step synchronisation at all. VARLEN_RNN_CPU_DIRECTIONS=concurrent or
// =serial forces it (tests exercise both), except that
// VARLEN_RNN_CPU_STEPS=gemm (the per-step GEMM loop, which has no concurrent
// form) always runs the directions in turn. Auto: with an even thread count
// (with an odd one the smaller half would set the pace) while each thread's
// share of its direction's recurrent weights (W_hh, and W_hr with a
// projection, over the half's threads) is at most 768 KiB and the L2
// (l2_bytes): a thread then
// reads twice the weights per step that it reads with the directions in
// turn, and past that they no longer stay in its core's L2 (2 MiB here).
// Measured float32, 2 threads, on the 2-core Xeon (machine otherwise idle,
// load ~1 = this benchmark; min of 6-30 interleaved repeats), at once vs in
// turn: B=128 T=50 I=H=128 2 layers (in turn: the per-step GEMM loop), GRU
// 1.18x inference, 1.21x training; LSTM 1.21x, RNN 1.37x inference; B=64
// T=100 I=H=256 1 layer (in turn: the split loop) GRU (768 KiB) 1.07x
// inference, 1.08x training, but LSTM (1 MiB) 0.92x; GRU H=384 (1.7 MiB)
// 1.02x at B=64 and 0.97x at B=16, H=512 (3 MiB) B=16 0.92x inference,
// 0.93x training. With VARLEN_RNN_CPU_PROJECTION=whole both directions'
// input projections are held at once: the forward's peak rises by one
// [N, G*H] (inference, the 2-layer GRU above: 23.0 -> 27.8 MiB; chunked, the
// default, holds neither); training's peak, set by the workspace, rises by the
// backward's second [N, H] of the GRU (62.7 -> 64.2 MiB).
inline bool use_concurrent_directions(const LayerDims& dims, int64_t steps, size_t scalar_bytes,
                                      bool bf16_products, bool f32_inference = false) {
  if (dims.D != 2 || !blas_available() || at::in_parallel_region()) return false;
  const int threads = at::get_num_threads();
  if (threads < 2) return false;
  const char* loop_env = std::getenv("VARLEN_RNN_CPU_STEPS");
  if (loop_env != nullptr && std::strcmp(loop_env, "gemm") == 0) return false;
  const char* env = std::getenv("VARLEN_RNN_CPU_DIRECTIONS");
  if (env != nullptr && std::strcmp(env, "concurrent") == 0) return true;
  if (env != nullptr && std::strcmp(env, "serial") == 0) return false;
  if (few_steps(dims, steps, bf16_products, f32_inference)) return false;
  const int64_t per_thread =
      recurrent_weights(dims) * static_cast<int64_t>(scalar_bytes) / (threads / 2);
  return threads % 2 == 0 && per_thread <= std::min<int64_t>(768 * 1024, l2_bytes());
}

// The one place a layer's step loops are chosen (forward and backward):
// both directions at once on the split loops, or the directions in turn on
// the split loops or on the per-step GEMM loop.
enum class StepLoops { kGemm, kSplit, kConcurrent };
// steps: the call's longest length; scalar_bytes: the op-math type's size;
// bf16: the forward's rules for bfloat16 products (their weight panels are 2
// bytes per value, the split loops always); bf16_products: the products take
// bfloat16 operands (few_steps; the backward passes it alone);
// f32_inference: few_steps' (a float32 forward without a workspace).
inline StepLoops step_loops(const LayerDims& dims, int64_t steps, size_t scalar_bytes,
                            bool bf16 = false, bool bf16_products = false,
                            bool f32_inference = false) {
  if (use_concurrent_directions(dims, steps, bf16 ? 2 : scalar_bytes, bf16_products, f32_inference))
    return StepLoops::kConcurrent;
  return use_split_loops(dims, steps, bf16, bf16_products, f32_inference) ? StepLoops::kSplit
                                                                          : StepLoops::kGemm;
}

// The threads of each direction's half when they run at once.
inline std::vector<int64_t> direction_halves() {
  const int64_t threads = at::get_num_threads();
  return {(threads + 1) / 2, threads / 2};
}

// How many slices of H units a split loop on `threads` threads cuts: as many
// as threads, fewer if H has fewer 16-unit blocks.
inline int64_t team_parts(int64_t H, int64_t threads) {
  return std::max<int64_t>(1, std::min<int64_t>(threads, (H + 15) / 16));
}

// How one direction's split loop spreads over its `threads` threads:
// `groups` teams, each running its own range of the sorted rows (row_ranges
// in cpu/schedule.h) with no synchronisation between teams, of `size`
// threads that split the hidden units (team_parts) and meet at a barrier
// each step. Each team reads all of W_hh (and W_hr) every step, where a team
// of all threads has each read its slice: so groups only where those
// weights stay in a core's L2 (at most 1 MiB, the Zen 4 EPYC's L2, and at
// most l2_bytes()), and with
// at least kGroupRows rows a group, what the micro-kernel's row tiles need
// (cpu/small_gemm.cpp: 8 rows). scalar_bytes: the products' operand size
// (2 with bfloat16 products). VARLEN_RNN_CPU_ROW_GROUPS=n forces n groups
// (at most threads; read at every call, for tests and measurement).
// Measured on the 2-core AMD EPYC (benchmarks/bench_row_groups.py reruns a
// set of these cases; 2 threads: two groups of one thread against one team of two; float32, GRU and
// LSTM, min of 3 alternating medians per case, ad hoc at 820de5e): inference at full lengths 1.21x
// / 1.23x at H=32 B=256, 1.37x / 1.71x (LSTM) at H=32 B=64, 1.31x / 1.37x at H=48 B=32, 1.08-1.13x
// at H=64 B=16-256, 1.36-1.39x / 1.04-1.37x at H=128 B=32-512, 1.01-1.13x / 0.97-1.08x at H=256
// B=16-256; lengths uniform in [1, T] 1.02-1.88x but 0.98x at H=128 B=32 (GRU); training steps at
// full lengths 1.01-1.25x but 0.97x at H=256 B=16 (GRU) and 0.96x at H=128 B=32 (LSTM),
// uniform 1.01-1.61x; bfloat16 products (uniform, H=32-256 B=16-256) inference 1.11-1.71x,
// training 1.15-1.51x but 0.95x at H=128 B=128 (LSTM). Past L2: 0.96-1.00x at H=512 B=16-64,
// 0.77-0.92x at H=1024; at B=4 H=128 0.87x (GRU) and 1.14x (LSTM), B=4 H=512 0.81-0.82x. Short
// calls, where each group packs the whole of W_hh (and W_ih's panel) instead of a slice: 0.96-1.07x
// (T=8-16, H=64-256, B=16-64, both modes, min of 4; ad hoc at e52e6f4).
constexpr int64_t kGroupRows = 8;
struct TeamLayout {
  int64_t groups = 1, size = 1;
};
inline TeamLayout team_layout(const LayerDims& dims, int64_t threads, size_t scalar_bytes) {
  threads = std::max<int64_t>(threads, 1);
  int64_t groups = 1;
  if (const char* env = std::getenv("VARLEN_RNN_CPU_ROW_GROUPS")) {
    char* end = nullptr;
    const long long n = std::strtoll(env, &end, 10);
    TORCH_CHECK(end != env && *end == '\0' && n >= 1,
                "VARLEN_RNN_CPU_ROW_GROUPS must be a positive integer, got '", env, "'");
    groups = std::min<int64_t>(n, threads);
  } else {
    if (recurrent_weights(dims) * static_cast<int64_t>(scalar_bytes) <=
        std::min<int64_t>(1024 * 1024, l2_bytes()))
      groups = std::clamp<int64_t>(dims.B / kGroupRows, 1, threads);
  }
  return {groups, threads / groups};
}

// Thrown at a barrier whose team has a failed member: unwinds the threads
// waiting there (run_teams catches it and rethrows the failure itself).
struct TeamAborted {};

// A barrier for one team, which may be part of an OpenMP parallel region
// (run_teams runs two teams in one region, so OpenMP's barrier, which waits
// for the whole region, does not fit). It spins briefly (a step's work is
// tens of microseconds), then yields the core: the machine may have fewer
// cores than threads. A failed member's abort() releases the rest.
class TeamBarrier {
 public:
  // size: the team's threads, the same from each of them.
  void wait(int64_t size) {
    const int64_t gen = generation_.load(std::memory_order_acquire);
    if (arrived_.fetch_add(1, std::memory_order_acq_rel) == size - 1) {
      arrived_.store(0, std::memory_order_relaxed);
      generation_.store(gen + 1, std::memory_order_release);
      return;
    }
    for (int64_t spins = 0; generation_.load(std::memory_order_acquire) == gen; ++spins) {
      if (aborted_.load(std::memory_order_relaxed)) throw TeamAborted{};
      if (spins < 4000) {
#if defined(__x86_64__) || defined(__i386__)
        __builtin_ia32_pause();
#endif
      } else {
        std::this_thread::yield();
      }
    }
  }
  void abort() { aborted_.store(true, std::memory_order_relaxed); }

 private:
  std::atomic<int64_t> arrived_{0}, generation_{0};
  std::atomic<bool> aborted_{false};
};

// The threads that run one step loop together: this thread's rank among
// them, their number, and their barrier.
struct Team {
  int64_t rank = 0, size = 1;
  TeamBarrier* barrier = nullptr;
  void sync() const {
    if (size > 1) barrier->wait(size);
  }
};

// Runs body(g, team) for each team g of sizes[g] threads, all at once, in one
// OpenMP parallel region (the BLAS and at::parallel_for run single-threaded
// inside it). If OpenMP grants fewer threads, the teams share them out
// evenly, or with fewer threads than teams one thread runs each in turn. An
// exception thrown by a member ends its team at the next barrier and is
// rethrown here after the region (the first one, if several). For tests,
// VARLEN_RNN_CPU_TEAM_FAULT=k makes the region's thread k throw before it
// starts its loop.
template <typename Body>
void run_teams(const std::vector<int64_t>& sizes, const Body& body) {
  const int64_t teams = static_cast<int64_t>(sizes.size());
  int64_t total = 0;
  for (int64_t n : sizes) total += n;
  const char* fault_env = std::getenv("VARLEN_RNN_CPU_TEAM_FAULT");
  const int64_t fault = fault_env != nullptr ? std::atoll(fault_env) : -1;
  std::vector<TeamBarrier> barriers(teams);
  std::exception_ptr error;
  std::mutex error_mutex;
  auto run_one = [&](int64_t tid, int64_t g, const Team& team) {
    try {
      if (tid == fault)
        throw std::runtime_error("VARLEN_RNN_CPU_TEAM_FAULT: thread " + std::to_string(tid) +
                                 " failed on purpose");
      body(g, team);
    } catch (const TeamAborted&) {
    } catch (...) {
      barriers[g].abort();
      const std::lock_guard<std::mutex> lock(error_mutex);
      if (!error) error = std::current_exception();
    }
  };
  // Thread tid of the nth the region was granted.
  auto region = [&](int64_t tid, int64_t nth) {
    if (nth < teams) {  // one thread runs every team in turn
      for (int64_t g = 0; g < teams && tid == 0; ++g) run_one(tid, g, Team{0, 1, &barriers[g]});
    } else {
      // Team g has threads [first(g), first(g + 1)).
      auto first = [&](int64_t g) {
        if (nth == total) {
          int64_t f = 0;
          for (int64_t k = 0; k < g; ++k) f += sizes[k];
          return f;
        }
        return g * nth / teams;
      };
      int64_t g = 0;
      while (first(g + 1) <= tid) ++g;
      run_one(tid, g, Team{tid - first(g), first(g + 1) - first(g), &barriers[g]});
    }
  };
#if defined(_OPENMP)
#pragma omp parallel num_threads(total)
  region(omp_get_thread_num(), omp_get_num_threads());
#elif defined(VR_GOMP_ENTRY)
  if (parallel_region_available()) {
    // run_one catches every exception: none crosses the runtime's C frames.
    using Region = decltype(region);
    GOMP_parallel(
        [](void* data) {
          (*static_cast<Region*>(data))(omp_get_thread_num(), omp_get_num_threads());
        },
        &region, static_cast<unsigned>(total), 0);
  } else {
    region(0, 1);
  }
#else
  region(0, 1);
#endif
  if (error) std::rethrow_exception(error);
}

// Runs split step loops (cpu/split_steps.h, cpu/split_backward.h) at once:
// for each (direction d, threads) of dirs, team_layout's groups of those
// threads, one loop per range of rows (row_ranges), each on its own team of
// team_parts threads (run_teams). make(loops, d, threads, rows) appends the
// loop of direction d for a team of `threads` threads over `rows` (a deque:
// the loops stay where they are built). Returns the loops, which have run.
// scalar_bytes: team_layout's.
template <typename Loop, typename Make>
std::deque<Loop> run_split_loops(const LayerDims& dims, const Schedule& sched, size_t scalar_bytes,
                                 std::initializer_list<std::pair<int64_t, int64_t>> dirs,
                                 const Make& make) {
  std::deque<Loop> loops;
  std::vector<int64_t> sizes;
  for (const auto& [d, threads] : dirs) {
    const TeamLayout layout = team_layout(dims, threads, scalar_bytes);
    for (const RowRange& rows : row_ranges(sched, layout.groups)) {
      make(loops, d, layout.size, rows);
      sizes.push_back(team_parts(dims.H, layout.size));
    }
  }
  run_teams(sizes, [&](int64_t g, const Team& team) { loops[g].run(team); });
  return loops;
}

// [lo, hi) of part k of n parts of `total`, cut at multiples of 16 (one
// AVX-512 vector of floats) so each slice's gate pass vectorizes fully.
inline std::pair<int64_t, int64_t> slice_of(int64_t total, int64_t parts, int64_t k) {
  const int64_t blocks = (total + 15) / 16;
  const int64_t b0 = blocks * k / parts, b1 = blocks * (k + 1) / parts;
  return {std::min(total, b0 * 16), std::min(total, b1 * 16)};
}

// Units [u0, u1) of every gate of a weight [gates * H, K] (a slice_of H),
// transposed: the BLAS's b [K, gates * (u1 - u0)], one copy. (The packings
// read the weight in place: unit_columns in cpu/packing.h.)
inline at::Tensor unit_rows_t(const at::Tensor& w, int64_t gates, int64_t u0, int64_t u1) {
  const int64_t K = w.size(-1);
  return w.view({gates, -1, K})
      .narrow(1, u0, u1 - u0)
      .permute({2, 0, 1})
      .reshape({K, gates * (u1 - u0)})
      .contiguous();
}

}  // namespace cpu
}  // namespace varlen_rnn
