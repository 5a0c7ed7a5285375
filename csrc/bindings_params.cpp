// The AttentionParams binding (include/nattn/params.h) and the checks every kernel entry point
// runs, shared by nattn._C and the emulator module nattn._emu (which registers its own,
// module-local copy of the class).
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <stdexcept>
#include <string>
#include <tuple>
#include <vector>

#include "bindings_common.h"
#include "nattn/params.h"
#include "nattn/window.h"

namespace py = pybind11;

using nattn::AttentionParams;
using nattn::AxisParams;

AxisParams make_axis(int64_t length, int64_t kernel_size, int64_t stride, int64_t dilation,
                     bool is_causal) {
  AxisParams a{length, kernel_size, stride, dilation, is_causal};
  if (const char* err = nattn::axis_params_error(a)) {
    throw std::invalid_argument(
        "invalid axis (length=" + std::to_string(length) + ", kernel_size=" +
        std::to_string(kernel_size) + ", stride=" + std::to_string(stride) + ", dilation=" +
        std::to_string(dilation) + "): " + err);
  }
  return a;
}

namespace {

template <int N>
void set_ref(nattn::TensorRef<N>& ref, const char* name, uintptr_t ptr,
             const std::vector<int64_t>& strides) {
  if (strides.size() != N) {
    throw std::invalid_argument(std::string("tensor '") + name + "' needs " + std::to_string(N) +
                                " strides, got " + std::to_string(strides.size()));
  }
  ref.data = reinterpret_cast<void*>(ptr);
  for (int i = 0; i < N; ++i) ref.stride[i] = strides[i];
}

void set_tensor(AttentionParams& p, const std::string& name, uintptr_t ptr,
                const std::vector<int64_t>& strides) {
  if (name == "q") return set_ref(p.q, "q", ptr, strides);
  if (name == "k") return set_ref(p.k, "k", ptr, strides);
  if (name == "v") return set_ref(p.v, "v", ptr, strides);
  if (name == "out") return set_ref(p.out, "out", ptr, strides);
  if (name == "d_out") return set_ref(p.d_out, "d_out", ptr, strides);
  if (name == "dq") return set_ref(p.dq, "dq", ptr, strides);
  if (name == "dk") return set_ref(p.dk, "dk", ptr, strides);
  if (name == "dv") return set_ref(p.dv, "dv", ptr, strides);
  if (name == "lse") return set_ref(p.lse, "lse", ptr, strides);
  if (name == "delta") return set_ref(p.delta, "delta", ptr, strides);
  if (name == "d_lse") return set_ref(p.d_lse, "d_lse", ptr, strides);
  if (name == "lse_fp64") return set_ref(p.lse_fp64, "lse_fp64", ptr, strides);
  if (name == "add_k") return set_ref(p.add_k, "add_k", ptr, strides);
  if (name == "add_v") return set_ref(p.add_v, "add_v", ptr, strides);
  if (name == "d_add_k") return set_ref(p.d_add_k, "d_add_k", ptr, strides);
  if (name == "d_add_v") return set_ref(p.d_add_v, "d_add_v", ptr, strides);
  if (name == "rpb") return set_ref(p.rpb, "rpb", ptr, strides);
  if (name == "d_rpb") return set_ref(p.d_rpb, "d_rpb", ptr, strides);
  throw std::invalid_argument("unknown tensor name '" + name + "'");
}

void set_axes(AttentionParams& p, const std::vector<std::tuple<int64_t, int64_t, int64_t, int64_t,
                                                               bool>>& axes) {
  if (axes.empty() || axes.size() > nattn::kMaxRank) {
    throw std::invalid_argument("need 1 to 3 spatial axes, got " + std::to_string(axes.size()));
  }
  p.rank = static_cast<int32_t>(axes.size());
  const int pad = nattn::kMaxRank - p.rank;
  for (int i = 0; i < pad; ++i) p.axes[i] = AxisParams{};
  for (int i = 0; i < p.rank; ++i) {
    const auto& [length, kernel_size, stride, dilation, causal] = axes[i];
    p.axes[pad + i] = make_axis(length, kernel_size, stride, dilation, causal);
  }
}

}  // namespace

// Checks that hold for every kernel; the Python layer checks the same things with friendlier
// messages, this is the last line before raw pointers are dereferenced.
void check_common(const AttentionParams& p, bool backward) {
  auto need = [](const void* ptr, const char* name) {
    if (ptr == nullptr) throw std::invalid_argument(std::string("tensor '") + name + "' not set");
  };
  need(p.q.data, "q");
  need(p.k.data, "k");
  need(p.v.data, "v");
  need(p.out.data, "out");
  need(p.lse.data, "lse");
  if (p.batch < 1 || p.heads < 1 || p.kv_heads < 1 || p.head_dim < 1 || p.value_dim < 1) {
    throw std::invalid_argument("batch, heads, kv_heads, head_dim, value_dim must be >= 1");
  }
  if (p.heads % p.kv_heads != 0) {
    throw std::invalid_argument("heads must be a multiple of kv_heads");
  }
  if (p.num_additional < 0) throw std::invalid_argument("num_additional must be >= 0");
  if (p.num_additional > 0) {
    need(p.add_k.data, "add_k");
    need(p.add_v.data, "add_v");
  }
  if (backward) {
    need(p.d_out.data, "d_out");
    need(p.dq.data, "dq");
    need(p.dk.data, "dk");
    need(p.dv.data, "dv");
    need(p.delta.data, "delta");
    if (p.num_additional > 0) {
      need(p.d_add_k.data, "d_add_k");
      need(p.d_add_v.data, "d_add_v");
    }
    if (p.has_rpb()) need(p.d_rpb.data, "d_rpb");
  }
}

void register_params(py::module_& m, bool module_local) {
  py::enum_<nattn::DType>(m, "DType", py::module_local(module_local))
      .value("float16", nattn::DType::kFloat16)
      .value("bfloat16", nattn::DType::kBFloat16)
      .value("float32", nattn::DType::kFloat32)
      .value("float64", nattn::DType::kFloat64);

  py::class_<AttentionParams>(m, "AttentionParams", py::module_local(module_local))
      .def(py::init<>())
      .def_readwrite("dtype", &AttentionParams::dtype)
      .def_readwrite("batch", &AttentionParams::batch)
      .def_readwrite("heads", &AttentionParams::heads)
      .def_readwrite("kv_heads", &AttentionParams::kv_heads)
      .def_readwrite("head_dim", &AttentionParams::head_dim)
      .def_readwrite("value_dim", &AttentionParams::value_dim)
      .def_readwrite("num_additional", &AttentionParams::num_additional)
      .def_readwrite("scale", &AttentionParams::scale)
      .def_readwrite("num_threads", &AttentionParams::num_threads)
      .def_readwrite("exact_threads", &AttentionParams::exact_threads)
      .def_readonly("rank", &AttentionParams::rank)
      .def("set_axes", &set_axes, py::arg("axes"),
           "axes: list of (length, kernel_size, stride, dilation, is_causal), one per spatial axis")
      .def("set_tensor", &set_tensor, py::arg("name"), py::arg("ptr"), py::arg("strides"),
           "Set a tensor's data pointer and element strides (rank-3 index order, params.h)")
      .def("set_stream", [](AttentionParams& p, uintptr_t s) {
        p.stream = reinterpret_cast<void*>(s);
      });
}
