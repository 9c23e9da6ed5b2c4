// The model configuration, read from a Hugging Face config.json: LlamaForCausalLM,
// Qwen2ForCausalLM and MistralForCausalLM. Both RoPE forms are understood: the older top-level
// `rope_theta` + `rope_scaling`, and transformers 5's `rope_parameters`. Unknown architectures,
// activations and RoPE types are errors that name them.
#pragma once

#include <cstdint>
#include <optional>
#include <string>
#include <vector>

#include "kvcache/attention/rope.hpp"
#include "kvcache/tensor.hpp"

namespace kvcache {

class GgufFile;

/// A model's configuration: config.json's fields (or a GGUF file's llama.* metadata), resolved
/// as transformers resolves them.
struct ModelConfig {
  /// config.json's architectures[0].
  std::string architecture{};  // "LlamaForCausalLM", "Qwen2ForCausalLM", "MistralForCausalLM"
  /// config.json's model_type.
  std::string model_type{};  // "llama", "qwen2", "mistral"
  /// Tokens in the vocabulary (rows of the embedding and of the LM head).
  std::int64_t vocab_size = 0;
  /// Width of the residual stream.
  std::int64_t hidden_size = 0;
  /// Width of the MLP's gate and up projections.
  std::int64_t intermediate_size = 0;
  /// Decoder layers.
  std::int64_t num_hidden_layers = 0;
  /// Query heads per layer.
  std::int64_t num_attention_heads = 0;
  /// Key/value heads per layer (num_attention_heads when the config does not say).
  std::int64_t num_key_value_heads = 0;  // defaults to num_attention_heads
  /// Elements per head (hidden_size / num_attention_heads when the config does not say).
  std::int64_t head_dim = 0;  // defaults to hidden_size / num_attention_heads
  /// The context length the model was trained for (informational; not enforced).
  std::int64_t max_position_embeddings = 0;
  /// RMSNorm's epsilon.
  double rms_norm_eps = 1e-6;
  /// The MLP's activation; only "silu" is served.
  std::string hidden_act = "silu";  // only silu is served
  /// Whether the LM head is the embedding matrix.
  bool tie_word_embeddings = false;
  /// config.json's attention_bias: q/k/v/o biases (Llama).
  bool attention_bias = false;  // q/k/v/o biases (Llama); Qwen2 always has q/k/v biases
  /// config.json's mlp_bias: gate/up/down biases.
  bool mlp_bias = false;
  /// Resolved: whether the q/k/v projections carry biases (Qwen2 always).
  bool qkv_bias = false;  // resolved: whether q/k/v projections carry biases
  /// Resolved: whether o_proj carries a bias.
  bool o_bias = false;  // resolved: whether o_proj carries a bias
  /// The attention window of the sliding layers (Mistral; Qwen2 with use_sliding_window).
  std::optional<std::int64_t> sliding_window{};  // Mistral (and Qwen2 when use_sliding_window)
  /// Per layer, as transformers resolves it: "full_attention" or "sliding_attention". Mistral
  /// slides every layer when sliding_window is set; Qwen2 only layers >= max_window_layers (or as
  /// its config's own layer_types says); Llama none.
  std::vector<std::string> layer_types{};
  /// The rotary embedding: head_dim, rope_theta and scaling.
  RopeOptions rope{};  // head_dim, theta, scaling
  /// The BOS id, if the config names one.
  std::optional<std::int64_t> bos_token_id{};
  /// The EOS ids (config.json's eos_token_id may be one id or a list); generate() stops rows at
  /// these when GenerationConfig::eos_token_ids is set from them.
  std::vector<std::int64_t> eos_token_ids{};  // eos_token_id may be an int or a list
  /// The padding id, if the config names one.
  std::optional<std::int64_t> pad_token_id{};
  /// The weights' dtype as config.json names it ("dtype" / "torch_dtype"), when present.
  std::optional<DType> torch_dtype{};  // "dtype" / "torch_dtype" when present

  /// The window layer `layer_idx` attends over, or none for full attention (and for layers the
  /// config does not have). Without layer_types (a config built by hand; the loaders always fill
  /// it) every layer slides when sliding_window is set.
  std::optional<std::int64_t> layer_sliding_window(std::int64_t layer_idx) const {
    const auto i = static_cast<std::size_t>(layer_idx);
    if (!sliding_window || layer_idx < 0 || layer_idx >= num_hidden_layers) return std::nullopt;
    if (layer_types.empty()) return sliding_window;
    if (i >= layer_types.size()) return std::nullopt;
    return layer_types[i] == "sliding_attention" ? sliding_window : std::nullopt;
  }

  /// One entry per layer: its sliding window, or 0 for full attention. What
  /// DynamicCacheOptions::sliding_windows takes to give the model's sliding layers sliding cache
  /// layers (transformers' DynamicCache(config=config)).
  std::vector<std::int64_t> sliding_windows() const {
    std::vector<std::int64_t> windows;
    for (std::int64_t l = 0; l < num_hidden_layers; ++l)
      windows.push_back(layer_sliding_window(l).value_or(0));
    return windows;
  }

  /// The most layers a config may declare (checked before anything is built per layer; the
  /// largest released Llama-family models have about 130).
  static constexpr std::int64_t kMaxLayers = 4096;

  /// Throws kvcache::Error starting with `where` unless the config is one the model can run:
  /// positive sizes (layers at most kMaxLayers), heads that divide, an even head_dim, products
  /// that fit, rms_norm_eps and rope_theta finite and > 0, bos/eos/pad ids inside the
  /// vocabulary. from_json and from_gguf both end with it, so both loaders refuse alike.
  void validate(const std::string& where) const;

  /// Parses config.json text; `where` names the source in errors.
  static ModelConfig from_json(const std::string& text, const std::string& where = "config.json");
  /// Reads and parses a config.json file.
  static ModelConfig from_file(const std::string& path);
  /// The config of a llama-architecture GGUF file, from its `llama.*` and `tokenizer.ggml.*`
  /// metadata (tied embeddings when it has no output.weight tensor).
  static ModelConfig from_gguf(const GgufFile& file);
};

}  // namespace kvcache
