// Encode and decode cost of one frame carrying one tensor of 2 KiB, 1 MiB and 64 MiB: both must stay
// flat as the payload grows (neither touches tensor bytes). Also a contiguous write for contrast.
#include <benchmark/benchmark.h>

#include <cstdint>
#include <vector>

#include "frame.h"

namespace {

struct Fixture {
  explicit Fixture(size_t payload) : data(payload, 1), shape{static_cast<int64_t>(payload / 4)} {
    ref.dtype = static_cast<uint8_t>(im::DType::kFloat32);
    ref.ndim = 1;
    ref.shape = shape;
    ref.data = data.data();
    ref.nbytes = payload;
  }
  std::vector<uint8_t> data;
  int64_t shape[1];
  im::TensorRef ref;
  const uint8_t metadata[16] = {0x81, 0xa4, 's', 't', 'e', 'p', 0x03};
};

void BM_Encode(benchmark::State& state) {
  Fixture f(static_cast<size_t>(state.range(0)));
  im::FrameLimits limits;
  for (auto _ : state) {
    im::EncodedFrame frame = im::encode_frame(2, 0, 42, f.metadata, 7, &f.ref, 1, limits);
    benchmark::DoNotOptimize(frame.segments().data());
  }
}

void BM_Decode(benchmark::State& state) {
  Fixture f(static_cast<size_t>(state.range(0)));
  im::FrameLimits limits;
  im::EncodedFrame frame = im::encode_frame(2, 0, 42, f.metadata, 7, &f.ref, 1, limits);
  std::vector<uint8_t> wire(frame.size());
  frame.write_to(wire.data(), wire.size());
  for (auto _ : state) {
    im::FrameView view = im::decode_frame(wire.data(), wire.size(), limits);
    benchmark::DoNotOptimize(view.tensor_data(0));
  }
}

void BM_WriteContiguous(benchmark::State& state) {
  Fixture f(static_cast<size_t>(state.range(0)));
  im::FrameLimits limits;
  im::EncodedFrame frame = im::encode_frame(2, 0, 42, f.metadata, 7, &f.ref, 1, limits);
  std::vector<uint8_t> wire(frame.size());
  for (auto _ : state) {
    frame.write_to(wire.data(), wire.size());
    benchmark::ClobberMemory();
  }
  state.SetBytesProcessed(static_cast<int64_t>(state.iterations()) * static_cast<int64_t>(frame.size()));
}

constexpr int64_t kSizes[] = {2 << 10, 1 << 20, 64 << 20};

}  // namespace

BENCHMARK(BM_Encode)->Arg(kSizes[0])->Arg(kSizes[1])->Arg(kSizes[2]);
BENCHMARK(BM_Decode)->Arg(kSizes[0])->Arg(kSizes[1])->Arg(kSizes[2]);
BENCHMARK(BM_WriteContiguous)->Arg(kSizes[0])->Arg(kSizes[1])->Arg(kSizes[2]);

BENCHMARK_MAIN();
