// Thread count of the CPU kernels.
#include "cpu/cpu_common.h"
#include "cpu/cpu_kernels.h"

#ifdef NATTN_WITH_OPENMP
#include <omp.h>
#endif

namespace nattn::cpu {

int default_num_threads() {
#ifdef NATTN_WITH_OPENMP
  return omp_get_max_threads();
#else
  return 1;
#endif
}

int resolve_num_threads(const AttentionParams& p) {
  return p.num_threads > 0 ? p.num_threads : default_num_threads();
}

}  // namespace nattn::cpu
