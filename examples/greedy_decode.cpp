// greedy_decode: the project's main job. Loads a Llama-family checkpoint (config.json +
// safetensors), runs the seed's generation loop through kvcache::generate() with a DynamicCache,
// and prints the new tokens, prefill time, decode tokens/s and the cache's size.
//
//   greedy_decode [--model DIR] [--prompt TEXT | --input-ids "1,2,3;4,5"] [--max-new-tokens N]
//                 [--device cpu|cuda] [--dtype float32|bfloat16|float16] [--cache dynamic] [--json]
//
// Rows given with --input-ids (';' separates rows) are left-padded with the config's pad_token_id
// (0 when it has none) and the attention mask is built to match. With --json the last line of
// stdout is one JSON object: new_tokens (per row), prefill_ms, decode_tokens_per_s, cache_bytes.
#include <cstdint>
#include <cstdio>
#include <filesystem>
#include <iostream>
#include <kvcache/generation/generate.hpp>
#include <kvcache/kvcache.hpp>
#include <nlohmann/json.hpp>
#include <sstream>
#include <string>
#include <vector>

#ifndef KVCACHE_DEFAULT_MODEL_DIR
#define KVCACHE_DEFAULT_MODEL_DIR "tests/data/llama_gqa"
#endif

namespace {

struct Options {
  std::string model = KVCACHE_DEFAULT_MODEL_DIR;
  std::string prompt;
  std::string input_ids;
  std::int64_t max_new_tokens = 32;
  std::string device = "cpu";
  std::string dtype;  // empty: as stored
  std::string cache = "dynamic";
  bool json = false;
};

const char* kUsage =
    "usage: greedy_decode [--model DIR] [--prompt TEXT | --input-ids \"1,2,3;4,5\"]\n"
    "                     [--max-new-tokens N] [--device cpu|cuda] [--dtype "
    "float32|bfloat16|float16]\n"
    "                     [--cache dynamic] [--json]\n";

[[noreturn]] void fail(const std::string& message) {
  std::cerr << "greedy_decode: " << message << "\n";
  std::exit(2);
}

Options parse(int argc, char** argv) {
  Options o;
  for (int i = 1; i < argc; ++i) {
    const std::string arg = argv[i];
    auto value = [&]() -> std::string {
      if (i + 1 >= argc) fail(arg + " expects a value\n" + kUsage);
      return argv[++i];
    };
    if (arg == "--model")
      o.model = value();
    else if (arg == "--prompt")
      o.prompt = value();
    else if (arg == "--input-ids")
      o.input_ids = value();
    else if (arg == "--max-new-tokens") {
      const std::string v = value();
      try {
        std::size_t used = 0;
        o.max_new_tokens = std::stoll(v, &used);
        if (used != v.size() || o.max_new_tokens < 1) throw std::invalid_argument(v);
      } catch (const std::exception&) {
        fail("--max-new-tokens expects a positive integer, got '" + v + "'");
      }
    } else if (arg == "--device")
      o.device = value();
    else if (arg == "--dtype")
      o.dtype = value();
    else if (arg == "--cache")
      o.cache = value();
    else if (arg == "--json")
      o.json = true;
    else if (arg == "--help" || arg == "-h") {
      std::cout << kUsage;
      std::exit(0);
    } else {
      fail("unknown flag '" + arg + "'\n" + kUsage);
    }
  }
  if (!o.prompt.empty() && !o.input_ids.empty()) fail("give --prompt or --input-ids, not both");
  if (o.device != "cpu" && o.device != "cuda")
    fail("--device expects cpu or cuda, got '" + o.device + "'");
  if (o.cache != "dynamic")
    fail("--cache expects dynamic (the only cache kvcache has so far), got '" + o.cache + "'");
  return o;
}

// "1,2,3;4,5" -> {{1,2,3},{4,5}}.
std::vector<std::vector<std::int64_t>> parse_ids(const std::string& text) {
  std::vector<std::vector<std::int64_t>> rows;
  std::stringstream rows_in(text);
  std::string row;
  while (std::getline(rows_in, row, ';')) {
    rows.emplace_back();
    std::stringstream ids_in(row);
    std::string id;
    while (std::getline(ids_in, id, ',')) {
      try {
        std::size_t used = 0;
        const long long v = std::stoll(id, &used);
        while (used < id.size() && std::isspace(static_cast<unsigned char>(id[used]))) ++used;
        if (used != id.size()) throw std::invalid_argument(id);
        rows.back().push_back(v);
      } catch (const std::exception&) {
        fail("--input-ids expects integers separated by ',' and rows by ';', got '" + id + "'");
      }
    }
    if (rows.back().empty())
      fail("--input-ids has an empty row (row " + std::to_string(rows.size() - 1) + ")");
  }
  if (rows.empty()) fail("--input-ids is empty");
  return rows;
}

}  // namespace

int main(int argc, char** argv) {
  const Options o = parse(argc, argv);
  if (!std::filesystem::is_directory(o.model))
    fail("model folder '" + o.model + "' does not exist");
  if (o.device == "cuda")
    fail("--device cuda: the CUDA model path is not implemented yet; use --device cpu");
  if (!o.prompt.empty()) {
    fail(
        "--prompt needs a tokenizer, and kvcache cannot read this model's yet; pass token ids with "
        "--input-ids");
  }
  try {
    kvcache::LoadOptions load;
    if (!o.dtype.empty()) load.dtype = kvcache::parse_dtype(o.dtype);
    const kvcache::LlamaModel model = kvcache::LlamaModel::from_pretrained(o.model, load);
    const kvcache::ModelConfig& config = model.config();

    // Without a prompt: a fixed short sequence of ids the model's vocabulary holds.
    const auto rows = parse_ids(o.input_ids.empty() ? "1,2,3,4,5,6,7,8" : o.input_ids);
    for (std::size_t r = 0; r < rows.size(); ++r)
      for (std::int64_t id : rows[r])
        if (id < 0 || id >= config.vocab_size)
          fail("token id " + std::to_string(id) + " in row " + std::to_string(r) +
               " is outside the vocabulary [0, " + std::to_string(config.vocab_size) + ")");

    const std::int64_t pad = config.pad_token_id.value_or(0);
    const auto [input_ids, attention_mask] = kvcache::left_pad(rows, pad);
    kvcache::GenerationConfig gen;
    gen.max_new_tokens = o.max_new_tokens;
    gen.pad_token_id = pad;
    const kvcache::GenerateResult result = kvcache::generate(model, input_ids, attention_mask, gen);

    if (!o.json) {
      std::cout << "model: " << o.model << " (" << config.architecture << ", "
                << config.num_hidden_layers << " layers, vocab " << config.vocab_size << ")\n";
      for (std::size_t r = 0; r < result.new_tokens.size(); ++r) {
        std::cout << "row " << r << ":";
        for (std::int64_t t : result.new_tokens[r]) std::cout << ' ' << t;
        std::cout << "\n";
      }
      std::printf("prefill: %.2f ms for %lld tokens x %zu rows\n", result.prefill_ms,
                  static_cast<long long>(input_ids.size(1)), rows.size());
      std::printf("decode: %.1f tokens/s (%lld steps)\n", result.decode_tokens_per_s,
                  static_cast<long long>(result.decode_steps));
      std::printf("cache: %lld tokens, %zu bytes\n", static_cast<long long>(result.cache_length),
                  result.cache_bytes);
    } else {
      nlohmann::json out;
      out["model"] = o.model;
      out["new_tokens"] = result.new_tokens;
      out["prefill_ms"] = result.prefill_ms;
      out["decode_tokens_per_s"] = result.decode_tokens_per_s;
      out["decode_steps"] = result.decode_steps;
      out["cache_length"] = result.cache_length;
      out["cache_bytes"] = result.cache_bytes;
      std::cout << out.dump() << "\n";
    }
  } catch (const kvcache::Error& e) {
    fail(e.what());
  }
  return 0;
}
