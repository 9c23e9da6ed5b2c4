// Loading and running Llama-family models on the CPU. The forward pass reads top to bottom like
// transformers' LlamaModel.forward: embed, then per layer RMSNorm → q/k/v → RoPE → attention
// through the cache → o_proj → residual → RMSNorm → SiLU MLP → residual, then the final norm and
// the LM head for the kept positions.
#include "kvcache/model/llama.hpp"

#include <cstdint>
#include <map>
#include <random>

#include "kvcache/attention/attention.hpp"
#include "kvcache/attention/mask.hpp"
#include "kvcache/attention/rope.hpp"
#include "kvcache/cache/dynamic_cache.hpp"
#include "kvcache/error.hpp"
#include "kvcache/model/safetensors.hpp"

namespace kvcache {
namespace {

using WeightMap = std::map<std::string, cpu::Weight>;

std::string shape_text(std::span<const std::int64_t> shape) {
  std::string text = "[";
  for (std::size_t i = 0; i < shape.size(); ++i) text += (i ? ", " : "") + std::to_string(shape[i]);
  return text + "]";
}

// Looks a parameter up; the error names it and what the architecture expected.
const cpu::Weight& find(const WeightMap& weights, const std::string& name,
                        const std::string& where) {
  auto it = weights.find(name);
  KVCACHE_CHECK(it != weights.end(), where, ": expected tensor '", name,
                "', which the checkpoint does not hold");
  return it->second;
}

// A weight matrix [rows, cols], dense in a float dtype or quantized.
cpu::Weight require_matrix(const WeightMap& weights, const std::string& name, std::int64_t rows,
                           std::int64_t cols, const std::string& where) {
  const cpu::Weight& w = find(weights, name, where);
  const std::int64_t want[] = {rows, cols};
  if (w.is_quantized()) {
    KVCACHE_CHECK(w.rows() == rows && w.cols() == cols, where, ": expected '", name, "' shaped ",
                  shape_text(want), ", got ", w.describe());
    return w;
  }
  const Tensor& t = w.dense();
  KVCACHE_CHECK(t.rank() == 2 && t.size(0) == rows && t.size(1) == cols, where, ": expected '",
                name, "' shaped ", shape_text(want), ", got ", t.shape_string());
  KVCACHE_CHECK(is_floating(t.dtype()), where, ": expected '", name, "' in a float dtype, got ",
                dtype_name(t.dtype()));
  return w;
}

// A vector [size] (norm weights, biases): always dense.
Tensor require_vector(const WeightMap& weights, const std::string& name, std::int64_t size,
                      const std::string& where) {
  const cpu::Weight& w = find(weights, name, where);
  KVCACHE_CHECK(!w.is_quantized(), where, ": expected '", name,
                "' as a float vector, got a quantized ", w.describe());
  const Tensor& t = w.dense();
  KVCACHE_CHECK(t.rank() == 1 && t.size(0) == size, where, ": expected '", name, "' shaped [", size,
                "], got ", t.shape_string());
  KVCACHE_CHECK(is_floating(t.dtype()), where, ": expected '", name, "' in a float dtype, got ",
                dtype_name(t.dtype()));
  return t;
}

// A weight matrix as the model holds it. Quantized: kept, or dequantized when a dtype is asked
// for. Dense: quantized when asked for; else in `dtype` when given, else as stored — float32 data
// is used in place when 4-byte aligned (safetensors does not promise alignment), else copied.
cpu::Weight hold_matrix(const cpu::Weight& w, const LoadOptions& options) {
  if (w.is_quantized()) {
    if (!options.dtype) return w;
    const Tensor dense = w.quantized().dequantize();
    return *options.dtype == DType::kFloat32 ? dense : cpu::cast(dense, *options.dtype);
  }
  const Tensor& t = w.dense();
  if (options.quantize) return cpu::QuantizedMatrix::quantize(t, *options.quantize);
  const DType target = options.dtype.value_or(t.dtype());
  const bool aligned = reinterpret_cast<std::uintptr_t>(t.data()) % dtype_size(target) == 0;
  if (target == t.dtype() && aligned && t.is_contiguous()) return t;
  return cpu::cast(t, target);
}

// Small vectors (norms, biases) are always float32.
Tensor hold_vector(const Tensor& t) {
  return t.dtype() == DType::kFloat32 ? cpu::clone(t) : cpu::cast(t, DType::kFloat32);
}

Tensor optional_vector(const WeightMap& weights, const std::string& name, bool wanted,
                       std::int64_t size, const std::string& where) {
  if (!wanted) return Tensor();
  return hold_vector(require_vector(weights, name, size, where));
}

}  // namespace

LlamaModel LlamaModel::from_pretrained(const std::string& dir, LoadOptions options) {
  if (dir.size() > 5 && dir.compare(dir.size() - 5, 5, ".gguf") == 0)
    return from_gguf(dir, options);
  ModelConfig config = ModelConfig::from_file(dir + "/config.json");
  const SafetensorsCheckpoint checkpoint = SafetensorsCheckpoint::open(dir);
  std::vector<std::pair<std::string, Tensor>> weights;
  for (const std::string& name : checkpoint.names())
    weights.emplace_back(name, checkpoint.tensor(name));
  return from_weights(std::move(config), weights, options);
}

LlamaModel LlamaModel::from_weights(ModelConfig config,
                                    const std::vector<std::pair<std::string, Tensor>>& list,
                                    LoadOptions options) {
  return from_weights(std::move(config),
                      std::vector<std::pair<std::string, cpu::Weight>>(list.begin(), list.end()),
                      options);
}

LlamaModel LlamaModel::from_weights(ModelConfig config,
                                    const std::vector<std::pair<std::string, cpu::Weight>>& list,
                                    LoadOptions options) {
  const std::string where = "LlamaModel(" + config.architecture + ")";
  KVCACHE_CHECK(!options.dtype || is_floating(*options.dtype), where,
                ": expected a float weight dtype, got ", dtype_name(*options.dtype));
  KVCACHE_CHECK(!options.dtype || !options.quantize, where, ": LoadOptions asks for both a dtype (",
                dtype_name(*options.dtype), ") and quantization; choose one");
  WeightMap weights(list.begin(), list.end());
  const ModelConfig& c = config;
  const std::int64_t hidden = c.hidden_size, inter = c.intermediate_size, hd = c.head_dim;
  const std::int64_t q_out = c.num_attention_heads * hd, kv_out = c.num_key_value_heads * hd;

  LlamaModel model;
  model.embed_tokens_ = hold_matrix(
      require_matrix(weights, "model.embed_tokens.weight", c.vocab_size, hidden, where), options);
  model.final_norm_ = hold_vector(require_vector(weights, "model.norm.weight", hidden, where));
  if (c.tie_word_embeddings) {
    model.lm_head_ = model.embed_tokens_;
  } else {
    model.lm_head_ = hold_matrix(
        require_matrix(weights, "lm_head.weight", c.vocab_size, hidden, where), options);
  }
  for (std::int64_t l = 0; l < c.num_hidden_layers; ++l) {
    const std::string p = "model.layers." + std::to_string(l) + ".";
    // Matrices [rows, cols] in the requested dtype; vectors [n] in float32 when `wanted`.
    auto matrix = [&](const std::string& name, std::int64_t rows, std::int64_t cols) {
      return hold_matrix(require_matrix(weights, p + name, rows, cols, where), options);
    };
    auto vector = [&](const std::string& name, bool wanted, std::int64_t n) {
      return optional_vector(weights, p + name, wanted, n, where);
    };
    Layer layer;
    layer.input_norm = vector("input_layernorm.weight", true, hidden);
    layer.post_norm = vector("post_attention_layernorm.weight", true, hidden);
    layer.q = matrix("self_attn.q_proj.weight", q_out, hidden);
    layer.k = matrix("self_attn.k_proj.weight", kv_out, hidden);
    layer.v = matrix("self_attn.v_proj.weight", kv_out, hidden);
    layer.o = matrix("self_attn.o_proj.weight", hidden, q_out);
    layer.q_bias = vector("self_attn.q_proj.bias", c.qkv_bias, q_out);
    layer.k_bias = vector("self_attn.k_proj.bias", c.qkv_bias, kv_out);
    layer.v_bias = vector("self_attn.v_proj.bias", c.qkv_bias, kv_out);
    layer.o_bias = vector("self_attn.o_proj.bias", c.o_bias, hidden);
    layer.gate = matrix("mlp.gate_proj.weight", inter, hidden);
    layer.up = matrix("mlp.up_proj.weight", inter, hidden);
    layer.down = matrix("mlp.down_proj.weight", hidden, inter);
    layer.gate_bias = vector("mlp.gate_proj.bias", c.mlp_bias, inter);
    layer.up_bias = vector("mlp.up_proj.bias", c.mlp_bias, inter);
    layer.down_bias = vector("mlp.down_proj.bias", c.mlp_bias, hidden);
    model.layers_.push_back(std::move(layer));
  }
  model.config_ = std::move(config);
  return model;
}

std::size_t LlamaModel::weight_bytes() const {
  std::size_t total = embed_tokens_.nbytes() + final_norm_.nbytes();
  if (lm_head_.data() != embed_tokens_.data()) total += lm_head_.nbytes();
  for (const Layer& l : layers_) {
    for (const cpu::Weight* w : {&l.q, &l.k, &l.v, &l.o, &l.gate, &l.up, &l.down})
      total += w->nbytes();
    for (const Tensor* t : {&l.input_norm, &l.post_norm, &l.q_bias, &l.k_bias, &l.v_bias, &l.o_bias,
                            &l.gate_bias, &l.up_bias, &l.down_bias}) {
      if (t->defined()) total += t->nbytes();
    }
  }
  return total;
}

Tensor LlamaModel::forward(const ForwardArgs& args) const {
  const char* where = "LlamaModel::forward";
  const ModelConfig& c = config_;
  const Tensor& ids = args.input_ids;
  KVCACHE_CHECK(ids.defined() && ids.rank() == 2 && ids.dtype() == DType::kInt64 &&
                    ids.device() == Device::kCpu,
                where, ": expected input_ids [batch, q_len] int64 on the CPU, got ",
                ids.describe());
  const std::int64_t batch = ids.size(0), q_len = ids.size(1);
  KVCACHE_CHECK(batch > 0 && q_len > 0, where, ": expected at least one row and one token, got ",
                ids.shape_string());

  DynamicCache<> local_cache;
  Cache<cpu::Backend>* cache =
      args.past_key_values && args.use_cache ? args.past_key_values : &local_cache;
  // use_cache = false with a cache given: attend over a copy of it and leave it unchanged.
  if (args.past_key_values && !args.use_cache) {
    const auto* dynamic = dynamic_cast<const DynamicCache<>*>(args.past_key_values);
    KVCACHE_CHECK(dynamic != nullptr, where,
                  ": use_cache=false with a non-dynamic cache is not supported");
    local_cache = DynamicCache<>::from_legacy_cache(dynamic->to_legacy_cache());
  }
  const std::int64_t past = cache->get_seq_length(0);

  std::vector<std::int64_t> cache_position = args.cache_position;
  if (cache_position.empty()) cache_position = make_cache_position(past, q_len);
  KVCACHE_CHECK(static_cast<std::int64_t>(cache_position.size()) == q_len, where, ": expected ",
                q_len, " cache positions (one per input token), got ", cache_position.size());
  // Layers with a sliding window (Mistral; Qwen2's upper layers when enabled) would attend to
  // fewer keys than a DynamicCache holds once the sequence passes the window.
  for (std::int64_t l = 0; l < c.num_hidden_layers; ++l) {
    const std::optional<std::int64_t> window =
        c.layer_types.empty() ? c.sliding_window : c.layer_sliding_window(l);
    KVCACHE_CHECK(!window || cache_position.back() < *window, where, ": layer ", l, " of this ",
                  c.architecture, " uses a sliding window of ", *window,
                  " tokens and the sequence reaches ", cache_position.back() + 1,
                  "; kvcache has no sliding-window cache yet, and full attention past the window "
                  "would silently "
                  "differ from the model");
  }
  Tensor mask =
      args.attention_mask.defined() ? args.attention_mask : ones_mask(batch, past + q_len);
  // Checked here, before layer 0 touches the cache: a step that fails halfway through the layers
  // would leave the first layers' caches a token longer than the rest.
  mask_to_bytes(mask, batch, past + q_len, where);
  check_cache_position(cache_position, q_len, past + q_len, 0, where);
  Tensor position_ids = args.position_ids;
  if (!position_ids.defined()) {
    KVCACHE_CHECK(mask.rank() == 2 && mask.size(1) >= q_len, where,
                  ": expected attention_mask [batch, past + ", q_len, "], got ",
                  mask.shape_string());
    position_ids = position_ids_from_attention_mask(mask, q_len);
  }
  KVCACHE_CHECK(
      position_ids.rank() == 2 && position_ids.size(0) == batch && position_ids.size(1) == q_len,
      where, ": expected position_ids [", batch, ", ", q_len, "], got ",
      position_ids.shape_string());

  const std::int64_t heads = c.num_attention_heads, kv_heads = c.num_key_value_heads,
                     hd = c.head_dim;
  const RotaryEmbedding rope(c.rope);
  const auto [cos, sin] = rope.cos_sin(position_ids, DType::kFloat32);
  Tensor hidden = cpu::embedding(embed_tokens_, cpu::clone(ids));  // [batch * q_len, hidden]

  for (std::size_t l = 0; l < layers_.size(); ++l) {
    const Layer& w = layers_[l];
    const Tensor x = cpu::rms_norm(hidden, w.input_norm, static_cast<float>(c.rms_norm_eps));
    // Projections come out [batch * q_len, heads * head_dim]; viewed as [batch, heads, q_len, hd].
    const cpu::Weight* qkv[] = {&w.q, &w.k, &w.v};
    const Tensor* qkv_bias[] = {&w.q_bias, &w.k_bias, &w.v_bias};
    const std::vector<Tensor> proj = cpu::linear_fused(x, qkv, qkv_bias);
    const Tensor q = proj[0].view({batch, q_len, heads, hd}).transpose(1, 2);
    const Tensor k = proj[1].view({batch, q_len, kv_heads, hd}).transpose(1, 2);
    const Tensor v = proj[2].view({batch, q_len, kv_heads, hd}).transpose(1, 2);
    RotaryEmbedding::apply_rotary(q, cos, sin);
    RotaryEmbedding::apply_rotary(k, cos, sin);
    const Attention attention(static_cast<int>(l),
                              {.num_heads = heads, .num_kv_heads = kv_heads, .head_dim = hd});
    const Tensor attn =
        attention.forward(q, k, v, *cache, mask, cache_position);  // [batch, q_len, heads, hd]
    cpu::add_inplace(hidden, cpu::linear(attn.view({batch * q_len, heads * hd}), w.o, w.o_bias));

    const Tensor y = cpu::rms_norm(hidden, w.post_norm, static_cast<float>(c.rms_norm_eps));
    const cpu::Weight* gate_up[] = {&w.gate, &w.up};
    const Tensor* gate_up_bias[] = {&w.gate_bias, &w.up_bias};
    const std::vector<Tensor> mlp = cpu::linear_fused(y, gate_up, gate_up_bias);
    const Tensor act = cpu::silu_mul(mlp[0], mlp[1]);
    cpu::add_inplace(hidden, cpu::linear(act, w.down, w.down_bias));
  }

  // The LM head only for the last `keep` positions of every row.
  const std::int64_t keep = args.logits_to_keep > 0 ? std::min(args.logits_to_keep, q_len) : q_len;
  Tensor last = Tensor::empty({batch * keep, c.hidden_size}, DType::kFloat32);
  for (std::int64_t b = 0; b < batch; ++b) {
    cpu::copy(last.slice(0, b * keep, (b + 1) * keep),
              hidden.slice(0, b * q_len + q_len - keep, (b + 1) * q_len));
  }
  const Tensor normed = cpu::rms_norm(last, final_norm_, static_cast<float>(c.rms_norm_eps));
  return cpu::linear(normed, lm_head_).view({batch, keep, c.vocab_size});
}

std::vector<std::pair<std::string, Tensor>> random_llama_weights(const ModelConfig& c,
                                                                 std::uint64_t seed, DType dtype,
                                                                 float scale) {
  std::mt19937_64 rng(seed);
  std::uniform_real_distribution<float> dist(-scale, scale);
  std::vector<std::pair<std::string, Tensor>> out;
  auto add = [&](const std::string& name, std::initializer_list<std::int64_t> shape, float center) {
    Tensor t = Tensor::empty(shape, DType::kFloat32);
    for (std::int64_t i = 0; i < t.numel(); ++i) t.data_as<float>()[i] = center + dist(rng);
    out.emplace_back(name, dtype == DType::kFloat32 ? t : cpu::cast(t, dtype));
  };
  const std::int64_t h = c.hidden_size, inter = c.intermediate_size,
                     q_out = c.num_attention_heads * c.head_dim,
                     kv_out = c.num_key_value_heads * c.head_dim;
  add("model.embed_tokens.weight", {c.vocab_size, h}, 0.0f);
  add("model.norm.weight", {h}, 1.0f);
  if (!c.tie_word_embeddings) add("lm_head.weight", {c.vocab_size, h}, 0.0f);
  for (std::int64_t l = 0; l < c.num_hidden_layers; ++l) {
    const std::string p = "model.layers." + std::to_string(l) + ".";
    add(p + "input_layernorm.weight", {h}, 1.0f);
    add(p + "post_attention_layernorm.weight", {h}, 1.0f);
    add(p + "self_attn.q_proj.weight", {q_out, h}, 0.0f);
    add(p + "self_attn.k_proj.weight", {kv_out, h}, 0.0f);
    add(p + "self_attn.v_proj.weight", {kv_out, h}, 0.0f);
    add(p + "self_attn.o_proj.weight", {h, q_out}, 0.0f);
    if (c.qkv_bias) {
      add(p + "self_attn.q_proj.bias", {q_out}, 0.0f);
      add(p + "self_attn.k_proj.bias", {kv_out}, 0.0f);
      add(p + "self_attn.v_proj.bias", {kv_out}, 0.0f);
    }
    if (c.o_bias) add(p + "self_attn.o_proj.bias", {h}, 0.0f);
    add(p + "mlp.gate_proj.weight", {inter, h}, 0.0f);
    add(p + "mlp.up_proj.weight", {inter, h}, 0.0f);
    add(p + "mlp.down_proj.weight", {h, inter}, 0.0f);
    if (c.mlp_bias) {
      add(p + "mlp.gate_proj.bias", {inter}, 0.0f);
      add(p + "mlp.up_proj.bias", {inter}, 0.0f);
      add(p + "mlp.down_proj.bias", {h}, 0.0f);
    }
  }
  return out;
}

std::vector<std::int64_t> argmax_last(const Tensor& logits) {
  KVCACHE_CHECK(logits.defined() && logits.rank() == 3 && logits.dtype() == DType::kFloat32 &&
                    logits.size(1) > 0,
                "argmax_last: expected logits [batch, positions, vocab] float32, got ",
                logits.describe());
  std::vector<std::int64_t> out;
  const std::int64_t vocab = logits.size(2);
  for (std::int64_t b = 0; b < logits.size(0); ++b) {
    const float* row = logits.data_as<float>() + logits.offset({b, logits.size(1) - 1, 0});
    std::int64_t best = 0;
    for (std::int64_t i = 1; i < vocab; ++i) {
      if (row[i] > row[best]) best = i;  // first maximum, as torch.argmax
    }
    out.push_back(best);
  }
  return out;
}

}  // namespace kvcache
