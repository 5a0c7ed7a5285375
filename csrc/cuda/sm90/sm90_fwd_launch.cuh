// Host side of the Hopper forward: tensor maps through the driver entry point, then the launch.
// Instantiated per (dtype, head dim) in sm90_fwd_{f16,bf16}_hdim{64,128}.cu.
#pragma once

// <cudaTypedefs.h> before any CUTLASS header: cutlass/cuda_host_adapter.hpp includes it inside
// namespace cutlass, which would hide its types from this global include.
#include <cuda.h>
#include <cuda_runtime.h>
#include <cudaTypedefs.h>  // PFN_cuTensorMapEncodeTiled: a pointer type, no libcuda link

#include "cuda/sm90/sm90_arch_ops.h"  // before CuTe: under the emulator it sets CuTe options

#include <string>

#include "cuda/common/tensor_core.cuh"
#include "cuda/sm90/sm90_fwd_kernel.cuh"
#include "cuda/sm90/sm90_plan.h"

namespace nattn::cuda::sm90 {

// cuTensorMapEncodeTiled, looked up once through cudart (the module links cudart statically and
// must import on machines without a driver, so libcuda is never linked directly).
std::string tensor_map_encoder(PFN_cuTensorMapEncodeTiled_v12000* fn);

// Encodes the kMaxVariants maps of one tensor view (sm90_plan.h: plan_tma_view).
std::string encode_maps(const TmaPlan& plan, DType dtype, const void* data, CUtensorMap* maps);

// Launches one instantiation on a params struct whose maps are already encoded.
template <DType kDtype, int kHeadDim>
std::string launch_forward(const ForwardParams& params, int64_t batch, void* stream) {
  using Traits = ForwardTraits<typename ElementOf<kDtype>::type, kHeadDim>;
  auto kernel = forward_kernel<Traits>;
  const int64_t smem = smem_bytes(kHeadDim);
  cudaError_t status = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                            static_cast<int>(smem));
  if (status != cudaSuccess) return cudaGetErrorString(status);
  const dim3 grid(static_cast<unsigned>(params.q.count() * params.heads),
                  static_cast<unsigned>(batch), 1);
#ifdef NATTN_EMU
  // One CTA per work item (no grid-stride loop, so no grid cap); clusters are not modeled, and
  // this launch uses none.
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
  // No clusters: every CTA loads its own tiles (TMA multicast across Q tiles of one window is a
  // later step). Stated explicitly so that the launch does not depend on a compiled-in default.
  cudaLaunchAttribute attribute[1];
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
}

}  // namespace nattn::cuda::sm90
