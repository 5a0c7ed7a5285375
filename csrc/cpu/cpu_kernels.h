// Fused CPU neighborhood-attention kernels (csrc/cpu/). See include/nattn/params.h for the layout.
#pragma once

#include "nattn/params.h"

namespace nattn::cpu {

// out, lse <- attention(q, k, v [, add_k, add_v]). Reads q, k, v, add_k, add_v; writes out, lse.
void forward(const AttentionParams& p);

// dq, dk, dv [, d_add_k, d_add_v] from q, k, v, out, d_out, lse; delta is a workspace
// ([batch, x0, x1, x2, heads], fp32) that the kernel fills with rowsum(d_out * out) first.
// Deterministic: every gradient element is written by exactly one thread, no atomics.
void backward(const AttentionParams& p);

// Threads the kernels use when AttentionParams::num_threads is 0.
int default_num_threads();

}  // namespace nattn::cpu
