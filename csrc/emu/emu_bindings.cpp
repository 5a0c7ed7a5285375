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

#include "bindings_common.h"
#include "emu/sm90_ops.h"  // first: it sets CuTe's shared-address option
#include "emu/runtime.h"
#include "emu/sm80_ops.h"

#include <cute/atom/copy_traits_sm75.hpp>
#include <cute/atom/mma_traits_sm80.hpp>
#include <cute/atom/mma_traits_sm90_gmma.hpp>
#include <cute/tensor.hpp>

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

// ---------------------------------------------------------------------------------------------
// wgmma: the emulator's fragment maps (PTX ISA) and CuTe's GMMA layouts.

// CuTe: (thread, value) -> (row, col) of the 64 x N accumulator (CLayout_64xN) or of the 64 x 16
// A operand in registers (ALayout_64x16), column-major flat indices.
template <class Layout>
std::vector<std::vector<Coord>> cute_gmma_map(int rows, int values) {
  std::vector<std::vector<Coord>> out(128);
  for (int t = 0; t < 128; ++t) {
    for (int v = 0; v < values; ++v) {
      const int idx = Layout{}(t, v);
      out[t].emplace_back(idx % rows, idx / rows);
    }
  }
  return out;
}

std::vector<std::vector<Coord>> emu_gmma_map(char operand, int n) {
  std::vector<std::vector<Coord>> out(128);
  for (int t = 0; t < 128; ++t) {
    for (int v = 0; v < (operand == 'a' ? 8 : n / 2); ++v) {
      int row, col;
      if (operand == 'a') {
        nattn::emu::sm90::a_fragment_coord(t, v, row, col);
      } else {
        nattn::emu::sm90::accumulator_coord(t, v, row, col);
      }
      out[t].emplace_back(row, col);
    }
  }
  return out;
}

// A 64 x 64 fp16 operand in shared memory, laid out by the CuTe GMMA atom `Atom` tiled over it,
// partitioned by CuTe as a wgmma A (and B) operand: per k-block of 16, CuTe's descriptor. For
// every element, the address CuTe's layout gives and the one the emulator decodes from CuTe's
// descriptor (PTX ISA rules) must agree.
struct ProbeResult {
  int64_t compared = 0;
  std::vector<std::tuple<char, int, int, int, uint32_t, uint32_t>> mismatches;  // first 16
  std::vector<uint64_t> descriptors;
};

template <class Atom, cute::GMMA::Major kMajor>
void descriptor_probe_kernel(ProbeResult* out) {
  using namespace cute;
  using Element = cute::half_t;
  unsigned char* raw = static_cast<unsigned char*>(nattn::emu::dynamic_shared(nullptr));
  const uint32_t addr = nattn::emu::shared_address(raw);
  Element* base = reinterpret_cast<Element*>(raw + (1024 - addr % 1024) % 1024);
  Tensor sA = make_tensor(make_smem_ptr(base), tile_to_shape(Atom{}, Shape<_64, _64>{}));
  using Op = nattn::emu::sm90::Wgmma<Element, 64, kMajor, kMajor, false>;
  auto mma = make_tiled_mma(Op{});
  auto thr = mma.get_thread_slice(0);
  Tensor tA = thr.partition_fragment_A(sA);  // (desc, 1, 4)
  Tensor tB = thr.partition_fragment_B(sA);  // the same tile as a 64 x 64 B operand
  const bool mn = kMajor == cute::GMMA::Major::MN;
  for (int kb = 0; kb < 4; ++kb) {
    for (char which : {'a', 'b'}) {
      const uint64_t desc = which == 'a' ? uint64_t(tA(0, 0, kb)) : uint64_t(tB(0, 0, kb));
      out->descriptors.push_back(desc);
      for (int m = 0; m < 64; ++m) {
        for (int k = 0; k < 16; ++k) {
          const uint32_t cute_addr = nattn::emu::shared_address(&sA(m, 16 * kb + k));
          const uint32_t emu_addr =
              nattn::emu::sm90::descriptor_element_address(desc, mn, m, k);
          ++out->compared;
          if (cute_addr != emu_addr && out->mismatches.size() < 16) {
            out->mismatches.emplace_back(which, kb, m, k, cute_addr, emu_addr);
          }
        }
      }
    }
  }
}

template <class Atom, cute::GMMA::Major kMajor>
ProbeResult descriptor_probe() {
  ProbeResult r;
  const cudaError_t status = nattn::emu::launch(&descriptor_probe_kernel<Atom, kMajor>, dim3(1),
                                                dim3(1), 64 * 64 * 2 + 1024, &r);
  if (status != cudaSuccess) throw std::runtime_error(cudaGetErrorString(status));
  return r;
}

// ---------------------------------------------------------------------------------------------
// TMA: one box of a 16-bit tensor loaded by the emulator's cp.async.bulk.tensor into shared
// memory, then read back as CuTe sees that memory: through the GMMA swizzle atom of the same
// swizzle mode (K-major, 16-bit: 8 rows of span bytes), or as plain rows without a swizzle.

struct TmaProbe {
  const CUtensorMap* map;
  int rank;
  int32_t coords[5];
  uint32_t bytes;
  int span;  // swizzle span in bytes, 0 = none
  std::vector<uint16_t>* out;
};

template <class Atom>
void read_atoms(const cute::half_t* base, uint32_t bytes, int span, std::vector<uint16_t>* out) {
  using namespace cute;
  const int cols = span / 2, rows = static_cast<int>(bytes / span);
  for (int r = 0; r < rows; ++r) {
    Tensor atom = make_tensor(make_smem_ptr(base + (r / 8) * 8 * cols), Atom{});
    for (int c = 0; c < cols; ++c) {
      const cute::half_t v = atom(r % 8, c);
      uint16_t bits;
      std::memcpy(&bits, &v, 2);
      out->push_back(bits);
    }
  }
}

void tma_probe_kernel(TmaProbe p) {
  using namespace nattn::emu::sm90;
  unsigned char* raw = static_cast<unsigned char*>(nattn::emu::dynamic_shared(nullptr));
  const uint32_t addr = nattn::emu::shared_address(raw);
  unsigned char* box = raw + (1024 - addr % 1024) % 1024;
  auto* bar = reinterpret_cast<uint64_t*>(raw + (1024 - addr % 1024) % 1024 + 64 * 1024);
  Barrier::init(bar, 1);
  TxBarrier::arrive_and_expect_tx(bar, p.bytes);
  tma_load(p.map, bar, box, p.coords, p.rank);
  Barrier::wait(bar, 0);
  const auto* base = reinterpret_cast<const cute::half_t*>(box);
  using namespace cute::SM90::GMMA;
  if (p.span == 128) {
    read_atoms<Layout_K_SW128_Atom<cute::half_t>>(base, p.bytes, 128, p.out);
  } else if (p.span == 64) {
    read_atoms<Layout_K_SW64_Atom<cute::half_t>>(base, p.bytes, 64, p.out);
  } else if (p.span == 32) {
    read_atoms<Layout_K_SW32_Atom<cute::half_t>>(base, p.bytes, 32, p.out);
  } else {
    const auto* b = reinterpret_cast<const uint16_t*>(box);
    p.out->assign(b, b + p.bytes / 2);
  }
}

std::tuple<int, std::string> encode_map(CUtensorMap* map, int type, int rank, uintptr_t address,
                                        const std::vector<uint64_t>& dim,
                                        const std::vector<uint64_t>& strides,
                                        const std::vector<uint32_t>& box,
                                        const std::vector<uint32_t>& estrides, int interleave,
                                        int swizzle, int l2, int oob) {
  if (rank < 0 || dim.size() < static_cast<size_t>(rank) || box.size() < static_cast<size_t>(rank) ||
      estrides.size() < static_cast<size_t>(rank) ||
      strides.size() + 1 < static_cast<size_t>(rank)) {
    throw std::invalid_argument("encode_tensor_map: dims, box and element strides need rank "
                                "entries, strides rank - 1");
  }
  std::vector<uint64_t> d(dim), s(strides);
  std::vector<uint32_t> b(box), e(estrides);
  d.resize(5, 1), s.resize(5, 16), b.resize(5, 1), e.resize(5, 1);
  const CUresult r = nattn::emu::sm90::encode_tiled(
      map, static_cast<CUtensorMapDataType>(type), static_cast<cuuint32_t>(rank),
      reinterpret_cast<void*>(address), d.data(), s.data(), b.data(), e.data(),
      static_cast<CUtensorMapInterleave>(interleave), static_cast<CUtensorMapSwizzle>(swizzle),
      static_cast<CUtensorMapL2promotion>(l2), static_cast<CUtensorMapFloatOOBfill>(oob));
  return {static_cast<int>(r), nattn::emu::sm90::last_encode_error()};
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
          d["wgmma"] = r.wgmma;
          d["tma_bytes"] = r.tma_bytes;
          out.append(d);
        }
        return out;
      },
      "Launches since clear_launches(): kernel, grid, block, shared_bytes and the counters "
      "mma and ldmatrix (warp instructions), wgmma (warpgroup instructions), cp_async_bytes, "
      "tma_bytes and global_store_bytes.");
  m.def(
      "encode_tensor_map",
      [](int type, int rank, uintptr_t address, const std::vector<uint64_t>& dim,
         const std::vector<uint64_t>& strides, const std::vector<uint32_t>& box,
         const std::vector<uint32_t>& estrides, int interleave, int swizzle, int l2, int oob) {
        alignas(64) CUtensorMap map;
        return encode_map(&map, type, rank, address, dim, strides, box, estrides, interleave,
                          swizzle, l2, oob);
      },
      py::arg("type"), py::arg("rank"), py::arg("address"), py::arg("dim"), py::arg("strides"),
      py::arg("box"), py::arg("element_strides"), py::arg("interleave") = 0,
      py::arg("swizzle") = 0, py::arg("l2") = 0, py::arg("oob") = 0,
      "The emulator's cuTensorMapEncodeTiled (the CUtensorMap* enum values as ints): (CUresult, "
      "why it refused).");
  m.def(
      "tma_load_box",
      [](uintptr_t address, const std::vector<uint64_t>& dim,
         const std::vector<uint64_t>& strides, const std::vector<uint32_t>& box,
         const std::vector<uint32_t>& estrides, int swizzle, const std::vector<int32_t>& coords) {
        alignas(64) CUtensorMap map;
        const int rank = static_cast<int>(dim.size());
        const auto [code, why] = encode_map(&map, CU_TENSOR_MAP_DATA_TYPE_FLOAT16, rank, address,
                                            dim, strides, box, estrides, 0, swizzle, 0, 0);
        if (code != 0) throw std::invalid_argument(why);
        if (coords.size() != static_cast<size_t>(rank)) throw std::invalid_argument("coords");
        TmaProbe p{&map, rank, {0, 0, 0, 0, 0}, 2, swizzle == 1 ? 32 : swizzle == 2 ? 64
                                                                : swizzle == 3 ? 128 : 0,
                   nullptr};
        for (int i = 0; i < rank; ++i) {
          p.coords[i] = coords[i];
          const uint32_t es = i == 0 ? 1 : estrides[i];
          p.bytes *= (box[i] + es - 1) / es;
        }
        if (p.bytes > 64 * 1024) throw std::invalid_argument("box over 64 KiB");
        std::vector<uint16_t> out;
        p.out = &out;
        cudaFuncSetAttribute(&tma_probe_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                             64 * 1024 + 2048);
        const cudaError_t status = nattn::emu::launch(&tma_probe_kernel, dim3(1), dim3(1),
                                                      64 * 1024 + 2048, p);
        if (status != cudaSuccess) throw std::runtime_error(cudaGetErrorString(status));
        return out;
      },
      py::arg("address"), py::arg("dim"), py::arg("strides"), py::arg("box"),
      py::arg("element_strides"), py::arg("swizzle"), py::arg("coords"),
      "One fp16 box loaded by the emulated cp.async.bulk.tensor (the mbarrier's transaction "
      "count must complete its phase), read back through CuTe's K-major GMMA swizzle atom of "
      "the same mode (swizzle 1/2/3: 32/64/128 bytes) or as plain memory: the box's elements, "
      "dim 0 fastest, as 16-bit patterns.");
  m.def("set_encode_fault", &nattn::emu::sm90::set_encode_fault, py::arg("on"),
        "Test hook: the emulated driver's cuTensorMapEncodeTiled refuses every map while on.");
  m.def("wgmma_fragment", &emu_gmma_map, py::arg("operand"), py::arg("n") = 128,
        "The emulator's wgmma m64nNk16 register maps (PTX ISA): per thread of the warpgroup, "
        "(row, col) of each value of operand 'a' (64 x 16, 16-bit, in registers) or 'c' (the "
        "64 x n fp32 accumulator).");
  m.def(
      "cute_wgmma_fragment",
      [](char operand) {
        using namespace cute::SM90::GMMA;
        return operand == 'a' ? cute_gmma_map<ALayout_64x16>(64, 8)
                              : cute_gmma_map<CLayout_64x128>(64, 64);
      },
      py::arg("operand"), "The same maps from CuTe (ALayout_64x16, CLayout_64x128).");
  m.def(
      "wgmma_descriptor_probe",
      [](const std::string& swizzle, const std::string& major) {
        using namespace cute::SM90::GMMA;
        using E = cute::half_t;
        ProbeResult r;
        const bool k = major == "K";
        if (major != "K" && major != "MN") throw std::invalid_argument("major: 'K' or 'MN'");
        if (swizzle == "SW128") {
          r = k ? descriptor_probe<Layout_K_SW128_Atom<E>, Major::K>()
                : descriptor_probe<Layout_MN_SW128_Atom<E>, Major::MN>();
        } else if (swizzle == "SW64") {
          r = k ? descriptor_probe<Layout_K_SW64_Atom<E>, Major::K>()
                : descriptor_probe<Layout_MN_SW64_Atom<E>, Major::MN>();
        } else if (swizzle == "SW32") {
          r = k ? descriptor_probe<Layout_K_SW32_Atom<E>, Major::K>()
                : descriptor_probe<Layout_MN_SW32_Atom<E>, Major::MN>();
        } else if (swizzle == "INTER") {
          r = k ? descriptor_probe<Layout_K_INTER_Atom<E>, Major::K>()
                : descriptor_probe<Layout_MN_INTER_Atom<E>, Major::MN>();
        } else {
          throw std::invalid_argument("swizzle: 'SW128', 'SW64', 'SW32' or 'INTER'");
        }
        py::dict d;
        d["compared"] = r.compared;
        d["mismatches"] = r.mismatches;
        d["descriptors"] = r.descriptors;
        return d;
      },
      py::arg("swizzle"), py::arg("major"),
      "A 64 x 64 fp16 tile in shared memory laid out by CuTe's GMMA atom (Layout_{K,MN}_"
      "{SW128,SW64,SW32,INTER}_Atom) and partitioned by CuTe as wgmma A and B operands: for "
      "every element of every k-block, CuTe's address against the emulator's decoding of "
      "CuTe's descriptor. {'compared', 'mismatches' (first 16: operand, k-block, mn, k, cute "
      "address, emulator address), 'descriptors'}.");
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
