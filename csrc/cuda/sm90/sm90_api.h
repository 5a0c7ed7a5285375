// Host entry points of the Hopper (sm_90a) kernels: plain C++ signatures, so the dispatcher and
// the bindings include this without CUDA or CuTe headers. Compiled into the nattn_cuda_sm90
// library only when CMake targets 90a (then NATTN_WITH_SM90 is defined for the module).
#pragma once

#include <cstdint>
#include <functional>
#include <string>
#include <vector>

#include "nattn/params.h"

namespace nattn::cuda::sm90 {

// Why the Hopper forward cannot serve `p` (empty when it can): dtype, head dims, additional
// tokens, layout rules of TMA (K and V addressed by one coordinate), grid limits, the driver's
// refusal of a tensor map, and, when known, the device (capability: major * 10 + minor, -1 =
// unchecked; max_smem: opt-in shared memory per CTA in bytes, 0 = unchecked). Host-only, apart
// from the driver's tensor-map encoder (no device memory is touched).
std::vector<std::string> forward_support(const AttentionParams& p, int capability,
                                         int64_t max_smem);

// Forward on the current device and p.stream: writes p.out ([B, *spatial, H, D], the head dim
// contiguous) and p.lse (fp32). No workspace. The plan (tile search, TMA views, tensor maps) is
// made once per call. If the path declines the problem, *declined receives the reasons, nothing
// is launched and "" is returned: the caller runs the portable kernels. Otherwise returns "" on
// success or the CUDA error. Must only be called on a compute capability 9.0 device.
std::string forward(const AttentionParams& p, int capability, int64_t max_smem,
                    std::vector<std::string>* declined);

// Why the Hopper backward cannot serve `p` (empty when it can): as forward_support, plus
// additional tokens and rpb (the SM80 path serves both) and the layout of dO, dq, dk, dv.
std::vector<std::string> backward_support(const AttentionParams& p, int capability,
                                          int64_t max_smem);

// Backward on the current device and p.stream: plans once (tile search, TMA views, tensor maps);
// if the path declines `p`, *declined receives the reasons, nothing runs (not even `delta`) and
// "" is returned: the caller runs the portable backward. Otherwise runs `delta` (the caller's
// preprocessing pass that fills p.delta = rowsum(dO * O) - d_lse, fp32), then the dQ and dK/dV
// kernels, which write p.dq, p.dk, p.dv without atomics (bit-identical run to run). Returns ""
// or the first error. Must only be called on a compute capability 9.0 device.
std::string backward(const AttentionParams& p, int capability, int64_t max_smem,
                     const std::function<std::string()>& delta,
                     std::vector<std::string>* declined);

}  // namespace nattn::cuda::sm90
