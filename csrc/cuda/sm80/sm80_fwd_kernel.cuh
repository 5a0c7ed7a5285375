// SM80 tensor-core forward: one CTA per (Q tile, head, batch) work item, a box of kBlockM queries
// against the KV tiles its window union covers (TileWalk), unmasked tiles first, then masked
// tiles, then tiles of additional tokens. Per KV tile: S = Q K^T (mma.sync, ldmatrix), mask,
// online softmax in fp32 registers, O += P V. K/V tiles are gathered with cp.async into two
// shared buffers, so the next tile's copy overlaps this tile's math.
#pragma once

#include "cuda/sm80/sm80_kernel_common.cuh"

namespace nattn::cuda::sm80 {

// What a launch needs beyond AttentionParams: the tilings of queries and keys. Forward and dQ
// tile queries with the register tile (kBlockM) and keys with the streamed tile (kBlockN); dK/dV
// the other way round.
struct Geometry {
  BoxTiling q;
  BoxTiling kv;
};

// The mainloop of a forward walk (forward, dQ): step(mask) once per KV tile, with the mask policy
// of the tile's stage. step advances `cur` (the caller's cursor, read here by reference). p and g
// are the kernel's __grid_constant__ parameters, taken by reference so that the box and the
// token count are read from parameter space, not copied into registers (a copy cost the hd64
// forward a register).
template <int kBlockN, int kSlots, class Step>
__device__ __forceinline__ void run_forward_walk(const WalkCursor& cur,
                                                 const RowSpans<kSlots>& spans,
                                                 const AttentionParams& p, const Geometry& g,
                                                 Step&& step) {
  while (cur.stage == Stage::kFull) step(NoMask{});
  while (cur.stage == Stage::kMasked) {
    WindowMask<kSlots> mask{&spans, g.kv.box, {}};
    for (int a = 0; a < kMaxRank; ++a) mask.col_origin[a] = cur.tile[a] << g.kv.box.log2[a];
    step(mask);
  }
  while (cur.stage == Stage::kAdditional) {
    step(CountMask{static_cast<int>(p.num_additional - cur.n * kBlockN)});
  }
}

// The relative bias of a streamed spatial tile at cursor c (none for tiles of additional tokens:
// CountMask, BoxColumnMask), when the problem has rpb.
template <bool kRowsAreKeys, class Element, int kSlots, class Acc, class Coords, class Mask>
__device__ __forceinline__ void add_spatial_bias(Acc& acc, const Coords& coords,
                                                 const AttentionParams& p, int64_t h,
                                                 const BoxRows& row_tile,
                                                 const int (&row)[kSlots], BoxShape col_box,
                                                 const WalkCursor& c, const Mask&) {
  if constexpr (std::is_same_v<Mask, NoMask> || std::is_same_v<Mask, WindowMask<kSlots>>) {
    if (!p.has_rpb()) return;
    int32_t col_origin[kMaxRank];
    for (int a = 0; a < kMaxRank; ++a) col_origin[a] = c.tile[a] << col_box.log2[a];
    add_tile_bias<kRowsAreKeys, Element>(acc, coords, p, h, row_tile, row, col_box, col_origin);
  }
}

template <class Traits>
__global__ void __launch_bounds__(Traits::kThreads)
    forward_kernel(const __grid_constant__ AttentionParams p,
                   const __grid_constant__ Geometry g) {
  using namespace cute;
  using Element = typename Traits::Element;
  constexpr int kM = Traits::kBlockM, kN = Traits::kBlockN, kD = Traits::kHeadDim;
  using Rows = ThreadRows<Traits>;
  constexpr int kSlots = Rows::kSlots;

  NATTN_DYNAMIC_SHARED(cute::uint128_t, smem_raw);
  Element* smem = reinterpret_cast<Element*>(smem_raw);
  Tensor sQ = make_tensor(make_smem_ptr(smem), typename Traits::SmemLayoutM{});
  const StreamedTiles<Traits> streamed{smem + Traits::kTileElemsM};  // [buffer][K, V]

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

    const Element* k_base = head_base<const Element>(p.k, b, hk);
    const Element* v_base = head_base<const Element>(p.v, b, hk);
    auto load_kv = [&](const WalkCursor& c, int buf) {
      load_kv_tiles<Traits>(streamed.rows(2 * buf), streamed.rows(2 * buf + 1), c, p, b, hk,
                            k_base, v_base, q_rows.origin, g.kv.box, tid);
    };

    __syncthreads();  // the previous work item is done with every shared buffer
    load_rows_async<Traits, kM>(sQ, head_base<const Element>(p.q, b, h), &p.q.stride[1], q_rows,
                                tid);
    WalkCursor cur = WalkCursor::begin(walk);
    if (!cur.done()) load_kv(cur, 0);
    ops::cp_async_fence();

    Tensor acc_o = partition_fragment_C(mma, Shape<Int<kM>, Int<kD>>{});
    clear(acc_o);
    OnlineSoftmax<kSlots> softmax;
    int buf = 0;

    // One KV tile: wait for its copy, start the next one, then S, mask, softmax, O += P V.
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
      CUTE_UNROLL
      for (int i = 0; i < size(acc_s); ++i) acc_s(i) *= scale_log2;
      mask.apply(acc_s, s_coords);
      add_spatial_bias<false, Element>(acc_s, s_coords, p, h, q_rows, rows.row, g.kv.box, cur,
                                       mask);
      softmax.update(acc_s, acc_o);
      gemm_regs_cols<Traits>(acc_o, scores_as_a<Traits>(acc_s), streamed.cols(2 * buf + 1), tid);
      cur = next;
      buf ^= 1;
    };

    run_forward_walk<kN>(cur, spans, p, g, step);

    // Epilogue: normalize, write the rows that exist, and their lse (one thread per quad).
    float lse[kSlots];
    softmax.finish(acc_o, lse);
    Element* out_base = head_base<Element>(p.out, b, h);
    float* lse_base = static_cast<float*>(p.lse.data) + b * p.lse.stride[0] + h * p.lse.stride[4];
    CUTE_UNROLL
    for (int slot = 0; slot < kSlots; ++slot) {
      int64_t out_off, lse_off;
      if (!q_rows.token(rows.row[slot], &p.out.stride[1], out_off)) continue;
      q_rows.token(rows.row[slot], &p.lse.stride[1], lse_off);
      store_row(out_base + out_off, p.out.stride[5], acc_o, o_coords, slot, 1.f);
      if (tid % 4 == 0) ops::store_global(lse_base + lse_off, lse[slot]);
    }
  }
}

}  // namespace nattn::cuda::sm80
