// internvl_chat::gemv(weight, x): y = weight · x in float32, for the compiled CPU decode step's
// large one-row linears (engine/cpu_gemv.py says when and why). weight: a contiguous [N, K]
// float32 or bfloat16 matrix; x: K float32 values. Needs AVX2 and FMA.
//
// Each row is one dot product with four independent accumulators, so the FMA latency never
// limits the rate, and rows are taken in order, so the whole matrix is read as one sequential
// stream that the hardware prefetcher follows (four rows at a time, four interleaved streams,
// measured slower). bf16: a 32-bit lane holds two weights, the even one in its low half; a
// 16-bit left shift gives the even weights as float32 and masking the low half the odd ones,
// each multiplied with x's even or odd values (split once per call).

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <immintrin.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

namespace {

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

at::Tensor gemv(const at::Tensor& weight, const at::Tensor& x_in) {
  TORCH_CHECK(weight.device().is_cpu() && x_in.device().is_cpu(), "gemv: CPU tensors only");
  TORCH_CHECK(weight.dim() == 2 && weight.is_contiguous(), "gemv: weight must be a contiguous matrix");
  TORCH_CHECK(x_in.scalar_type() == at::kFloat && x_in.numel() == weight.size(1),
              "gemv: x must be float32 with one value per weight column");
  const at::Tensor x = x_in.contiguous();
  const int64_t N = weight.size(0), K = weight.size(1);
  at::Tensor y = at::empty({N}, x.options());
  const float* xp = x.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  // rows split across threads only in blocks of >= 256k weights: below that a parallel region's
  // barrier costs more than the work (the same rule as the compiled step's own loops)
  const int64_t grain = std::max<int64_t>(1, (int64_t{1} << 18) / std::max<int64_t>(K, 1));
  if (weight.scalar_type() == at::kFloat) {
    const float* wp = weight.data_ptr<float>();
    at::parallel_for(0, N, grain, [&](int64_t a, int64_t b) {
      for (int64_t n = a; n < b; ++n) yp[n] = dot_f32(wp + n * K, K, xp);
    });
  } else {
    TORCH_CHECK(weight.scalar_type() == at::kBFloat16, "gemv: weight must be float32 or bfloat16");
    const at::BFloat16* wp = weight.data_ptr<at::BFloat16>();
    // x split into even and odd values, in a buffer kept per calling thread (no allocation per call)
    thread_local std::vector<float> split;
    split.resize(2 * (K / 2 + 1));
    float* x_even = split.data();
    float* x_odd = x_even + K / 2 + 1;
    for (int64_t j = 0; j + 1 < K; j += 2) {
      x_even[j / 2] = xp[j];
      x_odd[j / 2] = xp[j + 1];
    }
    at::parallel_for(0, N, grain, [&](int64_t a, int64_t b) {
      for (int64_t n = a; n < b; ++n) yp[n] = dot_bf16(wp + n * K, K, x_even, x_odd, xp);
    });
  }
  return y;
}

}  // namespace

TORCH_LIBRARY(internvl_chat, m) { m.def("gemv(Tensor weight, Tensor x) -> Tensor"); }
TORCH_LIBRARY_IMPL(internvl_chat, CPU, m) { m.impl("gemv", &gemv); }
