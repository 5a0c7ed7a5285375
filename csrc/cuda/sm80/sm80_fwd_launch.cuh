// Definition of sm80::forward<dtype, head_dim>, instantiated in sm80_fwd_{f16,bf16}.cu.
#pragma once

#include "cuda/sm80/sm80_api.h"
#include "cuda/sm80/sm80_fwd_kernel.cuh"
#include "cuda/sm80/sm80_launch.cuh"

namespace nattn::cuda::sm80 {

template <DType kDtype, int kHeadDim>
std::string forward(const AttentionParams& p) {
  using Traits = KernelTraits<typename ElementOf<kDtype>::type, kHeadDim, kForwardBlockM,
                              forward_block_n(kHeadDim)>;
  const Tilings t = make_tilings(p, Traits::kBlockM, Traits::kBlockN);
  const Geometry g{t.q, t.kv};
  return launch_grid_stride(forward_kernel<Traits>, g.q.count() * p.heads * p.batch,
                            Traits::kThreads, forward_smem_bytes(kHeadDim), p.stream, p, g);
}

}  // namespace nattn::cuda::sm80
