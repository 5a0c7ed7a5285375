// The tile planner: which key/value tiles a query tile must visit, and which of those need no
// per-element mask. It is the mask policy of every tiled kernel (the "how many tiles, how many
// of them masked" questions of a CUTLASS FMHA mask), and the tile bound of the speed-of-light
// model (python/nattn/perf.py) counts with the same functions.
//
// Tiles live in dilation-group space. With dilation d an axis splits into d groups
// (window.h: group_length), each an undilated sub-problem; a Q tile is Tq consecutive group
// positions of one group per axis, a KV tile Tk consecutive group positions of the same group.
// A multi-dimensional tile is the product of per-axis tiles, and since the neighborhood is the
// product of per-axis windows:
//   a tile pair is visited iff it is visited on every axis,
//   a tile pair is full (needs no mask) iff it is full on every axis.
//
// One axis, one group of L_g tokens, Q tile [a, b). window.h's windows [start(j), end(j)) have
// start and end non-decreasing in j, and consecutive windows overlap or touch (a stride jump is at
// most s <= K for non-causal windows, and start(j + 1) <= j + 1 = end(j) for causal ones), so
//   keys some query of the tile attends to:  exactly [start(a), end(b - 1))     (the union)
//   keys every query of the tile attends to: [start(b - 1), end(a)), maybe empty (the intersection)
// A KV tile [c, c + Tk) is visited iff it overlaps the union, and full iff it lies inside the
// intersection and is not cut by the group's end (c + Tk <= L_g): a cut tile's missing keys must
// be masked. A partial Q tile (b - a < Tq) does not force a mask: its rows are never stored.
//
// All functions are O(1) per Q tile; the per-axis totals loop over the Q tiles of the (at most
// two) distinct group lengths of an axis, never over tile pairs.
#pragma once

#include <cstdint>

#include "nattn/config.h"
#include "nattn/window.h"

namespace nattn {

// KV tiles (in tile units along one axis) for one Q tile: visit [kv_begin, kv_end); the tiles in
// [full_begin, full_end) need no mask along this axis (a sub-range, empty when
// full_begin == full_end).
struct AxisTileRange {
  int64_t kv_begin;
  int64_t kv_end;
  int64_t full_begin;
  int64_t full_end;
  NATTN_HOST_DEVICE int64_t visited() const { return kv_end - kv_begin; }
  NATTN_HOST_DEVICE int64_t full() const { return full_end - full_begin; }
  NATTN_HOST_DEVICE bool is_full(int64_t kv_tile) const {
    return kv_tile >= full_begin && kv_tile < full_end;
  }
};

// Tile counts along one axis, summed over its dilation groups and Q tiles.
struct AxisTileCounts {
  int64_t q_tiles = 0;  // Q tiles along the axis (all groups)
  int64_t visited = 0;  // sum over Q tiles of visited KV tiles
  int64_t full = 0;     // sum over Q tiles of full KV tiles
};

// Whole-problem counts: products of the per-axis counts (groups and tiles are independent per
// axis, so the sum over tile pairs of a product of per-axis indicators factorizes).
struct TilePlanSummary {
  int64_t q_tiles = 0;
  int64_t visited = 0;  // visited (Q tile, KV tile) pairs
  int64_t full = 0;     // visited pairs that need no mask
  int64_t masked = 0;   // visited - full
};

// Number of tiles of `tile` positions covering `length` positions.
NATTN_HOST_DEVICE int64_t tile_count(int64_t length, int64_t tile) {
  return (length + tile - 1) / tile;
}

namespace detail {
// Tiles of `tile` positions that overlap the union [u_begin, u_end) (empty when u_end <= u_begin)
// and, among them, those inside the intersection [lo, min(hi, group_len)): a tile cut by the
// group's end is never complete.
NATTN_HOST_DEVICE AxisTileRange tile_range(int64_t u_begin, int64_t u_end, int64_t lo,
                                           int64_t hi, int64_t group_len, int64_t tile) {
  AxisTileRange r{0, 0, 0, 0};
  if (u_end <= u_begin) return r;
  r.kv_begin = u_begin / tile;
  r.kv_end = (u_end - 1) / tile + 1;
  hi = min64(hi, group_len);
  const int64_t fb = (lo + tile - 1) / tile;
  const int64_t fe = hi >= 0 ? hi / tile : 0;
  r.full_begin = min64(max64(fb, r.kv_begin), r.kv_end);
  r.full_end = max64(r.full_begin, min64(fe, r.kv_end));
  return r;
}
}  // namespace detail

// The KV tiles that Q tile `q_tile` (group positions [q_tile*Tq, min(q_tile*Tq + Tq, L_g)))
// visits along one axis, within a group of `group_len` tokens: window starts and ends are
// non-decreasing in the query, so the tile's keys are the union [first.begin, last.end) and the
// keys every query sees the intersection [last.begin, first.end).
NATTN_HOST_DEVICE AxisTileRange axis_tile_range(int64_t group_len, int64_t kernel_size,
                                                int64_t stride, bool is_causal, int64_t q_tile_size,
                                                int64_t kv_tile_size, int64_t q_tile) {
  const int64_t a = q_tile * q_tile_size;
  const int64_t b_last = detail::min64(a + q_tile_size, group_len) - 1;
  const Span first = window_in_group(group_len, kernel_size, stride, is_causal, a);
  const Span last = window_in_group(group_len, kernel_size, stride, is_causal, b_last);
  return detail::tile_range(first.begin, last.end, last.begin, first.end, group_len,
                            kv_tile_size);
}

// The mirror for the backward's key-side walk: the Q tiles whose queries attend some key of KV
// tile `kv_tile`, and the complete Q tiles every query of which attends every valid key of it.
// Inverse windows (window.h) also have non-decreasing begin and end, so the union is
// [inv(first).begin, inv(last).end) and the intersection [inv(last).begin, inv(first).end), with
// `last` the tile's last key inside the group (rows past it are never stored, so they need no
// mask). A Q tile cut by the group's end is never full: its missing queries are columns of the
// backward's reductions and must be masked.
NATTN_HOST_DEVICE AxisTileRange axis_inverse_tile_range(int64_t group_len, int64_t kernel_size,
                                                        int64_t stride, bool is_causal,
                                                        int64_t kv_tile_size,
                                                        int64_t q_tile_size, int64_t kv_tile) {
  const int64_t first = kv_tile * kv_tile_size;
  const int64_t last = detail::min64(first + kv_tile_size, group_len) - 1;
  const Span a = inverse_window_in_group(group_len, kernel_size, stride, is_causal, first);
  const Span b = inverse_window_in_group(group_len, kernel_size, stride, is_causal, last);
  return detail::tile_range(a.begin, b.end, b.begin, a.end, group_len, q_tile_size);
}

// Q tiles along one axis, all dilation groups: groups 0 .. (L mod d) - 1 hold ceil(L / d)
// tokens, the others floor(L / d).
NATTN_HOST_DEVICE int64_t axis_q_tiles(const AxisParams& a, int64_t q_tile_size) {
  const int64_t longer = a.length % a.dilation;
  return longer * tile_count(group_length(a.length, a.dilation, 0), q_tile_size) +
         (a.dilation - longer) *
             tile_count(group_length(a.length, a.dilation, a.dilation - 1), q_tile_size);
}

// Which dilation group and which Q tile within it the axis-wide Q tile index `t` names
// (0 <= t < axis_q_tiles), ordered group by group: the inverse of the enumeration above, so a
// kernel can map its CTA index to (group, tile) in closed form.
struct GroupTile {
  int64_t group;
  int64_t tile;
};
NATTN_HOST_DEVICE GroupTile axis_locate_q_tile(const AxisParams& a, int64_t q_tile_size,
                                               int64_t t) {
  const int64_t longer = a.length % a.dilation;
  const int64_t n_long = tile_count(group_length(a.length, a.dilation, 0), q_tile_size);
  if (t < longer * n_long) return GroupTile{t / n_long, t % n_long};
  const int64_t n_short =
      tile_count(group_length(a.length, a.dilation, a.dilation - 1), q_tile_size);
  const int64_t rest = t - longer * n_long;
  return GroupTile{longer + rest / n_short, rest % n_short};
}

// Visited and full KV tiles summed over the Q tiles of one group of `group_len` tokens.
NATTN_HOST_DEVICE AxisTileCounts group_tile_counts(int64_t group_len, int64_t kernel_size,
                                                   int64_t stride, bool is_causal,
                                                   int64_t q_tile_size, int64_t kv_tile_size) {
  AxisTileCounts c;
  c.q_tiles = tile_count(group_len, q_tile_size);
  for (int64_t t = 0; t < c.q_tiles; ++t) {
    const AxisTileRange r =
        axis_tile_range(group_len, kernel_size, stride, is_causal, q_tile_size, kv_tile_size, t);
    c.visited += r.visited();
    c.full += r.full();
  }
  return c;
}

// Tile counts along one axis, all dilation groups (at most two distinct group lengths).
NATTN_HOST_DEVICE AxisTileCounts axis_tile_counts(const AxisParams& a, int64_t q_tile_size,
                                                  int64_t kv_tile_size) {
  const int64_t longer = a.length % a.dilation;
  AxisTileCounts total;
  const int64_t lengths[2] = {group_length(a.length, a.dilation, 0),
                              group_length(a.length, a.dilation, a.dilation - 1)};
  const int64_t groups[2] = {longer, a.dilation - longer};
  for (int i = 0; i < 2; ++i) {
    if (groups[i] == 0) continue;
    const AxisTileCounts c = group_tile_counts(lengths[i], a.kernel_size, a.stride, a.is_causal,
                                               q_tile_size, kv_tile_size);
    total.q_tiles += groups[i] * c.q_tiles;
    total.visited += groups[i] * c.visited;
    total.full += groups[i] * c.full;
  }
  return total;
}

// Whole-problem tile counts for rank-3 axes (padding axes: length 1, kernel 1, tiles 1).
NATTN_HOST_DEVICE TilePlanSummary plan_summary(const AxisParams (&axes)[kMaxRank],
                                               const int64_t (&q_tile)[kMaxRank],
                                               const int64_t (&kv_tile)[kMaxRank]) {
  TilePlanSummary s;
  s.q_tiles = 1;
  s.visited = 1;
  s.full = 1;
  for (int i = 0; i < kMaxRank; ++i) {
    const AxisTileCounts c = axis_tile_counts(axes[i], q_tile[i], kv_tile[i]);
    s.q_tiles *= c.q_tiles;
    s.visited *= c.visited;
    s.full *= c.full;
  }
  s.masked = s.visited - s.full;
  return s;
}

}  // namespace nattn
