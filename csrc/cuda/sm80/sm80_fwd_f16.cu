// Forward instantiations, f16: head dims 32, 64, 128, 256 (sm80_config.h).
#include "cuda/sm80/sm80_fwd_launch.cuh"

namespace nattn::cuda::sm80 {

template std::string forward<DType::kFloat16, 32>(const AttentionParams&);
template std::string forward<DType::kFloat16, 64>(const AttentionParams&);
template std::string forward<DType::kFloat16, 128>(const AttentionParams&);
template std::string forward<DType::kFloat16, 256>(const AttentionParams&);

}  // namespace nattn::cuda::sm80
