// Box tiles in dilation-group space, shared by the tensor-core kernels of every architecture
// (sm80, sm90): the box shape, the tiling of the whole token layout, the tile index <-> origin
// decode and the walk over the column tiles a row tile visits (the mask policy's "how many tiles,
// how many of them masked"). Host + device, plain C++17, no CUDA headers: the host-side planners
// and the Python bindings of CPU-only builds include it too. Which box shapes to use is each
// architecture's own heuristic (sm80_tiles.h: choose_boxes, sm90_plan.h: choose_tiles).
//
// A tile is a box of group positions: per axis a power-of-two extent of consecutive positions of
// one dilation group (window.h: group_length), so every tile pair lies inside one undilated
// sub-problem. Row r of a box is the token whose local coordinates are the bit fields of r, the
// last axis fastest (also the order in which a TMA box {chunk, e2, e1, e0, 1} lands in shared
// memory).
//
// The window math is window.h's; the walk of a row tile along one axis is tile_plan.h's
// axis_tile_range (or, for the dK/dV passes, axis_inverse_tile_range).
#pragma once

#include <cstdint>

#include "nattn/config.h"
#include "nattn/params.h"
#include "nattn/tile_plan.h"
#include "nattn/window.h"

namespace nattn::cuda {

// Extents of a box tile, as log2 per axis (powers of two make the row -> coordinate decode a
// shift and a mask instead of two integer divisions per element of every masked score tile).
struct BoxShape {
  int log2[kMaxRank] = {0, 0, 0};

  NATTN_HOST_DEVICE int64_t extent(int a) const { return int64_t{1} << log2[a]; }
  // Local coordinate along axis a of row r (0 <= r < the box's rows).
  NATTN_HOST_DEVICE int local(int r, int a) const {
    int shift = 0;
    for (int b = a + 1; b < kMaxRank; ++b) shift += log2[b];
    return (r >> shift) & ((1 << log2[a]) - 1);
  }
};

// One tile of a box tiling: per axis its dilation group, the group's length and the tile's index
// within the group (its first group position is tile * extent). 32-bit: axes of 2^31 tokens or
// more go to the SIMT fallback (fewer registers per thread; offsets stay 64-bit).
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

// Which stage of the mainloop a column tile belongs to.
enum class Stage : int {
  kFull = 0,        // inside every row's window on every axis: no per-element mask
  kMasked = 1,      // visited but cut by some row's window (or by a group's end): masked
  kAdditional = 2,  // a tile of additional (global) tokens: only the token count masks (sm80)
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
// additional ones, so the mainloop is an unmasked stage followed by masked stages. Every thread
// that runs the same walk (the sm90 producer and consumers) sees the same tile order, so a
// pipeline passes nothing but its stage index.
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

// The KV tiles visited by the Q tile `q` (forward, sm80 dQ), then `additional_tiles` tiles of
// additional tokens.
NATTN_HOST_DEVICE TileWalk forward_walk(const AxisParams (&axes)[kMaxRank], const TileOrigin& q,
                                        BoxShape q_box, BoxShape kv_box,
                                        int64_t additional_tiles = 0) {
  TileWalk w;
  for (int a = 0; a < kMaxRank; ++a) {
    w.set(a, axis_tile_range(q.group_len[a], axes[a].kernel_size, axes[a].stride,
                             axes[a].is_causal, q_box.extent(a), kv_box.extent(a), q.tile[a]));
  }
  w.additional_tiles = static_cast<int32_t>(additional_tiles);
  return w;
}

// The Q tiles that attend the KV tile `kv` (the dK/dV passes of sm80 and sm90), built from
// tile_plan.h's axis_inverse_tile_range the way the forward walk is built from axis_tile_range.
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

}  // namespace nattn::cuda
