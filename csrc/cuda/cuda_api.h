// Host-callable entry points of the CUDA part of nattn._C. Plain C++ signatures: bindings.cpp is
// compiled by the host compiler and never sees CUDA headers.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "nattn/params.h"
#include "nattn/window.h"

namespace nattn::cuda {

// Number of visible CUDA devices; 0 (and a reason in *error) when there is no driver or device.
int device_count(std::string* error);

// Compute capability (major * 10 + minor) of a device, or -1 with a reason in *error.
int device_capability(int device, std::string* error);

// Evaluates key_window and query_window for every index of one axis ON THE DEVICE, so that
// tests can compare the device build of include/nattn/window.h with the host build.
// Output: for each index i, (first, count) of its key window then of its query window.
// Returns an empty string on success, else the CUDA error.
std::string axis_windows_on_device(const AxisParams& axis, std::vector<int64_t>* out);

// What the dispatcher needs to know about a device.
struct DeviceFacts {
  int capability = -1;          // major * 10 + minor
  int64_t max_smem_optin = 0;   // shared memory one CTA may opt into, bytes
};

// Facts about the current device (cudaGetDevice), or capability -1 with a reason in *error.
DeviceFacts current_device(std::string* error);

// Why the CUDA kernels cannot run at all on `device`: no driver or device, compute capability
// below 8.0, or no compiled kernel image for its architecture (the build targets sm_80 and
// sm_90a). Empty when they can.
std::vector<std::string> device_reasons(int device);

// How a call would be served: by the SM80 tensor-core kernels, or by the SIMT fallback with the
// reasons the tensor-core path declined it. Host-only (no device access): tests call it anywhere.
struct Plan {
  bool tensor_core = false;
  std::vector<std::string> tensor_core_reasons;  // empty iff tensor_core
  int block_m = 0;                 // rows of the register tile (tensor-core path)
  int block_n = 0;                 // rows of the streamed tile
  int64_t q_box[kMaxRank] = {0, 0, 0};   // Q tile extents per axis (rank-3 order)
  int64_t kv_box[kMaxRank] = {0, 0, 0};  // KV tile extents per axis
  int64_t q_tiles = 0;             // Q tiles per (batch, head)
  int64_t kv_tiles = 0;            // KV tiles per (batch, kv head)
  int64_t shared_bytes = 0;        // dynamic shared memory of the largest kernel of the call
  std::string unsupported;         // non-empty: neither path can run the call, and why
};
Plan plan(const AttentionParams& p, bool backward, const DeviceFacts& device);

// Forward on the current device and p.stream: out and lse. Returns "" or the error.
std::string forward(const AttentionParams& p);

// Backward on the current device and p.stream: delta (p.delta, an fp32 [B, *spatial, H]
// workspace), then dq, dk, dv (and d_add_k, d_add_v). Both paths are atomic-free, so the result
// is bit-identical run to run whatever `deterministic` says; the flag is accepted so that callers
// can ask for determinism explicitly should a faster atomic variant be added. "" or the error.
std::string backward(const AttentionParams& p, bool deterministic);

// Hopper forward (csrc/cuda/sm90, wgmma + TMA): why it cannot serve `p` on the current device
// (always non-empty when the module was built without sm_90a), and the call itself, which plans
// once and either runs (returning "" or the CUDA error) or declines (the reasons in *declined,
// nothing launched: the caller runs forward() instead).
std::vector<std::string> hopper_forward_reasons(const AttentionParams& p);
std::string hopper_forward(const AttentionParams& p, std::vector<std::string>* declined);

// Hopper backward (csrc/cuda/sm90): the same pair for the backward. The call plans once and
// either declines (reasons in *declined, nothing run, not even the delta pass: the caller runs
// backward() instead) or runs the delta pass and the Hopper dQ and dK/dV kernels (atomic-free),
// returning "" or the error.
std::vector<std::string> hopper_backward_reasons(const AttentionParams& p);
std::string hopper_backward(const AttentionParams& p, std::vector<std::string>* declined);

}  // namespace nattn::cuda
