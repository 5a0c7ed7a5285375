// Host-side plan of the Hopper forward. Plain C++17 (no CUDA headers): the .cu files include it,
// and so can the Python bindings (for the CPU tests in tests/test_sm90_host.py).
//
// 1. Tiles are boxes of tokens in dilation-group space (common/box_tiling.h, shared with sm80):
//    row r of a box is the token whose local coordinates are the bit fields of r, last axis
//    fastest. That is the order in which a TMA box {chunk, e2, e1, e0, 1} lands in shared memory,
//    so a TMA copy fills a tile in exactly the row order the kernel assumes.
// 2. The KV tiles of a Q tile: box_tiling.h's forward_walk (no additional tiles here), full tiles
//    first, then the masked ones: an unmasked mainloop stage, then a masked one. Which boxes to
//    use is this file's own search (choose_tiles), not sm80's greedy choice.
// 3. TMA views: one 5-D tensor map per (tensor, ragged-group variant), see plan_tma_view.
// 4. Why the Hopper path declines a problem: forward_reasons.
#pragma once

#include <cstdint>
#include <numeric>
#include <string>
#include <vector>

#include "cuda/common/box_tiling.h"
#include "cuda/sm90/sm90_config.h"
#include "nattn/config.h"
#include "nattn/params.h"
#include "nattn/tile_plan.h"
#include "nattn/window.h"

namespace nattn::cuda::sm90 {

// ---------------------------------------------------------------------------------------------
// Tile-shape choice (host).

struct TileChoice {
  BoxShape q;
  BoxShape kv;
  TilePlanSummary summary;  // tile pairs of the whole problem (per batch and head)
  double cost = 0.0;        // summary.full + kMaskedTileCost * summary.masked
};

// Every split of 2^log2_rows rows into per-axis powers of two, none past the axis's longest
// group rounded up to a power of two (a longer extent only adds empty rows).
inline std::vector<BoxShape> candidate_boxes(const AxisParams (&axes)[kMaxRank], int log2_rows) {
  int cap[kMaxRank];
  for (int a = 0; a < kMaxRank; ++a) {
    const int64_t g = group_length(axes[a].length, axes[a].dilation, 0);
    int c = 0;
    while ((int64_t{1} << c) < g) ++c;
    cap[a] = c;
  }
  std::vector<BoxShape> out;
  for (int l0 = 0; l0 <= log2_rows; ++l0) {
    for (int l1 = 0; l0 + l1 <= log2_rows; ++l1) {
      const int l2 = log2_rows - l0 - l1;
      if (l1 > cap[1] || l2 > cap[2]) continue;
      // Axis 0 takes whatever the others cannot hold, even past its cap: the box must have
      // exactly 2^log2_rows rows (two consumer warpgroups of 64), extra rows are simply empty.
      if (l0 > cap[0] && (l1 < cap[1] || l2 < cap[2])) continue;
      BoxShape b;
      b.log2[0] = l0;
      b.log2[1] = l1;
      b.log2[2] = l2;
      out.push_back(b);
    }
  }
  return out;
}

// The Q and KV boxes that minimize the work of the mainloop: the (Q tile, KV tile) pairs the
// tile planner says must be visited (tile_plan.h: plan_summary, exact for the problem), a masked
// pair weighted kMaskedTileCost. Every Q tile costs the same prologue and epilogue and every
// pair the same MMA work (128 x 128 x head_dim twice), so pair count is the tile bound of
// DESIGN.md section 5. Ties go to more full tiles, then to the first candidate (more rows along
// the leading axes). For GNA problems whose stride blocks align with a Q box (e.g. stride 16 x 8
// x 8, Q box 2 x 8 x 8 cannot align on axis 0 but 8 x 8 can on axes 1, 2), the aligned boxes
// have fewer and fuller pairs, so the search finds them without a special case.
inline TileChoice choose_tiles(const AxisParams (&axes)[kMaxRank]) {
  TileChoice best;
  bool have = false;
  const std::vector<BoxShape> qs = candidate_boxes(axes, kLog2QRows);
  const std::vector<BoxShape> kvs = candidate_boxes(axes, kLog2KvRows);
  for (const BoxShape& q : qs) {
    for (const BoxShape& kv : kvs) {
      int64_t qt[kMaxRank], kt[kMaxRank];
      for (int a = 0; a < kMaxRank; ++a) {
        qt[a] = q.extent(a);
        kt[a] = kv.extent(a);
      }
      const TilePlanSummary s = plan_summary(axes, qt, kt);
      const double cost = static_cast<double>(s.full) +
                          kMaskedTileCost * static_cast<double>(s.masked);
      if (!have || cost < best.cost || (cost == best.cost && s.full > best.summary.full)) {
        best.q = q;
        best.kv = kv;
        best.summary = s;
        best.cost = cost;
        have = true;
      }
    }
  }
  return best;
}

// ---------------------------------------------------------------------------------------------
// TMA views (host).
//
// A tile is fetched from the user's [B, x0, x1, x2, H, D] tensor as it lies in memory, by one
// 5-D tensor map (cuTensorMapEncodeTiled, tiled mode, 128-byte swizzle):
//   dim 0  head-dim columns          size D,          stride 1 (must be contiguous), box 64
//   dim 1  axis 2 group position     size L_g(2),     stride d2 * s2,                box e2
//   dim 2  axis 1 group position     size L_g(1),     stride d1 * s1,                box e1
//   dim 3  axis 0 group position     size L_g(0),     stride d0 * s0,                box e0
//   dim 4  "offset"                  size max/G + 1,  stride G,                      box 1
// A dilated axis of length L and dilation d is the view [d groups][L_g positions] with element
// strides (s, d*s); the group index, the batch and the head are all box-1 coordinates, and a
// box-1 coordinate only adds coordinate * stride to the address, so they fold into one dim whose
// stride G is the gcd of their strides: coordinate (b*sB + h*sH + sum_a g_a*s_a) / G. Nine
// logical dims (D, 3 x (position, group), B, H) thus fit TMA's limit of five.
//
// Ragged groups (d does not divide L: the first L mod d groups hold one token more): a tensor map
// has one size per dim, and a position past a short group's end is a real address (index
// g + d*t >= L, past the axis; past the allocation at the last batch), so the bound must be
// exact. Each axis with L mod d != 0 therefore has two variants of the position dim, size
// ceil(L/d) for the long groups and floor(L/d) for the short ones, and a tensor gets one map per
// combination: variant index sum_a [g_a < L_a mod d_a] << a, at most 8. TMA's out-of-bounds zero
// fill then covers every box row past its group's end (zero K rows are masked, zero V rows meet
// P = 0, zero Q rows are never stored).
constexpr int kMaxVariants = 1 << kMaxRank;

struct TmaView {
  uint64_t dim[5] = {0, 0, 0, 0, 0};     // elements, dim 0 innermost
  uint64_t stride_bytes[4] = {0, 0, 0, 0};  // strides of dims 1..4 (dim 0 is contiguous)
  uint32_t box[5] = {1, 1, 1, 1, 1};
};

// Offset-dim coefficients of one tensor: coordinate = b * batch + h * head + sum_a g_a * group[a].
struct OffsetCoefficients {
  int64_t batch = 0;
  int64_t head = 0;
  int64_t group[kMaxRank] = {0, 0, 0};
};

struct TmaPlan {
  std::string name;   // "query", "key", "value"
  std::string error;  // empty when the views below are valid
  TmaView view[kMaxVariants];
  int variants = 1;   // maps that differ (2^(ragged axes)); the rest repeat view[0]
  OffsetCoefficients coef;
};

namespace detail_plan {
inline int64_t gcd64(int64_t a, int64_t b) { return b == 0 ? a : gcd64(b, a % b); }
}  // namespace detail_plan

// The views of one tensor t ([B, x0, x1, x2, heads, D], 2-byte elements) tiled by `box`.
inline TmaPlan plan_tma_view(const AxisParams (&axes)[kMaxRank], int64_t batch, int64_t heads,
                             int64_t head_dim, const TensorRef<6>& t, BoxShape box,
                             const char* name) {
  constexpr int64_t kElem = 2;
  constexpr int64_t kAlign = 16 / kElem;  // TMA strides are multiples of 16 bytes
  constexpr uint64_t kMaxStrideBytes = uint64_t{1} << 40;
  constexpr int64_t kMaxCoordinate = (int64_t{1} << 31) - 1;  // TMA coordinates are int32
  TmaPlan plan;
  plan.name = name;
  auto fail = [&](const std::string& why) {
    plan.error = std::string(name) + ": " + why;
    return plan;
  };
  if (t.stride[5] != 1) return fail("the head dim must be contiguous (stride 1) for TMA");
  if (reinterpret_cast<uintptr_t>(t.data) % 16 != 0) {
    return fail("the data pointer must be 16-byte aligned for TMA");
  }
  for (int i = 0; i < 5; ++i) {
    if (t.stride[i] < 0) return fail("negative strides are not supported by TMA");
  }
  // The offset dim: batch, head and the dilation groups of dilated axes (box-1 coordinates).
  int64_t g = 0;
  int64_t max_offset = 0;
  auto fold = [&](int64_t extent, int64_t stride) {
    if (extent <= 1) return;
    g = detail_plan::gcd64(g, stride);
    max_offset += (extent - 1) * stride;
  };
  fold(batch, t.stride[0]);
  fold(heads, t.stride[4]);
  for (int a = 0; a < kMaxRank; ++a) fold(axes[a].dilation, t.stride[1 + a]);
  if (g == 0) g = kAlign;  // nothing folded: every coordinate is 0, any valid stride will do
  if (g % kAlign != 0) {
    return fail("batch, head and dilated-axis strides must be multiples of 16 bytes for TMA");
  }
  if (max_offset / g > kMaxCoordinate) {
    return fail("batch x heads x dilation groups exceed the int32 range of TMA coordinates");
  }
  plan.coef.batch = batch > 1 ? t.stride[0] / g : 0;
  plan.coef.head = heads > 1 ? t.stride[4] / g : 0;
  for (int a = 0; a < kMaxRank; ++a) {
    plan.coef.group[a] = axes[a].dilation > 1 ? t.stride[1 + a] / g : 0;
  }

  int ragged = 0;
  for (int a = 0; a < kMaxRank; ++a) {
    if (axes[a].length % axes[a].dilation != 0) ragged |= 1 << a;
  }
  plan.variants = 1;
  for (int a = 0; a < kMaxRank; ++a) {
    if (ragged & (1 << a)) plan.variants *= 2;
  }
  for (int v = 0; v < kMaxVariants; ++v) {
    TmaView& view = plan.view[v];
    view.dim[0] = static_cast<uint64_t>(head_dim);
    // Head dim 32 (backward only) is one box of 32 columns (64 bytes, 64-byte swizzle).
    view.box[0] = static_cast<uint32_t>(head_dim < kHeadDimChunk ? head_dim : kHeadDimChunk);
    for (int a = 0; a < kMaxRank; ++a) {
      const int d = 3 - a;  // axis 2 is dim 1 (fastest box rows), axis 0 is dim 3
      const AxisParams& ax = axes[a];
      const bool long_groups = (ragged & (1 << a)) && (v & (1 << a));
      const int64_t positions = ax.length / ax.dilation + (long_groups ? 1 : 0);
      const int64_t stride = ax.dilation * t.stride[1 + a];
      if (positions > 1 && (stride % kAlign != 0 ||
                            static_cast<uint64_t>(stride * kElem) >= kMaxStrideBytes)) {
        return fail("the token stride of axis " + std::to_string(a) +
                    " (times its dilation) must be a multiple of 16 bytes below 2^40 for TMA");
      }
      view.dim[d] = static_cast<uint64_t>(positions);
      view.stride_bytes[d - 1] =
          static_cast<uint64_t>(positions > 1 ? stride * kElem : 16);  // unused when size 1
      view.box[d] = static_cast<uint32_t>(box.extent(a));
    }
    view.dim[4] = static_cast<uint64_t>(max_offset / g + 1);
    if (static_cast<uint64_t>(g * kElem) >= kMaxStrideBytes) {
      return fail("the batch/head stride must be below 2^40 bytes for TMA");
    }
    view.stride_bytes[3] = static_cast<uint64_t>(g * kElem);
    view.box[4] = 1;
  }
  return plan;
}

// The view of additional keys/values ([B, M, heads, D], 2-byte elements) in the same 5-D form,
// so one TMA copy routine serves both: dim 0 the head dim (box 64, or 32 for head dim 32), dim 1
// the M tokens (box `rows`; rows past M read 0), dims 2 and 3 of size 1, dim 4 the offset dim
// folding batch and head (coefficients in coef.batch, coef.head). Every variant is the same map.
inline TmaPlan plan_additional_view(int64_t batch, int64_t heads, int64_t head_dim, int64_t tokens,
                                    const TensorRef<4>& t, uint32_t rows, const char* name) {
  constexpr int64_t kElem = 2;
  constexpr int64_t kAlign = 16 / kElem;
  constexpr uint64_t kMaxStrideBytes = uint64_t{1} << 40;
  constexpr int64_t kMaxCoordinate = (int64_t{1} << 31) - 1;
  TmaPlan plan;
  plan.name = name;
  auto fail = [&](const std::string& why) {
    plan.error = std::string(name) + ": " + why;
    return plan;
  };
  if (t.stride[3] != 1) return fail("the head dim must be contiguous (stride 1) for TMA");
  if (reinterpret_cast<uintptr_t>(t.data) % 16 != 0) {
    return fail("the data pointer must be 16-byte aligned for TMA");
  }
  for (int i = 0; i < 3; ++i) {
    if (t.stride[i] < 0) return fail("negative strides are not supported by TMA");
  }
  if (tokens > 1 && (t.stride[1] % kAlign != 0 ||
                     static_cast<uint64_t>(t.stride[1] * kElem) >= kMaxStrideBytes)) {
    return fail("the token stride must be a multiple of 16 bytes below 2^40 for TMA");
  }
  int64_t g = 0;
  int64_t max_offset = 0;
  if (batch > 1) {
    g = detail_plan::gcd64(g, t.stride[0]);
    max_offset += (batch - 1) * t.stride[0];
  }
  if (heads > 1) {
    g = detail_plan::gcd64(g, t.stride[2]);
    max_offset += (heads - 1) * t.stride[2];
  }
  if (g == 0) g = kAlign;
  if (g % kAlign != 0) {
    return fail("batch and head strides must be multiples of 16 bytes for TMA");
  }
  if (max_offset / g > kMaxCoordinate || static_cast<uint64_t>(g * kElem) >= kMaxStrideBytes) {
    return fail("batch x heads exceed the range of TMA coordinates");
  }
  plan.coef.batch = batch > 1 ? t.stride[0] / g : 0;
  plan.coef.head = heads > 1 ? t.stride[2] / g : 0;
  for (int v = 0; v < kMaxVariants; ++v) {
    TmaView& view = plan.view[v];
    view.dim[0] = static_cast<uint64_t>(head_dim);
    view.box[0] = static_cast<uint32_t>(head_dim < kHeadDimChunk ? head_dim : kHeadDimChunk);
    view.dim[1] = static_cast<uint64_t>(tokens);
    view.stride_bytes[0] = static_cast<uint64_t>(tokens > 1 ? t.stride[1] * kElem : 16);
    view.box[1] = rows;
    view.dim[2] = view.dim[3] = 1;
    view.stride_bytes[1] = view.stride_bytes[2] = 16;  // unused: size 1
    view.dim[4] = static_cast<uint64_t>(max_offset / g + 1);
    view.stride_bytes[3] = static_cast<uint64_t>(g * kElem);
  }
  return plan;
}

// Variant index of a tile in dilation groups `group` (see above): bit a set for a long group of a
// ragged axis.
NATTN_HOST_DEVICE int tma_variant(const AxisParams (&axes)[kMaxRank],
                                  const int32_t (&group)[kMaxRank]) {
  int v = 0;
  for (int a = 0; a < kMaxRank; ++a) {
    if (group[a] < axes[a].length % axes[a].dilation) v |= 1 << a;
  }
  return v;
}

// ---------------------------------------------------------------------------------------------
// Reasons (host). Empty when the Hopper forward can serve `p` on a device of compute capability
// `capability` (major * 10 + minor; -1 = unknown, not checked) allowing `max_smem` bytes of
// shared memory per CTA (0 = unknown, not checked). Tensor checks need the real pointers.

// The plan of one Hopper forward call: the tile shapes (one search per call), the TMA views of
// Q, K and V, and why the path cannot take the call (empty when it can). Everything the launch
// needs except the encoded tensor maps (sm90_fwd.cu), which only the driver can make.
struct ForwardPlan {
  std::vector<std::string> reasons;
  TileChoice tiles;
  TmaPlan q, k, v;  // valid when the tensors are known (p.q.data != nullptr)
};

inline ForwardPlan plan_forward(const AttentionParams& p, int capability, int64_t max_smem) {
  ForwardPlan plan;
  std::vector<std::string>& r = plan.reasons;
  if (capability >= 0 && capability != 90) {
    r.push_back("compute capability " + std::to_string(capability / 10) + "." +
                std::to_string(capability % 10) +
                ": the Hopper kernels are built for sm_90a (compute capability 9.0) only");
  }
  if (p.dtype != DType::kFloat16 && p.dtype != DType::kBFloat16) {
    r.push_back("the Hopper kernels take float16 and bfloat16 only");
  }
  if (p.value_dim != p.head_dim) {
    r.push_back("value_dim " + std::to_string(p.value_dim) + " != head_dim " +
                std::to_string(p.head_dim) + ": the Hopper kernels need them equal");
  }
  if (!head_dim_supported(p.head_dim)) {
    r.push_back("head_dim " + std::to_string(p.head_dim) +
                ": Hopper kernels exist for head_dim 64 and 128");
  }
  if (p.num_additional > 0) {
    r.push_back("additional keys/values are not implemented on the Hopper path (SM80 path)");
  }
  if (p.has_rpb()) {
    r.push_back("relative positional bias (rpb) is not fused in the Hopper kernels (SM80 path)");
  }
  if (p.kv_heads < 1 || p.heads % p.kv_heads != 0) {
    r.push_back("heads must be a multiple of kv_heads");
  }
  if (max_smem > 0 && head_dim_supported(p.head_dim) && smem_bytes(p.head_dim) > max_smem) {
    r.push_back("needs " + std::to_string(smem_bytes(p.head_dim)) +
                " bytes of shared memory per CTA, the device allows " + std::to_string(max_smem));
  }
  for (int a = 0; a < kMaxRank; ++a) {
    if (p.axes[a].length >= (int64_t{1} << 31)) {
      r.push_back("an axis of 2^31 or more tokens: tile coordinates are 32-bit");
    }
  }
  if (p.batch > 65535) r.push_back("batch > 65535 (grid dimension y)");
  if (!r.empty()) return plan;
  plan.tiles = choose_tiles(p.axes);
  if (plan.tiles.summary.q_tiles * p.heads > 0x7fffffff) {
    r.push_back("Q tiles x heads >= 2^31 (grid dimension x)");
  }
  if (p.q.data != nullptr) {
    plan.q = plan_tma_view(p.axes, p.batch, p.heads, p.head_dim, p.q, plan.tiles.q, "query");
    plan.k = plan_tma_view(p.axes, p.batch, p.kv_heads, p.head_dim, p.k, plan.tiles.kv, "key");
    plan.v =
        plan_tma_view(p.axes, p.batch, p.kv_heads, p.value_dim, p.v, plan.tiles.kv, "value");
    for (const TmaPlan* t : {&plan.q, &plan.k, &plan.v}) {
      if (!t->error.empty()) r.push_back(t->error);
    }
    const OffsetCoefficients& kc = plan.k.coef;
    const OffsetCoefficients& vc = plan.v.coef;
    if (plan.k.error.empty() && plan.v.error.empty() &&
        (kc.batch != vc.batch || kc.head != vc.head || kc.group[0] != vc.group[0] ||
         kc.group[1] != vc.group[1] || kc.group[2] != vc.group[2])) {
      // One offset coordinate addresses both K and V tiles (the producer computes it once).
      r.push_back("key and value have different batch/head/dilation-group strides (in units of "
                  "their common divisor): the Hopper kernel addresses both with one TMA "
                  "coordinate");
    }
    if (p.out.stride[5] != 1 || reinterpret_cast<uintptr_t>(p.out.data) % 4 != 0) {
      r.push_back("output: the head dim must be contiguous and 4-byte aligned (paired stores)");
    }
    for (int i = 0; i < 5; ++i) {
      if (p.out.stride[i] % 2 != 0) {
        r.push_back("output: strides must be even (paired 4-byte stores)");
        break;
      }
    }
  }
  return plan;
}

// Why the Hopper forward declines `p` as far as the host can tell (the driver's encoding of the
// tensor maps is checked in sm90_fwd.cu: forward_support).
inline std::vector<std::string> forward_reasons(const AttentionParams& p, int capability,
                                                int64_t max_smem) {
  return plan_forward(p, capability, max_smem).reasons;
}

// ---------------------------------------------------------------------------------------------
// The plan of one Hopper backward call (sm90_bwd.cu): the forward's tile shapes (choose_tiles,
// once per call), the TMA views of Q, K, V and dO, and why the path declines the call (empty when
// it takes it). Q and dO are streamed by the dK/dV kernel and resident in the dQ kernel (both
// tiled by the Q box); K and V the other way round (KV box). Each tensor has its own offset
// coefficients, so unlike the forward K and V may lie differently.
struct BackwardPlan {
  std::vector<std::string> reasons;
  TileChoice tiles;
  TmaPlan q, k, v, d_out;  // valid when the tensors are known (p.q.data != nullptr)
  TmaPlan add_k, add_v;    // with additional tokens
};

inline BackwardPlan plan_backward(const AttentionParams& p, int capability, int64_t max_smem) {
  BackwardPlan plan;
  std::vector<std::string>& r = plan.reasons;
  if (capability >= 0 && capability != 90) {
    r.push_back("compute capability " + std::to_string(capability / 10) + "." +
                std::to_string(capability % 10) +
                ": the Hopper kernels are built for sm_90a (compute capability 9.0) only");
  }
  if (p.dtype != DType::kFloat16 && p.dtype != DType::kBFloat16) {
    r.push_back("the Hopper backward takes float16 and bfloat16 only");
  }
  if (p.value_dim != p.head_dim) {
    r.push_back("value_dim " + std::to_string(p.value_dim) + " != head_dim " +
                std::to_string(p.head_dim) + ": the Hopper backward needs them equal");
  }
  if (!backward_head_dim_supported(p.head_dim)) {
    r.push_back("head_dim " + std::to_string(p.head_dim) +
                ": the Hopper backward exists for head_dim 32, 64 and 128");
  }
  if (p.num_additional >= (int64_t{1} << 31)) {
    r.push_back("2^31 or more additional tokens: tile coordinates are 32-bit");
  }
  if (p.has_rpb()) {
    r.push_back("relative positional bias (rpb) is not fused in the Hopper backward (SM80 path)");
  }
  if (p.kv_heads < 1 || p.heads % p.kv_heads != 0) {
    r.push_back("heads must be a multiple of kv_heads");
  }
  if (max_smem > 0 && backward_head_dim_supported(p.head_dim) &&
      backward_smem_bytes(p.head_dim) > max_smem) {
    r.push_back("the Hopper backward needs " + std::to_string(backward_smem_bytes(p.head_dim)) +
                " bytes of shared memory per CTA, the device allows " + std::to_string(max_smem));
  }
  for (int a = 0; a < kMaxRank; ++a) {
    if (p.axes[a].length >= (int64_t{1} << 31)) {
      r.push_back("an axis of 2^31 or more tokens: tile coordinates are 32-bit");
    }
  }
  if (p.batch > 65535) r.push_back("batch > 65535 (grid dimension y)");
  if (!r.empty()) return plan;
  plan.tiles = choose_tiles(p.axes);
  const int64_t add_tiles = (p.num_additional + kKvRows - 1) / kKvRows;
  if (plan.tiles.summary.q_tiles * p.heads > 0x7fffffff ||
      (make_tiling(p.axes, plan.tiles.kv).count() + add_tiles) * p.kv_heads > 0x7fffffff) {
    r.push_back("tiles x heads >= 2^31 (grid dimension x)");
  }
  if (p.q.data != nullptr) {
    plan.q = plan_tma_view(p.axes, p.batch, p.heads, p.head_dim, p.q, plan.tiles.q, "query");
    plan.d_out = plan_tma_view(p.axes, p.batch, p.heads, p.value_dim, p.d_out, plan.tiles.q,
                               "grad_out");
    plan.k = plan_tma_view(p.axes, p.batch, p.kv_heads, p.head_dim, p.k, plan.tiles.kv, "key");
    plan.v =
        plan_tma_view(p.axes, p.batch, p.kv_heads, p.value_dim, p.v, plan.tiles.kv, "value");
    if (p.num_additional > 0) {
      plan.add_k = plan_additional_view(p.batch, p.kv_heads, p.head_dim, p.num_additional,
                                        p.add_k, kKvRows, "additional_keys");
      plan.add_v = plan_additional_view(p.batch, p.kv_heads, p.value_dim, p.num_additional,
                                        p.add_v, kKvRows, "additional_values");
    }
    for (const TmaPlan* t : {&plan.q, &plan.k, &plan.v, &plan.d_out, &plan.add_k, &plan.add_v}) {
      if (!t->error.empty()) r.push_back(t->error);
    }
    // Paired 4-byte stores: head dim contiguous, 4-byte aligned rows, even strides.
    auto check_store = [&](const char* name, const void* data, const int64_t* stride, int n) {
      if (stride[n - 1] != 1 || reinterpret_cast<uintptr_t>(data) % 4 != 0) {
        r.push_back(std::string(name) +
                    ": the head dim must be contiguous and 4-byte aligned (paired stores)");
        return;
      }
      for (int i = 0; i < n - 1; ++i) {
        if (stride[i] % 2 != 0) {
          r.push_back(std::string(name) + ": strides must be even (paired 4-byte stores)");
          return;
        }
      }
    };
    check_store("dq", p.dq.data, p.dq.stride, 6);
    check_store("dk", p.dk.data, p.dk.stride, 6);
    check_store("dv", p.dv.data, p.dv.stride, 6);
    if (p.num_additional > 0) {
      check_store("d_additional_keys", p.d_add_k.data, p.d_add_k.stride, 4);
      check_store("d_additional_values", p.d_add_v.data, p.d_add_v.stride, 4);
    }
  }
  return plan;
}

// Why the Hopper backward declines `p` as far as the host can tell (the driver's encoding of the
// tensor maps is checked in sm90_bwd.cu: backward_support).
inline std::vector<std::string> backward_reasons(const AttentionParams& p, int capability,
                                                 int64_t max_smem) {
  return plan_backward(p, capability, max_smem).reasons;
}

}  // namespace nattn::cuda::sm90
