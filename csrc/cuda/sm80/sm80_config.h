// Tile sizes of the SM80 tensor-core kernels and the numbers behind them: the one place where
// they are chosen. Plain C++ (no CUDA headers): the dispatcher and the planner binding use it.
#pragma once

#include <cstdint>

namespace nattn::cuda::sm80 {

// Head dims with tensor-core instantiations (head_dim == value_dim); others run on the SIMT
// fallback. Backward stops at 128: its register tile holds dK and dV accumulators (2 x 64 fp32 per
// thread at 128) next to two 16 x 64 score tiles, which is at the 255-register limit already.
constexpr bool forward_head_dim_supported(int64_t d) {
  return d == 32 || d == 64 || d == 128 || d == 256;
}
constexpr bool backward_head_dim_supported(int64_t d) { return d == 32 || d == 64 || d == 128; }

// Forward: 64 queries per CTA (4 warps x 16 rows of mma.sync m16n8k16) against 64-key tiles;
// 32-key tiles at head_dim 256 so that Q (32 KiB) plus two K/V buffers (4 x 16 KiB) stay at
// 96 KiB of shared memory, under the 99 KiB a CTA may use on sm_86/sm_89 (163 KiB on sm_80,
// 227 KiB on sm_90).
constexpr int kForwardBlockM = 64;
constexpr int forward_block_n(int64_t head_dim) { return head_dim <= 128 ? 64 : 32; }
constexpr int64_t forward_smem_bytes(int64_t head_dim) {
  return 2 * head_dim * (kForwardBlockM + 4 * forward_block_n(head_dim));
}

// Backward: 64 x 64 tiles. dQ pass: Q and dO resident (2 x 64 rows), K/V streamed in two buffers
// (4 x 64 rows); dK/dV pass: K and V resident, Q and dO streamed (the same 6 tiles) plus lse and
// delta of the streamed queries (2 x 2 x 64 floats). 96.5 KiB at head_dim 128.
constexpr int kBackwardBlock = 64;
constexpr int64_t backward_smem_bytes(int64_t head_dim) {
  return 2 * head_dim * 6 * kBackwardBlock + 4 * 4 * kBackwardBlock;
}

// log2 of the block sizes, for the box planner (sm80_tiles.h: choose_boxes).
constexpr int log2_int(int64_t x) { return x <= 1 ? 0 : 1 + log2_int(x / 2); }

}  // namespace nattn::cuda::sm80
