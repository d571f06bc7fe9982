// Attention of one new position (a decode step) of one sequence in one block, in float32: rotary
// embedding of its query and key heads, the key and value appended to the block's KV cache, and
// softmax(q k^T / sqrt(head_dim)) v over every cached position, with grouped-query heads. In torch this
// is a chain of ~25 dispatched ops (slices, a rope of four ops, two indexed cache writes, SDPA and its
// views), ~170-380 us a block on an Intel Xeon VM against ~14 us for this kernel at 37 cached
// positions: 11-14 % of a decode step of SmolLM2-135M there (bench/bench_attention.py).
#pragma once

#include <cstddef>

namespace im {

struct AttentionShape {
  std::size_t heads;       // query heads
  std::size_t kv_heads;    // key/value heads; heads is a multiple of it
  std::size_t head_dim;    // even
  std::size_t max_length;  // positions the cache holds
};

// True where this CPU runs the kernel (AVX-512F, checked at run time: the build targets baseline
// x86-64). Elsewhere torch's ops run decode attention.
bool decode_attention_f32_supported();

// qkv: this position's fused projection, [heads * head_dim] queries, then [kv_heads * head_dim] keys,
// then as many values. cos and sin: the rope table's rows for the position, [head_dim] each, as
// compute/rope.py lays them out ([cos, cos] and [-sin, sin] over the two halves), so a rotated x is
// x * cos + roll(x, head_dim / 2) * sin, each product rounded before the sum as torch's apply_rope does
// (the cache gets the same bits either way). keys, values: the block's cache, [kv_heads, max_length,
// head_dim] row-major. Writes the rotated key and the value at ``position`` and the attention output
// over positions 0..position to out, [heads * head_dim].
// Throws std::invalid_argument for a shape as above does not allow or position >= max_length,
// std::logic_error where decode_attention_f32_supported() is false.
void decode_attention_f32(const float* qkv, const float* cos, const float* sin, float* keys, float* values,
                          const AttentionShape& shape, std::size_t position, float* out);

}  // namespace im
