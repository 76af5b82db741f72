// The CUDA runtime as the backend's host code uses it, in one place: the
// current device's properties, stream and guard, graph-capture status, the
// host staging buffers of index tensors, and the two kinds of launch (a plain
// grid, a cooperative one). Every other host file (call.h, launch.h, rows.h,
// paths.cuh, paths_backward.cuh, entries.h) reaches the driver only through
// these names and the CUDA error codes, so a test harness that defines them on
// the CPU (tests/cuda_emulation/emu_runtime.h, VARLEN_RNN_HOST_EMULATION) runs
// the whole backend, launchers and GEMMs included, without a GPU.
#pragma once

#ifndef VARLEN_RNN_HOST_EMULATION

#include <ATen/core/Tensor.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAFunctions.h>
#include <c10/cuda/CUDAGraphsC10Utils.h>
#include <c10/cuda/CUDAGuard.h>

#include <utility>

namespace varlen_rnn {
namespace cuda {

using DeviceGuard = c10::cuda::CUDAGuard;

inline const cudaDeviceProp& device_properties() { return *at::cuda::getCurrentDeviceProperties(); }
inline int current_device() { return static_cast<int>(c10::cuda::current_device()); }
inline cudaStream_t current_stream() { return at::cuda::getCurrentCUDAStream(); }

// Whether the current stream is capturing a CUDA graph.
inline bool capturing() {
  return c10::cuda::currentStreamCaptureStatusMayInitCtx() != c10::cuda::CaptureStatus::None;
}

// Host buffers that index tensors are staged in before their copy to the
// device: pinned, from torch's caching host allocator (launch.h's pinned_like).
inline at::TensorOptions host_staging(at::ScalarType dtype) {
  return at::TensorOptions().dtype(dtype).pinned_memory(true);
}

#ifdef __CUDACC__  // the launch syntax is nvcc's; host-only code (tests' programs) has no use
// kernel<<<blocks, threads, 0, stream>>>(args...), checked.
template <typename... Params, typename... Args>
void launch_kernel(void (*kernel)(Params...), int blocks, int threads, cudaStream_t stream,
                   Args&&... args) {
  kernel<<<blocks, threads, 0, stream>>>(std::forward<Args>(args)...);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}
#endif

// A cooperative launch of a kernel taking one argument struct; the driver's
// answer, unchecked (launch.h tells a refusal from a fault).
template <typename Args>
cudaError_t launch_cooperative_kernel(void (*kernel)(Args), int blocks, int threads, size_t smem,
                                      Args* args, cudaStream_t stream) {
  void* arg_list[] = {args};
  return cudaLaunchCooperativeKernel(reinterpret_cast<const void*>(kernel),
                                     dim3(static_cast<unsigned>(blocks)),
                                     dim3(static_cast<unsigned>(threads)), arg_list, smem, stream);
}

}  // namespace cuda
}  // namespace varlen_rnn

#endif  // VARLEN_RNN_HOST_EMULATION
