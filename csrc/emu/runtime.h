// The execution model of nattn's functional CUDA emulator (backend "cuda-emu"): CUDA kernels of
// csrc/cuda, compiled as host C++ against the CUDA headers, run on CPU memory.
//
//   grid     the CTAs of a launch run one after another, in an order the settings choose
//            (index order, reversed, or a seeded permutation); the grid can be capped so that
//            the kernels' grid-stride loops run several work items per CTA.
//   CTA      its threads are cooperative fibers (Boost.Context) on the calling OS thread. A
//            fiber runs until it blocks at a barrier or a warp collective; the scheduler then
//            runs the next runnable fiber in the order of the settings (schedule perturbation is
//            the race check: results must not depend on it).
//   barriers bar.sync (id, count) with __syncthreads as bar 0 over the whole CTA; __syncwarp
//            and every warp collective (shuffles, mma.sync, ldmatrix) are rendezvous of the
//            lanes of their member mask. A mask naming a lane that exited or does not exist,
//            lanes of one mask at different collectives, and a CTA whose live fibers all wait
//            are errors that abort the launch with a message naming the kernel.
//   memory   dynamic shared memory is filled with 0xFF bytes (a NaN in fp16, bf16, fp32 and
//            fp64) at every CTA start, and its size is checked against the launch limits of the
//            emulated architecture. Global memory is the host memory the pointers name.
//
// Kernels reach this header only through the arch-ops seams (csrc/cuda/common/arch_ops.h,
// csrc/cuda/sm80/sm80_arch_ops.h) when NATTN_EMU is defined. Instruction semantics of an
// architecture live beside it (sm80_ops.h).
#pragma once

#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>
#include <cstring>
#include <string>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

namespace nattn::emu {

// ---------------------------------------------------------------------------------------------
// Settings and counters (set and read by the Python side through nattn._emu).

enum class Order : int { kForward = 0, kReverse = 1, kRandom = 2 };

struct Settings {
  int arch = 80;          // emulated compute capability (major * 10 + minor)
  Order order = Order::kForward;  // order of the CTAs of a grid and of the fibers of a CTA
  uint64_t seed = 0;      // for Order::kRandom
  int64_t grid_cap = 0;   // > 0: grid-stride launches use at most this many CTAs (common/launch.h)
};
Settings& settings();

// Per launch, what the kernel did (warp instructions, not per-thread operations).
struct LaunchRecord {
  std::string kernel;
  unsigned grid[3] = {0, 0, 0};
  unsigned block[3] = {0, 0, 0};
  int64_t shared_bytes = 0;
  int64_t mma = 0;             // mma.sync instructions (one per warp)
  int64_t ldmatrix = 0;        // ldmatrix instructions (one per warp)
  int64_t cp_async_bytes = 0;  // bytes requested by cp.async (zero-filled ones included)
  int64_t global_store_bytes = 0;  // bytes stored to global memory through emu::store
  int64_t wgmma = 0;           // wgmma.mma_async instructions (one per warpgroup)
  int64_t tma_bytes = 0;       // bytes cp.async.bulk.tensor wrote to shared memory (boxes)
};
// Launches since the last clear (the Python side clears before each call).
std::vector<LaunchRecord>& launch_log();

// Architecture limits a launch is checked against (as the driver would).
struct ArchLimits {
  int64_t max_threads_per_block = 1024;
  int64_t max_grid_x = 2147483647;
  int64_t max_grid_yz = 65535;
  int64_t default_shared = 48 * 1024;  // dynamic shared memory without the opt-in attribute
  int64_t max_shared_optin = 0;        // with it: 163 KiB on sm80, 227 KiB on sm90
};
ArchLimits arch_limits(int arch);

// ---------------------------------------------------------------------------------------------
// The running thread (fiber) and its CTA.

struct Cta;
struct Thread {
  Cta* cta = nullptr;
  uint3 thread_idx{0, 0, 0};
  int linear = 0;  // linear thread index in the CTA
  // cp.async: copies in flight, each with the commit group it belongs to (-1: not committed).
  struct PendingCopy {
    unsigned char* dst;
    unsigned char data[16];
    int bytes;
    int64_t group;
  };
  std::vector<PendingCopy> copies;
  int64_t committed_groups = 0;  // commit groups so far
  // wgmma.mma_async in flight (sm90_ops.cpp): the accumulator registers each one writes, with
  // the values they receive at the wgmma.wait_group that covers its commit group (-1: not yet
  // committed), and the A-operand registers it reads (RS form), which must not change before.
  struct PendingWgmma {
    int64_t group;
    std::vector<std::pair<float*, float>> d;
    std::vector<std::pair<const uint32_t*, uint32_t>> a;
    uint32_t smem_begin = 0, smem_end = 0;  // shared-memory bytes its operands span
    const float* d_lo = nullptr;             // the accumulator registers' address range
    const float* d_hi = nullptr;
    // The value `reg` receives from this wgmma, if it writes it.
    const float* find(const float* reg, size_t hint) const {
      if (reg < d_lo || reg > d_hi) return nullptr;
      if (hint < d.size() && d[hint].first == reg) return &d[hint].second;
      for (const auto& [p, v] : d) {
        if (p == reg) return &v;
      }
      return nullptr;
    }
  };
  std::vector<PendingWgmma> wgmma;
  int64_t wgmma_committed = 0;  // wgmma commit groups so far
  bool wgmma_fenced = false;    // a wgmma.fence since the last wgmma.wait_group
};

Thread& self();        // the running fiber's thread (error outside a kernel)
uint3 block_index();   // blockIdx of the running CTA
dim3 block_dim();
dim3 grid_dim();

// Aborts the running launch with `message` (the kernel's name and the thread are prepended).
[[noreturn]] void fail(const std::string& message);

// Dynamic shared memory of the running CTA (`name` is the kernel's __PRETTY_FUNCTION__, which
// names the kernel in error messages more precisely than its symbol).
void* dynamic_shared(const char* name);
int64_t dynamic_shared_bytes();
// Whether [p, p + bytes) lies in the running CTA's shared memory.
bool in_shared(const void* p, size_t bytes);
// Shared-window addresses (what __cvta_generic_to_shared returns and what wgmma descriptors,
// mbarrier and TMA operands hold). Dynamic shared memory starts at kSharedBase: CUDA promises
// only 16-byte alignment of it, and 0x480 is deliberately not a multiple of 1024, so a kernel
// that needs a swizzle atom's alignment must align the buffer itself (as on a GPU).
constexpr uint32_t kSharedBase = 0x480;
uint32_t shared_address(const void* p);
// The host pointer of shared address `addr`, after checking that [addr, addr + bytes) lies in
// the CTA's dynamic shared memory (`what` names the operand in the error).
unsigned char* shared_pointer(uint32_t addr, size_t bytes, const char* what);
// Per byte of shared memory: copies in flight to it (cp.async not waited for, TMA boxes whose
// mbarrier transaction has not completed).
void mark_shared_pending(uint32_t addr, size_t bytes, int delta);

// ---------------------------------------------------------------------------------------------
// Blocking primitives.

// bar.sync id, count: blocks until `count` threads have arrived at barrier `id`.
void barrier_sync(int id, int count);
// bar.arrive id, count: counts towards barrier `id` without waiting.
void barrier_arrive(int id, int count);

// A warp collective: every lane of `mask` calls it with the same `kind`; the last to arrive runs
// kind->exec once with every lane's operands, then all lanes continue. `in`/`out` point into the
// calling lane's own stack (valid while it waits).
struct Rendezvous;
struct CollectiveKind {
  const char* name;                   // as in the PTX ISA, for messages
  bool aligned;                       // .aligned: every lane of the warp, same instruction
  void (*exec)(Rendezvous&);          // runs the instruction for all lanes
};
struct Rendezvous {
  const CollectiveKind* kind = nullptr;
  unsigned mask = 0;
  const void* in[32] = {};
  void* out[32] = {};
  int warp = 0;
};
void collective(const CollectiveKind& kind, unsigned mask, const void* in, void* out);
// A .sync.aligned warpgroup instruction (wgmma, setmaxnreg): the 128 threads of the calling
// thread's warpgroup must all arrive at the same kind; the last one runs kind->exec with
// r.in / r.out indexed by the thread's rank in the warpgroup (0..127) and r.warp = warpgroup.
struct WarpgroupRendezvous {
  const CollectiveKind* kind = nullptr;
  int warpgroup = 0;
  const void* in[128] = {};
  void* out[128] = {};
};
void warpgroup_collective(const CollectiveKind& kind, void (*exec)(WarpgroupRendezvous&),
                          const void* in, void* out);

// mbarrier (PTX ISA "Parallel Synchronization and Communication Instructions: mbarrier"): a
// 64-bit object in shared memory with a phase, an expected and a pending arrival count and a
// transaction count. The phase completes when the pending arrivals and the transaction count
// are both zero; then the phase advances and the pending count is reset to the expected one.
void mbarrier_init(uint32_t addr, int count);
void mbarrier_arrive(uint32_t addr, int count);
void mbarrier_expect_tx(uint32_t addr, int64_t bytes);
void mbarrier_complete_tx(uint32_t addr, int64_t bytes);
// try_wait.parity in a loop: returns once the phase of parity `parity` has completed (the
// current phase's parity differs). A wait no thread can complete is a reported deadlock.
void mbarrier_wait_parity(uint32_t addr, uint32_t parity);
bool mbarrier_test_parity(uint32_t addr, uint32_t parity);  // test_wait.parity, no blocking
// An asynchronous copy whose bytes land in shared memory, and whose `tx_bytes` complete on the
// mbarrier at `mbar`, when a thread next waits on that mbarrier (or at once if one waits
// already): the destination holds the NaN pattern and counts as pending until then.
void async_tx_copy(uint32_t mbar, uint32_t dst, std::vector<unsigned char>&& data,
                   int64_t tx_bytes);
// setmaxnreg.{inc,dec}.sync.aligned.u32 n for the calling thread's warpgroup. An inc waits
// until the CTA's register file (64K 32-bit registers) can hold it.
void setmaxnreg(bool inc, int n);
// Whether a wgmma in flight (issued, its wait_group not reached) of any thread of the CTA reads
// shared bytes in [begin, end): a copy into them now would race with it.
bool wgmma_reads_shared(uint32_t begin, uint32_t end);

// Global stores the kernels route through the seam (counted per launch).
void count_global_store(size_t bytes);
// Instruction counters of the running launch.
void count_mma();
void count_ldmatrix();
void count_cp_async(int64_t bytes);
void count_wgmma();
void count_tma(int64_t bytes);

// cp.async: records a copy of `bytes` (4, 8 or 16) from `src` (read now, zero-filled beyond
// `src_bytes`) to shared `dst`. The destination holds the NaN pattern until the
// cp.async.wait_group that covers the copy's commit group; reading it earlier with ldmatrix is
// an error.
void cp_async(void* dst, const void* src, int bytes, int src_bytes);
void cp_async_commit();
void cp_async_wait(int pending_groups);  // cp.async.wait_group N (wait_all: commit, then 0)
// Whether any byte of [p, p + bytes) of shared memory is the target of a copy not waited for.
bool shared_pending(const void* p, size_t bytes);

// ---------------------------------------------------------------------------------------------
// Host launch (the emulation form of kernel<<<grid, block, smem, stream>>>(args...)).

std::string kernel_symbol(const void* kernel);
cudaError_t run_grid(const void* kernel, const std::string& name, dim3 grid, dim3 block,
                     size_t shared_bytes, void (*body)(void*), void* context);
// Detail of the last failed launch of this OS thread (cudaGetErrorString returns it).
const std::string& last_failure();

template <class... Params, class... Args>
cudaError_t launch(void (*kernel)(Params...), dim3 grid, dim3 block, size_t shared_bytes,
                   Args&&... args) {
  // The kernel's parameters, converted as a launch would and kept for the whole grid; every
  // thread receives its own copy (by-value parameters, as in the parameter space).
  struct Context {
    void (*kernel)(Params...);
    std::tuple<std::decay_t<Params>...> params;
  } context{kernel, std::tuple<std::decay_t<Params>...>(std::forward<Args>(args)...)};
  auto body = [](void* c) {
    auto* ctx = static_cast<Context*>(c);
    std::apply(ctx->kernel, ctx->params);
  };
  const void* key = reinterpret_cast<const void*>(kernel);
  return run_grid(key, kernel_symbol(key), grid, block, shared_bytes, body, &context);
}

// ---------------------------------------------------------------------------------------------
// Warp built-ins.

int lane_id();
enum class ShflMode : int { kIdx = 0, kUp = 1, kDown = 2, kBfly = 3 };
// One 64-bit payload per lane: every shuffled type of nattn fits.
uint64_t shfl_bits(ShflMode mode, unsigned mask, uint64_t bits, int operand, int width);

template <class T>
T shfl(ShflMode mode, unsigned mask, T value, int operand, int width) {
  static_assert(sizeof(T) <= 8 && std::is_trivially_copyable_v<T>, "shuffled type");
  uint64_t bits = 0;
  std::memcpy(&bits, &value, sizeof(T));
  bits = shfl_bits(mode, mask, bits, operand, width);
  std::memcpy(&value, &bits, sizeof(T));
  return value;
}

}  // namespace nattn::emu

// The C++ overloads of the runtime API taking a kernel's function pointer, which cuda_runtime.h
// declares for nvcc only.
template <class T>
cudaError_t cudaFuncSetAttribute(T* entry, cudaFuncAttribute attr, int value) {
  return ::cudaFuncSetAttribute(reinterpret_cast<const void*>(entry), attr, value);
}
template <class T>
cudaError_t cudaFuncGetAttributes(cudaFuncAttributes* attr, T* entry) {
  return ::cudaFuncGetAttributes(attr, reinterpret_cast<const void*>(entry));
}

// ---------------------------------------------------------------------------------------------
// CUDA's built-in variables and intrinsics, as host definitions. The CUDA headers declare the
// variables for host compilers too (extern const); the macros take precedence in kernel code.
#define threadIdx (::nattn::emu::self().thread_idx)
#define blockIdx (::nattn::emu::block_index())
#define blockDim (::nattn::emu::block_dim())
#define gridDim (::nattn::emu::grid_dim())
#define warpSize 32
#ifndef __launch_bounds__
#define __launch_bounds__(...)
#endif
#undef __grid_constant__
#define __grid_constant__
// The shared-window address of a generic pointer into the CTA's shared memory (CUDA's
// intrinsic, which cuda_runtime.h declares for device code only). CuTe's cast_smem_ptr_to_uint
// calls it when CUTE_CVTA_GENERIC_TO_SHARED_ACTIVATED is set (sm90 seam).
inline size_t __cvta_generic_to_shared(const void* p) { return ::nattn::emu::shared_address(p); }

inline void __syncthreads() {
  const dim3 b = ::nattn::emu::block_dim();
  ::nattn::emu::barrier_sync(0, static_cast<int>(b.x * b.y * b.z));
}
void __syncwarp(unsigned mask = 0xffffffffu);
template <class T>
T __shfl_sync(unsigned mask, T var, int src_lane, int width = 32) {
  return ::nattn::emu::shfl(::nattn::emu::ShflMode::kIdx, mask, var, src_lane, width);
}
template <class T>
T __shfl_up_sync(unsigned mask, T var, unsigned delta, int width = 32) {
  return ::nattn::emu::shfl(::nattn::emu::ShflMode::kUp, mask, var, static_cast<int>(delta),
                            width);
}
template <class T>
T __shfl_down_sync(unsigned mask, T var, unsigned delta, int width = 32) {
  return ::nattn::emu::shfl(::nattn::emu::ShflMode::kDown, mask, var, static_cast<int>(delta),
                            width);
}
template <class T>
T __shfl_xor_sync(unsigned mask, T var, int lane_mask, int width = 32) {
  return ::nattn::emu::shfl(::nattn::emu::ShflMode::kBfly, mask, var, lane_mask, width);
}
