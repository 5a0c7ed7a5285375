// SM90 instruction semantics, written from the PTX ISA (sections "Tensor Copy Instructions:
// cp.async.bulk.tensor", "Tensor-map", "mbarrier", "Asynchronous Warpgroup Level Matrix
// Multiply-Accumulate Instructions": matrix descriptors, shared-memory matrix layouts, register
// fragments, wgmma.fence / commit_group / wait_group) and the CUDA driver API's documentation
// of cuTensorMapEncodeTiled.
//
// Matrix descriptor (64 bits): start address bits 0-13 (address >> 4), leading-dimension byte
// offset (LBO) bits 16-29 (>> 4), stride-dimension byte offset (SBO) bits 32-45 (>> 4), matrix
// base offset bits 49-51, swizzle mode bits 62-63 (0 none, 1 128B, 2 64B, 3 32B). In units of
// 16-byte "core matrix rows" (8 16-bit elements), with W the swizzle span in bytes:
//   K-major   no swizzle: core matrices of 8 rows x 16 bytes (rows 16 bytes apart); LBO between
//             core matrices adjacent in K, SBO between those adjacent in M/N (8-row groups).
//             swizzled:   rows of W bytes, 8-row groups SBO apart; LBO unused (the K extent of
//             one instruction lies within a row).
//   MN-major  no swizzle: core matrices of 8 K-rows x 16 bytes of MN; SBO between core matrices
//             adjacent in MN, LBO between those adjacent in K (8-row groups).
//             swizzled:   K-rows of W bytes of MN, LBO between W-byte blocks along MN, SBO
//             between 8-row groups along K.
//   The swizzle permutes the 16-byte chunks of each row by the shared address itself: byte
//   address a reads a ^ (((a >> 7) & (W / 16 - 1)) << 4), the same function TMA applies when it
//   writes a box with that swizzle mode. A non-zero base offset is not modeled (an error).
// Accumulator (m64nNk16, fp32): thread t of the warpgroup, warp w = t / 32, lane l, g = l / 4,
// q = l % 4: register i holds row 16 w + g + 8 ((i / 2) % 2), column 8 (i / 4) + 2 q + i % 2.
// A in registers (16-bit): register j (two halves) of the same thread holds row
// 16 w + g + 8 (j % 2), columns 2 q + 8 (j / 2) + {0, 1}.
// wgmma.mma_async reads its operands at issue here (they must not change before the wait on a
// GPU either) and writes its accumulators at the wgmma.wait_group that covers its commit group;
// until then they hold a NaN pattern, so a read before the wait shows. Products exact, the sum
// of the 16 products and the accumulator in double, rounded once to fp32 per instruction.
#include "emu/sm90_ops.h"

#include <cutlass/bfloat16.h>
#include <cutlass/half.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <sstream>
#include <string>
#include <vector>

namespace nattn::emu::sm90 {

namespace {

// ---------------------------------------------------------------------------------------------
// Tensor maps.

constexpr uint32_t kMapMagic = 0x6e61746d;  // "natm": encoded by the emulator

struct MapImage {
  uint32_t magic;
  uint8_t type, rank, interleave, swizzle, l2, oob, elem_bytes, pad0;
  uint64_t address;
  uint32_t dim_minus1[5];  // sizes 1 .. 2^32
  uint8_t box_minus1[5];   // 1 .. 256
  uint8_t element_stride[5];
  uint16_t pad1;
  uint64_t stride[4];      // bytes, dims 1 .. rank - 1
};
static_assert(sizeof(MapImage) <= sizeof(CUtensorMap), "the image fits the 128-byte map");

thread_local std::string t_encode_error;
bool g_encode_fault = false;

int element_bytes(int type) {
  switch (type) {
    case CU_TENSOR_MAP_DATA_TYPE_UINT8: return 1;
    case CU_TENSOR_MAP_DATA_TYPE_UINT16:
    case CU_TENSOR_MAP_DATA_TYPE_FLOAT16:
    case CU_TENSOR_MAP_DATA_TYPE_BFLOAT16: return 2;
    case CU_TENSOR_MAP_DATA_TYPE_UINT32:
    case CU_TENSOR_MAP_DATA_TYPE_INT32:
    case CU_TENSOR_MAP_DATA_TYPE_FLOAT32:
    case CU_TENSOR_MAP_DATA_TYPE_FLOAT32_FTZ:
    case CU_TENSOR_MAP_DATA_TYPE_TFLOAT32:
    case CU_TENSOR_MAP_DATA_TYPE_TFLOAT32_FTZ: return 4;
    case CU_TENSOR_MAP_DATA_TYPE_UINT64:
    case CU_TENSOR_MAP_DATA_TYPE_INT64:
    case CU_TENSOR_MAP_DATA_TYPE_FLOAT64: return 8;
    default: return 0;  // the packed sub-byte types are not modeled
  }
}

bool is_float(int type) {
  return type == CU_TENSOR_MAP_DATA_TYPE_FLOAT16 || type == CU_TENSOR_MAP_DATA_TYPE_BFLOAT16 ||
         type == CU_TENSOR_MAP_DATA_TYPE_FLOAT32 || type == CU_TENSOR_MAP_DATA_TYPE_FLOAT32_FTZ ||
         type == CU_TENSOR_MAP_DATA_TYPE_TFLOAT32 ||
         type == CU_TENSOR_MAP_DATA_TYPE_TFLOAT32_FTZ || type == CU_TENSOR_MAP_DATA_TYPE_FLOAT64;
}

// Bytes of the 16-byte-chunk swizzle span (0: none).
int swizzle_span(int swizzle) {
  switch (swizzle) {
    case CU_TENSOR_MAP_SWIZZLE_32B: return 32;
    case CU_TENSOR_MAP_SWIZZLE_64B: return 64;
    case CU_TENSOR_MAP_SWIZZLE_128B: return 128;
    default: return 0;
  }
}

// The 16-byte chunk permutation of a W-byte swizzle, by shared address.
uint32_t swizzle_address(uint32_t a, int span) {
  if (span <= 16) return a;
  return a ^ (((a >> 7) & static_cast<uint32_t>(span / 16 - 1)) << 4);
}

CUresult reject(const std::string& why) {
  t_encode_error = "cuTensorMapEncodeTiled: " + why;
  return CUDA_ERROR_INVALID_VALUE;
}

const MapImage& map_image(const void* map, const char* op) {
  const auto* m = static_cast<const MapImage*>(map);
  if (reinterpret_cast<uintptr_t>(map) % 64 != 0) {
    fail(std::string(op) + ": the tensor map is not 64-byte aligned");
  }
  if (m->magic != kMapMagic) {
    fail(std::string(op) + ": the tensor map was not encoded by cuTensorMapEncodeTiled");
  }
  return *m;
}

}  // namespace

CUresult encode_tiled(CUtensorMap* map, CUtensorMapDataType type, cuuint32_t rank, void* address,
                      const cuuint64_t* dim, const cuuint64_t* strides, const cuuint32_t* box,
                      const cuuint32_t* element_strides, CUtensorMapInterleave interleave,
                      CUtensorMapSwizzle swizzle, CUtensorMapL2promotion l2,
                      CUtensorMapFloatOOBfill oob) {
  t_encode_error.clear();
  if (g_encode_fault) return reject("failure injected by the test hook set_encode_fault");
  if (map == nullptr || reinterpret_cast<uintptr_t>(map) % 64 != 0) {
    return reject("tensorMap must be 64-byte aligned");
  }
  if (static_cast<int>(type) < 0 || static_cast<int>(type) > CU_TENSOR_MAP_DATA_TYPE_16U6_ALIGN16B) {
    return reject("tensorDataType " + std::to_string(static_cast<int>(type)) + " is not a CUtensorMapDataType");
  }
  const int esize = element_bytes(type);
  if (esize == 0) return reject("the packed 4/6-bit data types are not modeled by the emulator");
  if (rank < 1 || rank > 5) return reject("tensorRank " + std::to_string(rank) + " (1 .. 5)");
  if (interleave != CU_TENSOR_MAP_INTERLEAVE_NONE && interleave != CU_TENSOR_MAP_INTERLEAVE_16B &&
      interleave != CU_TENSOR_MAP_INTERLEAVE_32B) {
    return reject("interleave is not a CUtensorMapInterleave");
  }
  if (interleave != CU_TENSOR_MAP_INTERLEAVE_NONE && rank < 3) {
    return reject("an interleaved layout needs tensorRank >= 3");
  }
  const uint64_t align = interleave == CU_TENSOR_MAP_INTERLEAVE_32B ? 32 : 16;
  if (reinterpret_cast<uintptr_t>(address) % align != 0) {
    return reject("globalAddress must be " + std::to_string(align) + "-byte aligned");
  }
  for (cuuint32_t i = 0; i < rank; ++i) {
    if (dim[i] == 0 || dim[i] > (uint64_t{1} << 32)) {
      return reject("globalDim[" + std::to_string(i) + "] = " + std::to_string(dim[i]) +
                    " (1 .. 2^32)");
    }
  }
  for (cuuint32_t i = 0; i + 1 < rank; ++i) {
    if (strides[i] % align != 0 || strides[i] >= (uint64_t{1} << 40)) {
      return reject("globalStrides[" + std::to_string(i) + "] = " + std::to_string(strides[i]) +
                    " must be a multiple of " + std::to_string(align) + " below 2^40");
    }
  }
  for (cuuint32_t i = 0; i < rank; ++i) {
    if (box[i] == 0 || box[i] > 256) {
      return reject("boxDim[" + std::to_string(i) + "] = " + std::to_string(box[i]) + " (1 .. 256)");
    }
    if (element_strides[i] == 0 || element_strides[i] > 8) {
      return reject("elementStrides[" + std::to_string(i) + "] = " +
                    std::to_string(element_strides[i]) + " (1 .. 8)");
    }
  }
  const uint64_t inner = uint64_t{box[0]} * esize;
  if (interleave == CU_TENSOR_MAP_INTERLEAVE_NONE && inner % 16 != 0) {
    return reject("boxDim[0] x element size = " + std::to_string(inner) +
                  " bytes must be a multiple of 16");
  }
  if (static_cast<int>(swizzle) < 0 || swizzle > CU_TENSOR_MAP_SWIZZLE_128B_ATOM_64B) {
    return reject("swizzle is not a CUtensorMapSwizzle");
  }
  if (interleave == CU_TENSOR_MAP_INTERLEAVE_32B && swizzle != CU_TENSOR_MAP_SWIZZLE_32B) {
    return reject("CU_TENSOR_MAP_INTERLEAVE_32B needs CU_TENSOR_MAP_SWIZZLE_32B");
  }
  if (interleave == CU_TENSOR_MAP_INTERLEAVE_NONE && swizzle != CU_TENSOR_MAP_SWIZZLE_NONE) {
    const uint64_t span = swizzle == CU_TENSOR_MAP_SWIZZLE_32B   ? 32
                          : swizzle == CU_TENSOR_MAP_SWIZZLE_64B ? 64
                                                                 : 128;
    if (inner > span) {
      return reject("the box's inner dimension (" + std::to_string(inner) +
                    " bytes) exceeds the swizzle span of " + std::to_string(span) + " bytes");
    }
  }
  if (static_cast<int>(l2) < 0 || l2 > CU_TENSOR_MAP_L2_PROMOTION_L2_256B) {
    return reject("l2Promotion is not a CUtensorMapL2promotion");
  }
  if (oob != CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE &&
      oob != CU_TENSOR_MAP_FLOAT_OOB_FILL_NAN_REQUEST_ZERO_FMA) {
    return reject("oobFill is not a CUtensorMapFloatOOBfill");
  }
  if (oob == CU_TENSOR_MAP_FLOAT_OOB_FILL_NAN_REQUEST_ZERO_FMA && !is_float(type)) {
    return reject("CU_TENSOR_MAP_FLOAT_OOB_FILL_NAN_REQUEST_ZERO_FMA needs a floating-point type");
  }
  MapImage m = {};
  m.magic = kMapMagic;
  m.type = static_cast<uint8_t>(type);
  m.rank = static_cast<uint8_t>(rank);
  m.interleave = static_cast<uint8_t>(interleave);
  m.swizzle = static_cast<uint8_t>(swizzle);
  m.l2 = static_cast<uint8_t>(l2);
  m.oob = static_cast<uint8_t>(oob);
  m.elem_bytes = static_cast<uint8_t>(esize);
  m.address = reinterpret_cast<uint64_t>(address);
  for (cuuint32_t i = 0; i < rank; ++i) {
    m.dim_minus1[i] = static_cast<uint32_t>(dim[i] - 1);
    m.box_minus1[i] = static_cast<uint8_t>(box[i] - 1);
    m.element_stride[i] = static_cast<uint8_t>(element_strides[i]);
  }
  for (cuuint32_t i = 0; i + 1 < rank; ++i) m.stride[i] = strides[i];
  std::memset(map, 0, sizeof(CUtensorMap));
  std::memcpy(map, &m, sizeof(m));
  return CUDA_SUCCESS;
}

const std::string& last_encode_error() { return t_encode_error; }
void set_encode_fault(bool on) { g_encode_fault = on; }

void prefetch_tma_descriptor(const void* map) { (void)map_image(map, "prefetch.tensormap"); }

void tma_load(const void* map_ptr, uint64_t* mbar, void* dst_ptr, const int32_t* coords,
              int rank) {
  const char* op = "cp.async.bulk.tensor";
  const MapImage& m = map_image(map_ptr, op);
  if (m.rank != rank) {
    fail(std::string(op) + "." + std::to_string(rank) + "d on a tensor map of rank " +
         std::to_string(m.rank));
  }
  if (m.interleave != CU_TENSOR_MAP_INTERLEAVE_NONE) {
    fail(std::string(op) + ": interleaved tensor maps are not modeled by the emulator");
  }
  if (m.swizzle > CU_TENSOR_MAP_SWIZZLE_128B) {
    fail(std::string(op) + ": the 128B_ATOM swizzle modes are not modeled by the emulator");
  }
  if (m.oob != CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE) {
    fail(std::string(op) + ": NaN out-of-bounds fill is not modeled by the emulator");
  }
  const int esize = m.elem_bytes;
  // Elements per box dim: ceil(box / elementStride), dim 0 unstrided (no interleave).
  int64_t count[5] = {1, 1, 1, 1, 1};
  for (int i = 0; i < rank; ++i) {
    const int64_t b = int64_t{m.box_minus1[i]} + 1;
    const int64_t s = i == 0 ? 1 : m.element_stride[i];
    count[i] = (b + s - 1) / s;
  }
  const int64_t row_bytes = count[0] * esize;
  const int64_t total = row_bytes * count[1] * count[2] * count[3] * count[4];
  const int span = swizzle_span(m.swizzle);
  if (span > 0 && row_bytes != span) {
    fail(std::string(op) + ": a swizzled box whose inner dimension (" + std::to_string(row_bytes) +
         " bytes) differs from the swizzle span (" + std::to_string(span) +
         " bytes) is not modeled by the emulator");
  }
  const uint32_t dst = shared_address(dst_ptr);
  if (dst % 128 != 0) {
    fail(std::string(op) + ": the shared-memory destination must be 128-byte aligned");
  }
  shared_pointer(dst, static_cast<size_t>(total), op);
  if (wgmma_reads_shared(dst, dst + static_cast<uint32_t>(total))) {
    fail(std::string(op) + " writes shared memory that a wgmma in flight (no wgmma.wait_group "
         "since its issue) still reads: the stage was refilled before its consumers released it");
  }
  if (shared_pending(dst_ptr, static_cast<size_t>(total))) {
    fail(std::string(op) + " writes shared memory that an earlier copy still fills (its "
         "mbarrier phase has not completed)");
  }
  std::vector<unsigned char> data(static_cast<size_t>(total), 0);
  const auto* base = reinterpret_cast<const unsigned char*>(m.address);
  int64_t o = 0;
  for (int64_t i4 = 0; i4 < count[4]; ++i4) {
    for (int64_t i3 = 0; i3 < count[3]; ++i3) {
      for (int64_t i2 = 0; i2 < count[2]; ++i2) {
        for (int64_t i1 = 0; i1 < count[1]; ++i1) {
          const int64_t idx[5] = {0, i1, i2, i3, i4};
          int64_t offset = 0;
          bool inside = true;
          for (int d = 1; d < rank; ++d) {
            const int64_t c = int64_t{coords[d]} + idx[d] * m.element_stride[d];
            inside = inside && c >= 0 && c <= int64_t{m.dim_minus1[d]};
            offset += c * static_cast<int64_t>(m.stride[d - 1]);
          }
          for (int64_t i0 = 0; i0 < count[0]; ++i0, o += esize) {
            const int64_t c0 = int64_t{coords[0]} + i0;
            const uint32_t at = swizzle_address(dst + static_cast<uint32_t>(o), span) - dst;
            if (!inside || c0 < 0 || c0 > int64_t{m.dim_minus1[0]}) continue;  // zero fill
            std::memcpy(&data[at], base + offset + c0 * esize, esize);
          }
        }
      }
    }
  }
  count_tma(total);
  async_tx_copy(shared_address(mbar), dst, std::move(data), total);
}

// ---------------------------------------------------------------------------------------------
// wgmma.

uint32_t descriptor_element_address(uint64_t desc, bool mn_major, int mn, int k) {
  const uint32_t start = static_cast<uint32_t>(desc & 0x3fff) << 4;
  const uint32_t lbo = static_cast<uint32_t>((desc >> 16) & 0x3fff) << 4;
  const uint32_t sbo = static_cast<uint32_t>((desc >> 32) & 0x3fff) << 4;
  const int mode = static_cast<int>(desc >> 62);
  const int span = mode == 1 ? 128 : mode == 2 ? 64 : mode == 3 ? 32 : 0;
  constexpr int kElem = 2;
  uint32_t off;
  if (!mn_major) {
    const uint32_t kb = static_cast<uint32_t>(k) * kElem;
    if (span == 0) {
      off = (mn / 8) * sbo + (kb / 16) * lbo + (mn % 8) * 16 + kb % 16;
    } else {
      off = (mn / 8) * sbo + (mn % 8) * span + kb;
    }
  } else {
    const uint32_t nb = static_cast<uint32_t>(mn) * kElem;
    if (span == 0) {
      off = (nb / 16) * sbo + (k / 8) * lbo + (k % 8) * 16 + nb % 16;
    } else {
      off = (nb / span) * lbo + (k / 8) * sbo + (k % 8) * span + nb % span;
    }
  }
  return swizzle_address(start + off, span);
}

void accumulator_coord(int thread, int i, int& row, int& col) {
  const int w = thread / 32, lane = thread % 32, g = lane / 4, q = lane % 4;
  row = 16 * w + g + 8 * ((i / 2) % 2);
  col = 8 * (i / 4) + 2 * q + i % 2;
}

void a_fragment_coord(int thread, int i, int& row, int& col) {
  const int w = thread / 32, lane = thread % 32, g = lane / 4, q = lane % 4;
  const int j = i / 2;  // register
  row = 16 * w + g + 8 * (j % 2);
  col = 2 * q + 8 * (j / 2) + i % 2;
}

namespace {

struct WgmmaIn {
  Thread* thread;
  WgmmaShape shape;
  uint64_t a_desc, b_desc;
  const uint32_t* a_regs[4];
  float* const* d;
  int scale_d;
};

double element16(bool bf16, uint16_t bits) {
  return bf16 ? static_cast<double>(static_cast<float>(cutlass::bfloat16_t::bitcast(bits)))
              : static_cast<double>(static_cast<float>(cutlass::half_t::bitcast(bits)));
}

// One operand element from shared memory, through its descriptor (the footprint grows).
double smem_element(uint64_t desc, bool mn_major, int mn, int k, bool bf16, uint32_t& lo,
                    uint32_t& hi, const char* which) {
  if (((desc >> 49) & 7) != 0) {
    fail(std::string("wgmma: a non-zero matrix base offset in the ") + which +
         " descriptor is not modeled by the emulator");
  }
  const uint32_t a = descriptor_element_address(desc, mn_major, mn, k);
  unsigned char* p = shared_pointer(a, 2, "wgmma operand");
  if (shared_pending(p, 2)) {
    fail(std::string("wgmma reads the ") + which +
         " operand from shared memory that a copy has not completed (no wait on its mbarrier "
         "phase, or cp.async.wait_group, before the wgmma)");
  }
  lo = std::min(lo, a);
  hi = std::max(hi, a + 2);
  uint16_t bits;
  std::memcpy(&bits, p, 2);
  return element16(bf16, bits);
}

float poison() {
  float f;
  const uint32_t bits = 0xffffffffu;
  std::memcpy(&f, &bits, 4);
  return f;
}

void wgmma_exec(WarpgroupRendezvous& r) {
  const WgmmaIn& first = *static_cast<const WgmmaIn*>(r.in[0]);
  const WgmmaShape sh = first.shape;
  for (int t = 1; t < 128; ++t) {
    const WgmmaIn& in = *static_cast<const WgmmaIn*>(r.in[t]);
    if (in.shape.n != sh.n || in.shape.bf16 != sh.bf16 || in.shape.rs != sh.rs ||
        in.shape.a_mn_major != sh.a_mn_major || in.shape.b_mn_major != sh.b_mn_major) {
      fail("wgmma: the threads of the warpgroup issue different shapes or types");
    }
    if (in.b_desc != first.b_desc || (!sh.rs && in.a_desc != first.a_desc) ||
        in.scale_d != first.scale_d) {
      fail("wgmma: the matrix descriptors and scale-d must be warpgroup-uniform");
    }
  }
  for (int t = 0; t < 128; ++t) {
    const WgmmaIn& in = *static_cast<const WgmmaIn*>(r.in[t]);
    if (!in.thread->wgmma_fenced) {
      fail("wgmma.mma_async by thread " + std::to_string(in.thread->linear) +
           " without a wgmma.fence since its last register access to wgmma operands "
           "(wgmma.wait_group, or the kernel's start)");
    }
  }
  const int N = sh.n;
  std::vector<double> A(64 * 16), B(static_cast<size_t>(N) * 16);
  uint32_t a_lo = 0xffffffffu, a_hi = 0, lo = 0xffffffffu, hi = 0;
  if (sh.rs) {
    for (int t = 0; t < 128; ++t) {
      const WgmmaIn& in = *static_cast<const WgmmaIn*>(r.in[t]);
      for (int i = 0; i < 8; ++i) {
        int row, col;
        a_fragment_coord(t, i, row, col);
        const uint32_t reg = *in.a_regs[i / 2];
        A[row * 16 + col] = element16(sh.bf16, static_cast<uint16_t>(i % 2 ? reg >> 16 : reg));
      }
    }
  } else {
    for (int m = 0; m < 64; ++m) {
      for (int k = 0; k < 16; ++k) {
        A[m * 16 + k] =
            smem_element(first.a_desc, sh.a_mn_major, m, k, sh.bf16, a_lo, a_hi, "A");
      }
    }
  }
  for (int n = 0; n < N; ++n) {
    for (int k = 0; k < 16; ++k) {
      B[n * 16 + k] = smem_element(first.b_desc, sh.b_mn_major, n, k, sh.bf16, lo, hi, "B");
    }
  }
  for (int t = 0; t < 128; ++t) {
    const WgmmaIn& in = *static_cast<const WgmmaIn*>(r.in[t]);
    Thread& th = *in.thread;
    Thread::PendingWgmma op;
    op.group = -1;
    // The shared bytes the operands span (for the copy-into-operand check): B's in thread 0's
    // record, A's (SS) in thread 1's, so that the two tiles stay separate ranges.
    if (t == 0) {
      op.smem_begin = lo;
      op.smem_end = hi;
    } else if (t == 1 && !sh.rs) {
      op.smem_begin = a_lo;
      op.smem_end = a_hi;
    }
    op.d.reserve(N / 2);
    for (int i = 0; i < N / 2; ++i) {
      int row, col;
      accumulator_coord(t, i, row, col);
      float* reg = in.d[i];
      double acc = 0.0;
      if (in.scale_d) {
        // The accumulator as the previous wgmma in flight on it leaves it (wgmma of one shape
        // chain on the same registers without a wait), else the register itself.
        float c = *reg;
        for (auto it = th.wgmma.rbegin(); it != th.wgmma.rend(); ++it) {
          if (const float* v = it->find(reg, static_cast<size_t>(i))) {
            c = *v;
            break;
          }
        }
        acc = c;
      }
      for (int k = 0; k < 16; ++k) acc += A[row * 16 + k] * B[col * 16 + k];
      op.d.emplace_back(reg, static_cast<float>(acc));
      op.d_lo = op.d_lo == nullptr || reg < op.d_lo ? reg : op.d_lo;
      op.d_hi = op.d_hi == nullptr || reg > op.d_hi ? reg : op.d_hi;
    }
    if (sh.rs) {
      for (int j = 0; j < 4; ++j) op.a.emplace_back(in.a_regs[j], *in.a_regs[j]);
    }
    th.wgmma.push_back(std::move(op));
    for (int i = 0; i < N / 2; ++i) *in.d[i] = poison();
  }
  count_wgmma();
}

const CollectiveKind kWgmma{"wgmma.mma_async.sync.aligned.m64nNk16.f32", true, nullptr};

void wgmma_fence_exec(WarpgroupRendezvous& r) {
  for (int t = 0; t < 128; ++t) {
    static_cast<const WgmmaIn*>(r.in[t])->thread->wgmma_fenced = true;
  }
}
const CollectiveKind kWgmmaFence{"wgmma.fence.sync.aligned", true, nullptr};

void wgmma_commit_exec(WarpgroupRendezvous& r) {
  for (int t = 0; t < 128; ++t) {
    Thread& th = *static_cast<const WgmmaIn*>(r.in[t])->thread;
    for (auto& op : th.wgmma) {
      if (op.group < 0) op.group = th.wgmma_committed;
    }
    ++th.wgmma_committed;
  }
}
const CollectiveKind kWgmmaCommit{"wgmma.commit_group.sync.aligned", true, nullptr};

struct WaitIn {
  Thread* thread;
  int pending;
};

void wgmma_wait_exec(WarpgroupRendezvous& r) {
  const int pending = static_cast<const WaitIn*>(r.in[0])->pending;
  for (int t = 0; t < 128; ++t) {
    const WaitIn& in = *static_cast<const WaitIn*>(r.in[t]);
    if (in.pending != pending) fail("wgmma.wait_group: the threads disagree on N");
    Thread& th = *in.thread;
    const int64_t done_below = th.wgmma_committed - pending;
    std::vector<Thread::PendingWgmma> keep, done;
    for (auto& op : th.wgmma) {
      (op.group >= 0 && op.group < done_below ? done : keep).push_back(std::move(op));
    }
    for (const auto& op : done) {
      for (const auto& [p, v] : op.a) {
        if (*p != v) {
          fail("the A-operand registers of a wgmma.mma_async (RS) changed before the "
               "wgmma.wait_group that covers it");
        }
      }
      for (size_t i = 0; i < op.d.size(); ++i) {
        float* p = op.d[i].first;
        bool later = false;  // a later wgmma still in flight on the register keeps it poisoned
        for (const auto& k : keep) later = later || k.find(p, i) != nullptr;
        if (!later) *p = op.d[i].second;
      }
    }
    th.wgmma = std::move(keep);
    th.wgmma_fenced = false;
  }
}
const CollectiveKind kWgmmaWait{"wgmma.wait_group.sync.aligned", true, nullptr};

}  // namespace

void wgmma(const WgmmaShape& shape, uint64_t a_desc, const uint32_t* const* a_regs,
           uint64_t b_desc, float* const* d, int scale_d) {
  WgmmaIn in{&self(), shape, a_desc, b_desc, {a_regs[0], a_regs[1], a_regs[2], a_regs[3]}, d,
             scale_d};
  if (shape.n < 8 || shape.n > 256 || shape.n % 8 != 0) fail("wgmma: N must be 8 .. 256, step 8");
  if (shape.rs && shape.a_mn_major) fail("wgmma: A from registers has no imm-trans-a");
  warpgroup_collective(kWgmma, wgmma_exec, &in, nullptr);
}

void wgmma_fence() {
  WgmmaIn in{};
  in.thread = &self();
  warpgroup_collective(kWgmmaFence, wgmma_fence_exec, &in, nullptr);
}

void wgmma_commit() {
  WgmmaIn in{};
  in.thread = &self();
  warpgroup_collective(kWgmmaCommit, wgmma_commit_exec, &in, nullptr);
}

void wgmma_wait(int pending_groups) {
  if (pending_groups < 0 || pending_groups > 7) fail("wgmma.wait_group N: N must be 0 .. 7");
  WaitIn in{&self(), pending_groups};
  warpgroup_collective(kWgmmaWait, wgmma_wait_exec, &in, nullptr);
}

}  // namespace nattn::emu::sm90

// ---------------------------------------------------------------------------------------------
// The driver entry point cudart hands out: the emulator's own encoder.

extern "C" cudaError_t cudaGetDriverEntryPointByVersion(const char* symbol, void** funcPtr,
                                                        unsigned int cudaVersion,
                                                        unsigned long long flags,
                                                        cudaDriverEntryPointQueryResult* status) {
  (void)flags;
  if (funcPtr == nullptr || symbol == nullptr) return cudaErrorInvalidValue;
  *funcPtr = nullptr;
  if (std::strcmp(symbol, "cuTensorMapEncodeTiled") == 0 && cudaVersion >= 12000) {
    *funcPtr = reinterpret_cast<void*>(&nattn::emu::sm90::encode_tiled);
    if (status) *status = cudaDriverEntryPointSuccess;
    return cudaSuccess;
  }
  if (status) {
    *status = std::strcmp(symbol, "cuTensorMapEncodeTiled") == 0
                  ? cudaDriverEntryPointVersionNotSufficent
                  : cudaDriverEntryPointSymbolNotFound;
  }
  return cudaSuccess;
}
