// The register-blocked inner kernels every CPU attention pass is built from. A pass works on a
// tile of kRows rows (queries in the forward and dq passes, keys in the dk/dv pass) against a
// chunk of at most kCols columns (keys, or queries), so that each packed key/query row is loaded
// once per tile instead of once per row.
//
// The two product kernels keep a kRows x kCols block of accumulators in registers: 8 x 16 fp32
// is 8 AVX-512 registers (16 AVX2 ones), enough independent FMA chains to hide the 4-cycle FMA
// latency on two FMA ports. Every kernel here is compiled for x86-64-v4 (AVX-512), v3
// (AVX2+FMA) and the baseline, chosen on first use (cpu_isa), because the module is
// distributed and built without -march=native.
#pragma once

#include <cstdint>

namespace nattn::cpu {

constexpr int kRows = 8;
constexpr int kCols = 16;

// Instruction-set levels the kernels are compiled for (x86-64: baseline, x86-64-v3 = AVX2 + FMA,
// x86-64-v4 = AVX-512, and x86-64-v4 with AVX512-BF16, whose only difference is that bf16 runs on
// bf16 products: the lane forward, lane_forward_bf16, and the backward's kernels below (GCC
// builds); other architectures: baseline only).
enum class CpuIsa { kBaseline = 0, kAvx2 = 1, kAvx512 = 2, kAvx512Bf16 = 3 };

// Name of the level every kernel below runs at: the best this CPU supports, or the one the
// environment variable NATTN_CPU_ISA (baseline, avx2, avx512, avx512bf16) names, read once per
// process.
// Throws std::runtime_error when NATTN_CPU_ISA names an unknown level or one the CPU lacks (and
// so does every CPU forward and backward call, until the process restarts with a valid value).
const char* cpu_isa();

// s[r * kCols + c] = sum_{i < depth} a[r * lda + i] * bt[i * ldb + c] for r < kRows, c < kCols.
// bt is a transposed (column-major) panel: all kCols entries of one depth index are contiguous.
void block_dot(const float* a, int64_t lda, const float* bt, int64_t ldb, int64_t depth,
               float* s);
void block_dot(const double* a, int64_t lda, const double* bt, int64_t ldb, int64_t depth,
               double* s);

// o[r * ldo + w] += sum_{c < n} p[r * kCols + c] * b[c * ldb + w] for r < kRows, w < width:
// rows of b are contiguous (they may be rows of the caller's own tensor, read in place).
// clo, chi (or null): p[r * kCols + c] is exactly 0 outside clo[r] <= c < chi[r] (masked P, dS),
// so the kernel may leave out those terms; the result is the same bits (block_kernels.cpp).
// ps_r, ps_c: entry (r, c) of the block is at p[r * ps_r + c * ps_c] (default: the kRows x kCols
// block; the backward's lane layout reads it in place, block row r shifted by one lane per row).
void block_accumulate(const float* p, int64_t n, const float* b, int64_t ldb, int64_t width,
                      float* o, int64_t ldo, const int64_t* clo = nullptr,
                      const int64_t* chi = nullptr, int64_t ps_r = kCols, int64_t ps_c = 1);
void block_accumulate(const double* p, int64_t n, const double* b, int64_t ldb, int64_t width,
                      double* o, int64_t ldo, const int64_t* clo = nullptr,
                      const int64_t* chi = nullptr, int64_t ps_r = kCols, int64_t ps_c = 1);

// The same with p transposed: o[c * ldo + w] += sum_{r < kRows} p[r * kCols + c] * b[r * ldb + w]
// for c < n (rows of o past n are not touched), clo and chi as above (spans of p's rows). Each o
// row sees the same sequence of rounded operations block_accumulate would apply with the
// transposed block.
void block_accumulate_transposed(const float* p, int64_t n, const float* b, int64_t ldb,
                                 int64_t width, float* o, int64_t ldo,
                                 const int64_t* clo = nullptr, const int64_t* chi = nullptr,
                                 int64_t ps_r = kCols, int64_t ps_c = 1);
void block_accumulate_transposed(const double* p, int64_t n, const double* b, int64_t ldb,
                                 int64_t width, double* o, int64_t ldo,
                                 const int64_t* clo = nullptr, const int64_t* chi = nullptr,
                                 int64_t ps_r = kCols, int64_t ps_c = 1);

// Exponentials below use, for fp32, a vectorizable polynomial (about 2 ulp; results below
// exp(-87) flush to 0) and, for fp64, std::exp for full accuracy.

// One online-softmax step on a block of raw scores s (from block_dot): entry (r, c) counts only
// for clo[r] <= c < chi[r]. Per row: m[r] becomes max(m[r], scale * max valid score), s becomes
// exp(scale * s - m[r]) (0 where masked), l[r] becomes l[r] * corr[r] + row sum, and corr[r] is
// the factor exp(m_old - m_new) the caller applies to its output row (1 for a row with no valid
// entry in this block).
void block_online_softmax(float* s, const int64_t* clo, const int64_t* chi, float scale, float* m,
                          float* l, float* corr);
void block_online_softmax(double* s, const int64_t* clo, const int64_t* chi, double scale,
                          double* m, double* l, double* corr);

// Backward from raw scores s and dp = dO.v: s becomes P = exp(scale * s - row_lse[r] -
// col_lse[c]) (0 outside clo[r] <= c < chi[r]) and ds = P * (dp - row_delta[r] - col_delta[c]).
// Rows are queries (row_*; col_* zero) in the dq pass, keys (col_*; row_* zero) in dk/dv.
void block_backward_probs(float* s, const float* dp, const int64_t* clo, const int64_t* chi,
                          float scale, const float* row_lse, const float* col_lse,
                          const float* row_delta, const float* col_delta, float* ds);
void block_backward_probs(double* s, const double* dp, const int64_t* clo, const int64_t* chi,
                          double scale, const double* row_lse, const double* col_lse,
                          const double* row_delta, const double* col_delta, double* ds);

// Relative positional bias (DESIGN.md section 7) on a block of raw scores s (from block_dot):
// s[r * kCols + c] = s[r * kCols + c] * scale + bias[r * bias_row_step + c] for all kRows x kCols
// entries (bias rows may overlap: a tile's rows step by one query, so its bias rows are one
// table line shifted by -1 per row). The caller then runs the softmax with scale 1.
void block_add_bias(float* s, float scale, const float* bias, int64_t bias_row_step);
void block_add_bias(double* s, double scale, const double* bias, int64_t bias_row_step);

// The adjoint for d_rpb: acc[r * acc_row_step + c] += ds[r * kCols + c], rows in order r = 0 ..
// kRows - 1 (overlapping acc rows receive their terms in that fixed order).
void block_add_bias_grad(const float* ds, float* acc, int64_t acc_row_step);
void block_add_bias_grad(const double* ds, double* acc, int64_t acc_row_step);

// Lane kernels: the fp32 forward of one query tile with one vector lane per query (kLanes =
// kRows consecutive group positions of the last axis), at AVX2 and AVX-512 only.
//
// Query r of the tile and offset u of a window line read the key at group position base + r + u
// of that line: the queries' windows on the last axis shift by one position per query in the
// interior, so every offset is one unaligned vector load of a transposed line (pack_lines) and
// one fused multiply-add for all kLanes queries, with no lanes wasted on keys outside a query's
// window. (In the blocks of the kernels above, a row uses only its own K of the columns that the
// tile's K + kRows - 1 keys per line take: 7 of 16 at K = 7.)
// Near the ends of the axis, for strided or causal windows, the per-lane [lo, hi) masks cut out
// the positions outside each query's window, and `offsets` spans the union of the shifted
// windows. The scores of the whole window are kept (s), so the softmax is exact (one maximum, no
// online rescaling): its maximum, exponentials and sums are lane-wise, with no horizontal
// reductions.
//
// A tile may hold two rows of kLanes queries (rows = 2): the same last-axis positions at two
// indices of the other axes whose windows share most of their key lines (two neighbouring
// queries of axis 1 with a 7 x 7 window share 6 of their 8 lines). Each key (and value) vector
// is then loaded once for both rows, about a third fewer loads per multiply-add, which is what
// limits the lane kernels on AVX2. The kernel visits the union of the rows' lines; `member`
// marks each row's own, and a row's scores on the others are masked, so each row's result is
// the one it gets alone, bit for bit (its sums only gain exact zeros).
constexpr int kLanes = kRows;
constexpr int kLaneRowsMax = 2;

struct LaneTile {
  int rows;                   // rows of queries, 1 or kLaneRowsMax
  const float* qt;            // [rows][head_dim][kLanes], the tile's queries transposed (zero
                              // lanes past it)
  int64_t head_dim, value_dim;
  const float* const* k;      // per window line: the transposed keys (pack_lines), at position base
  const float* const* v;      // the same for the values (width value_dim)
  int64_t lines, ld;          // window lines (of all rows); leading dimension of a packed line
  const uint8_t* member;      // per line, bit i set when row i's window holds it (rows = 2), or
                              // null: every row's
  int64_t base;               // group position of lane 0 at offset 0 (may be negative, >= -kLanes)
  int64_t offsets;            // offsets per line
  const int32_t* lo;          // [kLanes]: lane r's window is lo[r] <= position < hi[r] on every line
  const int32_t* hi;          // (lo = hi: no query in this lane)
  const float* add_kt;        // additional keys, transposed [head_dim][add_ld], or null
  int64_t add_ld;
  const float* add_v;         // additional values, rows [num_additional][value_dim]
  int64_t num_additional;
  float scale;
  bool contained;             // P V products selected by each lane's window (a non-finite tile's
                              // recomputation: a NaN value then reaches only its own queries)
};

// The block kernels execute more FLOPs than the lane kernels (a whole kRows x kCols score block
// per key chunk) but at a higher rate: per executed FLOP, 1.36x (1-D, window 255) to 1.67x (2-D,
// window 7 x 7) the lane kernels' (AVX2, AMD Zen 3, fp32, 2 threads; bench/results/
// cpu-2026-12-03/). The lane kernels run where the block kernels would execute more than this
// many times their FLOPs: small last-axis windows (7 keys: 1.9x), not large ones (255: 1.04x).
// (Measured before the two-row tiles and the NATTN_LAMBDA_INLINE fix made the lane kernels
// 1.1-1.8x faster; the ratio that balances them now is lower, not yet measured.)
constexpr double kLaneCostRatio = 1.5;

// Whether lane_forward runs at the chosen level (AVX2 or AVX-512).
bool lane_kernels_available();

// Normalized output o[(i * kLanes + r) * value_dim + w] and natural-log LSE lse[i * kLanes + r]
// of query r of row i, with s as scratch of rows * (lines * offsets + num_additional) * kLanes
// floats and ot of rows * value_dim * kLanes.
void lane_forward(const LaneTile& t, float* s, float* ot, float* o, float* lse);

// lane_forward for bf16 inputs on bf16 products (AVX512-BF16's vdpbf16ps: pairs of bf16
// products summed in fp32), at the avx512bf16 level only (lane_bf16_available); no additional
// keys (num_additional = 0). The operands are bf16 pairs, 32 bits each, behind the same pointers:
//   qt    [rows][head_dim / 2][kLanes]: the pair of depth indices 2j, 2j + 1 of each query;
//   k     per line, [head_dim / 2][ld]: the pair of depth indices 2j, 2j + 1 of each position;
//   v     per line, [value_dim][ld]: the values at positions x and x + 1 (0 past the line);
// head_dim even. Scores, softmax, sums and LSE are fp32 as in lane_forward; the weights enter
// the P V product rounded to bf16 (nearest even), as the tensor-core kernels' P does, and the
// output is normalized by the sums of the unrounded weights. Subnormal bf16 inputs count as 0.
bool lane_bf16_available();
void lane_forward_bf16(const LaneTile& t, float* s, float* ot, float* o, float* lse);

// The scores S and dP of one key line for every window offset of a tile of kLanes queries, one
// lane per query (the backward's dq pass): s[u * kLanes + r] = sum_w qt[w * kLanes + r] * k[w *
// ld + u + r] for u < offsets, with qt the tile transposed ([depth][kLanes]) and k a packed
// transposed line (pack_lines) at lane 0's position for offset 0; dp the same from gt (dO
// transposed, [value_depth][kLanes]) and the value line v. Each entry is one fused multiply-add
// chain over w = 0, 1, ... from zero, as in block_dot, so the two give the same bits. Only where
// lane_kernels_available().
void lane_line_scores(const float* qt, int64_t depth, const float* k, const float* gt,
                      int64_t value_depth, const float* v, int64_t ld, int64_t offsets, float* s,
                      float* dp);

// lane_line_scores for two tiles of one query line at once (the backward's dq pass, AVX-512
// only: lane_pair_available): 2 x kLanes lanes, the first tile's queries in lanes 0 .. kLanes - 1
// and the next tile's in the others, so that one 64-byte key (or value) vector and one
// multiply-add serve both tiles, half the instructions of two lane_line_scores calls. qt, gt: the
// two tiles transposed, [depth][2 * kLanes]. Lane l at offset u < offsets reads position u + l of
// k and v (packed lines at the first tile's lowest position); halves[h] receives offset u of its
// kLanes lanes at its own offset u - shift, where 0 <= u - shift < offsets (the lane layout
// lane_line_scores writes for that tile alone, with the same bits), and nothing elsewhere.
// depth is also the value depth.
struct LaneHalf {
  float* s;
  float* dp;
  int64_t shift, offsets;
};
bool lane_pair_available();
void lane_line_scores_pair(const float* qt, const float* gt, int64_t depth, const float* k,
                           const float* v, int64_t ld, int64_t offsets, const LaneHalf* halves);

// The backward's score products on bf16 pairs, at the avx512bf16 level only
// (lane_bf16_available), for bf16 inputs: the same layouts as above with every operand a 32-bit
// pair of bf16 depth indices (2j, 2j + 1) of one row (query, key, value or dO) and depths counted
// in pairs. Each score entry is the chain acc = vdpbf16ps(acc, pair j of its query, pair j of
// its key) over j = 0, 1, ... from zero in all three, so the dq pass's lanes and the blocks of
// both walks give the same bits (Backward's two schedules); subnormal bf16 inputs count as 0.
//   lane_line_scores_bf16: lane_line_scores with qt [pairs][kLanes], k [pairs][ld], gt
//     [value_pairs][kLanes], v [value_pairs][ld];
//   lane_line_scores_pair_bf16: lane_line_scores_pair with qt, gt [pairs][2 * kLanes], k, v
//     [pairs][ld];
//   block_dot_bf16: block_dot with a's rows and bt's panel rows in pairs (lda, ldb in 32-bit
//     elements, `pairs` depth pairs).
void lane_line_scores_bf16(const float* qt, int64_t pairs, const float* k, const float* gt,
                           int64_t value_pairs, const float* v, int64_t ld, int64_t offsets,
                           float* s, float* dp);
void lane_line_scores_pair_bf16(const float* qt, const float* gt, int64_t pairs, const float* k,
                                const float* v, int64_t ld, int64_t offsets,
                                const LaneHalf* halves);
void block_dot_bf16(const float* a, int64_t lda, const float* bt, int64_t ldb, int64_t pairs,
                    float* s);

// The backward's dk += dS^T Q and dv += P^T dO on bf16 products (avx512bf16 level only), as
// sums over pairs of queries: positions 2m, 2m + 1 of a group (a dq-pass tile's rows 2i, 2i + 1;
// tiles start at multiples of kRows), so that both walks pair the same queries and every
// accumulator row sees the same chain of vdpbf16ps, pair by pair in ascending position (the
// backward's two schedules). P and dS enter rounded to bf16 (nearest even), as in the
// tensor-core kernels; q and dO are bf16 already.
//   accumulate_pairs_bf16: o[k * ldo + w] = vdpbf16ps chain over m < pairs of the pair
//     pp[k * key_step + m * pair_step] (P or dS of queries 2m, 2m + 1 for output row k) and
//     b[m * ldb + w] (the pair of q or dO rows 2m, 2m + 1 at column w), for k < keys, w < width;
//     b's rows hold whole 16-column vectors (zero padded past width). keep (or null): a 32-bit
//     mask per (k, m), keep[k * pairs + m], that selects the halves of b taken (0xffff: the
//     first query only), so that a non-finite q or dO row reaches only its own keys. Keys are
//     computed in groups of up to 8: pp must be readable for kPairsSlack more keys past the
//     last (their sums are dropped). Layouts: (key_step, pair_step, pairs) = (kLanes / 2,
//     1 - kLanes, kLanes / 2) (lane_pairs_bf16), (1, kCols, kRows / 2) (block_row_pairs_bf16),
//     (kCols / 2, 1, any) (block_col_pairs_bf16, the only one with keep) and, for dq += dS K
//     with the output rows the queries and pairs of keys, (1 - kLanes, 2 * kLanes, any)
//     (lane_key_pairs_bf16).
//   lane_pairs_bf16: the pairs of one line of the dq pass's lane layout s (lane r at offset u =
//     the key at position base + u + r): pp[u * 4 + i] = (s[u * kLanes + 2i], s[(u - 1) *
//     kLanes + 2i + 1]), rows 2i and 2i + 1 at the key of position base + u + 2i, for u_begin <=
//     u < u_end; s is read at offsets u_begin - 1 .. u_end - 1.
//   block_row_pairs_bf16: pp[i * kCols + c] = (p[2i][c], p[2i + 1][c]) of a kRows x kCols block
//     (rows are queries: the dq pass's blocks).
//   block_col_pairs_bf16: pp[r * kCols / 2 + m] = (p[r][2m], p[r][2m + 1]) (columns are queries:
//     the key-side walk's blocks).
constexpr int64_t kPairsSlack = 8;
void accumulate_pairs_bf16(const float* pp, int64_t key_step, int64_t pair_step, int64_t keys,
                           int64_t pairs, const float* b, int64_t ldb, int64_t width, float* o,
                           int64_t ldo, const uint32_t* keep);
// accumulate_pairs_bf16 over two tiles' lane pairs (lane_pairs_bf16) at once: for key k the
// kLanes / 2 pairs of pp (key_step kLanes / 2, pair_step 1 - kLanes) and then those of pp2, with
// b's rows 0 .. kLanes - 1 (the first tile's query pairs, then the second's): the chain of two
// accumulate_pairs_bf16 calls, one load and store of each output row.
void accumulate_pairs2_bf16(const float* pp, const float* pp2, int64_t keys, const float* b,
                            int64_t ldb, int64_t width, float* o, int64_t ldo);
void lane_pairs_bf16(const float* s, int64_t u_begin, int64_t u_end, float* pp);
void block_row_pairs_bf16(const float* p, float* pp);
// lane_key_pairs_bf16: dS of the dq pass's lane layout as pairs of consecutive offsets of each
// lane: pp[u * kLanes + r] = (s[u * kLanes + r], s[(u + 1) * kLanes + r]) for u_begin <= u <
// u_end (lane r, keys base + u + r and the next); row r's pair of keys 2m, 2m + 1 is at u = 2m -
// base - r.
void lane_key_pairs_bf16(const float* s, int64_t u_begin, int64_t u_end, float* pp);
void block_col_pairs_bf16(const float* p, float* pp);

// block_backward_probs (dq orientation) on one line of lane scores s (S) and dp (dP): lane r of
// offset u is the key at position base + u + r, in the query's window when lo[r] <= it < hi[r].
// s becomes P = exp(scale * S - lse[r]) and dp dS = P * (dP - delta[r]), both 0 outside the
// window, rounded as block_backward_probs rounds them. Only where lane_kernels_available().
void lane_line_probs(float* s, float* dp, int64_t offsets, int64_t base, const int32_t* lo,
                     const int32_t* hi, float scale, const float* lse, const float* delta);

}  // namespace nattn::cpu
