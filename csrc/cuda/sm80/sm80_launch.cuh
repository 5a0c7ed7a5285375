// Host side of the SM80 launches: dtype tags to CuTe element types, the tilings of a problem,
// and one launch helper (shared-memory opt-in, a grid that cannot overflow).
#pragma once

#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <string>

#include "cuda/sm80/sm80_config.h"
#include "cuda/sm80/sm80_kernel_common.cuh"
#include "cuda/sm80/sm80_tiles.h"

namespace nattn::cuda::sm80 {

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

// Query tiles of `q_rows` positions and key tiles of `kv_rows` positions, as boxes chosen for the
// problem's windows (sm80_tiles.h: choose_boxes).
struct Tilings {
  BoxTiling q;
  BoxTiling kv;
};
inline Tilings make_tilings(const AttentionParams& p, int q_rows, int kv_rows) {
  const BoxPair boxes = choose_boxes(p.axes, log2_int(q_rows), log2_int(kv_rows));
  return Tilings{make_tiling(p.axes, boxes.q), make_tiling(p.axes, boxes.kv)};
}

// Launches `kernel` over `work` items with a 1-D grid of at most 2^31 - 1 CTAs: each CTA loops
// over items blockIdx.x, blockIdx.x + gridDim.x, ..., so batch x heads x tiles of any size fits.
template <class Kernel, class... Args>
std::string launch(Kernel kernel, int64_t work, int threads, int64_t smem_bytes, void* stream,
                   const Args&... args) {
  if (work <= 0) return {};
  cudaError_t status = cudaSuccess;
  if (smem_bytes > 48 * 1024) {
    status = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                  static_cast<int>(smem_bytes));
    if (status != cudaSuccess) return cudaGetErrorString(status);
  }
  const int64_t grid = std::min<int64_t>(work, 0x7fffffff);
  kernel<<<static_cast<unsigned>(grid), threads, static_cast<size_t>(smem_bytes),
           static_cast<cudaStream_t>(stream)>>>(args...);
  status = cudaGetLastError();
  return status == cudaSuccess ? std::string() : std::string(cudaGetErrorString(status));
}

}  // namespace nattn::cuda::sm80
