// Bindings of the tile planner (include/nattn/tile_plan.h), registered into nattn._C, plus the
// tile counts of 1-D flattened tiling (row-major token order, the way a generic block-sparse
// kernel such as FlexAttention tiles a multi-dimensional layout) for the speed-of-light model.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <algorithm>
#include <stdexcept>
#include <string>
#include <tuple>
#include <vector>

#include "bindings_common.h"
#include "cpu/block_kernels.h"
#include "cpu/cpu_tiles.h"
#include "nattn/tile_plan.h"
#include "nattn/window.h"

namespace py = pybind11;

namespace {

using nattn::AxisParams;
using AxisTuple = std::tuple<int64_t, int64_t, int64_t, int64_t, bool>;

AxisParams checked_axis(const AxisTuple& t) {
  const auto& [length, kernel_size, stride, dilation, is_causal] = t;
  return make_axis(length, kernel_size, stride, dilation, is_causal);
}

void check_tile(int64_t size, const char* name) {
  if (size < 1) {
    throw std::invalid_argument(std::string(name) + " must be >= 1, got " + std::to_string(size));
  }
}

// Rank-3 axes and tile extents, user axes right-aligned (params.h's padding convention).
struct Rank3 {
  AxisParams axes[nattn::kMaxRank];
  int64_t q_tile[nattn::kMaxRank] = {1, 1, 1};
  int64_t kv_tile[nattn::kMaxRank] = {1, 1, 1};
};

Rank3 to_rank3(const std::vector<AxisTuple>& axes, const std::vector<int64_t>& q_tile,
               const std::vector<int64_t>& kv_tile) {
  const size_t rank = axes.size();
  if (rank < 1 || rank > static_cast<size_t>(nattn::kMaxRank)) {
    throw std::invalid_argument("need 1 to 3 spatial axes, got " + std::to_string(rank));
  }
  if (q_tile.size() != rank || kv_tile.size() != rank) {
    throw std::invalid_argument("q_tile and kv_tile need one extent per axis (" +
                                std::to_string(rank) + ")");
  }
  Rank3 r;
  const size_t pad = nattn::kMaxRank - rank;
  for (size_t i = 0; i < rank; ++i) {
    r.axes[pad + i] = checked_axis(axes[i]);
    check_tile(q_tile[i], "q_tile extent");
    check_tile(kv_tile[i], "kv_tile extent");
    r.q_tile[pad + i] = q_tile[i];
    r.kv_tile[pad + i] = kv_tile[i];
  }
  return r;
}

// Tile counts of 1-D flattened tiling: Q tiles of q_tile consecutive row-major tokens, KV tiles
// of kv_tile consecutive tokens. A pair is visited iff some query of the Q tile attends to some
// key of the KV tile, full iff every query attends to every key and the KV tile is not cut by
// the end of the sequence. Host-only analysis: O(N * rows of a window) where a row is the window's
// extent along the last axis.
std::tuple<int64_t, int64_t, int64_t> flat_tile_counts(const std::vector<AxisTuple>& axis_tuples,
                                                       int64_t q_tile, int64_t kv_tile) {
  check_tile(q_tile, "q_tile");
  check_tile(kv_tile, "kv_tile");
  const size_t rank = axis_tuples.size();
  if (rank < 1 || rank > static_cast<size_t>(nattn::kMaxRank)) {
    throw std::invalid_argument("need 1 to 3 spatial axes, got " + std::to_string(rank));
  }
  std::vector<AxisParams> axes;
  int64_t n = 1;
  for (const auto& t : axis_tuples) {
    axes.push_back(checked_axis(t));
    n *= axes.back().length;
  }
  // Key windows of every index of every axis, and the row-major element strides.
  std::vector<std::vector<nattn::IndexRange>> windows(rank);
  std::vector<int64_t> token_stride(rank, 1);
  for (size_t ax = 0; ax < rank; ++ax) {
    for (int64_t i = 0; i < axes[ax].length; ++i) {
      windows[ax].push_back(nattn::key_window(axes[ax], i));
    }
  }
  for (size_t ax = rank - 1; ax > 0; --ax) token_stride[ax - 1] = token_stride[ax] * axes[ax].length;

  const int64_t num_kv = nattn::tile_count(n, kv_tile);
  std::vector<int64_t> pairs(static_cast<size_t>(num_kv), 0);  // attended pairs per KV tile
  std::vector<int64_t> touched;
  int64_t visited = 0, full = 0;
  const int64_t num_q = nattn::tile_count(n, q_tile);
  const nattn::IndexRange one{0, 1, 1};
  for (int64_t qt = 0; qt < num_q; ++qt) {
    const int64_t q_begin = qt * q_tile;
    const int64_t q_end = std::min(q_begin + q_tile, n);
    for (int64_t q = q_begin; q < q_end; ++q) {
      // Coordinates of q, then the window as rank - 1 leading ranges times one last-axis run.
      nattn::IndexRange w[nattn::kMaxRank] = {one, one, one};
      int64_t rest = q;
      for (size_t ax = rank; ax-- > 0;) {
        w[ax] = windows[ax][static_cast<size_t>(rest % axes[ax].length)];
        rest /= axes[ax].length;
      }
      const nattn::IndexRange last = w[rank - 1];
      const int64_t rows0 = rank >= 3 ? w[0].count : 1;
      const int64_t rows1 = rank >= 2 ? w[rank - 2].count : 1;
      for (int64_t r0 = 0; r0 < rows0; ++r0) {
        const int64_t base0 = rank >= 3 ? (w[0].first + r0 * w[0].step) * token_stride[0] : 0;
        for (int64_t r1 = 0; r1 < rows1; ++r1) {
          const int64_t base =
              base0 + (rank >= 2 ? (w[rank - 2].first + r1 * w[rank - 2].step) *
                                       token_stride[rank - 2]
                                 : 0);
          // Keys base + last.first + step * m, m in [0, count): count them per KV tile.
          const int64_t k_first = base + last.first;
          const int64_t k_last = base + last.last();
          for (int64_t kt = k_first / kv_tile; kt <= k_last / kv_tile; ++kt) {
            const int64_t c = kt * kv_tile;
            const int64_t m_lo = std::max<int64_t>(0, (c - k_first + last.step - 1) / last.step);
            const int64_t m_hi =
                std::min<int64_t>(last.count - 1, (c + kv_tile - 1 - k_first) / last.step);
            if (m_hi < m_lo) continue;
            if (pairs[static_cast<size_t>(kt)] == 0) touched.push_back(kt);
            pairs[static_cast<size_t>(kt)] += m_hi - m_lo + 1;
          }
        }
      }
    }
    const int64_t rows = q_end - q_begin;
    for (const int64_t kt : touched) {
      ++visited;
      const bool complete = (kt + 1) * kv_tile <= n;
      if (complete && pairs[static_cast<size_t>(kt)] == rows * kv_tile) ++full;
      pairs[static_cast<size_t>(kt)] = 0;
    }
    touched.clear();
  }
  return {num_q, visited, full};
}

// Arguments of the one-group tile walks: an undilated axis of group_len tokens, both tile sizes
// valid, and tile index `tile` (of tiles of `tile_size`) inside the group.
void check_group_tile(int64_t group_len, int64_t kernel_size, int64_t stride, int64_t q_tile_size,
                      int64_t kv_tile_size, int64_t tile, int64_t tile_size, const char* name) {
  check_tile(q_tile_size, "q_tile_size");
  check_tile(kv_tile_size, "kv_tile_size");
  if (group_len < kernel_size || kernel_size < 1 || stride < 1 || stride > kernel_size) {
    throw std::invalid_argument("need 1 <= stride <= kernel_size <= group_len");
  }
  if (tile < 0 || tile >= nattn::tile_count(group_len, tile_size)) {
    throw std::invalid_argument(std::string(name) + " " + std::to_string(tile) +
                                " out of range");
  }
}

}  // namespace

void register_tile_planner(py::module_& m) {
  m.def(
      "tile_axis_range",
      [](int64_t group_len, int64_t kernel_size, int64_t stride, bool is_causal,
         int64_t q_tile_size, int64_t kv_tile_size, int64_t q_tile) {
        check_group_tile(group_len, kernel_size, stride, q_tile_size, kv_tile_size, q_tile,
                         q_tile_size, "q_tile");
        const nattn::AxisTileRange r = nattn::axis_tile_range(
            group_len, kernel_size, stride, is_causal, q_tile_size, kv_tile_size, q_tile);
        return std::make_tuple(r.kv_begin, r.kv_end, r.full_begin, r.full_end);
      },
      py::arg("group_len"), py::arg("kernel_size"), py::arg("stride"), py::arg("is_causal"),
      py::arg("q_tile_size"), py::arg("kv_tile_size"), py::arg("q_tile"),
      "(kv_begin, kv_end, full_begin, full_end) in KV-tile units: the KV tiles Q tile `q_tile` "
      "of one dilation group visits along one axis, and the sub-range needing no mask.");
  m.def(
      "tile_axis_inverse_range",
      [](int64_t group_len, int64_t kernel_size, int64_t stride, bool is_causal,
         int64_t kv_tile_size, int64_t q_tile_size, int64_t kv_tile) {
        check_group_tile(group_len, kernel_size, stride, q_tile_size, kv_tile_size, kv_tile,
                         kv_tile_size, "kv_tile");
        const nattn::AxisTileRange r = nattn::axis_inverse_tile_range(
            group_len, kernel_size, stride, is_causal, kv_tile_size, q_tile_size, kv_tile);
        return std::make_tuple(r.kv_begin, r.kv_end, r.full_begin, r.full_end);
      },
      py::arg("group_len"), py::arg("kernel_size"), py::arg("stride"), py::arg("is_causal"),
      py::arg("kv_tile_size"), py::arg("q_tile_size"), py::arg("kv_tile"),
      "(begin, end, full_begin, full_end) in Q-tile units: the Q tiles whose queries attend "
      "some key of KV tile `kv_tile` of one dilation group along one axis (the backward's "
      "key-side walk), and the complete ones every query of which attends every valid key.");
  m.def(
      "tile_axis_counts",
      [](int64_t length, int64_t kernel_size, int64_t stride, int64_t dilation, bool is_causal,
         int64_t q_tile_size, int64_t kv_tile_size) {
        const AxisParams a = checked_axis({length, kernel_size, stride, dilation, is_causal});
        check_tile(q_tile_size, "q_tile_size");
        check_tile(kv_tile_size, "kv_tile_size");
        const nattn::AxisTileCounts c = nattn::axis_tile_counts(a, q_tile_size, kv_tile_size);
        return std::make_tuple(c.q_tiles, c.visited, c.full);
      },
      py::arg("length"), py::arg("kernel_size"), py::arg("stride"), py::arg("dilation"),
      py::arg("is_causal"), py::arg("q_tile_size"), py::arg("kv_tile_size"),
      "(q_tiles, visited, full) along one axis, summed over dilation groups and Q tiles.");
  m.def(
      "tile_locate_q_tile",
      [](int64_t length, int64_t dilation, int64_t q_tile_size, int64_t t) {
        const AxisParams a = checked_axis({length, 1, 1, dilation, false});
        check_tile(q_tile_size, "q_tile_size");
        if (t < 0 || t >= nattn::axis_q_tiles(a, q_tile_size)) {
          throw std::invalid_argument("q tile index " + std::to_string(t) + " out of range");
        }
        const nattn::GroupTile g = nattn::axis_locate_q_tile(a, q_tile_size, t);
        return std::make_tuple(g.group, g.tile);
      },
      py::arg("length"), py::arg("dilation"), py::arg("q_tile_size"), py::arg("t"),
      "(dilation group, tile within group) of the axis-wide Q tile index t.");
  m.def(
      "tile_plan_summary",
      [](const std::vector<AxisTuple>& axes, const std::vector<int64_t>& q_tile,
         const std::vector<int64_t>& kv_tile) {
        const Rank3 r = to_rank3(axes, q_tile, kv_tile);
        const nattn::TilePlanSummary s = nattn::plan_summary(r.axes, r.q_tile, r.kv_tile);
        return std::make_tuple(s.q_tiles, s.visited, s.full, s.masked);
      },
      py::arg("axes"), py::arg("q_tile"), py::arg("kv_tile"),
      "(q_tiles, visited, full, masked) tile pairs of multi-dimensional tiling in dilation-group "
      "space. axes: list of (length, kernel_size, stride, dilation, is_causal); q_tile, kv_tile: "
      "tile extents per axis (group positions).");
  // The CPU kernels' tile (csrc/cpu/block_kernels.h): kRows consecutive queries of one dilation
  // group on the last axis against key chunks of kCols. The speed-of-light model holds CPU runs
  // to the tile bound at this shape.
  m.attr("cpu_q_tile") = nattn::cpu::kRows;
  m.attr("cpu_kv_tile") = nattn::cpu::kCols;
  // The fp16/bf16/fp32 forward without RPB runs on the lane kernels instead (LaneTile: one
  // vector lane per query of a cpu_q_tile tile) where the chosen instruction-set level has them.
  m.def("cpu_lane_forward", &nattn::cpu::lane_kernels_available,
        "Whether the CPU forward (fp16/bf16/fp32, no RPB) runs on the lane kernels at the chosen "
        "instruction-set level (AVX2 or AVX-512), rather than the block kernels, where their "
        "window is small enough (cpu_lane_cost_ratio).");
  // Where the lane kernels exist, they run when the block kernels would execute more than this
  // many times their FLOPs (cpu_tiles.h: use_lane_forward; perf.cpu_forward_flops).
  m.attr("cpu_lane_cost_ratio") = nattn::cpu::kLaneCostRatio;
  m.def(
      "cpu_forward_macs",
      [](const nattn::AttentionParams& p) {
        double lane = 0, block = 0;
        nattn::cpu::forward_kernel_macs(p, &lane, &block);
        return std::make_tuple(static_cast<int64_t>(lane), static_cast<int64_t>(block));
      },
      py::arg("params"),
      "(lane, block): multiply-adds per (batch, head) that the CPU forward's lane and block "
      "product kernels execute for these axes, head_dim, value_dim and num_additional "
      "(cpu_tiles.h: forward_kernel_macs; no tensors needed).");
  m.def(
      "cpu_forward_uses_lanes",
      [](const nattn::AttentionParams& p) {
        bool lanes = false;
        nattn::cpu::dispatch_dtype(p.dtype, [&](auto* tag) {
          using T = std::remove_pointer_t<decltype(tag)>;
          lanes = nattn::cpu::use_lane_forward<typename nattn::cpu::ComputeType<T>::type>(p);
        });
        return lanes;
      },
      py::arg("params"),
      "Whether the CPU forward of this problem (dtype, axes, dims; no tensors needed) runs on "
      "the lane kernels (cpu_tiles.h: use_lane_forward).");
  m.def("flat_tile_counts", &flat_tile_counts, py::arg("axes"), py::arg("q_tile"),
        py::arg("kv_tile"),
        "(q_tiles, visited, full) of 1-D flattened tiling: tiles of consecutive row-major "
        "tokens. axes: list of (length, kernel_size, stride, dilation, is_causal).");
}
