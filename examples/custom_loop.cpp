// custom_loop: the seed document's hand-written generation loop, line for line in C++.
// transformers' version:
//
//   past_key_values = DynamicCache()
//   cache_position = torch.arange(inputs.input_ids.shape[1])
//   for _ in range(max_new_tokens):
//       outputs = model(**inputs, cache_position=cache_position, past_key_values=past_key_values,
//                       use_cache=True)
//       next_token_ids = outputs.logits[:, -1:].argmax(-1)
//       generated_ids = torch.cat([generated_ids, next_token_ids], dim=-1)
//       attention_mask = torch.cat([attention_mask, attention_mask.new_ones((batch, 1))], dim=-1)
//       inputs = {"input_ids": next_token_ids, "attention_mask": attention_mask}
//       cache_position = cache_position[-1:] + 1
//
// Run it with a model folder (default: the small model under tests/data; --help lists the flags),
// and `--device cuda` to
// run the very same loop on the GPU: the model is loaded there and the cache is a
// DynamicCache<cuda::Backend>; nothing else changes. It checks its tokens against
// kvcache::generate() and exits non-zero if they differ.
#include <cstdint>
#include <iostream>
#include <kvcache/generation/generate.hpp>
#include <kvcache/kvcache.hpp>
#include <string>
#include <vector>

#ifndef KVCACHE_DEFAULT_MODEL_DIR
#define KVCACHE_DEFAULT_MODEL_DIR "tests/data/llama_gqa"
#endif

namespace {

using namespace kvcache;

// The loop on backend B (cpu::Backend or cuda::Backend).
template <class B>
int run(const std::string& dir) {
  try {
    const LlamaModel model = LlamaModel::from_pretrained(dir, {.device = B::kDevice});
    const std::int64_t max_new_tokens = 10;

    // Two prompts of different lengths, left-padded; the mask marks the real tokens.
    auto [input_ids, attention_mask] =
        left_pad({{5, 17, 42, 7, 99}, {23, 8}}, model.config().pad_token_id.value_or(0));
    const std::int64_t batch = input_ids.size(0);

    DynamicCache<B> past_key_values;  // DynamicCache()
    std::vector<std::int64_t> cache_position = make_cache_position(0, input_ids.size(1));  // arange
    std::vector<std::vector<std::int64_t>> generated(static_cast<std::size_t>(batch));
    Tensor step_ids = input_ids;
    for (std::int64_t i = 0; i < max_new_tokens; ++i) {
      const Tensor logits = model.forward({.input_ids = step_ids,
                                           .attention_mask = attention_mask,
                                           .cache_position = cache_position,
                                           .past_key_values = &past_key_values,
                                           .use_cache = true,
                                           .logits_to_keep = 1});
      const std::vector<std::int64_t> next = argmax_last(logits);  // logits[:, -1:].argmax(-1)
      for (std::int64_t b = 0; b < batch; ++b)
        generated[static_cast<std::size_t>(b)].push_back(next[static_cast<std::size_t>(b)]);
      attention_mask = extend_attention_mask(attention_mask);  // cat([mask, ones(batch, 1)])
      step_ids = token_column(next);                           // inputs = {"input_ids": next}
      cache_position = {cache_position.back() + 1};            // cache_position[-1:] + 1
    }

    for (std::size_t b = 0; b < generated.size(); ++b) {
      std::cout << "row " << b << ":";
      for (std::int64_t t : generated[b]) std::cout << ' ' << t;
      std::cout << "\n";
    }
    std::cout << "cache: " << past_key_values.get_seq_length() << " tokens, "
              << past_key_values.nbytes() << " bytes\n";

    // The same job through generate(): the two must agree token for token.
    auto [ids2, mask2] =
        left_pad({{5, 17, 42, 7, 99}, {23, 8}}, model.config().pad_token_id.value_or(0));
    const GenerateResult result = generate(model, ids2, mask2, {.max_new_tokens = max_new_tokens});
    if (result.new_tokens != generated) {
      std::cerr << "custom loop and generate() disagree\n";
      return 1;
    }
    std::cout << "generate() agrees with the custom loop\n";
  } catch (const Error& e) {
    std::cerr << "custom_loop: " << e.what() << "\n";
    return 1;
  }
  return 0;
}

}  // namespace

constexpr const char* kUsage =
    "usage: custom_loop [MODEL_DIR] [--device cpu|cuda] [--help]\n"
    "\n"
    "The seed document's hand-written generation loop (model.forward with a DynamicCache, one\n"
    "token per step), checked token for token against kvcache::generate().\n"
    "\n"
    "  MODEL_DIR          a folder with config.json + *.safetensors, or a GGUF file\n"
    "                     (default: " KVCACHE_DEFAULT_MODEL_DIR
    ")\n"
    "  --device cpu|cuda  where the model and the cache live (default: cpu)\n"
    "  -h, --help         print this help and exit\n";

int main(int argc, char** argv) {
  std::string dir = KVCACHE_DEFAULT_MODEL_DIR;
  bool dir_given = false;
  bool gpu = false;
  for (int i = 1; i < argc; ++i) {
    const std::string arg = argv[i];
    if (arg == "--help" || arg == "-h") {
      std::cout << kUsage;
      return 0;
    } else if (arg == "--device") {
      if (i + 1 >= argc) {
        std::cerr << "custom_loop: --device expects a value\n" << kUsage;
        return 2;
      }
      const std::string device = argv[++i];
      if (device != "cpu" && device != "cuda") {
        std::cerr << "custom_loop: --device expects cpu or cuda, got '" << device << "'\n";
        return 2;
      }
      gpu = device == "cuda";
    } else if (arg.starts_with("-")) {
      std::cerr << "custom_loop: unknown flag '" << arg << "'\n" << kUsage;
      return 2;
    } else if (dir_given) {
      std::cerr << "custom_loop: one model path expected, got '" << dir << "' and '" << arg << "'\n"
                << kUsage;
      return 2;
    } else {
      dir = arg;
      dir_given = true;
    }
  }
  // run() reports kvcache::Error itself; anything else (out of memory, a bug) still ends in a
  // message and a non-zero exit, never an abort.
  try {
    return gpu ? run<cuda::Backend>(dir) : run<cpu::Backend>(dir);
  } catch (const std::exception& e) {
    std::cerr << "custom_loop: " << e.what() << "\n";
  } catch (...) {
    std::cerr << "custom_loop: unexpected error of an unknown type\n";
  }
  return 1;
}
