// Host-only views of the Hopper planner for the Python tests (tests/test_sm90_host.py), in plain
// C++17 so that a binding translation unit compiled without CUDA can expose them. Each function
// takes axes as given by Python (rank 1..3, padded here to rank 3 with leading axes of length 1)
// and returns plain values; the bindings turn them into tuples/dicts.
#pragma once

#include <cstdint>
#include <stdexcept>
#include <string>
#include <vector>

#include "cuda/sm90/sm90_plan.h"
#include "nattn/config.h"
#include "nattn/window.h"

namespace nattn::cuda::sm90 {

// Rank-3 axes from 1..3 user axes (leading padding, config.h). std::invalid_argument on bad input.
inline void pad_axes(const std::vector<AxisParams>& user, AxisParams (&axes)[kMaxRank]) {
  if (user.empty() || user.size() > static_cast<size_t>(kMaxRank)) {
    throw std::invalid_argument("need 1 to 3 axes");
  }
  const size_t pad = kMaxRank - user.size();
  for (size_t a = 0; a < kMaxRank; ++a) axes[a] = a < pad ? AxisParams{} : user[a - pad];
  for (const AxisParams& a : axes) {
    if (const char* e = axis_params_error(a)) throw std::invalid_argument(e);
  }
}

inline BoxShape box_from_extents(const std::vector<int64_t>& extents, const char* name) {
  if (extents.size() != static_cast<size_t>(kMaxRank)) {
    throw std::invalid_argument(std::string(name) + ": need 3 extents (rank-3 order)");
  }
  BoxShape b;
  for (int a = 0; a < kMaxRank; ++a) {
    int l = 0;
    while ((int64_t{1} << l) < extents[a]) ++l;
    if (extents[a] < 1 || (int64_t{1} << l) != extents[a] || l > 8) {
      throw std::invalid_argument(std::string(name) + ": extents are powers of two <= 256");
    }
    b.log2[a] = l;
  }
  return b;
}

inline std::vector<int64_t> box_extents(const BoxShape& b) {
  return {b.extent(0), b.extent(1), b.extent(2)};
}

// The tile shapes the forward would use: (q_box, kv_box, q_tiles, visited, full, masked), boxes
// as rank-3 extents.
struct TilesResult {
  std::vector<int64_t> q_box, kv_box;
  int64_t q_tiles, visited, full, masked;
};
inline TilesResult host_choose_tiles(const std::vector<AxisParams>& user) {
  AxisParams axes[kMaxRank];
  pad_axes(user, axes);
  const TileChoice c = choose_tiles(axes);
  return {box_extents(c.q), box_extents(c.kv), c.summary.q_tiles, c.summary.visited,
          c.summary.full, c.summary.masked};
}

// The walk of Q tile `q_tile` (linear index over the Q tiling, last axis fastest): its dilation
// groups and tile indices per axis, then every KV tile in pipeline order as
// (t0, t1, t2, masked).
struct WalkResult {
  std::vector<int64_t> group, tile, group_len;
  std::vector<std::vector<int64_t>> kv;  // (t0, t1, t2, masked)
};
inline WalkResult host_kv_walk(const std::vector<AxisParams>& user,
                               const std::vector<int64_t>& q_box,
                               const std::vector<int64_t>& kv_box, int64_t q_tile) {
  AxisParams axes[kMaxRank];
  pad_axes(user, axes);
  const BoxTiling tiling = make_tiling(axes, box_from_extents(q_box, "q_box"));
  if (q_tile < 0 || q_tile >= tiling.count()) throw std::invalid_argument("q_tile out of range");
  const TileOrigin o = tiling.locate(axes, q_tile);
  const TileWalk w = forward_walk(axes, o, tiling.box, box_from_extents(kv_box, "kv_box"));
  WalkResult r;
  for (int a = 0; a < kMaxRank; ++a) {
    r.group.push_back(o.group[a]);
    r.tile.push_back(o.tile[a]);
    r.group_len.push_back(o.group_len[a]);
  }
  for (WalkCursor c = WalkCursor::begin(w); !c.done(); c.advance(w)) {
    r.kv.push_back({c.tile[0], c.tile[1], c.tile[2], c.stage == Stage::kMasked ? 1 : 0});
  }
  return r;
}

// The TMA views of one [B, x0, x1, x2, heads, D] tensor with element strides `strides` (6) at
// address `data`, tiled by `box`: (error, variants, dims[8][5], strides_bytes[8][4],
// boxes[8][5], coef (batch, head, g0, g1, g2)).
struct ViewsResult {
  std::string error;
  int variants = 1;
  std::vector<std::vector<uint64_t>> dim, stride_bytes, box;
  std::vector<int64_t> coef;
};
inline ViewsResult host_tma_views(const std::vector<AxisParams>& user, int64_t batch,
                                  int64_t heads, int64_t head_dim,
                                  const std::vector<int64_t>& strides, uintptr_t data,
                                  const std::vector<int64_t>& box) {
  AxisParams axes[kMaxRank];
  pad_axes(user, axes);
  if (strides.size() != 6) throw std::invalid_argument("strides: need 6 (rank-3 order)");
  TensorRef<6> t;
  t.data = reinterpret_cast<void*>(data);
  for (int i = 0; i < 6; ++i) t.stride[i] = strides[i];
  const TmaPlan plan =
      plan_tma_view(axes, batch, heads, head_dim, t, box_from_extents(box, "box"), "tensor");
  ViewsResult r;
  r.error = plan.error;
  r.variants = plan.variants;
  for (int v = 0; v < kMaxVariants; ++v) {
    const TmaView& view = plan.view[v];
    r.dim.emplace_back(view.dim, view.dim + 5);
    r.stride_bytes.emplace_back(view.stride_bytes, view.stride_bytes + 4);
    r.box.emplace_back(view.box, view.box + 5);
  }
  r.coef = {plan.coef.batch, plan.coef.head, plan.coef.group[0], plan.coef.group[1],
            plan.coef.group[2]};
  return r;
}

// Variant index of a tile in dilation groups `group` (rank-3 order).
inline int host_tma_variant(const std::vector<AxisParams>& user,
                            const std::vector<int64_t>& group) {
  AxisParams axes[kMaxRank];
  pad_axes(user, axes);
  if (group.size() != static_cast<size_t>(kMaxRank)) throw std::invalid_argument("group: 3");
  const int32_t g[kMaxRank] = {static_cast<int32_t>(group[0]), static_cast<int32_t>(group[1]),
                               static_cast<int32_t>(group[2])};
  return tma_variant(axes, g);
}

}  // namespace nattn::cuda::sm90
