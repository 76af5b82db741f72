// The CUDA runtime on the CPU, for tests/cuda_emulation/emu.cpp: every CUDA thread is a fiber
// (fibers.h), __syncthreads and grid.sync() are its barriers, warp shuffles go through a
// per-warp exchange, mma.sync is mma_emu.h's. Included before any kernel header.
#pragma once

// ATen and torch's pybind11 casters rather than torch/extension.h, whose C++ frontend (nn,
// optim, data) nothing here uses: it took 22 s of emu.cpp's ~75 s compile.
#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <torch/csrc/utils/pybind.h>
#include <atomic>
#include <cassert>
#include <cstring>
#include <memory>
#include <utility>
#include <vector>
#include <algorithm>
#include <type_traits>

#include "fibers.h"

#define VARLEN_RNN_HOST_EMULATION 1
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __align__(n) alignas(n)
// A device-side assert as an error of the launch. The kernels that assert (pointwise.cuh's
// index checks) run one CUDA thread after another on the caller's thread (launch_kernel), so the
// error reaches the op's caller, where a GPU's would surface at the next synchronization.
#undef CUDA_KERNEL_ASSERT
#define CUDA_KERNEL_ASSERT(c) TORCH_CHECK((c), "device-side assert triggered (emulated): ", #c)

struct alignas(16) float4 {
  float x, y, z, w;
};  // CUDA's vector types, for 16-byte loads
struct alignas(16) uint4 {
  unsigned x, y, z, w;
};

// What the kernels report through their emulation hooks, for the tests: how many rows
// stage_row copied with 16-byte vectors and how many one element at a time, how many tagged
// words (tagged_exchange.cuh) were loaded, how many 16-byte copies were left to land at
// copy_async_wait (cp.async), the worst
// bank conflict (ways) of the tensor-core kernel's fragment loads, and how many widened or
// reinterpreted accesses were not aligned to their size (check_aligned: each would fault on a
// GPU).
struct EmuStats {
  std::atomic<long> vector_rows{0}, scalar_rows{0}, misaligned{0}, tagged_loads{0}, async_copies{0};
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
#include "mma_emu.h"
struct EmuWarp {
  emu::Barrier bar{32};
  double slot[2][32];
  varlen_rnn::cuda::tc::MmaExchange mma;
};
struct EmuBlock {
  explicit EmuBlock(int n, size_t smem) : bar(n), smem(smem + 16, 0xCD), warps(n / 32) {}
  emu::Barrier bar;
  std::vector<unsigned char> smem;
  std::vector<EmuWarp> warps;
};
// The running thread's block and grid barrier (fibers.h swaps them with the thread).
inline EmuBlock* tl_block() { return static_cast<EmuBlock*>(emu::tl_own.block); }
inline emu::Barrier* tl_grid() { return static_cast<emu::Barrier*>(emu::tl_own.grid); }
// The running CUDA thread's own T (by fiber id; what it buffers is emptied as each one ends).
template <typename T>
inline T& fiber_local() {
  thread_local std::vector<T> per_fiber;
  const size_t id = static_cast<size_t>(emu::tl_scheduler->current->id);
  if (per_fiber.size() <= id) per_fiber.resize(id + 1);
  return per_fiber[id];
}
// tagged_exchange.cuh's stores wait in their CUDA thread's buffer until it fences, polls, meets
// a barrier or ends, as a GPU's stores may reach L2 late: a reader that does not wait for its
// step's tag reads an older word (and the tests see wrong values).
using TaggedStores = std::vector<std::pair<uint64_t*, uint64_t>>;
inline TaggedStores& pending_tagged() { return fiber_local<TaggedStores>(); }
inline void flush_tagged() {
  TaggedStores& p = pending_tagged();
  for (auto& [where, word] : p) std::atomic_ref<uint64_t>(*where).store(word);
  p.clear();
}
// copy_async.cuh's copy_async_16 (cp.async): the copy lands when its CUDA thread calls
// copy_async_wait (or ends), not at a barrier, as on a GPU: a tile read without that wait reads
// its old bytes (and the tests see wrong values). The source is read when the copy is issued.
struct AsyncCopy {
  void* dst;
  unsigned char bytes[16];
};
inline std::vector<AsyncCopy>& pending_copies() { return fiber_local<std::vector<AsyncCopy>>(); }
namespace varlen_rnn::cuda {
inline void copy_async_16(void* dst, const void* src) {
  AsyncCopy c{dst, {}};
  std::memcpy(c.bytes, src, 16);
  pending_copies().push_back(c);
  ++emu_stats().async_copies;
}
inline void copy_async_wait() {
  for (const AsyncCopy& c : pending_copies()) std::memcpy(c.dst, c.bytes, 16);
  pending_copies().clear();
}
}  // namespace varlen_rnn::cuda
inline void __syncthreads() {
  flush_tagged();
  tl_block()->bar.arrive_and_wait();
}
varlen_rnn::cuda::tc::MmaExchange& varlen_rnn::cuda::tc::emu_mma_exchange() {
  return tl_block()->warps[threadIdx.x / 32].mma;
}
inline unsigned char* dynamic_smem() { return tl_block()->smem.data(); }
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
// tagged_exchange.cuh's words on CPU atomics (whole 64-bit loads and stores, the fence as one),
// a poll's pause a switch to another fiber, and a wait that never ends an error of the launch.
namespace varlen_rnn::cuda {
inline uint64_t load_tagged(const uint64_t* p) {
  ++emu_stats().tagged_loads;
  return std::atomic_ref<uint64_t>(*const_cast<uint64_t*>(p)).load(std::memory_order_relaxed);
}
inline void store_tagged(uint64_t* p, uint64_t v) { pending_tagged().emplace_back(p, v); }
inline void fence_tagged() {
  flush_tagged();
  std::atomic_thread_fence(std::memory_order_acq_rel);
}
inline void poll_pause() {
  flush_tagged();
  emu::yield();
}
inline void tagged_wait_timed_out() {
  std::fprintf(stderr, "emulation: a tagged exchange's poll never saw its step's tag\n");
  std::abort();
}
}  // namespace varlen_rnn::cuda
// Every lane of the warp must call it (the kernels use the full mask): each shuffle is one
// barrier of all 32 lanes. Consecutive shuffles alternate between two slot arrays, so a lane
// writing shuffle i+2's value cannot overwrite one that a slower lane still reads for shuffle i
// (everyone has passed shuffle i+1's barrier, hence finished reading shuffle i).
// (The phase is emu::tl_own.phase, the thread's own.)
template <typename T>
inline T __shfl_xor_sync(unsigned mask, T v, int off) {
  assert(mask == 0xffffffffu);
  EmuWarp& w = tl_block()->warps[threadIdx.x / 32];
  const int lane = threadIdx.x % 32;
  double* slot = w.slot[emu::tl_own.phase++ & 1];
  slot[lane] = static_cast<double>(v);  // exact for float and double
  w.bar.arrive_and_wait();
  return static_cast<T>(slot[lane ^ off]);
}
// Bit l: lane l's predicate. One barrier of the warp's 32 lanes, through the same alternating
// slots as the shuffles.
inline unsigned __ballot_sync(unsigned mask, bool p) {
  assert(mask == 0xffffffffu);
  EmuWarp& w = tl_block()->warps[threadIdx.x / 32];
  double* slot = w.slot[emu::tl_own.phase++ & 1];
  slot[threadIdx.x % 32] = p ? 1.0 : 0.0;
  w.bar.arrive_and_wait();
  unsigned bits = 0;
  for (int l = 0; l < 32; ++l) bits |= slot[l] != 0.0 ? 1u << l : 0u;
  return bits;
}
namespace cooperative_groups {
struct grid_group {
  void sync() const {
    flush_tagged();
    tl_grid()->arrive_and_wait();
  }
};
inline grid_group this_grid() { return {}; }
}  // namespace cooperative_groups

template <typename F>
void emu_launch(int grid, int block, size_t smem, F body) {
  emu::Barrier gbar(grid * block);
  std::vector<std::unique_ptr<EmuBlock>> blocks;
  for (int b = 0; b < grid; ++b) blocks.emplace_back(new EmuBlock(block, smem));
  emu::run(grid * block, [&](int i) {
    threadIdx = {i % block, 0, 0};
    blockIdx = {i / block, 0, 0};
    blockDim = {block, 1, 1};
    gridDim = {grid, 1, 1};
    emu::tl_own = {blocks[i / block].get(), &gbar, 0};
    body();
    flush_tagged();
    varlen_rnn::cuda::copy_async_wait();
  });
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

// ---- csrc/cuda/runtime.h's names on the CPU -----------------------------------------------
// With these the backend's host code (entries.h, call.h, launch.h, rows.h, paths.cuh,
// paths_backward.cuh: ops_cuda.cu as a whole) runs here on CPU tensors: its ATen ops (the input
// projection, the per-step and weight-gradient GEMMs, sums, sorts, copies) run on the CPU, its
// launches run the kernels above. The device is a pretend one (emu_device: SM count, shared
// memory per block, compute capability), as the tests set it.
enum cudaError_t {
  cudaSuccess = 0,
  cudaErrorInvalidValue = 1,
  cudaErrorLaunchOutOfResources = 701,
  cudaErrorCooperativeLaunchTooLarge = 720,
  cudaErrorNotPermitted = 800,
  cudaErrorNotSupported = 801,
};
enum cudaFuncAttribute { cudaFuncAttributeMaxDynamicSharedMemorySize = 8 };
struct EmuStream {};
using cudaStream_t = EmuStream*;
struct cudaDeviceProp {
  int multiProcessorCount = 0, cooperativeLaunch = 1, maxThreadsPerMultiProcessor = 2048;
  size_t sharedMemPerBlockOptin = 0;
  int major = 9;
};
struct cudaFuncAttributes {
  int maxThreadsPerBlock = 0;
  size_t sharedSizeBytes = 0;
};
struct EmuDevice {
  cudaDeviceProp prop;
  int generation = 0;  // the pretend device's id: a new one for every change (kernel_facts' cache)
  int64_t last_blocks = 0, last_smem = 0;  // the last cooperative launch's grid and shared memory
  size_t max_dynamic_smem = 0;             // what cudaFuncSetAttribute allowed
};
inline EmuDevice& emu_device() {
  static EmuDevice d;
  return d;
}
// The pretend device: SM count, shared memory a block may opt into, compute capability
// (tensor cores from 8). A new device to the backend's per-device caches.
inline void emu_set_device(int64_t sms, int64_t smem, int64_t major) {
  EmuDevice& d = emu_device();
  d.prop.multiProcessorCount = static_cast<int>(sms);
  d.prop.sharedMemPerBlockOptin = static_cast<size_t>(smem);
  d.prop.major = static_cast<int>(major);
  d.max_dynamic_smem = 0;
  ++d.generation;
}
inline cudaError_t cudaFuncGetAttributes(cudaFuncAttributes* attr, const void*) {
  attr->maxThreadsPerBlock = 1024;
  attr->sharedSizeBytes = 0;  // the kernels' shared memory is all dynamic
  return cudaSuccess;
}
inline cudaError_t cudaFuncSetAttribute(const void*, cudaFuncAttribute, int value) {
  if (value < 0 || static_cast<size_t>(value) > emu_device().prop.sharedMemPerBlockOptin) {
    return cudaErrorInvalidValue;
  }
  emu_device().max_dynamic_smem = static_cast<size_t>(value);
  return cudaSuccess;
}
inline cudaError_t cudaGetLastError() { return cudaSuccess; }
inline const char* cudaGetErrorString(cudaError_t e) {
  switch (e) {
    case cudaSuccess:
      return "no error";
    case cudaErrorCooperativeLaunchTooLarge:
      return "too many blocks in cooperative launch";
    case cudaErrorInvalidValue:
      return "invalid argument";
    default:
      return "emulated CUDA error";
  }
}
#define C10_CUDA_KERNEL_LAUNCH_CHECK() ((void)0)
#define C10_CUDA_CHECK(e) TORCH_CHECK((e) == cudaSuccess, "CUDA error: ", cudaGetErrorString(e))

namespace varlen_rnn::cuda {
struct DeviceGuard {
  explicit DeviceGuard(at::Device) {}
};
inline const cudaDeviceProp& device_properties() { return emu_device().prop; }
inline int current_device() { return emu_device().generation; }
inline cudaStream_t current_stream() { return nullptr; }
inline bool capturing() { return false; }
inline at::TensorOptions host_staging(at::ScalarType dtype) {
  return at::TensorOptions().dtype(dtype);  // the CPU's own memory: nothing to pin
}
// A grid of kernels without barriers (the lengths, offsets and fallback step kernels):
// one CUDA thread after another.
template <typename... Params, typename... Args>
void launch_kernel(void (*kernel)(Params...), int blocks, int threads, cudaStream_t,
                   Args&&... args) {
  emu_launch_seq(blocks, threads, [&] { kernel(args...); });
}
// A cooperative launch as the driver takes it: refused where the grid cannot be co-resident
// on the pretend device, an error where it asks more shared memory than was set aside.
template <typename Args>
cudaError_t launch_cooperative_kernel(void (*kernel)(Args), int blocks, int threads, size_t smem,
                                      Args* args, cudaStream_t) {
  const cudaDeviceProp& p = emu_device().prop;
  if (blocks > p.maxThreadsPerMultiProcessor / threads * p.multiProcessorCount) {
    return cudaErrorCooperativeLaunchTooLarge;
  }
  if (smem > emu_device().max_dynamic_smem) return cudaErrorInvalidValue;
  emu_device().last_blocks = blocks;
  emu_device().last_smem = static_cast<int64_t>(smem);
  emu_launch(blocks, threads, smem, [&] { kernel(*args); });
  return cudaSuccess;
}
}  // namespace varlen_rnn::cuda
