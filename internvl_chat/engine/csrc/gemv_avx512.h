#pragma once
// The AVX-512 GEMV kernels: dot4_f32 and dot4_bf16 of gemv_avx2.h on 512-bit vectors, with
// software prefetch 1 KiB ahead in each of the four streams. Compiled with target attributes
// (the library is built with -mavx2 -mfma only), so the build never needs an AVX-512 CPU; called
// only where the CPU reports AVX-512F (cpu_features.gemv_kernel, then gemv_kernel() below), the
// AVX2 kernels everywhere else. A compiler without these target attributes leaves them out
// (INTERNVL_GEMV_AVX512 0) and the library offers AVX2 alone.
//
// Measured on a 2-vCPU Intel Xeon (Emerald Rapids), one thread, 384 MB of weights per pass,
// interleaved: fp32 K = 896 16.1 GB/s (AVX2) → 17.6 (this), a plain read loop 16.1; see
// benchmarks/RESULTS.md, Update 12. The rows and their groups are the AVX2 kernels' (for_rows),
// only the order of each row's sum differs, so values agree to float32 tolerance, and every
// thread count still gives the same values.

#include <ATen/core/Tensor.h>
#include <immintrin.h>

#include <cstdint>

#if defined(__x86_64__) && ((defined(__clang__) && __clang_major__ >= 4) || (!defined(__clang__) && defined(__GNUC__) && __GNUC__ >= 5))
#define INTERNVL_GEMV_AVX512 1
#else
#define INTERNVL_GEMV_AVX512 0
#endif

#if INTERNVL_GEMV_AVX512
namespace internvl_chat_cpu {

// weights ahead of the loads that each stream prefetches: 1 KiB
constexpr int64_t kPrefetchF32 = 256, kPrefetchBF16 = 512;

// y[0], y[q], y[2q], y[3q] = rows w, w + q·K, w + 2q·K, w + 3q·K times x; two accumulators per row
__attribute__((target("avx512f"), noinline)) inline void dot4_f32_avx512(const float* w, int64_t K, int64_t q,
                                                                         const float* x, float* y) {
  const float *w0 = w, *w1 = w + q * K, *w2 = w + 2 * q * K, *w3 = w + 3 * q * K;
  __m512 a0 = _mm512_setzero_ps(), a1 = a0, a2 = a0, a3 = a0, b0 = a0, b1 = a0, b2 = a0, b3 = a0;
  int64_t k = 0;
  for (; k + 32 <= K; k += 32) {
    const char* p = reinterpret_cast<const char*>(w0 + k + kPrefetchF32);
    _mm_prefetch(p, _MM_HINT_T0), _mm_prefetch(p + 64, _MM_HINT_T0);
    p = reinterpret_cast<const char*>(w1 + k + kPrefetchF32);
    _mm_prefetch(p, _MM_HINT_T0), _mm_prefetch(p + 64, _MM_HINT_T0);
    p = reinterpret_cast<const char*>(w2 + k + kPrefetchF32);
    _mm_prefetch(p, _MM_HINT_T0), _mm_prefetch(p + 64, _MM_HINT_T0);
    p = reinterpret_cast<const char*>(w3 + k + kPrefetchF32);
    _mm_prefetch(p, _MM_HINT_T0), _mm_prefetch(p + 64, _MM_HINT_T0);
    const __m512 x0 = _mm512_loadu_ps(x + k), x1 = _mm512_loadu_ps(x + k + 16);
    a0 = _mm512_fmadd_ps(_mm512_loadu_ps(w0 + k), x0, a0);
    a1 = _mm512_fmadd_ps(_mm512_loadu_ps(w1 + k), x0, a1);
    a2 = _mm512_fmadd_ps(_mm512_loadu_ps(w2 + k), x0, a2);
    a3 = _mm512_fmadd_ps(_mm512_loadu_ps(w3 + k), x0, a3);
    b0 = _mm512_fmadd_ps(_mm512_loadu_ps(w0 + k + 16), x1, b0);
    b1 = _mm512_fmadd_ps(_mm512_loadu_ps(w1 + k + 16), x1, b1);
    b2 = _mm512_fmadd_ps(_mm512_loadu_ps(w2 + k + 16), x1, b2);
    b3 = _mm512_fmadd_ps(_mm512_loadu_ps(w3 + k + 16), x1, b3);
  }
  if (k + 16 <= K) {
    const __m512 x0 = _mm512_loadu_ps(x + k);
    a0 = _mm512_fmadd_ps(_mm512_loadu_ps(w0 + k), x0, a0);
    a1 = _mm512_fmadd_ps(_mm512_loadu_ps(w1 + k), x0, a1);
    a2 = _mm512_fmadd_ps(_mm512_loadu_ps(w2 + k), x0, a2);
    a3 = _mm512_fmadd_ps(_mm512_loadu_ps(w3 + k), x0, a3);
    k += 16;
  }
  float s[4] = {_mm512_reduce_add_ps(_mm512_add_ps(a0, b0)), _mm512_reduce_add_ps(_mm512_add_ps(a1, b1)),
                _mm512_reduce_add_ps(_mm512_add_ps(a2, b2)), _mm512_reduce_add_ps(_mm512_add_ps(a3, b3))};
  for (; k < K; ++k) {
    s[0] += w0[k] * x[k], s[1] += w1[k] * x[k], s[2] += w2[k] * x[k], s[3] += w3[k] * x[k];
  }
  y[0] = s[0], y[q] = s[1], y[2 * q] = s[2], y[3 * q] = s[3];
}

// dot4_f32_avx512 for bf16 weights: even and odd accumulators per row (x split as in gemv_bf16)
__attribute__((target("avx512f"), noinline)) inline void dot4_bf16_avx512(const at::BFloat16* w, int64_t K, int64_t q,
                                                                          const float* x_even, const float* x_odd,
                                                                          const float* x, float* y) {
  const __m512i high = _mm512_set1_epi32(static_cast<int>(0xFFFF0000u));
  const at::BFloat16* rows[4] = {w, w + q * K, w + 2 * q * K, w + 3 * q * K};
  __m512 a[4], b[4];
  for (int r = 0; r < 4; ++r) a[r] = b[r] = _mm512_setzero_ps();
  int64_t k = 0;
  for (; k + 32 <= K; k += 32) {
    const __m512 even = _mm512_loadu_ps(x_even + k / 2), odd = _mm512_loadu_ps(x_odd + k / 2);
#pragma GCC unroll 4
    for (int r = 0; r < 4; ++r) {
      _mm_prefetch(reinterpret_cast<const char*>(rows[r] + k + kPrefetchBF16), _MM_HINT_T0);
      const __m512i v = _mm512_loadu_si512(rows[r] + k);
      a[r] = _mm512_fmadd_ps(_mm512_castsi512_ps(_mm512_slli_epi32(v, 16)), even, a[r]);
      b[r] = _mm512_fmadd_ps(_mm512_castsi512_ps(_mm512_and_si512(v, high)), odd, b[r]);
    }
  }
  float s[4];
  for (int r = 0; r < 4; ++r) s[r] = _mm512_reduce_add_ps(_mm512_add_ps(a[r], b[r]));
  for (; k < K; ++k) {
    const float xk = x[k];
    for (int r = 0; r < 4; ++r) s[r] += static_cast<float>(rows[r][k]) * xk;
  }
  y[0] = s[0], y[q] = s[1], y[2 * q] = s[2], y[3 * q] = s[3];
}

}  // namespace internvl_chat_cpu
#endif
