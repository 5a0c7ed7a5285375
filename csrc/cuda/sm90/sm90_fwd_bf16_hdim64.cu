// Hopper forward instantiation: bf16, head_dim 64 (one per translation unit to keep each
// compile of the CuTe wgmma code small on 2-core CI machines).
#include "cuda/sm90/sm90_fwd_launch.cuh"

namespace nattn::cuda::sm90 {

template std::string launch_forward<DType::kBFloat16, 64>(const ForwardParams&, int64_t, void*);

}  // namespace nattn::cuda::sm90
