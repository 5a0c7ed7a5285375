// How the CPU kernels walk a neighborhood-attention problem: tiles of kRows consecutive queries
// (or keys) along the last spatial axis, key (or query) "lines" packed once per head, and the
// forward tile that both the forward pass and the fp64 backward share.
//
// Tiles run along the last axis inside one dilation group (indices g, g + d, g + 2d, ...): their
// windows on that axis overlap in all but a few keys, and on the other axes they are identical
// (same x0, x1), so a tile's keys are, for every (y0, y1) of those shared windows, one contiguous
// run of group positions on the last axis. That run is a "line" segment; lines are packed
// transposed ([width][position]) so a chunk of kCols positions is a ready-made panel for
// block_dot, with a per-row [lo, hi) mask for the keys outside that row's own window.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>
#include <vector>

#if defined(__SSE2__)
#include <immintrin.h>
#endif

#include "cpu/block_kernels.h"
#include "cpu/cpu_common.h"
#include "cpu/threads.h"
#include "nattn/params.h"
#include "nattn/window.h"


namespace nattn::cpu {

// Shape of the problem as the tiled kernels see it.
struct Geometry {
  int64_t len[3];      // axis lengths
  int64_t dilation;    // dilation of the last axis = number of lines per (x0, x1)
  int64_t group_max;   // longest dilation group of the last axis
  int64_t ld;          // leading dimension of a packed line: room for a chunk read past its end
  int64_t lines;       // len[0] * len[1] * dilation

  explicit Geometry(const AttentionParams& p) {
    for (int a = 0; a < 3; ++a) len[a] = p.axes[a].length;
    dilation = p.axes[2].dilation;
    group_max = group_length(len[2], dilation, 0);
    ld = group_max + kCols;
    lines = len[0] * len[1] * dilation;
  }
  int64_t line(int64_t x0, int64_t x1, int64_t group) const {
    return (x0 * len[1] + x1) * dilation + group;
  }
  int64_t tokens() const { return len[0] * len[1] * len[2]; }
};

// kRows consecutive group positions [j0, j0 + count) of dilation group `group` on the last axis.
struct AxisTile {
  int64_t group;
  int64_t j0;
  int64_t count;
  int64_t index(const Geometry& geo, int64_t r) const { return group + geo.dilation * (j0 + r); }
};

inline std::vector<AxisTile> last_axis_tiles(const Geometry& geo) {
  std::vector<AxisTile> tiles;
  for (int64_t g = 0; g < geo.dilation; ++g) {
    const int64_t n = group_length(geo.len[2], geo.dilation, g);
    for (int64_t j0 = 0; j0 < n; j0 += kRows) {
      tiles.push_back({g, j0, std::min<int64_t>(kRows, n - j0)});
    }
  }
  return tiles;
}

// The window (or inverse window) of one last-axis index as group positions [lo, hi).
inline void group_span(const IndexRange& range, int64_t group, int64_t dilation, int64_t* lo,
                       int64_t* hi) {
  *lo = (range.first - group) / dilation;
  *hi = *lo + range.count;
}

// Each query row's last-axis window as group positions [lo[r], hi[r]) (0, 0 past the tile).
inline void tile_spans(const AttentionParams& p, const Geometry& geo, const AxisTile& tile,
                       int64_t* lo, int64_t* hi) {
  for (int r = 0; r < kRows; ++r) {
    lo[r] = hi[r] = 0;
    if (r < tile.count) {
      group_span(key_window(p.axes[2], tile.index(geo, r)), tile.group, geo.dilation, &lo[r],
                 &hi[r]);
    }
  }
}

// The indices of axis 1 one forward item computes: x1 alone (x1b = -1) or x1 and x1b, the next
// index of its dilation group, as one two-row lane tile (block_kernels.h: LaneTile). Pairs are
// formed only for the lane kernels (`pairs`) and where the two windows share most of their lines:
// 10 x union <= 7 x (sum of the two windows), so 7 x 7 windows pair (8 lines for 14), 3 x 3 ones
// (4 for 6), 2 x 2 ones do not (3 for 4: a row would compute a third more scores for a few
// percent fewer loads). Each dilation group's indices in order, so consecutive items share lines.
struct RowPair {
  int64_t x1, x1b;
};

inline std::vector<RowPair> axis1_rows(const AttentionParams& p, bool pairs) {
  const AxisParams& a = p.axes[1];
  std::vector<RowPair> rows;
  for (int64_t g = 0; g < a.dilation; ++g) {
    const int64_t n = group_length(a.length, a.dilation, g);
    for (int64_t j = 0; j < n; ++j) {
      const int64_t x = g + j * a.dilation;
      if (pairs && j + 1 < n) {
        const IndexRange wa = key_window(a, x), wb = key_window(a, x + a.dilation);
        if (10 * window_union(wa, wb).count <= 7 * (wa.count + wb.count)) {
          rows.push_back({x, x + a.dilation});
          ++j;
          continue;
        }
      }
      rows.push_back({x, -1});
    }
  }
  return rows;
}

// Rows of heads [head0, head0 + n_heads) of a heads-last tensor as contiguous compute-type rows:
// row of head head0 + i, token (x0, x1, x2) at base + i * sh + x0 * s[0] + x1 * s[1] + x2 * s[2].
template <typename A>
struct Rows {
  const A* base;
  int64_t sh;
  int64_t s[3];
  const A* line(int64_t i, int64_t x0, int64_t x1, int64_t group) const {
    return base + i * sh + x0 * s[0] + x1 * s[1] + group * s[2];
  }
  Rows head(int64_t i) const { return Rows{base + i * sh, sh, {s[0], s[1], s[2]}}; }
};

// Asks the cache for n dense elements at `row` (to be read, or written: then in exclusive state,
// so that the stores do not wait for the line to arrive), so that a cold row arrives while other
// work runs. A head's rows of a heads-last tensor are one in every `heads` rows, a stride the
// hardware prefetchers do not follow ahead of time.
template <bool kWrite, typename T>
inline void prefetch_row(const T* row, int64_t n) {
  const char* at = reinterpret_cast<const char*>(row);
  const int64_t bytes = n * static_cast<int64_t>(sizeof(T));
  for (int64_t i = 0; i < bytes; i += 64) {
    __builtin_prefetch(at + i, kWrite ? 1 : 0, 3);
    // GCC deletes a loop whose body has no side effect (C++ forward progress), and a prefetch
    // has none: an empty volatile asm statement keeps the loop.
    asm volatile("");
  }
}

// Rows of heads [head0, head0 + n_heads) of batch b: read in place when the tensor already holds
// compute-type elements whose rows are dense (contiguous last dimension, consecutive tokens
// adjacent: one head's rows form one block), else gathered into `storage`. Heads-last tensors
// with several heads are gathered, so that one head's rows are dense in cache: 128x128 tokens
// over 64x64 (H 4, D 64, fp32, 2 threads, interleaved medians) measured 3.7x the time gathered
// against 3.9x read in place.
template <typename T, typename A>
Rows<A> make_rows(const T* data, const int64_t* stride, int64_t b, int64_t head0, int64_t n_heads,
                  int64_t width, const Geometry& geo, int nt, std::vector<A>& storage) {
  const T* first = data + b * stride[0] + head0 * stride[4];
  if constexpr (std::is_same_v<T, A>) {
    if (stride[5] == 1 && stride[3] == width) {
      return Rows<A>{first, stride[4], {stride[1], stride[2], stride[3]}};
    }
  }
  const int64_t per_head = geo.tokens() * width;
  storage.resize(static_cast<size_t>(n_heads * per_head));
  A* dst = storage.data();
  const int64_t n_x01 = geo.len[0] * geo.len[1];
  parallel_for(nt, n_heads * n_x01, [&](int64_t item, int) {
    const int64_t i = item / n_x01, x01 = item % n_x01;
    const int64_t x0 = x01 / geo.len[1], x1 = x01 % geo.len[1];
    for (int64_t x2 = 0; x2 < geo.len[2]; ++x2) {
      load_row(first + i * stride[4] + x0 * stride[1] + x1 * stride[2] + x2 * stride[3],
               stride[5], width, dst + i * per_head + (x01 * geo.len[2] + x2) * width);
    }
  });
  return Rows<A>{dst, per_head, {geo.len[1] * geo.len[2] * width, geo.len[2] * width, width}};
}

#if defined(__SSE2__)
// out[j * out_step + i] = in[i * in_step + j] for i, j < 4, through SSE registers (every x86-64
// CPU has SSE2): pack_lines and transpose_tile move fp32 in these blocks, a quarter of the
// element-wise loads and stores.
inline void transpose4x4(const float* in, int64_t in_step, float* out, int64_t out_step) {
  __m128 r0 = _mm_loadu_ps(in), r1 = _mm_loadu_ps(in + in_step);
  __m128 r2 = _mm_loadu_ps(in + 2 * in_step), r3 = _mm_loadu_ps(in + 3 * in_step);
  _MM_TRANSPOSE4_PS(r0, r1, r2, r3);
  _mm_storeu_ps(out, r0);
  _mm_storeu_ps(out + out_step, r1);
  _mm_storeu_ps(out + 2 * out_step, r2);
  _mm_storeu_ps(out + 3 * out_step, r3);
}
#endif

// The 32-bit bf16 pair (lo, hi) of two fp32 values that hold bf16 values (low 16 bits zero), from
// their bits: exact (cpu_common.h: BF16Pair).
inline uint32_t bf16_pair_bits(uint32_t lo, uint32_t hi) { return (lo >> 16) | (hi & 0xffff0000u); }

// One packed row of n fp32 values holding bf16 values, in place, as position pairs: element x
// becomes the bf16 pair (row[x - 1], row[x]), with row[-1] = 0 (block_kernels.h:
// lane_forward_bf16 reads the pair of positions x, x + 1 one element further on). Through a copy,
// so that the loop reads and writes different arrays and vectorizes. Exact: the values' low 16
// bits are zero.
inline void position_pairs(float* row, int64_t n) {
  thread_local std::vector<uint32_t> copy;
  copy.resize(static_cast<size_t>(n) + 1);
  copy[0] = 0;
  std::memcpy(copy.data() + 1, row, static_cast<size_t>(n) * sizeof(float));
  const uint32_t* in = copy.data();
  for (int64_t x = 0; x < n; ++x) {
    const uint32_t pair = bf16_pair_bits(in[x], in[x + 1]);
    std::memcpy(row + x, &pair, sizeof pair);
  }
}

// Transposed lines of heads [head0, head0 + n_heads) of batch b: storage[i][line][w][t] = element
// w of group position t, zero past the group's end (chunks read up to kCols - 1 positions beyond
// it) and, through the row before's tail, for the kLanes positions before its start. Head i's
// lines start at the returned pointer + i * geo.lines * width * geo.ld. pairs (bf16 values in
// fp32 only): each row of ld elements then holds position pairs (position_pairs).
template <typename T, typename A>
const A* pack_lines(const T* data, const int64_t* stride, int64_t b, int64_t head0,
                    int64_t n_heads, int64_t width, const Geometry& geo, int nt,
                    std::vector<A>& storage, bool pairs = false) {
  const T* first = data + b * stride[0] + head0 * stride[4];
  // kLanes zeros ahead of the first line: the lane kernels read up to kLanes - 1 positions before
  // a line's start, which for the other rows is the row before's zero tail.
  storage.resize(static_cast<size_t>(kLanes + n_heads * geo.lines * width * geo.ld));
  std::fill(storage.begin(), storage.begin() + kLanes, A(0));
  A* dst = storage.data() + kLanes;
  parallel_for(nt, n_heads * geo.lines, [&](int64_t item, int) {
    const int64_t i = item / geo.lines, l = item % geo.lines;
    const int64_t g = l % geo.dilation, x01 = l / geo.dilation;
    const int64_t x0 = x01 / geo.len[1], x1 = x01 % geo.len[1];
    const int64_t n = group_length(geo.len[2], geo.dilation, g);
    const T* src = first + i * stride[4] + x0 * stride[1] + x1 * stride[2] + g * stride[3];
    const int64_t t_step = geo.dilation * stride[3];
    A* line = dst + item * width * geo.ld;
    // Blocks of kCols positions: the block's source rows stay in L1 while each of the width
    // destination rows receives kCols contiguous elements (one cache line of fp32), instead of
    // every element landing in a different line.
    for (int64_t t0 = 0; t0 < n; t0 += kCols) {
      const int64_t count = std::min<int64_t>(kCols, n - t0);
      if (stride[5] == 1) {  // the next block's source rows (the rows of one head are strided)
        for (int64_t t = t0 + kCols; t < std::min(n, t0 + 2 * kCols); ++t) {
          prefetch_row<false>(src + t * t_step, width);
        }
      }
      int64_t w = 0;
#if defined(__SSE2__)
      // fp32 rows with contiguous elements: 4 x 4 blocks through SSE registers (every x86-64
      // CPU has SSE2), a quarter of the element-wise loop's loads and stores. fp16 and bf16
      // rows are first converted into an fp32 block of kCols rows (load_row, whose fp16 loop is
      // vectorized; element by element, fp16's conversion made the fp16 backward 2x slower than
      // fp32's), then transposed from there. bf16 pairs (BF16Pair) move as their 32 bits.
      if constexpr (std::is_same_v<A, float> &&
                    (std::is_same_v<T, float> || std::is_same_v<T, Half> ||
                     std::is_same_v<T, BFloat16> || std::is_same_v<T, BF16Pair>)) {
        if (stride[5] == 1 && count == kCols) {
          const float* rows = nullptr;
          int64_t row_step = 0;
          if constexpr (std::is_same_v<T, float>) {
            rows = src + t0 * t_step;
            row_step = t_step;
          } else if constexpr (std::is_same_v<T, BF16Pair>) {
            rows = reinterpret_cast<const float*>(src + t0 * t_step);
            row_step = t_step;
          } else {
            thread_local std::vector<float> block;
            block.resize(static_cast<size_t>(kCols * width));
            for (int64_t t = 0; t < kCols; ++t) {
              load_row(src + (t0 + t) * t_step, 1, width, block.data() + t * width);
            }
            rows = block.data();
            row_step = width;
          }
          for (; w + 4 <= width; w += 4) {
            for (int64_t t = 0; t < kCols; t += 4) {
              transpose4x4(rows + t * row_step + w, row_step, line + w * geo.ld + t0 + t, geo.ld);
            }
          }
        }
      }
#endif
      for (; w < width; ++w) {
        A* out = line + w * geo.ld + t0;
        const T* in = src + t0 * t_step + w * stride[5];
        for (int64_t t = 0; t < count; ++t) out[t] = to_compute<A>(in[t * t_step]);
      }
    }
    for (int64_t w = 0; w < width; ++w) {
      std::fill(line + w * geo.ld + n, line + (w + 1) * geo.ld, A(0));
    }
    if constexpr (std::is_same_v<A, float>) {
      if (pairs) {
        for (int64_t w = 0; w < width; ++w) position_pairs(line + w * geo.ld, geo.ld);
      }
    }
  });
  return dst;
}

// Additional (global) tokens of (b, kv head) as a transposed panel [width][count + kCols], zero
// padded so that chunks may read kCols - 1 entries past the end.
template <typename T, typename A>
void pack_additional_transposed(const T* data, const int64_t* stride, int64_t b, int64_t head,
                                int64_t count, int64_t width, std::vector<A>& storage) {
  const int64_t ld = count + kCols;
  storage.assign(static_cast<size_t>(width * ld), A(0));
  for (int64_t m = 0; m < count; ++m) {
    const T* src = data + b * stride[0] + m * stride[1] + head * stride[2];
    for (int64_t w = 0; w < width; ++w) storage[w * ld + m] = to_compute<A>(src[w * stride[3]]);
  }
}

// Additional (global) tokens of (b, kv head) as contiguous rows [count][width].
template <typename T, typename A>
void pack_additional_rows(const T* data, const int64_t* stride, int64_t b, int64_t head,
                          int64_t count, int64_t width, std::vector<A>& storage) {
  storage.resize(static_cast<size_t>(count * width));
  for (int64_t m = 0; m < count; ++m) {
    load_row(data + b * stride[0] + m * stride[1] + head * stride[2], stride[3], width,
             storage.data() + m * width);
  }
}

// Loads the tile's rows of tensor (b, head) at (x0, x1) into dst[kRows][width]; rows past the
// tile's count are zero.
template <typename T, typename A>
void load_tile(const T* data, const int64_t* stride, int64_t b, int64_t head, int64_t x0,
               int64_t x1, const AxisTile& tile, const Geometry& geo, int64_t width, A* dst) {
  const T* base = data + b * stride[0] + x0 * stride[1] + x1 * stride[2] + head * stride[4];
  for (int64_t r = 0; r < kRows; ++r) {
    if (r < tile.count) {
      load_row(base + tile.index(geo, r) * stride[3], stride[5], width, dst + r * width);
    } else {
      std::fill(dst + r * width, dst + (r + 1) * width, A(0));
    }
  }
}

// prefetch_row for the rows load_tile reads (kWrite: the rows a tile's results are stored to);
// dense rows (unit element stride) only.
template <bool kWrite, typename T>
void prefetch_tile(const T* data, const int64_t* stride, int64_t b, int64_t head, int64_t x0,
                   int64_t x1, const AxisTile& tile, const Geometry& geo, int64_t width) {
  if (stride[5] != 1) return;
  const T* base = data + b * stride[0] + x0 * stride[1] + x1 * stride[2] + head * stride[4];
  for (int64_t r = 0; r < tile.count; ++r) {
    prefetch_row<kWrite>(base + tile.index(geo, r) * stride[3], width);
  }
}

// A tile as the lane kernels see it (block_kernels.h: LaneTile): lane r's window [lo[r], hi[r])
// in group positions (0, 0 past the tile), and the window offsets: lane r at offset u reads
// position base + u + r, and u < offsets covers every lane's window. lo, hi: tile_spans.
struct LaneSpan {
  int64_t base = 0, offsets = 0;
  int32_t lo[kLanes] = {}, hi[kLanes] = {};  // positions fit int32 (use_lane_forward)
};
inline LaneSpan lane_span(const AxisTile& tile, const int64_t* lo, const int64_t* hi) {
  LaneSpan span;
  int64_t first = std::numeric_limits<int64_t>::max(), end = std::numeric_limits<int64_t>::min();
  for (int r = 0; r < kLanes; ++r) {
    span.lo[r] = static_cast<int32_t>(lo[r]);
    span.hi[r] = static_cast<int32_t>(hi[r]);
    if (r >= tile.count) continue;
    first = std::min(first, lo[r] - r);
    end = std::max(end, hi[r] - r);
  }
  span.base = first;
  span.offsets = end - first;
  return span;
}

// dst[w * lanes + r] = src[r * width + w]: a tile's rows as the lane kernels' operand (lanes:
// kRows, or 2 * kRows for lane_line_scores_pair's two tiles). fp32 in 4 x 4 blocks through SSE
// registers (as pack_lines), a quarter of the element-wise loads and stores.
template <typename A>
void transpose_tile(const A* src, int64_t width, A* dst, int64_t lanes = kRows) {
  int64_t w0 = 0;
#if defined(__SSE2__)
  if constexpr (std::is_same_v<A, float>) {
    static_assert(kRows % 4 == 0, "4 x 4 blocks");
    for (; w0 + 4 <= width; w0 += 4) {
      for (int r = 0; r < kRows; r += 4) {
        transpose4x4(src + r * width + w0, width, dst + w0 * lanes + r, lanes);
      }
    }
  }
#endif
  for (int r = 0; r < kRows; ++r) {
    for (int64_t w = w0; w < width; ++w) dst[w * lanes + r] = src[r * width + w];
  }
}

// dst[i] = the bf16 pair (src[2i], src[2i + 1]) as one 32-bit element (cpu_common.h: BF16Pair)
// for i < n, from fp32 values that hold bf16 values (low 16 bits zero): exact.
inline void bf16_pairs_of(const float* src, int64_t n, float* dst) {
  for (int64_t i = 0; i < n; ++i) {
    uint32_t lo, hi;
    std::memcpy(&lo, src + 2 * i, sizeof lo);
    std::memcpy(&hi, src + 2 * i + 1, sizeof hi);
    const uint32_t pair = bf16_pair_bits(lo, hi);
    std::memcpy(dst + i, &pair, sizeof pair);
  }
}

// transpose_tile of a tile's rows (kRows x width fp32 holding bf16 values, width even) as bf16
// pairs: dst[j * lanes + r] = the pair of elements 2j, 2j + 1 of row r.
inline void transpose_tile_pairs(const float* src, int64_t width, float* dst,
                                 int64_t lanes = kRows) {
  thread_local std::vector<float> pairs;
  pairs.resize(static_cast<size_t>(kRows * width / 2));
  bf16_pairs_of(src, kRows * width / 2, pairs.data());
  transpose_tile(pairs.data(), width / 2, dst, lanes);
}

// Rows 2m, 2m + 1 of fp32 rows holding bf16 values as one row of bf16 pairs (the operand b of
// block_kernels.h: accumulate_pairs_bf16): out[m * ldo + w] = the pair (row 2m, row 2m + 1) at
// column w for m < pairs, w < width, with row j at rows + j * row_step for j < count and zero
// for j >= count; columns width .. ldo - 1 are zero. Exact.
inline void interleave_pairs(const float* rows, int64_t row_step, int64_t count, int64_t pairs,
                             int64_t width, int64_t ldo, float* out) {
  for (int64_t m = 0; m < pairs; ++m) {
    float* dst = out + m * ldo;
    const float* first = rows + 2 * m * row_step;
    const float* second = first + row_step;
    const bool has_second = 2 * m + 1 < count;
    for (int64_t w = 0; w < width; ++w) {
      uint32_t lo, hi = 0;
      std::memcpy(&lo, first + w, sizeof lo);
      if (has_second) std::memcpy(&hi, second + w, sizeof hi);
      const uint32_t pair = bf16_pair_bits(lo, hi);
      std::memcpy(dst + w, &pair, sizeof pair);
    }
    std::fill(dst + width, dst + ldo, 0.0f);
  }
}

// interleave_pairs straight from bf16 rows (contiguous elements, row j at first + j * step): the
// same bits without widening the rows to fp32 first. SSE2: row 2m's and row 2m + 1's elements
// interleaved 16 bits at a time are the pairs.
inline void interleave_pairs_bf16(const BFloat16* first, int64_t step, int64_t count,
                                  int64_t pairs, int64_t width, int64_t ldo, float* out) {
  for (int64_t m = 0; m < pairs; ++m) {
    float* dst = out + m * ldo;
    const BFloat16* lo = first + 2 * m * step;
    const BFloat16* hi = 2 * m + 1 < count ? lo + step : nullptr;
    int64_t w = 0;
#if defined(__SSE2__)
    for (; w + 8 <= width; w += 8) {
      const __m128i a = _mm_loadu_si128(reinterpret_cast<const __m128i*>(lo + w));
      const __m128i b = hi != nullptr
                            ? _mm_loadu_si128(reinterpret_cast<const __m128i*>(hi + w))
                            : _mm_setzero_si128();
      _mm_storeu_si128(reinterpret_cast<__m128i*>(dst + w), _mm_unpacklo_epi16(a, b));
      _mm_storeu_si128(reinterpret_cast<__m128i*>(dst + w + 4), _mm_unpackhi_epi16(a, b));
    }
#endif
    for (; w < width; ++w) {
      const uint32_t pair = static_cast<uint32_t>(lo[w].bits) |
                            (hi != nullptr ? static_cast<uint32_t>(hi[w].bits) << 16 : 0u);
      std::memcpy(dst + w, &pair, sizeof pair);
    }
    std::fill(dst + width, dst + ldo, 0.0f);
  }
}

// The tile's bf16 query rows of (b, head) at (x0, x1) as the bf16 lane forward's operand
// (block_kernels.h: lane_forward_bf16): dst[j * kLanes + r] = the pair of elements 2j, 2j + 1 of
// row r for j < pairs, 0 for rows past the tile's count. pair_stride: the tensor's strides in
// pairs (dims 0..4; its elements are contiguous). 4 x 4 blocks of pairs through SSE registers,
// as transpose_tile moves fp32.
inline void load_tile_pairs(const BF16Pair* data, const int64_t* pair_stride, int64_t b,
                            int64_t head, int64_t x0, int64_t x1, const AxisTile& tile,
                            const Geometry& geo, int64_t pairs, float* dst) {
  const BF16Pair* first = data + b * pair_stride[0] + x0 * pair_stride[1] +
                          x1 * pair_stride[2] + head * pair_stride[4] +
                          tile.index(geo, 0) * pair_stride[3];
  const int64_t step = geo.dilation * pair_stride[3];  // between the tile's rows
  int64_t j0 = 0;
#if defined(__SSE2__)
  if (tile.count == kRows) {
    for (; j0 + 4 <= pairs; j0 += 4) {
      for (int r = 0; r < kRows; r += 4) {
        transpose4x4(reinterpret_cast<const float*>(first + r * step + j0), step,
                     dst + j0 * kLanes + r, kLanes);
      }
    }
  }
#endif
  for (int r = 0; r < kRows; ++r) {
    for (int64_t j = j0; j < pairs; ++j) {
      dst[j * kLanes + r] = r < tile.count ? to_compute<float>(first[r * step + j]) : 0.0f;
    }
  }
}

// Per-row [lo, hi) of a tile, clipped to the chunk [c0, c0 + n) and made chunk-local.
inline void chunk_spans(const int64_t* lo, const int64_t* hi, int64_t c0, int64_t n,
                        int64_t* clo, int64_t* chi) {
  for (int r = 0; r < kRows; ++r) {
    clo[r] = std::clamp<int64_t>(lo[r] - c0, 0, n);
    chi[r] = std::clamp<int64_t>(hi[r] - c0, 0, n);
  }
}

// The relative positional bias (params.h: rpb) in compute type, one padded line per (head, b0,
// b1) holding the 2*K2 - 1 entries of the last axis at offset kRows. A tile's rows are
// consecutive group positions j0 + r of the last axis and a chunk's columns consecutive
// positions c0 + c, so the bias of (r, c) is line[kRows + (c0 - j0 + K2 - 1) - r + c]
// (rpb_index_in_group): one kCols-wide window of the line, shifted by -1 per row, read whole
// by block_add_bias. Every query lies in its own window of K2 group positions, so the valid
// entries index [0, 2K2 - 2]; the masked ones reach at most kRows - 1 below and kRows + kCols - 1
// above, which the zero padding covers. `reversed` lines hold the entries backwards, for the
// key-side walk of the backward (rows keys, columns queries: index (j0 + r) - (c0 + c) + K2 - 1).
template <typename A>
struct BiasTable {
  static constexpr int64_t kPad = kRows;
  int64_t extent[3] = {1, 1, 1};  // 2K - 1 per axis
  int64_t kernel_last = 1;        // K2
  int64_t ld = 0;                 // padded line length
  std::vector<A> forward, reversed;

  BiasTable() = default;
  template <typename T>
  BiasTable(const AttentionParams& p, const T* rpb, bool with_reversed) {
    for (int a = 0; a < 3; ++a) extent[a] = rpb_extent(p.axes[a]);
    kernel_last = p.axes[2].kernel_size;
    ld = kPad + extent[2] + kRows + kCols;
    forward.assign(static_cast<size_t>(p.heads * extent[0] * extent[1] * ld), A(0));
    if (with_reversed) reversed.assign(forward.size(), A(0));
    const int64_t* st = p.rpb.stride;
    for (int64_t h = 0; h < p.heads; ++h) {
      for (int64_t b0 = 0; b0 < extent[0]; ++b0) {
        for (int64_t b1 = 0; b1 < extent[1]; ++b1) {
          const int64_t at = lines_offset(h, b0, b1) + kPad;
          for (int64_t t = 0; t < extent[2]; ++t) {
            const A x = to_compute<A>(rpb[h * st[0] + b0 * st[1] + b1 * st[2] + t * st[3]]);
            forward[at + t] = x;
            if (with_reversed) reversed[at + extent[2] - 1 - t] = x;
          }
        }
      }
    }
  }
  int64_t lines_offset(int64_t h, int64_t b0, int64_t b1) const {
    return ((h * extent[0] + b0) * extent[1] + b1) * ld;
  }
  // Size of one head's lines (for per-head accumulators laid out like the table).
  int64_t head_size() const { return extent[0] * extent[1] * ld; }
  // Row 0's bias for a chunk starting at group position c0 of a tile starting at j0, in the line
  // at `line` (forward.data() or reversed.data() + lines_offset); rows step by -1.
  const A* chunk(const A* line, int64_t j0, int64_t c0) const {
    return line + kPad + rpb_index_in_group(kernel_last, j0, c0);
  }
};

// The (b0, b1) line of head h for query (x0, x1) and key (y0, y1), as an offset into a table
// laid out like BiasTable.
template <typename A>
int64_t bias_line(const BiasTable<A>& t, const AttentionParams& p, int64_t h, int64_t x0,
                  int64_t x1, int64_t y0, int64_t y1) {
  return t.lines_offset(h, rpb_index(p.axes[0], x0, y0), rpb_index(p.axes[1], x1, y1));
}

// block_accumulate restricted to each row's own columns: o[r * ldo + w] += sum over clo[r] <= c <
// chi[r] of p[r * kCols + c] * b[c * ldb + w]. block_accumulate multiplies every row's masked
// weights (exactly 0) by every b row of the chunk, and 0 * NaN = NaN, so a non-finite b row would
// reach rows whose window does not contain it; here it reaches only its own rows. Scalar: it runs
// only on the rare tiles whose fast result came out non-finite (finite_rows).
template <typename A>
void block_accumulate_spans(const A* p, const int64_t* clo, const int64_t* chi, const A* b,
                            int64_t ldb, int64_t width, A* o, int64_t ldo) {
  for (int r = 0; r < kRows; ++r) {
    for (int64_t c = clo[r]; c < chi[r]; ++c) {
      const A w = p[r * kCols + c];
      const A* src = b + c * ldb;
      A* dst = o + r * ldo;
      for (int64_t i = 0; i < width; ++i) dst[i] += w * src[i];
    }
  }
}

// Whether all n entries of x are finite. The kernels check their results with it and recompute a
// non-finite tile with its sums restricted to each row's window (block_accumulate_spans), so that
// a non-finite input affects exactly the outputs whose window (or gradient path) contains it. The
// test is on the exponent bits (all ones: NaN or +-inf), an OR over integers that the compiler
// vectorizes, unlike a floating-point reduction it may not reorder.
template <typename A>
bool all_finite(const A* x, int64_t n) {
  using U = std::conditional_t<sizeof(A) == 4, uint32_t, uint64_t>;
  static_assert(sizeof(A) == sizeof(U) && std::numeric_limits<A>::is_iec559);
  constexpr U kExp = static_cast<U>(sizeof(A) == 4 ? 0x7f800000ull : 0x7ff0000000000000ull);
  U bad = 0;
  for (int64_t i = 0; i < n; ++i) {
    U u;
    std::memcpy(&u, x + i, sizeof u);
    bad |= static_cast<U>((u & kExp) == kExp);
  }
  return bad == 0;
}

// Keys of one (b, kv head) as the forward tile reads them.
template <typename A>
struct ForwardKeys {
  const A* k_lines;  // pack_lines of k, width head_dim
  Rows<A> v;         // value rows (head index 0 is this kv head)
  const A* add_kt;   // additional keys, transposed [head_dim][num_additional + kCols]
  const A* add_v;    // additional values, rows [num_additional][value_dim]
  const BiasTable<A>* bias = nullptr;  // relative positional bias, or null
  const A* v_lines = nullptr;  // pack_lines of v (width value_dim) for the lane kernels, or null
  // k_lines and v_lines in the bf16 pair layouts of lane_forward_bf16 (block_kernels.h), which
  // then runs instead of lane_forward.
  bool bf16_pairs = false;
};

template <typename A>
struct ForwardScratch {
  // Queries and outputs of up to kLaneRowsMax rows of kRows (the block kernels use the first).
  std::vector<A> q, o, s;
  // Lane kernels: transposed queries, window scores, transposed output, line pointers, the lines
  // each row's window holds.
  std::vector<float> qt, lane_s, ot;
  std::vector<const float*> k_at, v_at;
  std::vector<uint8_t> member;
  explicit ForwardScratch(const AttentionParams& p)
      : q(kLaneRowsMax * kRows * p.head_dim),
        o(kLaneRowsMax * kRows * p.value_dim),
        s(kRows * kCols) {}
};

// Multiply-adds of the forward's product kernels, lane and block, over the whole problem per
// (batch, head), exactly (the walk perf.cpu_forward_flops describes, which reports these counts
// through _C.cpu_forward_macs).
inline void forward_kernel_macs(const AttentionParams& p, double* lane, double* block) {
  const Geometry geo(p);
  const double D = static_cast<double>(p.head_dim), Dv = static_cast<double>(p.value_dim);
  const double M = static_cast<double>(p.num_additional);
  double lane_lines = 0, block_lines = 0, tiles = 0;
  for (const AxisTile& tile : last_axis_tiles(geo)) {
    int64_t lo[kRows], hi[kRows];
    tile_spans(p, geo, tile, lo, hi);
    int64_t p_lo = lo[0], p_hi = hi[0], u_lo = lo[0] - tile.j0, u_hi = hi[0] - tile.j0;
    for (int r = 1; r < tile.count; ++r) {
      p_lo = std::min(p_lo, lo[r]);
      p_hi = std::max(p_hi, hi[r]);
      u_lo = std::min(u_lo, lo[r] - (tile.j0 + r));
      u_hi = std::max(u_hi, hi[r] - (tile.j0 + r));
    }
    const double span = static_cast<double>(p_hi - p_lo);
    lane_lines += kRows * static_cast<double>(u_hi - u_lo) * (D + Dv);
    block_lines += std::ceil(span / kCols) * kCols * kRows * D + kRows * span * Dv;
    tiles += 1;
  }
  double keys01 = 1, queries01 = 1;  // other axes: key indices summed over query indices; count
  for (int a = 0; a < 2; ++a) {
    double sum = 0;
    for (int64_t i = 0; i < p.axes[a].length; ++i) {
      sum += static_cast<double>(key_window(p.axes[a], i).count);
    }
    keys01 *= sum;
    queries01 *= static_cast<double>(p.axes[a].length);
  }
  // The lane kernels visit, for each row of a two-row tile, the union of both rows' axis-1 lines.
  double lane_keys1 = 0;
  for (const RowPair& r : axis1_rows(p, true)) {
    lane_keys1 += r.x1b < 0 ? static_cast<double>(key_window(p.axes[1], r.x1).count)
                            : 2.0 * static_cast<double>(
                                        window_union(key_window(p.axes[1], r.x1),
                                                     key_window(p.axes[1], r.x1b)).count);
  }
  double keys0 = 0;
  for (int64_t i = 0; i < p.axes[0].length; ++i) {
    keys0 += static_cast<double>(key_window(p.axes[0], i).count);
  }
  *lane = keys0 * lane_keys1 * lane_lines + queries01 * tiles * kRows * M * (D + Dv);
  *block = keys01 * block_lines +
           queries01 * tiles * (std::ceil(M / kCols) * kCols * kRows * D + kRows * M * Dv);
}

// Whether the forward of this problem runs on the lane kernels (block_kernels.h: LaneTile): fp32
// compute, a level that has them, no relative positional bias (whose table the block kernels
// read), last-axis positions that fit the lanes' int32 masks, and a window small enough that
// they pay (block_kernels.h: kLaneCostRatio).
template <typename A>
bool use_lane_forward(const AttentionParams& p) {
  if (!(std::is_same_v<A, float> && !p.has_rpb() &&
        p.axes[2].length < std::numeric_limits<int32_t>::max() - 2 * kLanes &&
        lane_kernels_available())) {
    return false;
  }
  double lane = 0, block = 0;
  forward_kernel_macs(p, &lane, &block);
  return block > kLaneCostRatio * lane;
}

// forward_tile on the lane kernels (keys.v_lines set) for the tile at axis-1 index rows.x1 and,
// when rows.x1b >= 0, the same tile at rows.x1b (a two-row LaneTile): scratch.q holds row i's
// queries at i * kRows * head_dim; leaves row i's normalized output in scratch.o at
// i * kRows * value_dim and its LSE in lse + i * kRows.
template <typename A>
void lane_forward_tile(const AttentionParams& p, const Geometry& geo, const AxisTile& tile,
                       int64_t x0, const RowPair& rows, const ForwardKeys<A>& keys,
                       ForwardScratch<A>& scratch, A* lse, bool contained) {
  if constexpr (std::is_same_v<A, float>) {
    const int64_t D = p.head_dim, Dv = p.value_dim;
    const int n_rows = rows.x1b < 0 ? 1 : 2;
    const IndexRange w0 = key_window(p.axes[0], x0), wa = key_window(p.axes[1], rows.x1);
    const IndexRange wb = n_rows == 2 ? key_window(p.axes[1], rows.x1b) : wa;
    const IndexRange w1 = window_union(wa, wb);
    int64_t span_lo[kLanes], span_hi[kLanes];
    tile_spans(p, geo, tile, span_lo, span_hi);
    const LaneSpan span = lane_span(tile, span_lo, span_hi);
    const int64_t base = span.base, offsets = span.offsets;
    const int64_t lines = w0.count * w1.count;
    const int64_t k_width = keys.bf16_pairs ? D / 2 : D;  // 32-bit units per position
    scratch.k_at.resize(static_cast<size_t>(lines));
    scratch.v_at.resize(static_cast<size_t>(lines));
    scratch.member.resize(static_cast<size_t>(lines));
    int64_t n = 0;
    for (int64_t i0 = 0; i0 < w0.count; ++i0) {
      const int64_t y0 = w0.first + i0 * w0.step;
      for (int64_t i1 = 0; i1 < w1.count; ++i1, ++n) {
        const int64_t y1 = w1.first + i1 * w1.step;
        const int64_t line = geo.line(y0, y1, tile.group);
        scratch.k_at[n] = keys.k_lines + line * k_width * geo.ld + base;
        // Position pairs: the pair of positions x, x + 1 is stored at x + 1 (position_pairs).
        scratch.v_at[n] = keys.v_lines + line * Dv * geo.ld + base + (keys.bf16_pairs ? 1 : 0);
        scratch.member[n] = static_cast<uint8_t>((wa.contains(y1) ? 1 : 0) |
                                                 (n_rows == 2 && wb.contains(y1) ? 2 : 0));
      }
    }
    scratch.qt.resize(static_cast<size_t>(n_rows * k_width * kLanes));
    if (!keys.bf16_pairs) {  // bf16 pairs: forward_tiles loaded qt (load_tile_pairs)
      for (int i = 0; i < n_rows; ++i) {
        transpose_tile(scratch.q.data() + i * kRows * D, D, scratch.qt.data() + i * D * kLanes);
      }
    }
    scratch.lane_s.resize(
        static_cast<size_t>(n_rows * (lines * offsets + p.num_additional) * kLanes));
    scratch.ot.resize(static_cast<size_t>(n_rows * Dv * kLanes));
    const LaneTile t{n_rows, scratch.qt.data(), D, Dv, scratch.k_at.data(), scratch.v_at.data(),
                     lines, geo.ld, n_rows == 2 ? scratch.member.data() : nullptr, base, offsets,
                     span.lo, span.hi, keys.add_kt, p.num_additional + kCols, keys.add_v,
                     p.num_additional, static_cast<float>(p.scale), contained};
    if (keys.bf16_pairs) {
      lane_forward_bf16(t, scratch.lane_s.data(), scratch.ot.data(), scratch.o.data(), lse);
    } else {
      lane_forward(t, scratch.lane_s.data(), scratch.ot.data(), scratch.o.data(), lse);
    }
  }
}

// One chunk of the online softmax: scores of the tile's queries against n keys (panel kt, rows
// v), plus the relative bias (BiasTable::chunk, rows step -1) when bias is not null, masked to
// each row's [clo, chi), folded into the running max m, sum l and output o. `contained`: P V
// restricted to each row's columns (block_accumulate_spans), for a tile recomputed because its
// result was non-finite.
template <typename A>
void softmax_chunk(const A* q, int64_t head_dim, const A* kt, int64_t ldk, const A* v,
                   int64_t ldv, int64_t n, int64_t value_dim, const int64_t* clo,
                   const int64_t* chi, A scale, A* m, A* l, A* o, A* s, const A* bias,
                   bool contained) {
  block_dot(q, head_dim, kt, ldk, head_dim, s);
  if (bias != nullptr) {
    block_add_bias(s, scale, bias, -1);
    scale = A(1);
  }
  A corr[kRows];
  block_online_softmax(s, clo, chi, scale, m, l, corr);
  for (int r = 0; r < kRows; ++r) {
    if (corr[r] == A(1)) continue;
    for (int64_t w = 0; w < value_dim; ++w) o[r * value_dim + w] *= corr[r];
  }
  if (contained) {
    block_accumulate_spans(s, clo, chi, v, ldv, value_dim, o, value_dim);
  } else {
    block_accumulate(s, n, v, ldv, value_dim, o, value_dim);
  }
}

// Forward of one query tile of head h at (x0, x1): scratch.q must hold the tile's queries;
// leaves the normalized output in scratch.o and the natural-log LSE of the scores in lse.
// `contained`: the slow form whose P V sums stay inside each row's window (softmax_chunk).
template <typename A>
void forward_tile(const AttentionParams& p, const Geometry& geo, const AxisTile& tile, int64_t h,
                  int64_t x0, int64_t x1, const ForwardKeys<A>& keys, ForwardScratch<A>& scratch,
                  A* lse, bool contained) {
  const int64_t D = p.head_dim, Dv = p.value_dim;
  const A scale = static_cast<A>(p.scale);
  const IndexRange w0 = key_window(p.axes[0], x0), w1 = key_window(p.axes[1], x1);
  int64_t lo[kRows], hi[kRows], clo[kRows], chi[kRows];
  int64_t u_lo = std::numeric_limits<int64_t>::max(), u_hi = 0;
  A m[kRows], l[kRows];
  tile_spans(p, geo, tile, lo, hi);
  for (int r = 0; r < kRows; ++r) {
    m[r] = -std::numeric_limits<A>::infinity();
    l[r] = 0;
    if (r >= tile.count) continue;
    u_lo = std::min(u_lo, lo[r]);
    u_hi = std::max(u_hi, hi[r]);
  }
  A* o = scratch.o.data();
  std::fill(o, o + kRows * Dv, A(0));
  const int64_t v_step = geo.dilation * keys.v.s[2];
  for (int64_t i0 = 0; i0 < w0.count; ++i0) {
    const int64_t y0 = w0.first + i0 * w0.step;
    for (int64_t i1 = 0; i1 < w1.count; ++i1) {
      const int64_t y1 = w1.first + i1 * w1.step;
      const A* kt = keys.k_lines + geo.line(y0, y1, tile.group) * D * geo.ld;
      const A* v = keys.v.line(0, y0, y1, tile.group);
      const A* b_line = nullptr;
      if (keys.bias != nullptr) {
        b_line = keys.bias->forward.data() + bias_line(*keys.bias, p, h, x0, x1, y0, y1);
      }
      for (int64_t c0 = u_lo; c0 < u_hi; c0 += kCols) {
        const int64_t n = std::min<int64_t>(kCols, u_hi - c0);
        chunk_spans(lo, hi, c0, n, clo, chi);
        softmax_chunk(scratch.q.data(), D, kt + c0, geo.ld, v + c0 * v_step, v_step, n, Dv, clo,
                      chi, scale, m, l, o, scratch.s.data(),
                      b_line ? keys.bias->chunk(b_line, tile.j0, c0) : nullptr, contained);
      }
    }
  }
  for (int64_t c0 = 0; c0 < p.num_additional; c0 += kCols) {
    const int64_t n = std::min<int64_t>(kCols, p.num_additional - c0);
    for (int r = 0; r < kRows; ++r) {
      clo[r] = 0;
      chi[r] = r < tile.count ? n : 0;
    }
    softmax_chunk(scratch.q.data(), D, keys.add_kt + c0, p.num_additional + kCols,
                  keys.add_v + c0 * Dv, Dv, n, Dv, clo, chi, scale, m, l, o, scratch.s.data(),
                  static_cast<const A*>(nullptr), contained);
  }
  for (int r = 0; r < tile.count; ++r) {
    const A inv = A(1) / l[r];
    for (int64_t w = 0; w < Dv; ++w) o[r * Dv + w] *= inv;
    lse[r] = m[r] + std::log(l[r]);
  }
}

// forward_tile for every query tile of the query heads of kv head kvh of batch b, on nt threads
// (items: head, x0, axis-1 rows (axis1_rows: pairs on the lane kernels), last-axis tile, so
// consecutive items share most of their keys); each row's result goes to done(h, x0, x1, tile,
// o, lse) with its output rows o[r * value_dim + w] and LSE lse[r]. `stores_out`: done stores o
// into p.out (asked for ahead, for write, with the next item's q rows).
template <typename T, typename A, typename F>
void forward_tiles(const AttentionParams& p, const Geometry& geo,
                   const std::vector<AxisTile>& tiles, int64_t b, int64_t kvh,
                   const ForwardKeys<A>& keys, std::vector<ForwardScratch<A>>& scratch, int nt,
                   bool stores_out, F&& done) {
  const bool lanes = keys.v_lines != nullptr;
  const std::vector<RowPair> rows1 = axis1_rows(p, lanes);
  const int64_t n_tiles = static_cast<int64_t>(tiles.size());
  const int64_t n_rows1 = static_cast<int64_t>(rows1.size());
  const int64_t per_head = geo.len[0] * n_rows1 * n_tiles;
  const int64_t items = p.heads_per_kv() * per_head;
  const T* q = static_cast<const T*>(p.q.data);
  int64_t q_pair_stride[6] = {};  // q's strides in bf16 pairs (keys.bf16_pairs)
  for (int d = 0; d < 5; ++d) q_pair_stride[d] = p.q.stride[d] / 2;
  q_pair_stride[5] = 1;
  struct Item {
    int64_t h, x0;
    const AxisTile* tile;
    const RowPair* rows;
  };
  const auto decode = [&](int64_t item) {
    const int64_t unit = (item % per_head) / n_tiles;
    return Item{kvh * p.heads_per_kv() + item / per_head, unit / n_rows1, &tiles[item % n_tiles],
                &rows1[unit % n_rows1]};
  };
  parallel_for(nt, items, [&](int64_t item, int thread) {
    const Item it = decode(item);
    const int64_t h = it.h, x0 = it.x0;
    const AxisTile& tile = *it.tile;
    const RowPair& rows = *it.rows;
    const int n_rows = rows.x1b < 0 ? 1 : 2;
    if (item + 1 < items) {  // this thread's next item, in the usual case
      const Item next = decode(item + 1);
      for (const int64_t x1 : {next.rows->x1, next.rows->x1b}) {
        if (x1 < 0) continue;
        prefetch_tile<false>(q, p.q.stride, b, next.h, next.x0, x1, *next.tile, geo,
                             p.head_dim);
        if (stores_out) {
          prefetch_tile<true>(static_cast<const T*>(p.out.data), p.out.stride, b, next.h,
                              next.x0, x1, *next.tile, geo, p.value_dim);
        }
      }
    }
    ForwardScratch<A>& s = scratch[thread];
    bool loaded = false;
    if constexpr (std::is_same_v<T, BFloat16>) {
      if (keys.bf16_pairs) {  // the queries straight into the lane operand, as pairs
        const int64_t pairs = p.head_dim / 2;
        s.qt.resize(static_cast<size_t>(n_rows * pairs * kLanes));
        for (int i = 0; i < n_rows; ++i) {
          load_tile_pairs(static_cast<const BF16Pair*>(p.q.data), q_pair_stride, b, h, x0,
                          i == 0 ? rows.x1 : rows.x1b, tile, geo, pairs,
                          s.qt.data() + i * pairs * kLanes);
        }
        loaded = true;
      }
    }
    if (!loaded) {
      load_tile(q, p.q.stride, b, h, x0, rows.x1, tile, geo, p.head_dim, s.q.data());
      if (n_rows == 2) {
        load_tile(q, p.q.stride, b, h, x0, rows.x1b, tile, geo, p.head_dim,
                  s.q.data() + kRows * p.head_dim);
      }
    }
    A tile_lse[kLaneRowsMax * kRows];
    const auto run = [&](bool contained) {
      if (lanes) {
        lane_forward_tile(p, geo, tile, x0, rows, keys, s, tile_lse, contained);
      } else {
        forward_tile(p, geo, tile, h, x0, rows.x1, keys, s, tile_lse, contained);
      }
    };
    const auto finite = [&] {
      for (int i = 0; i < n_rows; ++i) {
        if (!all_finite(s.o.data() + i * kRows * p.value_dim, tile.count * p.value_dim) ||
            !all_finite(tile_lse + i * kRows, tile.count)) {
          return false;
        }
      }
      return true;
    };
    run(false);
    // A non-finite input among the chunk's keys or values may have reached rows whose window
    // does not hold it (0 * NaN in block_accumulate or lane_forward): recompute such a tile
    // contained.
    if (!finite()) run(true);
    for (int i = 0; i < n_rows; ++i) {
      done(h, x0, i == 0 ? rows.x1 : rows.x1b, tile, s.o.data() + i * kRows * p.value_dim,
           tile_lse + i * kRows);
    }
  });
}

}  // namespace nattn::cpu
