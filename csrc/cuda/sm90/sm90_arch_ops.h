// The SM90 instruction seam: everything the Hopper kernels issue beyond the common built-ins
// (cuda/common/arch_ops.h): TMA loads, mbarriers, named barriers, setmaxnreg, wgmma with its
// fence / commit / wait, the shared-window address of a pointer, and the wgmma operations
// themselves. With NATTN_EMU they are the emulator's implementations (csrc/emu/sm90_ops.h),
// which keep CuTe's traits and layouts; otherwise CUTLASS's and CuTe's own.
#pragma once

#include "cuda/common/arch_ops.h"

#ifdef NATTN_EMU
#include "emu/sm90_ops.h"
#else
#include <cute/arch/copy_sm90_desc.hpp>
#include <cute/arch/copy_sm90_tma.hpp>
#include <cute/arch/mma_sm90.hpp>
#include <cutlass/arch/barrier.h>
#include <cutlass/arch/reg_reconfig.h>
#endif
#include <cute/arch/copy_sm90_desc.hpp>  // CUtensorMap as cute::TmaDescriptor, cache hints
#include <cute/atom/mma_traits_sm90_gmma.hpp>
#include <cute/tensor.hpp>

namespace nattn::cuda::sm90::ops {
using namespace ::nattn::cuda::ops;
using Major = ::cute::GMMA::Major;

#ifdef NATTN_EMU
namespace emu = ::nattn::emu::sm90;
using Barrier = emu::Barrier;      // mbarrier: init, arrive, try_wait.parity
using TxBarrier = emu::TxBarrier;  // + arrive.expect_tx
using TmaLoad5D = emu::TmaLoad5D;  // cp.async.bulk.tensor.5d ... mbarrier::complete_tx::bytes
// wgmma.mma_async m64nNk16, fp32 accumulate, both operands in shared memory / A in registers.
template <class Element, int N, Major kA, Major kB>
using WgmmaSS = emu::Wgmma<Element, N, kA, kB, false>;
template <class Element, int N, Major kA, Major kB>
using WgmmaRS = emu::Wgmma<Element, N, kA, kB, true>;
__device__ __forceinline__ uint32_t shared_address(const void* p) {
  return ::nattn::emu::shared_address(p);
}
__device__ __forceinline__ void fence_barrier_init() { emu::fence_barrier_init(); }
__device__ __forceinline__ void prefetch_tma_descriptor(const void* map) {
  emu::prefetch_tma_descriptor(map);
}
template <uint32_t kRegisters>
__device__ __forceinline__ void reg_alloc() {
  emu::warpgroup_reg_alloc<kRegisters>();
}
template <uint32_t kRegisters>
__device__ __forceinline__ void reg_dealloc() {
  emu::warpgroup_reg_dealloc<kRegisters>();
}
__device__ __forceinline__ void named_sync(int id, int threads) {
  ::nattn::emu::barrier_sync(id, threads);
}
__device__ __forceinline__ void named_arrive(int id, int threads) {
  ::nattn::emu::barrier_arrive(id, threads);
}
__device__ __forceinline__ void wgmma_fence() { emu::wgmma_fence(); }
__device__ __forceinline__ void wgmma_commit() { emu::wgmma_commit(); }
template <int N>
__device__ __forceinline__ void wgmma_wait() {
  emu::wgmma_wait(N);
}
// A compiler-level register fence: nothing to do for the emulator, which cannot hoist reads.
template <class T>
__device__ __forceinline__ void fence_operand(T&) {}
#else
using Barrier = ::cutlass::arch::ClusterBarrier;
using TxBarrier = ::cutlass::arch::ClusterTransactionBarrier;
using TmaLoad5D = ::cute::SM90_TMA_LOAD_5D;
template <class Element, int N, Major kA, Major kB>
using WgmmaSS = decltype(::cute::GMMA::ss_op_selector<
                         Element, Element, float, ::cute::Shape<::cute::_64, ::cute::Int<N>, ::cute::_16>,
                         kA, kB>());
template <class Element, int N, Major kA, Major kB>
using WgmmaRS = decltype(::cute::GMMA::rs_op_selector<
                         Element, Element, float, ::cute::Shape<::cute::_64, ::cute::Int<N>, ::cute::_16>,
                         kA, kB>());
__device__ __forceinline__ uint32_t shared_address(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}
__device__ __forceinline__ void fence_barrier_init() { ::cutlass::arch::fence_barrier_init(); }
__device__ __forceinline__ void prefetch_tma_descriptor(const void* map) {
  ::cute::prefetch_tma_descriptor(static_cast<const ::cute::TmaDescriptor*>(map));
}
template <uint32_t kRegisters>
__device__ __forceinline__ void reg_alloc() {
  ::cutlass::arch::warpgroup_reg_alloc<kRegisters>();
}
template <uint32_t kRegisters>
__device__ __forceinline__ void reg_dealloc() {
  ::cutlass::arch::warpgroup_reg_dealloc<kRegisters>();
}
// Named barriers (id 0 is __syncthreads).
__device__ __forceinline__ void named_sync(int id, int threads) {
  asm volatile("bar.sync %0, %1;" ::"r"(id), "r"(threads) : "memory");
}
__device__ __forceinline__ void named_arrive(int id, int threads) {
  asm volatile("bar.arrive %0, %1;" ::"r"(id), "r"(threads) : "memory");
}
__device__ __forceinline__ void wgmma_fence() { ::cute::warpgroup_arrive(); }
__device__ __forceinline__ void wgmma_commit() { ::cute::warpgroup_commit_batch(); }
template <int N>
__device__ __forceinline__ void wgmma_wait() {
  ::cute::warpgroup_wait<N>();
}
// Keeps the compiler from moving register reads/writes of `t` across it (wgmma operands).
template <class T>
__device__ __forceinline__ void fence_operand(T& t) {
  ::cute::warpgroup_fence_operand(t);
}
#endif

}  // namespace nattn::cuda::sm90::ops
