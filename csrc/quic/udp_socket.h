// The endpoint's one UDP socket: dual-stack when bound to an IPv6 or wildcard address, large kernel
// buffers, GSO for batched sends and GRO for batched receives where the kernel has them, and the
// kernel's count of datagrams it dropped for a full receive buffer.
#pragma once

#include <netinet/in.h>
#include <sys/socket.h>

#include <cstddef>
#include <cstdint>
#include <stdexcept>
#include <string>

namespace im::quic {

class SocketError : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

struct Address {
  sockaddr_storage storage{};
  socklen_t len = 0;

  const sockaddr* sa() const { return reinterpret_cast<const sockaddr*>(&storage); }
  sockaddr* sa() { return reinterpret_cast<sockaddr*>(&storage); }
  std::string to_string() const;
  bool is_loopback() const;  // 127.0.0.0/8, ::1, or IPv4 loopback mapped into IPv6
  // Parses a numeric IPv4 or IPv6 host. Throws SocketError for anything else.
  static Address parse(const std::string& host, uint16_t port);
};

// Rewrites an IPv4 address as IPv4-mapped IPv6 when the socket is IPv6, so that paths compare equal to
// the source addresses the kernel reports for IPv4 peers on a dual-stack socket.
Address to_socket_family(const Address& addr, int family);

class UdpSocket {
 public:
  // Largest datagram (or GSO/GRO batch) handled in one call.
  static constexpr size_t kMaxBatchBytes = 65507;
  static constexpr size_t kMaxGsoSegments = 64;

  UdpSocket(const std::string& host, uint16_t port, int buffer_bytes, bool gso, bool gro);
  ~UdpSocket();
  UdpSocket(const UdpSocket&) = delete;
  UdpSocket& operator=(const UdpSocket&) = delete;

  int fd() const noexcept { return fd_; }
  bool has_datagram() const noexcept;  // one is waiting to be received
  int family() const noexcept { return family_; }
  const Address& local() const noexcept { return local_; }
  bool gso() const noexcept { return gso_; }
  bool gro() const noexcept { return gro_; }

  enum class SendResult { kSent, kWouldBlock, kFailed };
  // Sends `len` bytes as datagrams of `segment` bytes each (the last may be shorter) with one syscall
  // when GSO is on, else one datagram per call.
  SendResult send(const Address& to, const uint8_t* data, size_t len, size_t segment);

  // Receives one datagram or GRO batch into `buf` (kMaxBatchBytes). Returns the byte count, or -1 when
  // nothing is waiting. `*segment` is the size of each datagram in the batch.
  ssize_t receive(uint8_t* buf, Address* from, size_t* segment);

  uint64_t drops() const noexcept { return drops_; }
  uint64_t sendmsg_calls() const noexcept { return sendmsg_calls_; }

 private:
  int fd_ = -1;
  int family_ = AF_INET6;
  Address local_;
  bool gso_ = false;
  bool gro_ = false;
  uint64_t drops_ = 0;
  uint64_t sendmsg_calls_ = 0;
};

}  // namespace im::quic
