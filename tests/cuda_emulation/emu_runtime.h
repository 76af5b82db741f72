// The CUDA runtime on CPU threads, for tests/cuda_emulation/emu.cpp: every CUDA thread is a
// std::thread, __syncthreads and grid.sync() are std::barriers, warp shuffles go through a
// per-warp exchange, mma.sync is mma_emu.h's. Included before any kernel header.
#pragma once

#include <ATen/OpMathType.h>
#include <torch/extension.h>
#include <atomic>
#include <barrier>
#include <cassert>
#include <memory>
#include <thread>
#include <vector>
#include <algorithm>
#include <type_traits>

#define VARLEN_RNN_HOST_EMULATION 1
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __align__(n) alignas(n)
#ifndef CUDA_KERNEL_ASSERT
#define CUDA_KERNEL_ASSERT(c) assert(c)
#endif

struct alignas(16) float4 {
  float x, y, z, w;
};  // CUDA's vector types, for 16-byte loads
struct alignas(16) uint4 {
  unsigned x, y, z, w;
};

// What the kernels report through their emulation hooks, for the tests: how many rows
// stage_row copied with 16-byte vectors and how many one element at a time, the worst
// bank conflict (ways) of the tensor-core kernel's fragment loads, and how many widened or
// reinterpreted accesses were not aligned to their size (check_aligned: each would fault on a
// GPU).
struct EmuStats {
  std::atomic<long> vector_rows{0}, scalar_rows{0}, misaligned{0};
  std::atomic<int> fragment_ways{0};
};
inline EmuStats& emu_stats() {
  static EmuStats s;
  return s;
}
namespace varlen_rnn::cuda {
void emu_note_staging(bool vector) { ++(vector ? emu_stats().vector_rows : emu_stats().scalar_rows); }
void emu_note_misaligned(const void*, int) { ++emu_stats().misaligned; }
void emu_note_fragment_ways(int ways) {
  int seen = emu_stats().fragment_ways.load();
  while (ways > seen && !emu_stats().fragment_ways.compare_exchange_weak(seen, ways)) {
  }
}
}  // namespace varlen_rnn::cuda
struct EmuIdx {
  int x = 0, y = 0, z = 0;
};
thread_local EmuIdx threadIdx, blockIdx, blockDim, gridDim;
#include "mma_emu.h"
struct EmuWarp {
  std::barrier<> bar{32};
  double slot[2][32];
  varlen_rnn::cuda::tc::MmaExchange mma;
};
struct EmuBlock {
  explicit EmuBlock(int n, size_t smem) : bar(n), smem(smem + 16, 0xCD), warps(n / 32) {}
  std::barrier<> bar;
  std::vector<unsigned char> smem;
  std::vector<EmuWarp> warps;
};
thread_local EmuBlock* tl_block = nullptr;
thread_local std::barrier<>* tl_grid = nullptr;
inline void __syncthreads() { tl_block->bar.arrive_and_wait(); }
varlen_rnn::cuda::tc::MmaExchange& varlen_rnn::cuda::tc::emu_mma_exchange() {
  return tl_block->warps[threadIdx.x / 32].mma;
}
inline unsigned char* dynamic_smem() { return tl_block->smem.data(); }
template <typename T>
inline T __ldcg(const T* p) {
  return *p;
}
inline int atomicAdd(int* p, int v) {
  const int old = *p;
  *p += v;
  return old;
}  // sequential launches
inline int min(int a, int b) { return a < b ? a : b; }
// Every lane of the warp must call it (the kernels use the full mask): each shuffle is one
// barrier of all 32 lanes. Consecutive shuffles alternate between two slot arrays, so a lane
// writing shuffle i+2's value cannot overwrite one that a slower lane still reads for shuffle i
// (everyone has passed shuffle i+1's barrier, hence finished reading shuffle i).
thread_local unsigned tl_shfl_phase = 0;
template <typename T>
inline T __shfl_xor_sync(unsigned mask, T v, int off) {
  assert(mask == 0xffffffffu);
  EmuWarp& w = tl_block->warps[threadIdx.x / 32];
  const int lane = threadIdx.x % 32;
  double* slot = w.slot[tl_shfl_phase++ & 1];
  slot[lane] = static_cast<double>(v);  // exact for float and double
  w.bar.arrive_and_wait();
  return static_cast<T>(slot[lane ^ off]);
}
namespace cooperative_groups {
struct grid_group {
  void sync() const { tl_grid->arrive_and_wait(); }
};
inline grid_group this_grid() { return {}; }
}  // namespace cooperative_groups

template <typename F>
void emu_launch(int grid, int block, size_t smem, F body) {
  std::barrier<> gbar(grid * block);
  std::vector<std::unique_ptr<EmuBlock>> blocks;
  for (int b = 0; b < grid; ++b) blocks.emplace_back(new EmuBlock(block, smem));
  std::vector<std::thread> th;
  for (int b = 0; b < grid; ++b)
    for (int t = 0; t < block; ++t)
      th.emplace_back([&, b, t] {
        threadIdx.x = t;
        blockIdx.x = b;
        blockDim.x = block;
        gridDim.x = grid;
        tl_block = blocks[b].get();
        tl_grid = &gbar;
        body();
      });
  for (auto& t : th) t.join();
}

// Sequential launch for kernels without barriers.
template <typename F>
void emu_launch_seq(int grid, int block, F body) {
  for (int b = 0; b < grid; ++b)
    for (int t = 0; t < block; ++t) {
      threadIdx.x = t;
      blockIdx.x = b;
      blockDim.x = block;
      gridDim.x = grid;
      body();
    }
}
