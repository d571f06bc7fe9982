// One QUIC connection with one peer: the ngtcp2 state machine, its TLS session, the streams that carry
// frames (a bidirectional stream per request and its response, a unidirectional stream per one-way
// message), reassembly of incoming frames into pooled buffers, flow-control credit, and dead-peer
// detection. Runs only on the endpoint's I/O thread; the endpoint routes packets and commands to it.
#pragma once

#include <ngtcp2/ngtcp2.h>

#include <cstdint>
#include <deque>
#include <memory>
#include <string>
#include <unordered_map>

#include "quic/identity.h"
#include "quic/tx_batch.h"
#include "quic/types.h"
#include "quic/udp_socket.h"

namespace im::quic {

inline constexpr size_t kCidLen = 16;

class Connection;

// What a connection needs from its endpoint.
class ConnectionHost {
 public:
  virtual ~ConnectionHost() = default;
  virtual const Config& config() const = 0;
  virtual BufferPool& pool() = 0;
  virtual void add_cid(const ngtcp2_cid& cid, Connection* conn) = 0;
  virtual void remove_cid(const ngtcp2_cid& cid) = 0;
  virtual void reset_token(uint8_t* token, const ngtcp2_cid& cid) = 0;
  virtual void emit(Event&& event) = 0;
  virtual void release(std::shared_ptr<void> keepalive) = 0;
  // Registers a complete incoming frame awaiting respond/reject/finish; returns its incoming id.
  virtual uint64_t register_incoming(Connection* conn, int64_t stream_id, uint64_t nbytes) = 0;
  virtual void handshake_completed(Connection* conn) = 0;
};

class Connection {
 public:
  // The failure that ended a connection; `kind` is kNone while it is alive.
  struct Failure {
    ErrorKind kind = ErrorKind::kNone;
    std::string message;
  };

  static std::unique_ptr<Connection> connect(ConnectionHost& host, const TlsIdentity& identity, uint64_t serial,
                                             const Address& local, const Address& remote, const PeerId& expected,
                                             uint64_t now);
  static std::unique_ptr<Connection> accept(ConnectionHost& host, const TlsIdentity& identity, uint64_t serial,
                                            const Address& local, const Address& remote, const ngtcp2_pkt_hd& hd,
                                            uint64_t now);
  ~Connection();
  Connection(const Connection&) = delete;
  Connection& operator=(const Connection&) = delete;

  // Each returns false once the connection is dead (see failure()); the endpoint then destroys it.
  bool read(const Address& from, const uint8_t* pkt, size_t len, uint64_t now);
  bool handle_timeout(uint64_t now);
  bool write(TxBatch& tx, uint64_t now);
  // True while writing should wait for the application's reply to carry the pending ACK (see kAckHoldNs).
  bool holding(uint64_t now);

  void request(uint64_t token, OutFrame frame);
  void send(uint64_t token, OutFrame frame);
  void respond(int64_t stream_id, OutFrame frame);
  void reject(int64_t stream_id, uint64_t app_error);
  void cancel(uint64_t token);
  // The handler of an incoming frame of `nbytes` finished: its bytes stop counting against the
  // pending limit and withheld flow-control credit is returned.
  void finish_incoming(uint64_t nbytes);
  // A peer-opened bidirectional stream whose frame was handled without an answer: a one-way message
  // (before ngtcp2 0.14 they travel on bidirectional streams, see compat.h), or a request the handler
  // had nothing for (its requester sees kRemoteError). Its send side is reset with the next packet to
  // the peer, or on its own after kUnansweredResetDelay: reset at once, the RESET_STREAM and the
  // peer's ACK of it cost two packets and two wake-ups per message, when a chain's next hop starts.
  void close_unanswered(int64_t stream_id, uint64_t now);

  // Sends CONNECTION_CLOSE with `app_error` (best effort) and marks the connection dead.
  void close(TxBatch& tx, uint64_t app_error, uint64_t now);
  // Reports every operation still outstanding as failed and drops the frames it holds.
  void fail_outstanding(ErrorKind kind, const std::string& message);

  struct Expiry {
    uint64_t next;  // the next deadline (ngtcp2 timers, dead-peer check), CLOCK_MONOTONIC ns
    // `next` but for the end of a held ACK (kAckHoldNs) and ngtcp2's deadlines until kAckHoldSlackNs
    // after it, which may pass by up to that much (Endpoint::arm_timer).
    uint64_t firm;
  };
  Expiry expiry() const;
  // After a request reaches the application (or a response reaches the requester), the ACK for it waits
  // this long for the reply (or the next request) to carry it. Sent on its own it costs the peer a
  // wake-up, and ngtcp2 answers the resulting gap in ack-eliciting packet numbers with another immediate
  // ACK, so every message would drag two extra packets along.
  static constexpr uint64_t kAckHoldNs = 500'000;  // 0.5 ms
  // How late a held ACK may go, on a timer armed ahead for it (Endpoint::await_expected): well within
  // ngtcp2's default max_ack_delay (25 ms), which peers' loss detection allows for, and short enough
  // that with the default busy-poll windows most ACKs still go while the receiver computes, not when
  // it sends its output and the next hop starts (the sender's wake-up for it then takes a CPU).
  static constexpr uint64_t kAckHoldSlackNs = 4'000'000;
  PeerStats stats(uint64_t now) const;

  uint64_t serial() const noexcept { return serial_; }
  bool established() const noexcept { return established_; }
  bool alive() const noexcept { return failure_.kind == ErrorKind::kNone; }
  const Failure& failure() const noexcept { return failure_; }
  const PeerId& peer() const noexcept { return tls_.verified ? tls_.peer : tls_.expected; }
  bool dirty = false;  // has something to write; maintained by the endpoint
  // Has messages of its own to send (not only ACKs and flow control): written first (Endpoint::write_all).
  bool has_messages() const noexcept { return !sendq_.empty() || !queued_bidi_.empty() || !queued_uni_.empty(); }

 private:
  struct Stream;
  struct Queued {
    uint64_t token;
    OutFrame frame;
  };

  Connection(ConnectionHost& host, uint64_t serial, const Address& local, const Address& remote);
  void init_tls(const TlsIdentity& identity, bool server);
  static ngtcp2_callbacks callbacks(bool server);
  ngtcp2_settings settings(uint64_t now) const;
  ngtcp2_transport_params transport_params() const;

  void die(ErrorKind kind, std::string message);
  bool fail_from_liberr(int rv);
  void open_queued();
  bool open_out(bool bidi, Queued& q);
  Stream* stream(int64_t id);
  void erase_stream(int64_t id);
  void queue_for_send(Stream* s);
  void on_frame_complete(Stream* s);
  void reject_incoming(Stream* s, uint64_t app_error, ErrorKind kind, const std::string& why);
  void credit(Stream* s, uint64_t n);
  void report_failure(Stream* s, ErrorKind kind, std::string message);
  void outstanding_changed(uint64_t now);
  uint64_t own_deadline() const;  // the unanswered streams' resets and the dead-peer check
  void reset_unanswered();
  size_t outstanding() const noexcept { return queued_bidi_.size() + queued_uni_.size() + out_streams_; }

  // ngtcp2 callbacks.
  static int on_handshake_completed(ngtcp2_conn*, void* user);
  static int on_recv_stream_data(ngtcp2_conn*, uint32_t flags, int64_t id, uint64_t offset, const uint8_t* data,
                                 size_t len, void* user, void* stream_user);
  static int on_stream_open(ngtcp2_conn*, int64_t id, void* user);
  static int on_stream_close(ngtcp2_conn*, uint32_t flags, int64_t id, uint64_t app_error, void* user,
                             void* stream_user);
  static int on_stream_reset(ngtcp2_conn*, int64_t id, uint64_t final_size, uint64_t app_error, void* user,
                             void* stream_user);
  static int on_extend_max_streams(ngtcp2_conn*, uint64_t max_streams, void* user);
  static int on_extend_max_stream_data(ngtcp2_conn*, int64_t id, uint64_t max_data, void* user, void* stream_user);
  static void on_rand(uint8_t* dest, size_t len, const ngtcp2_rand_ctx* ctx);
  static int on_get_new_connection_id(ngtcp2_conn*, ngtcp2_cid* cid, uint8_t* token, size_t cidlen, void* user);
  static int on_remove_connection_id(ngtcp2_conn*, const ngtcp2_cid* cid, void* user);
  static ngtcp2_conn* get_conn(ngtcp2_crypto_conn_ref* ref);

  ConnectionHost& host_;
  const Config& config_;
  uint64_t serial_;
  Address local_;
  Address remote_;
  ngtcp2_conn* conn_ = nullptr;
  gnutls_session_t session_ = nullptr;
  TlsPeer tls_;
  bool server_ = false;
  bool established_ = false;
  Failure failure_;

  std::unordered_map<int64_t, std::unique_ptr<Stream>> streams_;
  std::unordered_map<uint64_t, int64_t> token_streams_;  // caller token -> our stream carrying it
  std::deque<Queued> queued_bidi_;                       // requests waiting for the handshake or stream credit
  std::deque<Queued> queued_uni_;                        // one-way sends, likewise
  std::deque<int64_t> sendq_;                            // streams with bytes not yet handed to ngtcp2
  size_t out_streams_ = 0;                               // streams we opened that are not closed yet

  std::vector<int64_t> unanswered_;  // streams to reset with the next packet (close_unanswered)
  uint64_t unanswered_due_ = 0;      // when they go on their own (0: none waiting)
  bool timer_write_ = false;         // the next write follows one of ngtcp2's timers

  uint64_t owed_bidi_streams_ = 0;  // closed peer-opened streams not yet returned as stream credit
  uint64_t owed_uni_streams_ = 0;
  uint64_t unfinished_bytes_ = 0;  // incoming frame bytes whose handler has not finished
  uint64_t withheld_credit_ = 0;   // connection credit not yet returned because of that

  int close_liberr_ = 0;           // local QUIC/TLS error to report in our CONNECTION_CLOSE
  bool silent_ = false;            // ended without a CONNECTION_CLOSE (idle timeout, dropped)

  uint64_t unpaced_bytes_ = 0;     // written but not yet charged to the pacer
  bool message_delivered_ = false;  // the packet being read completed a request or response
  uint64_t hold_until_ = 0;        // writes wait until then unless the application writes first
  uint64_t last_rx_ = 0;           // last packet from the peer
  uint64_t watch_since_ = 0;       // when operations became outstanding (0: none outstanding)

  PeerStats counters_;
};

}  // namespace im::quic
