// Host emulation of the tensor-core wrapper csrc/cuda/mma.cuh, for the CPU-thread emulation of
// CUDA kernels (one fiber per CUDA thread, fibers.h). Test-only.
//
// mma(): the 32 lanes of a warp post their fragments to the warp's MmaExchange, wait, and each
// lane rebuilds the whole A and B from all lanes' registers with the wrapper's own fragment
// layouts (a_row/a_col, b_row/b_col), then computes its own D elements (c_row/c_col): the C
// element it holds plus the K products, each exact in fp32 for these input types, added in
// fp32 one after another in k order (round to nearest even). A fragment layout that is not a
// bijection onto the matrix aborts the run.
// Element conversions emulate the PTX instructions: cvt.rna.tf32.f32 (ties away from zero),
// cvt.rn.bf16.f32 and cvt.rn.f16.f32 (ties to even).
//
// The including file must first include fibers.h (the threads, `threadIdx`: this thread's lane
// is threadIdx.x % 32) and define VARLEN_RNN_HOST_EMULATION and the CUDA qualifiers as empty
// macros, and afterwards define emu_mma_exchange(): the exchange of the calling thread's warp.
#pragma once

#include "fibers.h"
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include "cuda/mma.cuh"

namespace varlen_rnn {
namespace cuda {
namespace tc {

struct MmaExchange {
  emu::Barrier bar{32};
  uint32_t a[32][4];  // each lane's A registers (4 in every shape)
  uint32_t b[32][2];  // each lane's B registers (2 in every shape)
};
MmaExchange& emu_mma_exchange();

inline float float_of_bits(uint32_t u) {
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}
inline uint32_t bits_of_float(float f) {
  uint32_t u;
  std::memcpy(&u, &f, sizeof u);
  return u;
}

// cvt.rna.tf32.f32: keep 10 explicit mantissa bits; adding half of the dropped range to the
// magnitude and truncating rounds ties away from zero (a carry moves into the exponent, up to
// infinity). Infinities pass; a NaN stays a NaN.
inline uint32_t tf32_rna_bits(float v) {
  const uint32_t u = bits_of_float(v);
  if ((u & 0x7F800000u) == 0x7F800000u) return (u & 0x7FFFFFFFu) > 0x7F800000u ? 0x7FFFFFFFu : u;
  return (u + 0x1000u) & ~0x1FFFu;
}

template <Kind k>
uint32_t cvt_emulated(float v) {
  if constexpr (k == Kind::tf32) {
    return tf32_rna_bits(v);
  } else if constexpr (k == Kind::bf16) {
    return c10::BFloat16(v).x;  // round to nearest even
  } else {
    return c10::Half(v).x;  // round to nearest even
  }
}

// The value of an element from its bits in kind k's type.
template <Kind k>
float value_of_bits(uint32_t bits) {
  if constexpr (k == Kind::tf32) {
    const bool nan = (bits & 0x7F800000u) == 0x7F800000u && (bits & 0x7FFFFFu) != 0;
    if ((bits & 0x1FFFu) && !nan) {
      std::fprintf(stderr,
                   "emulated mma: a TF32 operand 0x%08x has low mantissa bits set; "
                   "fill fragments with set() (cvt.rna.tf32.f32)\n",
                   bits);
      std::abort();
    }
    return float_of_bits(bits);
  } else if constexpr (k == Kind::bf16) {
    return float_of_bits(bits << 16);
  } else {
    return static_cast<float>(c10::Half(static_cast<uint16_t>(bits), c10::Half::from_bits()));
  }
}

[[noreturn]] inline void layout_not_bijective(const char* which) {
  std::fprintf(stderr, "emulated mma: the %s fragment layout does not cover the matrix once\n",
               which);
  std::abort();
}

template <Kind k>
void mma_emulated(FragC& d, const FragA<k>& a, const FragB<k>& b, const FragC& c) {
  using S = Shape<k>;
  MmaExchange& x = emu_mma_exchange();
  const int lane = threadIdx.x % 32;
  static_assert(sizeof(a.reg) == sizeof(x.a[0]) && sizeof(b.reg) == sizeof(x.b[0]), "4 + 2 regs");
  std::memcpy(x.a[lane], a.reg, sizeof(a.reg));
  std::memcpy(x.b[lane], b.reg, sizeof(b.reg));
  x.bar.arrive_and_wait();

  float A[S::M][S::K], B[S::K][S::N];
  int seen_a[S::M][S::K] = {}, seen_b[S::K][S::N] = {};
  for (int l = 0; l < 32; ++l) {
    FragA<k> fa;
    FragB<k> fb;
    std::memcpy(fa.reg, x.a[l], sizeof(fa.reg));
    std::memcpy(fb.reg, x.b[l], sizeof(fb.reg));
    for (int i = 0; i < S::kAElems; ++i) {
      const int r = a_row<k>(l, i), q = a_col<k>(l, i);
      A[r][q] = value_of_bits<k>(get_bits<k>(fa, i));
      ++seen_a[r][q];
    }
    for (int i = 0; i < S::kBElems; ++i) {
      const int r = b_row<k>(l, i), q = b_col<k>(l, i);
      B[r][q] = value_of_bits<k>(get_bits<k>(fb, i));
      ++seen_b[r][q];
    }
  }
  for (int r = 0; r < S::M; ++r)
    for (int q = 0; q < S::K; ++q)
      if (seen_a[r][q] != 1) layout_not_bijective("A");
  for (int r = 0; r < S::K; ++r)
    for (int q = 0; q < S::N; ++q)
      if (seen_b[r][q] != 1) layout_not_bijective("B");

  FragC out;
  for (int i = 0; i < S::kCElems; ++i) {
    const int r = c_row(lane, i), n = c_col(lane, i);
    float acc = c.x[i];
    for (int q = 0; q < S::K; ++q) acc += A[r][q] * B[q][n];  // exact product, fp32 sum
    out.x[i] = acc;
  }
  x.bar.arrive_and_wait();  // every lane has read the slots before any lane reuses them
  d = out;
}

}  // namespace tc
}  // namespace cuda
}  // namespace varlen_rnn
