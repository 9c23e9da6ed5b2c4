// The README's code, compiled and run: every ```cpp block the README marks with
// `<!-- snippet: NAME -->` is the code between `// snippet: NAME` and `// end snippet` below
// (indentation removed), character for character; ReadmeSnippets.MatchThisFile checks that both
// ways, so the README cannot show code that no longer compiles or no longer does what it says.
// Each test runs its snippet, then checks what the snippet's comments promise. The tests run from
// the repository root (CTest's working directory), so the README's relative paths work as
// written: tests/data fixtures, and the default model in models/ (scripts/setup-model.sh; the
// tests that need it fail with that hint when it is missing, as the other default-model tests do).
#include <gtest/gtest.h>

#include <cmath>
#include <cstdint>
#include <filesystem>
#include <fstream>
#include <map>
#include <memory>
#include <sstream>
#include <string>
#include <vector>

#include "kvcache/kvcache.hpp"
#include "test_util.hpp"

#ifndef KVCACHE_README_PATH
#error "KVCACHE_README_PATH must name README.md"
#endif
#ifndef KVCACHE_README_TEST_SOURCE
#error "KVCACHE_README_TEST_SOURCE must name this file"
#endif

using namespace kvcache;  // as the README's snippets assume

namespace {

const char* const kDefaultModel = "models/SmolLM2-135M-Instruct.Q4_1.gguf";

#define REQUIRE_DEFAULT_MODEL()                                  \
  ASSERT_TRUE(std::filesystem::exists(kDefaultModel))            \
      << kDefaultModel << " is missing (the tests run from the " \
      << "repository root): run scripts/setup-model.sh"

std::vector<std::int64_t> int64s(const Tensor& t) {
  const Tensor c = cpu::clone(t);
  const auto* p = c.data_as<std::int64_t>();
  return std::vector<std::int64_t>(p, p + c.numel());
}

std::vector<std::string> lines_of(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  EXPECT_TRUE(in.good()) << path;
  std::vector<std::string> lines;
  for (std::string line; std::getline(in, line);) lines.push_back(line);
  return lines;
}

// NAME of a line `<prefix>NAME<suffix>` (white space around it ignored), or "".
std::string marker_name(const std::string& line, const std::string& prefix,
                        const std::string& suffix) {
  const auto first = line.find_first_not_of(' ');
  if (first == std::string::npos || line.compare(first, prefix.size(), prefix) != 0) return "";
  std::string rest = line.substr(first + prefix.size());
  while (!rest.empty() && rest.back() == ' ') rest.pop_back();
  if (rest.size() < suffix.size() ||
      rest.compare(rest.size() - suffix.size(), suffix.size(), suffix) != 0)
    return "";
  return rest.substr(0, rest.size() - suffix.size());
}

// Whether `line` is `// end snippet` (white space around it ignored).
bool is_end_marker(const std::string& line) {
  const auto first = line.find_first_not_of(' ');
  const auto last = line.find_last_not_of(' ');
  return first != std::string::npos && line.substr(first, last - first + 1) == "// end snippet";
}

// The README's marked blocks: name -> the block's lines joined with '\n'.
std::map<std::string, std::string> readme_snippets(const std::vector<std::string>& lines) {
  std::map<std::string, std::string> snippets;
  for (std::size_t i = 0; i < lines.size(); ++i) {
    const std::string name = marker_name(lines[i], "<!-- snippet: ", " -->");
    if (name.empty()) continue;
    EXPECT_TRUE(i + 1 < lines.size() && lines[i + 1] == "```cpp")
        << "README line " << i + 1 << ": snippet " << name << " must be followed by ```cpp";
    std::string code;
    std::size_t j = i + 2;
    for (; j < lines.size() && lines[j] != "```"; ++j) code += lines[j] + "\n";
    EXPECT_LT(j, lines.size()) << "README snippet " << name << " has no closing ```";
    EXPECT_TRUE(snippets.emplace(name, code).second) << "README snippet " << name << " twice";
    i = j;
  }
  return snippets;
}

// This file's regions: name -> the lines between the markers, less the marker's indentation.
std::map<std::string, std::string> source_snippets(const std::vector<std::string>& lines) {
  std::map<std::string, std::string> snippets;
  for (std::size_t i = 0; i < lines.size(); ++i) {
    const std::string name = marker_name(lines[i], "// snippet: ", "");
    if (name.empty()) continue;
    const std::size_t indent = lines[i].find_first_not_of(' ');
    std::string code;
    std::size_t j = i + 1;
    for (; j < lines.size() && !is_end_marker(lines[j]); ++j) {
      const std::string& line = lines[j];
      if (line.empty()) {
        code += "\n";
        continue;
      }
      EXPECT_EQ(line.find_first_not_of(' ') >= indent, true)
          << "line " << j + 1 << " of snippet " << name << " is indented less than its marker";
      code += line.substr(std::min(indent, line.size())) + "\n";
    }
    EXPECT_LT(j, lines.size()) << "snippet " << name << " has no // end snippet";
    EXPECT_TRUE(snippets.emplace(name, code).second) << "snippet " << name << " twice";
    i = j;
  }
  return snippets;
}

TEST(ReadmeSnippets, MatchThisFile) {
  const auto readme = readme_snippets(lines_of(KVCACHE_README_PATH));
  const auto source = source_snippets(lines_of(KVCACHE_README_TEST_SOURCE));
  EXPECT_GE(readme.size(), 14u) << "the README's marked snippets went missing";
  for (const auto& [name, code] : readme) {
    const auto it = source.find(name);
    if (it == source.end()) {
      ADD_FAILURE() << "README snippet " << name << " has no region in " << __FILE__;
      continue;
    }
    EXPECT_EQ(code, it->second) << "README snippet " << name << " differs from its test";
  }
  for (const auto& [name, code] : source)
    EXPECT_TRUE(readme.count(name)) << "snippet " << name << " is not in the README";
}

TEST(ReadmeSnippets, LoadModel) {
  REQUIRE_DEFAULT_MODEL();
  // snippet: load-model
  // A Hugging Face checkpoint folder: config.json + model.safetensors (or the shards that
  // model.safetensors.index.json lists), memory-mapped.
  const LlamaModel model = LlamaModel::from_pretrained("tests/data/llama_gqa");
  const ModelConfig& config = model.config();  // config.json: hidden_size, num_hidden_layers, ...

  // A llama.cpp GGUF file, through the same call (LlamaModel::from_gguf is the one it makes):
  // Q8_0 and Q4_x matrices stay blocks and are multiplied as blocks.
  const LlamaModel smollm2 = LlamaModel::from_pretrained("models/SmolLM2-135M-Instruct.Q4_1.gguf");

  // The exact mode: every weight widened or dequantized to float32 once at load, which is what
  // transformers computes with (token for token equal to it; about 5x slower to decode).
  const LlamaModel exact = LlamaModel::from_pretrained("models/SmolLM2-135M-Instruct.Q4_1.gguf",
                                                       {.dtype = DType::kFloat32});
  std::size_t bytes = exact.weight_bytes();  // 538 MB against smollm2's 92 MiB of blocks
  // end snippet
  EXPECT_EQ(config.num_hidden_layers, 2);
  EXPECT_EQ(config.num_key_value_heads, 2);
  EXPECT_EQ(smollm2.config().architecture, "LlamaForCausalLM");
  EXPECT_GT(bytes, 5 * smollm2.weight_bytes());
  EXPECT_EQ(model.device(), Device::kCpu);
}

TEST(ReadmeSnippets, Tokenizer) {
  REQUIRE_DEFAULT_MODEL();
  // snippet: tokenizer
  // The tokenizer beside the model: a .gguf file's own, or a folder's tokenizer.json (with its
  // tokenizer_config.json) or, without one, its SentencePiece tokenizer.model.
  const Tokenizer tokenizer = Tokenizer::from_pretrained("models/SmolLM2-135M-Instruct.Q4_1.gguf");
  const Tokenizer from_folder = Tokenizer::from_pretrained("tests/data/tokenizer/tiny_smollm");

  std::vector<std::int64_t> ids = tokenizer.encode("Hello, world!");  // never adds BOS or EOS
  if (tokenizer.add_bos_token())  // Llama-2's tokenizers want BOS first; SmolLM2's does not
    ids.insert(ids.begin(), tokenizer.bos_token_id().value());
  std::string text = tokenizer.decode(ids);  // "Hello, world!"

  // Special tokens written in the text become their ids, unless parse_special is false:
  std::vector<std::int64_t> one = tokenizer.encode("<|im_end|>");  // {2}: the EOS id
  std::vector<std::int64_t> plain = tokenizer.encode("<|im_end|>", /*parse_special=*/false);
  std::string shown = tokenizer.decode(one);                           // "<|im_end|>"
  std::string dropped = tokenizer.decode(one, /*skip_special=*/true);  // ""
  // end snippet
  EXPECT_FALSE(tokenizer.add_bos_token());
  EXPECT_EQ(text, "Hello, world!");
  ASSERT_EQ(one.size(), 1u);
  EXPECT_EQ(one[0], tokenizer.eos_token_id());
  EXPECT_EQ(one[0], 2);
  EXPECT_GT(plain.size(), 1u);
  EXPECT_EQ(shown, "<|im_end|>");
  EXPECT_EQ(dropped, "");
  EXPECT_TRUE(from_folder.chat_template().has_value());
  EXPECT_GT(from_folder.vocab_size(), 0);
}

TEST(ReadmeSnippets, ChatTemplate) {
  // snippet: chat-template
  const Tokenizer tokenizer = Tokenizer::from_pretrained("tests/data/tokenizer/tiny_smollm");
  // The template the tokenizer ships, rendered by kvcache's Jinja engine with the tokenizer's
  // BOS and EOS texts in scope.
  const ChatTemplate chat = ChatTemplate::parse(tokenizer.chat_template().value(),
                                                ChatTemplateOptions::from_tokenizer(tokenizer));
  const std::vector<ChatMessage> messages = {{"system", "You are brief."},
                                             {"user", "Hello, what's your name."}};
  const std::string prompt = chat.apply(messages, /*add_generation_prompt=*/true);
  // "<|im_start|>system\nYou are brief.<|im_end|>\n<|im_start|>user\nHello, what's your
  // name.<|im_end|>\n<|im_start|>assistant\n"
  const std::vector<std::int64_t> prompt_ids = tokenizer.encode(prompt);
  // end snippet
  EXPECT_EQ(prompt,
            "<|im_start|>system\nYou are brief.<|im_end|>\n<|im_start|>user\nHello, what's your "
            "name.<|im_end|>\n<|im_start|>assistant\n");
  EXPECT_EQ(prompt_ids.front(), tokenizer.token_id("<|im_start|>"));
}

TEST(ReadmeSnippets, StreamingGeneration) {
  REQUIRE_DEFAULT_MODEL();
  // snippet: streaming
  const std::string path = "models/SmolLM2-135M-Instruct.Q4_1.gguf";
  const LlamaModel model = LlamaModel::from_pretrained(path);
  const Tokenizer tokenizer = Tokenizer::from_pretrained(path);
  const std::vector<ChatMessage> messages = {{"user", "Hello, what's your name."}};
  const std::string prompt = ChatTemplate::parse(tokenizer.chat_template().value())
                                 .apply(messages, /*add_generation_prompt=*/true);
  auto [input_ids, attention_mask] = left_pad({tokenizer.encode(prompt)}, /*pad_token_id=*/0);

  // StreamDecoder turns ids into text as they come, holding back a character cut between ids.
  StreamDecoder stream(tokenizer, /*skip_special=*/true);
  std::string answer;
  const GenerationConfig config{.max_new_tokens = 32,
                                .eos_token_ids = model.config().eos_token_ids};  // <|im_end|>
  const GenerateResult result = generate(
      model, input_ids, attention_mask, config, /*cache=*/nullptr,
      [&](std::int64_t /*row*/, std::int64_t token, std::int64_t /*step*/) {
        answer += stream.push(token);  // or: std::cout << stream.push(token) << std::flush;
        return true;                   // false stops the generation
      });
  answer += stream.flush();  // the whole answer, equal to tokenizer.decode(new_tokens[0], true)
  // end snippet
  EXPECT_FALSE(answer.empty());
  EXPECT_EQ(answer, tokenizer.decode(result.new_tokens[0], /*skip_special=*/true));
  EXPECT_EQ(result.new_tokens.size(), 1u);
}

TEST(ReadmeSnippets, GenerateResultAndContinuing) {
  // snippet: generate-continue
  const LlamaModel model = LlamaModel::from_pretrained("tests/data/llama_gqa");
  auto [input_ids, attention_mask] = left_pad({{5, 17, 42, 7}, {23, 8}}, /*pad_token_id=*/0);
  DynamicCache<> cache;
  const GenerateResult first =
      generate(model, input_ids, attention_mask, {.max_new_tokens = 8}, &cache);
  // first.new_tokens[row]: each row's tokens (fewer when every row met an EOS id; a finished
  // row emits pad_token_id meanwhile); prefill_ms, decode_ms, decode_steps, decode_tokens_per_s;
  // cache_length and cache_bytes: what the cache holds at the end. The last token was never fed
  // back, so the cache holds the prompt and the first 7: cache_length == 4 + 8 - 1.

  // To continue, feed the last token of each row (and any new text, here token 99) with a mask
  // over past + new: the prompt's mask, ones for the 7 cached tokens and for the 2 new ones.
  std::vector<std::vector<std::int64_t>> next_rows;
  for (const std::vector<std::int64_t>& row : first.new_tokens)
    next_rows.push_back({row.back(), 99});
  const Tensor next_ids = left_pad(next_rows, /*pad_token_id=*/0).first;   // [2, 2], no padding
  const Tensor mask = extend_attention_mask(attention_mask, (8 - 1) + 2);  // [2, 4 + 7 + 2]
  const GenerateResult second = generate(model, next_ids, mask, {.max_new_tokens = 8}, &cache);
  // end snippet
  EXPECT_EQ(first.cache_length, 4 + 8 - 1);
  EXPECT_EQ(first.new_tokens[0].size(), 8u);
  EXPECT_EQ(second.cache_length, 4 + 7 + 2 + 7);
  // The same as one generation over the whole text.
  std::vector<std::vector<std::int64_t>> whole = {{5, 17, 42, 7}, {23, 8}};
  for (std::size_t r = 0; r < whole.size(); ++r) {
    whole[r].insert(whole[r].end(), first.new_tokens[r].begin(), first.new_tokens[r].end());
    whole[r].push_back(99);
  }
  auto [whole_ids, whole_mask] = left_pad(whole, 0);
  EXPECT_EQ(int64s(whole_mask), int64s(mask));
  EXPECT_EQ(generate(model, whole_ids, whole_mask, {.max_new_tokens = 8}).new_tokens,
            second.new_tokens);
}

TEST(ReadmeSnippets, CloningACache) {
  // snippet: clone
  const LlamaModel model = LlamaModel::from_pretrained("tests/data/llama_gqa");
  auto [prompt_ids, prompt_mask] = left_pad({{5, 17, 42, 7}}, /*pad_token_id=*/0);
  DynamicCache<> prompt_cache;
  model.forward({.input_ids = prompt_ids, .past_key_values = &prompt_cache, .logits_to_keep = 1});

  // Two conversations from one prefilled prompt: each a deep copy with storage of its own.
  // (DynamicCache<> alias = prompt_cache; does not compile: a copy would share storage.)
  DynamicCache<> first = prompt_cache.clone();
  DynamicCache<> second = prompt_cache.clone();
  const GenerateResult a =
      generate(model, token_column({20}), ones_mask(1, 4 + 1), {.max_new_tokens = 6}, &first);
  const GenerateResult b =
      generate(model, token_column({40}), ones_mask(1, 4 + 1), {.max_new_tokens = 6}, &second);
  // prompt_cache still holds the 4 prompt tokens. Through the base class, the same deep copy:
  const Cache<cpu::Backend>& base = prompt_cache;
  std::unique_ptr<Cache<cpu::Backend>> third = base.clone();
  // end snippet
  EXPECT_EQ(prompt_cache.get_seq_length(), 4);
  EXPECT_EQ(third->get_seq_length(), 4);
  EXPECT_EQ(first.get_seq_length(), 4 + 1 + 5);
  EXPECT_EQ(a.new_tokens, generate(model, left_pad({{5, 17, 42, 7, 20}}, 0).first, Tensor(),
                                   {.max_new_tokens = 6})
                              .new_tokens);
  EXPECT_EQ(b.new_tokens, generate(model, left_pad({{5, 17, 42, 7, 40}}, 0).first, Tensor(),
                                   {.max_new_tokens = 6})
                              .new_tokens);
}

TEST(ReadmeSnippets, TheSeedLoop) {
  // snippet: custom-loop
  const LlamaModel model = LlamaModel::from_pretrained("tests/data/llama_gqa");
  auto [input_ids, attention_mask] = left_pad({{5, 17, 42, 7}, {23, 8}}, /*pad_token_id=*/0);
  const int max_new_tokens = 8;
  std::vector<std::vector<std::int64_t>> steps;  // steps[i][row]: row's token at step i

  DynamicCache<> past_key_values;                                        // DynamicCache()
  std::vector<std::int64_t> cache_position = make_cache_position(0, 4);  // torch.arange(4)
  for (int i = 0; i < max_new_tokens; ++i) {
    Tensor logits = model.forward({.input_ids = input_ids,
                                   .attention_mask = attention_mask,
                                   .cache_position = cache_position,
                                   .past_key_values = &past_key_values,
                                   .logits_to_keep = 1});
    std::vector<std::int64_t> next = argmax_last(logits);  // logits[:, -1:].argmax(-1)
    steps.push_back(next);
    input_ids = token_column(next);                          // inputs = {"input_ids": next}
    attention_mask = extend_attention_mask(attention_mask);  // cat([mask, ones(batch, 1)])
    cache_position = {cache_position.back() + 1};            // cache_position[-1:] + 1
  }
  // end snippet
  auto [ids, mask] = left_pad({{5, 17, 42, 7}, {23, 8}}, 0);
  const GenerateResult result = generate(model, ids, mask, {.max_new_tokens = max_new_tokens});
  for (std::size_t i = 0; i < steps.size(); ++i)
    for (std::size_t row = 0; row < 2; ++row)
      EXPECT_EQ(steps[i][row], result.new_tokens[row][i]) << "step " << i << " row " << row;
  EXPECT_EQ(past_key_values.get_seq_length(), 4 + max_new_tokens - 1);
}

TEST(ReadmeSnippets, PositionIds) {
  // snippet: position-ids
  auto [input_ids, attention_mask] = left_pad({{5, 17, 42, 7}, {23, 8}}, /*pad_token_id=*/0);
  // attention_mask [[1, 1, 1, 1], [0, 0, 1, 1]]; input_ids [[5, 17, 42, 7], [0, 0, 23, 8]]
  const Tensor position_ids = position_ids_from_attention_mask(attention_mask);
  // [[0, 1, 2, 3], [1, 1, 0, 1]]: cumsum(mask) - 1 with padded slots 1, so each row's first real
  // token is at position 0 (what RoPE sees); LlamaModel::forward computes this itself when
  // ForwardArgs::position_ids is left undefined.
  const Tensor next = next_position_ids(position_ids);  // [[4], [2]]: the next decode step's
  const std::vector<std::int64_t> cache_position = make_cache_position(0, 4);
  // [0, 1, 2, 3]: cache slots, one list for the whole batch; padding does not change them.
  // end snippet
  EXPECT_EQ(int64s(attention_mask), (std::vector<std::int64_t>{1, 1, 1, 1, 0, 0, 1, 1}));
  EXPECT_EQ(int64s(input_ids), (std::vector<std::int64_t>{5, 17, 42, 7, 0, 0, 23, 8}));
  EXPECT_EQ(int64s(position_ids), (std::vector<std::int64_t>{0, 1, 2, 3, 1, 1, 0, 1}));
  EXPECT_EQ(int64s(next), (std::vector<std::int64_t>{4, 2}));
  EXPECT_EQ(cache_position, (std::vector<std::int64_t>{0, 1, 2, 3}));
}

TEST(ReadmeSnippets, ResumingAfterCrop) {
  // snippet: crop-resume
  const LlamaModel model = LlamaModel::from_pretrained("tests/data/llama_gqa");
  auto [input_ids, attention_mask] = left_pad({{5, 17, 42, 7, 9, 11}, {23, 8, 30}}, 0);
  DynamicCache<> cache;
  model.forward({.input_ids = input_ids,
                 .attention_mask = attention_mask,
                 .past_key_values = &cache,
                 .logits_to_keep = 1});  // 6 slots cached
  cache.crop(4);                         // keep the first 4 slots (crop(-2) drops the last 2 alike)

  // Resume at slot 4: the mask keeps the columns of the slots still cached (row 1's padding
  // included) and gains one per new token; cache_position starts at the cache length.
  const std::int64_t kept = cache.get_seq_length();                                // 4
  const Tensor mask = extend_attention_mask(attention_mask.slice(1, 0, kept), 1);  // [2, 4 + 1]
  const Tensor logits = model.forward({.input_ids = token_column({50, 60}),
                                       .attention_mask = mask,
                                       .cache_position = make_cache_position(kept, 1),
                                       .past_key_values = &cache,
                                       .logits_to_keep = 1});
  // The same logits as a fresh forward over rows {5, 17, 42, 7, 50} and {23, 60}: crop counts
  // slots, not tokens, so it cut row 1's 8 and 30 with its padding kept.
  // end snippet
  auto [fresh_ids, fresh_mask] = left_pad({{5, 17, 42, 7, 50}, {23, 60}}, 0);
  EXPECT_EQ(int64s(fresh_mask), int64s(mask));
  const Tensor fresh =
      model.forward({.input_ids = fresh_ids, .attention_mask = fresh_mask, .logits_to_keep = 1});
  const auto err = kvcache::testing::compare(kvcache::testing::to_doubles(logits),
                                             kvcache::testing::to_doubles(fresh));
  EXPECT_LT(err.max_abs, 1e-4);  // float32 sums in another order
  EXPECT_EQ(argmax_last(logits), argmax_last(fresh));
  EXPECT_EQ(cache.get_seq_length(), 5);
}

TEST(ReadmeSnippets, Tensors) {
  // snippet: tensors
  Tensor a = Tensor::empty({2, 3}, DType::kFloat32);         // owning, contiguous, uninitialised
  float* p = a.data_as<float>();                             // typed access; a wrong type throws
  for (int i = 0; i < 6; ++i) p[i] = static_cast<float>(i);  // row-major: a[r][c] is p[r * 3 + c]
  Tensor ids = Tensor::zeros({1, 4}, DType::kInt64);

  std::vector<float> mine = {1, 2, 3, 4};
  // Your own memory, not copied: keep `mine` alive while the view is used.
  Tensor borrowed = Tensor::from_blob(mine.data(), {2, 2}, DType::kFloat32);
  Tensor row = a.slice(0, 1, 2);                   // [1, 3] view of row 1 (shares a's storage)
  Tensor t = a.transpose(0, 1);                    // [3, 2] view, strides {1, 3}
  Tensor flat = a.view({6});                       // reshaping view: contiguous tensors only
  float x = t.data_as<float>()[t.offset({2, 1})];  // t[2][1] = a[1][2] = 5
  Tensor dense = cpu::clone(t);                    // a contiguous copy with storage of its own
  Tensor half = cpu::cast(a, DType::kBFloat16);    // converted (round to nearest even)
  std::string shape = a.describe();                // "[2, 3] float32 cpu", for messages
  // end snippet
  EXPECT_EQ(ids.numel(), 4);
  EXPECT_EQ(borrowed.data(), mine.data());
  EXPECT_EQ(row.data_as<float>()[0], 3.0f);
  EXPECT_EQ(row.size(1), 3);
  EXPECT_EQ(t.stride(0), 1);
  EXPECT_EQ(t.stride(1), 3);
  EXPECT_EQ(flat.size(0), 6);
  EXPECT_EQ(x, 5.0f);
  EXPECT_TRUE(dense.is_contiguous());
  EXPECT_EQ(dense.data_as<float>()[1], 3.0f);
  EXPECT_EQ(half.dtype(), DType::kBFloat16);
  EXPECT_EQ(shape, "[2, 3] float32 cpu");
}

TEST(ReadmeSnippets, AttentionModule) {
  // snippet: attention
  // One layer's attention with your own projections: 1 row, 3 new tokens, 4 query heads sharing
  // 2 kv heads (grouped-query attention) of 16. States are transformers' layout after its
  // view(...).transpose(1, 2): [batch, heads, q_len, head_dim].
  const std::int64_t batch = 1, q_len = 3, num_heads = 4, num_kv_heads = 2, head_dim = 16;
  Tensor q = Tensor::empty({batch, num_heads, q_len, head_dim}, DType::kFloat32);
  Tensor k = Tensor::empty({batch, num_kv_heads, q_len, head_dim}, DType::kFloat32);
  Tensor v = Tensor::empty({batch, num_kv_heads, q_len, head_dim}, DType::kFloat32);
  for (const Tensor& s : {q, k, v})  // made-up states in place of q_proj(x), k_proj(x), v_proj(x)
    for (std::int64_t i = 0; i < s.numel(); ++i) s.data_as<float>()[i] = std::sin(0.1f * i);

  DynamicCache<> past_key_values;
  Attention attn(/*layer_idx=*/0,
                 {.num_heads = num_heads, .num_kv_heads = num_kv_heads, .head_dim = head_dim});
  RotaryEmbedding rope({.head_dim = head_dim, .rope_theta = 10000.0});
  const Tensor attention_mask = ones_mask(batch, q_len);  // [batch, past + q_len]
  const Tensor position_ids = position_ids_from_attention_mask(attention_mask);  // [batch, q_len]
  rope.apply(q, position_ids);  // in place; keys are cached after RoPE
  rope.apply(k, position_ids);
  Tensor out =
      attn.forward(q, k, v, past_key_values, attention_mask, make_cache_position(0, q_len));
  // out: [batch, q_len, num_heads, head_dim], ready for o_proj as [batch * q_len, 64].
  // past_key_values holds layer 0's keys and values, [batch, num_kv_heads, 3, head_dim] each.
  // end snippet
  EXPECT_EQ(out.size(0), batch);
  EXPECT_EQ(out.size(1), q_len);
  EXPECT_EQ(out.size(2), num_heads);
  EXPECT_EQ(out.size(3), head_dim);
  EXPECT_EQ(past_key_values.get_seq_length(0), 3);
  EXPECT_EQ(past_key_values.num_layers(), 1);
}

TEST(ReadmeSnippets, LegacyFormat) {
  // snippet: legacy
  LegacyCache legacy;  // one (key, value) pair per layer, each [batch, num_kv_heads, seq, head_dim]
  for (int layer = 0; layer < 2; ++layer)
    legacy.emplace_back(Tensor::zeros({1, 2, 5, 16}, DType::kFloat32),
                        Tensor::zeros({1, 2, 5, 16}, DType::kFloat32));
  auto cache = DynamicCache<>::from_legacy_cache(legacy);     // copies into cache storage
  LegacyCache legacy_format_cache = cache.to_legacy_cache();  // views, no copy
  // end snippet
  EXPECT_EQ(cache.num_layers(), 2);
  EXPECT_EQ(cache.get_seq_length(), 5);
  ASSERT_EQ(legacy_format_cache.size(), 2u);
  EXPECT_EQ(legacy_format_cache[1].first.size(2), 5);
}

TEST(ReadmeSnippets, Threads) {
  const int before = cpu::num_threads();
  // snippet: threads
  cpu::set_num_threads(1);     // this thread's CPU kernels use 1 thread from now on
  int n = cpu::num_threads();  // 1
  // end snippet
  EXPECT_EQ(n, 1);
  cpu::set_num_threads(before);
}

TEST(ReadmeSnippets, SlidingWindowLayers) {
  // snippet: sliding
  const LlamaModel model = LlamaModel::from_pretrained("tests/data/mistral_window");  // window 6
  DynamicCache<> past_key_values({.sliding_windows = model.config().sliding_windows()});
  // transformers' DynamicCache(config=model.config): a sliding layer for each sliding layer
  auto [input_ids, attention_mask] = left_pad({{5, 17, 42, 7, 9, 11, 13, 15}}, 0);
  const GenerateResult result =
      generate(model, input_ids, attention_mask, {.max_new_tokens = 12}, &past_key_values);
  // past_key_values.get_seq_length() counts the 19 tokens seen; each layer keeps at most
  // window - 1 + sliding_spare_slots of them.
  // end snippet
  EXPECT_EQ(past_key_values.get_seq_length(), 8 + 12 - 1);
  // The same tokens as full layers, which keep everything.
  auto [ids, mask] = left_pad({{5, 17, 42, 7, 9, 11, 13, 15}}, 0);
  DynamicCache<> full;
  EXPECT_EQ(generate(model, ids, mask, {.max_new_tokens = 12}, &full).new_tokens,
            result.new_tokens);
  EXPECT_LT(past_key_values.nbytes(), full.nbytes());
}

TEST(ReadmeSnippets, OnTheGpu) {
  if (cuda::device_count() == 0) GTEST_SKIP() << "no CUDA device";
  // snippet: gpu
  const LlamaModel model =
      LlamaModel::from_pretrained("tests/data/llama_gqa", {.device = Device::kCuda});
  DynamicCache<cuda::Backend> past_key_values;  // keys and values in device memory
  auto [input_ids, attention_mask] = left_pad({{5, 17, 42, 7}, {23, 8}}, /*pad_token_id=*/0);
  // input_ids and the mask stay host tensors; forward() returns logits on the GPU and
  // argmax_last() reads back only the ids. The seed loop above runs unchanged.
  const GenerateResult result =
      generate(model, input_ids, attention_mask, {.max_new_tokens = 8}, &past_key_values);
  // end snippet
  auto [ids, mask] = left_pad({{5, 17, 42, 7}, {23, 8}}, 0);
  const LlamaModel cpu_model = LlamaModel::from_pretrained("tests/data/llama_gqa");
  EXPECT_EQ(result.new_tokens, generate(cpu_model, ids, mask, {.max_new_tokens = 8}).new_tokens);
}

}  // namespace
