#include "frame.h"

#include <cstring>

// Fields are stored little-endian and read with memcpy; on the little-endian hosts we build for that is
// the native order, so a load is one instruction.
static_assert(__BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__, "frame codec assumes a little-endian host");

namespace im {
namespace {

template <typename T>
T load(const uint8_t* p) {
  T v;
  std::memcpy(&v, p, sizeof(T));
  return v;
}

template <typename T>
void store(uint8_t* p, T v) {
  std::memcpy(p, &v, sizeof(T));
}

constexpr uint64_t align_up(uint64_t n) { return (n + kFrameAlignment - 1) & ~uint64_t{kFrameAlignment - 1}; }

// Zeros used as padding segments between tensors; padding is always shorter than the alignment.
alignas(kFrameAlignment) const uint8_t kZeros[kFrameAlignment] = {};

[[noreturn]] void fail(FrameErrc code, const std::string& message) { throw FrameError(code, message); }

std::string num(uint64_t v) { return std::to_string(v); }

size_t table_entry_size(uint8_t ndim) { return kTensorEntryFixedSize + size_t{ndim} * 8; }

// Element count x itemsize, rejecting negative dimensions and overflow.
uint64_t checked_nbytes(uint8_t dtype, uint8_t ndim, const int64_t* shape, size_t index) {
  uint64_t count = 1;
  bool overflow = false;
  for (uint8_t d = 0; d < ndim; ++d) {
    if (shape[d] < 0) {
      fail(FrameErrc::kBadShape, "tensor " + num(index) + ": negative dimension " + std::to_string(shape[d]));
    }
    overflow |= __builtin_mul_overflow(count, static_cast<uint64_t>(shape[d]), &count);
  }
  uint64_t nbytes = 0;
  overflow |= __builtin_mul_overflow(count, uint64_t{dtype_itemsize(dtype)}, &nbytes);
  if (overflow) fail(FrameErrc::kBadShape, "tensor " + num(index) + ": element count overflows");
  return nbytes;
}

void check_dtype_and_dims(uint8_t dtype, uint8_t ndim, size_t index) {
  if (dtype_itemsize(dtype) == 0) {
    fail(FrameErrc::kBadDtype, "tensor " + num(index) + ": unknown dtype code " + num(dtype));
  }
  if (ndim > kMaxDims) {
    fail(FrameErrc::kTooManyDims,
         "tensor " + num(index) + ": " + num(ndim) + " dimensions, at most " + num(kMaxDims));
  }
}

}  // namespace

size_t dtype_itemsize(uint8_t code) noexcept {
  switch (static_cast<DType>(code)) {
    case DType::kFloat64:
    case DType::kInt64:
      return 8;
    case DType::kFloat32:
    case DType::kInt32:
      return 4;
    case DType::kFloat16:
    case DType::kBFloat16:
    case DType::kInt16:
      return 2;
    case DType::kInt8:
    case DType::kUInt8:
    case DType::kBool:
      return 1;
  }
  return 0;
}

const char* dtype_name(uint8_t code) noexcept {
  switch (static_cast<DType>(code)) {
    case DType::kFloat32: return "float32";
    case DType::kFloat16: return "float16";
    case DType::kBFloat16: return "bfloat16";
    case DType::kFloat64: return "float64";
    case DType::kInt64: return "int64";
    case DType::kInt32: return "int32";
    case DType::kInt16: return "int16";
    case DType::kInt8: return "int8";
    case DType::kUInt8: return "uint8";
    case DType::kBool: return "bool";
  }
  return "unknown";
}

const char* frame_errc_name(FrameErrc code) noexcept {
  switch (code) {
    case FrameErrc::kTruncated: return "TRUNCATED";
    case FrameErrc::kBadMagic: return "BAD_MAGIC";
    case FrameErrc::kUnsupportedVersion: return "UNSUPPORTED_VERSION";
    case FrameErrc::kOversized: return "OVERSIZED";
    case FrameErrc::kBadDtype: return "BAD_DTYPE";
    case FrameErrc::kTooManyDims: return "TOO_MANY_DIMS";
    case FrameErrc::kBadShape: return "BAD_SHAPE";
    case FrameErrc::kSizeMismatch: return "SIZE_MISMATCH";
    case FrameErrc::kBadOffset: return "BAD_OFFSET";
    case FrameErrc::kLengthMismatch: return "LENGTH_MISMATCH";
    case FrameErrc::kReservedNonZero: return "RESERVED_NONZERO";
    case FrameErrc::kNonContiguous: return "NON_CONTIGUOUS";
    case FrameErrc::kBufferTooSmall: return "BUFFER_TOO_SMALL";
    case FrameErrc::kBadArgument: return "BAD_ARGUMENT";
  }
  return "UNKNOWN";
}

// Header layout (40 bytes, little-endian):
//   0 magic[4]  4 version u8  5 kind u8  6 flags u16  8 request_id u64  16 frame_len u64
//   24 payload_len u64  32 metadata_len u32  36 tensor_count u16  38 reserved u16
FrameHeader parse_header(const uint8_t* data, size_t len, const FrameLimits& limits) {
  if (len < kFrameHeaderSize) {
    fail(FrameErrc::kTruncated, "frame header needs " + num(kFrameHeaderSize) + " bytes, got " + num(len));
  }
  if (std::memcmp(data, kFrameMagic, sizeof(kFrameMagic)) != 0) {
    fail(FrameErrc::kBadMagic, "not an InferenceMesh frame (bad magic)");
  }
  FrameHeader h;
  h.version = data[4];
  if (h.version != kFrameVersion) {
    fail(FrameErrc::kUnsupportedVersion,
         "frame version " + num(h.version) + " is not supported (this build speaks " + num(kFrameVersion) + ")");
  }
  h.kind = data[5];
  h.flags = load<uint16_t>(data + 6);
  h.request_id = load<uint64_t>(data + 8);
  h.frame_len = load<uint64_t>(data + 16);
  h.payload_len = load<uint64_t>(data + 24);
  h.metadata_len = load<uint32_t>(data + 32);
  h.tensor_count = load<uint16_t>(data + 36);
  if (load<uint16_t>(data + 38) != 0) fail(FrameErrc::kReservedNonZero, "reserved header field is not zero");
  if (h.frame_len > limits.max_frame_size) {
    fail(FrameErrc::kOversized,
         "frame of " + num(h.frame_len) + " bytes exceeds the limit of " + num(limits.max_frame_size));
  }
  if (h.metadata_len > limits.max_metadata_size) {
    fail(FrameErrc::kOversized, "metadata of " + num(h.metadata_len) + " bytes exceeds the limit of " +
                                    num(limits.max_metadata_size));
  }
  if (h.tensor_count > limits.max_tensors || h.tensor_count > kMaxTensorsHardLimit) {
    fail(FrameErrc::kOversized, num(h.tensor_count) + " tensors exceed the limit of " + num(limits.max_tensors));
  }
  // The smallest possible layout must fit the declared length; decode_frame checks the exact layout.
  const uint64_t min_len = kFrameHeaderSize + uint64_t{h.metadata_len} + uint64_t{h.tensor_count} * kTensorEntryFixedSize;
  if (h.frame_len < min_len || h.payload_len > h.frame_len - min_len) {
    fail(FrameErrc::kLengthMismatch, "declared frame length " + num(h.frame_len) +
                                         " cannot hold its header, metadata, tensor table and payload");
  }
  return h;
}

FrameView decode_frame(const uint8_t* data, size_t len, const FrameLimits& limits) {
  FrameView view;
  FrameHeader& h = view.header;
  h = parse_header(data, len, limits);
  if (h.frame_len != len) {
    fail(len < h.frame_len ? FrameErrc::kTruncated : FrameErrc::kLengthMismatch,
         "frame declares " + num(h.frame_len) + " bytes but the buffer holds " + num(len));
  }
  view.metadata = data + kFrameHeaderSize;
  // parse_header guaranteed header + metadata + fixed table entries fit inside frame_len == len.
  uint64_t pos = kFrameHeaderSize + h.metadata_len;
  view.tensors.resize(h.tensor_count);
  for (size_t i = 0; i < h.tensor_count; ++i) {
    TensorDesc& t = view.tensors[i];
    if (len - pos < kTensorEntryFixedSize) fail(FrameErrc::kTruncated, "tensor table is truncated");
    const uint8_t* e = data + pos;
    t.dtype = e[0];
    t.ndim = e[1];
    if (load<uint16_t>(e + 2) != 0 || load<uint32_t>(e + 4) != 0) {
      fail(FrameErrc::kReservedNonZero, "tensor " + num(i) + ": reserved field is not zero");
    }
    t.offset = load<uint64_t>(e + 8);
    t.nbytes = load<uint64_t>(e + 16);
    check_dtype_and_dims(t.dtype, t.ndim, i);
    if (len - pos < table_entry_size(t.ndim)) fail(FrameErrc::kTruncated, "tensor table is truncated");
    std::memcpy(t.shape, e + kTensorEntryFixedSize, size_t{t.ndim} * 8);
    pos += table_entry_size(t.ndim);
    if (checked_nbytes(t.dtype, t.ndim, t.shape, i) != t.nbytes) {
      fail(FrameErrc::kSizeMismatch, "tensor " + num(i) + ": " + num(t.nbytes) +
                                         " bytes do not match its shape and dtype " + dtype_name(t.dtype));
    }
  }
  const uint64_t payload_start = align_up(pos);
  if (payload_start > len || len - payload_start != h.payload_len) {
    fail(FrameErrc::kLengthMismatch, "payload length " + num(h.payload_len) + " disagrees with the layout");
  }
  view.payload = data + payload_start;
  // Tensors lie in increasing offset order without overlap, each aligned, all inside the payload.
  uint64_t next_free = 0;
  for (size_t i = 0; i < view.tensors.size(); ++i) {
    const TensorDesc& t = view.tensors[i];
    if (t.offset % kFrameAlignment != 0 || t.offset < next_free || t.offset > h.payload_len ||
        t.nbytes > h.payload_len - t.offset) {
      fail(FrameErrc::kBadOffset, "tensor " + num(i) + ": offset " + num(t.offset) + " + " + num(t.nbytes) +
                                      " bytes is misaligned, overlapping or outside the payload");
    }
    next_free = t.offset + t.nbytes;
  }
  return view;
}

void EncodedFrame::write_to(uint8_t* out, size_t capacity) const {
  if (capacity < frame_len_) {
    fail(FrameErrc::kBufferTooSmall,
         "destination holds " + num(capacity) + " bytes, the frame needs " + num(frame_len_));
  }
  for (const Segment& s : segments_) {
    if (s.len != 0) std::memcpy(out, s.data, s.len);
    out += s.len;
  }
}

void EncodedFrame::set_request_id(uint64_t request_id) noexcept { store<uint64_t>(head_.data() + 8, request_id); }

EncodedFrame encode_frame(uint8_t kind, uint16_t flags, uint64_t request_id, const uint8_t* metadata,
                          size_t metadata_len, const TensorRef* tensors, size_t tensor_count,
                          const FrameLimits& limits) {
  if (metadata_len > limits.max_metadata_size) {
    fail(FrameErrc::kOversized, "metadata of " + num(metadata_len) + " bytes exceeds the limit of " +
                                    num(limits.max_metadata_size));
  }
  if (tensor_count > limits.max_tensors || tensor_count > kMaxTensorsHardLimit) {
    fail(FrameErrc::kOversized, num(tensor_count) + " tensors exceed the limit of " + num(limits.max_tensors));
  }
  uint64_t table_len = 0;
  for (size_t i = 0; i < tensor_count; ++i) {
    const TensorRef& t = tensors[i];
    check_dtype_and_dims(t.dtype, t.ndim, i);
    if (checked_nbytes(t.dtype, t.ndim, t.shape, i) != t.nbytes) {
      fail(FrameErrc::kSizeMismatch, "tensor " + num(i) + ": " + num(t.nbytes) +
                                         " bytes do not match its shape and dtype " + dtype_name(t.dtype));
    }
    table_len += table_entry_size(t.ndim);
  }
  const uint64_t head_len = align_up(kFrameHeaderSize + metadata_len + table_len);

  EncodedFrame frame;
  frame.head_.assign(head_len, 0);
  frame.segments_.reserve(1 + 2 * tensor_count);
  uint8_t* head = frame.head_.data();
  frame.segments_.push_back({head, static_cast<size_t>(head_len)});

  uint8_t* entry = head + kFrameHeaderSize + metadata_len;
  uint64_t offset = 0;
  for (size_t i = 0; i < tensor_count; ++i) {
    const TensorRef& t = tensors[i];
    entry[0] = t.dtype;
    entry[1] = t.ndim;
    store<uint64_t>(entry + 8, offset);
    store<uint64_t>(entry + 16, t.nbytes);
    if (t.ndim != 0) std::memcpy(entry + kTensorEntryFixedSize, t.shape, size_t{t.ndim} * 8);
    entry += table_entry_size(t.ndim);
    frame.segments_.push_back({t.data, static_cast<size_t>(t.nbytes)});
    offset += t.nbytes;
    // Pad to the next tensor's alignment; no padding is needed after the last one.
    if (i + 1 < tensor_count && align_up(offset) != offset) {
      frame.segments_.push_back({kZeros, static_cast<size_t>(align_up(offset) - offset)});
      offset = align_up(offset);
    }
  }
  frame.frame_len_ = head_len + offset;
  if (frame.frame_len_ > limits.max_frame_size) {
    fail(FrameErrc::kOversized,
         "frame of " + num(frame.frame_len_) + " bytes exceeds the limit of " + num(limits.max_frame_size));
  }
  std::memcpy(head, kFrameMagic, sizeof(kFrameMagic));
  head[4] = kFrameVersion;
  head[5] = kind;
  store<uint16_t>(head + 6, flags);
  store<uint64_t>(head + 8, request_id);
  store<uint64_t>(head + 16, frame.frame_len_);
  store<uint64_t>(head + 24, offset);
  store<uint32_t>(head + 32, static_cast<uint32_t>(metadata_len));
  store<uint16_t>(head + 36, static_cast<uint16_t>(tensor_count));
  if (metadata_len != 0) std::memcpy(head + kFrameHeaderSize, metadata, metadata_len);
  return frame;
}

}  // namespace im
