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

// For each of the ROWS rows and j < n:
//   sums[r * kChunk + j] += sum_{k < K} x[r * in + i + k] * w[(i + k) * stride + j].
// K weight rows stream at once, each loaded once for all rows. Every access is masked, so the last
// partial vector takes the same path (a full mask costs nothing extra).
template <std::size_t ROWS, std::size_t K>
__attribute__((target("avx512f"))) void add_inputs(const float* w, std::size_t stride, const float* x,
                                                   std::size_t in, std::size_t i, float* sums,
                                                   std::size_t n) {
  __m512 scale[K][ROWS];
  const float* weight_row[K];
  for (std::size_t k = 0; k < K; ++k) {
    weight_row[k] = w + (i + k) * stride;
    for (std::size_t r = 0; r < ROWS; ++r) scale[k][r] = _mm512_set1_ps(x[r * in + i + k]);
  }
  const std::size_t full = n - n % kLanes;
  std::size_t j = 0;
  for (; j < full; j += kLanes) {
    __m512 sum[ROWS];
    for (std::size_t r = 0; r < ROWS; ++r) sum[r] = _mm512_loadu_ps(sums + r * kChunk + j);
    for (std::size_t k = 0; k < K; ++k) {
      const __m512 weights = _mm512_loadu_ps(weight_row[k] + j);
      for (std::size_t r = 0; r < ROWS; ++r) sum[r] = _mm512_fmadd_ps(weights, scale[k][r], sum[r]);
    }
    for (std::size_t r = 0; r < ROWS; ++r) _mm512_storeu_ps(sums + r * kChunk + j, sum[r]);
  }
  if (j < n) {
    const auto mask = static_cast<__mmask16>((1u << (n - j)) - 1u);
    __m512 sum[ROWS];
    for (std::size_t r = 0; r < ROWS; ++r) sum[r] = _mm512_maskz_loadu_ps(mask, sums + r * kChunk + j);
    for (std::size_t k = 0; k < K; ++k) {
      const __m512 weights = _mm512_maskz_loadu_ps(mask, weight_row[k] + j);
      for (std::size_t r = 0; r < ROWS; ++r) sum[r] = _mm512_fmadd_ps(weights, scale[k][r], sum[r]);
    }
    for (std::size_t r = 0; r < ROWS; ++r) _mm512_mask_storeu_ps(sums + r * kChunk + j, mask, sum[r]);
  }
}

// Weight rows streamed at once (8 sequential streams). With 2 rows the broadcast inputs (16), the
// sums (2) and the loaded weights fit the 32 vector registers.
constexpr std::size_t kGroup = 8;

template <std::size_t ROWS>
void multiply(const float* weight_t, std::size_t in, std::size_t out, const float* x, const float* bias,
              float* y) {
  alignas(64) float block_sums[ROWS * kChunk];
  for (std::size_t first = 0; first < out; first += kChunk) {
    const std::size_t n = std::min(kChunk, out - first);
    for (std::size_t r = 0; r < ROWS; ++r) {
      float* y_chunk = y + r * out + first;
      if (bias != nullptr) {
        std::copy(bias + first, bias + first + n, y_chunk);
      } else {
        std::fill(y_chunk, y_chunk + n, 0.0f);
      }
    }
    for (std::size_t start = 0; start < in; start += kBlock) {
      const std::size_t end = std::min(in, start + kBlock);
      std::fill(block_sums, block_sums + ROWS * kChunk, 0.0f);
      const float* w = weight_t + first;
      std::size_t i = start;
      for (; i + kGroup <= end; i += kGroup) add_inputs<ROWS, kGroup>(w, out, x, in, i, block_sums, n);
      for (; i < end; ++i) add_inputs<ROWS, 1>(w, out, x, in, i, block_sums, n);
      for (std::size_t r = 0; r < ROWS; ++r) {
        float* y_chunk = y + r * out + first;
        for (std::size_t j = 0; j < n; ++j) y_chunk[j] += block_sums[r * kChunk + j];
      }
    }
  }
}

}  // namespace

bool matvec_f32_supported() { return __builtin_cpu_supports("avx512f") != 0; }

void matvec_f32(const float* weight_t, std::size_t in, std::size_t out, const float* x, std::size_t rows,
                const float* bias, float* y) {
  if (!matvec_f32_supported()) throw std::logic_error("matvec_f32 needs a CPU with AVX-512F");
  switch (rows) {
    case 1: return multiply<1>(weight_t, in, out, x, bias, y);
    case 2: return multiply<2>(weight_t, in, out, x, bias, y);
    default: throw std::invalid_argument("matvec_f32 takes 1 or 2 rows");
  }
}

#else

bool matvec_f32_supported() { return false; }

void matvec_f32(const float*, std::size_t, std::size_t, const float*, std::size_t, const float*, float*) {
  throw std::logic_error("matvec_f32 is built for x86-64 only");
}

#endif

}  // namespace im
