// The floor under the swarm's per-hop overhead on this machine: what moving a decode step's hidden state
// through three processes costs when nothing but the operating system stands in the way. A client and
// three relays (processes) pass a 2304-byte message (576 float32s, SmolLM2's hidden state) over UDP on
// loopback, each waiting in epoll as an event loop does. Each relay "computes" by reading a buffer the
// size of a 10-block span's weights (as a forward streams them, leaving the caches cold for what runs
// next), then forwards the message. Per-hop overhead as bench_mesh.py reports it: (round trip - the
// relays' compute) / 3, median and middle half over the steps.
//
//   g++ -O2 -std=c++17 bench/cpp/hop_floor.cc -o hop_floor && ./hop_floor [weights_mb=141] [steps=200]
//   (also built with -DIM_BUILD_BENCH=ON: build/bench/bench/cpp/hop_floor)
//
// weights_mb 0 gives the warm figure: nothing evicts the caches between messages.
#include <arpa/inet.h>
#include <netinet/in.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <vector>

namespace {

constexpr size_t kMessageBytes = 2304;
constexpr int kRelays = 3;
constexpr int kWarmupSteps = 10;
constexpr uint16_t kBasePort = 47100;  // the client; relay r listens on kBasePort + 1 + r
constexpr char kStop = 's';

double now_s() {
  return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count();
}

sockaddr_in loopback(uint16_t port) {
  sockaddr_in address{};
  address.sin_family = AF_INET;
  address.sin_port = htons(port);
  address.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  return address;
}

// A UDP socket bound to the port, and an epoll instance watching it.
struct Inbox {
  int fd = -1;
  int epoll = -1;

  explicit Inbox(uint16_t port) {
    fd = socket(AF_INET, SOCK_DGRAM, 0);
    const sockaddr_in address = loopback(port);
    if (fd < 0 || bind(fd, reinterpret_cast<const sockaddr*>(&address), sizeof address) != 0) {
      std::perror("bind (is another hop_floor running?)");
      std::exit(1);
    }
    epoll = epoll_create1(0);
    epoll_event watch{};
    watch.events = EPOLLIN;
    epoll_ctl(epoll, EPOLL_CTL_ADD, fd, &watch);
  }

  void wait_and_read(char* message) const {
    epoll_event ready{};
    while (epoll_wait(epoll, &ready, 1, -1) != 1) {
    }
    if (recv(fd, message, kMessageBytes, 0) != static_cast<ssize_t>(kMessageBytes)) std::exit(2);
  }

  void send_to(uint16_t port, const char* message) const {
    const sockaddr_in address = loopback(port);
    sendto(fd, message, kMessageBytes, 0, reinterpret_cast<const sockaddr*>(&address), sizeof address);
  }
};

// The message carries each relay's compute time (seconds, a double at offset 8 * relay) and a stop flag.
constexpr size_t kStopOffset = 8 * kRelays;

[[noreturn]] void relay(int index, size_t weight_bytes) {
  const Inbox inbox(static_cast<uint16_t>(kBasePort + 1 + index));
  const uint16_t next = index == kRelays - 1 ? kBasePort : static_cast<uint16_t>(kBasePort + 2 + index);
  std::vector<float> weights(weight_bytes / sizeof(float), 1.0f);
  char message[kMessageBytes];
  for (;;) {
    inbox.wait_and_read(message);
    const double started = now_s();
    float sum = 0;
    for (size_t i = 0; i < weights.size(); i += 16) sum += weights[i];  // one load per cache line
    const double compute = now_s() - started + (sum < 0 ? 1 : 0);  // keeps the loop from being elided
    std::memcpy(message + 8 * index, &compute, sizeof compute);
    inbox.send_to(next, message);
    if (message[kStopOffset] == kStop) std::exit(0);
  }
}

}  // namespace

int main(int argc, char** argv) {
  const size_t weight_bytes = static_cast<size_t>((argc > 1 ? std::atof(argv[1]) : 141.0) * 1e6);
  const int steps = argc > 2 ? std::atoi(argv[2]) : 200;
  if (steps < 4) {
    std::fprintf(stderr, "steps must be at least 4\n");
    return 1;
  }
  for (int r = 0; r < kRelays; ++r) {
    if (fork() == 0) relay(r, weight_bytes);
  }
  usleep(300000);  // the relays allocate and touch their weights
  const Inbox inbox(kBasePort);
  char message[kMessageBytes];
  std::vector<double> overheads;
  for (int step = 0; step < steps + kWarmupSteps; ++step) {
    std::memset(message, 0, sizeof message);
    const double started = now_s();
    inbox.send_to(kBasePort + 1, message);
    inbox.wait_and_read(message);
    const double round_trip = now_s() - started;
    double compute = 0;
    for (int r = 0; r < kRelays; ++r) {
      double relay_compute = 0;
      std::memcpy(&relay_compute, message + 8 * r, sizeof relay_compute);
      compute += relay_compute;
    }
    if (step >= kWarmupSteps) overheads.push_back((round_trip - compute) / kRelays);
    usleep(2000);  // the client's own work between steps (LM head, sampling)
  }
  message[kStopOffset] = kStop;
  inbox.send_to(kBasePort + 1, message);
  inbox.wait_and_read(message);
  while (wait(nullptr) > 0) {
  }
  std::sort(overheads.begin(), overheads.end());
  const auto at = [&](size_t percent) { return overheads[percent * (overheads.size() - 1) / 100] * 1e6; };
  std::printf("%.0f MB read per relay between messages: per-hop overhead median %.1f us, middle half %.1f-%.1f us "
              "(%d steps)\n",
              static_cast<double>(weight_bytes) / 1e6, at(50), at(25), at(75), steps);
  return 0;
}
