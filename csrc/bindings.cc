// The Python module inferencemesh._core: the data plane (frames, buffers, QUIC) and the compute kernels
// (csrc/matvec.h, csrc/rms_norm.h, csrc/decode_attention.h). Each area registers its own bindings;
// blocking and bulk native work runs with the GIL released.
#include <pybind11/pybind11.h>

#include "bind_frame.h"

namespace im {
void bind_kernels(pybind11::module_& m);
#ifdef IM_HAVE_QUIC
void bind_quic(pybind11::module_& m);
#endif
}  // namespace im

PYBIND11_MODULE(_core, m) {
  m.doc() = "InferenceMesh native data plane: zero-copy frames, buffer pool, QUIC endpoint; float32 matvec, RMS norm and decode attention kernels.";
  im::bind_buffer_pool(m);
  im::bind_frame(m);
  im::bind_kernels(m);
#ifdef IM_HAVE_QUIC
  im::bind_quic(m);
#endif
}
