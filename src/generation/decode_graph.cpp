// The replayed decode step (see decode_graph.hpp for what is fixed and what is read on the device).
#include "decode_graph.hpp"

#include <algorithm>
#include <cstring>

#include "kvcache/attention/mask.hpp"
#include "kvcache/attention/rope.hpp"
#include "kvcache/error.hpp"

namespace kvcache::detail {
namespace {

constexpr std::size_t align8(std::size_t n) { return (n + 7) / 8 * 8; }

}  // namespace

std::optional<ReplayCache> ReplayCache::of(const LlamaModel& model, Cache<cuda::Backend>* cache,
                                           const GenerationConfig& config) {
  if (!config.cuda_graph || model.device() != Device::kCuda || cache == nullptr) return {};
  ReplayCache r;
  r.cache_ = cache;
  r.dynamic_ = dynamic_cast<DynamicCache<cuda::Backend>*>(cache);
  // The graph writes slots [0, capacity) of every layer's storage: full layers only.
  if (r.dynamic_ != nullptr && r.dynamic_->has_sliding_layers()) return {};
  if (r.dynamic_ == nullptr) r.static_ = dynamic_cast<StaticCache<cuda::Backend>*>(cache);
  if (r.dynamic_ == nullptr && r.static_ == nullptr) return {};
  return r;
}

std::int64_t ReplayCache::capacity(std::int64_t wanted) const {
  return static_ ? std::min(wanted, static_->max_cache_len()) : wanted;
}

void ReplayCache::reserve(std::int64_t capacity) const {
  if (dynamic_) return dynamic_->reserve(capacity);
  KVCACHE_CHECK(capacity <= static_->max_cache_len(), "DecodeGraph: expected at most ",
                static_->max_cache_len(), " slots (the StaticCache's max_cache_len), got ",
                capacity);
}

std::pair<Tensor, Tensor> ReplayCache::storage(int layer) const {
  if (dynamic_) return dynamic_->storage(layer);
  const auto [keys, values] = static_->storage(layer);
  const std::int64_t rows = static_->batch_size();
  return {keys.slice(0, 0, rows), values.slice(0, 0, rows)};
}

void ReplayCache::mark_appended(std::int64_t tokens) const {
  if (dynamic_) return dynamic_->mark_appended(tokens);
  static_->mark_appended(tokens);
}

std::int64_t ReplayCache::batch_size() const {
  return dynamic_ ? dynamic_->batch_size() : static_->batch_size();
}

DecodeGraph::DecodeGraph(const LlamaModel& model, ReplayCache cache, std::int64_t batch,
                         std::int64_t capacity, const GenerationConfig& config)
    : model_(model), cache_(cache), config_(config), batch_(batch), capacity_(capacity) {
  const char* where = "DecodeGraph";
  const auto layers = static_cast<int>(model.layers_.size());
  KVCACHE_CHECK(cache.cache().num_layers() == layers && cache.batch_size() == batch, where,
                ": expected a cache holding the prompt in all ", layers, " layers for batch ",
                batch, ", got ", cache.cache().num_layers(), " layers, batch ", cache.batch_size());
  cache_.reserve(capacity);
  const auto rows = static_cast<std::size_t>(batch);
  ids_at_ = 0;
  positions_at_ = ids_at_ + 8 * rows;
  slot_at_ = positions_at_ + 8 * rows;
  kv_len_at_ = slot_at_ + 8;
  uniforms_at_ = kv_len_at_ + 8;
  inputs_bytes_ = align8(uniforms_at_ + 4 * rows);
  out_at_ = inputs_bytes_;
  mask_at_ = out_at_ + 8 * rows;
  buffer_ = cuda::MirroredBuffer(mask_at_ + rows * static_cast<std::size_t>(capacity));

  replay_.ids = buffer_.device_view(ids_at_, {batch}, DType::kInt64);
  replay_.position_ids = buffer_.device_view(positions_at_, {batch, 1}, DType::kInt64);
  replay_.cache_position = buffer_.device_view(slot_at_, {1}, DType::kInt64);
  replay_.kv_len = buffer_.device_view(kv_len_at_, {1}, DType::kInt64);
  replay_.logits = cuda::empty_persistent({batch, model.config().vocab_size}, DType::kFloat32);
  uniforms_ = buffer_.device_view(uniforms_at_, {batch}, DType::kFloat32);
  out_ids_ = buffer_.device_view(out_at_, {batch}, DType::kInt64);
}

bool DecodeGraph::storage_moved() const {
  for (std::size_t l = 0; l < replay_.storage.size(); ++l) {
    const auto [keys, values] = cache_.storage(static_cast<int>(l));
    if (keys.data() != replay_.storage[l].first.data() ||
        values.data() != replay_.storage[l].second.data() || keys.size(2) < capacity_) {
      return true;
    }
  }
  return replay_.storage.empty();
}

void DecodeGraph::capture(const Tensor& input_ids, const Tensor& attention_mask,
                          std::int64_t cache_position) {
  const char* where = "DecodeGraph";
  cache_.reserve(capacity_);
  // Each layer's storage seen up to the graph's capacity (reserve() may have made more slots):
  // the attention plan, the key count's clamp and the padding mask all span capacity_ slots.
  replay_.storage.clear();
  for (int l = 0; l < cache_.cache().num_layers(); ++l) {
    const auto [keys, values] = cache_.storage(l);
    replay_.storage.emplace_back(keys.slice(2, 0, capacity_), values.slice(2, 0, capacity_));
  }

  // The padding mask for every slot up to the capacity: the step's mask, then ones (each later
  // step's new column); none at all when no row is padded.
  const std::int64_t kv_len = cache_position + 1;
  const std::vector<std::uint8_t> bytes = mask_to_bytes(attention_mask, batch_, kv_len, where);
  const bool padded = std::find(bytes.begin(), bytes.end(), std::uint8_t{0}) != bytes.end();
  replay_.mask = Tensor();
  if (padded) {
    std::uint8_t* mask = buffer_.host() + mask_at_;
    std::fill(mask, mask + batch_ * capacity_, std::uint8_t{1});
    for (std::int64_t b = 0; b < batch_; ++b)
      std::memcpy(mask + b * capacity_, bytes.data() + b * kv_len,
                  static_cast<std::size_t>(kv_len));
    buffer_.send(mask_at_, static_cast<std::size_t>(batch_ * capacity_));
    replay_.mask = buffer_.device_view(mask_at_, {batch_, capacity_}, DType::kUInt8);
  }

  const ForwardArgs args{.input_ids = input_ids,
                         .attention_mask = attention_mask,
                         .cache_position = {cache_position},
                         .past_key_values = &cache_.cache(),
                         .logits_to_keep = 1};
  graph_ = cuda::Graph();
  graph_ = cuda::Graph::capture([&] {
    // The outermost scratch scope of the step: its intermediates are carved from the start of
    // the workspace, the same addresses at every replay.
    const cuda::ScratchScope scratch;
    buffer_.send(0, inputs_bytes_);
    const Tensor logits = model_.forward_on<cuda::Backend>(args, &cache_.cache(), &replay_);
    const Tensor last = last_position(logits);
    const Tensor picked = config_.do_sample ? cuda::sample(last, config_.temperature, config_.top_k,
                                                           config_.top_p, uniforms_)
                                            : cuda::argmax(last);
    cuda::copy(out_ids_, picked);
    buffer_.receive(out_at_, 8 * static_cast<std::size_t>(batch_));
  });
}

std::vector<std::int64_t> DecodeGraph::step(const Tensor& input_ids, const Tensor& attention_mask,
                                            std::int64_t cache_position,
                                            std::span<const float> uniforms) {
  const char* where = "DecodeGraph::step";
  KVCACHE_CHECK(input_ids.defined() && input_ids.device() == Device::kCpu &&
                    input_ids.dtype() == DType::kInt64 && input_ids.rank() == 2 &&
                    input_ids.size(0) == batch_ && input_ids.size(1) == 1,
                where, ": expected input_ids [", batch_, ", 1] int64 on the CPU, got ",
                input_ids.describe());
  const std::int64_t past = cache_.cache().get_seq_length();
  KVCACHE_CHECK(cache_position == past, where, ": expected cache_position ", past,
                " (the cache's length), got ", cache_position);
  KVCACHE_CHECK(past + 1 <= capacity_, where, ": the step reaches ", past + 1, " tokens, past the ",
                capacity_, " the graph was built for");
  KVCACHE_CHECK(!config_.do_sample || static_cast<std::int64_t>(uniforms.size()) == batch_, where,
                ": expected ", batch_, " uniforms (one per row) when sampling, got ",
                uniforms.size());
  // The step's inputs, read by the graph's first node (the host half is free: the last replay
  // has finished). Each id is checked as it is written.
  const Tensor positions = position_ids_from_attention_mask(attention_mask, 1);
  std::uint8_t* host = buffer_.host();
  for (std::int64_t b = 0; b < batch_; ++b) {
    const std::int64_t id = input_ids.data_as<std::int64_t>()[input_ids.offset({b, 0})];
    KVCACHE_CHECK(id >= 0 && id < model_.config().vocab_size, where, ": expected token ids in [0, ",
                  model_.config().vocab_size, "), got ", id, " at row ", b);
    const std::int64_t position = positions.data_as<std::int64_t>()[positions.offset({b, 0})];
    std::memcpy(host + ids_at_ + 8 * b, &id, 8);
    std::memcpy(host + positions_at_ + 8 * b, &position, 8);
  }
  const std::int64_t kv_len = past + 1;
  std::memcpy(host + slot_at_, &past, 8);
  std::memcpy(host + kv_len_at_, &kv_len, 8);
  if (config_.do_sample) std::memcpy(host + uniforms_at_, uniforms.data(), 4 * uniforms.size());
  if (!graph_ || storage_moved()) capture(input_ids, attention_mask, cache_position);

  graph_.replay();
  cuda::synchronize();  // the step's one wait: the chosen ids are in host memory after it
  cache_.mark_appended(1);
  ++replays_;
  std::vector<std::int64_t> next(static_cast<std::size_t>(batch_));
  std::memcpy(next.data(), host + out_at_, 8 * next.size());
  return next;
}

}  // namespace kvcache::detail
