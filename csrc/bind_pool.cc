// pybind11 face of the buffer pool: pooled buffers export the buffer protocol (writable bytes), and
// Python can install page-locking hooks (torch.cuda.cudart().cudaHostRegister) for large buffers.
#include <pybind11/functional.h>

#include "bind_frame.h"

namespace im {

void bind_buffer_pool(py::module_& m) {
  py::register_exception<PoolExhausted>(m, "PoolExhausted", PyExc_MemoryError);

  py::class_<Buffer, std::shared_ptr<Buffer>>(m, "Buffer", py::buffer_protocol(),
                                             "A pooled, aligned byte buffer; returns to its pool when released.")
      .def_buffer([](Buffer& b) {
        return py::buffer_info(b.data(), 1, py::format_descriptor<uint8_t>::format(), 1,
                               {static_cast<py::ssize_t>(b.size())}, {1}, /*readonly=*/false);
      })
      .def("__len__", &Buffer::size)
      .def_property_readonly("nbytes", &Buffer::size)
      .def_property_readonly("capacity", &Buffer::capacity)
      .def_property_readonly("pinned", &Buffer::pinned)
      .def_property_readonly("address", [](const Buffer& b) { return reinterpret_cast<uintptr_t>(b.data()); });

  py::class_<BufferPool, std::shared_ptr<BufferPool>>(m, "BufferPool",
                                                     "Size-classed, aligned, capped pool of byte buffers.")
      .def(py::init([](size_t max_bytes) { return BufferPool::create(max_bytes); }), py::arg("max_bytes"))
      .def("acquire", &BufferPool::acquire, py::arg("size"), py::call_guard<py::gil_scoped_release>(),
           "A buffer of `size` bytes; raises PoolExhausted when the cap cannot hold it.")
      .def("trim", &BufferPool::trim, "Frees cached buffers that are not in use.")
      .def("stats",
           [](const BufferPool& p) {
             const PoolStats s = p.stats();
             py::dict d;
             d["bytes_in_use"] = s.bytes_in_use;
             d["bytes_free"] = s.bytes_free;
             d["high_water"] = s.high_water;
             d["max_bytes"] = s.max_bytes;
             d["buffers_in_use"] = s.buffers_in_use;
             d["buffers_free"] = s.buffers_free;
             d["fresh_allocations"] = s.fresh_allocations;
             d["reuses"] = s.reuses;
             d["bytes_pinned"] = s.bytes_pinned;
             return d;
           })
      .def(
          "set_pin_hooks",
          [](BufferPool& p, py::function pin, py::function unpin, size_t min_bytes) {
            // The hooks run on whichever thread allocates or frees; they take the GIL themselves. A hook
            // that raises leaves the buffer pageable rather than failing the allocation.
            PinHooks hooks;
            hooks.min_bytes = min_bytes;
            hooks.pin = [pin](void* ptr, size_t size) {
              py::gil_scoped_acquire gil;
              try {
                return pin(reinterpret_cast<uintptr_t>(ptr), size).cast<bool>();
              } catch (py::error_already_set& e) {
                e.discard_as_unraisable("inferencemesh BufferPool pin hook");
                return false;
              }
            };
            hooks.unpin = [unpin](void* ptr) {
              if (!Py_IsInitialized()) return;
              py::gil_scoped_acquire gil;
              try {
                unpin(reinterpret_cast<uintptr_t>(ptr));
              } catch (py::error_already_set& e) {
                e.discard_as_unraisable("inferencemesh BufferPool unpin hook");
              }
            };
            p.set_pin_hooks(std::move(hooks));
          },
          py::arg("pin"), py::arg("unpin"), py::arg("min_bytes") = size_t{1} << 20,
          "pin(address, size) -> bool registers a fresh buffer of at least min_bytes as page-locked; "
          "unpin(address) undoes it before the memory is freed.")
      .def_static("size_class", &BufferPool::size_class, py::arg("size"))
      .def_static("alignment_for", &BufferPool::alignment_for, py::arg("capacity"));
}

}  // namespace im
