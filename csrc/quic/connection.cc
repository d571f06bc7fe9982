#include "quic/connection.h"

#include <gnutls/crypto.h>
#include <ngtcp2/ngtcp2_crypto.h>

#include <algorithm>
#include <cstring>

#include "quic/compat.h"

namespace im::quic {
namespace {

constexpr uint64_t kNs = 1000000000ull;
constexpr size_t kSafeUdpPayload = 1452;
constexpr size_t kPacingMinBurst = 16;                 // packets in one write pass
constexpr uint64_t kPacingMinRtt = 1000000;            // 1 ms
constexpr uint64_t kMaxUnpacedBytes = uint64_t{64} << 10;
// How long the reset of an unanswered stream waits for another packet to ride on (close_unanswered):
// ngtcp2's default max_ack_delay, so a peer stepping a session every few ms always gets it that way.
constexpr uint64_t kUnansweredResetDelay = 25000000;  // 25 ms

uint64_t seconds_to_ns(double s) { return static_cast<uint64_t>(s * 1e9); }

ngtcp2_path path_of(const Address& local, const Address& remote) {
  ngtcp2_path p{};
  p.local.addr = const_cast<sockaddr*>(local.sa());
  p.local.addrlen = local.len;
  p.remote.addr = const_cast<sockaddr*>(remote.sa());
  p.remote.addrlen = remote.len;
  return p;
}

void random_cid(ngtcp2_cid* cid) {
  uint8_t data[kCidLen];
  gnutls_rnd(GNUTLS_RND_RANDOM, data, sizeof data);
  ngtcp2_cid_init(cid, data, sizeof data);
}

ErrorKind error_of_app_code(uint64_t code) {
  switch (code) {
    case kAppInvalidFrame:
      return ErrorKind::kInvalidFrame;
    case kAppFrameTooLarge:
      return ErrorKind::kFrameTooLarge;
    case kAppResourceExhausted:
      return ErrorKind::kResourceExhausted;
    case kAppShutdown:
      return ErrorKind::kConnectionLost;
    default:
      return ErrorKind::kRemoteError;
  }
}

const char* app_code_text(uint64_t code) {
  switch (code) {
    case kAppHandlerFailed:
      return "the peer's handler failed or returned no response";
    case kAppInvalidFrame:
      return "the peer rejected the frame as malformed";
    case kAppFrameTooLarge:
      return "the frame exceeds the peer's max frame size";
    case kAppResourceExhausted:
      return "the peer is out of receive buffer memory";
    case kAppCancelled:
      return "the peer cancelled the stream";
    case kAppShutdown:
      return "the peer is shutting down";
    default:
      return "the peer reset the stream";
  }
}

}  // namespace

struct Connection::Stream {
  enum class Kind : uint8_t { kRequestOut, kOneWayOut, kRequestIn, kOneWayIn };
  int64_t id = -1;
  Kind kind = Kind::kRequestIn;
  uint64_t token = 0;     // caller token (outgoing kinds)
  bool reported = false;  // the caller has been told the outcome (or stopped caring)

  // Outgoing bytes: the frame's segments and how far into them ngtcp2 has taken data.
  OutFrame out;
  bool has_out = false;
  uint64_t sent = 0;
  bool fin_written = false;
  bool queued = false;

  // Incoming frame: the header is gathered first, then the pooled buffer sized by its frame_len.
  uint8_t header[kFrameHeaderSize] = {};
  size_t header_got = 0;
  std::shared_ptr<Buffer> in;
  uint64_t in_len = 0;
  uint64_t in_got = 0;
  uint64_t counted = 0;   // bytes counted against the pending limit (incoming kinds)
  bool in_done = false;   // complete frame delivered, or rejected
  bool delivered = false; // handed to the caller; counted bytes are now theirs to finish

  bool outgoing() const { return kind == Kind::kRequestOut || kind == Kind::kOneWayOut; }
};

// --- construction ---------------------------------------------------------------------------------

Connection::Connection(ConnectionHost& host, uint64_t serial, const Address& local, const Address& remote)
    : host_(host), config_(host.config()), serial_(serial), local_(local), remote_(remote) {
  tls_.conn_ref.get_conn = &Connection::get_conn;
  tls_.conn_ref.user_data = this;
}

Connection::~Connection() {
  if (conn_ != nullptr) {
    std::vector<ngtcp2_cid> scids(compat::num_scid(conn_));
    ngtcp2_conn_get_scid(conn_, scids.data());
    for (const auto& cid : scids) host_.remove_cid(cid);
    ngtcp2_conn_del(conn_);
  }
  if (session_ != nullptr) gnutls_deinit(session_);
}

ngtcp2_conn* Connection::get_conn(ngtcp2_crypto_conn_ref* ref) {
  return static_cast<Connection*>(ref->user_data)->conn_;
}

ngtcp2_callbacks Connection::callbacks(bool server) {
  ngtcp2_callbacks cb{};
  if (server) {
    cb.recv_client_initial = ngtcp2_crypto_recv_client_initial_cb;
  } else {
    cb.client_initial = ngtcp2_crypto_client_initial_cb;
    cb.recv_retry = ngtcp2_crypto_recv_retry_cb;
  }
  cb.recv_crypto_data = ngtcp2_crypto_recv_crypto_data_cb;
  cb.encrypt = ngtcp2_crypto_encrypt_cb;
  cb.decrypt = ngtcp2_crypto_decrypt_cb;
  cb.hp_mask = ngtcp2_crypto_hp_mask_cb;
  cb.update_key = ngtcp2_crypto_update_key_cb;
  cb.delete_crypto_aead_ctx = ngtcp2_crypto_delete_crypto_aead_ctx_cb;
  cb.delete_crypto_cipher_ctx = ngtcp2_crypto_delete_crypto_cipher_ctx_cb;
  cb.get_path_challenge_data = ngtcp2_crypto_get_path_challenge_data_cb;
  cb.version_negotiation = ngtcp2_crypto_version_negotiation_cb;
  cb.handshake_completed = on_handshake_completed;
  cb.recv_stream_data = on_recv_stream_data;
  cb.stream_open = on_stream_open;
  cb.stream_close = on_stream_close;
  cb.stream_reset = on_stream_reset;
  cb.extend_max_local_streams_bidi = on_extend_max_streams;
  cb.extend_max_local_streams_uni = on_extend_max_streams;
  cb.extend_max_stream_data = on_extend_max_stream_data;
  cb.rand = on_rand;
  cb.get_new_connection_id = on_get_new_connection_id;
  cb.remove_connection_id = on_remove_connection_id;
  return cb;
}

ngtcp2_settings Connection::settings(uint64_t now) const {
  ngtcp2_settings s;
  ngtcp2_settings_default(&s);
  s.initial_ts = now;
  s.cc_algo = NGTCP2_CC_ALGO_CUBIC;
  s.max_window = config_.connection_window;
  s.max_stream_window = config_.stream_window;
  s.handshake_timeout = seconds_to_ns(config_.handshake_timeout_s);
  const size_t payload = remote_.is_loopback() && config_.loopback_udp_payload > config_.max_udp_payload
                             ? config_.loopback_udp_payload
                             : config_.max_udp_payload;
  s.max_tx_udp_payload_size = payload;
  // Above the Ethernet-safe default the path is vouched for (loopback; jumbo frames by the caller): send
  // that size from the start instead of shaping to 1200 bytes until path MTU discovery catches up.
  s.no_tx_udp_payload_size_shaping =
      static_cast<decltype(s.no_tx_udp_payload_size_shaping)>(payload > kSafeUdpPayload);
  return s;
}

ngtcp2_transport_params Connection::transport_params() const {
  ngtcp2_transport_params p;
  ngtcp2_transport_params_default(&p);
  p.initial_max_data = config_.connection_window;
  p.initial_max_stream_data_bidi_local = config_.stream_window;
  p.initial_max_stream_data_bidi_remote = config_.stream_window;
  p.initial_max_stream_data_uni = config_.stream_window;
  p.initial_max_streams_bidi = config_.max_streams;
  p.initial_max_streams_uni = config_.max_streams;
  p.max_idle_timeout = seconds_to_ns(config_.idle_timeout_s);
  p.max_udp_payload_size = UdpSocket::kMaxBatchBytes;
  return p;
}

void Connection::init_tls(const TlsIdentity& identity, bool server) {
  server_ = server;
  session_ = identity.new_session(server, &tls_);
  ngtcp2_conn_set_tls_native_handle(conn_, session_);
}

std::unique_ptr<Connection> Connection::connect(ConnectionHost& host, const TlsIdentity& identity, uint64_t serial,
                                                const Address& local, const Address& remote, const PeerId& expected,
                                                uint64_t now) {
  std::unique_ptr<Connection> c(new Connection(host, serial, local, remote));
  c->tls_.expect_peer = true;
  c->tls_.expected = expected;
  ngtcp2_cid dcid, scid;
  random_cid(&dcid);
  random_cid(&scid);
  const ngtcp2_path path = path_of(c->local_, c->remote_);
  const ngtcp2_callbacks cb = callbacks(false);
  const ngtcp2_settings s = c->settings(now);
  const ngtcp2_transport_params p = c->transport_params();
  int rv = ngtcp2_conn_client_new(&c->conn_, &dcid, &scid, &path, NGTCP2_PROTO_VER_V1, &cb, &s, &p, nullptr, c.get());
  if (rv != 0) throw TlsError(std::string("ngtcp2_conn_client_new: ") + ngtcp2_strerror(rv));
  host.add_cid(scid, c.get());
  c->init_tls(identity, false);
  c->last_rx_ = now;
  c->dirty = true;
  return c;
}

std::unique_ptr<Connection> Connection::accept(ConnectionHost& host, const TlsIdentity& identity, uint64_t serial,
                                               const Address& local, const Address& remote, const ngtcp2_pkt_hd& hd,
                                               uint64_t now) {
  std::unique_ptr<Connection> c(new Connection(host, serial, local, remote));
  ngtcp2_cid scid;
  random_cid(&scid);
  const ngtcp2_path path = path_of(c->local_, c->remote_);
  const ngtcp2_callbacks cb = callbacks(true);
  const ngtcp2_settings s = c->settings(now);
  ngtcp2_transport_params p = c->transport_params();
  compat::set_original_dcid(&p, hd.dcid);
  p.stateless_reset_token_present = 1;
  host.reset_token(p.stateless_reset_token, scid);
  int rv = ngtcp2_conn_server_new(&c->conn_, &hd.scid, &scid, &path, hd.version, &cb, &s, &p, nullptr, c.get());
  if (rv != 0) throw TlsError(std::string("ngtcp2_conn_server_new: ") + ngtcp2_strerror(rv));
  host.add_cid(scid, c.get());
  c->init_tls(identity, true);
  c->last_rx_ = now;
  return c;
}

// --- packets and timers ---------------------------------------------------------------------------

bool Connection::read(const Address& from, const uint8_t* pkt, size_t len, uint64_t now) {
  const ngtcp2_path path = path_of(local_, from);
  ngtcp2_pkt_info pi{};
  const int rv = ngtcp2_conn_read_pkt(conn_, &path, &pi, pkt, len, now);
  if (rv != 0) return fail_from_liberr(rv);
  last_rx_ = now;
  dirty = true;
  if (message_delivered_) {
    message_delivered_ = false;
    hold_until_ = now + kAckHoldNs;
  }
  return alive();
}

bool Connection::fail_from_liberr(int rv) {
  if (rv == NGTCP2_ERR_DRAINING || rv == NGTCP2_ERR_CLOSING) {
    const compat::CloseError e = compat::received_close_error(conn_);
    if (!established_) {
      std::string why = "the peer refused the handshake (";
      if (!compat::is_application_error(e) && (e.error_code & 0xff00u) == NGTCP2_CRYPTO_ERROR) {
        why += "TLS alert " + std::to_string(e.error_code & 0xffu);
        if ((e.error_code & 0xffu) == GNUTLS_A_NO_APPLICATION_PROTOCOL) why += ": no common ALPN";
      } else {
        why += "error " + std::to_string(e.error_code);
      }
      die(ErrorKind::kHandshakeFailed, why + ")");
    } else {
      die(ErrorKind::kConnectionLost, compat::is_application_error(e) && e.error_code == kAppShutdown
                                          ? "the peer closed the connection (shutting down)"
                                          : "the peer closed the connection");
    }
    return false;
  }
  if (rv == NGTCP2_ERR_CRYPTO || rv == NGTCP2_ERR_CALLBACK_FAILURE) {
    if (tls_.mismatch) {
      die(ErrorKind::kPeerIdMismatch, tls_.failure);
    } else {
      die(ErrorKind::kHandshakeFailed,
          "TLS handshake failed: " + (tls_.failure.empty() ? std::string(ngtcp2_strerror(rv)) : tls_.failure));
    }
  } else if (rv == NGTCP2_ERR_HANDSHAKE_TIMEOUT) {
    die(ErrorKind::kPeerUnreachable, "handshake timed out");
  } else if (rv == NGTCP2_ERR_IDLE_CLOSE || rv == NGTCP2_ERR_DROP_CONN) {
    // Both end the connection silently (RFC 9000 10.1): no CONNECTION_CLOSE goes out.
    die(ErrorKind::kConnectionLost, rv == NGTCP2_ERR_IDLE_CLOSE ? "idle timeout" : "connection dropped");
    silent_ = true;
    return false;
  } else {
    die(established_ ? ErrorKind::kConnectionLost : ErrorKind::kHandshakeFailed,
        std::string("QUIC error: ") + ngtcp2_strerror(rv));
  }
  close_liberr_ = rv;
  return false;
}

bool Connection::handle_timeout(uint64_t now) {
  if (watch_since_ != 0) {
    const uint64_t deadline = std::max(last_rx_, watch_since_) + seconds_to_ns(config_.dead_peer_timeout_s);
    if (now >= deadline) {
      die(established_ ? ErrorKind::kConnectionLost : ErrorKind::kPeerUnreachable,
          std::string(established_ ? "peer stopped responding" : "no answer from peer") + " (silent for " +
              std::to_string((now - std::max(last_rx_, watch_since_)) / 1000000) + " ms)");
      return false;
    }
  }
  if (ngtcp2_conn_get_expiry(conn_) <= now) {
    const int rv = ngtcp2_conn_handle_expiry(conn_, now);
    if (rv != 0) return fail_from_liberr(rv);
    dirty = true;
    timer_write_ = true;  // most often a delayed ACK: unanswered streams' resets go with it
  }
  if (unanswered_due_ != 0 && unanswered_due_ <= now) dirty = true;  // write() resets them
  return true;
}

Connection::Expiry Connection::expiry() const {
  const uint64_t t = ngtcp2_conn_get_expiry(conn_);
  const uint64_t own = own_deadline();
  if (hold_until_ == 0) return {std::min(t, own), std::min(t, own)};
  // While an ACK waits for the reply, ngtcp2's delayed-ACK deadline (srtt/8: microseconds on loopback)
  // would wake the I/O thread just to find the hold still on; the hold's own end is the earliest
  // deadline that matters. Its deadlines until kAckHoldSlackNs after the hold's end are most often that
  // delayed ACK (srtt/8 is ~0.6 ms between workers whose ACKs wait for their forwards), at worst a
  // loss timer that fires a little late: they are not firm.
  const uint64_t next = std::min(std::max(t, hold_until_), own);
  const uint64_t firm = std::min(t <= hold_until_ + kAckHoldSlackNs ? UINT64_MAX : t, own);
  return {next, firm};
}

uint64_t Connection::own_deadline() const {
  uint64_t t = unanswered_due_ != 0 ? unanswered_due_ : UINT64_MAX;
  if (watch_since_ != 0) {
    t = std::min(t, std::max(last_rx_, watch_since_) + seconds_to_ns(config_.dead_peer_timeout_s));
  }
  return t;
}

void Connection::die(ErrorKind kind, std::string message) {
  if (failure_.kind != ErrorKind::kNone) return;
  failure_.kind = kind;
  failure_.message = std::move(message);
}

void Connection::outstanding_changed(uint64_t now) {
  const bool busy = outstanding() > 0;
  if (busy && watch_since_ == 0) {
    watch_since_ = now;
    // Pings make a live but busy peer (a long prefill in its handler) answer with ACKs.
    ngtcp2_conn_set_keep_alive_timeout(conn_, seconds_to_ns(config_.dead_peer_timeout_s) / 4);
  } else if (!busy && watch_since_ != 0) {
    watch_since_ = 0;
    ngtcp2_conn_set_keep_alive_timeout(conn_, 0);
  }
}

// --- writing ----------------------------------------------------------------------------------------

bool Connection::holding(uint64_t now) {
  if (hold_until_ == 0) return false;
  if (now < hold_until_) return true;
  hold_until_ = 0;
  return false;
}

bool Connection::write(TxBatch& tx, uint64_t now) {
  dirty = false;
  hold_until_ = 0;
  if (!alive()) return false;
  // Resets of unanswered streams ride on a packet that goes anyway: a delayed ACK, our own data.
  // A write after a read alone may send nothing, and would send them by themselves.
  if (!unanswered_.empty() && (timer_write_ || now >= unanswered_due_ || !sendq_.empty() ||
                               !queued_bidi_.empty() || !queued_uni_.empty())) {
    reset_unanswered();
  }
  timer_write_ = false;
  open_queued();
  outstanding_changed(now);
  ngtcp2_pkt_info pi{};
  ngtcp2_path_storage ps;
  ngtcp2_path_storage_zero(&ps);
  std::vector<int64_t> blocked;
  size_t packets = 0;
  uint64_t pass_bytes = 0;
  ngtcp2_vec vecs[16];
  while (!tx.blocked()) {
    Stream* s = nullptr;
    while (!sendq_.empty() && s == nullptr) {
      s = stream(sendq_.front());
      if (s == nullptr || !s->has_out || s->fin_written) {
        if (s != nullptr) s->queued = false;
        sendq_.pop_front();
        s = nullptr;
      }
    }
    size_t nvec = 0;
    uint32_t flags = 0;
    if (s != nullptr) {
      // The segments from the current offset on, a bounded number per call.
      uint64_t skip = s->sent;
      for (const Segment& seg : s->out.segments) {
        if (nvec == std::size(vecs)) break;
        if (skip >= seg.len) {
          skip -= seg.len;
          continue;
        }
        vecs[nvec].base = const_cast<uint8_t*>(seg.data + skip);
        vecs[nvec].len = seg.len - skip;
        skip = 0;
        ++nvec;
      }
      flags = NGTCP2_WRITE_STREAM_FLAG_MORE;
      uint64_t remaining = 0;
      for (size_t i = 0; i < nvec; ++i) remaining += vecs[i].len;
      if (s->sent + remaining == s->out.size) flags |= NGTCP2_WRITE_STREAM_FLAG_FIN;
    }
    ngtcp2_ssize ndatalen = -1;
    const ngtcp2_ssize n = ngtcp2_conn_writev_stream(conn_, &ps.path, &pi, tx.space(), tx.max_packet(), &ndatalen,
                                                     flags, s ? s->id : -1, vecs, nvec, now);
    if (s != nullptr && ndatalen >= 0) {
      s->sent += static_cast<uint64_t>(ndatalen);
      counters_.bytes_sent += static_cast<uint64_t>(ndatalen);
      if (s->sent == s->out.size && (flags & NGTCP2_WRITE_STREAM_FLAG_FIN)) {
        s->fin_written = true;
        ++counters_.messages_sent;
        if (s->kind == Stream::Kind::kOneWayOut && !s->reported) {
          s->reported = true;
          token_streams_.erase(s->token);
          Event e{Event::Type::kSent};
          e.token = s->token;
          host_.emit(std::move(e));
        }
      }
    }
    if (n < 0) {
      if (n == NGTCP2_ERR_WRITE_MORE) continue;
      if (n == NGTCP2_ERR_STREAM_DATA_BLOCKED || n == NGTCP2_ERR_STREAM_SHUT_WR ||
          n == NGTCP2_ERR_STREAM_NOT_FOUND) {
        // Out of this stream's credit (or it was reset): let the others go first.
        if (s != nullptr) {
          sendq_.pop_front();
          if (n == NGTCP2_ERR_STREAM_DATA_BLOCKED) {
            blocked.push_back(s->id);
          } else {
            s->queued = false;
          }
        }
        continue;
      }
      return fail_from_liberr(static_cast<int>(n));
    }
    if (n == 0) break;  // congestion window, flow control or nothing left
    tx.add(remote_, static_cast<size_t>(n));
    ++packets;
    pass_bytes += static_cast<uint64_t>(n);
  }
  for (int64_t id : blocked) sendq_.push_back(id);
  if (tx.blocked()) dirty = true;  // the socket buffer is full: resume when it drains (EPOLLOUT)
  // Pacing spreads bursts; it must not hold back a lone request or response. Charging the pacer for
  // a small pass would arm a timer a few microseconds out and cost a wake-up per message (measured:
  // loopback 8 KiB RTT 30 -> 72 us), so small passes are charged in arrears, once their bytes add up.
  // Never charging them is not an option: ngtcp2 bills everything unpaced at the next charge, and a
  // backlog of megabytes stalls the connection for seconds.
  unpaced_bytes_ += pass_bytes;
  if (packets > kPacingMinBurst || unpaced_bytes_ > kMaxUnpacedBytes) {
    ngtcp2_conn_update_pkt_tx_time(conn_, now);
    unpaced_bytes_ = 0;
    // On a sub-millisecond path the slot holds nothing back (measured: bulk -20%, 64 KiB RTT +25% from
    // the wake-ups alone).
    if (compat::rtt_info(conn_).smoothed_rtt < kPacingMinRtt) {
      const int rv = compat::drop_imminent_pacing_slot(conn_, now);
      if (rv != 0) return fail_from_liberr(rv);
    }
  }
  return true;
}

void Connection::close(TxBatch& tx, uint64_t app_error, uint64_t now) {
  // Best effort: with the socket buffer full the peer learns it from its idle or dead-peer timer.
  if (conn_ != nullptr && !silent_ && !tx.blocked() && !compat::closing_or_draining(conn_)) {
    compat::CloseError e;
    compat::close_error_default(&e);
    if (close_liberr_ == NGTCP2_ERR_CRYPTO) {
      compat::close_error_set_tls_alert(&e, ngtcp2_conn_get_tls_alert(conn_));
    } else if (close_liberr_ != 0) {
      compat::close_error_set_liberr(&e, close_liberr_);
    } else {
      compat::close_error_set_application(&e, app_error);
    }
    ngtcp2_path_storage ps;
    ngtcp2_path_storage_zero(&ps);
    ngtcp2_pkt_info pi{};
    const ngtcp2_ssize n =
        ngtcp2_conn_write_connection_close(conn_, &ps.path, &pi, tx.space(), tx.max_packet(), &e, now);
    if (n > 0) {
      tx.add(remote_, static_cast<size_t>(n));
      tx.flush();
    }
  }
  die(ErrorKind::kConnectionLost, "connection closed");
}

// --- operations from the caller --------------------------------------------------------------------

void Connection::request(uint64_t token, OutFrame frame) {
  hold_until_ = 0;
  queued_bidi_.push_back(Queued{token, std::move(frame)});
  dirty = true;
}

void Connection::send(uint64_t token, OutFrame frame) {
  hold_until_ = 0;
  queued_uni_.push_back(Queued{token, std::move(frame)});
  dirty = true;
}

void Connection::open_queued() {
  if (!established_) return;
  while (!queued_bidi_.empty() && open_out(true, queued_bidi_.front())) queued_bidi_.pop_front();
  while (!queued_uni_.empty() && open_out(false, queued_uni_.front())) queued_uni_.pop_front();
}

bool Connection::open_out(bool request, Queued& q) {
  auto s = std::make_unique<Stream>();
  const bool bidi = request || !compat::kRemoteUniStreamsClose;
  const int rv = bidi ? ngtcp2_conn_open_bidi_stream(conn_, &s->id, s.get())
                      : ngtcp2_conn_open_uni_stream(conn_, &s->id, s.get());
  if (rv == NGTCP2_ERR_STREAM_ID_BLOCKED) return false;  // retried when the peer grants more streams
  if (rv != 0) {
    Event e{Event::Type::kFailed};
    e.token = q.token;
    e.error = ErrorKind::kConnectionLost;
    e.message = std::string("cannot open a stream: ") + ngtcp2_strerror(rv);
    host_.emit(std::move(e));
    host_.release(std::move(q.frame.keepalive));
    return true;
  }
  s->kind = request ? Stream::Kind::kRequestOut : Stream::Kind::kOneWayOut;
  s->token = q.token;
  s->out = std::move(q.frame);
  s->has_out = true;
  Stream* raw = s.get();
  streams_.emplace(s->id, std::move(s));
  token_streams_[q.token] = raw->id;
  ++out_streams_;
  queue_for_send(raw);
  return true;
}

void Connection::queue_for_send(Stream* s) {
  if (!s->queued) {
    s->queued = true;
    sendq_.push_back(s->id);
  }
  dirty = true;
}

void Connection::respond(int64_t stream_id, OutFrame frame) {
  Stream* s = stream(stream_id);
  if (s == nullptr || s->kind != Stream::Kind::kRequestIn || s->has_out) {
    host_.release(std::move(frame.keepalive));  // the requester went away (reset, or connection lost)
    return;
  }
  s->out = std::move(frame);
  s->has_out = true;
  hold_until_ = 0;
  queue_for_send(s);
}

void Connection::reject(int64_t stream_id, uint64_t app_error) {
  hold_until_ = 0;
  Stream* s = stream(stream_id);
  if (s == nullptr) return;
  compat::shutdown_stream(conn_, stream_id, app_error);
  dirty = true;
}

void Connection::cancel(uint64_t token) {
  for (auto* q : {&queued_bidi_, &queued_uni_}) {
    for (auto it = q->begin(); it != q->end(); ++it) {
      if (it->token == token) {
        host_.release(std::move(it->frame.keepalive));
        q->erase(it);
        return;
      }
    }
  }
  auto it = token_streams_.find(token);
  if (it == token_streams_.end()) return;
  if (Stream* s = stream(it->second)) {
    s->reported = true;
    compat::shutdown_stream(conn_, s->id, kAppCancelled);
  }
  token_streams_.erase(it);
  dirty = true;
}

void Connection::close_unanswered(int64_t stream_id, uint64_t now) {
  if (!ngtcp2_is_bidi_stream(stream_id) || stream(stream_id) == nullptr) return;
  unanswered_.push_back(stream_id);
  if (unanswered_due_ == 0) unanswered_due_ = now + kUnansweredResetDelay;
}

void Connection::reset_unanswered() {
  for (const int64_t id : unanswered_) {
    if (stream(id) != nullptr) compat::shutdown_stream(conn_, id, kAppHandlerFailed);
  }
  unanswered_.clear();
  unanswered_due_ = 0;
}

void Connection::finish_incoming(uint64_t nbytes) {
  unfinished_bytes_ -= std::min(unfinished_bytes_, nbytes);
  const uint64_t room =
      config_.max_pending_bytes > unfinished_bytes_ ? config_.max_pending_bytes - unfinished_bytes_ : 0;
  const uint64_t give = std::min(withheld_credit_, room);
  if (give > 0) {
    withheld_credit_ -= give;
    ngtcp2_conn_extend_max_offset(conn_, give);
    dirty = true;
  }
}

void Connection::fail_outstanding(ErrorKind kind, const std::string& message) {
  for (auto* q : {&queued_bidi_, &queued_uni_}) {
    for (Queued& item : *q) {
      Event e{Event::Type::kFailed};
      e.token = item.token;
      e.error = kind;
      e.message = message;
      host_.emit(std::move(e));
      host_.release(std::move(item.frame.keepalive));
    }
    q->clear();
  }
  for (auto& [id, s] : streams_) {
    if (s->outgoing() && !s->reported) report_failure(s.get(), kind, message);
    if (s->has_out) host_.release(std::move(s->out.keepalive));
    s->has_out = false;
  }
  streams_.clear();
  token_streams_.clear();
  sendq_.clear();
  out_streams_ = 0;
}

void Connection::report_failure(Stream* s, ErrorKind kind, std::string message) {
  s->reported = true;
  token_streams_.erase(s->token);
  Event e{Event::Type::kFailed};
  e.token = s->token;
  e.error = kind;
  e.message = std::move(message);
  host_.emit(std::move(e));
}

// --- receiving ---------------------------------------------------------------------------------------

Connection::Stream* Connection::stream(int64_t id) {
  auto it = streams_.find(id);
  return it == streams_.end() ? nullptr : it->second.get();
}

void Connection::erase_stream(int64_t id) {
  auto it = streams_.find(id);
  if (it == streams_.end()) return;
  Stream* s = it->second.get();
  if (s->has_out) host_.release(std::move(s->out.keepalive));
  if (s->outgoing()) --out_streams_;
  // Bytes of a frame that never reached the caller are finished here; delivered ones by the caller.
  if (!s->delivered && s->counted > 0) finish_incoming(s->counted);
  counters_.packets_lost += ngtcp2_conn_get_stream_loss_count(conn_, id);
  streams_.erase(it);
}

void Connection::credit(Stream* s, uint64_t n) {
  ngtcp2_conn_extend_max_stream_offset(conn_, s->id, n);
  if (s->outgoing()) {
    ngtcp2_conn_extend_max_offset(conn_, n);  // a response we asked for: never held back
    return;
  }
  s->counted += n;
  unfinished_bytes_ += n;
  if (unfinished_bytes_ <= config_.max_pending_bytes) {
    ngtcp2_conn_extend_max_offset(conn_, n);
  } else {
    withheld_credit_ += n;
  }
}

void Connection::reject_incoming(Stream* s, uint64_t app_error, ErrorKind kind, const std::string& why) {
  ++counters_.frames_dropped;
  s->in_done = true;
  s->in.reset();
  if (s->kind == Stream::Kind::kRequestOut) {
    if (!s->reported) report_failure(s, kind, "invalid response: " + why);
  }
  compat::shutdown_stream(conn_, s->id, app_error);
  dirty = true;
}

int Connection::on_recv_stream_data(ngtcp2_conn*, uint32_t flags, int64_t id, uint64_t, const uint8_t* data,
                                    size_t len, void* user, void* stream_user) {
  auto* self = static_cast<Connection*>(user);
  auto* s = static_cast<Stream*>(stream_user);
  if (s == nullptr) s = self->stream(id);
  if (s == nullptr) return 0;
  self->credit(s, len);
  self->counters_.bytes_received += len;
  if (s->in_done) return 0;  // rejected earlier: discard what is still in flight
  const bool fin = (flags & NGTCP2_STREAM_DATA_FLAG_FIN) != 0;
  if (s->header_got < kFrameHeaderSize) {
    const size_t take = std::min(len, kFrameHeaderSize - s->header_got);
    std::memcpy(s->header + s->header_got, data, take);
    s->header_got += take;
    data += take;
    len -= take;
    if (s->header_got < kFrameHeaderSize) {
      if (fin) self->reject_incoming(s, kAppInvalidFrame, ErrorKind::kInvalidFrame, "stream ended inside a frame header");
      return 0;
    }
    FrameLimits limits;
    limits.max_frame_size = self->config_.max_frame_size;
    try {
      s->in_len = parse_header(s->header, kFrameHeaderSize, limits).frame_len;
    } catch (const FrameError& err) {
      const bool too_large = err.code() == FrameErrc::kOversized;
      self->reject_incoming(s, too_large ? kAppFrameTooLarge : kAppInvalidFrame,
                            too_large ? ErrorKind::kFrameTooLarge : ErrorKind::kInvalidFrame, err.what());
      return 0;
    }
    try {
      s->in = self->host_.pool().acquire(s->in_len);
    } catch (const PoolExhausted&) {
      self->reject_incoming(s, kAppResourceExhausted, ErrorKind::kResourceExhausted, "receive buffer pool exhausted");
      return 0;
    }
    std::memcpy(s->in->data(), s->header, kFrameHeaderSize);
    s->in_got = kFrameHeaderSize;
  }
  const size_t take = static_cast<size_t>(std::min<uint64_t>(len, s->in_len - s->in_got));
  std::memcpy(s->in->data() + s->in_got, data, take);
  s->in_got += take;
  len -= take;
  data += take;
  if (len > 0) {
    self->reject_incoming(s, kAppInvalidFrame, ErrorKind::kInvalidFrame, "bytes after the end of the frame");
    return 0;
  }
  if (fin) {
    if (s->in_got != s->in_len) {
      self->reject_incoming(s, kAppInvalidFrame, ErrorKind::kInvalidFrame, "stream ended inside a frame");
    } else {
      self->on_frame_complete(s);
    }
  }
  return 0;
}

void Connection::on_frame_complete(Stream* s) {
  s->in_done = true;
  if (s->kind != Stream::Kind::kOneWayIn) message_delivered_ = true;
  ++counters_.messages_received;
  if (s->kind == Stream::Kind::kRequestOut) {
    if (!s->reported) {
      s->reported = true;
      token_streams_.erase(s->token);
      Event e{Event::Type::kResponse};
      e.token = s->token;
      e.buffer = std::move(s->in);
      e.peer = peer();
      host_.emit(std::move(e));
    }
    s->in.reset();
    return;
  }
  Event e{Event::Type::kIncoming};
  e.expects_response = s->kind == Stream::Kind::kRequestIn;
  e.token = host_.register_incoming(this, s->id, s->counted);
  e.buffer = std::move(s->in);
  e.peer = peer();
  s->delivered = true;
  host_.emit(std::move(e));
}

int Connection::on_stream_open(ngtcp2_conn*, int64_t id, void* user) {
  auto* self = static_cast<Connection*>(user);
  auto s = std::make_unique<Stream>();
  s->id = id;
  s->kind = ngtcp2_is_bidi_stream(id) ? Stream::Kind::kRequestIn : Stream::Kind::kOneWayIn;
  ngtcp2_conn_set_stream_user_data(self->conn_, id, s.get());
  self->streams_.emplace(id, std::move(s));
  return 0;
}

int Connection::on_stream_reset(ngtcp2_conn*, int64_t id, uint64_t, uint64_t app_error, void* user, void*) {
  auto* self = static_cast<Connection*>(user);
  Stream* s = self->stream(id);
  if (s == nullptr) return 0;
  if (s->kind == Stream::Kind::kRequestOut && !s->reported) {
    self->report_failure(s, error_of_app_code(app_error), app_code_text(app_error));
  }
  s->in_done = true;
  s->in.reset();
  return 0;
}

int Connection::on_stream_close(ngtcp2_conn*, uint32_t flags, int64_t id, uint64_t app_error, void* user, void*) {
  auto* self = static_cast<Connection*>(user);
  if (Stream* s = self->stream(id); s != nullptr) {
    if (s->outgoing() && !s->reported) {
      if (flags & NGTCP2_STREAM_CLOSE_FLAG_APP_ERROR_CODE_SET) {
        self->report_failure(s, error_of_app_code(app_error), app_code_text(app_error));
      } else {
        self->report_failure(s, ErrorKind::kRemoteError, "the peer closed the stream without a response");
      }
    }
    self->erase_stream(id);
  }
  // Credit for a peer's stream is owed whether or not we still track it: a one-way message's stream
  // is forgotten as soon as its frame is handed up, long before ngtcp2 closes it.
  const bool remote = !ngtcp2_conn_is_local_stream(self->conn_, id);
  const bool bidi = ngtcp2_is_bidi_stream(id);
  if (remote) {
    // Return stream credit in batches: ngtcp2 sends MAX_STREAMS as soon as any is owed, which would
    // cost a packet (and a wake-up of the peer) per request.
    uint64_t& owed = bidi ? self->owed_bidi_streams_ : self->owed_uni_streams_;
    if (++owed >= std::max<uint64_t>(1, self->config_.max_streams / 8)) {
      if (bidi) {
        ngtcp2_conn_extend_max_streams_bidi(self->conn_, owed);
      } else {
        ngtcp2_conn_extend_max_streams_uni(self->conn_, owed);
      }
      owed = 0;
    }
  }
  self->dirty = true;
  return 0;
}

int Connection::on_handshake_completed(ngtcp2_conn*, void* user) {
  auto* self = static_cast<Connection*>(user);
  if (!self->tls_.verified) return NGTCP2_ERR_CALLBACK_FAILURE;  // GnuTLS accepted no certificate: refuse
  self->established_ = true;
  self->dirty = true;
  self->host_.handshake_completed(self);
  return 0;
}

int Connection::on_extend_max_streams(ngtcp2_conn*, uint64_t, void* user) {
  static_cast<Connection*>(user)->dirty = true;
  return 0;
}

int Connection::on_extend_max_stream_data(ngtcp2_conn*, int64_t id, uint64_t, void* user, void*) {
  auto* self = static_cast<Connection*>(user);
  if (Stream* s = self->stream(id); s != nullptr && s->has_out && !s->fin_written) self->queue_for_send(s);
  return 0;
}

void Connection::on_rand(uint8_t* dest, size_t len, const ngtcp2_rand_ctx*) {
  gnutls_rnd(GNUTLS_RND_NONCE, dest, len);
}

int Connection::on_get_new_connection_id(ngtcp2_conn*, ngtcp2_cid* cid, uint8_t* token, size_t cidlen, void* user) {
  auto* self = static_cast<Connection*>(user);
  uint8_t data[NGTCP2_MAX_CIDLEN];
  if (gnutls_rnd(GNUTLS_RND_RANDOM, data, cidlen) != 0) return NGTCP2_ERR_CALLBACK_FAILURE;
  ngtcp2_cid_init(cid, data, cidlen);
  self->host_.reset_token(token, *cid);
  self->host_.add_cid(*cid, self);
  return 0;
}

int Connection::on_remove_connection_id(ngtcp2_conn*, const ngtcp2_cid* cid, void* user) {
  static_cast<Connection*>(user)->host_.remove_cid(*cid);
  return 0;
}

// --- statistics ---------------------------------------------------------------------------------------

PeerStats Connection::stats(uint64_t now) const {
  PeerStats st = counters_;
  st.silent_s = now > last_rx_ ? static_cast<double>(now - last_rx_) / kNs : 0.0;
  const compat::RttInfo rtt = compat::rtt_info(conn_);
  st.connected = established_ && alive();
  st.srtt_s = static_cast<double>(rtt.smoothed_rtt) / kNs;
  st.min_rtt_s = static_cast<double>(rtt.min_rtt) / kNs;
  st.cwnd = rtt.cwnd;
  st.bytes_in_flight = rtt.bytes_in_flight;
  st.open_streams = streams_.size();
  st.connections = 1;
  return st;
}

}  // namespace im::quic
