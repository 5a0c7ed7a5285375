// Pieces every tensor-core path (sm80 mma.sync, sm90 wgmma) shares: the CuTe element type of a
// dtype tag, and the reductions over the quad of threads that holds one row of an accumulator
// (both the m16n8k16 C fragment and the wgmma accumulator give a row's columns to 4 consecutive
// lanes).
#pragma once

#include <cute/numeric/numeric_types.hpp>

#include "cuda/common/arch_ops.h"
#include "nattn/params.h"

namespace nattn::cuda {

template <DType kDtype>
struct ElementOf;
template <>
struct ElementOf<DType::kFloat16> {
  using type = cute::half_t;
};
template <>
struct ElementOf<DType::kBFloat16> {
  using type = cute::bfloat16_t;
};

__device__ __forceinline__ float quad_max(float x) {
  x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, 1));
  return fmaxf(x, __shfl_xor_sync(0xffffffffu, x, 2));
}
__device__ __forceinline__ float quad_sum(float x) {
  x += __shfl_xor_sync(0xffffffffu, x, 1);
  return x + __shfl_xor_sync(0xffffffffu, x, 2);
}

}  // namespace nattn::cuda
