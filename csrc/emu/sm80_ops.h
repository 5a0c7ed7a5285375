// SM80 instructions under the emulator: mma.sync m16n8k16 (fp16/bf16 in, fp32 accumulate),
// ldmatrix (.x1/.x2/.x4, with and without .trans) and cp.async with its commit groups, as
// drop-in CuTe operations. Their fragment semantics are written from the PTX ISA's tables
// (sm80_ops.cpp), not from CuTe or the kernels; each CuTe traits class is inherited from the
// real instruction's (MMA_Traits<emulated> : MMA_Traits<real>, CuTe's own idiom), so layouts and
// partitions are CuTe's and only the instruction itself is replaced. tests/test_emu.py checks
// the two descriptions of the hardware against each other lane by lane.
#pragma once

#include <cstdint>

#include <cute/arch/copy_sm75.hpp>
#include <cute/arch/copy_sm80.hpp>
#include <cute/arch/mma_sm80.hpp>
#include <cute/atom/copy_traits_sm75.hpp>
#include <cute/atom/mma_traits_sm80.hpp>

#include "emu/runtime.h"

namespace nattn::emu::sm80 {

// d = a . b + c for one warp; a: 16 x 16 row-major, b: 16 x 8 column-major, fp16 or bf16.
void mma_m16n8k16(bool bf16, float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2],
                  const float (&c)[4]);
// ldmatrix.sync.aligned.m8n8.x{matrices}{.trans}.shared.b16: `row` is the row address this
// lane supplies (lanes 0 .. 8 * matrices - 1 are read), dst[0 .. matrices) what it receives.
void ldmatrix(int matrices, bool trans, const void* row, uint32_t* dst);

// Where a lane's fragment elements sit, per the PTX ISA (for the cross-check with CuTe):
// element i of lane `lane` of operand 'a' (16 x 16), 'b' (16 x 8, row = k) or 'c' (16 x 8).
void mma_fragment_coord(char operand, int lane, int i, int& row, int& col);
// ldmatrix: destination register r, half h (0 = low 16 bits) of lane `lane` holds element
// (row, col) of matrix r as stored in memory (rows are the addresses lanes supply).
void ldmatrix_fragment_coord(bool trans, int lane, int h, int& row, int& col);

// mma.sync.aligned.m16n8k16.row.col.f32.{f16,bf16}.{f16,bf16}.f32, CuTe's register interface.
template <bool kBf16>
struct Mma16816 {
  using DRegisters = float[4];
  using ARegisters = uint32_t[4];
  using BRegisters = uint32_t[2];
  using CRegisters = float[4];
  static void fma(float& d0, float& d1, float& d2, float& d3, uint32_t const& a0,
                  uint32_t const& a1, uint32_t const& a2, uint32_t const& a3, uint32_t const& b0,
                  uint32_t const& b1, float const& c0, float const& c1, float const& c2,
                  float const& c3) {
    float d[4];
    mma_m16n8k16(kBf16, d, {a0, a1, a2, a3}, {b0, b1}, {c0, c1, c2, c3});
    d0 = d[0], d1 = d[1], d2 = d[2], d3 = d[3];
  }
};
struct SM80_16x8x16_F32F16F16F32_TN : Mma16816<false> {};
struct SM80_16x8x16_F32BF16BF16F32_TN : Mma16816<true> {};

template <int kMatrices, bool kTrans>
struct Ldsm {
  using SRegisters = cute::uint128_t[1];
  using DRegisters = uint32_t[kMatrices];
  template <class... D>
  static void copy(cute::uint128_t const& smem_src, D&... dst) {
    static_assert(sizeof...(D) == kMatrices, "one register per matrix");
    uint32_t out[4];
    ldmatrix(kMatrices, kTrans, &smem_src, out);
    int i = 0;
    ((dst = out[i++]), ...);
  }
};
struct SM75_U32x1_LDSM_N : Ldsm<1, false> {};
struct SM75_U32x2_LDSM_N : Ldsm<2, false> {};
struct SM75_U32x4_LDSM_N : Ldsm<4, false> {};
struct SM75_U16x2_LDSM_T : Ldsm<1, true> {};
struct SM75_U16x4_LDSM_T : Ldsm<2, true> {};
struct SM75_U16x8_LDSM_T : Ldsm<4, true> {};

// cp.async.cg.shared.global [dst], [src], 16, src-size (src-size 0 when !pred: zero fill).
template <class TS, class TD = TS>
struct SM80_CP_ASYNC_CACHEGLOBAL_ZFILL {
  using SRegisters = TS[1];
  using DRegisters = TD[1];
  static_assert(sizeof(TS) == 16 && sizeof(TD) == 16, "cp.async.cg copies 16 bytes");
  static void copy(TS const& gmem_src, TD& smem_dst, bool pred) {
    cp_async(&smem_dst, &gmem_src, 16, pred ? 16 : 0);
  }
};
inline void cp_async_fence() { cp_async_commit(); }
template <int N>
inline void cp_async_wait() {
  ::nattn::emu::cp_async_wait(N);
}

}  // namespace nattn::emu::sm80

namespace cute {
#define NATTN_EMU_MMA_TRAITS(Op) \
  template <>                    \
  struct MMA_Traits<::nattn::emu::sm80::Op> : MMA_Traits<::cute::Op> {}
NATTN_EMU_MMA_TRAITS(SM80_16x8x16_F32F16F16F32_TN);
NATTN_EMU_MMA_TRAITS(SM80_16x8x16_F32BF16BF16F32_TN);
#undef NATTN_EMU_MMA_TRAITS
#define NATTN_EMU_COPY_TRAITS(Op) \
  template <>                     \
  struct Copy_Traits<::nattn::emu::sm80::Op> : Copy_Traits<::cute::Op> {}
NATTN_EMU_COPY_TRAITS(SM75_U32x1_LDSM_N);
NATTN_EMU_COPY_TRAITS(SM75_U32x2_LDSM_N);
NATTN_EMU_COPY_TRAITS(SM75_U32x4_LDSM_N);
NATTN_EMU_COPY_TRAITS(SM75_U16x2_LDSM_T);
NATTN_EMU_COPY_TRAITS(SM75_U16x4_LDSM_T);
NATTN_EMU_COPY_TRAITS(SM75_U16x8_LDSM_T);
#undef NATTN_EMU_COPY_TRAITS
}  // namespace cute
