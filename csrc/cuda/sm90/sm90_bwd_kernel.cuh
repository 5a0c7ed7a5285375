// Hopper (sm_90a) fused neighborhood-attention backward: warp-specialized, TMA + wgmma, no
// atomics (every gradient element is written once, by the CTA that owns its row, after a fixed
// order of products: bit-identical run to run and schedule to schedule).
//
// One kernel template, two passes (the SM80 backward's decomposition, sm80_bwd_kernel.cuh):
//   dQ pass   (kKeySide = false): one CTA per (Q tile, query head, batch). Resident: the Q tile X
//             and its dO tile Y; streamed: the K tile U and V tile W of each KV tile of the
//             forward walk (full tiles, then masked ones).
//             S = Q K^T, P = exp2(S scale log2e - lse log2e), dP = dO V^T, dS = P (dP - delta),
//             dQ += dS K.
//   dK/dV pass (kKeySide = true): one CTA per (KV tile, kv head, batch). Resident: the K tile X
//             and V tile Y; streamed: the Q tile U and dO tile W of each Q tile of the inverse
//             walk (box_tiling.h: backward_walk, window.h's inverse windows), for every query head
//             of the GQA group in turn (K and V are never repeated).
// Additional (global) key/value tokens: the dQ pass walks their tiles after the spatial ones
// (stage kAdditional of the forward walk, masked by the token count); the dK/dV pass has one
// more CTA per additional tile (and kv head, batch), which walks every Q tile of the layout.
//             S^T = K Q^T, P^T, dP^T = V dO^T, dS^T = P^T (dP^T - delta), dV += P^T dO,
//             dK += dS^T Q.
// delta = rowsum(dO * O) - d_lse comes from the preprocessing kernel (common/simt_kernels.cu).
//
// Warpgroups (as the forward):
//   producer   (warpgroup 0): one thread issues the TMA copies, the resident pair once, then each
//              streamed pair into a ring of kStages stages (mbarriers full / empty). In the dK/dV
//              pass the 128 producer threads also copy the row terms (lse in log2 units, delta) of
//              the streamed queries into the stage, one query each, and arrive on `full` too.
//   consumers  (warpgroups 1 and 2, 64 resident rows each): the products above. A streamed tile is
//              consumed in two halves of 64 rows (sm90_config.h: the register budget), each half:
//              S and dP (SS wgmma, both operands K-major in shared memory), the window mask on
//              masked tiles, P and dS in fp32 registers, then the gradient products (RS wgmma: P /
//              dS as 16-bit A registers, the streamed tile read as an MN-major B operand, as the
//              forward reads V^T).
// Not yet here (the forward has it): the ping-pong of the two consumers and the overlap of one
// half's elementwise work with the next half's products; each half waits for its products.
#pragma once

#include <cuda.h>  // CUtensorMap (a type only)
#include <cuda_runtime.h>

#include <cmath>
#include <cstdint>
#include <type_traits>

#include "cuda/sm90/sm90_arch_ops.h"  // before CuTe: the emulator's seam sets CuTe options
#include <cute/tensor.hpp>

#include "cuda/common/box_tiling.h"
#include "cuda/common/tensor_core.cuh"
#include "cuda/sm90/sm90_config.h"
#include "cuda/sm90/sm90_fwd_kernel.cuh"  // wgmma_gemm, offset_coordinate, tma_load_tile
#include "cuda/sm90/sm90_plan.h"
#include "nattn/params.h"
#include "nattn/window.h"

namespace nattn::cuda::sm90 {

// Everything the two kernels read, passed by value as a __grid_constant__ parameter: 32 tensor
// maps of 128 bytes (Q, K, V, dO x 8 ragged-group variants), 2 for additional tokens and the
// rest, about 4.9 KiB. Kernel
// parameters beyond 4 KiB need CUDA 12.1 or newer (toolkit and driver, 32764 bytes), which
// every toolkit that builds these kernels (nvcc 13) and its sm_90 drivers have.
struct BackwardParams {
  CUtensorMap q_map[kMaxVariants];
  CUtensorMap k_map[kMaxVariants];
  CUtensorMap v_map[kMaxVariants];
  CUtensorMap do_map[kMaxVariants];
  CUtensorMap add_k_map;  // additional keys / values (sm90_plan.h: plan_additional_view)
  CUtensorMap add_v_map;
  AxisParams axes[kMaxRank];
  BoxTiling q;   // Q tiles: the dQ pass's CTAs, the dK/dV pass's streamed tiles
  BoxTiling kv;  // KV tiles: the dK/dV pass's CTAs, the dQ pass's streamed tiles
  OffsetCoefficients q_coef;
  OffsetCoefficients k_coef;
  OffsetCoefficients v_coef;
  OffsetCoefficients do_coef;
  OffsetCoefficients add_k_coef;
  OffsetCoefficients add_v_coef;
  int64_t num_additional;
  int32_t add_tiles;  // tiles of kKvRows additional tokens
  int64_t heads;
  int64_t kv_heads;
  int64_t heads_per_kv;
  const float* lse;
  int64_t lse_stride[5];
  const float* delta;
  int64_t delta_stride[5];
  void* dq;
  int64_t dq_stride[6];
  void* dk;
  int64_t dk_stride[6];
  void* dv;
  int64_t dv_stride[6];
  void* d_add_k;
  int64_t d_add_k_stride[4];
  void* d_add_v;
  int64_t d_add_v_stride[4];
  float scale;       // dQ and dK carry the softmax scale of S = scale Q K^T
  float scale_log2;  // scale * log2(e): scores in log2 units, exp2
};
static_assert(sizeof(BackwardParams) <= 32764, "kernel parameters are limited to 32764 bytes");

// Compile-time shape of one backward instantiation (both passes).
//   Element   cute::half_t or cute::bfloat16_t (fp32 accumulation)
//   kHeadDim  head_dim == value_dim, 32, 64 or 128
template <class Element_, int kHeadDim_>
struct BackwardTraits {
  using Element = Element_;
  static constexpr int kHeadDim = kHeadDim_;
  static_assert(kQRows == kKvRows, "one tile height serves the resident and the streamed tiles");
  static constexpr int kRows = kQRows;  // 128
  static constexpr int kHalf = kBackwardHalf;
  static constexpr int kHalves = kRows / kHalf;
  static_assert(kHalves == 2, "the half views below split a 128-row tile in two");
  static constexpr int kStages = backward_stages(kHeadDim);
  // TMA boxes per tile: 64-column chunks (128-byte swizzle), or one 32-column box (64-byte).
  static constexpr bool kNarrow = kHeadDim < kHeadDimChunk;
  static constexpr int kChunks = kNarrow ? 1 : kHeadDim / kHeadDimChunk;
  static_assert(kHeadDim == 32 || kHeadDim % kHeadDimChunk == 0,
                "a tile row is one 64-byte or whole 128-byte swizzle rows");
  static_assert(std::is_same_v<Element, cute::half_t> || std::is_same_v<Element, cute::bfloat16_t>,
                "wgmma path is fp16/bf16 only");
  static constexpr uint32_t kTileBytes = kRows * kHeadDim * sizeof(Element);

  // K-major tiles with a 128-byte swizzle, chunk by chunk, exactly as the forward's (and as one
  // TMA box per 64-column chunk writes them); head dim 32: 64-byte rows, 64-byte swizzle.
  using SmemAtom = std::conditional_t<kNarrow, cute::GMMA::Layout_K_SW64_Atom<Element>,
                                      cute::GMMA::Layout_K_SW128_Atom<Element>>;
  using SmemLayoutRes = decltype(cute::tile_to_shape(
      SmemAtom{}, cute::Shape<cute::Int<kRows>, cute::Int<kHeadDim>>{}));
  using SmemLayoutStr = decltype(cute::tile_to_shape(
      SmemAtom{}, cute::Shape<cute::Int<kRows>, cute::Int<kHeadDim>, cute::Int<kStages>>{}));
  // The streamed tiles as (row, column, half, stage): rows 64 h .. 64 h + 63 of a stage, the
  // B operand (N = 64 rows, K = head_dim) of S / dP. Composition maps into the (row, column,
  // stage) coordinates of SmemLayoutStr: index row + 64 half + 128 column + 128 D stage.
  using SmemLayoutHalves = decltype(cute::composition(
      SmemLayoutStr{},
      cute::make_layout(cute::Shape<cute::Int<kHalf>, cute::Int<kHeadDim>, cute::Int<kHalves>,
                                    cute::Int<kStages>>{},
                        cute::Stride<cute::_1, cute::Int<kRows>, cute::Int<kHalf>,
                                     cute::Int<kRows * kHeadDim>>{})));
  // The same halves transposed, (column, row, half, stage): the MN-major B operand (N = head_dim,
  // K = 64 rows) of the gradient products, as the forward reads V^T.
  using SmemLayoutHalvesT = decltype(cute::composition(
      SmemLayoutStr{},
      cute::make_layout(cute::Shape<cute::Int<kHeadDim>, cute::Int<kHalf>, cute::Int<kHalves>,
                                    cute::Int<kStages>>{},
                        cute::Stride<cute::Int<kRows>, cute::_1, cute::Int<kHalf>,
                                     cute::Int<kRows * kHeadDim>>{})));

  // Two warpgroups along M (64 resident rows each). Scores: 64 x 64 per warpgroup and half, both
  // operands in shared memory; gradients: 64 x head_dim, A (P or dS) from registers.
  using AtomLayout = cute::Layout<cute::Shape<cute::Int<kConsumerWarpgroups>, cute::_1, cute::_1>>;
  using MmaScores = decltype(cute::make_tiled_mma(
      ops::WgmmaSS<Element, kHalf, ops::Major::K, ops::Major::K>{}, AtomLayout{}));
  using MmaGrad = decltype(cute::make_tiled_mma(
      ops::WgmmaRS<Element, kHeadDim, ops::Major::K, ops::Major::MN>{}, AtomLayout{}));

  struct alignas(1024) Shared {
    cute::array_aligned<Element, cute::cosize_v<SmemLayoutRes>, 1024> x;  // Q or K
    cute::array_aligned<Element, cute::cosize_v<SmemLayoutRes>, 1024> y;  // dO or V
    cute::array_aligned<Element, cute::cosize_v<SmemLayoutStr>, 1024> u;  // K or Q, per stage
    cute::array_aligned<Element, cute::cosize_v<SmemLayoutStr>, 1024> w;  // V or dO, per stage
    float lse_log2[kStages][kRows];  // dK/dV pass: row terms of the streamed queries
    float delta[kStages][kRows];
    uint64_t res_full;
    uint64_t full[kStages];
    uint64_t empty[kStages];
  };
  static_assert(sizeof(Shared) + 1024 <= backward_smem_bytes(kHeadDim),
                "sm90_config.h: backward_smem_bytes");
};

// Element offset (axis strides stride[0..2]) of row `row` of the box tile at `o`; false for a row
// past its group's end (no token).
__device__ __forceinline__ bool box_row_token(const AxisParams (&axes)[kMaxRank],
                                              const TileOrigin& o, const BoxShape& box, int row,
                                              const int64_t* stride, int64_t& off) {
  bool valid = true;
  off = 0;
#pragma unroll
  for (int a = 0; a < kMaxRank; ++a) {
    const int32_t pos = static_cast<int32_t>(o.tile[a] * box.extent(a)) + box.local(row, a);
    valid = valid && pos < o.group_len[a];
    off += (o.group[a] + axes[a].dilation * static_cast<int64_t>(pos)) * stride[a];
  }
  return valid;
}

template <class Traits, bool kKeySide>
__global__ void __launch_bounds__(kThreads, 1)
    backward_kernel(const __grid_constant__ BackwardParams p) {
  using namespace cute;
  using Element = typename Traits::Element;
  using Shared = typename Traits::Shared;
  using Barrier = ops::Barrier;
  using TxBarrier = ops::TxBarrier;
  constexpr int kRows = Traits::kRows, kHalf = Traits::kHalf, kD = Traits::kHeadDim;
  constexpr int kStages = Traits::kStages;
  constexpr int kConsumerThreads = 128 * kConsumerWarpgroups;
  // The dK/dV pass's row terms are copied by the whole producer warpgroup, one query each.
  constexpr int kFullArrivals = kKeySide ? 128 : 1;
  static_assert(!kKeySide || kRows == 128, "one producer thread per streamed query");

  NATTN_DYNAMIC_SHARED(char, smem_raw);
  // The 128-byte swizzle repeats every 1024 bytes and TMA swizzles by shared address: align.
  const uint32_t raw_addr = ops::shared_address(smem_raw);
  Shared& s = *reinterpret_cast<Shared*>(smem_raw + ((1024 - raw_addr % 1024) % 1024));

  const int warpgroup = threadIdx.x / 128;
  const BoxTiling& res_tiling = kKeySide ? p.kv : p.q;
  const BoxShape str_box = kKeySide ? p.q.box : p.kv.box;
  const int64_t spatial_tiles = res_tiling.count();
  const int64_t res_tiles = spatial_tiles + (kKeySide ? p.add_tiles : 0);
  const int64_t rt = blockIdx.x % res_tiles;
  const int64_t hr = blockIdx.x / res_tiles;  // kv head (dK/dV) or query head (dQ)
  const int64_t b = blockIdx.y;
  // dK/dV pass: a resident tile of additional tokens (attended by every query).
  const bool additional = kKeySide && rt >= spatial_tiles;
  const int64_t add_first = (rt - spatial_tiles) * kRows;  // its first token
  const TileOrigin origin = res_tiling.locate(p.axes, additional ? 0 : rt);
  const TileWalk walk = kKeySide ? backward_walk(p.axes, origin, p.kv.box, p.q.box)
                                 : forward_walk(p.axes, origin, p.q.box, p.kv.box, p.add_tiles);
  const int32_t q_count = static_cast<int32_t>(p.q.count());
  // Streamed steps: the walk once, then the additional tiles (dQ); the walk, or every Q tile of
  // the layout for an additional tile, once per query head of the GQA group (dK/dV).
  const int32_t hpk = static_cast<int32_t>(p.heads_per_kv);
  const int32_t n_steps = !kKeySide   ? walk.visited() + p.add_tiles
                          : additional ? q_count * hpk
                                       : walk.visited() * hpk;
  const int variant = tma_variant(p.axes, origin.group);
  // Same cursor on both sides: the walk (restarted for the next query head when it ends), or for
  // an additional tile stage kAdditional with n the linear Q tile.
  auto begin = [&]() {
    WalkCursor c = WalkCursor::begin(walk);
    if (additional) {
      c.stage = Stage::kAdditional;
      c.n = 0;
    }
    return c;
  };
  auto advance = [&](WalkCursor& cur, int32_t& head) {
    if (additional) {
      if (++cur.n == q_count) {
        cur.n = 0;
        ++head;
      }
      return;
    }
    cur.advance(walk);
    if (cur.done()) {
      cur = WalkCursor::begin(walk);
      ++head;
    }
  };
  // The tile origin (dilation groups, tile indices) of the streamed tile at `cur`.
  auto streamed_origin = [&](const WalkCursor& cur) {
    if (additional) return p.q.locate(p.axes, cur.n);
    TileOrigin o = origin;
    for (int a = 0; a < kMaxRank; ++a) o.tile[a] = cur.tile[a];
    return o;
  };

  if (threadIdx.x == 0) {
    TxBarrier::init(&s.res_full, 1);
    for (int i = 0; i < kStages; ++i) {
      TxBarrier::init(&s.full[i], kFullArrivals);
      Barrier::init(&s.empty[i], kConsumerThreads);
    }
    ops::fence_barrier_init();
  }
  __syncthreads();

  if (warpgroup == 0) {
    // ---------------------------------------------------------------- producer
    ops::reg_dealloc<kProducerRegisters>();
    if (!kKeySide && threadIdx.x != 0) return;
    const bool leader = threadIdx.x == 0;
    const CUtensorMap* x_map = kKeySide ? (additional ? &p.add_k_map : &p.k_map[variant])
                                        : &p.q_map[variant];
    const CUtensorMap* y_map = kKeySide ? (additional ? &p.add_v_map : &p.v_map[variant])
                                        : &p.do_map[variant];
    const OffsetCoefficients& x_coef = kKeySide ? (additional ? p.add_k_coef : p.k_coef)
                                                : p.q_coef;
    const OffsetCoefficients& y_coef = kKeySide ? (additional ? p.add_v_coef : p.v_coef)
                                                : p.do_coef;
    const OffsetCoefficients& u_coef = kKeySide ? p.q_coef : p.k_coef;
    const OffsetCoefficients& w_coef = kKeySide ? p.do_coef : p.v_coef;
    int32_t pos[kMaxRank];
    if (leader) {
      ops::prefetch_tma_descriptor(x_map);
      ops::prefetch_tma_descriptor(y_map);
      for (int a = 0; a < kMaxRank; ++a) {
        pos[a] = static_cast<int32_t>(origin.tile[a] * res_tiling.box.extent(a));
      }
      if (additional) {  // the 5-D view of additional tokens: tokens along dim 1 (pos[2])
        pos[0] = pos[1] = 0;
        pos[2] = static_cast<int32_t>(add_first);
      }
      TxBarrier::arrive_and_expect_tx(&s.res_full, 2 * Traits::kTileBytes);
      tma_load_tile<Traits>(x_map, &s.res_full, s.x.data(), pos,
                            offset_coordinate(x_coef, b, hr, origin), kRows);
      tma_load_tile<Traits>(y_map, &s.res_full, s.y.data(), pos,
                            offset_coordinate(y_coef, b, hr, origin), kRows);
    }
    WalkCursor cur = begin();
    int32_t head = 0;
    for (int32_t j = 0; j < n_steps; ++j, advance(cur, head)) {
      const int stage = j % kStages;
      const uint32_t phase = (j / kStages) & 1;
      Barrier::wait(&s.empty[stage], phase ^ 1);  // the first pass finds every stage free
      // The streamed tiles' head: a query head of the group (dK/dV) or the kv head (dQ).
      const int64_t hs = kKeySide ? hr * p.heads_per_kv + head : hr / p.heads_per_kv;
      const TileOrigin so = streamed_origin(cur);
      if constexpr (kKeySide) {
        // Row terms of streamed query threadIdx.x, written before this thread's arrival (the
        // mbarrier's release / acquire orders them before the consumers' reads). Queries that
        // are no token get lse = +inf (P = 0) and delta = 0.
        int64_t lse_off, delta_off;
        const int r = threadIdx.x;
        const bool valid = box_row_token(p.axes, so, str_box, r, &p.lse_stride[1], lse_off);
        box_row_token(p.axes, so, str_box, r, &p.delta_stride[1], delta_off);
        s.lse_log2[stage][r] =
            valid ? p.lse[b * p.lse_stride[0] + hs * p.lse_stride[4] + lse_off] *
                        static_cast<float>(M_LOG2E)
                  : INFINITY;
        s.delta[stage][r] =
            valid ? p.delta[b * p.delta_stride[0] + hs * p.delta_stride[4] + delta_off] : 0.f;
        if (!leader) Barrier::arrive(&s.full[stage]);
      }
      if (leader) {
        // dQ: a tile of additional keys/values, or a spatial KV tile; dK/dV: a Q tile, whose
        // dilation groups (hence map variant) are the resident tile's unless that one holds
        // additional tokens.
        const bool add_stream = !kKeySide && cur.stage == Stage::kAdditional;
        const int sv = tma_variant(p.axes, so.group);
        const CUtensorMap* u_map =
            kKeySide ? &p.q_map[sv] : (add_stream ? &p.add_k_map : &p.k_map[sv]);
        const CUtensorMap* w_map =
            kKeySide ? &p.do_map[sv] : (add_stream ? &p.add_v_map : &p.v_map[sv]);
        const OffsetCoefficients& uc = add_stream ? p.add_k_coef : u_coef;
        const OffsetCoefficients& wc = add_stream ? p.add_v_coef : w_coef;
        for (int a = 0; a < kMaxRank; ++a) {
          pos[a] = static_cast<int32_t>(so.tile[a] * str_box.extent(a));
        }
        if (add_stream) {
          pos[0] = pos[1] = 0;
          pos[2] = cur.n * kRows;
        }
        Element* u_tile = s.u.data() + stage * kRows * kD;
        Element* w_tile = s.w.data() + stage * kRows * kD;
        TxBarrier::arrive_and_expect_tx(&s.full[stage], 2 * Traits::kTileBytes);
        tma_load_tile<Traits>(u_map, &s.full[stage], u_tile, pos,
                              offset_coordinate(uc, b, hs, so), kRows);
        tma_load_tile<Traits>(w_map, &s.full[stage], w_tile, pos,
                              offset_coordinate(wc, b, hs, so), kRows);
      }
    }
    return;
  }

  // ------------------------------------------------------------------ consumers
  ops::reg_alloc<kConsumerRegisters>();
  const int ctid = threadIdx.x - 128;  // 0 .. 255

  Tensor sX = make_tensor(make_smem_ptr(s.x.data()), typename Traits::SmemLayoutRes{});
  Tensor sY = make_tensor(make_smem_ptr(s.y.data()), typename Traits::SmemLayoutRes{});
  Tensor sU = make_tensor(make_smem_ptr(s.u.data()), typename Traits::SmemLayoutHalves{});
  Tensor sW = make_tensor(make_smem_ptr(s.w.data()), typename Traits::SmemLayoutHalves{});
  Tensor sUt = make_tensor(make_smem_ptr(s.u.data()), typename Traits::SmemLayoutHalvesT{});
  Tensor sWt = make_tensor(make_smem_ptr(s.w.data()), typename Traits::SmemLayoutHalvesT{});

  typename Traits::MmaScores mma_s;
  typename Traits::MmaGrad mma_g;
  auto thr_s = mma_s.get_thread_slice(ctid);
  auto thr_g = mma_g.get_thread_slice(ctid);
  Tensor tSrX = thr_s.partition_fragment_A(sX);    // (desc, 1, kD / 16)
  Tensor tSrY = thr_s.partition_fragment_A(sY);
  Tensor tSrU = thr_s.partition_fragment_B(sU);    // (desc, 1, kD / 16, halves, kStages)
  Tensor tSrW = thr_s.partition_fragment_B(sW);
  Tensor tGrUt = thr_g.partition_fragment_B(sUt);  // (desc, 1, kHalf / 16, halves, kStages)
  Tensor tGrWt = thr_g.partition_fragment_B(sWt);
  Tensor tSrS = partition_fragment_C(mma_s, Shape<Int<kRows>, Int<kHalf>>{});   // S or S^T
  Tensor tSrdP = partition_fragment_C(mma_s, Shape<Int<kRows>, Int<kHalf>>{});  // dP or dP^T
  Tensor tScS = thr_s.partition_C(make_identity_tensor(Shape<Int<kRows>, Int<kHalf>>{}));
  Tensor tGrA = partition_fragment_C(mma_g, Shape<Int<kRows>, Int<kD>>{});  // dQ or dK
  Tensor tGrB = partition_fragment_C(mma_g, Shape<Int<kRows>, Int<kD>>{});  // dV (dK/dV pass)
  Tensor tGcG = thr_g.partition_C(make_identity_tensor(Shape<Int<kRows>, Int<kD>>{}));
  // P and dS as A operands: value (v0, v1, v2) of k-block kb is value (v0, v1, 2 kb + v2) of the
  // 64 x 64 C fragment (as the forward's P).
  Tensor tGrP = make_tensor<Element>(Layout<Shape<Shape<_2, _2, _2>, _1, Int<kHalf / 16>>>{});
  Tensor tGrdS = make_tensor<Element>(Layout<Shape<Shape<_2, _2, _2>, _1, Int<kHalf / 16>>>{});
  static_assert(decltype(size<0, 2>(tSrS))::value == kHalf / 8, "64 x 64 wgmma accumulator");
  static_assert(decltype(size<0, 2>(tGrA))::value == kD / 8, "64 x kD wgmma accumulator");

  // The thread's two resident rows (row half v1 = 0, 1) and, per axis, the group positions of the
  // other side they pair with: the query's window (dQ) or the key's inverse window (dK/dV). A
  // row past its group's end takes the last row's; it is never stored.
  const BoxShape res_box = res_tiling.box;
  int row[2];
  int32_t span_begin[2][kMaxRank], span_end[2][kMaxRank];
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    row[r] = get<0>(tScS(make_coord(0, r, 0), 0, 0));
#pragma unroll
    for (int a = 0; a < kMaxRank; ++a) {
      const int32_t n = origin.group_len[a];
      int32_t j = static_cast<int32_t>(origin.tile[a] * res_box.extent(a)) +
                  res_box.local(row[r], a);
      j = j < n ? j : n - 1;
      const AxisParams& ax = p.axes[a];
      const Span w =
          kKeySide ? inverse_window_in_group(n, ax.kernel_size, ax.stride, ax.is_causal, j)
                   : window_in_group(n, ax.kernel_size, ax.stride, ax.is_causal, j);
      span_begin[r][a] = static_cast<int32_t>(w.begin);
      span_end[r][a] = static_cast<int32_t>(w.end);
    }
  }
  // dQ pass: the row terms of the thread's two query rows (lse in log2 units, delta); rows that
  // are no token get lse = +inf (P = 0).
  float row_lse[2] = {0.f, 0.f}, row_delta[2] = {0.f, 0.f};
  if constexpr (!kKeySide) {
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      int64_t lse_off, delta_off;
      const bool valid = box_row_token(p.axes, origin, res_box, row[r], &p.lse_stride[1], lse_off);
      box_row_token(p.axes, origin, res_box, row[r], &p.delta_stride[1], delta_off);
      row_lse[r] = valid ? p.lse[b * p.lse_stride[0] + hr * p.lse_stride[4] + lse_off] *
                               static_cast<float>(M_LOG2E)
                         : INFINITY;
      row_delta[r] =
          valid ? p.delta[b * p.delta_stride[0] + hr * p.delta_stride[4] + delta_off] : 0.f;
    }
  }

  // S, dP of one half -> P (in tSrS) and dS (in tSrdP), then both as 16-bit A operands.
  auto probabilities = [&](const WalkCursor& cur, int stage, int half) {
    int32_t col_origin[kMaxRank];
    for (int a = 0; a < kMaxRank; ++a) {
      col_origin[a] = static_cast<int32_t>(cur.tile[a] * str_box.extent(a));
    }
    const bool masked = cur.stage == Stage::kMasked;
    // dQ over a tile of additional tokens: the tokens past num_additional (TMA zero rows).
    const bool token_bound = !kKeySide && cur.stage == Stage::kAdditional;
    const int64_t token_first = static_cast<int64_t>(cur.n) * kRows;
    CUTE_UNROLL
    for (int r = 0; r < 2; ++r) {
      CUTE_UNROLL
      for (int c = 0; c < kHalf / 8; ++c) {
        CUTE_UNROLL
        for (int v = 0; v < 2; ++v) {
          const int col = get<1>(tScS(make_coord(v, r, c), 0, 0)) + half * kHalf;
          float score = tSrS(make_coord(v, r, c), 0, 0) * p.scale_log2;
          if (masked) {
            bool in = true;
            CUTE_UNROLL
            for (int a = 0; a < kMaxRank; ++a) {
              const int32_t pos = col_origin[a] + str_box.local(col, a);
              in = in && pos >= span_begin[r][a] && pos < span_end[r][a];
            }
            if (!in) score = -INFINITY;
          }
          if (token_bound && token_first + col >= p.num_additional) score = -INFINITY;
          const float lse = kKeySide ? s.lse_log2[stage][col] : row_lse[r];
          const float delta = kKeySide ? s.delta[stage][col] : row_delta[r];
          const float prob = exp2f(score - lse);
          tSrS(make_coord(v, r, c), 0, 0) = prob;
          tSrdP(make_coord(v, r, c), 0, 0) = prob * (tSrdP(make_coord(v, r, c), 0, 0) - delta);
        }
      }
    }
    CUTE_UNROLL
    for (int kb = 0; kb < kHalf / 16; ++kb) {
      CUTE_UNROLL
      for (int v2 = 0; v2 < 2; ++v2) {
        CUTE_UNROLL
        for (int r = 0; r < 2; ++r) {
          CUTE_UNROLL
          for (int v = 0; v < 2; ++v) {
            tGrP(make_coord(v, r, v2), 0, kb) = Element(tSrS(make_coord(v, r, 2 * kb + v2), 0, 0));
            tGrdS(make_coord(v, r, v2), 0, kb) =
                Element(tSrdP(make_coord(v, r, 2 * kb + v2), 0, 0));
          }
        }
      }
    }
  };

  TxBarrier::wait(&s.res_full, 0);
  clear(tGrA);
  clear(tGrB);
  WalkCursor cur = begin();
  int32_t head = 0;
  for (int32_t j = 0; j < n_steps; ++j, advance(cur, head)) {
    const int stage = j % kStages;
    TxBarrier::wait(&s.full[stage], (j / kStages) & 1);
    CUTE_UNROLL
    for (int half = 0; half < Traits::kHalves; ++half) {
      wgmma_gemm<true>(mma_s, tSrX, tSrU(_, _, _, half, stage), tSrS);
      wgmma_gemm<true>(mma_s, tSrY, tSrW(_, _, _, half, stage), tSrdP);
      ops::wgmma_wait<0>();
      ops::fence_operand(tSrS);  // the reads below must not move above the wait
      ops::fence_operand(tSrdP);
      probabilities(cur, stage, half);
      ops::fence_operand(tGrP);
      ops::fence_operand(tGrdS);
      if constexpr (kKeySide) {
        wgmma_gemm<false>(mma_g, tGrP, tGrWt(_, _, _, half, stage), tGrB);   // dV += P^T dO
        wgmma_gemm<false>(mma_g, tGrdS, tGrUt(_, _, _, half, stage), tGrA);  // dK += dS^T Q
      } else {
        wgmma_gemm<false>(mma_g, tGrdS, tGrUt(_, _, _, half, stage), tGrA);  // dQ += dS K
      }
      ops::wgmma_wait<0>();  // the A registers are rewritten by the next half
      ops::fence_operand(tGrA);
      ops::fence_operand(tGrB);
    }
    Barrier::arrive(&s.empty[stage]);
  }

  // ---------------------------------------------------------------- epilogue
  // The resident rows that exist, paired 4-byte stores: dQ and dK times the softmax scale.
  // Spatial rows: [B, x0, x1, x2, heads, D] strides; rows of additional tokens: [B, M, heads, D].
  auto store = [&](void* base, const int64_t* stride, int64_t head_index, const auto& acc,
                   float factor) {
    Element* out = static_cast<Element*>(base) + b * stride[0] +
                   head_index * stride[additional ? 2 : 4];
    CUTE_UNROLL
    for (int r = 0; r < 2; ++r) {
      int64_t off;
      if (additional) {
        off = (add_first + row[r]) * stride[1];
        if (add_first + row[r] >= p.num_additional) continue;
      } else if (!box_row_token(p.axes, origin, res_box, row[r], &stride[1], off)) {
        continue;
      }
      CUTE_UNROLL
      for (int c = 0; c < kD / 8; ++c) {
        const int col = get<1>(tGcG(make_coord(0, r, c), 0, 0));
        __align__(4) Element pair[2] = {Element(acc(make_coord(0, r, c), 0, 0) * factor),
                                        Element(acc(make_coord(1, r, c), 0, 0) * factor)};
        ops::store_global(reinterpret_cast<uint32_t*>(out + off + col),
                          *reinterpret_cast<uint32_t*>(pair));
      }
    }
  };
  if constexpr (kKeySide) {
    store(additional ? p.d_add_k : p.dk, additional ? p.d_add_k_stride : p.dk_stride, hr, tGrA,
          p.scale);
    store(additional ? p.d_add_v : p.dv, additional ? p.d_add_v_stride : p.dv_stride, hr, tGrB,
          1.f);
  } else {
    store(p.dq, p.dq_stride, hr, tGrA, p.scale);
  }
}

}  // namespace nattn::cuda::sm90
