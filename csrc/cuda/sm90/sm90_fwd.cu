// Hopper forward entry point (sm90_api.h): checks, tile choice, tensor maps, dispatch to the
// (dtype, head dim) instantiations of sm90_fwd_{f16,bf16}_hdim{64,128}.cu.
#include "cuda/sm90/sm90_fwd_launch.cuh"  // first: cudaTypedefs.h, then the sm90 seam

#include <cuda.h>
#include <cuda_runtime.h>

#include <cmath>
#include <mutex>
#include <string>
#include <vector>

#include "cuda/sm90/sm90_api.h"
#include "cuda/sm90/sm90_plan.h"

namespace nattn::cuda::sm90 {

extern template std::string launch_forward<DType::kFloat16, 64>(const ForwardParams&, int64_t,
                                                                 void*);
extern template std::string launch_forward<DType::kFloat16, 128>(const ForwardParams&, int64_t,
                                                                  void*);
extern template std::string launch_forward<DType::kBFloat16, 64>(const ForwardParams&, int64_t,
                                                                  void*);
extern template std::string launch_forward<DType::kBFloat16, 128>(const ForwardParams&, int64_t,
                                                                   void*);

std::string tensor_map_encoder(PFN_cuTensorMapEncodeTiled_v12000* fn) {
  static std::once_flag once;
  static PFN_cuTensorMapEncodeTiled_v12000 encoder = nullptr;
  static std::string error;
  std::call_once(once, [] {
    void* ptr = nullptr;
    cudaDriverEntryPointQueryResult found = cudaDriverEntryPointSymbolNotFound;
    // Version 12000: the ABI of cuTensorMapEncodeTiled since CUDA 12.0 (the PFN type above).
    const cudaError_t status = cudaGetDriverEntryPointByVersion(
        "cuTensorMapEncodeTiled", &ptr, 12000, cudaEnableDefault, &found);
    if (status != cudaSuccess) {
      error = std::string("cudaGetDriverEntryPointByVersion: ") + cudaGetErrorString(status);
      cudaGetLastError();
    } else if (found != cudaDriverEntryPointSuccess || ptr == nullptr) {
      error = "the CUDA driver does not provide cuTensorMapEncodeTiled";
    } else {
      encoder = reinterpret_cast<PFN_cuTensorMapEncodeTiled_v12000>(ptr);
    }
  });
  *fn = encoder;
  return error;
}

std::string encode_maps(const TmaPlan& plan, DType dtype, const void* data, CUtensorMap* maps) {
  PFN_cuTensorMapEncodeTiled_v12000 encode = nullptr;
  const std::string error = tensor_map_encoder(&encode);
  if (!error.empty()) return error;
  const CUtensorMapDataType type = dtype == DType::kFloat16 ? CU_TENSOR_MAP_DATA_TYPE_FLOAT16
                                                            : CU_TENSOR_MAP_DATA_TYPE_BFLOAT16;
  for (int v = 0; v < kMaxVariants; ++v) {
    const TmaView& view = plan.view[v];
    cuuint64_t dim[5];
    cuuint64_t stride[4];
    cuuint32_t box[5];
    const cuuint32_t element_stride[5] = {1, 1, 1, 1, 1};
    for (int i = 0; i < 5; ++i) {
      dim[i] = view.dim[i];
      box[i] = view.box[i];
    }
    for (int i = 0; i < 4; ++i) stride[i] = view.stride_bytes[i];
    // The swizzle of the box's row (128 bytes: K-major SW128 atoms; 64 bytes for the head dim 32
    // backward: SW64 atoms), the layout wgmma reads; 256-byte L2 promotion; out-of-bounds
    // elements (rows past a group's end) read 0.
    const CUtensorMapSwizzle swizzle =
        view.box[0] * 2 == 64 ? CU_TENSOR_MAP_SWIZZLE_64B : CU_TENSOR_MAP_SWIZZLE_128B;
    const CUresult r = encode(&maps[v], type, 5, const_cast<void*>(data), dim, stride, box,
                              element_stride, CU_TENSOR_MAP_INTERLEAVE_NONE, swizzle,
                              CU_TENSOR_MAP_L2_PROMOTION_L2_256B,
                              CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE);
    if (r != CUDA_SUCCESS) {
      std::string detail;
#ifdef NATTN_EMU
      detail = ": " + ::nattn::emu::sm90::last_encode_error();
#endif
      return "cuTensorMapEncodeTiled rejected the " + plan.name + " map (CUresult " +
             std::to_string(static_cast<int>(r)) + detail + ")";
    }
  }
  return {};
}

namespace {

// The plan of `p` and, when the host-side checks pass, its encoded tensor maps in `params`. A
// map the driver refuses is one more reason to decline (the portable kernels then run).
std::vector<std::string> prepare(const AttentionParams& p, int capability, int64_t max_smem,
                                 ForwardPlan* plan, ForwardParams* params) {
  *plan = plan_forward(p, capability, max_smem);
  if (!plan->reasons.empty() || p.q.data == nullptr) return plan->reasons;
  std::string error = encode_maps(plan->q, p.dtype, p.q.data, params->q_map);
  if (error.empty()) error = encode_maps(plan->k, p.dtype, p.k.data, params->k_map);
  if (error.empty()) error = encode_maps(plan->v, p.dtype, p.v.data, params->v_map);
  if (!error.empty()) plan->reasons.push_back(error);
  return plan->reasons;
}

}  // namespace

std::vector<std::string> forward_support(const AttentionParams& p, int capability,
                                         int64_t max_smem) {
  ForwardPlan plan;
  ForwardParams params = {};
  return prepare(p, capability, max_smem, &plan, &params);
}

std::string forward(const AttentionParams& p, int capability, int64_t max_smem,
                    std::vector<std::string>* declined) {
  ForwardPlan plan;
  ForwardParams params = {};
  *declined = prepare(p, capability, max_smem, &plan, &params);
  if (!declined->empty()) return {};
  if (p.tokens() == 0 || p.batch == 0 || p.heads == 0) return {};

  for (int a = 0; a < kMaxRank; ++a) params.axes[a] = p.axes[a];
  params.q = make_tiling(p.axes, plan.tiles.q);
  params.kv_box = plan.tiles.kv;
  params.q_coef = plan.q.coef;
  params.kv_coef = plan.k.coef;
  params.heads = p.heads;
  params.heads_per_kv = p.heads_per_kv();
  params.out = p.out.data;
  for (int i = 0; i < 6; ++i) params.out_stride[i] = p.out.stride[i];
  params.lse = static_cast<float*>(p.lse.data);
  for (int i = 0; i < 5; ++i) params.lse_stride[i] = p.lse.stride[i];
  params.scale_log2 = static_cast<float>(p.scale * M_LOG2E);

  const bool f16 = p.dtype == DType::kFloat16;
  if (p.head_dim == 64) {
    return f16 ? launch_forward<DType::kFloat16, 64>(params, p.batch, p.stream)
               : launch_forward<DType::kBFloat16, 64>(params, p.batch, p.stream);
  }
  return f16 ? launch_forward<DType::kFloat16, 128>(params, p.batch, p.stream)
             : launch_forward<DType::kBFloat16, 128>(params, p.batch, p.stream);
}

}  // namespace nattn::cuda::sm90
