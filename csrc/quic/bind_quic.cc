// pybind11 face of the QUIC endpoint. The I/O thread never touches Python: it queues events and the
// keep-alives of sent frames in a PySink and bumps an eventfd that asyncio watches (loop.add_reader);
// poll() then hands the events over and drops the keep-alives, both with the GIL held.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>
#include <sys/eventfd.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <mutex>

#include "bind_frame.h"
#include "quic/endpoint.h"

namespace im {
namespace {

using quic::Address;
using quic::Endpoint;
using quic::ErrorKind;
using quic::Event;
using quic::OutFrame;
using quic::PeerId;

// Negative and NaN durations count as none.
uint64_t seconds_to_ns(double seconds) { return seconds > 0 ? static_cast<uint64_t>(seconds * 1e9) : 0; }

class PySink final : public quic::EventSink {
 public:
  PySink() {
    fd_ = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
    if (fd_ < 0) throw std::runtime_error(std::string("eventfd: ") + std::strerror(errno));
  }
  ~PySink() override { ::close(fd_); }

  int fd() const noexcept { return fd_; }

  void on_event(Event&& event) override {
    std::lock_guard<std::mutex> lock(mutex_);
    events_.push_back(std::move(event));
  }

  void release(std::shared_ptr<void> keepalive) override {
    std::lock_guard<std::mutex> lock(mutex_);
    releases_.push_back(std::move(keepalive));
  }

  void flush() override {
    std::lock_guard<std::mutex> lock(mutex_);
    if (signaled_ || (events_.empty() && releases_.empty())) return;
    signaled_ = true;  // one wake-up per batch: poll() takes everything queued
    const uint64_t one = 1;
    (void)::write(fd_, &one, sizeof one);
  }

  // With the GIL held: takes the queued events and drops the queued keep-alives.
  std::vector<Event> take() {
    uint64_t value;
    (void)::read(fd_, &value, sizeof value);
    std::vector<Event> events;
    std::vector<std::shared_ptr<void>> releases;
    {
      std::lock_guard<std::mutex> lock(mutex_);
      signaled_ = false;
      events.swap(events_);
      releases.swap(releases_);
    }
    return events;  // `releases` dies here, with the GIL held
  }

 private:

  int fd_ = -1;
  std::mutex mutex_;
  bool signaled_ = false;
  std::vector<Event> events_;
  std::vector<std::shared_ptr<void>> releases_;
};

PyObject* g_frame_error = nullptr;  // _core.FrameError, registered by bind_frame

PeerId to_peer_id(const py::bytes& b) {
  const std::string s = b;
  if (s.size() != quic::kPeerIdSize) throw py::value_error("a peer id is 32 bytes");
  PeerId id;
  std::memcpy(id.data(), s.data(), id.size());
  return id;
}

std::optional<Address> to_address(const std::optional<std::string>& host, uint16_t port) {
  if (!host) return std::nullopt;
  try {
    return Address::parse(*host, port);
  } catch (const quic::SocketError& e) {
    throw py::value_error(e.what());
  }
}

// A frame object as segments plus its owner: a _core.EncodedFrame (zero-copy over its tensors) or any
// contiguous bytes-like object holding one complete frame (zero-copy over the exporter's memory).
// Either way the header must parse and declare exactly the size handed in. `encoded`: the
// EncodedFrame, if it is one, for the caller to mark handed to the transport when it sends it.
OutFrame to_out_frame(const py::object& obj, std::shared_ptr<PyEncodedFrame>* encoded) {
  OutFrame out;
  if (py::isinstance<PyEncodedFrame>(obj)) {
    auto frame = obj.cast<std::shared_ptr<PyEncodedFrame>>();
    out.segments = frame->frame.segments();
    out.size = frame->frame.size();
    out.keepalive = frame;
    *encoded = std::move(frame);
  } else {
    auto* view = new Py_buffer;
    if (PyObject_GetBuffer(obj.ptr(), view, PyBUF_C_CONTIGUOUS) != 0) {
      delete view;
      throw py::error_already_set();
    }
    std::shared_ptr<Py_buffer> hold(view, [](Py_buffer* v) {
      PyBuffer_Release(v);
      delete v;
    });
    out.segments.push_back(Segment{static_cast<const uint8_t*>(view->buf), static_cast<size_t>(view->len)});
    out.size = static_cast<uint64_t>(view->len);
    out.keepalive = hold;
  }
  if (out.segments.empty() || out.segments[0].len < kFrameHeaderSize) {
    throw FrameError(FrameErrc::kTruncated, "not a frame: shorter than the 40-byte header");
  }
  FrameLimits limits;
  limits.max_frame_size = UINT64_MAX;  // the endpoint reports oversize frames as FrameTooLarge
  const FrameHeader h = parse_header(out.segments[0].data, out.segments[0].len, limits);
  if (h.frame_len != out.size) {
    throw FrameError(FrameErrc::kLengthMismatch, "frame header declares " + std::to_string(h.frame_len) +
                                                     " bytes but " + std::to_string(out.size) + " were given");
  }
  return out;
}

class PyPreparedSend;

class PyEndpoint {
 public:
  PyEndpoint(const py::bytes& seed, const std::string& host, uint16_t port, const quic::Config& config,
             std::shared_ptr<BufferPool> pool)
      : sink_(std::make_shared<PySink>()) {
    const std::string s = seed;
    endpoint_ = std::make_unique<Endpoint>(reinterpret_cast<const uint8_t*>(s.data()), s.size(), host, port, config,
                                           sink_, std::move(pool));
  }

  ~PyEndpoint() {
    {
      py::gil_scoped_release nogil;
      endpoint_.reset();
    }
    sink_->take();
  }

  py::bytes peer_id() const {
    return py::bytes(reinterpret_cast<const char*>(endpoint_->peer_id().data()), quic::kPeerIdSize);
  }

  void submit(bool request, uint64_t token, const py::bytes& peer, const std::optional<std::string>& host,
              uint16_t port, const py::object& frame, double timeout_s) {
    OutFrame out = handed_frame(frame);
    const PeerId id = to_peer_id(peer);
    const std::optional<Address> address = to_address(host, port);
    bool ok;
    {
      // The packets may be written on this thread right away; `out` stays outside so that a frame the
      // endpoint refused is dropped with the GIL held.
      py::gil_scoped_release nogil;
      ok = request ? endpoint_->request(token, id, address, out, timeout_s) : endpoint_->send(token, id, address, out);
    }
    if (!ok) throw std::runtime_error("the endpoint is closed");
  }

  std::unique_ptr<PyPreparedSend> prepare_send(uint64_t token, const py::bytes& peer,
                                               const std::optional<std::string>& host, uint16_t port,
                                               const py::object& frame);

  void respond(uint64_t incoming, const py::object& frame) {
    OutFrame out = handed_frame(frame);
    bool ok;
    {
      py::gil_scoped_release nogil;
      ok = endpoint_->respond(incoming, out);
    }
    if (!ok) throw std::runtime_error("the endpoint is closed");
  }

  py::list poll() {
    py::list out;
    for (Event& e : sink_->take()) {
      switch (e.type) {
        case Event::Type::kResponse:
          out.append(py::make_tuple(0, e.token, py::cast(std::move(e.buffer))));
          break;
        case Event::Type::kFailed:
          out.append(py::make_tuple(1, e.token, static_cast<int>(e.error), e.message));
          break;
        case Event::Type::kSent:
          out.append(py::make_tuple(2, e.token));
          break;
        case Event::Type::kIncoming:
          out.append(py::make_tuple(3, e.token, py::bytes(reinterpret_cast<const char*>(e.peer.data()), e.peer.size()),
                                    py::cast(std::move(e.buffer)), e.expects_response));
          break;
        case Event::Type::kExpected:
          out.append(py::make_tuple(4, e.token, e.request_id,
                                    py::bytes(reinterpret_cast<const char*>(e.peer.data()), e.peer.size())));
          break;
      }
    }
    return out;
  }

  void close() {
    {
      py::gil_scoped_release nogil;
      endpoint_->close();
    }
  }

  Endpoint& endpoint() { return *endpoint_; }
  // The frame as segments (FrameError if it is not one), and its EncodedFrame if it is one.
  static OutFrame checked_frame(const py::object& frame, std::shared_ptr<PyEncodedFrame>* encoded) {
    try {
      return to_out_frame(frame, encoded);
    } catch (const FrameError& e) {
      PyErr_SetString(g_frame_error, e.what());
      throw py::error_already_set();
    }
  }
  // The frame as segments, handed over now: its request id can no longer be rewritten.
  static OutFrame handed_frame(const py::object& frame) {
    std::shared_ptr<PyEncodedFrame> encoded;
    OutFrame out = checked_frame(frame, &encoded);
    if (encoded) encoded->handed_to_transport = true;
    return out;
  }
  int fd() const { return sink_->fd(); }

 private:
  std::shared_ptr<PySink> sink_;
  std::unique_ptr<Endpoint> endpoint_;
};

// A one-way send made ready ahead (Endpoint.prepare_send): the frame's segments, the peer id and its
// parsed address were converted when it was made, so that handing the frame over costs one call
// without arguments. Until then the frame's request id may still be rewritten (set_request_id).
class PyPreparedSend {
 public:
  PyPreparedSend(Endpoint& endpoint, uint64_t token, const PeerId& peer, std::optional<Address> address,
                 OutFrame frame, std::shared_ptr<PyEncodedFrame> encoded)
      : endpoint_(endpoint),
        token_(token),
        peer_(peer),
        address_(std::move(address)),
        frame_(std::move(frame)),
        encoded_(std::move(encoded)) {}

  uint64_t token() const noexcept { return token_; }

  // False: the endpoint is closed and nothing was sent. Once only.
  bool send() {
    if (sent_) throw std::logic_error("this prepared send was sent already");
    sent_ = true;
    if (encoded_) encoded_->handed_to_transport = true;
    py::gil_scoped_release nogil;  // a frame the endpoint refused stays in frame_, dropped with the GIL
    return endpoint_.send(token_, peer_, address_, frame_);
  }

 private:
  Endpoint& endpoint_;  // the Python endpoint object is kept alive as long as this one (keep_alive)
  uint64_t token_;
  PeerId peer_;
  std::optional<Address> address_;
  OutFrame frame_;
  std::shared_ptr<PyEncodedFrame> encoded_;
  bool sent_ = false;
};

std::unique_ptr<PyPreparedSend> PyEndpoint::prepare_send(uint64_t token, const py::bytes& peer,
                                                         const std::optional<std::string>& host, uint16_t port,
                                                         const py::object& frame) {
  std::shared_ptr<PyEncodedFrame> encoded;
  OutFrame out = checked_frame(frame, &encoded);
  return std::make_unique<PyPreparedSend>(*endpoint_, token, to_peer_id(peer), to_address(host, port), std::move(out),
                                          std::move(encoded));
}

py::dict peer_stats_dict(const quic::PeerStats& s) {
  py::dict d;
  d["connected"] = s.connected;
  d["srtt_s"] = s.srtt_s;
  d["min_rtt_s"] = s.min_rtt_s;
  d["bytes_sent"] = s.bytes_sent;
  d["bytes_received"] = s.bytes_received;
  d["messages_sent"] = s.messages_sent;
  d["messages_received"] = s.messages_received;
  d["packets_lost"] = s.packets_lost;
  d["frames_dropped"] = s.frames_dropped;
  d["open_streams"] = s.open_streams;
  d["cwnd"] = s.cwnd;
  d["bytes_in_flight"] = s.bytes_in_flight;
  d["connections"] = s.connections;
  d["silent_s"] = s.silent_s;
  return d;
}

py::dict endpoint_stats_dict(const quic::EndpointStats& s) {
  py::dict d;
  d["connections"] = s.connections;
  d["datagrams_received"] = s.datagrams_received;
  d["datagrams_sent"] = s.datagrams_sent;
  d["sendmsg_calls"] = s.sendmsg_calls;
  d["socket_drops"] = s.socket_drops;
  d["datagrams_discarded"] = s.datagrams_discarded;
  d["handshakes_failed"] = s.handshakes_failed;
  d["gso"] = s.gso;
  d["gro"] = s.gro;
  return d;
}

}  // namespace

void bind_quic(py::module_& m) {
  g_frame_error = m.attr("FrameError").ptr();
  py::module_ q = m.def_submodule("quic", "QUIC endpoint (ngtcp2 + GnuTLS); use inferencemesh.transport.");
  // A port in use or an address family the host lacks is an OSError to Python callers.
  py::register_exception<quic::SocketError>(q, "SocketError", PyExc_OSError);

  py::class_<quic::Config>(q, "Config", "Endpoint limits and tuning; see inferencemesh.transport.TransportConfig.")
      .def(py::init<>())
      .def_readwrite("alpn", &quic::Config::alpn)
      .def_readwrite("max_frame_size", &quic::Config::max_frame_size)
      .def_readwrite("connection_window", &quic::Config::connection_window)
      .def_readwrite("stream_window", &quic::Config::stream_window)
      .def_readwrite("max_pending_bytes", &quic::Config::max_pending_bytes)
      .def_readwrite("max_streams", &quic::Config::max_streams)
      .def_readwrite("max_connections", &quic::Config::max_connections)
      .def_readwrite("handshake_timeout_s", &quic::Config::handshake_timeout_s)
      .def_readwrite("idle_timeout_s", &quic::Config::idle_timeout_s)
      .def_readwrite("dead_peer_timeout_s", &quic::Config::dead_peer_timeout_s)
      .def_readwrite("pool_bytes", &quic::Config::pool_bytes)
      .def_readwrite("socket_buffer_bytes", &quic::Config::socket_buffer_bytes)
      .def_readwrite("max_udp_payload", &quic::Config::max_udp_payload)
      .def_readwrite("loopback_udp_payload", &quic::Config::loopback_udp_payload)
      .def_readwrite("gso", &quic::Config::gso)
      .def_readwrite("gro", &quic::Config::gro);

  py::class_<PyPreparedSend>(q, "PreparedSend", "A one-way send made ready by Endpoint.prepare_send.")
      .def_property_readonly("token", &PyPreparedSend::token)
      .def("send", &PyPreparedSend::send,
           "Hands the frame over, as Endpoint.send would; False if the endpoint is closed. Once only.");

  py::class_<PyEndpoint>(q, "Endpoint",
                         "Native endpoint. Events arrive through poll() when event_fd is readable.")
      .def(py::init<const py::bytes&, const std::string&, uint16_t, const quic::Config&, std::shared_ptr<BufferPool>>(),
           py::arg("private_key"), py::arg("host"), py::arg("port"), py::arg("config"), py::arg("pool") = nullptr)
      .def_property_readonly("peer_id", &PyEndpoint::peer_id)
      .def_property_readonly("port", [](PyEndpoint& e) { return e.endpoint().port(); })
      .def_property_readonly("local_address", [](PyEndpoint& e) { return e.endpoint().local_address().to_string(); })
      .def_property_readonly("event_fd", &PyEndpoint::fd)
      .def_property_readonly("datagram_fd", [](PyEndpoint& e) { return e.endpoint().datagram_fd(); },
                             "Readable while datagrams wait on the socket, except while a thread waits in "
                             "await_expected with quiet=True.")
      .def("receive_on_consumer_thread",
           [](PyEndpoint& e, bool on) { e.endpoint().receive_on_consumer_thread(on); }, py::arg("on"),
           py::call_guard<py::gil_scoped_release>(),
           "True: the I/O thread leaves incoming datagrams to the thread that calls receive() when datagram_fd "
           "is readable (one wake-up per message instead of two); False: the I/O thread reads them.")
      .def(
          "receive",
          [](PyEndpoint& e) {
            {
              py::gil_scoped_release nogil;
              e.endpoint().receive();
            }
            return e.poll();  // in the same call: a second one costs ~10 us of a message's way, cold
          },
          "Reads the datagrams waiting on the socket; returns the events since the last call, as poll().")
      .def(
          "await_datagram",
          [](PyEndpoint& e, double sleep_s, double spin_s) {
            return e.endpoint().await_datagram(seconds_to_ns(sleep_s), seconds_to_ns(spin_s));
          },
          py::arg("sleep_s"), py::arg("spin_s"), py::call_guard<py::gil_scoped_release>(),
          "Waits for an expected datagram: sleeps up to sleep_s, then busy-polls the socket up to spin_s "
          "(no wake-up across CPUs when it lands). True once one is waiting: call receive().")
      .def(
          "request",
          [](PyEndpoint& e, uint64_t token, const py::bytes& peer, const std::optional<std::string>& host,
             uint16_t port, const py::object& frame, double timeout_s) {
            e.submit(true, token, peer, host, port, frame, timeout_s);
          },
          py::arg("token"), py::arg("peer_id"), py::arg("host"), py::arg("port"), py::arg("frame"),
          py::arg("timeout_s"))
      .def(
          "send",
          [](PyEndpoint& e, uint64_t token, const py::bytes& peer, const std::optional<std::string>& host,
             uint16_t port, const py::object& frame) { e.submit(false, token, peer, host, port, frame, 0); },
          py::arg("token"), py::arg("peer_id"), py::arg("host"), py::arg("port"), py::arg("frame"))
      .def("prepare_send", &PyEndpoint::prepare_send, py::arg("token"), py::arg("peer_id"), py::arg("host"),
           py::arg("port"), py::arg("frame"), py::keep_alive<0, 1>(),
           "A send of the frame to the peer, made ready for PreparedSend.send() to hand over later.")
      .def("respond", &PyEndpoint::respond, py::arg("incoming"), py::arg("frame"))
      .def("reject", [](PyEndpoint& e, uint64_t incoming, uint64_t code) { e.endpoint().reject(incoming, code); },
           py::arg("incoming"), py::arg("code"), py::call_guard<py::gil_scoped_release>())
      .def("finish", [](PyEndpoint& e, uint64_t incoming) { e.endpoint().finish(incoming); }, py::arg("incoming"),
           py::call_guard<py::gil_scoped_release>())
      .def("cancel", [](PyEndpoint& e, uint64_t token) { e.endpoint().cancel(token); }, py::arg("token"),
           py::call_guard<py::gil_scoped_release>())
      .def(
          "expect",
          [](PyEndpoint& e, uint64_t token, uint8_t kind, uint16_t flags, const py::bytes& metadata,
             uint64_t min_request_id, uint64_t max_request_id, uint8_t dtype, const std::vector<int64_t>& shape) {
            quic::Expectation x;
            x.kind = kind;
            x.flags = flags;
            x.metadata = metadata;
            x.min_request_id = min_request_id;
            x.max_request_id = max_request_id;
            x.dtype = dtype;
            x.shape = shape;
            try {
              return e.endpoint().expect(token, std::move(x));
            } catch (const std::invalid_argument& error) {
              throw py::value_error(error.what());
            }
          },
          py::arg("token"), py::arg("kind"), py::arg("flags"), py::arg("metadata"), py::arg("min_request_id"),
          py::arg("max_request_id"), py::arg("dtype"), py::arg("shape"),
          "Expects a frame of `kind` and `flags` with exactly `metadata`, a request id in [min, max] and one "
          "tensor of dtype code `dtype` and `shape`: when it completes, its tensor is copied into the "
          "returned Buffer and poll() reports (4, token, request_id, peer_id) instead of the frame.")
      .def("forget_expected", [](PyEndpoint& e, uint64_t token) { return e.endpoint().forget_expected(token); },
           py::arg("token"), "Drops an expectation; False if a frame took it (its event is on the way).")
      .def(
          "await_expected",
          [](PyEndpoint& e, uint64_t token, double sleep_s, double spin_s, bool quiet) {
            uint64_t request_id = 0;
            PeerId from{};
            quic::ExpectedFrames::Wait outcome;
            {
              py::gil_scoped_release nogil;
              outcome = e.endpoint().await_expected(token, seconds_to_ns(sleep_s), seconds_to_ns(spin_s), quiet,
                                                    &request_id, &from);
            }
            return py::make_tuple(static_cast<int>(outcome), request_id,
                                  py::bytes(reinterpret_cast<const char*>(from.data()), from.size()));
          },
          py::arg("token"), py::arg("sleep_s"), py::arg("spin_s"), py::arg("quiet"),
          "Waits for the expected frame of `token`, reading the socket on this thread: sleeps up to sleep_s, "
          "then busy-polls up to spin_s; with quiet (a thread other than the one watching datagram_fd), "
          "datagram_fd stays unreadable meanwhile. Returns (outcome, request_id, peer_id). Outcome 0: it came (its "
          "tensor is in place; no event reports it); 1: not yet (time ran out, or other events came: poll() "
          "has them); 2: taken before the call, forgotten, or the endpoint closed.")
      .def("poll", &PyEndpoint::poll,
           "Events since the last call: (0, token, buffer) response, (1, token, error_kind, message) failure, "
           "(2, token) one-way frame handed to QUIC, (3, incoming, peer_id, buffer, expects_response) incoming, "
           "(4, token, request_id, peer_id) an expected frame (see expect).")
      .def(
          "peer_stats",
          [](PyEndpoint& e, const py::bytes& peer) -> py::object {
            const PeerId id = to_peer_id(peer);
            std::optional<quic::PeerStats> st;
            {
              py::gil_scoped_release nogil;
              st = e.endpoint().peer_stats(id);
            }
            if (!st) return py::none();
            return peer_stats_dict(*st);
          },
          py::arg("peer_id"))
      .def("stats",
           [](PyEndpoint& e) {
             quic::EndpointStats st;
             {
               py::gil_scoped_release nogil;
               st = e.endpoint().stats();
             }
             return endpoint_stats_dict(st);
           })
      .def("close", &PyEndpoint::close);
}

}  // namespace im
