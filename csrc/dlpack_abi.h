// The DLPack exchange ABI (legacy unversioned DLManagedTensor, capsule name "dltensor"), written out
// from the published specification so the core depends on no framework headers. Only the members the
// codec uses are named; the layout matches the specification exactly.
#pragma once

#include <cstdint>

namespace im::dlpack {

enum DeviceType : int32_t { kCPU = 1, kCUDAHost = 3 };
enum TypeCode : uint8_t { kInt = 0, kUInt = 1, kFloat = 2, kBfloat = 4, kBool = 6 };

struct Device {
  int32_t device_type;
  int32_t device_id;
};

struct DataType {
  uint8_t code;
  uint8_t bits;
  uint16_t lanes;
};

struct Tensor {
  void* data;
  Device device;
  int32_t ndim;
  DataType dtype;
  int64_t* shape;
  int64_t* strides;  // may be null for a compact row-major tensor
  uint64_t byte_offset;
};

struct ManagedTensor {
  Tensor dl_tensor;
  void* manager_ctx;
  void (*deleter)(ManagedTensor* self);
};

inline constexpr const char* kCapsuleName = "dltensor";
inline constexpr const char* kUsedCapsuleName = "used_dltensor";

}  // namespace im::dlpack
