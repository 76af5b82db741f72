// Host-side run-time state of the CUDA backend, kept out of the launchers:
// the environment knobs (read once), what each persistent kernel can launch
// with on each device (queried once), the cooperative launch that falls back
// when the driver refuses it, nn.GRU's TF32 policy for our float32 GEMMs, and
// lengths moved to the device after a host-side check.
#pragma once

#include <ATen/Context.h>
#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <cstdlib>
#include <cstring>
#include <map>
#include <mutex>
#include <optional>
#include <string>
#include <type_traits>
#include <utility>

#include "plan.h"
#include "runtime.h"

namespace varlen_rnn {
namespace cuda {

// ---- Knobs -----------------------------------------------------------------
// VARLEN_RNN_CUDA_PATH=auto|persistent|fallback and VARLEN_RNN_PERSISTENT_MAX_KC
// (a cap on the K chunk, so small shapes exercise the chunked loop) are read
// once per process. Tests switch them through varlen_rnn_cuda_set_knobs_for_testing.
// VARLEN_RNN_TENSOR_CORES: auto (default) runs the persistent kernels' recurrent products on
// tensor cores where the dtype and TF32 policy allow it and the cost model prices that kernel
// no slower than the exact one; 1 wherever the policy allows; 0 never (the exact CUDA-core
// path in every dtype), to compare or bisect. Tests switch it
// through varlen_rnn_cuda_set_tensor_cores_for_testing (end of this file).
// VARLEN_RNN_PERSISTENT_PAD=0 gives the tensor-core kernels unpadded shared-memory rows (plan.h
// padded_stride), only to measure on a GPU what the padding buys. VARLEN_RNN_PERSISTENT_MAX_ROWS=n
// caps a persistent tile's rows (rounded down to whole row groups of 8; plan.h's Problem::
// max_tile_rows), to measure what larger tiles buy and for tests that need several tiles.
// VARLEN_RNN_PERSISTENT_ROW_SLICES=n splits a direction's rows between n blocks per unit slice
// (at most B and the SMs of a direction; plan.h's Problem::row_slices): 1 keeps every row in
// each block, as before row slices; unset or 0, the cost model's choice.
// VARLEN_RNN_EXCHANGE=barrier|tagged: how the persistent kernels' blocks share h (forward) and
// dgh (backward) between steps on the exact kernels with a float state (float32, and the 16-bit
// types off tensor cores): barrier (default) a grid barrier per step, tagged the words of value
// and step of tagged_exchange.cuh, polled, with no barrier per step. Same results to the bit;
// tagged stays opt-in until a GPU has measured it. Tests switch it through
// varlen_rnn_cuda_set_exchange_for_testing (end of this file).
constexpr int kTensorCoresAuto = 2;  // VARLEN_RNN_TENSOR_CORES unset or "auto"

struct Knobs {
  std::atomic<int> path{static_cast<int>(plan::Path::kAuto)};
  std::atomic<int64_t> max_kc{0};
  std::atomic<int64_t> max_rows{0};    // VARLEN_RNN_PERSISTENT_MAX_ROWS: the tiles' rows at most
  std::atomic<int64_t> row_slices{0};  // VARLEN_RNN_PERSISTENT_ROW_SLICES: 0 the model's choice
  std::atomic<bool> oversubscribe{false};           // tests: launch a grid the driver must refuse
  std::atomic<int> tensor_cores{kTensorCoresAuto};  // VARLEN_RNN_TENSOR_CORES: 0, 1 or auto
  std::atomic<bool> pad_smem{true};                 // VARLEN_RNN_PERSISTENT_PAD (not "0")
  std::atomic<bool> tagged{false};                  // VARLEN_RNN_EXCHANGE=tagged
  std::string bad_path;      // an unparsable VARLEN_RNN_CUDA_PATH, reported per call
  std::string bad_exchange;  // an unparsable VARLEN_RNN_EXCHANGE, likewise
  // The exchange between blocks of the last forward [0] and backward [1] pass (Exchange), for
  // benchmarks and tests (varlen_rnn_cuda_last_exchange_for_testing).
  std::atomic<int> last_exchange[2] = {0, 0};
  // The row slices of the last forward [0] and backward [1] pass's persistent cut (0: the
  // fallback), likewise (varlen_rnn_cuda_last_row_slices_for_testing).
  std::atomic<int64_t> last_row_slices[2] = {0, 0};
};

// How the recurrence of a pass shared h (forward) or dgh (backward) between steps.
enum class Exchange : int {
  kFallback = 0,     // per-step GEMM kernels: through global memory, no persistent exchange
  kExact = 1,        // persistent on CUDA cores: h in acc_t, tiles in acc_t
  kMmaFp32 = 2,      // persistent on TF32 tensor cores: h and tiles fp32, padded strides
  kMma16 = 3,        // persistent on 16-bit tensor cores: h and tiles in the storage type
  kExactTagged = 4,  // persistent on CUDA cores, h or dgh in tagged words (tagged_exchange.cuh)
};
inline Exchange exchange_of(bool persistent, bool mma, int64_t storage_bytes, bool tagged = false) {
  if (!persistent) return Exchange::kFallback;
  if (!mma) return tagged ? Exchange::kExactTagged : Exchange::kExact;
  return storage_bytes == 2 ? Exchange::kMma16 : Exchange::kMmaFp32;
}

inline bool parse_path(const char* s, plan::Path& out) {
  if (s == nullptr || *s == '\0' || std::strcmp(s, "auto") == 0) {
    out = plan::Path::kAuto;
  } else if (std::strcmp(s, "persistent") == 0) {
    out = plan::Path::kPersistent;
  } else if (std::strcmp(s, "fallback") == 0) {
    out = plan::Path::kFallback;
  } else {
    return false;
  }
  return true;
}

inline Knobs& knobs() {
  static Knobs* const k = [] {
    auto* n = new Knobs();  // never destroyed: kernels may run during static destruction
    const char* env = std::getenv("VARLEN_RNN_CUDA_PATH");
    plan::Path p;
    if (parse_path(env, p)) {
      n->path = static_cast<int>(p);
    } else {
      n->bad_path = env;
    }
    if (const char* tc = std::getenv("VARLEN_RNN_TENSOR_CORES")) {
      n->tensor_cores = std::strcmp(tc, "0") == 0   ? 0
                        : std::strcmp(tc, "1") == 0 ? 1
                                                    : kTensorCoresAuto;
    }
    if (const char* pad = std::getenv("VARLEN_RNN_PERSISTENT_PAD")) {
      n->pad_smem = std::strcmp(pad, "0") != 0;
    }
    if (const char* ex = std::getenv("VARLEN_RNN_EXCHANGE")) {
      if (std::strcmp(ex, "tagged") == 0) {
        n->tagged = true;
      } else if (*ex != '\0' && std::strcmp(ex, "barrier") != 0) {
        n->bad_exchange = ex;
      }
    }
    if (const char* cap = std::getenv("VARLEN_RNN_PERSISTENT_MAX_KC")) {
      n->max_kc = std::max<long long>(0, std::atoll(cap));
    }
    if (const char* cap = std::getenv("VARLEN_RNN_PERSISTENT_MAX_ROWS")) {
      n->max_rows = std::max<long long>(0, std::atoll(cap));
    }
    if (const char* slices = std::getenv("VARLEN_RNN_PERSISTENT_ROW_SLICES")) {
      n->row_slices = std::max<long long>(0, std::atoll(slices));
    }
    return n;
  }();
  return *k;
}

// The testing hooks' setting of the knobs the environment gives once per process (path:
// "auto" | "persistent" | "fallback"; max_kc <= 0 lifts the cap; oversubscribe launches
// persistent grids too large to be co-resident). False, changing nothing, for a bad path.
inline bool set_knobs_for_testing(const char* path, int64_t max_kc, bool oversubscribe) {
  plan::Path p;
  if (!parse_path(path, p)) return false;
  Knobs& k = knobs();
  k.path = static_cast<int>(p);
  k.max_kc = max_kc > 0 ? max_kc : 0;
  k.oversubscribe = oversubscribe;
  return true;
}

inline void note_exchange(bool backward, Exchange e, int64_t row_slices = 0) {
  knobs().last_exchange[backward ? 1 : 0] = static_cast<int>(e);
  knobs().last_row_slices[backward ? 1 : 0] = row_slices;
}

inline plan::Path requested_path() {
  const Knobs& k = knobs();
  TORCH_CHECK(k.bad_path.empty(),
              "VARLEN_RNN_CUDA_PATH must be auto, persistent or fallback, got '", k.bad_path, "'");
  TORCH_CHECK(k.bad_exchange.empty(), "VARLEN_RNN_EXCHANGE must be barrier or tagged, got '",
              k.bad_exchange, "'");
  return static_cast<plan::Path>(k.path.load());
}

// ---- What a persistent kernel can launch with, per device ------------------
// Queried once per (device, kernel) and cached: its register and static
// shared-memory use, and the opt-in shared-memory limit raised to the device's
// maximum (so plans of any shape launch without setting it again). Both calls
// neither enqueue work nor synchronize, so stream capture does not restrict
// them (flash-attention raises the same attribute on every call and is
// routinely captured): a first call inside a capture plans as one outside.
// No occupancy query is needed: a cut has at most one block per SM, and a
// block that fits the opt-in shared memory and kThreads threads fits an SM;
// should the driver still disagree, the launch is refused and falls back.
struct KernelFacts {
  plan::Device dev{};
  int max_resident_blocks = 0;  // more blocks than this are never co-resident
  std::string unavailable;      // set: the persistent path cannot run, and why
};

struct KernelFactsCache {
  std::mutex mutex;
  std::map<std::pair<int, const void*>, KernelFacts> facts;
};

inline KernelFactsCache& kernel_facts_cache() {
  static KernelFactsCache* const c = new KernelFactsCache();
  return *c;
}

inline KernelFacts kernel_facts(const void* kernel) {
  const auto key = std::make_pair(current_device(), kernel);
  KernelFactsCache& cache = kernel_facts_cache();
  std::lock_guard<std::mutex> lock(cache.mutex);
  auto it = cache.facts.find(key);
  if (it != cache.facts.end()) return it->second;
  const cudaDeviceProp* prop = &device_properties();
  KernelFacts f;
  f.dev.sms = prop->multiProcessorCount;
  f.dev.cooperative = prop->cooperativeLaunch != 0;
  f.max_resident_blocks = prop->maxThreadsPerMultiProcessor / static_cast<int>(plan::kThreads) *
                          prop->multiProcessorCount;
  cudaFuncAttributes attr{};
  cudaError_t err = cudaFuncGetAttributes(&attr, kernel);
  if (err == cudaSuccess) {
    f.dev.threads_fit = attr.maxThreadsPerBlock >= plan::kThreads;
    const size_t optin = prop->sharedMemPerBlockOptin;
    f.dev.smem_per_block =
        optin > attr.sharedSizeBytes ? static_cast<int64_t>(optin - attr.sharedSizeBytes) : 0;
    if (f.dev.smem_per_block > 0) {
      err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                 static_cast<int>(f.dev.smem_per_block));
    }
  }
  if (err != cudaSuccess) {
    (void)cudaGetLastError();  // not sticky: clear it; not cached, so the next call retries
    f.unavailable = std::string("setting up the launch failed: ") + cudaGetErrorString(err);
    return f;
  }
  cache.facts.emplace(key, f);
  return f;
}

// Errors by which the driver declines a cooperative launch without anything
// having gone wrong on the device (MPS client limits, a sanitizer's reserved
// resources, a grid that cannot be co-resident).
inline bool is_refusal(cudaError_t err) {
  return err == cudaErrorCooperativeLaunchTooLarge || err == cudaErrorNotSupported ||
         err == cudaErrorNotPermitted || err == cudaErrorLaunchOutOfResources;
}

// Launches a persistent kernel with `blocks` blocks. A refused launch clears
// the error, is remembered for this (device, kernel) so later calls plan the
// fallback directly, warns once, and returns false: the caller runs the
// fallback path on the same (untouched) outputs. Any other error throws.
template <typename Args>
bool launch_cooperative(void (*kernel)(Args), int64_t blocks, int64_t smem, Args* args,
                        cudaStream_t stream) {
  const void* const id = reinterpret_cast<const void*>(kernel);
  const KernelFacts facts = kernel_facts(id);
  if (knobs().oversubscribe) blocks = facts.max_resident_blocks + 1;
  const cudaError_t err =
      launch_cooperative_kernel(kernel, static_cast<int>(blocks), static_cast<int>(plan::kThreads),
                                static_cast<size_t>(smem), args, stream);
  if (err == cudaSuccess) {
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    return true;
  }
  if (!is_refusal(err)) C10_CUDA_CHECK(err);
  (void)cudaGetLastError();
  {
    KernelFactsCache& cache = kernel_facts_cache();
    std::lock_guard<std::mutex> lock(cache.mutex);
    const int device = current_device();
    KernelFacts& f = cache.facts[std::make_pair(device, id)];
    f.unavailable =
        std::string("the driver refused its cooperative launch (") + cudaGetErrorString(err) + ")";
  }
  TORCH_WARN_ONCE(
      "varlen_rnn: the driver refused a persistent recurrence kernel's cooperative launch (",
      cudaGetErrorString(err),
      "; this happens under MPS or a sanitizer); this "
      "process uses the per-step fallback path for it from now on");
  return false;
}

// ---- nn.GRU's TF32 policy ----------------------------------------------------
// nn.GRU runs float32 on cuDNN, which uses TF32 tensor cores when the cuDNN
// RNN precision allows it (torch.backends.cudnn.allow_tf32, on by default),
// whatever torch.backends.cuda.matmul.allow_tf32 says. Our float32 GEMMs
// (input projection, the fallback's per-step GEMMs, the weight gradients)
// follow the same flag. The persistent kernel stays exact FP32 on CUDA cores;
// TF32 there comes with its tensor-core version.
//
// torch's per-operator float32 precision API changed over releases:
// Context::allowTF32CuDNN takes an operator enum (recent torch), a string
// before, nothing before that. Fp32Api is chosen by that argument's type, so
// only the branch this torch has is compiled (no version numbers to get wrong).
template <typename M>
struct FirstArg {
  using type = void;
};
template <typename R, typename C, typename A>
struct FirstArg<R (C::*)(A) const> {
  using type = std::decay_t<A>;
};
template <typename R, typename C, typename A, typename B>
struct FirstArg<R (C::*)(A, B) const> {
  using type = std::decay_t<A>;
};

//
// matmul_tf32: whether cuBLAS float32 matmuls may use TF32 now. With per-op
// precisions, the legacy allowTF32CuBLAS() raises ("mix of the legacy and new
// APIs") once a user sets torch.backends.cuda.matmul.fp32_precision or
// torch.backends.fp32_precision, and ATen's own matmuls read the per-op
// precision, so that is what is read here. restore_matmul_precision puts back
// what matmul_precision saved; where that equals what CUDA's "all" setting
// resolves to, the matmul entry goes back to NONE (it follows its parent, as
// it did unless set on its own), so a later change of the parent still reaches it.
template <typename Ctx, typename Arg = typename FirstArg<decltype(&Ctx::allowTF32CuDNN)>::type>
struct Fp32Api {  // allowTF32CuDNN(const std::string& op)
  using Saved = bool;
  static bool rnn_tf32(const Ctx& c) { return c.allowTF32CuDNN(Arg("rnn")); }
  static bool matmul_tf32(const Ctx& c) { return c.allowTF32CuBLAS(); }
  static Saved matmul_precision(const Ctx&) { return false; }
  static void restore_matmul_precision(Ctx&, Saved) {}
};
template <typename Ctx>
struct Fp32Api<Ctx, void> {  // allowTF32CuDNN(): one flag for all of cuDNN
  using Saved = bool;
  static bool rnn_tf32(const Ctx& c) { return c.allowTF32CuDNN(); }
  static bool matmul_tf32(const Ctx& c) { return c.allowTF32CuBLAS(); }
  static Saved matmul_precision(const Ctx&) { return false; }
  static void restore_matmul_precision(Ctx&, Saved) {}
};
template <typename Ctx, typename Op>
struct Fp32Api<Ctx, std::optional<Op>> {  // allowTF32CuDNN(optional<Float32Op>), per-op precisions
  using Backend = typename FirstArg<decltype(&Ctx::float32Precision)>::type;
  using Saved = decltype(std::declval<const Ctx&>().float32Precision(Backend::CUDA, Op::MATMUL));
  static bool rnn_tf32(const Ctx& c) { return c.allowTF32CuDNN(Op::RNN); }
  static bool matmul_tf32(const Ctx& c) { return matmul_precision(c) == Saved::TF32; }
  static Saved matmul_precision(const Ctx& c) {
    return c.float32Precision(Backend::CUDA, Op::MATMUL);
  }
  static void restore_matmul_precision(Ctx& c, Saved s) {
    const bool inherited = s == c.float32Precision(Backend::CUDA, Op::ALL);
    c.setFloat32Precision(Backend::CUDA, Op::MATMUL, inherited ? Saved::NONE : s);
  }
};
using TorchFp32Api = Fp32Api<at::Context>;

inline bool cudnn_rnn_allows_tf32() { return TorchFp32Api::rnn_tf32(at::globalContext()); }
inline bool cublas_matmul_allows_tf32() { return TorchFp32Api::matmul_tf32(at::globalContext()); }

// Makes ATen's cuBLAS calls of this op follow `tf32` for float32, either way.
// ATen offers no thread-local switch that reaches every float32 GEMM: its
// NoTF32Guard reaches the math mode of its cuBLAS handle, not the cuBLASLt
// path that torch 2.11 on an H200 took for mm (its first GPU run: float32 with
// TF32 off in cuDNN but on for matmul gave TF32-sized differences). So the
// guard sets the process-wide matmul flag while it is held. Holders are
// counted under a mutex: the first sets the flag, the last restores the
// user's setting, and concurrent varlen_rnn calls never restore each other's
// change; a call that finds the user's setting is what it needs holds it too, so
// that no other thread's call changes it under it. A holder of the other setting (the cuDNN flag
// changed between two threads' calls) waits until the last holder is gone: a guard spans only the
// host side of one call (its launches), never a GPU wait. While any holder runs, a float32 matmul
// of another thread also sees the held setting; that is the price of ATen offering no thread-local
// way to set it.
class MatmulTf32Guard {
 public:
  MatmulTf32Guard(bool float32, bool tf32) {
    if (!float32) return;
    State& st = state();
    std::unique_lock<std::mutex> lock(st.mutex);
    // This thread's own holder of the other setting (no such nesting today) is not
    // waited for, which would never end: the call runs under that holder's setting.
    if (st.holders > 0 && st.tf32 != tf32 && held_here() > 0) return;
    st.released.wait(lock, [&] { return st.holders == 0 || st.tf32 == tf32; });
    if (st.holders == 0) {  // held even where it is the user's own setting, which then stays
      st.tf32 = tf32;
      st.changed = cublas_matmul_allows_tf32() != tf32;
      if (st.changed) {
        st.saved = TorchFp32Api::matmul_precision(at::globalContext());
        at::globalContext().setAllowTF32CuBLAS(tf32);
      }
    }
    ++st.holders;
    ++held_here();
    holding_ = true;
  }
  ~MatmulTf32Guard() {
    if (!holding_) return;
    State& st = state();
    std::lock_guard<std::mutex> lock(st.mutex);
    --held_here();
    if (--st.holders > 0) return;
    if (st.changed) {
      at::globalContext().setAllowTF32CuBLAS(!st.tf32);
      TorchFp32Api::restore_matmul_precision(at::globalContext(), st.saved);
    }
    st.released.notify_all();
  }
  MatmulTf32Guard(const MatmulTf32Guard&) = delete;
  MatmulTf32Guard& operator=(const MatmulTf32Guard&) = delete;

 private:
  struct State {
    std::mutex mutex;
    std::condition_variable released;
    int holders = 0;
    bool tf32 = false;     // the setting held (meaningful while holders > 0)
    bool changed = false;  // whether the first holder changed the user's setting
    TorchFp32Api::Saved saved{};
  };
  static State& state() {
    static State* const s = new State();
    return *s;
  }
  static int& held_here() {
    static thread_local int n = 0;
    return n;
  }
  bool holding_ = false;
};

// ---- Index tensors from the CPU ----------------------------------------------
// A host-side index tensor the backend copies to the device (CPU lengths, offsets,
// batch_sizes' rows, sorted_indices) lives in a pinned buffer from torch's caching
// host allocator: a copy from pageable memory may synchronize with the stream before
// it starts (CUDA's "API synchronization behavior"), which would make the host wait
// for every kernel queued before the call. The pinned copy is asynchronous, and the
// allocator keeps the buffer until the copy has run. The buffer is ours, so what is
// checked in it is what is sent.
inline at::Tensor pinned_like(at::IntArrayRef sizes, at::ScalarType dtype) {
  return at::empty(sizes, host_staging(dtype));
}

// A pinned host tensor (pinned_like) -> `device`, asynchronously.
inline at::Tensor pinned_to_device(const at::Tensor& pinned, at::Device device) {
  return pinned.to(device, pinned.scalar_type(), /*non_blocking=*/true);
}

// Neither copy can be captured in a CUDA graph: inside a capture, index tensors must
// already be on the device.
inline void check_not_capturing(const char* name) {
  TORCH_CHECK(!capturing(), name,
              " on the CPU cannot be used inside a CUDA graph capture (a copy from the CPU "
              "cannot be captured); pass it on the input's device");
}

// lengths [B] on `device`. CPU lengths (the common case: lists, NumPy arrays
// and pack_padded_sequence's lengths all live there) are checked here, with the
// CPU backend's message, before any kernel runs, then copied without a host sync.
// Lengths already on the device are checked by lengths_prep_kernel's device assert.
inline at::Tensor lengths_on_device(const at::Tensor& lengths, int64_t T, at::Device device) {
  if (lengths.device() == device) return lengths;
  TORCH_CHECK(!capturing(), "lengths must be on the input's device ", device,
              " inside a CUDA graph capture (a copy from the CPU cannot be captured), got lengths "
              "on ",
              lengths.device());
  at::Tensor l = pinned_like(lengths.sizes(), lengths.scalar_type());
  l.copy_(lengths);
  AT_DISPATCH_INDEX_TYPES(l.scalar_type(), "varlen_rnn_check_lengths", [&] {
    const index_t* p = l.data_ptr<index_t>();
    for (int64_t b = 0; b < l.numel(); ++b) {
      TORCH_CHECK(p[b] >= 0 && p[b] <= T, "lengths must be in [0, T] with T=", T,
                  " (the input's time dimension), got lengths[", b, "]=", p[b]);
    }
  });
  return pinned_to_device(l, device);
}

// A ragged op's index tensor on the CPU (batch_sizes, or offsets and
// sorted_indices given there): our own contiguous int64 copy, checked by
// `check` (layer.h's value checks) and returned for the copy to the device
// (pinned; with pinned = false one only read on the host).
template <typename Check>
at::Tensor host_checked_copy(const at::Tensor& t, const char* name, Check check,
                             bool pinned = true) {
  check_not_capturing(name);
  at::Tensor c = pinned ? pinned_like(t.sizes(), at::kLong)
                        : at::empty(t.sizes(), at::TensorOptions().dtype(at::kLong));
  c.copy_(t);
  check(c.data_ptr<int64_t>());
  return c;
}

}  // namespace cuda
}  // namespace varlen_rnn

// Test hook (ctypes, tests/test_cuda_tensor_cores.py), beside varlen_rnn_cuda_set_knobs_for_testing
// (ops_cuda.cu) whose three-argument signature its callers rely on: sets what
// VARLEN_RNN_TENSOR_CORES gives once per process. on: 1 puts the persistent kernels' products on
// tensor cores wherever the dtype and TF32 policy allow, 0 keeps them on the exact CUDA-core path,
// 2 is auto (priced by the cost model), < 0 only reads. Returns the setting before the call.
// Defined here, not inline, because only one translation unit (ops_cuda.cu) includes this header
// and ctypes needs the symbol emitted.
extern "C" __attribute__((visibility("default"))) int varlen_rnn_cuda_set_tensor_cores_for_testing(
    int on) {
  varlen_rnn::cuda::Knobs& k = varlen_rnn::cuda::knobs();
  const int before = k.tensor_cores.load();
  if (on >= 0) k.tensor_cores = on > 1 ? varlen_rnn::cuda::kTensorCoresAuto : on;
  return before;
}

// Test hook (ctypes, tests/test_cuda_device.py): sets what VARLEN_RNN_EXCHANGE gives once per
// process: tagged 1, barrier 0, < 0 only reads. Returns the setting before the call.
extern "C" __attribute__((visibility("default"))) int varlen_rnn_cuda_set_exchange_for_testing(
    int tagged) {
  varlen_rnn::cuda::Knobs& k = varlen_rnn::cuda::knobs();
  const int before = k.tagged.load() ? 1 : 0;
  if (tagged >= 0) k.tagged = tagged > 0;
  return before;
}

// Test and benchmark hook (ctypes, benchmarks/bench.py): the Exchange code of the last forward
// (backward = 0) or backward (1) pass this process ran: 0 fallback, 1 persistent exact, 2
// persistent TF32 tensor cores (fp32 h), 3 persistent 16-bit tensor cores (16-bit h), 4
// persistent exact with the tagged exchange.
extern "C" __attribute__((visibility("default"))) int varlen_rnn_cuda_last_exchange_for_testing(
    int backward) {
  return varlen_rnn::cuda::knobs().last_exchange[backward != 0 ? 1 : 0].load();
}

// Test hook (ctypes, tests/test_cuda_device.py): sets what VARLEN_RNN_PERSISTENT_ROW_SLICES gives
// once per process (0: the cost model's choice; < 0 only reads). Returns the setting before.
extern "C" __attribute__((visibility("default"))) long long
varlen_rnn_cuda_set_row_slices_for_testing(long long slices) {
  varlen_rnn::cuda::Knobs& k = varlen_rnn::cuda::knobs();
  const long long before = k.row_slices.load();
  if (slices >= 0) k.row_slices = slices;
  return before;
}

// Test and benchmark hook: the row slices of the last forward (backward = 0) or backward (1)
// pass's persistent cut, 0 where it ran the fallback.
extern "C" __attribute__((visibility("default"))) long long
varlen_rnn_cuda_last_row_slices_for_testing(int backward) {
  return varlen_rnn::cuda::knobs().last_row_slices[backward != 0 ? 1 : 0].load();
}
