// Bindings of the CUDA part, registered into nattn._C when it is built with CUDA.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <stdexcept>
#include <string>
#include <tuple>
#include <vector>

#include "bindings_common.h"
#include "cuda/cuda_api.h"

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
}
