#include "quic/udp_socket.h"

#include <arpa/inet.h>
#include <fcntl.h>
#include <netinet/udp.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>

#ifndef UDP_SEGMENT
#define UDP_SEGMENT 103
#endif
#ifndef UDP_GRO
#define UDP_GRO 104
#endif
#ifndef SOL_UDP
#define SOL_UDP 17
#endif

namespace im::quic {
namespace {

std::string errno_text(const char* what) { return std::string(what) + ": " + std::strerror(errno); }

}  // namespace

std::string Address::to_string() const {
  char host[INET6_ADDRSTRLEN] = {};
  uint16_t port = 0;
  if (storage.ss_family == AF_INET) {
    auto* a = reinterpret_cast<const sockaddr_in*>(&storage);
    inet_ntop(AF_INET, &a->sin_addr, host, sizeof host);
    port = ntohs(a->sin_port);
    return std::string(host) + ":" + std::to_string(port);
  }
  auto* a = reinterpret_cast<const sockaddr_in6*>(&storage);
  inet_ntop(AF_INET6, &a->sin6_addr, host, sizeof host);
  port = ntohs(a->sin6_port);
  return "[" + std::string(host) + "]:" + std::to_string(port);
}

Address Address::parse(const std::string& host, uint16_t port) {
  Address a;
  auto* v4 = reinterpret_cast<sockaddr_in*>(&a.storage);
  if (inet_pton(AF_INET, host.c_str(), &v4->sin_addr) == 1) {
    v4->sin_family = AF_INET;
    v4->sin_port = htons(port);
    a.len = sizeof(sockaddr_in);
    return a;
  }
  std::string h = host;
  if (h.size() > 2 && h.front() == '[' && h.back() == ']') h = h.substr(1, h.size() - 2);
  auto* v6 = reinterpret_cast<sockaddr_in6*>(&a.storage);
  if (inet_pton(AF_INET6, h.c_str(), &v6->sin6_addr) == 1) {
    v6->sin6_family = AF_INET6;
    v6->sin6_port = htons(port);
    a.len = sizeof(sockaddr_in6);
    return a;
  }
  throw SocketError("not a numeric IPv4/IPv6 address: '" + host + "'");
}

bool Address::is_loopback() const {
  if (storage.ss_family == AF_INET) {
    return (ntohl(reinterpret_cast<const sockaddr_in*>(&storage)->sin_addr.s_addr) >> 24) == 127;
  }
  if (storage.ss_family != AF_INET6) return false;
  const in6_addr& a = reinterpret_cast<const sockaddr_in6*>(&storage)->sin6_addr;
  return IN6_IS_ADDR_LOOPBACK(&a) || (IN6_IS_ADDR_V4MAPPED(&a) && a.s6_addr[12] == 127);
}

Address to_socket_family(const Address& addr, int family) {
  if (family != AF_INET6 || addr.storage.ss_family != AF_INET) return addr;
  auto* v4 = reinterpret_cast<const sockaddr_in*>(&addr.storage);
  Address out;
  auto* v6 = reinterpret_cast<sockaddr_in6*>(&out.storage);
  v6->sin6_family = AF_INET6;
  v6->sin6_port = v4->sin_port;
  v6->sin6_addr.s6_addr[10] = 0xff;
  v6->sin6_addr.s6_addr[11] = 0xff;
  std::memcpy(&v6->sin6_addr.s6_addr[12], &v4->sin_addr, 4);
  out.len = sizeof(sockaddr_in6);
  return out;
}

UdpSocket::UdpSocket(const std::string& host, uint16_t port, int buffer_bytes, bool gso, bool gro) {
  // An empty host or "::" binds the dual-stack wildcard; an IPv4 literal binds an IPv4-only socket.
  Address bind_addr = Address::parse(host.empty() ? "::" : host, port);
  family_ = bind_addr.storage.ss_family;
  fd_ = ::socket(family_, SOCK_DGRAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
  if (fd_ < 0) throw SocketError(errno_text("socket"));
  int zero = 0, one = 1;
  if (family_ == AF_INET6) setsockopt(fd_, IPPROTO_IPV6, IPV6_V6ONLY, &zero, sizeof zero);
  // Bursts of a 64 MiB transfer overflow the default buffers; the kernel caps these at rmem_max /
  // wmem_max (SO_*BUFFORCE would need CAP_NET_ADMIN).
  setsockopt(fd_, SOL_SOCKET, SO_RCVBUF, &buffer_bytes, sizeof buffer_bytes);
  setsockopt(fd_, SOL_SOCKET, SO_SNDBUF, &buffer_bytes, sizeof buffer_bytes);
  setsockopt(fd_, SOL_SOCKET, SO_RXQ_OVFL, &one, sizeof one);
  if (::bind(fd_, bind_addr.sa(), bind_addr.len) != 0) {
    std::string msg = errno_text(("bind " + bind_addr.to_string()).c_str());
    ::close(fd_);
    throw SocketError(msg);
  }
  local_.len = sizeof local_.storage;
  getsockname(fd_, local_.sa(), &local_.len);
  if (gso) {
    // Probing with a zero segment size tells whether the kernel knows the option at all.
    int seg = 0;
    gso_ = setsockopt(fd_, SOL_UDP, UDP_SEGMENT, &seg, sizeof seg) == 0;
  }
  if (gro) gro_ = setsockopt(fd_, SOL_UDP, UDP_GRO, &one, sizeof one) == 0;
}

UdpSocket::~UdpSocket() {
  if (fd_ >= 0) ::close(fd_);
}

UdpSocket::SendResult UdpSocket::send(const Address& to, const uint8_t* data, size_t len, size_t segment) {
  while (len > 0) {
    const size_t chunk = gso_ ? len : std::min(len, segment);
    iovec iov{const_cast<uint8_t*>(data), chunk};
    msghdr msg{};
    msg.msg_name = const_cast<sockaddr*>(to.sa());
    msg.msg_namelen = to.len;
    msg.msg_iov = &iov;
    msg.msg_iovlen = 1;
    alignas(cmsghdr) char control[CMSG_SPACE(sizeof(uint16_t))] = {};
    if (gso_ && chunk > segment) {
      msg.msg_control = control;
      msg.msg_controllen = sizeof control;
      cmsghdr* cm = CMSG_FIRSTHDR(&msg);
      cm->cmsg_level = SOL_UDP;
      cm->cmsg_type = UDP_SEGMENT;
      cm->cmsg_len = CMSG_LEN(sizeof(uint16_t));
      const auto seg16 = static_cast<uint16_t>(segment);
      std::memcpy(CMSG_DATA(cm), &seg16, sizeof seg16);
    }
    ssize_t n;
    do {
      n = ::sendmsg(fd_, &msg, 0);
    } while (n < 0 && errno == EINTR);
    ++sendmsg_calls_;
    if (n < 0) {
      if (errno == EAGAIN || errno == EWOULDBLOCK) return SendResult::kWouldBlock;
      if (gso_ && errno == EIO) {
        // The route's device cannot segment: fall back to one datagram per call for good.
        gso_ = false;
        continue;
      }
      return SendResult::kFailed;  // e.g. unreachable: QUIC loss recovery copes
    }
    data += chunk;
    len -= chunk;
  }
  return SendResult::kSent;
}

bool UdpSocket::has_datagram() const noexcept {
  uint8_t byte;
  return ::recv(fd_, &byte, 1, MSG_PEEK | MSG_DONTWAIT) >= 0;
}

ssize_t UdpSocket::receive(uint8_t* buf, Address* from, size_t* segment) {
  iovec iov{buf, kMaxBatchBytes};
  msghdr msg{};
  from->len = sizeof from->storage;
  msg.msg_name = from->sa();
  msg.msg_namelen = from->len;
  msg.msg_iov = &iov;
  msg.msg_iovlen = 1;
  alignas(cmsghdr) char control[CMSG_SPACE(sizeof(int)) + CMSG_SPACE(sizeof(uint32_t))];
  msg.msg_control = control;
  msg.msg_controllen = sizeof control;
  ssize_t n;
  do {
    n = ::recvmsg(fd_, &msg, MSG_DONTWAIT);
  } while (n < 0 && errno == EINTR);
  if (n < 0) return -1;
  from->len = msg.msg_namelen;
  *segment = static_cast<size_t>(n);
  for (cmsghdr* cm = CMSG_FIRSTHDR(&msg); cm != nullptr; cm = CMSG_NXTHDR(&msg, cm)) {
    if (cm->cmsg_level == SOL_UDP && cm->cmsg_type == UDP_GRO) {
      int seg = 0;
      std::memcpy(&seg, CMSG_DATA(cm), sizeof seg);
      if (seg > 0) *segment = static_cast<size_t>(seg);
    } else if (cm->cmsg_level == SOL_SOCKET && cm->cmsg_type == SO_RXQ_OVFL) {
      uint32_t dropped = 0;
      std::memcpy(&dropped, CMSG_DATA(cm), sizeof dropped);
      drops_ = dropped;  // the kernel reports the socket's running total
    }
  }
  return n;
}

}  // namespace im::quic
