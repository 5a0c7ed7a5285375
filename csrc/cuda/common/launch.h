// Host-side launch of nattn's kernels (SIMT fallback, SM80 tensor-core path, device queries).
#pragma once

#include <algorithm>
#include <cstdint>
#include <string>

#include "cuda/common/arch_ops.h"

namespace nattn::cuda {

// Launches `kernel` and returns the error of this launch only: the launch's own status, not
// whatever an earlier unrelated call left in cudaGetLastError (and the error this launch caused
// is cleared from there, so that it is not reported again by the caller's next check, torch's
// included). With NATTN_EMU the same launch runs under the emulator.
template <class... Params, class... Args>
cudaError_t launch_kernel(void (*kernel)(Params...), dim3 grid, dim3 block, size_t smem_bytes,
                          void* stream, const Args&... args) {
#ifdef NATTN_EMU
  (void)stream;
  const cudaError_t status = ::nattn::emu::launch(kernel, grid, block, smem_bytes, args...);
#else
  cudaLaunchConfig_t config = {};
  config.gridDim = grid;
  config.blockDim = block;
  config.dynamicSmemBytes = smem_bytes;
  config.stream = static_cast<cudaStream_t>(stream);
  const cudaError_t status = cudaLaunchKernelEx(&config, kernel, args...);
#endif
  if (status != cudaSuccess) (void)cudaGetLastError();
  return status;
}

// Launches `kernel` with `blocks` CTAs of `threads` threads on a 1-D grid of at most 2^31 - 1
// CTAs: each kernel loops over its work items blockIdx.x, blockIdx.x + gridDim.x, ..., so
// batch x heads x tiles of any size fits. Opts in to more than 48 KiB of dynamic shared memory
// where asked. Returns the CUDA error string, empty on success (and when there is nothing to do).
// Under the emulator the grid may be capped further (emu::Settings::grid_cap), so that tests
// run several work items per CTA.
template <class... Params, class... Args>
std::string launch_grid_stride(void (*kernel)(Params...), int64_t blocks, int threads,
                               int64_t smem_bytes, void* stream, const Args&... args) {
  if (blocks <= 0) return {};
  cudaError_t status = cudaSuccess;
  if (smem_bytes > 48 * 1024) {
    status = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                  static_cast<int>(smem_bytes));
    if (status != cudaSuccess) {
      (void)cudaGetLastError();
      return cudaGetErrorString(status);
    }
  }
  int64_t grid = std::min<int64_t>(blocks, 0x7fffffff);
#ifdef NATTN_EMU
  if (::nattn::emu::settings().grid_cap > 0) {
    grid = std::min<int64_t>(grid, ::nattn::emu::settings().grid_cap);
  }
#endif
  status = launch_kernel(kernel, dim3(static_cast<unsigned>(grid)), dim3(threads),
                         static_cast<size_t>(smem_bytes), stream, args...);
  return status == cudaSuccess ? std::string() : std::string(cudaGetErrorString(status));
}

}  // namespace nattn::cuda
