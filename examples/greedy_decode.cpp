// greedy_decode: the project's main job, the seed document's conversation in C++. Loads a
// Llama-family checkpoint (a GGUF file, or a folder with config.json + safetensors), applies the
// model's chat template to the prompt, runs greedy generation through kvcache::generate() with a
// DynamicCache (--cache static|sliding|sink|quantized|offloaded: the other kinds), and prints the
// answer as it is produced, then prefill time, decode tokens/s and the cache's size (and the bytes
// of weights held). With no arguments it asks the default model (SmolLM2-135M-Instruct, installed
// by scripts/setup-model.sh) the seed's question.
//
//   greedy_decode [--model PATH] [--prompt TEXT | --input-ids "1,2,3;4,5"] [--raw] [--system TEXT]
//                 [--chat] [--max-new-tokens N] [--device cpu|cuda]
//                 [--dtype float32|bfloat16|float16] [--cache
//                 dynamic|static|sliding|sink|quantized|offloaded]
//                 [--window-length N] [--sink-tokens N] [--kv-bits 8|4|2] [--kv-group-size N]
//                 [--kv-axis channel|token] [--residual-length N] [--cuda-graph on|off]
//                 [--threads N] [--adapt-threads on|off] [--allow-past-context] [--json]
//                 [--help]
//
// Rows given with --input-ids (';' separates rows) are left-padded with the model's pad id (0 when
// it has none) and the attention mask is built to match. --raw sends the prompt without the chat
// template; --system replaces the template's default system prompt; --chat reads one user turn per
// line from stdin and keeps the conversation in one cache, prefilling only each new turn.
// With --json the last line of stdout is one JSON object: new_tokens (per row), prefill_ms,
// decode_tokens_per_s, cache_bytes. --device cuda loads the weights onto the GPU (a GGUF file's
// quantized matrices as bfloat16; --dtype float32 for the exact mode) and runs the same
// generate() with a DynamicCache<cuda::Backend>; it reports peak device memory beside the weights
// and the cache, and how many decode steps were replayed from a CUDA graph (--cuda-graph on, the
// default; off launches every step kernel by kernel). Without --dtype a GGUF file's
// Q8_0/Q4_1 matrices stay blocks and are multiplied as such (fast; x is rounded to int8 per block,
// see kvcache/backend/quantized.hpp); --dtype float32 dequantizes them exactly at load, which is
// how the parity tests match transformers token for token. A question (or a --chat turn) whose
// prompt plus --max-new-tokens would pass the model's context length (max_position_embeddings,
// a GGUF's llama.context_length) fails with generate()'s message before it starts, unless
// --allow-past-context is given (GenerationConfig::allow_past_context: the tokens past it get the
// positions that follow, which the model was never trained on).
#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <filesystem>
#include <iostream>
#include <kvcache/kvcache.hpp>
#include <kvcache/model/gguf.hpp>
#include <kvcache/tokenizer/chat_template.hpp>
#include <kvcache/tokenizer/tokenizer.hpp>
#include <memory>
#include <nlohmann/json.hpp>
#include <optional>
#include <sstream>
#include <string>
#include <vector>

#include "input_ids.hpp"

#ifndef KVCACHE_DEFAULT_MODEL_PATH
#define KVCACHE_DEFAULT_MODEL_PATH "models/SmolLM2-135M-Instruct.Q4_1.gguf"
#endif

namespace {

struct Options {
  std::string model = KVCACHE_DEFAULT_MODEL_PATH;
  std::string prompt;
  std::string input_ids;
  bool input_ids_given = false;  // --input-ids "" is an error, not the default prompt
  std::vector<std::vector<std::int64_t>> rows;  // --input-ids parsed (input_ids.hpp)
  bool raw = false;
  std::optional<std::string> system;
  bool chat = false;
  std::int64_t max_new_tokens = 64;
  std::string device = "cpu";
  std::string dtype;  // empty: as stored (GGUF Q8_0/Q4_1: quantized blocks)
  std::string cache = "dynamic";
  kvcache::GenerationConfig::CacheConfig cache_config;  // --window-length ... --residual-length
  bool cuda_graph = true;     // --cuda-graph off: GPU decode steps launched kernel by kernel
  int threads = 0;            // --threads N: CPU threads (0: OpenMP's default, OMP_NUM_THREADS)
  bool adapt_threads = true;  // --adapt-threads off: every CPU decode step on all threads
  bool allow_past_context = false;  // --allow-past-context: generate past the context length
  bool json = false;
};

const char* kUsage =
    "usage: greedy_decode [--model PATH] [--prompt TEXT | --input-ids \"1,2,3;4,5\"] [--raw]\n"
    "                     [--system TEXT] [--chat] [--max-new-tokens N] [--device cpu|cuda]\n"
    "                     [--dtype float32|bfloat16|float16]\n"
    "                     [--cache dynamic|static|sliding|sink|quantized|offloaded]\n"
    "                     [--window-length N] [--sink-tokens N] [--kv-bits 8|4|2]\n"
    "                     [--kv-group-size N] [--kv-axis channel|token] [--residual-length N]\n"
    "                     [--cuda-graph on|off] [--threads N] [--adapt-threads on|off]\n"
    "                     [--allow-past-context] [--json] [--help]\n";

const char* kSeedQuestion = "Hello, what's your name.";

// --help: every flag with what it does and its default (the defaults read from Options and
// GenerationConfig::CacheConfig, so the text cannot drift from the code).
std::string help_text() {
  const Options d;
  const kvcache::GenerationConfig::CacheConfig& c = d.cache_config;
  std::ostringstream h;
  h << kUsage << "\n"
    << "Greedy generation with kvcache::generate(): applies the model's chat template to the\n"
       "prompt, prints the answer as it is produced, then prefill time, decode tokens/s and the\n"
       "cache's size.\n\n"
    << "  --model PATH         a GGUF file, or a folder with config.json + *.safetensors\n"
       "                       (default: "
    << d.model << ")\n"
    << "  --prompt TEXT        the user message (default: \"" << kSeedQuestion << "\")\n"
    << "  --input-ids IDS      token ids instead of text: ',' between ids, ';' between rows\n"
       "                       (rows left-padded with the model's pad id; ids printed, not text)\n"
       "  --raw                send the prompt as is, without the chat template (default: off)\n"
       "  --system TEXT        system prompt in place of the template's default (default: the\n"
       "                       template's own)\n"
       "  --chat               read one user turn per line from stdin, keeping the conversation\n"
       "                       in one cache (default: off)\n"
    << "  --max-new-tokens N   tokens generated per row, N >= 1 (default: " << d.max_new_tokens
    << ")\n"
    << "  --device cpu|cuda    where the weights and the cache live (default: " << d.device << ")\n"
    << "  --dtype float32|bfloat16|float16\n"
       "                       weights' dtype; float32 dequantizes GGUF blocks exactly (default:\n"
       "                       as stored: GGUF blocks stay quantized)\n"
    << "  --cache dynamic|static|sliding|sink|quantized|offloaded\n"
       "                       the KV cache (sliding: the model's sliding-window layers as rings\n"
       "                       from the first step; offloaded: in host memory, for --device cuda)\n"
       "                       (default: "
    << d.cache << ")\n"
    << "  --window-length N    sink cache: tokens kept per layer, sinks included (default: "
    << c.window_length << ")\n"
    << "  --sink-tokens N      sink cache: leading tokens kept for good (default: "
    << c.num_sink_tokens << ")\n"
    << "  --kv-bits 8|4|2      quantized cache: bits per cached value (default: " << c.nbits
    << ")\n"
    << "  --kv-group-size N    quantized cache: values per scale/min group (default: "
    << c.q_group_size << ")\n"
    << "  --kv-axis channel|token\n"
       "                       quantized cache: keys grouped per channel (KIVI) or per token\n"
       "                       (default: "
    << c.axis_key << ")\n"
    << "  --residual-length N  quantized cache: recent tokens kept in full precision (default: "
    << c.residual_length << ")\n"
    << "  --cuda-graph on|off  GPU: replay decode steps from a CUDA graph (default: "
    << (d.cuda_graph ? "on" : "off") << ")\n"
    << "  --threads N          CPU threads, N >= 1 (default: OpenMP's, OMP_NUM_THREADS if set,\n"
       "                       else one per core)\n"
    << "  --adapt-threads on|off CPU: a decode step that other processes starve of CPU time has\n"
       "                       the following steps tried on one thread, kept while faster\n"
       "                       (GenerationConfig::adapt_decode_threads; default: "
    << (d.adapt_threads ? "on" : "off")
    << ")\n"
       "  --allow-past-context generate past the model's context length (max_position_embeddings)\n"
       "                       instead of failing before the prefill; the positions past it were\n"
       "                       never trained (default: off)\n"
       "  --json               end with one JSON line: new_tokens, prefill_ms,\n"
       "                       decode_tokens_per_s, cache_bytes, ... (default: off)\n"
       "  -h, --help           print this help and exit\n";
  return h.str();
}

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
    if (arg == "--model") {
      o.model = value();
    } else if (arg == "--prompt") {
      o.prompt = value();
    } else if (arg == "--input-ids") {
      o.input_ids = value();
      o.input_ids_given = true;
    } else if (arg == "--raw") {
      o.raw = true;
    } else if (arg == "--system") {
      o.system = value();
    } else if (arg == "--chat") {
      o.chat = true;
    } else if (arg == "--max-new-tokens") {
      const std::string v = value();
      try {
        std::size_t used = 0;
        o.max_new_tokens = std::stoll(v, &used);
        if (used != v.size() || o.max_new_tokens < 1) throw std::invalid_argument(v);
      } catch (const std::exception&) {
        fail("--max-new-tokens expects a positive integer, got '" + v + "'");
      }
    } else if (arg == "--device") {
      o.device = value();
    } else if (arg == "--dtype") {
      o.dtype = value();
    } else if (arg == "--cache") {
      o.cache = value();
    } else if (arg == "--window-length" || arg == "--sink-tokens" || arg == "--kv-bits" ||
               arg == "--kv-group-size" || arg == "--residual-length") {
      // The sink and quantized caches' options (checked again by the caches themselves).
      const std::string v = value();
      std::int64_t n = 0;
      try {
        std::size_t used = 0;
        n = std::stoll(v, &used);
        if (used != v.size() || n < 0) throw std::invalid_argument(v);
      } catch (const std::exception&) {
        fail(arg + " expects a non-negative integer, got '" + v + "'");
      }
      if (arg == "--window-length") o.cache_config.window_length = n;
      if (arg == "--sink-tokens") o.cache_config.num_sink_tokens = n;
      if (arg == "--kv-bits")
        o.cache_config.nbits = static_cast<int>(std::min<std::int64_t>(n, 64));
      if (arg == "--kv-group-size") o.cache_config.q_group_size = n;
      if (arg == "--residual-length") o.cache_config.residual_length = n;
    } else if (arg == "--kv-axis") {
      o.cache_config.axis_key = value();
    } else if (arg == "--cuda-graph") {
      const std::string v = value();
      if (v != "on" && v != "off") fail("--cuda-graph expects on or off, got '" + v + "'");
      o.cuda_graph = v == "on";
    } else if (arg == "--adapt-threads") {
      const std::string v = value();
      if (v != "on" && v != "off") fail("--adapt-threads expects on or off, got '" + v + "'");
      o.adapt_threads = v == "on";
    } else if (arg == "--threads") {
      const std::string v = value();
      try {
        std::size_t used = 0;
        o.threads = std::stoi(v, &used);
        if (used != v.size() || o.threads < 1) throw std::invalid_argument(v);
      } catch (const std::exception&) {
        fail("--threads expects a positive integer, got '" + v + "'");
      }
    } else if (arg == "--allow-past-context") {
      o.allow_past_context = true;
    } else if (arg == "--json") {
      o.json = true;
    } else if (arg == "--help" || arg == "-h") {
      std::cout << help_text();
      std::exit(0);
    } else {
      fail("unknown flag '" + arg + "'\n" + kUsage);
    }
  }
  if (!o.prompt.empty() && !o.input_ids.empty()) fail("give --prompt or --input-ids, not both");
  if (o.chat && (!o.input_ids.empty() || o.json))
    fail("--chat reads text turns; it takes neither --input-ids nor --json");
  if (o.device != "cpu" && o.device != "cuda")
    fail("--device expects cpu or cuda, got '" + o.device + "'");
  if (o.cache != "dynamic" && o.cache != "static" && o.cache != "sliding" && o.cache != "sink" &&
      o.cache != "quantized" && o.cache != "offloaded") {
    fail("--cache expects dynamic, static, sliding, sink, quantized or offloaded, got '" + o.cache +
         "'");
  }
  // Malformed ids (an empty text included) fail here, before the model is loaded.
  if (o.input_ids_given) {
    try {
      o.rows = kvcache::examples::parse_input_ids(o.input_ids);
    } catch (const kvcache::Error& e) {
      fail(e.what());
    }
  }
  return o;
}

bool is_gguf(const std::string& path) {
  return path.size() > 5 && path.compare(path.size() - 5, 5, ".gguf") == 0;
}

// The model's tokenizer: from the GGUF metadata (byte-level BPE or SentencePiece), or a folder's
// tokenizer.json, or its sentencepiece tokenizer.model where there is no tokenizer.json; none
// otherwise.
std::optional<kvcache::Tokenizer> load_tokenizer(const std::string& path) {
  if (is_gguf(path)) return kvcache::Tokenizer::from_gguf(kvcache::GgufFile::open(path));
  const std::string json = path + "/tokenizer.json";
  if (std::filesystem::exists(json)) return kvcache::Tokenizer::from_json_file(json);
  const std::string model = path + "/tokenizer.model";
  if (std::filesystem::exists(model)) return kvcache::Tokenizer::from_sentencepiece_file(model);
  return std::nullopt;
}

// JSON text of `out`: strings that are not UTF-8 (a model path is bytes on Linux) are written with
// U+FFFD in place of the bad bytes instead of throwing.
std::string json_text(const nlohmann::json& out) {
  return out.dump(-1, ' ', false, nlohmann::json::error_handler_t::replace);
}

// The --json line: the generated ids of each row and the run's figures.
nlohmann::json result_json(const std::string& model, const kvcache::GenerateResult& r) {
  nlohmann::json out;
  out["model"] = model;
  out["new_tokens"] = r.new_tokens;
  out["prefill_ms"] = r.prefill_ms;
  out["decode_tokens_per_s"] = r.decode_tokens_per_s;
  out["decode_steps"] = r.decode_steps;
  out["cache_length"] = r.cache_length;
  out["cache_bytes"] = r.cache_bytes;
  out["graph_steps"] = r.graph_steps;
  out["single_thread_steps"] = r.single_thread_steps;
  return out;
}

// The --json line's device figures (GPU only): peak device memory beside the weights.
void add_device_json(nlohmann::json& out, const kvcache::LlamaModel& model) {
  out["device"] = std::string(kvcache::device_name(model.device()));
  out["weight_bytes"] = model.weight_bytes();
  if (model.device() == kvcache::Device::kCuda)
    out["peak_device_bytes"] = kvcache::cuda::memory_stats().peak_in_use;
}

void print_stats(const kvcache::GenerateResult& r, std::int64_t prompt_tokens, std::size_t rows,
                 const kvcache::LlamaModel& model) {
  std::printf("weights: %.1f MB held on %s\n", static_cast<double>(model.weight_bytes()) * 1e-6,
              std::string(kvcache::device_name(model.device())).c_str());
  std::printf("prefill: %.2f ms for %lld tokens x %zu rows\n", r.prefill_ms,
              static_cast<long long>(prompt_tokens), rows);
  std::printf("decode: %.1f tokens/s (%lld steps", r.decode_tokens_per_s,
              static_cast<long long>(r.decode_steps));
  if (model.device() == kvcache::Device::kCuda)
    std::printf(", %lld replayed from a CUDA graph", static_cast<long long>(r.graph_steps));
  if (r.single_thread_steps > 0)
    std::printf(", %lld on one thread (the other cores were busy)",
                static_cast<long long>(r.single_thread_steps));
  std::printf(")\n");
  std::printf("cache: %lld tokens, %zu bytes\n", static_cast<long long>(r.cache_length),
              r.cache_bytes);
  if (model.device() == kvcache::Device::kCuda) {
    const kvcache::cuda::MemoryStats m = kvcache::cuda::memory_stats();
    std::printf(
        "device memory: peak %.1f MB in use (weights %.1f MB + cache + workspace), %.1f MB "
        "reserved\n",
        static_cast<double>(m.peak_in_use) * 1e-6, static_cast<double>(model.weight_bytes()) * 1e-6,
        static_cast<double>(m.peak_reserved) * 1e-6);
  }
}

}  // namespace

int main(int argc, char** argv) {
  using namespace kvcache;
  const Options o = parse(argc, argv);
  if (std::error_code ec; !std::filesystem::exists(o.model, ec)) {
    fail(
        "model '" + o.model + "' does not exist" +
        (o.model == KVCACHE_DEFAULT_MODEL_PATH ? " (install it with scripts/setup-model.sh)" : ""));
  }
  try {
    if (o.threads > 0) cpu::set_num_threads(o.threads);
    LoadOptions load;
    if (!o.dtype.empty()) load.dtype = parse_dtype(o.dtype);
    if (o.device == "cuda") load.device = Device::kCuda;
    const LlamaModel model = LlamaModel::from_pretrained(o.model, load);
    const ModelConfig& config = model.config();
    const std::optional<Tokenizer> tokenizer =
        o.input_ids.empty() ? load_tokenizer(o.model) : std::nullopt;
    const std::int64_t pad = config.pad_token_id.value_or(0);
    GenerationConfig gen;
    gen.max_new_tokens = o.max_new_tokens;
    gen.pad_token_id = pad;
    // Every path stops a row at the model's EOS ids (as transformers' generate() does); the text
    // path falls back to the tokenizer's EOS when the config names none.
    gen.eos_token_ids = config.eos_token_ids;
    gen.cuda_graph = o.cuda_graph;
    gen.adapt_decode_threads = o.adapt_threads;
    gen.allow_past_context = o.allow_past_context;
    gen.cache_implementation = o.cache;  // the cache generate() builds when none is passed
    gen.cache_config = o.cache_config;

    if (!tokenizer) {
      // Token ids in, token ids out (models without a tokenizer kvcache can read).
      if (!o.prompt.empty() || o.chat) {
        fail("this model has no tokenizer kvcache can read; pass token ids with --input-ids");
      }
      const std::vector<std::vector<std::int64_t>> rows =
          o.input_ids_given ? o.rows
                            : std::vector<std::vector<std::int64_t>>{{1, 2, 3, 4, 5, 6, 7, 8}};
      for (std::size_t r = 0; r < rows.size(); ++r)
        for (std::int64_t id : rows[r])
          if (id < 0 || id >= config.vocab_size)
            fail("token id " + std::to_string(id) + " in row " + std::to_string(r) +
                 " is outside the vocabulary [0, " + std::to_string(config.vocab_size) + ")");
      const auto [input_ids, attention_mask] = left_pad(rows, pad);
      const GenerateResult result = generate(model, input_ids, attention_mask, gen);
      if (o.json) {
        nlohmann::json out = result_json(o.model, result);
        add_device_json(out, model);
        std::cout << json_text(out) << "\n";
        return 0;
      }
      std::cout << "model: " << o.model << " (" << config.architecture << ", "
                << config.num_hidden_layers << " layers, vocab " << config.vocab_size << ")\n";
      for (std::size_t r = 0; r < result.new_tokens.size(); ++r) {
        std::cout << "row " << r << ":";
        for (std::int64_t t : result.new_tokens[r]) std::cout << ' ' << t;
        std::cout << "\n";
      }
      print_stats(result, input_ids.size(1), rows.size(), model);
      return 0;
    }

    // Text in, text out.
    if (tokenizer->eos_token_id() && gen.eos_token_ids.empty())
      gen.eos_token_ids = {*tokenizer->eos_token_id()};
    std::optional<ChatTemplate> chat_template;
    if (!o.raw) {
      if (!tokenizer->chat_template())
        fail("this model has no chat template; use --raw to send the text as is");
      try {
        // The template sees the tokenizer's BOS and EOS texts as bos_token / eos_token.
        chat_template = ChatTemplate::parse(*tokenizer->chat_template(),
                                            ChatTemplateOptions::from_tokenizer(*tokenizer));
      } catch (const Error& e) {
        fail(e.what());  // it names the template's line and column and suggests --raw
      }
    }
    std::vector<ChatMessage> messages;
    if (o.system) messages.push_back({"system", *o.system});
    // The conversation's cache. After each turn it holds everything but the last generated token,
    // which is `pending` and opens the next turn's prefill; `covered` is how much of the chat
    // rendering the cache plus `pending` already stand for.
    // --cache static: for one question generate() builds a StaticCache of prompt +
    // max_new_tokens slots (no cache is passed); --chat keeps one StaticCache of the model's
    // context length (max_position_embeddings) for the whole conversation.
    DynamicCache<> cpu_cache;
    DynamicCache<cuda::Backend> gpu_cache;
    std::unique_ptr<Cache<cpu::Backend>> cpu_static;
    std::unique_ptr<Cache<cuda::Backend>> gpu_static;
    const bool on_gpu = model.device() == Device::kCuda;
    // --cache sink|quantized --chat: one cache of that kind for the conversation.
    const bool fixed = o.cache != "dynamic";
    if (fixed && o.chat) {
      if (o.cache == "static" && config.max_position_embeddings < 1)
        fail("--cache static --chat sizes its cache to the model's context length; it has none");
      const std::int64_t context = std::max<std::int64_t>(config.max_position_embeddings, 1);
      if (on_gpu) {
        gpu_static =
            make_generation_cache<cuda::Backend>(model, o.cache, 1, context, o.cache_config);
      } else {
        cpu_static =
            make_generation_cache<cpu::Backend>(model, o.cache, 1, context, o.cache_config);
      }
    }
    Cache<cpu::Backend>* const cpu_past = fixed ? cpu_static.get() : &cpu_cache;
    Cache<cuda::Backend>* const gpu_past = fixed ? gpu_static.get() : &gpu_cache;
    const CacheRef cache = on_gpu ? CacheRef(gpu_past) : CacheRef(cpu_past);
    std::vector<std::int64_t> pending;
    std::size_t covered = 0;
    auto run_turn = [&](const std::string& user_text) {
      std::string text = user_text;
      if (chat_template) {
        messages.push_back({"user", user_text});
        text = chat_template->apply(messages, /*add_generation_prompt=*/true).substr(covered);
      }
      std::vector<std::int64_t> ids = pending;
      const std::vector<std::int64_t> encoded = tokenizer->encode(text);
      ids.insert(ids.end(), encoded.begin(), encoded.end());
      if (ids.empty()) fail("the prompt encodes to no tokens");
      const auto [input_ids, unused_mask] = left_pad({ids}, pad);
      const std::int64_t past = !cache   ? 0
                                : on_gpu ? gpu_past->get_seq_length()
                                         : cpu_past->get_seq_length();
      const Tensor mask = extend_attention_mask(ones_mask(1, past), input_ids.size(1));
      StreamDecoder stream(*tokenizer, /*skip_special=*/true);
      std::vector<std::int64_t> answer;
      const GenerateResult result = generate(model, input_ids, mask, gen, cache,
                                             [&](std::int64_t, std::int64_t token, std::int64_t) {
                                               answer.push_back(token);
                                               if (!o.json)
                                                 std::cout << stream.push(token) << std::flush;
                                               return true;
                                             });
      if (!o.json) std::cout << stream.flush() << "\n";
      pending = {answer.back()};
      if (chat_template) {
        const bool ended = std::find(gen.eos_token_ids.begin(), gen.eos_token_ids.end(),
                                     answer.back()) != gen.eos_token_ids.end();
        if (ended) answer.pop_back();
        const std::string answer_text = tokenizer->decode(answer, /*skip_special=*/true);
        messages.push_back({"assistant", answer_text});
        const std::string rendered =
            chat_template->apply(messages, /*add_generation_prompt=*/false);
        // The cache plus `pending` hold the rendering up to the end of the answer, and with the
        // EOS token pending, up to that token's text where the template writes it ("<|im_end|>"
        // in ChatML, " </s>" after a Llama-2 answer). Templates that trim the answer are found
        // by its trimmed text; the next turn prefills the rendering from there on.
        std::size_t at = answer_text.empty() ? std::string::npos : rendered.rfind(answer_text);
        std::size_t length = answer_text.size();
        if (at == std::string::npos) {
          const std::size_t b = answer_text.find_first_not_of(" \t\n");
          const std::size_t e = answer_text.find_last_not_of(" \t\n");
          const std::string trimmed =
              b == std::string::npos ? std::string() : answer_text.substr(b, e - b + 1);
          at = trimmed.empty() ? std::string::npos : rendered.rfind(trimmed);
          length = trimmed.size();
        }
        covered = at == std::string::npos ? covered : at + length;
        if (ended) {
          const std::string& eos_text = tokenizer->token_text(pending.front());
          const std::size_t eos_at = rendered.find(eos_text, covered);
          if (eos_at != std::string::npos) covered = eos_at + eos_text.size();
        }
      }
      return std::pair{result, static_cast<std::int64_t>(ids.size())};
    };

    if (o.chat) {
      std::cout << "chat with " << o.model << " (empty line or end of input to stop)\n";
      std::string line;
      while (std::cout << "> " << std::flush, std::getline(std::cin, line) && !line.empty()) {
        const auto [result, prefilled] = run_turn(line);
        std::printf(
            "[prefill %lld new tokens, %.1f ms; decode %.1f tokens/s; cache %lld tokens, %zu "
            "bytes]\n",
            static_cast<long long>(prefilled), result.prefill_ms, result.decode_tokens_per_s,
            static_cast<long long>(result.cache_length), result.cache_bytes);
      }
      return 0;
    }
    const std::string prompt = o.prompt.empty() ? kSeedQuestion : o.prompt;
    if (!o.json) std::cout << "> " << prompt << "\n";
    const auto [result, prompt_tokens] = run_turn(prompt);
    if (o.json) {
      nlohmann::json out = result_json(o.model, result);
      out["text"] = tokenizer->decode(result.new_tokens[0], true);
      add_device_json(out, model);
      std::cout << json_text(out) << "\n";
    } else {
      print_stats(result, prompt_tokens, 1, model);
    }
  } catch (const Error& e) {
    fail(e.what());
  } catch (const std::bad_alloc&) {
    fail("out of memory");
  } catch (const std::exception& e) {
    fail(std::string("unexpected error: ") + e.what());
  } catch (...) {
    fail("unexpected error of an unknown type");
  }
  return 0;
}
