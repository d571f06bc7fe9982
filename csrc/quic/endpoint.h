// A QUIC endpoint: one UDP socket, one I/O thread (epoll + timerfd + an eventfd for commands), acting
// as client and server at once. It keeps one connection per remote peer, routes packets to connections
// by connection id, runs their timers, and reports outcomes to an EventSink on the I/O thread.
//
// The public methods may be called from any thread. They queue a command; when the engine (the state of
// all connections, guarded by one mutex) is free, the calling thread runs it at once, including writing
// the packets, which saves a thread hop per message. Otherwise the I/O thread is woken to run it.
// Frames handed in are kept (not copied) until the peer acknowledged them; their keep-alives come back
// through EventSink::release.
#pragma once

#include <atomic>
#include <cstring>
#include <functional>
#include <memory>
#include <mutex>
#include <optional>
#include <set>
#include <string>
#include <thread>
#include <unordered_map>
#include <vector>

#include "quic/connection.h"
#include "quic/expected_frames.h"
#include "quic/identity.h"
#include "quic/tx_batch.h"
#include "quic/types.h"
#include "quic/udp_socket.h"

namespace im::quic {

struct PeerIdHash {
  size_t operator()(const PeerId& id) const noexcept {
    size_t h;
    std::memcpy(&h, id.data(), sizeof h);  // peer ids are SHA-256 outputs: any 8 bytes are uniform
    return h;
  }
};

class Endpoint final : public ConnectionHost {
 public:
  // `seed`: 32-byte Ed25519 private key. `host`: numeric address to bind ("::" for dual-stack wildcard).
  // Received frames land in `pool` (one of config.pool_bytes is made when null).
  Endpoint(const uint8_t* seed, size_t seed_len, const std::string& host, uint16_t port, Config config,
           std::shared_ptr<EventSink> sink, std::shared_ptr<BufferPool> pool = nullptr);
  ~Endpoint() override;
  Endpoint(const Endpoint&) = delete;
  Endpoint& operator=(const Endpoint&) = delete;

  const PeerId& peer_id() const noexcept { return identity_.peer_id(); }
  const Address& local_address() const noexcept { return socket_.local(); }
  uint16_t port() const;

  // `address` may be empty: then the existing connection with the peer (or its last known address)
  // is used, and the operation fails with kPeerUnreachable when there is none. A request without a
  // response after `timeout_s` (> 0) is cancelled and fails with kTimeout.
  // Each returns false (leaving `frame` with the caller) when the endpoint is closed.
  bool request(uint64_t token, const PeerId& peer, std::optional<Address> address, OutFrame& frame,
               double timeout_s = 0);
  bool send(uint64_t token, const PeerId& peer, std::optional<Address> address, OutFrame& frame);
  bool respond(uint64_t incoming, OutFrame& frame);
  void reject(uint64_t incoming, uint64_t app_error);
  // The handler is done with an incoming frame and has no answer: a one-way message, or a request left
  // unanswered (its stream is reset with the next packet to the peer: Connection::close_unanswered).
  void finish(uint64_t incoming);
  void cancel(uint64_t token);

  // Who reads the socket. By default the I/O thread does, and the EventSink's consumer learns of incoming
  // messages from it: two thread wake-ups per message (the I/O thread's, then the consumer's), ~0.1 ms
  // on a loaded VM. With `on`, the I/O thread leaves incoming datagrams to the consumer's thread, which
  // calls receive() whenever datagram_fd() is readable: one wake-up. The consumer hands reading back
  // (`on` false) while its thread is busy for long (a forward), so that ACKs, flow control and large
  // transfers keep moving meanwhile. Should it stall without doing so, the I/O thread reads datagrams
  // that waited kConsumerStallNs (checked that often), well before peers would give this endpoint up
  // as dead.
  void receive_on_consumer_thread(bool on);
  static constexpr uint64_t kConsumerStallNs = 100'000'000;  // 100 ms
  static constexpr size_t kBulkDatagrams = 32;
  static constexpr uint64_t kBulkReceiveNs = 10'000'000;  // 10 ms
  static constexpr long kBulkGapNs = 500'000;             // a bulk transfer paused this long has ended
  static constexpr uint64_t kBulkSpinNs = 100'000;         // spun first, before sleeping for the gap
  // Reads the datagrams waiting on the socket and does the engine work they call for; their events go
  // to the sink without a flush (the caller takes them next). Waits for the engine if the I/O thread
  // holds it. While a bulk transfer runs (kBulkDatagrams or more read, or written after the ACKs
  // read, and no frame complete yet) it goes on here for up to kBulkReceiveNs, as the I/O thread
  // would, rather than return to the caller's event loop for every batch of packets: that cost 64 MiB
  // transfers 15-50 % of their throughput.
  void receive();
  // Readable while datagrams wait on the socket (an epoll set holding it), for the consumer's event
  // loop to watch; except while threads wait in await_expected with `quiet`: the set then leaves the
  // socket out, so that the datagrams those threads read do not also wake the consumer's thread, whose
  // wake-up across CPUs and handling would find them read (a client's step result: traced, ~30 us of
  // the worker's send and a CPU taken from the waiting thread, docs/benchmarks.md).
  int datagram_fd() const noexcept { return watch_fd_; }
  // Waits for a datagram the caller expects soon: sleeps in ppoll for up to sleep_ns, then busy-polls
  // the socket for up to spin_ns. True once one is waiting (the caller then calls receive()). A thread
  // already running when the datagram lands skips the wake-up across CPUs that a sleeping one costs
  // (~60 us per message on the 2-vCPU VM of docs/benchmarks.md).
  bool await_datagram(uint64_t sleep_ns, uint64_t spin_ns) const;

  // A frame the consumer expects (see expected_frames.h): when one completes it is reported as a
  // kExpected event instead of kIncoming, its tensor already copied into the returned buffer (from
  // the pool; `expectation.into` is set here), and the stream it came on is finished as finish()
  // would. Throws as ExpectedFrames::add, or PoolExhausted. forget_expected: false when a frame took it.
  std::shared_ptr<Buffer> expect(uint64_t token, Expectation expectation);
  bool forget_expected(uint64_t token) { return expected_.forget(token); }
  // Waits on the calling thread (any but the I/O thread) for an expected frame, reading the socket
  // itself meanwhile: sleeps in ppoll for up to sleep_ns, then busy-polls for up to spin_ns, handling
  // every datagram that comes. kArrived: the frame came (its request id and sender in the out
  // arguments), its tensor is in place and no event reports it. kExpected: not yet, either because
  // the time ran out or because other events went to the sink meanwhile (the caller handles them and
  // may wait again); the frame is reported as usual if it comes while nobody waits. kNotExpected:
  // taken before the call, forgotten, or the endpoint closed. Where the frame is read elsewhere
  // meanwhile (the consumer's or the I/O thread), the sleep notices within kAwaitSliceNs. `quiet`: a
  // thread other than the consumer's waits, and datagram_fd() stays unreadable meanwhile.
  ExpectedFrames::Wait await_expected(uint64_t token, uint64_t sleep_ns, uint64_t spin_ns, bool quiet,
                                      uint64_t* request_id, PeerId* from);
  static constexpr uint64_t kAwaitSliceNs = 1'000'000;

  // These two wait for the engine's answer: never call them from an EventSink callback.
  std::optional<PeerStats> peer_stats(const PeerId& peer);
  EndpointStats stats();

  // Closes every connection (CONNECTION_CLOSE to each peer), fails what is outstanding with
  // kEndpointClosed, and joins the I/O thread. Idempotent.
  void close();

  // ConnectionHost.
  const Config& config() const override { return config_; }
  BufferPool& pool() override { return *pool_; }
  void add_cid(const ngtcp2_cid& cid, Connection* conn) override;
  void remove_cid(const ngtcp2_cid& cid) override;
  void reset_token(uint8_t* token, const ngtcp2_cid& cid) override;
  void emit(Event&& event) override;
  void release(std::shared_ptr<void> keepalive) override;
  uint64_t register_incoming(Connection* conn, int64_t stream_id, uint64_t nbytes) override;
  void handshake_completed(Connection* conn) override;

 private:
  using Command = std::function<void()>;
  struct Incoming {
    uint64_t serial;
    int64_t stream_id;
    uint64_t nbytes;
  };

  bool post(Command cmd);
  void wake_io_thread();
  void run();
  void turn();  // one round of engine work; the caller holds engine_
  void run_commands();
  size_t read_socket(uint64_t now);  // returns the datagrams read
  // One round of reading the socket and the engine work it calls for; the caller holds engine_.
  // Returns the datagrams read; *events: whether it emitted any.
  size_t read_round(bool* events);
  bool read_here();  // a read_round on this thread, then the sink flushed; true: events were emitted
  void arm_timer(uint64_t now);  // for the earliest deadline, unless the armed one will do
  void arm_by(uint64_t at, uint64_t now);  // so that the timer fires by `at` at the latest
  void set_timer(uint64_t at, uint64_t now);
  void quiet_watch(int change);  // +1: one more quiet waiter (the socket leaves watch_fd_), -1: one less
  bool sleep_for_datagram(uint64_t ns) const;  // ppoll: true once a datagram is waiting
  bool spin_for_datagram(uint64_t ns) const;   // busy-polls: true once a datagram is waiting
  // One look of a busy-poll: whether a datagram is waiting, after letting any other thread that wants
  // this CPU run first, so that a spin only takes time that nobody else wants. Without the yield, on
  // the 2-vCPU VM of docs/benchmarks.md, spinners took turns with the forwards whose output they
  // waited for: a lone session's steps came less regularly and a wider window caught fewer of them.
  bool datagram_after_yield() const;
  void on_datagram(const Address& from, const uint8_t* data, size_t len, uint64_t now);
  void handle_timeouts(uint64_t now);
  void write_all(uint64_t now);
  void watch_socket();  // sets the socket's epoll interest from io_reads_ and want_writable_
  void read_for_stalled_consumer(uint64_t now);
  void reap(uint64_t now);
  void shutdown_connections(uint64_t now);

  void submit(bool request, uint64_t token, const PeerId& peer, std::optional<Address> address, OutFrame frame);
  void cancel_everywhere(uint64_t token);
  void expire_requests(uint64_t now);
  Connection* connection_for(const PeerId& peer, const std::optional<Address>& address, std::string* why);
  Connection* find(uint64_t serial);
  void fail(uint64_t token, ErrorKind kind, std::string message, OutFrame& frame);

  Config config_;
  std::shared_ptr<EventSink> sink_;
  TlsIdentity identity_;
  UdpSocket socket_;
  TxBatch tx_;
  std::shared_ptr<BufferPool> pool_;
  uint8_t reset_secret_[32];

  int epoll_fd_ = -1;
  int watch_fd_ = -1;  // epoll set holding the socket: datagram_fd()
  int command_fd_ = -1;  // eventfd: commands queued
  int timer_fd_ = -1;
  uint64_t armed_ = 0;   // deadline the timerfd is set to (UINT64_MAX: disarmed, 0: fired or never set)
  // When the held ACK of a frame a thread awaits ends at the latest (await_expected): the timer keeps
  // firing by then, whatever else re-arms it meanwhile, so that the frame's read need not re-arm it.
  uint64_t awaited_hold_ = UINT64_MAX;
  bool want_writable_ = false;
  bool io_reads_ = true;  // the I/O thread reads the socket (see receive_on_consumer_thread)
  uint64_t consumer_read_at_ = 0;  // when the consumer's thread last called receive()

  std::mutex quiet_mutex_;
  int quiet_waiters_ = 0;  // threads in await_expected with `quiet` (guarded by quiet_mutex_)

  std::mutex mutex_;
  std::vector<Command> commands_;
  bool closed_ = false;  // guarded by mutex_: no more commands are accepted
  std::atomic<bool> stopping_{false};
  std::thread thread_;

  // Engine state (this and tx_, armed_, want_writable_, io_reads_ above), guarded by engine_: the I/O
  // thread holds it while it works; other threads take it with try_lock only (never waiting for it),
  // except to receive or to change who receives.
  std::mutex engine_;
  uint64_t next_serial_ = 1;
  uint64_t next_incoming_ = 1;
  std::unordered_map<uint64_t, std::unique_ptr<Connection>> conns_;
  std::unordered_map<std::string, Connection*> cids_;
  std::unordered_map<PeerId, uint64_t, PeerIdHash> peers_;      // peer -> serial of its preferred connection
  std::unordered_map<PeerId, Address, PeerIdHash> addresses_;   // last address each peer was reached at
  std::unordered_map<uint64_t, Incoming> incoming_;
  // Request timeouts, kept here rather than in asyncio: a Python timer per request makes every loop
  // iteration arm a kernel timer, which costs ~10 us per round trip on this VM.
  std::set<std::pair<uint64_t, uint64_t>> deadlines_;    // (deadline, token)
  std::unordered_map<uint64_t, uint64_t> token_deadline_;  // token -> deadline
  std::vector<uint8_t> rx_buf_;
  ExpectedFrames expected_;  // thread-safe on its own
  uint64_t events_emitted_ = 0;  // engine-guarded: tells receive() whether a frame completed
  EndpointStats counters_;
};

}  // namespace im::quic
