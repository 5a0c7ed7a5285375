// Hopper backward instantiation: f16, head_dim 64 (both passes; one per translation unit to
// keep each compile of the CuTe wgmma code small on 2-core CI machines).
#include "cuda/sm90/sm90_bwd_launch.cuh"

namespace nattn::cuda::sm90 {

template std::string launch_backward<DType::kFloat16, 64>(const BackwardParams&, int64_t, void*);

}  // namespace nattn::cuda::sm90
