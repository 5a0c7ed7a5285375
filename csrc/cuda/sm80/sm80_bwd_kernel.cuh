// SM80 tensor-core backward, two passes without atomics (so bit-identical run to run):
//   dQ pass  : per Q tile (rows = queries) over the forward's KV tiles (TileWalk of forward_walk):
//              S = Q K^T, P = exp(S - lse), dP = dO V^T, dS = P (dP - delta), dQ += dS K.
//   dK/dV pass: per KV tile (rows = keys) over the Q tiles that attend it (backward_walk, the
//              inverse windows of window.h) and over the query heads of its GQA group:
//              S^T = K Q^T, P^T, dP^T = V dO^T, dS^T, dV += P^T dO, dK += dS^T Q.
//              Tiles of additional tokens are attended by every query: their CTAs walk every
//              Q tile of the layout.
// delta = rowsum(dO * O) - d_lse comes from the preprocessing kernel (common/simt_kernels.cu).
// Both passes are the forward's skeleton: resident register tile, streamed tiles double-buffered
// with cp.async, an unmasked stage then masked stages.
#pragma once

#include "cuda/sm80/sm80_fwd_kernel.cuh"

namespace nattn::cuda::sm80 {

// dQ pass. Shared memory: Q, dO (kBlockM rows each), then [buffer][K, V] (kBlockN rows each).
template <class Traits>
__global__ void __launch_bounds__(Traits::kThreads)
    dq_kernel(const __grid_constant__ AttentionParams p, const __grid_constant__ Geometry g) {
  using namespace cute;
  using Element = typename Traits::Element;
  constexpr int kM = Traits::kBlockM, kN = Traits::kBlockN, kD = Traits::kHeadDim;
  using Rows = ThreadRows<Traits>;
  constexpr int kSlots = Rows::kSlots;

  NATTN_DYNAMIC_SHARED(cute::uint128_t, smem_raw);
  Element* smem = reinterpret_cast<Element*>(smem_raw);
  Tensor sQ = make_tensor(make_smem_ptr(smem), typename Traits::SmemLayoutM{});
  Tensor sdO = make_tensor(make_smem_ptr(smem + Traits::kTileElemsM), typename Traits::SmemLayoutM{});
  const StreamedTiles<Traits> streamed{smem + 2 * Traits::kTileElemsM};  // [buffer][K, V]

  const int tid = threadIdx.x;
  typename Traits::TiledMma mma;
  auto thr_mma = mma.get_slice(tid);
  const Tensor s_coords = thr_mma.partition_C(make_identity_tensor(Shape<Int<kM>, Int<kN>>{}));
  const Tensor o_coords = thr_mma.partition_C(make_identity_tensor(Shape<Int<kM>, Int<kD>>{}));
  const Rows rows(tid);
  const float scale_log2 = static_cast<float>(p.scale * M_LOG2E);
  const int64_t additional_tiles = (p.num_additional + kN - 1) / kN;
  const int64_t q_tiles = g.q.count();
  const int64_t work = q_tiles * p.heads * p.batch;

  for (int64_t w = blockIdx.x; w < work; w += gridDim.x) {
    const int64_t qt = w % q_tiles;
    const int64_t h = (w / q_tiles) % p.heads;
    const int64_t b = w / (q_tiles * p.heads);
    const int64_t hk = h / (p.heads / p.kv_heads);
    const BoxRows q_rows{p.axes, g.q.locate(p.axes, qt), g.q.box};
    const TileWalk walk = forward_walk(p.axes, q_rows.origin, g.q.box, g.kv.box, additional_tiles);
    const RowSpans<kSlots> spans = row_spans<false>(p.axes, q_rows, rows.row);

    // Row terms: lse in log2 units and delta; rows that do not exist are never stored.
    float lse_log2[kSlots], delta[kSlots];
    CUTE_UNROLL
    for (int s = 0; s < kSlots; ++s) {
      load_row_terms(p, b, h, q_rows, rows.row[s], 0.f, lse_log2[s], delta[s]);
    }

    const Element* k_base = head_base<const Element>(p.k, b, hk);
    const Element* v_base = head_base<const Element>(p.v, b, hk);
    auto load_kv = [&](const WalkCursor& c, int buf) {
      load_kv_tiles<Traits>(streamed.rows(2 * buf), streamed.rows(2 * buf + 1), c, p, b, hk,
                            k_base, v_base, q_rows.origin, g.kv.box, tid);
    };

    __syncthreads();
    load_rows_async<Traits, kM>(sQ, head_base<const Element>(p.q, b, h), &p.q.stride[1], q_rows,
                                tid);
    load_rows_async<Traits, kM>(sdO, head_base<const Element>(p.d_out, b, h), &p.d_out.stride[1],
                                q_rows, tid);
    WalkCursor cur = WalkCursor::begin(walk);
    if (!cur.done()) load_kv(cur, 0);
    ops::cp_async_fence();

    Tensor acc_dq = partition_fragment_C(mma, Shape<Int<kM>, Int<kD>>{});
    clear(acc_dq);
    int buf = 0;

    auto step = [&](const auto& mask) {
      WalkCursor next = cur;
      next.advance(walk);
      ops::cp_async_wait<0>();
      __syncthreads();
      if (!next.done()) load_kv(next, buf ^ 1);
      ops::cp_async_fence();

      Tensor acc_s = partition_fragment_C(mma, Shape<Int<kM>, Int<kN>>{});
      clear(acc_s);
      gemm_rows_rows<Traits>(acc_s, sQ, streamed.rows(2 * buf), tid);
      Tensor acc_dp = partition_fragment_C(mma, Shape<Int<kM>, Int<kN>>{});
      clear(acc_dp);
      gemm_rows_rows<Traits>(acc_dp, sdO, streamed.rows(2 * buf + 1), tid);
      CUTE_UNROLL
      for (int i = 0; i < size(acc_s); ++i) acc_s(i) *= scale_log2;
      mask.apply(acc_s, s_coords);
      add_spatial_bias<false, Element>(acc_s, s_coords, p, h, q_rows, rows.row, g.kv.box, cur,
                                       mask);
      CUTE_UNROLL
      for (int m = 0; m < size<1>(acc_s); ++m) {
        CUTE_UNROLL
        for (int n = 0; n < size<2>(acc_s); ++n) {
          CUTE_UNROLL
          for (int v = 0; v < 4; ++v) {
            const int s = 2 * m + v / 2;
            const float prob = exp2f(acc_s(v, m, n) - lse_log2[s]);
            acc_s(v, m, n) = prob * (acc_dp(v, m, n) - delta[s]);  // dS
          }
        }
      }
      gemm_regs_cols<Traits>(acc_dq, scores_as_a<Traits>(acc_s), streamed.cols(2 * buf), tid);
      cur = next;
      buf ^= 1;
    };

    run_forward_walk<kN>(cur, spans, p, g, step);

    Element* dq_base = head_base<Element>(p.dq, b, h);
    const float scale = static_cast<float>(p.scale);
    CUTE_UNROLL
    for (int slot = 0; slot < kSlots; ++slot) {
      int64_t off;
      if (!q_rows.token(rows.row[slot], &p.dq.stride[1], off)) continue;
      store_row(dq_base + off, p.dq.stride[5], acc_dq, o_coords, slot, scale);
    }
  }
}

// dK/dV pass. Shared memory: K, V (kBlockM rows each), then [buffer][Q, dO] (kBlockN rows each),
// then [buffer][lse (log2 units), delta] of the streamed queries (kBlockN floats each).
// Work items: the spatial KV tiles, then the tiles of additional tokens, per kv head and batch.
template <class Traits>
__global__ void __launch_bounds__(Traits::kThreads)
    dkdv_kernel(const __grid_constant__ AttentionParams p, const __grid_constant__ Geometry g) {
  using namespace cute;
  using Element = typename Traits::Element;
  constexpr int kM = Traits::kBlockM, kN = Traits::kBlockN, kD = Traits::kHeadDim;
  using Rows = ThreadRows<Traits>;
  constexpr int kSlots = Rows::kSlots;

  NATTN_DYNAMIC_SHARED(cute::uint128_t, smem_raw);
  Element* smem = reinterpret_cast<Element*>(smem_raw);
  Tensor sK = make_tensor(make_smem_ptr(smem), typename Traits::SmemLayoutM{});
  Tensor sV = make_tensor(make_smem_ptr(smem + Traits::kTileElemsM), typename Traits::SmemLayoutM{});
  const StreamedTiles<Traits> streamed{smem + 2 * Traits::kTileElemsM};  // [buffer][Q, dO]
  float* smem_rowterms = reinterpret_cast<float*>(streamed.base + 4 * Traits::kTileElemsN);

  const int tid = threadIdx.x;
  typename Traits::TiledMma mma;
  auto thr_mma = mma.get_slice(tid);
  const Tensor s_coords = thr_mma.partition_C(make_identity_tensor(Shape<Int<kM>, Int<kN>>{}));
  const Tensor o_coords = thr_mma.partition_C(make_identity_tensor(Shape<Int<kM>, Int<kD>>{}));
  const Rows rows(tid);
  const float scale_log2 = static_cast<float>(p.scale * M_LOG2E);
  const int64_t heads_per_kv = p.heads / p.kv_heads;
  const int64_t kv_tiles = g.kv.count();
  const int64_t q_tiles = g.q.count();
  const int64_t add_tiles = (p.num_additional + kM - 1) / kM;
  const int64_t tiles = kv_tiles + add_tiles;
  const int64_t work = tiles * p.kv_heads * p.batch;

  for (int64_t w = blockIdx.x; w < work; w += gridDim.x) {
    const int64_t t = w % tiles;
    const int64_t hk = (w / tiles) % p.kv_heads;
    const int64_t b = w / (tiles * p.kv_heads);
    const bool additional = t >= kv_tiles;
    // Spatial tiles: the box of keys and the Q tiles its inverse windows reach. Tiles of
    // additional tokens: every Q tile of the layout (stage kAdditional, n = linear Q tile).
    const BoxRows kv_rows{p.axes, g.kv.locate(p.axes, additional ? 0 : t), g.kv.box};
    const AdditionalRows add_rows{(t - kv_tiles) * kM, p.num_additional};
    TileWalk walk = backward_walk(p.axes, kv_rows.origin, g.kv.box, g.q.box);
    const RowSpans<kSlots> spans = row_spans<true>(p.axes, kv_rows, rows.row);

    // Cursor over (query head of the group, stage, tile).
    struct Cursor {
      int32_t head;
      WalkCursor walk;
    };
    auto advance = [&](Cursor& c) {
      if (additional) {
        if (++c.walk.n < q_tiles) return;
        c.walk.n = 0;
        if (++c.head >= heads_per_kv) c.walk.stage = Stage::kDone;
        return;
      }
      c.walk.advance(walk);
      if (c.walk.done() && c.head + 1 < heads_per_kv) {
        ++c.head;
        c.walk = WalkCursor::begin(walk);
      }
    };
    Cursor cur{0, WalkCursor::begin(walk)};
    if (additional) {
      cur.walk.stage = q_tiles > 0 ? Stage::kAdditional : Stage::kDone;
      cur.walk.n = 0;
    }

    auto q_origin = [&](const Cursor& c) {
      if (additional) return g.q.locate(p.axes, c.walk.n);
      TileOrigin o = kv_rows.origin;
      for (int a = 0; a < kMaxRank; ++a) o.tile[a] = c.walk.tile[a];
      return o;
    };
    auto load_q = [&](const Cursor& c, int buf) {
      const int64_t h = hk * heads_per_kv + c.head;
      const BoxRows q_rows{p.axes, q_origin(c), g.q.box};
      auto sQ = streamed.rows(2 * buf);
      auto sdO = streamed.rows(2 * buf + 1);
      load_rows_async<Traits, kN>(sQ, head_base<const Element>(p.q, b, h), &p.q.stride[1], q_rows,
                                  tid);
      load_rows_async<Traits, kN>(sdO, head_base<const Element>(p.d_out, b, h),
                                  &p.d_out.stride[1], q_rows, tid);
      // Columns that are not tokens get lse = +inf (P = 0) and delta = 0.
      float* terms = smem_rowterms + buf * 2 * kN;
      for (int r = tid; r < kN; r += Traits::kThreads) {
        load_row_terms(p, b, h, q_rows, r, INFINITY, terms[r], terms[kN + r]);
      }
    };

    __syncthreads();
    if (additional) {
      load_rows_async<Traits, kM>(sK, head_base<const Element>(p.add_k, b, hk),
                                  &p.add_k.stride[1], add_rows, tid);
      load_rows_async<Traits, kM>(sV, head_base<const Element>(p.add_v, b, hk),
                                  &p.add_v.stride[1], add_rows, tid);
    } else {
      load_rows_async<Traits, kM>(sK, head_base<const Element>(p.k, b, hk), &p.k.stride[1],
                                  kv_rows, tid);
      load_rows_async<Traits, kM>(sV, head_base<const Element>(p.v, b, hk), &p.v.stride[1],
                                  kv_rows, tid);
    }
    if (!cur.walk.done()) load_q(cur, 0);
    ops::cp_async_fence();

    Tensor acc_dk = partition_fragment_C(mma, Shape<Int<kM>, Int<kD>>{});
    Tensor acc_dv = partition_fragment_C(mma, Shape<Int<kM>, Int<kD>>{});
    clear(acc_dk);
    clear(acc_dv);
    int buf = 0;

    auto step = [&](const auto& mask) {
      Cursor next = cur;
      advance(next);
      ops::cp_async_wait<0>();
      __syncthreads();
      if (!next.walk.done()) load_q(next, buf ^ 1);
      ops::cp_async_fence();

      const float* lse_log2 = smem_rowterms + buf * 2 * kN;
      const float* delta = lse_log2 + kN;
      Tensor acc_s = partition_fragment_C(mma, Shape<Int<kM>, Int<kN>>{});
      clear(acc_s);
      gemm_rows_rows<Traits>(acc_s, sK, streamed.rows(2 * buf), tid);
      Tensor acc_dp = partition_fragment_C(mma, Shape<Int<kM>, Int<kN>>{});
      clear(acc_dp);
      gemm_rows_rows<Traits>(acc_dp, sV, streamed.rows(2 * buf + 1), tid);
      CUTE_UNROLL
      for (int i = 0; i < size(acc_s); ++i) acc_s(i) *= scale_log2;
      mask.apply(acc_s, s_coords);
      add_spatial_bias<true, Element>(acc_s, s_coords, p, hk * heads_per_kv + cur.head, kv_rows,
                                      rows.row, g.q.box, cur.walk, mask);
      CUTE_UNROLL
      for (int i = 0; i < size(acc_s); ++i) {
        const int col = get<1>(s_coords(i));
        acc_s(i) = exp2f(acc_s(i) - lse_log2[col]);            // P^T
        acc_dp(i) = acc_s(i) * (acc_dp(i) - delta[col]);       // dS^T
      }
      gemm_regs_cols<Traits>(acc_dv, scores_as_a<Traits>(acc_s), streamed.cols(2 * buf + 1), tid);
      gemm_regs_cols<Traits>(acc_dk, scores_as_a<Traits>(acc_dp), streamed.cols(2 * buf), tid);
      cur = next;
      buf ^= 1;
    };

    while (!cur.walk.done()) {
      while (cur.walk.stage == Stage::kFull) step(NoMask{});
      while (cur.walk.stage == Stage::kMasked) {
        WindowMask<kSlots> mask{&spans, g.q.box, {}};
        for (int a = 0; a < kMaxRank; ++a) mask.col_origin[a] = cur.walk.tile[a] << g.q.box.log2[a];
        step(mask);
      }
      while (cur.walk.stage == Stage::kAdditional) {
        const TileOrigin o = q_origin(cur);
        BoxColumnMask mask{g.q.box, {}, {}};
        for (int a = 0; a < kMaxRank; ++a) {
          mask.col_origin[a] = o.tile[a] << g.q.box.log2[a];
          mask.group_len[a] = o.group_len[a];
        }
        step(mask);
      }
    }

    // Epilogue: the rows (keys) that exist; dK carries the softmax scale of S = scale Q K^T.
    const float scale = static_cast<float>(p.scale);
    CUTE_UNROLL
    for (int slot = 0; slot < kSlots; ++slot) {
      int64_t dk_off, dv_off;
      Element* dk_base;
      Element* dv_base;
      int64_t dk_step, dv_step;
      bool ok;
      if (additional) {
        ok = add_rows.token(rows.row[slot], &p.d_add_k.stride[1], dk_off);
        add_rows.token(rows.row[slot], &p.d_add_v.stride[1], dv_off);
        dk_base = head_base<Element>(p.d_add_k, b, hk);
        dv_base = head_base<Element>(p.d_add_v, b, hk);
        dk_step = p.d_add_k.stride[3];
        dv_step = p.d_add_v.stride[3];
      } else {
        ok = kv_rows.token(rows.row[slot], &p.dk.stride[1], dk_off);
        kv_rows.token(rows.row[slot], &p.dv.stride[1], dv_off);
        dk_base = head_base<Element>(p.dk, b, hk);
        dv_base = head_base<Element>(p.dv, b, hk);
        dk_step = p.dk.stride[5];
        dv_step = p.dv.stride[5];
      }
      if (!ok) continue;
      store_row(dk_base + dk_off, dk_step, acc_dk, o_coords, slot, scale);
      store_row(dv_base + dv_off, dv_step, acc_dv, o_coords, slot, 1.f);
    }
  }
}

}  // namespace nattn::cuda::sm80
