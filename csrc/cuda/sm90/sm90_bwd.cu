// Hopper backward entry point (sm90_api.h): one plan per call (plan_backward: reasons, tile
// choice, TMA views), tensor maps, then the delta pass the caller provides, then dispatch to the
// (dtype, head dim) instantiations of sm90_bwd_{f16,bf16}_hdim{32,64,128}.cu.
#include "cuda/sm90/sm90_bwd_launch.cuh"  // first: cudaTypedefs.h, then the sm90 seam

#include <cuda.h>
#include <cuda_runtime.h>

#include <cmath>
#include <functional>
#include <string>
#include <vector>

#include "cuda/sm90/sm90_api.h"
#include "cuda/sm90/sm90_plan.h"

namespace nattn::cuda::sm90 {

extern template std::string launch_backward<DType::kFloat16, 32>(const BackwardParams&, int64_t,
                                                                  void*);
extern template std::string launch_backward<DType::kBFloat16, 32>(const BackwardParams&, int64_t,
                                                                   void*);
extern template std::string launch_backward<DType::kFloat16, 64>(const BackwardParams&, int64_t,
                                                                  void*);
extern template std::string launch_backward<DType::kFloat16, 128>(const BackwardParams&, int64_t,
                                                                   void*);
extern template std::string launch_backward<DType::kBFloat16, 64>(const BackwardParams&, int64_t,
                                                                   void*);
extern template std::string launch_backward<DType::kBFloat16, 128>(const BackwardParams&,
                                                                    int64_t, void*);

namespace {

// The plan of `p` and, when the host-side checks pass, its encoded tensor maps in `params`. A
// map the driver refuses is one more reason to decline (the portable kernels then run).
std::vector<std::string> prepare(const AttentionParams& p, int capability, int64_t max_smem,
                                 BackwardPlan* plan, BackwardParams* params) {
  *plan = plan_backward(p, capability, max_smem);
  if (!plan->reasons.empty() || p.q.data == nullptr) return plan->reasons;
  std::string error = encode_maps(plan->q, p.dtype, p.q.data, params->q_map);
  if (error.empty()) error = encode_maps(plan->k, p.dtype, p.k.data, params->k_map);
  if (error.empty()) error = encode_maps(plan->v, p.dtype, p.v.data, params->v_map);
  if (error.empty()) error = encode_maps(plan->d_out, p.dtype, p.d_out.data, params->do_map);
  if (p.num_additional > 0) {
    // One map each (the views' variants are all equal): encode into a scratch array.
    CUtensorMap scratch[kMaxVariants];
    if (error.empty()) error = encode_maps(plan->add_k, p.dtype, p.add_k.data, scratch);
    params->add_k_map = scratch[0];
    if (error.empty()) error = encode_maps(plan->add_v, p.dtype, p.add_v.data, scratch);
    params->add_v_map = scratch[0];
  }
  if (!error.empty()) plan->reasons.push_back(error);
  return plan->reasons;
}

}  // namespace

std::vector<std::string> backward_support(const AttentionParams& p, int capability,
                                          int64_t max_smem) {
  BackwardPlan plan;
  BackwardParams params = {};
  return prepare(p, capability, max_smem, &plan, &params);
}

std::string backward(const AttentionParams& p, int capability, int64_t max_smem,
                     const std::function<std::string()>& delta,
                     std::vector<std::string>* declined) {
  BackwardPlan plan;
  BackwardParams params = {};
  *declined = prepare(p, capability, max_smem, &plan, &params);
  if (!declined->empty()) return {};
  if (p.tokens() == 0 || p.batch == 0 || p.heads == 0) return {};
  std::string error = delta();
  if (!error.empty()) return error;

  for (int a = 0; a < kMaxRank; ++a) params.axes[a] = p.axes[a];
  params.q = make_tiling(p.axes, plan.tiles.q);
  params.kv = make_tiling(p.axes, plan.tiles.kv);
  params.q_coef = plan.q.coef;
  params.k_coef = plan.k.coef;
  params.v_coef = plan.v.coef;
  params.do_coef = plan.d_out.coef;
  params.add_k_coef = plan.add_k.coef;
  params.add_v_coef = plan.add_v.coef;
  params.num_additional = p.num_additional;
  params.add_tiles = static_cast<int32_t>((p.num_additional + kKvRows - 1) / kKvRows);
  params.d_add_k = p.d_add_k.data;
  params.d_add_v = p.d_add_v.data;
  for (int i = 0; i < 4; ++i) {
    params.d_add_k_stride[i] = p.d_add_k.stride[i];
    params.d_add_v_stride[i] = p.d_add_v.stride[i];
  }
  params.heads = p.heads;
  params.kv_heads = p.kv_heads;
  params.heads_per_kv = p.heads_per_kv();
  params.lse = static_cast<const float*>(p.lse.data);
  params.delta = static_cast<const float*>(p.delta.data);
  for (int i = 0; i < 5; ++i) {
    params.lse_stride[i] = p.lse.stride[i];
    params.delta_stride[i] = p.delta.stride[i];
  }
  params.dq = p.dq.data;
  params.dk = p.dk.data;
  params.dv = p.dv.data;
  for (int i = 0; i < 6; ++i) {
    params.dq_stride[i] = p.dq.stride[i];
    params.dk_stride[i] = p.dk.stride[i];
    params.dv_stride[i] = p.dv.stride[i];
  }
  params.scale = static_cast<float>(p.scale);
  params.scale_log2 = static_cast<float>(p.scale * M_LOG2E);

  const bool f16 = p.dtype == DType::kFloat16;
  if (p.head_dim == 32) {
    return f16 ? launch_backward<DType::kFloat16, 32>(params, p.batch, p.stream)
               : launch_backward<DType::kBFloat16, 32>(params, p.batch, p.stream);
  }
  if (p.head_dim == 64) {
    return f16 ? launch_backward<DType::kFloat16, 64>(params, p.batch, p.stream)
               : launch_backward<DType::kBFloat16, 64>(params, p.batch, p.stream);
  }
  return f16 ? launch_backward<DType::kFloat16, 128>(params, p.batch, p.stream)
             : launch_backward<DType::kBFloat16, 128>(params, p.batch, p.stream);
}

}  // namespace nattn::cuda::sm90
