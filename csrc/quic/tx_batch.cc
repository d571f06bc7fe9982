#include "quic/tx_batch.h"

#include <cstring>

namespace im::quic {
namespace {

bool same_address(const Address& a, const Address& b) {
  return a.len == b.len && std::memcmp(&a.storage, &b.storage, a.len) == 0;
}

}  // namespace

TxBatch::TxBatch(UdpSocket& socket, size_t max_packet)
    : socket_(socket), max_packet_(max_packet), buf_(UdpSocket::kMaxBatchBytes + max_packet) {}

void TxBatch::add(const Address& to, size_t n) {
  if (count_ > 0 && (n > segment_ || !same_address(to, to_))) {
    // The new packet cannot join this batch: send what came before it, then move it to the front.
    const size_t start = len_;
    send_prefix(start, count_);
    if (blocked_) {
      // Keep both: the batch is retried on EPOLLOUT, then this packet follows it (flush()).
      tail_offset_ = start;
      tail_len_ = n;
      tail_to_ = to;
      return;
    }
    std::memmove(buf_.data(), buf_.data() + start, n);
  }
  if (count_ == 0) {
    to_ = to;
    segment_ = n;
  }
  len_ += n;
  ++count_;
  const bool short_tail = n < segment_;
  if (short_tail || count_ == UdpSocket::kMaxGsoSegments || len_ + segment_ > UdpSocket::kMaxBatchBytes) flush();
}

void TxBatch::flush() {
  if (count_ > 0) send_prefix(len_, count_);
  if (blocked_ || tail_len_ == 0) return;
  std::memmove(buf_.data(), buf_.data() + tail_offset_, tail_len_);
  to_ = tail_to_;
  segment_ = len_ = tail_len_;
  count_ = 1;
  tail_len_ = 0;
  send_prefix(len_, count_);
}

void TxBatch::send_prefix(size_t len, size_t count) {
  switch (socket_.send(to_, buf_.data(), len, segment_)) {
    case UdpSocket::SendResult::kWouldBlock:
      blocked_ = true;
      return;
    case UdpSocket::SendResult::kSent:
      datagrams_sent_ += count;
      break;
    case UdpSocket::SendResult::kFailed:
      break;  // QUIC loss recovery resends what mattered
  }
  blocked_ = false;
  len_ = 0;
  count_ = 0;
}

}  // namespace im::quic
