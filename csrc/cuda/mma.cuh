// The tensor-core wrapper: one warp-wide D = A * B + C per call through `mma.sync`, in three
// shapes, all with fp32 accumulators:
//   Kind::tf32  m16n8k8   A [16 x 8],  B [8 x 8]   (float rounded to TF32 by cvt.rna.tf32.f32)
//   Kind::bf16  m16n8k16  A [16 x 16], B [16 x 8]
//   Kind::f16   m16n8k16  A [16 x 16], B [16 x 8]
// C and D are [16 x 8] fp32. A is row-major and B column-major in the instruction's sense
// (`.row.col`), which only names how the fragments are laid out across the lanes.
//
// Which lane holds which element is the PTX ISA's "Matrix Fragments for mma.m16n8k8 /
// mma.m16n8k16" tables, written here once as index helpers: element i of lane `lane` is
// A(a_row, a_col), B(b_row, b_col), C/D(c_row, c_col). With g = lane / 4 and t = lane % 4:
//   tf32  A: row g + 8 (i & 1),          col t + 4 (i >> 1)                  i in 0..3
//         B: row t + 4 i,                col g                               i in 0..1
//   16-bit A: row g + 8 ((i >> 1) & 1),  col 2t + (i & 1) + 8 (i >> 2)       i in 0..7
//          B: row 2t + (i & 1) + 8 (i >> 1), col g                           i in 0..3
//   C/D (all): row g + 8 (i >> 1),       col 2t + (i & 1)                    i in 0..3
// 16-bit elements are packed two per 32-bit register, element 2r in the low half of
// register r (the ISA's "low to high" order).
//
// The host emulation (tests/cuda_emulation/mma_emu.h) implements mma() and the element
// conversions with these same helpers, so kernels written on this header run on CPU threads.
// Needs sm_80 or newer; a device build for an older arch traps if it reaches mma() or to_bits().
#pragma once

#include <cstdint>
#include <cstring>

namespace varlen_rnn {
namespace cuda {
namespace tc {

enum class Kind { tf32, bf16, f16 };

// Instruction shape and packing per kind.
template <Kind k>
struct Shape {
  static constexpr int M = 16, N = 8;
  static constexpr int K = k == Kind::tf32 ? 8 : 16;
  static constexpr int kPerReg = k == Kind::tf32 ? 1 : 2;  // elements per 32-bit register
  static constexpr int kAElems = M * K / 32, kBElems = K * N / 32, kCElems = M * N / 32;
};

template <Kind k>
struct FragA {
  uint32_t reg[Shape<k>::kAElems / Shape<k>::kPerReg];
};
template <Kind k>
struct FragB {
  uint32_t reg[Shape<k>::kBElems / Shape<k>::kPerReg];
};
struct FragC {
  float x[4];
};

// ---- Fragment layouts (see the table above) ----
template <Kind k>
__host__ __device__ constexpr int a_row(int lane, int i) {
  return (lane >> 2) + 8 * (k == Kind::tf32 ? (i & 1) : ((i >> 1) & 1));
}
template <Kind k>
__host__ __device__ constexpr int a_col(int lane, int i) {
  return k == Kind::tf32 ? (lane & 3) + 4 * (i >> 1) : 2 * (lane & 3) + (i & 1) + 8 * (i >> 2);
}
template <Kind k>
__host__ __device__ constexpr int b_row(int lane, int i) {
  return k == Kind::tf32 ? (lane & 3) + 4 * i : 2 * (lane & 3) + (i & 1) + 8 * (i >> 1);
}
template <Kind k>
__host__ __device__ constexpr int b_col(int lane, int /*i*/) {
  return lane >> 2;
}
__host__ __device__ constexpr int c_row(int lane, int i) { return (lane >> 2) + 8 * (i >> 1); }
__host__ __device__ constexpr int c_col(int lane, int i) { return 2 * (lane & 3) + (i & 1); }

#ifdef VARLEN_RNN_HOST_EMULATION
// Defined by tests/cuda_emulation/mma_emu.h.
template <Kind k>
uint32_t cvt_emulated(float v);
template <Kind k>
void mma_emulated(FragC& d, const FragA<k>& a, const FragB<k>& b, const FragC& c);
#endif

// The bits of v in kind k's element type: TF32 rounds to nearest with ties away from zero
// (a float whose low 13 mantissa bits are zero); bf16 and f16 round to nearest even.
template <Kind k>
__device__ __forceinline__ uint32_t to_bits(float v) {
#if defined(VARLEN_RNN_HOST_EMULATION)
  return cvt_emulated<k>(v);
#elif defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  uint32_t r = 0;
  if constexpr (k == Kind::tf32) {
    asm("cvt.rna.tf32.f32 %0, %1;" : "=r"(r) : "f"(v));
  } else if constexpr (k == Kind::bf16) {
    uint16_t h;
    asm("cvt.rn.bf16.f32 %0, %1;" : "=h"(h) : "f"(v));
    r = h;
  } else {
    uint16_t h;
    asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h) : "f"(v));
    r = h;
  }
  return r;
#elif defined(__CUDA_ARCH__)
  __trap();  // cvt to TF32/bf16 needs sm_80
  return 0;
#else
  return 0;  // nvcc's host pass; never called there
#endif
}

// v rounded to TF32 (cvt.rna) and kept as a float: weights rounded once where they are put in
// shared memory, so that their fragments take the bits as they are (as_bits) with no cvt at
// every load. mma.sync reads only a TF32 operand's top 19 bits, which these already are.
__device__ __forceinline__ float tf32_rounded(float v) {
  const uint32_t bits = to_bits<Kind::tf32>(v);
  float f;
  memcpy(&f, &bits, sizeof f);
  return f;
}
__host__ __device__ __forceinline__ uint32_t as_bits(float v) {
  uint32_t bits;
  memcpy(&bits, &v, sizeof bits);
  return bits;
}

// Element i of a fragment from raw element bits (a bf16/f16 already in memory needs no
// conversion) or from a float (converted by to_bits).
template <Kind k, typename Frag>
__host__ __device__ __forceinline__ void set_bits(Frag& f, int i, uint32_t bits) {
  if constexpr (Shape<k>::kPerReg == 1) {
    f.reg[i] = bits;
  } else {
    const int s = 16 * (i & 1);
    f.reg[i >> 1] = (f.reg[i >> 1] & ~(0xFFFFu << s)) | ((bits & 0xFFFFu) << s);
  }
}
template <Kind k, typename Frag>
__host__ __device__ __forceinline__ uint32_t get_bits(const Frag& f, int i) {
  if constexpr (Shape<k>::kPerReg == 1) {
    return f.reg[i];
  } else {
    return (f.reg[i >> 1] >> (16 * (i & 1))) & 0xFFFFu;
  }
}
template <Kind k>
__device__ __forceinline__ void set(FragA<k>& f, int i, float v) {
  set_bits<k>(f, i, to_bits<k>(v));
}
template <Kind k>
__device__ __forceinline__ void set(FragB<k>& f, int i, float v) {
  set_bits<k>(f, i, to_bits<k>(v));
}

// d = a * b + c over the warp; every lane of the warp must call it together (mma.sync.aligned).
// d may be c.
template <Kind k>
__device__ __forceinline__ void mma(FragC& d, const FragA<k>& a, const FragB<k>& b,
                                    const FragC& c) {
#if defined(VARLEN_RNN_HOST_EMULATION)
  mma_emulated<k>(d, a, b, c);
#elif defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  // Operands: 4 D, 4 A, 2 B, 4 C registers in every shape.
#define VARLEN_RNN_MMA_SYNC(INSTR)                                                            \
  asm volatile(INSTR " {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, {%10, %11, %12, %13};\n" \
               : "=f"(d.x[0]), "=f"(d.x[1]), "=f"(d.x[2]), "=f"(d.x[3])                       \
               : "r"(a.reg[0]), "r"(a.reg[1]), "r"(a.reg[2]), "r"(a.reg[3]), "r"(b.reg[0]),   \
                 "r"(b.reg[1]), "f"(c.x[0]), "f"(c.x[1]), "f"(c.x[2]), "f"(c.x[3]))
  if constexpr (k == Kind::tf32) {
    VARLEN_RNN_MMA_SYNC("mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32");
  } else if constexpr (k == Kind::bf16) {
    VARLEN_RNN_MMA_SYNC("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32");
  } else {
    VARLEN_RNN_MMA_SYNC("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32");
  }
#undef VARLEN_RNN_MMA_SYNC
#elif defined(__CUDA_ARCH__)
  __trap();  // mma.sync of these shapes needs sm_80
#endif
}

}  // namespace tc
}  // namespace cuda
}  // namespace varlen_rnn
