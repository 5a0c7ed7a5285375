// Tile shapes, pipeline depth and register split of the Hopper (sm_90a) forward: the one place
// where they are chosen, with the numbers behind each choice. Plain C++ (no CUDA headers): the
// planner (sm90_plan.h), the Python bindings and the kernels all read it.
#pragma once

#include <cstdint>

namespace nattn::cuda::sm90 {

// Head dims with an sm_90a instantiation (head_dim == value_dim). A row of 64 fp16/bf16 values is
// 128 bytes, the width of one 128-byte-swizzled TMA box and of one K-major wgmma smem atom, so
// head dims are whole multiples of 64; 64 and 128 cover the real problems of DESIGN.md section 6
// (128) and keep the instantiation count at 2 dtypes x 2 head dims.
constexpr bool head_dim_supported(int64_t d) { return d == 64 || d == 128; }
constexpr int kHeadDimChunk = 64;  // columns per TMA box (128 bytes at 2 bytes per element)

// CTA: 3 warpgroups. Warpgroup 0 is the producer (one thread issues every TMA copy); warpgroups
// 1 and 2 are consumers, each owning 64 query rows (the M of one wgmma.m64nNk16), so a Q tile is
// 128 queries. Both consumers read the same K/V stage.
constexpr int kConsumerWarpgroups = 2;
constexpr int kThreads = 128 * (1 + kConsumerWarpgroups);  // 384
constexpr int kQRows = 64 * kConsumerWarpgroups;           // 128 queries per CTA
// KV tile: 128 keys. The score tile of one consumer is then 64 x 128 fp32 = 64 registers per
// thread, the output tile 64 x head_dim fp32 = 32 (d 64) or 64 (d 128) registers, and the P
// operand 32 registers: about 200 live registers at d 128, under the 240 given below.
// Tiles are boxes of a power-of-two number of tokens (the box-row decode is a shift and mask).
constexpr int kKvRows = 128;
constexpr int kLog2QRows = 7;
constexpr int kLog2KvRows = 7;

// setmaxnreg after the role split (__launch_bounds__(384, 1) caps every thread at 168 on entry):
// the producer only computes coordinates, 24 registers; the consumers get 240 each.
// 128 * 24 + 256 * 240 = 64512 <= 65536 registers of an SM.
constexpr int kProducerRegisters = 24;
constexpr int kConsumerRegisters = 240;
static_assert(128 * kProducerRegisters + 128 * kConsumerWarpgroups * kConsumerRegisters <= 65536,
              "the register split must fit the 64K registers of one SM");

// K/V stages in shared memory (each stage holds one K tile and one V tile). At d 128 a stage is
// 2 x 128 x 128 x 2 B = 64 KiB and Q 32 KiB: 2 stages = 160 KiB of the 227 KiB a CTA may use.
// At d 64 a stage is 32 KiB: 3 stages + Q (16 KiB) = 112 KiB, one stage more in flight to cover
// the shorter math per tile.
constexpr int stages(int64_t head_dim) { return head_dim <= 64 ? 3 : 2; }

// Shared memory of one CTA: Q, the K/V stages, the mbarriers (a few hundred bytes, rounded to
// 1 KiB) and 1 KiB of slack to align the tiles to the 1024 bytes a 128-byte swizzle atom needs.
constexpr int64_t smem_bytes(int64_t head_dim) {
  return 2 * head_dim * (kQRows + 2 * kKvRows * stages(head_dim)) + 1024 + 1024;
}

// The tile-shape search (sm90_plan.h: choose_tiles) weighs a masked KV tile as this many full
// ones: a masked tile adds the per-element window test (about 6 integer ops per score element
// next to the 2 * head_dim MMA flops and one exp2 per element) to the softmax warpgroup's
// critical path. An assumed figure, to be replaced by a measurement on a GPU.
constexpr double kMaskedTileCost = 1.25;

// ---------------------------------------------------------------------------------------------
// Backward (sm90_bwd_kernel.cuh): two kernels of one template, each a CTA of the same three
// warpgroups. The dQ kernel keeps a Q tile and its dO tile resident and streams the K/V tiles of
// the forward walk; the dK/dV kernel keeps a K tile and its V tile resident and streams the Q/dO
// tiles of the inverse walk (every query head of the GQA group). Tiles are the forward's
// (choose_tiles: 128-row Q and KV boxes). A streamed tile is consumed in two halves of
// kBackwardHalf rows: the score-like accumulators of one consumer are then 64 x 64 fp32
// (32 registers each), so the dK/dV kernel at head_dim 128 holds dK and dV (64 + 64), S and dP
// (32 + 32) and the two 16-bit A operands (16 + 16): about 224 live registers, under the 240 of
// kConsumerRegisters; the dQ kernel needs about 160.
// Head dim 32 rows are 64 bytes: one TMA box of 32 columns with the 64-byte swizzle, SW64 atoms.
constexpr bool backward_head_dim_supported(int64_t d) { return d == 32 || d == 64 || d == 128; }
constexpr int kBackwardHalf = 64;
// Stages of streamed tile pairs: as the forward (2 at head_dim 128, 3 at 64). At head_dim 128 a
// CTA holds the resident pair (64 KiB), 2 stages of the streamed pair (128 KiB), the row terms
// (lse and delta of the streamed queries, 2 x 128 fp32 per stage) and the barriers: 196 KiB of
// the 227 KiB a CTA may use.
constexpr int backward_stages(int64_t head_dim) { return stages(head_dim); }
constexpr int64_t backward_smem_bytes(int64_t head_dim) {
  return 2 * head_dim * (2 * kQRows + 2 * kKvRows * backward_stages(head_dim)) +
         2 * 4 * kQRows * backward_stages(head_dim) + 1024 + 1024;
}
static_assert(backward_smem_bytes(128) <= 227 * 1024, "the head_dim 128 backward must fit sm_90");

}  // namespace nattn::cuda::sm90
