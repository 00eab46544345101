#pragma once
// The AVX2 int4 GEMV: y = W · x in float32 for a 4-bit weight with one scale s and one offset m
// per group of g input columns and output row, W[n, k] = q[n, k] · s[n, k/g] + m[n, k/g] (AWQ:
// m = −z·s; PyTorch's CPU int4 kernel: m = zero − 8·s), x float32. engine/cpu_int4.py makes the
// layout from an Int4Linear. Used by the operator internvl_chat::gemv_int4 (gemv_avx2.cpp, for
// tests) and the C++ decode step (decode_step.cpp).
//
// Layout: one uint8 tensor [N, K/g · (g/2 + 8)]; a row is its groups one after another, each g/2
// bytes of 4-bit values then s and m (float32), so a row is one sequential stream (scales in a
// separate array would be four more streams per four rows, each missing a cache line now and
// then). The values go in blocks of 32 weights (16 bytes = four 32-bit words w = 0..3); the
// nibble at bits 4p..4p+3 of word w holds k = 8·(p / 2) + 4·(p % 2) + w of the block. A block is
// loaded into both halves of a register; masking nibble 2i in the low half and 2i + 1 in the high
// half gives, with no shift, eight values q·2^e that convert to float exactly; x is prescaled by
// 2^−e once per call, so each 8 weights cost one AND, one conversion and one FMA (the top nibble
// pair is shifted down 4 bits first, to stay clear of the sign bit). g must be a multiple of 32.
//
// Per row: Σ_g s_g · (q_g · x_g) in vector accumulators, plus Σ_g m_g · (Σ x_g). Rows go four a
// quarter of the matrix apart (for_rows, gemv_avx2.h), so every thread count gives the same values.

#include "gemv_avx2.h"

#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

namespace internvl_chat_cpu {

struct Int4Weight {
  const uint8_t* data = nullptr;  // [N, K/g · (g/2 + 8)], the layout above
  int64_t rows = 0, cols = 0, group = 0;
  int64_t group_bytes() const { return group / 2 + 8; }
};

// checks an int4 weight's tensor (uint8 [N, K/g · (g/2 + 8)], contiguous, CPU; g a multiple of 32)
inline Int4Weight int4_weight(const at::Tensor& t, int64_t group) {
  TORCH_CHECK(group > 0 && group % 32 == 0, "int4 weight: the group size must be a multiple of 32");
  TORCH_CHECK(t.device().is_cpu() && t.is_contiguous() && t.scalar_type() == at::kByte && t.dim() == 2 &&
                  t.size(1) > 0 && t.size(1) % (group / 2 + 8) == 0,
              "int4 weight: a contiguous uint8 CPU tensor [N, K/g · (g/2 + 8)] expected");
  return {t.data_ptr<uint8_t>(), t.size(0), t.size(1) / (group / 2 + 8) * group, group};
}

// the exponent e of block position j (0..31): lanes of step i = j / 8, half h = (j % 8) / 4
inline int int4_exponent(int j) {
  const int i = j / 8, h = (j % 8) / 4;
  return i < 3 ? 8 * i + 4 * h : 8 * i + 4 * h - 4;
}

// y[r · stride] for R rows starting at q (rows `stride` rows apart); xs prescaled x, sums Σx per group
template <int R>
inline void dot_int4(const Int4Weight& w, int64_t row, int64_t stride, const float* xs, const float* sums, float* y) {
  const int64_t G = w.cols / w.group, blocks = w.group / 32, values = w.group / 2;
  const __m256i low = _mm256_setr_epi32(0xF, 0xF, 0xF, 0xF, 0xF0, 0xF0, 0xF0, 0xF0);
  const __m256i mask[4] = {low, _mm256_slli_epi32(low, 8), _mm256_slli_epi32(low, 16), _mm256_slli_epi32(low, 20)};
  const uint8_t* q[R];
  __m256 acc[R];
  float off[R];
  for (int r = 0; r < R; ++r) {
    q[r] = w.data + (row + r * stride) * G * w.group_bytes();
    acc[r] = _mm256_setzero_ps();
    off[r] = 0;
  }
  for (int64_t g = 0; g < G; ++g) {
    // two accumulators per row (even and odd steps): half the chain of dependent FMAs per block
    __m256 d[R], e[R];
    for (int r = 0; r < R; ++r) d[r] = e[r] = _mm256_setzero_ps();
    for (int64_t b = 0; b < blocks; ++b) {
      const float* x = xs + (g * blocks + b) * 32;
      __m256i v[R];
      for (int r = 0; r < R; ++r) v[r] = _mm256_broadcastsi128_si256(_mm_loadu_si128(reinterpret_cast<const __m128i*>(q[r] + b * 16)));
      for (int i = 0; i < 4; ++i) {
        const __m256 xv = _mm256_loadu_ps(x + 8 * i);
        for (int r = 0; r < R; ++r) {
          const __m256i t = i < 3 ? v[r] : _mm256_srli_epi32(v[r], 4);
          __m256& a = i % 2 ? e[r] : d[r];
          a = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_and_si256(t, mask[i])), xv, a);
        }
      }
    }
    for (int r = 0; r < R; ++r) {
      float sm[2];  // s and m, after the group's values
      std::memcpy(sm, q[r] + values, sizeof sm);
      acc[r] = _mm256_fmadd_ps(_mm256_add_ps(d[r], e[r]), _mm256_set1_ps(sm[0]), acc[r]);
      // an explicit fma: left to the compiler, each inlined copy (parallel_for has one for its
      // threads and one for a single thread) may contract it or not, and thread counts would differ
      off[r] = std::fma(sm[1], sums[g], off[r]);
      q[r] += values + 8;
    }
  }
  float out[4];
  if constexpr (R == 4) {
    _mm_storeu_ps(out, hsum4(acc[0], acc[1], acc[2], acc[3]));
  } else {
    for (int r = 0; r < R; ++r) out[r] = hsum(acc[r]);
  }
  for (int r = 0; r < R; ++r) y[r * stride] = out[r] + off[r];
}

// y[N] = W · x[K]
inline void gemv_int4(const Int4Weight& w, const float* xp, float* yp) {
  const int64_t K = w.cols, G = K / w.group;
  // x prescaled per block position and summed per group, in a buffer kept per calling thread
  thread_local std::vector<float> prepared;
  prepared.resize(K + G);
  float* xs = prepared.data();
  float* sums = xs + K;
  float factor[32];
  for (int j = 0; j < 32; ++j) factor[j] = std::ldexp(1.0f, -int4_exponent(j));
  for (int64_t k = 0; k < K; ++k) xs[k] = xp[k] * factor[k % 32];  // exact: powers of two
  for (int64_t g = 0; g < G; ++g) {
    float total = 0;
    for (int64_t k = g * w.group; k < (g + 1) * w.group; ++k) total += xp[k];
    sums[g] = total;
  }
  for_rows(
      w.rows, K,
      [&](int64_t n) { dot_int4<1>(w, n, 0, xs, sums, yp + n); },
      [&](int64_t g, int64_t q) { dot_int4<4>(w, g, q, xs, sums, yp + g); });
}

}  // namespace internvl_chat_cpu
