// Small kernels with one planted defect each, run under nattn's emulator (csrc/emu) to prove it
// catches them (tests/test_emu.py builds this file with the emulator's sources). Each case
// prints one line "<case>: <outcome>", where the outcome is the emulator's error, a finding of
// this harness (NaN read, results that differ between schedules, a wrong product), or "ok".
// These are test kernels, not nattn's: the product kernels are in csrc/cuda.
#include <cmath>
#include <cstdio>
#include <cstring>
#include <string>
#include <vector>

#include <cutlass/half.h>

#include "cuda/common/launch.h"
#include "cuda/sm80/sm80_arch_ops.h"

namespace ops = nattn::cuda::sm80::ops;
using nattn::cuda::launch_kernel;
using fp16 = cutlass::half_t;

namespace {

// A warp loads an 8 x 8 fp16 matrix into shared memory with cp.async (lane r < 8 copies row r),
// then reads it with ldmatrix. `wait`: whether the copy is waited for first.
__global__ void ldmatrix_after_copy(const fp16* in, uint32_t* out, bool wait) {
  NATTN_DYNAMIC_SHARED(cute::uint128_t, smem);
  const int lane = threadIdx.x;
  if (lane < 8) {
    ops::CpAsyncZfill<cute::uint128_t>::copy(
        *reinterpret_cast<const cute::uint128_t*>(in + 8 * lane), smem[lane], true);
  }
  ops::cp_async_fence();
  if (wait) ops::cp_async_wait<0>();
  __syncwarp();
  uint32_t r;
  ops::impl::SM75_U32x1_LDSM_N::copy(smem[lane % 8], r);
  out[lane] = r;
}

// The same copy, read with a plain shared-memory load before the wait.
__global__ void plain_read_before_wait(const float* in, float* out) {
  NATTN_DYNAMIC_SHARED(cute::uint128_t, smem);
  const int t = threadIdx.x;
  ops::CpAsyncZfill<cute::uint128_t>::copy(
      *reinterpret_cast<const cute::uint128_t*>(in + 4 * t), smem[t], true);
  ops::cp_async_fence();
  out[t] = reinterpret_cast<const float*>(smem)[4 * t];  // defect: no cp.async.wait_group
  ops::cp_async_wait<0>();
}

// Warp 0 writes shared memory that warp 1 reads; `sync` puts the barrier between them.
__global__ void cross_warp(const float* in, float* out, bool sync) {
  NATTN_DYNAMIC_SHARED(float, smem);
  const int t = threadIdx.x;
  if (t < 32) smem[t] = in[t];
  if (sync) __syncthreads();
  if (t >= 32) out[t - 32] = smem[t - 32];
}

// Half the warp shuffles, the other fp16 goes to __syncwarp.
__global__ void divergent_shuffle(float* out) {
  const int lane = threadIdx.x % 32;
  float x = static_cast<float>(lane);
  if (lane < 16) {
    x = __shfl_xor_sync(0xffffffffu, x, 1);
  } else {
    __syncwarp();
  }
  out[threadIdx.x] = x;
}

// A barrier inside a branch that fp16 the CTA skips.
__global__ void partial_barrier(float* out) {
  if (threadIdx.x < 64) __syncthreads();
  out[threadIdx.x] = 1.f;
}

// A full-mask shuffle in a CTA of 48 threads (its second warp has 16 lanes).
__global__ void partial_warp(float* out) {
  out[threadIdx.x] = __shfl_xor_sync(0xffffffffu, 1.f, 1);
}

__global__ void touch_shared(float* out) {
  NATTN_DYNAMIC_SHARED(float, smem);
  smem[threadIdx.x] = 1.f;
  out[threadIdx.x] = smem[threadIdx.x];
}

// One m16n8k16 fp16 mma: fragments packed from row-major A (16 x 16) and B (16 x 8, [k][n]) per
// the PTX ISA's tables, written here independently of the emulator; `swap` exchanges the two
// 16-bit halves of A's first register (a0 <-> a1), the planted defect.
__global__ void mma_tile(const fp16* A, const fp16* B, float* D, bool swap) {
  const int lane = threadIdx.x, g = lane / 4, t = lane % 4;
  auto pack = [](fp16 lo, fp16 hi) {
    return static_cast<uint32_t>(lo.raw()) | (static_cast<uint32_t>(hi.raw()) << 16);
  };
  uint32_t a[4], b[2];
  for (int r = 0; r < 4; ++r) {  // a[r] holds a_{2r}, a_{2r+1}
    const int row = g + (r % 2) * 8, col = 2 * t + (r / 2) * 8;
    a[r] = pack(A[16 * row + col], A[16 * row + col + 1]);
  }
  if (swap) a[0] = (a[0] >> 16) | (a[0] << 16);
  for (int r = 0; r < 2; ++r) {  // b[r] holds b_{2r}, b_{2r+1}: rows k = 2t (+1) (+8), column g
    const int k = 2 * t + 8 * r;
    b[r] = pack(B[8 * k + g], B[8 * (k + 1) + g]);
  }
  float d[4];
  ops::MmaF16::fma(d[0], d[1], d[2], d[3], a[0], a[1], a[2], a[3], b[0], b[1], 0.f, 0.f, 0.f,
                   0.f);
  for (int i = 0; i < 4; ++i) D[8 * (g + (i / 2) * 8) + 2 * t + (i % 2)] = d[i];
}

std::string outcome(cudaError_t status) {
  return status == cudaSuccess ? "ok" : cudaGetErrorString(status);
}

void order(nattn::emu::Order o) { nattn::emu::settings().order = o; }

}  // namespace

int main(int argc, char** argv) {
  const std::string only = argc > 1 ? argv[1] : "";
  auto want = [&](const char* name) { return only.empty() || only == name; };
  std::vector<fp16> h(64);
  for (int i = 0; i < 64; ++i) h[i] = fp16(static_cast<float>(i) * 0.25f - 3.f);
  std::vector<float> f(128), o(128), o2(128);
  for (int i = 0; i < 128; ++i) f[i] = static_cast<float>(i) + 0.5f;
  std::vector<uint32_t> u(32);

  if (want("ldmatrix_before_wait")) {
    std::printf("ldmatrix_after_wait: %s\n",
                outcome(launch_kernel(ldmatrix_after_copy, dim3(1), dim3(32), 128, nullptr,
                                      h.data(), u.data(), true)).c_str());
    std::printf("ldmatrix_before_wait: %s\n",
                outcome(launch_kernel(ldmatrix_after_copy, dim3(1), dim3(32), 128, nullptr,
                                      h.data(), u.data(), false)).c_str());
  }
  if (want("plain_read_before_wait")) {
    const cudaError_t s =
        launch_kernel(plain_read_before_wait, dim3(1), dim3(32), 512, nullptr, f.data(), o.data());
    bool nan = false;
    for (int i = 0; i < 32; ++i) nan = nan || std::isnan(o[i]);
    std::printf("plain_read_before_wait: %s\n",
                s != cudaSuccess ? outcome(s).c_str()
                : nan ? "read the NaN pattern: shared memory read before its cp.async.wait_group"
                      : "ok");
  }
  if (want("missing_syncthreads")) {
    for (bool sync : {true, false}) {
      order(nattn::emu::Order::kForward);
      launch_kernel(cross_warp, dim3(1), dim3(64), 256, nullptr, f.data(), o.data(), sync);
      order(nattn::emu::Order::kReverse);
      launch_kernel(cross_warp, dim3(1), dim3(64), 256, nullptr, f.data(), o2.data(), sync);
      order(nattn::emu::Order::kForward);
      const bool same = std::memcmp(o.data(), o2.data(), 32 * sizeof(float)) == 0;
      std::printf("%s: %s\n", sync ? "with_syncthreads" : "missing_syncthreads",
                  same ? "ok"
                       : "results differ between the forward and reverse fiber orders: a "
                         "shared-memory race");
    }
  }
  if (want("divergent_shuffle")) {
    std::printf("divergent_shuffle: %s\n",
                outcome(launch_kernel(divergent_shuffle, dim3(1), dim3(32), 0, nullptr,
                                      o.data())).c_str());
  }
  if (want("partial_barrier")) {
    std::printf("partial_barrier: %s\n",
                outcome(launch_kernel(partial_barrier, dim3(1), dim3(128), 0, nullptr,
                                      o.data())).c_str());
  }
  if (want("partial_warp")) {
    std::printf("partial_warp: %s\n",
                outcome(launch_kernel(partial_warp, dim3(1), dim3(48), 0, nullptr,
                                      o.data())).c_str());
  }
  if (want("shared_over_48k")) {
    std::printf("shared_over_48k: %s\n",
                outcome(launch_kernel(touch_shared, dim3(1), dim3(32), 64 * 1024, nullptr,
                                      o.data())).c_str());
    cudaFuncSetAttribute(touch_shared, cudaFuncAttributeMaxDynamicSharedMemorySize, 64 * 1024);
    std::printf("shared_over_48k_opted_in: %s\n",
                outcome(launch_kernel(touch_shared, dim3(1), dim3(32), 64 * 1024, nullptr,
                                      o.data())).c_str());
    std::printf("shared_over_arch_limit: %s\n",
                outcome(cudaFuncSetAttribute(touch_shared,
                                             cudaFuncAttributeMaxDynamicSharedMemorySize,
                                             200 * 1024)).c_str());
    std::printf("block_over_1024: %s\n",
                outcome(launch_kernel(touch_shared, dim3(1), dim3(1056), 0, nullptr,
                                      o.data())).c_str());
    std::printf("grid_y_over_65535: %s\n",
                outcome(launch_kernel(touch_shared, dim3(1, 65536), dim3(32), 0, nullptr,
                                      o.data())).c_str());
  }
  if (want("swapped_fragment")) {
    std::vector<fp16> A(256), B(128);
    for (int i = 0; i < 256; ++i) A[i] = fp16(static_cast<float>((i * 7) % 13) - 6.f);
    for (int i = 0; i < 128; ++i) B[i] = fp16(static_cast<float>((i * 5) % 11) - 5.f);
    std::vector<float> D(128);
    for (bool swap : {false, true}) {
      const cudaError_t s =
          launch_kernel(mma_tile, dim3(1), dim3(32), 0, nullptr, A.data(), B.data(), D.data(), swap);
      int wrong = 0;
      for (int m = 0; m < 16; ++m) {
        for (int n = 0; n < 8; ++n) {
          float want_d = 0.f;
          for (int k = 0; k < 16; ++k) want_d += float(A[16 * m + k]) * float(B[8 * k + n]);
          wrong += D[8 * m + n] != want_d;
        }
      }
      std::printf("%s: %s\n", swap ? "swapped_fragment" : "mma_fragment",
                  s != cudaSuccess ? outcome(s).c_str()
                  : wrong ? (std::to_string(wrong) + " of 128 elements of the mma result differ "
                                                     "from A.B").c_str()
                          : "ok");
    }
  }
  return 0;
}
