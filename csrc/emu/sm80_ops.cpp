// SM80 instruction semantics, written from the PTX ISA (sections "Matrix Fragments for
// mma.m16n8k16 with floating point type" and "Warp-level matrix load instruction: ldmatrix").
//
// mma.m16n8k16, lane l, groupID g = l >> 2, threadID_in_group t = l % 4:
//   A (16 x 16, .row), a0..a7 (two per 32-bit register, the lower index in the low half):
//     row = g for a0, a1, a4, a5 and g + 8 for a2, a3, a6, a7;
//     col = 2t + (i & 1), plus 8 for a4..a7
//   B (16 x 8, .col), b0..b3: row (k) = 2t + (i & 1), plus 8 for b2, b3; col (n) = g
//   C, D (16 x 8, fp32), c0..c3: row = g, plus 8 for c2, c3; col = 2t + (i & 1)
// Numerics: the 16 products of fp16/bf16 values are exact; the emulator adds them and c in
// double and rounds once to fp32 (the ISA leaves the order and width of the hardware's internal
// accumulation open; a functional test's error bounds hold for either).
//
// ldmatrix .m8n8 .b16, .x1/.x2/.x4 = 1, 2, 4 matrices: lanes 8m .. 8m + 7 supply the addresses of
// rows 0..7 of matrix m (16 bytes each, 16-byte aligned, shared memory); destination register m
// of lane l holds elements (l / 4, 2 (l % 4)) and (l / 4, 2 (l % 4) + 1) of matrix m, or with
// .trans the elements (2 (l % 4), l / 4) and (2 (l % 4) + 1, l / 4) of the stored matrix.
#include "emu/sm80_ops.h"

#include <cutlass/bfloat16.h>
#include <cutlass/half.h>

#include <cstring>
#include <string>

namespace nattn::emu::sm80 {

void mma_fragment_coord(char operand, int lane, int i, int& row, int& col) {
  const int g = lane >> 2, t = lane % 4;
  switch (operand) {
    case 'a':
      row = g + ((i == 2 || i == 3 || i == 6 || i == 7) ? 8 : 0);
      col = 2 * t + (i & 1) + (i >= 4 ? 8 : 0);
      return;
    case 'b':
      row = 2 * t + (i & 1) + (i >= 2 ? 8 : 0);
      col = g;
      return;
    default:
      row = g + (i >= 2 ? 8 : 0);
      col = 2 * t + (i & 1);
  }
}

void ldmatrix_fragment_coord(bool trans, int lane, int h, int& row, int& col) {
  row = lane / 4;
  col = 2 * (lane % 4) + h;
  if (trans) std::swap(row, col);
}

namespace {

struct MmaIn {
  bool bf16;
  uint32_t a[4];
  uint32_t b[2];
  float c[4];
};

double element(bool bf16, uint32_t reg, int half) {
  const uint16_t bits = static_cast<uint16_t>(half ? reg >> 16 : reg & 0xffffu);
  return bf16 ? static_cast<double>(static_cast<float>(cutlass::bfloat16_t::bitcast(bits)))
              : static_cast<double>(static_cast<float>(cutlass::half_t::bitcast(bits)));
}

void mma_exec(Rendezvous& r) {
  double A[16][16], B[16][8], C[16][8];
  const bool bf16 = static_cast<const MmaIn*>(r.in[0])->bf16;
  for (int lane = 0; lane < 32; ++lane) {
    const MmaIn& in = *static_cast<const MmaIn*>(r.in[lane]);
    if (in.bf16 != bf16) fail("mma.sync: lanes disagree on the element type");
    int row, col;
    for (int i = 0; i < 8; ++i) {
      mma_fragment_coord('a', lane, i, row, col);
      A[row][col] = element(bf16, in.a[i / 2], i % 2);
    }
    for (int i = 0; i < 4; ++i) {
      mma_fragment_coord('b', lane, i, row, col);
      B[row][col] = element(bf16, in.b[i / 2], i % 2);
    }
    for (int i = 0; i < 4; ++i) {
      mma_fragment_coord('c', lane, i, row, col);
      C[row][col] = in.c[i];
    }
  }
  for (int lane = 0; lane < 32; ++lane) {
    float* d = static_cast<float*>(r.out[lane]);
    for (int i = 0; i < 4; ++i) {
      int row, col;
      mma_fragment_coord('c', lane, i, row, col);
      double acc = C[row][col];
      for (int k = 0; k < 16; ++k) acc += A[row][k] * B[k][col];
      d[i] = static_cast<float>(acc);
    }
  }
  count_mma();
}

const CollectiveKind kMma{"mma.sync.aligned.m16n8k16.row.col.f32", true, mma_exec};

struct LdsmIn {
  const void* row;
  int matrices;
  bool trans;
};

void ldmatrix_exec(Rendezvous& r) {
  const auto& first = *static_cast<const LdsmIn*>(r.in[0]);
  uint16_t m[4][8][8];  // [matrix][stored row][column]
  for (int lane = 0; lane < 32; ++lane) {
    const auto& in = *static_cast<const LdsmIn*>(r.in[lane]);
    if (in.matrices != first.matrices || in.trans != first.trans) {
      fail("ldmatrix: lanes disagree on .num or .trans");
    }
    if (lane >= 8 * first.matrices) continue;  // addresses of the other lanes are not read
    if (!in_shared(in.row, 16) || reinterpret_cast<uintptr_t>(in.row) % 16 != 0) {
      fail("ldmatrix: lane " + std::to_string(lane) +
           " supplies a row address that is not 16-byte aligned shared memory of this CTA");
    }
    if (shared_pending(in.row, 16)) {
      fail("ldmatrix: lane " + std::to_string(lane) +
           " reads shared memory that a cp.async is still writing (a read before its "
           "cp.async.wait_group)");
    }
    std::memcpy(m[lane / 8][lane % 8], in.row, 16);
  }
  for (int lane = 0; lane < 32; ++lane) {
    auto* dst = static_cast<uint32_t*>(r.out[lane]);
    for (int k = 0; k < first.matrices; ++k) {
      uint32_t reg = 0;
      for (int h = 0; h < 2; ++h) {
        int row, col;
        ldmatrix_fragment_coord(first.trans, lane, h, row, col);
        reg |= static_cast<uint32_t>(m[k][row][col]) << (16 * h);
      }
      dst[k] = reg;
    }
  }
  count_ldmatrix();
}

const CollectiveKind kLdmatrix{"ldmatrix.sync.aligned.m8n8.shared.b16", true, ldmatrix_exec};

}  // namespace

void mma_m16n8k16(bool bf16, float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2],
                  const float (&c)[4]) {
  const MmaIn in{bf16, {a[0], a[1], a[2], a[3]}, {b[0], b[1]}, {c[0], c[1], c[2], c[3]}};
  collective(kMma, 0xffffffffu, &in, d);
}

void ldmatrix(int matrices, bool trans, const void* row, uint32_t* dst) {
  const LdsmIn in{row, matrices, trans};
  collective(kLdmatrix, 0xffffffffu, &in, dst);
}

}  // namespace nattn::emu::sm80
