// C++-only path of the QUIC data plane, side by side with a plain TCP baseline in the same run:
// request/response RTT (median, p99) for 8 KiB and 64 KiB frames, 64 MiB transfer throughput, and
// CPU time per message. Both endpoints live in this process; the client issues each request from the
// I/O thread's event callback, so no other thread sits on the path.
//
//   quic_bench [rtt_iterations=2000] [bulk_transfers=4] [udp_payload=1452 (to its loopback peers)]
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <condition_variable>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <mutex>
#include <thread>
#include <vector>

#include "quic/endpoint.h"

using namespace im;
using namespace im::quic;
using Clock = std::chrono::steady_clock;

namespace {

double cpu_seconds() {
  rusage ru{};
  getrusage(RUSAGE_SELF, &ru);
  return static_cast<double>(ru.ru_utime.tv_sec + ru.ru_stime.tv_sec) +
         static_cast<double>(ru.ru_utime.tv_usec + ru.ru_stime.tv_usec) / 1e6;
}

struct Stats {
  double median_us, p99_us;
};

Stats summarize(std::vector<double> us) {
  std::sort(us.begin(), us.end());
  return {us[us.size() / 2], us[std::min(us.size() - 1, us.size() * 99 / 100)]};
}

// A complete frame with one uint8 tensor of `payload` bytes, owned by the returned buffer.
std::shared_ptr<std::vector<uint8_t>> make_frame(size_t payload) {
  auto data = std::make_shared<std::vector<uint8_t>>(payload, uint8_t{7});
  const int64_t shape[1] = {static_cast<int64_t>(payload)};
  TensorRef t{static_cast<uint8_t>(DType::kUInt8), 1, shape, data->data(), payload};
  EncodedFrame f = encode_frame(1, 0, 0, nullptr, 0, payload ? &t : nullptr, payload ? 1 : 0, FrameLimits{});
  auto out = std::make_shared<std::vector<uint8_t>>(f.size());
  f.write_to(out->data(), out->size());
  return out;
}

OutFrame out_frame(const std::shared_ptr<std::vector<uint8_t>>& bytes) {
  OutFrame f;
  f.segments.push_back(Segment{bytes->data(), bytes->size()});
  f.size = bytes->size();
  f.keepalive = bytes;
  return f;
}

// Answers every request with a fixed response frame, or with the request itself when echoing.
class ServerSink final : public EventSink {
 public:
  Endpoint* endpoint = nullptr;
  std::shared_ptr<std::vector<uint8_t>> fixed;  // null: echo
  void on_event(Event&& e) override {
    if (e.type != Event::Type::kIncoming) return;
    OutFrame f;
    if (fixed) {
      f = out_frame(fixed);
    } else {
      f.segments.push_back(Segment{e.buffer->data(), e.buffer->size()});
      f.size = e.buffer->size();
      f.keepalive = e.buffer;
    }
    endpoint->respond(e.token, f);
  }
  void release(std::shared_ptr<void>) override {}
};

// Sends the next request from the response callback until `remaining` reaches zero.
class ClientSink final : public EventSink {
 public:
  Endpoint* endpoint = nullptr;
  PeerId server{};
  std::shared_ptr<std::vector<uint8_t>> request;
  std::vector<double> rtts_us;
  int remaining = 0;
  Clock::time_point sent;
  std::mutex mutex;
  std::condition_variable done;
  bool failed = false;

  void start(int n) {
    remaining = n;
    rtts_us.clear();
    fire();
  }
  void fire() {
    sent = Clock::now();
    OutFrame f = out_frame(request);
    endpoint->request(static_cast<uint64_t>(remaining), server, std::nullopt, f);
  }
  void on_event(Event&& e) override {
    if (e.type == Event::Type::kFailed) {
      std::fprintf(stderr, "request failed: %s\n", e.message.c_str());
      failed = true;
    } else if (e.type == Event::Type::kResponse) {
      rtts_us.push_back(std::chrono::duration<double, std::micro>(Clock::now() - sent).count());
    } else {
      return;
    }
    if (--remaining > 0 && !failed) {
      fire();
      return;
    }
    std::lock_guard<std::mutex> lock(mutex);
    done.notify_all();
  }
  void wait() {
    std::unique_lock<std::mutex> lock(mutex);
    done.wait(lock, [&] { return remaining <= 0 || failed; });
  }
  void release(std::shared_ptr<void>) override {}
};

std::array<uint8_t, 32> seed(uint8_t b) {
  std::array<uint8_t, 32> s;
  s.fill(b);
  return s;
}

// --- TCP baseline: the same pattern (length known from the frame size), TCP_NODELAY, one thread each.

void read_full(int fd, uint8_t* p, size_t n) {
  while (n > 0) {
    ssize_t r = ::read(fd, p, n);
    if (r <= 0) std::exit(1);
    p += r;
    n -= static_cast<size_t>(r);
  }
}

void write_full(int fd, const uint8_t* p, size_t n) {
  while (n > 0) {
    ssize_t r = ::write(fd, p, n);
    if (r <= 0) std::exit(1);
    p += r;
    n -= static_cast<size_t>(r);
  }
}

Stats tcp_rtt(size_t request_size, size_t response_size, int iters, double* cpu_us) {
  int listener = socket(AF_INET, SOCK_STREAM, 0);
  sockaddr_in addr{};
  addr.sin_family = AF_INET;
  addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  bind(listener, reinterpret_cast<sockaddr*>(&addr), sizeof addr);
  socklen_t len = sizeof addr;
  getsockname(listener, reinterpret_cast<sockaddr*>(&addr), &len);
  listen(listener, 1);
  std::thread server([&] {
    int fd = accept(listener, nullptr, nullptr);
    int one = 1;
    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    std::vector<uint8_t> in(request_size), out(response_size, 1);
    for (int i = 0; i < iters; ++i) {
      read_full(fd, in.data(), in.size());
      write_full(fd, out.data(), out.size());
    }
    ::close(fd);
  });
  int fd = socket(AF_INET, SOCK_STREAM, 0);
  int one = 1;
  setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
  connect(fd, reinterpret_cast<sockaddr*>(&addr), sizeof addr);
  std::vector<uint8_t> req(request_size, 2), resp(response_size);
  std::vector<double> us;
  const double cpu0 = cpu_seconds();
  for (int i = 0; i < iters; ++i) {
    auto t0 = Clock::now();
    write_full(fd, req.data(), req.size());
    read_full(fd, resp.data(), resp.size());
    us.push_back(std::chrono::duration<double, std::micro>(Clock::now() - t0).count());
  }
  *cpu_us = (cpu_seconds() - cpu0) / iters * 1e6;
  server.join();
  ::close(fd);
  ::close(listener);
  return summarize(us);
}

}  // namespace

int main(int argc, char** argv) {
  const int iters = argc > 1 ? std::atoi(argv[1]) : 2000;
  const int bulk = argc > 2 ? std::atoi(argv[2]) : 4;
  Config config;
  // Its peers are on loopback: the size given is the one their packets have.
  if (argc > 3) config.max_udp_payload = config.loopback_udp_payload = static_cast<size_t>(std::atol(argv[3]));
  auto server_sink = std::make_shared<ServerSink>();
  auto client_sink = std::make_shared<ClientSink>();
  const auto s1 = seed(1), s2 = seed(2);
  Endpoint server(s1.data(), s1.size(), "127.0.0.1", 0, config, server_sink);
  Endpoint client(s2.data(), s2.size(), "127.0.0.1", 0, config, client_sink);
  server_sink->endpoint = &server;
  client_sink->endpoint = &client;
  client_sink->server = server.peer_id();

  // Connect once (the first request carries the server's address).
  client_sink->request = make_frame(0);
  {
    client_sink->remaining = 1;
    client_sink->sent = Clock::now();
    OutFrame f = out_frame(client_sink->request);
    client.request(1, server.peer_id(), Address::parse("127.0.0.1", server.port()), f);
    client_sink->wait();
  }

  std::printf("%-34s %12s %12s %14s\n", "case", "median_us", "p99_us", "cpu_us/msg");
  for (size_t kib : {8, 64}) {
    client_sink->request = make_frame(kib << 10);
    client_sink->start(iters / 10);  // warm-up
    client_sink->wait();
    const double cpu0 = cpu_seconds();
    client_sink->start(iters);
    client_sink->wait();
    const double quic_cpu = (cpu_seconds() - cpu0) / iters * 1e6;
    const Stats q = summarize(client_sink->rtts_us);
    double tcp_cpu = 0;
    const size_t frame_size = client_sink->request->size();
    const Stats t = tcp_rtt(frame_size, frame_size, iters, &tcp_cpu);
    std::printf("quic c++ echo %3zu KiB               %12.1f %12.1f %14.1f\n", kib, q.median_us, q.p99_us, quic_cpu);
    std::printf("tcp  c++ echo %3zu KiB               %12.1f %12.1f %14.1f\n", kib, t.median_us, t.p99_us, tcp_cpu);
  }

  // Bulk: 64 MiB requests answered by a small frame; throughput counts the 64 MiB only.
  server_sink->fixed = make_frame(0);
  client_sink->request = make_frame(size_t{64} << 20);
  client_sink->start(1);
  client_sink->wait();
  const double cpu0 = cpu_seconds();
  client_sink->start(bulk);
  client_sink->wait();
  double total_s = 0;
  for (double us : client_sink->rtts_us) total_s += us / 1e6;
  const double mbps = static_cast<double>(client_sink->request->size()) * bulk / total_s / 1e6;
  std::printf("quic c++ 64 MiB transfer: %.0f MB/s, cpu %.2f s per GB\n", mbps,
              (cpu_seconds() - cpu0) / (static_cast<double>(client_sink->request->size()) * bulk / 1e9));
  double tcp_cpu = 0;
  const Stats tb = tcp_rtt(size_t{64} << 20, 64, bulk, &tcp_cpu);
  std::printf("tcp  c++ 64 MiB transfer: %.0f MB/s\n", static_cast<double>(64 << 20) / (tb.median_us / 1e6) / 1e6);
  const EndpointStats st = client.stats();
  std::printf("client: sendmsg calls %llu for %llu datagrams (gso=%d gro=%d), socket drops %llu\n",
              static_cast<unsigned long long>(st.sendmsg_calls), static_cast<unsigned long long>(st.datagrams_sent),
              st.gso, st.gro, static_cast<unsigned long long>(server.stats().socket_drops));
  return client_sink->failed ? 1 : 0;
}
