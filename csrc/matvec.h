// One or two rows times a float32 weight held column-major, as compute/linear.py keeps float32
// weights: the product that decode runs for every weight of every block and for the LM head, for one
// sequence or two. It is bound by how fast the weight streams from memory; torch's MKL runs AVX2 code
// on AMD CPUs and streams at about half the memory's speed there. This kernel runs AVX-512, reads the
// weight once for both rows, and streams near the memory's speed (docs/compute.md). From 3 rows on,
// oneDNN's GEMM is as fast or faster (measured: bench/bench_linear.py), so the kernel stops at 2.
#pragma once

#include <cstddef>

namespace im {

constexpr std::size_t kMatvecMaxRows = 2;

// True where this CPU runs the kernel (checked at run time: the build targets baseline x86-64).
bool matvec_f32_supported();

// y[r * out + o] = bias[o] + sum_i x[r * in + i] * weight_t[i * out + o] for r < rows, o < out:
// ``weight_t`` is the [in, out] row-major storage of an [out, in] column-major weight, ``x`` and ``y``
// are row-major [rows, in] and [rows, out], ``bias`` may be null. Sums run in blocks of 64 inputs,
// then across blocks, which rounds less than one running sum over all inputs.
// Throws std::invalid_argument unless 1 <= rows <= kMatvecMaxRows, std::logic_error where
// matvec_f32_supported() is false.
void matvec_f32(const float* weight_t, std::size_t in, std::size_t out, const float* x, std::size_t rows,
                const float* bias, float* y);

}  // namespace im
