// One row times a float32 weight held column-major, as compute/linear.py keeps float32 weights: the
// product that batch-1 decode runs for every weight of every block and for the LM head. It is bound by
// how fast the weight streams from memory; torch's MKL runs AVX2 code on AMD CPUs and streams at about
// half the memory's speed there, this kernel runs AVX-512 and streams near it (docs/compute.md).
#pragma once

#include <cstddef>

namespace im {

// True where this CPU runs the kernel (checked at run time: the build targets baseline x86-64).
bool matvec_f32_supported();

// y[o] = bias[o] + sum_i x[i] * weight_t[i * out + o] for o < out: ``weight_t`` is the [in, out]
// row-major storage of an [out, in] column-major weight. ``bias`` may be null. Sums run in blocks of
// 64 inputs, then across blocks, which rounds less than one running sum over all inputs.
// Throws std::logic_error where matvec_f32_supported() is false.
void matvec_f32(const float* weight_t, std::size_t in, std::size_t out, const float* x, const float* bias,
                float* y);

}  // namespace im
