// Box tiles in dilation-group space for the SM80 tensor-core kernels: how a CTA's tile of rows
// maps to tokens, which tiles of columns it visits (the mask policy's "how many tiles, how many of
// them masked"), and the host-side choice of box shapes. Host + device, no CUDA headers.
//
// A tile is a box of group positions: per axis a power-of-two extent, the product being the rows
// of the tile (64 for the CTA's register tile, 32 or 64 for a streamed tile). With dilation d an
// axis splits into d groups (window.h: group_length) and a box never crosses a group, so every
// tile pair lies inside one undilated sub-problem. Row r of a box is the token whose local
// coordinates are the bit fields of r, the last axis fastest.
//
// The window math is window.h's; the forward walk (KV tiles of a Q tile) is tile_plan.h's
// axis_tile_range; the backward walk (Q tiles that attend a KV tile) is built here from
// window.h's inverse_window_in_group the same way.
#pragma once

#include <cstdint>

#include "nattn/config.h"
#include "nattn/params.h"
#include "nattn/tile_plan.h"
#include "nattn/window.h"

namespace nattn::cuda::sm80 {

// Extents of a box tile, as log2 per axis (powers of two make the row -> coordinate decode a
// shift and a mask instead of two integer divisions per element of every masked score tile).
struct BoxShape {
  int log2[kMaxRank] = {0, 0, 0};

  NATTN_HOST_DEVICE int64_t extent(int a) const { return int64_t{1} << log2[a]; }
  NATTN_HOST_DEVICE int size() const { return 1 << (log2[0] + log2[1] + log2[2]); }
  // Local coordinate along axis a of row r (0 <= r < size()).
  NATTN_HOST_DEVICE int local(int r, int a) const {
    int shift = 0;
    for (int b = a + 1; b < kMaxRank; ++b) shift += log2[b];
    return (r >> shift) & ((1 << log2[a]) - 1);
  }
};

// One tile of a box tiling: per axis its dilation group, the group's length and the tile's index
// within the group (its first group position is tile * extent). 32-bit: the dispatcher sends
// axes of 2^31 tokens or more to the fallback (fewer registers per thread; offsets stay 64-bit).
struct TileOrigin {
  int32_t group[kMaxRank];
  int32_t group_len[kMaxRank];
  int32_t tile[kMaxRank];
};

// A box tiling of the whole token layout: tiles along each axis over all its dilation groups
// (tile_plan.h: axis_q_tiles), linear tile index with the last axis fastest.
struct BoxTiling {
  BoxShape box;
  int64_t tiles[kMaxRank] = {1, 1, 1};

  NATTN_HOST_DEVICE int64_t count() const { return tiles[0] * tiles[1] * tiles[2]; }

  NATTN_HOST_DEVICE TileOrigin locate(const AxisParams (&axes)[kMaxRank], int64_t t) const {
    TileOrigin o;
    for (int a = kMaxRank - 1; a >= 0; --a) {
      const int64_t ta = t % tiles[a];
      t /= tiles[a];
      const GroupTile gt = axis_locate_q_tile(axes[a], box.extent(a), ta);
      o.group[a] = static_cast<int32_t>(gt.group);
      o.tile[a] = static_cast<int32_t>(gt.tile);
      o.group_len[a] =
          static_cast<int32_t>(group_length(axes[a].length, axes[a].dilation, gt.group));
    }
    return o;
  }
};

NATTN_HOST_DEVICE BoxTiling make_tiling(const AxisParams (&axes)[kMaxRank], BoxShape box) {
  BoxTiling t;
  t.box = box;
  for (int a = 0; a < kMaxRank; ++a) t.tiles[a] = axis_q_tiles(axes[a], box.extent(a));
  return t;
}

// The Q tiles (tiles of q_tile_size group positions) whose queries attend some key of KV tile
// `kv_tile` along one axis, and the sub-range of complete Q tiles every query of which attends
// every valid key of the KV tile (no mask needed along this axis). The mirror of tile_plan.h's
// axis_tile_range: window.h's inverse windows have non-decreasing begin and end, so
//   union over the tile's keys        [inv(first).begin, inv(last).end)
//   intersection over the tile's keys [inv(last).begin, inv(first).end)
// with `last` the tile's last key inside the group (the rows past it are never stored, so they
// need no mask). A Q tile cut by the group's end is never full: its missing queries are columns
// of the backward's reductions and must be masked.
NATTN_HOST_DEVICE AxisTileRange axis_inverse_tile_range(int64_t group_len, int64_t kernel_size,
                                                        int64_t stride, bool is_causal,
                                                        int64_t kv_tile_size,
                                                        int64_t q_tile_size, int64_t kv_tile) {
  using detail::max64;
  using detail::min64;
  const int64_t first = kv_tile * kv_tile_size;
  const int64_t last = min64(first + kv_tile_size, group_len) - 1;
  const Span a = inverse_window_in_group(group_len, kernel_size, stride, is_causal, first);
  const Span b = inverse_window_in_group(group_len, kernel_size, stride, is_causal, last);
  AxisTileRange r{0, 0, 0, 0};
  if (b.end <= a.begin) return r;
  r.kv_begin = a.begin / q_tile_size;
  r.kv_end = (b.end - 1) / q_tile_size + 1;
  const int64_t lo = b.begin;
  const int64_t hi = min64(a.end, group_len);
  const int64_t fb = (lo + q_tile_size - 1) / q_tile_size;
  const int64_t fe = hi >= 0 ? hi / q_tile_size : 0;
  r.full_begin = min64(max64(fb, r.kv_begin), r.kv_end);
  r.full_end = max64(r.full_begin, min64(fe, r.kv_end));
  return r;
}

// Which stage of the mainloop a column tile belongs to.
enum class Stage : int {
  kFull = 0,        // inside every row's window on every axis: no per-element mask
  kMasked = 1,      // visited but cut by some row's window (or by a group's end): masked
  kAdditional = 2,  // a tile of additional (global) tokens: only the token count masks
  kDone = 3,
};

// The column tiles one row tile visits: per axis a range of tile indices (within the row tile's
// dilation group) and the full sub-range (tile_plan.h's AxisTileRange, narrowed to 32 bits). A
// column tile is visited iff it is visited on every axis and full iff it is full on every axis
// (the neighborhood is a product of per-axis windows).
struct TileWalk {
  int32_t begin[kMaxRank];
  int32_t end[kMaxRank];
  int32_t full_begin[kMaxRank];
  int32_t full_end[kMaxRank];
  int32_t additional_tiles = 0;  // tiles of additional tokens, visited after the spatial ones

  NATTN_HOST_DEVICE void set(int a, const AxisTileRange& r) {
    begin[a] = static_cast<int32_t>(r.kv_begin);
    end[a] = static_cast<int32_t>(r.kv_end);
    full_begin[a] = static_cast<int32_t>(r.full_begin);
    full_end[a] = static_cast<int32_t>(r.full_end);
  }
  NATTN_HOST_DEVICE int32_t visited() const {
    return (end[0] - begin[0]) * (end[1] - begin[1]) * (end[2] - begin[2]);
  }
  NATTN_HOST_DEVICE int32_t full() const {
    return (full_end[0] - full_begin[0]) * (full_end[1] - full_begin[1]) *
           (full_end[2] - full_begin[2]);
  }
  // Per-axis tile indices of the n-th tile of the full sub-box (last axis fastest).
  NATTN_HOST_DEVICE void full_tile(int32_t n, int32_t (&t)[kMaxRank]) const {
    for (int a = kMaxRank - 1; a >= 0; --a) {
      const int32_t m = full_end[a] - full_begin[a];
      t[a] = full_begin[a] + n % m;
      n /= m;
    }
  }
  // Per-axis tile indices of the n-th tile of the visited box (last axis fastest).
  NATTN_HOST_DEVICE void visited_tile(int32_t n, int32_t (&t)[kMaxRank]) const {
    for (int a = kMaxRank - 1; a >= 0; --a) {
      const int32_t m = end[a] - begin[a];
      t[a] = begin[a] + n % m;
      n /= m;
    }
  }
  NATTN_HOST_DEVICE bool is_full(const int32_t (&t)[kMaxRank]) const {
    bool full = true;
    for (int a = 0; a < kMaxRank; ++a) full = full && t[a] >= full_begin[a] && t[a] < full_end[a];
    return full;
  }
};

// Position in a TileWalk: the stage, the index within it (the full sub-box's enumeration for
// kFull, the visited box's for kMasked, the additional tile for kAdditional) and the per-axis
// tile indices of spatial tiles. Walks the full tiles first, then the masked ones, then the
// additional ones, so the mainloop is an unmasked stage followed by masked stages.
struct WalkCursor {
  Stage stage = Stage::kFull;
  int32_t n = -1;
  int32_t tile[kMaxRank] = {0, 0, 0};

  NATTN_HOST_DEVICE bool done() const { return stage == Stage::kDone; }

  NATTN_HOST_DEVICE void advance(const TileWalk& w) {
    if (stage == Stage::kFull) {
      if (n + 1 < w.full()) {
        ++n;
        w.full_tile(n, tile);
        return;
      }
      stage = Stage::kMasked;
      n = -1;
    }
    if (stage == Stage::kMasked) {
      const int32_t visited = w.visited();
      for (++n; n < visited; ++n) {
        w.visited_tile(n, tile);
        if (!w.is_full(tile)) return;
      }
      stage = Stage::kAdditional;
      n = -1;
    }
    if (stage == Stage::kAdditional) {
      if (n + 1 < w.additional_tiles) {
        ++n;
        return;
      }
      stage = Stage::kDone;
    }
  }

  NATTN_HOST_DEVICE static WalkCursor begin(const TileWalk& w) {
    WalkCursor c;
    c.advance(w);
    return c;
  }
};

// KV tiles visited by the Q tile `q` (forward and dQ).
NATTN_HOST_DEVICE TileWalk forward_walk(const AxisParams (&axes)[kMaxRank], const TileOrigin& q,
                                        BoxShape q_box, BoxShape kv_box,
                                        int64_t additional_tiles) {
  TileWalk w;
  for (int a = 0; a < kMaxRank; ++a) {
    w.set(a, axis_tile_range(q.group_len[a], axes[a].kernel_size, axes[a].stride,
                             axes[a].is_causal, q_box.extent(a), kv_box.extent(a), q.tile[a]));
  }
  w.additional_tiles = static_cast<int32_t>(additional_tiles);
  return w;
}

// Q tiles that attend the KV tile `kv` (dK/dV).
NATTN_HOST_DEVICE TileWalk backward_walk(const AxisParams (&axes)[kMaxRank], const TileOrigin& kv,
                                         BoxShape kv_box, BoxShape q_box) {
  TileWalk w;
  for (int a = 0; a < kMaxRank; ++a) {
    w.set(a, axis_inverse_tile_range(kv.group_len[a], axes[a].kernel_size, axes[a].stride,
                                     axes[a].is_causal, kv_box.extent(a), q_box.extent(a),
                                     kv.tile[a]));
  }
  return w;
}

// Host: a box of 2^log2_rows positions for the tiles of one side. Greedy doubling of the axis
// that most lowers the expected columns a row sees per tile, prod_a (t_a + span_a - 1) / t_a,
// where span_a is the window extent the other side must cover (kernel_size for a Q box; the Q
// box extent plus kernel_size for a KV box). On a 56 x 56 layout with a 7 x 7 window this gives
// 8 x 8 Q tiles: 14 x 14 = 196 key positions per 64 queries, against 7 x 70 = 490 for 1 x 64.
// An axis never grows past its (power-of-two rounded) group length; if the layout is smaller
// than the tile, the leftover factor goes to axis 0 and those rows are simply invalid.
inline BoxShape choose_box(const AxisParams (&axes)[kMaxRank], const int64_t (&span)[kMaxRank],
                           int log2_rows) {
  BoxShape box;
  int used = 0;
  while (used < log2_rows) {
    int best = -1;
    double best_cost = 0.0;
    for (int a = kMaxRank - 1; a >= 0; --a) {
      const int64_t group_len = group_length(axes[a].length, axes[a].dilation, 0);
      if (box.extent(a) >= group_len) continue;
      double cost = 1.0;
      for (int b = 0; b < kMaxRank; ++b) {
        const double t = static_cast<double>(box.extent(b) << (b == a ? 1 : 0));
        cost *= (t + static_cast<double>(span[b]) - 1.0) / t;
      }
      if (best < 0 || cost < best_cost) {
        best = a;
        best_cost = cost;
      }
    }
    if (best < 0) break;
    ++box.log2[best];
    ++used;
  }
  box.log2[0] += log2_rows - used;
  return box;
}

// Host: Q and KV boxes for a problem (the KV box covers the Q box's window union).
struct BoxPair {
  BoxShape q;
  BoxShape kv;
};
inline BoxPair choose_boxes(const AxisParams (&axes)[kMaxRank], int log2_q_rows,
                            int log2_kv_rows) {
  int64_t span[kMaxRank];
  for (int a = 0; a < kMaxRank; ++a) span[a] = axes[a].kernel_size;
  BoxPair boxes;
  boxes.q = choose_box(axes, span, log2_q_rows);
  for (int a = 0; a < kMaxRank; ++a) span[a] = axes[a].kernel_size + boxes.q.extent(a) - 1;
  boxes.kv = choose_box(axes, span, log2_kv_rows);
  return boxes;
}

}  // namespace nattn::cuda::sm80
