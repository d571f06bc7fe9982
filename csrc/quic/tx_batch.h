// Collects the packets of one write pass to one destination into a GSO batch: equal-sized datagrams
// back to back (a shorter one may only come last), sent with one sendmsg. When the socket buffer is
// full the batch is kept (nothing written is ever dropped here) and the endpoint waits for EPOLLOUT
// before writing more.
#pragma once

#include <cstddef>
#include <cstdint>
#include <vector>

#include "quic/udp_socket.h"

namespace im::quic {

class TxBatch {
 public:
  TxBatch(UdpSocket& socket, size_t max_packet);

  // Where the next packet goes and how large it may be. Packets must be added right after writing.
  uint8_t* space() noexcept { return buf_.data() + len_; }
  size_t max_packet() const noexcept { return max_packet_; }
  // Adds the `n`-byte packet just written at space(), destined to `to`.
  void add(const Address& to, size_t n);
  void flush();
  bool blocked() const noexcept { return blocked_; }
  uint64_t datagrams_sent() const noexcept { return datagrams_sent_; }

 private:
  void send_prefix(size_t len, size_t count);

  UdpSocket& socket_;
  size_t max_packet_;
  std::vector<uint8_t> buf_;
  size_t len_ = 0;
  size_t segment_ = 0;
  size_t count_ = 0;
  Address to_;
  // A packet written after a batch it could not join, while that batch waits for the socket.
  size_t tail_offset_ = 0;
  size_t tail_len_ = 0;
  Address tail_to_;
  bool blocked_ = false;
  uint64_t datagrams_sent_ = 0;
};

}  // namespace im::quic
