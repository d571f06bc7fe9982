#include "rms_norm.h"

#include <cmath>

namespace im {

void rms_norm_f32(const float* x, std::size_t rows, std::size_t dim, const float* weight, float eps, float* y) {
  for (std::size_t r = 0; r < rows; ++r) {
    const float* row = x + r * dim;
    float* out = y + r * dim;
    double squares = 0.0;
    for (std::size_t i = 0; i < dim; ++i) squares += static_cast<double>(row[i]) * row[i];
    const float mean = static_cast<float>(squares / static_cast<double>(dim));
    const float inv_rms = static_cast<float>(1.0 / std::sqrt(static_cast<double>(mean + eps)));
    for (std::size_t i = 0; i < dim; ++i) out[i] = weight[i] * (row[i] * inv_rms);
  }
}

}  // namespace im
