// The CUDA dispatcher: from runtime arguments to the compiled kernels. The tensor-core table is
// (fp16, bf16) x head_dim {32, 64, 128, 256} forward and {32, 64, 128} backward, with
// head_dim == value_dim (sm80/sm80_api.h); everything else, and whatever the vectorized copies
// cannot read, goes to the SIMT fallback (common/simt_kernels.cu), with the reasons recorded.
#include <cuda_runtime.h>

#include <cstdint>
#include <string>
#include <type_traits>
#include <vector>

#include "cuda/common/simt_api.h"
#include "cuda/cuda_api.h"
#include "cuda/sm80/sm80_api.h"
#include "cuda/sm80/sm80_config.h"
#include "cuda/sm80/sm80_tiles.h"
#ifdef NATTN_WITH_SM90
#include "cuda/sm90/sm90_api.h"
#endif

namespace nattn::cuda {
namespace {

const char* dtype_name(DType d) {
  switch (d) {
    case DType::kFloat16:
      return "float16";
    case DType::kBFloat16:
      return "bfloat16";
    case DType::kFloat32:
      return "float32";
    case DType::kFloat64:
      return "float64";
  }
  return "unknown";
}

// Calls fn(tag) with a std::integral_constant for the tensor-core dtypes.
template <class Fn>
std::string with_tensor_core_dtype(DType dtype, Fn&& fn) {
  if (dtype == DType::kFloat16) return fn(std::integral_constant<DType, DType::kFloat16>{});
  if (dtype == DType::kBFloat16) return fn(std::integral_constant<DType, DType::kBFloat16>{});
  return std::string("no tensor-core kernel for dtype ") + dtype_name(dtype);
}

// Calls fn(std::integral_constant<int, d>) for the d among kDims equal to head_dim.
template <int... kDims, class Fn>
std::string with_head_dim(int64_t head_dim, Fn&& fn) {
  std::string out = "no tensor-core kernel for head_dim " + std::to_string(head_dim);
  (void)((head_dim == kDims ? (out = fn(std::integral_constant<int, kDims>{}), true) : false) ||
         ...);
  return out;
}

// The vectorized gather reads rows as 16-byte chunks: the last dim must be contiguous, and the
// base pointer and every stride that moves between rows must be multiples of 16 bytes.
template <int N>
void check_rows(std::vector<std::string>& reasons, const char* name, const TensorRef<N>& t,
                const int64_t (&extent)[N - 1], int64_t elem_bytes) {
  if (t.stride[N - 1] != 1) {
    reasons.push_back(std::string(name) + ": the last dim has stride " +
                      std::to_string(t.stride[N - 1]) +
                      ", the tensor-core path needs it contiguous (stride 1)");
    return;
  }
  bool aligned = reinterpret_cast<uintptr_t>(t.data) % 16 == 0;
  for (int i = 0; i < N - 1; ++i) {
    if (extent[i] > 1 && (t.stride[i] * elem_bytes) % 16 != 0) aligned = false;
  }
  if (!aligned) {
    reasons.push_back(std::string(name) +
                      ": the data pointer or a token/head stride is not a multiple of 16 "
                      "bytes, which the tensor-core path's 16-byte copies need");
  }
}

std::vector<std::string> tensor_core_reasons(const AttentionParams& p, bool backward,
                                             const DeviceFacts& device, int64_t smem_bytes) {
  std::vector<std::string> r;
  if (p.dtype != DType::kFloat16 && p.dtype != DType::kBFloat16) {
    r.push_back(std::string("dtype ") + dtype_name(p.dtype) +
                ": tensor-core kernels take float16 and bfloat16");
  }
  if (p.value_dim != p.head_dim) {
    r.push_back("value_dim " + std::to_string(p.value_dim) + " != head_dim " +
                std::to_string(p.head_dim) + ": tensor-core kernels need them equal");
  }
  if (backward ? !sm80::backward_head_dim_supported(p.head_dim)
               : !sm80::forward_head_dim_supported(p.head_dim)) {
    r.push_back("head_dim " + std::to_string(p.head_dim) + ": tensor-core " +
                (backward ? "backward kernels exist for 32, 64, 128"
                          : "forward kernels exist for 32, 64, 128, 256"));
  }
  if (device.capability >= 0 && device.capability < 80) {
    r.push_back("compute capability " + std::to_string(device.capability / 10) + "." +
                std::to_string(device.capability % 10) + " < 8.0 (mma.sync bf16, cp.async)");
  }
  if (device.max_smem_optin > 0 && smem_bytes > device.max_smem_optin) {
    r.push_back("needs " + std::to_string(smem_bytes) + " bytes of shared memory per CTA, the "
                "device allows " + std::to_string(device.max_smem_optin));
  }
  for (int a = 0; a < kMaxRank; ++a) {
    if (p.axes[a].length >= (int64_t{1} << 31)) {
      r.push_back("an axis of 2^31 or more tokens: tile coordinates are 32-bit");
    }
  }
  if (p.num_additional >= (int64_t{1} << 31)) {
    r.push_back("2^31 or more additional tokens: tile coordinates are 32-bit");
  }

  const int64_t elem = 2;
  const int64_t L0 = p.axes[0].length, L1 = p.axes[1].length, L2 = p.axes[2].length;
  const int64_t q_ext[5] = {p.batch, L0, L1, L2, p.heads};
  const int64_t kv_ext[5] = {p.batch, L0, L1, L2, p.kv_heads};
  const int64_t add_ext[3] = {p.batch, p.num_additional, p.kv_heads};
  check_rows(r, "query", p.q, q_ext, elem);
  check_rows(r, "key", p.k, kv_ext, elem);
  check_rows(r, "value", p.v, kv_ext, elem);
  if (p.num_additional > 0) {
    check_rows(r, "additional_keys", p.add_k, add_ext, elem);
    check_rows(r, "additional_values", p.add_v, add_ext, elem);
  }
  if (backward) check_rows(r, "grad_out", p.d_out, q_ext, elem);
  return r;
}

}  // namespace

DeviceFacts current_device(std::string* error) {
  DeviceFacts f;
  int device = 0;
  cudaError_t status = cudaGetDevice(&device);
  int major = 0, minor = 0, smem = 0;
  if (status == cudaSuccess) {
    status = cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device);
  }
  if (status == cudaSuccess) {
    status = cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, device);
  }
  if (status == cudaSuccess) {
    status = cudaDeviceGetAttribute(&smem, cudaDevAttrMaxSharedMemoryPerBlockOptin, device);
  }
  if (status != cudaSuccess) {
    *error = cudaGetErrorString(status);
    cudaGetLastError();
    return f;
  }
  f.capability = major * 10 + minor;
  f.max_smem_optin = smem;
  return f;
}

std::vector<std::string> device_reasons(int device) {
  std::vector<std::string> r;
  std::string error;
  const int n = device_count(&error);
  if (n == 0) {
    r.push_back("no CUDA device" + (error.empty() ? std::string() : " (" + error + ")"));
    return r;
  }
  const int cc = device_capability(device, &error);
  if (cc < 0) {
    r.push_back("cannot query CUDA device " + std::to_string(device) + " (" + error + ")");
    return r;
  }
  if (cc < 80) {
    r.push_back("compute capability " + std::to_string(cc / 10) + "." + std::to_string(cc % 10) +
                " < 8.0: nattn's CUDA kernels are built for sm_80 and sm_90a");
    return r;
  }
  int previous = 0;
  cudaGetDevice(&previous);
  cudaSetDevice(device);
  error = simt::kernel_image_error();
  cudaSetDevice(previous);
  if (!error.empty()) {
    r.push_back("no kernel image for compute capability " + std::to_string(cc / 10) + "." +
                std::to_string(cc % 10) + " (built for sm_80 and sm_90a): " + error);
  }
  return r;
}

Plan plan(const AttentionParams& p, bool backward, const DeviceFacts& device) {
  Plan out;
  const int block_m = backward ? sm80::kBackwardBlock : sm80::kForwardBlockM;
  const int block_n =
      backward ? sm80::kBackwardBlock : sm80::forward_block_n(p.head_dim);
  const int64_t tc_smem = backward ? sm80::backward_smem_bytes(p.head_dim)
                                   : sm80::forward_smem_bytes(p.head_dim);
  out.tensor_core_reasons = tensor_core_reasons(p, backward, device, tc_smem);
  out.tensor_core = out.tensor_core_reasons.empty();
  if (!out.tensor_core) {
    out.shared_bytes = simt::shared_bytes(p, backward);
    // The SIMT kernels keep head_dim + value_dim accumulators per warp in shared memory.
    if (device.max_smem_optin > 0 && out.shared_bytes > device.max_smem_optin) {
      out.unsupported = "head_dim " + std::to_string(p.head_dim) + " + value_dim " +
                        std::to_string(p.value_dim) + " is too large for the SIMT kernels: " +
                        (backward ? "the backward" : "the forward") + " needs " +
                        std::to_string(out.shared_bytes) + " bytes of shared memory per CTA, " +
                        "the device allows " + std::to_string(device.max_smem_optin);
    }
    return out;
  }
  const sm80::BoxPair boxes =
      sm80::choose_boxes(p.axes, sm80::log2_int(block_m), sm80::log2_int(block_n));
  const BoxTiling q = make_tiling(p.axes, boxes.q);
  const BoxTiling kv = make_tiling(p.axes, boxes.kv);
  out.block_m = block_m;
  out.block_n = block_n;
  for (int a = 0; a < kMaxRank; ++a) {
    out.q_box[a] = boxes.q.extent(a);
    out.kv_box[a] = boxes.kv.extent(a);
  }
  out.q_tiles = q.count();
  out.kv_tiles = kv.count();
  out.shared_bytes = tc_smem;
  return out;
}

std::string forward(const AttentionParams& p) {
  std::string error;
  const DeviceFacts device = current_device(&error);
  if (device.capability < 0) return error;
#if defined(NATTN_EMU) && defined(NATTN_WITH_SM90)
  // Under the emulator a compute capability 9.0 device is served as an H100 would be once the
  // Hopper path is validated: the Hopper forward where it applies (real GPUs keep the opt-in of
  // the "hopper" backend until then), the portable kernels where it declines.
  if (device.capability == 90) {
    std::vector<std::string> declined;
    error = sm90::forward(p, device.capability, device.max_smem_optin, &declined);
    if (declined.empty()) return error;
  }
#endif
  const Plan forward_plan = plan(p, false, device);
  if (!forward_plan.unsupported.empty()) return forward_plan.unsupported;
  if (!forward_plan.tensor_core) return simt::forward(p);
  return with_tensor_core_dtype(p.dtype, [&](auto dtype) {
    return with_head_dim<32, 64, 128, 256>(p.head_dim, [&](auto head_dim) {
      return sm80::forward<decltype(dtype)::value, decltype(head_dim)::value>(p);
    });
  });
}

std::string backward(const AttentionParams& p, bool deterministic) {
  (void)deterministic;  // both paths are atomic-free (see cuda_api.h)
  std::string error;
  const DeviceFacts device = current_device(&error);
  if (device.capability < 0) return error;
#if defined(NATTN_EMU) && defined(NATTN_WITH_SM90)
  // Under the emulator a compute capability 9.0 device is served as an H100 would be once the
  // Hopper path is validated (as the forward above): the Hopper backward where it applies, the
  // portable kernels where it declines (it declines before running the delta pass).
  if (device.capability == 90) {
    std::vector<std::string> declined;
    error = sm90::backward(p, device.capability, device.max_smem_optin,
                           [&] { return simt::delta(p); }, &declined);
    if (declined.empty()) return error;
  }
#endif
  const Plan backward_plan = plan(p, true, device);
  if (!backward_plan.unsupported.empty()) return backward_plan.unsupported;
  error = simt::delta(p);
  if (!error.empty()) return error;
  if (!backward_plan.tensor_core) {
    error = simt::backward(p);
  } else {
    error = with_tensor_core_dtype(p.dtype, [&](auto dtype) {
      return with_head_dim<32, 64, 128>(p.head_dim, [&](auto head_dim) {
        return sm80::backward<decltype(dtype)::value, decltype(head_dim)::value>(p);
      });
    });
  }
  if (!error.empty() || !p.has_rpb()) return error;
  return simt::d_rpb(p);
}

namespace {
#ifdef NATTN_WITH_SM90
// The current device's facts, and why the Hopper kernels cannot run on it (empty: they can).
std::string hopper_device(DeviceFacts* device) {
  std::string error;
  *device = current_device(&error);
  if (device->capability < 0) return "no CUDA device: " + error;
  if (device->capability != 90) {
    return "compute capability " + std::to_string(device->capability / 10) + "." +
           std::to_string(device->capability % 10) + " is not 9.0 (wgmma/TMA are sm_90a only)";
  }
  return {};
}
#else
constexpr const char* kNoSm90 = "nattn._C was built without sm_90a (NATTN_CUDA_ARCH has no 90a)";
#endif
}  // namespace

std::vector<std::string> hopper_forward_reasons(const AttentionParams& p) {
#ifdef NATTN_WITH_SM90
  DeviceFacts device;
  const std::string why = hopper_device(&device);
  if (!why.empty()) return {why};
  return sm90::forward_support(p, device.capability, device.max_smem_optin);
#else
  (void)p;
  return {kNoSm90};
#endif
}

std::string hopper_forward(const AttentionParams& p, std::vector<std::string>* declined) {
#ifdef NATTN_WITH_SM90
  DeviceFacts device;
  const std::string why = hopper_device(&device);
  if (!why.empty()) {
    *declined = {why};
    return {};
  }
  return sm90::forward(p, device.capability, device.max_smem_optin, declined);
#else
  (void)p;
  *declined = {kNoSm90};
  return {};
#endif
}

std::vector<std::string> hopper_backward_reasons(const AttentionParams& p) {
#ifdef NATTN_WITH_SM90
  DeviceFacts device;
  const std::string why = hopper_device(&device);
  if (!why.empty()) return {why};
  return sm90::backward_support(p, device.capability, device.max_smem_optin);
#else
  (void)p;
  return {kNoSm90};
#endif
}

std::string hopper_backward(const AttentionParams& p, std::vector<std::string>* declined) {
#ifdef NATTN_WITH_SM90
  DeviceFacts device;
  const std::string why = hopper_device(&device);
  if (!why.empty()) {
    *declined = {why};
    return {};
  }
  return sm90::backward(p, device.capability, device.max_smem_optin,
                        [&] { return simt::delta(p); }, declined);
#else
  (void)p;
  *declined = {kNoSm90};
  return {};
#endif
}

}  // namespace nattn::cuda
