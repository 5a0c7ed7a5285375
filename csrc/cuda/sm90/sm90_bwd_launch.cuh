// Host side of the Hopper backward: the launches of one (dtype, head dim) instantiation, the dQ
// pass then the dK/dV pass (independent: both read delta, each writes its own gradients).
// Instantiated per (dtype, head dim) in sm90_bwd_{f16,bf16}_hdim{32,64,128}.cu.
#pragma once

#include "cuda/sm90/sm90_fwd_launch.cuh"  // first: cudaTypedefs.h, the seam, encode_maps

#include <string>

#include "cuda/sm90/sm90_bwd_kernel.cuh"

namespace nattn::cuda::sm90 {

// Launches both passes on a params struct whose maps are already encoded.
template <DType kDtype, int kHeadDim>
std::string launch_backward(const BackwardParams& params, int64_t batch, void* stream) {
  using Traits = BackwardTraits<typename ElementOf<kDtype>::type, kHeadDim>;
  const int64_t smem = backward_smem_bytes(kHeadDim);
  auto run = [&](auto kernel, int64_t tiles_x_heads) -> std::string {
    cudaError_t status = cudaFuncSetAttribute(
        kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem));
    if (status != cudaSuccess) return cudaGetErrorString(status);
    const dim3 grid(static_cast<unsigned>(tiles_x_heads), static_cast<unsigned>(batch), 1);
#ifdef NATTN_EMU
    (void)stream;
    status = ::nattn::emu::launch(kernel, grid, dim3(kThreads, 1, 1), static_cast<size_t>(smem),
                                  params);
    if (status != cudaSuccess) {
      (void)cudaGetLastError();
      return cudaGetErrorString(status);
    }
    return {};
#else
    cudaLaunchConfig_t config = {};
    config.gridDim = grid;
    config.blockDim = dim3(kThreads, 1, 1);
    config.dynamicSmemBytes = static_cast<size_t>(smem);
    config.stream = static_cast<cudaStream_t>(stream);
    cudaLaunchAttribute attribute[1];  // no clusters, stated explicitly (as the forward)
    attribute[0].id = cudaLaunchAttributeClusterDimension;
    attribute[0].val.clusterDim.x = 1;
    attribute[0].val.clusterDim.y = 1;
    attribute[0].val.clusterDim.z = 1;
    config.attrs = attribute;
    config.numAttrs = 1;
    status = cudaLaunchKernelEx(&config, kernel, params);
    if (status != cudaSuccess) return cudaGetErrorString(status);
    status = cudaGetLastError();
    return status == cudaSuccess ? std::string() : std::string(cudaGetErrorString(status));
#endif
  };
  std::string err = run(backward_kernel<Traits, false>, params.q.count() * params.heads);
  if (!err.empty()) return err;
  return run(backward_kernel<Traits, true>,
             (params.kv.count() + params.add_tiles) * params.kv_heads);
}

}  // namespace nattn::cuda::sm90
