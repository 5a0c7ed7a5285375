// The CPU kernels' worker threads: a small persistent pool whose idle workers block on a
// condition variable instead of spinning.
//
// Why not OpenMP: torch ships its own libgomp, and its intra-op threads (and ours, when both
// spin-wait between regions) fight over the cores. On the 2-core CI machine with any other load,
// a 14x14-token forward took 15 ms under OpenMP's default wait policy and 0.7 ms with
// OMP_WAIT_POLICY=passive; a pool that never spins gets the passive behaviour without asking the
// user to set anything, and follows torch.get_num_threads() through AttentionParams.
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
// interior tiles even out. Returns when every item is done. Calls from inside a pool worker, or
// with nt <= 1, run inline; concurrent calls from several host threads take turns.
void run_parallel(int nt, int64_t n, const ItemFn& fn);

template <typename F>
void parallel_for(int nt, int64_t n, F&& f) {
  ItemFn fn(f);
  run_parallel(nt, n, fn);
}

}  // namespace nattn::cpu
