// generate()'s decode step on the GPU as a CUDA graph: captured once, then replayed with one
// launch a step instead of one per kernel (a decode step of a 22-layer model is about 180 kernels,
// each costing microseconds of host time to issue, and the GPU then waits on the host).
//
// What a replay must not depend on is fixed at capture: every tensor's address, the kernel
// grids, the attention's split plan. What changes from step to step lives in device memory at
// fixed addresses and is read by the kernels there:
//   - ids, position ids, the cache slot and the key count: one page-locked block the host fills
//     before each replay, sent by the graph's first node (MirroredBuffer);
//   - the keys and values: written by cuda::append_at at the slot read on the device, into a
//     DynamicCache reserved up front for the whole generation, so its storage never moves (if it
//     does move, the graph is captured again), or a StaticCache, whose storage never moves;
//   - attention: over the storage's first `capacity` slots (the graph's capacity; the storage may
//     hold more) with the key count read on the device; the padding mask [batch, capacity] is sent
//     once (every later column is 1, as generate() extends
//     it);
//   - intermediates: the thread's scratch workspace (cuda::ScratchScope), carved in the same order
//     at every step, so the captured addresses stay the step's own;
//   - the chosen ids: argmax or sampling inside the graph, copied back by its last node.
// The host keeps the cache's bookkeeping (mark_appended of either cache) after each replay.
#pragma once

#include <cstdint>
#include <optional>
#include <span>
#include <utility>
#include <vector>

#include "kvcache/backend/cuda.hpp"
#include "kvcache/cache/dynamic_cache.hpp"
#include "kvcache/cache/static_cache.hpp"
#include "kvcache/generation/config.hpp"
#include "kvcache/model/llama.hpp"

namespace kvcache::detail {

/// What a replayed step needs of the caller's cache, for the two kinds whose storage a graph can
/// write at fixed addresses: a DynamicCache of full layers (reserved up front; if its storage
/// moves the graph is captured again) and a StaticCache (allocated once).
class ReplayCache {
 public:
  /// The cache when a generation on `model` can replay its decode steps (a GPU model,
  /// config.cuda_graph, one of the two kinds above); else nothing.
  static std::optional<ReplayCache> of(const LlamaModel& model, Cache<cuda::Backend>* cache,
                                       const GenerationConfig& config);
  Cache<cuda::Backend>& cache() const { return *cache_; }
  /// The slots the graph may fill: at most `wanted`, never past a StaticCache's max_cache_len.
  std::int64_t capacity(std::int64_t wanted) const;
  /// Makes every layer hold `capacity` slots (a DynamicCache grows; a StaticCache has them).
  void reserve(std::int64_t capacity) const;
  /// Layer l's keys and values, rows [0, batch_size()) of its whole storage.
  std::pair<Tensor, Tensor> storage(int layer) const;
  /// The cache's bookkeeping after a replay wrote `tokens` slots of every layer.
  void mark_appended(std::int64_t tokens) const;
  std::int64_t batch_size() const;

 private:
  Cache<cuda::Backend>* cache_ = nullptr;
  DynamicCache<cuda::Backend>* dynamic_ = nullptr;  // exactly one of the two is set
  StaticCache<cuda::Backend>* static_ = nullptr;
};

class DecodeGraph {
 public:
  /// Buffers for `batch` rows, with the cache reserved to `capacity` slots (every layer must hold
  /// the prompt already). Runs on the current stream, which must not be the legacy default stream
  /// (a cuda::StreamScope).
  DecodeGraph(const LlamaModel& model, ReplayCache cache, std::int64_t batch, std::int64_t capacity,
              const GenerationConfig& config);

  /// One decode step: input_ids [batch, 1] int64 and the step's attention_mask [batch, past + 1]
  /// on the host, cache_position = past (the cache's length); uniforms: one per row when
  /// sampling. Captures at the first call (and when the cache's storage has moved), then replays.
  /// Returns every row's chosen token; the cache holds one more token afterwards.
  std::vector<std::int64_t> step(const Tensor& input_ids, const Tensor& attention_mask,
                                 std::int64_t cache_position, std::span<const float> uniforms);

  /// Steps run by replaying the graph (all steps, captures included).
  std::int64_t replays() const { return replays_; }

 private:
  void capture(const Tensor& input_ids, const Tensor& attention_mask, std::int64_t cache_position);
  bool storage_moved() const;

  const LlamaModel& model_;
  ReplayCache cache_;
  GenerationConfig config_;
  std::int64_t batch_ = 0, capacity_ = 0;
  // Byte offsets into buffer_: the per-step inputs [0, inputs_bytes_), then the chosen ids, then
  // the mask.
  std::size_t ids_at_ = 0, positions_at_ = 0, slot_at_ = 0, kv_len_at_ = 0, uniforms_at_ = 0,
              inputs_bytes_ = 0, out_at_ = 0, mask_at_ = 0;
  cuda::MirroredBuffer buffer_;
  DecodeReplay replay_;
  Tensor uniforms_;  // [batch] float32 view of buffer_
  Tensor out_ids_;   // [batch] int64 view of buffer_
  cuda::Graph graph_;
  std::int64_t replays_ = 0;
};

}  // namespace kvcache::detail
