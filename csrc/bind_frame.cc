// pybind11 face of the frame codec: encode from objects that export DLPack (torch tensors, numpy arrays)
// or the buffer protocol (bytes-like, as uint8), and decode into DLPack capsules that view the received
// buffer and keep it alive for exactly as long as a tensor made from them lives.
#include "bind_frame.h"

#include <pybind11/stl.h>

#include <algorithm>
#include <cstring>
#include <string>

#include "dlpack_abi.h"

namespace im {
namespace {

// Copies above this size run with the GIL released; below it the release costs more than the copy.
constexpr size_t kReleaseGilAbove = size_t{64} << 10;

PyObject* g_frame_error = nullptr;

[[noreturn]] void raise_frame_error(FrameErrc code, const std::string& message) {
  py::object exc = py::reinterpret_borrow<py::object>(g_frame_error)(message);
  exc.attr("code") = static_cast<int>(code);
  exc.attr("code_name") = frame_errc_name(code);
  PyErr_SetObject(g_frame_error, exc.ptr());
  throw py::error_already_set();
}

uint8_t dtype_from_dlpack(const dlpack::DataType& t, size_t index) {
  if (t.lanes == 1) {
    switch (t.code) {
      case dlpack::kFloat:
        if (t.bits == 32) return static_cast<uint8_t>(DType::kFloat32);
        if (t.bits == 16) return static_cast<uint8_t>(DType::kFloat16);
        if (t.bits == 64) return static_cast<uint8_t>(DType::kFloat64);
        break;
      case dlpack::kBfloat:
        if (t.bits == 16) return static_cast<uint8_t>(DType::kBFloat16);
        break;
      case dlpack::kInt:
        if (t.bits == 64) return static_cast<uint8_t>(DType::kInt64);
        if (t.bits == 32) return static_cast<uint8_t>(DType::kInt32);
        if (t.bits == 16) return static_cast<uint8_t>(DType::kInt16);
        if (t.bits == 8) return static_cast<uint8_t>(DType::kInt8);
        break;
      case dlpack::kUInt:
        if (t.bits == 8) return static_cast<uint8_t>(DType::kUInt8);
        break;
      case dlpack::kBool:
        if (t.bits == 8) return static_cast<uint8_t>(DType::kBool);
        break;
      default:
        break;
    }
  }
  raise_frame_error(FrameErrc::kBadDtype, "tensor " + std::to_string(index) + ": dtype (code " +
                                              std::to_string(t.code) + ", " + std::to_string(t.bits) +
                                              " bits) cannot travel in a frame");
}

dlpack::DataType dlpack_from_dtype(uint8_t code) {
  switch (static_cast<DType>(code)) {
    case DType::kFloat32: return {dlpack::kFloat, 32, 1};
    case DType::kFloat16: return {dlpack::kFloat, 16, 1};
    case DType::kBFloat16: return {dlpack::kBfloat, 16, 1};
    case DType::kFloat64: return {dlpack::kFloat, 64, 1};
    case DType::kInt64: return {dlpack::kInt, 64, 1};
    case DType::kInt32: return {dlpack::kInt, 32, 1};
    case DType::kInt16: return {dlpack::kInt, 16, 1};
    case DType::kInt8: return {dlpack::kInt, 8, 1};
    case DType::kUInt8: return {dlpack::kUInt, 8, 1};
    case DType::kBool: return {dlpack::kBool, 8, 1};
  }
  return {dlpack::kUInt, 8, 1};  // unreachable: decode_frame validated the code
}

bool is_row_major(const dlpack::Tensor& t) {
  if (t.strides == nullptr) return true;
  int64_t expected = 1;
  for (int32_t d = t.ndim - 1; d >= 0; --d) {
    if (t.shape[d] == 0) return true;  // an empty tensor has no layout to get wrong
    if (t.shape[d] != 1 && t.strides[d] != expected) return false;
    expected *= t.shape[d];
  }
  return true;
}

TensorRef tensor_from_dlpack(py::handle obj, size_t index, PyEncodedFrame& out) {
  py::object capsule = obj.attr("__dlpack__")();
  auto* managed = static_cast<dlpack::ManagedTensor*>(PyCapsule_GetPointer(capsule.ptr(), dlpack::kCapsuleName));
  if (managed == nullptr) throw py::error_already_set();
  const dlpack::Tensor& t = managed->dl_tensor;
  // The capsule keeps the producer's memory alive; it runs the deleter when it is collected.
  out.owners.push_back(std::move(capsule));
  if (t.device.device_type != dlpack::kCPU && t.device.device_type != dlpack::kCUDAHost) {
    raise_frame_error(FrameErrc::kBadArgument, "tensor " + std::to_string(index) +
                                                   " is not in host memory: move it to the CPU first");
  }
  if (t.ndim < 0 || t.ndim > static_cast<int32_t>(kMaxDims)) {
    raise_frame_error(FrameErrc::kTooManyDims, "tensor " + std::to_string(index) + " has " +
                                                   std::to_string(t.ndim) + " dimensions, at most " +
                                                   std::to_string(kMaxDims));
  }
  if (!is_row_major(t)) {
    raise_frame_error(FrameErrc::kNonContiguous,
                      "tensor " + std::to_string(index) + " is not contiguous: call .contiguous() first");
  }
  TensorRef ref;
  ref.dtype = dtype_from_dlpack(t.dtype, index);
  ref.ndim = static_cast<uint8_t>(t.ndim);
  ref.shape = t.shape;
  ref.data = static_cast<const uint8_t*>(t.data) + t.byte_offset;
  uint64_t count = 1;
  for (int32_t d = 0; d < t.ndim; ++d) count *= static_cast<uint64_t>(t.shape[d] < 0 ? 0 : t.shape[d]);
  ref.nbytes = count * dtype_itemsize(ref.dtype);
  return ref;
}

// A bytes-like object without DLPack travels as a 1-D uint8 tensor.
TensorRef tensor_from_buffer(py::handle obj, size_t index, PyEncodedFrame& out) {
  Py_buffer view;
  if (PyObject_GetBuffer(obj.ptr(), &view, PyBUF_C_CONTIGUOUS) != 0) {
    PyErr_Clear();
    raise_frame_error(FrameErrc::kBadArgument,
                      "tensor " + std::to_string(index) +
                          " is neither a DLPack tensor nor a contiguous bytes-like object");
  }
  out.views.push_back(view);
  out.shapes.push_back(static_cast<int64_t>(view.len));
  TensorRef ref;
  ref.dtype = static_cast<uint8_t>(DType::kUInt8);
  ref.ndim = 1;
  ref.shape = &out.shapes.back();
  ref.data = static_cast<const uint8_t*>(view.buf);
  ref.nbytes = static_cast<uint64_t>(view.len);
  return ref;
}

FrameLimits make_limits(uint64_t max_frame_size, uint32_t max_metadata_size, uint32_t max_tensors) {
  FrameLimits limits;
  limits.max_frame_size = max_frame_size;
  limits.max_metadata_size = max_metadata_size;
  limits.max_tensors = max_tensors;
  return limits;
}

std::shared_ptr<PyEncodedFrame> encode(uint8_t kind, uint64_t request_id, py::bytes metadata, py::sequence tensors,
                                       uint16_t flags, uint64_t max_frame_size, uint32_t max_metadata_size,
                                       uint32_t max_tensors) {
  auto result = std::make_shared<PyEncodedFrame>();
  const size_t count = py::len(tensors);
  if (count > max_tensors || count > kMaxTensorsHardLimit) {
    raise_frame_error(FrameErrc::kOversized, std::to_string(count) + " tensors exceed the limit of " +
                                                 std::to_string(max_tensors));
  }
  result->owners.reserve(count);
  result->views.reserve(count);
  result->shapes.reserve(count);  // pointers into it are kept: it must never reallocate
  std::vector<TensorRef> refs(count);
  for (size_t i = 0; i < count; ++i) {
    py::handle obj = tensors[i];
    refs[i] = py::hasattr(obj, "__dlpack__") ? tensor_from_dlpack(obj, i, *result)
                                             : tensor_from_buffer(obj, i, *result);
  }
  char* meta = nullptr;
  Py_ssize_t meta_len = 0;
  PyBytes_AsStringAndSize(metadata.ptr(), &meta, &meta_len);
  try {
    result->frame = encode_frame(kind, flags, request_id, reinterpret_cast<const uint8_t*>(meta),
                                 static_cast<size_t>(meta_len), refs.data(), count,
                                 make_limits(max_frame_size, max_metadata_size, max_tensors));
  } catch (const FrameError& e) {
    raise_frame_error(e.code(), e.what());
  }
  return result;
}

// One segment of an encoded frame, exported through the buffer protocol; holding it holds the frame.
struct SegmentView {
  std::shared_ptr<PyEncodedFrame> frame;
  Segment segment;
};

void write_frame(const EncodedFrame& frame, uint8_t* out, size_t capacity) {
  try {
    if (frame.size() > kReleaseGilAbove) {
      py::gil_scoped_release release;
      frame.write_to(out, capacity);
    } else {
      frame.write_to(out, capacity);
    }
  } catch (const FrameError& e) {
    raise_frame_error(e.code(), e.what());
  }
}

struct DecodedFrame {
  FrameView view;
  KeepAlive keep;
  size_t nbytes = 0;
};

// A DLPack tensor that views a decoded frame; deleting it drops one reference to the frame's memory.
struct DLPackContext {
  dlpack::ManagedTensor managed{};
  int64_t shape[kMaxDims] = {};
  KeepAlive keep;
};

void delete_dlpack_context(dlpack::ManagedTensor* self) { delete static_cast<DLPackContext*>(self->manager_ctx); }

void destroy_unconsumed_capsule(PyObject* capsule) {
  // A consumer (torch.from_dlpack) renames the capsule and takes ownership; otherwise it is ours.
  if (PyCapsule_IsValid(capsule, dlpack::kCapsuleName)) {
    auto* managed = static_cast<dlpack::ManagedTensor*>(PyCapsule_GetPointer(capsule, dlpack::kCapsuleName));
    managed->deleter(managed);
  }
}

py::capsule tensor_capsule(const DecodedFrame& frame, size_t i) {
  if (i >= frame.view.tensors.size()) throw py::index_error("tensor index out of range");
  const TensorDesc& desc = frame.view.tensors[i];
  auto* ctx = new DLPackContext();
  std::memcpy(ctx->shape, desc.shape, sizeof(ctx->shape));
  ctx->keep = frame.keep;
  dlpack::Tensor& t = ctx->managed.dl_tensor;
  t.data = const_cast<uint8_t*>(frame.view.tensor_data(i));
  t.device = {dlpack::kCPU, 0};
  t.ndim = desc.ndim;
  t.dtype = dlpack_from_dtype(desc.dtype);
  t.shape = ctx->shape;
  t.strides = nullptr;
  t.byte_offset = 0;
  ctx->managed.manager_ctx = ctx;
  ctx->managed.deleter = delete_dlpack_context;
  PyObject* capsule = PyCapsule_New(&ctx->managed, dlpack::kCapsuleName, destroy_unconsumed_capsule);
  if (capsule == nullptr) {
    delete ctx;
    throw py::error_already_set();
  }
  return py::reinterpret_steal<py::capsule>(capsule);
}

// Holds a Python buffer export; its last owner may be a tensor freed on a thread without the GIL.
KeepAlive keep_python_buffer(py::handle obj, const uint8_t** data, size_t* len) {
  auto* view = new Py_buffer;
  if (PyObject_GetBuffer(obj.ptr(), view, PyBUF_C_CONTIGUOUS) != 0) {
    delete view;
    throw py::error_already_set();
  }
  *data = static_cast<const uint8_t*>(view->buf);
  *len = static_cast<size_t>(view->len);
  return KeepAlive(view, [](const void* p) {
    auto* v = static_cast<Py_buffer*>(const_cast<void*>(p));
    if (Py_IsInitialized()) {
      py::gil_scoped_acquire gil;
      PyBuffer_Release(v);
    }
    delete v;
  });
}

std::shared_ptr<DecodedFrame> decode(py::handle buffer, uint64_t max_frame_size, uint32_t max_metadata_size,
                                     uint32_t max_tensors) {
  auto result = std::make_shared<DecodedFrame>();
  const uint8_t* data = nullptr;
  size_t len = 0;
  if (py::isinstance<Buffer>(buffer)) {
    auto pooled = buffer.cast<std::shared_ptr<Buffer>>();
    data = pooled->data();
    len = pooled->size();
    result->keep = std::move(pooled);
  } else {
    result->keep = keep_python_buffer(buffer, &data, &len);
  }
  try {
    result->view = decode_frame(data, len, make_limits(max_frame_size, max_metadata_size, max_tensors));
  } catch (const FrameError& e) {
    raise_frame_error(e.code(), e.what());
  }
  result->nbytes = len;
  return result;
}

py::dict header_dict(const FrameHeader& h) {
  py::dict d;
  d["version"] = h.version;
  d["kind"] = h.kind;
  d["flags"] = h.flags;
  d["request_id"] = h.request_id;
  d["frame_len"] = h.frame_len;
  d["payload_len"] = h.payload_len;
  d["metadata_len"] = h.metadata_len;
  d["tensor_count"] = h.tensor_count;
  return d;
}

}  // namespace

PyEncodedFrame::~PyEncodedFrame() {
  if (owners.empty() && views.empty()) return;
  if (!Py_IsInitialized()) return;
  py::gil_scoped_acquire gil;
  for (Py_buffer& v : views) PyBuffer_Release(&v);
  owners.clear();
}

void bind_frame(py::module_& m) {
  g_frame_error = PyErr_NewExceptionWithDoc(
      "inferencemesh._core.FrameError",
      "A frame failed validation or could not be encoded. `code` is the numeric error code and "
      "`code_name` its name (see docs/protocol.md).",
      PyExc_ValueError, nullptr);
  m.attr("FrameError") = py::handle(g_frame_error);

  m.attr("FRAME_VERSION") = kFrameVersion;
  m.attr("FRAME_HEADER_SIZE") = kFrameHeaderSize;
  m.attr("FRAME_ALIGNMENT") = kFrameAlignment;
  m.attr("MAX_DIMS") = kMaxDims;
  m.attr("DEFAULT_MAX_FRAME_SIZE") = kDefaultMaxFrameSize;
  m.attr("DEFAULT_MAX_METADATA_SIZE") = kDefaultMaxMetadataSize;
  m.attr("DEFAULT_MAX_TENSORS") = kDefaultMaxTensors;
  py::dict dtypes;
  for (uint8_t code = 1; dtype_itemsize(code) != 0; ++code) dtypes[dtype_name(code)] = code;
  m.attr("DTYPE_CODES") = dtypes;
  py::dict errcs;
  for (uint8_t code = 1; code <= static_cast<uint8_t>(FrameErrc::kBadArgument); ++code) {
    errcs[frame_errc_name(static_cast<FrameErrc>(code))] = code;
  }
  m.attr("FRAME_ERROR_CODES") = errcs;

  py::class_<SegmentView>(m, "SegmentView", py::buffer_protocol())
      .def_buffer([](SegmentView& s) {
        return py::buffer_info(const_cast<uint8_t*>(s.segment.data), 1, py::format_descriptor<uint8_t>::format(), 1,
                               {static_cast<py::ssize_t>(s.segment.len)}, {1}, /*readonly=*/true);
      });

  py::class_<PyEncodedFrame, std::shared_ptr<PyEncodedFrame>>(m, "EncodedFrame",
                                                              "A frame as scatter-gather segments that "
                                                              "point into the tensors it was made from.")
      .def_property_readonly("nbytes", [](const PyEncodedFrame& f) { return f.frame.size(); })
      .def("segments",
           [](const std::shared_ptr<PyEncodedFrame>& f) {
             py::list out;
             for (const Segment& s : f->frame.segments()) {
               out.append(py::memoryview(py::cast(SegmentView{f, s})));
             }
             return out;
           },
           "Read-only memoryviews of the segments in order; each keeps the frame alive.")
      .def("to_bytes",
           [](const PyEncodedFrame& f) {
             py::bytes out(nullptr, static_cast<size_t>(f.frame.size()));
             write_frame(f.frame, reinterpret_cast<uint8_t*>(PyBytes_AS_STRING(out.ptr())), f.frame.size());
             return out;
           })
      .def("write_into",
           [](const PyEncodedFrame& f, py::buffer dest) {
             py::buffer_info info = dest.request(/*writable=*/true);
             write_frame(f.frame, static_cast<uint8_t*>(info.ptr), static_cast<size_t>(info.size * info.itemsize));
             return f.frame.size();
           },
           py::arg("dest"), "Writes the frame contiguously into a writable buffer; returns its length.")
      .def("to_buffer",
           [](const PyEncodedFrame& f, BufferPool& pool) {
             std::shared_ptr<Buffer> buf = pool.acquire(f.frame.size());
             write_frame(f.frame, buf->data(), buf->size());
             return buf;
           },
           py::arg("pool"), "Writes the frame into one pooled buffer.")
      .def("set_request_id",
           [](PyEncodedFrame& f, uint64_t request_id) {
             if (f.handed_to_transport) {
               throw py::value_error("the frame was handed to the transport: its bytes may still be resent");
             }
             f.frame.set_request_id(request_id);
           },
           py::arg("request_id"),
           "Rewrites the request id in the header, for a frame encoded before its id was known; only "
           "until the frame is sent (ValueError after: QUIC may resend its bytes until acknowledged).");

  m.def("encode_frame", &encode, py::arg("kind"), py::arg("request_id"), py::arg("metadata"), py::arg("tensors"),
        py::arg("flags") = 0, py::arg("max_frame_size") = kDefaultMaxFrameSize,
        py::arg("max_metadata_size") = kDefaultMaxMetadataSize, py::arg("max_tensors") = kDefaultMaxTensors,
        "Encodes a frame without copying tensor bytes. Tensors: objects with __dlpack__ in host memory, "
        "or bytes-like objects (sent as uint8).");

  py::class_<DecodedFrame, std::shared_ptr<DecodedFrame>>(m, "DecodedFrame",
                                                          "A validated frame viewing the buffer it came in.")
      .def_property_readonly("kind", [](const DecodedFrame& f) { return f.view.header.kind; })
      .def_property_readonly("flags", [](const DecodedFrame& f) { return f.view.header.flags; })
      .def_property_readonly("request_id", [](const DecodedFrame& f) { return f.view.header.request_id; })
      .def_property_readonly("nbytes", [](const DecodedFrame& f) { return f.nbytes; })
      .def_property_readonly("metadata",
                             [](const DecodedFrame& f) {
                               return py::bytes(reinterpret_cast<const char*>(f.view.metadata),
                                                f.view.header.metadata_len);
                             })
      .def_property_readonly("tensor_count", [](const DecodedFrame& f) { return f.view.tensors.size(); })
      .def("dlpack", &tensor_capsule, py::arg("index"),
           "A DLPack capsule viewing tensor `index` (for torch.from_dlpack); it keeps the buffer alive.")
      .def("dlpacks",
           [](const DecodedFrame& f) {
             py::list out;
             for (size_t i = 0; i < f.view.tensors.size(); ++i) out.append(tensor_capsule(f, i));
             return out;
           })
      .def("tensor_info", [](const DecodedFrame& f, size_t i) {
        if (i >= f.view.tensors.size()) throw py::index_error("tensor index out of range");
        const TensorDesc& t = f.view.tensors[i];
        py::tuple shape(t.ndim);
        for (uint8_t d = 0; d < t.ndim; ++d) shape[d] = t.shape[d];
        return py::make_tuple(dtype_name(t.dtype), shape, t.offset, t.nbytes);
      });

  m.def("decode_frame", &decode, py::arg("buffer"), py::arg("max_frame_size") = kDefaultMaxFrameSize,
        py::arg("max_metadata_size") = kDefaultMaxMetadataSize, py::arg("max_tensors") = kDefaultMaxTensors,
        "Validates a complete frame and returns a DecodedFrame viewing `buffer` (no copy).");

  m.def("parse_header",
        [](py::buffer data, uint64_t max_frame_size, uint32_t max_metadata_size, uint32_t max_tensors) {
          py::buffer_info info = data.request();
          try {
            return header_dict(parse_header(static_cast<const uint8_t*>(info.ptr),
                                            static_cast<size_t>(info.size * info.itemsize),
                                            make_limits(max_frame_size, max_metadata_size, max_tensors)));
          } catch (const FrameError& e) {
            raise_frame_error(e.code(), e.what());
          }
        },
        py::arg("data"), py::arg("max_frame_size") = kDefaultMaxFrameSize,
        py::arg("max_metadata_size") = kDefaultMaxMetadataSize, py::arg("max_tensors") = kDefaultMaxTensors,
        "Validates the fixed header (the first FRAME_HEADER_SIZE bytes) and returns its fields.");
}

}  // namespace im
