// The SM80 instruction seam: the CuTe operations the SM80 tensor-core kernels issue (mma.sync
// m16n8k16, ldmatrix, cp.async with its commit groups). With NATTN_EMU they are the emulator's
// implementations of the same instructions (csrc/emu/sm80_ops.h), which keep CuTe's traits and
// layouts; otherwise CuTe's own.
#pragma once

#include "cuda/common/arch_ops.h"

#ifdef NATTN_EMU
#include "emu/sm80_ops.h"
#else
#include <cute/arch/copy_sm75.hpp>
#include <cute/arch/copy_sm80.hpp>
#include <cute/arch/mma_sm80.hpp>
#endif

namespace nattn::cuda::sm80::ops {
using namespace ::nattn::cuda::ops;
#ifdef NATTN_EMU
namespace impl = ::nattn::emu::sm80;
#else
namespace impl = ::cute;
#endif

using MmaF16 = impl::SM80_16x8x16_F32F16F16F32_TN;    // mma.sync.m16n8k16.f32.f16.f16.f32
using MmaBF16 = impl::SM80_16x8x16_F32BF16BF16F32_TN;  // mma.sync.m16n8k16.f32.bf16.bf16.f32
using LdsmRows = impl::SM75_U32x4_LDSM_N;               // ldmatrix.x4
using LdsmCols = impl::SM75_U16x8_LDSM_T;               // ldmatrix.x4.trans
template <class T>
using CpAsyncZfill = impl::SM80_CP_ASYNC_CACHEGLOBAL_ZFILL<T>;  // cp.async.cg, src-size 0 or 16

__device__ __forceinline__ void cp_async_fence() { impl::cp_async_fence(); }  // commit_group
template <int N>
__device__ __forceinline__ void cp_async_wait() {  // cp.async.wait_group N
  impl::cp_async_wait<N>();
}

}  // namespace nattn::cuda::sm80::ops
