// Backward instantiations, bf16: head dims 32, 64, 128 (sm80_config.h).
#include "cuda/sm80/sm80_bwd_launch.cuh"

namespace nattn::cuda::sm80 {

template std::string backward<DType::kBFloat16, 32>(const AttentionParams&);
template std::string backward<DType::kBFloat16, 64>(const AttentionParams&);
template std::string backward<DType::kBFloat16, 128>(const AttentionParams&);

}  // namespace nattn::cuda::sm80
