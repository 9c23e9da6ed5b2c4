// Attention-mask checks and helpers. The attention kernels never see a materialised 4D mask: they
// read the 2D padding mask as bytes and compare slots with cache_position on the fly.
#include "kvcache/attention/mask.hpp"

#include <algorithm>
#include <numeric>

#include "kvcache/backend/cpu.hpp"
#include "kvcache/error.hpp"

namespace kvcache {

std::vector<std::uint8_t> mask_to_bytes(const Tensor& attention_mask, std::int64_t batch,
                                        std::int64_t kv_length, const char* where) {
  if (!attention_mask.defined()) return {};
  KVCACHE_CHECK(attention_mask.rank() == 2 && attention_mask.size(0) == batch &&
                    attention_mask.size(1) == kv_length,
                where, ": expected attention_mask [batch, past + new] = [", batch, ", ", kv_length,
                "], got ", attention_mask.shape_string());
  KVCACHE_CHECK(attention_mask.device() == Device::kCpu, where,
                ": expected attention_mask on the CPU, got ", attention_mask.describe());
  const DType dt = attention_mask.dtype();
  KVCACHE_CHECK(dt == DType::kInt64 || dt == DType::kInt32 || dt == DType::kUInt8, where,
                ": expected an int64, int32 or uint8 attention_mask, got ", dtype_name(dt));
  // Values other than 0 and 1 are not masks (a float mask of -inf / 0 cast to ints, say); uint8
  // masks are read as booleans.
  Tensor wide = cpu::cast(attention_mask, DType::kInt64);
  const auto* v = wide.data_as<std::int64_t>();
  std::vector<std::uint8_t> out(static_cast<std::size_t>(batch * kv_length));
  for (std::size_t i = 0; i < out.size(); ++i) {
    KVCACHE_CHECK(dt == DType::kUInt8 || v[i] == 0 || v[i] == 1, where,
                  ": expected attention_mask values 0 or 1, got ", v[i], " at row ",
                  static_cast<std::int64_t>(i) / kv_length, ", column ",
                  static_cast<std::int64_t>(i) % kv_length);
    out[i] = v[i] != 0 ? 1 : 0;
  }
  return out;
}

void check_cache_position(std::span<const std::int64_t> cache_position, std::int64_t q_len,
                          std::int64_t kv_length, std::int64_t kv_offset, const char* where) {
  KVCACHE_CHECK(static_cast<std::int64_t>(cache_position.size()) == q_len, where, ": expected ",
                q_len, " cache positions (one per new token), got ", cache_position.size());
  for (std::size_t i = 0; i < cache_position.size(); ++i) {
    KVCACHE_CHECK(cache_position[i] >= 0 && cache_position[i] < kv_offset + kv_length, where,
                  ": expected cache_position in [0, ", kv_offset + kv_length,
                  ") (past + new), got ", cache_position[i], " at index ", i);
  }
}

void check_keys_held(std::span<const std::int64_t> cache_position, std::int64_t kv_offset,
                     std::optional<std::int64_t> sliding_window, int layer_idx, const char* where) {
  if (kv_offset <= 0 || cache_position.empty()) return;
  const std::int64_t first_query = *std::min_element(cache_position.begin(), cache_position.end());
  // The first slot a query sees; a difference of non-negative values, so no overflow.
  const std::int64_t needed =
      sliding_window ? std::max<std::int64_t>(first_query - *sliding_window + 1, 0) : 0;
  if (kv_offset <= needed) return;
  if (sliding_window) {
    KVCACHE_FAIL(where, ": layer ", layer_idx, " attends over a sliding window of ",
                 *sliding_window, " tokens, so the query at slot ", first_query,
                 " sees slots from ", needed, ", but the cache's layer holds keys from slot ",
                 kv_offset, " only (a sliding-window cache layer of a smaller window?)");
  }
  KVCACHE_FAIL(where, ": layer ", layer_idx,
               " attends over every earlier slot (no sliding window), but the cache's layer holds "
               "keys from slot ",
               kv_offset, " only (a sliding-window cache layer under a full-attention layer)");
}

Tensor make_attention_mask(const Tensor& attention_mask,
                           std::span<const std::int64_t> cache_position, std::int64_t batch,
                           std::int64_t kv_length, std::int64_t kv_offset) {
  const auto q_len = static_cast<std::int64_t>(cache_position.size());
  const std::vector<std::uint8_t> padding =
      mask_to_bytes(attention_mask, batch, kv_length, "make_attention_mask");
  Tensor out = Tensor::empty({batch, q_len, kv_length}, DType::kUInt8);
  auto* o = out.data_as<std::uint8_t>();
  for (std::int64_t b = 0; b < batch; ++b)
    for (std::int64_t i = 0; i < q_len; ++i)
      for (std::int64_t j = 0; j < kv_length; ++j) {
        const bool causal = kv_offset + j <= cache_position[static_cast<std::size_t>(i)];
        const bool attend =
            padding.empty() || padding[static_cast<std::size_t>(b * kv_length + j)] != 0;
        o[(b * q_len + i) * kv_length + j] = causal && attend ? 1 : 0;
      }
  return out;
}

Tensor ones_mask(std::int64_t batch, std::int64_t length) {
  Tensor out = Tensor::empty({batch, length}, DType::kInt64);
  std::fill_n(out.data_as<std::int64_t>(), out.numel(), std::int64_t{1});
  return out;
}

Tensor extend_attention_mask(const Tensor& attention_mask, std::int64_t new_columns) {
  KVCACHE_CHECK(attention_mask.defined() && attention_mask.rank() == 2,
                "extend_attention_mask: expected a [batch, length] mask, got ",
                attention_mask.describe());
  KVCACHE_CHECK(new_columns >= 0, "extend_attention_mask: expected new_columns >= 0, got ",
                new_columns);
  const std::int64_t batch = attention_mask.size(0), length = attention_mask.size(1);
  Tensor out = ones_mask(batch, length + new_columns);
  cpu::copy(out.slice(1, 0, length), cpu::cast(attention_mask, DType::kInt64));
  return out;
}

std::vector<std::int64_t> make_cache_position(std::int64_t start, std::int64_t q_len) {
  KVCACHE_CHECK(start >= 0 && q_len >= 0,
                "make_cache_position: expected start >= 0 and q_len >= 0, got ", start, " and ",
                q_len);
  std::vector<std::int64_t> out(static_cast<std::size_t>(q_len));
  std::iota(out.begin(), out.end(), start);
  return out;
}

}  // namespace kvcache
