// Box tiles for the SM80 tensor-core kernels, beyond what they share with sm90
// (common/box_tiling.h: box shape, tiling, forward and backward walks): the host-side choice of
// box shapes. Host + device, no CUDA headers.
//
// The register tile of a CTA is a box of 64 rows, a streamed tile one of 32 or 64 (sm80_config.h).
#pragma once

#include <cstdint>

#include "cuda/common/box_tiling.h"
#include "nattn/config.h"
#include "nattn/params.h"
#include "nattn/tile_plan.h"
#include "nattn/window.h"

namespace nattn::cuda::sm80 {

// Host: a box of 2^log2_rows positions for the tiles of one side. Greedy doubling of the axis
// that most lowers the expected columns a row sees per tile, prod_a (t_a + span_a - 1) / t_a,
// where span_a is the window extent the other side must cover (kernel_size for a Q box; the Q
// box extent plus kernel_size for a KV box). On a 56 x 56 layout with a 7 x 7 window this gives
// 8 x 8 Q tiles: 14 x 14 = 196 key positions per 64 queries, against 7 x 70 = 490 for 1 x 64.
// An axis never grows past its (power-of-two rounded) group length; if the layout is smaller
// than the tile, the leftover factor goes to axis 0 and those rows are simply invalid.
inline BoxShape choose_box(const AxisParams (&axes)[kMaxRank], const int64_t (&span)[kMaxRank],
                           int log2_rows) {
  BoxShape box;
  int used = 0;
  while (used < log2_rows) {
    int best = -1;
    double best_cost = 0.0;
    for (int a = kMaxRank - 1; a >= 0; --a) {
      const int64_t group_len = group_length(axes[a].length, axes[a].dilation, 0);
      if (box.extent(a) >= group_len) continue;
      double cost = 1.0;
      for (int b = 0; b < kMaxRank; ++b) {
        const double t = static_cast<double>(box.extent(b) << (b == a ? 1 : 0));
        cost *= (t + static_cast<double>(span[b]) - 1.0) / t;
      }
      if (best < 0 || cost < best_cost) {
        best = a;
        best_cost = cost;
      }
    }
    if (best < 0) break;
    ++box.log2[best];
    ++used;
  }
  box.log2[0] += log2_rows - used;
  return box;
}

// Host: Q and KV boxes for a problem (the KV box covers the Q box's window union).
struct BoxPair {
  BoxShape q;
  BoxShape kv;
};
inline BoxPair choose_boxes(const AxisParams (&axes)[kMaxRank], int log2_q_rows,
                            int log2_kv_rows) {
  int64_t span[kMaxRank];
  for (int a = 0; a < kMaxRank; ++a) span[a] = axes[a].kernel_size;
  BoxPair boxes;
  boxes.q = choose_box(axes, span, log2_q_rows);
  for (int a = 0; a < kMaxRank; ++a) span[a] = axes[a].kernel_size + boxes.q.extent(a) - 1;
  boxes.kv = choose_box(axes, span, log2_kv_rows);
  return boxes;
}

}  // namespace nattn::cuda::sm80
