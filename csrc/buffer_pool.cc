#include "buffer_pool.h"

#include <cstdlib>
#include <new>

namespace im {

Buffer::~Buffer() { pool_->release(data_, capacity_, pinned_); }

std::shared_ptr<BufferPool> BufferPool::create(size_t max_bytes) {
  return std::shared_ptr<BufferPool>(new BufferPool(max_bytes));
}

BufferPool::~BufferPool() {
  // Buffers hold a reference to their pool, so none is in use here; only cached blocks remain.
  for (auto& [capacity, block] : free_) free_block(block, capacity);
}

size_t BufferPool::size_class(size_t size) noexcept {
  if (size <= kPoolMinClass) return kPoolMinClass;
  // Four classes per power of two: round up to a multiple of a quarter of the size's power of two.
  const int log2 = 63 - __builtin_clzll(static_cast<unsigned long long>(size - 1));
  const size_t step = size_t{1} << (log2 - 2);
  return (size + step - 1) & ~(step - 1);
}

size_t BufferPool::alignment_for(size_t capacity) noexcept { return capacity >= kPageAlignFrom ? 4096 : 64; }

std::shared_ptr<Buffer> BufferPool::acquire(size_t size) {
  const size_t capacity = size_class(size);
  std::vector<std::pair<Block, size_t>> to_free;
  Block block{nullptr, false};
  {
    std::lock_guard<std::mutex> lock(mutex_);
    auto it = free_.find(capacity);
    if (it != free_.end()) {
      block = it->second;
      free_.erase(it);
      stats_.bytes_free -= capacity;
      stats_.buffers_free -= 1;
      stats_.reuses += 1;
    } else {
      if (stats_.bytes_in_use + stats_.bytes_free + capacity > max_bytes_) free_cached_locked(to_free);
      if (stats_.bytes_in_use + capacity > max_bytes_) {
        throw PoolExhausted("buffer pool cap of " + std::to_string(max_bytes_) + " bytes exceeded: " +
                            std::to_string(stats_.bytes_in_use) + " bytes in use, " +
                            std::to_string(capacity) + " more requested; raise the pool size or send smaller frames");
      }
      // Reserve the bytes before dropping the lock so concurrent acquires respect the cap.
      stats_.fresh_allocations += 1;
    }
    stats_.bytes_in_use += capacity;
    stats_.buffers_in_use += 1;
    const size_t total = stats_.bytes_in_use + stats_.bytes_free;
    if (total > stats_.high_water) stats_.high_water = total;
  }
  for (auto& [old, old_capacity] : to_free) free_block(old, old_capacity);

  if (block.data == nullptr) {
    block.data = static_cast<uint8_t*>(std::aligned_alloc(alignment_for(capacity), capacity));
    if (block.data == nullptr) {
      release(nullptr, capacity, false);
      throw std::bad_alloc();
    }
    PinHooks hooks;
    {
      std::lock_guard<std::mutex> lock(mutex_);
      hooks = hooks_;
    }
    if (hooks.pin && capacity >= hooks.min_bytes && hooks.pin(block.data, capacity)) {
      block.pinned = true;
      std::lock_guard<std::mutex> lock(mutex_);
      stats_.bytes_pinned += capacity;
    }
  }
  return std::shared_ptr<Buffer>(new Buffer(shared_from_this(), block.data, size, capacity, block.pinned));
}

void BufferPool::release(uint8_t* data, size_t capacity, bool pinned) noexcept {
  std::lock_guard<std::mutex> lock(mutex_);
  stats_.bytes_in_use -= capacity;
  stats_.buffers_in_use -= 1;
  if (data == nullptr) return;
  free_.emplace(capacity, Block{data, pinned});
  stats_.bytes_free += capacity;
  stats_.buffers_free += 1;
}

void BufferPool::free_cached_locked(std::vector<std::pair<Block, size_t>>& out) {
  for (auto& [capacity, block] : free_) out.emplace_back(block, capacity);
  free_.clear();
  stats_.bytes_free = 0;
  stats_.buffers_free = 0;
}

void BufferPool::free_block(Block block, size_t capacity) noexcept {
  if (block.pinned) {
    PinHooks hooks;
    {
      std::lock_guard<std::mutex> lock(mutex_);
      hooks = hooks_;
      stats_.bytes_pinned -= capacity;
    }
    if (hooks.unpin) hooks.unpin(block.data);
  }
  std::free(block.data);
}

void BufferPool::trim() {
  std::vector<std::pair<Block, size_t>> to_free;
  {
    std::lock_guard<std::mutex> lock(mutex_);
    free_cached_locked(to_free);
  }
  for (auto& [block, capacity] : to_free) free_block(block, capacity);
}

PoolStats BufferPool::stats() const {
  std::lock_guard<std::mutex> lock(mutex_);
  PoolStats s = stats_;
  s.max_bytes = max_bytes_;
  return s;
}

void BufferPool::set_pin_hooks(PinHooks hooks) {
  std::lock_guard<std::mutex> lock(mutex_);
  hooks_ = std::move(hooks);
}

}  // namespace im
