// Thread count and worker pool of the CPU kernels (threads.h).
#include "cpu/threads.h"

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <mutex>
#include <thread>
#include <vector>

#include "cpu/cpu_common.h"
#include "cpu/cpu_kernels.h"

namespace nattn::cpu {
namespace {

thread_local bool tls_is_worker = false;

class Pool {
 public:
  void run(int nt, int64_t n, const ItemFn& fn) {
    std::lock_guard<std::mutex> one_job_at_a_time(run_mutex_);
    const int helpers = static_cast<int>(std::min<int64_t>(nt - 1, n - 1));
    grow(helpers);
    {
      std::lock_guard<std::mutex> lock(mutex_);
      job_ = &fn;
      items_ = n;
      next_.store(0, std::memory_order_relaxed);
      helpers_ = helpers;
      pending_ = helpers;
      ++generation_;
    }
    wake_.notify_all();
    work(0);
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
    tls_is_worker = true;
    uint64_t seen = 0;
    for (;;) {
      {
        std::unique_lock<std::mutex> lock(mutex_);
        wake_.wait(lock, [&] { return generation_ != seen; });
        seen = generation_;
        if (id > helpers_) continue;  // this job needs fewer threads
      }
      work(id);
      std::lock_guard<std::mutex> lock(mutex_);
      if (--pending_ == 0) done_.notify_one();
    }
  }

  void work(int thread) {
    for (;;) {
      const int64_t item = next_.fetch_add(1, std::memory_order_relaxed);
      if (item >= items_) return;
      (*job_)(item, thread);
    }
  }

  std::mutex run_mutex_;  // serializes jobs from different host threads
  std::mutex mutex_;      // guards the job description and the counters below
  std::condition_variable wake_, done_;
  std::vector<std::thread> workers_;
  const ItemFn* job_ = nullptr;
  int64_t items_ = 0;
  std::atomic<int64_t> next_{0};
  int helpers_ = 0;
  int pending_ = 0;
  uint64_t generation_ = 0;
};

Pool& pool() {
  static Pool* instance = new Pool();  // never destroyed: workers are detached
  return *instance;
}

}  // namespace

void run_parallel(int nt, int64_t n, const ItemFn& fn) {
  if (n <= 0) return;
  if (nt <= 1 || n == 1 || tls_is_worker) {
    for (int64_t i = 0; i < n; ++i) fn(i, 0);
    return;
  }
  pool().run(nt, n, fn);
}

int default_num_threads() {
  const unsigned hw = std::thread::hardware_concurrency();
  return hw == 0 ? 1 : static_cast<int>(hw);
}

int resolve_num_threads(const AttentionParams& p) {
  const int nt = p.num_threads > 0 ? p.num_threads : default_num_threads();
  if (p.exact_threads) return nt;
  // Waking the pool costs microseconds per parallel region and a call has a dozen regions; a
  // thread is only worth it with about 2 MFLOP of the forward's multiply-adds to do (2 q.k and
  // p.v products per attended pair; tens of microseconds). Results are the same for any
  // thread count, so this only changes speed.
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
