// The emulator's execution model (runtime.h): grids, CTAs of fibers, barriers, warp rendezvous,
// cp.async visibility, launch checks, and the subset of the CUDA runtime API the host code of
// csrc/cuda calls.
//
// Fibers: Boost.Context (boost::context::fiber). Chosen over ucontext because a switch costs
// about 7 ns against 245 ns for swapcontext on the 2-core CI machine (swapcontext saves the
// signal mask with a system call on every switch), and a warp collective is 32 switches: the
// emulated GPU sweep spends most of its time there. Boost.Context is a well-kept, widely used
// library, in Debian as libboost-context-dev, and linked statically into nattn._emu.
#include "emu/runtime.h"

#include <dlfcn.h>
#include <sys/mman.h>
#include <unistd.h>

#include <algorithm>
#include <boost/context/fiber.hpp>
#include <boost/context/stack_context.hpp>
#include <cxxabi.h>
#include <map>
#include <memory>
#include <mutex>
#include <random>
#include <sstream>

namespace nattn::emu {
namespace ctx = boost::context;

namespace {

// Stacks of 256 KiB with a guard page below, kept in a pool across CTAs (an mmap per fiber per
// CTA would cost more than many small kernels). An overflow hits the guard page and crashes
// loudly instead of corrupting a neighbour.
constexpr size_t kStackBytes = 256 * 1024;

struct StackPool {
  std::vector<void*> free;  // base of each mapping (guard page first)
  size_t page = static_cast<size_t>(sysconf(_SC_PAGESIZE));
  ~StackPool() {
    for (void* p : free) munmap(p, kStackBytes + page);
  }
  void* take() {
    if (!free.empty()) {
      void* p = free.back();
      free.pop_back();
      return p;
    }
    void* p = mmap(nullptr, kStackBytes + page, PROT_READ | PROT_WRITE,
                   MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (p == MAP_FAILED) throw std::bad_alloc();
    mprotect(p, page, PROT_NONE);
    return p;
  }
};
thread_local StackPool t_stacks;

struct PooledStack {
  ctx::stack_context allocate() {
    void* base = t_stacks.take();
    ctx::stack_context sc;
    sc.size = kStackBytes;
    sc.sp = static_cast<char*>(base) + t_stacks.page + kStackBytes;
    return sc;
  }
  void deallocate(ctx::stack_context& sc) noexcept {
    t_stacks.free.push_back(static_cast<char*>(sc.sp) - kStackBytes - t_stacks.page);
  }
};

// Thrown inside a fiber to unwind it when its launch is aborted.
struct Abort {};

enum class Status { kRunnable, kBlocked, kDone };

struct Slot {
  Thread thread;
  ctx::fiber fiber;      // the thread's fiber while it is suspended
  ctx::fiber scheduler;  // the scheduler's continuation while the thread runs
  Status status = Status::kRunnable;
  // What a blocked thread waits for (for messages only): a collective or a barrier.
  const CollectiveKind* waiting_kind = nullptr;
  unsigned waiting_mask = 0;
  int waiting_barrier = -1;
  int waiting_count = 0;
  std::string waiting_what;  // any other wait (setmaxnreg, warpgroup), already described
  bool waiting_mbarrier = false;  // an mbarrier wait, described when reported
  uint32_t mbarrier_addr = 0;
  uint32_t mbarrier_parity = 0;
};

struct PendingRendezvous {
  Rendezvous r;
  unsigned arrived = 0;
};

struct BarrierState {
  int count = 0;
  int arrived = 0;
  std::vector<int> waiters;
};

struct TxCopy {
  uint32_t dst;
  std::vector<unsigned char> data;
  int64_t tx_bytes;
};

struct Mbarrier {
  int expected = 0;
  int pending = 0;
  int64_t tx = 0;
  int64_t phase = 0;  // completed phases
  std::vector<TxCopy> copies;  // asynchronous copies whose transactions have not completed
  std::vector<int> waiters;
};

struct PendingWarpgroup {
  WarpgroupRendezvous r;
  void (*exec)(WarpgroupRendezvous&) = nullptr;
  int arrived = 0;
  bool active = false;
};

struct RegisterRequest {
  int n = 0;
  bool pending = false;
  std::vector<int> waiters;
};

}  // namespace

struct Cta {
  std::string kernel;
  LaunchRecord* record = nullptr;
  uint3 block_idx{0, 0, 0};
  dim3 block_dim{1, 1, 1};
  dim3 grid_dim{1, 1, 1};
  std::vector<unsigned char>* shared = nullptr;  // storage of the dynamic shared memory
  // Its first byte, at shared address kSharedBase. Placed so that generic and shared-window
  // addresses agree modulo 4096, as on a GPU, where the shared window is aligned: code that
  // swizzles by generic address (CuTe's swizzled smem pointers) and hardware that swizzles by
  // shared address (TMA, wgmma) then see the same pattern.
  unsigned char* shared_base = nullptr;
  std::vector<uint16_t>* shared_pending = nullptr;  // per byte: copies not yet waited for
  int64_t shared_bytes = 0;
  std::vector<std::unique_ptr<Slot>> slots;
  std::vector<unsigned> exited;  // per warp, lanes that have exited
  std::vector<std::vector<PendingRendezvous>> rendezvous;  // per warp
  std::map<int, BarrierState> barriers;
  std::map<uint32_t, Mbarrier> mbarriers;  // by shared address
  std::vector<PendingWarpgroup> warpgroups;  // per warpgroup: its open rendezvous
  std::vector<int> registers;                // per warpgroup: registers per thread (setmaxnreg)
  std::vector<RegisterRequest> register_requests;  // per warpgroup: an inc not yet granted
  std::string error;
  bool aborting = false;
  Slot* running = nullptr;

  int threads() const { return static_cast<int>(slots.size()); }
  unsigned lanes_of(int warp) const {
    const int n = std::min(32, threads() - 32 * warp);
    return n >= 32 ? 0xffffffffu : ((1u << n) - 1u);
  }
};

namespace {

thread_local Cta* t_cta = nullptr;
thread_local std::string t_last_failure;
thread_local cudaError_t t_last_error = cudaSuccess;
thread_local cudaError_t t_last_failure_code = cudaSuccess;
thread_local int t_device = 0;

std::mutex g_attr_mutex;
std::map<const void*, int> g_max_dynamic_shared;  // cudaFuncAttributeMaxDynamicSharedMemorySize

std::string hex(unsigned x) {
  std::ostringstream s;
  s << "0x" << std::hex << x;
  return s.str();
}

// "0-15" / "3" / "0-3, 8" for a set of lane or thread indices.
std::string ranges(const std::vector<int>& ids) {
  std::ostringstream s;
  for (size_t i = 0; i < ids.size();) {
    size_t j = i;
    while (j + 1 < ids.size() && ids[j + 1] == ids[j] + 1) ++j;
    if (i) s << ", ";
    s << ids[i];
    if (j > i) s << "-" << ids[j];
    i = j + 1;
  }
  return s.str();
}
std::string lanes(unsigned mask) {
  std::vector<int> ids;
  for (int l = 0; l < 32; ++l) {
    if (mask & (1u << l)) ids.push_back(l);
  }
  return ranges(ids);
}

Cta& cta() {
  if (t_cta == nullptr || t_cta->running == nullptr) {
    throw std::logic_error("nattn emulator: a device function was called outside a kernel");
  }
  return *t_cta;
}

void record_error(Cta& c, const std::string& message) {
  if (!c.error.empty()) return;
  std::ostringstream s;
  s << "emulated kernel " << c.kernel << ", block (" << c.block_idx.x << ", " << c.block_idx.y
    << ", " << c.block_idx.z << "): " << message;
  c.error = s.str();
  c.aborting = true;
}

std::string mbarrier_wait_state(Cta& c, uint32_t addr, uint32_t parity);

std::string waiting(Cta& c, const Slot& s) {
  if (s.waiting_mbarrier) return mbarrier_wait_state(c, s.mbarrier_addr, s.mbarrier_parity);
  if (!s.waiting_what.empty()) return s.waiting_what;
  if (s.waiting_kind) {
    return std::string(s.waiting_kind->name) + " (membermask " + hex(s.waiting_mask) +
           ") in warp " + std::to_string(s.thread.linear / 32);
  }
  return "bar.sync " + std::to_string(s.waiting_barrier) + " (" +
         std::to_string(s.waiting_count) + " threads expected)";
}

// Suspends the running thread until the scheduler resumes it; unwinds it if the launch aborts.
void block() {
  Cta& c = cta();
  Slot* s = c.running;
  s->status = Status::kBlocked;
  s->scheduler = std::move(s->scheduler).resume();
  t_cta = &c;
  c.running = s;
  s->waiting_mbarrier = false;
  if (c.aborting) throw Abort{};
}

void wake(Cta& c, int thread) {
  Slot& s = *c.slots[thread];
  if (s.status == Status::kBlocked) s.status = Status::kRunnable;
}

void land(Cta& c, Thread::PendingCopy& copy) {
  std::memcpy(copy.dst, copy.data, copy.bytes);
  const size_t offset = copy.dst - c.shared_base;
  for (int i = 0; i < copy.bytes; ++i) --(*c.shared_pending)[offset + i];
}

void thread_exit(Cta& c, Slot& s) {
  // Copies never waited for land at exit (the CTA's shared memory is gone afterwards anyway).
  for (auto& copy : s.thread.copies) land(c, copy);
  s.thread.copies.clear();
  const int warp = s.thread.linear / 32, lane = s.thread.linear % 32;
  c.exited[warp] |= 1u << lane;
  const PendingWarpgroup& wg = c.warpgroups[s.thread.linear / 128];
  if (wg.active) {
    record_error(c, "thread " + std::to_string(s.thread.linear) + " exited while " +
                        std::to_string(wg.arrived) + " threads of warpgroup " +
                        std::to_string(s.thread.linear / 128) + " wait for it at " +
                        wg.r.kind->name);
  }
  // wgmma results never waited for are lost with the thread's registers.
  s.thread.wgmma.clear();
  for (const PendingRendezvous& p : c.rendezvous[warp]) {
    if (p.r.mask & (1u << lane)) {
      record_error(c, "lane " + std::to_string(lane) + " of warp " + std::to_string(warp) +
                          " exited while lanes " + lanes(p.arrived) + " wait for it at " +
                          p.r.kind->name + " (membermask " + hex(p.r.mask) + ")");
    }
  }
}

// Why a CTA whose live threads all wait can never continue.
std::string deadlock_report(Cta& c) {
  std::map<std::string, std::vector<int>> by_state;
  for (const auto& s : c.slots) {
    by_state[s->status == Status::kDone ? std::string("exited") : waiting(c, *s)].push_back(
        s->thread.linear);
  }
  std::ostringstream out;
  bool barrier = false;
  for (const auto& [id, b] : c.barriers) barrier = barrier || b.arrived > 0;
  out << (barrier ? "a barrier not reached by every thread (deadlock): "
                  : "deadlock, every live thread waits: ");
  bool first = true;
  for (const auto& [state, ids] : by_state) {
    out << (first ? "" : "; ") << "threads " << ranges(ids) << ": " << state;
    first = false;
  }
  return out.str();
}

std::string demangle(const char* name) {
  int status = 0;
  char* d = abi::__cxa_demangle(name, nullptr, nullptr, &status);
  std::string out = status == 0 && d ? d : name;
  std::free(d);
  return out;
}

void set_failure(cudaError_t code, const std::string& detail) {
  t_last_error = code;
  t_last_failure_code = code;
  t_last_failure = detail;
}

}  // namespace

// ---------------------------------------------------------------------------------------------

Settings& settings() {
  static Settings s;
  return s;
}

std::vector<LaunchRecord>& launch_log() {
  static std::vector<LaunchRecord> log;
  return log;
}

ArchLimits arch_limits(int arch) {
  ArchLimits l;
  // Opt-in shared memory per block (CUDA programming guide, compute capability table).
  l.max_shared_optin = arch >= 90 ? 227 * 1024 : arch == 80 ? 163 * 1024 : 99 * 1024;
  return l;
}

Thread& self() { return cta().running->thread; }
uint3 block_index() { return cta().block_idx; }
dim3 block_dim() { return cta().block_dim; }
dim3 grid_dim() { return cta().grid_dim; }
int lane_id() { return self().linear % 32; }

void fail(const std::string& message) {
  Cta& c = cta();
  record_error(c, "thread " + std::to_string(c.running->thread.linear) + ": " + message);
  throw Abort{};
}

void* dynamic_shared(const char* name) {
  Cta& c = cta();
  if (name != nullptr && c.kernel.find('(') == std::string::npos) c.kernel = name;
  return c.shared_base;
}
int64_t dynamic_shared_bytes() { return cta().shared_bytes; }

bool in_shared(const void* p, size_t bytes) {
  Cta& c = cta();
  const auto* b = static_cast<const unsigned char*>(p);
  return b >= c.shared_base && b + bytes <= c.shared_base + c.shared_bytes;
}

void barrier_sync(int id, int count) {
  Cta& c = cta();
  if (count <= 0 || count > c.threads() || (count % 32 != 0 && count != c.threads())) {
    fail("bar.sync " + std::to_string(id) + " with thread count " + std::to_string(count) +
         " (must be a multiple of 32, at most the CTA's " + std::to_string(c.threads()) + ")");
  }
  BarrierState& b = c.barriers[id];
  if (b.arrived > 0 && b.count != count) {
    fail("bar.sync " + std::to_string(id) + " with thread count " + std::to_string(count) +
         " while " + std::to_string(b.arrived) + " threads wait there with count " +
         std::to_string(b.count));
  }
  b.count = count;
  if (++b.arrived == count) {
    for (int t : b.waiters) wake(c, t);
    b.waiters.clear();
    b.arrived = 0;
    return;
  }
  b.waiters.push_back(c.running->thread.linear);
  c.running->waiting_kind = nullptr;
  c.running->waiting_what.clear();
  c.running->waiting_barrier = id;
  c.running->waiting_count = count;
  block();
}

void barrier_arrive(int id, int count) {
  Cta& c = cta();
  if (count <= 0 || count > c.threads() || count % 32 != 0) {
    fail("bar.arrive " + std::to_string(id) + " with thread count " + std::to_string(count) +
         " (must be a multiple of 32, at most the CTA's " + std::to_string(c.threads()) + ")");
  }
  BarrierState& b = c.barriers[id];
  if (b.arrived > 0 && b.count != count) {
    fail("bar.arrive " + std::to_string(id) + " with thread count " + std::to_string(count) +
         " while " + std::to_string(b.arrived) + " threads wait there with count " +
         std::to_string(b.count));
  }
  b.count = count;
  if (++b.arrived == count) {
    for (int t : b.waiters) wake(c, t);
    b.waiters.clear();
    b.arrived = 0;
  }
}

void collective(const CollectiveKind& kind, unsigned mask, const void* in, void* out) {
  Cta& c = cta();
  const int linear = c.running->thread.linear;
  const int warp = linear / 32, lane = linear % 32;
  const unsigned exists = c.lanes_of(warp);
  auto what = [&] { return std::string(kind.name) + " (membermask " + hex(mask) + ")"; };
  if (!(mask & (1u << lane))) fail(what() + ": the executing lane " + std::to_string(lane) +
                                   " is not in the membermask");
  if (mask & ~exists) {
    fail(what() + " names lanes " + lanes(mask & ~exists) + ", which this partial warp of " +
         std::to_string(__builtin_popcount(exists)) + " threads does not have");
  }
  if (kind.aligned && mask != 0xffffffffu) {
    fail(what() + ": an .aligned instruction needs all 32 lanes of a full warp");
  }
  if (mask & c.exited[warp]) {
    fail(what() + " names lanes " + lanes(mask & c.exited[warp]) + ", which have exited");
  }
  auto& pending = c.rendezvous[warp];
  PendingRendezvous* p = nullptr;
  for (auto& q : pending) {
    if (!(q.r.mask & mask)) continue;
    if (q.r.mask != mask) {
      fail("lane " + std::to_string(lane) + " arrives at " + what() + " while lanes " +
           lanes(q.arrived) + " wait at " + q.r.kind->name + " with membermask " +
           hex(q.r.mask) + ": the lanes disagree on the membermask");
    }
    if (q.r.kind != &kind) {
      fail("divergent warp collective in warp " + std::to_string(warp) + ": lanes " +
           lanes(q.arrived) + " wait at " + q.r.kind->name + ", lane " + std::to_string(lane) +
           " arrives at " + kind.name + " (membermask " + hex(mask) + ")");
    }
    p = &q;
  }
  if (p == nullptr) {
    pending.emplace_back();
    p = &pending.back();
    p->r.kind = &kind;
    p->r.mask = mask;
    p->r.warp = warp;
  }
  p->r.in[lane] = in;
  p->r.out[lane] = out;
  p->arrived |= 1u << lane;
  if (p->arrived == mask) {
    Rendezvous r = p->r;
    pending.erase(pending.begin() + (p - pending.data()));
    kind.exec(r);
    for (int l = 0; l < 32; ++l) {
      if ((mask & (1u << l)) && l != lane) wake(c, 32 * warp + l);
    }
    return;
  }
  c.running->waiting_kind = &kind;
  c.running->waiting_what.clear();
  c.running->waiting_mask = mask;
  block();
}

void warpgroup_collective(const CollectiveKind& kind, void (*exec)(WarpgroupRendezvous&),
                          const void* in, void* out) {
  Cta& c = cta();
  const int linear = c.running->thread.linear;
  const int wg = linear / 128, rank = linear % 128;
  if (c.threads() < 128 * (wg + 1)) {
    fail(std::string(kind.name) + " in a partial warpgroup (the CTA has " +
         std::to_string(c.threads()) + " threads; a warpgroup is 4 whole warps)");
  }
  for (int w = 4 * wg; w < 4 * wg + 4; ++w) {
    if (c.exited[w]) {
      fail(std::string(kind.name) + ": lanes " + lanes(c.exited[w]) + " of warp " +
           std::to_string(w) + " of warpgroup " + std::to_string(wg) +
           " have exited (.sync.aligned needs all 128 threads)");
    }
  }
  PendingWarpgroup& p = c.warpgroups[wg];
  if (p.active && p.r.kind != &kind) {
    fail("divergent warpgroup instruction in warpgroup " + std::to_string(wg) + ": " +
         std::to_string(p.arrived) + " threads wait at " + p.r.kind->name + ", thread " +
         std::to_string(linear) + " arrives at " + kind.name);
  }
  if (!p.active) {
    p = PendingWarpgroup{};
    p.active = true;
    p.r.kind = &kind;
    p.r.warpgroup = wg;
    p.exec = exec;
  }
  p.r.in[rank] = in;
  p.r.out[rank] = out;
  if (++p.arrived == 128) {
    WarpgroupRendezvous r = p.r;
    p.active = false;
    p.arrived = 0;
    exec(r);
    for (int t = 128 * wg; t < 128 * wg + 128; ++t) {
      if (t != linear) wake(c, t);
    }
    return;
  }
  c.running->waiting_kind = &kind;
  c.running->waiting_what = std::string(kind.name) + " (warpgroup " + std::to_string(wg) + ")";
  block();
}

uint32_t shared_address(const void* p) {
  Cta& c = cta();
  const auto* b = static_cast<const unsigned char*>(p);
  if (b < c.shared_base || b > c.shared_base + c.shared_bytes) {
    fail("__cvta_generic_to_shared of a pointer outside the CTA's shared memory");
  }
  return kSharedBase + static_cast<uint32_t>(b - c.shared_base);
}

unsigned char* shared_pointer(uint32_t addr, size_t bytes, const char* what) {
  Cta& c = cta();
  if (addr < kSharedBase || addr - kSharedBase + bytes > static_cast<size_t>(c.shared_bytes)) {
    std::ostringstream s;
    s << what << ": shared address 0x" << std::hex << addr << std::dec << " (+" << bytes
      << " bytes) is outside the CTA's dynamic shared memory [0x" << std::hex << kSharedBase
      << ", 0x" << kSharedBase + c.shared_bytes << ")";
    fail(s.str());
  }
  return c.shared_base + (addr - kSharedBase);
}

void mark_shared_pending(uint32_t addr, size_t bytes, int delta) {
  Cta& c = cta();
  const size_t offset = addr - kSharedBase;
  for (size_t i = 0; i < bytes; ++i) (*c.shared_pending)[offset + i] += delta;
}

namespace {

std::string mbarrier_name(uint32_t addr) {
  std::ostringstream s;
  s << "the mbarrier at shared address 0x" << std::hex << addr;
  return s.str();
}

std::string mbarrier_wait_state(Cta& c, uint32_t addr, uint32_t parity) {
  std::ostringstream s;
  s << "mbarrier.try_wait.parity " << parity << " on " << mbarrier_name(addr);
  auto it = c.mbarriers.find(addr);
  if (it != c.mbarriers.end()) {
    const Mbarrier& m = it->second;
    s << " (phase " << m.phase << ", " << m.pending << " of " << m.expected
      << " arrivals pending, transaction count " << m.tx << ")";
  }
  return s.str();
}

Mbarrier& find_mbarrier(Cta& c, uint32_t addr, const char* op) {
  if (addr % 8 != 0) fail(std::string(op) + ": " + mbarrier_name(addr) + " is not 8-byte aligned");
  shared_pointer(addr, 8, op);
  auto it = c.mbarriers.find(addr);
  if (it == c.mbarriers.end()) {
    fail(std::string(op) + " on " + mbarrier_name(addr) + ", which mbarrier.init never initialized");
  }
  return it->second;
}

void complete_phase_if_done(Cta& c, Mbarrier& m) {
  if (m.pending == 0 && m.tx == 0) {
    ++m.phase;
    m.pending = m.expected;
    for (int t : m.waiters) wake(c, t);
    m.waiters.clear();
  }
}

// The transactions of every asynchronous copy to `m` complete: the bytes land.
void deliver(Cta& c, Mbarrier& m) {
  std::vector<TxCopy> copies = std::move(m.copies);
  m.copies.clear();
  for (TxCopy& copy : copies) {
    std::memcpy(c.shared_base + (copy.dst - kSharedBase), copy.data.data(), copy.data.size());
    mark_shared_pending(copy.dst, copy.data.size(), -1);
    m.tx -= copy.tx_bytes;
    if (m.tx < -((int64_t{1} << 20) - 1)) fail("mbarrier transaction count below -(2^20 - 1)");
    complete_phase_if_done(c, m);
  }
}

}  // namespace

void mbarrier_init(uint32_t addr, int count) {
  Cta& c = cta();
  if (addr % 8 != 0) fail("mbarrier.init: " + mbarrier_name(addr) + " is not 8-byte aligned");
  shared_pointer(addr, 8, "mbarrier.init");
  if (count < 1 || count > (1 << 20) - 1) {
    fail("mbarrier.init with count " + std::to_string(count) + " (1 .. 2^20 - 1)");
  }
  Mbarrier& m = c.mbarriers[addr];
  if (!m.waiters.empty() || !m.copies.empty()) {
    fail("mbarrier.init of " + mbarrier_name(addr) + " while threads or copies use it");
  }
  m = Mbarrier{};
  m.expected = m.pending = count;
}

void mbarrier_arrive(uint32_t addr, int count) {
  Cta& c = cta();
  Mbarrier& m = find_mbarrier(c, addr, "mbarrier.arrive");
  if (count > m.pending) {
    fail("mbarrier.arrive with count " + std::to_string(count) + " on " + mbarrier_name(addr) +
         ", which expects only " + std::to_string(m.pending) +
         " more arrivals in this phase (more arrivals than its init count)");
  }
  m.pending -= count;
  complete_phase_if_done(c, m);
}

void mbarrier_expect_tx(uint32_t addr, int64_t bytes) {
  Cta& c = cta();
  Mbarrier& m = find_mbarrier(c, addr, "mbarrier.expect_tx");
  if (bytes < 0 || m.tx + bytes > (int64_t{1} << 20) - 1) {
    fail("mbarrier.expect_tx of " + std::to_string(bytes) + " bytes takes the transaction count of " +
         mbarrier_name(addr) + " past 2^20 - 1");
  }
  m.tx += bytes;
}

void mbarrier_complete_tx(uint32_t addr, int64_t bytes) {
  Cta& c = cta();
  Mbarrier& m = find_mbarrier(c, addr, "mbarrier.complete_tx");
  m.tx -= bytes;
  complete_phase_if_done(c, m);
}

bool mbarrier_test_parity(uint32_t addr, uint32_t parity) {
  Cta& c = cta();
  Mbarrier& m = find_mbarrier(c, addr, "mbarrier.test_wait.parity");
  deliver(c, m);
  return static_cast<uint32_t>(m.phase & 1) != (parity & 1);
}

void mbarrier_wait_parity(uint32_t addr, uint32_t parity) {
  Cta& c = cta();
  for (;;) {
    Mbarrier& m = find_mbarrier(c, addr, "mbarrier.try_wait.parity");
    deliver(c, m);
    if (static_cast<uint32_t>(m.phase & 1) != (parity & 1)) return;
    m.waiters.push_back(c.running->thread.linear);
    c.running->waiting_kind = nullptr;
    c.running->waiting_mbarrier = true;
    c.running->mbarrier_addr = addr;
    c.running->mbarrier_parity = parity & 1;
    block();
  }
}

void async_tx_copy(uint32_t mbar, uint32_t dst, std::vector<unsigned char>&& data,
                   int64_t tx_bytes) {
  Cta& c = cta();
  Mbarrier& m = find_mbarrier(c, mbar, "complete_tx::bytes");
  shared_pointer(dst, data.size(), "asynchronous copy destination");
  std::memset(c.shared_base + (dst - kSharedBase), 0xff, data.size());
  mark_shared_pending(dst, data.size(), +1);
  m.copies.push_back(TxCopy{dst, std::move(data), tx_bytes});
  if (!m.waiters.empty()) deliver(c, m);
}

namespace {

int total_registers(const Cta& c) {
  int total = 0;
  for (int r : c.registers) total += 128 * r;
  return total;
}

// Grants the pending setmaxnreg.inc requests the register file can now hold.
void grant_registers(Cta& c) {
  for (size_t wg = 0; wg < c.register_requests.size(); ++wg) {
    RegisterRequest& q = c.register_requests[wg];
    if (!q.pending) continue;
    if (total_registers(c) - 128 * c.registers[wg] + 128 * q.n > 65536) continue;
    c.registers[wg] = q.n;
    q.pending = false;
    for (int t : q.waiters) wake(c, t);
    q.waiters.clear();
  }
}

struct SetmaxnregIn {
  bool inc;
  int n;
};

void setmaxnreg_exec(WarpgroupRendezvous& r) {
  Cta& c = cta();
  const auto& first = *static_cast<const SetmaxnregIn*>(r.in[0]);
  for (int i = 1; i < 128; ++i) {
    const auto& in = *static_cast<const SetmaxnregIn*>(r.in[i]);
    if (in.inc != first.inc || in.n != first.n) {
      fail("setmaxnreg: the threads of warpgroup " + std::to_string(r.warpgroup) +
           " disagree on the register count (it must be warpgroup-uniform)");
    }
  }
  const char* op = first.inc ? "setmaxnreg.inc" : "setmaxnreg.dec";
  if (first.n < 24 || first.n > 256 || first.n % 8 != 0) {
    fail(std::string(op) + " " + std::to_string(first.n) +
         ": the count must be a multiple of 8 in [24, 256]");
  }
  const int now = c.registers[r.warpgroup];
  if (first.inc ? first.n < now : first.n > now) {
    fail(std::string(op) + " " + std::to_string(first.n) + " in warpgroup " +
         std::to_string(r.warpgroup) + ", which holds " + std::to_string(now) +
         " registers per thread (inc must not lower, dec must not raise the count)");
  }
  if (!first.inc) {
    c.registers[r.warpgroup] = first.n;
    grant_registers(c);
    return;
  }
  RegisterRequest& q = c.register_requests[r.warpgroup];
  q.n = first.n;
  q.pending = true;
  grant_registers(c);
}

const CollectiveKind kSetmaxnreg{"setmaxnreg.sync.aligned.u32", true, nullptr};

}  // namespace

void setmaxnreg(bool inc, int n) {
  const SetmaxnregIn in{inc, n};
  warpgroup_collective(kSetmaxnreg, setmaxnreg_exec, &in, nullptr);
  Cta& c = cta();
  const int wg = c.running->thread.linear / 128;
  RegisterRequest& q = c.register_requests[wg];
  while (q.pending) {
    q.waiters.push_back(c.running->thread.linear);
    c.running->waiting_kind = nullptr;
    c.running->waiting_what =
        "setmaxnreg.inc " + std::to_string(q.n) + " in warpgroup " + std::to_string(wg) +
        " (the register file holds " + std::to_string(total_registers(c)) +
        " of 65536 registers; other warpgroups must release some first)";
    block();
  }
}

bool wgmma_reads_shared(uint32_t begin, uint32_t end) {
  Cta& c = cta();
  for (const auto& slot : c.slots) {
    for (const Thread::PendingWgmma& w : slot->thread.wgmma) {
      if (w.smem_begin < end && begin < w.smem_end) return true;
    }
  }
  return false;
}

void count_wgmma() { ++cta().record->wgmma; }
void count_tma(int64_t bytes) { cta().record->tma_bytes += bytes; }

void count_global_store(size_t bytes) {
  cta().record->global_store_bytes += static_cast<int64_t>(bytes);
}
void count_mma() { ++cta().record->mma; }
void count_ldmatrix() { ++cta().record->ldmatrix; }
void count_cp_async(int64_t bytes) { cta().record->cp_async_bytes += bytes; }

void cp_async(void* dst, const void* src, int bytes, int src_bytes) {
  Cta& c = cta();
  if (bytes != 4 && bytes != 8 && bytes != 16) fail("cp.async of " + std::to_string(bytes) +
                                                    " bytes (4, 8 or 16)");
  if (!in_shared(dst, bytes) || reinterpret_cast<uintptr_t>(dst) % bytes != 0) {
    fail("cp.async destination is not " + std::to_string(bytes) +
         "-byte aligned shared memory of this CTA");
  }
  if (src_bytes < 0 || src_bytes > bytes) fail("cp.async src-size out of range");
  if (src_bytes > 0 && reinterpret_cast<uintptr_t>(src) % bytes != 0) {
    fail("cp.async source is not " + std::to_string(bytes) + "-byte aligned");
  }
  Thread::PendingCopy copy{static_cast<unsigned char*>(dst), {}, bytes, -1};
  std::memcpy(copy.data, src, src_bytes);  // global memory does not change during a kernel
  std::memset(copy.data + src_bytes, 0, bytes - src_bytes);
  std::memset(dst, 0xff, bytes);  // not visible before its wait: a read sees the NaN pattern
  const size_t offset = copy.dst - c.shared_base;
  for (int i = 0; i < bytes; ++i) ++(*c.shared_pending)[offset + i];
  c.running->thread.copies.push_back(copy);
  count_cp_async(bytes);
}

void cp_async_commit() {
  Thread& t = self();
  for (auto& copy : t.copies) {
    if (copy.group < 0) copy.group = t.committed_groups;
  }
  ++t.committed_groups;
}

void cp_async_wait(int pending_groups) {
  Cta& c = cta();
  Thread& t = c.running->thread;
  const int64_t done_below = t.committed_groups - pending_groups;
  auto keep = t.copies.begin();
  for (auto it = t.copies.begin(); it != t.copies.end(); ++it) {
    if (it->group >= 0 && it->group < done_below) {
      land(c, *it);
    } else {
      *keep++ = *it;
    }
  }
  t.copies.erase(keep, t.copies.end());
}

bool shared_pending(const void* p, size_t bytes) {
  Cta& c = cta();
  const size_t offset = static_cast<const unsigned char*>(p) - c.shared_base;
  for (size_t i = 0; i < bytes; ++i) {
    if ((*c.shared_pending)[offset + i]) return true;
  }
  return false;
}

namespace {
struct ShflIn {
  uint64_t bits;
  int operand;
  int width;
  ShflMode mode;
};

// PTX ISA, shfl.sync: lane i reads lane j (idx: the segment's lane b; up: i - b; down: i + b;
// bfly: i ^ b) within its segment of `width` lanes; a j outside the segment reads lane i itself.
void shfl_exec(Rendezvous& r) {
  for (int i = 0; i < 32; ++i) {
    if (!(r.mask & (1u << i))) continue;
    const ShflIn& a = *static_cast<const ShflIn*>(r.in[i]);
    const int w = a.width;
    if (w < 1 || w > 32 || (w & (w - 1))) fail("shuffle width " + std::to_string(w));
    const int lo = i & ~(w - 1), hi = lo + w;
    int j = i;
    switch (a.mode) {
      case ShflMode::kIdx: j = lo + (a.operand & (w - 1)); break;
      case ShflMode::kUp: j = i - a.operand >= lo ? i - a.operand : i; break;
      case ShflMode::kDown: j = i + a.operand < hi ? i + a.operand : i; break;
      case ShflMode::kBfly: j = (i ^ a.operand) < hi ? (i ^ a.operand) : i; break;
    }
    if (j < 0 || j > 31 || !(r.mask & (1u << j))) {
      fail("lane " + std::to_string(i) + " shuffles from lane " + std::to_string(j) +
           ", which is not in the membermask " + hex(r.mask));
    }
    *static_cast<uint64_t*>(r.out[i]) = static_cast<const ShflIn*>(r.in[j])->bits;
  }
}

// One kind per mode: lanes of one mask at different shuffle modes are divergent.
const CollectiveKind kShfl[4] = {{"shfl.sync.idx", false, shfl_exec},
                                 {"shfl.sync.up", false, shfl_exec},
                                 {"shfl.sync.down", false, shfl_exec},
                                 {"shfl.sync.bfly", false, shfl_exec}};
}  // namespace

uint64_t shfl_bits(ShflMode mode, unsigned mask, uint64_t bits, int operand, int width) {
  const ShflIn in{bits, operand, width, mode};
  uint64_t out = 0;
  collective(kShfl[static_cast<int>(mode)], mask, &in, &out);
  return out;
}

std::string kernel_symbol(const void* kernel) {
  Dl_info info;
  if (dladdr(kernel, &info) && info.dli_sname) return demangle(info.dli_sname);
  std::ostringstream s;
  s << "kernel@" << kernel;
  return s.str();
}

const std::string& last_failure() { return t_last_failure; }

cudaError_t run_grid(const void* kernel, const std::string& name, dim3 grid, dim3 block,
                     size_t shared_bytes, void (*body)(void*), void* context) {
  const Settings& set = settings();
  const ArchLimits lim = arch_limits(set.arch);
  auto reject = [&](cudaError_t code, const std::string& why) {
    set_failure(code, "launch of " + name + " rejected: " + why);
    return code;
  };
  const int64_t threads = int64_t{block.x} * block.y * block.z;
  if (threads < 1 || threads > lim.max_threads_per_block || block.z > 64) {
    return reject(cudaErrorInvalidConfiguration,
                  std::to_string(threads) + " threads per block (limit " +
                      std::to_string(lim.max_threads_per_block) + ")");
  }
  if (grid.x < 1 || grid.y < 1 || grid.z < 1 || grid.x > lim.max_grid_x ||
      grid.y > lim.max_grid_yz || grid.z > lim.max_grid_yz) {
    return reject(cudaErrorInvalidConfiguration,
                  "grid (" + std::to_string(grid.x) + ", " + std::to_string(grid.y) + ", " +
                      std::to_string(grid.z) + ") is outside x <= 2^31 - 1, y, z <= 65535");
  }
  int64_t allowed = lim.default_shared;
  {
    std::lock_guard<std::mutex> lock(g_attr_mutex);
    auto it = g_max_dynamic_shared.find(kernel);
    if (it != g_max_dynamic_shared.end()) allowed = it->second;
  }
  if (static_cast<int64_t>(shared_bytes) > allowed) {
    return reject(cudaErrorInvalidValue,
                  std::to_string(shared_bytes) + " bytes of dynamic shared memory, over the " +
                      std::to_string(allowed) +
                      " allowed (above 48 KiB needs cudaFuncSetAttribute("
                      "cudaFuncAttributeMaxDynamicSharedMemorySize) first)");
  }

  launch_log().emplace_back();
  LaunchRecord& rec = launch_log().back();
  rec.kernel = name;
  rec.grid[0] = grid.x, rec.grid[1] = grid.y, rec.grid[2] = grid.z;
  rec.block[0] = block.x, rec.block[1] = block.y, rec.block[2] = block.z;
  rec.shared_bytes = static_cast<int64_t>(shared_bytes);

  const int64_t ctas = int64_t{grid.x} * grid.y * grid.z;
  std::vector<int64_t> order(static_cast<size_t>(ctas));
  for (int64_t i = 0; i < ctas; ++i) order[i] = i;
  std::mt19937_64 rng(set.seed);
  if (set.order == Order::kReverse) std::reverse(order.begin(), order.end());
  if (set.order == Order::kRandom) std::shuffle(order.begin(), order.end(), rng);

  constexpr size_t kWindowAlign = 4096;
  std::vector<unsigned char> shared(std::max<size_t>(shared_bytes, 16) + 2 * kWindowAlign);
  std::vector<uint16_t> pending(shared.size());
  unsigned char* shared_base = shared.data();
  while ((reinterpret_cast<uintptr_t>(shared_base) - kSharedBase) % kWindowAlign != 0) {
    ++shared_base;
  }
  Cta* outer = t_cta;
  std::vector<int> runnable;
  for (int64_t linear_cta : order) {
    Cta c;
    c.kernel = name;
    c.record = &rec;
    c.block_idx = uint3{static_cast<unsigned>(linear_cta % grid.x),
                        static_cast<unsigned>(linear_cta / grid.x % grid.y),
                        static_cast<unsigned>(linear_cta / (int64_t{grid.x} * grid.y))};
    c.block_dim = block;
    c.grid_dim = grid;
    std::fill(shared.begin(), shared.end(), 0xff);
    std::fill(pending.begin(), pending.end(), 0);
    c.shared = &shared;
    c.shared_base = shared_base;
    c.shared_pending = &pending;
    c.shared_bytes = static_cast<int64_t>(shared_bytes);
    const int n = static_cast<int>(threads);
    c.exited.assign((n + 31) / 32, 0u);
    c.rendezvous.resize((n + 31) / 32);
    const int warpgroups = (n + 127) / 128;
    c.warpgroups.resize(warpgroups);
    c.register_requests.resize(warpgroups);
    // Registers per thread at launch: what a kernel of this block size gets at one CTA per SM
    // (65536 / threads, a multiple of 8, at most 255), the setmaxnreg starting point.
    c.registers.assign(warpgroups, std::min(255, 65536 / n) / 8 * 8);
    c.slots.reserve(n);
    for (int t = 0; t < n; ++t) {
      auto slot = std::make_unique<Slot>();
      Slot* s = slot.get();
      s->thread.cta = &c;
      s->thread.linear = t;
      s->thread.thread_idx = uint3{t % block.x, t / block.x % block.y, t / (block.x * block.y)};
      s->fiber = ctx::fiber(std::allocator_arg, PooledStack{},
                            [s, &c, body, context](ctx::fiber&& scheduler) {
                              s->scheduler = std::move(scheduler);
                              t_cta = &c;
                              c.running = s;
                              try {
                                if (!c.aborting) body(context);
                              } catch (const Abort&) {
                              } catch (const std::exception& e) {
                                record_error(c, std::string("exception: ") + e.what());
                              }
                              s->status = Status::kDone;
                              if (!c.aborting) thread_exit(c, *s);
                              return std::move(s->scheduler);
                            });
      c.slots.push_back(std::move(slot));
    }
    // Rounds: run every runnable thread, in the order of the settings, until it blocks.
    int live = n;
    while (live > 0) {
      runnable.clear();
      for (int t = 0; t < n; ++t) {
        if (c.slots[t]->status == Status::kRunnable) runnable.push_back(t);
      }
      if (runnable.empty()) {
        record_error(c, deadlock_report(c));
        for (int t = 0; t < n; ++t) {
          if (c.slots[t]->status == Status::kBlocked) runnable.push_back(t);
        }
      }
      if (set.order == Order::kReverse) std::reverse(runnable.begin(), runnable.end());
      if (set.order == Order::kRandom) std::shuffle(runnable.begin(), runnable.end(), rng);
      for (int t : runnable) {
        Slot& s = *c.slots[t];
        if (s.status == Status::kDone) continue;
        if (s.status == Status::kBlocked && !c.aborting) continue;
        s.status = Status::kRunnable;
        t_cta = &c;
        c.running = &s;
        s.fiber = std::move(s.fiber).resume();
        c.running = nullptr;
        if (s.status == Status::kDone) --live;
      }
      if (c.aborting) {
        // Unwind every suspended thread (each throws Abort where it waits), then stop.
        for (int t = 0; t < n; ++t) {
          Slot& s = *c.slots[t];
          while (s.status != Status::kDone) {
            t_cta = &c;
            c.running = &s;
            s.fiber = std::move(s.fiber).resume();
            c.running = nullptr;
          }
        }
        live = 0;
      }
    }
    t_cta = outer;
    if (!c.error.empty()) {
      set_failure(cudaErrorLaunchFailure, c.error);
      return cudaErrorLaunchFailure;
    }
  }
  return cudaSuccess;
}

}  // namespace nattn::emu

using nattn::emu::settings;

void __syncwarp(unsigned mask) {
  static const nattn::emu::CollectiveKind kind{"bar.warp.sync", false,
                                               [](nattn::emu::Rendezvous&) {}};
  nattn::emu::collective(kind, mask, nullptr, nullptr);
}

// ---------------------------------------------------------------------------------------------
// The CUDA runtime API as the host code of csrc/cuda uses it, on one emulated device whose
// compute capability is settings().arch.

extern "C" {

cudaError_t cudaGetDeviceCount(int* count) {
  *count = 1;
  return cudaSuccess;
}
cudaError_t cudaGetDevice(int* device) {
  *device = nattn::emu::t_device;
  return cudaSuccess;
}
cudaError_t cudaSetDevice(int device) {
  if (device != 0) return nattn::emu::t_last_error = cudaErrorInvalidDevice;
  return cudaSuccess;
}
cudaError_t cudaDeviceGetAttribute(int* value, cudaDeviceAttr attr, int device) {
  if (device != 0) return nattn::emu::t_last_error = cudaErrorInvalidDevice;
  const int arch = settings().arch;
  const auto lim = nattn::emu::arch_limits(arch);
  switch (attr) {
    case cudaDevAttrComputeCapabilityMajor: *value = arch / 10; break;
    case cudaDevAttrComputeCapabilityMinor: *value = arch % 10; break;
    case cudaDevAttrMaxSharedMemoryPerBlockOptin: *value = static_cast<int>(lim.max_shared_optin); break;
    case cudaDevAttrMaxSharedMemoryPerBlock: *value = static_cast<int>(lim.default_shared); break;
    case cudaDevAttrMaxThreadsPerBlock: *value = static_cast<int>(lim.max_threads_per_block); break;
    case cudaDevAttrMultiProcessorCount: *value = arch >= 90 ? 132 : 108; break;
    case cudaDevAttrWarpSize: *value = 32; break;
    default: return nattn::emu::t_last_error = cudaErrorInvalidValue;
  }
  return cudaSuccess;
}
cudaError_t cudaGetLastError(void) {
  const cudaError_t e = nattn::emu::t_last_error;
  nattn::emu::t_last_error = cudaSuccess;
  return e;
}
cudaError_t cudaPeekAtLastError(void) { return nattn::emu::t_last_error; }
const char* cudaGetErrorString(cudaError_t error) {
  if (error == nattn::emu::t_last_failure_code && !nattn::emu::t_last_failure.empty()) {
    return nattn::emu::t_last_failure.c_str();
  }
  switch (error) {
    case cudaSuccess: return "no error";
    case cudaErrorInvalidValue: return "invalid argument";
    case cudaErrorInvalidConfiguration: return "invalid configuration argument";
    case cudaErrorLaunchFailure: return "unspecified launch failure";
    case cudaErrorInvalidDevice: return "invalid device ordinal";
    default: return "emulator: unknown error";
  }
}
cudaError_t cudaFuncSetAttribute(const void* func, cudaFuncAttribute attr, int value) {
  if (attr != cudaFuncAttributeMaxDynamicSharedMemorySize) return cudaSuccess;
  const auto lim = nattn::emu::arch_limits(settings().arch);
  if (value < 0 || value > lim.max_shared_optin) {
    nattn::emu::set_failure(cudaErrorInvalidValue,
                            "cudaFuncSetAttribute(MaxDynamicSharedMemorySize, " +
                                std::to_string(value) + "): over the " +
                                std::to_string(lim.max_shared_optin) + " bytes sm_" +
                                std::to_string(settings().arch) + " allows");
    return cudaErrorInvalidValue;
  }
  std::lock_guard<std::mutex> lock(nattn::emu::g_attr_mutex);
  nattn::emu::g_max_dynamic_shared[func] = value;
  return cudaSuccess;
}
cudaError_t cudaFuncGetAttributes(cudaFuncAttributes* attr, const void* func) {
  std::memset(attr, 0, sizeof(*attr));
  const auto lim = nattn::emu::arch_limits(settings().arch);
  attr->maxThreadsPerBlock = static_cast<int>(lim.max_threads_per_block);
  attr->binaryVersion = attr->ptxVersion = settings().arch;
  std::lock_guard<std::mutex> lock(nattn::emu::g_attr_mutex);
  auto it = nattn::emu::g_max_dynamic_shared.find(func);
  attr->maxDynamicSharedSizeBytes =
      it == nattn::emu::g_max_dynamic_shared.end() ? static_cast<int>(lim.default_shared)
                                                   : it->second;
  return cudaSuccess;
}

cudaError_t cudaMalloc(void** ptr, size_t size) {
  *ptr = std::malloc(size == 0 ? 1 : size);
  return *ptr ? cudaSuccess : (nattn::emu::t_last_error = cudaErrorMemoryAllocation);
}
cudaError_t cudaFree(void* ptr) {
  std::free(ptr);
  return cudaSuccess;
}
cudaError_t cudaMemcpy(void* dst, const void* src, size_t count, cudaMemcpyKind) {
  std::memcpy(dst, src, count);
  return cudaSuccess;
}

}  // extern "C"
