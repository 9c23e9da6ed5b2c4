// OffloadedCache: a cache for a GPU model whose keys and values live in page-locked host memory,
// with only two layers' worth on the device (transformers' OffloadedCache, for contexts whose
// cache does not fit beside the weights).
//
// How a step runs. Every layer is held on the host as [batch, num_kv_heads, capacity, head_dim]
// (pinned, grown like a DynamicCache). The device has two slots of that shape. update(layer i):
//   1. the thread's stream waits for the copy stream's work so far (the prefetch of layer i);
//   2. if a slot holds layer i's tokens (prefetched), it is used; else they are copied in now, on
//      the thread's stream (the first step, or after reorder / crop / a step out of order);
//   3. the new tokens are appended to the slot and copied back to the host rows behind them
//      (device → host, on the thread's stream, ordered before the layer's next prefetch);
//   4. the copy stream waits for the thread's stream so far (so the previous layer's attention,
//      which reads the other slot, is done) and copies layer i + 1's tokens into the other slot,
//      while layer i's attention and MLP run;
//   5. the layer's keys and values, past + new, come back as views of the slot.
// So the device holds 2 of num_layers layers, and each step moves every layer's tokens over the
// bus once (plus the new ones back). The views update() returns are valid until the update of
// the layer after next (the slot is reused then).
//
// Batch operations (reorder_cache for beam search, batch_repeat_interleave, batch_select_indices)
// and crop work on the host copy after waiting for the device; the slots are refilled at the next
// update. clone() copies the host layers. Memory figures: nbytes() counts the tokens held (host),
// capacity_bytes() the device slots, host_capacity_bytes() the pinned host storage.
//
// CUDA only: OffloadedCache is a Cache<cuda::Backend>, and every call throws "built without the
// CUDA backend" in a build without nvcc. Not thread-safe; its calls belong to the thread that runs
// the model.
#pragma once

#include <array>
#include <cstdint>
#include <memory>
#include <span>
#include <vector>

#include "kvcache/backend/cuda.hpp"
#include "kvcache/cache/cache.hpp"

namespace kvcache {

/// Options of an OffloadedCache.
struct OffloadedCacheOptions {
  /// Token slots every layer reserves at its first update, on the host and in the device slots
  /// (0: what the first update needs, then growth by 1.5x).
  std::int64_t initial_capacity = 0;
};

/// A cache of pinned host layers with two device slots; see the file comment.
class OffloadedCache final : public Cache<cuda::Backend> {
 public:
  /// An empty cache; its layers are made at their first update. Throws kvcache::Error where no
  /// CUDA device is usable.
  explicit OffloadedCache(OffloadedCacheOptions options = {});
  ~OffloadedCache() override;
  OffloadedCache(const OffloadedCache&) = delete;
  OffloadedCache& operator=(const OffloadedCache&) = delete;
  /// Moves the layers, slots and copy stream; the moved-from cache may only be destroyed.
  OffloadedCache(OffloadedCache&&) noexcept;
  /// As the move constructor.
  OffloadedCache& operator=(OffloadedCache&&) noexcept;

  std::pair<Tensor, Tensor> update(const Tensor& key_states, const Tensor& value_states,
                                   int layer_idx, const CacheKwargs& kwargs = {}) override;
  std::int64_t get_seq_length(int layer_idx = 0) const override;
  /// -1: the cache grows without bound (host memory permitting).
  std::int64_t get_max_cache_shape(int layer_idx = 0) const override;
  MaskSizes get_mask_sizes(std::span<const std::int64_t> cache_position,
                           int layer_idx) const override;
  int num_layers() const override;
  void reset() override;
  void crop(std::int64_t max_length) override;
  using Cache<cuda::Backend>::reorder_cache;
  using Cache<cuda::Backend>::batch_select_indices;
  void reorder_cache(std::span<const std::int64_t> beam_idx) override;
  void batch_repeat_interleave(std::int64_t repeats) override;
  void batch_select_indices(std::span<const std::int64_t> indices) override;
  /// Bytes of the tokens held (on the host).
  std::size_t nbytes() const override;
  /// Bytes of device memory: the two slots.
  std::size_t capacity_bytes() const override;
  /// Bytes of page-locked host memory the layers have allocated.
  std::size_t host_capacity_bytes() const;
  /// Updates whose layer was already in a slot (prefetched while the layer before it ran), and
  /// those that copied it in on demand.
  std::int64_t prefetched_updates() const { return prefetched_; }
  /// See prefetched_updates().
  std::int64_t on_demand_updates() const { return on_demand_; }

  /// A deep copy of the host layers (the device slots are refilled at the copy's next update).
  OffloadedCache clone() const;

 protected:
  std::unique_ptr<Cache<cuda::Backend>> clone_cache() const override;

 private:
  struct HostLayer {
    Tensor keys, values;  // pinned [batch, num_kv_heads, capacity, head_dim]
    std::int64_t length = 0;
  };
  struct Slot {
    Tensor keys, values;  // device [batch, num_kv_heads, capacity, head_dim]
    int layer = -1;       // whose tokens [0, length) it holds (-1: none)
    std::int64_t length = 0;
  };

  void check_states(const Tensor& k, const Tensor& v, int layer_idx) const;
  // Waits for every copy and kernel touching the host layers (before the host reads them).
  void wait_for_device() const;
  // Makes slot s hold at least `tokens` slots (reallocating empties it).
  void reserve_slot(Slot& s, std::int64_t tokens);
  void invalidate_slots();
  // Keeps batch rows `rows` of every layer (in that order; repeats allowed).
  void select_rows(const std::vector<std::int64_t>& rows, const char* where);
  void check_rows(std::span<const std::int64_t> rows, const char* where) const;

  OffloadedCacheOptions options_;
  std::vector<HostLayer> layers_;
  std::array<Slot, 2> slots_;
  int last_slot_ = 1;
  std::unique_ptr<cuda::CopyStream> copies_;
  std::int64_t batch_ = 0, heads_ = 0, head_dim_ = 0;
  DType dtype_ = DType::kFloat32;
  std::int64_t prefetched_ = 0, on_demand_ = 0;
};

}  // namespace kvcache
