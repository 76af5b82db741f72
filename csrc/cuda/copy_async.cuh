// 16 bytes from global to shared memory without waiting for them, for the persistent kernels'
// staging of a tile (persistent_common.cuh's stage_row; mma_matvec.cuh waits for them too):
// cp.async.cg (sm_80+; through L2, as __ldcg), so a warp has every copy of all its tile rows in
// flight at once, where a load and a store per vector wait for each row's loads before its
// stores and the next row's loads. copy_async_wait(): the calling thread's copies have landed; a
// __syncthreads after it shows them to the block (a barrier alone does not wait for them).
// Before sm_80: a load and a store. The emulation defines both on the CPU and keeps each
// thread's copies pending until its wait (tests/cuda_emulation/emu_runtime.h).
#pragma once

#ifndef VARLEN_RNN_HOST_EMULATION
namespace varlen_rnn {
namespace cuda {

__device__ __forceinline__ void copy_async_16(void* dst, const void* src) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  const unsigned to = static_cast<unsigned>(__cvta_generic_to_shared(dst));
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16;" ::"r"(to), "l"(src) : "memory");
#else
  *static_cast<uint4*>(dst) = __ldcg(static_cast<const uint4*>(src));
#endif
}

__device__ __forceinline__ void copy_async_wait() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile("cp.async.wait_all;" ::: "memory");
#endif
}

}  // namespace cuda
}  // namespace varlen_rnn
#endif
