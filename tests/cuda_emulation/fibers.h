// CUDA threads as fibers, for the emulations (emu_runtime.h, mma_emu_test.cpp): every CUDA
// thread of a launch is a ucontext fiber on the launching OS thread. A barrier (__syncthreads,
// grid.sync(), a warp's shuffle or mma) parks its caller and switches to the next ready fiber;
// the last to arrive releases the others. One OS thread and one switch per thread per barrier,
// where a std::thread per CUDA thread woke hundreds of threads on a few cores at every barrier.
//
// The order in which ready fibers run is shuffled by a seed that changes with every launch, so
// two runs of a kernel interleave its threads differently between barriers, as on a GPU: a sum
// whose order depends on timing, or a read of another thread's write without a barrier between
// them, gives different bits or wrong values. A launch whose threads can no longer all reach
// a barrier (a missing or divergent __syncthreads) stops the process with a message instead of
// hanging. Test-only.
#pragma once

#include <sys/mman.h>
#include <ucontext.h>

#include <atomic>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <exception>
#include <functional>
#include <utility>
#include <vector>

struct EmuIdx {
  int x = 0, y = 0, z = 0;
};
// The running CUDA thread's indices; swapped with the fiber at every switch.
thread_local EmuIdx threadIdx, blockIdx, blockDim, gridDim;

namespace emu {

// What a CUDA thread keeps of its own besides its stack and indices: its block's and its grid's
// state (whatever the runtime keeps there) and a counter (the shuffles' slot phase).
struct Own {
  void* block = nullptr;
  void* grid = nullptr;
  unsigned phase = 0;
};
thread_local Own tl_own;

struct Fiber {
  ucontext_t ctx;
  int id = 0;
  EmuIdx idx[4];  // threadIdx, blockIdx, blockDim, gridDim while switched out
  Own own;
};

// A stack per fiber, reused from launch to launch; a guard page below each catches an overflow.
constexpr size_t kStackBytes = 512 << 10;
constexpr size_t kGuardBytes = 4096;
inline void* stack_at(size_t i) {
  thread_local std::vector<void*> pool;
  while (pool.size() <= i) {
    void* p = mmap(nullptr, kStackBytes + kGuardBytes, PROT_READ | PROT_WRITE,
                   MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (p == MAP_FAILED || mprotect(p, kGuardBytes, PROT_NONE) != 0) {
      std::fprintf(stderr, "emulation: no memory for fiber stack %zu\n", pool.size());
      std::abort();
    }
    pool.push_back(static_cast<char*>(p) + kGuardBytes);
  }
  return pool[i];
}

struct Scheduler {
  ucontext_t main;
  std::vector<Fiber> fibers;
  std::vector<Fiber*> ready;  // a stack: the next to run is at the back
  Fiber* current = nullptr;
  size_t finished = 0;
  uint64_t seed;
  std::function<void(int)> body;

  uint64_t next_random() {  // xorshift64*
    seed ^= seed >> 12;
    seed ^= seed << 25;
    seed ^= seed >> 27;
    return seed * 0x2545F4914F6CDD1Dull;
  }
  // Makes `fs` ready in a shuffled order, behind those already ready or, one time in two, ahead
  // of them: a block released from its barrier may then run on (its next step, say) before the
  // other blocks reach theirs, as a GPU's blocks race.
  void make_ready(std::vector<Fiber*>& fs) {
    for (size_t i = fs.size(); i > 1; --i) std::swap(fs[i - 1], fs[next_random() % i]);
    ready.insert(next_random() % 2 ? ready.begin() : ready.end(), fs.begin(), fs.end());
  }
  // Switches from `me` (parked or finished) to the next ready fiber, or back to the launcher
  // once every fiber has finished.
  void switch_from(Fiber* me) {
    me->idx[0] = threadIdx, me->idx[1] = blockIdx, me->idx[2] = blockDim, me->idx[3] = gridDim;
    me->own = tl_own;
    if (ready.empty()) {
      if (finished == fibers.size()) {
        swapcontext(&me->ctx, &main);
        return;
      }
      std::fprintf(stderr,
                   "emulation: %zu of %zu CUDA threads wait at barriers the others will never "
                   "reach (a missing __syncthreads, or one in a branch not every thread takes)\n",
                   fibers.size() - finished, fibers.size());
      std::abort();
    }
    Fiber* next = ready.back();
    ready.pop_back();
    current = next;
    threadIdx = next->idx[0], blockIdx = next->idx[1], blockDim = next->idx[2];
    gridDim = next->idx[3];
    tl_own = next->own;
    swapcontext(&me->ctx, &next->ctx);
  }
};
thread_local Scheduler* tl_scheduler = nullptr;

inline void fiber_main() {
  Scheduler& s = *tl_scheduler;
  Fiber* me = s.current;
  try {
    s.body(me->id);
  } catch (const std::exception& e) {
    std::fprintf(stderr, "emulation: CUDA thread %d threw: %s\n", me->id, e.what());
    std::abort();
  }
  ++s.finished;
  s.switch_from(me);  // never comes back
}

// A barrier of n fibers of the running launch (std::barrier's arrive_and_wait).
class Barrier {
 public:
  explicit Barrier(int n) : n_(n) { waiting_.reserve(n); }
  Barrier(const Barrier&) = delete;
  Barrier& operator=(const Barrier&) = delete;
  void arrive_and_wait() {
    Scheduler& s = *tl_scheduler;
    if (static_cast<int>(waiting_.size()) + 1 == n_) {  // the last: release the others, go on
      s.make_ready(waiting_);
      waiting_.clear();
      return;
    }
    waiting_.push_back(s.current);
    s.switch_from(s.current);
  }

 private:
  int n_;
  std::vector<Fiber*> waiting_;
};

// Lets the other ready fibers run before the caller goes on (a polling loop's pause): the caller
// goes back among the ready ones at a random place.
inline void yield() {
  Scheduler& s = *tl_scheduler;
  if (s.ready.empty()) return;
  s.ready.insert(s.ready.begin() + static_cast<long>(s.next_random() % (s.ready.size() + 1)),
                 s.current);
  s.switch_from(s.current);
}

// (Out of line: getcontext returns twice, and the launch's loop stays out of its way.)
[[gnu::noinline]] inline void init_fiber(Fiber& f, int id) {
  f.id = id;
  getcontext(&f.ctx);
  f.ctx.uc_stack.ss_sp = stack_at(id);
  f.ctx.uc_stack.ss_size = kStackBytes;
  f.ctx.uc_link = nullptr;
  makecontext(&f.ctx, fiber_main, 0);
}

// Runs body(0) ... body(n - 1), each as a CUDA thread (a fiber), until all have returned. The
// bodies set their own indices (threadIdx, ...) and tl_own first.
inline void run(int n, std::function<void(int)> body) {
  if (n <= 0) return;
  static std::atomic<uint64_t> launches{0};
  Scheduler s;
  s.seed = 0x9E3779B97F4A7C15ull * (++launches) | 1;
  s.body = std::move(body);
  s.fibers.resize(n);
  std::vector<Fiber*> all;
  for (int i = 0; i < n; ++i) {
    init_fiber(s.fibers[i], i);
    all.push_back(&s.fibers[i]);
  }
  s.make_ready(all);
  Scheduler* outer = tl_scheduler;
  const EmuIdx saved[4] = {threadIdx, blockIdx, blockDim, gridDim};
  const Own saved_own = tl_own;
  tl_scheduler = &s;
  Fiber* first = s.ready.back();
  s.ready.pop_back();
  s.current = first;
  swapcontext(&s.main, &first->ctx);
  tl_scheduler = outer;
  threadIdx = saved[0], blockIdx = saved[1], blockDim = saved[2], gridDim = saved[3];
  tl_own = saved_own;
}

}  // namespace emu
