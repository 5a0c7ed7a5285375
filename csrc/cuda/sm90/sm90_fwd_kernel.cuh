// Hopper (sm_90a) fused neighborhood-attention forward: warp-specialized, TMA + wgmma.
//
// One CTA per (Q tile of 128 queries, head, batch). Three warpgroups:
//   producer   (warpgroup 0, one elected thread): TMA copies of the Q tile once, then of each
//              K and V tile of the walk (sm90_plan.h: full tiles first, then masked ones) into a
//              ring of kStages stages, each stage guarded by mbarriers: k_full / v_full (TMA
//              transaction counts) and kv_empty (the 256 consumer threads arrive).
//   consumers  (warpgroups 1 and 2, 64 query rows each): S = Q K^T (wgmma, both operands in
//              shared memory), per-element window mask on masked tiles only, online softmax in
//              fp32 registers, O += P V (wgmma, P from registers, V^T read as an MN-major
//              operand of the same shared tile).
// Overlap: the two consumers take turns issuing their matrix products (two named barriers,
// "ping-pong"), and each issues S_j = Q K_j^T together with O += P_{j-1} V_{j-1}, so while one
// warpgroup runs the softmax of tile j the tensor cores run the other's products.
// Registers: setmaxnreg moves registers from the producer (24) to the consumers (240).
#pragma once

#include <cuda.h>  // CUtensorMap (a type only: the driver is reached through cudart at run time)
#include <cuda_runtime.h>

#include <cmath>
#include <cstdint>
#include <type_traits>

#include "cuda/sm90/sm90_arch_ops.h"  // before CuTe: the emulator's seam sets CuTe options
#include <cute/tensor.hpp>

#include "cuda/common/tensor_core.cuh"
#include "cuda/sm90/sm90_config.h"
#include "cuda/sm90/sm90_plan.h"
#include "nattn/params.h"
#include "nattn/window.h"

// wgmma, setmaxnreg and the TMA wrappers compile to nothing (or a trap) on other targets; this
// code must never be built that way (CMakeLists.txt builds csrc/cuda/sm90 for sm_90a only).
#if defined(__CUDA_ARCH__) && !(__CUDA_ARCH__ == 900 && defined(__CUDA_ARCH_FEAT_SM90_ALL))
#error "csrc/cuda/sm90 needs sm_90a: compile with -gencode=arch=compute_90a,code=sm_90a"
#endif

namespace nattn::cuda::sm90 {

// Everything the kernel reads, passed by value as a __grid_constant__ parameter (about 3.5 KiB:
// 24 tensor maps of 128 bytes, under the 4 KiB classic parameter limit).
struct ForwardParams {
  CUtensorMap q_map[kMaxVariants];  // indexed by tma_variant of the tile's dilation groups
  CUtensorMap k_map[kMaxVariants];
  CUtensorMap v_map[kMaxVariants];
  AxisParams axes[kMaxRank];
  BoxTiling q;
  BoxShape kv_box;
  OffsetCoefficients q_coef;
  OffsetCoefficients kv_coef;
  int64_t heads;
  int64_t heads_per_kv;
  void* out;
  int64_t out_stride[6];
  float* lse;
  int64_t lse_stride[5];
  float scale_log2;  // scale * log2(e): scores are kept in log2 units, exp2 in the softmax
};
static_assert(sizeof(ForwardParams) <= 4096, "kernel parameters beyond 4 KiB need CUDA 12.1+");

// Compile-time shape of one instantiation.
//   Element   cute::half_t or cute::bfloat16_t (fp32 accumulation)
//   kHeadDim  head_dim == value_dim, 64 or 128 (whole 128-byte swizzle rows)
template <class Element_, int kHeadDim_>
struct ForwardTraits {
  using Element = Element_;
  static constexpr int kHeadDim = kHeadDim_;
  static constexpr int kM = kQRows;
  static constexpr int kN = kKvRows;
  static constexpr int kStages = stages(kHeadDim);
  static constexpr int kChunks = kHeadDim / kHeadDimChunk;  // TMA boxes per tile
  static_assert(kHeadDim % kHeadDimChunk == 0, "a tile row is whole 128-byte swizzle rows");
  static_assert(std::is_same_v<Element, cute::half_t> || std::is_same_v<Element, cute::bfloat16_t>,
                "wgmma path is fp16/bf16 only");
  static constexpr uint32_t kQBytes = kM * kHeadDim * sizeof(Element);
  static constexpr uint32_t kKvBytes = kN * kHeadDim * sizeof(Element);

  // K-major tiles with a 128-byte swizzle, in atoms of 8 rows x 64 columns: chunk c (columns
  // 64c .. 64c + 63) of all rows, then chunk c + 1, which is what one TMA box per chunk writes.
  using SmemAtom = cute::GMMA::Layout_K_SW128_Atom<Element>;
  using SmemLayoutQ =
      decltype(cute::tile_to_shape(SmemAtom{}, cute::Shape<cute::Int<kM>, cute::Int<kHeadDim>>{}));
  using SmemLayoutKV = decltype(cute::tile_to_shape(
      SmemAtom{}, cute::Shape<cute::Int<kN>, cute::Int<kHeadDim>, cute::Int<kStages>>{}));
  // V^T (head_dim x keys x stages): the same bytes read as an MN-major operand of P V.
  using SmemLayoutVt = decltype(cute::composition(
      SmemLayoutKV{},
      cute::make_layout(cute::Shape<cute::Int<kHeadDim>, cute::Int<kN>, cute::Int<kStages>>{},
                        cute::Stride<cute::Int<kN>, cute::_1, cute::Int<kN * kHeadDim>>{})));

  // Two warpgroups along M, each a 64-row wgmma; S = Q K^T with both operands in shared memory,
  // O = P V with P in registers.
  using AtomLayout = cute::Layout<cute::Shape<cute::Int<kConsumerWarpgroups>, cute::_1, cute::_1>>;
  using MmaQK = decltype(cute::make_tiled_mma(
      ops::WgmmaSS<Element, kN, ops::Major::K, ops::Major::K>{}, AtomLayout{}));
  using MmaPV = decltype(cute::make_tiled_mma(
      ops::WgmmaRS<Element, kHeadDim, ops::Major::K, ops::Major::MN>{}, AtomLayout{}));

  struct alignas(1024) Shared {
    cute::array_aligned<Element, cute::cosize_v<SmemLayoutQ>, 1024> q;
    cute::array_aligned<Element, cute::cosize_v<SmemLayoutKV>, 1024> k;
    cute::array_aligned<Element, cute::cosize_v<SmemLayoutKV>, 1024> v;
    uint64_t q_full;
    uint64_t k_full[kStages];
    uint64_t v_full[kStages];
    uint64_t kv_empty[kStages];
  };
  static_assert(sizeof(Shared) + 1024 <= smem_bytes(kHeadDim), "sm90_config.h: smem_bytes");
};

// C (+)= A B over all k-blocks of one wgmma batch; kZeroInit starts from C = 0.
template <bool kZeroInit, class Mma, class TA, class TB, class TC>
__device__ __forceinline__ void wgmma_gemm(Mma& mma, TA const& a, TB const& b, TC& c) {
  using namespace cute;
  ops::fence_operand(c);
  ops::wgmma_fence();
  mma.accumulate_ = kZeroInit ? GMMA::ScaleOut::Zero : GMMA::ScaleOut::One;
  CUTE_UNROLL
  for (int k = 0; k < size<2>(a); ++k) {
    cute::gemm(mma, a(_, _, k), b(_, _, k), c);
    mma.accumulate_ = GMMA::ScaleOut::One;
  }
  ops::wgmma_commit();
  ops::fence_operand(c);
}

// Offset-dim coordinate of a tile (sm90_plan.h: plan_tma_view).
__device__ __forceinline__ int32_t offset_coordinate(const OffsetCoefficients& c, int64_t b,
                                                     int64_t h, const TileOrigin& o) {
  int64_t x = b * c.batch + h * c.head;
#pragma unroll
  for (int a = 0; a < kMaxRank; ++a) x += o.group[a] * c.group[a];
  return static_cast<int32_t>(x);
}

// The kChunks TMA boxes of one tile (box origin pos[] in group positions, last axis first).
template <class Traits>
__device__ __forceinline__ void tma_load_tile(const CUtensorMap* map, uint64_t* barrier,
                                              typename Traits::Element* smem, const int32_t* pos,
                                              int32_t offset, int rows) {
#pragma unroll
  for (int c = 0; c < Traits::kChunks; ++c) {
    ops::TmaLoad5D::copy(map, barrier,
                         static_cast<uint64_t>(cute::TMA::CacheHintSm90::EVICT_NORMAL),
                         smem + c * rows * kHeadDimChunk, c * kHeadDimChunk, pos[2], pos[1],
                         pos[0], offset);
  }
}

template <class Traits>
__global__ void __launch_bounds__(kThreads, 1)
    forward_kernel(const __grid_constant__ ForwardParams p) {
  using namespace cute;
  using Element = typename Traits::Element;
  using Shared = typename Traits::Shared;
  using Barrier = ops::Barrier;
  using TxBarrier = ops::TxBarrier;
  constexpr int kM = Traits::kM, kN = Traits::kN, kD = Traits::kHeadDim;
  constexpr int kStages = Traits::kStages;
  constexpr int kConsumerThreads = 128 * kConsumerWarpgroups;

  NATTN_DYNAMIC_SHARED(char, smem_raw);
  // The 128-byte swizzle repeats every 1024 bytes and TMA swizzles by shared address: align.
  const uint32_t raw_addr = ops::shared_address(smem_raw);
  Shared& s = *reinterpret_cast<Shared*>(smem_raw + ((1024 - raw_addr % 1024) % 1024));

  const int warpgroup = threadIdx.x / 128;
  const int64_t qt = blockIdx.x % p.q.count();
  const int64_t h = blockIdx.x / p.q.count();
  const int64_t b = blockIdx.y;
  const int64_t hk = h / p.heads_per_kv;
  const TileOrigin q_origin = p.q.locate(p.axes, qt);
  const TileWalk walk = forward_walk(p.axes, q_origin, p.q.box, p.kv_box);
  const int32_t n_tiles = walk.visited();
  const int variant = tma_variant(p.axes, q_origin.group);

  if (threadIdx.x == 0) {
    TxBarrier::init(&s.q_full, 1);
    for (int i = 0; i < kStages; ++i) {
      TxBarrier::init(&s.k_full[i], 1);
      TxBarrier::init(&s.v_full[i], 1);
      Barrier::init(&s.kv_empty[i], kConsumerThreads);
    }
    ops::fence_barrier_init();
  }
  __syncthreads();

  if (warpgroup == 0) {
    // ---------------------------------------------------------------- producer
    ops::reg_dealloc<kProducerRegisters>();
    if (threadIdx.x != 0) return;
    const CUtensorMap* q_map = &p.q_map[variant];
    const CUtensorMap* k_map = &p.k_map[variant];
    const CUtensorMap* v_map = &p.v_map[variant];
    ops::prefetch_tma_descriptor(q_map);
    ops::prefetch_tma_descriptor(k_map);
    ops::prefetch_tma_descriptor(v_map);

    int32_t pos[kMaxRank];
    for (int a = 0; a < kMaxRank; ++a) {
      pos[a] = static_cast<int32_t>(q_origin.tile[a] * p.q.box.extent(a));
    }
    TxBarrier::arrive_and_expect_tx(&s.q_full, Traits::kQBytes);
    tma_load_tile<Traits>(q_map, &s.q_full, s.q.data(), pos,
                          offset_coordinate(p.q_coef, b, h, q_origin), kM);

    const int32_t kv_offset = offset_coordinate(p.kv_coef, b, hk, q_origin);
    WalkCursor cur = WalkCursor::begin(walk);
    for (int32_t j = 0; j < n_tiles; ++j, cur.advance(walk)) {
      const int stage = j % kStages;
      const uint32_t phase = (j / kStages) & 1;
      Barrier::wait(&s.kv_empty[stage], phase ^ 1);  // the first pass finds every stage free
      for (int a = 0; a < kMaxRank; ++a) {
        pos[a] = static_cast<int32_t>(cur.tile[a] * p.kv_box.extent(a));
      }
      Element* k_tile = s.k.data() + stage * kN * kD;
      Element* v_tile = s.v.data() + stage * kN * kD;
      TxBarrier::arrive_and_expect_tx(&s.k_full[stage], Traits::kKvBytes);
      tma_load_tile<Traits>(k_map, &s.k_full[stage], k_tile, pos, kv_offset, kN);
      TxBarrier::arrive_and_expect_tx(&s.v_full[stage], Traits::kKvBytes);
      tma_load_tile<Traits>(v_map, &s.v_full[stage], v_tile, pos, kv_offset, kN);
    }
    return;
  }

  // ------------------------------------------------------------------ consumers
  ops::reg_alloc<kConsumerRegisters>();
  const int consumer = warpgroup - 1;  // 0 or 1
  const int ctid = threadIdx.x - 128;  // 0 .. 255

  Tensor sQ = make_tensor(make_smem_ptr(s.q.data()), typename Traits::SmemLayoutQ{});
  Tensor sK = make_tensor(make_smem_ptr(s.k.data()), typename Traits::SmemLayoutKV{});
  Tensor sVt = make_tensor(make_smem_ptr(s.v.data()), typename Traits::SmemLayoutVt{});

  typename Traits::MmaQK mma_qk;
  typename Traits::MmaPV mma_pv;
  auto thr_qk = mma_qk.get_thread_slice(ctid);
  auto thr_pv = mma_pv.get_thread_slice(ctid);
  Tensor tSrQ = thr_qk.partition_fragment_A(sQ);   // (desc, 1, kD / 16)
  Tensor tSrK = thr_qk.partition_fragment_B(sK);   // (desc, 1, kD / 16, kStages)
  Tensor tOrV = thr_pv.partition_fragment_B(sVt);  // (desc, 1, kN / 16, kStages)
  Tensor tSrS = partition_fragment_C(mma_qk, Shape<Int<kM>, Int<kN>>{});  // ((2,2,kN/8),1,1)
  Tensor tOrO = partition_fragment_C(mma_pv, Shape<Int<kM>, Int<kD>>{});  // ((2,2,kD/8),1,1)
  Tensor tScS = thr_qk.partition_C(make_identity_tensor(Shape<Int<kM>, Int<kN>>{}));
  Tensor tOcO = thr_pv.partition_C(make_identity_tensor(Shape<Int<kM>, Int<kD>>{}));
  // P as the A operand of P V: the C layout of a 64 x kN accumulator holds, for each 16-column
  // k-block kb, the A fragment of that k-block (value (v0, v1, v2) of A is value
  // (v0, v1, 2 kb + v2) of C: column pair, row half, 8-column half).
  Tensor tOrP = make_tensor<Element>(
      Layout<Shape<Shape<_2, _2, _2>, _1, Int<kN / 16>>>{});
  static_assert(decltype(size<0, 2>(tSrS))::value == kN / 8, "64 x kN wgmma accumulator");
  static_assert(decltype(size<0, 2>(tOrO))::value == kD / 8, "64 x kD wgmma accumulator");

  // The thread's two rows (row half v1 = 0, 1) and their windows along every axis (group
  // positions). A row past its group's end takes the last row's window; it is never stored.
  int row[2];
  int32_t span_begin[2][kMaxRank], span_end[2][kMaxRank];
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    row[r] = get<0>(tScS(make_coord(0, r, 0), 0, 0));
#pragma unroll
    for (int a = 0; a < kMaxRank; ++a) {
      const int32_t n = q_origin.group_len[a];
      int32_t j = static_cast<int32_t>(q_origin.tile[a] * p.q.box.extent(a)) +
                  p.q.box.local(row[r], a);
      j = j < n ? j : n - 1;
      const Span w = window_in_group(n, p.axes[a].kernel_size, p.axes[a].stride,
                                     p.axes[a].is_causal, j);
      span_begin[r][a] = static_cast<int32_t>(w.begin);
      span_end[r][a] = static_cast<int32_t>(w.end);
    }
  }

  float row_max[2] = {-INFINITY, -INFINITY};
  float row_sum[2] = {0.f, 0.f};
  float correction[2];

  // Scores of tile `cur` -> P (unnormalized, in tSrS), running max/sum, correction factors.
  auto softmax = [&](const WalkCursor& cur) {
    CUTE_UNROLL
    for (int i = 0; i < size(tSrS); ++i) tSrS(i) *= p.scale_log2;
    if (cur.stage == Stage::kMasked) {
      int32_t col_origin[kMaxRank];
      for (int a = 0; a < kMaxRank; ++a) {
        col_origin[a] = static_cast<int32_t>(cur.tile[a] * p.kv_box.extent(a));
      }
      CUTE_UNROLL
      for (int r = 0; r < 2; ++r) {
        CUTE_UNROLL
        for (int c = 0; c < kN / 8; ++c) {
          CUTE_UNROLL
          for (int v = 0; v < 2; ++v) {
            const int col = get<1>(tScS(make_coord(v, r, c), 0, 0));
            bool in = true;
            CUTE_UNROLL
            for (int a = 0; a < kMaxRank; ++a) {
              const int32_t pos = col_origin[a] + p.kv_box.local(col, a);
              in = in && pos >= span_begin[r][a] && pos < span_end[r][a];
            }
            if (!in) tSrS(make_coord(v, r, c), 0, 0) = -INFINITY;
          }
        }
      }
    }
    CUTE_UNROLL
    for (int r = 0; r < 2; ++r) {
      float mx = row_max[r];
      CUTE_UNROLL
      for (int c = 0; c < kN / 8; ++c) {
        mx = fmaxf(mx, fmaxf(tSrS(make_coord(0, r, c), 0, 0), tSrS(make_coord(1, r, c), 0, 0)));
      }
      mx = quad_max(mx);
      // A row whose every score so far is masked keeps max -inf: exponentiate against 0 so that
      // exp2(-inf - -inf) never makes a NaN.
      const float base = mx == -INFINITY ? 0.f : mx;
      correction[r] = exp2f(row_max[r] - base);
      row_max[r] = mx;
      float sum = row_sum[r] * correction[r];
      CUTE_UNROLL
      for (int c = 0; c < kN / 8; ++c) {
        CUTE_UNROLL
        for (int v = 0; v < 2; ++v) {
          const float e = exp2f(tSrS(make_coord(v, r, c), 0, 0) - base);
          tSrS(make_coord(v, r, c), 0, 0) = e;
          sum += e;
        }
      }
      row_sum[r] = sum;
    }
  };
  auto convert_p = [&]() {
    CUTE_UNROLL
    for (int kb = 0; kb < kN / 16; ++kb) {
      CUTE_UNROLL
      for (int v2 = 0; v2 < 2; ++v2) {
        CUTE_UNROLL
        for (int r = 0; r < 2; ++r) {
          CUTE_UNROLL
          for (int v = 0; v < 2; ++v) {
            tOrP(make_coord(v, r, v2), 0, kb) =
                Element(tSrS(make_coord(v, r, 2 * kb + v2), 0, 0));
          }
        }
      }
    }
  };
  auto rescale_o = [&]() {
    CUTE_UNROLL
    for (int r = 0; r < 2; ++r) {
      CUTE_UNROLL
      for (int c = 0; c < kD / 8; ++c) {
        tOrO(make_coord(0, r, c), 0, 0) *= correction[r];
        tOrO(make_coord(1, r, c), 0, 0) *= correction[r];
      }
    }
  };
  // Ping-pong turns: a warpgroup issues its products between my_turn() and pass_turn().
  // Consumer 1 opens with a pass so that consumer 0 goes first, and skips the pass after its
  // last section, so every bar.sync meets exactly one bar.arrive of the other warpgroup.
  constexpr int kTurnThreads = 2 * 128;
  auto my_turn = [&]() { ops::named_sync(1 + consumer, kTurnThreads); };
  auto pass_turn = [&](bool last) {
    if (consumer == 0 || !last) ops::named_arrive(1 + (1 - consumer), kTurnThreads);
  };
  if (consumer == 1) ops::named_arrive(1, kTurnThreads);

  // The first tile is peeled and the loop body has no branch around a wgmma: a wgmma under a
  // divergent branch makes ptxas serialize all of them (warning C7518). Every Q tile visits at
  // least one KV tile (each of its queries attends to itself).
  TxBarrier::wait(&s.q_full, 0);
  clear(tOrO);
  WalkCursor cur = WalkCursor::begin(walk);
  TxBarrier::wait(&s.k_full[0], 0);
  my_turn();
  wgmma_gemm<true>(mma_qk, tSrQ, tSrK(_, _, _, 0), tSrS);
  pass_turn(false);
  ops::wgmma_wait<0>();
  ops::fence_operand(tSrS);  // the softmax's reads of S must not move above the wait
  softmax(cur);
  convert_p();
  int prev_stage = 0;
  for (int32_t j = 1; j < n_tiles; ++j) {
    cur.advance(walk);
    const int stage = j % kStages;
    TxBarrier::wait(&s.k_full[stage], (j / kStages) & 1);
    TxBarrier::wait(&s.v_full[prev_stage], ((j - 1) / kStages) & 1);
    my_turn();
    wgmma_gemm<true>(mma_qk, tSrQ, tSrK(_, _, _, stage), tSrS);
    ops::fence_operand(tOrP);
    wgmma_gemm<false>(mma_pv, tOrP, tOrV(_, _, _, prev_stage), tOrO);
    pass_turn(false);
    ops::wgmma_wait<1>();  // S_j is ready; P_{j-1} V_{j-1} may still run during the softmax
    ops::fence_operand(tSrS);
    softmax(cur);
    ops::wgmma_wait<0>();
    ops::fence_operand(tOrO);
    Barrier::arrive(&s.kv_empty[prev_stage]);
    rescale_o();
    convert_p();
    prev_stage = stage;
  }
  TxBarrier::wait(&s.v_full[prev_stage], ((n_tiles - 1) / kStages) & 1);
  my_turn();
  ops::fence_operand(tOrP);
  wgmma_gemm<false>(mma_pv, tOrP, tOrV(_, _, _, prev_stage), tOrO);
  pass_turn(true);
  ops::wgmma_wait<0>();
  ops::fence_operand(tOrO);
  Barrier::arrive(&s.kv_empty[prev_stage]);

  // ---------------------------------------------------------------- epilogue
  // Normalize, then write the rows that exist (paired 4-byte stores) and their lse.
  Element* out = static_cast<Element*>(p.out) + b * p.out_stride[0] + h * p.out_stride[4];
  float* lse = p.lse + b * p.lse_stride[0] + h * p.lse_stride[4];
  const bool writes_lse = (threadIdx.x % 4) == 0;
  CUTE_UNROLL
  for (int r = 0; r < 2; ++r) {
    const float sum = quad_sum(row_sum[r]);
    const float inv = sum > 0.f ? 1.f / sum : 0.f;
    bool valid = true;
    int64_t out_off = 0, lse_off = 0;
#pragma unroll
    for (int a = 0; a < kMaxRank; ++a) {
      const int32_t pos = static_cast<int32_t>(q_origin.tile[a] * p.q.box.extent(a)) +
                          p.q.box.local(row[r], a);
      valid = valid && pos < q_origin.group_len[a];
      const int64_t index = q_origin.group[a] + p.axes[a].dilation * static_cast<int64_t>(pos);
      out_off += index * p.out_stride[1 + a];
      lse_off += index * p.lse_stride[1 + a];
    }
    if (!valid) continue;
    CUTE_UNROLL
    for (int c = 0; c < kD / 8; ++c) {
      const int col = get<1>(tOcO(make_coord(0, r, c), 0, 0));
      __align__(4) Element pair[2] = {Element(tOrO(make_coord(0, r, c), 0, 0) * inv),
                                      Element(tOrO(make_coord(1, r, c), 0, 0) * inv)};
      ops::store_global(reinterpret_cast<uint32_t*>(out + out_off + col),
                        *reinterpret_cast<uint32_t*>(pair));
    }
    if (writes_lse) {
      ops::store_global(&lse[lse_off], row_max[r] * static_cast<float>(M_LN2) + logf(sum));
    }
  }
}

}  // namespace nattn::cuda::sm90
