// internvl_chat.DecodeStep: the Qwen2 decoder's whole one-token step in C++, for a CPU with AVX2
// and FMA (engine/cpu_step.py says when it is used and why). One call per token: embedding row,
// every layer (RMSNorm, qkv with bias, RoPE, cache write, attention over the valid prefix, o,
// residual, RMSNorm, gate/up, SiLU·mul, down, residual), final norm, lm_head. Activations live in
// preallocated float32 buffers; the linears are gemv_avx2.h's kernels.
//
// With bfloat16 weights the step rounds to bfloat16 wherever the eager step (language.py) holds a
// bfloat16 tensor: each linear's output, the norm's cast before and product after its weight,
// RoPE's result, SiLU, the residual sums, the logits; the KV cache's dtype is rounded to as well.
// In float32 nothing is rounded. Sums run in another order than torch's, so values agree to
// float32 tolerance, not bit for bit.

#include "gemv_avx2.h"

#include <ATen/ops/empty.h>
#include <torch/custom_class.h>
#include <torch/library.h>

#include <cmath>
#include <cstring>
#include <mutex>

namespace {

using internvl_chat_cpu::dot_f32;

constexpr int kLayerTensors = 7;  // ln1, qkv weight, qkv bias, o, ln2, gate_up, down
// values converted (bf16) and summed per block of this many positions (the block stays in L1)
constexpr int64_t kValueBlock = 64;

// float32 to the nearest bfloat16 (ties to even) and back: what a cast to bf16 and back gives
inline float round_bf16(float f) {
  if (std::isnan(f)) return f;
  uint32_t u;
  std::memcpy(&u, &f, 4);
  u = (u + 0x7FFFu + ((u >> 16) & 1u)) & 0xFFFF0000u;
  std::memcpy(&f, &u, 4);
  return f;
}

// e^x for x <= 0 (softmax weights): 2^n · e^r with n = round(x / ln 2) and a degree-6 polynomial
// for e^r (Cephes' coefficients, relative error ~1e-7); below -87 it gives 0
inline __m256 exp_nonpositive(__m256 x) {
  x = _mm256_max_ps(x, _mm256_set1_ps(-87.0f));
  const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
  __m256 p = _mm256_set1_ps(1.9875691500e-4f);
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.3981999507e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.3334519073e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.1665795894e-2f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.6666665459e-1f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(5.0000001201e-1f));
  const __m256 y = _mm256_add_ps(_mm256_fmadd_ps(_mm256_mul_ps(p, r), r, r), _mm256_set1_ps(1.0f));
  const __m256i scale = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(y, _mm256_castsi256_ps(scale));
}

// y[i] += a · x[i]
inline void axpy(float a, const float* x, float* y, int64_t n) {
  const __m256 av = _mm256_set1_ps(a);
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) _mm256_storeu_ps(y + i, _mm256_fmadd_ps(av, _mm256_loadu_ps(x + i), _mm256_loadu_ps(y + i)));
  for (; i < n; ++i) y[i] += a * x[i];
}

// n values of a float32 or bfloat16 row as float32: the row itself, or converted into `buffer`
inline const float* as_float(const void* row, bool bf16, int64_t n, float* buffer) {
  if (!bf16) return static_cast<const float*>(row);
  const uint16_t* r = static_cast<const uint16_t*>(row);
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    const __m256i wide = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(r + i)));
    _mm256_storeu_ps(buffer + i, _mm256_castsi256_ps(_mm256_slli_epi32(wide, 16)));
  }
  for (; i < n; ++i) {
    const uint32_t u = uint32_t{r[i]} << 16;
    std::memcpy(buffer + i, &u, 4);
  }
  return buffer;
}

struct Matrix {
  const void* data = nullptr;
  bool bf16 = false;
  int64_t rows = 0, cols = 0;
};

// y = w · x
inline void gemv(const Matrix& w, const float* x, float* y) {
  if (w.bf16) {
    internvl_chat_cpu::gemv_bf16(static_cast<const at::BFloat16*>(w.data), w.rows, w.cols, x, y);
  } else {
    internvl_chat_cpu::gemv_f32(static_cast<const float*>(w.data), w.rows, w.cols, x, y);
  }
}

class DecodeStep : public torch::CustomClassHolder {
 public:
  // tensors: embedding [V', D], final norm [D], lm_head [V, D], cos and sin [S', 1, hd/2] (float32),
  // then per layer: input norm [D], qkv weight [(H + 2·KV)·hd, D], qkv bias, o weight [D, H·hd],
  // post-attention norm [D], gate_up weight [2·I, D], down weight [D, I]; all contiguous, CPU, and
  // (but cos and sin) of one dtype, float32 or bfloat16. shape: heads, kv heads, head dim.
  DecodeStep(std::vector<at::Tensor> tensors, std::vector<int64_t> shape, double eps)
      : tensors_(std::move(tensors)), eps_(static_cast<float>(eps)) {
    TORCH_CHECK(shape.size() == 3, "DecodeStep: shape is (heads, kv heads, head dim)");
    heads_ = shape[0], kv_heads_ = shape[1], head_dim_ = shape[2];
    TORCH_CHECK(heads_ > 0 && kv_heads_ > 0 && head_dim_ > 0 && head_dim_ % 2 == 0 && heads_ % kv_heads_ == 0,
                "DecodeStep: bad head layout");
    TORCH_CHECK(tensors_.size() >= 5 && (tensors_.size() - 5) % kLayerTensors == 0, "DecodeStep: wrong number of tensors");
    const at::Tensor& embed = tensors_[0];
    TORCH_CHECK(embed.dim() == 2, "DecodeStep: the embedding must be a matrix");
    const auto dtype = embed.scalar_type();
    TORCH_CHECK(dtype == at::kFloat || dtype == at::kBFloat16, "DecodeStep: weights must be float32 or bfloat16");
    round_ = dtype == at::kBFloat16;
    for (size_t i = 0; i < tensors_.size(); ++i) {
      const at::Tensor& t = tensors_[i];
      TORCH_CHECK(t.device().is_cpu() && t.is_contiguous(), "DecodeStep: tensor ", i, " is not a contiguous CPU tensor");
      TORCH_CHECK(t.scalar_type() == ((i == 3 || i == 4) ? at::kFloat : dtype), "DecodeStep: tensor ", i, " has the wrong dtype");
    }
    dim_ = embed.size(1);
    vocab_in_ = embed.size(0);
    const int64_t q = heads_ * head_dim_, qkv = (heads_ + 2 * kv_heads_) * head_dim_;
    layers_ = static_cast<int64_t>((tensors_.size() - 5) / kLayerTensors);
    TORCH_CHECK(layers_ > 0, "DecodeStep: no layers");
    expect(1, {dim_});
    lm_head_ = matrix(2, -1, dim_);
    rope_len_ = tensors_[3].size(0);
    expect(3, {rope_len_, 1, head_dim_ / 2});
    expect(4, {rope_len_, 1, head_dim_ / 2});
    cos_ = tensors_[3].data_ptr<float>(), sin_ = tensors_[4].data_ptr<float>();
    for (int64_t l = 0; l < layers_; ++l) {
      const size_t b = 5 + l * kLayerTensors;
      expect(b, {dim_});
      vectors_.insert(vectors_.end(), {tensors_[b].data_ptr(), tensors_[b + 2].data_ptr(), tensors_[b + 4].data_ptr()});
      qkv_.push_back(matrix(b + 1, qkv, dim_));
      expect(b + 2, {qkv});
      o_.push_back(matrix(b + 3, dim_, q));
      expect(b + 4, {dim_});
      gate_up_.push_back(matrix(b + 5, -1, dim_));
      TORCH_CHECK(gate_up_.back().rows % 2 == 0 && gate_up_.back().rows == gate_up_.front().rows,
                  "DecodeStep: gate_up must have the same even number of rows in every layer");
      down_.push_back(matrix(b + 6, dim_, gate_up_.back().rows / 2));
    }
    h_.resize(dim_), x_.resize(dim_), y_.resize(dim_), qkv_out_.resize(qkv);
    attn_.resize(q), gate_up_out_.resize(gate_up_.front().rows), act_.resize(gate_up_.front().rows / 2);
  }

  // the (k, v) caches, [1, KV, S, hd] each, contiguous, of one dtype (float32 or bfloat16)
  void bind_caches(std::vector<at::Tensor> keys, std::vector<at::Tensor> values) {
    TORCH_CHECK(static_cast<int64_t>(keys.size()) == layers_ && values.size() == keys.size(), "DecodeStep: one k and v cache per layer");
    const auto dtype = keys.front().scalar_type();
    TORCH_CHECK(dtype == at::kFloat || dtype == at::kBFloat16, "DecodeStep: the KV cache must be float32 or bfloat16");
    const int64_t length = keys.front().dim() == 4 ? keys.front().size(2) : 0;
    TORCH_CHECK(length > 0 && length <= rope_len_, "DecodeStep: the KV cache is longer than the RoPE tables");
    for (const auto* list : {&keys, &values}) {
      for (const at::Tensor& t : *list) {
        TORCH_CHECK(t.device().is_cpu() && t.is_contiguous() && t.scalar_type() == dtype &&
                        t.sizes() == at::IntArrayRef({1, kv_heads_, length, head_dim_}),
                    "DecodeStep: a KV cache tensor of another shape, dtype or layout");
      }
    }
    std::lock_guard<std::mutex> lock(mutex_);
    keys_ = std::move(keys), values_ = std::move(values);
    cache_len_ = length, cache_bf16_ = dtype == at::kBFloat16;
  }

  // float32 logits [V] for `token` (one integer) at position `pos`; writes the caches at `pos`
  at::Tensor step(const at::Tensor& token, int64_t pos) {
    TORCH_CHECK(token.numel() == 1 && !token.is_floating_point(), "DecodeStep: one integer token");
    const int64_t id = token.item<int64_t>();
    std::lock_guard<std::mutex> lock(mutex_);
    TORCH_CHECK(!keys_.empty(), "DecodeStep: no KV cache bound");
    TORCH_CHECK(id >= 0 && id < vocab_in_, "DecodeStep: token ", id, " is outside the embedding");
    TORCH_CHECK(pos >= 0 && pos < cache_len_, "DecodeStep: position ", pos, " is outside the KV cache");
    embed(id);
    for (int64_t l = 0; l < layers_; ++l) layer(l, pos);
    norm(tensors_[1].data_ptr(), h_.data(), x_.data());
    at::Tensor logits = at::empty({lm_head_.rows}, at::TensorOptions().dtype(at::kFloat));
    float* out = logits.data_ptr<float>();
    gemv(lm_head_, x_.data(), out);
    round_all(out, lm_head_.rows);
    return logits;
  }

 private:
  void expect(size_t i, std::vector<int64_t> sizes) const {
    TORCH_CHECK(tensors_[i].sizes() == at::IntArrayRef(sizes), "DecodeStep: tensor ", i, " has shape ", tensors_[i].sizes(),
                ", expected ", at::IntArrayRef(sizes));
  }

  Matrix matrix(size_t i, int64_t rows, int64_t cols) const {
    const at::Tensor& t = tensors_[i];
    TORCH_CHECK(t.dim() == 2 && (rows < 0 || t.size(0) == rows) && t.size(1) == cols, "DecodeStep: tensor ", i,
                " has shape ", t.sizes());
    return {t.data_ptr(), t.scalar_type() == at::kBFloat16, t.size(0), t.size(1)};
  }

  float r(float v) const { return round_ ? round_bf16(v) : v; }
  void round_all(float* v, int64_t n) const {
    if (round_)
      for (int64_t i = 0; i < n; ++i) v[i] = round_bf16(v[i]);
  }

  // element i of a weight vector (float32 or bfloat16, as all the weights) as float32
  float element(const void* vector, int64_t i) const {
    if (!round_) return static_cast<const float*>(vector)[i];
    return static_cast<float>(static_cast<const at::BFloat16*>(vector)[i]);
  }

  void embed(int64_t id) {
    const char* row = static_cast<const char*>(tensors_[0].data_ptr()) + id * dim_ * tensors_[0].element_size();
    const float* values = as_float(row, round_, dim_, h_.data());
    if (values != h_.data()) std::memcpy(h_.data(), values, dim_ * sizeof(float));
  }

  // out = weight · (x / rms(x)), rounded where the eager RMSNorm holds bf16
  void norm(const void* weight, const float* x, float* out) const {
    double squares = 0;
    for (int64_t d = 0; d < dim_; ++d) squares += double{x[d]} * x[d];
    const float inv = 1.0f / std::sqrt(static_cast<float>(squares / dim_) + eps_);
    for (int64_t d = 0; d < dim_; ++d) out[d] = r(element(weight, d) * r(x[d] * inv));
  }

  // linear output plus bias, rounded to the activations' dtype
  void add_bias(const void* bias, float* y, int64_t n) const {
    for (int64_t i = 0; i < n; ++i) y[i] = r(y[i] + element(bias, i));
  }

  void layer(int64_t l, int64_t pos) {
    const int64_t hd = head_dim_, half = hd / 2, q = heads_ * hd, kv = kv_heads_ * hd;
    norm(vectors_[3 * l], h_.data(), x_.data());
    gemv(qkv_[l], x_.data(), qkv_out_.data());
    add_bias(vectors_[3 * l + 1], qkv_out_.data(), q + 2 * kv);
    // RoPE (rotate-half) on the q and k heads, computed in float32 like the reference
    const float* c = cos_ + pos * half;
    const float* s = sin_ + pos * half;
    for (int64_t head = 0; head < heads_ + kv_heads_; ++head) {
      float* v = qkv_out_.data() + head * hd;
      for (int64_t i = 0; i < half; ++i) {
        const float x1 = v[i], x2 = v[i + half];
        v[i] = r(x1 * c[i] - x2 * s[i]);
        v[i + half] = r(x2 * c[i] + x1 * s[i]);
      }
    }
    write_cache(keys_[l], qkv_out_.data() + q, pos);
    write_cache(values_[l], qkv_out_.data() + q + kv, pos);
    if (cache_bf16_) round_all(qkv_out_.data(), q);  // attention runs in the cache's dtype
    attend(keys_[l].data_ptr(), values_[l].data_ptr(), qkv_out_.data(), pos + 1, attn_.data());
    if (cache_bf16_ || round_) round_all(attn_.data(), q);
    gemv(o_[l], attn_.data(), y_.data());
    for (int64_t d = 0; d < dim_; ++d) h_[d] = r(h_[d] + r(y_[d]));
    norm(vectors_[3 * l + 2], h_.data(), x_.data());
    const int64_t inter = gate_up_[l].rows / 2;
    gemv(gate_up_[l], x_.data(), gate_up_out_.data());
    for (int64_t i = 0; i < inter; ++i) {
      const float g = r(gate_up_out_[i]), u = r(gate_up_out_[inter + i]);
      act_[i] = r(r(g / (1.0f + std::exp(-g))) * u);
    }
    gemv(down_[l], act_.data(), y_.data());
    for (int64_t d = 0; d < dim_; ++d) h_[d] = r(h_[d] + r(y_[d]));
  }

  void write_cache(const at::Tensor& cache, const float* rows, int64_t pos) const {
    const int64_t hd = head_dim_;
    for (int64_t g = 0; g < kv_heads_; ++g) {
      const float* src = rows + g * hd;
      const int64_t at = (g * cache_len_ + pos) * hd;
      if (cache_bf16_) {
        at::BFloat16* dst = cache.data_ptr<at::BFloat16>() + at;
        for (int64_t i = 0; i < hd; ++i) dst[i] = static_cast<at::BFloat16>(src[i]);
      } else {
        std::memcpy(cache.data_ptr<float>() + at, src, hd * sizeof(float));
      }
    }
  }

  // out[H·hd] = softmax(q·Kᵀ / √hd) · V over the first `length` positions; each kv head serves
  // its group of q heads, reading its keys and values once
  void attend(const void* k_base, const void* v_base, const float* q, int64_t length, float* out) const {
    const int64_t hd = head_dim_, group = heads_ / kv_heads_, element = cache_bf16_ ? 2 : 4;
    const float scale = 1.0f / std::sqrt(static_cast<float>(hd));
    // split across threads by kv head only when there is enough work for a parallel region
    const int64_t grain = length * hd * group >= (int64_t{1} << 16) ? 1 : kv_heads_;
    at::parallel_for(0, kv_heads_, grain, [&](int64_t first, int64_t last) {
      thread_local std::vector<float> scores, block, totals;
      scores.resize(group * length);
      totals.resize(group);
      block.resize(kValueBlock * hd);
      for (int64_t g = first; g < last; ++g) {
        const char* keys = static_cast<const char*>(k_base) + g * cache_len_ * hd * element;
        const char* values = static_cast<const char*>(v_base) + g * cache_len_ * hd * element;
        const float* qg = q + g * group * hd;
        for (int64_t j = 0; j < length; j += 8) key_scores(keys, j, std::min<int64_t>(8, length - j), qg, group, length, scale, block.data(), scores.data());
        for (int64_t h = 0; h < group; ++h) totals[h] = exponentiate(scores.data() + h * length, length);
        float* og = out + g * group * hd;
        std::fill(og, og + group * hd, 0.0f);
        for (int64_t j = 0; j < length; j += kValueBlock) {
          const int64_t n = std::min<int64_t>(kValueBlock, length - j);
          const float* v = as_float(values + j * hd * element, cache_bf16_, n * hd, block.data());
          for (int64_t h = 0; h < group; ++h) weighted_sum(scores.data() + h * length + j, v, n, og + h * hd);
        }
        for (int64_t h = 0; h < group; ++h) {  // the softmax's division, once per output value
          const float inv = 1.0f / totals[h];
          for (int64_t c = 0; c < hd; ++c) og[h * hd + c] *= inv;
        }
      }
    });
  }

  // scores[h·length + j + i] = q_h · k_(j+i) · scale for the n <= 8 keys from j: the eight keys'
  // products are summed across lanes together (one horizontal reduction per eight keys)
  void key_scores(const char* keys, int64_t j, int64_t n, const float* qg, int64_t group, int64_t length, float scale,
                  float* buffer, float* scores) const {
    const int64_t hd = head_dim_, element = cache_bf16_ ? 2 : 4, vector_end = hd / 8 * 8;
    const float* k[8];
    for (int64_t i = 0; i < 8; ++i) {
      const int64_t row = j + std::min(i, n - 1);  // past the end: the last key again, not stored
      k[i] = as_float(keys + row * hd * element, cache_bf16_, hd, buffer + i * hd);
    }
    for (int64_t h = 0; h < group; ++h) {
      const float* qh = qg + h * hd;
      __m256 a[8];
      for (auto& x : a) x = _mm256_setzero_ps();
      for (int64_t c = 0; c < vector_end; c += 8) {
        const __m256 qv = _mm256_loadu_ps(qh + c);
        for (int64_t i = 0; i < 8; ++i) a[i] = _mm256_fmadd_ps(_mm256_loadu_ps(k[i] + c), qv, a[i]);
      }
      const __m256 h0123 = _mm256_hadd_ps(_mm256_hadd_ps(a[0], a[1]), _mm256_hadd_ps(a[2], a[3]));
      const __m256 h4567 = _mm256_hadd_ps(_mm256_hadd_ps(a[4], a[5]), _mm256_hadd_ps(a[6], a[7]));
      const __m256 sums = _mm256_add_ps(_mm256_permute2f128_ps(h0123, h4567, 0x20), _mm256_permute2f128_ps(h0123, h4567, 0x31));
      if (n == 8 && vector_end == hd) {  // the common case: eight whole scores in one store
        _mm256_storeu_ps(scores + h * length + j, _mm256_mul_ps(sums, _mm256_set1_ps(scale)));
        continue;
      }
      alignas(32) float lanes[8];
      _mm256_store_ps(lanes, sums);
      for (int64_t i = 0; i < n; ++i) {
        float s = lanes[i];
        for (int64_t c = vector_end; c < hd; ++c) s += k[i][c] * qh[c];
        scores[h * length + j + i] = s * scale;
      }
    }
  }

  // out[hd] += Σ_i p[i] · v[i·hd …]: 32 columns at a time held in registers across the n rows
  void weighted_sum(const float* p, const float* v, int64_t n, float* out) const {
    const int64_t hd = head_dim_;
    int64_t c = 0;
    for (; c + 32 <= hd; c += 32) {
      __m256 a0 = _mm256_loadu_ps(out + c), a1 = _mm256_loadu_ps(out + c + 8), a2 = _mm256_loadu_ps(out + c + 16),
             a3 = _mm256_loadu_ps(out + c + 24);
      for (int64_t i = 0; i < n; ++i) {
        const __m256 pi = _mm256_set1_ps(p[i]);
        const float* row = v + i * hd + c;
        a0 = _mm256_fmadd_ps(pi, _mm256_loadu_ps(row), a0);
        a1 = _mm256_fmadd_ps(pi, _mm256_loadu_ps(row + 8), a1);
        a2 = _mm256_fmadd_ps(pi, _mm256_loadu_ps(row + 16), a2);
        a3 = _mm256_fmadd_ps(pi, _mm256_loadu_ps(row + 24), a3);
      }
      _mm256_storeu_ps(out + c, a0), _mm256_storeu_ps(out + c + 8, a1);
      _mm256_storeu_ps(out + c + 16, a2), _mm256_storeu_ps(out + c + 24, a3);
    }
    if (c < hd)
      for (int64_t i = 0; i < n; ++i) axpy(p[i], v + i * hd + c, out + c, hd - c);
  }

  // s[j] = e^(s[j] - max s) for the n scores; returns their sum (the softmax's denominator)
  static float exponentiate(float* s, int64_t n) {
    __m256 tops = _mm256_set1_ps(-INFINITY);
    int64_t j = 0;
    for (; j + 8 <= n; j += 8) tops = _mm256_max_ps(tops, _mm256_loadu_ps(s + j));
    alignas(32) float lanes[8];
    _mm256_store_ps(lanes, tops);
    float top = *std::max_element(lanes, lanes + 8);
    for (; j < n; ++j) top = std::max(top, s[j]);
    const __m256 topv = _mm256_set1_ps(top);
    __m256 sums = _mm256_setzero_ps();
    for (j = 0; j + 8 <= n; j += 8) {
      const __m256 e = exp_nonpositive(_mm256_sub_ps(_mm256_loadu_ps(s + j), topv));
      _mm256_storeu_ps(s + j, e);
      sums = _mm256_add_ps(sums, e);
    }
    float sum = internvl_chat_cpu::hsum(sums);
    for (; j < n; ++j) sum += (s[j] = std::exp(s[j] - top));
    return sum;
  }

  std::vector<at::Tensor> tensors_, keys_, values_;
  std::vector<Matrix> qkv_, o_, gate_up_, down_;
  std::vector<const void*> vectors_;  // per layer: input norm, qkv bias, post-attention norm
  const float *cos_ = nullptr, *sin_ = nullptr;
  Matrix lm_head_;
  int64_t heads_ = 0, kv_heads_ = 0, head_dim_ = 0, dim_ = 0, vocab_in_ = 0, layers_ = 0, rope_len_ = 0, cache_len_ = 0;
  float eps_;
  bool round_ = false, cache_bf16_ = false;
  std::vector<float> h_, x_, y_, qkv_out_, attn_, gate_up_out_, act_;
  std::mutex mutex_;
};

}  // namespace

TORCH_LIBRARY_FRAGMENT(internvl_chat, m) {
  m.class_<DecodeStep>("DecodeStep")
      .def(torch::init<std::vector<at::Tensor>, std::vector<int64_t>, double>())
      .def("bind_caches", &DecodeStep::bind_caches)
      .def("step", &DecodeStep::step);
}
