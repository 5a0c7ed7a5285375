// Host-side launch of the grid-stride kernels (SIMT fallback, SM80 tensor-core path).
#pragma once

#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <string>

namespace nattn::cuda {

// Launches `kernel` with `blocks` CTAs of `threads` threads on a 1-D grid of at most 2^31 - 1
// CTAs: each kernel loops over its work items blockIdx.x, blockIdx.x + gridDim.x, ..., so
// batch x heads x tiles of any size fits. Opts in to more than 48 KiB of dynamic shared memory
// where asked. Returns the CUDA error string, empty on success (and when there is nothing to do).
template <class Kernel, class... Args>
std::string launch_grid_stride(Kernel kernel, int64_t blocks, int threads, int64_t smem_bytes,
                               void* stream, const Args&... args) {
  if (blocks <= 0) return {};
  cudaError_t status = cudaSuccess;
  if (smem_bytes > 48 * 1024) {
    status = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                  static_cast<int>(smem_bytes));
    if (status != cudaSuccess) return cudaGetErrorString(status);
  }
  const int64_t grid = std::min<int64_t>(blocks, 0x7fffffff);
  kernel<<<static_cast<unsigned>(grid), threads, static_cast<size_t>(smem_bytes),
           static_cast<cudaStream_t>(stream)>>>(args...);
  status = cudaGetLastError();
  return status == cudaSuccess ? std::string() : std::string(cudaGetErrorString(status));
}

}  // namespace nattn::cuda
