#pragma once
// The AVX2 GEMV kernels: y = weight · x in float32 for a contiguous [N, K] float32 or bfloat16
// weight and K float32 values of x (needs AVX2 and FMA). Used by the operator internvl_chat::gemv
// (gemv_avx2.cpp) and by the C++ decode step (decode_step.cpp).
//
// Rows go four at a time, a quarter of the matrix apart, sharing each load of x: the rows'
// dependency chains overlap, the horizontal sums are done four at once, and a large matrix is
// read from memory as four long sequential streams (fp32 K = 896: 17 GB/s on one thread against
// 11-12 one row at a time; bf16 short rows likewise). Small matrices that sit in cache gain too
// (the demo model's step: fp32 ×1.2-1.7, bf16 ×1.3-1.5). The last N % 4 rows go one at a time
// with four independent accumulators. Which rows go which way depends only on the shape, never
// on the thread count, so every thread count gives the same values.
//
// bf16: a 32-bit lane holds two weights, the even one in its low half; a 16-bit left shift gives
// the even weights as float32 and masking the low half the odd ones, each multiplied with x's
// even or odd values (split once per call).
//
// Where the CPU has AVX-512F the four-row groups go to gemv_avx512.h's kernels instead
// (gemv_kernel() below, chosen at load by cpu_gemv.py); the rest stays as here.

#include "gemv_avx512.h"

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <immintrin.h>

#include <algorithm>
#include <atomic>
#include <string>
#include <vector>

namespace internvl_chat_cpu {

// the kernels for the four-row groups: 0 AVX2 (the default), 1 AVX-512
inline std::atomic<int> avx512_groups{0};

// Selects the kernels by name ("avx2", "avx512"; "" selects nothing) and returns the name of
// those in use. AVX-512 is taken only where this build has it and the CPU reports AVX-512F
// (and the OS saves its registers); otherwise the choice stays as it was.
inline std::string gemv_kernel(const std::string& name) {
  if (name == "avx2") avx512_groups = 0;
#if INTERNVL_GEMV_AVX512
  if (name == "avx512" && __builtin_cpu_supports("avx512f")) avx512_groups = 1;
#endif
  return avx512_groups ? "avx512" : "avx2";
}

inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

inline float dot_f32(const float* w, int64_t K, const float* x) {
  __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps(), a2 = _mm256_setzero_ps(), a3 = _mm256_setzero_ps();
  int64_t k = 0;
  for (; k + 32 <= K; k += 32) {
    a0 = _mm256_fmadd_ps(_mm256_loadu_ps(w + k), _mm256_loadu_ps(x + k), a0);
    a1 = _mm256_fmadd_ps(_mm256_loadu_ps(w + k + 8), _mm256_loadu_ps(x + k + 8), a1);
    a2 = _mm256_fmadd_ps(_mm256_loadu_ps(w + k + 16), _mm256_loadu_ps(x + k + 16), a2);
    a3 = _mm256_fmadd_ps(_mm256_loadu_ps(w + k + 24), _mm256_loadu_ps(x + k + 24), a3);
  }
  for (; k + 8 <= K; k += 8) a0 = _mm256_fmadd_ps(_mm256_loadu_ps(w + k), _mm256_loadu_ps(x + k), a0);
  float s = hsum(_mm256_add_ps(_mm256_add_ps(a0, a1), _mm256_add_ps(a2, a3)));
  for (; k < K; ++k) s += w[k] * x[k];
  return s;
}

// x_even[j] = x[2j], x_odd[j] = x[2j + 1]
inline float dot_bf16(const at::BFloat16* w, int64_t K, const float* x_even, const float* x_odd, const float* x) {
  const __m256i high = _mm256_set1_epi32(static_cast<int>(0xFFFF0000u));
  __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps(), b0 = _mm256_setzero_ps(), b1 = _mm256_setzero_ps();
  int64_t k = 0;
  for (; k + 32 <= K; k += 32) {
    __m256i v0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + k));
    __m256i v1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + k + 16));
    a0 = _mm256_fmadd_ps(_mm256_castsi256_ps(_mm256_slli_epi32(v0, 16)), _mm256_loadu_ps(x_even + k / 2), a0);
    b0 = _mm256_fmadd_ps(_mm256_castsi256_ps(_mm256_and_si256(v0, high)), _mm256_loadu_ps(x_odd + k / 2), b0);
    a1 = _mm256_fmadd_ps(_mm256_castsi256_ps(_mm256_slli_epi32(v1, 16)), _mm256_loadu_ps(x_even + k / 2 + 8), a1);
    b1 = _mm256_fmadd_ps(_mm256_castsi256_ps(_mm256_and_si256(v1, high)), _mm256_loadu_ps(x_odd + k / 2 + 8), b1);
  }
  for (; k + 16 <= K; k += 16) {
    __m256i v0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + k));
    a0 = _mm256_fmadd_ps(_mm256_castsi256_ps(_mm256_slli_epi32(v0, 16)), _mm256_loadu_ps(x_even + k / 2), a0);
    b0 = _mm256_fmadd_ps(_mm256_castsi256_ps(_mm256_and_si256(v0, high)), _mm256_loadu_ps(x_odd + k / 2), b0);
  }
  float s = hsum(_mm256_add_ps(_mm256_add_ps(a0, a1), _mm256_add_ps(b0, b1)));
  for (; k < K; ++k) s += static_cast<float>(w[k]) * x[k];
  return s;
}

// the four sums of four rows' accumulators, as [s0 s1 s2 s3]
inline __m128 hsum4(__m256 s0, __m256 s1, __m256 s2, __m256 s3) {
  __m256 h = _mm256_hadd_ps(_mm256_hadd_ps(s0, s1), _mm256_hadd_ps(s2, s3));
  return _mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps(h, 1));
}

// y[0], y[q], y[2q], y[3q] = rows w, w + q·K, w + 2q·K, w + 3q·K times x; two accumulators per row
inline void dot4_f32(const float* w, int64_t K, int64_t q, const float* x, float* y) {
  const float *w0 = w, *w1 = w + q * K, *w2 = w + 2 * q * K, *w3 = w + 3 * q * K;
  __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0, b0 = a0, b1 = a0, b2 = a0, b3 = a0;
  int64_t k = 0;
  for (; k + 16 <= K; k += 16) {
    const __m256 x0 = _mm256_loadu_ps(x + k), x1 = _mm256_loadu_ps(x + k + 8);
    a0 = _mm256_fmadd_ps(_mm256_loadu_ps(w0 + k), x0, a0);
    a1 = _mm256_fmadd_ps(_mm256_loadu_ps(w1 + k), x0, a1);
    a2 = _mm256_fmadd_ps(_mm256_loadu_ps(w2 + k), x0, a2);
    a3 = _mm256_fmadd_ps(_mm256_loadu_ps(w3 + k), x0, a3);
    b0 = _mm256_fmadd_ps(_mm256_loadu_ps(w0 + k + 8), x1, b0);
    b1 = _mm256_fmadd_ps(_mm256_loadu_ps(w1 + k + 8), x1, b1);
    b2 = _mm256_fmadd_ps(_mm256_loadu_ps(w2 + k + 8), x1, b2);
    b3 = _mm256_fmadd_ps(_mm256_loadu_ps(w3 + k + 8), x1, b3);
  }
  if (k + 8 <= K) {
    const __m256 x0 = _mm256_loadu_ps(x + k);
    a0 = _mm256_fmadd_ps(_mm256_loadu_ps(w0 + k), x0, a0);
    a1 = _mm256_fmadd_ps(_mm256_loadu_ps(w1 + k), x0, a1);
    a2 = _mm256_fmadd_ps(_mm256_loadu_ps(w2 + k), x0, a2);
    a3 = _mm256_fmadd_ps(_mm256_loadu_ps(w3 + k), x0, a3);
    k += 8;
  }
  alignas(16) float s[4];
  _mm_store_ps(s, hsum4(_mm256_add_ps(a0, b0), _mm256_add_ps(a1, b1), _mm256_add_ps(a2, b2), _mm256_add_ps(a3, b3)));
  for (; k < K; ++k) {
    s[0] += w0[k] * x[k], s[1] += w1[k] * x[k], s[2] += w2[k] * x[k], s[3] += w3[k] * x[k];
  }
  y[0] = s[0], y[q] = s[1], y[2 * q] = s[2], y[3 * q] = s[3];
}

// dot4_f32 for bf16 weights; even and odd accumulators per row
inline void dot4_bf16(const at::BFloat16* w, int64_t K, int64_t q, const float* x_even, const float* x_odd,
                      const float* x, float* y) {
  const __m256i high = _mm256_set1_epi32(static_cast<int>(0xFFFF0000u));
  const at::BFloat16 *w0 = w, *w1 = w + q * K, *w2 = w + 2 * q * K, *w3 = w + 3 * q * K;
  __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0, b0 = a0, b1 = a0, b2 = a0, b3 = a0;
  int64_t k = 0;
  auto row = [&](const at::BFloat16* wr, __m256 even, __m256 odd, __m256& a, __m256& b) {
    const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(wr + k));
    a = _mm256_fmadd_ps(_mm256_castsi256_ps(_mm256_slli_epi32(v, 16)), even, a);
    b = _mm256_fmadd_ps(_mm256_castsi256_ps(_mm256_and_si256(v, high)), odd, b);
  };
  for (; k + 16 <= K; k += 16) {
    const __m256 even = _mm256_loadu_ps(x_even + k / 2), odd = _mm256_loadu_ps(x_odd + k / 2);
    row(w0, even, odd, a0, b0);
    row(w1, even, odd, a1, b1);
    row(w2, even, odd, a2, b2);
    row(w3, even, odd, a3, b3);
  }
  alignas(16) float s[4];
  _mm_store_ps(s, hsum4(_mm256_add_ps(a0, b0), _mm256_add_ps(a1, b1), _mm256_add_ps(a2, b2), _mm256_add_ps(a3, b3)));
  for (; k < K; ++k) {
    const float xk = x[k];
    s[0] += static_cast<float>(w0[k]) * xk, s[1] += static_cast<float>(w1[k]) * xk;
    s[2] += static_cast<float>(w2[k]) * xk, s[3] += static_cast<float>(w3[k]) * xk;
  }
  y[0] = s[0], y[q] = s[1], y[2 * q] = s[2], y[3 * q] = s[3];
}

// Calls four(g, q) for the groups of rows g, g + q, g + 2q, g + 3q (q = N / 4, g < q), and
// one(n) for each of the last N % 4 rows. A group's rows lie a quarter of
// the matrix apart, so a thread's groups read four long sequential streams, which the hardware
// prefetcher follows (rows side by side made four short streams that restart at every group:
// fp32 K = 896 from memory, 12 → 17 GB/s on one thread, 20 → 23 on two). The groups are split
// across threads in blocks of >= 256k weights (below that a parallel region's barrier costs more
// than the work, the same rule as the compiled step's own loops).
template <class One, class Four>
void for_rows(int64_t N, int64_t K, const One& one, const Four& four) {
  const int64_t grain = std::max<int64_t>(1, (int64_t{1} << 18) / std::max<int64_t>(K, 1));
  const int64_t q = N / 4;
  at::parallel_for(0, q, std::max<int64_t>(1, grain / 4), [&](int64_t a, int64_t b) {
    for (int64_t g = a; g < b; ++g) four(g, q);
  });
  for (int64_t n = N / 4 * 4; n < N; ++n) one(n);
}

// y[N] = w[N, K] · x[K], float32 weights
inline void gemv_f32(const float* wp, int64_t N, int64_t K, const float* xp, float* yp) {
#if INTERNVL_GEMV_AVX512
  if (avx512_groups.load(std::memory_order_relaxed)) {
    for_rows(
        N, K, [&](int64_t n) { yp[n] = dot_f32(wp + n * K, K, xp); },
        [&](int64_t g, int64_t q) { dot4_f32_avx512(wp + g * K, K, q, xp, yp + g); });
    return;
  }
#endif
  for_rows(
      N, K, [&](int64_t n) { yp[n] = dot_f32(wp + n * K, K, xp); },
      [&](int64_t g, int64_t q) { dot4_f32(wp + g * K, K, q, xp, yp + g); });
}

// y[N] = w[N, K] · x[K], bfloat16 weights
inline void gemv_bf16(const at::BFloat16* wp, int64_t N, int64_t K, const float* xp, float* yp) {
  // x split into even and odd values, in a buffer kept per calling thread (no allocation per call)
  thread_local std::vector<float> split;
  split.resize(2 * (K / 2 + 1));
  float* x_even = split.data();
  float* x_odd = x_even + K / 2 + 1;
  for (int64_t j = 0; j + 1 < K; j += 2) {
    x_even[j / 2] = xp[j];
    x_odd[j / 2] = xp[j + 1];
  }
#if INTERNVL_GEMV_AVX512
  if (avx512_groups.load(std::memory_order_relaxed)) {
    for_rows(
        N, K, [&](int64_t n) { yp[n] = dot_bf16(wp + n * K, K, x_even, x_odd, xp); },
        [&](int64_t g, int64_t q) { dot4_bf16_avx512(wp + g * K, K, q, x_even, x_odd, xp, yp + g); });
    return;
  }
#endif
  for_rows(
      N, K, [&](int64_t n) { yp[n] = dot_bf16(wp + n * K, K, x_even, x_odd, xp); },
      [&](int64_t g, int64_t q) { dot4_bf16(wp + g * K, K, q, x_even, x_odd, xp, yp + g); });
}

}  // namespace internvl_chat_cpu
