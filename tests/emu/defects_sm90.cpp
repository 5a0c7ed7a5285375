// Small SM90 kernels with one planted defect each, run under nattn's emulator (csrc/emu) to
// prove its Hopper model catches them (tests/test_emu.py builds this file with the emulator's
// sources). Each case prints "<case>: <outcome>": the emulator's error, a finding of this
// harness (NaN read, a wrong product), or "ok". Test kernels, not nattn's.
#include <cmath>
#include <cstdio>
#include <cstring>
#include <string>
#include <vector>

#include "cuda/sm90/sm90_arch_ops.h"  // first: the emulator's seam sets CuTe options

#include <cute/tensor.hpp>
#include <cutlass/half.h>

#include "cuda/common/launch.h"

namespace ops = nattn::cuda::sm90::ops;
using nattn::cuda::launch_kernel;
using fp16 = cute::half_t;

namespace {

enum class Wgmma { kOk, kReadBeforeWait, kNoFence, kTmaIntoBusy, kNoTmaWait };

// One warpgroup: A (64 x 16) and B (64 x 16), K-major 128-byte-swizzled tiles of shared memory
// filled by its threads, D = A B^T by one wgmma m64n64k16 (SS). `defect` plants one error.
__global__ void one_wgmma(const fp16* a, const fp16* b, float* d, Wgmma defect,
                          const CUtensorMap* map) {
  using namespace cute;
  NATTN_DYNAMIC_SHARED(char, raw);
  const uint32_t addr = ops::shared_address(raw);
  char* base = raw + (1024 - addr % 1024) % 1024;
  using Atom = GMMA::Layout_K_SW128_Atom<fp16>;  // 8 x 64: a 16-wide K slice of it is used
  auto layout = tile_to_shape(Atom{}, Shape<_64, _64>{});
  Tensor sA = make_tensor(make_smem_ptr(reinterpret_cast<fp16*>(base)), layout);
  Tensor sB = make_tensor(make_smem_ptr(reinterpret_cast<fp16*>(base + 8192)), layout);
  const int t = threadIdx.x;
  for (int k = 0; k < 16; ++k) {  // threads 0-63 write A's rows, 64-127 B's
    if (t < 64) sA(t, k) = a[t * 16 + k];
    else sB(t - 64, k) = b[(t - 64) * 16 + k];
  }
  __syncthreads();
  auto mma = make_tiled_mma(ops::WgmmaSS<fp16, 64, ops::Major::K, ops::Major::K>{});
  auto thr = mma.get_thread_slice(t);
  Tensor tA = thr.partition_fragment_A(sA);
  Tensor tB = thr.partition_fragment_B(sB);
  Tensor acc = partition_fragment_C(mma, Shape<_64, _64>{});
  uint64_t* bar = reinterpret_cast<uint64_t*>(base + 16384);
  if (t == 0) ops::Barrier::init(bar, 1);
  __syncthreads();
  if (defect == Wgmma::kNoTmaWait) {
    // B's tile arrives by TMA, and nobody waits on its mbarrier before the wgmma reads it.
    if (t == 0) {
      ops::TxBarrier::arrive_and_expect_tx(bar, 8192);
      ops::TmaLoad5D::copy(map, bar, 0, base + 8192, 0, 0, 0, 0, 0);
    }
    __syncthreads();
  }
  if (defect != Wgmma::kNoFence) ops::wgmma_fence();
  mma.accumulate_ = GMMA::ScaleOut::Zero;
  cute::gemm(mma, tA(_, _, 0), tB(_, _, 0), acc);
  ops::wgmma_commit();
  if (defect == Wgmma::kTmaIntoBusy && t == 0) {
    // Refill B's tile while the wgmma reading it is in flight.
    ops::TxBarrier::arrive_and_expect_tx(bar, 8192);
    ops::TmaLoad5D::copy(map, bar, 0, base + 8192, 0, 0, 0, 0, 0);
  }
  if (defect != Wgmma::kReadBeforeWait) ops::wgmma_wait<0>();
  Tensor cD = thr.partition_C(make_identity_tensor(Shape<_64, _64>{}));
  for (int i = 0; i < size(acc); ++i) {
    d[get<0>(cD(i)) * 64 + get<1>(cD(i))] = acc(i);
  }
  if (defect == Wgmma::kReadBeforeWait) ops::wgmma_wait<0>();
}

// mbarrier init(count), `arrivals` arrivals by thread 0, then every thread waits on phase 0.
__global__ void mbarrier_phase(int count, int arrivals) {
  NATTN_DYNAMIC_SHARED(uint64_t, bar);
  if (threadIdx.x == 0) ops::Barrier::init(bar, count);
  __syncthreads();
  if (threadIdx.x == 0) {
    for (int i = 0; i < arrivals; ++i) ops::Barrier::arrive(bar);
  }
  ops::Barrier::wait(bar, 0);
}

// Three warpgroups raise their registers to `n` (warpgroup 1 asks for `n + 8 * odd` when
// `uniform` is false, in one of its threads).
__global__ void setmaxnreg_all(int n, bool uniform) {
  const bool odd = !uniform && threadIdx.x == 130;
  if (n == 240 && !odd) ops::reg_alloc<240>();
  if (n == 240 && odd) ops::reg_alloc<248>();
  if (n == 160) {  // the forward's split: producer down to 24 first or not, consumers up to 240
    if (threadIdx.x < 128) ops::reg_dealloc<24>();
    else ops::reg_alloc<240>();
  }
}

std::string outcome(cudaError_t s) {
  if (s == cudaSuccess) return "ok";
  std::string m = cudaGetErrorString(s);
  for (char& c : m) c = c == '\n' ? ' ' : c;
  return m;
}

}  // namespace

int main() {
  std::vector<fp16> a(64 * 16), b(64 * 16);
  for (int i = 0; i < 64 * 16; ++i) {
    a[i] = fp16(static_cast<float>((i * 7) % 13) * 0.25f - 1.5f);
    b[i] = fp16(static_cast<float>((i * 5) % 11) * 0.5f - 2.f);
  }
  std::vector<float> d(64 * 64);
  const int smem = 16384 + 1024 + 64;
  // A tensor map over b (a 64 x 64 fp16 box, 128-byte swizzle) for the refill.
  std::vector<fp16> g(64 * 64);
  alignas(64) CUtensorMap map;
  {
    const cuuint64_t dim[5] = {64, 64, 1, 1, 1};
    const cuuint64_t stride[4] = {128, 8192, 8192, 8192};
    const cuuint32_t box[5] = {64, 64, 1, 1, 1};
    const cuuint32_t es[5] = {1, 1, 1, 1, 1};
    void* fn = nullptr;
    cudaDriverEntryPointQueryResult q;
    cudaGetDriverEntryPointByVersion("cuTensorMapEncodeTiled", &fn, 12000, 0, &q);
    auto encode = reinterpret_cast<decltype(&::nattn::emu::sm90::encode_tiled)>(fn);
    if (encode(&map, CU_TENSOR_MAP_DATA_TYPE_FLOAT16, 5, g.data(), dim, stride, box, es,
               CU_TENSOR_MAP_INTERLEAVE_NONE, CU_TENSOR_MAP_SWIZZLE_128B,
               CU_TENSOR_MAP_L2_PROMOTION_NONE, CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE) != 0) {
      std::printf("setup: the tensor map was refused\n");
      return 1;
    }
  }
  for (Wgmma w : {Wgmma::kOk, Wgmma::kReadBeforeWait, Wgmma::kNoFence, Wgmma::kTmaIntoBusy,
                  Wgmma::kNoTmaWait}) {
    const char* name = w == Wgmma::kOk               ? "wgmma_after_wait"
                       : w == Wgmma::kReadBeforeWait ? "wgmma_read_before_wait"
                       : w == Wgmma::kNoFence        ? "wgmma_without_fence"
                       : w == Wgmma::kTmaIntoBusy    ? "tma_into_busy_stage"
                                                     : "wgmma_before_tma_wait";
    std::fill(d.begin(), d.end(), 0.f);
    const cudaError_t s = launch_kernel(one_wgmma, dim3(1), dim3(128), smem, nullptr, a.data(),
                                        b.data(), d.data(), w, &map);
    std::string result = outcome(s);
    if (s == cudaSuccess) {
      bool nan = false, wrong = false;
      for (int m = 0; m < 64; ++m) {
        for (int n = 0; n < 64; ++n) {
          double want = 0;
          for (int k = 0; k < 16; ++k) {
            want += static_cast<double>(float(a[m * 16 + k])) * float(b[n * 16 + k]);
          }
          nan = nan || std::isnan(d[m * 64 + n]);
          wrong = wrong || std::fabs(d[m * 64 + n] - want) > 1e-4 * (1 + std::fabs(want));
        }
      }
      result = nan     ? "read the NaN pattern: accumulators read before wgmma.wait_group"
               : wrong ? "the wgmma result differs from A.B^T"
                       : "ok";
    }
    std::printf("%s: %s\n", name, result.c_str());
  }
  std::printf("mbarrier_complete: %s\n",
              outcome(launch_kernel(mbarrier_phase, dim3(1), dim3(64), 64, nullptr, 1, 1)).c_str());
  std::printf("mbarrier_never_completes: %s\n",
              outcome(launch_kernel(mbarrier_phase, dim3(1), dim3(64), 64, nullptr, 2, 1)).c_str());
  // Two phases complete before the wait: parity 0 now names the incomplete phase 2.
  std::printf("mbarrier_phase_overtaken: %s\n",
              outcome(launch_kernel(mbarrier_phase, dim3(1), dim3(64), 64, nullptr, 1, 2)).c_str());
  std::printf("setmaxnreg_split: %s\n",
              outcome(launch_kernel(setmaxnreg_all, dim3(1), dim3(384), 0, nullptr, 160, true))
                  .c_str());
  std::printf("setmaxnreg_over_register_file: %s\n",
              outcome(launch_kernel(setmaxnreg_all, dim3(1), dim3(384), 0, nullptr, 240, true))
                  .c_str());
  std::printf("setmaxnreg_not_uniform: %s\n",
              outcome(launch_kernel(setmaxnreg_all, dim3(1), dim3(384), 0, nullptr, 240, false))
                  .c_str());
  return 0;
}
