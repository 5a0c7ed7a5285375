// Shared pieces of the fused CPU kernels: element types and their bit-exact conversions to the
// compute type, strided row loads/stores, and the thread count.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>

#if defined(__SSE2__)
#include <emmintrin.h>
#endif

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
// Branch-free (selects only), so that the row loops around it vectorize: the exponent and
// mantissa shifted into place and rebiased from 15 to 127; infinities and NaNs get the all-ones
// exponent; a subnormal m * 2^-24 is formed as (1 + m / 1024) * 2^-14 - 2^-14, exact.
inline float half_to_float(uint16_t h) {
  const uint32_t shifted = static_cast<uint32_t>(h & 0x7fffu) << 13;
  const uint32_t exponent = shifted & 0x0f800000u;
  const uint32_t normal = shifted + (112u << 23);
  const uint32_t special = normal + (112u << 23);  // exponent 31 -> 255
  const float subnormal = bits_float(normal + (1u << 23)) - 6.103515625e-05f;  // - 2^-14
  const uint32_t magnitude = exponent == 0x0f800000u ? special
                             : exponent == 0         ? float_bits(subnormal)
                                                     : normal;
  return bits_float(magnitude | (static_cast<uint32_t>(h & 0x8000u) << 16));
}

// binary32 -> binary16, round to nearest, ties to even; overflow gives infinity, NaN stays NaN
// (quiet, payload dropped). Branch-free like half_to_float:
// - normal results: rebias the exponent (127 -> 15) and round away 13 mantissa bits by adding
//   0xfff plus the kept mantissa's lowest bit; a carry out of the mantissa correctly bumps the
//   exponent, up to infinity;
// - subnormal results (below 2^-14): adding 0.5 (2^-1) aligns the value's bits to 2^-24 units in
//   the low mantissa bits, rounded to nearest even by the fp32 addition itself.
inline uint16_t float_to_half(float f) {
  const uint32_t x = float_bits(f);
  const uint32_t sign = (x >> 16) & 0x8000u;
  const uint32_t magnitude = x & 0x7fffffffu;
  const uint32_t rounded = (magnitude - (112u << 23) + 0xfffu + ((magnitude >> 13) & 1u)) >> 13;
  const uint32_t subnormal = float_bits(bits_float(magnitude) + 0.5f) - 0x3f000000u;
  const uint32_t out = magnitude > 0x7f800000u    ? 0x7e00u
                       : magnitude >= 0x47800000u ? 0x7c00u  // >= 2^16, or infinity
                       : magnitude < 0x38800000u  ? subnormal
                                                  : rounded;
  return static_cast<uint16_t>(sign | out);
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

// Two consecutive bf16 elements as one 32-bit unit (the bf16 lane forward's depth pairs,
// block_kernels.h: lane_forward_bf16); to_compute keeps the bits: lo in the low half.
struct BF16Pair {
  uint16_t lo, hi;
};
template <typename A>
inline A to_compute(BF16Pair x) {
  static_assert(std::is_same_v<A, float>, "a pair is 32 bits of bf16 pair, not a number");
  return bits_float(static_cast<uint32_t>(x.lo) | static_cast<uint32_t>(x.hi) << 16);
}

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

#if defined(__SSE2__)
// half_to_float on 8 contiguous values in SSE2 registers (every x86-64 CPU has SSE2): the same
// integer operations and selects, so the same bits. GCC does not vectorize the scalar loops at the
// baseline level the module is built for, and element by element the conversions made fp16 run
// at 0.5-0.6x fp32's speed (bench/results/cpu-2026-12-03-xeon/).
inline void half_to_float8(const Half* src, float* dst) {
  const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(src));
  const __m128i zero = _mm_setzero_si128();
  for (int half = 0; half < 2; ++half) {
    const __m128i x = half == 0 ? _mm_unpacklo_epi16(h, zero) : _mm_unpackhi_epi16(h, zero);
    const __m128i shifted = _mm_slli_epi32(_mm_and_si128(x, _mm_set1_epi32(0x7fff)), 13);
    const __m128i exponent = _mm_and_si128(shifted, _mm_set1_epi32(0x0f800000));
    const __m128i normal = _mm_add_epi32(shifted, _mm_set1_epi32(112 << 23));
    const __m128i special = _mm_add_epi32(normal, _mm_set1_epi32(112 << 23));
    const __m128i subnormal = _mm_castps_si128(
        _mm_sub_ps(_mm_castsi128_ps(_mm_add_epi32(normal, _mm_set1_epi32(1 << 23))),
                   _mm_set1_ps(6.103515625e-05f)));
    const __m128i is_special = _mm_cmpeq_epi32(exponent, _mm_set1_epi32(0x0f800000));
    const __m128i is_zero_exp = _mm_cmpeq_epi32(exponent, zero);
    __m128i magnitude = _mm_or_si128(_mm_and_si128(is_zero_exp, subnormal),
                                     _mm_andnot_si128(is_zero_exp, normal));
    magnitude = _mm_or_si128(_mm_and_si128(is_special, special),
                             _mm_andnot_si128(is_special, magnitude));
    const __m128i sign = _mm_slli_epi32(_mm_and_si128(x, _mm_set1_epi32(0x8000)), 16);
    _mm_storeu_ps(dst + 4 * half, _mm_castsi128_ps(_mm_or_si128(magnitude, sign)));
  }
}

// float_to_half on 8 contiguous values, the same operations and selects as the scalar function
// (magnitudes are below 2^31, so SSE2's signed compares order them as unsigned ones).
inline __m128i float_to_half8_bits(const float* src) {
  __m128i out[2];
  for (int half = 0; half < 2; ++half) {
    const __m128i x = _mm_castps_si128(_mm_loadu_ps(src + 4 * half));
    const __m128i sign = _mm_and_si128(_mm_srli_epi32(x, 16), _mm_set1_epi32(0x8000));
    const __m128i magnitude = _mm_and_si128(x, _mm_set1_epi32(0x7fffffff));
    const __m128i odd = _mm_and_si128(_mm_srli_epi32(magnitude, 13), _mm_set1_epi32(1));
    const __m128i rounded = _mm_srli_epi32(
        _mm_add_epi32(_mm_add_epi32(magnitude, _mm_set1_epi32(0xfff - (112 << 23))), odd), 13);
    const __m128i subnormal = _mm_sub_epi32(
        _mm_castps_si128(_mm_add_ps(_mm_castsi128_ps(magnitude), _mm_set1_ps(0.5f))),
        _mm_set1_epi32(0x3f000000));
    const __m128i is_nan = _mm_cmpgt_epi32(magnitude, _mm_set1_epi32(0x7f800000));
    const __m128i is_big = _mm_cmpgt_epi32(magnitude, _mm_set1_epi32(0x47800000 - 1));
    const __m128i is_small = _mm_cmplt_epi32(magnitude, _mm_set1_epi32(0x38800000));
    __m128i r = _mm_or_si128(_mm_and_si128(is_small, subnormal),
                             _mm_andnot_si128(is_small, rounded));
    r = _mm_or_si128(_mm_and_si128(is_big, _mm_set1_epi32(0x7c00)), _mm_andnot_si128(is_big, r));
    r = _mm_or_si128(_mm_and_si128(is_nan, _mm_set1_epi32(0x7e00)), _mm_andnot_si128(is_nan, r));
    // Sign-extend the 16-bit results so that the signed saturating pack keeps their bits.
    out[half] = _mm_srai_epi32(_mm_slli_epi32(_mm_or_si128(r, sign), 16), 16);
  }
  return _mm_packs_epi32(out[0], out[1]);
}
inline void float_to_half8(const float* src, Half* dst) {
  _mm_storeu_si128(reinterpret_cast<__m128i*>(dst), float_to_half8_bits(src));
}

// bfloat16_to_float and float_to_bfloat16 on 8 contiguous values in SSE2 registers: the same
// integer operations and select, so the same bits (scalar, the bf16 conversions of tile loads and
// gradient stores took about 5% of the bf16 backward).
inline void bfloat16_to_float8(const BFloat16* src, float* dst) {
  const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(src));
  const __m128i zero = _mm_setzero_si128();
  _mm_storeu_si128(reinterpret_cast<__m128i*>(dst), _mm_unpacklo_epi16(zero, h));
  _mm_storeu_si128(reinterpret_cast<__m128i*>(dst + 4), _mm_unpackhi_epi16(zero, h));
}
inline __m128i float_to_bfloat16_8_bits(const float* src) {
  __m128i out[2];
  for (int half = 0; half < 2; ++half) {
    const __m128i x = _mm_castps_si128(_mm_loadu_ps(src + 4 * half));
    const __m128i odd = _mm_and_si128(_mm_srli_epi32(x, 16), _mm_set1_epi32(1));
    const __m128i rounded =
        _mm_srli_epi32(_mm_add_epi32(_mm_add_epi32(x, _mm_set1_epi32(0x7fff)), odd), 16);
    const __m128i quiet = _mm_or_si128(_mm_srli_epi32(x, 16), _mm_set1_epi32(0x40));
    const __m128i is_nan = _mm_cmpgt_epi32(_mm_and_si128(x, _mm_set1_epi32(0x7fffffff)),
                                           _mm_set1_epi32(0x7f800000));
    const __m128i r =
        _mm_or_si128(_mm_and_si128(is_nan, quiet), _mm_andnot_si128(is_nan, rounded));
    out[half] = _mm_srai_epi32(_mm_slli_epi32(r, 16), 16);  // for the signed saturating pack
  }
  return _mm_packs_epi32(out[0], out[1]);
}
inline void float_to_bfloat16_8(const float* src, BFloat16* dst) {
  _mm_storeu_si128(reinterpret_cast<__m128i*>(dst), float_to_bfloat16_8_bits(src));
}
#endif

// Loads n elements spaced `stride` apart into a contiguous compute-type row.
template <typename T, typename A>
inline void load_row(const T* src, int64_t stride, int64_t n, A* dst) {
  if (stride == 1) {
    int64_t i = 0;
#if defined(__SSE2__)
    if constexpr (std::is_same_v<T, Half> && std::is_same_v<A, float>) {
      for (; i + 8 <= n; i += 8) half_to_float8(src + i, dst + i);
    }
    if constexpr (std::is_same_v<T, BFloat16> && std::is_same_v<A, float>) {
      for (; i + 8 <= n; i += 8) bfloat16_to_float8(src + i, dst + i);
    }
#endif
    for (; i < n; ++i) dst[i] = to_compute<A>(src[i]);
  } else {
    for (int64_t i = 0; i < n; ++i) dst[i] = to_compute<A>(src[i * stride]);
  }
}

// Stores a contiguous compute-type row as n elements spaced `stride` apart.
template <typename T, typename A>
inline void store_row(const A* src, int64_t n, T* dst, int64_t stride) {
  int64_t i = 0;
#if defined(__SSE2__)
  if constexpr (std::is_same_v<T, Half> && std::is_same_v<A, float>) {
    if (stride == 1) {
      for (; i + 8 <= n; i += 8) float_to_half8(src + i, dst + i);
    }
  }
  if constexpr (std::is_same_v<T, BFloat16> && std::is_same_v<A, float>) {
    if (stride == 1) {
      for (; i + 8 <= n; i += 8) float_to_bfloat16_8(src + i, dst + i);
    }
  }
#endif
  for (; i < n; ++i) dst[i * stride] = from_compute<T>(src[i]);
}

// Whether stream_row may write rows of this tensor: dense rows (unit element stride), and a 16-byte
// aligned start for every row (data and the other strides).
inline bool streamable(const void* data, const int64_t* stride, int rank, int64_t elem_bytes) {
  if (stride[rank - 1] != 1 || reinterpret_cast<uintptr_t>(data) % 16 != 0) return false;
  for (int d = 0; d < rank - 1; ++d) {
    if (stride[d] * elem_bytes % 16 != 0) return false;
  }
  return true;
}

// store_row for final results nothing reads back soon (gradients, once per element): with
// `stream` (streamable, unit stride, 16-byte aligned dst) through non-temporal stores, which
// write whole cache lines to memory without first reading them in (a plain store's miss does).
// On the 2-core Zen 4 VM (interleaved in-process A/B, fp32, 2 threads), dq, dk and dv written so
// made the backward of 64 x 64, window 7, 1.06x [1.03-1.09] faster, and a toy NAT block's forward
// + backward 1.03-1.05x. The forward's output is stored plainly: the next layer reads it at once
// (streamed, the forward alone ran 1.06x faster, the NAT block 0.98x [0.95-1.08]). The same bits
// as store_row. Non-temporal stores are weakly ordered: the thread calls stream_fence before any
// other thread may read them.
template <typename T, typename A>
inline void stream_row(const A* src, int64_t n, T* dst, int64_t stride, bool stream) {
  int64_t i = 0;
#if defined(__SSE2__)
  if (stream && stride == 1 && reinterpret_cast<uintptr_t>(dst) % 16 == 0) {
    if constexpr (std::is_same_v<T, float> && std::is_same_v<A, float>) {
      for (; i + 4 <= n; i += 4) _mm_stream_ps(dst + i, _mm_loadu_ps(src + i));
    }
    if constexpr (std::is_same_v<T, Half> && std::is_same_v<A, float>) {
      for (; i + 8 <= n; i += 8) {
        _mm_stream_si128(reinterpret_cast<__m128i*>(dst + i), float_to_half8_bits(src + i));
      }
    }
    if constexpr (std::is_same_v<T, BFloat16> && std::is_same_v<A, float>) {
      for (; i + 8 <= n; i += 8) {
        _mm_stream_si128(reinterpret_cast<__m128i*>(dst + i), float_to_bfloat16_8_bits(src + i));
      }
    }
  }
#endif
  store_row(src + i, n - i, dst + i * stride, stride);
}

// Orders this thread's earlier stream_row stores before its later stores (an sfence), so that a
// thread that sees the later ones (the thread pool's join) sees them too.
inline void stream_fence() {
#if defined(__SSE2__)
  _mm_sfence();
#endif
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
