// Wire frame codec: a versioned little-endian frame that carries a message kind, a small metadata block
// and a table of tensors whose bytes follow 64-byte aligned. Encoding produces scatter-gather segments
// that point into the tensors' own memory; decoding validates every field and yields descriptors that
// point into the received buffer. Neither direction copies tensor bytes. Layout: docs/protocol.md.
#pragma once

#include <cstddef>
#include <cstdint>
#include <stdexcept>
#include <string>
#include <vector>

namespace im {

inline constexpr uint8_t kFrameMagic[4] = {'I', 'M', 'S', 'H'};
inline constexpr uint8_t kFrameVersion = 1;
inline constexpr size_t kFrameHeaderSize = 40;
inline constexpr size_t kTensorEntryFixedSize = 24;  // dtype, ndim, reserved, offset, nbytes
inline constexpr size_t kFrameAlignment = 64;
inline constexpr uint32_t kMaxDims = 8;
inline constexpr uint32_t kMaxTensorsHardLimit = 256;
inline constexpr uint64_t kDefaultMaxFrameSize = uint64_t{256} << 20;  // 256 MiB
inline constexpr uint32_t kDefaultMaxMetadataSize = 64u << 10;          // 64 KiB
inline constexpr uint32_t kDefaultMaxTensors = 64;

enum class DType : uint8_t {
  kFloat32 = 1,
  kFloat16 = 2,
  kBFloat16 = 3,
  kFloat64 = 4,
  kInt64 = 5,
  kInt32 = 6,
  kInt16 = 7,
  kInt8 = 8,
  kUInt8 = 9,
  kBool = 10,
};

// Returns the element size in bytes, or 0 for a value that is not a known dtype.
size_t dtype_itemsize(uint8_t code) noexcept;
const char* dtype_name(uint8_t code) noexcept;

enum class FrameErrc : uint8_t {
  kTruncated = 1,        // buffer shorter than the header, the table or the declared frame length
  kBadMagic,             // not an InferenceMesh frame
  kUnsupportedVersion,   // a version this build does not speak
  kOversized,            // frame, metadata or tensor count over the configured limits
  kBadDtype,             // unknown dtype code
  kTooManyDims,          // ndim over kMaxDims
  kBadShape,             // negative dimension or element count overflow
  kSizeMismatch,         // tensor byte length differs from shape x itemsize
  kBadOffset,            // tensor offset misaligned, out of the payload or overlapping another
  kLengthMismatch,       // frame_len / payload_len disagree with the layout or the buffer
  kReservedNonZero,      // reserved field set: a newer writer or corruption
  kNonContiguous,        // encoder input is strided
  kBufferTooSmall,       // destination of write_into is shorter than the frame
  kBadArgument,          // invalid encoder argument (e.g. unsupported device)
};

const char* frame_errc_name(FrameErrc code) noexcept;

class FrameError : public std::runtime_error {
 public:
  FrameError(FrameErrc code, const std::string& message) : std::runtime_error(message), code_(code) {}
  FrameErrc code() const noexcept { return code_; }

 private:
  FrameErrc code_;
};

struct FrameLimits {
  uint64_t max_frame_size = kDefaultMaxFrameSize;
  uint32_t max_metadata_size = kDefaultMaxMetadataSize;
  uint32_t max_tensors = kDefaultMaxTensors;
};

struct FrameHeader {
  uint8_t version = kFrameVersion;
  uint8_t kind = 0;
  uint16_t flags = 0;
  uint64_t request_id = 0;
  uint64_t frame_len = 0;    // total bytes of the frame, header included
  uint64_t payload_len = 0;  // bytes from the payload start to the end of the frame
  uint32_t metadata_len = 0;
  uint16_t tensor_count = 0;
};

struct TensorDesc {
  uint8_t dtype = 0;
  uint8_t ndim = 0;
  int64_t shape[kMaxDims] = {};
  uint64_t offset = 0;  // from the payload start; a multiple of kFrameAlignment
  uint64_t nbytes = 0;
};

// Validates the fixed header: magic, version, reserved bits and the size limits. This is all a receiver
// needs to learn how many bytes the frame occupies before the rest has arrived.
FrameHeader parse_header(const uint8_t* data, size_t len, const FrameLimits& limits);

// A validated frame over caller-owned memory. The pointers stay valid as long as that memory does.
struct FrameView {
  FrameHeader header;
  const uint8_t* metadata = nullptr;
  const uint8_t* payload = nullptr;
  std::vector<TensorDesc> tensors;

  const uint8_t* tensor_data(size_t i) const { return payload + tensors[i].offset; }
};

// Decodes and validates a complete frame; `len` must equal the frame's declared length.
FrameView decode_frame(const uint8_t* data, size_t len, const FrameLimits& limits);

// One input tensor of the encoder: contiguous bytes in host memory.
struct TensorRef {
  uint8_t dtype = 0;
  uint8_t ndim = 0;
  const int64_t* shape = nullptr;
  const uint8_t* data = nullptr;
  uint64_t nbytes = 0;
};

// A byte range to send; tensor segments point into the caller's tensors.
struct Segment {
  const uint8_t* data;
  size_t len;
};

// An encoded frame as scatter-gather segments: [header+metadata+table+padding] [tensor 0] [padding]
// [tensor 1] ... The tensors' memory must outlive this object (bindings keep their owners alive).
class EncodedFrame {
 public:
  uint64_t size() const noexcept { return frame_len_; }
  const std::vector<Segment>& segments() const noexcept { return segments_; }
  // Writes the whole frame contiguously into `out`; throws kBufferTooSmall when it does not fit.
  void write_to(uint8_t* out, size_t capacity) const;
  // Rewrites the header's request id (a frame encoded before its id was known).
  void set_request_id(uint64_t request_id) noexcept;

 private:
  friend EncodedFrame encode_frame(uint8_t, uint16_t, uint64_t, const uint8_t*, size_t,
                                   const TensorRef*, size_t, const FrameLimits&);
  std::vector<uint8_t> head_;
  std::vector<Segment> segments_;
  uint64_t frame_len_ = 0;
};

EncodedFrame encode_frame(uint8_t kind, uint16_t flags, uint64_t request_id, const uint8_t* metadata,
                          size_t metadata_len, const TensorRef* tensors, size_t tensor_count,
                          const FrameLimits& limits);

}  // namespace im
