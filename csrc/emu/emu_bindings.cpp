// nattn._emu: the CUDA kernels of csrc/cuda, their dispatcher and host code, built as host C++
// against the emulator (csrc/emu) for the cuda-emu backend. The same bindings as nattn._C's CUDA
// part (csrc/bindings_cuda.cpp: cuda_forward, cuda_backward, cuda_plan, ...) plus the emulator's
// settings, its per-launch counters, and both descriptions of the SM80 fragment layouts (the
// emulator's, from the PTX ISA, and CuTe's traits) for tests/test_emu.py to compare.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <stdexcept>
#include <string>
#include <tuple>
#include <vector>

#include <cute/atom/copy_traits_sm75.hpp>
#include <cute/atom/mma_traits_sm80.hpp>

#include "bindings_common.h"
#include "emu/runtime.h"
#include "emu/sm80_ops.h"

namespace py = pybind11;

void register_cuda(py::module_& m);  // csrc/bindings_cuda.cpp

namespace {

using Coord = std::tuple<int, int>;

// CuTe: (thread, value) -> (row, col) of the m16n8k16 operand `operand` ('a': M x K, 'b': K x N
// as (k, n), 'c': M x N), from MMA_Traits' ALayout / BLayout / CLayout (column-major indices).
template <class Op>
std::vector<std::vector<Coord>> cute_mma(char operand) {
  using Traits = cute::MMA_Traits<Op>;
  std::vector<std::vector<Coord>> out(32);
  for (int t = 0; t < 32; ++t) {
    const int values = operand == 'a' ? 8 : 4;
    for (int v = 0; v < values; ++v) {
      int idx;
      if (operand == 'a') {
        idx = typename Traits::ALayout{}(t, v);
        out[t].emplace_back(idx % 16, idx / 16);
      } else if (operand == 'b') {
        idx = typename Traits::BLayout{}(t, v);
        out[t].emplace_back(idx / 8, idx % 8);  // (k, n) from n + 8 k
      } else {
        idx = typename Traits::CLayout{}(t, v);
        out[t].emplace_back(idx % 16, idx / 16);
      }
    }
  }
  return out;
}

std::vector<std::vector<Coord>> emu_mma(char operand) {
  std::vector<std::vector<Coord>> out(32);
  for (int t = 0; t < 32; ++t) {
    for (int v = 0; v < (operand == 'a' ? 8 : 4); ++v) {
      int row, col;
      nattn::emu::sm80::mma_fragment_coord(operand, t, v, row, col);
      out[t].emplace_back(row, col);
    }
  }
  return out;
}

// CuTe: for lane t, destination register j and half h, the (matrix, row, col) of the element,
// from Copy_Traits' DstLayout: bit coordinates over the rows the lanes supply (SrcLayout: lane r
// supplies row r, 128 bits), i.e. matrix r / 8, row r % 8.
template <class Op>
std::vector<std::vector<std::tuple<int, int, int>>> cute_ldmatrix(int matrices) {
  using Traits = cute::Copy_Traits<Op>;
  std::vector<std::vector<std::tuple<int, int, int>>> out(32);
  for (int t = 0; t < 32; ++t) {
    for (int j = 0; j < matrices; ++j) {
      for (int h = 0; h < 2; ++h) {
        const int bit = typename Traits::DstLayout{}(t, 16 * h + 32 * j);
        const int row = bit / 128;
        out[t].emplace_back(row / 8, row % 8, (bit % 128) / 16);
      }
    }
  }
  return out;
}

std::vector<std::vector<std::tuple<int, int, int>>> emu_ldmatrix(int matrices, bool trans) {
  std::vector<std::vector<std::tuple<int, int, int>>> out(32);
  for (int t = 0; t < 32; ++t) {
    for (int j = 0; j < matrices; ++j) {
      for (int h = 0; h < 2; ++h) {
        int row, col;
        nattn::emu::sm80::ldmatrix_fragment_coord(trans, t, h, row, col);
        out[t].emplace_back(j, row, col);
      }
    }
  }
  return out;
}

}  // namespace

PYBIND11_MODULE(_emu, m) {
  m.doc() =
      "nattn's CUDA kernels under the functional emulator (backend cuda-emu; csrc/emu). "
      "Verification only: slow.";
  register_params(m, /*module_local=*/true);
  register_cuda(m);

  m.def(
      "configure",
      [](int arch, const std::string& order, uint64_t seed, int64_t grid_cap) {
        if (arch != 80 && arch != 90) {
          throw std::invalid_argument("NATTN_EMU_ARCH=" + std::to_string(arch) +
                                      ": the emulator models sm80 (80) and sm90 (90)");
        }
        nattn::emu::Settings& s = nattn::emu::settings();
        if (order == "forward") {
          s.order = nattn::emu::Order::kForward;
        } else if (order == "reverse") {
          s.order = nattn::emu::Order::kReverse;
        } else if (order == "random") {
          s.order = nattn::emu::Order::kRandom;
        } else {
          throw std::invalid_argument("order=" + order +
                                      ": choose 'forward', 'reverse' or 'random'");
        }
        if (grid_cap < 0) throw std::invalid_argument("grid_cap must be >= 0 (0: no cap)");
        s.arch = arch;
        s.seed = seed;
        s.grid_cap = grid_cap;
      },
      py::arg("arch") = 80, py::arg("order") = "forward", py::arg("seed") = 0,
      py::arg("grid_cap") = 0,
      "Emulated compute capability, order of CTAs and fibers ('forward', 'reverse', 'random' "
      "with `seed`), and a cap on the CTAs of grid-stride launches (0: none).");
  m.def("build_info", []() {
    py::dict d;
    d["cuda_include"] = NATTN_EMU_CUDA_INCLUDE_DIR;
    d["cutlass_include"] = NATTN_EMU_CUTLASS_INCLUDE_DIR;
    d["boost_include"] = NATTN_EMU_BOOST_INCLUDE_DIR;
    d["boost_context_library"] = NATTN_EMU_BOOST_CONTEXT_LIBRARY;
    return d;
  }, "Where the emulator's dependencies were found at build time (for tests that build kernels "
     "against it).");
  m.def("clear_launches", []() { nattn::emu::launch_log().clear(); });
  m.def(
      "launches",
      []() {
        py::list out;
        for (const auto& r : nattn::emu::launch_log()) {
          py::dict d;
          d["kernel"] = r.kernel;
          d["grid"] = std::vector<unsigned>(r.grid, r.grid + 3);
          d["block"] = std::vector<unsigned>(r.block, r.block + 3);
          d["shared_bytes"] = r.shared_bytes;
          d["mma"] = r.mma;
          d["ldmatrix"] = r.ldmatrix;
          d["cp_async_bytes"] = r.cp_async_bytes;
          d["global_store_bytes"] = r.global_store_bytes;
          out.append(d);
        }
        return out;
      },
      "Launches since clear_launches(): kernel, grid, block, shared_bytes and the counters "
      "mma and ldmatrix (warp instructions), cp_async_bytes and global_store_bytes.");
  m.def("mma_fragment", &emu_mma, py::arg("operand"),
        "The emulator's m16n8k16 fragment map (PTX ISA): per lane, (row, col) of each element "
        "of operand 'a', 'b' (row = k) or 'c'.");
  m.def(
      "cute_mma_fragment",
      [](char operand, bool bf16) {
        return bf16 ? cute_mma<cute::SM80_16x8x16_F32BF16BF16F32_TN>(operand)
                    : cute_mma<cute::SM80_16x8x16_F32F16F16F32_TN>(operand);
      },
      py::arg("operand"), py::arg("bf16") = false, "The same map from CuTe's MMA_Traits.");
  m.def("ldmatrix_fragment", &emu_ldmatrix, py::arg("matrices"), py::arg("trans"),
        "The emulator's ldmatrix map (PTX ISA): per lane, (matrix, row, col) of register j, "
        "half h at index 2 j + h.");
  m.def(
      "cute_ldmatrix_fragment",
      [](int matrices, bool trans) {
        using namespace cute;
        if (trans) {
          if (matrices == 1) return cute_ldmatrix<SM75_U16x2_LDSM_T>(1);
          if (matrices == 2) return cute_ldmatrix<SM75_U16x4_LDSM_T>(2);
          return cute_ldmatrix<SM75_U16x8_LDSM_T>(4);
        }
        if (matrices == 1) return cute_ldmatrix<SM75_U32x1_LDSM_N>(1);
        if (matrices == 2) return cute_ldmatrix<SM75_U32x2_LDSM_N>(2);
        return cute_ldmatrix<SM75_U32x4_LDSM_N>(4);
      },
      py::arg("matrices"), py::arg("trans"), "The same map from CuTe's Copy_Traits.");
}
