// Reusable aligned byte buffers for received frames and contiguous encodes. Buffers come in size classes
// (four per power of two, so at most 25% slack), are 64-byte aligned (page-aligned from kPageAlignFrom
// bytes up, so that they can be page-locked for asynchronous host-to-device copies), return to the pool
// when the last reference drops, and count against a cap on the bytes the pool holds.
#pragma once

#include <cstddef>
#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <stdexcept>
#include <string>
#include <vector>

namespace im {

inline constexpr size_t kPoolMinClass = 256;
inline constexpr size_t kPageAlignFrom = size_t{64} << 10;

class PoolExhausted : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

class BufferPool;

// One pooled allocation. `size()` is what was asked for, `capacity()` the size class behind it.
class Buffer {
 public:
  Buffer(const Buffer&) = delete;
  Buffer& operator=(const Buffer&) = delete;
  ~Buffer();

  uint8_t* data() noexcept { return data_; }
  const uint8_t* data() const noexcept { return data_; }
  size_t size() const noexcept { return size_; }
  size_t capacity() const noexcept { return capacity_; }
  bool pinned() const noexcept { return pinned_; }

 private:
  friend class BufferPool;
  Buffer(std::shared_ptr<BufferPool> pool, uint8_t* data, size_t size, size_t capacity, bool pinned)
      : pool_(std::move(pool)), data_(data), size_(size), capacity_(capacity), pinned_(pinned) {}

  std::shared_ptr<BufferPool> pool_;
  uint8_t* data_;
  size_t size_;
  size_t capacity_;
  bool pinned_;
};

struct PoolStats {
  size_t bytes_in_use = 0;      // capacity of buffers handed out and not yet returned
  size_t bytes_free = 0;        // capacity of returned buffers kept for reuse
  size_t high_water = 0;        // maximum of bytes_in_use + bytes_free so far
  size_t max_bytes = 0;         // the cap on bytes_in_use + bytes_free
  size_t buffers_in_use = 0;
  size_t buffers_free = 0;
  uint64_t fresh_allocations = 0;
  uint64_t reuses = 0;
  size_t bytes_pinned = 0;
};

// Registers / unregisters host memory as page-locked. Installed from Python when CUDA is present, so
// the core never links CUDA itself.
struct PinHooks {
  std::function<bool(void*, size_t)> pin;
  std::function<void(void*)> unpin;
  size_t min_bytes = size_t{1} << 20;
};

class BufferPool : public std::enable_shared_from_this<BufferPool> {
 public:
  static std::shared_ptr<BufferPool> create(size_t max_bytes);
  ~BufferPool();

  // A buffer of at least `size` bytes (size 0 gives the smallest class). Throws PoolExhausted when the
  // cap cannot hold it even after releasing every cached free buffer.
  std::shared_ptr<Buffer> acquire(size_t size);

  PoolStats stats() const;
  // Returns cached free buffers to the system; buffers in use are untouched.
  void trim();
  void set_pin_hooks(PinHooks hooks);

  static size_t size_class(size_t size) noexcept;
  static size_t alignment_for(size_t capacity) noexcept;

 private:
  explicit BufferPool(size_t max_bytes) : max_bytes_(max_bytes) {}
  friend class Buffer;

  struct Block {
    uint8_t* data;
    bool pinned;
  };
  void release(uint8_t* data, size_t capacity, bool pinned) noexcept;
  void free_block(Block block, size_t capacity) noexcept;
  void free_cached_locked(std::vector<std::pair<Block, size_t>>& out);

  mutable std::mutex mutex_;
  size_t max_bytes_;
  std::multimap<size_t, Block> free_;  // capacity -> cached blocks
  PoolStats stats_;
  PinHooks hooks_;
};

}  // namespace im
