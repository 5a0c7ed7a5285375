// Portability macros shared by host (C++17) and device (CUDA) code.
#pragma once

#if defined(__CUDACC__) || defined(__HIPCC__)
#define NATTN_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define NATTN_HOST_DEVICE inline
#endif

namespace nattn {

// Kernels see every problem as rank 3: a rank-1 or rank-2 problem is padded with leading axes of
// length 1 and kernel_size 1, whose window is always {0}. One kernel then serves every rank
// instead of one instantiation per rank.
constexpr int kMaxRank = 3;

}  // namespace nattn
