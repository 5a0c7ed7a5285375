// The flat, framework-free description of one neighborhood-attention call: the whole interface
// between the host side (bindings) and every kernel. Nothing torch-specific crosses it.
//
// Tensors are heads-last and always described as rank 3 (see kMaxRank): index order
//   q, out, d_out, dq : [batch, x0, x1, x2, heads,    head_dim]
//   k, dk             : [batch, x0, x1, x2, kv_heads, head_dim]
//   v, dv             : [batch, x0, x1, x2, kv_heads, value_dim]
//   lse, d_lse, delta : [batch, x0, x1, x2, heads]                 (fp32; delta fp64 below)
//   lse_fp64          : [batch, x0, x1, x2, heads]                 (fp64, CUDA backward only)
//   add_k, d_add_k    : [batch, num_additional, kv_heads, head_dim]
//   add_v, d_add_v    : [batch, num_additional, kv_heads, value_dim]
//   rpb, d_rpb        : [heads, 2*K0 - 1, 2*K1 - 1, 2*K2 - 1]     (dtype of q; padding axes
//                       have K = 1, so one entry, stride 0 from Python)
// Strides are in elements and may be anything (heads-first views, slices); int64 throughout so
// tensors over 2^31 elements index correctly.
#pragma once

#include <cstdint>

#include "nattn/config.h"
#include "nattn/window.h"

namespace nattn {

enum class DType : int32_t { kFloat16 = 0, kBFloat16 = 1, kFloat32 = 2, kFloat64 = 3 };

// One tensor: base pointer plus element strides for the rank-3 index order above.
template <int N>
struct TensorRef {
  void* data = nullptr;
  int64_t stride[N] = {};
};

struct AttentionParams {
  DType dtype = DType::kFloat32;
  int32_t rank = 1;  // the user's rank (1..3); axes[0 .. kMaxRank - rank) are padding
  int64_t batch = 1;
  int64_t heads = 1;
  int64_t kv_heads = 1;
  int64_t head_dim = 1;
  int64_t value_dim = 1;
  AxisParams axes[kMaxRank];
  int64_t num_additional = 0;  // additional (global) key/value tokens
  double scale = 1.0;          // multiplies q.k before the softmax

  TensorRef<6> q, k, v, out, d_out, dq, dk, dv;
  TensorRef<5> lse, delta;
  // Optional gradient of the lse output (null when lse is not differentiated): the backward's
  // row term becomes delta = rowsum(d_out * out) - d_lse, since d lse_i / d s_ij = P_ij.
  TensorRef<5> d_lse;
  // CUDA backward of float64 problems: the delta workspace is fp64, and the delta pass recomputes
  // the lse in fp64 into lse_fp64 (the fp32 lse output would limit fp64 gradients to fp32
  // accuracy, about 1e-7). Unused otherwise.
  TensorRef<5> lse_fp64;
  TensorRef<4> add_k, add_v, d_add_k, d_add_v;
  // Optional relative positional bias (DESIGN.md section 7): the score of query i and key t in
  // its window is scale * q_i . k_t + rpb[h, rpb_index(axis 0), rpb_index(axis 1), rpb_index(axis
  // 2)] (window.h); additional tokens get no bias. Null when absent. d_rpb (backward, written
  // whole by the kernel) is the sum over batch and queries of dS at each relative offset.
  TensorRef<4> rpb, d_rpb;

  void* stream = nullptr;  // cudaStream_t for CUDA kernels
  int32_t num_threads = 0;  // CPU kernels: 0 = implementation default
  // CPU kernels: use exactly num_threads even when the problem is too small to pay for them
  // (tests use it to exercise the multi-threaded schedules on small problems).
  bool exact_threads = false;

  NATTN_HOST_DEVICE int64_t tokens() const {
    return axes[0].length * axes[1].length * axes[2].length;
  }
  NATTN_HOST_DEVICE int64_t heads_per_kv() const { return heads / kv_heads; }
  NATTN_HOST_DEVICE bool has_rpb() const { return rpb.data != nullptr; }
};

}  // namespace nattn
