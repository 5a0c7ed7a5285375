// Definition of sm80::backward<dtype, head_dim>, instantiated in sm80_bwd_{f16,bf16}.cu.
#pragma once

#include "cuda/sm80/sm80_api.h"
#include "cuda/sm80/sm80_bwd_kernel.cuh"
#include "cuda/sm80/sm80_launch.cuh"

namespace nattn::cuda::sm80 {

template <DType kDtype, int kHeadDim>
std::string backward(const AttentionParams& p) {
  using Traits =
      KernelTraits<typename ElementOf<kDtype>::type, kHeadDim, kBackwardBlock, kBackwardBlock>;
  // Square tiles: one pair of tilings serves both passes (queries are the register tile of the
  // dQ pass and the streamed tile of the dK/dV pass, and the other way round for keys).
  const Tilings t = make_tilings(p, kBackwardBlock, kBackwardBlock);
  const Geometry g{t.q, t.kv};
  const int64_t smem = backward_smem_bytes(kHeadDim);
  std::string err = launch_grid_stride(dq_kernel<Traits>, g.q.count() * p.heads * p.batch,
                                       Traits::kThreads, smem, p.stream, p, g);
  if (!err.empty()) return err;
  const int64_t add_tiles = (p.num_additional + kBackwardBlock - 1) / kBackwardBlock;
  return launch_grid_stride(dkdv_kernel<Traits>,
                            (g.kv.count() + add_tiles) * p.kv_heads * p.batch, Traits::kThreads,
                            smem, p.stream, p, g);
}

}  // namespace nattn::cuda::sm80
