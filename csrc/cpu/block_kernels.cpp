// Register-blocked inner kernels (see block_kernels.h). Each public overload is a thin
// target_clones wrapper around an always-inlined template, so the template body is compiled once
// per instruction-set level with that level's vector width.
#include "cpu/block_kernels.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>

#define NATTN_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#define NATTN_INLINE inline __attribute__((always_inline))

namespace nattn::cpu {
namespace {

// 64-byte vectors through GCC/Clang vector extensions: one AVX-512 register, two AVX2 ones or
// four SSE ones, whichever the clone being compiled has. kCols fp32 values are one such vector,
// kCols fp64 values two. Loads go through memcpy because the rows are not 64-byte aligned.
template <typename A>
struct Vec {
  using type __attribute__((vector_size(64))) = A;
  static constexpr int kLanes = 64 / static_cast<int>(sizeof(A));
  static constexpr int kPerPanel = kCols / kLanes;  // vectors per kCols-wide panel
  // By reference: passing a 64-byte vector by value has a different ABI per clone.
  static NATTN_INLINE void load(type& v, const A* p) { std::memcpy(&v, p, sizeof v); }
  static NATTN_INLINE void store(A* p, const type& v) { std::memcpy(p, &v, sizeof v); }
};

template <typename A>
NATTN_INLINE void block_dot_impl(const A* a, int64_t lda, const A* bt, int64_t ldb,
                                 int64_t depth, A* s) {
  using V = Vec<A>;
  constexpr int kN = V::kPerPanel;
  typename V::type acc[kRows][kN] = {};
  for (int64_t i = 0; i < depth; ++i) {
    typename V::type b[kN];
    for (int j = 0; j < kN; ++j) V::load(b[j], bt + i * ldb + j * V::kLanes);
    for (int r = 0; r < kRows; ++r) {
      const A a_ri = a[r * lda + i];
      for (int j = 0; j < kN; ++j) acc[r][j] += a_ri * b[j];
    }
  }
  for (int r = 0; r < kRows; ++r) {
    for (int j = 0; j < kN; ++j) V::store(s + r * kCols + j * V::kLanes, acc[r][j]);
  }
}

// Output row r, term c reads p[r * kCols + c], or p[c * kCols + r] when kTransposedP. Only the
// first `rows` rows of o are read and written (the others are computed on zeros and dropped,
// so the FMA loop keeps its fixed shape).
template <bool kTransposedP = false, typename A>
NATTN_INLINE void block_accumulate_impl(const A* p, int64_t n, const A* b, int64_t ldb,
                                        int64_t width, A* o, int64_t ldo, int rows = kRows) {
  using V = Vec<A>;
  constexpr int kN = V::kPerPanel;
  // Column panels of kCols: the kRows x kCols accumulator block stays in registers across the
  // n rows of b; the last, partial panel (width not a multiple of kCols) runs a scalar loop.
  int64_t w0 = 0;
  for (; w0 + kCols <= width; w0 += kCols) {
    // Loops over all kRows with the row test inside, so that they unroll with constant indices
    // and acc stays in registers.
    typename V::type acc[kRows][kN];
    for (int r = 0; r < kRows; ++r) {
      for (int j = 0; j < kN; ++j) {
        if (r < rows) {
          V::load(acc[r][j], o + r * ldo + w0 + j * V::kLanes);
        } else {
          acc[r][j] = typename V::type{};
        }
      }
    }
    for (int64_t c = 0; c < n; ++c) {
      typename V::type b_row[kN];
      for (int j = 0; j < kN; ++j) V::load(b_row[j], b + c * ldb + w0 + j * V::kLanes);
      for (int r = 0; r < kRows; ++r) {
        const A p_rc = kTransposedP ? p[c * kCols + r] : p[r * kCols + c];
        for (int j = 0; j < kN; ++j) acc[r][j] += p_rc * b_row[j];
      }
    }
    for (int r = 0; r < kRows; ++r) {
      for (int j = 0; j < kN; ++j) {
        if (r < rows) V::store(o + r * ldo + w0 + j * V::kLanes, acc[r][j]);
      }
    }
  }
  const int64_t tail = width - w0;
  if (tail == 0) return;
  for (int r = 0; r < rows; ++r) {
    A* o_row = o + r * ldo + w0;
    for (int64_t c = 0; c < n; ++c) {
      const A p_rc = kTransposedP ? p[c * kCols + r] : p[r * kCols + c];
      const A* b_row = b + c * ldb + w0;
      for (int64_t w = 0; w < tail; ++w) o_row[w] += p_rc * b_row[w];
    }
  }
}

// Transposed: o[c * ldo + w] += sum_{r < kRows} p[r * kCols + c] * b[r * ldb + w] for c < n,
// kRows output rows (columns of p) at a time: every output row sums its kRows products in r
// order, the same sequence of fused multiply-adds block_accumulate applies to a row whose block
// holds the same values.
template <typename A>
NATTN_INLINE void block_accumulate_transposed_impl(const A* p, int64_t n, const A* b,
                                                   int64_t ldb, int64_t width, A* o,
                                                   int64_t ldo) {
  for (int c0 = 0; c0 < n; c0 += kRows) {
    const int rows = static_cast<int>(std::min<int64_t>(kRows, n - c0));
    block_accumulate_impl<true>(p + c0, kRows, b, ldb, width, o + c0 * ldo, ldo, rows);
  }
}

// exp(x) for fp32 without a library call, so that the loop over a block vectorizes: x = n ln2 + r
// with |r| <= ln2/2 (ln2 split in two for an exact n*ln2_hi), exp(r) by the Cephes degree-6
// polynomial, 2^n built in the exponent bits.
NATTN_INLINE float exp_fp32(float x) {
  const float clamped = x < -88.0f ? -88.0f : (x > 88.0f ? 88.0f : x);
  // Adding and subtracting 1.5 * 2^23 rounds to the nearest integer (|t| < 2^22).
  const float n = (clamped * 1.44269504088896341f + 12582912.0f) - 12582912.0f;
  const float r = clamped - n * 0.693359375f + n * 2.12194440e-4f;
  float poly = 1.9875691500e-4f;
  poly = poly * r + 1.3981999507e-3f;
  poly = poly * r + 8.3334519073e-3f;
  poly = poly * r + 4.1665795894e-2f;
  poly = poly * r + 1.6666665459e-1f;
  poly = poly * r + 5.0000001201e-1f;
  const float exp_r = poly * r * r + r + 1.0f;
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float two_n;
  std::memcpy(&two_n, &bits, sizeof two_n);
  // Below exp(-87) (about 1.6e-38) 2^n would leave the normal range; those weights are 0 to fp32
  // softmax precision, and masked scores (-inf) land here too.
  return x < -87.0f ? 0.0f : exp_r * two_n;
}

NATTN_INLINE float exp_any(float x) { return exp_fp32(x); }
NATTN_INLINE double exp_any(double x) { return std::exp(x); }

// Row maxima / sums of a kRows x kCols block as fixed pairwise trees, all rows at once: the
// halving loops vectorize (a sequential fp reduction would not, without -ffast-math), the rows
// are independent chains the core overlaps, and the summation order is fixed.
template <typename A>
NATTN_INLINE void row_max(const A* x, A* out) {
  A t[kRows][kCols];
  std::memcpy(t, x, sizeof t);
  for (int w = kCols / 2; w >= 1; w /= 2) {
    for (int r = 0; r < kRows; ++r) {
      for (int c = 0; c < w; ++c) t[r][c] = t[r][c] > t[r][c + w] ? t[r][c] : t[r][c + w];
    }
  }
  for (int r = 0; r < kRows; ++r) out[r] = t[r][0];
}
template <typename A>
NATTN_INLINE void row_sum(const A* x, A* out) {
  A t[kRows][kCols];
  std::memcpy(t, x, sizeof t);
  for (int w = kCols / 2; w >= 1; w /= 2) {
    for (int r = 0; r < kRows; ++r) {
      for (int c = 0; c < w; ++c) t[r][c] += t[r][c + w];
    }
  }
  for (int r = 0; r < kRows; ++r) out[r] = t[r][0];
}

// Stage by stage over the whole block rather than row by row: each stage is a chain of dependent
// vector operations (mask, tree max, exp polynomial, tree sum), and running the kRows rows side by
// side lets them overlap instead of paying each chain's latency kRows times.
template <typename A>
NATTN_INLINE void block_online_softmax_impl(A* s, const int64_t* clo, const int64_t* chi, A scale,
                                            A* m, A* l, A* corr) {
  constexpr A kNegInf = -std::numeric_limits<A>::infinity();
  for (int r = 0; r < kRows; ++r) {
    const int lo = static_cast<int>(clo[r]), hi = static_cast<int>(chi[r]);
    for (int c = 0; c < kCols; ++c) {
      s[r * kCols + c] = (c >= lo && c < hi) ? s[r * kCols + c] * scale : kNegInf;
    }
  }
  A m_new[kRows], shift[kRows], sum[kRows];
  row_max(s, m_new);
  for (int r = 0; r < kRows; ++r) {
    m_new[r] = std::max(m[r], m_new[r]);
    // A row with nothing valid so far keeps m = -inf; shifting by 0 then keeps its entries at
    // exp(-inf) = 0 instead of NaN.
    shift[r] = m_new[r] == kNegInf ? A(0) : m_new[r];
    corr[r] = m[r] == m_new[r] ? A(1) : exp_any(m[r] - m_new[r]);
    m[r] = m_new[r];
  }
  for (int r = 0; r < kRows; ++r) {
    for (int c = 0; c < kCols; ++c) s[r * kCols + c] = exp_any(s[r * kCols + c] - shift[r]);
  }
  row_sum(s, sum);
  for (int r = 0; r < kRows; ++r) l[r] = l[r] * corr[r] + sum[r];
}

template <typename A>
NATTN_INLINE void block_backward_probs_impl(A* s, const A* dp, const int64_t* clo,
                                            const int64_t* chi, A scale, const A* row_lse,
                                            const A* col_lse, const A* row_delta,
                                            const A* col_delta, A* ds) {
  constexpr A kNegInf = -std::numeric_limits<A>::infinity();
  // One of row_* / col_* is zero, so row_lse[r] + col_lse[c] is exactly the query's lse and the
  // expressions below round the same way whichever side the queries are on: P and dS of a
  // (query, key) pair are bit-identical in the dq and the dk/dv orientation.
  for (int r = 0; r < kRows; ++r) {
    A* row = s + r * kCols;
    const int64_t lo = clo[r], hi = chi[r];
    for (int c = 0; c < kCols; ++c) {
      const A x = row[c] * scale - (row_lse[r] + col_lse[c]);
      row[c] = exp_any((c >= lo && c < hi) ? x : kNegInf);
      ds[r * kCols + c] = row[c] * (dp[r * kCols + c] - (row_delta[r] + col_delta[c]));
    }
  }
}

}  // namespace

NATTN_CLONES void block_dot(const float* a, int64_t lda, const float* bt, int64_t ldb,
                            int64_t depth, float* s) {
  block_dot_impl(a, lda, bt, ldb, depth, s);
}
NATTN_CLONES void block_dot(const double* a, int64_t lda, const double* bt, int64_t ldb,
                            int64_t depth, double* s) {
  block_dot_impl(a, lda, bt, ldb, depth, s);
}

NATTN_CLONES void block_accumulate(const float* p, int64_t n, const float* b, int64_t ldb,
                                   int64_t width, float* o, int64_t ldo) {
  block_accumulate_impl(p, n, b, ldb, width, o, ldo);
}
NATTN_CLONES void block_accumulate(const double* p, int64_t n, const double* b, int64_t ldb,
                                   int64_t width, double* o, int64_t ldo) {
  block_accumulate_impl(p, n, b, ldb, width, o, ldo);
}


NATTN_CLONES void block_accumulate_transposed(const float* p, int64_t n, const float* b,
                                              int64_t ldb, int64_t width, float* o, int64_t ldo) {
  block_accumulate_transposed_impl(p, n, b, ldb, width, o, ldo);
}
NATTN_CLONES void block_accumulate_transposed(const double* p, int64_t n, const double* b,
                                              int64_t ldb, int64_t width, double* o,
                                              int64_t ldo) {
  block_accumulate_transposed_impl(p, n, b, ldb, width, o, ldo);
}

NATTN_CLONES void block_online_softmax(float* s, const int64_t* clo, const int64_t* chi,
                                       float scale, float* m, float* l, float* corr) {
  block_online_softmax_impl(s, clo, chi, scale, m, l, corr);
}
NATTN_CLONES void block_online_softmax(double* s, const int64_t* clo, const int64_t* chi,
                                       double scale, double* m, double* l, double* corr) {
  block_online_softmax_impl(s, clo, chi, scale, m, l, corr);
}

NATTN_CLONES void block_backward_probs(float* s, const float* dp, const int64_t* clo,
                                       const int64_t* chi, float scale, const float* row_lse,
                                       const float* col_lse, const float* row_delta,
                                       const float* col_delta, float* ds) {
  block_backward_probs_impl(s, dp, clo, chi, scale, row_lse, col_lse, row_delta, col_delta, ds);
}
NATTN_CLONES void block_backward_probs(double* s, const double* dp, const int64_t* clo,
                                       const int64_t* chi, double scale, const double* row_lse,
                                       const double* col_lse, const double* row_delta,
                                       const double* col_delta, double* ds) {
  block_backward_probs_impl(s, dp, clo, chi, scale, row_lse, col_lse, row_delta, col_delta, ds);
}

}  // namespace nattn::cpu
