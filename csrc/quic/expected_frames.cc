#include "quic/expected_frames.h"

#include <algorithm>
#include <cstring>
#include <stdexcept>

namespace im::quic {

uint64_t ExpectedFrames::tensor_bytes(uint8_t dtype, const std::vector<int64_t>& shape) {
  if (shape.empty() || shape.size() > kMaxDims) return 0;
  uint64_t bytes = dtype_itemsize(dtype);
  for (int64_t d : shape) bytes *= static_cast<uint64_t>(std::max<int64_t>(d, 0));
  return bytes;
}

void ExpectedFrames::add(uint64_t token, Expectation expectation) {
  const uint64_t bytes = tensor_bytes(expectation.dtype, expectation.shape);
  if (bytes == 0) {
    throw std::invalid_argument("an expected tensor needs a known dtype, 1 to 8 dimensions and elements");
  }
  if (!expectation.into || expectation.into->size() != bytes) {
    throw std::invalid_argument("the destination must be exactly the expected tensor's size");
  }
  std::lock_guard<std::mutex> lock(mutex_);
  if (by_token_.size() >= kMaxExpected) throw std::length_error("too many frames expected at once");
  if (by_token_.count(token) != 0 || !by_metadata_.emplace(expectation.metadata, token).second) {
    throw std::invalid_argument("a frame with this token or metadata is already expected");
  }
  by_token_.emplace(token, std::move(expectation));
}

bool ExpectedFrames::forget(uint64_t token) {
  std::lock_guard<std::mutex> lock(mutex_);
  auto it = by_token_.find(token);
  if (it == by_token_.end()) return false;
  by_metadata_.erase(it->second.metadata);
  by_token_.erase(it);
  return true;
}

bool ExpectedFrames::empty() const {
  std::lock_guard<std::mutex> lock(mutex_);
  return by_token_.empty();
}

bool ExpectedFrames::claim(uint64_t token) {
  std::lock_guard<std::mutex> lock(mutex_);
  if (closed_ || by_token_.count(token) == 0) return false;
  claimed_.insert(token);
  return true;
}

ExpectedFrames::Wait ExpectedFrames::state(uint64_t token) const {
  std::lock_guard<std::mutex> lock(mutex_);
  if (arrived_.count(token) != 0) return Wait::kArrived;
  return !closed_ && by_token_.count(token) != 0 ? Wait::kExpected : Wait::kNotExpected;
}

ExpectedFrames::Wait ExpectedFrames::unclaim(uint64_t token, uint64_t* request_id, PeerId* from) {
  std::lock_guard<std::mutex> lock(mutex_);
  claimed_.erase(token);
  if (auto it = arrived_.find(token); it != arrived_.end()) {
    *request_id = it->second.request_id;
    *from = it->second.from;
    arrived_.erase(it);
    return Wait::kArrived;
  }
  return !closed_ && by_token_.count(token) != 0 ? Wait::kExpected : Wait::kNotExpected;
}

void ExpectedFrames::close() {
  std::lock_guard<std::mutex> lock(mutex_);
  closed_ = true;
}

uint64_t ExpectedFrames::take(const Buffer& frame, const PeerId& from, uint64_t* request_id, bool* claimed) {
  std::lock_guard<std::mutex> lock(mutex_);
  if (by_token_.empty()) return 0;
  FrameView view;
  try {
    view = decode_frame(frame.data(), frame.size(), FrameLimits{});
  } catch (const FrameError&) {
    return 0;  // the consumer's decoder reports it
  }
  const auto found = by_metadata_.find(
      std::string(reinterpret_cast<const char*>(view.metadata), view.header.metadata_len));
  if (found == by_metadata_.end()) return 0;
  const uint64_t token = found->second;
  const Expectation& x = by_token_.at(token);
  const FrameHeader& h = view.header;
  const bool matches = h.kind == x.kind && h.flags == x.flags && h.request_id >= x.min_request_id &&
                       h.request_id <= x.max_request_id && view.tensors.size() == 1 &&
                       view.tensors[0].dtype == x.dtype && view.tensors[0].ndim == x.shape.size() &&
                       std::equal(x.shape.begin(), x.shape.end(), view.tensors[0].shape) &&
                       view.tensors[0].nbytes == x.into->size();
  if (!matches) return 0;
  std::memcpy(x.into->data(), view.tensor_data(0), view.tensors[0].nbytes);
  *request_id = h.request_id;
  by_token_.erase(token);
  by_metadata_.erase(found);
  *claimed = claimed_.count(token) != 0;
  if (*claimed) arrived_[token] = Arrival{h.request_id, from};
  return token;
}

}  // namespace im::quic
