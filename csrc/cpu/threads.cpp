// Parallel regions of the CPU kernels (threads.h).
#include "cpu/threads.h"

#include <dlfcn.h>
#include <link.h>

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <cstring>
#include <exception>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "cpu/cpu_common.h"
#include "cpu/cpu_kernels.h"

namespace nattn::cpu {
namespace {

thread_local bool tls_in_region = false;

// One region's shared state: the item counter and the first exception thrown.
struct Region {
  const ItemFn* fn;
  int64_t items;
  std::atomic<int64_t> next{0};
  std::atomic<bool> failed{false};
  std::exception_ptr error;

  void work(int thread) {
    const bool outer = tls_in_region;
    tls_in_region = true;
    try {
      for (;;) {
        if (failed.load(std::memory_order_relaxed)) break;
        const int64_t item = next.fetch_add(1, std::memory_order_relaxed);
        if (item >= items) break;
        (*fn)(item, thread);
      }
    } catch (...) {
      if (!failed.exchange(true)) error = std::current_exception();
    }
    tls_in_region = outer;
  }
};

// ---- the process's OpenMP runtime, through the dynamic loader ---------------------------------

// GOMP_parallel is the entry point GCC emits for `#pragma omp parallel`; libgomp, Intel's
// libiomp5 and LLVM's libomp all export it (the latter two for GCC compatibility).
using GompParallel = void (*)(void (*)(void*), void*, unsigned, unsigned);
using OmpInt = int (*)();

struct OpenMP {
  GompParallel parallel = nullptr;
  OmpInt thread_num = nullptr;
  OmpInt in_parallel = nullptr;
  std::string path;
  bool found() const { return parallel && thread_num && in_parallel; }
};

bool is_openmp_library(const char* path) {
  const char* base = std::strrchr(path, '/');
  base = base ? base + 1 : path;
  return std::strncmp(base, "libgomp", 7) == 0 || std::strncmp(base, "libiomp", 7) == 0 ||
         std::strncmp(base, "libomp", 6) == 0;
}

int find_loaded_openmp(dl_phdr_info* info, size_t, void* out) {
  if (info->dlpi_name && info->dlpi_name[0] && is_openmp_library(info->dlpi_name)) {
    *static_cast<std::string*>(out) = info->dlpi_name;
    return 1;  // stop at the first one loaded
  }
  return 0;
}

// Looks for an OpenMP runtime already mapped into the process. Never loads one: RTLD_NOLOAD.
OpenMP look_up_openmp() {
  OpenMP omp;
  std::string path;
  dl_iterate_phdr(find_loaded_openmp, &path);
  if (path.empty()) return omp;
  void* handle = dlopen(path.c_str(), RTLD_LAZY | RTLD_LOCAL | RTLD_NOLOAD);
  if (!handle) return omp;  // kept open for the process's lifetime, like the runtime itself
  omp.parallel = reinterpret_cast<GompParallel>(dlsym(handle, "GOMP_parallel"));
  omp.thread_num = reinterpret_cast<OmpInt>(dlsym(handle, "omp_get_thread_num"));
  omp.in_parallel = reinterpret_cast<OmpInt>(dlsym(handle, "omp_in_parallel"));
  omp.path = path;
  return omp;
}

// The runtime is looked up until one is found (torch may load it after this library), then kept.
const OpenMP* openmp() {
  static std::mutex mutex;
  static OpenMP cached;
  static std::atomic<bool> found{false};
  if (found.load(std::memory_order_acquire)) return &cached;
  std::lock_guard<std::mutex> lock(mutex);
  if (!found.load(std::memory_order_relaxed)) {
    OpenMP omp = look_up_openmp();
    if (!omp.found()) return nullptr;
    cached = omp;
    found.store(true, std::memory_order_release);
  }
  return &cached;
}

struct OpenMPRegion {
  Region* region;
  const OpenMP* omp;
};

void openmp_body(void* data) {
  auto* r = static_cast<OpenMPRegion*>(data);
  r->region->work(r->omp->thread_num());
}

// ---- nattn's own pool, when no OpenMP runtime is loaded ---------------------------------------

class Pool {
 public:
  void run(int nt, Region& region) {
    std::lock_guard<std::mutex> one_job_at_a_time(run_mutex_);
    const int helpers = static_cast<int>(std::min<int64_t>(nt - 1, region.items - 1));
    grow(helpers);
    {
      std::lock_guard<std::mutex> lock(mutex_);
      job_ = &region;
      helpers_ = helpers;
      pending_ = helpers;
      ++generation_;
    }
    wake_.notify_all();
    region.work(0);
    std::unique_lock<std::mutex> lock(mutex_);
    done_.wait(lock, [&] { return pending_ == 0; });
    job_ = nullptr;
  }

 private:
  void grow(int helpers) {
    while (static_cast<int>(workers_.size()) < helpers) {
      const int id = static_cast<int>(workers_.size()) + 1;
      workers_.emplace_back([this, id] { loop(id); });
      workers_.back().detach();  // the pool lives for the whole process
    }
  }

  void loop(int id) {
    uint64_t seen = 0;
    for (;;) {
      Region* job;
      {
        std::unique_lock<std::mutex> lock(mutex_);
        wake_.wait(lock, [&] { return generation_ != seen; });
        seen = generation_;
        if (id > helpers_) continue;  // this job needs fewer threads
        job = job_;
      }
      job->work(id);
      std::lock_guard<std::mutex> lock(mutex_);
      if (--pending_ == 0) done_.notify_one();
    }
  }

  std::mutex run_mutex_;  // serializes jobs from different host threads
  std::mutex mutex_;      // guards the job and the counters below
  std::condition_variable wake_, done_;
  std::vector<std::thread> workers_;
  Region* job_ = nullptr;
  int helpers_ = 0;
  int pending_ = 0;
  uint64_t generation_ = 0;
};

Pool& pool() {
  static Pool* instance = new Pool();  // never destroyed: workers are detached
  return *instance;
}

std::atomic<int> g_mode{static_cast<int>(Threading::kAuto)};

const OpenMP* chosen_openmp() {
  return static_cast<Threading>(g_mode.load(std::memory_order_relaxed)) == Threading::kPool
             ? nullptr
             : openmp();
}

}  // namespace

void set_threading(Threading mode) { g_mode.store(static_cast<int>(mode)); }
Threading threading() { return static_cast<Threading>(g_mode.load()); }

const char* threading_runtime() {
  static thread_local std::string text;
  const OpenMP* omp = chosen_openmp();
  text = omp ? "openmp:" + omp->path : "pool";
  return text.c_str();
}

void run_parallel(int nt, int64_t n, const ItemFn& fn) {
  if (n <= 0) return;
  Region region;
  region.fn = &fn;
  region.items = n;
  const OpenMP* omp = chosen_openmp();
  const bool nested = tls_in_region || (omp && omp->in_parallel());
  if (nt <= 1 || n == 1 || nested) {
    region.work(0);
  } else if (omp) {
    OpenMPRegion data{&region, omp};
    const unsigned threads = static_cast<unsigned>(std::min<int64_t>(nt, n));
    omp->parallel(openmp_body, &data, threads, 0);
  } else {
    pool().run(nt, region);
  }
  if (region.error) std::rethrow_exception(region.error);
}

int default_num_threads() {
  const unsigned hw = std::thread::hardware_concurrency();
  return hw == 0 ? 1 : static_cast<int>(hw);
}

int resolve_num_threads(const AttentionParams& p) {
  const int nt = p.num_threads > 0 ? p.num_threads : default_num_threads();
  if (p.exact_threads) return nt;
  // Entering a parallel region costs microseconds and a call has a dozen regions; a thread is
  // only worth it with about 2 MFLOP of the forward's multiply-adds to do (2 q.k and p.v
  // products per attended pair; tens of microseconds). Results are the same for any thread
  // count, so this only changes speed.
  constexpr double kMinFlopsPerThread = 2e6;
  double pairs = static_cast<double>(p.num_additional);
  double window = 1;
  for (const AxisParams& a : p.axes) {
    window *= static_cast<double>(std::min(a.kernel_size, a.length));
  }
  pairs += window;
  const double flops = 2.0 * static_cast<double>(p.batch * p.heads) *
                       static_cast<double>(p.tokens()) * pairs *
                       static_cast<double>(p.head_dim + p.value_dim);
  const double useful = std::max(1.0, flops / kMinFlopsPerThread);
  return useful < nt ? static_cast<int>(useful) : nt;
}

}  // namespace nattn::cpu
