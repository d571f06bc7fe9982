// Python-facing pieces of the frame codec that other bindings (the QUIC endpoint) share.
#pragma once

#include <pybind11/pybind11.h>

#include <memory>
#include <vector>

#include "buffer_pool.h"
#include "frame.h"

namespace im {

namespace py = pybind11;

// An encoded frame together with the Python objects (DLPack capsules, buffer exporters) that own the
// tensor memory its segments point into. Destroying it drops those references, which needs the GIL: a
// native thread that holds the last reference should hand it back to a Python thread to release, or
// accept that the destructor takes the GIL.
struct PyEncodedFrame {
  EncodedFrame frame;
  std::vector<py::object> owners;
  std::vector<Py_buffer> views;  // buffer-protocol exports, released with the frame
  std::vector<int64_t> shapes;   // flattened shapes of tensors that came through the buffer protocol
  bool handed_to_transport = false;  // its bytes may be (re)sent from now on: no more rewriting

  PyEncodedFrame() = default;
  PyEncodedFrame(const PyEncodedFrame&) = delete;
  PyEncodedFrame& operator=(const PyEncodedFrame&) = delete;
  ~PyEncodedFrame();
};

// Keeps the memory behind a decoded frame alive: a pooled buffer or a Python buffer export.
using KeepAlive = std::shared_ptr<const void>;

void bind_frame(py::module_& m);
void bind_buffer_pool(py::module_& m);

}  // namespace im
