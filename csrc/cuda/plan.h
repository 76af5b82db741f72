// The CUDA backend's path choice and tiling, as small pure functions of the
// problem and the device. No CUDA or torch headers: tests/test_plan.py
// compiles this file alone with the host compiler and checks the choices.
//
// Vocabulary (see layer.h for the shape legend): a *pass* is one layer's forward
// (inference or training, which also saves the gates) or backward; a *step* s
// is one time step of the recurrence; a *cut* is how a persistent launch is
// divided: blocks_per_dir blocks per direction, row_slices slices of the rows
// times unit slices of J hidden units each (a block owns one of each), rows
// are staged tile_rows at a time, and the reduction dimension K is walked in
// chunks of kc columns.
#pragma once

#include <algorithm>
#include <cstdint>
#include <string>

namespace varlen_rnn {
namespace plan {

// The persistent kernels' fixed geometry (persistent.cuh: kPersistThreads,
// kRows, the backward's kUnitsPerItem); ops_cuda.cu asserts they agree. A
// forward work item holds one unit's gate rows (Problem::gates of them), a
// backward one kUnitsPerItem units' rows of W_hh^T, whatever the cell.
constexpr int64_t kThreads = 256;
constexpr int64_t kWarps = kThreads / 32;
constexpr int64_t kRowsPerItem = 8;
constexpr int64_t kUnitsPerItem = 3;
// At most this many row groups per tile (persistent_cut takes the cheapest count that fits, the
// accumulators and the tile growing with it): 16 (128 rows) on CUDA cores, 4 on tensor cores
// (mma_matvec.cuh keeps a warp's row sources in registers). A tile costs a pass per K chunk
// (barriers and a trip to L2), so at B = 64 one tile of 64 rows, not two of 32.
constexpr int64_t kMaxRowGroups = 16;
constexpr int64_t kMaxRowGroupsMma = 4;
// The tensor-core kernel's scratch for the split of K among warps (mma_matvec.cuh's part_s: a
// C fragment, 4 floats a lane, per warp), at the start of its shared memory.
constexpr int64_t kMmaPartBytes = kWarps * 32 * 4 * 4;

enum class Path { kAuto, kPersistent, kFallback };
enum class Pass { kInference, kTraining, kBackward };

struct Problem {
  int64_t B, H, D;
  Pass pass;
  int64_t storage_bytes;   // sizeof(scalar_t)
  int64_t acc_bytes;       // sizeof(op-math type)
  bool gemm_tensor_cores;  // the fallback's GEMMs run on tensor cores
  // The persistent kernel's recurrent product runs on tensor cores (kMma: mma_matvec.cuh);
  // ops_cuda.cu passes LayerCall::mma. False: the exact CUDA-core product.
  bool persistent_mma = false;
  int64_t gates = 3;  // the cell's kGates: W_hh is [gates*H, H] (GRU 3, LSTM 4, RNN 1)
  // An LSTM with proj_size > 0: its state is W_hr h, a per-step GEMM between the cell
  // and the next step that the persistent kernels do not run, so only the fallback can.
  bool proj = false;
  // The tensor-core kernel's shared-memory rows padded to a conflict-free stride (see
  // padded_stride). False only to show what the padding buys (tests, the cost model).
  bool pad_smem = true;
  // A cap on the tile's rows (VARLEN_RNN_PERSISTENT_MAX_ROWS, rounded down to whole row groups,
  // at least one); 0: none.
  int64_t max_tile_rows = 0;
  // The row slices (VARLEN_RNN_PERSISTENT_ROW_SLICES): 0 the cost model picks them, n > 0 forces
  // n (at most B, and at most the SMs a direction has).
  int64_t row_slices = 0;
};

struct Device {
  int64_t sms;
  int64_t smem_per_block;  // dynamic shared memory a block may use (opt-in limit minus static)
  bool cooperative;        // cooperative launches possible (and not refused)
  bool threads_fit;        // the kernel's registers allow kThreads per block
};

struct Cut {
  // blocks_per_dir = row_slices * unit slices; a block owns J units of one unit slice for the
  // rows of one row slice: the rows by length at positions q, q + row_slices, q + 2 row_slices...
  int64_t J = 0, blocks_per_dir = 0, tile_rows = 0, kc = 0, row_slices = 1;
  // Row strides in elements of the staged tile (>= kc) and of the weight slice in shared
  // memory (>= K): equal to kc and K on CUDA cores, padded for the tensor-core kernel.
  int64_t kc_stride = 0, w_stride = 0;
  int64_t blocks = 0;      // D * blocks_per_dir, never more than the SM count
  int64_t smem = 0;        // dynamic shared memory bytes per block
  double step_cycles = 0;  // modelled cost of one step (see CostModel)
};

struct Choice {
  Path path = Path::kFallback;  // kPersistent or kFallback
  bool fits = false;            // a persistent cut exists
  Cut cut;
  std::string why;                            // why the persistent path does not fit
  double persistent_us = 0, fallback_us = 0;  // modelled time per step
  bool mma = false;  // the persistent kernel runs its recurrent product on tensor cores
};

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }
inline int64_t round_up(int64_t a, int64_t b) { return ceil_div(a, b) * b; }

// ---- The cost model: every constant in one place --------------------------
//
// Time per step of one layer, both paths, modelled on an H100 (132 SMs,
// 227 KiB shared memory per block, ~5.5 TB/s of L2, TF32 ~490 and BF16
// ~990 dense TFLOP/s). The persistent kernel runs on CUDA cores: per work
// item and 32 columns every lane loads 3 weights and 8 staged values from
// shared memory (one warp-wide 4-byte load per cycle per SM) for 24 FMAs, so
// shared memory, not FMA, bounds it at ~11 cycles per item and 32 columns
// (below B = 8, 1, 2 or 4 staged values: the rows in use);
// the butterfly costs 5 x 24 shuffles per item and chunk; each step every
// block stages the state of the running rows from L2 and ends with a grid
// barrier. The fallback runs per step one cuBLAS GEMM (tensor cores for
// half types, float64 (DMMA), and float32 under TF32) plus one pointwise
// kernel, and is bounded below by the host cost of issuing them.
// The constants began as that roofline's estimates (issue 9); since 2026-12-04
// they are benchmarks/gpu_calibrate.py's fit to the H200's timing probe (the
// persistent and fallback paths of one layer, T = 256, B in {1, 8, 64, 256}, H in
// {256, 1024}, float32 and bfloat16, inference and training): where the model's
// structure (the terms) is kept, the scales are measured. The probe's crossovers,
// exact float32 inference: the fallback from B = 256 at H = 256, B = 256 at
// H = 1024 (64 in bfloat16); training from B = 256 at H = 256 and B = 64 at H = 1024.
struct CostModel {
  static constexpr double kClockGHz = 1.75;        // sustained SM clock
  static constexpr double kGridSyncCycles = 5327;  // grid.sync with one block per SM (~3 us)
  // per chunk: two __syncthreads + L2 latency (fitted when a warp's rows were staged one after
  // another; since then by cp.async, all at once: the next probe refits it)
  static constexpr double kPassCycles = 3697;
  static constexpr double kL2BytesPerCycle = 6.491;        // per SM, as staged (5.5 TB/s peak: 24)
  static constexpr double kShuffleCyclesPerItem = 5 * 24;  // butterfly, one warp shuffle per cycle
  // One thread's pointwise work per step: a few dependent global loads/stores.
  static constexpr double kPointwiseCycles[3] = {8, 12, 16};  // inference, training, backward
  static constexpr double kFallbackHostUs = 17.63;    // ATen GEMM call + kernel launch per step
  static constexpr double kFallbackKernelUs = 5.776;  // fixed GPU cost of the step's two kernels
  // Effective GEMM flop per cycle per SM at the skinny [B, H] x [H, 3H] shape:
  // about half of dense peak on tensor cores, ~70% of CUDA-core peak without.
  static constexpr double kGemmHalf = 2048 * 0.5695, kGemmTf32 = 1024 * 0.5695,
                          kGemmFloat64 = 200 * 0.5695, kGemmFloat32 = 180 * 0.5695;
  // Measured over modelled, for the persistent kernel's recurrent product on CUDA cores and on
  // tensor cores (MmaModel). Every constant above with a fitted value: benchmarks/gpu_calibrate.py
  // on the H200's first timing probe (benchmarks/results/gpu_check_H200_20261204-122542/
  // probe.json; calibration.md beside it): auto then picks the fastest path measured in 27 of
  // its 32 configurations (13 before), the tensor-core kernel (4x its model) losing to the
  // exact one nearly everywhere. The pointwise term is what a ridge fit leaves of it (tiny).
  // kMmaScale was fitted to the tensor-core kernel before its K steps were split among idle
  // warps and its chains doubled (mma_tile_cycles models both); no GPU has run that one yet.
  static constexpr double kCudaCoreScale = 0.2281, kMmaScale = 3.98;
};

inline double gemm_flops_per_cycle(const Problem& p) {
  if (p.storage_bytes == 2) return CostModel::kGemmHalf;
  if (p.storage_bytes == 8) return CostModel::kGemmFloat64;
  return p.gemm_tensor_cores ? CostModel::kGemmTf32 : CostModel::kGemmFloat32;
}

// ---- The persistent kernel on tensor cores (kMma) ---------------------------
// Peak dense rates of an H100 SXM (NVIDIA's datasheet, without sparsity): TF32 ~495 TFLOP/s,
// bf16/f16 ~990, FP32 on CUDA cores ~67; per SM at 1.75 GHz that is ~2100, ~4300 and ~290
// flop/cycle. One m16n8k8 TF32 mma is 2048 flop and one m16n8k16 16-bit mma 4096: about a
// cycle of an SM's tensor cores each, so the tensor cores are not what bounds the kernel.
// What does, per mma: each fragment register is one warp-wide 32-bit load from shared memory
// (mma_matvec.cuh; no ldmatrix): 4 for A and 2 for B in every kind (a 16-bit register holds
// two adjacent elements of a row, loaded as one word; the 16-bit kinds stage h in the 16-bit
// type for that), each taking as many cycles as its worst bank conflict. Lanes read rows
// lane/4 (8 rows) and word columns lane%4 of a row-major array: a row stride of S words puts
// lane (g, t) in bank (g*S + t) % 32, so a stride that is a multiple of 32 words (K = 256 fp32
// weights, K = 512 bf16 weights, a 256-wide chunk) puts all 8 rows in 4 banks, 8-way
// conflicts; padded_stride's S = 4 (mod 8) gives the 32 lanes 32 distinct banks. Beside these
// the step keeps its fixed costs (grid barrier, staging h from L2, pointwise), which dominate
// at small B and which tensor cores do not touch. A dependent chain of mmas per warp costs
// kLatencyCycles per mma, half of it with the kernel's two accumulators, and where there are
// fewer tasks than warps the warps split each task's K steps (mma_matvec.cuh). Estimates,
// scaled as a whole by CostModel::kMmaScale.
struct MmaModel {
  static constexpr double kLatencyCycles =
      32;  // mma.sync issue-to-result, A100/H100 microbenchmarks
  static constexpr double kTf32FlopPerCycle = 2048, kHalfFlopPerCycle = 4096;  // per SM, dense
  // Adding a split task's parts: a __syncthreads and splits dependent shared-memory loads.
  static constexpr double kSplitSumCycles = 200;
};

// The row stride, in elements of elem_bytes, of a shared-memory array of rows of n elements that
// the tensor-core kernel reads as fragments: the fewest whole 32-bit words >= n elements that
// are 4 (mod 8) words when padded (conflict-free fragment loads, and 16-byte aligned rows for
// the vector stores that stage them); else n rounded to whole words (a 16-bit pair is one load).
inline int64_t padded_stride(int64_t n, int64_t elem_bytes, bool pad) {
  const int64_t per_word = std::max<int64_t>(1, 4 / elem_bytes);
  const int64_t words = ceil_div(n, per_word);
  return (pad ? words + ((12 - words % 8) % 8) : words) * per_word;
}

// Cycles of one warp-wide shared-memory load where lane reads word
// (lane / 4) * row_stride + (lane % 4) * col_step: the most distinct words in one bank.
inline int64_t smem_load_cycles(int64_t row_stride_words, int64_t col_step) {
  int64_t words[32], n = 0, worst = 1;
  for (int64_t g = 0; g < 8; ++g) {
    for (int64_t t = 0; t < 4; ++t) {
      const int64_t w = g * row_stride_words + t * col_step;
      bool seen = false;
      for (int64_t i = 0; i < n; ++i) seen = seen || words[i] == w;
      if (!seen) words[n++] = w;
    }
  }
  for (int64_t bank = 0; bank < 32; ++bank) {
    int64_t c = 0;
    for (int64_t i = 0; i < n; ++i) c += ((words[i] % 32) + 32) % 32 == bank;
    worst = std::max(worst, c);
  }
  return worst;
}

// How many warps share each task's K steps in the tensor-core product (mma_matvec.cuh's
// mma_splits, which paths.cuh checks against this one): where there are fewer tasks than warps,
// warps / tasks of them, never more than the K steps; else one warp a task.
constexpr int64_t mma_splits(int64_t tasks, int64_t warps, int64_t k_steps) {
  return tasks >= warps ? 1 : std::min(warps / tasks, k_steps);
}

// Modelled cycles of one tile's recurrent product on tensor cores: w_rows weight rows of K
// (row stride w_stride storage elements), `rows` staged rows in chunks of kc (row stride
// kc_stride elements of the storage type for 16-bit kinds, fp32 for TF32).
inline double mma_tile_cycles(const Problem& p, int64_t w_rows, int64_t rows, int64_t K, int64_t kc,
                              int64_t w_stride, int64_t kc_stride) {
  const bool half = p.storage_bytes == 2;
  const int64_t k_mma = half ? 16 : 8;
  const int64_t a_loads = 4, b_loads = 2;  // 32-bit registers per fragment
  const int64_t a_cycles = smem_load_cycles(w_stride * p.storage_bytes / 4, 1);
  const int64_t b_cycles = smem_load_cycles(kc_stride * (half ? 2 : 4) / 4, 1);
  const double flop = 2.0 * 16 * 8 * k_mma;
  const double per_mma =
      std::max<double>(a_loads * a_cycles + b_loads * b_cycles,
                       flop / (half ? MmaModel::kHalfFlopPerCycle : MmaModel::kTf32FlopPerCycle));
  const int64_t chunks = ceil_div(K, kc);
  const int64_t k_steps =
      (chunks - 1) * ceil_div(kc, k_mma) + ceil_div(K - (chunks - 1) * kc, k_mma);
  const int64_t tasks = ceil_div(w_rows, 16) * (rows / kRowsPerItem);
  const double loads = tasks * k_steps * per_mma;  // one shared-memory pipe per SM
  // A warp's chain: its share of a task's K steps where fewer tasks than warps split them
  // (mma_splits), two accumulators in flight, and then the parts' sum behind a __syncthreads.
  const int64_t splits = mma_splits(tasks, kWarps, ceil_div(kc, k_mma));
  const double chain =
      ceil_div(tasks * splits, kWarps) * ceil_div(k_steps, splits) * MmaModel::kLatencyCycles / 2 +
      (splits > 1 ? chunks * MmaModel::kSplitSumCycles : 0);
  return std::max(loads, chain);
}

// Modelled cycles of one persistent step, by term: the grid barrier, staging the tiles' rows
// from L2, their recurrent product, the pointwise part. gpu_calibrate.py scales each term to fit
// measured times, so they are kept apart here.
struct StepTerms {
  double sync = 0, load = 0, compute = 0, pointwise = 0;
  double total() const { return sync + load + compute + pointwise; }
};

// The terms of one persistent step for a block owning J units, with tiles of `rows` rows and K
// walked in chunks of kc, p.B rows running.
inline StepTerms persistent_step_terms(const Problem& p, int64_t J, int64_t rows, int64_t kc,
                                       int64_t w_stride, int64_t kc_stride) {
  const bool bwd = p.pass == Pass::kBackward;
  const int64_t U = bwd ? ceil_div(J, kUnitsPerItem) : J;  // unit groups (persistent.cuh)
  const int64_t K = bwd ? p.gates * p.H : p.H;
  const int64_t ng = bwd ? kUnitsPerItem : p.gates;  // weight rows per work item
  const int64_t B = std::max<int64_t>(p.B, 1);
  const int64_t tiles = ceil_div(B, rows);
  const int64_t chunks = ceil_div(K, kc);
  const int64_t iters = (chunks - 1) * ceil_div(kc, 32) + ceil_div(K - (chunks - 1) * kc, 32);
  const int64_t padded_items = round_up(U * rows / kRowsPerItem, kWarps);  // idle warps cost too
  const double w_load = std::max<double>(1, p.storage_bytes / 4.0);
  const double x_load = std::max<double>(1, p.acc_bytes / 4.0);
  // The rows an item's product covers (persistent_common.cuh's rows_in_use): all kRowsPerItem
  // of its group, or fewer below B = 8, rounded up to 1, 2 or 4.
  const int64_t item_rows = B >= kRowsPerItem ? kRowsPerItem : B > 2 ? 4 : B;
  const double fma = double(ng * item_rows) / (p.acc_bytes == 8 ? 2 : 4);
  const double item_cycles = std::max(ng * w_load + item_rows * x_load, fma);
  const double shuffles = CostModel::kShuffleCyclesPerItem * ng / 3;  // 5 x 8 per weight row
  // dgh; or the state h, published in the storage type by the 16-bit tensor-core kernel.
  const double staged_bytes =
      bwd || (p.persistent_mma && p.storage_bytes == 2) ? p.storage_bytes : p.acc_bytes;
  const double load =
      rows * K * staged_bytes / CostModel::kL2BytesPerCycle + chunks * CostModel::kPassCycles;
  const double compute =
      p.persistent_mma
          ? CostModel::kMmaScale * mma_tile_cycles(p, ng * U, rows, K, kc, w_stride, kc_stride)
          : CostModel::kCudaCoreScale * padded_items * (iters * item_cycles + chunks * shuffles);
  StepTerms t;
  t.sync = CostModel::kGridSyncCycles;
  t.load = tiles * load;
  t.compute = tiles * compute;
  t.pointwise = ceil_div(B * J, kThreads) * CostModel::kPointwiseCycles[int(p.pass)];
  return t;
}

// The terms of one persistent step of cut u with p.B rows running: its largest row slice's
// (each block stages and multiplies only the rows of its slice, ceil(B / row_slices) at most).
inline StepTerms cut_step_terms(const Problem& p, const Cut& u) {
  Problem q = p;
  q.B = ceil_div(std::max<int64_t>(p.B, 1), std::max<int64_t>(u.row_slices, 1));
  return persistent_step_terms(q, u.J, u.tile_rows, u.kc, u.w_stride, u.kc_stride);
}

// One fallback step, by term (microseconds): the host's cost of issuing it, which bounds it
// below, and the GPU's, its two kernels' fixed cost plus the GEMM.
struct FallbackTerms {
  double host = 0, kernel = 0, gemm = 0;
  double total() const { return std::max(host, kernel + gemm); }
};

inline FallbackTerms fallback_step_terms(const Problem& p, const Device& dev) {
  const double per_us = dev.sms * CostModel::kClockGHz * 1e3;  // SM-cycles per microsecond
  const double flops = 2.0 * p.D * std::max<int64_t>(p.B, 1) * p.gates * p.H * p.H;
  const double w_bytes = double(p.D) * p.gates * p.H * p.H * p.storage_bytes;
  const double gemm =
      std::max(flops / gemm_flops_per_cycle(p), w_bytes / CostModel::kL2BytesPerCycle);
  return {CostModel::kFallbackHostUs, CostModel::kFallbackKernelUs, gemm / per_us};
}

inline double fallback_step_us(const Problem& p, const Device& dev) {
  return fallback_step_terms(p, dev).total();
}

// The most row slices persistent_cut prices (1, 2, 4, ... up to it): as many as a direction has
// SMs, whatever B, so the set of cuts it prices does not change with B and a step's modelled
// time never falls as B grows (B = 7 may take 8 slices of one row: the eighth block idles); or
// the forced count (Problem::row_slices), at most B and the SMs of a direction.
inline int64_t max_row_slices(const Problem& p, const Device& dev) {
  const int64_t per_dir = std::max<int64_t>(1, dev.sms / p.D);
  if (p.row_slices > 0) return std::min({p.row_slices, std::max<int64_t>(p.B, 1), per_dir});
  return per_dir;
}

// The persistent cut with the least modelled step time, or false and why not.
// Each block stages, every step, the whole state (backward: dgh) of the rows it
// owns from L2, so at large B splitting the rows between blocks as well as the
// units divides that traffic by the row slices (each block then holds more
// units' weights). Rows per tile follow B (no 32-row tiles for B = 3); the K
// chunk is chosen after the row count, as wide as the shared memory left
// allows and then balanced (K = 1536 in two chunks of 768, not 1504 + 32).
// max_kc > 0 caps the chunk (a test knob).
inline bool persistent_cut(const Problem& p, const Device& dev, int64_t max_kc, Cut& best,
                           std::string& why) {
  if (p.proj) {
    why =
        "an LSTM with proj_size > 0 runs on the fallback path (its projection is a GEMM per step)";
    return false;
  }
  if (!dev.cooperative) {
    why = "the device does not support cooperative launches";
    return false;
  }
  if (!dev.threads_fit) {
    why =
        "the kernel uses too many registers for " + std::to_string(kThreads) + " threads per block";
    return false;
  }
  const bool bwd = p.pass == Pass::kBackward;
  const int64_t K = bwd ? p.gates * p.H : p.H;
  const int64_t ng = bwd ? kUnitsPerItem : p.gates;  // weight rows per work item
  // The tensor-core kernel pads its rows (padded_stride) and, for 16-bit kinds, stages in the
  // storage type (the mma's operand type); the CUDA-core one stages in acc_t, rows unpadded.
  const bool mma = p.persistent_mma;
  const int64_t tile_bytes = mma && p.storage_bytes == 2 ? 2 : p.acc_bytes;
  const int64_t w_stride = mma ? padded_stride(K, p.storage_bytes, p.pad_smem) : K;
  const int64_t part_smem = mma ? kMmaPartBytes : 0;  // the split's scratch (mma_matvec.cuh)
  auto kc_stride_of = [&](int64_t kc) {
    return mma ? padded_stride(kc, tile_bytes, p.pad_smem) : kc;
  };
  const int64_t per_dir = std::max<int64_t>(1, dev.sms / p.D);
  const int64_t max_slices = max_row_slices(p, dev);
  bool found = false;
  int64_t w_smem_1 = 0;  // the W_hh slice of one row slice, for the error
  for (int64_t slices = p.row_slices > 0 ? max_slices : 1; slices <= max_slices; slices *= 2) {
    // The fewest units per block that keeps every block on its own SM, then the same block count
    // with balanced slices.
    const int64_t unit_slices = ceil_div(p.H, ceil_div(p.H, per_dir / slices));
    const int64_t J = ceil_div(p.H, unit_slices);
    const int64_t U = bwd ? ceil_div(J, kUnitsPerItem) : J;
    const int64_t w_smem = ng * U * w_stride * p.storage_bytes;
    if (w_smem_1 == 0) w_smem_1 = w_smem;
    const int64_t slice_rows = ceil_div(std::max<int64_t>(p.B, 1), slices);  // the largest slice
    int64_t max_groups =
        std::min(mma ? kMaxRowGroupsMma : kMaxRowGroups, ceil_div(slice_rows, kRowsPerItem));
    if (p.max_tile_rows > 0)
      max_groups = std::min(max_groups, std::max<int64_t>(1, p.max_tile_rows / kRowsPerItem));
    for (int64_t groups = 1; groups <= max_groups; ++groups) {
      const int64_t rows = kRowsPerItem * groups;
      const int64_t acc_smem = U * groups * ng * kRowsPerItem * p.acc_bytes;
      const int64_t fixed = part_smem + w_smem + acc_smem;
      if (fixed >= dev.smem_per_block) break;  // more rows only need more
      const int64_t avail = (dev.smem_per_block - fixed) / (rows * tile_bytes);
      int64_t kc = avail - (mma ? 48 / tile_bytes : 0);  // room for the padding (< 12 words)
      if (max_kc > 0) kc = std::min(kc, std::max<int64_t>(32, max_kc / 32 * 32));
      if (kc < K) {
        kc = kc / 32 * 32;
        if (kc < 32) break;
        kc = round_up(ceil_div(K, ceil_div(K, kc)), 32);  // same chunk count, balanced
      }
      kc = std::min(kc, K);
      Cut c;
      c.J = J;
      c.row_slices = slices;
      c.blocks_per_dir = slices * unit_slices;
      c.tile_rows = rows;
      c.kc = kc;
      c.kc_stride = kc_stride_of(kc);
      c.w_stride = w_stride;
      c.blocks = p.D * c.blocks_per_dir;
      c.smem = fixed + rows * c.kc_stride * tile_bytes;
      c.step_cycles = cut_step_terms(p, c).total();
      if (!found || c.step_cycles < best.step_cycles) best = c;
      found = true;
    }
  }
  if (!found) {
    why = "W_hh slice of " + std::to_string(w_smem_1) + " bytes per block does not fit in " +
          std::to_string(dev.smem_per_block) + " bytes of shared memory";
  }
  return found;
}

// The path for one pass. `requested` is VARLEN_RNN_CUDA_PATH: kAuto takes the
// path the cost model says is faster; kPersistent takes it whenever it fits
// (the caller reports `why` when it does not).
inline Choice choose_path(const Problem& p, const Device& dev, Path requested, int64_t max_kc) {
  Choice c;
  c.fallback_us = fallback_step_us(p, dev);
  if (requested == Path::kFallback) return c;
  c.fits = persistent_cut(p, dev, max_kc, c.cut, c.why);
  if (!c.fits) return c;
  c.persistent_us = c.cut.step_cycles / (CostModel::kClockGHz * 1e3);
  const bool persistent = requested == Path::kPersistent || c.persistent_us < c.fallback_us;
  c.path = persistent ? Path::kPersistent : Path::kFallback;
  return c;
}

// Where a call may run its persistent product on tensor cores, both persistent kernels are
// priced (choose_path with persistent_mma false, then true) and this picks: the tensor-core
// kernel where it runs and is not modelled slower than the exact one (the model finds it
// slower where its fragment loads conflict in shared memory; auto never picks a slower path),
// or wherever it runs when forced (VARLEN_RNN_TENSOR_CORES=1).
inline Choice prefer_tensor_cores(const Choice& exact, const Choice& tc, bool forced) {
  const bool tc_runs = tc.path == Path::kPersistent;
  const bool exact_runs = exact.path == Path::kPersistent;
  return tc_runs && (forced || !exact_runs || tc.persistent_us <= exact.persistent_us) ? tc : exact;
}

}  // namespace plan
}  // namespace varlen_rnn
