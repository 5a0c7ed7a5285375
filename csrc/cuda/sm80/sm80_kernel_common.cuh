// Building blocks of the SM80 tensor-core kernels (forward, dQ, dK/dV): traits, the gather of box
// tiles from global memory with cp.async, the two GEMM shapes on mma.sync through CuTe, the mask
// policies and the online softmax. Every kernel is the same skeleton: a resident register tile of
// kBlockM rows (16 per warp) against a stream of kBlockN-column tiles, double-buffered in shared
// memory.
#pragma once

#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cmath>
#include <cstdint>
#include <type_traits>

#include <cute/tensor.hpp>

#include "cuda/common/tensor_core.cuh"
#include "cuda/sm80/sm80_arch_ops.h"
#include "cuda/sm80/sm80_tiles.h"
#include "nattn/params.h"
#include "nattn/window.h"

namespace nattn::cuda::sm80 {

// Compile-time shape of one kernel instantiation.
//   Element  cute::half_t or cute::bfloat16_t (fp32 accumulation throughout)
//   kHeadDim head_dim == value_dim; a multiple of 32 so rows are whole 64-byte swizzle atoms
//   kBlockM  rows of the resident register tile: queries (forward, dQ) or keys (dK/dV); one warp
//            per 16 rows, since an mma.sync m16n8k16 tile is 16 rows high
//   kBlockN  rows of the streamed tile: keys (forward, dQ) or queries (dK/dV)
template <class Element_, int kHeadDim_, int kBlockM_, int kBlockN_>
struct KernelTraits {
  using Element = Element_;
  static constexpr int kHeadDim = kHeadDim_;
  static constexpr int kBlockM = kBlockM_;
  static constexpr int kBlockN = kBlockN_;
  static constexpr int kWarps = kBlockM / 16;
  static constexpr int kThreads = 32 * kWarps;
  static_assert(kBlockM % 16 == 0, "one warp per 16 rows of the register tile");
  static_assert(kBlockN % 16 == 0, "P is reused as an A operand in k-steps of 16");
  static_assert(kHeadDim % 32 == 0, "rows must be whole 16-byte chunks and swizzle atoms");
  static_assert(std::is_same_v<Element, cute::half_t> || std::is_same_v<Element, cute::bfloat16_t>,
                "tensor-core path is fp16/bf16 only");

  using MmaOp =
      std::conditional_t<std::is_same_v<Element, cute::half_t>, ops::MmaF16, ops::MmaBF16>;
  // Warps tile M; the N extent 16 (two 8-wide atoms) lets one ldmatrix.x4 feed a B k-step.
  using TiledMma =
      cute::TiledMMA<cute::MMA_Atom<MmaOp>, cute::Layout<cute::Shape<cute::Int<kWarps>, cute::_1,
                                                                      cute::_1>>,
                     cute::Tile<cute::Int<16 * kWarps>, cute::_16, cute::_16>>;

  // Shared-memory rows are swizzled in atoms of 8 rows x 64 elements (128 bytes per row, 3-bit
  // XOR), or 8 x 32 for head_dim 32, so that the 8 row addresses of an ldmatrix phase land in
  // distinct bank groups. The swizzle leaves the low 3 bits alone: 16-byte chunks stay whole,
  // which is what cp.async writes.
  static constexpr int kAtomCols = kHeadDim % 64 == 0 ? 64 : 32;
  static constexpr int kSwizzleBits = kAtomCols == 64 ? 3 : 2;
  using SmemAtom = decltype(cute::composition(
      cute::Swizzle<kSwizzleBits, 3, 3>{},
      cute::Layout<cute::Shape<cute::_8, cute::Int<kAtomCols>>,
                   cute::Stride<cute::Int<kAtomCols>, cute::_1>>{}));
  using SmemLayoutM = decltype(cute::tile_to_shape(
      SmemAtom{}, cute::Shape<cute::Int<kBlockM>, cute::Int<kHeadDim>>{}));
  using SmemLayoutN = decltype(cute::tile_to_shape(
      SmemAtom{}, cute::Shape<cute::Int<kBlockN>, cute::Int<kHeadDim>>{}));
  // Transposed views (head_dim x rows) for the GEMMs that reduce over the rows of a tile:
  // P.V and dS.K (streamed tile), P^T.dO and dS^T.Q (streamed tile in dK/dV).
  using SmemLayoutNt = decltype(cute::composition(
      SmemLayoutN{}, cute::make_layout(cute::Shape<cute::Int<kHeadDim>, cute::Int<kBlockN>>{},
                                       cute::LayoutRight{})));

  using LdsmRows = cute::Copy_Atom<ops::LdsmRows, Element>;
  using LdsmCols = cute::Copy_Atom<ops::LdsmCols, Element>;

  static constexpr int kTileElemsM = kBlockM * kHeadDim;
  static constexpr int kTileElemsN = kBlockN * kHeadDim;
};

// ---------------------------------------------------------------------------------------------
// Rows of a tile in global memory. token(r, off) sets the element offset of row r (relative to
// the (batch, head) base) and says whether the row exists.

// A box tile of a spatial tensor [batch, x0, x1, x2, heads, dim].
struct BoxRows {
  const AxisParams* axes;
  TileOrigin origin;
  BoxShape box;

  __device__ bool position(int r, int32_t (&pos)[kMaxRank]) const {
    bool ok = true;
#pragma unroll
    for (int a = 0; a < kMaxRank; ++a) {
      pos[a] = origin.tile[a] * box.extent(a) + box.local(r, a);
      ok = ok && pos[a] < origin.group_len[a];
    }
    return ok;
  }
  // Offset with the axis strides stride[0..2] (the caller passes &tensor.stride[1]).
  __device__ bool token(int r, const int64_t* stride, int64_t& off) const {
    int32_t pos[kMaxRank];
    const bool ok = position(r, pos);
    off = 0;
#pragma unroll
    for (int a = 0; a < kMaxRank; ++a) {
      off += (origin.group[a] + static_cast<int64_t>(axes[a].dilation) * pos[a]) * stride[a];
    }
    return ok;
  }
};

// A tile of additional tokens [batch, num_additional, heads, dim]: tokens first .. first + rows.
struct AdditionalRows {
  int64_t first;
  int64_t count;
  __device__ bool token(int r, const int64_t* stride, int64_t& off) const {
    const int64_t m = first + r;
    off = m * stride[0];
    return m < count;
  }
};

// Element pointer of a tensor at (batch, head).
template <class Element, int N>
__device__ __forceinline__ Element* head_base(const TensorRef<N>& t, int64_t b, int64_t h) {
  return static_cast<Element*>(t.data) + b * t.stride[0] + h * t.stride[N - 2];
}

// Copies kRows rows of kHeadDim elements into a swizzled shared tile with 16-byte cp.async;
// missing rows are zero-filled (src-size 0), so they never read out of bounds.
template <class Traits, int kRows, class SmemTensor, class Rows>
__device__ __forceinline__ void load_rows_async(SmemTensor& s, const typename Traits::Element* base,
                                                const int64_t* axis_stride, const Rows& rows,
                                                int tid) {
  constexpr int kChunks = Traits::kHeadDim / 8;
  static_assert(Traits::kThreads % kChunks == 0, "a pass covers whole rows");
  constexpr int kRowsPerPass = Traits::kThreads / kChunks;
  static_assert(kRows % kRowsPerPass == 0, "passes cover the tile exactly");
  const int chunk = tid % kChunks;
#pragma unroll
  for (int i = 0; i < kRows / kRowsPerPass; ++i) {
    const int r = tid / kChunks + i * kRowsPerPass;
    int64_t off;
    const bool ok = rows.token(r, axis_stride, off);
    const auto* src = reinterpret_cast<const cute::uint128_t*>(ok ? base + off + chunk * 8 : base);
    auto* dst = reinterpret_cast<cute::uint128_t*>(&s(r, chunk * 8));
    ops::CpAsyncZfill<cute::uint128_t>::copy(*src, *dst, ok);
  }
}

// The streamed tiles in shared memory: tile i (kBlockN rows) at base + i * kTileElemsN, as rows
// (rows x head_dim, for ldmatrix) or transposed (head_dim x rows, for ldmatrix.trans). Each
// kernel double-buffers a pair of them: tiles 2 * buf and 2 * buf + 1.
template <class Traits>
struct StreamedTiles {
  typename Traits::Element* base;

  __device__ __forceinline__ auto rows(int i) const {
    return cute::make_tensor(cute::make_smem_ptr(base + i * Traits::kTileElemsN),
                             typename Traits::SmemLayoutN{});
  }
  __device__ __forceinline__ auto cols(int i) const {
    return cute::make_tensor(cute::make_smem_ptr(base + i * Traits::kTileElemsN),
                             typename Traits::SmemLayoutNt{});
  }
};

// Gathers the K and V tiles at cursor `c` of a forward walk into sK, sV: a spatial tile (c.tile
// in the dilation groups of the row tile at q_origin) or a tile of additional tokens (c.n).
// k_base, v_base: the (batch, kv head) bases of K and V.
template <class Traits, class TileK, class TileV>
__device__ __forceinline__ void load_kv_tiles(TileK sK, TileV sV, const WalkCursor& c,
                                              const AttentionParams& p, int64_t b, int64_t hk,
                                              const typename Traits::Element* k_base,
                                              const typename Traits::Element* v_base,
                                              const TileOrigin& q_origin, BoxShape kv_box,
                                              int tid) {
  using Element = typename Traits::Element;
  constexpr int kN = Traits::kBlockN;
  if (c.stage == Stage::kAdditional) {
    const AdditionalRows add{c.n * kN, p.num_additional};
    load_rows_async<Traits, kN>(sK, head_base<const Element>(p.add_k, b, hk), &p.add_k.stride[1],
                                add, tid);
    load_rows_async<Traits, kN>(sV, head_base<const Element>(p.add_v, b, hk), &p.add_v.stride[1],
                                add, tid);
  } else {
    TileOrigin o = q_origin;
    for (int a = 0; a < kMaxRank; ++a) o.tile[a] = c.tile[a];
    const BoxRows kv_rows{p.axes, o, kv_box};
    load_rows_async<Traits, kN>(sK, k_base, &p.k.stride[1], kv_rows, tid);
    load_rows_async<Traits, kN>(sV, v_base, &p.v.stride[1], kv_rows, tid);
  }
}

// ---------------------------------------------------------------------------------------------
// GEMMs. Both accumulate into a C fragment of the traits' TiledMma.

// acc += A . B^T, A and B both row tiles in shared memory (rows x head_dim), read with ldmatrix.
template <class Traits, class Acc, class TA, class TB>
__device__ __forceinline__ void gemm_rows_rows(Acc& acc, const TA& sA, const TB& sB, int tid) {
  using namespace cute;
  typename Traits::TiledMma mma;
  auto thr_mma = mma.get_slice(tid);
  Tensor rA = thr_mma.partition_fragment_A(sA);
  Tensor rB = thr_mma.partition_fragment_B(sB);
  auto copy_a = make_tiled_copy_A(typename Traits::LdsmRows{}, mma);
  auto copy_b = make_tiled_copy_B(typename Traits::LdsmRows{}, mma);
  auto thr_a = copy_a.get_thread_slice(tid);
  auto thr_b = copy_b.get_thread_slice(tid);
  Tensor sA_part = thr_a.partition_S(sA);
  Tensor sB_part = thr_b.partition_S(sB);
  Tensor rA_view = thr_a.retile_D(rA);
  Tensor rB_view = thr_b.retile_D(rB);
  CUTE_UNROLL
  for (int k = 0; k < size<2>(rA); ++k) {
    copy(copy_a, sA_part(_, _, k), rA_view(_, _, k));
    copy(copy_b, sB_part(_, _, k), rB_view(_, _, k));
    gemm(mma, rA(_, _, k), rB(_, _, k), acc);
  }
}

// acc += A . B, A in registers (a converted score tile), B a transposed shared view
// (head_dim x rows) read with ldmatrix.trans.
template <class Traits, class Acc, class RA, class TB>
__device__ __forceinline__ void gemm_regs_cols(Acc& acc, const RA& rA, const TB& sBt, int tid) {
  using namespace cute;
  typename Traits::TiledMma mma;
  auto thr_mma = mma.get_slice(tid);
  Tensor rB = thr_mma.partition_fragment_B(sBt);
  auto copy_b = make_tiled_copy_B(typename Traits::LdsmCols{}, mma);
  auto thr_b = copy_b.get_thread_slice(tid);
  Tensor sB_part = thr_b.partition_S(sBt);
  Tensor rB_view = thr_b.retile_D(rB);
  CUTE_UNROLL
  for (int k = 0; k < size<2>(rA); ++k) {
    copy(copy_b, sB_part(_, _, k), rB_view(_, _, k));
    gemm(mma, rA(_, _, k), rB(_, _, k), acc);
  }
}

// A score tile (C fragment, fp32) as the A operand of the next GEMM, in the element type.
// For m16n8k16 the C fragment of two neighbouring 8-column atoms holds, value for value, the A
// fragment of one 16-deep k-step (c0..c3 of atom 2k then of atom 2k + 1 are a0..a7), so the
// conversion is a renumbering: A(v, m, k) = C(v % 4, m, 2k + v / 4). tests/test_cuda_build.py
// checks this correspondence on the host with CuTe's own layouts.
template <class Traits, class Acc>
__device__ __forceinline__ auto scores_as_a(const Acc& acc) {
  using namespace cute;
  using Element = typename Traits::Element;
  typename Traits::TiledMma mma;
  Tensor rA = make_tensor<Element>(
      partition_shape_A(mma, Shape<Int<Traits::kBlockM>, Int<Traits::kBlockN>>{}));
  static_assert(decltype(size<0>(rA))::value == 8, "m16n8k16 A fragment");
  static_assert(decltype(size<0>(acc))::value == 4, "m16n8k16 C fragment");
  CUTE_UNROLL
  for (int m = 0; m < size<1>(rA); ++m) {
    CUTE_UNROLL
    for (int k = 0; k < size<2>(rA); ++k) {
      CUTE_UNROLL
      for (int v = 0; v < 8; ++v) rA(v, m, k) = Element(acc(v % 4, m, 2 * k + v / 4));
    }
  }
  return rA;
}

// ---------------------------------------------------------------------------------------------
// Rows of the register tile owned by this thread: an m16n8k16 C fragment gives each thread rows
// lane/4 and lane/4 + 8 of its warp's 16, so 2 rows per 16-row m-tile. Slot s = 2 * m + half;
// value v of m-tile m belongs to slot 2 * m + v / 2.
template <class Traits>
struct ThreadRows {
  static constexpr int kSlots = 2 * (Traits::kBlockM / (16 * Traits::kWarps));
  int row[kSlots];

  __device__ explicit ThreadRows(int tid) {
    using namespace cute;
    typename Traits::TiledMma mma;
    auto thr_mma = mma.get_slice(tid);
    Tensor coords = thr_mma.partition_C(
        make_identity_tensor(Shape<Int<Traits::kBlockM>, Int<Traits::kBlockN>>{}));
    CUTE_UNROLL
    for (int s = 0; s < kSlots; ++s) row[s] = get<0>(coords(2 * (s % 2), s / 2, 0));
  }
};

// Per row slot and axis, the span of column positions (group positions) the row relates to:
// its window (forward, dQ: window_in_group) or its inverse window (dK/dV:
// inverse_window_in_group). Rows past the group's end take the last row's span; they are never
// stored.
template <int kSlots>
struct RowSpans {
  int32_t begin[kSlots][kMaxRank];
  int32_t end[kSlots][kMaxRank];
};

template <bool kInverse, int kSlots>
__device__ __forceinline__ RowSpans<kSlots> row_spans(const AxisParams (&axes)[kMaxRank],
                                                      const BoxRows& rows,
                                                      const int (&row)[kSlots]) {
  RowSpans<kSlots> s;
#pragma unroll
  for (int i = 0; i < kSlots; ++i) {
    int32_t pos[kMaxRank];
    rows.position(row[i], pos);
#pragma unroll
    for (int a = 0; a < kMaxRank; ++a) {
      const int32_t n = rows.origin.group_len[a];
      const int32_t j = pos[a] < n ? pos[a] : n - 1;
      const Span w = kInverse ? inverse_window_in_group(n, axes[a].kernel_size, axes[a].stride,
                                                        axes[a].is_causal, j)
                              : window_in_group(n, axes[a].kernel_size, axes[a].stride,
                                                axes[a].is_causal, j);
      s.begin[i][a] = static_cast<int32_t>(w.begin);
      s.end[i][a] = static_cast<int32_t>(w.end);
    }
  }
  return s;
}

// ---------------------------------------------------------------------------------------------
// Mask policies: apply(scores, coords) sets the scores of (row, column) pairs that do not attend
// to -inf. coords is the thread's partition of an identity tensor over the score tile.

// Full tiles: every pair attends.
struct NoMask {
  template <class Acc, class Coords>
  __device__ __forceinline__ void apply(Acc&, const Coords&) const {}
};

// Neighborhood tiles: column c (a box position of the streamed tile at `col_tile`) attends row
// slot s iff its position lies in the slot's span on every axis. The spans lie inside the group,
// so this also masks columns past the group's end.
template <int kSlots>
struct WindowMask {
  const RowSpans<kSlots>* spans;
  BoxShape col_box;
  int32_t col_origin[kMaxRank];

  template <class Acc, class Coords>
  __device__ __forceinline__ void apply(Acc& acc, const Coords& coords) const {
    using namespace cute;
    CUTE_UNROLL
    for (int m = 0; m < size<1>(acc); ++m) {
      CUTE_UNROLL
      for (int n = 0; n < size<2>(acc); ++n) {
        CUTE_UNROLL
        for (int v = 0; v < 4; ++v) {
          const int s = 2 * m + v / 2;
          const int col = get<1>(coords(v, m, n));
          bool in = true;
          CUTE_UNROLL
          for (int a = 0; a < kMaxRank; ++a) {
            const int32_t p = col_origin[a] + col_box.local(col, a);
            in = in && p >= spans->begin[s][a] && p < spans->end[s][a];
          }
          if (!in) acc(v, m, n) = -INFINITY;
        }
      }
    }
  }
};

// Tiles of additional tokens: only columns below `valid` exist.
struct CountMask {
  int valid;
  template <class Acc, class Coords>
  __device__ __forceinline__ void apply(Acc& acc, const Coords& coords) const {
    using namespace cute;
    CUTE_UNROLL
    for (int i = 0; i < size(acc); ++i) {
      if (get<1>(coords(i)) >= valid) acc(i) = -INFINITY;
    }
  }
};

// dK/dV of additional tokens against any Q tile: only columns that are tokens of the Q tile's
// groups exist (partial tiles at a group's end).
struct BoxColumnMask {
  BoxShape col_box;
  int32_t col_origin[kMaxRank];
  int32_t group_len[kMaxRank];
  template <class Acc, class Coords>
  __device__ __forceinline__ void apply(Acc& acc, const Coords& coords) const {
    using namespace cute;
    CUTE_UNROLL
    for (int i = 0; i < size(acc); ++i) {
      const int col = get<1>(coords(i));
      bool in = true;
      CUTE_UNROLL
      for (int a = 0; a < kMaxRank; ++a) {
        in = in && col_origin[a] + col_box.local(col, a) < group_len[a];
      }
      if (!in) acc(i) = -INFINITY;
    }
  }
};

// Relative positional bias (params.h: rpb; DESIGN.md section 7) of a spatial score tile, in the
// scores' log2 units: adds log2(e) * rpb[h, b0, b1, b2] to each pair of row slot s and column c
// that is not masked, with b_a = rpb_index_in_group(K_a, query position, key position) (rows
// are queries, or keys when kRowsAreKeys). Row and column tiles lie in the same dilation
// groups, so box positions are group positions. Masked pairs (-inf) are skipped: their index
// may fall outside the table. The table (a few KB) is read through the cache per element.
template <bool kRowsAreKeys, class Element, int kSlots, class Acc, class Coords>
__device__ __forceinline__ void add_tile_bias(Acc& acc, const Coords& coords,
                                              const AttentionParams& p, int64_t h,
                                              const BoxRows& row_tile, const int (&row)[kSlots],
                                              BoxShape col_box,
                                              const int32_t (&col_origin)[kMaxRank]) {
  using namespace cute;
  const Element* base = static_cast<const Element*>(p.rpb.data) + h * p.rpb.stride[0];
  int32_t row_pos[kSlots][kMaxRank];
  CUTE_UNROLL
  for (int s = 0; s < kSlots; ++s) row_tile.position(row[s], row_pos[s]);
  const float log2e = static_cast<float>(M_LOG2E);
  CUTE_UNROLL
  for (int m = 0; m < size<1>(acc); ++m) {
    CUTE_UNROLL
    for (int n = 0; n < size<2>(acc); ++n) {
      CUTE_UNROLL
      for (int v = 0; v < 4; ++v) {
        if (acc(v, m, n) == -INFINITY) continue;
        const int s = 2 * m + v / 2;
        const int col = get<1>(coords(v, m, n));
        int64_t off = 0;
        bool in = true;
        CUTE_UNROLL
        for (int a = 0; a < kMaxRank; ++a) {
          const int64_t c = col_origin[a] + col_box.local(col, a);
          const int64_t r = row_pos[s][a];
          const int64_t k = p.axes[a].kernel_size;
          const int64_t idx = kRowsAreKeys ? rpb_index_in_group(k, c, r)
                                           : rpb_index_in_group(k, r, c);
          in = in && idx >= 0 && idx < 2 * k - 1;
          off += idx * p.rpb.stride[1 + a];
        }
        if (in) acc(v, m, n) += static_cast<float>(base[off]) * log2e;
      }
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Reductions over the 4 threads of a quad, which together hold one row of a C fragment.

// Online softmax over the streamed tiles (scores already in log2 units: scale * log2(e) folded
// in), one running max and sum per row slot; the sum is kept per thread and reduced over the
// quad only at the end.
template <int kSlots>
struct OnlineSoftmax {
  float row_max[kSlots];
  float row_sum[kSlots];

  __device__ OnlineSoftmax() {
#pragma unroll
    for (int s = 0; s < kSlots; ++s) {
      row_max[s] = -INFINITY;
      row_sum[s] = 0.f;
    }
  }

  // Turns the score tile into P (unnormalized) and rescales the output accumulator.
  template <class AccS, class AccO>
  __device__ __forceinline__ void update(AccS& s, AccO& o) {
    using namespace cute;
    CUTE_UNROLL
    for (int slot = 0; slot < kSlots; ++slot) {
      const int m = slot / 2, half = slot % 2;
      float mx = row_max[slot];
      CUTE_UNROLL
      for (int n = 0; n < size<2>(s); ++n) {
        mx = fmaxf(mx, fmaxf(s(2 * half, m, n), s(2 * half + 1, m, n)));
      }
      mx = quad_max(mx);
      // A row with every score masked so far keeps max -inf; exponentiate against 0 instead so
      // that exp2(-inf - -inf) never makes a NaN.
      const float base = mx == -INFINITY ? 0.f : mx;
      const float correction = exp2f(row_max[slot] - base);
      row_max[slot] = mx;
      float sum = row_sum[slot] * correction;
      CUTE_UNROLL
      for (int n = 0; n < size<2>(s); ++n) {
        CUTE_UNROLL
        for (int c = 0; c < 2; ++c) {
          const float p = exp2f(s(2 * half + c, m, n) - base);
          s(2 * half + c, m, n) = p;
          sum += p;
        }
      }
      row_sum[slot] = sum;
      CUTE_UNROLL
      for (int n = 0; n < size<2>(o); ++n) {
        o(2 * half, m, n) *= correction;
        o(2 * half + 1, m, n) *= correction;
      }
    }
  }

  // Normalizes the output and returns the natural-log lse of each slot.
  template <class AccO>
  __device__ __forceinline__ void finish(AccO& o, float (&lse)[kSlots]) {
    using namespace cute;
    CUTE_UNROLL
    for (int slot = 0; slot < kSlots; ++slot) {
      const int m = slot / 2, half = slot % 2;
      const float sum = quad_sum(row_sum[slot]);
      const float inv = sum > 0.f ? 1.f / sum : 0.f;
      CUTE_UNROLL
      for (int n = 0; n < size<2>(o); ++n) {
        o(2 * half, m, n) *= inv;
        o(2 * half + 1, m, n) *= inv;
      }
      lse[slot] = row_max[slot] * static_cast<float>(M_LN2) + logf(sum);
    }
  }
};

// The backward's row terms of query row r of `q_rows` (head h, batch b): lse in log2 units and
// delta. A row that is not a token gets `missing_lse` and delta 0.
__device__ __forceinline__ void load_row_terms(const AttentionParams& p, int64_t b, int64_t h,
                                               const BoxRows& q_rows, int r, float missing_lse,
                                               float& lse_log2, float& delta) {
  int64_t off;
  const bool ok = q_rows.token(r, &p.lse.stride[1], off);
  const float* lse_base =
      static_cast<const float*>(p.lse.data) + b * p.lse.stride[0] + h * p.lse.stride[4];
  lse_log2 = ok ? lse_base[off] * static_cast<float>(M_LOG2E) : missing_lse;
  q_rows.token(r, &p.delta.stride[1], off);
  const float* delta_base =
      static_cast<const float*>(p.delta.data) + b * p.delta.stride[0] + h * p.delta.stride[4];
  delta = ok ? delta_base[off] : 0.f;
}

// Epilogue: stores row slot `slot` of the register tile's accumulator (kBlockM x head_dim C
// fragment, o_coords its identity partition) times `scale` to dst[col * col_stride].
template <class Element, class Acc, class Coords>
__device__ __forceinline__ void store_row(Element* dst, int64_t col_stride, const Acc& acc,
                                          const Coords& o_coords, int slot, float scale) {
  using namespace cute;
  const int m = slot / 2, half = slot % 2;
  CUTE_UNROLL
  for (int n = 0; n < size<2>(acc); ++n) {
    CUTE_UNROLL
    for (int c = 0; c < 2; ++c) {
      const int col = get<1>(o_coords(2 * half + c, m, n));
      ops::store_global(dst + col * col_stride, Element(acc(2 * half + c, m, n) * scale));
    }
  }
}

}  // namespace nattn::cuda::sm80
