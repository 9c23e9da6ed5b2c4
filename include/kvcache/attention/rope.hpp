// Rotary position embeddings as transformers' Llama family applies them: the rotate_half
// convention (the first and second halves of head_dim form the rotated pairs), inverse
// frequencies and cos/sin computed in float32 and cast to the activations' dtype, applied to q and
// k before the cache update (keys are cached after RoPE). Scaling types: default, linear and
// llama3; other types (yarn, dynamic, longrope) are named in errors until they are implemented.
//
// Position ids come from the attention mask, not from cache_position: a left-padded row's first
// real token has position 0 (cumsum(mask) - 1, padded slots set to 1, as transformers does).
#pragma once

#include <cstdint>
#include <string_view>
#include <utility>
#include <vector>

#include "kvcache/tensor.hpp"

namespace kvcache {

/// RoPE scaling types: none, linear (positions divided by a factor) and llama3 (long
/// wavelengths scaled, short ones kept, a smooth blend between).
enum class RopeType { kDefault, kLinear, kLlama3 };

/// "default", "linear", "llama3" → RopeType; any other name is a kvcache::Error naming it.
RopeType parse_rope_type(std::string_view name);
/// The name parse_rope_type() reads: "default", "linear" or "llama3".
std::string_view rope_type_name(RopeType type);

/// RoPE scaling as config.json's rope_scaling (or rope_parameters) gives it.
struct RopeScaling {
  /// Which scaling: default (none), linear or llama3.
  RopeType type = RopeType::kDefault;
  /// Scaling factor (linear: positions divided by it; llama3: long wavelengths).
  double factor = 1.0;  // linear, llama3
  /// llama3: wavelengths above original_max_position_embeddings / low_freq_factor are scaled.
  double low_freq_factor = 1.0;  // llama3
  /// llama3: wavelengths below original_max_position_embeddings / high_freq_factor are kept.
  double high_freq_factor = 4.0;  // llama3
  /// llama3: the context length the model was trained at.
  std::int64_t original_max_position_embeddings = 8192;  // llama3
};

/// The rotary embedding of a model: head size, base and scaling.
struct RopeOptions {
  /// Elements per head (even); RoPE rotates head_dim / 2 pairs.
  std::int64_t head_dim = 0;
  /// The base of the inverse frequencies, theta^(-2k / head_dim).
  double rope_theta = 10000.0;
  /// Scaling applied to the inverse frequencies.
  RopeScaling scaling{};
};

/// Rotary position embeddings (transformers' LlamaRotaryEmbedding + apply_rotary_pos_emb): the
/// inverse frequencies of a RopeOptions, cos/sin for position ids, and the rotation of q and k.
class RotaryEmbedding {
 public:
  /// Computes the inverse frequencies; throws kvcache::Error for an odd or non-positive head_dim
  /// or scaling values that are not finite and positive.
  explicit RotaryEmbedding(RopeOptions options);

  /// inv_freq[k] for k < head_dim / 2, float32 as transformers computes it (after scaling).
  const std::vector<float>& inv_freq() const { return inv_freq_; }
  /// Factor applied to cos and sin (1 for default, linear and llama3).
  float attention_scaling() const { return attention_scaling_; }
  /// Elements per head.
  std::int64_t head_dim() const { return options_.head_dim; }
  /// The options it was built with.
  const RopeOptions& options() const { return options_; }

  /// cos and sin for `position_ids` [batch, q_len] (int64), each [batch, q_len, head_dim] in
  /// `dtype` (computed in float32, then cast).
  std::pair<Tensor, Tensor> cos_sin(const Tensor& position_ids, DType dtype) const;

  /// Rotates `x` [batch, heads, q_len, head_dim] in place for `position_ids` [batch, q_len].
  void apply(const Tensor& x, const Tensor& position_ids) const;

  /// Rotates `x` [batch, heads, q_len, head_dim] in place with precomputed cos/sin
  /// [batch, q_len, head_dim] of x's dtype: x·cos + rotate_half(x)·sin, rounding each product and
  /// the sum to x's dtype as torch does.
  static void apply_rotary(const Tensor& x, const Tensor& cos, const Tensor& sin);

 private:
  RopeOptions options_;
  std::vector<float> inv_freq_;
  float attention_scaling_ = 1.0f;
};

/// Position ids of a (left-)padded batch: cumsum(attention_mask, -1) - 1 with padded slots set to
/// 1, [batch, length] int64. With q_len >= 0, only the last q_len columns (the new tokens of a
/// step).
Tensor position_ids_from_attention_mask(const Tensor& attention_mask, std::int64_t q_len = -1);

/// The next decode step's position ids: last column + 1 per row, [batch, 1] int64.
Tensor next_position_ids(const Tensor& position_ids);

}  // namespace kvcache
