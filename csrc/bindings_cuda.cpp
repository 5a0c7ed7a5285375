// Bindings of the CUDA part, registered into nattn._C when it is built with CUDA.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <stdexcept>
#include <string>
#include <tuple>
#include <vector>

#include "bindings_common.h"
#include "cuda/cuda_api.h"
#include "cuda/sm80/sm80_tiles.h"

namespace py = pybind11;

void register_cuda(py::module_& m) {
  m.def("cuda_device_count", []() {
    std::string error;
    const int n = nattn::cuda::device_count(&error);
    return std::make_tuple(n, error);
  });
  m.def(
      "cuda_device_capability",
      [](int device) {
        std::string error;
        const int cc = nattn::cuda::device_capability(device, &error);
        return std::make_tuple(cc, error);
      },
      py::arg("device"));
  m.def(
      "cuda_axis_windows",
      [](int64_t length, int64_t kernel_size, int64_t stride, int64_t dilation, bool is_causal) {
        std::vector<int64_t> out;
        const std::string err = nattn::cuda::axis_windows_on_device(
            make_axis(length, kernel_size, stride, dilation, is_causal), &out);
        if (!err.empty()) throw std::runtime_error("CUDA: " + err);
        return out;
      },
      py::arg("length"), py::arg("kernel_size"), py::arg("stride"), py::arg("dilation"),
      py::arg("is_causal"));

  m.def(
      "cuda_device_reasons",
      [](int device) { return nattn::cuda::device_reasons(device); }, py::arg("device"),
      "Why nattn's CUDA kernels cannot run on `device` at all (no driver/device, compute "
      "capability < 8.0, no kernel image for its architecture); empty when they can.");
  m.def(
      "cuda_plan",
      [](const nattn::AttentionParams& p, bool backward, py::object capability,
         py::object max_smem) {
        nattn::cuda::DeviceFacts device;
        if (capability.is_none() || max_smem.is_none()) {
          std::string error;
          device = nattn::cuda::current_device(&error);
          if (device.capability < 0) throw std::runtime_error("CUDA: " + error);
        }
        if (!capability.is_none()) device.capability = capability.cast<int>();
        if (!max_smem.is_none()) device.max_smem_optin = max_smem.cast<int64_t>();
        const nattn::cuda::Plan plan = nattn::cuda::plan(p, backward, device);
        py::dict d;
        d["path"] = !plan.unsupported.empty() ? "none"
                    : plan.tensor_core        ? "tensor_core"
                                              : "simt";
        d["unsupported"] = plan.unsupported;
        d["reasons"] = plan.tensor_core_reasons;
        d["block_m"] = plan.block_m;
        d["block_n"] = plan.block_n;
        d["q_box"] = std::vector<int64_t>(plan.q_box, plan.q_box + nattn::kMaxRank);
        d["kv_box"] = std::vector<int64_t>(plan.kv_box, plan.kv_box + nattn::kMaxRank);
        d["q_tiles"] = plan.q_tiles;
        d["kv_tiles"] = plan.kv_tiles;
        d["shared_bytes"] = plan.shared_bytes;
        return d;
      },
      py::arg("params"), py::arg("backward") = false, py::arg("capability") = py::none(),
      py::arg("max_smem") = py::none(),
      "Which CUDA kernels would serve a call: {'path': 'tensor_core' | 'simt' | 'none', "
      "'unsupported': why neither can (path 'none'), 'reasons': why not tensor cores, 'block_m', 'block_n', 'q_box', 'kv_box' (rank-3 extents), 'q_tiles', "
      "'kv_tiles', 'shared_bytes'}. Host-only when capability and max_smem are given.");
  m.def(
      "cuda_forward",
      [](const nattn::AttentionParams& p) {
        check_common(p, false);
        std::string err;
        {
          py::gil_scoped_release release;
          err = nattn::cuda::forward(p);
        }
        if (!err.empty()) throw std::runtime_error("nattn CUDA forward: " + err);
      },
      py::arg("params"),
      "Forward on the current device and params' stream: writes out and lse (fp32).");
  m.def(
      "cuda_backward",
      [](const nattn::AttentionParams& p, bool deterministic) {
        check_common(p, true);
        if (p.dtype == nattn::DType::kFloat64 && p.lse_fp64.data == nullptr) {
          throw std::invalid_argument("tensor 'lse_fp64' not set (float64 CUDA backward)");
        }
        std::string err;
        {
          py::gil_scoped_release release;
          err = nattn::cuda::backward(p, deterministic);
        }
        if (!err.empty()) throw std::runtime_error("nattn CUDA backward: " + err);
      },
      py::arg("params"), py::arg("deterministic") = true,
      "Backward on the current device and params' stream: fills delta (fp32 workspace shaped "
      "like lse), then writes dq, dk, dv (and d_add_k, d_add_v). Atomic-free: bit-identical "
      "run to run.");
  m.def(
      "cuda_hopper_forward_reasons",
      [](const nattn::AttentionParams& p) { return nattn::cuda::hopper_forward_reasons(p); },
      py::arg("params"),
      "Why the Hopper (sm_90a) forward cannot serve params on the current device; empty when "
      "it can.");
  m.def(
      "cuda_hopper_forward",
      [](const nattn::AttentionParams& p) {
        check_common(p, false);
        std::string err;
        std::vector<std::string> declined;
        {
          py::gil_scoped_release release;
          err = nattn::cuda::hopper_forward(p, &declined);
        }
        if (!err.empty()) throw std::runtime_error("nattn Hopper forward: " + err);
        return declined;
      },
      py::arg("params"),
      "Hopper forward on the current device and params' stream (one plan per call). Returns "
      "the reasons it declined the call (nothing ran: run cuda_forward), empty when it ran.");
  m.def(
      "cuda_hopper_backward_reasons",
      [](const nattn::AttentionParams& p) { return nattn::cuda::hopper_backward_reasons(p); },
      py::arg("params"),
      "Why the Hopper (sm_90a) backward cannot serve params on the current device; empty when "
      "it can.");
  m.def(
      "cuda_hopper_backward",
      [](const nattn::AttentionParams& p) {
        check_common(p, true);
        std::string err;
        std::vector<std::string> declined;
        {
          py::gil_scoped_release release;
          err = nattn::cuda::hopper_backward(p, &declined);
        }
        if (!err.empty()) throw std::runtime_error("nattn Hopper backward: " + err);
        return declined;
      },
      py::arg("params"),
      "Hopper backward on the current device and params' stream (one plan per call): the delta "
      "pass, then dq, dk, dv, atomic-free. Returns the reasons it declined the call (nothing "
      "ran: run cuda_backward), empty when it ran.");
}
