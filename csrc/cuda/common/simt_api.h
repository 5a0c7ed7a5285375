// Host entry points of the SIMT fallback kernels (simt_kernels.cu). Plain C++.
#pragma once

#include <cstdint>
#include <string>

#include "nattn/params.h"

namespace nattn::cuda::simt {

// Forward: writes p.out and p.lse. Any dtype, head dims, strides. Returns "" or the CUDA error.
std::string forward(const AttentionParams& p);

// delta = rowsum(d_out * out) - d_lse (d_lse optional) into p.delta (fp32; fp64 with the fp64
// lse in p.lse_fp64 for float64 problems). Both paths use it.
std::string delta(const AttentionParams& p);

// Backward after delta: dq, then dk/dv and the additional tokens' gradients. No atomics.
std::string backward(const AttentionParams& p);

// d_rpb (p.has_rpb() problems, after delta; both paths use it): the sum of dS over batch and
// queries at each relative offset, a warp per (head, bias entry), written whole. No atomics.
std::string d_rpb(const AttentionParams& p);

// Dynamic shared memory of the forward (backward = false) or the larger backward kernel.
int64_t shared_bytes(const AttentionParams& p, bool backward);

// "" when the current device can run this build's kernels, else the CUDA error (e.g. no kernel
// image for its architecture).
std::string kernel_image_error();

}  // namespace nattn::cuda::simt
