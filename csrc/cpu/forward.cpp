// Fused CPU forward: out and lse of neighborhood attention, flash-attention style on tiles of
// kRows queries (cpu_tiles.h), with the keys and values of one kv head packed once and shared by
// all query heads of its group.
#include <type_traits>
#include <vector>

#include "cpu/cpu_common.h"
#include "cpu/cpu_kernels.h"
#include "cpu/cpu_tiles.h"

namespace nattn::cpu {
namespace {

// Most memory the per-thread group storage of the grouped schedule may take (bytes, all threads).
constexpr int64_t kGroupedStorageBudget = int64_t{1} << 30;

// Packed keys of one (batch, kv head) group and per-thread scratch; reused across groups.
template <typename A>
struct ForwardStorage {
  std::vector<A> k_store, v_store, v_line_store, add_kt, add_v;
  std::vector<ForwardScratch<A>> scratch;
};

// Output and lse of the query heads of kv head kvh of batch b, on nt threads: the group's keys
// are packed (and its values gathered) right before its tiles run, so they are still in cache;
// packing every head first measured 7x the 64x64 time at 128x128 tokens (4x the work) on the
// 2-core CI machine.
template <typename T>
void forward_group(const AttentionParams& p, const Geometry& geo,
                   const std::vector<AxisTile>& tiles, int64_t b, int64_t kvh, int nt,
                   ForwardStorage<typename ComputeType<T>::type>& st,
                   const BiasTable<typename ComputeType<T>::type>* bias, bool lanes,
                   bool bf16_pairs) {
  using A = typename ComputeType<T>::type;
  const int64_t D = p.head_dim, Dv = p.value_dim;
  T* out = static_cast<T*>(p.out.data);
  float* lse = static_cast<float*>(p.lse.data);
  if (st.scratch.size() < static_cast<size_t>(nt)) {
    st.scratch.assign(static_cast<size_t>(nt), ForwardScratch<A>(p));
  }
  const A* k_lines = nullptr;
  if constexpr (std::is_same_v<T, BFloat16>) {
    if (bf16_pairs) {  // the keys' depth pairs as 32-bit units (use_bf16_pairs: strides even)
      const int64_t pair_stride[6] = {p.k.stride[0] / 2, p.k.stride[1] / 2, p.k.stride[2] / 2,
                                      p.k.stride[3] / 2, p.k.stride[4] / 2, 1};
      k_lines = pack_lines(static_cast<const BF16Pair*>(p.k.data), pair_stride, b, kvh, 1, D / 2,
                           geo, nt, st.k_store);
    }
  }
  if (k_lines == nullptr) {
    k_lines = pack_lines(static_cast<const T*>(p.k.data), p.k.stride, b, kvh, 1, D, geo, nt,
                         st.k_store);
  }
  // The lane kernels (lanes: use_lane_forward) read the values as transposed lines, the block
  // kernels as rows.
  const Rows<A> v_rows =
      lanes ? Rows<A>{}
            : make_rows(static_cast<const T*>(p.v.data), p.v.stride, b, kvh, 1, Dv, geo, nt,
                        st.v_store);
  if (p.num_additional > 0) {
    pack_additional_transposed(static_cast<const T*>(p.add_k.data), p.add_k.stride, b, kvh,
                               p.num_additional, D, st.add_kt);
    pack_additional_rows(static_cast<const T*>(p.add_v.data), p.add_v.stride, b, kvh,
                         p.num_additional, Dv, st.add_v);
  }
  const A* v_lines = lanes ? pack_lines(static_cast<const T*>(p.v.data), p.v.stride, b, kvh, 1,
                                       Dv, geo, nt, st.v_line_store, bf16_pairs)
                           : nullptr;
  const ForwardKeys<A> keys{k_lines, v_rows.head(0), st.add_kt.data(), st.add_v.data(), bias,
                            v_lines, bf16_pairs};
  forward_tiles<T>(p, geo, tiles, b, kvh, keys, st.scratch, nt, true,
                   [&](int64_t h, int64_t x0, int64_t x1, const AxisTile& tile,
                       const A* o, const A* tile_lse) {
                     for (int64_t r = 0; r < tile.count; ++r) {
                       const int64_t x[3] = {x0, x1, tile.index(geo, r)};
                       store_row(o + r * Dv, Dv,
                                 out + token_offset(p.out.stride, b, x) + h * p.out.stride[4],
                                 p.out.stride[5]);
                       lse[token_offset(p.lse.stride, b, x) + h * p.lse.stride[4]] =
                           static_cast<float>(tile_lse[r]);
                     }
                   });
}

// Whether the lane forward runs on bf16 products (block_kernels.h: lane_forward_bf16): bf16
// inputs on the lane kernels, a CPU with AVX512-BF16, no additional keys, an even head_dim and
// query and key strides that keep each pair of depth indices (2j, 2j + 1) one 32-bit unit of
// the rows (any layout with contiguous, even-sized heads).
template <typename T>
bool use_bf16_pairs(const AttentionParams& p, bool lanes) {
  if (!std::is_same_v<T, BFloat16> || !lanes || p.num_additional > 0 || p.head_dim % 2 != 0 ||
      p.k.stride[5] != 1 || p.q.stride[5] != 1) {
    return false;
  }
  for (int d = 0; d < 5; ++d) {
    if (p.k.stride[d] % 2 != 0 || p.q.stride[d] % 2 != 0) return false;
  }
  return lane_bf16_available();
}

template <typename T>
void forward_impl(const AttentionParams& p) {
  using A = typename ComputeType<T>::type;
  const int nt = resolve_num_threads(p);
  const Geometry geo(p);
  const std::vector<AxisTile> tiles = last_axis_tiles(geo);
  const int64_t groups = p.batch * p.kv_heads;
  BiasTable<A> bias_table;
  if (p.has_rpb()) bias_table = BiasTable<A>(p, static_cast<const T*>(p.rpb.data), false);
  const BiasTable<A>* bias = p.has_rpb() ? &bias_table : nullptr;
  const bool lanes = use_lane_forward<A>(p);  // once: it walks the last axis's tiles
  const bool bf16_pairs = use_bf16_pairs<T>(p, lanes);
  // When the groups share out evenly over the threads (the last round at least 3/4 full in
  // work), each thread runs whole groups: one parallel region instead of three per group, whose
  // start-up dominates small problems (14 x 14 tokens, 8 heads, 2 threads: 0.60 ms -> 0.33 ms).
  // Every output row is computed the same way either way.
  // Each thread then holds one group's packed keys and gathered values at a time; like the
  // backward's fused schedule, this stays within a budget over all threads.
  const int64_t rounds = (groups + nt - 1) / nt;
  const int64_t per_group =
      static_cast<int64_t>(sizeof(A)) *
      (p.head_dim * geo.lines * geo.ld +
       (lanes ? p.value_dim * geo.lines * geo.ld : p.value_dim * geo.tokens()));
  if (nt > 1 && groups >= nt && 4 * rounds * nt <= 5 * groups &&
      per_group * nt <= kGroupedStorageBudget) {
    std::vector<ForwardStorage<A>> storage(static_cast<size_t>(nt));
    parallel_for(nt, groups, [&](int64_t g, int thread) {
      forward_group<T>(p, geo, tiles, g / p.kv_heads, g % p.kv_heads, 1, storage[thread], bias,
                       lanes, bf16_pairs);
    });
    return;
  }
  ForwardStorage<A> storage;
  for (int64_t g = 0; g < groups; ++g) {
    forward_group<T>(p, geo, tiles, g / p.kv_heads, g % p.kv_heads, nt, storage, bias, lanes,
                     bf16_pairs);
  }
}

}  // namespace

void forward(const AttentionParams& p) {
  cpu_isa();  // picks (or rejects, by throwing) the kernel level here, not in a worker thread
  dispatch_dtype(p.dtype,
                 [&](auto* tag) { forward_impl<std::remove_pointer_t<decltype(tag)>>(p); });
}

}  // namespace nattn::cpu
