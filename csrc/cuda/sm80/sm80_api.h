// Host entry points of the SM80 tensor-core kernels, one explicit instantiation per
// (dtype, head dim) in sm80_{fwd,bwd}_{f16,bf16}.cu. Plain C++ signatures: the dispatcher
// (csrc/cuda/common/dispatch.cu) includes this without CuTe.
#pragma once

#include <string>

#include "nattn/params.h"

namespace nattn::cuda::sm80 {

// Forward: writes p.out and p.lse. Returns "" or the CUDA error of the launch.
template <DType kDtype, int kHeadDim>
std::string forward(const AttentionParams& p);

// Backward after the delta pass (p.delta filled): the dQ pass then the dK/dV pass, both without
// atomics (deterministic). Writes p.dq, p.dk, p.dv and, with additional tokens, p.d_add_k and
// p.d_add_v. Returns "" or the CUDA error.
template <DType kDtype, int kHeadDim>
std::string backward(const AttentionParams& p);

// The compiled set (the dispatcher's table; sm80_config.h says why these head dims).
extern template std::string forward<DType::kFloat16, 32>(const AttentionParams&);
extern template std::string forward<DType::kFloat16, 64>(const AttentionParams&);
extern template std::string forward<DType::kFloat16, 128>(const AttentionParams&);
extern template std::string forward<DType::kFloat16, 256>(const AttentionParams&);
extern template std::string forward<DType::kBFloat16, 32>(const AttentionParams&);
extern template std::string forward<DType::kBFloat16, 64>(const AttentionParams&);
extern template std::string forward<DType::kBFloat16, 128>(const AttentionParams&);
extern template std::string forward<DType::kBFloat16, 256>(const AttentionParams&);
extern template std::string backward<DType::kFloat16, 32>(const AttentionParams&);
extern template std::string backward<DType::kFloat16, 64>(const AttentionParams&);
extern template std::string backward<DType::kFloat16, 128>(const AttentionParams&);
extern template std::string backward<DType::kBFloat16, 32>(const AttentionParams&);
extern template std::string backward<DType::kBFloat16, 64>(const AttentionParams&);
extern template std::string backward<DType::kBFloat16, 128>(const AttentionParams&);

}  // namespace nattn::cuda::sm80
