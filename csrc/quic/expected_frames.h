// Frames a consumer knows are coming, matched as they complete so that their one tensor lands where the
// consumer wants it without the consumer decoding them. A worker serving a session one token at a time
// knows its next step byte for byte but for the request id and the hidden state; a client knows its
// step's result the same way. Matching such a frame here, on the thread that assembled it, stands for
// decoding it and comparing its fields in Python, which after a forward, with every cache cold, took a
// third of a hop's Python time (docs/benchmarks.md).
#pragma once

#include <cstdint>
#include <memory>
#include <mutex>
#include <string>
#include <unordered_map>
#include <unordered_set>
#include <vector>

#include "buffer_pool.h"
#include "frame.h"
#include "quic/types.h"

namespace im::quic {

struct Expectation {
  uint8_t kind = 0;
  uint16_t flags = 0;
  std::string metadata;             // the frame's metadata, byte for byte
  uint64_t min_request_id = 0;      // the frame's request id lies in [min, max]
  uint64_t max_request_id = UINT64_MAX;
  uint8_t dtype = 0;                // its one tensor's dtype code and shape
  std::vector<int64_t> shape;
  std::shared_ptr<Buffer> into;     // receives the tensor's bytes (exactly its size)
};

// Thread-safe: the consumer registers and forgets, whichever thread holds the engine matches.
class ExpectedFrames {
 public:
  static constexpr size_t kMaxExpected = 1 << 16;

  // Bytes of a tensor of dtype code `dtype` and `shape`; 0 for an unknown dtype or a shape of no or
  // more than kMaxDims dimensions.
  static uint64_t tensor_bytes(uint8_t dtype, const std::vector<int64_t>& shape);
  // Registers `expectation` under `token`. Throws std::invalid_argument for a tensor tensor_bytes
  // refuses, an `into` that is not the tensor's size, or another expectation with the same token or
  // metadata; std::length_error past kMaxExpected.
  void add(uint64_t token, Expectation expectation);
  // Drops the expectation: true if it was waiting, false if a frame took it (its event is on the way)
  // or the token is unknown.
  bool forget(uint64_t token);
  // If `frame` is a complete frame that an expectation waits for, copies its tensor into that
  // expectation's buffer, drops the expectation and returns its token; 0 otherwise (the frame is then
  // left to the consumer as any other). `*claimed`: a thread waits for it (claim) and learns of it
  // from state(); nobody else need be told.
  uint64_t take(const Buffer& frame, const PeerId& from, uint64_t* request_id, bool* claimed);
  bool empty() const;

  // Where an expectation a thread waits for stands.
  enum class Wait { kArrived, kExpected, kNotExpected };
  // A thread is about to wait for `token`'s frame: false if it is no longer expected (taken before,
  // forgotten, or the registry closed).
  bool claim(uint64_t token);
  // kArrived once a frame took the claimed expectation (its tensor is in place), kExpected while it
  // waits, kNotExpected once forgotten or closed.
  Wait state(uint64_t token) const;
  // The waiting thread gives up its claim: the expectation's frame, if it comes later, is reported as
  // any unclaimed one. Returns the final state; for kArrived also the frame's request id and sender.
  Wait unclaim(uint64_t token, uint64_t* request_id, PeerId* from);
  // Every claimed expectation stops being expected (the endpoint is closing).
  void close();

 private:
  mutable std::mutex mutex_;
  std::unordered_map<std::string, uint64_t> by_metadata_;
  std::unordered_map<uint64_t, Expectation> by_token_;
  std::unordered_set<uint64_t> claimed_;  // tokens a thread waits for
  struct Arrival {
    uint64_t request_id;
    PeerId from;
  };
  std::unordered_map<uint64_t, Arrival> arrived_;  // of those, the ones a frame took
  bool closed_ = false;
};

}  // namespace im::quic
