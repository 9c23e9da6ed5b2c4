// The attention mask of a step, from the two things a generation loop tracks: the 2D
// attention_mask [batch, past + new] (1 = attend, 0 = padding) and cache_position [q_len] (the
// absolute cache slot of each new token, shared by the batch and unaffected by padding). Key slot
// j is visible to query i when j <= cache_position[i] and attention_mask[b, j] != 0, and, for a
// layer with a sliding window W, j > cache_position[i] - W.
#pragma once

#include <cstdint>
#include <optional>
#include <span>
#include <vector>

#include "kvcache/tensor.hpp"

namespace kvcache {

/// Checks a 2D attention mask against [batch, kv_length] and returns it as bytes (1 = attend),
/// row-major. An undefined mask means "no padding" and gives an empty vector. Accepts int64,
/// int32 and uint8 masks on the CPU; `where` names the caller in error messages.
std::vector<std::uint8_t> mask_to_bytes(const Tensor& attention_mask, std::int64_t batch,
                                        std::int64_t kv_length, const char* where);

/// Checks cache_position: q_len entries, non-negative, each below kv_offset + kv_length.
void check_cache_position(std::span<const std::int64_t> cache_position, std::int64_t q_len,
                          std::int64_t kv_length, std::int64_t kv_offset, const char* where);

/// Checks that a cache layer whose keys start at absolute slot kv_offset (get_mask_sizes) still
/// holds every slot the queries at cache_position can see: from min(cache_position) -
/// sliding_window + 1 with a window, from slot 0 without one. A layer that dropped keys a query
/// attends to (a sliding-window layer under a model with a larger window, or none) is a
/// kvcache::Error naming layer_idx, never a silently different result.
void check_keys_held(std::span<const std::int64_t> cache_position, std::int64_t kv_offset,
                     std::optional<std::int64_t> sliding_window, int layer_idx, const char* where);

/// The full boolean mask the attention applies, [batch, q_len, kv_length] uint8 (1 = visible),
/// for inspection and for callers who run their own attention.
Tensor make_attention_mask(const Tensor& attention_mask,
                           std::span<const std::int64_t> cache_position, std::int64_t batch,
                           std::int64_t kv_length, std::int64_t kv_offset = 0);

/// A [batch, length] int64 mask of ones: every slot attends.
Tensor ones_mask(std::int64_t batch, std::int64_t length);

/// The seed's mask growth: `attention_mask` with `new_columns` columns of ones appended.
Tensor extend_attention_mask(const Tensor& attention_mask, std::int64_t new_columns = 1);

/// cache_position for a step: [start, start + q_len).
std::vector<std::int64_t> make_cache_position(std::int64_t start, std::int64_t q_len);

}  // namespace kvcache
