// libFuzzer harness for the frame decoder. Any input must either decode into a frame whose every
// tensor lies inside the input, or raise FrameError; ASan/UBSan catch anything else. Decoded tensor
// bytes are summed so that an out-of-bounds view would be read and reported.
#include <cstddef>
#include <cstdint>
#include <cstdlib>

#include "frame.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  im::FrameLimits limits;
  limits.max_frame_size = 1 << 20;
  try {
    const im::FrameView view = im::decode_frame(data, size, limits);
    unsigned sum = 0;
    for (size_t i = 0; i < view.tensors.size(); ++i) {
      const uint8_t* p = view.tensor_data(i);
      for (uint64_t b = 0; b < view.tensors[i].nbytes; ++b) sum += p[b];
    }
    for (uint32_t b = 0; b < view.header.metadata_len; ++b) sum += view.metadata[b];
    if (sum == 0xFFFFFFFFu) std::abort();  // keeps the reads from being optimised away
  } catch (const im::FrameError&) {
  }
  return 0;
}
