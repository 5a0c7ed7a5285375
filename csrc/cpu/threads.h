// The CPU kernels' parallel regions.
//
// A parallel region runs on the OpenMP runtime the process has already loaded (torch's libgomp,
// or an Intel/LLVM runtime with the GOMP entry points), found through the dynamic loader: the
// native library links no OpenMP of its own and stays torch-free. When no runtime is loaded, a
// small persistent pool whose idle workers block on a condition variable runs the region.
//
// Why the process's own OpenMP team: right after a torch op, torch's OpenMP workers spin-wait
// for their next region (libgomp's default wait policy). A second pool then competes with them
// for the same cores, and a nattn call after a torch matmul took 1.7-2.3x its stand-alone time
// on the 2-core CI machine. Entering a region of that same team hands the work to the very
// threads that are spinning, as a torch op would (docs/performance.md, "Inside a model").
//
// The thread count is the caller's (AttentionParams::num_threads, which the Python layer sets
// from torch.get_num_threads(), itself set by torch.set_num_threads or OMP_NUM_THREADS).
#pragma once

#include <cstdint>

namespace nattn::cpu {

// A non-owning reference to a callable void(int64_t item, int thread).
class ItemFn {
 public:
  template <typename F>
  explicit ItemFn(F& f)
      : object_(&f), call_([](void* o, int64_t i, int t) { (*static_cast<F*>(o))(i, t); }) {}
  void operator()(int64_t item, int thread) const { call_(object_, item, thread); }

 private:
  void* object_;
  void (*call_)(void*, int64_t, int);
};

// Runs fn(i, thread) for every i in [0, n) on up to nt threads (thread ids 0 .. nt-1; the
// calling thread is 0), handing out items one at a time so that cheap border tiles and expensive
// interior tiles even out. Returns when every item is done; an exception thrown by fn is
// rethrown on the calling thread after the region. Calls from inside a parallel region, or with
// nt <= 1, run inline.
void run_parallel(int nt, int64_t n, const ItemFn& fn);

template <typename F>
void parallel_for(int nt, int64_t n, F&& f) {
  ItemFn fn(f);
  run_parallel(nt, n, fn);
}

// Which runtime runs the parallel regions.
enum class Threading : int {
  kAuto = 0,    // the loaded OpenMP runtime if there is one, else the pool (default)
  kOpenMP = 1,  // the loaded OpenMP runtime; falls back to the pool when none is loaded
  kPool = 2,    // nattn's own blocking pool (for comparisons)
};
void set_threading(Threading mode);
Threading threading();
// The runtime a region started now would use: "openmp:<path of the library>" or "pool".
const char* threading_runtime();

}  // namespace nattn::cpu
