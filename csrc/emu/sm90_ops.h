// SM90 (Hopper) instructions under the emulator, as drop-in replacements of the CuTe / CUTLASS
// operations the Hopper kernels issue: cp.async.bulk.tensor (TMA) loads with mbarrier
// transaction counts, mbarrier init / arrive / expect_tx / try_wait.parity, named barriers,
// setmaxnreg, wgmma.mma_async m64nNk16 (fp16/bf16 in, fp32 accumulate; SS and RS forms) with
// wgmma.fence / commit_group / wait_group, and the driver's cuTensorMapEncodeTiled. Their
// semantics are written from the PTX ISA (sm90_ops.cpp) and the CUDA driver API documentation,
// not from the kernels or from CuTe. As for SM80, each CuTe traits class is inherited from the
// real instruction's (MMA_Traits<emulated> : MMA_Traits<real>), so layouts and partitions stay
// CuTe's; tests/test_emu.py compares the emulator's descriptor decoding and fragment maps with
// CuTe's GMMA layouts.
#pragma once

// CuTe's cast_smem_ptr_to_uint (which builds wgmma descriptors) calls __cvta_generic_to_shared
// when this is set; runtime.h defines the intrinsic as the emulator's shared-window address.
#ifndef CUTE_CVTA_GENERIC_TO_SHARED_ACTIVATED
#define CUTE_CVTA_GENERIC_TO_SHARED_ACTIVATED 1
#endif
#include "emu/runtime.h"

#include <cuda.h>

#include <cstdint>

#include <cute/arch/mma_sm90.hpp>
#include <cute/atom/mma_traits_sm90_gmma.hpp>
#include <cute/tensor.hpp>

namespace nattn::emu::sm90 {

// ---------------------------------------------------------------------------------------------
// Tensor maps. The emulator's cuTensorMapEncodeTiled (handed out by
// cudaGetDriverEntryPointByVersion) checks the documented rules, returns the documented error
// (CUDA_ERROR_INVALID_VALUE; the detail is in cudaGetErrorString of the emulator's last
// failure) and stores its arguments in the 128-byte map.
CUresult encode_tiled(CUtensorMap* map, CUtensorMapDataType type, cuuint32_t rank, void* address,
                      const cuuint64_t* dim, const cuuint64_t* strides, const cuuint32_t* box,
                      const cuuint32_t* element_strides, CUtensorMapInterleave interleave,
                      CUtensorMapSwizzle swizzle, CUtensorMapL2promotion l2,
                      CUtensorMapFloatOOBfill oob);
// Why the last encode_tiled of this OS thread failed ("" after a success).
const std::string& last_encode_error();
// Test hook: make the next encode_tiled calls fail with CUDA_ERROR_INVALID_VALUE (a driver
// that rejects a map), to check that callers fall back instead of failing.
void set_encode_fault(bool on);

// cp.async.bulk.tensor.{rank}d.shared::cluster.global.mbarrier::complete_tx::bytes: the box at
// `coords` (rank coordinates, dim 0 first) of `map` into shared memory at `dst`, completing its
// bytes on the mbarrier at `mbar`.
void tma_load(const void* map, uint64_t* mbar, void* dst, const int32_t* coords, int rank);
void prefetch_tma_descriptor(const void* map);  // checks the map was encoded

// ---------------------------------------------------------------------------------------------
// wgmma.mma_async.sync.aligned.m64nNk16.f32.{f16,bf16}.{f16,bf16}: one warpgroup instruction.
struct WgmmaShape {
  int n;
  bool bf16;
  bool a_mn_major;  // imm-trans-a (SS only)
  bool b_mn_major;  // imm-trans-b
  bool rs;          // A from registers
};
// The calling thread's operands: descriptors (SS: a_desc; b_desc), A registers (RS), its N/2
// accumulator registers and scale-d (0: D = A B, 1: D = A B + D).
void wgmma(const WgmmaShape& shape, uint64_t a_desc, const uint32_t* const* a_regs,
           uint64_t b_desc, float* const* d, int scale_d);
void wgmma_fence();
void wgmma_commit();
void wgmma_wait(int pending_groups);

// Where the ISA puts things, for the cross-check with CuTe: the shared address of element
// (mn, k) of a 16-bit operand described by `desc` (K-major or MN-major), and the (row, col) of
// accumulator register i / A register half i of thread t (0..127) of the warpgroup.
uint32_t descriptor_element_address(uint64_t desc, bool mn_major, int mn, int k);
void accumulator_coord(int thread, int i, int& row, int& col);
void a_fragment_coord(int thread, int i, int& row, int& col);

// CuTe's register interface for one emulated wgmma (the kernels reach fma only through
// mma_unpack below).
template <class Element, int N, cute::GMMA::Major kMajorA, cute::GMMA::Major kMajorB, bool kRS>
struct Wgmma {
  using ARegisters = std::conditional_t<kRS, uint32_t[4], uint64_t[1]>;
  using BRegisters = uint64_t[1];
  using CRegisters = float[N / 2];
  static constexpr WgmmaShape shape() {
    return WgmmaShape{N, std::is_same_v<Element, cute::bfloat16_t>,
                      kMajorA == cute::GMMA::Major::MN, kMajorB == cute::GMMA::Major::MN, kRS};
  }
};

// The real instruction an emulated one stands for (its CuTe traits give the layouts).
template <class Op>
struct RealWgmma;
template <class Element, int N, cute::GMMA::Major kMajorA, cute::GMMA::Major kMajorB>
struct RealWgmma<Wgmma<Element, N, kMajorA, kMajorB, false>> {
  using type = decltype(cute::GMMA::ss_op_selector<Element, Element, float,
                                                   cute::Shape<cute::_64, cute::Int<N>, cute::_16>,
                                                   kMajorA, kMajorB>());
};
template <class Element, int N, cute::GMMA::Major kMajorA, cute::GMMA::Major kMajorB>
struct RealWgmma<Wgmma<Element, N, kMajorA, kMajorB, true>> {
  using type = decltype(cute::GMMA::rs_op_selector<Element, Element, float,
                                                   cute::Shape<cute::_64, cute::Int<N>, cute::_16>,
                                                   kMajorA, kMajorB>());
};

}  // namespace nattn::emu::sm90

namespace cute {
template <class Element, int N, GMMA::Major kMajorA, GMMA::Major kMajorB, bool kRS>
struct MMA_Traits<::nattn::emu::sm90::Wgmma<Element, N, kMajorA, kMajorB, kRS>>
    : MMA_Traits<typename ::nattn::emu::sm90::RealWgmma<
          ::nattn::emu::sm90::Wgmma<Element, N, kMajorA, kMajorB, kRS>>::type> {};
}  // namespace cute

namespace nattn::emu::sm90 {

// Found by argument-dependent lookup from MMA_Atom::call (more specialized than CuTe's generic
// mma_unpack): D (+)= A B with C aliased to D, as CuTe's GMMA unpacking does.
template <class Element, int N, cute::GMMA::Major kMajorA, cute::GMMA::Major kMajorB, bool kRS,
          class TD, class DLayout, class TA, class ALayout, class TB, class BLayout, class TC,
          class CLayout>
void mma_unpack(cute::MMA_Traits<Wgmma<Element, N, kMajorA, kMajorB, kRS>> const& traits,
                cute::Tensor<TD, DLayout>& D, cute::Tensor<TA, ALayout> const& A,
                cute::Tensor<TB, BLayout> const& B, cute::Tensor<TC, CLayout> const&) {
  using Op = Wgmma<Element, N, kMajorA, kMajorB, kRS>;
  auto rD = cute::recast<float>(D);
  auto rB = cute::recast<uint64_t>(B);
  static_assert(decltype(cute::size(rD))::value == N / 2, "64 x N fp32 accumulator: N/2 per thread");
  float* d[N / 2];
  for (int i = 0; i < N / 2; ++i) d[i] = &rD(i);
  const uint64_t b_desc = rB(0);
  const uint32_t* a_regs[4] = {nullptr, nullptr, nullptr, nullptr};
  uint64_t a_desc = 0;
  if constexpr (kRS) {
    auto rA = cute::recast<uint32_t>(A);
    static_assert(decltype(cute::size(rA))::value == 4, "64 x 16 16-bit A: 4 registers");
    for (int i = 0; i < 4; ++i) a_regs[i] = &rA(i);
  } else {
    auto rA = cute::recast<uint64_t>(A);
    a_desc = rA(0);
  }
  wgmma(Op::shape(), a_desc, a_regs, b_desc, d,
        traits.accumulate_ == cute::GMMA::ScaleOut::One ? 1 : 0);
}
template <class Element, int N, cute::GMMA::Major kMajorA, cute::GMMA::Major kMajorB, bool kRS,
          class TD, class DLayout, class TA, class ALayout, class TB, class BLayout, class TC,
          class CLayout>
void mma_unpack(cute::MMA_Traits<Wgmma<Element, N, kMajorA, kMajorB, kRS>> const& traits,
                cute::Tensor<TD, DLayout>&& D, cute::Tensor<TA, ALayout> const& A,
                cute::Tensor<TB, BLayout> const& B, cute::Tensor<TC, CLayout> const& C) {
  mma_unpack(traits, D, A, B, C);
}

// CUTLASS's mbarrier wrappers (cutlass::arch::ClusterBarrier / ClusterTransactionBarrier), the
// CTA-local forms the kernels use.
struct Barrier {
  static void init(uint64_t const* bar, uint32_t count) {
    mbarrier_init(shared_address(bar), static_cast<int>(count));
  }
  static void arrive(uint64_t const* bar) { mbarrier_arrive(shared_address(bar), 1); }
  static void wait(uint64_t const* bar, uint32_t phase) {
    mbarrier_wait_parity(shared_address(bar), phase);
  }
  static bool try_wait(uint64_t const* bar, uint32_t phase) {
    return mbarrier_test_parity(shared_address(bar), phase);
  }
};
struct TxBarrier : Barrier {
  static void arrive_and_expect_tx(uint64_t const* bar, uint32_t bytes) {
    const uint32_t a = shared_address(bar);
    mbarrier_expect_tx(a, bytes);
    mbarrier_arrive(a, 1);
  }
  static void expect_transaction(uint64_t const* bar, uint32_t bytes) {
    mbarrier_expect_tx(shared_address(bar), bytes);
  }
  static void complete_transaction(uint64_t const* bar, uint32_t bytes) {
    mbarrier_complete_tx(shared_address(bar), bytes);
  }
};
inline void fence_barrier_init() {}  // fence.mbarrier_init: ordering only

// CuTe's SM90_TMA_LOAD_5D interface (no multicast, the cache hint is a performance hint).
struct TmaLoad5D {
  static void copy(void const* map, uint64_t* mbar, uint64_t /*cache_hint*/, void* dst,
                   int32_t c0, int32_t c1, int32_t c2, int32_t c3, int32_t c4) {
    const int32_t coords[5] = {c0, c1, c2, c3, c4};
    tma_load(map, mbar, dst, coords, 5);
  }
};

template <uint32_t kRegisters>
void warpgroup_reg_alloc() {
  setmaxnreg(true, static_cast<int>(kRegisters));
}
template <uint32_t kRegisters>
void warpgroup_reg_dealloc() {
  setmaxnreg(false, static_cast<int>(kRegisters));
}

}  // namespace nattn::emu::sm90
