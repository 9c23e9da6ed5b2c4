// ModelConfig from a Hugging Face config.json. Keys are read as transformers reads them for
// LlamaForCausalLM, Qwen2ForCausalLM and MistralForCausalLM (its defaults where a key may be left
// out), and everything the model code relies on is checked here, so a bad config fails at load
// with the file and the key named rather than as a shape error deep in a forward pass.
#include "kvcache/model/config.hpp"

#include <cmath>
#include <nlohmann/json.hpp>
#include <sstream>
#include <string_view>
#include <utility>

#include "../io_util.hpp"
#include "kvcache/error.hpp"

namespace kvcache {
namespace {

using Json = nlohmann::json;

enum class Family { kLlama, kQwen2, kMistral };

// A JSON value for error messages, cut short so a huge value cannot flood the message.
std::string show(const Json& value) { return detail::show_json(value); }

// Typed reads from one JSON object; errors name the file and the key (with `prefix` for nested
// objects, e.g. "rope_scaling.factor").
class Reader {
 public:
  Reader(const Json& object, const std::string& where, std::string prefix = "")
      : object_(object), where_(where), prefix_(std::move(prefix)) {}

  // The value at `key`, or nullptr when absent or null (transformers treats both as "not set").
  const Json* find(const std::string& key) const {
    const auto it = object_.find(key);
    return it == object_.end() || it->is_null() ? nullptr : &*it;
  }

  [[noreturn]] void fail(const std::string& key, std::string_view expected, const Json& got) const {
    KVCACHE_FAIL("config ", where_, ": key '", prefix_, key, "': expected ", expected, ", got ",
                 show(got));
  }
  [[noreturn]] void missing(const std::string& key, std::string_view expected) const {
    KVCACHE_FAIL("config ", where_, ": missing key '", prefix_, key, "' (expected ", expected, ")");
  }
  // An error about the value at `key` that is not a type mismatch (out of range, unsupported).
  template <class... Parts>
  [[noreturn]] void bad(const std::string& key, Parts&&... parts) const {
    KVCACHE_FAIL("config ", where_, ": key '", prefix_, key,
                 "': ", detail::concat(std::forward<Parts>(parts)...));
  }

  std::optional<std::int64_t> optional_integer(const std::string& key) const {
    const Json* v = find(key);
    if (v == nullptr) return std::nullopt;
    return to_integer(key, *v);
  }
  std::int64_t integer(const std::string& key) const {
    const auto v = optional_integer(key);
    if (!v) missing(key, "an integer");
    return *v;
  }
  std::int64_t positive(const std::string& key) const {
    const std::int64_t v = integer(key);
    if (v <= 0) bad(key, "expected a positive integer, got ", v);
    return v;
  }
  std::optional<double> optional_number(const std::string& key) const {
    const Json* v = find(key);
    if (v == nullptr) return std::nullopt;
    if (!v->is_number()) fail(key, "a number", *v);
    return v->get<double>();
  }
  double number(const std::string& key) const {
    const auto v = optional_number(key);
    if (!v) missing(key, "a number");
    return *v;
  }
  bool boolean(const std::string& key, bool fallback) const {
    const Json* v = find(key);
    if (v == nullptr) return fallback;
    if (!v->is_boolean()) fail(key, "true or false", *v);
    return v->get<bool>();
  }
  std::optional<std::string> optional_string(const std::string& key) const {
    const Json* v = find(key);
    if (v == nullptr) return std::nullopt;
    if (!v->is_string()) fail(key, "a string", *v);
    return v->get<std::string>();
  }

  std::int64_t to_integer(const std::string& key, const Json& v) const {
    // JSON from Python writes ints without a fraction; 4096.0 would be a float in transformers too.
    if (!v.is_number_integer()) fail(key, "an integer", v);
    if (v.is_number_unsigned() && v.get<std::uint64_t>() > static_cast<std::uint64_t>(INT64_MAX))
      fail(key, "an integer that fits in 64 bits", v);
    return v.get<std::int64_t>();
  }

  const std::string& where() const { return where_; }
  const std::string& prefix() const { return prefix_; }

 private:
  const Json& object_;
  const std::string& where_;
  std::string prefix_;
};

// One RoPE type name through kvcache's parser, with the file and key added to its error (it names
// the unsupported type: yarn, dynamic, longrope, ...).
RopeType rope_type(const Reader& r, const std::string& key, const std::string& name) {
  try {
    return parse_rope_type(name);
  } catch (const Error& e) {
    r.bad(key, e.what());
  }
}

// The scaling parameters of a rope_scaling / rope_parameters object whose type is already read.
void read_scaling(const Reader& r, RopeScaling& s) {
  if (s.type == RopeType::kDefault) return;
  s.factor = r.number("factor");
  if (!(s.factor > 0)) r.bad("factor", "expected a value > 0, got ", s.factor);
  if (s.type != RopeType::kLlama3) return;
  s.low_freq_factor = r.number("low_freq_factor");
  s.high_freq_factor = r.number("high_freq_factor");
  s.original_max_position_embeddings = r.positive("original_max_position_embeddings");
  // llama3's smoothing divides by (high - low) and by low; equal or non-positive values are not
  // a config transformers could have run.
  if (!(s.low_freq_factor > 0))
    r.bad("low_freq_factor", "expected a value > 0, got ", s.low_freq_factor);
  if (!(s.high_freq_factor > s.low_freq_factor))
    r.bad("high_freq_factor", "expected a value > low_freq_factor (", s.low_freq_factor, "), got ",
          s.high_freq_factor);
}

void check_partial_rotary_factor(const Reader& r) {
  if (const auto f = r.optional_number("partial_rotary_factor"); f && *f != 1.0)
    r.bad("partial_rotary_factor", "expected 1 (partial rotary embeddings are not supported), got ",
          *f);
}

RopeOptions read_rope(const Reader& r, std::int64_t head_dim) {
  RopeOptions rope;
  rope.head_dim = head_dim;
  check_partial_rotary_factor(r);
  // transformers 5 folds theta and scaling into one rope_parameters object; when it is there it
  // is the truth, and the top-level keys are left from an older save.
  if (const Json* params = r.find("rope_parameters")) {
    if (!params->is_object()) r.fail("rope_parameters", "an object", *params);
    const Reader p(*params, r.where(), "rope_parameters.");
    const auto type = p.optional_string("rope_type");
    if (!type) p.missing("rope_type", "a string");
    rope.scaling.type = rope_type(p, "rope_type", *type);
    rope.rope_theta =
        p.optional_number("rope_theta").value_or(r.optional_number("rope_theta").value_or(10000.0));
    read_scaling(p, rope.scaling);
    check_partial_rotary_factor(p);
  } else {
    rope.rope_theta = r.optional_number("rope_theta").value_or(10000.0);
    if (const Json* scaling = r.find("rope_scaling")) {
      if (!scaling->is_object()) r.fail("rope_scaling", "an object or null", *scaling);
      const Reader s(*scaling, r.where(), "rope_scaling.");
      // Newer configs say "rope_type"; older ones "type".
      const std::string key = s.find("rope_type") ? "rope_type" : "type";
      const auto type = s.optional_string(key);
      if (!type) s.missing("rope_type", "a string");
      rope.scaling.type = rope_type(s, key, *type);
      read_scaling(s, rope.scaling);
    }
  }
  if (!(rope.rope_theta > 0)) r.bad("rope_theta", "expected a value > 0, got ", rope.rope_theta);
  return rope;
}

std::vector<std::int64_t> read_eos(const Reader& r) {
  const Json* v = r.find("eos_token_id");
  if (v == nullptr) return {};
  if (v->is_array()) {
    std::vector<std::int64_t> ids;
    for (const Json& id : *v) ids.push_back(r.to_integer("eos_token_id", id));
    return ids;
  }
  if (!v->is_number_integer()) r.fail("eos_token_id", "an integer, a list of integers or null", *v);
  return {r.to_integer("eos_token_id", *v)};
}

// Resolves which layers slide. Qwen2 (transformers >= 4.56 saves the list) may give layer_types;
// otherwise layers >= max_window_layers slide when sliding is on. Mistral slides them all.
std::vector<std::string> read_layer_types(const Reader& r, Family family, const ModelConfig& c) {
  const auto n = static_cast<std::size_t>(c.num_hidden_layers);
  if (family == Family::kQwen2) {
    if (const Json* types = r.find("layer_types")) {
      if (!types->is_array() || types->size() != n)
        r.fail("layer_types", detail::concat("a list of ", n, " layer types"), *types);
      std::vector<std::string> out;
      for (const Json& t : *types) {
        if (!t.is_string() || (t != "full_attention" && t != "sliding_attention"))
          r.fail("layer_types", "\"full_attention\" or \"sliding_attention\" entries", t);
        out.push_back(t.get<std::string>());
      }
      return out;
    }
    const std::int64_t first = r.optional_integer("max_window_layers").value_or(28);
    std::vector<std::string> out;
    for (std::size_t i = 0; i < n; ++i) {
      const bool slides = c.sliding_window && static_cast<std::int64_t>(i) >= first;
      out.emplace_back(slides ? "sliding_attention" : "full_attention");
    }
    return out;
  }
  const bool slides = family == Family::kMistral && c.sliding_window;
  return std::vector<std::string>(n, slides ? "sliding_attention" : "full_attention");
}

}  // namespace

ModelConfig ModelConfig::from_json(const std::string& text, const std::string& where) {
  return detail::out_of_memory_as_error("ModelConfig::from_json", [&]() -> ModelConfig {
    Json root = detail::parse_json(text, "config " + where);
    const detail::ReleaseJsonAtExit release_root(root);  // its destructor must not allocate
    KVCACHE_CHECK(root.is_object(), "config ", where, ": expected a JSON object, got ", show(root));
    const Reader r(root, where);
    ModelConfig c;

    const Json* archs = r.find("architectures");
    if (archs == nullptr) r.missing("architectures", "a list such as [\"LlamaForCausalLM\"]");
    if (!archs->is_array() || archs->empty() || !(*archs)[0].is_string())
      r.fail("architectures", "a non-empty list of strings", *archs);
    c.architecture = (*archs)[0].get<std::string>();
    Family family = Family::kLlama;
    std::string expected_type;
    if (c.architecture == "LlamaForCausalLM") {
      family = Family::kLlama;
      expected_type = "llama";
    } else if (c.architecture == "Qwen2ForCausalLM") {
      family = Family::kQwen2;
      expected_type = "qwen2";
    } else if (c.architecture == "MistralForCausalLM") {
      family = Family::kMistral;
      expected_type = "mistral";
    } else {
      r.bad("architectures",
            "expected LlamaForCausalLM, Qwen2ForCausalLM or MistralForCausalLM, got '",
            detail::show_text(c.architecture), "'");
    }
    // transformers builds the model from model_type, kvcache from the architecture; a config where
    // they disagree would be run differently by the two, so it is refused.
    c.model_type = r.optional_string("model_type").value_or(expected_type);
    if (c.model_type != expected_type)
      r.bad("model_type", "expected '", expected_type, "' for ", c.architecture, ", got '",
            detail::show_text(c.model_type), "'");

    c.vocab_size = r.positive("vocab_size");
    c.hidden_size = r.positive("hidden_size");
    c.intermediate_size = r.positive("intermediate_size");
    c.num_hidden_layers = r.positive("num_hidden_layers");
    // Checked before read_layer_types builds one entry per layer.
    if (c.num_hidden_layers > ModelConfig::kMaxLayers)
      r.bad("num_hidden_layers", "expected at most ", ModelConfig::kMaxLayers, " layers, got ",
            c.num_hidden_layers);
    c.num_attention_heads = r.positive("num_attention_heads");
    c.num_key_value_heads =
        r.find("num_key_value_heads") ? r.positive("num_key_value_heads") : c.num_attention_heads;
    if (c.num_attention_heads % c.num_key_value_heads != 0)
      r.bad("num_key_value_heads", "num_attention_heads (", c.num_attention_heads,
            ") must be a multiple of num_key_value_heads, got ", c.num_key_value_heads);
    if (r.find("head_dim")) {
      c.head_dim = r.positive("head_dim");
    } else {
      if (c.hidden_size % c.num_attention_heads != 0)
        r.bad("head_dim", "absent, and hidden_size (", c.hidden_size,
              ") is not a multiple of num_attention_heads (", c.num_attention_heads, ")");
      c.head_dim = c.hidden_size / c.num_attention_heads;
    }
    if (c.head_dim % 2 != 0)
      r.bad("head_dim", "expected an even head_dim (RoPE rotates pairs), got ", c.head_dim);
    c.max_position_embeddings = r.positive("max_position_embeddings");
    // rms_norm_eps and hidden_act default as in all three transformers configs.
    c.rms_norm_eps = r.optional_number("rms_norm_eps").value_or(1e-6);
    if (!(c.rms_norm_eps > 0)) r.bad("rms_norm_eps", "expected a value > 0, got ", c.rms_norm_eps);
    c.hidden_act = r.optional_string("hidden_act").value_or("silu");
    if (c.hidden_act != "silu")
      r.bad("hidden_act", "expected \"silu\" (the only activation served), got '",
            detail::show_text(c.hidden_act), "'");

    c.tie_word_embeddings = r.boolean("tie_word_embeddings", false);
    c.attention_bias = r.boolean("attention_bias", false);
    c.mlp_bias = r.boolean("mlp_bias", false);
    // Qwen2 hard-codes bias=True on q/k/v and False on o_proj whatever the config says.
    c.qkv_bias = family == Family::kQwen2 ? true : c.attention_bias;
    c.o_bias = family == Family::kLlama ? c.attention_bias : false;

    // Both configs default sliding_window to 4096 when the key is absent; null turns it off.
    // Qwen2 uses it only with use_sliding_window; Llama has none.
    const bool slides = family == Family::kMistral ||
                        (family == Family::kQwen2 && r.boolean("use_sliding_window", false));
    if (slides) {
      c.sliding_window = root.contains("sliding_window") ? r.optional_integer("sliding_window")
                                                         : std::optional<std::int64_t>(4096);
    }
    if (c.sliding_window && *c.sliding_window <= 0)
      r.bad("sliding_window", "expected a positive window or null, got ", *c.sliding_window);
    c.layer_types = read_layer_types(r, family, c);

    c.rope = read_rope(r, c.head_dim);

    c.bos_token_id = r.optional_integer("bos_token_id");
    c.eos_token_ids = read_eos(r);
    c.pad_token_id = r.optional_integer("pad_token_id");

    // transformers 5 writes "dtype", earlier versions "torch_dtype". Other dtypes (float64, int8
    // quantised checkpoints' markers, ...) leave it unset: the caller picks one.
    const auto dtype_text =
        r.find("dtype") ? r.optional_string("dtype") : r.optional_string("torch_dtype");
    if (dtype_text == "float32")
      c.torch_dtype = DType::kFloat32;
    else if (dtype_text == "bfloat16")
      c.torch_dtype = DType::kBFloat16;
    else if (dtype_text == "float16")
      c.torch_dtype = DType::kFloat16;
    c.validate("config " + where);
    return c;
  });
}

ModelConfig ModelConfig::from_file(const std::string& path) {
  return detail::out_of_memory_as_error("ModelConfig::from_file", [&]() -> ModelConfig {
    return from_json(detail::read_regular_file(path, "config"), path);
  });
}

void ModelConfig::validate(const std::string& where) const {
  // Both loaders (config.json, GGUF metadata) end here, so they refuse the same configs and a
  // model is built only from one the model code can run: sizes positive, products that fit, special
  // ids inside the vocabulary.
  const auto positive = [&](const char* name, std::int64_t value) {
    KVCACHE_CHECK(value > 0, where, ": expected ", name, " > 0, got ", value);
  };
  positive("vocab_size", vocab_size);
  positive("hidden_size", hidden_size);
  positive("intermediate_size", intermediate_size);
  positive("num_hidden_layers", num_hidden_layers);
  positive("num_attention_heads", num_attention_heads);
  positive("num_key_value_heads", num_key_value_heads);
  positive("head_dim", head_dim);
  positive("max_position_embeddings", max_position_embeddings);
  KVCACHE_CHECK(num_hidden_layers <= kMaxLayers, where, ": expected at most ", kMaxLayers,
                " layers, got num_hidden_layers = ", num_hidden_layers);
  KVCACHE_CHECK(num_attention_heads % num_key_value_heads == 0, where,
                ": expected num_attention_heads (", num_attention_heads,
                ") to be a multiple of num_key_value_heads, got ", num_key_value_heads);
  KVCACHE_CHECK(head_dim % 2 == 0, where, ": expected an even head_dim (RoPE rotates pairs), got ",
                head_dim);
  // Every size the model multiplies (q rows = heads · head_dim, a weight's rows · columns) must
  // be countable; 2^31 per dimension keeps every product of two in int64.
  constexpr std::int64_t kMaxDim = std::int64_t{1} << 31;
  std::int64_t q_rows = 0;
  KVCACHE_CHECK(!__builtin_mul_overflow(num_attention_heads, head_dim, &q_rows) &&
                    q_rows <= kMaxDim && vocab_size <= kMaxDim && hidden_size <= kMaxDim &&
                    intermediate_size <= kMaxDim,
                where, ": expected sizes below 2^31, got vocab_size ", vocab_size, ", hidden_size ",
                hidden_size, ", intermediate_size ", intermediate_size, ", num_attention_heads ",
                num_attention_heads, " x head_dim ", head_dim);
  KVCACHE_CHECK(std::isfinite(rms_norm_eps) && rms_norm_eps > 0, where,
                ": expected rms_norm_eps > 0, got ", rms_norm_eps);
  KVCACHE_CHECK(std::isfinite(rope.rope_theta) && rope.rope_theta > 0, where,
                ": expected rope_theta > 0, got ", rope.rope_theta);
  if (rope.scaling.type != RopeType::kDefault)
    KVCACHE_CHECK(std::isfinite(rope.scaling.factor) && rope.scaling.factor > 0, where,
                  ": expected a RoPE scaling factor > 0, got ", rope.scaling.factor);
  if (sliding_window)
    KVCACHE_CHECK(*sliding_window > 0, where, ": expected a positive sliding_window, got ",
                  *sliding_window);
  KVCACHE_CHECK(
      layer_types.empty() || layer_types.size() == static_cast<std::size_t>(num_hidden_layers),
      where, ": expected one layer type per layer (", num_hidden_layers, "), got ",
      layer_types.size());
  const auto in_vocabulary = [&](const char* name, std::int64_t id) {
    KVCACHE_CHECK(id >= 0 && id < vocab_size, where, ": expected ", name, " in [0, ", vocab_size,
                  ") (the vocabulary), got ", id);
  };
  if (bos_token_id) in_vocabulary("bos_token_id", *bos_token_id);
  if (pad_token_id) in_vocabulary("pad_token_id", *pad_token_id);
  for (const std::int64_t id : eos_token_ids) in_vocabulary("eos_token_id", id);
}

}  // namespace kvcache
