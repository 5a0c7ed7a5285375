// The SIMT fallback: simple, correct CUDA kernels for every problem the tensor-core path does not
// take (float32/float64, head dims without an instantiation, value_dim != head_dim, strides the
// vectorized copies cannot use). One warp per output row; the lanes split the head dim, a dot
// product is a warp reduction, the softmax is online in fp32 (fp64 for float64 inputs). Any
// element strides (the last dim too). Deterministic: no atomics anywhere. The relative
// positional bias (params.h: rpb) is added to each neighborhood score as it is computed.
//
// Also here, used by both paths: the backward's preprocessing kernel, delta = rowsum(dO * O) -
// d_lse, and the d_rpb kernel (a warp per bias entry, summing dS over batch and queries).
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cmath>
#include <cstdint>
#include <string>
#include <type_traits>

#include "cuda/common/arch_ops.h"
#include "cuda/common/launch.h"
#include "cuda/common/simt_api.h"
#include "nattn/params.h"
#include "nattn/window.h"

namespace nattn::cuda::simt {
// Named (not anonymous) so that the emulator can name the kernels in its messages.
namespace detail {

constexpr int kWarpsPerBlock = 4;

template <class T>
struct AccOf {
  using type = float;
};
template <>
struct AccOf<double> {
  using type = double;
};

__device__ __forceinline__ float to_acc(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_acc(__nv_bfloat16 x) { return __bfloat162float(x); }
__device__ __forceinline__ float to_acc(float x) { return x; }
__device__ __forceinline__ double to_acc(double x) { return x; }
template <class T, class A>
__device__ __forceinline__ T from_acc(A x);
template <>
__device__ __forceinline__ __half from_acc<__half, float>(float x) { return __float2half_rn(x); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_acc<__nv_bfloat16, float>(float x) {
  return __float2bfloat16_rn(x);
}
template <>
__device__ __forceinline__ float from_acc<float, float>(float x) { return x; }
template <>
__device__ __forceinline__ double from_acc<double, double>(double x) { return x; }

__device__ __forceinline__ float exp_acc(float x) { return expf(x); }
__device__ __forceinline__ double exp_acc(double x) { return exp(x); }
__device__ __forceinline__ float log_acc(float x) { return logf(x); }
__device__ __forceinline__ double log_acc(double x) { return log(x); }

template <class A>
__device__ __forceinline__ A warp_sum(A x) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) x += __shfl_xor_sync(0xffffffffu, x, o);
  return x;
}

// Spatial coordinates of linear token t (last axis fastest).
__device__ __forceinline__ void token_coords(const AttentionParams& p, int64_t t, int64_t (&x)[3]) {
  x[2] = t % p.axes[2].length;
  t /= p.axes[2].length;
  x[1] = t % p.axes[1].length;
  x[0] = t / p.axes[1].length;
}

template <int N>
__device__ __forceinline__ int64_t token_offset(const TensorRef<N>& t, int64_t b,
                                                const int64_t (&x)[3], int64_t h) {
  return b * t.stride[0] + x[0] * t.stride[1] + x[1] * t.stride[2] + x[2] * t.stride[3] +
         h * t.stride[4];
}
__device__ __forceinline__ int64_t additional_offset(const TensorRef<4>& t, int64_t b, int64_t m,
                                                     int64_t h) {
  return b * t.stride[0] + m * t.stride[1] + h * t.stride[2];
}

// Dot product of an accumulator vector in shared memory (lane-owned elements) with a row in
// global memory, reduced over the warp.
template <class A, class T>
__device__ __forceinline__ A dot(const A* s, const T* g, int64_t g_step, int64_t n, int lane) {
  A acc = 0;
  for (int64_t d = lane; d < n; d += 32) acc += s[d] * to_acc(g[d * g_step]);
  return warp_sum(acc);
}

// Calls fn(coordinates) for every point of the product w0 x w1 x w2 of per-axis index ranges
// (last axis fastest).
template <class Fn>
__device__ __forceinline__ void for_each_point(const IndexRange& w0, const IndexRange& w1,
                                               const IndexRange& w2, Fn&& fn) {
  for (int64_t i0 = 0; i0 < w0.count; ++i0) {
    for (int64_t i1 = 0; i1 < w1.count; ++i1) {
      for (int64_t i2 = 0; i2 < w2.count; ++i2) {
        const int64_t x[3] = {w0.first + i0 * w0.step, w1.first + i1 * w1.step,
                              w2.first + i2 * w2.step};
        fn(x);
      }
    }
  }
}

// Calls fn(query coordinates) for every query whose window holds key x (window.h: query_window).
template <class Fn>
__device__ __forceinline__ void for_each_query(const AttentionParams& p, const int64_t (&x)[3],
                                               Fn&& fn) {
  for_each_point(query_window(p.axes[0], x[0]), query_window(p.axes[1], x[1]),
                 query_window(p.axes[2], x[2]), fn);
}

// The relative positional bias of query x and key kx in its window, head h (window.h:
// rpb_index; DESIGN.md section 7); 0 without rpb.
template <class A, class T>
__device__ __forceinline__ A bias_of(const AttentionParams& p, int64_t h, const int64_t (&x)[3],
                                     const int64_t (&kx)[3]) {
  if (!p.has_rpb()) return A(0);
  int64_t off = h * p.rpb.stride[0];
#pragma unroll
  for (int a = 0; a < kMaxRank; ++a) {
    off += rpb_index(p.axes[a], x[a], kx[a]) * p.rpb.stride[1 + a];
  }
  return to_acc(static_cast<const T*>(p.rpb.data)[off]);
}

// Calls visit(k_row, k_step, v_row, v_step, bias) for every key/value row that query x of head
// h, batch b attends with kv head hk: the keys of its window (window.h: key_window) with their
// relative bias, then the additional tokens (bias 0). A row's elements are row[d * step].
template <class T, class A, class Visit>
__device__ __forceinline__ void for_each_key_value(const AttentionParams& p, int64_t b,
                                                   const int64_t (&x)[3], int64_t h, int64_t hk,
                                                   Visit&& visit) {
  const T* k = static_cast<const T*>(p.k.data);
  const T* v = static_cast<const T*>(p.v.data);
  for_each_point(key_window(p.axes[0], x[0]), key_window(p.axes[1], x[1]),
                 key_window(p.axes[2], x[2]), [&](const int64_t(&kx)[3]) {
                   visit(k + token_offset(p.k, b, kx, hk), p.k.stride[5],
                         v + token_offset(p.v, b, kx, hk), p.v.stride[5],
                         bias_of<A, T>(p, h, x, kx));
                 });
  for (int64_t m = 0; m < p.num_additional; ++m) {
    visit(static_cast<const T*>(p.add_k.data) + additional_offset(p.add_k, b, m, hk),
          p.add_k.stride[3],
          static_cast<const T*>(p.add_v.data) + additional_offset(p.add_v, b, m, hk),
          p.add_v.stride[3], A(0));
  }
}

// Forward: warp per (query token, head, batch). Shared per warp: q (head_dim), o (value_dim).
template <class T>
__global__ void forward_kernel(const __grid_constant__ AttentionParams p) {
  using A = typename AccOf<T>::type;
  NATTN_DYNAMIC_SHARED(unsigned char, smem_raw);
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  A* sq = reinterpret_cast<A*>(smem_raw) + warp * (p.head_dim + p.value_dim);
  A* so = sq + p.head_dim;
  const int64_t D = p.head_dim, Dv = p.value_dim, tokens = p.tokens();
  const int64_t rows = tokens * p.heads * p.batch;
  const A scale = static_cast<A>(p.scale);
  const T* q = static_cast<const T*>(p.q.data);
  for (int64_t row = blockIdx.x * int64_t{kWarpsPerBlock} + warp; row < rows;
       row += int64_t{gridDim.x} * kWarpsPerBlock) {
    const int64_t t = row % tokens, h = (row / tokens) % p.heads, b = row / (tokens * p.heads);
    const int64_t hk = h / p.heads_per_kv();
    int64_t x[3];
    token_coords(p, t, x);
    const T* qrow = q + token_offset(p.q, b, x, h);
    for (int64_t d = lane; d < D; d += 32) sq[d] = to_acc(qrow[d * p.q.stride[5]]) * scale;
    for (int64_t d = lane; d < Dv; d += 32) so[d] = 0;
    __syncwarp();
    A row_max = -INFINITY, row_sum = 0;
    auto visit = [&](const T* krow, int64_t k_step, const T* vrow, int64_t v_step, A bias) {
      const A s = dot(sq, krow, k_step, D, lane) + bias;
      const A m = s > row_max ? s : row_max;
      const A correction = exp_acc(row_max - m);
      const A prob = exp_acc(s - m);
      row_sum = row_sum * correction + prob;
      row_max = m;
      for (int64_t d = lane; d < Dv; d += 32) {
        so[d] = so[d] * correction + prob * to_acc(vrow[d * v_step]);
      }
    };
    for_each_key_value<T, A>(p, b, x, h, hk, visit);
    T* orow = static_cast<T*>(p.out.data) + token_offset(p.out, b, x, h);
    for (int64_t d = lane; d < Dv; d += 32) {
      ops::store_global(orow + d * p.out.stride[5], from_acc<T, A>(so[d] / row_sum));
    }
    if (lane == 0) {
      ops::store_global(static_cast<float*>(p.lse.data) + token_offset(p.lse, b, x, h),
                        static_cast<float>(row_max + log_acc(row_sum)));
    }
    __syncwarp();
  }
}

// The backward's row terms of query row (b, x, h), in the accumulation type A: the fp32 lse
// output and fp32 delta, or for float64 problems the fp64 lse and delta of the delta pass.
template <class A>
__device__ __forceinline__ A row_lse(const AttentionParams& p, int64_t b, const int64_t (&x)[3],
                                     int64_t h) {
  if constexpr (std::is_same_v<A, double>) {
    return static_cast<const double*>(p.lse_fp64.data)[token_offset(p.lse_fp64, b, x, h)];
  } else {
    return static_cast<const float*>(p.lse.data)[token_offset(p.lse, b, x, h)];
  }
}
template <class A>
__device__ __forceinline__ A row_delta(const AttentionParams& p, int64_t b,
                                       const int64_t (&x)[3], int64_t h) {
  return static_cast<const A*>(p.delta.data)[token_offset(p.delta, b, x, h)];
}

// delta = rowsum(dO * O) - d_lse: warp per (token, head, batch), in the accumulation type. For
// float64 problems also the lse, recomputed in fp64 (online, over the row's keys).
template <class T>
__global__ void delta_kernel(const __grid_constant__ AttentionParams p) {
  using A = typename AccOf<T>::type;
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  const int64_t tokens = p.tokens(), rows = tokens * p.heads * p.batch;
  for (int64_t row = blockIdx.x * int64_t{kWarpsPerBlock} + warp; row < rows;
       row += int64_t{gridDim.x} * kWarpsPerBlock) {
    const int64_t t = row % tokens, h = (row / tokens) % p.heads, b = row / (tokens * p.heads);
    int64_t x[3];
    token_coords(p, t, x);
    const T* o = static_cast<const T*>(p.out.data) + token_offset(p.out, b, x, h);
    const T* g = static_cast<const T*>(p.d_out.data) + token_offset(p.d_out, b, x, h);
    A acc = 0;
    for (int64_t d = lane; d < p.value_dim; d += 32) {
      acc += to_acc(o[d * p.out.stride[5]]) * to_acc(g[d * p.d_out.stride[5]]);
    }
    acc = warp_sum(acc);
    if (lane == 0) {
      A delta = acc;
      if (p.d_lse.data != nullptr) {
        delta -= static_cast<const float*>(p.d_lse.data)[token_offset(p.d_lse, b, x, h)];
      }
      ops::store_global(static_cast<A*>(p.delta.data) + token_offset(p.delta, b, x, h), delta);
    }
    if constexpr (std::is_same_v<A, double>) {
      const T* qrow = static_cast<const T*>(p.q.data) + token_offset(p.q, b, x, h);
      A row_max = -INFINITY, row_sum = 0;
      for_each_key_value<T, A>(p, b, x, h, h / p.heads_per_kv(),
                               [&](const T* krow, int64_t k_step, const T*, int64_t, A bias) {
                              A s = 0;
                              for (int64_t d = lane; d < p.head_dim; d += 32) {
                                s += to_acc(qrow[d * p.q.stride[5]]) * to_acc(krow[d * k_step]);
                              }
                              s = warp_sum(s) * static_cast<A>(p.scale) + bias;
                              const A m = s > row_max ? s : row_max;
                              row_sum = row_sum * exp_acc(row_max - m) + exp_acc(s - m);
                              row_max = m;
                            });
      if (lane == 0) {
        ops::store_global(static_cast<A*>(p.lse_fp64.data) + token_offset(p.lse_fp64, b, x, h),
                          row_max + log_acc(row_sum));
      }
    }
  }
}

// dQ: warp per (query token, head, batch). Shared per warp: q, dq (head_dim), dO (value_dim).
template <class T>
__global__ void dq_kernel(const __grid_constant__ AttentionParams p) {
  using A = typename AccOf<T>::type;
  NATTN_DYNAMIC_SHARED(unsigned char, smem_raw);
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  const int64_t D = p.head_dim, Dv = p.value_dim, tokens = p.tokens();
  A* sq = reinterpret_cast<A*>(smem_raw) + warp * (2 * D + Dv);
  A* sdq = sq + D;
  A* sdo = sdq + D;
  const int64_t rows = tokens * p.heads * p.batch;
  const A scale = static_cast<A>(p.scale);
  for (int64_t row = blockIdx.x * int64_t{kWarpsPerBlock} + warp; row < rows;
       row += int64_t{gridDim.x} * kWarpsPerBlock) {
    const int64_t t = row % tokens, h = (row / tokens) % p.heads, b = row / (tokens * p.heads);
    const int64_t hk = h / p.heads_per_kv();
    int64_t x[3];
    token_coords(p, t, x);
    const T* qrow = static_cast<const T*>(p.q.data) + token_offset(p.q, b, x, h);
    const T* grow = static_cast<const T*>(p.d_out.data) + token_offset(p.d_out, b, x, h);
    for (int64_t d = lane; d < D; d += 32) {
      sq[d] = to_acc(qrow[d * p.q.stride[5]]) * scale;
      sdq[d] = 0;
    }
    for (int64_t d = lane; d < Dv; d += 32) sdo[d] = to_acc(grow[d * p.d_out.stride[5]]);
    __syncwarp();
    const A lse = row_lse<A>(p, b, x, h);
    const A delta = row_delta<A>(p, b, x, h);
    auto visit = [&](const T* krow, int64_t k_step, const T* vrow, int64_t v_step, A bias) {
      const A prob = exp_acc(dot(sq, krow, k_step, D, lane) + bias - lse);
      const A ds = prob * (dot(sdo, vrow, v_step, Dv, lane) - delta);
      for (int64_t d = lane; d < D; d += 32) sdq[d] += ds * to_acc(krow[d * k_step]);
    };
    for_each_key_value<T, A>(p, b, x, h, hk, visit);
    T* dqrow = static_cast<T*>(p.dq.data) + token_offset(p.dq, b, x, h);
    for (int64_t d = lane; d < D; d += 32) {
      ops::store_global(dqrow + d * p.dq.stride[5], from_acc<T, A>(sdq[d] * scale));
    }
    __syncwarp();
  }
}

// dK/dV: warp per (key token or additional token, kv head, batch), over the query heads of the
// group and the queries that attend the key (every query for an additional token).
// Shared per warp: k, dk (head_dim), v, dv (value_dim).
template <class T>
__global__ void dkdv_kernel(const __grid_constant__ AttentionParams p) {
  using A = typename AccOf<T>::type;
  NATTN_DYNAMIC_SHARED(unsigned char, smem_raw);
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  const int64_t D = p.head_dim, Dv = p.value_dim, tokens = p.tokens();
  A* sk = reinterpret_cast<A*>(smem_raw) + warp * (2 * D + 2 * Dv);
  A* sdk = sk + D;
  A* sv = sdk + D;
  A* sdv = sv + Dv;
  const int64_t keys = tokens + p.num_additional;
  const int64_t rows = keys * p.kv_heads * p.batch;
  const A scale = static_cast<A>(p.scale);
  const T* q = static_cast<const T*>(p.q.data);
  const T* g = static_cast<const T*>(p.d_out.data);
  for (int64_t row = blockIdx.x * int64_t{kWarpsPerBlock} + warp; row < rows;
       row += int64_t{gridDim.x} * kWarpsPerBlock) {
    const int64_t t = row % keys, hk = (row / keys) % p.kv_heads, b = row / (keys * p.kv_heads);
    const bool additional = t >= tokens;
    int64_t x[3] = {0, 0, 0};
    const T* krow;
    const T* vrow;
    int64_t k_step, v_step;
    if (additional) {
      krow = static_cast<const T*>(p.add_k.data) + additional_offset(p.add_k, b, t - tokens, hk);
      vrow = static_cast<const T*>(p.add_v.data) + additional_offset(p.add_v, b, t - tokens, hk);
      k_step = p.add_k.stride[3];
      v_step = p.add_v.stride[3];
    } else {
      token_coords(p, t, x);
      krow = static_cast<const T*>(p.k.data) + token_offset(p.k, b, x, hk);
      vrow = static_cast<const T*>(p.v.data) + token_offset(p.v, b, x, hk);
      k_step = p.k.stride[5];
      v_step = p.v.stride[5];
    }
    for (int64_t d = lane; d < D; d += 32) {
      sk[d] = to_acc(krow[d * k_step]) * scale;
      sdk[d] = 0;
    }
    for (int64_t d = lane; d < Dv; d += 32) {
      sv[d] = to_acc(vrow[d * v_step]);
      sdv[d] = 0;
    }
    __syncwarp();
    for (int64_t h = hk * p.heads_per_kv(); h < (hk + 1) * p.heads_per_kv(); ++h) {
      auto visit = [&](const int64_t(&qx)[3]) {
        const T* qrow = q + token_offset(p.q, b, qx, h);
        const T* grow = g + token_offset(p.d_out, b, qx, h);
        const A bias = additional ? A(0) : bias_of<A, T>(p, h, qx, x);
        const A prob = exp_acc(dot(sk, qrow, p.q.stride[5], D, lane) + bias -
                               row_lse<A>(p, b, qx, h));
        const A ds = prob * (dot(sv, grow, p.d_out.stride[5], Dv, lane) -
                             row_delta<A>(p, b, qx, h));
        for (int64_t d = lane; d < D; d += 32) sdk[d] += ds * to_acc(qrow[d * p.q.stride[5]]);
        for (int64_t d = lane; d < Dv; d += 32) {
          sdv[d] += prob * to_acc(grow[d * p.d_out.stride[5]]);
        }
      };
      if (additional) {
        for (int64_t qt = 0; qt < tokens; ++qt) {
          int64_t qx[3];
          token_coords(p, qt, qx);
          visit(qx);
        }
      } else {
        for_each_query(p, x, visit);
      }
    }
    T* dkrow;
    T* dvrow;
    if (additional) {
      dkrow = static_cast<T*>(p.d_add_k.data) + additional_offset(p.d_add_k, b, t - tokens, hk);
      dvrow = static_cast<T*>(p.d_add_v.data) + additional_offset(p.d_add_v, b, t - tokens, hk);
      k_step = p.d_add_k.stride[3];
      v_step = p.d_add_v.stride[3];
    } else {
      dkrow = static_cast<T*>(p.dk.data) + token_offset(p.dk, b, x, hk);
      dvrow = static_cast<T*>(p.dv.data) + token_offset(p.dv, b, x, hk);
      k_step = p.dk.stride[5];
      v_step = p.dv.stride[5];
    }
    for (int64_t d = lane; d < D; d += 32) {
      ops::store_global(dkrow + d * k_step, from_acc<T, A>(sdk[d] * scale));
    }
    for (int64_t d = lane; d < Dv; d += 32) {
      ops::store_global(dvrow + d * v_step, from_acc<T, A>(sdv[d]));
    }
    __syncwarp();
  }
}

// d_rpb: warp per (head, bias entry e = (e0, e1, e2)); the lanes take the (batch, query) pairs in
// turn, each recomputing dS of the one key at offset e from its query (when that key is in the
// query's window), and the warp sums the lanes' partials in a fixed tree: deterministic.
template <class T>
__global__ void d_rpb_kernel(const __grid_constant__ AttentionParams p) {
  using A = typename AccOf<T>::type;
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  const int64_t ext[3] = {rpb_extent(p.axes[0]), rpb_extent(p.axes[1]), rpb_extent(p.axes[2])};
  const int64_t entries = ext[0] * ext[1] * ext[2], rows = entries * p.heads;
  const int64_t tokens = p.tokens(), queries = tokens * p.batch;
  const A scale = static_cast<A>(p.scale);
  const T* q = static_cast<const T*>(p.q.data);
  const T* k = static_cast<const T*>(p.k.data);
  const T* v = static_cast<const T*>(p.v.data);
  const T* g = static_cast<const T*>(p.d_out.data);
  for (int64_t row = blockIdx.x * int64_t{kWarpsPerBlock} + warp; row < rows;
       row += int64_t{gridDim.x} * kWarpsPerBlock) {
    const int64_t h = row / entries, hk = h / p.heads_per_kv();
    const int64_t e[3] = {(row % entries) / (ext[1] * ext[2]), (row % (ext[1] * ext[2])) / ext[2],
                          row % ext[2]};
    A acc = 0;
    for (int64_t i = lane; i < queries; i += 32) {
      const int64_t b = i / tokens;
      int64_t x[3], kx[3];
      token_coords(p, i % tokens, x);
      bool in = true;
#pragma unroll
      for (int a = 0; a < kMaxRank; ++a) {
        const AxisParams& ax = p.axes[a];
        kx[a] = x[a] + (e[a] - (ax.kernel_size - 1)) * ax.dilation;
        in = in && key_window(ax, x[a]).contains(kx[a]);
      }
      if (!in) continue;
      const T* qrow = q + token_offset(p.q, b, x, h);
      const T* krow = k + token_offset(p.k, b, kx, hk);
      const T* vrow = v + token_offset(p.v, b, kx, hk);
      const T* grow = g + token_offset(p.d_out, b, x, h);
      A s = 0, dp = 0;
      for (int64_t d = 0; d < p.head_dim; ++d) {
        s += to_acc(qrow[d * p.q.stride[5]]) * to_acc(krow[d * p.k.stride[5]]);
      }
      for (int64_t d = 0; d < p.value_dim; ++d) {
        dp += to_acc(grow[d * p.d_out.stride[5]]) * to_acc(vrow[d * p.v.stride[5]]);
      }
      const A prob = exp_acc(s * scale + bias_of<A, T>(p, h, x, kx) - row_lse<A>(p, b, x, h));
      acc += prob * (dp - row_delta<A>(p, b, x, h));
    }
    acc = warp_sum(acc);
    if (lane == 0) {
      ops::store_global(static_cast<T*>(p.d_rpb.data) + h * p.d_rpb.stride[0] +
                            e[0] * p.d_rpb.stride[1] + e[1] * p.d_rpb.stride[2] +
                            e[2] * p.d_rpb.stride[3],
                        from_acc<T, A>(acc));
    }
  }
}

// Launches `kernel` with a warp per row, `rows` rows.
template <class Kernel>
std::string launch(Kernel kernel, int64_t rows, int64_t smem_bytes, void* stream,
                   const AttentionParams& p) {
  return launch_grid_stride(kernel, (rows + kWarpsPerBlock - 1) / kWarpsPerBlock,
                            32 * kWarpsPerBlock, smem_bytes, stream, p);
}

template <class T>
std::string forward_t(const AttentionParams& p) {
  using A = typename AccOf<T>::type;
  return launch(forward_kernel<T>, p.tokens() * p.heads * p.batch,
                kWarpsPerBlock * (p.head_dim + p.value_dim) * int64_t{sizeof(A)}, p.stream, p);
}

template <class T>
std::string delta_t(const AttentionParams& p) {
  return launch(delta_kernel<T>, p.tokens() * p.heads * p.batch, 0, p.stream, p);
}

template <class T>
std::string backward_t(const AttentionParams& p) {
  using A = typename AccOf<T>::type;
  std::string err = launch(dq_kernel<T>, p.tokens() * p.heads * p.batch,
                           kWarpsPerBlock * (2 * p.head_dim + p.value_dim) * int64_t{sizeof(A)},
                           p.stream, p);
  if (!err.empty()) return err;
  return launch(dkdv_kernel<T>, (p.tokens() + p.num_additional) * p.kv_heads * p.batch,
                kWarpsPerBlock * 2 * (p.head_dim + p.value_dim) * int64_t{sizeof(A)}, p.stream,
                p);
}

template <class T>
std::string d_rpb_t(const AttentionParams& p) {
  const int64_t entries =
      rpb_extent(p.axes[0]) * rpb_extent(p.axes[1]) * rpb_extent(p.axes[2]);
  return launch(d_rpb_kernel<T>, entries * p.heads, 0, p.stream, p);
}

template <class Fn>
std::string with_type(DType dtype, Fn&& fn) {
  switch (dtype) {
    case DType::kFloat16:
      return fn(__half{});
    case DType::kBFloat16:
      return fn(__nv_bfloat16{});
    case DType::kFloat32:
      return fn(float{});
    case DType::kFloat64:
      return fn(double{});
  }
  return "unknown dtype";
}

}  // namespace detail
using namespace detail;

int64_t shared_bytes(const AttentionParams& p, bool backward) {
  const int64_t acc = p.dtype == DType::kFloat64 ? 8 : 4;
  const int64_t per_warp = backward ? 2 * (p.head_dim + p.value_dim) : p.head_dim + p.value_dim;
  return kWarpsPerBlock * per_warp * acc;
}

std::string kernel_image_error() {
  cudaFuncAttributes attributes;
  const cudaError_t status = cudaFuncGetAttributes(&attributes, delta_kernel<float>);
  if (status == cudaSuccess) return {};
  cudaGetLastError();
  return cudaGetErrorString(status);
}

std::string forward(const AttentionParams& p) {
  return with_type(p.dtype, [&](auto tag) { return forward_t<decltype(tag)>(p); });
}

std::string delta(const AttentionParams& p) {
  return with_type(p.dtype, [&](auto tag) { return delta_t<decltype(tag)>(p); });
}

std::string backward(const AttentionParams& p) {
  return with_type(p.dtype, [&](auto tag) { return backward_t<decltype(tag)>(p); });
}

std::string d_rpb(const AttentionParams& p) {
  return with_type(p.dtype, [&](auto tag) { return d_rpb_t<decltype(tag)>(p); });
}

}  // namespace nattn::cuda::simt
