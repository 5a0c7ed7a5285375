// THE neighborhood of neighborhood attention: the one definition of which keys a query attends
// to (the window) and which queries attend to a key (the inverse window), per spatial axis.
//
// Every kernel (CPU, CUDA), the tile planner and the Python tests (through nattn._C) use these
// functions; nattn.reference in Python is the one deliberate, independent second copy.
//
// Semantics (NATTEN-compatible, docs/semantics.md and DESIGN.md section 2), one axis of length L,
// kernel size K, stride s, dilation d, causal flag c, query index i:
//   1. dilation group g = i mod d, group position j = i div d; the group holds
//      L_g = ceil((L - g) / d) tokens and group position t is index g + d*t.
//   2. stride block [b, b + s), b = s * (j div s); its leader is
//      non-causal: min(b + s div 2, L_g - 1)    causal: min(b + s - 1, L_g - 1)
//   3. window (group positions)
//      non-causal: start = clamp(leader - K div 2, 0, L_g - K), keys [start, start + K)
//      causal:     start = max(leader - K + 1, 0),             keys [start, j]
// Valid parameters: 1 <= K, K * d <= L, 1 <= s <= K, d >= 1.
//
// The window start is a non-decreasing function of j, and every window of query j is [start(j),
// end(j)) with end(j) non-decreasing as well, so the queries whose window holds a key u form ONE
// contiguous range of group positions: the inverse window below is a single range, in closed
// form, never a search.
#pragma once

#include <cstdint>

#include "nattn/config.h"

namespace nattn {

// Parameters of one spatial axis.
struct AxisParams {
  int64_t length = 1;       // tokens along this axis
  int64_t kernel_size = 1;  // window size K
  int64_t stride = 1;       // s: queries of a stride block share one window
  int64_t dilation = 1;     // d: the window takes every d-th token
  bool is_causal = false;   // window ends at the query itself
};

// Half-open range [begin, end) of group positions.
struct Span {
  int64_t begin;
  int64_t end;
  NATTN_HOST_DEVICE int64_t size() const { return end - begin; }
};

// The indices {first + step * n : 0 <= n < count} of one axis.
struct IndexRange {
  int64_t first;
  int64_t count;
  int64_t step;
  NATTN_HOST_DEVICE int64_t last() const { return first + step * (count - 1); }
  NATTN_HOST_DEVICE bool contains(int64_t i) const {
    return count > 0 && i >= first && i <= last() && (i - first) % step == 0;
  }
};

namespace detail {
NATTN_HOST_DEVICE int64_t min64(int64_t a, int64_t b) { return a < b ? a : b; }
NATTN_HOST_DEVICE int64_t max64(int64_t a, int64_t b) { return a > b ? a : b; }
// Floor division that is exact for negative numerators (b > 0).
NATTN_HOST_DEVICE int64_t floor_div(int64_t a, int64_t b) {
  const int64_t q = a / b;
  return (a % b != 0 && a < 0) ? q - 1 : q;
}
NATTN_HOST_DEVICE int64_t ceil_div(int64_t a, int64_t b) { return -floor_div(-a, b); }
}  // namespace detail

// The indices of two windows of one axis at indices of the same dilation group (the same step):
// from the first index of either to the last of either (the CPU forward pairs two queries of
// axis 1 when this union is small, cpu_tiles.h: axis1_rows).
NATTN_HOST_DEVICE IndexRange window_union(const IndexRange& a, const IndexRange& b) {
  const int64_t first = detail::min64(a.first, b.first);
  const int64_t last = detail::max64(a.last(), b.last());
  return IndexRange{first, (last - first) / a.step + 1, a.step};
}

// Tokens in dilation group g of an axis of length L with dilation d.
NATTN_HOST_DEVICE int64_t group_length(int64_t length, int64_t dilation, int64_t group) {
  return (length - group + dilation - 1) / dilation;
}

// The query whose window every query of j's stride block shares (group positions).
NATTN_HOST_DEVICE int64_t stride_leader(int64_t group_len, int64_t stride, bool is_causal,
                                        int64_t j) {
  const int64_t block = stride * (j / stride);
  const int64_t offset = is_causal ? stride - 1 : stride / 2;
  return detail::min64(block + offset, group_len - 1);
}

// Keys (group positions) that group position j attends to, in a group of group_len tokens.
NATTN_HOST_DEVICE Span window_in_group(int64_t group_len, int64_t kernel_size, int64_t stride,
                                       bool is_causal, int64_t j) {
  const int64_t leader = stride_leader(group_len, stride, is_causal, j);
  if (is_causal) {
    return Span{detail::max64(leader - kernel_size + 1, 0), j + 1};
  }
  const int64_t start =
      detail::max64(0, detail::min64(leader - kernel_size / 2, group_len - kernel_size));
  return Span{start, start + kernel_size};
}

// Queries (group positions) whose window holds key u: the inverse of window_in_group.
//
// Non-causal: start(j) <= u  <=>  leader(j) <= u + K div 2 (or u >= L_g - K, then every j), and
// start(j) > u - K  <=>  leader(j) >= u - K + 1 + K div 2. Leaders of stride block q are
// s*q + s div 2 (capped at L_g - 1), so both conditions are bounds on q.
// Causal: j >= u, and start(j) <= u  <=>  leader(j) <= u + K - 1, leaders s*q + s - 1.
NATTN_HOST_DEVICE Span inverse_window_in_group(int64_t group_len, int64_t kernel_size,
                                               int64_t stride, bool is_causal, int64_t u) {
  using detail::ceil_div;
  using detail::floor_div;
  using detail::max64;
  using detail::min64;
  const int64_t last = group_len - 1;
  if (is_causal) {
    int64_t j_max = last;
    if (u + kernel_size - 1 < last) {
      const int64_t q_max = floor_div(u + kernel_size - stride, stride);
      j_max = min64(stride * q_max + stride - 1, last);
    }
    return Span{u, j_max + 1};
  }
  const int64_t half = kernel_size / 2;
  const int64_t lead_off = stride / 2;
  int64_t j_max = last;
  if (u < group_len - kernel_size && u + half < last) {
    const int64_t q_max = floor_div(u + half - lead_off, stride);
    j_max = min64(stride * q_max + stride - 1, last);
  }
  int64_t j_min = 0;
  const int64_t lowest_leader = u - kernel_size + 1 + half;
  if (u - kernel_size + 1 > 0) {
    j_min = stride * max64(0, ceil_div(lowest_leader - lead_off, stride));
  }
  return Span{j_min, max64(j_min, j_max + 1)};
}

// Keys (axis indices) that query i attends to along one axis.
NATTN_HOST_DEVICE IndexRange key_window(const AxisParams& a, int64_t i) {
  const int64_t g = i % a.dilation;
  const Span w =
      window_in_group(group_length(a.length, a.dilation, g), a.kernel_size, a.stride, a.is_causal,
                      i / a.dilation);
  return IndexRange{g + a.dilation * w.begin, w.size(), a.dilation};
}

// Queries (axis indices) that attend to key t along one axis.
NATTN_HOST_DEVICE IndexRange query_window(const AxisParams& a, int64_t t) {
  const int64_t g = t % a.dilation;
  const Span w = inverse_window_in_group(group_length(a.length, a.dilation, g), a.kernel_size,
                                         a.stride, a.is_causal, t / a.dilation);
  return IndexRange{g + a.dilation * w.begin, w.size(), a.dilation};
}

// Relative-positional-bias index of key index t for query index i along one axis (DESIGN.md
// section 7, NATTEN 0.17): the offset counted in dilated steps, (t - i) / d + K - 1. For every key
// in i's window, t - i is a multiple of d and |t - i| / d <= K - 1 (the window is K consecutive
// group positions holding i), so the index lies in [0, 2K - 2] for any stride and causal flag.
NATTN_HOST_DEVICE int64_t rpb_index(const AxisParams& a, int64_t query, int64_t key) {
  return (key - query) / a.dilation + a.kernel_size - 1;
}

// The same in group positions (query j, key u of one dilation group): u - j + K - 1.
NATTN_HOST_DEVICE int64_t rpb_index_in_group(int64_t kernel_size, int64_t j, int64_t u) {
  return u - j + kernel_size - 1;
}

// Entries of the relative-positional-bias table along one axis: 2K - 1.
NATTN_HOST_DEVICE int64_t rpb_extent(const AxisParams& a) { return 2 * a.kernel_size - 1; }

// Why an axis's parameters are invalid, or nullptr when they are valid (DESIGN.md section 2.4).
NATTN_HOST_DEVICE const char* axis_params_error(const AxisParams& a) {
  if (a.length < 1) return "length must be >= 1";
  if (a.kernel_size < 1) return "kernel_size must be >= 1";
  if (a.dilation < 1) return "dilation must be >= 1";
  if (a.stride < 1) return "stride must be >= 1";
  if (a.stride > a.kernel_size) return "stride must be <= kernel_size";
  if (a.kernel_size * a.dilation > a.length) return "kernel_size * dilation must be <= length";
  return nullptr;
}

}  // namespace nattn
