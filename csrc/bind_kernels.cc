// pybind11 face of the compute kernels: the float32 matrix-vector product, RMS normalisation and one
// position's decode attention. They
// take raw addresses, since any per-call conversion of torch tensors (DLPack, buffer protocol) costs
// more than their small work itself: their callers (inferencemesh.compute.linear.Projection,
// inferencemesh.compute.blocks.rms_norm, inferencemesh.compute.attention) check dtypes, devices,
// layouts and sizes.
#include <pybind11/pybind11.h>

#include <cstdint>

#include "decode_attention.h"
#include "matvec.h"
#include "rms_norm.h"

namespace im {

namespace py = pybind11;

void bind_kernels(py::module_& m) {
  m.def("matvec_f32_supported", &matvec_f32_supported,
        "Whether this CPU runs matvec_f32 (x86-64 with AVX-512F).");
  m.attr("MATVEC_MAX_ROWS") = kMatvecMaxRows;
  m.def(
      "matvec_f32",
      [](std::uintptr_t weight_t, std::size_t in, std::size_t out, std::uintptr_t x, std::size_t rows,
         std::uintptr_t bias, std::uintptr_t y) {
        matvec_f32(reinterpret_cast<const float*>(weight_t), in, out, reinterpret_cast<const float*>(x), rows,
                   reinterpret_cast<const float*>(bias), reinterpret_cast<float*>(y));
      },
      py::arg("weight_t"), py::arg("in_features"), py::arg("out_features"), py::arg("x"), py::arg("rows"),
      py::arg("bias"), py::arg("y"), py::call_guard<py::gil_scoped_release>(),
      "Internal (inferencemesh.compute.linear): y = x @ W.T + bias for 1 or 2 rows, from addresses of "
      "float32 CPU memory: weight_t the contiguous [in, out] storage of W, x [rows, in] and y [rows, out] "
      "contiguous, bias [out] or 0.");
  // Tiny work: the GIL stays held (releasing and taking it back would cost more).
  m.def(
      "rms_norm_f32",
      [](std::uintptr_t x, std::size_t rows, std::size_t dim, std::uintptr_t weight, float eps, std::uintptr_t y) {
        rms_norm_f32(reinterpret_cast<const float*>(x), rows, dim, reinterpret_cast<const float*>(weight), eps,
                     reinterpret_cast<float*>(y));
      },
      py::arg("x"), py::arg("rows"), py::arg("dim"), py::arg("weight"), py::arg("eps"), py::arg("y"),
      "Internal (inferencemesh.compute.blocks.rms_norm): y = weight * x / sqrt(mean(x^2) + eps) per row, "
      "from addresses of float32 CPU memory: x and y [rows, dim] contiguous, weight [dim].");
  m.def("decode_attention_f32_supported", &decode_attention_f32_supported,
        "Whether this CPU runs decode_attention_f32 (x86-64 with AVX-512F).");
  m.def(
      "decode_attention_f32",
      [](std::uintptr_t qkv, std::uintptr_t cos, std::uintptr_t sin, std::uintptr_t keys, std::uintptr_t values,
         std::size_t heads, std::size_t kv_heads, std::size_t head_dim, std::size_t max_length,
         std::size_t position, std::uintptr_t out) {
        decode_attention_f32(reinterpret_cast<const float*>(qkv), reinterpret_cast<const float*>(cos),
                             reinterpret_cast<const float*>(sin), reinterpret_cast<float*>(keys),
                             reinterpret_cast<float*>(values), AttentionShape{heads, kv_heads, head_dim, max_length},
                             position, reinterpret_cast<float*>(out));
      },
      py::arg("qkv"), py::arg("cos"), py::arg("sin"), py::arg("keys"), py::arg("values"), py::arg("heads"),
      py::arg("kv_heads"), py::arg("head_dim"), py::arg("max_length"), py::arg("position"), py::arg("out"),
      "Internal (inferencemesh.compute.attention): one decode position of one sequence in one block, from "
      "addresses of float32 CPU memory: qkv [(heads + 2 * kv_heads) * head_dim], the rope table's cos and "
      "sin rows [head_dim], the block's keys and values [kv_heads, max_length, head_dim] (the rotated key "
      "and the value are written at position), out [heads * head_dim]. ValueError for a bad shape or a "
      "position past max_length.");
}

}  // namespace im
