// nattn._C: the pybind11 module. Parameters come in as plain integers (pointers, shapes,
// strides); errors go out as Python exceptions. No torch headers, no libtorch link: one build
// serves every torch version.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <stdexcept>
#include <string>
#include <tuple>
#include <vector>

#include "bindings_common.h"
#include "cpu/block_kernels.h"
#include "cpu/cpu_kernels.h"
#include "cpu/threads.h"
#include "nattn/params.h"
#include "nattn/window.h"

namespace py = pybind11;

// csrc/bindings_params.cpp, csrc/bindings_tiles.cpp, csrc/bindings_sm90_host.cpp
void register_tile_planner(py::module_& m);
void register_sm90_host_tools(py::module_& m);
#ifdef NATTN_WITH_CUDA
// csrc/bindings_cuda.cpp (compiled only with the CUDA part)
void register_cuda(py::module_& m);
#endif

using nattn::AttentionParams;
using nattn::AxisParams;

namespace {

// (first, count) of the key window and of the query (inverse) window of every index of an axis.
std::vector<std::tuple<int64_t, int64_t, int64_t, int64_t>> axis_windows(
    int64_t length, int64_t kernel_size, int64_t stride, int64_t dilation, bool is_causal) {
  const AxisParams a = make_axis(length, kernel_size, stride, dilation, is_causal);
  std::vector<std::tuple<int64_t, int64_t, int64_t, int64_t>> out;
  out.reserve(static_cast<size_t>(length));
  for (int64_t i = 0; i < length; ++i) {
    const nattn::IndexRange keys = nattn::key_window(a, i);
    const nattn::IndexRange queries = nattn::query_window(a, i);
    out.emplace_back(keys.first, keys.count, queries.first, queries.count);
  }
  return out;
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "nattn native kernels (torch-free; see include/nattn/params.h)";

  register_params(m, /*module_local=*/false);

  m.def("axis_windows", &axis_windows, py::arg("length"), py::arg("kernel_size"),
        py::arg("stride"), py::arg("dilation"), py::arg("is_causal"),
        "For each index i of one axis: (key_first, key_count, query_first, query_count); the "
        "windows step by dilation. Computed by include/nattn/window.h.");
  m.def(
      "axis_params_error",
      [](int64_t length, int64_t kernel_size, int64_t stride, int64_t dilation) -> py::object {
        const char* err =
            nattn::axis_params_error(AxisParams{length, kernel_size, stride, dilation, false});
        return err ? py::object(py::str(err)) : py::object(py::none());
      },
      py::arg("length"), py::arg("kernel_size"), py::arg("stride"), py::arg("dilation"));

  m.def(
      "cpu_forward",
      [](const AttentionParams& p) {
        check_common(p, false);
        py::gil_scoped_release release;
        nattn::cpu::forward(p);
      },
      py::arg("params"));
  m.def(
      "cpu_backward",
      [](const AttentionParams& p) {
        check_common(p, true);
        py::gil_scoped_release release;
        nattn::cpu::backward(p);
      },
      py::arg("params"));
  m.def("cpu_default_num_threads", &nattn::cpu::default_num_threads);
  m.def(
      "cpu_threading",
      [](const std::string& mode) {
        using nattn::cpu::Threading;
        if (mode == "auto") {
          nattn::cpu::set_threading(Threading::kAuto);
        } else if (mode == "openmp") {
          nattn::cpu::set_threading(Threading::kOpenMP);
        } else if (mode == "pool") {
          nattn::cpu::set_threading(Threading::kPool);
        } else if (!mode.empty()) {
          throw py::value_error("cpu_threading: mode must be 'auto', 'openmp' or 'pool', got '" +
                                mode + "'");
        }
        return std::string(nattn::cpu::threading_runtime());
      },
      py::arg("mode") = "",
      "Selects the runtime of the CPU kernels' parallel regions ('auto': the OpenMP runtime the "
      "process has loaded, else nattn's pool; 'pool': always the pool; '' keeps the choice) and "
      "returns the one now in use: 'openmp:<library path>' or 'pool'.");
  m.def("cpu_isa", &nattn::cpu::cpu_isa,
        "Instruction-set level of the CPU kernels: baseline, avx2 or avx512 (the best this CPU "
        "has, or NATTN_CPU_ISA's choice, read once per process). Raises RuntimeError when "
        "NATTN_CPU_ISA names an unknown level or one the CPU lacks.");
  register_tile_planner(m);
  register_sm90_host_tools(m);

#ifdef NATTN_WITH_CUDA
  m.attr("with_cuda") = true;
  register_cuda(m);
#else
  m.attr("with_cuda") = false;
#endif
}
