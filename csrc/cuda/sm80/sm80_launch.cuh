// Host side of the SM80 launches: the tilings of a problem. Dtype tags map to CuTe element types
// through common/tensor_core.cuh (ElementOf), launches go through common/launch.h.
#pragma once

#include <cstdint>

#include "cuda/common/launch.h"
#include "cuda/common/tensor_core.cuh"
#include "cuda/sm80/sm80_config.h"
#include "cuda/sm80/sm80_tiles.h"

namespace nattn::cuda::sm80 {

// Query tiles of `q_rows` positions and key tiles of `kv_rows` positions, as boxes chosen for the
// problem's windows (sm80_tiles.h: choose_boxes).
struct Tilings {
  BoxTiling q;
  BoxTiling kv;
};
inline Tilings make_tilings(const AttentionParams& p, int q_rows, int kv_rows) {
  const BoxPair boxes = choose_boxes(p.axes, log2_int(q_rows), log2_int(kv_rows));
  return Tilings{make_tiling(p.axes, boxes.q), make_tiling(p.axes, boxes.kv)};
}

}  // namespace nattn::cuda::sm80
