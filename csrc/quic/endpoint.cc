#include "quic/endpoint.h"

#include <gnutls/crypto.h>
#include <ngtcp2/ngtcp2_crypto.h>
#include <poll.h>
#include <sched.h>
#include <sys/epoll.h>
#include <sys/eventfd.h>
#include <sys/timerfd.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <ctime>
#include <future>

namespace im::quic {
namespace {

uint64_t now_ns() {
  timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return static_cast<uint64_t>(ts.tv_sec) * 1000000000ull + static_cast<uint64_t>(ts.tv_nsec);
}

std::string cid_key(const ngtcp2_cid& cid) { return std::string(reinterpret_cast<const char*>(cid.data), cid.datalen); }

// Reads (and so clears) an eventfd or timerfd.
void drain_fd(int fd) {
  uint64_t value;
  while (::read(fd, &value, sizeof value) < 0 && errno == EINTR) {
  }
}

void check_config(const Config& c) {
  auto bad = [](const std::string& what) { throw std::invalid_argument("invalid transport config: " + what); };
  if (c.max_frame_size < kFrameHeaderSize) bad("max_frame_size is smaller than a frame header");
  if (c.max_pending_bytes < c.max_frame_size) bad("max_pending_bytes must be >= max_frame_size");
  if (c.connection_window < (64u << 10) || c.stream_window < (64u << 10)) bad("flow-control windows below 64 KiB");
  if (c.max_streams == 0 || c.max_connections == 0) bad("max_streams and max_connections must be positive");
  if (!(c.dead_peer_timeout_s > 0) || !(c.idle_timeout_s > 0) || !(c.handshake_timeout_s > 0)) {
    bad("timeouts must be positive");
  }
  if (c.max_udp_payload < 1200 || c.max_udp_payload > 65527 - 8) bad("max_udp_payload must be 1200..65519");
  if (c.loopback_udp_payload != 0 && (c.loopback_udp_payload < 1200 || c.loopback_udp_payload > 65527 - 8)) {
    bad("loopback_udp_payload must be 0 or 1200..65519");
  }
}

}  // namespace

Endpoint::Endpoint(const uint8_t* seed, size_t seed_len, const std::string& host, uint16_t port, Config config,
                   std::shared_ptr<EventSink> sink, std::shared_ptr<BufferPool> pool)
    : config_((check_config(config), std::move(config))),
      sink_(std::move(sink)),
      identity_(seed, seed_len, config_.alpn),
      socket_(host, port, config_.socket_buffer_bytes, config_.gso, config_.gro),
      tx_(socket_, std::max(config_.max_udp_payload, config_.loopback_udp_payload)),
      pool_(pool ? std::move(pool) : BufferPool::create(config_.pool_bytes)),
      rx_buf_(UdpSocket::kMaxBatchBytes) {
  gnutls_rnd(GNUTLS_RND_KEY, reset_secret_, sizeof reset_secret_);
  counters_.gso = socket_.gso();
  counters_.gro = socket_.gro();
  epoll_fd_ = epoll_create1(EPOLL_CLOEXEC);
  watch_fd_ = epoll_create1(EPOLL_CLOEXEC);
  command_fd_ = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
  timer_fd_ = timerfd_create(CLOCK_MONOTONIC, TFD_NONBLOCK | TFD_CLOEXEC);
  if (epoll_fd_ < 0 || watch_fd_ < 0 || command_fd_ < 0 || timer_fd_ < 0) {
    for (int fd : {epoll_fd_, watch_fd_, command_fd_, timer_fd_}) {
      if (fd >= 0) ::close(fd);
    }
    throw SocketError(std::string("creating epoll/eventfd/timerfd: ") + std::strerror(errno));
  }
  const auto watch = [](int set, int fd) {
    epoll_event ev{};
    ev.events = EPOLLIN;
    ev.data.fd = fd;
    epoll_ctl(set, EPOLL_CTL_ADD, fd, &ev);
  };
  for (int fd : {socket_.fd(), command_fd_, timer_fd_}) watch(epoll_fd_, fd);
  watch(watch_fd_, socket_.fd());
  thread_ = std::thread([this] { run(); });
}

Endpoint::~Endpoint() {
  close();
  ::close(epoll_fd_);
  ::close(watch_fd_);
  ::close(command_fd_);
  ::close(timer_fd_);
}

uint16_t Endpoint::port() const {
  const auto& s = socket_.local().storage;
  return ntohs(s.ss_family == AF_INET ? reinterpret_cast<const sockaddr_in*>(&s)->sin_port
                                      : reinterpret_cast<const sockaddr_in6*>(&s)->sin6_port);
}

// --- commands -----------------------------------------------------------------------------------------

// The endpoint whose engine lock this thread holds, if any: commands posted from inside engine work
// (an EventSink callback) are queued and picked up before that work ends.
static thread_local const Endpoint* t_engine = nullptr;

bool Endpoint::post(Command cmd) {
  {
    std::lock_guard<std::mutex> lock(mutex_);
    if (closed_) return false;
    commands_.push_back(std::move(cmd));
  }
  if (t_engine == this) return true;
  if (engine_.try_lock()) {
    t_engine = this;
    turn();
    t_engine = nullptr;
    engine_.unlock();
    sink_->flush();
  } else {
    wake_io_thread();  // it holds the engine now and will look at the queue again
  }
  return true;
}

void Endpoint::wake_io_thread() {
  const uint64_t one = 1;
  while (::write(command_fd_, &one, sizeof one) < 0 && errno == EINTR) {
  }
}

void Endpoint::run_commands() {
  std::vector<Command> batch;
  {
    std::lock_guard<std::mutex> lock(mutex_);
    batch.swap(commands_);
  }
  for (Command& cmd : batch) cmd();
}

// Commands capture frames through a shared holder so that a command destroyed without running (the
// endpoint closed first) leaves the frame with the caller's thread instead of the I/O thread.
bool Endpoint::request(uint64_t token, const PeerId& peer, std::optional<Address> address, OutFrame& frame,
                       double timeout_s) {
  auto holder = std::make_shared<OutFrame>(std::move(frame));
  const uint64_t deadline = timeout_s > 0 ? now_ns() + static_cast<uint64_t>(timeout_s * 1e9) : 0;
  const bool ok = post([this, token, peer, address, holder, deadline] {
    if (deadline != 0) {
      deadlines_.emplace(deadline, token);
      token_deadline_[token] = deadline;
    }
    submit(true, token, peer, address, std::move(*holder));
  });
  if (!ok) frame = std::move(*holder);
  return ok;
}

bool Endpoint::send(uint64_t token, const PeerId& peer, std::optional<Address> address, OutFrame& frame) {
  auto holder = std::make_shared<OutFrame>(std::move(frame));
  const bool ok = post([this, token, peer, address, holder] { submit(false, token, peer, address, std::move(*holder)); });
  if (!ok) frame = std::move(*holder);
  return ok;
}

bool Endpoint::respond(uint64_t incoming, OutFrame& frame) {
  auto holder = std::make_shared<OutFrame>(std::move(frame));
  const bool ok = post([this, incoming, holder] {
    auto it = incoming_.find(incoming);
    if (it == incoming_.end()) {
      release(std::move(holder->keepalive));
      return;
    }
    const Incoming in = it->second;
    incoming_.erase(it);
    Connection* c = find(in.serial);
    if (c == nullptr) {
      release(std::move(holder->keepalive));
      return;
    }
    c->respond(in.stream_id, std::move(*holder));
    c->finish_incoming(in.nbytes);
  });
  if (!ok) frame = std::move(*holder);
  return ok;
}

void Endpoint::reject(uint64_t incoming, uint64_t app_error) {
  post([this, incoming, app_error] {
    auto it = incoming_.find(incoming);
    if (it == incoming_.end()) return;
    const Incoming in = it->second;
    incoming_.erase(it);
    if (Connection* c = find(in.serial)) {
      c->reject(in.stream_id, app_error);
      c->finish_incoming(in.nbytes);
    }
  });
}

void Endpoint::finish(uint64_t incoming) {
  post([this, incoming] {
    auto it = incoming_.find(incoming);
    if (it == incoming_.end()) return;
    const Incoming in = it->second;
    incoming_.erase(it);
    if (Connection* c = find(in.serial)) {
      c->close_unanswered(in.stream_id, now_ns());
      c->finish_incoming(in.nbytes);
    }
  });
}

void Endpoint::cancel(uint64_t token) {
  post([this, token] { cancel_everywhere(token); });
}

void Endpoint::cancel_everywhere(uint64_t token) {
  // Tokens are not indexed by connection: a cancel is rare (a timeout), a scan is cheap.
  for (auto& [serial, c] : conns_) c->cancel(token);
  if (auto it = token_deadline_.find(token); it != token_deadline_.end()) {
    deadlines_.erase({it->second, token});
    token_deadline_.erase(it);
  }
}

void Endpoint::expire_requests(uint64_t now) {
  while (!deadlines_.empty() && deadlines_.begin()->first <= now) {
    const uint64_t token = deadlines_.begin()->second;
    cancel_everywhere(token);
    Event e{Event::Type::kFailed};
    e.token = token;
    e.error = ErrorKind::kTimeout;
    e.message = "no response within the request timeout";
    sink_->on_event(std::move(e));
  }
}

void Endpoint::emit(Event&& event) {
  if (event.type == Event::Type::kIncoming && !expected_.empty()) {
    uint64_t request_id = 0;
    bool claimed = false;
    if (const uint64_t token = expected_.take(*event.buffer, event.peer, &request_id, &claimed); token != 0) {
      finish(event.token);  // on the engine's thread: runs before this round of engine work ends
      if (claimed) return;  // the thread in await_expected learns of it: nothing to report
      ++events_emitted_;
      Event arrived{Event::Type::kExpected};
      arrived.token = token;
      arrived.request_id = request_id;
      arrived.peer = event.peer;
      sink_->on_event(std::move(arrived));
      return;
    }
  }
  ++events_emitted_;
  if (event.type != Event::Type::kIncoming && !token_deadline_.empty()) {
    if (auto it = token_deadline_.find(event.token); it != token_deadline_.end()) {
      deadlines_.erase({it->second, event.token});
      token_deadline_.erase(it);
    }
  }
  sink_->on_event(std::move(event));
}

std::optional<PeerStats> Endpoint::peer_stats(const PeerId& peer) {
  auto promise = std::make_shared<std::promise<std::optional<PeerStats>>>();
  auto result = promise->get_future();
  if (!post([this, peer, promise] {
        std::optional<PeerStats> out;
        const uint64_t now = now_ns();
        for (auto& [serial, c] : conns_) {
          if (!c->alive() || c->peer() != peer || !c->established()) continue;
          const PeerStats st = c->stats(now);
          if (!out) {
            out = st;
            continue;
          }
          // Several connections with one peer (both dialled at once): add up counters, keep the
          // preferred connection's RTT.
          if (peers_.count(peer) && peers_[peer] == serial) {
            out->srtt_s = st.srtt_s;
            out->min_rtt_s = st.min_rtt_s;
            out->cwnd = st.cwnd;
          }
          out->bytes_sent += st.bytes_sent;
          out->bytes_received += st.bytes_received;
          out->messages_sent += st.messages_sent;
          out->messages_received += st.messages_received;
          out->packets_lost += st.packets_lost;
          out->frames_dropped += st.frames_dropped;
          out->open_streams += st.open_streams;
          out->bytes_in_flight += st.bytes_in_flight;
          out->connections += 1;
          out->silent_s = std::min(out->silent_s, st.silent_s);
        }
        promise->set_value(out);
      })) {
    return std::nullopt;
  }
  return result.get();
}

EndpointStats Endpoint::stats() {
  auto promise = std::make_shared<std::promise<EndpointStats>>();
  auto result = promise->get_future();
  if (!post([this, promise] {
        EndpointStats st = counters_;
        st.connections = conns_.size();
        st.socket_drops = socket_.drops();
        st.sendmsg_calls = socket_.sendmsg_calls();
        st.datagrams_sent = tx_.datagrams_sent();
        st.gso = socket_.gso();
        promise->set_value(st);
      })) {
    EndpointStats st = counters_;
    st.gso = socket_.gso();
    return st;
  }
  return result.get();
}

void Endpoint::close() {
  {
    std::lock_guard<std::mutex> lock(mutex_);
    if (closed_ && !thread_.joinable()) return;
  }
  expected_.close();  // threads in await_expected return
  post([this] { stopping_ = true; });
  wake_io_thread();  // the stop may have run on this thread; the I/O thread must see it
  {
    std::lock_guard<std::mutex> lock(mutex_);
    closed_ = true;
  }
  if (thread_.joinable()) thread_.join();
}

// --- operations on the I/O thread ------------------------------------------------------------------

void Endpoint::fail(uint64_t token, ErrorKind kind, std::string message, OutFrame& frame) {
  Event e{Event::Type::kFailed};
  e.token = token;
  e.error = kind;
  e.message = std::move(message);
  emit(std::move(e));
  release(std::move(frame.keepalive));
}

void Endpoint::submit(bool request, uint64_t token, const PeerId& peer, std::optional<Address> address,
                      OutFrame frame) {
  if (stopping_) {
    fail(token, ErrorKind::kEndpointClosed, "the endpoint is closed", frame);
    return;
  }
  if (frame.size > config_.max_frame_size) {
    fail(token, ErrorKind::kFrameTooLarge,
         "frame of " + std::to_string(frame.size) + " bytes exceeds max_frame_size " +
             std::to_string(config_.max_frame_size),
         frame);
    return;
  }
  std::string why;
  Connection* c = connection_for(peer, address, &why);
  if (c == nullptr) {
    fail(token, why.rfind("connection limit", 0) == 0 ? ErrorKind::kResourceExhausted : ErrorKind::kPeerUnreachable,
         why, frame);
    return;
  }
  if (request) {
    c->request(token, std::move(frame));
  } else {
    c->send(token, std::move(frame));
  }
}

Connection* Endpoint::connection_for(const PeerId& peer, const std::optional<Address>& address, std::string* why) {
  if (auto it = peers_.find(peer); it != peers_.end()) {
    if (Connection* c = find(it->second); c != nullptr && c->alive()) return c;
  }
  std::optional<Address> target = address;
  if (!target) {
    if (auto it = addresses_.find(peer); it != addresses_.end()) target = it->second;
  }
  if (!target) {
    *why = "no connection to peer " + peer_id_hex(peer, 6) + " and no address given";
    return nullptr;
  }
  if (peer == peer_id()) {
    *why = "cannot connect to our own peer id";
    return nullptr;
  }
  if (conns_.size() >= config_.max_connections) {
    *why = "connection limit (" + std::to_string(config_.max_connections) + ") reached";
    return nullptr;
  }
  if (target->storage.ss_family == AF_INET6 && socket_.family() == AF_INET) {
    *why = "cannot reach IPv6 address " + target->to_string() + " from an IPv4-only endpoint";
    return nullptr;
  }
  const Address remote = to_socket_family(*target, socket_.family());
  const uint64_t serial = next_serial_++;
  auto conn = Connection::connect(*this, identity_, serial, socket_.local(), remote, peer, now_ns());
  Connection* raw = conn.get();
  conns_.emplace(serial, std::move(conn));
  peers_[peer] = serial;
  addresses_[peer] = *target;
  return raw;
}

Connection* Endpoint::find(uint64_t serial) {
  auto it = conns_.find(serial);
  return it == conns_.end() ? nullptr : it->second.get();
}

// --- ConnectionHost ----------------------------------------------------------------------------------

void Endpoint::add_cid(const ngtcp2_cid& cid, Connection* conn) { cids_[cid_key(cid)] = conn; }

void Endpoint::remove_cid(const ngtcp2_cid& cid) { cids_.erase(cid_key(cid)); }

void Endpoint::reset_token(uint8_t* token, const ngtcp2_cid& cid) {
  ngtcp2_crypto_generate_stateless_reset_token(token, reset_secret_, sizeof reset_secret_, &cid);
}

void Endpoint::release(std::shared_ptr<void> keepalive) {
  if (keepalive) sink_->release(std::move(keepalive));
}

uint64_t Endpoint::register_incoming(Connection* conn, int64_t stream_id, uint64_t nbytes) {
  const uint64_t id = next_incoming_++;
  incoming_.emplace(id, Incoming{conn->serial(), stream_id, nbytes});
  return id;
}

void Endpoint::handshake_completed(Connection* conn) {
  // The newest authenticated connection becomes the peer's preferred one (an inbound connection is
  // how we answer a peer behind NAT that dialled us).
  peers_[conn->peer()] = conn->serial();
}

// --- the I/O loop ------------------------------------------------------------------------------------

void Endpoint::run() {
  epoll_event events[8];
  constexpr int kWaitMs = kConsumerStallNs / 1000000;  // how often to check the consumer reads
  for (;;) {
    const int n = epoll_wait(epoll_fd_, events, 8, kWaitMs);
    std::unique_lock<std::mutex> engine(engine_);
    t_engine = this;
    const uint64_t now = now_ns();
    read_for_stalled_consumer(now);
    for (int i = 0; i < n; ++i) {
      const int fd = events[i].data.fd;
      if (fd == socket_.fd()) {
        if (events[i].events & EPOLLOUT) tx_.flush();
        if (events[i].events & EPOLLIN) read_socket(now);
      } else {
        drain_fd(fd);  // command eventfd or timerfd: turn() looks at everything anyway
        if (fd == timer_fd_) armed_ = 0;
      }
    }
    // Wake the handler thread before turn() writes ACKs: it handles the frames while this thread sends
    // (an ACK's sendmsg on loopback also delivers it and wakes the peer, tens of us off the hop).
    sink_->flush();
    turn();
    if (stopping_) {
      shutdown_connections(now_ns());
      {
        std::lock_guard<std::mutex> lock(mutex_);
        closed_ = true;
      }
      run_commands();  // commands that raced with close report kEndpointClosed
      t_engine = nullptr;
      engine.unlock();
      sink_->flush();
      return;
    }
    t_engine = nullptr;
    engine.unlock();
    sink_->flush();
  }
}

void Endpoint::read_for_stalled_consumer(uint64_t now) {
  if (io_reads_ || now - consumer_read_at_ < kConsumerStallNs || !socket_.has_datagram()) return;
  // The consumer's thread has not read for a while (blocked without lending the socket): keep the
  // connections alive. Its events wait in the sink for it.
  read_socket(now);
}

void Endpoint::turn() {
  // Event callbacks may post commands (a C++ handler responding); run those before going idle.
  bool more = true;
  while (more) {
    run_commands();
    expire_requests(now_ns());
    handle_timeouts(now_ns());
    write_all(now_ns());
    reap(now_ns());
    std::lock_guard<std::mutex> lock(mutex_);
    more = !commands_.empty();
  }
  arm_timer(now_ns());
}

size_t Endpoint::read_socket(uint64_t now) {
  // Bounded so that ACKs and responses go out even under a flood; the rest waits for the next turn.
  size_t datagrams = 0;
  for (int i = 0; i < 64; ++i) {
    Address from;
    size_t segment = 0;
    const ssize_t n = socket_.receive(rx_buf_.data(), &from, &segment);
    if (n < 0) break;
    for (size_t off = 0; off < static_cast<size_t>(n); off += segment) {
      on_datagram(from, rx_buf_.data() + off, std::min(segment, static_cast<size_t>(n) - off), now);
      ++datagrams;
    }
  }
  return datagrams;
}

void Endpoint::on_datagram(const Address& from, const uint8_t* data, size_t len, uint64_t now) {
  ++counters_.datagrams_received;
  ngtcp2_version_cid vc;
  if (len == 0 || ngtcp2_pkt_decode_version_cid(&vc, data, len, kCidLen) != 0) {
    ++counters_.datagrams_discarded;
    return;
  }
  if (auto it = cids_.find(std::string(reinterpret_cast<const char*>(vc.dcid), vc.dcidlen)); it != cids_.end()) {
    if (it->second->alive()) it->second->read(from, data, len, now);
    return;
  }
  ngtcp2_pkt_hd hd;
  if ((data[0] & 0x80) == 0 || ngtcp2_accept(&hd, data, len) != 0 || conns_.size() >= config_.max_connections ||
      stopping_) {
    ++counters_.datagrams_discarded;  // not a new connection's Initial, or no room for one
    return;
  }
  const uint64_t serial = next_serial_++;
  std::unique_ptr<Connection> conn;
  try {
    conn = Connection::accept(*this, identity_, serial, socket_.local(), from, hd, now);
  } catch (const std::exception&) {
    ++counters_.datagrams_discarded;
    return;
  }
  Connection* raw = conn.get();
  conns_.emplace(serial, std::move(conn));
  // The client keeps using its chosen DCID until it hears from us; route it here meanwhile.
  add_cid(hd.dcid, raw);
  raw->read(from, data, len, now);
}

void Endpoint::handle_timeouts(uint64_t now) {
  for (auto& [serial, c] : conns_) {
    if (c->alive() && c->expiry().next <= now) c->handle_timeout(now);
  }
}

void Endpoint::write_all(uint64_t now) {
  // Connections with messages go first: an ACK whose hold ended (it may pass: arm_timer) must not
  // delay a message that goes out in the same turn by its sendmsg.
  for (const bool messages : {true, false}) {
    for (auto& [serial, c] : conns_) {
      if (tx_.blocked()) break;
      if (c->dirty && c->has_messages() == messages && c->alive() && !c->holding(now)) {
        c->write(tx_, now);
        tx_.flush();
      }
    }
  }
  if (tx_.blocked() != want_writable_) {
    want_writable_ = tx_.blocked();
    watch_socket();
  }
}

void Endpoint::watch_socket() {
  epoll_event ev{};
  ev.events = (io_reads_ ? EPOLLIN : 0u) | (want_writable_ ? EPOLLOUT : 0u);
  ev.data.fd = socket_.fd();
  epoll_ctl(epoll_fd_, EPOLL_CTL_MOD, socket_.fd(), &ev);
}

void Endpoint::receive_on_consumer_thread(bool on) {
  std::lock_guard<std::mutex> engine(engine_);
  if (io_reads_ == !on) return;
  io_reads_ = !on;
  consumer_read_at_ = now_ns();  // a consumer that just took the socket has not stalled
  watch_socket();  // with datagrams waiting, this wakes the I/O thread to read them at once
}

void Endpoint::receive() {
  const uint64_t started = now_ns();
  std::unique_lock<std::mutex> engine(engine_);
  for (;;) {
    const uint64_t sent = tx_.datagrams_sent();
    bool events = false;
    const size_t received = read_round(&events);
    const bool bulk = received >= kBulkDatagrams || tx_.datagrams_sent() - sent >= kBulkDatagrams;
    if (!bulk || events || now_ns() - started >= kBulkReceiveNs) return;
    // A bulk transfer, either way, and nothing for the caller yet: wait for its next packets here.
    engine.unlock();
    // Spin a little before sleeping: a sleeping reader costs each of the sender's sendmsg calls a
    // wake-up across CPUs, and sender and receiver then fell into taking turns (bulk transfers ran at
    // ~500 MB/s in a third of runs, ~1000 otherwise; with the spin 1360-1746 in every run).
    const bool ready = spin_for_datagram(kBulkSpinNs) || sleep_for_datagram(kBulkGapNs);
    engine.lock();
    if (!ready) return;
  }
}

ExpectedFrames::Wait Endpoint::await_expected(uint64_t token, uint64_t sleep_ns, uint64_t spin_ns, bool quiet,
                                              uint64_t* request_id, PeerId* from) {
  if (!expected_.claim(token)) return ExpectedFrames::Wait::kNotExpected;
  const uint64_t spin_from = now_ns() + sleep_ns;
  const uint64_t until = spin_from + spin_ns;
  if (spin_ns > 0) {
    // The frame's ACK will be held from its arrival, by `until` at the latest: the timer is armed for
    // that time now, while this thread waits anyway. The read then keeps it (arm_timer), where
    // re-arming it, a trap to the hypervisor here, took ~8 us of the frame's way (docs/benchmarks.md).
    std::lock_guard<std::mutex> engine(engine_);
    awaited_hold_ = until + Connection::kAckHoldNs;
    arm_by(awaited_hold_, now_ns());
  }
  if (quiet) quiet_watch(+1);
  for (uint64_t now = now_ns(); now < until && expected_.state(token) == ExpectedFrames::Wait::kExpected;
       now = now_ns()) {
    const bool ready =
        now < spin_from ? sleep_for_datagram(std::min(spin_from - now, kAwaitSliceNs)) : datagram_after_yield();
    if (ready && read_here()) break;  // others' events: the caller handles them first
  }
  if (quiet) quiet_watch(-1);
  return expected_.unclaim(token, request_id, from);
}

void Endpoint::quiet_watch(int change) {
  std::lock_guard<std::mutex> lock(quiet_mutex_);
  const bool was_quiet = quiet_waiters_ > 0;
  quiet_waiters_ += change;
  if (was_quiet == (quiet_waiters_ > 0)) return;
  // Back in the set, a socket with datagrams waiting makes it readable at once: nothing is missed.
  epoll_event ev{};
  ev.events = quiet_waiters_ > 0 ? 0u : EPOLLIN;
  ev.data.fd = socket_.fd();
  epoll_ctl(watch_fd_, EPOLL_CTL_MOD, socket_.fd(), &ev);
}

size_t Endpoint::read_round(bool* events) {
  t_engine = this;
  consumer_read_at_ = now_ns();
  const uint64_t emitted = events_emitted_;
  const size_t received = read_socket(consumer_read_at_);
  // A connection that delivered a message holds its ACK for the reply (kAckHoldNs): this writes only
  // what cannot wait (e.g. more data after an ACK opened the window) and re-arms the timer.
  turn();
  t_engine = nullptr;
  *events = events_emitted_ != emitted;
  return received;
}

bool Endpoint::read_here() {
  bool events = false;
  {
    std::lock_guard<std::mutex> engine(engine_);
    read_round(&events);
  }
  sink_->flush();
  return events;
}

std::shared_ptr<Buffer> Endpoint::expect(uint64_t token, Expectation expectation) {
  expectation.into = pool_->acquire(ExpectedFrames::tensor_bytes(expectation.dtype, expectation.shape));
  std::shared_ptr<Buffer> into = expectation.into;
  expected_.add(token, std::move(expectation));
  return into;
}

bool Endpoint::await_datagram(uint64_t sleep_ns, uint64_t spin_ns) const {
  return (sleep_ns > 0 && sleep_for_datagram(sleep_ns)) || spin_for_datagram(spin_ns);
}

bool Endpoint::sleep_for_datagram(uint64_t ns) const {
  pollfd readable{socket_.fd(), POLLIN, 0};
  const timespec timeout{static_cast<time_t>(ns / 1'000'000'000), static_cast<long>(ns % 1'000'000'000)};
  return ::ppoll(&readable, 1, &timeout, nullptr) > 0;
}

bool Endpoint::spin_for_datagram(uint64_t ns) const {
  const uint64_t until = now_ns() + ns;
  do {
    if (datagram_after_yield()) return true;
  } while (now_ns() < until);
  return false;
}

bool Endpoint::datagram_after_yield() const {
  sched_yield();  // returns at once when no other thread on this CPU is ready to run
  return socket_.has_datagram();
}

void Endpoint::reap(uint64_t now) {
  for (auto it = conns_.begin(); it != conns_.end();) {
    Connection* c = it->second.get();
    if (c->alive()) {
      ++it;
      continue;
    }
    if (!c->established()) ++counters_.handshakes_failed;
    c->close(tx_, kAppShutdown, now);
    c->fail_outstanding(c->failure().kind, c->failure().message);
    if (auto p = peers_.find(c->peer()); p != peers_.end() && p->second == c->serial()) peers_.erase(p);
    for (auto in = incoming_.begin(); in != incoming_.end();) {
      in = in->second.serial == c->serial() ? incoming_.erase(in) : std::next(in);
    }
    // The handshake's original DCID is registered outside ngtcp2's list of our CIDs.
    for (auto cid = cids_.begin(); cid != cids_.end();) {
      cid = cid->second == c ? cids_.erase(cid) : std::next(cid);
    }
    it = conns_.erase(it);
  }
}

void Endpoint::arm_timer(uint64_t now) {
  uint64_t next = deadlines_.empty() ? UINT64_MAX : deadlines_.begin()->first;
  uint64_t firm = next;
  if (awaited_hold_ <= now) awaited_hold_ = UINT64_MAX;
  next = std::min(next, awaited_hold_);
  for (auto& [serial, c] : conns_) {
    const Connection::Expiry e = c->expiry();
    next = std::min(next, e.next);
    firm = std::min(firm, e.firm);
  }
  // A deadline that moved later keeps the armed one: it fires early once and is re-armed then. Re-arming
  // on every change costs two timerfd_settime calls per message, which on this VM (the timer write
  // traps to the hypervisor) was a quarter of all CPU time of a request/response loop. So does a held
  // ACK's end up to kAckHoldSlackNs before it (the timer armed ahead by await_expected).
  const uint64_t latest = next > UINT64_MAX - Connection::kAckHoldSlackNs ? UINT64_MAX
                                                                          : next + Connection::kAckHoldSlackNs;
  if (armed_ != 0 && armed_ <= firm && armed_ <= latest) return;
  set_timer(next, now);
}

void Endpoint::arm_by(uint64_t at, uint64_t now) {
  if (armed_ == 0 || armed_ > at) set_timer(at, now);
}

void Endpoint::set_timer(uint64_t at, uint64_t now) {
  armed_ = at;
  itimerspec spec{};
  if (at != UINT64_MAX) {
    const uint64_t when = std::max(at, now + 1);
    spec.it_value.tv_sec = static_cast<time_t>(when / 1000000000ull);
    spec.it_value.tv_nsec = static_cast<long>(when % 1000000000ull);
  }
  timerfd_settime(timer_fd_, TFD_TIMER_ABSTIME, &spec, nullptr);
}

void Endpoint::shutdown_connections(uint64_t now) {
  for (auto& [serial, c] : conns_) {
    if (c->alive()) c->close(tx_, kAppShutdown, now);
    c->fail_outstanding(ErrorKind::kEndpointClosed, "the endpoint is closed");
  }
  conns_.clear();
  cids_.clear();
  peers_.clear();
  incoming_.clear();
  deadlines_.clear();
  token_deadline_.clear();
}

}  // namespace im::quic
