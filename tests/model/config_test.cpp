// ModelConfig: real config.json contents (Llama 3.2, Qwen2.5, Mistral 7B) in both RoPE forms, the
// defaults transformers fills in, resolved biases and sliding windows, and errors that name the
// key for configs kvcache cannot run.
#include "kvcache/model/config.hpp"

#include <gtest/gtest.h>
#include <unistd.h>

#include <filesystem>
#include <fstream>
#include <map>
#include <string>

#include "test_util.hpp"

namespace kvcache {
namespace {

// A config as key -> raw JSON value text, so a test can change or drop one key and render it.
using Keys = std::map<std::string, std::string>;

std::string render(const Keys& keys) {
  std::string text = "{";
  for (const auto& [key, value] : keys) {
    if (text.size() > 1) text += ",\n";
    text += "\"" + key + "\": " + value;
  }
  return text + "}";
}

// meta-llama/Llama-3.2-1B's config.json (transformers 4.45).
Keys llama32_old_form() {
  return {{"architectures", R"(["LlamaForCausalLM"])"},
          {"attention_bias", "false"},
          {"attention_dropout", "0.0"},
          {"bos_token_id", "128000"},
          {"eos_token_id", "128001"},
          {"head_dim", "64"},
          {"hidden_act", R"("silu")"},
          {"hidden_size", "2048"},
          {"initializer_range", "0.02"},
          {"intermediate_size", "8192"},
          {"max_position_embeddings", "131072"},
          {"mlp_bias", "false"},
          {"model_type", R"("llama")"},
          {"num_attention_heads", "32"},
          {"num_hidden_layers", "16"},
          {"num_key_value_heads", "8"},
          {"pretraining_tp", "1"},
          {"rms_norm_eps", "1e-05"},
          {"rope_scaling", R"({"factor": 32.0, "high_freq_factor": 4.0, "low_freq_factor": 1.0,
                              "original_max_position_embeddings": 8192, "rope_type": "llama3"})"},
          {"rope_theta", "500000.0"},
          {"tie_word_embeddings", "true"},
          {"torch_dtype", R"("bfloat16")"},
          {"transformers_version", R"("4.45.0.dev0")"},
          {"use_cache", "true"},
          {"vocab_size", "128256"}};
}

// The same model as transformers 5 saves it: rope_parameters, "dtype".
Keys llama32_v5_form() {
  Keys k = llama32_old_form();
  k.erase("rope_scaling");
  k.erase("rope_theta");
  k.erase("torch_dtype");
  k["rope_parameters"] = R"({"factor": 32.0, "high_freq_factor": 4.0, "low_freq_factor": 1.0,
                             "original_max_position_embeddings": 8192, "rope_theta": 500000.0,
                             "rope_type": "llama3"})";
  k["dtype"] = R"("bfloat16")";
  k["transformers_version"] = R"("5.0.0")";
  return k;
}

// Qwen/Qwen2.5-0.5B-Instruct's config.json.
Keys qwen25() {
  return {{"architectures", R"(["Qwen2ForCausalLM"])"},
          {"attention_dropout", "0.0"},
          {"bos_token_id", "151643"},
          {"eos_token_id", "151645"},
          {"hidden_act", R"("silu")"},
          {"hidden_size", "896"},
          {"initializer_range", "0.02"},
          {"intermediate_size", "4864"},
          {"max_position_embeddings", "32768"},
          {"max_window_layers", "21"},
          {"model_type", R"("qwen2")"},
          {"num_attention_heads", "14"},
          {"num_hidden_layers", "24"},
          {"num_key_value_heads", "2"},
          {"rms_norm_eps", "1e-06"},
          {"rope_scaling", "null"},
          {"rope_theta", "1000000.0"},
          {"sliding_window", "32768"},
          {"tie_word_embeddings", "true"},
          {"torch_dtype", R"("bfloat16")"},
          {"use_cache", "true"},
          {"use_sliding_window", "false"},
          {"vocab_size", "151936"}};
}

// mistralai/Mistral-7B-v0.1's config.json.
Keys mistral7b() {
  return {{"architectures", R"(["MistralForCausalLM"])"},
          {"bos_token_id", "1"},
          {"eos_token_id", "2"},
          {"hidden_act", R"("silu")"},
          {"hidden_size", "4096"},
          {"initializer_range", "0.02"},
          {"intermediate_size", "14336"},
          {"max_position_embeddings", "32768"},
          {"model_type", R"("mistral")"},
          {"num_attention_heads", "32"},
          {"num_hidden_layers", "32"},
          {"num_key_value_heads", "8"},
          {"rms_norm_eps", "1e-05"},
          {"rope_theta", "10000.0"},
          {"sliding_window", "4096"},
          {"tie_word_embeddings", "false"},
          {"torch_dtype", R"("bfloat16")"},
          {"use_cache", "true"},
          {"vocab_size", "32000"}};
}

ModelConfig parse(const Keys& keys) { return ModelConfig::from_json(render(keys), "test.json"); }

void expect_same(const ModelConfig& a, const ModelConfig& b) {
  EXPECT_EQ(a.architecture, b.architecture);
  EXPECT_EQ(a.model_type, b.model_type);
  EXPECT_EQ(a.vocab_size, b.vocab_size);
  EXPECT_EQ(a.hidden_size, b.hidden_size);
  EXPECT_EQ(a.intermediate_size, b.intermediate_size);
  EXPECT_EQ(a.num_hidden_layers, b.num_hidden_layers);
  EXPECT_EQ(a.num_attention_heads, b.num_attention_heads);
  EXPECT_EQ(a.num_key_value_heads, b.num_key_value_heads);
  EXPECT_EQ(a.head_dim, b.head_dim);
  EXPECT_EQ(a.max_position_embeddings, b.max_position_embeddings);
  EXPECT_EQ(a.rms_norm_eps, b.rms_norm_eps);
  EXPECT_EQ(a.hidden_act, b.hidden_act);
  EXPECT_EQ(a.tie_word_embeddings, b.tie_word_embeddings);
  EXPECT_EQ(a.qkv_bias, b.qkv_bias);
  EXPECT_EQ(a.o_bias, b.o_bias);
  EXPECT_EQ(a.mlp_bias, b.mlp_bias);
  EXPECT_EQ(a.sliding_window, b.sliding_window);
  EXPECT_EQ(a.layer_types, b.layer_types);
  EXPECT_EQ(a.rope.head_dim, b.rope.head_dim);
  EXPECT_EQ(a.rope.rope_theta, b.rope.rope_theta);
  EXPECT_EQ(a.rope.scaling.type, b.rope.scaling.type);
  EXPECT_EQ(a.rope.scaling.factor, b.rope.scaling.factor);
  EXPECT_EQ(a.rope.scaling.low_freq_factor, b.rope.scaling.low_freq_factor);
  EXPECT_EQ(a.rope.scaling.high_freq_factor, b.rope.scaling.high_freq_factor);
  EXPECT_EQ(a.rope.scaling.original_max_position_embeddings,
            b.rope.scaling.original_max_position_embeddings);
  EXPECT_EQ(a.bos_token_id, b.bos_token_id);
  EXPECT_EQ(a.eos_token_ids, b.eos_token_ids);
  EXPECT_EQ(a.pad_token_id, b.pad_token_id);
  EXPECT_EQ(a.torch_dtype, b.torch_dtype);
}

TEST(Config, LlamaOldForm) {
  const ModelConfig c = parse(llama32_old_form());
  EXPECT_EQ(c.architecture, "LlamaForCausalLM");
  EXPECT_EQ(c.model_type, "llama");
  EXPECT_EQ(c.vocab_size, 128256);
  EXPECT_EQ(c.hidden_size, 2048);
  EXPECT_EQ(c.intermediate_size, 8192);
  EXPECT_EQ(c.num_hidden_layers, 16);
  EXPECT_EQ(c.num_attention_heads, 32);
  EXPECT_EQ(c.num_key_value_heads, 8);
  EXPECT_EQ(c.head_dim, 64);
  EXPECT_EQ(c.max_position_embeddings, 131072);
  EXPECT_EQ(c.rms_norm_eps, 1e-5);
  EXPECT_TRUE(c.tie_word_embeddings);
  EXPECT_FALSE(c.qkv_bias);
  EXPECT_FALSE(c.o_bias);
  EXPECT_FALSE(c.mlp_bias);
  EXPECT_EQ(c.sliding_window, std::nullopt);
  ASSERT_EQ(c.layer_types.size(), 16u);
  EXPECT_EQ(c.layer_types[0], "full_attention");
  EXPECT_EQ(c.layer_sliding_window(0), std::nullopt);
  EXPECT_EQ(c.bos_token_id, 128000);
  EXPECT_EQ(c.eos_token_ids, (std::vector<std::int64_t>{128001}));
  EXPECT_EQ(c.pad_token_id, std::nullopt);
  EXPECT_EQ(c.torch_dtype, DType::kBFloat16);
  // llama3 rope scaling, and the RotaryEmbedding it configures accepts it.
  EXPECT_EQ(c.rope.head_dim, 64);
  EXPECT_EQ(c.rope.rope_theta, 500000.0);
  EXPECT_EQ(c.rope.scaling.type, RopeType::kLlama3);
  EXPECT_EQ(c.rope.scaling.factor, 32.0);
  EXPECT_EQ(c.rope.scaling.low_freq_factor, 1.0);
  EXPECT_EQ(c.rope.scaling.high_freq_factor, 4.0);
  EXPECT_EQ(c.rope.scaling.original_max_position_embeddings, 8192);
  EXPECT_NO_THROW(RotaryEmbedding{c.rope});
}

TEST(Config, RopeParametersFormEqualsOldForm) {
  expect_same(parse(llama32_v5_form()), parse(llama32_old_form()));
  // rope_parameters wins over stale top-level keys.
  Keys k = llama32_v5_form();
  k["rope_theta"] = "10000.0";
  k["rope_scaling"] = "null";
  expect_same(parse(k), parse(llama32_old_form()));
}

TEST(Config, LegacyRopeScalingTypeKeyAndLinear) {
  Keys k = llama32_old_form();
  k["rope_scaling"] = R"({"type": "linear", "factor": 2.0})";
  const ModelConfig c = parse(k);
  EXPECT_EQ(c.rope.scaling.type, RopeType::kLinear);
  EXPECT_EQ(c.rope.scaling.factor, 2.0);
  k["rope_scaling"] = "null";
  k.erase("rope_theta");
  const ModelConfig d = parse(k);
  EXPECT_EQ(d.rope.scaling.type, RopeType::kDefault);
  EXPECT_EQ(d.rope.rope_theta, 10000.0);
}

TEST(Config, Qwen2ResolvesBiasesAndSlidingWindow) {
  const ModelConfig c = parse(qwen25());
  EXPECT_EQ(c.model_type, "qwen2");
  EXPECT_EQ(c.head_dim, 64);  // 896 / 14, no head_dim key
  EXPECT_EQ(c.rope.head_dim, 64);
  EXPECT_EQ(c.rope.rope_theta, 1e6);
  EXPECT_EQ(c.rope.scaling.type, RopeType::kDefault);
  EXPECT_TRUE(c.qkv_bias);
  EXPECT_FALSE(c.o_bias);
  EXPECT_FALSE(c.attention_bias);
  // sliding_window is written but use_sliding_window is false.
  EXPECT_EQ(c.sliding_window, std::nullopt);
  EXPECT_EQ(c.layer_types, std::vector<std::string>(24, "full_attention"));

  Keys k = qwen25();
  k["use_sliding_window"] = "true";
  const ModelConfig s = parse(k);
  EXPECT_EQ(s.sliding_window, 32768);
  EXPECT_EQ(s.layer_sliding_window(20), std::nullopt);  // below max_window_layers (21)
  EXPECT_EQ(s.layer_sliding_window(21), 32768);
  EXPECT_EQ(s.layer_sliding_window(23), 32768);
  EXPECT_EQ(s.layer_sliding_window(24), std::nullopt);  // no such layer
}

TEST(Config, MistralSlidingWindow) {
  const ModelConfig c = parse(mistral7b());
  EXPECT_EQ(c.sliding_window, 4096);
  EXPECT_EQ(c.layer_sliding_window(0), 4096);
  EXPECT_EQ(c.layer_sliding_window(31), 4096);
  EXPECT_FALSE(c.qkv_bias);
  EXPECT_FALSE(c.o_bias);
  EXPECT_EQ(c.head_dim, 128);
  Keys k = mistral7b();
  k["sliding_window"] = "null";  // Mistral 7B v0.2 and later
  EXPECT_EQ(parse(k).sliding_window, std::nullopt);
  EXPECT_EQ(parse(k).layer_sliding_window(0), std::nullopt);
  k["head_dim"] = "null";  // null head_dim means the default too
  EXPECT_EQ(parse(k).head_dim, 128);
}

TEST(Config, EosAsListAndTokenIds) {
  Keys k = llama32_old_form();
  k["eos_token_id"] = "[128001, 128008, 128009]";
  k["pad_token_id"] = "128004";
  const ModelConfig c = parse(k);
  EXPECT_EQ(c.eos_token_ids, (std::vector<std::int64_t>{128001, 128008, 128009}));
  EXPECT_EQ(c.pad_token_id, 128004);
  k["eos_token_id"] = "null";
  k.erase("bos_token_id");
  const ModelConfig d = parse(k);
  EXPECT_TRUE(d.eos_token_ids.empty());
  EXPECT_EQ(d.bos_token_id, std::nullopt);
  k["eos_token_id"] = R"("</s>")";
  EXPECT_KVCACHE_ERROR(parse(k), "'eos_token_id'");
}

TEST(Config, Defaults) {
  Keys k = llama32_old_form();
  k.erase("num_key_value_heads");
  k.erase("head_dim");
  k.erase("tie_word_embeddings");
  k.erase("attention_bias");
  k.erase("mlp_bias");
  k.erase("torch_dtype");
  k.erase("rms_norm_eps");
  k.erase("hidden_act");
  const ModelConfig c = parse(k);
  EXPECT_EQ(c.num_key_value_heads, 32);
  EXPECT_EQ(c.head_dim, 64);  // 2048 / 32
  EXPECT_FALSE(c.tie_word_embeddings);
  EXPECT_FALSE(c.qkv_bias);
  EXPECT_EQ(c.rms_norm_eps, 1e-6);
  EXPECT_EQ(c.hidden_act, "silu");
  EXPECT_EQ(c.torch_dtype, std::nullopt);
  k["num_key_value_heads"] = "null";
  EXPECT_EQ(parse(k).num_key_value_heads, 32);
  k["torch_dtype"] = R"("float64")";  // not one kvcache runs: left to the caller
  EXPECT_EQ(parse(k).torch_dtype, std::nullopt);
  k["attention_bias"] = "true";  // Llama: all four projections
  EXPECT_TRUE(parse(k).qkv_bias);
  EXPECT_TRUE(parse(k).o_bias);
}

TEST(Config, Errors) {
  Keys k = llama32_old_form();
  k["architectures"] = R"(["GPT2LMHeadModel"])";
  EXPECT_KVCACHE_ERROR(parse(k), "got 'GPT2LMHeadModel'");
  EXPECT_KVCACHE_ERROR(parse(k), "test.json");

  k = llama32_old_form();
  k["hidden_act"] = R"("gelu")";
  EXPECT_KVCACHE_ERROR(parse(k), "key 'hidden_act'");
  EXPECT_KVCACHE_ERROR(parse(k), "'gelu'");

  k = llama32_old_form();
  k["rope_scaling"] = R"({"rope_type": "yarn", "factor": 4.0})";
  EXPECT_KVCACHE_ERROR(parse(k), "'yarn'");
  EXPECT_KVCACHE_ERROR(parse(k), "rope_scaling.rope_type");
  k = llama32_v5_form();
  k["rope_parameters"] = R"({"rope_type": "dynamic", "rope_theta": 10000.0, "factor": 2.0})";
  EXPECT_KVCACHE_ERROR(parse(k), "'dynamic'");

  k = llama32_old_form();
  k["num_key_value_heads"] = "5";
  EXPECT_KVCACHE_ERROR(parse(k), "must be a multiple of num_key_value_heads, got 5");

  k = llama32_old_form();
  k["partial_rotary_factor"] = "0.5";
  EXPECT_KVCACHE_ERROR(parse(k), "partial_rotary_factor");

  k = llama32_old_form();
  k["head_dim"] = "63";
  EXPECT_KVCACHE_ERROR(parse(k), "even head_dim");

  k = llama32_old_form();
  k.erase("hidden_size");
  EXPECT_KVCACHE_ERROR(parse(k), "missing key 'hidden_size'");

  k = llama32_old_form();
  k["vocab_size"] = "0";
  EXPECT_KVCACHE_ERROR(parse(k), "key 'vocab_size'");
  k["vocab_size"] = R"("128256")";
  EXPECT_KVCACHE_ERROR(parse(k), "key 'vocab_size': expected an integer");

  k = llama32_old_form();
  k["rope_scaling"] = R"({"rope_type": "llama3", "factor": 8.0})";
  EXPECT_KVCACHE_ERROR(parse(k), "missing key 'rope_scaling.low_freq_factor'");

  k = llama32_old_form();
  k["model_type"] = R"("mistral")";
  EXPECT_KVCACHE_ERROR(parse(k), "key 'model_type'");

  EXPECT_KVCACHE_ERROR(ModelConfig::from_json("{\"a\": ", "broken.json"), "broken.json");
  EXPECT_KVCACHE_ERROR(ModelConfig::from_json("[]"), "expected a JSON object");
}

TEST(Config, FromFile) {
  const auto path = std::filesystem::temp_directory_path() /
                    ("kvcache_config_test_" + std::to_string(::getpid()) + ".json");
  {
    std::ofstream out(path);
    out << render(mistral7b());
  }
  const ModelConfig c = ModelConfig::from_file(path.string());
  std::filesystem::remove(path);
  EXPECT_EQ(c.architecture, "MistralForCausalLM");
  EXPECT_KVCACHE_ERROR(ModelConfig::from_file(path.string()), path.string());

  const auto bad = std::filesystem::temp_directory_path() /
                   ("kvcache_config_test_bad_" + std::to_string(::getpid()) + ".json");
  {
    std::ofstream out(bad);
    Keys k = mistral7b();
    k["hidden_act"] = R"("gelu")";
    out << render(k);
  }
  EXPECT_KVCACHE_ERROR(ModelConfig::from_file(bad.string()), bad.string());
  std::filesystem::remove(bad);
}

}  // namespace
}  // namespace kvcache
