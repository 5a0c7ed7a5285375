// Fused CPU backward: dq, dk, dv (and d_add_k, d_add_v) of neighborhood attention on tiles
// (cpu_tiles.h), recomputing P = exp(S - lse) per chunk:
//   dP = dO V^T,  dS = P * (dP - delta),  delta = rowsum(dO * O) - d_lse,
//   dq = scale dS K,  dk = scale dS^T Q,  dv = P^T dO.
// Every gradient row has one owner at a time (no atomics) and every sum a fixed order, so the
// result is deterministic and the same for any thread count; the two schedules that achieve it
// (one thread per (batch, kv head) group, or all threads per group) are described at Backward.
#include <algorithm>
#include <cmath>
#include <functional>
#include <limits>
#include <mutex>
#include <type_traits>
#include <vector>

#include "cpu/cpu_common.h"
#include "cpu/cpu_kernels.h"
#include "cpu/cpu_tiles.h"

namespace nattn::cpu {
namespace {

// d_add_k/d_add_v sum over every query of a kv-head group; the queries are cut into parts of at
// least this many so that the work of one additional token spreads over threads. The parts depend
// only on the problem shape and their partial sums are added in part order: deterministic.
constexpr int64_t kAdditionalPartQueries = 1024;

// Zero window offsets kept on either side of the dq pass's lane scores (dq_tile): the block reads
// of the accumulations reach kRows - 1 past either end, the bf16 key pairs kRows + 1 (Backward::
// lane_pad_).
constexpr int64_t kLanePad = kRows;
constexpr int64_t kLanePadBf16 = kRows + 2;

// store_key_block asks for the output rows this many tokens ahead of the one it stores.
constexpr int64_t kStorePrefetchRows = 4;
// store_key_row scales dk in pieces of this many elements.
constexpr int64_t kMaxStoreWidth = 256;

// Most memory the fused schedule's per-thread group storage may take (bytes, all threads).
constexpr int64_t kFusedStorageBudget = int64_t{1} << 30;
// The group storage (packed lines, accumulators) a thread keeps from one backward call to the
// next when it takes at most this many bytes (Backward::cached_storage).
constexpr int64_t kCachedStorageBudget = int64_t{64} << 20;

// d_rpb sums dS over every (batch, query) pair: each head's query tiles are cut into at most this
// many parts of consecutive dq-pass items, each part summed in item order into its own partial
// table by one thread, and the partials added in (batch, part) order at the end. The parts depend
// only on the problem shape, so d_rpb is the same for any thread count, with no atomics; 32 parts
// per head keep 2-16 threads busy when a group is split over them.
constexpr int64_t kRpbPartsPerHead = 32;
// Most memory the d_rpb partial tables may take (bytes); fewer parts past it.
constexpr int64_t kRpbPartialBudget = int64_t{1} << 28;

// sum_w a[w] * b[w] in kLanes interleaved partial sums and a pairwise tree: vectorizable
// (a single running sum is a chain of dependent adds the compiler may not reorder) and in a
// fixed order.
template <typename A>
A dot_fixed_order(const A* a, const A* b, int64_t n) {
  constexpr int kLanes = 16;
  A part[kLanes] = {};
  int64_t w0 = 0;
  for (; w0 + kLanes <= n; w0 += kLanes) {
    for (int j = 0; j < kLanes; ++j) part[j] += a[w0 + j] * b[w0 + j];
  }
  for (int j = 0; w0 + j < n; ++j) part[j] += a[w0 + j] * b[w0 + j];
  for (int half = kLanes / 2; half >= 1; half /= 2) {
    for (int j = 0; j < half; ++j) part[j] += part[j + half];
  }
  return part[0];
}

template <typename A>
struct BackwardScratch {
  std::vector<A> a, b, acc_a, acc_b, s, dp;
  // bf16 products (Backward::bf16_): a and b as bf16 pairs, the operands of block_dot_bf16;
  // query pairs of rows (interleave_pairs: of the dq pass's tile, or of a key-side chunk's
  // queries) and the P and dS pairs of accumulate_pairs_bf16, with the keep masks of a
  // contained chunk.
  std::vector<A> a_pairs, b_pairs, a_inter, b_inter, pp_s, pp_d, pp_q;
  std::vector<uint32_t> keep;
  // A pair unit's first tile (dq_tile: `defer`) leaves its dk/dv terms to the second: its P and
  // dS pairs per window line (pend_s, pend_d: pend_slot elements per line, lane_pairs_bf16 from
  // offset 1 - kRows) and its key span [pend_lo, pend_hi) and lane base; its query pairs stay in
  // rows 0 .. kRows / 2 - 1 of a_inter, b_inter.
  std::vector<A> pend_s, pend_d;
  bool pend_valid = false;
  int64_t pend_slot = 0, pend_lo = 0, pend_hi = 0, pend_base = 0;
  // The dq pass lanes (dq_tile): a, b transposed, and one line's S and dP (then P, dS) per offset.
  std::vector<A> at, bt, s_lanes, dp_lanes;
  // Pairs (dq_tile): the next tile's q and dO rows, both tiles transposed side by side, and the
  // next tile's lane scores of every key line, computed with this tile's.
  std::vector<A> a_next, b_next, at_pair, bt_pair, next_s, next_dp;
  bool next_valid = false;        // next_s, next_dp hold the scores of the tile next_key names
  int64_t next_key[5] = {};       // (h, x0, x1, group, j0)
  int64_t next_slot = 0;          // entries per key line in next_s, next_dp
  explicit BackwardScratch(const AttentionParams& p)
      : a(kRows * p.head_dim),
        b(kRows * p.value_dim),
        acc_a(kRows * p.head_dim),
        acc_b(kRows * p.value_dim),
        s(kRows * kCols),
        dp(kRows * kCols) {}
};

// The two score products of a chunk, S = a bt and dP = g gt (block_dot); with pairs (bf16
// scores: a_pairs, g_pairs the rows as bf16 pairs, bt, gt panels of pairs) on bf16 products
// (block_dot_bf16).
template <typename A>
void chunk_scores(const AttentionParams& p, const A* a, const A* g, const A* a_pairs,
                  const A* g_pairs, const A* bt, const A* gt, int64_t ld, A* s, A* dp) {
  if constexpr (std::is_same_v<A, float>) {
    if (a_pairs != nullptr) {
      block_dot_bf16(a_pairs, p.head_dim / 2, bt, ld, p.head_dim / 2, s);
      block_dot_bf16(g_pairs, p.value_dim / 2, gt, ld, p.value_dim / 2, dp);
      return;
    }
  }
  block_dot(a, p.head_dim, bt, ld, p.head_dim, s);
  block_dot(g, p.value_dim, gt, ld, p.value_dim, dp);
}

// One chunk of the dq pass: the tile's rows (q, dO; per-row lse, delta) against n keys.
// With bias (BiasTable::chunk, rows step -1), the scores get the relative bias and d_bias (laid
// out the same way) receives dS. `contained`: dS K restricted to each row's keys
// (block_accumulate_spans), for a tile recomputed because its dq came out non-finite.
// q_pairs, do_pairs: null, or q and d_out as bf16 pairs with kt, vt panels of pairs
// (chunk_scores).
template <typename A>
void dq_chunk(const AttentionParams& p, const A* q, const A* d_out, const A* q_pairs,
              const A* do_pairs, const A* kt, const A* vt, int64_t ld, const A* k_rows,
              int64_t k_step, int64_t n, const int64_t* clo, const int64_t* chi, const A* lse,
              const A* delta, A* dq, A* s, A* dp, const A* bias, A* d_bias, bool contained) {
  static constexpr A kZeros[kCols] = {};
  A scale = static_cast<A>(p.scale);
  chunk_scores(p, q, d_out, q_pairs, do_pairs, kt, vt, ld, s, dp);
  if (bias != nullptr) {
    block_add_bias(s, scale, bias, -1);
    scale = A(1);
  }
  block_backward_probs(s, dp, clo, chi, scale, lse, kZeros, delta, kZeros, dp);
  // Masked entries of dS are exactly 0 (P = exp(-inf)), so the whole block may be added.
  if (d_bias != nullptr) block_add_bias_grad(dp, d_bias, -1);
  if (contained) {
    block_accumulate_spans(dp, clo, chi, k_rows, k_step, p.head_dim, dq, p.head_dim);
  } else {
    block_accumulate(dp, n, k_rows, k_step, p.head_dim, dq, p.head_dim, clo, chi);
  }
}

// One chunk of the dk/dv pass: the tile's key rows (k, v) against n queries (panels qt, dot;
// rows q, dO; per-query lse, delta); bias from the reversed BiasTable lines, or null.
// `contained`: P^T dO and dS^T Q restricted to each key's queries (block_accumulate_spans).
// (bf16 products: Backward::dkdv_chunk_bf16.)
template <typename A>
void dkdv_chunk(const AttentionParams& p, const A* k, const A* v, const A* qt, const A* dot,
                int64_t ld, const A* q_rows, int64_t q_step, const A* do_rows, int64_t do_step,
                int64_t n, const int64_t* clo, const int64_t* chi, const A* lse, const A* delta,
                A* dk, A* dv, A* s, A* dp, const A* bias, bool contained) {
  static constexpr A kZeros[kRows] = {};
  A scale = static_cast<A>(p.scale);
  block_dot(k, p.head_dim, qt, ld, p.head_dim, s);
  if (bias != nullptr) {  // the same values as the dq orientation: P, dS stay bit-identical
    block_add_bias(s, scale, bias, -1);
    scale = A(1);
  }
  block_dot(v, p.value_dim, dot, ld, p.value_dim, dp);
  block_backward_probs(s, dp, clo, chi, scale, kZeros, lse, kZeros, delta, dp);
  if (contained) {
    block_accumulate_spans(s, clo, chi, do_rows, do_step, p.value_dim, dv, p.value_dim);
    block_accumulate_spans(dp, clo, chi, q_rows, q_step, p.head_dim, dk, p.head_dim);
  } else {
    block_accumulate(s, n, do_rows, do_step, p.value_dim, dv, p.value_dim, clo, chi);
    block_accumulate(dp, n, q_rows, q_step, p.head_dim, dk, p.head_dim, clo, chi);
  }
}

// Everything one (batch, kv head) group needs: its packed operands, the gradient accumulators
// and per-thread scratch. Reused across groups; one per thread when groups run in parallel.
template <typename A>
struct GroupStorage {
  std::vector<A> k_store, v_store, k_rows_store, v_rows_store, q_store, do_store, q_rows_store,
      do_rows_store, add_kt, add_vt, add_k_rows, add_v_rows, dk_acc, dv_acc, add_partial,
      k_inter_store;
  std::vector<BackwardScratch<A>> scratch;
  std::vector<ForwardScratch<A>> fwd_scratch;
  int64_t capacity_bytes() const {
    size_t n = 0;
    for (const std::vector<A>* v :
         {&k_store, &v_store, &k_rows_store, &v_rows_store, &q_store, &do_store, &q_rows_store,
          &do_rows_store, &add_kt, &add_vt, &add_k_rows, &add_v_rows, &dk_acc, &dv_acc,
          &add_partial, &k_inter_store}) {
      n += v->capacity();
    }
    return static_cast<int64_t>(n * sizeof(A));
  }
};

// The two ways to schedule a group, with the same sums in the same order (so the same bits):
//  - split: threads share the group. A dq pass walks each query tile's key windows, then a dk/dv
//    pass walks each key tile's inverse windows (the queries that attend to it), so every
//    gradient row has one owner; P and dS are computed twice (7 block products per chunk pair),
//    and q, dO are packed once more per head for the key-side walk.
//  - fused: one thread owns the group and runs only the dq pass, adding P^T dO and dS^T Q into
//    the group's dv and dk accumulators as it goes (5 block products, nothing packed per head).
//    A key's dk/dv receive their queries in the order the key-side walk visits them (heads,
//    then query lines ascending, then positions), one fused multiply-add at a time (bf16
//    products: one pair of queries at a time, paired alike in both walks), and P, dS come out
//    bit-identical in either orientation (block_backward_probs), so both schedules give the
//    same result.
template <typename T>
class Backward {
  using A = typename ComputeType<T>::type;

 public:
  explicit Backward(const AttentionParams& p)
      : p_(p),
        geo_(p),
        tiles_(last_axis_tiles(geo_)),
        n_tiles_(static_cast<int64_t>(tiles_.size())),
        n_x01_(geo_.len[0] * geo_.len[1]),
        D_(p.head_dim),
        Dv_(p.value_dim),
        M_(p.num_additional),
        hpk_(p.heads_per_kv()),
        lines_per_part_(std::max<int64_t>(
            1, (kAdditionalPartQueries + geo_.group_max - 1) / geo_.group_max)),
        n_parts_((geo_.lines + lines_per_part_ - 1) / lines_per_part_),
        m_tiles_((M_ + kRows - 1) / kRows),
        partial_size_(kRows * (D_ + Dv_)),
        dq_lanes_(std::is_same_v<A, float> && !p.has_rpb() && lane_kernels_available()),
        dq_pairs_(dq_lanes_ && D_ == Dv_ && lane_pair_available()),
        bf16_(use_bf16_products(p)),
        kw_(bf16_ ? D_ / 2 : D_),
        vw_(bf16_ ? Dv_ / 2 : Dv_),
        lane_pad_(bf16_ ? kLanePadBf16 : kLanePad),
        stream_dq_(streamable(p.dq.data, p.dq.stride, 6, sizeof(T))),
        stream_dk_(streamable(p.dk.data, p.dk.stride, 6, sizeof(T))),
        stream_dv_(streamable(p.dv.data, p.dv.stride, 6, sizeof(T))) {
    if (p_.has_rpb()) setup_rpb();
    plan_key_ring();
    for (const AxisTile& t : tiles_) plans_.push_back(plan_tile(t));
    all_lanes_ = dq_lanes_ && std::all_of(plans_.begin(), plans_.end(),
                                          [](const TilePlan& t) { return t.lanes; });
    if (dq_pairs_) {  // units of two consecutive tiles of one group (run_group)
      for (int64_t t = 0; t < n_tiles_; ++t) {
        pair_starts_.push_back(t);
        if (t + 1 < n_tiles_ && tiles_[t + 1].group == tiles_[t].group) ++t;
      }
    }
  }

  void run() {
    const int nt = resolve_num_threads(p_);
    compute_row_stats(nt);
    const int64_t groups = p_.batch * p_.kv_heads;
    const bool fused = use_fused(nt, groups);
    std::vector<GroupStorage<A>>& storage = cached_storage();
    const size_t sets = fused ? static_cast<size_t>(std::min<int64_t>(nt, groups)) : 1;
    if (storage.size() < sets) storage.resize(sets);
    for (GroupStorage<A>& st : storage) {  // sized by the call's dimensions
      st.scratch.clear();
      st.fwd_scratch.clear();
    }
    if (fused) {
      parallel_for(nt, groups, [&](int64_t g, int thread) {
        run_group(g / p_.kv_heads, g % p_.kv_heads, 1, true, storage[thread]);
      });
    } else {
      for (int64_t g = 0; g < groups; ++g) {
        run_group(g / p_.kv_heads, g % p_.kv_heads, nt, false, storage[0]);
      }
    }
    if (p_.has_rpb()) store_d_rpb(nt);
    int64_t bytes = 0;
    for (const GroupStorage<A>& st : storage) bytes += st.capacity_bytes();
    if (bytes > kCachedStorageBudget) storage.clear();
  }

  // The calling thread's group storage, kept across calls (up to kCachedStorageBudget): every
  // buffer in it is resized or filled before use, and a training loop's backward then reuses
  // its pages instead of faulting in fresh ones each step (glibc returns freed buffers of this
  // size to the system).
  static std::vector<GroupStorage<A>>& cached_storage() {
    thread_local std::vector<GroupStorage<A>> storage;
    return storage;
  }

 private:
  // Whether the products run on bf16 pairs (block_kernels.h: lane_line_scores_bf16,
  // block_dot_bf16, accumulate_pairs_bf16; sums in fp32): bf16 inputs at the avx512bf16 level,
  // even head_dim and value_dim, no additional tokens or rpb, and q, k, v, dO strides that keep
  // each pair of depth indices (2j, 2j + 1) one 32-bit unit (any layout with contiguous,
  // even-sized heads). The forward's lanes (use_bf16_pairs) compute the same scores.
  static bool use_bf16_products(const AttentionParams& p) {
    if (!std::is_same_v<T, BFloat16> || p.head_dim % 2 != 0 || p.value_dim % 2 != 0 ||
        p.num_additional > 0 || p.has_rpb()) {
      return false;
    }
    for (const TensorRef<6>* t : {&p.q, &p.k, &p.v, &p.d_out}) {
      if (t->stride[5] != 1) return false;
      for (int d = 0; d < 5; ++d) {
        if (t->stride[d] % 2 != 0) return false;
      }
    }
    return lane_bf16_available();
  }

  // pack_lines of head `head` of a q, k, v or dO tensor (width elements per row): fp32, or with
  // bf16_ the rows read as width / 2 bf16 pairs (use_bf16_products: the strides allow it).
  const A* pack_operand(const TensorRef<6>& t, int64_t b, int64_t head, int64_t width, int nt,
                        std::vector<A>& storage) const {
    if constexpr (std::is_same_v<T, BFloat16>) {
      if (bf16_) {
        const int64_t pair_stride[6] = {t.stride[0] / 2, t.stride[1] / 2, t.stride[2] / 2,
                                        t.stride[3] / 2, t.stride[4] / 2, 1};
        return pack_lines(static_cast<const BF16Pair*>(t.data), pair_stride, b, head, 1,
                          width / 2, geo_, nt, storage);
      }
    }
    return pack_lines(static_cast<const T*>(t.data), t.stride, b, head, 1, width, geo_, nt,
                      storage);
  }

  // bf16_: the tile rows in s.a (width D_) and s.b (Dv_) as bf16 pairs into s.a_pairs, s.b_pairs.
  void tile_pairs(BackwardScratch<A>& s) const {
    if constexpr (std::is_same_v<A, float>) {
      s.a_pairs.resize(s.a.size() / 2);
      s.b_pairs.resize(s.b.size() / 2);
      bf16_pairs_of(s.a.data(), static_cast<int64_t>(s.a_pairs.size()), s.a_pairs.data());
      bf16_pairs_of(s.b.data(), static_cast<int64_t>(s.b_pairs.size()), s.b_pairs.data());
    }
  }

  // Fused groups need one thread per group: worth it when the groups keep the threads about as
  // busy as splitting each group would (the split schedule does 7/5 of the work, so a last round
  // of groups that leaves threads idle may cost up to that much) and their storage (one set per
  // thread) stays within a budget.
  bool use_fused(int nt, int64_t groups) const {
    if (nt <= 1) return true;
    const int64_t rounds = (groups + nt - 1) / nt;
    if (groups < nt || 5 * rounds * nt > 7 * groups) return false;
    const int64_t per_group =
        static_cast<int64_t>(sizeof(A)) *
        ((D_ + Dv_) * (geo_.lines * geo_.ld + 2 * geo_.tokens()));
    return per_group * nt <= kFusedStorageBudget;
  }

  // The bias tables, and the shape-only cut of each head's dq items into d_rpb parts.
  void setup_rpb() {
    bias_ = BiasTable<A>(p_, static_cast<const T*>(p_.rpb.data), true);
    const int64_t per_head = n_x01_ * n_tiles_;
    const int64_t per_part_bytes =
        p_.batch * p_.heads * bias_.head_size() * static_cast<int64_t>(sizeof(A));
    const int64_t max_parts = std::max<int64_t>(
        1, std::min(kRpbPartsPerHead, kRpbPartialBudget / std::max<int64_t>(1, per_part_bytes)));
    rpb_items_per_part_ = (per_head + max_parts - 1) / max_parts;
    rpb_parts_ = (per_head + rpb_items_per_part_ - 1) / rpb_items_per_part_;
    rpb_partial_.assign(
        static_cast<size_t>(p_.batch * p_.heads * rpb_parts_ * bias_.head_size()), A(0));
  }

  A* rpb_partial(int64_t b, int64_t h, int64_t part) {
    return rpb_partial_.data() + ((b * p_.heads + h) * rpb_parts_ + part) * bias_.head_size();
  }

  // d_rpb[h, b0, b1, t] = the partials summed in (batch, part) order, one thread per entry.
  void store_d_rpb(int nt) {
    T* out = static_cast<T*>(p_.d_rpb.data);
    const int64_t* st = p_.d_rpb.stride;
    const int64_t lines = bias_.extent[0] * bias_.extent[1];
    parallel_for(nt, p_.heads * lines, [&](int64_t item, int) {
      const int64_t h = item / lines, b01 = item % lines;
      const int64_t b0 = b01 / bias_.extent[1], b1 = b01 % bias_.extent[1];
      const int64_t at = bias_.lines_offset(0, b0, b1) + BiasTable<A>::kPad;
      for (int64_t t = 0; t < bias_.extent[2]; ++t) {
        A sum = 0;
        for (int64_t b = 0; b < p_.batch; ++b) {
          for (int64_t part = 0; part < rpb_parts_; ++part) sum += rpb_partial(b, h, part)[at + t];
        }
        out[h * st[0] + b0 * st[1] + b1 * st[2] + t * st[3]] = from_compute<T>(sum);
      }
    });
  }

  int64_t stats_line(int64_t b, int64_t h, int64_t line) const {
    return ((b * p_.heads + h) * geo_.lines + line) * geo_.ld;
  }

  // delta = rowsum(dO * O) - d_lse into p.delta (fp32) and, with the stored lse, into per-row
  // compute-type stats laid out like the packed lines ([b][h][line][t], zero padded to ld), so
  // that a chunk of kCols queries reads them contiguously. The stored lse is fp32; fp64
  // recomputes it per group so that fp64 gradients keep fp64 accuracy.
  // Items are (batch, x0, x1) with the heads innermost, so that a heads-last O and dO are read
  // in memory order (per-head items read one row in every `heads`, a strided stream that costs
  // about twice the time at 4 heads).
  void compute_row_stats(int nt) {
    row_lse_.assign(static_cast<size_t>(p_.batch * p_.heads * geo_.lines * geo_.ld), A(0));
    row_delta_.assign(row_lse_.size(), A(0));
    const T* out = static_cast<const T*>(p_.out.data);
    const T* d_out = static_cast<const T*>(p_.d_out.data);
    parallel_for(nt, p_.batch * n_x01_, [&](int64_t item, int) {
      const int64_t b = item / n_x01_, x01 = item % n_x01_;
      std::vector<A> o_row(static_cast<size_t>(Dv_)), do_row(static_cast<size_t>(Dv_));
      for (int64_t x2 = 0; x2 < geo_.len[2]; ++x2) {
        const int64_t x[3] = {x01 / geo_.len[1], x01 % geo_.len[1], x2};
        const int64_t line = geo_.line(x[0], x[1], x2 % geo_.dilation);
        for (int64_t h = 0; h < p_.heads; ++h) {
          load_row(out + token_offset(p_.out.stride, b, x) + h * p_.out.stride[4],
                   p_.out.stride[5], Dv_, o_row.data());
          load_row(d_out + token_offset(p_.d_out.stride, b, x) + h * p_.d_out.stride[4],
                   p_.d_out.stride[5], Dv_, do_row.data());
          A dl = dot_fixed_order(o_row.data(), do_row.data(), Dv_);
          if (p_.d_lse.data != nullptr) {  // lse is an output too: d lse_i / d s_ij = P_ij
            dl -= static_cast<const float*>(
                p_.d_lse.data)[token_offset(p_.d_lse.stride, b, x) + h * p_.d_lse.stride[4]];
          }
          static_cast<float*>(p_.delta.data)[token_offset(p_.delta.stride, b, x) +
                                             h * p_.delta.stride[4]] = static_cast<float>(dl);
          const int64_t at = stats_line(b, h, line) + x2 / geo_.dilation;
          row_delta_[at] = dl;
          row_lse_[at] = static_cast<const float*>(
              p_.lse.data)[token_offset(p_.lse.stride, b, x) + h * p_.lse.stride[4]];
        }
      }
    });
  }

  // A group's key rows (make_rows): ready in `rows`, or made by `build` on the first get(), once
  // for all threads.
  struct KeyRows {
    Rows<A> rows{};
    std::function<Rows<A>()> build;
    std::once_flag once;
    const Rows<A>& get() {
      if (build) std::call_once(once, [this] { rows = build(); });
      return rows;
    }
  };

  // Gradients of kv head kvh of batch b and of its query heads, on nt threads (split) or on the
  // calling thread (fused, nt = 1).
  void run_group(int64_t b, int64_t kvh, int nt, bool fused, GroupStorage<A>& st) {
    const T* v = static_cast<const T*>(p_.v.data);
    if (st.scratch.size() < static_cast<size_t>(nt)) {
      st.scratch.assign(static_cast<size_t>(nt), BackwardScratch<A>(p_));
    }
    // bf16 products with every tile on lanes read the key rows only to recompute a non-finite
    // tile (dq_tile): built then (KeyRows), and the key pairs below come from k itself.
    const bool lazy_rows = bf16_ && dq_lanes_ && all_lanes_;
    const A* k_lines = pack_operand(p_.k, b, kvh, D_, nt, st.k_store);
    KeyRows k_rows;
    if (lazy_rows) {
      k_rows.build = [this, b, kvh, &st] {
        return make_rows(static_cast<const T*>(p_.k.data), p_.k.stride, b, kvh, 1, D_, geo_, 1,
                         st.k_rows_store);
      };
    } else {
      k_rows.rows = make_rows(static_cast<const T*>(p_.k.data), p_.k.stride, b, kvh, 1, D_, geo_,
                              nt, st.k_rows_store);
    }
    const A* v_lines = pack_operand(p_.v, b, kvh, Dv_, nt, st.v_store);
    // bf16 products on lanes: the key rows of each line as pairs of positions 2m, 2m + 1, the
    // operand of dq += dS K (dq_tile); zero rows past the line's end.
    const A* k_inter = nullptr;
    if constexpr (std::is_same_v<A, float>) {
      if (bf16_ && dq_lanes_) {
        const int64_t per_line = k_inter_line();
        st.k_inter_store.resize(static_cast<size_t>(geo_.lines * per_line));
        parallel_for(nt, geo_.lines, [&](int64_t line, int) {
          const int64_t g = line % geo_.dilation, x01 = line / geo_.dilation;
          const int64_t x0 = x01 / geo_.len[1], x1 = x01 % geo_.len[1];
          const int64_t n = group_length(geo_.len[2], geo_.dilation, g);
          A* out = st.k_inter_store.data() + line * per_line;
          const int64_t valid = (n + 1) / 2;
          if (lazy_rows) {  // bf16_: contiguous elements (use_bf16_products)
            const BFloat16* first = reinterpret_cast<const BFloat16*>(p_.k.data) +
                                    b * p_.k.stride[0] + x0 * p_.k.stride[1] +
                                    x1 * p_.k.stride[2] + g * p_.k.stride[3] +
                                    kvh * p_.k.stride[4];
            interleave_pairs_bf16(first, geo_.dilation * p_.k.stride[3], n, valid, D_, ld16(D_),
                                  out);
          } else {
            const A* first = k_rows.rows.line(0, x0, x1, g);
            interleave_pairs(first, geo_.dilation * k_rows.rows.s[2], n, valid, D_, ld16(D_),
                             out);
          }
          std::fill(out + valid * ld16(D_), out + per_line, A(0));
        });
        k_inter = st.k_inter_store.data();
      }
    }
    if (M_ > 0) {
      const T* ak = static_cast<const T*>(p_.add_k.data);
      const T* av = static_cast<const T*>(p_.add_v.data);
      pack_additional_transposed(ak, p_.add_k.stride, b, kvh, M_, D_, st.add_kt);
      pack_additional_transposed(av, p_.add_v.stride, b, kvh, M_, Dv_, st.add_vt);
      pack_additional_rows(ak, p_.add_k.stride, b, kvh, M_, D_, st.add_k_rows);
      pack_additional_rows(av, p_.add_v.stride, b, kvh, M_, Dv_, st.add_v_rows);
    }
    const int64_t per_head = n_x01_ * n_tiles_;

    if constexpr (std::is_same_v<A, double>) {
      if (st.fwd_scratch.size() < static_cast<size_t>(nt)) {
        st.fwd_scratch.assign(static_cast<size_t>(nt), ForwardScratch<A>(p_));
      }
      // Value rows: only this forward recomputation reads them.
      const Rows<A> v_rows =
          make_rows(v, p_.v.stride, b, kvh, 1, Dv_, geo_, nt, st.v_rows_store);
      const ForwardKeys<A> keys{k_lines, v_rows, st.add_kt.data(), st.add_v_rows.data(),
                                p_.has_rpb() ? &bias_ : nullptr};
      forward_tiles<T>(p_, geo_, tiles_, b, kvh, keys, st.fwd_scratch, nt, false,
                       [&](int64_t h, int64_t x0, int64_t x1, const AxisTile& tile,
                           const A*, const A* tile_lse) {
                         A* dst = row_lse_.data() +
                                  stats_line(b, h, geo_.line(x0, x1, tile.group)) + tile.j0;
                         std::copy(tile_lse, tile_lse + tile.count, dst);
                       });
    }

    // dk, dv are summed over the group's heads (head by head, in order) in compute-type
    // accumulators; d_add_k/d_add_v per (tile of additional tokens, part of the query lines)
    // into partial sums.
    // Fused with one query head per kv head (KeyRing): only the key blocks the dq pass is still
    // adding into have accumulators, zeroed when it reaches them and stored when it is done.
    const bool ring = fused && ring_.slots > 0;
    const int64_t block_rows = ring ? ring_.slots * geo_.len[2] : geo_.tokens();
    if (ring) {
      st.dk_acc.resize(static_cast<size_t>(block_rows * D_));
      st.dv_acc.resize(static_cast<size_t>(block_rows * Dv_));
    } else {
      st.dk_acc.assign(static_cast<size_t>(block_rows * D_), A(0));
      st.dv_acc.assign(static_cast<size_t>(block_rows * Dv_), A(0));
    }
    std::vector<int64_t> bad_key_tiles;  // ring: key tiles stored with a non-finite row
    st.add_partial.assign(static_cast<size_t>(m_tiles_ * n_parts_ * partial_size_), A(0));

    // dq: per query tile over its key windows, then the additional keys; fused, dk/dv on the
    // way (items in order on this thread: heads, then query lines, then positions).
    KeyGradients kg{st.dk_acc.data(), st.dv_acc.data(), st.add_partial.data(),
                    ring ? ring_.slot.data() : nullptr};
    struct Item {
      int64_t h, x0, x1;
      const AxisTile* tile;
    };
    const auto decode = [&](int64_t item) {
      const int64_t x01 = (item % per_head) / n_tiles_;
      return Item{kvh * hpk_ + item / per_head, x01 / geo_.len[1], x01 % geo_.len[1],
                  &tiles_[item % n_tiles_]};
    };
    auto dq_item = [&](int64_t item, int thread, A* d_bias, const AxisTile* pair_next) {
      const Item it = decode(item);
      if (item + 1 < hpk_ * per_head) {  // this thread's next item, in the usual case
        const Item next = decode(item + 1);
        prefetch_tile<false>(static_cast<const T*>(p_.q.data), p_.q.stride, b, next.h, next.x0,
                             next.x1, *next.tile, geo_, D_);
        prefetch_tile<false>(static_cast<const T*>(p_.d_out.data), p_.d_out.stride, b, next.h,
                             next.x0, next.x1, *next.tile, geo_, Dv_);
        if (!stream_dq_) {  // plain stores: ask for the lines in exclusive state
          prefetch_tile<true>(static_cast<const T*>(p_.dq.data), p_.dq.stride, b, next.h,
                              next.x0, next.x1, *next.tile, geo_, D_);
        }
      }
      // ring: the items run in order on this thread (fused), a query position's tiles together
      const int64_t t = item % n_tiles_, x01 = item % per_head / n_tiles_;
      if (ring && t == 0) open_key_blocks(x01, st);
      dq_tile(b, it.h, it.x0, it.x1, *it.tile, k_lines, v_lines, k_rows, k_inter, st,
              st.scratch[thread], fused ? &kg : nullptr, d_bias, pair_next);
      if (ring && t == n_tiles_ - 1) close_key_blocks(b, kvh, x01, st, bad_key_tiles);
    };
    if (p_.has_rpb()) {
      // Items in d_rpb parts (setup_rpb): the same items in the same order on one thread (fused).
      parallel_for(nt, hpk_ * rpb_parts_, [&](int64_t unit, int thread) {
        const int64_t hh = unit / rpb_parts_, part = unit % rpb_parts_;
        A* d_bias = rpb_partial(b, kvh * hpk_ + hh, part);
        const int64_t end = std::min(per_head, (part + 1) * rpb_items_per_part_);
        for (int64_t i = part * rpb_items_per_part_; i < end; ++i) {
          dq_item(hh * per_head + i, thread, d_bias, nullptr);
        }
      });
    } else if (dq_pairs_) {
      // Units of a tile and the next of its query line, on one thread: the second's lane scores
      // come with the first's (dq_tile). The items keep their order.
      const int64_t units = static_cast<int64_t>(pair_starts_.size());
      parallel_for(nt, hpk_ * n_x01_ * units, [&](int64_t unit, int thread) {
        const int64_t item = unit / units * n_tiles_ + pair_starts_[unit % units];
        const int64_t t = item % n_tiles_;
        const bool two = t + 1 < n_tiles_ && tiles_[t + 1].group == tiles_[t].group;
        dq_item(item, thread, nullptr, two ? &tiles_[t + 1] : nullptr);
        if (two) dq_item(item + 1, thread, nullptr, nullptr);
      });
    } else {
      parallel_for(nt, hpk_ * per_head, [&](int64_t item, int thread) {
        dq_item(item, thread, nullptr, nullptr);
      });
    }
    if (ring) {
      store_additional_gradients(b, kvh, st);
      if (!bad_key_tiles.empty()) {  // recomputed in full-size accumulators, those rows stored
        st.dk_acc.assign(static_cast<size_t>(geo_.tokens() * D_), A(0));
        st.dv_acc.assign(static_cast<size_t>(geo_.tokens() * Dv_), A(0));
        redo_key_tiles(b, kvh, 1, st, bad_key_tiles);
        for (const int64_t item : bad_key_tiles) {
          const int64_t x01 = item / n_tiles_;
          const AxisTile& tile = tiles_[item % n_tiles_];
          for (int64_t r = 0; r < tile.count; ++r) {
            const int64_t row = x01 * geo_.len[2] + tile.index(geo_, r);
            store_key_row(b, kvh, x01, tile.index(geo_, r), st.dk_acc.data() + row * D_,
                          st.dv_acc.data() + row * Dv_);
          }
        }
        stream_fence();
      }
      return;
    }
    if (fused) {
      store_key_gradients(b, kvh, nt, st);
      return;
    }

    // dk, dv: per key tile over the queries that attend to it.
    const int64_t key_items = n_x01_ * n_tiles_;
    for (int64_t h = kvh * hpk_; h < (kvh + 1) * hpk_; ++h) {
      const HeadQueries hq = head_queries(b, h, nt, st);
      parallel_for(nt, key_items + m_tiles_ * n_parts_, [&](int64_t item, int thread) {
        BackwardScratch<A>& s = st.scratch[thread];
        if (item < key_items) {
          key_tile(b, kvh, item / n_tiles_, tiles_[item % n_tiles_], hq, st, s);
        } else {
          additional_tile((item - key_items) / n_parts_, (item - key_items) % n_parts_, hq, st,
                          s);
        }
      });
    }
    store_key_gradients(b, kvh, nt, st);
  }

  // dk, dv and d_add_k, d_add_v into the outputs. The store checks the accumulator rows it reads
  // (store_dk_dv); only when one is not finite does contain_key_gradients repair them and the
  // rows go out again, so the usual case reads the accumulators once.
  void store_key_gradients(int64_t b, int64_t kvh, int nt, GroupStorage<A>& st) {
    if (store_dk_dv(b, kvh, nt, st)) return;
    contain_key_gradients(b, kvh, nt, st);
    store_dk_dv(b, kvh, nt, st);
  }

  // One query head's operands for the key-side walk.
  struct HeadQueries {
    int64_t h;          // the query head
    const A* lines;     // pack_lines of q
    const A* do_lines;  // pack_lines of dO
    Rows<A> rows;       // q rows
    Rows<A> do_rows;    // dO rows
    const A* lse;       // row stats of this head (stats_line(b, h, 0))
    const A* delta;
  };

  // The group's key-side accumulators, which the fused schedule's dq pass adds into.
  struct KeyGradients {
    A* dk;           // dk_acc: blocks of geo_.len[2] rows, each a key position (x0, x1)'s
    A* dv;           // dv_acc   tokens in order
    A* add_partial;  // d_add_k/d_add_v partial sums
    // The block of key position x01: block[x01] (KeyRing::slot), or x01 itself when null (the
    // rows in token order).
    const int64_t* block = nullptr;
  };

  // Head h's operands for the key-side walk, packed into st.
  HeadQueries head_queries(int64_t b, int64_t h, int nt, GroupStorage<A>& st) const {
    const T* q = static_cast<const T*>(p_.q.data);
    const T* d_out = static_cast<const T*>(p_.d_out.data);
    HeadQueries hq;
    hq.lines = pack_operand(p_.q, b, h, D_, nt, st.q_store);
    hq.do_lines = pack_operand(p_.d_out, b, h, Dv_, nt, st.do_store);
    hq.rows = make_rows(q, p_.q.stride, b, h, 1, D_, geo_, nt, st.q_rows_store);
    hq.do_rows = make_rows(d_out, p_.d_out.stride, b, h, 1, Dv_, geo_, nt, st.do_rows_store);
    hq.h = h;
    hq.lse = row_lse_.data() + stats_line(b, h, 0);
    hq.delta = row_delta_.data() + stats_line(b, h, 0);
    return hq;
  }

  // A non-finite q or dO row multiplies the masked (exactly 0) P and dS entries of every key of
  // its chunks (0 * NaN = NaN), so it may have reached keys outside its inverse window. Every key
  // tile with a non-finite dk or dv row is recomputed from zero by the key-side walk with its sums
  // restricted to each key's queries; the other keys keep their sums. Run only when store_dk_dv
  // found a non-finite row (store_key_gradients).
  void contain_key_gradients(int64_t b, int64_t kvh, int nt, GroupStorage<A>& st) {
    const int64_t key_items = n_x01_ * n_tiles_;
    std::vector<char> bad(static_cast<size_t>(key_items), 0);
    parallel_for(nt, key_items, [&](int64_t item, int) {
      const int64_t block = item / n_tiles_ * geo_.len[2];
      bad[item] = !key_tile_finite(st.dk_acc.data() + block * D_, st.dv_acc.data() + block * Dv_,
                                   tiles_[item % n_tiles_]);
    });
    std::vector<int64_t> redo;
    for (int64_t item = 0; item < key_items; ++item) {
      if (bad[item]) redo.push_back(item);
    }
    redo_key_tiles(b, kvh, nt, st, redo);
  }

  // Whether every dk and dv accumulator row of a key tile is finite; dk_block, dv_block: the rows
  // of its key position (geo_.len[2] tokens in order).
  bool key_tile_finite(const A* dk_block, const A* dv_block, const AxisTile& tile) const {
    for (int64_t r = 0; r < tile.count; ++r) {
      const int64_t x2 = tile.index(geo_, r);
      if (!all_finite(dk_block + x2 * D_, D_) || !all_finite(dv_block + x2 * Dv_, Dv_)) {
        return false;
      }
    }
    return true;
  }

  // The key tiles `redo` (items key_tile numbers: key position * n_tiles_ + tile) recomputed from
  // zero in the token-order accumulators st.dk_acc, st.dv_acc, each key's sums restricted to its
  // queries (contain_key_gradients).
  void redo_key_tiles(int64_t b, int64_t kvh, int nt, GroupStorage<A>& st,
                      const std::vector<int64_t>& redo) {
    if (redo.empty()) return;
    for (const int64_t item : redo) {
      const AxisTile& tile = tiles_[item % n_tiles_];
      const int64_t first = (item / n_tiles_) * geo_.len[2] + tile.index(geo_, 0);
      for (int64_t r = 0; r < tile.count; ++r) {
        const int64_t row = first + r * geo_.dilation;
        std::fill_n(st.dk_acc.data() + row * D_, D_, A(0));
        std::fill_n(st.dv_acc.data() + row * Dv_, Dv_, A(0));
      }
    }
    if (st.scratch.size() < static_cast<size_t>(nt)) {
      st.scratch.assign(static_cast<size_t>(nt), BackwardScratch<A>(p_));
    }
    for (int64_t h = kvh * hpk_; h < (kvh + 1) * hpk_; ++h) {
      const HeadQueries hq = head_queries(b, h, nt, st);
      parallel_for(nt, static_cast<int64_t>(redo.size()), [&](int64_t i, int thread) {
        const int64_t item = redo[static_cast<size_t>(i)];
        key_tile(b, kvh, item / n_tiles_, tiles_[item % n_tiles_], hq, st, st.scratch[thread],
                 true);
      });
    }
  }

  // A query tile's last-axis key spans lo, hi (group positions; 0, 0 past the tile), their union
  // [u_lo, u_hi), and whether its dq pass runs on lanes, with their span (dq_tile).
  struct TilePlan {
    int64_t lo[kRows] = {}, hi[kRows] = {};
    int64_t u_lo = std::numeric_limits<int64_t>::max(), u_hi = 0;
    bool lanes = false;
    LaneSpan span;
  };
  // plan_tile of each of tiles_ (the plan depends on the tile only), made once per call.
  const TilePlan& plan_of(const AxisTile& tile) const {
    return plans_[static_cast<size_t>(&tile - tiles_.data())];
  }
  TilePlan plan_tile(const AxisTile& tile) const {
    TilePlan t;
    for (int r = 0; r < tile.count; ++r) {
      group_span(key_window(p_.axes[2], tile.index(geo_, r)), tile.group, geo_.dilation,
                 &t.lo[r], &t.hi[r]);
      t.u_lo = std::min(t.u_lo, t.lo[r]);
      t.u_hi = std::max(t.u_hi, t.hi[r]);
    }
    if (dq_lanes_ && t.u_hi > t.u_lo) {  // dq_lanes_: fp32 only
      t.span = lane_span(tile, t.lo, t.hi);
      const int64_t block_cols = (t.u_hi - t.u_lo + kCols - 1) / kCols * kCols;
      t.lanes = static_cast<double>(block_cols) >
                kLaneCostRatio * static_cast<double>(t.span.offsets);
    }
    return t;
  }

  // dq of one query tile at (x0, x1) of head h; with kg (fused schedule) also its terms of dk,
  // dv and the additional tokens' partial sums; with d_bias (rpb) its dS into that d_rpb partial
  // table (laid out like the BiasTable of one head). pair_next: the tile of the same query line
  // this thread runs next (dq_pairs_), whose lane scores this call then computes with its own
  // (lane_line_scores_pair) and leaves in s for that call.
  void dq_tile(int64_t b, int64_t h, int64_t x0, int64_t x1, const AxisTile& tile,
               const A* k_lines, const A* v_lines, KeyRows& k_rows, const A* k_inter,
               const GroupStorage<A>& st, BackwardScratch<A>& s, const KeyGradients* kg,
               A* d_bias, const AxisTile* pair_next) {
    const int64_t key[5] = {h, x0, x1, tile.group, tile.j0};
    // The previous call of a pair (dq_pairs_) loaded this tile's q and dO rows already.
    const bool loaded = s.next_valid && std::equal(key, key + 5, s.next_key);
    if (loaded) {
      std::swap(s.a, s.a_next);
      std::swap(s.b, s.b_next);
    } else {
      load_tile(static_cast<const T*>(p_.q.data), p_.q.stride, b, h, x0, x1, tile, geo_, D_,
                s.a.data());
      load_tile(static_cast<const T*>(p_.d_out.data), p_.d_out.stride, b, h, x0, x1, tile,
                geo_, Dv_, s.b.data());
    }
    if constexpr (std::is_same_v<A, float>) {
      if (bf16_) {
        if (kg != nullptr) {  // the operands of dk, dv: the tile's rows as query pairs
          // (after the pending first tile's, when this tile takes its terms: merge)
          const int64_t at = loaded && s.pend_valid ? kRows / 2 : 0;
          s.a_inter.resize(static_cast<size_t>(kRows * ld16(D_)));
          s.b_inter.resize(static_cast<size_t>(kRows * ld16(Dv_)));
          interleave_pairs(s.a.data(), D_, kRows, kRows / 2, D_, ld16(D_),
                           s.a_inter.data() + at * ld16(D_));
          interleave_pairs(s.b.data(), Dv_, kRows, kRows / 2, Dv_, ld16(Dv_),
                           s.b_inter.data() + at * ld16(Dv_));
        }
      }
    }
    const int64_t at = stats_line(b, h, geo_.line(x0, x1, tile.group)) + tile.j0;
    const A* lse = row_lse_.data() + at;
    const A* delta = row_delta_.data() + at;
    const IndexRange w0 = key_window(p_.axes[0], x0), w1 = key_window(p_.axes[1], x1);
    const TilePlan& plan = plan_of(tile);
    const int64_t* lo = plan.lo;
    const int64_t* hi = plan.hi;
    const int64_t u_lo = plan.u_lo, u_hi = plan.u_hi;
    int64_t clo[kRows], chi[kRows];
    A* dq = s.acc_a.data();
    // Lanes (fp32 at the AVX2 and AVX-512 levels, no bias): S, dP, P and dS of each key line for
    // every window offset u of the rows, row r at position base + u + r, one vector lane per row
    // (lane_line_scores, lane_line_probs), which the three accumulations then read in place as
    // blocks: the rows' own keys only (7 of a 16-key chunk's at window 7) instead of two whole
    // kRows x kCols block products and a block of probabilities. Each entry is the same
    // sequence of roundings as in block_dot and block_backward_probs, so P and dS stay
    // bit-identical to the key-side walk's (Backward: the two schedules). Where the windows are
    // wide, the blocks waste little and run faster per multiply-add (kLaneCostRatio).
    // Pairs (dq_pairs_, AVX-512): a tile whose next tile also runs on lanes computes both tiles'
    // scores in 16-lane vectors (lane_line_scores_pair, the same bits as alone) and keeps the
    // next one's in s (next_s, next_dp: one padded lane layout per key line of the window, which
    // the two tiles share); that tile's call then finds them (`cached`) and only runs its
    // probabilities and accumulations. The pair's lane l at pair offset u reads position
    // pair_base + u + l.
    const LaneSpan& span = plan.span;
    const bool lanes = plan.lanes;
    const bool cached = lanes && loaded;
    if (bf16_ && !lanes) tile_pairs(s);  // the block products' operands
    s.next_valid = false;
    bool fill = false;
    int64_t pair_base = 0, pair_offsets = 0;
    LaneHalf halves[2] = {};
    A* s_lane0 = nullptr;  // the lane scores at offset 0 (S, then P), when `lanes`
    A* dp_lane0 = nullptr;  // and dP, then dS
    if constexpr (std::is_same_v<A, float>) {
      // The lanes' operands: the tile's rows transposed, as bf16 pairs with bf16_.
      const auto transpose = [&](const A* src, int64_t width, A* dst, int64_t lanes) {
        if (bf16_) {
          transpose_tile_pairs(src, width, dst, lanes);
        } else {
          transpose_tile(src, width, dst, lanes);
        }
      };
      const TilePlan* next_plan = nullptr;
      if (lanes && !cached && pair_next != nullptr) {
        next_plan = &plan_of(*pair_next);
        fill = next_plan->lanes;
      }
      if (lanes && !cached) {
        // kLanePad zero offsets on either side: the accumulations read the lane layout as blocks
        // (below), whose corners reach up to kRows - 1 offsets past either end.
        s.s_lanes.assign(static_cast<size_t>((span.offsets + 2 * lane_pad_) * kRows), A(0));
        s.dp_lanes.assign(s.s_lanes.size(), A(0));
        s_lane0 = s.s_lanes.data() + lane_pad_ * kRows;
        dp_lane0 = s.dp_lanes.data() + lane_pad_ * kRows;
      }
      if (fill) {
        s.a_next.resize(s.a.size());
        s.b_next.resize(s.b.size());
        load_tile(static_cast<const T*>(p_.q.data), p_.q.stride, b, h, x0, x1, *pair_next, geo_,
                  D_, s.a_next.data());
        load_tile(static_cast<const T*>(p_.d_out.data), p_.d_out.stride, b, h, x0, x1,
                  *pair_next, geo_, Dv_, s.b_next.data());
        s.at_pair.resize(static_cast<size_t>(D_ * 2 * kRows));
        s.bt_pair.resize(static_cast<size_t>(Dv_ * 2 * kRows));
        transpose(s.a.data(), D_, s.at_pair.data(), 2 * kRows);
        transpose(s.a_next.data(), D_, s.at_pair.data() + kRows, 2 * kRows);
        transpose(s.b.data(), Dv_, s.bt_pair.data(), 2 * kRows);
        transpose(s.b_next.data(), Dv_, s.bt_pair.data() + kRows, 2 * kRows);
        // The next tile's lane l sits in pair lane kRows + l.
        const LaneSpan& next_span = next_plan->span;
        pair_base = std::min(span.base, next_span.base - kRows);
        pair_offsets =
            std::max(span.base + span.offsets, next_span.base - kRows + next_span.offsets) -
            pair_base;
        halves[0] = {s_lane0, dp_lane0, span.base - pair_base, span.offsets};
        halves[1] = {nullptr, nullptr, next_span.base - kRows - pair_base, next_span.offsets};
        s.next_slot = (next_span.offsets + 2 * lane_pad_) * kRows;
        s.next_s.assign(static_cast<size_t>(w0.count * w1.count * s.next_slot), A(0));
        s.next_dp.assign(s.next_s.size(), A(0));
        const int64_t next_key[5] = {h, x0, x1, pair_next->group, pair_next->j0};
        std::copy(next_key, next_key + 5, s.next_key);
      } else if (lanes && !cached) {
        s.at.resize(static_cast<size_t>(D_ * kRows));
        s.bt.resize(static_cast<size_t>(Dv_ * kRows));
        transpose(s.a.data(), D_, s.at.data(), kRows);
        transpose(s.b.data(), Dv_, s.bt.data(), kRows);
      }
    }
    // bf16 dk/dv on lanes (per window line, lane_line_dkdv): the first tile of a pair unit
    // defers its terms to the second (`merge`), which adds both tiles' with one load and store
    // of each key's rows.
    const bool defer = bf16_ && kg != nullptr && fill;
    const bool merge = bf16_ && kg != nullptr && cached && s.pend_valid;
    if (defer) {
      s.pend_slot = (span.offsets + 2 * kRows - 2 + kPairsSlack) * kRows / 2;
      s.pend_s.resize(static_cast<size_t>(w0.count * w1.count * s.pend_slot));
      s.pend_d.resize(s.pend_s.size());
    }
    // contained: the recomputation of a tile whose dq came out non-finite, with dS K restricted
    // to each row's keys; dk, dv and d_rpb are not touched again (contain_key_gradients repairs
    // dk, dv; dS itself is exact either way).
    const auto walk = [&](const KeyGradients* into, A* bias_into, bool contained) {
      std::fill(s.acc_a.begin(), s.acc_a.end(), A(0));
      // The key rows, read by every walk but bf16 lanes' (those take k_inter).
      const Rows<A>* rows = lanes && !contained && bf16_ ? nullptr : &k_rows.get();
      const int64_t k_step = rows != nullptr ? geo_.dilation * rows->s[2] : 0;
      for (int64_t i0 = 0; i0 < w0.count; ++i0) {
        const int64_t y0 = w0.first + i0 * w0.step;
        for (int64_t i1 = 0; i1 < w1.count; ++i1) {
          const int64_t y1 = w1.first + i1 * w1.step;
          const int64_t line = geo_.line(y0, y1, tile.group);
          const A* kt = k_lines + line * kw_ * geo_.ld;
          const A* vt = v_lines + line * vw_ * geo_.ld;
          const A* kr = rows != nullptr ? rows->line(0, y0, y1, tile.group) : nullptr;
          // Fused: dk/dv rows of this key line, token (y0, y1, group + dilation * t).
          const int64_t y01 = y0 * geo_.len[1] + y1;
          const int64_t key_row0 =
              (into != nullptr && into->block != nullptr ? into->block[y01] : y01) *
                  geo_.len[2] +
              tile.group;
          const A* b_line = nullptr;
          A* db_line = nullptr;
          if (bias_into != nullptr) {
            const int64_t off = bias_line(bias_, p_, h, x0, x1, y0, y1);
            b_line = bias_.forward.data() + off;
            db_line = bias_into + (off - bias_.lines_offset(h, 0, 0));
          }
          const bool use_lanes = lanes && !contained;
          A* sl = s_lane0;  // this line's lane scores
          A* dl = dp_lane0;
          if constexpr (std::is_same_v<A, float>) {
            if (use_lanes) {
              const int64_t at_line = (i0 * w1.count + i1) * s.next_slot + lane_pad_ * kRows;
              if (cached) {
                sl = s.next_s.data() + at_line;
                dl = s.next_dp.data() + at_line;
              } else if (fill) {
                LaneHalf line_halves[2] = {halves[0], halves[1]};
                line_halves[1].s = s.next_s.data() + at_line;
                line_halves[1].dp = s.next_dp.data() + at_line;
                if (bf16_) {
                  lane_line_scores_pair_bf16(s.at_pair.data(), s.bt_pair.data(), kw_,
                                             kt + pair_base, vt + pair_base, geo_.ld,
                                             pair_offsets, line_halves);
                } else {
                  lane_line_scores_pair(s.at_pair.data(), s.bt_pair.data(), D_, kt + pair_base,
                                        vt + pair_base, geo_.ld, pair_offsets, line_halves);
                }
              } else if (bf16_) {
                lane_line_scores_bf16(s.at.data(), kw_, kt + span.base, s.bt.data(), vw_,
                                      vt + span.base, geo_.ld, span.offsets, sl, dl);
              } else {
                lane_line_scores(s.at.data(), D_, kt + span.base, s.bt.data(), Dv_,
                                 vt + span.base, geo_.ld, span.offsets, sl, dl);
              }
              lane_line_probs(sl, dl, span.offsets, span.base, span.lo, span.hi,
                              static_cast<float>(p_.scale), lse, delta);
              if (bf16_ && into != nullptr) {
                lane_line_dkdv(s, sl, dl, span, u_lo, u_hi, i0 * w1.count + i1, defer, merge,
                               into, key_row0);
              }
              if (bf16_) {
                // dq += dS K over the pairs of keys 2m, 2m + 1 of the rows' union [u_lo, u_hi):
                // row r's pair m at offset 2m - base - r (lane_key_pairs_bf16), the keys from
                // k_inter. Replaces the chunks' block_accumulate below.
                const int64_t m_lo = u_lo / 2, m_hi = (u_hi + 1) / 2;
                const int64_t u_a = 2 * m_lo - span.base - (kRows - 1);
                const int64_t u_b = 2 * (m_hi - 1) - span.base + 1;
                s.pp_q.resize(static_cast<size_t>((u_b - u_a) * kRows));
                A* pp0 = s.pp_q.data() - u_a * kRows;
                lane_key_pairs_bf16(dl, u_a, u_b, pp0);
                accumulate_pairs_bf16(pp0 + (2 * m_lo - span.base) * kRows, 1 - kRows, 2 * kRows,
                                      kRows, m_hi - m_lo, k_inter + line * k_inter_line() +
                                      m_lo * ld16(D_), ld16(D_), D_, dq, D_, nullptr);
              }
            }
          }
          if (use_lanes && bf16_) continue;  // bf16 lanes: dq, dk, dv per line above
          for (int64_t c0 = u_lo; c0 < u_hi; c0 += kCols) {
            const int64_t n = std::min<int64_t>(kCols, u_hi - c0);
            chunk_spans(lo, hi, c0, n, clo, chi);
            // P and dS as kRows x kCols blocks: computed here, or the lane layout read in place
            // (row r's key c0 + c is offset c0 + c - base - r: entry (r, c) at (c0 - base) *
            // kRows + r * (1 - kRows) + c * kRows, zero outside each row's window).
            const A* p_blk = s.s.data();
            const A* ds_blk = s.dp.data();
            int64_t ps_r = kCols, ps_c = 1;
            if (use_lanes) {
              p_blk = sl + (c0 - span.base) * kRows;
              ds_blk = dl + (c0 - span.base) * kRows;
              ps_r = 1 - kRows;
              ps_c = kRows;
              block_accumulate(ds_blk, n, kr + c0 * k_step, k_step, D_, dq, D_, clo, chi, ps_r,
                               ps_c);
            } else {
              const int64_t rel = BiasTable<A>::kPad + rpb_index_in_group(bias_.kernel_last,
                                                                           tile.j0, c0);
              dq_chunk(p_, s.a.data(), s.b.data(), bf16_ ? s.a_pairs.data() : nullptr,
                       bf16_ ? s.b_pairs.data() : nullptr, kt + c0, vt + c0, geo_.ld,
                       kr + c0 * k_step, k_step, n, clo, chi, lse, delta, dq, s.s.data(),
                       s.dp.data(), b_line ? b_line + rel : nullptr,
                       db_line ? db_line + rel : nullptr, contained);
            }
            if (into != nullptr && bf16_ && !use_lanes) {
              // bf16 blocks: the rows of P and dS as query pairs (on lanes: lane_line_dkdv).
              if constexpr (std::is_same_v<A, float>) {
                const int64_t row = key_row0 + geo_.dilation * c0;
                s.pp_s.resize(kRows / 2 * kCols + kPairsSlack);
                s.pp_d.resize(kRows / 2 * kCols + kPairsSlack);
                block_row_pairs_bf16(s.s.data(), s.pp_s.data());
                block_row_pairs_bf16(s.dp.data(), s.pp_d.data());
                accumulate_pairs_bf16(s.pp_s.data(), 1, kCols, n, kRows / 2, s.b_inter.data(),
                                      ld16(Dv_), Dv_, into->dv + row * Dv_, geo_.dilation * Dv_,
                                      nullptr);
                accumulate_pairs_bf16(s.pp_d.data(), 1, kCols, n, kRows / 2, s.a_inter.data(),
                                      ld16(D_), D_, into->dk + row * D_, geo_.dilation * D_,
                                      nullptr);
              }
            } else if (into != nullptr && !bf16_) {
              const int64_t row = key_row0 + geo_.dilation * c0;
              block_accumulate_transposed(p_blk, n, s.b.data(), Dv_, Dv_, into->dv + row * Dv_,
                                          geo_.dilation * Dv_, clo, chi, ps_r, ps_c);
              block_accumulate_transposed(ds_blk, n, s.a.data(), D_, D_, into->dk + row * D_,
                                          geo_.dilation * D_, clo, chi, ps_r, ps_c);
            }
          }
        }
      }
      for (int64_t c0 = 0; c0 < M_; c0 += kCols) {
        const int64_t n = std::min<int64_t>(kCols, M_ - c0);
        for (int r = 0; r < kRows; ++r) {
          clo[r] = 0;
          chi[r] = r < tile.count ? n : 0;
        }
        dq_chunk(p_, s.a.data(), s.b.data(), static_cast<const A*>(nullptr),
                 static_cast<const A*>(nullptr), st.add_kt.data() + c0, st.add_vt.data() + c0,
                 M_ + kCols, st.add_k_rows.data() + c0 * D_, D_, n, clo, chi, lse, delta, dq,
                 s.s.data(), s.dp.data(), static_cast<const A*>(nullptr),
                 static_cast<A*>(nullptr), contained);
        if (into == nullptr) continue;
        // Into the partial sums of (tile of kRows additional tokens, part of this query line).
        const int64_t part = geo_.line(x0, x1, tile.group) / lines_per_part_;
        for (int64_t m0 = c0; m0 < c0 + n; m0 += kRows) {
          A* partial = into->add_partial + (m0 / kRows * n_parts_ + part) * partial_size_;
          const int64_t count = std::min<int64_t>(kRows, c0 + n - m0);
          block_accumulate_transposed(s.dp.data() + (m0 - c0), count, s.a.data(), D_, D_, partial,
                                      D_);
          block_accumulate_transposed(s.s.data() + (m0 - c0), count, s.b.data(), Dv_, Dv_,
                                      partial + kRows * D_, Dv_);
        }
      }
    };
    walk(kg, d_bias, false);
    s.next_valid = fill;
    if (defer) {
      s.pend_valid = true;
      s.pend_lo = u_lo;
      s.pend_hi = u_hi;
      s.pend_base = span.base;
    } else if (merge) {
      s.pend_valid = false;
    }
    if (!all_finite(dq, tile.count * D_)) {
      if (bf16_ && lanes) tile_pairs(s);
      walk(nullptr, nullptr, true);
    }
    T* dq_out = static_cast<T*>(p_.dq.data);
    const A scale = static_cast<A>(p_.scale);
    for (int64_t r = 0; r < tile.count; ++r) {
      const int64_t x[3] = {x0, x1, tile.index(geo_, r)};
      T* dst = dq_out + token_offset(p_.dq.stride, b, x) + h * p_.dq.stride[4];
      for (int64_t w = 0; w < D_; ++w) dq[r * D_ + w] *= scale;
      stream_row(dq + r * D_, D_, dst, p_.dq.stride[5], stream_dq_);
    }
    if (stream_dq_) stream_fence();
  }

  // bf16 dk += dS^T Q, dv += P^T dO of one window line of a lane tile (dq_tile): the line's P
  // (sl) and dS (dl) as query pairs (lane_pairs_bf16, offsets 1 - kRows .. offsets + kRows - 2,
  // all a key of [u_lo, u_hi) asks for: key K's pair i at offset K - base - 2i), then
  //  - defer: kept in the line's slot of pend_s, pend_d for the unit's second tile;
  //  - merge (the second tile, the first's pending): the keys of the first tile only, of both
  //    (its pairs, then this tile's: accumulate_pairs2_bf16) and of this tile only;
  //  - else: this tile's keys.
  // key_row0: the dk/dv row of group position 0 of the line (rows step by the dilation).
  void lane_line_dkdv(BackwardScratch<A>& s, const A* sl, const A* dl, const LaneSpan& span,
                      int64_t u_lo, int64_t u_hi, int64_t line_index, bool defer, bool merge,
                      const KeyGradients* into, int64_t key_row0) const {
    if constexpr (std::is_same_v<A, float>) {
      constexpr int64_t kH = kRows / 2;
      const int64_t u_begin = 1 - kRows, u_end = span.offsets + kRows - 1;
      A* ps;
      A* pd;
      if (defer) {
        ps = s.pend_s.data() + line_index * s.pend_slot;
        pd = s.pend_d.data() + line_index * s.pend_slot;
      } else {
        s.pp_s.resize(static_cast<size_t>((u_end - u_begin + kPairsSlack) * kH));
        s.pp_d.resize(s.pp_s.size());
        ps = s.pp_s.data();
        pd = s.pp_d.data();
      }
      lane_pairs_bf16(sl, u_begin, u_end, ps - u_begin * kH);
      lane_pairs_bf16(dl, u_begin, u_end, pd - u_begin * kH);
      if (defer) return;
      // Key K's pointers into a table of lane base `base` (pair 0 at offset K - base).
      const auto at = [&](const A* table, int64_t base, int64_t key) {
        return table + (key - base - u_begin) * kH;
      };
      const int64_t step_v = geo_.dilation * Dv_, step_k = geo_.dilation * D_;
      const auto one = [&](const A* ts, const A* td, int64_t base, int64_t lo, int64_t hi,
                           int64_t inter_row) {
        if (hi <= lo) return;
        const int64_t row = key_row0 + geo_.dilation * lo;
        accumulate_pairs_bf16(at(ts, base, lo), kH, 1 - kRows, hi - lo, kH,
                              s.b_inter.data() + inter_row * ld16(Dv_), ld16(Dv_), Dv_,
                              into->dv + row * Dv_, step_v, nullptr);
        accumulate_pairs_bf16(at(td, base, lo), kH, 1 - kRows, hi - lo, kH,
                              s.a_inter.data() + inter_row * ld16(D_), ld16(D_), D_,
                              into->dk + row * D_, step_k, nullptr);
      };
      if (!merge) {
        one(ps, pd, span.base, u_lo, u_hi, 0);
        return;
      }
      const A* fs = s.pend_s.data() + line_index * s.pend_slot;
      const A* fd = s.pend_d.data() + line_index * s.pend_slot;
      const int64_t both_lo = std::max(s.pend_lo, u_lo), both_hi = std::min(s.pend_hi, u_hi);
      one(fs, fd, s.pend_base, s.pend_lo, std::min(s.pend_hi, u_lo), 0);
      if (both_hi > both_lo) {
        const int64_t row = key_row0 + geo_.dilation * both_lo;
        accumulate_pairs2_bf16(at(fs, s.pend_base, both_lo), at(ps, span.base, both_lo),
                               both_hi - both_lo, s.b_inter.data(), ld16(Dv_), Dv_,
                               into->dv + row * Dv_, step_v);
        accumulate_pairs2_bf16(at(fd, s.pend_base, both_lo), at(pd, span.base, both_lo),
                               both_hi - both_lo, s.a_inter.data(), ld16(D_), D_,
                               into->dk + row * D_, step_k);
      }
      one(ps, pd, span.base, std::max(u_lo, s.pend_hi), u_hi, kH);
    }
  }

  // Columns of the rows of interleave_pairs: whole 16-column vectors (accumulate_pairs_bf16).
  static int64_t ld16(int64_t width) { return (width + 15) / 16 * 16; }
  // Elements per line of the key pairs (run_group: k_inter).
  int64_t k_inter_line() const { return (geo_.ld + 1) / 2 * ld16(D_); }

  // dkdv_chunk on bf16 products (bf16_): the scores on pairs (chunk_scores), then dv += P^T dO
  // and dk += dS^T Q over the chunk's query pairs (c0 even: walk_line), P and dS rounded to bf16.
  // `contained`: each half of a pair only where its query is in the key's span (keep masks).
  void dkdv_chunk_bf16(BackwardScratch<A>& s, const A* qt, const A* dot, const A* q_rows,
                       int64_t q_step, const A* do_rows, int64_t do_step, int64_t n,
                       const int64_t* clo, const int64_t* chi, const A* lse, const A* delta,
                       bool contained) const {
    static constexpr A kZeros[kRows] = {};
    chunk_scores(p_, s.a.data(), s.b.data(), s.a_pairs.data(), s.b_pairs.data(), qt, dot,
                 geo_.ld, s.s.data(), s.dp.data());
    block_backward_probs(s.s.data(), s.dp.data(), clo, chi, static_cast<A>(p_.scale), kZeros,
                         lse, kZeros, delta, s.dp.data());
    const int64_t pairs = (n + 1) / 2;
    s.pp_s.resize(kRows * kCols / 2 + kPairsSlack * kCols / 2);
    s.pp_d.resize(s.pp_s.size());
    block_col_pairs_bf16(s.s.data(), s.pp_s.data());
    block_col_pairs_bf16(s.dp.data(), s.pp_d.data());
    s.a_inter.resize(static_cast<size_t>(kCols / 2 * ld16(D_)));
    s.b_inter.resize(static_cast<size_t>(kCols / 2 * ld16(Dv_)));
    interleave_pairs(q_rows, q_step, n, pairs, D_, ld16(D_), s.a_inter.data());
    interleave_pairs(do_rows, do_step, n, pairs, Dv_, ld16(Dv_), s.b_inter.data());
    const uint32_t* keep = nullptr;
    if (contained) {
      s.keep.resize(static_cast<size_t>(kRows * pairs));
      for (int r = 0; r < kRows; ++r) {
        for (int64_t m = 0; m < pairs; ++m) {
          const bool first = clo[r] <= 2 * m && 2 * m < chi[r];
          const bool second = clo[r] <= 2 * m + 1 && 2 * m + 1 < chi[r];
          s.keep[r * pairs + m] = (first ? 0x0000ffffu : 0u) | (second ? 0xffff0000u : 0u);
        }
      }
      keep = s.keep.data();
    }
    accumulate_pairs_bf16(s.pp_s.data(), kCols / 2, 1, kRows, pairs, s.b_inter.data(), ld16(Dv_),
                          Dv_, s.acc_b.data(), Dv_, keep);
    accumulate_pairs_bf16(s.pp_d.data(), kCols / 2, 1, kRows, pairs, s.a_inter.data(), ld16(D_),
                          D_, s.acc_a.data(), D_, keep);
  }

  // All chunks of query line (x0, x1, group) in [c_begin, c_end) against the kRows keys in s.a /
  // s.b, rows masked to [lo, hi): dk, dv into s.acc_a / s.acc_b.
  // bias_line: the reversed BiasTable line of this (query line, key tile) pair, or null (no
  // rpb, or additional keys); the key tile starts at group position j0.
  void walk_line(const HeadQueries& hq, BackwardScratch<A>& s, int64_t x0, int64_t x1,
                 int64_t group, const int64_t* lo, const int64_t* hi, int64_t c_begin,
                 int64_t c_end, const A* bias_line_ptr = nullptr, int64_t j0 = 0,
                 bool contained = false) const {
    const int64_t line = geo_.line(x0, x1, group);
    const A* qt = hq.lines + line * kw_ * geo_.ld;
    const A* dot = hq.do_lines + line * vw_ * geo_.ld;
    const A* qr = hq.rows.line(0, x0, x1, group);
    const A* dor = hq.do_rows.line(0, x0, x1, group);
    const int64_t q_step = geo_.dilation * hq.rows.s[2];
    const int64_t do_step = geo_.dilation * hq.do_rows.s[2];
    const A* lse = hq.lse + line * geo_.ld;
    const A* delta = hq.delta + line * geo_.ld;
    int64_t clo[kRows], chi[kRows];
    // bf16 products: chunks start at even positions, so that they pair the queries as the dq
    // pass's tiles do (accumulate_pairs_bf16); the query before c_begin has P = dS = 0.
    if (bf16_) c_begin -= c_begin % 2;
    for (int64_t c0 = c_begin; c0 < c_end; c0 += kCols) {
      const int64_t n = std::min<int64_t>(kCols, c_end - c0);
      chunk_spans(lo, hi, c0, n, clo, chi);
      if constexpr (std::is_same_v<A, float>) {
        if (bf16_) {
          dkdv_chunk_bf16(s, qt + c0, dot + c0, qr + c0 * q_step, q_step, dor + c0 * do_step,
                          do_step, n, clo, chi, lse + c0, delta + c0, contained);
          continue;
        }
      }
      dkdv_chunk(p_, s.a.data(), s.b.data(), qt + c0, dot + c0, geo_.ld, qr + c0 * q_step,
                 q_step, dor + c0 * do_step, do_step, n, clo, chi, lse + c0, delta + c0,
                 s.acc_a.data(), s.acc_b.data(), s.s.data(), s.dp.data(),
                 bias_line_ptr ? bias_.chunk(bias_line_ptr, j0, c0) : nullptr, contained);
    }
  }

  // dk, dv of the key tile at (y0, y1) = x01, accumulated over its inverse windows onto the sums
  // of the group's earlier heads; `contained`: sums restricted to each key's queries.
  void key_tile(int64_t b, int64_t kvh, int64_t x01, const AxisTile& tile, const HeadQueries& hq,
                GroupStorage<A>& st, BackwardScratch<A>& s, bool contained = false) const {
    const int64_t y0 = x01 / geo_.len[1], y1 = x01 % geo_.len[1];
    load_tile(static_cast<const T*>(p_.k.data), p_.k.stride, b, kvh, y0, y1, tile, geo_, D_,
              s.a.data());
    load_tile(static_cast<const T*>(p_.v.data), p_.v.stride, b, kvh, y0, y1, tile, geo_, Dv_,
              s.b.data());
    if (bf16_) tile_pairs(s);
    // Accumulator rows of the tile's keys: token (y0, y1, group + dilation * (j0 + r)).
    const int64_t first = x01 * geo_.len[2] + tile.index(geo_, 0);
    const int64_t row_step = geo_.dilation;
    for (int64_t r = 0; r < kRows; ++r) {
      A* dk_r = s.acc_a.data() + r * D_;
      A* dv_r = s.acc_b.data() + r * Dv_;
      if (r < tile.count) {
        std::copy_n(st.dk_acc.data() + (first + r * row_step) * D_, D_, dk_r);
        std::copy_n(st.dv_acc.data() + (first + r * row_step) * Dv_, Dv_, dv_r);
      } else {
        std::fill(dk_r, dk_r + D_, A(0));
        std::fill(dv_r, dv_r + Dv_, A(0));
      }
    }
    const IndexRange w0 = query_window(p_.axes[0], y0), w1 = query_window(p_.axes[1], y1);
    int64_t lo[kRows] = {}, hi[kRows] = {};
    int64_t u_lo = std::numeric_limits<int64_t>::max(), u_hi = 0;
    for (int r = 0; r < tile.count; ++r) {
      group_span(query_window(p_.axes[2], tile.index(geo_, r)), tile.group, geo_.dilation,
                 &lo[r], &hi[r]);
      if (lo[r] >= hi[r]) continue;
      u_lo = std::min(u_lo, lo[r]);
      u_hi = std::max(u_hi, hi[r]);
    }
    for (int64_t i0 = 0; i0 < w0.count; ++i0) {
      for (int64_t i1 = 0; i1 < w1.count; ++i1) {
        const int64_t x0 = w0.first + i0 * w0.step, x1 = w1.first + i1 * w1.step;
        const A* b_line = nullptr;
        if (p_.has_rpb()) {
          b_line = bias_.reversed.data() + bias_line(bias_, p_, hq.h, x0, x1, y0, y1);
        }
        walk_line(hq, s, x0, x1, tile.group, lo, hi, u_lo, u_hi, b_line, tile.j0, contained);
      }
    }
    for (int64_t r = 0; r < tile.count; ++r) {
      std::copy_n(s.acc_a.data() + r * D_, D_, st.dk_acc.data() + (first + r * row_step) * D_);
      std::copy_n(s.acc_b.data() + r * Dv_, Dv_,
                  st.dv_acc.data() + (first + r * row_step) * Dv_);
    }
  }

  // Tile mt of the additional tokens against part `part` of the query lines.
  void additional_tile(int64_t mt, int64_t part, const HeadQueries& hq, GroupStorage<A>& st,
                       BackwardScratch<A>& s) const {
    const int64_t m0 = mt * kRows, count = std::min<int64_t>(kRows, M_ - m0);
    std::fill(s.a.begin(), s.a.end(), A(0));
    std::fill(s.b.begin(), s.b.end(), A(0));
    std::copy(st.add_k_rows.data() + m0 * D_, st.add_k_rows.data() + (m0 + count) * D_,
              s.a.data());
    std::copy(st.add_v_rows.data() + m0 * Dv_, st.add_v_rows.data() + (m0 + count) * Dv_,
              s.b.data());
    A* partial = st.add_partial.data() + (mt * n_parts_ + part) * partial_size_;
    std::copy(partial, partial + kRows * D_, s.acc_a.data());
    std::copy(partial + kRows * D_, partial + partial_size_, s.acc_b.data());
    const int64_t line_end = std::min(geo_.lines, (part + 1) * lines_per_part_);
    for (int64_t line = part * lines_per_part_; line < line_end; ++line) {
      const int64_t g = line % geo_.dilation, x01 = line / geo_.dilation;
      const int64_t n = group_length(geo_.len[2], geo_.dilation, g);
      int64_t lo[kRows] = {}, hi[kRows] = {};
      for (int r = 0; r < count; ++r) hi[r] = n;
      walk_line(hq, s, x01 / geo_.len[1], x01 % geo_.len[1], g, lo, hi, 0, n);
    }
    std::copy(s.acc_a.data(), s.acc_a.data() + kRows * D_, partial);
    std::copy(s.acc_b.data(), s.acc_b.data() + kRows * Dv_, partial + kRows * D_);
  }

  // One key token's dk and dv from its accumulator rows (dk scaled): token (x01, x2) of kv head
  // kvh of batch b.
  void store_key_row(int64_t b, int64_t kvh, int64_t x01, int64_t x2, const A* dk_row,
                     const A* dv_row) const {
    T* dk = static_cast<T*>(p_.dk.data);
    T* dv = static_cast<T*>(p_.dv.data);
    const int64_t x[3] = {x01 / geo_.len[1], x01 % geo_.len[1], x2};
    A dk_scaled[kMaxStoreWidth];
    const A scale = static_cast<A>(p_.scale);
    for (int64_t w0 = 0; w0 < D_; w0 += kMaxStoreWidth) {  // in pieces: any head_dim
      const int64_t n = std::min<int64_t>(kMaxStoreWidth, D_ - w0);
      for (int64_t w = 0; w < n; ++w) dk_scaled[w] = dk_row[w0 + w] * scale;
      stream_row(dk_scaled, n,
                 dk + token_offset(p_.dk.stride, b, x) + kvh * p_.dk.stride[4] +
                     w0 * p_.dk.stride[5],
                 p_.dk.stride[5], stream_dk_);
    }
    stream_row(dv_row, Dv_, dv + token_offset(p_.dv.stride, b, x) + kvh * p_.dv.stride[4],
               p_.dv.stride[5], stream_dv_);
  }

  // dk, dv of the geo_.len[2] tokens of key position x01 from its block of accumulator rows
  // (dk_rows, dv_rows); whether every row was finite.
  bool store_key_block(int64_t b, int64_t kvh, int64_t x01, const A* dk_rows,
                       const A* dv_rows) const {
    T* dk = static_cast<T*>(p_.dk.data);
    T* dv = static_cast<T*>(p_.dv.data);
    bool ok = true;
    for (int64_t x2 = 0; x2 < geo_.len[2]; ++x2) {
      if (x2 + kStorePrefetchRows < geo_.len[2] && !stream_dk_ && !stream_dv_ &&
          p_.dk.stride[5] == 1 && p_.dv.stride[5] == 1) {  // plain stores: the rows a few
                                                           // tokens ahead, for write
        const int64_t y[3] = {x01 / geo_.len[1], x01 % geo_.len[1], x2 + kStorePrefetchRows};
        prefetch_row<true>(dk + token_offset(p_.dk.stride, b, y) + kvh * p_.dk.stride[4], D_);
        prefetch_row<true>(dv + token_offset(p_.dv.stride, b, y) + kvh * p_.dv.stride[4], Dv_);
      }
      const A* dk_row = dk_rows + x2 * D_;
      const A* dv_row = dv_rows + x2 * Dv_;
      ok = ok && all_finite(dk_row, D_) && all_finite(dv_row, Dv_);
      store_key_row(b, kvh, x01, x2, dk_row, dv_row);
    }
    stream_fence();
    return ok;
  }

  // d_add_k, d_add_v of the group's kv head: the partial sums added in part order.
  void store_additional_gradients(int64_t b, int64_t kvh, const GroupStorage<A>& st) const {
    const A scale = static_cast<A>(p_.scale);
    for (int64_t m = 0; m < M_; ++m) {
      const int64_t mt = m / kRows, r = m % kRows;
      std::vector<A> dak(static_cast<size_t>(D_), A(0)), dav(static_cast<size_t>(Dv_), A(0));
      for (int64_t part = 0; part < n_parts_; ++part) {
        const A* partial = st.add_partial.data() + (mt * n_parts_ + part) * partial_size_;
        for (int64_t w = 0; w < D_; ++w) dak[w] += partial[r * D_ + w];
        for (int64_t w = 0; w < Dv_; ++w) dav[w] += partial[kRows * D_ + r * Dv_ + w];
      }
      for (int64_t w = 0; w < D_; ++w) dak[w] *= scale;
      store_row(dak.data(), D_,
                static_cast<T*>(p_.d_add_k.data) + b * p_.d_add_k.stride[0] +
                    m * p_.d_add_k.stride[1] + kvh * p_.d_add_k.stride[2],
                p_.d_add_k.stride[3]);
      store_row(dav.data(), Dv_,
                static_cast<T*>(p_.d_add_v.data) + b * p_.d_add_v.stride[0] +
                    m * p_.d_add_v.stride[1] + kvh * p_.d_add_v.stride[2],
                p_.d_add_v.stride[3]);
    }
  }

  // dk, dv of the group's kv head from the token-order accumulators, and d_add_k, d_add_v;
  // whether every dk and dv accumulator row was finite. The accumulators are left as they are.
  bool store_dk_dv(int64_t b, int64_t kvh, int nt, GroupStorage<A>& st) const {
    std::vector<char> finite(static_cast<size_t>(n_x01_), 1);
    parallel_for(nt, n_x01_, [&](int64_t x01, int) {
      finite[x01] = store_key_block(b, kvh, x01, st.dk_acc.data() + x01 * geo_.len[2] * D_,
                                    st.dv_acc.data() + x01 * geo_.len[2] * Dv_);
    });
    store_additional_gradients(b, kvh, st);
    return std::all_of(finite.begin(), finite.end(), [](char f) { return f != 0; });
  }

  // The fused schedule's dk/dv accumulators as a ring of key blocks. The dq pass visits the query
  // positions x01 in order; key position y01 receives terms from the query positions whose
  // windows hold it, [first, last] of them. With one query head per kv head, its block of
  // accumulators is zeroed before the first's tiles (open_key_blocks) and stored right after the
  // last's (close_key_blocks), and then reused: the blocks in use stay in cache (7 of 64 at
  // 64 x 64, window 7: 230 KB instead of 2 MB at head_dim 64), and neither a zeroing pass nor a
  // store pass reads the whole accumulators back from memory (with streamed stores, the fp32
  // backward of 64 x 64, window 7, ran 1.05x faster on the Zen 4 VM than with token-order
  // accumulators). The same sums in the same order as the token-order accumulators. slots = 0
  // where a ring saves nothing (GQA/MQA: every block stays in use until the last head; 1-D: one
  // block).
  struct KeyRing {
    std::vector<int64_t> slot;  // key position -> its block in dk_acc, dv_acc
    // Per query position x01: the key positions opened before it, [open_at[x01],
    // open_at[x01 + 1]) of `open`, and closed after it (close_at, close).
    std::vector<int64_t> open_at, open, close_at, close;
    int64_t slots = 0;
  };

  void plan_key_ring() {
    if (hpk_ != 1 || n_x01_ < 2) return;
    std::vector<int64_t> first(static_cast<size_t>(n_x01_), -1), last(first);
    for (int64_t x01 = 0; x01 < n_x01_; ++x01) {
      const IndexRange w0 = key_window(p_.axes[0], x01 / geo_.len[1]);
      const IndexRange w1 = key_window(p_.axes[1], x01 % geo_.len[1]);
      for (int64_t i0 = 0; i0 < w0.count; ++i0) {
        for (int64_t i1 = 0; i1 < w1.count; ++i1) {
          const int64_t y01 = (w0.first + i0 * w0.step) * geo_.len[1] + w1.first + i1 * w1.step;
          if (first[y01] < 0) first[y01] = x01;
          last[y01] = x01;
        }
      }
    }
    std::vector<std::vector<int64_t>> opens(static_cast<size_t>(n_x01_)), closes(opens);
    for (int64_t y01 = 0; y01 < n_x01_; ++y01) {
      if (first[y01] < 0) first[y01] = last[y01] = 0;  // no query attends it: zeros, stored first
      opens[first[y01]].push_back(y01);
      closes[last[y01]].push_back(y01);
    }
    KeyRing ring;
    ring.slot.assign(static_cast<size_t>(n_x01_), 0);
    std::vector<int64_t> free;  // most recently closed last: its rows are the likeliest cached
    for (int64_t x01 = 0; x01 < n_x01_; ++x01) {
      ring.open_at.push_back(static_cast<int64_t>(ring.open.size()));
      ring.close_at.push_back(static_cast<int64_t>(ring.close.size()));
      for (const int64_t y01 : opens[x01]) {
        if (free.empty()) {
          ring.slot[y01] = ring.slots++;
        } else {
          ring.slot[y01] = free.back();
          free.pop_back();
        }
        ring.open.push_back(y01);
      }
      for (const int64_t y01 : closes[x01]) {
        free.push_back(ring.slot[y01]);
        ring.close.push_back(y01);
      }
    }
    ring.open_at.push_back(static_cast<int64_t>(ring.open.size()));
    ring.close_at.push_back(static_cast<int64_t>(ring.close.size()));
    if (ring.slots < n_x01_) ring_ = std::move(ring);
  }

  // KeyRing: zero the blocks of the key positions query position x01 is the first to reach.
  void open_key_blocks(int64_t x01, GroupStorage<A>& st) const {
    const int64_t n = geo_.len[2];
    for (int64_t i = ring_.open_at[x01]; i < ring_.open_at[x01 + 1]; ++i) {
      const int64_t slot = ring_.slot[ring_.open[i]];
      std::fill_n(st.dk_acc.data() + slot * n * D_, n * D_, A(0));
      std::fill_n(st.dv_acc.data() + slot * n * Dv_, n * Dv_, A(0));
    }
  }

  // KeyRing: store the key positions query position x01 is the last to reach; the key tiles with
  // a non-finite row go into `bad` (contain_key_gradients' test, as key_tile items).
  void close_key_blocks(int64_t b, int64_t kvh, int64_t x01, const GroupStorage<A>& st,
                        std::vector<int64_t>& bad) const {
    const int64_t n = geo_.len[2];
    for (int64_t i = ring_.close_at[x01]; i < ring_.close_at[x01 + 1]; ++i) {
      const int64_t y01 = ring_.close[i];
      const A* dk_rows = st.dk_acc.data() + ring_.slot[y01] * n * D_;
      const A* dv_rows = st.dv_acc.data() + ring_.slot[y01] * n * Dv_;
      if (store_key_block(b, kvh, y01, dk_rows, dv_rows)) continue;
      for (int64_t t = 0; t < n_tiles_; ++t) {
        if (!key_tile_finite(dk_rows, dv_rows, tiles_[t])) bad.push_back(y01 * n_tiles_ + t);
      }
    }
  }

  const AttentionParams& p_;
  const Geometry geo_;
  const std::vector<AxisTile> tiles_;
  const int64_t n_tiles_, n_x01_, D_, Dv_, M_, hpk_;
  const int64_t lines_per_part_, n_parts_, m_tiles_, partial_size_;
  const bool dq_lanes_;  // dq_tile may run its scores and probabilities on lanes
  // and two tiles' scores at once (lane_line_scores_pair), in units of the tiles pair_starts_
  // begins (a tile and the next one of its group)
  const bool dq_pairs_;
  // The products on bf16 pairs (use_bf16_products); the packed lines' widths: head_dim and
  // value_dim, or half as many bf16 pairs
  const bool bf16_;
  const int64_t kw_, vw_;
  const int64_t lane_pad_;  // zero offsets on either side of the lane scores (kLanePad)
  bool all_lanes_ = false;  // every query tile's dq pass runs on lanes (plan_tile)
  std::vector<TilePlan> plans_;  // plan_of
  // dq, dk, dv written through non-temporal stores (stream_row)
  const bool stream_dq_, stream_dk_, stream_dv_;
  std::vector<int64_t> pair_starts_;
  KeyRing ring_;
  std::vector<A> row_lse_, row_delta_;
  // rpb only: the bias tables, and the d_rpb partials [batch][heads][part][head_size].
  BiasTable<A> bias_;
  int64_t rpb_items_per_part_ = 1, rpb_parts_ = 1;
  std::vector<A> rpb_partial_;
};

}  // namespace

void backward(const AttentionParams& p) {
  cpu_isa();  // picks (or rejects, by throwing) the kernel level here, not in a worker thread
  dispatch_dtype(p.dtype, [&](auto* tag) {
    Backward<std::remove_pointer_t<decltype(tag)>>(p).run();
  });
}

}  // namespace nattn::cpu
