// A check of fibers.h on its own (tests/test_emulation_fibers.py builds and runs it):
//   fibers_check barrier    256 threads in 4 blocks exchange values through a block barrier and a
//                           grid barrier, 3 rounds; prints "ok" when every read saw the round's
//                           writes
//   fibers_check order      prints the order in which 64 threads pass one barrier, for 2 launches
//   fibers_check divergent  a barrier that half the threads skip: must stop with a message
#include <cstdio>
#include <cstring>
#include <vector>

#include "fibers.h"

int main(int argc, char** argv) {
  const char* what = argc > 1 ? argv[1] : "";
  if (!std::strcmp(what, "barrier")) {
    constexpr int kBlocks = 4, kThreads = 64, kRounds = 3;
    std::vector<int> value(kBlocks * kThreads, -1);
    std::vector<emu::Barrier*> blocks;
    for (int b = 0; b < kBlocks; ++b) blocks.push_back(new emu::Barrier(kThreads));
    emu::Barrier grid(kBlocks * kThreads);
    int wrong = 0;
    emu::run(kBlocks * kThreads, [&](int i) {
      threadIdx = {i % kThreads, 0, 0};
      blockIdx = {i / kThreads, 0, 0};
      emu::tl_own = {blocks[i / kThreads], &grid, 0};
      for (int r = 0; r < kRounds; ++r) {
        const int me = blockIdx.x * kThreads + threadIdx.x;  // the indices survive every switch
        if (me != i) ++wrong;
        value[me] = r * 1000 + me;
        static_cast<emu::Barrier*>(emu::tl_own.block)->arrive_and_wait();
        const int peer = blockIdx.x * kThreads + (threadIdx.x + 1) % kThreads;
        if (value[peer] != r * 1000 + peer) ++wrong;  // the block's writes of this round
        static_cast<emu::Barrier*>(emu::tl_own.grid)->arrive_and_wait();
        const int far = (me + kThreads) % (kBlocks * kThreads);
        if (value[far] != r * 1000 + far) ++wrong;  // another block's, after the grid barrier
        static_cast<emu::Barrier*>(emu::tl_own.grid)->arrive_and_wait();
      }
    });
    std::printf(wrong ? "wrong %d\n" : "ok\n", wrong);
    return wrong != 0;
  }
  if (!std::strcmp(what, "order")) {
    for (int launch = 0; launch < 2; ++launch) {
      emu::Barrier bar(64);
      std::vector<int> after;
      emu::run(64, [&](int i) {
        bar.arrive_and_wait();
        after.push_back(i);
      });
      for (int i : after) std::printf("%d ", i);
      std::printf("\n");
    }
    return 0;
  }
  if (!std::strcmp(what, "divergent")) {
    emu::Barrier bar(64);
    emu::run(64, [&](int i) {
      if (i % 2) bar.arrive_and_wait();
    });
    std::printf("returned\n");
    return 0;
  }
  std::fprintf(stderr, "usage: fibers_check barrier|order|divergent\n");
  return 2;
}
