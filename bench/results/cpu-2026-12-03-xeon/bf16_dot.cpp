// How much AVX512-BF16 could save in the lane kernels' score product (issue 14, bf16 on CPU):
// one packed key line's scores for a tile of 8 (ymm) or 16 (zmm) query lanes, 7 window offsets,
// head dim 64, fp32 FMAs (vfmadd231ps) against bf16 pair dot products (vdpbf16ps, depth pairs
// interleaved: 32 steps instead of 64). A stand-alone micro-benchmark, not part of the build:
//   g++ -O2 -march=sapphirerapids bf16_dot.cpp -o bf16_dot && ./bf16_dot
// Output on the 2-core Xeon VM of this directory: bf16_dot.txt.
#include <immintrin.h>
#include <chrono>
#include <cstdio>
#include <vector>
#include <cstring>
// S for 8 lanes x 7 offsets over depth 64 of one packed line (ld floats per depth row), fp32 vs bf16 pairs.
__attribute__((noinline)) void f32(const float* qt, const float* k, long ld, float* s) {
  __m256 acc[7] = {};
  for (int w = 0; w < 64; ++w) {
    __m256 q = _mm256_loadu_ps(qt + w * 8);
    for (int n = 0; n < 7; ++n) acc[n] = _mm256_fmadd_ps(q, _mm256_loadu_ps(k + w * ld + n), acc[n]);
  }
  for (int n = 0; n < 7; ++n) _mm256_storeu_ps(s + n * 8, acc[n]);
}
// bf16: k2[w2][pos][2] (pairs of depth), qt2[w2][lane][2]
__attribute__((noinline)) void b16(const uint16_t* qt, const uint16_t* k, long ld, float* s) {
  __m256 acc[7] = {};
  for (int w = 0; w < 32; ++w) {
    __m256bh q = (__m256bh)_mm256_loadu_si256((const __m256i*)(qt + w * 16));
    for (int n = 0; n < 7; ++n) acc[n] = _mm256_dpbf16_ps(acc[n], q, (__m256bh)_mm256_loadu_si256((const __m256i*)(k + w * 2 * ld + 2 * n)));
  }
  for (int n = 0; n < 7; ++n) _mm256_storeu_ps(s + n * 8, acc[n]);
}
// 16-lane zmm variants
__attribute__((noinline)) void f32z(const float* qt, const float* k, long ld, float* s) {
  __m512 acc[7] = {};
  for (int w = 0; w < 64; ++w) {
    __m512 q = _mm512_loadu_ps(qt + w * 16);
    for (int n = 0; n < 7; ++n) acc[n] = _mm512_fmadd_ps(q, _mm512_loadu_ps(k + w * ld + n), acc[n]);
  }
  for (int n = 0; n < 7; ++n) _mm512_storeu_ps(s + n * 16, acc[n]);
}
__attribute__((noinline)) void b16z(const uint16_t* qt, const uint16_t* k, long ld, float* s) {
  __m512 acc[7] = {};
  for (int w = 0; w < 32; ++w) {
    __m512bh q = (__m512bh)_mm512_loadu_si512((const void*)(qt + w * 32));
    for (int n = 0; n < 7; ++n) acc[n] = _mm512_dpbf16_ps(acc[n], q, (__m512bh)_mm512_loadu_si512((const void*)(k + w * 2 * ld + 2 * n)));
  }
  for (int n = 0; n < 7; ++n) _mm512_storeu_ps(s + n * 16, acc[n]);
}
int main() {
  const long ld = 80, lines = 64;  // a 64-position line, padded
  std::vector<float> k(lines * 64 * ld, 0.5f), qt(64 * 16, 0.25f), s(16 * 7 * lines);
  std::vector<uint16_t> kb(lines * 64 * ld, 0x3f00), qb(64 * 16, 0x3e80);
  const int reps = 20000;
  auto time = [&](auto fn, const char* name, double macs) {
    auto t0 = std::chrono::steady_clock::now();
    for (int r = 0; r < reps; ++r) for (long l = 0; l < lines; ++l) fn(l);
    double dt = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    printf("%-6s %.2f ns/line  %.1f GMAC/s\n", name, dt / (reps * lines) * 1e9, macs * reps * lines / dt / 1e9);
  };
  time([&](long l) { f32(qt.data(), k.data() + l * 64 * ld + (l % 8), ld, s.data()); }, "f32", 8 * 7 * 64);
  time([&](long l) { b16(qb.data(), kb.data() + l * 64 * ld + 2 * (l % 8), ld, s.data()); }, "bf16", 8 * 7 * 64);
  time([&](long l) { f32z(qt.data(), k.data() + l * 64 * ld + (l % 8), ld, s.data()); }, "f32z", 16 * 7 * 64);
  time([&](long l) { b16z(qb.data(), kb.data() + l * 64 * ld + 2 * (l % 8), ld, s.data()); }, "bf16z", 16 * 7 * 64);
}
