// Bindings of the Hopper kernels' host-side planning (csrc/cuda/sm90/sm90_host_tools.h): plain
// C++, compiled in every build (CPU-only too) so tests/test_sm90_host.py runs without a GPU.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cstdint>
#include <tuple>
#include <vector>

#include "cuda/sm90/sm90_host_tools.h"
#include "nattn/params.h"

namespace py = pybind11;

void register_sm90_host_tools(py::module_& m) {
  using nattn::cuda::sm90::host_choose_tiles;
  using nattn::cuda::sm90::host_kv_walk;
  using nattn::cuda::sm90::host_tma_variant;
  using nattn::cuda::sm90::host_tma_views;
  using Ax = std::tuple<int64_t, int64_t, int64_t, int64_t, bool>;
  auto to_axes = [](const std::vector<Ax>& in) {
    std::vector<nattn::AxisParams> out;
    for (const Ax& a : in) {
      out.push_back(nattn::AxisParams{std::get<0>(a), std::get<1>(a), std::get<2>(a),
                                      std::get<3>(a), std::get<4>(a)});
    }
    return out;
  };
  m.def(
      "sm90_choose_tiles",
      [to_axes](const std::vector<Ax>& axes) {
        const auto r = host_choose_tiles(to_axes(axes));
        return std::make_tuple(r.q_box, r.kv_box, r.q_tiles, r.visited, r.full, r.masked);
      },
      py::arg("axes"),
      "Hopper forward tile shapes: (q_box, kv_box, q_tiles, visited, full, masked); boxes as "
      "rank-3 extents. axes: list of (length, kernel_size, stride, dilation, is_causal).");
  m.def(
      "sm90_kv_walk",
      [to_axes](const std::vector<Ax>& axes, const std::vector<int64_t>& q_box,
                const std::vector<int64_t>& kv_box, int64_t q_tile) {
        const auto r = host_kv_walk(to_axes(axes), q_box, kv_box, q_tile);
        return std::make_tuple(r.group, r.tile, r.group_len, r.kv);
      },
      py::arg("axes"), py::arg("q_box"), py::arg("kv_box"), py::arg("q_tile"),
      "Hopper forward walk of one Q tile: (group, tile, group_len, [(t0, t1, t2, masked)]).");
  m.def(
      "sm90_tma_views",
      [to_axes](const std::vector<Ax>& axes, int64_t batch, int64_t heads, int64_t head_dim,
                const std::vector<int64_t>& strides, uintptr_t data,
                const std::vector<int64_t>& box) {
        const auto r = host_tma_views(to_axes(axes), batch, heads, head_dim, strides, data, box);
        return std::make_tuple(r.error, r.variants, r.dim, r.stride_bytes, r.box, r.coef);
      },
      py::arg("axes"), py::arg("batch"), py::arg("heads"), py::arg("head_dim"),
      py::arg("strides"), py::arg("data"), py::arg("box"),
      "Hopper TMA views of one [B, x0, x1, x2, heads, D] tensor: (error, variants, dims, "
      "strides_bytes, boxes, coef).");
  m.def(
      "sm90_tma_variant",
      [to_axes](const std::vector<Ax>& axes, const std::vector<int64_t>& group) {
        return host_tma_variant(to_axes(axes), group);
      },
      py::arg("axes"), py::arg("group"));
  m.def(
      "sm90_forward_reasons",
      [](const nattn::AttentionParams& p, int capability, int64_t max_smem) {
        return nattn::cuda::sm90::forward_reasons(p, capability, max_smem);
      },
      py::arg("params"), py::arg("capability") = -1, py::arg("max_smem") = 0,
      "Why the Hopper forward would decline params (host-only; empty when it would serve).");
  m.def(
      "sm90_backward_reasons",
      [](const nattn::AttentionParams& p, int capability, int64_t max_smem) {
        return nattn::cuda::sm90::backward_reasons(p, capability, max_smem);
      },
      py::arg("params"), py::arg("capability") = -1, py::arg("max_smem") = 0,
      "Why the Hopper backward would decline params (host-only; empty when it would serve).");
}
