// Shared pieces of the fused CPU kernels: element types and their bit-exact conversions to the
// compute type, strided row loads/stores, and the thread count.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

#include "nattn/params.h"

namespace nattn::cpu {

// Storage types of the half-precision dtypes: raw bits, converted to fp32 for all arithmetic.
struct Half {
  uint16_t bits;
};
struct BFloat16 {
  uint16_t bits;
};

inline uint32_t float_bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, sizeof u);
  return u;
}
inline float bits_float(uint32_t u) {
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}

// IEEE binary16 -> binary32, exact for every input (subnormals, infinities, NaN payloads).
inline float half_to_float(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  const uint32_t exponent = (h >> 10) & 0x1fu;
  const uint32_t mantissa = h & 0x3ffu;
  if (exponent == 0x1f) return bits_float(sign | 0x7f800000u | (mantissa << 13));
  if (exponent == 0) {
    // Subnormal: mantissa * 2^-24 is exact in fp32.
    const float magnitude = static_cast<float>(mantissa) * 5.9604644775390625e-8f;
    return sign ? -magnitude : magnitude;
  }
  // Rebias the exponent from 15 to 127.
  return bits_float(sign | ((exponent + 112u) << 23) | (mantissa << 13));
}

// binary32 -> binary16, round to nearest, ties to even; overflow gives infinity, NaN stays NaN.
inline uint16_t float_to_half(float f) {
  const uint32_t x = float_bits(f);
  const uint32_t sign = (x >> 16) & 0x8000u;
  const uint32_t magnitude = x & 0x7fffffffu;
  if (magnitude >= 0x7f800000u) {
    return static_cast<uint16_t>(sign | (magnitude > 0x7f800000u ? 0x7e00u : 0x7c00u));
  }
  if (magnitude >= 0x47800000u) return static_cast<uint16_t>(sign | 0x7c00u);  // >= 2^16
  auto round_shift = [](uint32_t value, uint32_t shift) {
    const uint32_t kept = value >> shift;
    const uint32_t rest = value & ((1u << shift) - 1u);
    const uint32_t half = 1u << (shift - 1u);
    return kept + ((rest > half || (rest == half && (kept & 1u))) ? 1u : 0u);
  };
  if (magnitude < 0x38800000u) {
    // Below 2^-14 the result is subnormal: value * 2^24 rounded to an integer. With the implicit
    // bit, value = m * 2^(e - 150), so the shift is 126 - e; past 24 the result rounds to zero.
    const uint32_t e = magnitude >> 23;
    if (e < 102) return static_cast<uint16_t>(sign);
    const uint32_t m = (magnitude & 0x7fffffu) | 0x800000u;
    return static_cast<uint16_t>(sign | round_shift(m, 126u - e));
  }
  // Normal: rebias the exponent (127 -> 15) and drop 13 mantissa bits; a carry out of the
  // mantissa correctly bumps the exponent (up to infinity).
  return static_cast<uint16_t>(sign | round_shift(magnitude - 0x38000000u, 13u));
}

inline float bfloat16_to_float(uint16_t b) { return bits_float(static_cast<uint32_t>(b) << 16); }

// binary32 -> bfloat16, round to nearest, ties to even; NaN stays (quiet) NaN.
inline uint16_t float_to_bfloat16(float f) {
  const uint32_t x = float_bits(f);
  if ((x & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((x >> 16) | 0x40u);
  return static_cast<uint16_t>((x + 0x7fffu + ((x >> 16) & 1u)) >> 16);
}

// Element type -> compute type (fp64 computes in fp64, everything else in fp32).
template <typename T>
struct ComputeType {
  using type = float;
};
template <>
struct ComputeType<double> {
  using type = double;
};

template <typename A>
inline A to_compute(float x) { return x; }
template <typename A>
inline A to_compute(double x) { return static_cast<A>(x); }
template <typename A>
inline A to_compute(Half x) { return half_to_float(x.bits); }
template <typename A>
inline A to_compute(BFloat16 x) { return bfloat16_to_float(x.bits); }

template <typename T, typename A>
inline T from_compute(A x) {
  return static_cast<T>(x);
}
template <>
inline Half from_compute<Half, float>(float x) {
  return Half{float_to_half(x)};
}
template <>
inline BFloat16 from_compute<BFloat16, float>(float x) {
  return BFloat16{float_to_bfloat16(x)};
}

// Loads n elements spaced `stride` apart into a contiguous compute-type row.
template <typename T, typename A>
inline void load_row(const T* src, int64_t stride, int64_t n, A* dst) {
  if (stride == 1) {
    for (int64_t i = 0; i < n; ++i) dst[i] = to_compute<A>(src[i]);
  } else {
    for (int64_t i = 0; i < n; ++i) dst[i] = to_compute<A>(src[i * stride]);
  }
}

// Stores a contiguous compute-type row as n elements spaced `stride` apart.
template <typename T, typename A>
inline void store_row(const A* src, int64_t n, T* dst, int64_t stride) {
  for (int64_t i = 0; i < n; ++i) dst[i * stride] = from_compute<T>(src[i]);
}

// Element offset of token (x0, x1, x2) of a heads-last tensor; s = [b, x0, x1, x2, h, ...].
inline int64_t token_offset(const int64_t* s, int64_t b, const int64_t* x) {
  return b * s[0] + x[0] * s[1] + x[1] * s[2] + x[2] * s[3];
}

// Threads for one call: p.num_threads when set, else the default; fewer for a problem too small
// to pay for waking them (about 2 MFLOP of forward work per thread).
int resolve_num_threads(const AttentionParams& p);

// Runs f(dtype tag) with a null pointer of the element type of p.dtype.
template <typename F>
void dispatch_dtype(DType dtype, F&& f) {
  switch (dtype) {
    case DType::kFloat16:
      return f(static_cast<Half*>(nullptr));
    case DType::kBFloat16:
      return f(static_cast<BFloat16*>(nullptr));
    case DType::kFloat32:
      return f(static_cast<float*>(nullptr));
    case DType::kFloat64:
      return f(static_cast<double*>(nullptr));
  }
}

}  // namespace nattn::cpu
