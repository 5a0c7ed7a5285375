// The seam between nattn's CUDA kernels and the machine, for what every architecture shares:
// the CUDA built-ins (threadIdx, __syncthreads, warp shuffles: CUDA's own names), the dynamic
// shared memory of a CTA, and stores to global memory. Built with nvcc these are CUDA itself;
// with NATTN_EMU (the cuda-emu backend, csrc/emu) they are the emulator's host definitions, so
// the kernels' bodies compile unchanged as host C++. Architecture-specific instructions have
// their own seam beside the kernels (sm80/sm80_arch_ops.h).
#pragma once

#include <cstddef>

#ifdef NATTN_EMU
#include "emu/runtime.h"
// The kernel's __PRETTY_FUNCTION__ names it in the emulator's messages.
#define NATTN_DYNAMIC_SHARED(type, name) \
  type* name = static_cast<type*>(::nattn::emu::dynamic_shared(__PRETTY_FUNCTION__))
#else
#include <cuda_runtime.h>
#define NATTN_DYNAMIC_SHARED(type, name) extern __shared__ type name[]
#endif

namespace nattn::cuda::ops {

// st.global of one element (the emulator counts the bytes a launch writes).
template <class T>
__device__ __forceinline__ void store_global(T* dst, const T& value) {
#ifdef NATTN_EMU
  ::nattn::emu::count_global_store(sizeof(T));
#endif
  *dst = value;
}

}  // namespace nattn::cuda::ops
