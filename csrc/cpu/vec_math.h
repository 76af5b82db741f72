// A Math policy for the cells (csrc/cells/cell.h; PreciseMath is the other): exp and
// tanh for float in plain arithmetic, so that GCC vectorizes the CPU gate
// loops (a call into libm keeps a loop scalar).
#pragma once

#include <cstdint>
#include <cstring>
#if __has_include(<bit>)
#include <bit>
#endif

namespace varlen_rnn {

// Cody-Waite range reduction and the Cephes degree-6 polynomial: within a few
// ulp of expf. No selects after the math (GCC won't if-convert them): the
// clamps are chosen so that the edge cases come out exact by themselves,
// matching nn.GRU on non-finite input. The loops vectorize only with
// -fno-trapping-math (setup.py adds it), without which GCC won't if-convert
// the clamps.
struct VecMathF32 {
  // std::bit_cast is C++20, but torch < 2.13 builds extensions with
  // -std=c++17: there the same bits go through memcpy, which GCC folds to a
  // register move, so the loops still vectorize.
  static inline float as_float(int32_t i) {
#if defined(__cpp_lib_bit_cast)
    return std::bit_cast<float>(i);
#else
    float f;
    std::memcpy(&f, &i, sizeof f);
    return f;
#endif
  }
  static inline float exp(float x) {
    // Up to 89, past expf's overflow at 88.72, so that exp(89) and exp(+inf)
    // overflow to inf as expf does (sigmoid(-inf) = 0): there k = 128, whose
    // 2^k has the exponent bits of inf. 2^k is one multiply (two halves would
    // cost ~13% more gate pass); the price is that exp overflows from 88.38
    // on (k = 128), where expf does from 88.72: sigmoid(x) in [-88.72, -88.38]
    // comes out 0 instead of a subnormal below 4e-39. From -87 down to the
    // clamp k >= -126, so 2^k stays a normal float.
    x = x > 89.0f ? 89.0f : x;
    x = x < -87.0f ? -87.0f : x;
    // k = round(x / ln 2) without a libm call or a select: adding and taking
    // away 1.5 * 2^23 leaves t rounded to the nearest integer (|t| < 2^22).
    const float t = x * 1.44269504088896341f;
    const float kf = (t + 12582912.0f) - 12582912.0f;
    const int32_t k = static_cast<int32_t>(kf);
    const float r = x - kf * 0.693359375f + kf * 2.12194440e-4f;
    float p = 1.9875691500e-4f;
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    p = p * r * r + r + 1.0f;
    return p * as_float((k + 127) << 23);
  }
  static inline float tanh(float x) {
    // Exactly +-1 from |x| ~ 9 on, as tanhf from 9.01 on, with no clamp of
    // its own: 2 / (exp(2x) + 1) rounds away against 1 there, exp's clamps
    // give inf (2 / inf = 0) and a normal float below, and NaN stays NaN.
    // A clamp at +-10, here until 2026-12-02, changed no result (all 2^32
    // inputs compared, built for x86-64, -v3 and -v4) and cost two compares
    // and blends per call.
    return 1.0f - 2.0f / (exp(2.0f * x) + 1.0f);
  }
};

}  // namespace varlen_rnn
