// Shared vocabulary of the QUIC data plane: configuration, error kinds, the frames handed to the endpoint
// and the events it reports back. No ngtcp2 or GnuTLS types appear here, so bindings and benchmarks can
// include it cheaply.
#pragma once

#include <array>
#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "buffer_pool.h"
#include "frame.h"

namespace im::quic {

inline constexpr size_t kPeerIdSize = 32;
using PeerId = std::array<uint8_t, kPeerIdSize>;

std::string peer_id_hex(const PeerId& id, size_t bytes = kPeerIdSize);

struct Config {
  std::string alpn = "inferencemesh/1";
  uint64_t max_frame_size = kDefaultMaxFrameSize;
  // QUIC flow-control windows: large enough that a 64 MiB prefill frame flows without waiting for
  // window updates, small enough to bound what one peer can make us buffer.
  uint64_t connection_window = (uint64_t{64} << 20) + (uint64_t{1} << 20);
  uint64_t stream_window = (uint64_t{64} << 20) + (uint64_t{1} << 20);
  // Bytes of received frames whose handler has not finished, per connection. Past it, connection credit
  // is withheld, so a slow receiver stalls its senders instead of queueing without bound.
  uint64_t max_pending_bytes = uint64_t{256} << 20;
  uint32_t max_streams = 1024;      // concurrent streams a peer may open (bidirectional and unidirectional)
  uint32_t max_connections = 1024;  // inbound + outbound
  double handshake_timeout_s = 5.0;
  double idle_timeout_s = 30.0;
  // With requests or sends outstanding, a peer silent this long (despite keep-alive pings) is dead.
  double dead_peer_timeout_s = 1.0;
  uint64_t pool_bytes = uint64_t{2} << 30;  // cap of the receive buffer pool
  int socket_buffer_bytes = 8 << 20;        // SO_RCVBUF / SO_SNDBUF request
  size_t max_udp_payload = 1452;
  // To loopback addresses (the local host; its path carries 64 KiB datagrams): a hidden state of one
  // token travels in one packet instead of two. 0: max_udp_payload there too.
  size_t loopback_udp_payload = 16000;
  bool gso = true;
  bool gro = true;
};

// Why an operation failed. Python maps each to an exception class (inferencemesh/transport/errors.py).
enum class ErrorKind : uint8_t {
  kNone = 0,
  kPeerIdMismatch = 1,     // the peer's certificate key does not hash to the expected peer id
  kPeerUnreachable = 2,    // no connection could be established (no answer, no address known)
  kConnectionLost = 3,     // an established connection died (peer silent, closed, reset)
  kHandshakeFailed = 4,    // TLS refused: unknown ALPN, bad certificate, protocol error
  kFrameTooLarge = 5,      // over max_frame_size on either side
  kInvalidFrame = 6,       // the peer rejected the bytes as a malformed frame
  kRemoteError = 7,        // the peer's handler failed or gave no response
  kResourceExhausted = 8,  // receiver out of buffer memory, or the connection limit was reached
  kEndpointClosed = 9,
  kTimeout = 10,           // no response within the request's timeout; the request was cancelled
};

// Application error codes carried by RESET_STREAM / STOP_SENDING / CONNECTION_CLOSE.
enum AppError : uint64_t {
  kAppHandlerFailed = 1,
  kAppInvalidFrame = 2,
  kAppFrameTooLarge = 3,
  kAppResourceExhausted = 4,
  kAppCancelled = 5,
  kAppShutdown = 6,
};

// A complete frame to send, as scatter-gather segments. `keepalive` owns the memory behind the segments;
// the endpoint holds it until the peer has acknowledged every byte, then hands it to
// EventSink::release (on the I/O thread) so the owner decides where it is destroyed.
struct OutFrame {
  std::vector<Segment> segments;
  uint64_t size = 0;
  std::shared_ptr<void> keepalive;
};

struct Event {
  enum class Type : uint8_t {
    kResponse,  // token: the request's token; buffer: the response frame
    kFailed,    // token: a request's or send's token; error, message
    kSent,      // token: a send's token; every byte was handed to QUIC (flow control admitted it)
    kIncoming,  // token: incoming id for respond/reject/finish; peer; buffer; expects_response
    kExpected,  // token: the expectation's (Endpoint::expect); request_id; peer. Its tensor is copied.
  };
  explicit Event(Type t) : type(t) {}
  Type type;
  uint64_t token = 0;
  uint64_t request_id = 0;
  ErrorKind error = ErrorKind::kNone;
  std::string message;
  std::shared_ptr<Buffer> buffer;
  PeerId peer{};
  bool expects_response = false;
};

// Receives events on the endpoint's I/O thread. Implementations must not block.
class EventSink {
 public:
  virtual ~EventSink() = default;
  virtual void on_event(Event&& event) = 0;
  // Called with the keep-alive of a frame that no longer needs to stay in memory.
  virtual void release(std::shared_ptr<void> keepalive) = 0;
  // Called after each round of engine work, with the engine unlocked: a sink that wakes a consumer
  // should do it here, so the consumer's reply finds the engine free and runs on its own thread.
  virtual void flush() {}
};

struct PeerStats {
  bool connected = false;       // handshake completed and the connection is alive
  double srtt_s = 0.0;          // smoothed RTT
  double min_rtt_s = 0.0;
  uint64_t bytes_sent = 0;      // frame bytes (stream payload)
  uint64_t bytes_received = 0;
  uint64_t messages_sent = 0;   // requests, responses and one-way messages
  uint64_t messages_received = 0;
  uint64_t packets_lost = 0;    // QUIC packets carrying our stream data declared lost
  uint64_t frames_dropped = 0;  // incoming frames refused (malformed, too large, out of memory)
  uint64_t open_streams = 0;
  uint64_t cwnd = 0;
  uint64_t bytes_in_flight = 0;
  uint64_t connections = 0;     // live connections with this peer (normally 1)
  // Seconds since any packet (even a bare acknowledgement) came from the peer: its I/O thread answers
  // however busy its application is, so a long silence means the process is gone or frozen.
  double silent_s = 0.0;
};

struct EndpointStats {
  uint64_t connections = 0;
  uint64_t datagrams_received = 0;
  uint64_t datagrams_sent = 0;
  uint64_t sendmsg_calls = 0;
  uint64_t socket_drops = 0;        // datagrams the kernel dropped for a full receive buffer (SO_RXQ_OVFL)
  uint64_t datagrams_discarded = 0; // undecodable datagrams, or for no known connection
  uint64_t handshakes_failed = 0;
  bool gso = false;
  bool gro = false;
};

}  // namespace im::quic
