// RMS normalisation of float32 rows, as every block of a Llama-style model runs twice per token. For a
// decode step's one row of a few hundred values, torch's F.rms_norm costs a chain of dispatched ops
// (26-32 us warm, ~130 us cold right after a block's weights streamed through the caches, measured on
// an Intel Xeon VM, where a decode step ran 6 % faster without them); this is one pass over the row.
#pragma once

#include <cstddef>

namespace im {

// y[r, i] = weight[i] * (x[r, i] * inv_rms[r]) with inv_rms[r] = 1 / sqrt(mean_i(x[r, i]^2) + eps),
// for r < rows, i < dim: x, y row-major [rows, dim] (y may be x), weight [dim]. The mean is summed in
// float64; the two products round to float32 in that order, as transformers' LlamaRMSNorm does.
void rms_norm_f32(const float* x, std::size_t rows, std::size_t dim, const float* weight, float eps, float* y);

}  // namespace im
