// Register-blocked inner kernels (see block_kernels.h). Each kernel is an always-inlined template
// compiled once per instruction-set level, with that level's vector width, behind entry points
// that dispatch through a table chosen once per process (end of file).
#include "cpu/block_kernels.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <stdexcept>
#include <string>
#include <type_traits>

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define NATTN_X86 1
#else
#define NATTN_X86 0
#endif
#define NATTN_INLINE inline __attribute__((always_inline))
// The same for a lambda's call operator: a lambda does not inherit its enclosing function's
// target attribute, so one GCC leaves out of line is compiled at the baseline level (in a build
// of the two-row lane kernels before the lambdas were marked, their P V lambda ran at SSE2 width
// and took a quarter of the 64 x 64 forward).
#define NATTN_LAMBDA_INLINE __attribute__((always_inline))

namespace nattn::cpu {
namespace {

// 64-byte vectors through GCC/Clang vector extensions: one AVX-512 register, two AVX2 ones or
// four SSE ones, whichever the level being compiled has. kCols fp32 values are one such vector,
// kCols fp64 values two. Loads go through memcpy because the rows are not 64-byte aligned.
//
// The product kernels (block_dot, block_accumulate) take the level's own register width instead
// (kBytes: 32 for AVX2, 16 for SSE): GCC lowers arithmetic on 64-byte vectors at AVX2 through
// the stack and general registers (vmovq/vpinsrq per half), which measured the AVX2 forward
// slower than the SSE baseline on a Zen 3 VM.
template <typename A, int kBytes = 64>
struct Vec {
  using type __attribute__((vector_size(kBytes))) = A;
  static constexpr int kLanes = kBytes / static_cast<int>(sizeof(A));
  static constexpr int kPerPanel = kCols / kLanes;  // vectors per kCols-wide panel
  // By reference: passing a 64-byte vector by value has a different ABI at each level.
  static NATTN_INLINE void load(type& v, const A* p) { std::memcpy(&v, p, sizeof v); }
  static NATTN_INLINE void store(A* p, const type& v) { std::memcpy(p, &v, sizeof v); }
};

// Rows of the kRows x kCols accumulator block kept in registers at once, at a level whose vector
// registers are kRegBytes wide and number kRegs: the block takes kRows * kCols * sizeof(A) /
// kRegBytes registers, which fits AVX-512 (8 x 16 fp32 = 8 of 32 zmm; fp64 16) but not AVX2 (16
// of 16 ymm for fp32: every FMA then spills, and the AVX2 kernels measured slower than the SSE
// baseline on a 2-core Zen 3 VM) or SSE. Passes of kRowPass rows keep at most about half the
// registers as accumulators and reload the shared operand row per pass from L1.
template <typename A, int kRegBytes, int kRegs>
constexpr int row_pass() {
  int rows = kRows;
  while (rows > 1 && rows * kCols * static_cast<int>(sizeof(A)) / kRegBytes > kRegs / 2) {
    rows /= 2;
  }
  return rows;
}

template <int kRowPass, int kBytes, typename A>
NATTN_INLINE void block_dot_impl(const A* a, int64_t lda, const A* bt, int64_t ldb,
                                 int64_t depth, A* s) {
  using V = Vec<A, kBytes>;
  constexpr int kN = V::kPerPanel;
  for (int r0 = 0; r0 < kRows; r0 += kRowPass) {
    typename V::type acc[kRowPass][kN] = {};
    for (int64_t i = 0; i < depth; ++i) {
      typename V::type b[kN];
      for (int j = 0; j < kN; ++j) V::load(b[j], bt + i * ldb + j * V::kLanes);
      for (int r = 0; r < kRowPass; ++r) {
        const A a_ri = a[(r0 + r) * lda + i];
        for (int j = 0; j < kN; ++j) acc[r][j] += a_ri * b[j];
      }
    }
    for (int r = 0; r < kRowPass; ++r) {
      for (int j = 0; j < kN; ++j) V::store(s + (r0 + r) * kCols + j * V::kLanes, acc[r][j]);
    }
  }
}

// Passes of kRowPass rows over kPanels adjacent column panels at once (kRowPass * kPanels *
// kPerPanel accumulators), over the columns [w0, last full group of kPanels panels); returns
// where it stopped. Narrow passes fit the band closer: a pass runs over the union of its rows'
// spans, so 2-row passes over two panels execute fewer terms than 4-row passes over one with the
// same registers (8 queries x 14 keys of a window-7 line: 64 row-terms instead of 80, 56 of them
// nonzero).
template <int kRowPass, int kPanels, int kBytes, bool kTransposedP, typename A>
NATTN_INLINE int64_t accumulate_panels(const A* p, int64_t n, const A* b, int64_t ldb,
                                       int64_t width, int64_t w0, A* o, int64_t ldo, int rows,
                                       const int64_t* clo, const int64_t* chi, int64_t key0,
                                       int64_t ps_r, int64_t ps_c) {
  using V = Vec<A, kBytes>;
  constexpr int kN = V::kPerPanel * kPanels;
  constexpr int64_t kWidth = static_cast<int64_t>(kCols) * kPanels;
  if (w0 + kWidth > width) return w0;
  constexpr int kPasses = (kRows + kRowPass - 1) / kRowPass;
  int64_t t_begin[kPasses], t_end[kPasses];
  for (int r0 = 0; r0 < rows; r0 += kRowPass) {
    int64_t lo = 0, hi = n;
    if (clo != nullptr) {
      const int last = std::min(rows, r0 + kRowPass);
      lo = n;
      hi = 0;
      if constexpr (kTransposedP) {
        for (int64_t t = 0; t < n; ++t) {
          if (clo[t] < key0 + last && chi[t] > key0 + r0) {
            lo = std::min(lo, t);
            hi = t + 1;
          }
        }
      } else {
        for (int r = r0; r < last; ++r) {
          if (clo[r] < chi[r]) {
            lo = std::min(lo, clo[r]);
            hi = std::max(hi, chi[r]);
          }
        }
        hi = std::min(hi, n);
      }
    }
    t_begin[r0 / kRowPass] = lo;
    t_end[r0 / kRowPass] = hi;
  }
  for (; w0 + kWidth <= width; w0 += kWidth) {
    for (int r0 = 0; r0 < rows; r0 += kRowPass) {
      const int64_t c_begin = t_begin[r0 / kRowPass], c_end = t_end[r0 / kRowPass];
      if (c_begin >= c_end) continue;
      // Loops over all kRowPass rows with the row test inside, so that they unroll with
      // constant indices and acc stays in registers.
      typename V::type acc[kRowPass][kN];
      for (int r = 0; r < kRowPass; ++r) {
        for (int j = 0; j < kN; ++j) {
          if (r0 + r < rows) {
            V::load(acc[r][j], o + (r0 + r) * ldo + w0 + j * V::kLanes);
          } else {
            acc[r][j] = typename V::type{};
          }
        }
      }
      for (int64_t c = c_begin; c < c_end; ++c) {
        A p_c[kRowPass];
        for (int r = 0; r < kRowPass; ++r) {
          p_c[r] = kTransposedP ? p[c * ps_r + (r0 + r) * ps_c] : p[(r0 + r) * ps_r + c * ps_c];
        }
        // One vector of b at a time: GCC keeps an array of four b vectors on the stack (copied
        // in 16-byte halves), which made the two-panel pass slower than the one-panel one.
        for (int j = 0; j < kN; ++j) {
          typename V::type b_j;
          V::load(b_j, b + c * ldb + w0 + j * V::kLanes);
          for (int r = 0; r < kRowPass; ++r) acc[r][j] += p_c[r] * b_j;
        }
      }
      for (int r = 0; r < kRowPass; ++r) {
        for (int j = 0; j < kN; ++j) {
          if (r0 + r < rows) V::store(o + (r0 + r) * ldo + w0 + j * V::kLanes, acc[r][j]);
        }
      }
    }
  }
  return w0;
}

// Output row r, term c reads p[r * ps_r + c * ps_c] (default: a row-major kRows x kCols block),
// or p[c * ps_r + r * ps_c] when kTransposedP. Only the first `rows` rows of o are read and
// written (the others are computed on zeros and dropped, so the FMA loop keeps its fixed shape).
// Column panels of kCols: a kRowPass x kCols accumulator block stays in registers across the n
// rows of b; the last, partial panel (width not a multiple of kCols) runs a scalar loop. Each
// output element sees the same sequence of FMAs whatever the pass shape is.
// Band (clo, chi not null): entry (i, j) of the p block is 0 unless clo[i] <= j < chi[i] (the
// masked P and dS of the backward), so each pass runs only over the terms that are nonzero for
// one of its rows: [min clo, max chi) of its rows, or (kTransposedP, output rows are the block's
// columns key0 + r) the block rows whose span meets those columns. The terms left out are exact
// zeros, and an accumulator that starts at +0 and changes only by fused multiply-adds is never
// -0, so adding them would not change a bit: the sums are those of the whole block. Banded
// calls take passes of half the rows over two panels where the width allows (accumulate_panels);
// fp32 with 64-byte registers (AVX-512: 32 of them) over four panels first, so that a head of 64
// columns loads each b row once per term instead of twice (16 accumulators; about 1.05x on the
// backward of 64 x 64 and 16^3 problems, Xeon with AVX-512, 2 threads).
template <int kRowPass, int kBytes, bool kTransposedP = false, typename A>
NATTN_INLINE void block_accumulate_impl(const A* p, int64_t n, const A* b, int64_t ldb,
                                        int64_t width, A* o, int64_t ldo, int rows = kRows,
                                        const int64_t* clo = nullptr,
                                        const int64_t* chi = nullptr, int64_t key0 = 0,
                                        int64_t ps_r = kCols, int64_t ps_c = 1) {
  int64_t w0 = 0;
  if constexpr (kRowPass >= 2 && kBytes == 64 && std::is_same_v<A, float>) {
    if (clo != nullptr) {
      w0 = accumulate_panels<kRowPass / 2, 4, kBytes, kTransposedP>(
          p, n, b, ldb, width, w0, o, ldo, rows, clo, chi, key0, ps_r, ps_c);
    }
  }
  if constexpr (kRowPass >= 2) {
    if (clo != nullptr) {
      w0 = accumulate_panels<kRowPass / 2, 2, kBytes, kTransposedP>(
          p, n, b, ldb, width, w0, o, ldo, rows, clo, chi, key0, ps_r, ps_c);
    }
  }
  w0 = accumulate_panels<kRowPass, 1, kBytes, kTransposedP>(p, n, b, ldb, width, w0, o, ldo,
                                                            rows, clo, chi, key0, ps_r, ps_c);
  const int64_t tail = width - w0;
  if (tail == 0) return;
  for (int r = 0; r < rows; ++r) {
    A* o_row = o + r * ldo + w0;
    for (int64_t c = 0; c < n; ++c) {
      const A p_rc = kTransposedP ? p[c * ps_r + r * ps_c] : p[r * ps_r + c * ps_c];
      const A* b_row = b + c * ldb + w0;
      for (int64_t w = 0; w < tail; ++w) o_row[w] += p_rc * b_row[w];
    }
  }
}

// Transposed: o[c * ldo + w] += sum_{r < kRows} p[r * kCols + c] * b[r * ldb + w] for c < n,
// kRows output rows (columns of p) at a time: every output row sums its kRows products in r
// order, the same sequence of fused multiply-adds block_accumulate applies to a row whose block
// holds the same values.
template <int kRowPass, int kBytes, typename A>
NATTN_INLINE void block_accumulate_transposed_impl(const A* p, int64_t n, const A* b,
                                                   int64_t ldb, int64_t width, A* o, int64_t ldo,
                                                   const int64_t* clo, const int64_t* chi,
                                                   int64_t ps_r, int64_t ps_c) {
  for (int c0 = 0; c0 < n; c0 += kRows) {
    const int rows = static_cast<int>(std::min<int64_t>(kRows, n - c0));
    block_accumulate_impl<kRowPass, kBytes, true>(p + c0 * ps_c, kRows, b, ldb, width,
                                                  o + c0 * ldo, ldo, rows, clo, chi, c0, ps_r,
                                                  ps_c);
  }
}

// fp32 values in 64-byte vectors (one per kCols-wide row) and the matching lane masks.
using F16 = Vec<float>::type;
using I16 = int32_t __attribute__((vector_size(64)));

// Vector results go out through references: a 64-byte vector returned by value has a different
// ABI at each instruction-set level.

// out = mask ? a : b lane by lane (mask lanes all ones or zero), as bit operations: GCC may
// expand a vector ?: element by element.
template <typename V, typename M>
NATTN_INLINE void select_bits(V& out, const M& mask, const V& a, const V& b) {
  static_assert(sizeof(V) == sizeof(M), "one mask lane per value lane");
  M ia, ib;
  std::memcpy(&ia, &a, sizeof ia);
  std::memcpy(&ib, &b, sizeof ib);
  const M bits = (ia & mask) | (ib & ~mask);
  std::memcpy(&out, &bits, sizeof out);
}
NATTN_INLINE void select(F16& out, const I16& mask, const F16& a, const F16& b) {
  select_bits(out, mask, a, b);
}

NATTN_INLINE void select(float& out, bool mask, float a, float b) { out = mask ? a : b; }

// out = 2^n for integral n in [-127, 128], built in the exponent bits.
NATTN_INLINE void power_of_two(float& out, float n) {
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  std::memcpy(&out, &bits, sizeof out);
}
NATTN_INLINE void power_of_two(F16& out, const F16& n) {
  const I16 bits = (__builtin_convertvector(n, I16) + 127) << 23;
  std::memcpy(&out, &bits, sizeof out);
}

// The same for the lane kernels' 8-lane fp32 vectors (block_kernels.h: LaneTile).
using L8 = Vec<float, 32>::type;
using M8 = int32_t __attribute__((vector_size(32)));
static_assert(kLanes * sizeof(float) == sizeof(L8), "one lane per query");

NATTN_INLINE void select(L8& out, const M8& mask, const L8& a, const L8& b) {
  select_bits(out, mask, a, b);
}
NATTN_INLINE void power_of_two(L8& out, const L8& n) {
  const M8 bits = (__builtin_convertvector(n, M8) + 127) << 23;
  std::memcpy(&out, &bits, sizeof out);
}
// out = exp(x) for fp32 (one value, or a vector lane by lane) without a library call, so that
// block loops vectorize: x = n ln2 + r with |r| <= ln2/2 (ln2 split in two for an exact
// n*ln2_hi), exp(r) by the Cephes degree-6 polynomial, 2^n built in the exponent bits.
template <typename V>
NATTN_INLINE void exp_fp32(V& out, const V& x) {
  const V lo = V{} - 88.0f, hi = V{} + 88.0f, magic = V{} + 12582912.0f;
  V clamped;
  select(clamped, x < lo, lo, x);
  select(clamped, clamped > hi, hi, clamped);
  // Adding and subtracting 1.5 * 2^23 rounds to the nearest integer (|t| < 2^22).
  const V n = (clamped * 1.44269504088896341f + magic) - magic;
  const V r = clamped - n * 0.693359375f + n * 2.12194440e-4f;
  V poly = V{} + 1.9875691500e-4f;
  poly = poly * r + 1.3981999507e-3f;
  poly = poly * r + 8.3334519073e-3f;
  poly = poly * r + 4.1665795894e-2f;
  poly = poly * r + 1.6666665459e-1f;
  poly = poly * r + 5.0000001201e-1f;
  const V exp_r = poly * r * r + r + 1.0f;
  V two_n;
  power_of_two(two_n, n);
  // Below exp(-87) (about 1.6e-38) 2^n would leave the normal range; those weights are 0 to fp32
  // softmax precision, and masked scores (-inf) land here too.
  select(out, x < V{} - 87.0f, V{}, exp_r * two_n);
}

NATTN_INLINE float exp_any(float x) {
  float y;
  exp_fp32(y, x);
  return y;
}
NATTN_INLINE double exp_any(double x) { return std::exp(x); }

// Row maxima / sums of a kRows x kCols block as fixed pairwise trees, all rows at once: the
// halving loops vectorize (a sequential fp reduction would not, without -ffast-math), the rows
// are independent chains the core overlaps, and the summation order is fixed. (fp64; fp32 has
// the overloads below.)
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

// fp32 (kCols = 16 = one 64-byte vector per row): a transposing tree. Each level halves the
// partials per row and packs two vectors' rows into one (8 rows x 16 -> 4 x 2 rows x 8 -> 2 x 4
// rows x 4 -> 8 rows x 2 -> 8 results), 15 shuffles for the block instead of 4 per row. The
// combination order is fixed, so results are deterministic.
static_assert(kCols == 16 && kRows == 8, "the fp32 row tree is written for 8 x 16 blocks");
#if defined(__clang__)
#define NATTN_SHUFFLE(a, b, ...) __builtin_shufflevector(a, b, __VA_ARGS__)
#else
#define NATTN_SHUFFLE(a, b, ...) __builtin_shuffle(a, b, I16{__VA_ARGS__})
#endif

// out = max(a, b) or a + b.
template <bool kMax>
NATTN_INLINE void combine(F16& out, const F16& a, const F16& b) {
  if constexpr (kMax) {
    select(out, a > b, a, b);
  } else {
    out = a + b;
  }
}

template <bool kMax>
NATTN_INLINE void row_reduce_fp32(const F16* v, float* out) {
  F16 a[4], b[2];
  for (int i = 0; i < 4; ++i) {  // lanes 0-7: row 2i, 8-15: row 2i+1; 8 partials each
    combine<kMax>(
        a[i],
        NATTN_SHUFFLE(v[2 * i], v[2 * i + 1], 0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18, 19, 20, 21,
                      22, 23),
        NATTN_SHUFFLE(v[2 * i], v[2 * i + 1], 8, 9, 10, 11, 12, 13, 14, 15, 24, 25, 26, 27, 28,
                      29, 30, 31));
  }
  for (int i = 0; i < 2; ++i) {  // lanes 4j..4j+3: row 4i+j; 4 partials each
    combine<kMax>(
        b[i],
        NATTN_SHUFFLE(a[2 * i], a[2 * i + 1], 0, 1, 2, 3, 8, 9, 10, 11, 16, 17, 18, 19, 24, 25,
                      26, 27),
        NATTN_SHUFFLE(a[2 * i], a[2 * i + 1], 4, 5, 6, 7, 12, 13, 14, 15, 20, 21, 22, 23, 28,
                      29, 30, 31));
  }
  // lanes 2j, 2j+1: row j; 2 partials each
  F16 c, d;
  combine<kMax>(
      c,
      NATTN_SHUFFLE(b[0], b[1], 0, 1, 4, 5, 8, 9, 12, 13, 16, 17, 20, 21, 24, 25, 28, 29),
      NATTN_SHUFFLE(b[0], b[1], 2, 3, 6, 7, 10, 11, 14, 15, 18, 19, 22, 23, 26, 27, 30, 31));
  combine<kMax>(
      d,
      NATTN_SHUFFLE(c, c, 0, 2, 4, 6, 8, 10, 12, 14, 0, 2, 4, 6, 8, 10, 12, 14),
      NATTN_SHUFFLE(c, c, 1, 3, 5, 7, 9, 11, 13, 15, 1, 3, 5, 7, 9, 11, 13, 15));
  for (int r = 0; r < kRows; ++r) out[r] = d[r];
}
#undef NATTN_SHUFFLE

// mask = all ones in the lanes c of a kCols-wide row with lo <= c < hi (0 <= lo, hi <= kCols),
// else 0: kCols lanes of a ones-then-zeros table starting at kCols - hi have ones exactly where
// c < hi. Table loads rather than lane comparisons, which GCC expands lane by lane here.
NATTN_INLINE void lane_mask(I16& mask, int64_t lo, int64_t hi) {
  static constexpr int32_t kTable[2 * kCols] = {-1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1,
                                                -1, -1, -1, -1, -1};
  I16 below_hi, below_lo;
  std::memcpy(&below_hi, kTable + kCols - hi, sizeof below_hi);
  std::memcpy(&below_lo, kTable + kCols - lo, sizeof below_lo);
  mask = below_hi & ~below_lo;
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
      const bool valid = c >= lo && c < hi;
      row[c] = exp_any(valid ? x : kNegInf);
      // Selected, not multiplied by P = 0: a masked entry's dp may be NaN (0 * NaN = NaN).
      ds[r * kCols + c] =
          valid ? row[c] * (dp[r * kCols + c] - (row_delta[r] + col_delta[c])) : A(0);
    }
  }
}

// fp32: the same steps on one 16-lane vector per row, kept in registers from the masking to the
// row sums.
NATTN_INLINE void block_online_softmax_impl(float* s, const int64_t* clo, const int64_t* chi,
                                            float scale, float* m, float* l, float* corr) {
  constexpr float kNegInf = -std::numeric_limits<float>::infinity();
  F16 v[kRows];
  for (int r = 0; r < kRows; ++r) {
    Vec<float>::load(v[r], s + r * kCols);
    I16 valid;
    lane_mask(valid, clo[r], chi[r]);
    select(v[r], valid, v[r] * scale, F16{} + kNegInf);
  }
  float m_new[kRows], shift[kRows], sum[kRows];
  row_reduce_fp32<true>(v, m_new);
  for (int r = 0; r < kRows; ++r) {
    m_new[r] = std::max(m[r], m_new[r]);
    // A row with nothing valid so far keeps m = -inf; shifting by 0 then keeps its entries at
    // exp(-inf) = 0 instead of NaN.
    shift[r] = m_new[r] == kNegInf ? 0.0f : m_new[r];
    corr[r] = m[r] == m_new[r] ? 1.0f : exp_any(m[r] - m_new[r]);
    m[r] = m_new[r];
  }
  for (int r = 0; r < kRows; ++r) {
    exp_fp32(v[r], v[r] - shift[r]);
    Vec<float>::store(s + r * kCols, v[r]);
  }
  row_reduce_fp32<false>(v, sum);
  for (int r = 0; r < kRows; ++r) l[r] = l[r] * corr[r] + sum[r];
}

NATTN_INLINE void block_backward_probs_impl(float* s, const float* dp, const int64_t* clo,
                                            const int64_t* chi, float scale,
                                            const float* row_lse, const float* col_lse,
                                            const float* row_delta, const float* col_delta,
                                            float* ds) {
  constexpr float kNegInf = -std::numeric_limits<float>::infinity();
  F16 c_lse, c_delta;
  Vec<float>::load(c_lse, col_lse);
  Vec<float>::load(c_delta, col_delta);
  for (int r = 0; r < kRows; ++r) {
    F16 x, d, p;
    Vec<float>::load(x, s + r * kCols);
    Vec<float>::load(d, dp + r * kCols);
    x = x * scale - (row_lse[r] + c_lse);  // as in the template: see there
    I16 valid;
    lane_mask(valid, clo[r], chi[r]);
    select(x, valid, x, F16{} + kNegInf);
    exp_fp32(p, x);
    Vec<float>::store(s + r * kCols, p);
    F16 g;  // selected, not multiplied by P = 0: a masked entry's dp may be NaN (0 * NaN = NaN)
    select(g, valid, p * (d - (row_delta[r] + c_delta)), F16{});
    Vec<float>::store(ds + r * kCols, g);
  }
}

template <typename A>
NATTN_INLINE void block_add_bias_impl(A* s, A scale, const A* bias, int64_t bias_row_step) {
  using V = Vec<A>;
  for (int r = 0; r < kRows; ++r) {
    for (int j = 0; j < V::kPerPanel; ++j) {
      typename V::type x, b;
      V::load(x, s + r * kCols + j * V::kLanes);
      V::load(b, bias + r * bias_row_step + j * V::kLanes);
      V::store(s + r * kCols + j * V::kLanes, x * scale + b);
    }
  }
}

template <typename A>
NATTN_INLINE void block_add_bias_grad_impl(const A* ds, A* acc, int64_t acc_row_step) {
  using V = Vec<A>;
  for (int r = 0; r < kRows; ++r) {
    for (int j = 0; j < V::kPerPanel; ++j) {
      typename V::type a, d;
      V::load(a, acc + r * acc_row_step + j * V::kLanes);
      V::load(d, ds + r * kCols + j * V::kLanes);
      V::store(acc + r * acc_row_step + j * V::kLanes, a + d);
    }
  }
}

// ---- Lane kernels (block_kernels.h: LaneTile): 8 fp32 lanes, one per query of a tile row. ----
NATTN_INLINE void load8(L8& v, const float* p) { std::memcpy(&v, p, sizeof v); }
NATTN_INLINE void store8(float* p, const L8& v) { std::memcpy(p, &v, sizeof v); }

// f.template operator()<N>() for N = n in [1, kMax] (n >= kMax: kMax).
template <int kMax, typename F>
NATTN_INLINE void with_count(int64_t n, F&& f) {
  if constexpr (kMax > 1) {
    if (n < kMax) return with_count<kMax - 1>(n, f);
  }
  f(std::integral_constant<int, kMax>{});
}

// Most offsets (scores) or value columns (P V) one product call keeps in registers, for R rows:
// R x N accumulators, R query (or weight) vectors and the shared key (or value) vector fit the 16
// registers of AVX2 (8 + 1 + 1 for one row; 12 + 2 + 1 for two).
template <int R>
constexpr int kLaneChunk = R == 1 ? 8 : 6;

// Runs f(c0, count) over [0, n) in chunks of at most kMax, as even as possible (7 offsets of two
// rows: 4 + 3, not 6 + 1, whose one-column call would load as many vectors as it multiplies).
template <int kMax, typename F>
NATTN_INLINE void for_chunks(int64_t n, F&& f) {
  const int64_t chunks = (n + kMax - 1) / kMax;
  if (chunks == 0) return;
  const int64_t size = (n + chunks - 1) / chunks;
  for (int64_t c0 = 0; c0 < n; c0 += size) {
    with_count<kMax>(std::min<int64_t>(size, n - c0),
                     [&](auto count) NATTN_LAMBDA_INLINE { f(c0, count); });
  }
}

// s[i * ss + n * kLanes + r] = sum_w qt[i * qs + w * kLanes + r] * k[w * ld + n + r] for rows
// i < R, offsets n < N: N offsets of one line, each key vector one unaligned load shared by the
// R rows.
template <int N, int R>
NATTN_INLINE void lane_dot(const float* qt, int64_t qs, int64_t depth, const float* k, int64_t ld,
                           float* s, int64_t ss) {
  L8 acc[R][N] = {};
  for (int64_t w = 0; w < depth; ++w) {
    L8 q[R];
    for (int i = 0; i < R; ++i) load8(q[i], qt + i * qs + w * kLanes);
    const float* kw = k + w * ld;
    for (int n = 0; n < N; ++n) {
      L8 kv;
      load8(kv, kw + n);
      for (int i = 0; i < R; ++i) acc[i][n] += q[i] * kv;
    }
  }
  for (int i = 0; i < R; ++i) {
    for (int n = 0; n < N; ++n) store8(s + i * ss + n * kLanes, acc[i][n]);
  }
}

// The same for N additional keys, shared by all lanes: k[w * ld + n] broadcast.
template <int N, int R>
NATTN_INLINE void lane_dot_shared(const float* qt, int64_t qs, int64_t depth, const float* k,
                                  int64_t ld, float* s, int64_t ss) {
  L8 acc[R][N] = {};
  for (int64_t w = 0; w < depth; ++w) {
    L8 q[R];
    for (int i = 0; i < R; ++i) load8(q[i], qt + i * qs + w * kLanes);
    for (int n = 0; n < N; ++n) {
      for (int i = 0; i < R; ++i) acc[i][n] += q[i] * k[w * ld + n];
    }
  }
  for (int i = 0; i < R; ++i) {
    for (int n = 0; n < N; ++n) store8(s + i * ss + n * kLanes, acc[i][n]);
  }
}

// Lanes of row i of a tile that read line `line` at offset u: in the lane's window on the last
// axis (lo <= position < hi) and the line in the row's window (t.member bit i).
template <int R>
NATTN_INLINE void lane_valid(M8& valid, const LaneTile& t, const M8& lo, const M8& hi,
                             const M8& lane, int64_t line, int64_t u, int i) {
  const M8 pos = lane + static_cast<int32_t>(t.base + u);
  valid = (pos >= lo) & (pos < hi);
  if (R > 1 && t.member != nullptr && ((t.member[line] >> i) & 1) == 0) valid = M8{};
}

// ot[i * os + (w0 + n) * kLanes + r] = sum over lines, offsets u of p[i * ps + (line, u)][r] *
// v[line][(w0 + n) * ld + u + r], then over the additional values, for rows i < R, n < N.
// A row's weights on the lines outside its window are 0 (the softmax masks them), so its sums
// are those it would have alone.
// kContained: each product is selected by its lane's window (and its row's lines) instead of
// multiplied by the weight 0, so that a non-finite value reaches only the queries whose window
// holds it (0 * NaN = NaN); it runs only on tiles whose fast result came out non-finite.
template <int N, int R, bool kContained>
NATTN_INLINE void lane_pv(const LaneTile& t, const float* p, int64_t ps, int64_t w0, float* ot,
                          int64_t os) {
  L8 acc[R][N] = {};
  const int64_t T = t.offsets;
  M8 lo, hi, lane;
  std::memcpy(&lo, t.lo, sizeof lo);
  std::memcpy(&hi, t.hi, sizeof hi);
  for (int r = 0; r < kLanes; ++r) lane[r] = r;
  for (int64_t line = 0; line < t.lines; ++line) {
    const float* v = t.v[line] + w0 * t.ld;
    const float* pl = p + line * T * kLanes;
    for (int64_t u = 0; u < T; ++u) {
      L8 pu[R];
      M8 valid[R];
      for (int i = 0; i < R; ++i) {
        load8(pu[i], pl + i * ps + u * kLanes);
        if constexpr (kContained) lane_valid<R>(valid[i], t, lo, hi, lane, line, u, i);
      }
      for (int n = 0; n < N; ++n) {
        L8 vv;
        load8(vv, v + n * t.ld + u);
        for (int i = 0; i < R; ++i) {
          if constexpr (kContained) {
            L8 prod;
            select(prod, valid[i], pu[i] * vv, L8{});
            acc[i][n] += prod;
          } else {
            acc[i][n] += pu[i] * vv;
          }
        }
      }
    }
  }
  const float* pa = p + t.lines * T * kLanes;
  for (int64_t m = 0; m < t.num_additional; ++m) {
    L8 pu[R];
    for (int i = 0; i < R; ++i) load8(pu[i], pa + i * ps + m * kLanes);
    const float* v = t.add_v + m * t.value_dim + w0;
    for (int n = 0; n < N; ++n) {
      for (int i = 0; i < R; ++i) acc[i][n] += pu[i] * v[n];
    }
  }
  for (int i = 0; i < R; ++i) {
    for (int n = 0; n < N; ++n) store8(ot + i * os + (w0 + n) * kLanes, acc[i][n]);
  }
}

// The lane forward's softmax on the scores s of R rows (row stride ss): masks, scales and takes
// each lane's maximum, then replaces the scores by their weights exp(x - max) (0 where masked),
// leaves their sums in sum[i] and the natural-log LSE in lse[i * kLanes + r].
template <int R>
NATTN_INLINE void lane_softmax(const LaneTile& t, float* s, int64_t ss, L8 (&sum)[R],
                               float* lse) {
  constexpr float kNegInf = -std::numeric_limits<float>::infinity();
  const int64_t T = t.offsets;
  // Mask, scale and maximum, lane by lane and row by row: position base + u + r of lane r is in
  // its window when lo[r] <= it < hi[r] (and the line in the row's); the additional keys are in
  // every query's window.
  M8 lo, hi, lane;
  std::memcpy(&lo, t.lo, sizeof lo);
  std::memcpy(&hi, t.hi, sizeof hi);
  for (int r = 0; r < kLanes; ++r) lane[r] = r;
  const L8 neg_inf = L8{} + kNegInf;
  const M8 has_query = lo < hi;
  const int64_t total = t.lines * T + t.num_additional;
  for (int i = 0; i < R; ++i) {
    float* si = s + i * ss;
    L8 mx = neg_inf;
    for (int64_t line = 0; line < t.lines; ++line) {
      float* sl = si + line * T * kLanes;
      for (int64_t u = 0; u < T; ++u) {
        M8 valid;
        lane_valid<R>(valid, t, lo, hi, lane, line, u, i);
        L8 x;
        load8(x, sl + u * kLanes);
        select(x, valid, x * t.scale, neg_inf);
        store8(sl + u * kLanes, x);
        select(mx, x > mx, x, mx);
      }
    }
    for (int64_t m = 0; m < t.num_additional; ++m) {
      L8 x;
      load8(x, si + (t.lines * T + m) * kLanes);
      select(x, has_query, x * t.scale, neg_inf);
      store8(si + (t.lines * T + m) * kLanes, x);
      select(mx, x > mx, x, mx);
    }
    // A lane with no query keeps max -inf; shifting by 0 then keeps its weights exp(-inf) = 0.
    L8 shift;
    select(shift, mx == neg_inf, L8{}, mx);
    sum[i] = L8{};
    for (int64_t k = 0; k < total; ++k) {
      L8 x, e;
      load8(x, si + k * kLanes);
      exp_fp32(e, x - shift);
      store8(si + k * kLanes, e);
      sum[i] += e;
    }
    for (int r = 0; r < kLanes; ++r) lse[i * kLanes + r] = shift[r] + std::log(sum[i][r]);
  }
}

// o[(i * kLanes + r) * value_dim + w] = ot[i * os + w * kLanes + r] / sum[i][r]: the lane
// forward's transposed, unnormalized output of R rows as normalized rows.
template <int R>
NATTN_INLINE void lane_normalize(const LaneTile& t, const L8 (&sum)[R], const float* ot,
                                 int64_t os, float* o) {
  for (int i = 0; i < R; ++i) {
    float inv[kLanes];
    for (int r = 0; r < kLanes; ++r) inv[r] = 1.0f / sum[i][r];
    float* oi = o + i * kLanes * t.value_dim;
    const float* oti = ot + i * os;
    for (int r = 0; r < kLanes; ++r) {
      for (int64_t w = 0; w < t.value_dim; ++w) {
        oi[r * t.value_dim + w] = oti[w * kLanes + r] * inv[r];
      }
    }
  }
}

template <int R>
NATTN_INLINE void lane_forward_impl(const LaneTile& t, float* s, float* ot, float* o,
                                    float* lse) {
  const int64_t T = t.offsets;
  const int64_t qs = t.head_dim * kLanes;                        // row stride of qt
  const int64_t ss = (t.lines * T + t.num_additional) * kLanes;  // of s
  const int64_t os = t.value_dim * kLanes;                       // of ot
  // Scores: up to kLaneChunk<R> offsets at a time (the query vectors loaded once per depth, each
  // key vector once for all R rows).
  for (int64_t line = 0; line < t.lines; ++line) {
    float* sl = s + line * T * kLanes;
    for_chunks<kLaneChunk<R>>(T, [&](int64_t u0, auto n) NATTN_LAMBDA_INLINE {
      lane_dot<decltype(n)::value, R>(t.qt, qs, t.head_dim, t.k[line] + u0, t.ld,
                                      sl + u0 * kLanes, ss);
    });
  }
  float* sa = s + t.lines * T * kLanes;
  for_chunks<kLaneChunk<R>>(t.num_additional, [&](int64_t m0, auto n) NATTN_LAMBDA_INLINE {
    lane_dot_shared<decltype(n)::value, R>(t.qt, qs, t.head_dim, t.add_kt + m0, t.add_ld,
                                           sa + m0 * kLanes, ss);
  });
  L8 sum[R];
  lane_softmax<R>(t, s, ss, sum, lse);
  // Values: up to kLaneChunk<R> output columns at a time.
  for_chunks<kLaneChunk<R>>(t.value_dim, [&](int64_t w0, auto n) NATTN_LAMBDA_INLINE {
    if (t.contained) {
      lane_pv<decltype(n)::value, R, true>(t, s, ss, w0, ot, os);
    } else {
      lane_pv<decltype(n)::value, R, false>(t, s, ss, w0, ot, os);
    }
  });
  lane_normalize<R>(t, sum, ot, os, o);
}

// Accumulates both products of lane_dot_pair for N offsets in vectors V (L8: kLanes lanes, or
// L16: two tiles' lanes, lane_dot_pair16); qt, gt hold one V of lanes per depth index.
template <int N, typename V>
NATTN_INLINE void lane_dot_pair_acc(const float* qt, const float* gt, int64_t depth,
                                    const float* k, const float* v, int64_t ld, V (&acc_s)[N],
                                    V (&acc_p)[N]) {
  constexpr int64_t kWidth = sizeof(V) / sizeof(float);
  for (int64_t w = 0; w < depth; ++w) {
    V q, g;
    std::memcpy(&q, qt + w * kWidth, sizeof q);
    std::memcpy(&g, gt + w * kWidth, sizeof g);
    const float* kw = k + w * ld;
    const float* vw = v + w * ld;
    for (int n = 0; n < N; ++n) {
      V kv, vv;
      std::memcpy(&kv, kw + n, sizeof kv);
      acc_s[n] += q * kv;
      std::memcpy(&vv, vw + n, sizeof vv);
      acc_p[n] += g * vv;
    }
  }
}

// Two lane_dot<N, 1> of the same depth in one loop: s from (qt, k), dp from (gt, v). Twice the
// independent accumulator chains of one call (7 offsets: 14, where one call's 7 leave AVX2's
// two FMA pipes short of the 8 their 4-cycle latency needs); the key and value vectors are FMA
// memory operands, so 2N accumulators and the two query vectors fill the 16 registers. Each
// entry is the same FMA chain as in lane_dot.
template <int N>
NATTN_INLINE void lane_dot_pair(const float* qt, const float* gt, int64_t depth, const float* k,
                                const float* v, int64_t ld, float* s, float* dp) {
  L8 acc_s[N] = {}, acc_p[N] = {};
  lane_dot_pair_acc<N>(qt, gt, depth, k, v, ld, acc_s, acc_p);
  for (int n = 0; n < N; ++n) {
    store8(s + n * kLanes, acc_s[n]);
    store8(dp + n * kLanes, acc_p[n]);
  }
}

// Offsets per lane_dot_pair call: 2N accumulators and two query vectors in 16 registers.
constexpr int kLanePairChunk = 7;

// block_kernels.h: lane_line_scores. Paired when both products have the same depth, else one
// product at a time, kLaneChunk<1> offsets per call (their accumulators, the query vector and
// the key vector fit AVX2's 16 registers).
NATTN_INLINE void lane_line_scores_impl(const float* qt, int64_t depth, const float* k,
                                        const float* gt, int64_t value_depth, const float* v,
                                        int64_t ld, int64_t offsets, float* s, float* dp) {
  if (depth == value_depth) {
    for_chunks<kLanePairChunk>(offsets, [&](int64_t u0, auto n) NATTN_LAMBDA_INLINE {
      lane_dot_pair<decltype(n)::value>(qt, gt, depth, k + u0, v + u0, ld, s + u0 * kLanes,
                                        dp + u0 * kLanes);
    });
    return;
  }
  for_chunks<kLaneChunk<1>>(offsets, [&](int64_t u0, auto n) NATTN_LAMBDA_INLINE {
    lane_dot<decltype(n)::value, 1>(qt, 0, depth, k + u0, ld, s + u0 * kLanes, 0);
  });
  for_chunks<kLaneChunk<1>>(offsets, [&](int64_t u0, auto n) NATTN_LAMBDA_INLINE {
    lane_dot<decltype(n)::value, 1>(gt, 0, value_depth, v + u0, ld, dp + u0 * kLanes, 0);
  });
}

// block_kernels.h: lane_line_probs. The expressions of block_backward_probs_impl (fp32), lane r
// in the place of row r with zero column terms, so that both round alike.
NATTN_INLINE void lane_line_probs_impl(float* s, float* dp, int64_t offsets, int64_t base,
                                       const int32_t* lo_r, const int32_t* hi_r, float scale,
                                       const float* lse_r, const float* delta_r) {
  constexpr float kNegInf = -std::numeric_limits<float>::infinity();
  M8 lo, hi, lane;
  L8 lse, delta;
  std::memcpy(&lo, lo_r, sizeof lo);
  std::memcpy(&hi, hi_r, sizeof hi);
  load8(lse, lse_r);
  load8(delta, delta_r);
  lse = lse + L8{};  // row + column term (0) as in the block kernel
  delta = delta + L8{};
  for (int r = 0; r < kLanes; ++r) lane[r] = r;
  for (int64_t u = 0; u < offsets; ++u) {
    const M8 pos = lane + static_cast<int32_t>(base + u);
    const M8 valid = (pos >= lo) & (pos < hi);
    L8 x, d, p, g;
    load8(x, s + u * kLanes);
    load8(d, dp + u * kLanes);
    x = x * scale - lse;
    select(x, valid, x, L8{} + kNegInf);
    exp_fp32(p, x);
    store8(s + u * kLanes, p);
    select(g, valid, p * (d - delta), L8{});
    store8(dp + u * kLanes, g);
  }
}

// ---- Two tiles in one 16-lane vector (block_kernels.h: lane_line_scores_pair), AVX-512 only. ----
using L16 = float __attribute__((vector_size(64)));
static_assert(sizeof(L16) == 2 * kLanes * sizeof(float), "two tiles' lanes per vector");

// lane_dot_pair on 2 x kLanes lanes for offsets u0 .. u0 + N - 1, each half stored into its
// tile's lane layout where the offset falls in that tile's range.
// Offsets u0 .. u0 + N - 1 of two tiles' 16 lanes (acc_s: S, acc_p: dP) into each tile's lane
// layout where the offset falls in that tile's range. The halves through shuffles, not through
// memory: taking the accumulators' addresses made GCC keep them on the stack inside the FMA loop.
template <int N>
NATTN_INLINE void store_lane_halves(const L16 (&acc_s)[N], const L16 (&acc_p)[N], int64_t u0,
                                    const LaneHalf* halves) {
  for (int n = 0; n < N; ++n) {
    const L8 s_half[2] = {__builtin_shufflevector(acc_s[n], acc_s[n], 0, 1, 2, 3, 4, 5, 6, 7),
                          __builtin_shufflevector(acc_s[n], acc_s[n], 8, 9, 10, 11, 12, 13, 14,
                                                  15)};
    const L8 dp_half[2] = {
        __builtin_shufflevector(acc_p[n], acc_p[n], 0, 1, 2, 3, 4, 5, 6, 7),
        __builtin_shufflevector(acc_p[n], acc_p[n], 8, 9, 10, 11, 12, 13, 14, 15)};
    for (int h = 0; h < 2; ++h) {
      const int64_t u = u0 + n - halves[h].shift;
      if (u < 0 || u >= halves[h].offsets) continue;
      store8(halves[h].s + u * kLanes, s_half[h]);
      store8(halves[h].dp + u * kLanes, dp_half[h]);
    }
  }
}

template <int N>
NATTN_INLINE void lane_dot_pair16(const float* qt, const float* gt, int64_t depth, const float* k,
                                  const float* v, int64_t ld, int64_t u0, const LaneHalf* halves) {
  L16 acc_s[N] = {}, acc_p[N] = {};
  lane_dot_pair_acc<N>(qt, gt, depth, k, v, ld, acc_s, acc_p);
  store_lane_halves<N>(acc_s, acc_p, u0, halves);
}

// Offsets per lane_dot_pair16 call: 2N accumulators and two query vectors in AVX-512's 32
// registers.
constexpr int kLanePair16Chunk = 14;

NATTN_INLINE void lane_line_scores_pair_impl(const float* qt, const float* gt, int64_t depth,
                                             const float* k, const float* v, int64_t ld,
                                             int64_t offsets, const LaneHalf* halves) {
  for_chunks<kLanePair16Chunk>(offsets, [&](int64_t u0, auto n) NATTN_LAMBDA_INLINE {
    lane_dot_pair16<decltype(n)::value>(qt, gt, depth, k + u0, v + u0, ld, u0, halves);
  });
}

NATTN_INLINE void lane_forward_rows(const LaneTile& t, float* s, float* ot, float* o,
                                    float* lse) {
  if (t.rows == 2) {
    lane_forward_impl<2>(t, s, ot, o, lse);
  } else {
    lane_forward_impl<1>(t, s, ot, o, lse);
  }
}

// ---- bf16 pairs (block_kernels.h: lane_forward_bf16), AVX512-BF16 only. ----
// The three AVX512-BF16 / AVX512BW instructions they need are inline assembly: their intrinsics
// carry a target attribute that GCC will not inline through the generic helpers (for_chunks'
// lambdas) into the level's entry point; the assembly takes its registers from that entry point,
// compiled for x86-64-v4 with AVX512-BF16 (the assembler must know the instructions: binutils
// 2.34 or later).
#if NATTN_X86
#define NATTN_LANE_BF16 1

// acc[r] += lo(a[r]) * lo(b[r]) + hi(a[r]) * hi(b[r]) for 8 lanes of two bf16 each: one
// vdpbf16ps, whose products and sum are fp32 (subnormal bf16 inputs count as 0, subnormal
// results are flushed to 0, round to nearest even; the instruction reads no MXCSR).
// The accumulator goes through a local copy, and the callers' loops carry unroll pragmas: with
// the array element itself as the asm operand, or loops GCC would not unroll around an asm
// statement, the accumulator arrays stayed on the stack (a load and a store per instruction).
NATTN_INLINE void dot_pairs(L8& acc, const M8& a, const M8& b) {
  L8 r = acc;
  __asm__("vdpbf16ps %2, %1, %0" : "+v"(r) : "v"(a), "v"(b));
  acc = r;
}

// Lane r of the result: the pair (bf16(first[r]), bf16(second[r])), each rounded to nearest even
// (vcvtne2ps2bf16: words 0..7 from first, 8..15 from second; vpermw interleaves them).
NATTN_INLINE void bf16_pairs(M8& out, const L8& first, const L8& second) {
  static constexpr int16_t kInterleave[16] = {0, 8, 1, 9, 2, 10, 3, 11, 4, 12, 5, 13, 6, 14, 7, 15};
  M8 words, index;
  std::memcpy(&index, kInterleave, sizeof index);
  __asm__("vcvtne2ps2bf16 %2, %1, %0" : "=v"(words) : "v"(second), "v"(first));
  __asm__("vpermw %2, %1, %0" : "=v"(out) : "v"(index), "v"(words));
}

// lane_dot on bf16 pairs: s[i * ss + n * kLanes + r] = sum_j dot_pairs of qt[i * qs + j * kLanes
// + r] and k[j * ld + n + r] for j < pairs (each a 32-bit pair of depth indices 2j, 2j + 1).
template <int N, int R>
NATTN_INLINE void lane_dot_bf16(const float* qt, int64_t qs, int64_t pairs, const float* k,
                                int64_t ld, float* s, int64_t ss) {
  L8 acc[R][N] = {};
  for (int64_t j = 0; j < pairs; ++j) {
    M8 q[R];
#pragma GCC unroll 4
    for (int i = 0; i < R; ++i) std::memcpy(&q[i], qt + i * qs + j * kLanes, sizeof q[i]);
    const float* kj = k + j * ld;
#pragma GCC unroll 16
    for (int n = 0; n < N; ++n) {
      M8 kv;
      std::memcpy(&kv, kj + n, sizeof kv);
#pragma GCC unroll 4
      for (int i = 0; i < R; ++i) dot_pairs(acc[i][n], q[i], kv);
    }
  }
  for (int i = 0; i < R; ++i) {
    for (int n = 0; n < N; ++n) store8(s + i * ss + n * kLanes, acc[i][n]);
  }
}

// The weights of R rows (lane_softmax's, fp32, [line][offset][lane]) as bf16 pairs of offsets
// 2m, 2m + 1 (0 past the last offset), rounded to nearest even, in place: pair m of a line goes
// to [line][m][lane] with ceil(offsets / 2) pairs per line, at or below the weights it is made
// of, which the ascending walk has read by then.
template <int R>
NATTN_INLINE void lane_pair_weights(const LaneTile& t, float* s, int64_t ss) {
  const int64_t T = t.offsets, pairs = (T + 1) / 2;
  for (int i = 0; i < R; ++i) {
    float* si = s + i * ss;
    for (int64_t line = 0; line < t.lines; ++line) {
      const float* in = si + line * T * kLanes;
      float* out = si + line * pairs * kLanes;
      for (int64_t m = 0; m < pairs; ++m) {
        L8 first, second = L8{};
        load8(first, in + 2 * m * kLanes);
        if (2 * m + 1 < T) load8(second, in + (2 * m + 1) * kLanes);
        M8 pair;
        bf16_pairs(pair, first, second);
        std::memcpy(out + m * kLanes, &pair, sizeof pair);
      }
    }
  }
}

// lane_pv on bf16 pairs: p holds lane_pair_weights' pairs of offsets (2m, 2m + 1), and t.v the
// value lines as position pairs (element (w, x) = the values at positions x and x + 1), so that
// the load at offset 2m gives lane r the values of its two keys. kContained: each half of a pair
// is kept only where its offset is in the lane's window (lane_valid), so a non-finite value
// reaches only its own queries.
template <int N, int R, bool kContained>
NATTN_INLINE void lane_pv_bf16(const LaneTile& t, const float* p, int64_t ps, int64_t w0,
                               float* ot, int64_t os) {
  L8 acc[R][N] = {};
  const int64_t T = t.offsets, pairs = (T + 1) / 2;
  M8 lo, hi, lane;
  std::memcpy(&lo, t.lo, sizeof lo);
  std::memcpy(&hi, t.hi, sizeof hi);
  for (int r = 0; r < kLanes; ++r) lane[r] = r;
  const M8 low_half = M8{} + 0xffff;
  for (int64_t line = 0; line < t.lines; ++line) {
    const float* v = t.v[line] + w0 * t.ld;
    const float* pl = p + line * pairs * kLanes;
    for (int64_t m = 0; m < pairs; ++m) {
      M8 pu[R], keep[R];
#pragma GCC unroll 4
      for (int i = 0; i < R; ++i) {
        std::memcpy(&pu[i], pl + i * ps + m * kLanes, sizeof pu[i]);
        if constexpr (kContained) {
          M8 first, second;
          lane_valid<R>(first, t, lo, hi, lane, line, 2 * m, i);
          lane_valid<R>(second, t, lo, hi, lane, line, 2 * m + 1, i);
          keep[i] = (first & low_half) | (second & ~low_half);
        }
      }
#pragma GCC unroll 16
      for (int n = 0; n < N; ++n) {
        M8 vv;
        std::memcpy(&vv, v + n * t.ld + 2 * m, sizeof vv);
#pragma GCC unroll 4
        for (int i = 0; i < R; ++i) {
          if constexpr (kContained) {
            dot_pairs(acc[i][n], pu[i], vv & keep[i]);
          } else {
            dot_pairs(acc[i][n], pu[i], vv);
          }
        }
      }
    }
  }
  for (int i = 0; i < R; ++i) {
    for (int n = 0; n < N; ++n) store8(ot + i * os + (w0 + n) * kLanes, acc[i][n]);
  }
}

// Offsets (scores) or value columns (P V) per bf16 product call, for R rows: AVX-512's 32
// registers hold R x N accumulators and the R + 1 operand vectors (2 x 8 + 3 = 19, 16 + 2 = 18),
// and 8 divides the usual value widths (64: 8 calls, not 11 of kLaneChunk<2>).
template <int R>
constexpr int kLaneChunkBf16 = R == 1 ? 16 : 8;

template <int R>
NATTN_INLINE void lane_forward_bf16_impl(const LaneTile& t, float* s, float* ot, float* o,
                                         float* lse) {
  const int64_t T = t.offsets, pairs = t.head_dim / 2;
  const int64_t qs = pairs * kLanes;          // row stride of qt (pairs)
  const int64_t ss = t.lines * T * kLanes;    // of s
  const int64_t os = t.value_dim * kLanes;    // of ot
  for (int64_t line = 0; line < t.lines; ++line) {
    float* sl = s + line * T * kLanes;
    for_chunks<kLaneChunkBf16<R>>(T, [&](int64_t u0, auto n) NATTN_LAMBDA_INLINE {
      lane_dot_bf16<decltype(n)::value, R>(t.qt, qs, pairs, t.k[line] + u0, t.ld,
                                           sl + u0 * kLanes, ss);
    });
  }
  L8 sum[R];
  lane_softmax<R>(t, s, ss, sum, lse);
  lane_pair_weights<R>(t, s, ss);
  for_chunks<kLaneChunkBf16<R>>(t.value_dim, [&](int64_t w0, auto n) NATTN_LAMBDA_INLINE {
    if (t.contained) {
      lane_pv_bf16<decltype(n)::value, R, true>(t, s, ss, w0, ot, os);
    } else {
      lane_pv_bf16<decltype(n)::value, R, false>(t, s, ss, w0, ot, os);
    }
  });
  lane_normalize<R>(t, sum, ot, os, o);
}

// ---- The backward's scores on bf16 pairs (block_kernels.h: lane_line_scores_bf16 and the
// others below). Every score entry is the chain acc = vdpbf16ps(acc, query pair j, key pair j)
// over j = 0, 1, ... from zero, in each kernel, so the dq pass's lanes and both walks' blocks
// give the same bits (the two schedules of the backward). ----

// dot_pairs for 16 lanes (one 64-byte vector).
NATTN_INLINE void dot_pairs(L16& acc, const I16& a, const I16& b) {
  L16 r = acc;
  __asm__("vdpbf16ps %2, %1, %0" : "+v"(r) : "v"(a), "v"(b));
  acc = r;
}
// The same with the 32-bit pair at `pair` broadcast to every lane of the second operand (the
// instruction's embedded broadcast: no separate broadcast instruction).
NATTN_INLINE void dot_pairs_broadcast(L16& acc, const I16& a, const float* pair) {
  L16 r = acc;
  __asm__("vdpbf16ps %2%{1to16%}, %1, %0" : "+v"(r) : "v"(a), "m"(*pair));
  acc = r;
}

// lane_line_scores on pairs: one product at a time, kLaneChunkBf16<1> offsets per call.
NATTN_INLINE void lane_line_scores_bf16_impl(const float* qt, int64_t pairs, const float* k,
                                             const float* gt, int64_t value_pairs,
                                             const float* v, int64_t ld, int64_t offsets,
                                             float* s, float* dp) {
  for_chunks<kLaneChunkBf16<1>>(offsets, [&](int64_t u0, auto n) NATTN_LAMBDA_INLINE {
    lane_dot_bf16<decltype(n)::value, 1>(qt, 0, pairs, k + u0, ld, s + u0 * kLanes, 0);
  });
  for_chunks<kLaneChunkBf16<1>>(offsets, [&](int64_t u0, auto n) NATTN_LAMBDA_INLINE {
    lane_dot_bf16<decltype(n)::value, 1>(gt, 0, value_pairs, v + u0, ld, dp + u0 * kLanes, 0);
  });
}

// lane_dot_pair16 on pairs: both products of two tiles' 16 lanes for offsets u0 .. u0 + N - 1.
template <int N>
NATTN_INLINE void lane_dot_pair16_bf16(const float* qt, const float* gt, int64_t pairs,
                                       const float* k, const float* v, int64_t ld, int64_t u0,
                                       const LaneHalf* halves) {
  L16 acc_s[N] = {}, acc_p[N] = {};
  for (int64_t j = 0; j < pairs; ++j) {
    I16 q, g;
    std::memcpy(&q, qt + j * 2 * kLanes, sizeof q);
    std::memcpy(&g, gt + j * 2 * kLanes, sizeof g);
    const float* kj = k + j * ld;
    const float* vj = v + j * ld;
#pragma GCC unroll 16
    for (int n = 0; n < N; ++n) {
      I16 kv, vv;
      std::memcpy(&kv, kj + n, sizeof kv);
      dot_pairs(acc_s[n], q, kv);
      std::memcpy(&vv, vj + n, sizeof vv);
      dot_pairs(acc_p[n], g, vv);
    }
  }
  store_lane_halves<N>(acc_s, acc_p, u0, halves);
}

// Offsets per lane_dot_pair16_bf16 call: 2N accumulators, the two query vectors and the key and
// value vectors (register operands of the assembly) in AVX-512's 32 registers.
constexpr int kLanePair16ChunkBf16 = 12;

NATTN_INLINE void lane_line_scores_pair_bf16_impl(const float* qt, const float* gt,
                                                  int64_t pairs, const float* k, const float* v,
                                                  int64_t ld, int64_t offsets,
                                                  const LaneHalf* halves) {
  for_chunks<kLanePair16ChunkBf16>(offsets, [&](int64_t u0, auto n) NATTN_LAMBDA_INLINE {
    lane_dot_pair16_bf16<decltype(n)::value>(qt, gt, pairs, k + u0, v + u0, ld, u0, halves);
  });
}

// block_dot on pairs: kRows rows of 16 columns, the row's pair broadcast from memory.
NATTN_INLINE void block_dot_bf16_impl(const float* a, int64_t lda, const float* bt, int64_t ldb,
                                      int64_t pairs, float* s) {
  static_assert(kCols == 16, "one 64-byte vector per block row");
  L16 acc[kRows] = {};
  for (int64_t j = 0; j < pairs; ++j) {
    I16 b;
    std::memcpy(&b, bt + j * ldb, sizeof b);
#pragma GCC unroll 8
    for (int r = 0; r < kRows; ++r) dot_pairs_broadcast(acc[r], b, a + r * lda + j);
  }
  for (int r = 0; r < kRows; ++r) std::memcpy(s + r * kCols, &acc[r], sizeof acc[r]);
}

// ---- The backward's dk and dv on bf16 pairs of queries (block_kernels.h:
// accumulate_pairs_bf16 and the pair builders). ----
using Q4 = int32_t __attribute__((vector_size(16)));

// block_kernels.h: lane_pairs_bf16. Lanes 2i of offset u and 2i + 1 of offset u - 1 hold the
// same key (position base + u + 2i), so one blend and one conversion make the four pairs.
NATTN_INLINE void lane_pairs_bf16_impl(const float* s, int64_t u_begin, int64_t u_end,
                                       float* pp) {
  for (int64_t u = u_begin; u < u_end; ++u) {
    L8 cur, prev;
    load8(cur, s + u * kLanes);
    load8(prev, s + (u - 1) * kLanes);
    const L8 mixed = __builtin_shufflevector(cur, prev, 0, 9, 2, 11, 4, 13, 6, 15);
    Q4 out;
    __asm__("vcvtneps2bf16 %1, %0" : "=v"(out) : "v"(mixed));
    std::memcpy(pp + u * (kLanes / 2), &out, sizeof out);
  }
}

// block_kernels.h: lane_key_pairs_bf16.
NATTN_INLINE void lane_key_pairs_bf16_impl(const float* s, int64_t u_begin, int64_t u_end,
                                           float* pp) {
  for (int64_t u = u_begin; u < u_end; ++u) {
    L8 first, second;
    load8(first, s + u * kLanes);
    load8(second, s + (u + 1) * kLanes);
    M8 out;
    bf16_pairs(out, first, second);
    std::memcpy(pp + u * kLanes, &out, sizeof out);
  }
}

// block_kernels.h: block_row_pairs_bf16.
NATTN_INLINE void block_row_pairs_bf16_impl(const float* p, float* pp) {
  static constexpr int16_t kInterleave[32] = {0,  16, 1,  17, 2,  18, 3,  19, 4,  20, 5,
                                              21, 6,  22, 7,  23, 8,  24, 9,  25, 10, 26,
                                              11, 27, 12, 28, 13, 29, 14, 30, 15, 31};
  I16 index;
  std::memcpy(&index, kInterleave, sizeof index);
  for (int i = 0; i < kRows / 2; ++i) {
    F16 first, second;
    std::memcpy(&first, p + 2 * i * kCols, sizeof first);
    std::memcpy(&second, p + (2 * i + 1) * kCols, sizeof second);
    I16 words, out;
    __asm__("vcvtne2ps2bf16 %2, %1, %0" : "=v"(words) : "v"(second), "v"(first));
    __asm__("vpermw %2, %1, %0" : "=v"(out) : "v"(index), "v"(words));
    std::memcpy(pp + i * kCols, &out, sizeof out);
  }
}

// block_kernels.h: block_col_pairs_bf16. Sixteen fp32 of a row to sixteen bf16 in order: word
// 2m (the low half of 32-bit element m) is entry 2m.
NATTN_INLINE void block_col_pairs_bf16_impl(const float* p, float* pp) {
  for (int r = 0; r < kRows; ++r) {
    F16 row;
    std::memcpy(&row, p + r * kCols, sizeof row);
    M8 out;
    __asm__("vcvtneps2bf16 %1, %0" : "=v"(out) : "v"(row));
    std::memcpy(pp + r * (kCols / 2), &out, sizeof out);
  }
}

// Columns [w0, w0 + kN * 16) of accumulate_pairs_bf16 (the last vector may be partial: kTail
// columns of it exist in o, or all 16 for kTail = 0; b is padded to whole vectors), kG keys at a
// time. kKeyStep, kPairStep: the layout of pp as constants, so that every pair of a group of keys
// is a fixed displacement from one pointer; kPairs: the pair count, or 0 when it is `pairs`.
// kPairs2 > 0: kPairs2 more pairs follow from a second table pp2 of the same layout (b's rows
// kPairs .. kPairs + kPairs2 - 1).
template <int kN, int kG, int kKeyStep, int kPairStep, int kPairs, bool kKeep, int kPairs2 = 0>
NATTN_INLINE void accumulate_pairs_panel(const float* pp, int64_t keys, int64_t pairs_arg,
                                         const float* b, int64_t ldb, int64_t w0, int64_t tail,
                                         float* o, int64_t ldo, const uint32_t* keep,
                                         const float* pp2 = nullptr) {
  constexpr int64_t kW = 16;
  const int64_t pairs = kPairs > 0 ? kPairs + kPairs2 : pairs_arg;
  const int64_t last_cols = tail > 0 ? tail : kW;
  for (int64_t k0 = 0; k0 < keys; k0 += kG) {
    // Keys past the last are computed on whatever pp holds there (block_kernels.h: the caller's
    // slack) and not stored.
    const float* pk = pp + k0 * kKeyStep;
    const float* pk2 = pp2 + k0 * kKeyStep;
    L16 acc[kG][kN];
#pragma GCC unroll 8
    for (int g = 0; g < kG; ++g) {
#pragma GCC unroll 4
      for (int j = 0; j < kN; ++j) {
        acc[g][j] = L16{};
        if (k0 + g >= keys) continue;
        if (j + 1 < kN || last_cols == kW) {
          std::memcpy(&acc[g][j], o + (k0 + g) * ldo + w0 + j * kW, sizeof acc[g][j]);
        } else {
          std::memcpy(&acc[g][j], o + (k0 + g) * ldo + w0 + j * kW,
                      static_cast<size_t>(last_cols) * sizeof(float));
        }
      }
    }
#pragma GCC unroll 8
    for (int64_t m = 0; m < pairs; ++m) {
      I16 bv[kN];
#pragma GCC unroll 4
      for (int j = 0; j < kN; ++j) std::memcpy(&bv[j], b + m * ldb + w0 + j * kW, sizeof bv[j]);
      const float* pm = kPairs2 > 0 && m >= kPairs ? pk2 + (m - kPairs) * kPairStep
                                                   : pk + m * kPairStep;
#pragma GCC unroll 8
      for (int g = 0; g < kG; ++g) {
        // One broadcast per key and pair for the kN vectors (a broadcast memory operand per
        // instruction is a load each: the kernel was bound by loads).
        int32_t bits;
        std::memcpy(&bits, pm + g * kKeyStep, sizeof bits);
        const I16 pair = I16{} + bits;
#pragma GCC unroll 4
        for (int j = 0; j < kN; ++j) {
          if constexpr (kKeep) {
            const int64_t k = std::min(k0 + g, keys - 1);
            const I16 masked = bv[j] & static_cast<int32_t>(keep[k * pairs + m]);
            dot_pairs(acc[g][j], masked, pair);
          } else {
            dot_pairs(acc[g][j], bv[j], pair);
          }
        }
      }
    }
#pragma GCC unroll 8
    for (int g = 0; g < kG; ++g) {
      if (k0 + g >= keys) break;
#pragma GCC unroll 4
      for (int j = 0; j < kN; ++j) {
        if (j + 1 < kN || last_cols == kW) {
          std::memcpy(o + (k0 + g) * ldo + w0 + j * kW, &acc[g][j], sizeof acc[g][j]);
        } else {
          std::memcpy(o + (k0 + g) * ldo + w0 + j * kW, &acc[g][j],
                      static_cast<size_t>(last_cols) * sizeof(float));
        }
      }
    }
  }
}

// block_kernels.h: accumulate_pairs2_bf16 (the lane layout, two tables of kLanes / 2 pairs).
NATTN_INLINE void accumulate_pairs2_bf16_impl(const float* pp, const float* pp2, int64_t keys,
                                              const float* b, int64_t ldb, int64_t width,
                                              float* o, int64_t ldo) {
  constexpr int kH = kLanes / 2;
  int64_t w0 = 0;
  for (; w0 + 64 <= width; w0 += 64) {
    accumulate_pairs_panel<4, 4, kH, 1 - kLanes, kH, false, kH>(pp, keys, 0, b, ldb, w0, 0, o,
                                                                ldo, nullptr, pp2);
  }
  for (; w0 < width; w0 += 16) {
    accumulate_pairs_panel<1, 8, kH, 1 - kLanes, kH, false, kH>(
        pp, keys, 0, b, ldb, w0, std::min<int64_t>(16, width - w0) % 16, o, ldo, nullptr, pp2);
  }
}

// block_kernels.h: accumulate_pairs_bf16 for one layout of pp: four-vector panels (64 columns),
// then single vectors.
template <int kKeyStep, int kPairStep, int kPairs, bool kKeep>
NATTN_INLINE void accumulate_pairs_layout(const float* pp, int64_t keys, int64_t pairs,
                                          const float* b, int64_t ldb, int64_t width, float* o,
                                          int64_t ldo, const uint32_t* keep) {
  int64_t w0 = 0;
  for (; w0 + 64 <= width; w0 += 64) {
    accumulate_pairs_panel<4, 4, kKeyStep, kPairStep, kPairs, kKeep>(
        pp, keys, pairs, b, ldb, w0, 0, o, ldo, keep);
  }
  for (; w0 < width; w0 += 16) {
    accumulate_pairs_panel<1, 8, kKeyStep, kPairStep, kPairs, kKeep>(
        pp, keys, pairs, b, ldb, w0, std::min<int64_t>(16, width - w0) % 16, o, ldo, keep);
  }
}
#else
#define NATTN_LANE_BF16 0
#endif

// One set of entry points per instruction-set level: each is the always-inlined template above
// compiled under that level's target attribute (so with its vector width), and a table of them
// is picked once per process (block_kernels.h: cpu_isa).
#define NATTN_LEVEL(NS, ATTR, REG_BYTES, REGS)                                                  \
  namespace NS {                                                                               \
  template <typename A>                                                                        \
  constexpr int kPass = row_pass<A, REG_BYTES, REGS>();                                        \
  template <typename A>                                                                        \
  ATTR void dot(const A* a, int64_t lda, const A* bt, int64_t ldb, int64_t depth, A* s) {      \
    block_dot_impl<kPass<A>, REG_BYTES>(a, lda, bt, ldb, depth, s);                            \
  }                                                                                            \
  template <typename A>                                                                        \
  ATTR void acc(const A* p, int64_t n, const A* b, int64_t ldb, int64_t width, A* o,           \
                int64_t ldo, const int64_t* clo, const int64_t* chi, int64_t ps_r,             \
                int64_t ps_c) {                                                                \
    block_accumulate_impl<kPass<A>, REG_BYTES>(p, n, b, ldb, width, o, ldo, kRows, clo, chi,   \
                                               0, ps_r, ps_c);                                 \
  }                                                                                            \
  template <typename A>                                                                        \
  ATTR void acc_t(const A* p, int64_t n, const A* b, int64_t ldb, int64_t width, A* o,         \
                  int64_t ldo, const int64_t* clo, const int64_t* chi, int64_t ps_r,           \
                  int64_t ps_c) {                                                              \
    block_accumulate_transposed_impl<kPass<A>, REG_BYTES>(p, n, b, ldb, width, o, ldo, clo,    \
                                                          chi, ps_r, ps_c);                    \
  }                                                                                            \
  template <typename A>                                                                        \
  ATTR void softmax(A* s, const int64_t* clo, const int64_t* chi, A scale, A* m, A* l,         \
                    A* corr) {                                                                 \
    block_online_softmax_impl(s, clo, chi, scale, m, l, corr);                                 \
  }                                                                                            \
  template <typename A>                                                                        \
  ATTR void probs(A* s, const A* dp, const int64_t* clo, const int64_t* chi, A scale,          \
                  const A* row_lse, const A* col_lse, const A* row_delta, const A* col_delta,  \
                  A* ds) {                                                                     \
    block_backward_probs_impl(s, dp, clo, chi, scale, row_lse, col_lse, row_delta, col_delta,  \
                              ds);                                                             \
  }                                                                                            \
  template <typename A>                                                                        \
  ATTR void bias(A* s, A scale, const A* b, int64_t step) {                                    \
    block_add_bias_impl(s, scale, b, step);                                                    \
  }                                                                                            \
  template <typename A>                                                                        \
  ATTR void bias_grad(const A* ds, A* acc, int64_t step) {                                     \
    block_add_bias_grad_impl(ds, acc, step);                                                   \
  }                                                                                            \
  constexpr Kernels kKernels = {dot<float>,      dot<double>,      acc<float>,   acc<double>,  \
                                acc_t<float>,    acc_t<double>,    softmax<float>,             \
                                softmax<double>, probs<float>,     probs<double>,              \
                                bias<float>,     bias<double>,     bias_grad<float>,           \
                                bias_grad<double>};                                            \
  }

struct Kernels {
  void (*dot_f)(const float*, int64_t, const float*, int64_t, int64_t, float*);
  void (*dot_d)(const double*, int64_t, const double*, int64_t, int64_t, double*);
  void (*acc_f)(const float*, int64_t, const float*, int64_t, int64_t, float*, int64_t,
                const int64_t*, const int64_t*, int64_t, int64_t);
  void (*acc_d)(const double*, int64_t, const double*, int64_t, int64_t, double*, int64_t,
                const int64_t*, const int64_t*, int64_t, int64_t);
  void (*acc_t_f)(const float*, int64_t, const float*, int64_t, int64_t, float*, int64_t,
                  const int64_t*, const int64_t*, int64_t, int64_t);
  void (*acc_t_d)(const double*, int64_t, const double*, int64_t, int64_t, double*, int64_t,
                  const int64_t*, const int64_t*, int64_t, int64_t);
  void (*softmax_f)(float*, const int64_t*, const int64_t*, float, float*, float*, float*);
  void (*softmax_d)(double*, const int64_t*, const int64_t*, double, double*, double*, double*);
  void (*probs_f)(float*, const float*, const int64_t*, const int64_t*, float, const float*,
                  const float*, const float*, const float*, float*);
  void (*probs_d)(double*, const double*, const int64_t*, const int64_t*, double,
                  const double*, const double*, const double*, const double*, double*);
  void (*bias_f)(float*, float, const float*, int64_t);
  void (*bias_d)(double*, double, const double*, int64_t);
  void (*bias_grad_f)(const float*, float*, int64_t);
  void (*bias_grad_d)(const double*, double*, int64_t);
};

// Vector register width and count per level (the baseline: x86-64's SSE2, 16 x 16 bytes; on
// other architectures a 16-byte, 32-register guess such as AArch64's NEON).
#if NATTN_X86
NATTN_LEVEL(baseline, , 16, 16)
NATTN_LEVEL(avx2, __attribute__((target("arch=x86-64-v3"))), 32, 16)
NATTN_LEVEL(avx512, __attribute__((target("arch=x86-64-v4"))), 64, 32)
// The lane kernels at the levels whose registers hold 8 fp32 lanes (SSE would split each
// vector).
#define NATTN_LANE_LEVEL(NS, ATTR)                                                              \
  namespace NS {                                                                               \
  ATTR void lane(const LaneTile& t, float* s, float* ot, float* o, float* lse) {               \
    lane_forward_rows(t, s, ot, o, lse);                                                       \
  }                                                                                            \
  ATTR void line_scores(const float* qt, int64_t depth, const float* k, const float* gt,      \
                        int64_t value_depth, const float* v, int64_t ld, int64_t offsets,      \
                        float* s, float* dp) {                                                 \
    lane_line_scores_impl(qt, depth, k, gt, value_depth, v, ld, offsets, s, dp);               \
  }                                                                                            \
  ATTR void line_probs(float* s, float* dp, int64_t offsets, int64_t base, const int32_t* lo,   \
                       const int32_t* hi, float scale, const float* lse, const float* delta) { \
    lane_line_probs_impl(s, dp, offsets, base, lo, hi, scale, lse, delta);                     \
  }                                                                                            \
  }
NATTN_LANE_LEVEL(avx2, __attribute__((target("arch=x86-64-v3"))))
NATTN_LANE_LEVEL(avx512, __attribute__((target("arch=x86-64-v4"))))
#undef NATTN_LANE_LEVEL
namespace avx512 {
__attribute__((target("arch=x86-64-v4"))) void line_scores_pair(
    const float* qt, const float* gt, int64_t depth, const float* k, const float* v, int64_t ld,
    int64_t offsets, const LaneHalf* halves) {
  lane_line_scores_pair_impl(qt, gt, depth, k, v, ld, offsets, halves);
}
}  // namespace avx512
#if NATTN_LANE_BF16
namespace avx512bf16 {
__attribute__((target("arch=x86-64-v4,avx512bf16"))) void lane_bf16(const LaneTile& t, float* s,
                                                                    float* ot, float* o,
                                                                    float* lse) {
  if (t.rows == 2) {
    lane_forward_bf16_impl<2>(t, s, ot, o, lse);
  } else {
    lane_forward_bf16_impl<1>(t, s, ot, o, lse);
  }
}
__attribute__((target("arch=x86-64-v4,avx512bf16"))) void line_scores_bf16(
    const float* qt, int64_t pairs, const float* k, const float* gt, int64_t value_pairs,
    const float* v, int64_t ld, int64_t offsets, float* s, float* dp) {
  lane_line_scores_bf16_impl(qt, pairs, k, gt, value_pairs, v, ld, offsets, s, dp);
}
__attribute__((target("arch=x86-64-v4,avx512bf16"))) void line_scores_pair_bf16(
    const float* qt, const float* gt, int64_t pairs, const float* k, const float* v, int64_t ld,
    int64_t offsets, const LaneHalf* halves) {
  lane_line_scores_pair_bf16_impl(qt, gt, pairs, k, v, ld, offsets, halves);
}
__attribute__((target("arch=x86-64-v4,avx512bf16"))) void dot_bf16(const float* a, int64_t lda,
                                                                   const float* bt, int64_t ldb,
                                                                   int64_t pairs, float* s) {
  block_dot_bf16_impl(a, lda, bt, ldb, pairs, s);
}
__attribute__((target("arch=x86-64-v4,avx512bf16"))) void lane_pairs(const float* s,
                                                                     int64_t u_begin,
                                                                     int64_t u_end, float* pp) {
  lane_pairs_bf16_impl(s, u_begin, u_end, pp);
}
__attribute__((target("arch=x86-64-v4,avx512bf16"))) void key_pairs(const float* s,
                                                                    int64_t u_begin,
                                                                    int64_t u_end, float* pp) {
  lane_key_pairs_bf16_impl(s, u_begin, u_end, pp);
}
__attribute__((target("arch=x86-64-v4,avx512bf16"))) void row_pairs(const float* p, float* pp) {
  block_row_pairs_bf16_impl(p, pp);
}
__attribute__((target("arch=x86-64-v4,avx512bf16"))) void col_pairs(const float* p, float* pp) {
  block_col_pairs_bf16_impl(p, pp);
}
__attribute__((target("arch=x86-64-v4,avx512bf16"))) void acc_pairs(
    const float* pp, int64_t key_step, int64_t pair_step, int64_t keys, int64_t pairs,
    const float* b, int64_t ldb, int64_t width, float* o, int64_t ldo, const uint32_t* keep) {
  // The four layouts the backward uses (Backward::dq_tile, dkdv_chunk_bf16).
  if (key_step == kLanes / 2 && pair_step == 1 - kLanes && pairs == kLanes / 2 && !keep) {
    accumulate_pairs_layout<kLanes / 2, 1 - kLanes, kLanes / 2, false>(
        pp, keys, pairs, b, ldb, width, o, ldo, nullptr);
  } else if (key_step == 1 && pair_step == kCols && pairs == kRows / 2 && !keep) {
    accumulate_pairs_layout<1, kCols, kRows / 2, false>(pp, keys, pairs, b, ldb, width, o, ldo,
                                                        nullptr);
  } else if (key_step == 1 - kLanes && pair_step == 2 * kLanes && !keep) {
    accumulate_pairs_layout<1 - kLanes, 2 * kLanes, 0, false>(pp, keys, pairs, b, ldb, width, o,
                                                              ldo, nullptr);
  } else if (key_step == kCols / 2 && pair_step == 1 && !keep) {
    accumulate_pairs_layout<kCols / 2, 1, 0, false>(pp, keys, pairs, b, ldb, width, o, ldo,
                                                    nullptr);
  } else if (key_step == kCols / 2 && pair_step == 1) {
    accumulate_pairs_layout<kCols / 2, 1, 0, true>(pp, keys, pairs, b, ldb, width, o, ldo, keep);
  } else {
    std::abort();  // not a layout of the backward's
  }
}
__attribute__((target("arch=x86-64-v4,avx512bf16"))) void acc_pairs2(
    const float* pp, const float* pp2, int64_t keys, const float* b, int64_t ldb, int64_t width,
    float* o, int64_t ldo) {
  accumulate_pairs2_bf16_impl(pp, pp2, keys, b, ldb, width, o, ldo);
}
}  // namespace avx512bf16
#endif
#else
NATTN_LEVEL(baseline, , 16, 32)
#endif
#undef NATTN_LEVEL

CpuIsa best_supported_isa() {
#if NATTN_X86
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
      __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512vl") &&
      __builtin_cpu_supports("avx512cd") && __builtin_cpu_supports("avx2") &&
      __builtin_cpu_supports("fma") && __builtin_cpu_supports("bmi2")) {
#if NATTN_LANE_BF16
    if (__builtin_cpu_supports("avx512bf16")) return CpuIsa::kAvx512Bf16;
#endif
    return CpuIsa::kAvx512;
  }
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
      __builtin_cpu_supports("bmi") && __builtin_cpu_supports("bmi2") &&
      __builtin_cpu_supports("f16c")) {
    return CpuIsa::kAvx2;
  }
#endif
  return CpuIsa::kBaseline;
}

const char* isa_name(CpuIsa isa) {
  switch (isa) {
    case CpuIsa::kAvx512Bf16:
      return "avx512bf16";
    case CpuIsa::kAvx512:
      return "avx512";
    case CpuIsa::kAvx2:
      return "avx2";
    case CpuIsa::kBaseline:
      break;
  }
  return "baseline";
}

// The level NATTN_CPU_ISA asks for (baseline, avx2, avx512, avx512bf16), else the best the CPU
// has.
CpuIsa choose_isa() {
  const CpuIsa best = best_supported_isa();
  const char* env = std::getenv("NATTN_CPU_ISA");
  if (env == nullptr || *env == '\0') return best;
  const std::string want(env);
  for (CpuIsa isa : {CpuIsa::kBaseline, CpuIsa::kAvx2, CpuIsa::kAvx512, CpuIsa::kAvx512Bf16}) {
    if (want != isa_name(isa)) continue;
    if (static_cast<int>(isa) > static_cast<int>(best)) {
      throw std::runtime_error("NATTN_CPU_ISA=" + want + " asks for instructions this CPU (or " +
                               "build) does not have; the best available is " +
                               isa_name(best));
    }
    return isa;
  }
  throw std::runtime_error("NATTN_CPU_ISA='" + want +
                           "' is not one of baseline, avx2, avx512, avx512bf16 (or unset for the " +
                           "best)");
}

const Kernels& kernels_for(CpuIsa isa) {
  switch (isa) {
#if NATTN_X86
    case CpuIsa::kAvx512Bf16:  // the same block kernels; only the bf16 lane forward differs
    case CpuIsa::kAvx512:
      return avx512::kKernels;
    case CpuIsa::kAvx2:
      return avx2::kKernels;
#endif
    default:
      return baseline::kKernels;
  }
}

// The table every entry point calls through: one load and an indirect call per block, like an
// ifunc. Set once, inside chosen_isa()'s initialization, which the forward and backward entry
// points run on the calling thread before any worker starts (until then: baseline, correct).
const Kernels* g_kernels = &baseline::kKernels;
using LaneFn = void (*)(const LaneTile&, float*, float*, float*, float*);
LaneFn g_lane = nullptr;  // the lane kernel of the chosen level, or null (baseline)
using LineScoresFn = void (*)(const float*, int64_t, const float*, const float*, int64_t,
                             const float*, int64_t, int64_t, float*, float*);
LineScoresFn g_line_scores = nullptr;  // the same level's lane_line_scores
using LineProbsFn = void (*)(float*, float*, int64_t, int64_t, const int32_t*, const int32_t*,
                            float, const float*, const float*);
LineProbsFn g_line_probs = nullptr;  // and lane_line_probs
using LineScoresPairFn = void (*)(const float*, const float*, int64_t, const float*,
                                  const float*, int64_t, int64_t, const LaneHalf*);
LineScoresPairFn g_line_scores_pair = nullptr;  // lane_line_scores_pair (AVX-512 only)
LaneFn g_lane_bf16 = nullptr;  // lane_forward_bf16 (AVX512-BF16 only)
// The backward's bf16 score kernels (AVX512-BF16 only).
LineScoresFn g_line_scores_bf16 = nullptr;
LineScoresPairFn g_line_scores_pair_bf16 = nullptr;
void (*g_dot_bf16)(const float*, int64_t, const float*, int64_t, int64_t, float*) = nullptr;
void (*g_lane_pairs_bf16)(const float*, int64_t, int64_t, float*) = nullptr;
void (*g_row_pairs_bf16)(const float*, float*) = nullptr;
void (*g_key_pairs_bf16)(const float*, int64_t, int64_t, float*) = nullptr;
void (*g_col_pairs_bf16)(const float*, float*) = nullptr;
void (*g_acc_pairs_bf16)(const float*, int64_t, int64_t, int64_t, int64_t, const float*, int64_t,
                         int64_t, float*, int64_t, const uint32_t*) = nullptr;
void (*g_acc_pairs2_bf16)(const float*, const float*, int64_t, const float*, int64_t, int64_t,
                          float*, int64_t) = nullptr;

CpuIsa chosen_isa() {
  static const CpuIsa isa = [] {  // a failed choice throws again on the next call
    const CpuIsa chosen = choose_isa();
    g_kernels = &kernels_for(chosen);
#if NATTN_X86
    if (chosen == CpuIsa::kAvx512 || chosen == CpuIsa::kAvx512Bf16) {
      g_lane = avx512::lane;
      g_line_scores = avx512::line_scores;
      g_line_probs = avx512::line_probs;
      g_line_scores_pair = avx512::line_scores_pair;
    }
#if NATTN_LANE_BF16
    if (chosen == CpuIsa::kAvx512Bf16) {
      g_lane_bf16 = avx512bf16::lane_bf16;
      g_line_scores_bf16 = avx512bf16::line_scores_bf16;
      g_line_scores_pair_bf16 = avx512bf16::line_scores_pair_bf16;
      g_dot_bf16 = avx512bf16::dot_bf16;
      g_lane_pairs_bf16 = avx512bf16::lane_pairs;
      g_row_pairs_bf16 = avx512bf16::row_pairs;
      g_key_pairs_bf16 = avx512bf16::key_pairs;
      g_col_pairs_bf16 = avx512bf16::col_pairs;
      g_acc_pairs_bf16 = avx512bf16::acc_pairs;
      g_acc_pairs2_bf16 = avx512bf16::acc_pairs2;
    }
#endif
    if (chosen == CpuIsa::kAvx2) {
      g_lane = avx2::lane;
      g_line_scores = avx2::line_scores;
      g_line_probs = avx2::line_probs;
    }
#endif
    return chosen;
  }();
  return isa;
}

}  // namespace

const char* cpu_isa() { return isa_name(chosen_isa()); }

bool lane_kernels_available() {
  chosen_isa();
  return g_lane != nullptr;
}
void lane_forward(const LaneTile& t, float* s, float* ot, float* o, float* lse) {
  g_lane(t, s, ot, o, lse);
}

bool lane_bf16_available() {
  chosen_isa();
  return g_lane_bf16 != nullptr;
}
void lane_forward_bf16(const LaneTile& t, float* s, float* ot, float* o, float* lse) {
  g_lane_bf16(t, s, ot, o, lse);
}

void lane_line_scores(const float* qt, int64_t depth, const float* k, const float* gt,
                      int64_t value_depth, const float* v, int64_t ld, int64_t offsets, float* s,
                      float* dp) {
  g_line_scores(qt, depth, k, gt, value_depth, v, ld, offsets, s, dp);
}
void lane_line_scores_bf16(const float* qt, int64_t pairs, const float* k, const float* gt,
                           int64_t value_pairs, const float* v, int64_t ld, int64_t offsets,
                           float* s, float* dp) {
  g_line_scores_bf16(qt, pairs, k, gt, value_pairs, v, ld, offsets, s, dp);
}
void lane_line_scores_pair_bf16(const float* qt, const float* gt, int64_t pairs, const float* k,
                                const float* v, int64_t ld, int64_t offsets,
                                const LaneHalf* halves) {
  g_line_scores_pair_bf16(qt, gt, pairs, k, v, ld, offsets, halves);
}
void block_dot_bf16(const float* a, int64_t lda, const float* bt, int64_t ldb, int64_t pairs,
                    float* s) {
  g_dot_bf16(a, lda, bt, ldb, pairs, s);
}
void lane_pairs_bf16(const float* s, int64_t u_begin, int64_t u_end, float* pp) {
  g_lane_pairs_bf16(s, u_begin, u_end, pp);
}
void block_row_pairs_bf16(const float* p, float* pp) { g_row_pairs_bf16(p, pp); }
void lane_key_pairs_bf16(const float* s, int64_t u_begin, int64_t u_end, float* pp) {
  g_key_pairs_bf16(s, u_begin, u_end, pp);
}
void block_col_pairs_bf16(const float* p, float* pp) { g_col_pairs_bf16(p, pp); }
void accumulate_pairs_bf16(const float* pp, int64_t key_step, int64_t pair_step, int64_t keys,
                           int64_t pairs, const float* b, int64_t ldb, int64_t width, float* o,
                           int64_t ldo, const uint32_t* keep) {
  g_acc_pairs_bf16(pp, key_step, pair_step, keys, pairs, b, ldb, width, o, ldo, keep);
}
void accumulate_pairs2_bf16(const float* pp, const float* pp2, int64_t keys, const float* b,
                            int64_t ldb, int64_t width, float* o, int64_t ldo) {
  g_acc_pairs2_bf16(pp, pp2, keys, b, ldb, width, o, ldo);
}
bool lane_pair_available() {
  chosen_isa();
  return g_line_scores_pair != nullptr;
}
void lane_line_scores_pair(const float* qt, const float* gt, int64_t depth, const float* k,
                           const float* v, int64_t ld, int64_t offsets, const LaneHalf* halves) {
  g_line_scores_pair(qt, gt, depth, k, v, ld, offsets, halves);
}
void lane_line_probs(float* s, float* dp, int64_t offsets, int64_t base, const int32_t* lo,
                     const int32_t* hi, float scale, const float* lse, const float* delta) {
  g_line_probs(s, dp, offsets, base, lo, hi, scale, lse, delta);
}

void block_dot(const float* a, int64_t lda, const float* bt, int64_t ldb, int64_t depth,
               float* s) {
  g_kernels->dot_f(a, lda, bt, ldb, depth, s);
}
void block_dot(const double* a, int64_t lda, const double* bt, int64_t ldb, int64_t depth,
               double* s) {
  g_kernels->dot_d(a, lda, bt, ldb, depth, s);
}
void block_accumulate(const float* p, int64_t n, const float* b, int64_t ldb, int64_t width,
                      float* o, int64_t ldo, const int64_t* clo, const int64_t* chi, int64_t ps_r,
                      int64_t ps_c) {
  g_kernels->acc_f(p, n, b, ldb, width, o, ldo, clo, chi, ps_r, ps_c);
}
void block_accumulate(const double* p, int64_t n, const double* b, int64_t ldb, int64_t width,
                      double* o, int64_t ldo, const int64_t* clo, const int64_t* chi, int64_t ps_r,
                      int64_t ps_c) {
  g_kernels->acc_d(p, n, b, ldb, width, o, ldo, clo, chi, ps_r, ps_c);
}
void block_accumulate_transposed(const float* p, int64_t n, const float* b, int64_t ldb,
                                 int64_t width, float* o, int64_t ldo, const int64_t* clo,
                                 const int64_t* chi, int64_t ps_r, int64_t ps_c) {
  g_kernels->acc_t_f(p, n, b, ldb, width, o, ldo, clo, chi, ps_r, ps_c);
}
void block_accumulate_transposed(const double* p, int64_t n, const double* b, int64_t ldb,
                                 int64_t width, double* o, int64_t ldo, const int64_t* clo,
                                 const int64_t* chi, int64_t ps_r, int64_t ps_c) {
  g_kernels->acc_t_d(p, n, b, ldb, width, o, ldo, clo, chi, ps_r, ps_c);
}
void block_online_softmax(float* s, const int64_t* clo, const int64_t* chi, float scale,
                          float* m, float* l, float* corr) {
  g_kernels->softmax_f(s, clo, chi, scale, m, l, corr);
}
void block_online_softmax(double* s, const int64_t* clo, const int64_t* chi, double scale,
                          double* m, double* l, double* corr) {
  g_kernels->softmax_d(s, clo, chi, scale, m, l, corr);
}
void block_backward_probs(float* s, const float* dp, const int64_t* clo, const int64_t* chi,
                          float scale, const float* row_lse, const float* col_lse,
                          const float* row_delta, const float* col_delta, float* ds) {
  g_kernels->probs_f(s, dp, clo, chi, scale, row_lse, col_lse, row_delta, col_delta, ds);
}
void block_backward_probs(double* s, const double* dp, const int64_t* clo, const int64_t* chi,
                          double scale, const double* row_lse, const double* col_lse,
                          const double* row_delta, const double* col_delta, double* ds) {
  g_kernels->probs_d(s, dp, clo, chi, scale, row_lse, col_lse, row_delta, col_delta, ds);
}

void block_add_bias(float* s, float scale, const float* bias, int64_t bias_row_step) {
  g_kernels->bias_f(s, scale, bias, bias_row_step);
}
void block_add_bias(double* s, double scale, const double* bias, int64_t bias_row_step) {
  g_kernels->bias_d(s, scale, bias, bias_row_step);
}
void block_add_bias_grad(const float* ds, float* acc, int64_t acc_row_step) {
  g_kernels->bias_grad_f(ds, acc, acc_row_step);
}
void block_add_bias_grad(const double* ds, double* acc, int64_t acc_row_step) {
  g_kernels->bias_grad_d(ds, acc, acc_row_step);
}

}  // namespace nattn::cpu
