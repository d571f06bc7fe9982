#include "matvec.h"

#include <algorithm>
#include <stdexcept>

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define IM_MATVEC_AVX512 1
#include <immintrin.h>
#endif

namespace im {

#ifdef IM_MATVEC_AVX512

namespace {

constexpr std::size_t kLanes = 16;    // floats in one AVX-512 register
constexpr std::size_t kChunk = 1024;  // outputs computed together: their partial sums stay in L1
constexpr std::size_t kBlock = 64;    // inputs summed before the running total takes them
constexpr std::size_t kGroup = 8;     // weight rows streamed at once (8 sequential streams)

// t[0:n] += sum_{r in [first, last)} x[r] * w[r * stride + 0:n], n <= kChunk.
__attribute__((target("avx512f"))) void accumulate(const float* w, std::size_t stride, const float* x,
                                                   std::size_t first, std::size_t last, float* t,
                                                   std::size_t n) {
  const std::size_t full = n - n % kLanes;
  const auto tail = static_cast<__mmask16>((1u << (n - full)) - 1u);
  std::size_t r = first;
  for (; r + kGroup <= last; r += kGroup) {
    __m512 scale[kGroup];
    const float* row[kGroup];
    for (std::size_t g = 0; g < kGroup; ++g) {
      scale[g] = _mm512_set1_ps(x[r + g]);
      row[g] = w + (r + g) * stride;
    }
    std::size_t j = 0;
    for (; j < full; j += kLanes) {
      __m512 sum = _mm512_loadu_ps(t + j);
      for (std::size_t g = 0; g < kGroup; ++g) {
        sum = _mm512_fmadd_ps(_mm512_loadu_ps(row[g] + j), scale[g], sum);
      }
      _mm512_storeu_ps(t + j, sum);
    }
    if (tail != 0) {
      __m512 sum = _mm512_maskz_loadu_ps(tail, t + j);
      for (std::size_t g = 0; g < kGroup; ++g) {
        sum = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(tail, row[g] + j), scale[g], sum);
      }
      _mm512_mask_storeu_ps(t + j, tail, sum);
    }
  }
  for (; r < last; ++r) {
    const __m512 scale = _mm512_set1_ps(x[r]);
    const float* row = w + r * stride;
    std::size_t j = 0;
    for (; j < full; j += kLanes) {
      _mm512_storeu_ps(t + j, _mm512_fmadd_ps(_mm512_loadu_ps(row + j), scale, _mm512_loadu_ps(t + j)));
    }
    if (tail != 0) {
      const __m512 sum = _mm512_maskz_loadu_ps(tail, t + j);
      _mm512_mask_storeu_ps(t + j, tail, _mm512_fmadd_ps(_mm512_maskz_loadu_ps(tail, row + j), scale, sum));
    }
  }
}

}  // namespace

bool matvec_f32_supported() { return __builtin_cpu_supports("avx512f") != 0; }

void matvec_f32(const float* weight_t, std::size_t in, std::size_t out, const float* x, const float* bias,
                float* y) {
  if (!matvec_f32_supported()) throw std::logic_error("matvec_f32 needs a CPU with AVX-512F");
  alignas(64) float block_sum[kChunk];
  for (std::size_t first = 0; first < out; first += kChunk) {
    const std::size_t n = std::min(kChunk, out - first);
    float* y_chunk = y + first;
    if (bias != nullptr) {
      std::copy(bias + first, bias + first + n, y_chunk);
    } else {
      std::fill(y_chunk, y_chunk + n, 0.0f);
    }
    for (std::size_t start = 0; start < in; start += kBlock) {
      std::fill(block_sum, block_sum + n, 0.0f);
      accumulate(weight_t + first, out, x, start, std::min(in, start + kBlock), block_sum, n);
      for (std::size_t j = 0; j < n; ++j) y_chunk[j] += block_sum[j];
    }
  }
}

#else

bool matvec_f32_supported() { return false; }

void matvec_f32(const float*, std::size_t, std::size_t, const float*, const float*, float*) {
  throw std::logic_error("matvec_f32 is built for x86-64 only");
}

#endif

}  // namespace im
