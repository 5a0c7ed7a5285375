// Fused CPU backward: dq, dk, dv (and d_add_k, d_add_v) of neighborhood attention on tiles
// (cpu_tiles.h), recomputing P = exp(S - lse) per chunk:
//   dP = dO V^T,  dS = P * (dP - delta),  delta = rowsum(dO * O) - d_lse,
//   dq = scale dS K,  dk = scale dS^T Q,  dv = P^T dO.
// dq walks each query tile's key windows; dk/dv walk each key tile's inverse windows (the queries
// that attend to it), so every gradient row is owned by one work item: no atomics, and the sum
// order is fixed, which makes the result deterministic for any thread count.
#include <algorithm>
#include <cmath>
#include <limits>
#include <type_traits>
#include <vector>

#include "cpu/cpu_common.h"
#include "cpu/cpu_kernels.h"
#include "cpu/cpu_tiles.h"

namespace nattn::cpu {
namespace {

// d_add_k/d_add_v sum over every query of a kv-head group; the queries are cut into parts of at
// least this many so that the work of one additional token spreads over threads. The parts depend
// only on the problem shape and their partial sums are added in part order: deterministic.
constexpr int64_t kAdditionalPartQueries = 1024;

template <typename A>
struct BackwardScratch {
  std::vector<A> a, b, acc_a, acc_b, s, dp;
  explicit BackwardScratch(const AttentionParams& p)
      : a(kRows * p.head_dim),
        b(kRows * p.value_dim),
        acc_a(kRows * p.head_dim),
        acc_b(kRows * p.value_dim),
        s(kRows * kCols),
        dp(kRows * kCols) {}
};

// One chunk of the dq pass: the tile's rows (q, dO; per-row lse, delta) against n keys.
template <typename A>
void dq_chunk(const AttentionParams& p, const A* q, const A* d_out, const A* kt, const A* vt,
              int64_t ld, const A* k_rows, int64_t k_step, int64_t n, const int64_t* clo,
              const int64_t* chi, const A* lse, const A* delta, A* dq, A* s, A* dp) {
  static constexpr A kZeros[kCols] = {};
  block_dot(q, p.head_dim, kt, ld, p.head_dim, s);
  block_dot(d_out, p.value_dim, vt, ld, p.value_dim, dp);
  block_backward_probs(s, dp, clo, chi, static_cast<A>(p.scale), lse, kZeros, delta, kZeros, dp);
  block_accumulate(dp, n, k_rows, k_step, p.head_dim, dq, p.head_dim);
}

// One chunk of the dk/dv pass: the tile's key rows (k, v) against n queries (panels qt, dot;
// rows q, dO; per-query lse, delta).
template <typename A>
void dkdv_chunk(const AttentionParams& p, const A* k, const A* v, const A* qt, const A* dot,
                int64_t ld, const A* q_rows, int64_t q_step, const A* do_rows, int64_t do_step,
                int64_t n, const int64_t* clo, const int64_t* chi, const A* lse, const A* delta,
                A* dk, A* dv, A* s, A* dp) {
  static constexpr A kZeros[kRows] = {};
  block_dot(k, p.head_dim, qt, ld, p.head_dim, s);
  block_dot(v, p.value_dim, dot, ld, p.value_dim, dp);
  block_backward_probs(s, dp, clo, chi, static_cast<A>(p.scale), kZeros, lse, kZeros, delta, dp);
  block_accumulate(s, n, do_rows, do_step, p.value_dim, dv, p.value_dim);
  block_accumulate(dp, n, q_rows, q_step, p.head_dim, dk, p.head_dim);
}

template <typename T>
void backward_impl(const AttentionParams& p) {
  using A = typename ComputeType<T>::type;
  const int64_t D = p.head_dim, Dv = p.value_dim, M = p.num_additional;
  const int64_t hpk = p.heads_per_kv();
  const int nt = resolve_num_threads(p);
  const Geometry geo(p);
  const std::vector<AxisTile> tiles = last_axis_tiles(geo);
  const int64_t n_tiles = static_cast<int64_t>(tiles.size());
  const int64_t n_x01 = geo.len[0] * geo.len[1];
  const T* q = static_cast<const T*>(p.q.data);
  const T* k = static_cast<const T*>(p.k.data);
  const T* v = static_cast<const T*>(p.v.data);
  const T* d_out = static_cast<const T*>(p.d_out.data);

  // Per-row lse and delta in the compute type, laid out like the packed lines ([b][h][line][t],
  // zero padded to ld) so that a chunk of kCols queries reads them contiguously. The stored lse
  // is fp32; fp64 recomputes it below so that fp64 gradients keep fp64 accuracy.
  const int64_t stats_per_head = geo.lines * geo.ld;
  std::vector<A> row_lse(static_cast<size_t>(p.batch * p.heads * stats_per_head), A(0));
  std::vector<A> row_delta(row_lse.size(), A(0));
  auto stats_line = [&](int64_t b, int64_t h, int64_t line) {
    return ((b * p.heads + h) * geo.lines + line) * geo.ld;
  };
  parallel_for(nt, p.batch * p.heads * n_x01, [&](int64_t item, int) {
    const int64_t bh = item / n_x01, x01 = item % n_x01;
    const int64_t b = bh / p.heads, h = bh % p.heads;
    std::vector<A> o_row(static_cast<size_t>(Dv)), do_row(static_cast<size_t>(Dv));
    for (int64_t x2 = 0; x2 < geo.len[2]; ++x2) {
      const int64_t x[3] = {x01 / geo.len[1], x01 % geo.len[1], x2};
      load_row(static_cast<const T*>(p.out.data) + token_offset(p.out.stride, b, x) +
                   h * p.out.stride[4],
               p.out.stride[5], Dv, o_row.data());
      load_row(d_out + token_offset(p.d_out.stride, b, x) + h * p.d_out.stride[4],
               p.d_out.stride[5], Dv, do_row.data());
      A dl = 0;
      for (int64_t w = 0; w < Dv; ++w) dl += o_row[w] * do_row[w];
      if (p.d_lse.data != nullptr) {  // lse is an output too: d lse_i / d s_ij = P_ij
        dl -= static_cast<const float*>(
            p.d_lse.data)[token_offset(p.d_lse.stride, b, x) + h * p.d_lse.stride[4]];
      }
      static_cast<float*>(p.delta.data)[token_offset(p.delta.stride, b, x) +
                                        h * p.delta.stride[4]] = static_cast<float>(dl);
      const int64_t at = stats_line(b, h, geo.line(x[0], x[1], x2 % geo.dilation)) +
                         x2 / geo.dilation;
      row_delta[at] = dl;
      row_lse[at] = static_cast<const float*>(
          p.lse.data)[token_offset(p.lse.stride, b, x) + h * p.lse.stride[4]];
    }
  });

  std::vector<BackwardScratch<A>> scratch(static_cast<size_t>(nt), BackwardScratch<A>(p));
  std::vector<ForwardScratch<A>> fwd_scratch;
  if constexpr (std::is_same_v<A, double>) {
    fwd_scratch.assign(static_cast<size_t>(nt), ForwardScratch<A>(p));
  }
  std::vector<A> k_store, v_store, k_rows_store, v_rows_store, q_store, do_store, q_rows_store,
      do_rows_store, add_kt, add_vt, add_k_rows, add_v_rows, dk_acc, dv_acc, add_partial;
  const int64_t lines_per_part =
      std::max<int64_t>(1, (kAdditionalPartQueries + geo.group_max - 1) / geo.group_max);
  const int64_t n_parts = (geo.lines + lines_per_part - 1) / lines_per_part;
  const int64_t m_tiles = (M + kRows - 1) / kRows;
  const int64_t partial_size = kRows * (D + Dv);

  for (int64_t b = 0; b < p.batch; ++b) {
    for (int64_t kvh = 0; kvh < p.kv_heads; ++kvh) {
      const A* k_lines = pack_lines(k, p.k.stride, b, kvh, 1, D, geo, nt, k_store);
      const A* v_lines = pack_lines(v, p.v.stride, b, kvh, 1, Dv, geo, nt, v_store);
      const Rows<A> k_rows = make_rows(k, p.k.stride, b, kvh, 1, D, geo, nt, k_rows_store);
      const Rows<A> v_rows = make_rows(v, p.v.stride, b, kvh, 1, Dv, geo, nt, v_rows_store);
      if (M > 0) {
        const T* ak = static_cast<const T*>(p.add_k.data);
        const T* av = static_cast<const T*>(p.add_v.data);
        pack_additional_transposed(ak, p.add_k.stride, b, kvh, M, D, add_kt);
        pack_additional_transposed(av, p.add_v.stride, b, kvh, M, Dv, add_vt);
        pack_additional_rows(ak, p.add_k.stride, b, kvh, M, D, add_k_rows);
        pack_additional_rows(av, p.add_v.stride, b, kvh, M, Dv, add_v_rows);
      }
      const int64_t k_step = geo.dilation * k_rows.s[2];
      const int64_t per_head = n_x01 * n_tiles;

      if constexpr (std::is_same_v<A, double>) {
        const ForwardKeys<A> keys{k_lines, v_rows, add_kt.data(), add_v_rows.data()};
        parallel_for(nt, hpk * per_head, [&](int64_t item, int thread) {
          const int64_t h = kvh * hpk + item / per_head;
          const AxisTile& tile = tiles[item % n_tiles];
          const int64_t x01 = (item % per_head) / n_tiles;
          const int64_t x0 = x01 / geo.len[1], x1 = x01 % geo.len[1];
          ForwardScratch<A>& s = fwd_scratch[thread];
          load_tile(q, p.q.stride, b, h, x0, x1, tile, geo, D, s.q.data());
          A tile_lse[kRows];
          forward_tile(p, geo, tile, x0, x1, keys, s, tile_lse);
          A* dst = row_lse.data() + stats_line(b, h, geo.line(x0, x1, tile.group)) + tile.j0;
          std::copy(tile_lse, tile_lse + tile.count, dst);
        });
      }

      // dq: per query tile over its key windows, then the additional keys.
      parallel_for(nt, hpk * per_head, [&](int64_t item, int thread) {
        const int64_t h = kvh * hpk + item / per_head;
        const AxisTile& tile = tiles[item % n_tiles];
        const int64_t x01 = (item % per_head) / n_tiles;
        const int64_t x0 = x01 / geo.len[1], x1 = x01 % geo.len[1];
        BackwardScratch<A>& s = scratch[thread];
        load_tile(q, p.q.stride, b, h, x0, x1, tile, geo, D, s.a.data());
        load_tile(d_out, p.d_out.stride, b, h, x0, x1, tile, geo, Dv, s.b.data());
        const int64_t at = stats_line(b, h, geo.line(x0, x1, tile.group)) + tile.j0;
        const A* lse = row_lse.data() + at;
        const A* delta = row_delta.data() + at;
        const IndexRange w0 = key_window(p.axes[0], x0), w1 = key_window(p.axes[1], x1);
        int64_t lo[kRows] = {}, hi[kRows] = {}, clo[kRows], chi[kRows];
        int64_t u_lo = std::numeric_limits<int64_t>::max(), u_hi = 0;
        for (int r = 0; r < tile.count; ++r) {
          group_span(key_window(p.axes[2], tile.index(geo, r)), tile.group, geo.dilation, &lo[r],
                     &hi[r]);
          u_lo = std::min(u_lo, lo[r]);
          u_hi = std::max(u_hi, hi[r]);
        }
        A* dq = s.acc_a.data();
        std::fill(s.acc_a.begin(), s.acc_a.end(), A(0));
        for (int64_t i0 = 0; i0 < w0.count; ++i0) {
          const int64_t y0 = w0.first + i0 * w0.step;
          for (int64_t i1 = 0; i1 < w1.count; ++i1) {
            const int64_t y1 = w1.first + i1 * w1.step;
            const int64_t line = geo.line(y0, y1, tile.group);
            const A* kt = k_lines + line * D * geo.ld;
            const A* vt = v_lines + line * Dv * geo.ld;
            const A* kr = k_rows.line(0, y0, y1, tile.group);
            for (int64_t c0 = u_lo; c0 < u_hi; c0 += kCols) {
              const int64_t n = std::min<int64_t>(kCols, u_hi - c0);
              chunk_spans(lo, hi, c0, n, clo, chi);
              dq_chunk(p, s.a.data(), s.b.data(), kt + c0, vt + c0, geo.ld, kr + c0 * k_step,
                       k_step, n, clo, chi, lse, delta, dq, s.s.data(), s.dp.data());
            }
          }
        }
        for (int64_t c0 = 0; c0 < M; c0 += kCols) {
          const int64_t n = std::min<int64_t>(kCols, M - c0);
          for (int r = 0; r < kRows; ++r) {
            clo[r] = 0;
            chi[r] = r < tile.count ? n : 0;
          }
          dq_chunk(p, s.a.data(), s.b.data(), add_kt.data() + c0, add_vt.data() + c0, M + kCols,
                   add_k_rows.data() + c0 * D, D, n, clo, chi, lse, delta, dq, s.s.data(),
                   s.dp.data());
        }
        const A scale = static_cast<A>(p.scale);
        T* dq_out = static_cast<T*>(p.dq.data);
        for (int64_t r = 0; r < tile.count; ++r) {
          for (int64_t w = 0; w < D; ++w) dq[r * D + w] *= scale;
          const int64_t x[3] = {x0, x1, tile.index(geo, r)};
          store_row(dq + r * D, D, dq_out + token_offset(p.dq.stride, b, x) + h * p.dq.stride[4],
                    p.dq.stride[5]);
        }
      });

      // dk, dv: per key tile over the queries that attend to it, summed over the group's heads
      // (head by head, in order) in compute-type accumulators; d_add_k/d_add_v per (tile of
      // additional tokens, part of the queries) into partial sums.
      dk_acc.assign(static_cast<size_t>(geo.tokens() * D), A(0));
      dv_acc.assign(static_cast<size_t>(geo.tokens() * Dv), A(0));
      add_partial.assign(static_cast<size_t>(m_tiles * n_parts * partial_size), A(0));
      const int64_t key_items = n_x01 * n_tiles;
      for (int64_t h = kvh * hpk; h < (kvh + 1) * hpk; ++h) {
        const A* q_lines = pack_lines(q, p.q.stride, b, h, 1, D, geo, nt, q_store);
        const A* do_lines = pack_lines(d_out, p.d_out.stride, b, h, 1, Dv, geo, nt, do_store);
        const Rows<A> q_rows = make_rows(q, p.q.stride, b, h, 1, D, geo, nt, q_rows_store);
        const Rows<A> do_rows =
            make_rows(d_out, p.d_out.stride, b, h, 1, Dv, geo, nt, do_rows_store);
        const int64_t q_step = geo.dilation * q_rows.s[2];
        const int64_t do_step = geo.dilation * do_rows.s[2];
        const A* lse_head = row_lse.data() + stats_line(b, h, 0);
        const A* delta_head = row_delta.data() + stats_line(b, h, 0);
        // All chunks of query line `line` in [c_begin, c_end), rows masked to [lo, hi).
        auto walk_line = [&](BackwardScratch<A>& s, int64_t x0, int64_t x1, int64_t group,
                             const int64_t* lo, const int64_t* hi, int64_t c_begin,
                             int64_t c_end) {
          const int64_t line = geo.line(x0, x1, group);
          const A* qt = q_lines + line * D * geo.ld;
          const A* dot = do_lines + line * Dv * geo.ld;
          const A* qr = q_rows.line(0, x0, x1, group);
          const A* dor = do_rows.line(0, x0, x1, group);
          const A* lse = lse_head + line * geo.ld;
          const A* delta = delta_head + line * geo.ld;
          int64_t clo[kRows], chi[kRows];
          for (int64_t c0 = c_begin; c0 < c_end; c0 += kCols) {
            const int64_t n = std::min<int64_t>(kCols, c_end - c0);
            chunk_spans(lo, hi, c0, n, clo, chi);
            dkdv_chunk(p, s.a.data(), s.b.data(), qt + c0, dot + c0, geo.ld, qr + c0 * q_step,
                       q_step, dor + c0 * do_step, do_step, n, clo, chi, lse + c0, delta + c0,
                       s.acc_a.data(), s.acc_b.data(), s.s.data(), s.dp.data());
          }
        };
        parallel_for(nt, key_items + m_tiles * n_parts, [&](int64_t item, int thread) {
          BackwardScratch<A>& s = scratch[thread];
          if (item >= key_items) {
            const int64_t mt = (item - key_items) / n_parts, part = (item - key_items) % n_parts;
            const int64_t m0 = mt * kRows, count = std::min<int64_t>(kRows, M - m0);
            std::fill(s.a.begin(), s.a.end(), A(0));
            std::fill(s.b.begin(), s.b.end(), A(0));
            std::copy(add_k_rows.data() + m0 * D, add_k_rows.data() + (m0 + count) * D,
                      s.a.data());
            std::copy(add_v_rows.data() + m0 * Dv, add_v_rows.data() + (m0 + count) * Dv,
                      s.b.data());
            A* partial = add_partial.data() + (mt * n_parts + part) * partial_size;
            std::copy(partial, partial + kRows * D, s.acc_a.data());
            std::copy(partial + kRows * D, partial + partial_size, s.acc_b.data());
            const int64_t line_end = std::min(geo.lines, (part + 1) * lines_per_part);
            for (int64_t line = part * lines_per_part; line < line_end; ++line) {
              const int64_t g = line % geo.dilation, x01 = line / geo.dilation;
              const int64_t n = group_length(geo.len[2], geo.dilation, g);
              int64_t lo[kRows] = {}, hi[kRows] = {};
              for (int r = 0; r < count; ++r) hi[r] = n;
              walk_line(s, x01 / geo.len[1], x01 % geo.len[1], g, lo, hi, 0, n);
            }
            std::copy(s.acc_a.data(), s.acc_a.data() + kRows * D, partial);
            std::copy(s.acc_b.data(), s.acc_b.data() + kRows * Dv, partial + kRows * D);
            return;
          }
          const AxisTile& tile = tiles[item % n_tiles];
          const int64_t x01 = item / n_tiles;
          const int64_t y0 = x01 / geo.len[1], y1 = x01 % geo.len[1];
          load_tile(k, p.k.stride, b, kvh, y0, y1, tile, geo, D, s.a.data());
          load_tile(v, p.v.stride, b, kvh, y0, y1, tile, geo, Dv, s.b.data());
          // Accumulator rows of the tile's keys: token (y0, y1, group + dilation * (j0 + r)).
          const int64_t first = x01 * geo.len[2] + tile.index(geo, 0);
          const int64_t row_step = geo.dilation;
          for (int64_t r = 0; r < kRows; ++r) {
            A* dk_r = s.acc_a.data() + r * D;
            A* dv_r = s.acc_b.data() + r * Dv;
            if (r < tile.count) {
              std::copy_n(dk_acc.data() + (first + r * row_step) * D, D, dk_r);
              std::copy_n(dv_acc.data() + (first + r * row_step) * Dv, Dv, dv_r);
            } else {
              std::fill(dk_r, dk_r + D, A(0));
              std::fill(dv_r, dv_r + Dv, A(0));
            }
          }
          const IndexRange w0 = query_window(p.axes[0], y0), w1 = query_window(p.axes[1], y1);
          int64_t lo[kRows] = {}, hi[kRows] = {};
          int64_t u_lo = std::numeric_limits<int64_t>::max(), u_hi = 0;
          for (int r = 0; r < tile.count; ++r) {
            group_span(query_window(p.axes[2], tile.index(geo, r)), tile.group, geo.dilation,
                       &lo[r], &hi[r]);
            if (lo[r] >= hi[r]) continue;
            u_lo = std::min(u_lo, lo[r]);
            u_hi = std::max(u_hi, hi[r]);
          }
          for (int64_t i0 = 0; i0 < w0.count; ++i0) {
            for (int64_t i1 = 0; i1 < w1.count; ++i1) {
              walk_line(s, w0.first + i0 * w0.step, w1.first + i1 * w1.step, tile.group, lo, hi,
                        u_lo, u_hi);
            }
          }
          for (int64_t r = 0; r < tile.count; ++r) {
            std::copy_n(s.acc_a.data() + r * D, D, dk_acc.data() + (first + r * row_step) * D);
            std::copy_n(s.acc_b.data() + r * Dv, Dv, dv_acc.data() + (first + r * row_step) * Dv);
          }
        });
      }

      const A scale = static_cast<A>(p.scale);
      T* dk = static_cast<T*>(p.dk.data);
      T* dv = static_cast<T*>(p.dv.data);
      parallel_for(nt, n_x01, [&](int64_t x01, int) {
        for (int64_t x2 = 0; x2 < geo.len[2]; ++x2) {
          const int64_t x[3] = {x01 / geo.len[1], x01 % geo.len[1], x2};
          A* dk_row = dk_acc.data() + (x01 * geo.len[2] + x2) * D;
          for (int64_t w = 0; w < D; ++w) dk_row[w] *= scale;
          store_row(dk_row, D, dk + token_offset(p.dk.stride, b, x) + kvh * p.dk.stride[4],
                    p.dk.stride[5]);
          store_row(dv_acc.data() + (x01 * geo.len[2] + x2) * Dv, Dv,
                    dv + token_offset(p.dv.stride, b, x) + kvh * p.dv.stride[4], p.dv.stride[5]);
        }
      });
      // d_add_k, d_add_v: partial sums added in part order.
      for (int64_t m = 0; m < M; ++m) {
        const int64_t mt = m / kRows, r = m % kRows;
        std::vector<A> dak(static_cast<size_t>(D), A(0)), dav(static_cast<size_t>(Dv), A(0));
        for (int64_t part = 0; part < n_parts; ++part) {
          const A* partial = add_partial.data() + (mt * n_parts + part) * partial_size;
          for (int64_t w = 0; w < D; ++w) dak[w] += partial[r * D + w];
          for (int64_t w = 0; w < Dv; ++w) dav[w] += partial[kRows * D + r * Dv + w];
        }
        for (int64_t w = 0; w < D; ++w) dak[w] *= scale;
        store_row(dak.data(), D,
                  static_cast<T*>(p.d_add_k.data) + b * p.d_add_k.stride[0] +
                      m * p.d_add_k.stride[1] + kvh * p.d_add_k.stride[2],
                  p.d_add_k.stride[3]);
        store_row(dav.data(), Dv,
                  static_cast<T*>(p.d_add_v.data) + b * p.d_add_v.stride[0] +
                      m * p.d_add_v.stride[1] + kvh * p.d_add_v.stride[2],
                  p.d_add_v.stride[3]);
      }
    }
  }
}

}  // namespace

void backward(const AttentionParams& p) {
  dispatch_dtype(p.dtype,
                 [&](auto* tag) { backward_impl<std::remove_pointer_t<decltype(tag)>>(p); });
}

}  // namespace nattn::cpu
