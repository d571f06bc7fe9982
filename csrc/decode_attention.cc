#include "decode_attention.h"

#include <algorithm>
#include <cmath>
#include <stdexcept>
#include <vector>

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define IM_ATTENTION_AVX512 1
// GCC 12's AVX-512 headers seed some intrinsics (max, roundscale, scalef, reductions) with an
// undefined vector and then warn that it may be uninitialised (GCC bug 105593, fixed in 13).
#if defined(__clang__)
#include <immintrin.h>
#else
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#include <immintrin.h>
#pragma GCC diagnostic pop
#endif
#endif

namespace im {

namespace {

// Compiled with -ffp-contract=off (CMakeLists.txt): no fused multiply-add here, so each product
// rounds before the sum as in torch's apply_rope, and the cache gets the same bits either way.
void rotate(const float* x, const float* cos, const float* sin, std::size_t dim, float* y) {
  const std::size_t half = dim / 2;
  for (std::size_t i = 0; i < half; ++i) y[i] = x[i] * cos[i] + x[i + half] * sin[i];
  for (std::size_t i = half; i < dim; ++i) y[i] = x[i] * cos[i] + x[i - half] * sin[i];
}

#ifdef IM_ATTENTION_AVX512

constexpr std::size_t kLanes = 16;  // floats in one AVX-512 register

// Lanes [0, n) of a 16-lane vector, for the last partial vector of a row.
constexpr __mmask16 first_lanes(std::size_t n) {
  return n >= kLanes ? static_cast<__mmask16>(0xFFFF) : static_cast<__mmask16>((1u << n) - 1u);
}

// e^x for x <= 0 (scores minus their maximum): x = n ln2 + r with |r| <= ln2 / 2, e^r by its Taylor
// series to r^7 (truncation below 6e-9 relative, under float32's rounding), times 2^n.
__attribute__((target("avx512f"))) __m512 exp_nonpositive(__m512 x) {
  x = _mm512_max_ps(x, _mm512_set1_ps(-104.0f));  // e^-104 is 0 in float32; keeps n in range
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  // ln2 in two parts: n * 0.693359375 is exact, so r keeps its low bits.
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
  __m512 p = _mm512_set1_ps(1.0f / 5040.0f);
  for (float c : {1.0f / 720.0f, 1.0f / 120.0f, 1.0f / 24.0f, 1.0f / 6.0f, 0.5f, 1.0f, 1.0f}) {
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(c));
  }
  return _mm512_scalef_ps(p, n);
}

// Lane i of the result is the sum of a[i]'s 16 lanes: a transposing tree of 45 shuffles and adds
// instead of 16 horizontal reductions (~15 operations each).
__attribute__((target("avx512f"))) inline __m512 sum_each(const __m512 (&a)[kLanes]) {
  // Within each 128-bit lane: [x0+x2, y0+y2, x1+x3, y1+y3] from vectors x, y...
  __m512 pairs[8];
  for (std::size_t i = 0; i < 8; ++i) {
    pairs[i] = _mm512_add_ps(_mm512_unpacklo_ps(a[2 * i], a[2 * i + 1]), _mm512_unpackhi_ps(a[2 * i], a[2 * i + 1]));
  }
  // ...then [sum(x), sum(y), sum(z), sum(w)] over each 128-bit lane of four vectors...
  __m512 quads[4];
  for (std::size_t i = 0; i < 4; ++i) {
    quads[i] = _mm512_add_ps(_mm512_shuffle_ps(pairs[2 * i], pairs[2 * i + 1], 0x44),
                             _mm512_shuffle_ps(pairs[2 * i], pairs[2 * i + 1], 0xEE));
  }
  // ...then the four 128-bit lanes added: lanes 0+2 and 1+3, then those two.
  __m512 halves[2];
  for (std::size_t i = 0; i < 2; ++i) {
    halves[i] = _mm512_add_ps(_mm512_shuffle_f32x4(quads[2 * i], quads[2 * i + 1], 0x44),
                              _mm512_shuffle_f32x4(quads[2 * i], quads[2 * i + 1], 0xEE));
  }
  return _mm512_add_ps(_mm512_shuffle_f32x4(halves[0], halves[1], 0x88),
                       _mm512_shuffle_f32x4(halves[0], halves[1], 0xDD));
}

// The `group` query heads that share one key/value head, over `length` cached positions:
// out[h] = softmax(q[h] K^T * scale) V. scores: scratch of group * length floats. Positions go in
// blocks small enough to stay in L1 while every head of the group reads them.
__attribute__((target("avx512f"))) void attend_group(const float* queries, std::size_t group, const float* keys,
                                                     const float* values, std::size_t length, std::size_t dim,
                                                     float scale, float* scores, float* out) {
  const std::size_t vectors = (dim + kLanes - 1) / kLanes;
  const __mmask16 last = first_lanes(dim - (vectors - 1) * kLanes);
  auto lanes = [&](std::size_t v) { return v + 1 == vectors ? last : first_lanes(kLanes); };

  for (std::size_t t0 = 0; t0 < length; t0 += kLanes) {
    const std::size_t count = std::min(kLanes, length - t0);
    // A block short of 16 positions repeats its last one; those lanes are not stored.
    const float* rows[kLanes];
    for (std::size_t i = 0; i < kLanes; ++i) rows[i] = keys + (t0 + std::min(i, count - 1)) * dim;
    for (std::size_t h = 0; h < group; ++h) {
      const float* q = queries + h * dim;
      __m512 dots[kLanes];
      for (std::size_t i = 0; i < kLanes; ++i) dots[i] = _mm512_setzero_ps();
      for (std::size_t v = 0; v < vectors; ++v) {
        const __mmask16 m = lanes(v);
        const __m512 q_part = _mm512_maskz_loadu_ps(m, q + v * kLanes);
        for (std::size_t i = 0; i < kLanes; ++i) {
          dots[i] = _mm512_fmadd_ps(q_part, _mm512_maskz_loadu_ps(m, rows[i] + v * kLanes), dots[i]);
        }
      }
      _mm512_mask_storeu_ps(scores + h * length + t0, first_lanes(count),
                            _mm512_mul_ps(sum_each(dots), _mm512_set1_ps(scale)));
    }
  }

  for (std::size_t h = 0; h < group; ++h) {
    float* row = scores + h * length;
    __m512 highest = _mm512_set1_ps(-INFINITY);
    for (std::size_t t = 0; t < length; t += kLanes) {
      const __mmask16 m = first_lanes(length - t);
      highest = _mm512_mask_max_ps(highest, m, highest, _mm512_maskz_loadu_ps(m, row + t));
    }
    const __m512 shift = _mm512_set1_ps(_mm512_reduce_max_ps(highest));
    __m512 totals = _mm512_setzero_ps();
    for (std::size_t t = 0; t < length; t += kLanes) {
      const __mmask16 m = first_lanes(length - t);
      const __m512 weights = exp_nonpositive(_mm512_sub_ps(_mm512_maskz_loadu_ps(m, row + t), shift));
      _mm512_mask_storeu_ps(row + t, m, weights);
      totals = _mm512_mask_add_ps(totals, m, totals, weights);
    }
    // Normalised here, on `length` weights, rather than on the output.
    const __m512 inverse_total = _mm512_set1_ps(1.0f / _mm512_reduce_add_ps(totals));
    for (std::size_t t = 0; t < length; t += kLanes) {
      const __mmask16 m = first_lanes(length - t);
      _mm512_mask_storeu_ps(row + t, m, _mm512_mul_ps(_mm512_maskz_loadu_ps(m, row + t), inverse_total));
    }
  }

  // Four positions per pass over each head's output: their products chain in a register between one
  // load and one store, and the four value rows stay in L1 for every head of the group.
  for (std::size_t h = 0; h < group; ++h) {
    for (std::size_t v = 0; v < vectors; ++v) _mm512_mask_storeu_ps(out + h * dim + v * kLanes, lanes(v), _mm512_setzero_ps());
  }
  for (std::size_t t = 0; t < length; t += 4) {
    const std::size_t count = std::min<std::size_t>(4, length - t);
    for (std::size_t h = 0; h < group; ++h) {
      const float* weights = scores + h * length + t;
      for (std::size_t v = 0; v < vectors; ++v) {
        const __mmask16 m = lanes(v);
        float* o = out + h * dim + v * kLanes;
        __m512 acc = _mm512_maskz_loadu_ps(m, o);
        for (std::size_t i = 0; i < count; ++i) {
          acc = _mm512_fmadd_ps(_mm512_set1_ps(weights[i]), _mm512_maskz_loadu_ps(m, values + (t + i) * dim + v * kLanes), acc);
        }
        _mm512_mask_storeu_ps(o, m, acc);
      }
    }
  }
}

#endif

}  // namespace

#ifdef IM_ATTENTION_AVX512

bool decode_attention_f32_supported() { return __builtin_cpu_supports("avx512f") != 0; }

void decode_attention_f32(const float* qkv, const float* cos, const float* sin, float* keys, float* values,
                          const AttentionShape& shape, std::size_t position, float* out) {
  if (!decode_attention_f32_supported()) throw std::logic_error("decode_attention_f32 needs a CPU with AVX-512F");
  const auto [heads, kv_heads, dim, max_length] = shape;
  if (kv_heads == 0 || heads % kv_heads != 0 || dim == 0 || dim % 2 != 0) {
    throw std::invalid_argument("decode_attention_f32: heads must be a multiple of kv_heads and head_dim even");
  }
  if (position >= max_length) throw std::invalid_argument("decode_attention_f32: position is past the cache");
  const std::size_t group = heads / kv_heads;
  const std::size_t length = position + 1;
  const float scale = 1.0f / std::sqrt(static_cast<float>(dim));
  std::vector<float> queries(group * dim);
  std::vector<float> scores(group * length);
  const float* new_keys = qkv + heads * dim;
  const float* new_values = new_keys + kv_heads * dim;
  for (std::size_t g = 0; g < kv_heads; ++g) {
    float* head_keys = keys + g * max_length * dim;
    float* head_values = values + g * max_length * dim;
    rotate(new_keys + g * dim, cos, sin, dim, head_keys + position * dim);
    std::copy(new_values + g * dim, new_values + (g + 1) * dim, head_values + position * dim);
    for (std::size_t h = 0; h < group; ++h) rotate(qkv + (g * group + h) * dim, cos, sin, dim, queries.data() + h * dim);
    attend_group(queries.data(), group, head_keys, head_values, length, dim, scale, scores.data(),
                 out + g * group * dim);
  }
}

#else

bool decode_attention_f32_supported() { return false; }

void decode_attention_f32(const float*, const float*, const float*, float*, float*, const AttentionShape&,
                          std::size_t, float*) {
  throw std::logic_error("decode_attention_f32 is built for x86-64 only");
}

#endif

}  // namespace im
