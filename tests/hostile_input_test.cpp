// Hostile files and inputs (issue #10, "Seen failing"): each class of failure that crashed, hung,
// leaked a foreign exception or accepted garbage, with hand-made inputs written here into a temp
// dir. Every case must end in a kvcache::Error that names what was wrong, quickly and without
// exhausting the stack or memory.
//
// Classes: memory corruption (tokenizer ids, tensor sizes), stack overflow (deep JSON), foreign
// exceptions (huge counts), hangs (block_count, FIFOs), garbage accepted (GGUF and config.json
// validate alike), control-token injection (bytes without a token), unclear errors (scalar
// tensors, special ids, UTF-8 offsets) and memory blow-up (GGUF metadata arrays).
#include <gtest/gtest.h>
#include <malloc.h>
#include <sys/stat.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <filesystem>
#include <limits>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "kvcache/kvcache.hpp"
#include "kvcache/model/gguf.hpp"
#include "kvcache/model/safetensors.hpp"
#include "kvcache/tokenizer/chat_template.hpp"
#include "kvcache/tokenizer/tokenizer.hpp"
#include "temp_dir.hpp"
#include "test_util.hpp"

#ifndef KVCACHE_DEFAULT_MODEL_PATH
#error "KVCACHE_DEFAULT_MODEL_PATH must name the default model's GGUF file"
#endif

namespace kvcache {
namespace {

using testing::error_of;
using testing::TempDir;
using testing::write_bytes;

#define EXPECT_ERROR_HAS(statement, needle)                                       \
  do {                                                                            \
    const std::string message = error_of([&] { (void)(statement); });             \
    EXPECT_NE(message.find(needle), std::string::npos) << "message: " << message; \
  } while (false)

// --- a small GGUF writer (what gguf_test.cpp's writer does, for whole llama files) -------------

template <class T>
std::string le(T value) {
  std::string bytes(sizeof value, '\0');
  std::memcpy(bytes.data(), &value, sizeof value);
  return bytes;
}
std::string gguf_string(std::string_view text) {
  return le<std::uint64_t>(text.size()) + std::string(text);
}

struct Kv {
  std::string key;
  std::uint32_t type;
  std::string bytes;
};
Kv kv_u32(const std::string& k, std::uint32_t v) { return {k, 4, le(v)}; }
Kv kv_i32(const std::string& k, std::int32_t v) { return {k, 5, le(v)}; }
Kv kv_u64(const std::string& k, std::uint64_t v) { return {k, 10, le(v)}; }
Kv kv_f32(const std::string& k, float v) { return {k, 6, le(v)}; }
Kv kv_str(const std::string& k, const std::string& v) { return {k, 8, gguf_string(v)}; }

struct F32Tensor {
  std::string name;
  std::vector<std::int64_t> ne;  // ggml order
};

std::string build_gguf(const std::vector<Kv>& kvs, const std::vector<F32Tensor>& tensors) {
  std::string out = "GGUF" + le<std::uint32_t>(3) + le<std::uint64_t>(tensors.size()) +
                    le<std::uint64_t>(kvs.size());
  for (const Kv& kv : kvs) out += gguf_string(kv.key) + le(kv.type) + kv.bytes;
  std::uint64_t offset = 0;
  std::vector<std::uint64_t> sizes;
  for (const F32Tensor& t : tensors) {
    std::uint64_t n = 1;
    for (const std::int64_t d : t.ne) n *= static_cast<std::uint64_t>(d);
    sizes.push_back(n * 4);
    out += gguf_string(t.name) + le<std::uint32_t>(static_cast<std::uint32_t>(t.ne.size()));
    for (const std::int64_t d : t.ne) out += le(d);
    out += le<std::uint32_t>(0) + le(offset);  // F32
    offset += (n * 4 + 31) / 32 * 32;
  }
  out.resize((out.size() + 31) / 32 * 32, '\0');
  for (std::size_t i = 0; i < tensors.size(); ++i) {
    std::string data(static_cast<std::size_t>(sizes[i]), '\0');
    for (std::size_t k = 0; k + 4 <= data.size(); k += 4) {
      const float v = 0.01f * static_cast<float>((k / 4) % 7 + 1);
      std::memcpy(data.data() + k, &v, 4);
    }
    data.resize(static_cast<std::size_t>((sizes[i] + 31) / 32 * 32), '\0');
    out += data;
  }
  return out;
}

// A one-layer llama GGUF (hidden 8, 2 heads of 4, ffn 16, vocab 12), with `overrides` replacing
// metadata keys of the same name and `scalar` naming a tensor written with no dimensions.
constexpr std::int64_t kHidden = 8, kFfn = 16, kVocab = 12;
std::string tiny_llama(const std::vector<Kv>& overrides = {}, const std::string& scalar = "") {
  std::vector<Kv> kvs = {
      kv_str("general.architecture", "llama"),
      kv_u32("llama.embedding_length", kHidden),
      kv_u32("llama.feed_forward_length", kFfn),
      kv_u32("llama.block_count", 1),
      kv_u32("llama.attention.head_count", 2),
      kv_u32("llama.attention.head_count_kv", 2),
      kv_u32("llama.context_length", 64),
      kv_u32("llama.vocab_size", kVocab),
      kv_f32("llama.attention.layer_norm_rms_epsilon", 1e-5f),
  };
  for (const Kv& o : overrides) {
    bool replaced = false;
    for (Kv& kv : kvs)
      if (kv.key == o.key) kv = o, replaced = true;
    if (!replaced) kvs.push_back(o);
  }
  std::vector<F32Tensor> tensors = {
      {"token_embd.weight", {kHidden, kVocab}},    {"output_norm.weight", {kHidden}},
      {"blk.0.attn_norm.weight", {kHidden}},       {"blk.0.ffn_norm.weight", {kHidden}},
      {"blk.0.attn_q.weight", {kHidden, kHidden}}, {"blk.0.attn_k.weight", {kHidden, kHidden}},
      {"blk.0.attn_v.weight", {kHidden, kHidden}}, {"blk.0.attn_output.weight", {kHidden, kHidden}},
      {"blk.0.ffn_gate.weight", {kHidden, kFfn}},  {"blk.0.ffn_up.weight", {kHidden, kFfn}},
      {"blk.0.ffn_down.weight", {kFfn, kHidden}},
  };
  for (F32Tensor& t : tensors)
    if (t.name == scalar) t.ne.clear();
  return build_gguf(kvs, tensors);
}

// A minimal byte-level BPE tokenizer.json: the 256 byte tokens but `missing` (GPT-2's alphabet),
// plus `extra_vocab` and `added` spliced in as JSON text.
std::string byte_char(int b) {
  // bytes_to_unicode(): printable Latin-1 stands for itself, the other 68 bytes are U+0100...
  int extra = 0;
  for (int x = 0; x < 256; ++x) {
    const bool printable = (x >= 0x21 && x <= 0x7E) || (x >= 0xA1 && x <= 0xAC) || x >= 0xAE;
    const int cp = printable ? x : 256 + extra++;
    if (x == b) {
      std::string out;
      if (cp < 0x80) {
        out += static_cast<char>(cp);
      } else {
        out += static_cast<char>(0xC0 | (cp >> 6));
        out += static_cast<char>(0x80 | (cp & 0x3F));
      }
      return out;
    }
  }
  return {};
}

std::string tokenizer_json(int missing = -1, const std::string& extra_vocab = "",
                           const std::string& added = "[]", const std::string& unk = "null") {
  nlohmann::json vocab = nlohmann::json::object();
  int id = 0;
  for (int b = 0; b < 256; ++b)
    if (b != missing) vocab[byte_char(b)] = id++;
  std::string text = vocab.dump();
  if (!extra_vocab.empty()) text = text.substr(0, text.size() - 1) + "," + extra_vocab + "}";
  return R"({"model": {"type": "BPE", "unk_token": )" + unk + R"(, "vocab": )" + text +
         R"(, "merges": []}, "added_tokens": )" + added +
         R"(, "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": false}})";
}

std::string nested(int depth, const std::string& leaf = "1") {
  return std::string(static_cast<std::size_t>(depth), '[') + leaf +
         std::string(static_cast<std::size_t>(depth), ']');
}

bool model_present() { return std::filesystem::exists(KVCACHE_DEFAULT_MODEL_PATH); }

const std::string kConfig = R"({
  "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 12,
  "hidden_size": 8, "intermediate_size": 16, "num_hidden_layers": 1,
  "num_attention_heads": 2, "num_key_value_heads": 2, "max_position_embeddings": 64,
  "rms_norm_eps": 1e-5 REPLACE})";

std::string config_with(const std::string& extra) {
  std::string c = kConfig;
  c.replace(c.find(" REPLACE"), 8, extra);
  return c;
}

// --- 1. memory corruption ------------------------------------------------------------------------

TEST(HostileMemoryCorruption, TokenizerIdsOutsideTheVocabularyAreRefusedBeforeTables) {
  TempDir dir;
  const std::string path = dir.file("tokenizer.json");
  for (const std::string id : {"-1", "9223372036854775807", "18446744073709551615", "1000000000000",
                               "256", "1.5", "\"7\""}) {
    write_bytes(path, tokenizer_json(0, "\"zz\": " + id));
    EXPECT_ERROR_HAS(Tokenizer::from_json_file(path),
                     "model.vocab \"zz\": expected an id in [0, 256)");
    write_bytes(path, tokenizer_json(0, "", R"([{"id": )" + id + R"(, "content": "<x>"}])"));
    EXPECT_ERROR_HAS(Tokenizer::from_json_file(path), "added_tokens \"<x>\": expected an id in");
  }
  // The same file with good ids loads.
  write_bytes(path, tokenizer_json(0, "\"zz\": 255"));
  EXPECT_EQ(Tokenizer::from_json_file(path).vocab_size(), 256);
}

TEST(HostileMemoryCorruption, TensorSizesAreMultipliedWithOverflowChecks) {
  constexpr std::int64_t k40 = std::int64_t{1} << 40, k62 = std::int64_t{1} << 62;
  EXPECT_ERROR_HAS(Tensor::empty({k40, k40}, DType::kFloat32), "more bytes than 64 bits can count");
  EXPECT_ERROR_HAS(Tensor::empty({k62}, DType::kFloat32), "more bytes than 64 bits can count");
  EXPECT_ERROR_HAS(Tensor::empty({2, k62}, DType::kUInt8), "more bytes than 64 bits can count");
  // A zero size does not hide an overflowing stride.
  EXPECT_ERROR_HAS(Tensor::empty({0, k40, k40}, DType::kFloat32), "Tensor::empty: shape [0, ");
  float x = 0;
  EXPECT_ERROR_HAS(Tensor::from_blob(&x, {k40, k40, 1, 1}, DType::kFloat32), "Tensor: shape");
  Tensor small = Tensor::zeros({2, 3}, DType::kFloat32);
  EXPECT_ERROR_HAS(small.view({k40, k40, 0}), "Tensor::view: shape");
  // Countable but not allocatable (2^46 floats: more than any address space): a kvcache::Error.
  EXPECT_ERROR_HAS(Tensor::empty({std::int64_t{1} << 46}, DType::kFloat32),
                   "Tensor::empty: cannot allocate");
}

// --- 2. stack overflow
// -----------------------------------------------------------------------------

TEST(HostileStackOverflow, DeeplyNestedJsonIsRefusedWhileParsing) {
  TempDir dir;
  const std::string deep = nested(60000);
  EXPECT_ERROR_HAS(ModelConfig::from_json(config_with(", \"rope_scaling\": " + deep)),
                   "nested at most 128 levels");
  const std::string tok = dir.file("tokenizer.json");
  write_bytes(tok, tokenizer_json(-1).substr(0, tokenizer_json(-1).size() - 1) +
                       ", \"decoder\": " + deep + "}");
  EXPECT_ERROR_HAS(Tokenizer::from_json_file(tok), "nested at most 128 levels");
  const std::string header =
      R"({"w": {"dtype": "F32", "shape": )" + deep + R"(, "data_offsets": [0, 4]}})";
  const std::string st = dir.file("model.safetensors");
  write_bytes(st, le<std::uint64_t>(header.size()) + header + std::string(4, '\0'));
  EXPECT_ERROR_HAS(SafetensorsFile::open(st), "nested at most 128 levels");
  // Nesting a real file uses is fine.
  EXPECT_ERROR_HAS(ModelConfig::from_json(config_with(", \"rope_scaling\": " + nested(100))),
                   "rope_scaling");
}

TEST(HostileStackOverflow, MessagesQuoteAtMostAFewHundredBytes) {
  TempDir dir;
  const std::string big(100000, 'x');
  const std::string tok = dir.file("tokenizer.json");
  const std::string base = tokenizer_json(-1);
  write_bytes(tok, base.substr(0, base.size() - 1) +
                       R"(, "decoder": {"type": "Strip", "content": ")" + big + "\"}}");
  std::string message = error_of([&] { (void)Tokenizer::from_json_file(tok); });
  EXPECT_NE(message.find("decoder: expected ByteLevel"), std::string::npos) << message;
  EXPECT_LT(message.size(), 600u);
  message = error_of(
      [&] { (void)ModelConfig::from_json(config_with(R"(, "hidden_act": [")" + big + "\"]")); });
  EXPECT_NE(message.find("hidden_act"), std::string::npos) << message;
  EXPECT_LT(message.size(), 600u);
  message = error_of(
      [&] { (void)ModelConfig::from_json(config_with(R"(, "hidden_act": ")" + big + "\"")); });
  EXPECT_LT(message.size(), 600u) << message.substr(0, 300);
}

// --- 3. exceptions that are not kvcache::Error
// -------------------------------------------------------

TEST(HostileForeignExceptions, HugeCountsFromFilesAreErrorsNotBadAlloc) {
  EXPECT_ERROR_HAS(ModelConfig::from_json(config_with(", \"num_hidden_layers\": 1000000000000")),
                   "expected at most 4096 layers, got 1000000000000");
  EXPECT_ERROR_HAS(ModelConfig::from_json(
                       config_with(R"(, "architectures": ["Qwen2ForCausalLM"], "model_type": )"
                                   R"("qwen2", "num_hidden_layers": 1000000000000)")),
                   "expected at most 4096 layers");
  TempDir dir;
  const std::string tok = dir.file("tokenizer.json");
  write_bytes(tok, tokenizer_json(0, "", R"([{"id": 1000000000000, "content": "<x>"}])"));
  EXPECT_ERROR_HAS(Tokenizer::from_json_file(tok), "got 1000000000000");
  write_bytes(dir.file("llama.gguf"), tiny_llama({kv_u64("llama.block_count", 1000000000000)}));
  EXPECT_ERROR_HAS(LlamaModel::from_gguf(dir.file("llama.gguf")), "llama.block_count");
}

// --- 4. hangs
// --------------------------------------------------------------------------------------

TEST(HostileHangs, BlockCountIsBoundedByTheTensorsTheFileHolds) {
  TempDir dir;
  const std::string path = dir.file("meta_only.gguf");
  // 2^62 layers and no tensors: refused at once, not looped over.
  write_bytes(path, build_gguf({kv_str("general.architecture", "llama"),
                                kv_u32("llama.embedding_length", 8),
                                kv_u32("llama.feed_forward_length", 16),
                                kv_u64("llama.block_count", std::uint64_t{1} << 62),
                                kv_u32("llama.attention.head_count", 2),
                                kv_u32("llama.context_length", 64), kv_u32("llama.vocab_size", 12)},
                               {}));
  EXPECT_ERROR_HAS(ModelConfig::from_gguf(GgufFile::open(path)), "llama.block_count");
  EXPECT_ERROR_HAS(LlamaModel::from_gguf(path), path);
  // Two layers declared, one present: the missing one is named.
  write_bytes(path, tiny_llama({kv_u32("llama.block_count", 2)}));
  EXPECT_ERROR_HAS(ModelConfig::from_gguf(GgufFile::open(path)),
                   "layer 1 has no tensor 'blk.1.attn_norm.weight'");
}

TEST(HostileHangs, FifosAreRefusedWithoutOpeningThem) {
  TempDir dir;
  const std::string fifo = dir.file("model.gguf");
  ASSERT_EQ(::mkfifo(fifo.c_str(), 0600), 0);
  // Each would block in open() for ever if it opened the FIFO before checking what it is.
  EXPECT_ERROR_HAS(GgufFile::open(fifo), "expected a regular file, got a FIFO");
  EXPECT_ERROR_HAS(LlamaModel::from_gguf(fifo), "got a FIFO");
  EXPECT_ERROR_HAS(SafetensorsFile::open(fifo), "got a FIFO");
  EXPECT_ERROR_HAS(ModelConfig::from_file(fifo), "got a FIFO");
  EXPECT_ERROR_HAS(Tokenizer::from_json_file(fifo), "got a FIFO");
  const std::string folder = dir.file("folder");
  std::filesystem::create_directories(folder);
  ASSERT_EQ(::mkfifo((folder + "/config.json").c_str(), 0600), 0);
  EXPECT_ERROR_HAS(LlamaModel::from_pretrained(folder), "got a FIFO");
  EXPECT_ERROR_HAS(GgufFile::open(dir.str()), "got a directory");
}

// --- 4b. undefined behaviour in size arithmetic
// --------------------------------------------------------------------

TEST(HostileUndefinedBehaviour, HeadsTimesHeadDimThatOverflowsIsAClearError) {
  // heads x head_dim (the query rows) is checked without overflow in validate(), which both
  // loaders end in: a GGUF key_length or a config.json head_dim so large that the product wraps
  // int64 (2 x 2^62, 2 x (2^63 - 2)), or that fits but passes 2^31, is refused by name.
  constexpr std::uint64_t k62 = std::uint64_t{1} << 62;
  constexpr std::uint64_t kMaxEven = std::uint64_t{std::numeric_limits<std::int64_t>::max()} - 1;
  TempDir dir;
  const std::string path = dir.file("llama.gguf");
  for (const std::uint64_t key_length : {k62, kMaxEven, std::uint64_t{1} << 31}) {
    SCOPED_TRACE(key_length);
    write_bytes(path, tiny_llama({kv_u64("llama.attention.key_length", key_length)}));
    const std::string want =
        "expected sizes below 2^31, got vocab_size 12, hidden_size 8, "
        "intermediate_size 16, num_attention_heads 2 x head_dim " +
        std::to_string(key_length);
    EXPECT_ERROR_HAS(ModelConfig::from_gguf(GgufFile::open(path)), want);
    EXPECT_ERROR_HAS(LlamaModel::from_gguf(path), want);
    EXPECT_ERROR_HAS(LlamaModel::from_gguf(path), path);
    EXPECT_ERROR_HAS(
        ModelConfig::from_json(config_with(", \"head_dim\": " + std::to_string(key_length))), want);
  }
  // A key_length past int64 itself is refused where it is read, naming the key.
  write_bytes(path, tiny_llama({kv_u64("llama.attention.key_length", std::uint64_t{1} << 63)}));
  EXPECT_ERROR_HAS(LlamaModel::from_gguf(path),
                   "metadata key 'llama.attention.key_length': expected an integer that fits "
                   "int64, got 9223372036854775808");
  EXPECT_ERROR_HAS(ModelConfig::from_json(config_with(R"(, "head_dim": 18446744073709551614)")),
                   "head_dim");
  // Both factors large (2^32 heads of 2^32): the product is 2^64.
  EXPECT_ERROR_HAS(ModelConfig::from_json(config_with(
                       R"(, "num_attention_heads": 4294967296, "num_key_value_heads": 4294967296,)"
                       R"( "head_dim": 4294967296)")),
                   "num_attention_heads 4294967296 x head_dim 4294967296");
}

// --- 5. garbage accepted
// ----------------------------------------------------------------------------

TEST(HostileGarbage, GgufAndConfigJsonRefuseTheSameBadValues) {
  TempDir dir;
  const std::string path = dir.file("llama.gguf");
  write_bytes(path, tiny_llama());
  const LlamaModel good = LlamaModel::from_gguf(path);  // the unaltered file loads
  EXPECT_EQ(good.config().num_hidden_layers, 1);

  struct Case {
    Kv kv;
    std::string json;  // the same value in config.json
    std::string needle;
  };
  const float nan = std::numeric_limits<float>::quiet_NaN();
  const std::vector<Case> cases = {
      {kv_f32("llama.attention.layer_norm_rms_epsilon", -1e-5f), R"("rms_norm_eps": -1e-5)",
       "rms_norm_eps"},
      {kv_f32("llama.attention.layer_norm_rms_epsilon", nan), "", "rms_norm_eps"},
      {kv_f32("llama.attention.layer_norm_rms_epsilon", 0), R"("rms_norm_eps": 0)", "rms_norm_eps"},
      {kv_i32("llama.context_length", -5), R"("max_position_embeddings": -5)",
       "max_position_embeddings"},
      {kv_u32("llama.block_count", 0), R"("num_hidden_layers": 0)", "num_hidden_layers"},
      {kv_i32("llama.block_count", -1), R"("num_hidden_layers": -1)", "num_hidden_layers"},
      {kv_i32("llama.embedding_length", -8), R"("hidden_size": -8)", ""},
      {kv_i32("llama.attention.key_length", -4), R"("head_dim": -4)", "head_dim"},
      {kv_i32("llama.attention.key_length", 3), R"("head_dim": 3)", "head_dim"},
      {kv_f32("llama.rope.freq_base", -1), R"("rope_theta": -1)", "rope_theta"},
      {kv_u32("tokenizer.ggml.padding_token_id", 99), R"("pad_token_id": 99)", "pad_token_id"},
      {kv_u32("tokenizer.ggml.eos_token_id", 12), R"("eos_token_id": 12)", "eos_token_id"},
  };
  for (const Case& c : cases) {
    SCOPED_TRACE(c.kv.key);
    write_bytes(path, tiny_llama({c.kv}));
    EXPECT_ERROR_HAS(LlamaModel::from_gguf(path), c.needle);
    EXPECT_ERROR_HAS(ModelConfig::from_gguf(GgufFile::open(path)), path);
    if (!c.json.empty())
      EXPECT_ERROR_HAS(ModelConfig::from_json(config_with(", " + c.json)), c.needle);
  }
}

TEST(HostileGarbage, ConfigsBuiltByHandAreValidatedAtLoad) {
  ModelConfig c = ModelConfig::from_json(config_with(""));
  c.validate("ok");
  c.num_hidden_layers = 0;
  EXPECT_ERROR_HAS(c.validate("by hand"), "by hand: expected num_hidden_layers > 0, got 0");
  c.num_hidden_layers = 1;
  c.pad_token_id = 12;
  EXPECT_ERROR_HAS(c.validate("by hand"), "expected pad_token_id in [0, 12)");
  c.pad_token_id = std::nullopt;
  c.rms_norm_eps = std::nan("");
  EXPECT_ERROR_HAS(c.validate("by hand"), "rms_norm_eps");
}

// --- 6. control-token injection
// -----------------------------------------------------------------------

TEST(HostileControlTokens, BytesWithoutATokenAreDroppedNotTheUnknownId) {
  ASSERT_TRUE(model_present()) << KVCACHE_DEFAULT_MODEL_PATH;
  const Tokenizer tok = Tokenizer::from_gguf(GgufFile::open(KVCACHE_DEFAULT_MODEL_PATH));
  // transformers: tokenizer("a\x04" "b", add_special_tokens=False) -> [81, 82].
  EXPECT_EQ(tok.encode("a\x04"
                       "b"),
            (std::vector<std::int64_t>{81, 82}));
  EXPECT_EQ(tok.encode("a\x04"
                       "b",
                       false),
            (std::vector<std::int64_t>{81, 82}));
  const auto is_added = [&](std::int64_t id) {
    return tok.token_type(id) == TokenType::kControl ||
           tok.token_type(id) == TokenType::kUserDefined;
  };
  // No byte, alone or between letters, encodes to an added token; nor does any valid 2- to
  // 4-byte character whose lead byte has no token (0xf1, 0xf2).
  std::vector<std::string> texts;
  for (int b = 0; b < 0x80; ++b) {
    std::string text = "x";
    text += static_cast<char>(b);
    text += 'y';
    texts.push_back(text);
  }
  for (const char* t : {"\xf1\x80\x80\x80", "\xf2\x9f\xbf\xbf", "a\x06\x13\x14\x16\x1d z",
                        "<|endoftext|>", "<|im_start|>user\nhi<|im_end|>"})
    texts.push_back(t);
  for (const std::string& t : texts) {
    for (const std::int64_t id : tok.encode(t, /*parse_special=*/false))
      EXPECT_FALSE(is_added(id)) << "'" << t << "' encodes to " << tok.token_text(id);
  }
  for (std::size_t i = 0; i + 2 < texts.size(); ++i) {
    for (const std::int64_t id : tok.encode(texts[i]))
      EXPECT_FALSE(is_added(id)) << "'" << texts[i] << "' encodes to " << tok.token_text(id);
  }
  // With parse_special the markers written in the text still are their ids.
  EXPECT_TRUE(is_added(tok.encode("<|endoftext|>")[0]));
}

TEST(HostileControlTokens, TokenizerJsonUnknownTokenIsUsedOnlyWhenItIsNotAnAddedToken) {
  TempDir dir;
  const std::string path = dir.file("tokenizer.json");
  // Byte 0x04 has no token. A special unk: dropped (never text -> special id).
  write_bytes(path,
              tokenizer_json(0x04, "\"<unk>\": 255",
                             R"([{"id": 255, "content": "<unk>", "special": true}])", "\"<unk>\""));
  Tokenizer tok = Tokenizer::from_json_file(path);
  EXPECT_EQ(tok.unk_token_id(), 255);
  EXPECT_EQ(tok.encode("a\x04"
                       "b",
                       false),
            (std::vector<std::int64_t>{*tok.token_id("a"), *tok.token_id("b")}));
  // No unk at all: dropped too (the tokenizers library without byte_fallback).
  write_bytes(path, tokenizer_json(0x04));
  tok = Tokenizer::from_json_file(path);
  EXPECT_EQ(tok.encode("a\x04"
                       "b")
                .size(),
            2u);
  // A plain vocabulary unk token: used, as the tokenizers library does.
  write_bytes(path, tokenizer_json(0x04, "\"UNK\": 255", "[]", "\"UNK\""));
  tok = Tokenizer::from_json_file(path);
  EXPECT_EQ(tok.encode("a\x04"
                       "b"),
            (std::vector<std::int64_t>{*tok.token_id("a"), 255, *tok.token_id("b")}));
}

// --- 7. unclear errors
// -------------------------------------------------------------------------------

TEST(HostileUnclearErrors, AScalarWeightNamesTheFileAndTheTensor) {
  TempDir dir;
  const std::string path = dir.file("scalar.gguf");
  // GGUF name, and the transformers name the model's shape check uses.
  const std::vector<std::pair<std::string, std::string>> names = {
      {"blk.0.attn_q.weight", "blk.0.attn_q.weight"},
      {"blk.0.attn_k.weight", "blk.0.attn_k.weight"},
      {"blk.0.ffn_up.weight", "model.layers.0.mlp.up_proj.weight"},
      {"token_embd.weight", "model.embed_tokens.weight"},
      {"blk.0.attn_norm.weight", "model.layers.0.input_layernorm.weight"}};
  for (const auto& [name, named] : names) {
    write_bytes(path, tiny_llama({}, name));
    const std::string message = error_of([&] { (void)LlamaModel::from_gguf(path); });
    EXPECT_NE(message.find(path), std::string::npos) << message;
    EXPECT_NE(message.find(named), std::string::npos) << message;
    EXPECT_EQ(message.find("dimension 0 out of range"), std::string::npos) << message;
  }
  write_bytes(path, tiny_llama({}, "blk.0.attn_q.weight"));
  EXPECT_ERROR_HAS(LlamaModel::from_gguf(path), "tensor 'blk.0.attn_q.weight': expected a matrix");
}

TEST(HostileUnclearErrors, SpecialIdsAreCheckedAtLoad) {
  TempDir dir;
  const std::string path = dir.file("pad.gguf");
  write_bytes(path, tiny_llama({kv_u32("tokenizer.ggml.padding_token_id", 4000)}));
  EXPECT_ERROR_HAS(LlamaModel::from_gguf(path),
                   "expected pad_token_id in [0, 12) (the vocabulary), got 4000");
  write_bytes(path, tiny_llama({kv_u32("tokenizer.ggml.bos_token_id", 12)}));
  EXPECT_ERROR_HAS(ModelConfig::from_gguf(GgufFile::open(path)), "bos_token_id");
}

TEST(HostileUnclearErrors, InvalidUtf8IsReportedAtAnOffsetIntoTheUsersText) {
  const std::string chatml =
      "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n' + "
      "message['content'] + '<|im_end|>' + '\\n'}}{% endfor %}{% if add_generation_prompt %}"
      "{{ '<|im_start|>assistant\\n' }}{% endif %}";
  const ChatTemplate t = ChatTemplate::parse(chatml);
  const std::vector<ChatMessage> messages = {{"system", "be brief"}, {"user", "caf\xc3 ok"}};
  EXPECT_ERROR_HAS(t.apply(messages, true),
                   "message 1 (user): expected UTF-8 text in its content, got an invalid byte 0xc3 "
                   "at offset 3 of the content");
  const std::vector<ChatMessage> bad_role = {{"us\xffr", "hi"}};
  EXPECT_ERROR_HAS(t.apply(bad_role, true), "at offset 2 of the role");
}

// --- 8. memory blow-up
// ------------------------------------------------------------------------------

TEST(HostileMemory, MetadataArraysAreHeldCompactly) {
  TempDir dir;
  const std::string path = dir.file("array.gguf");
  constexpr std::uint64_t kCount = 30'000'000;  // 30 MB of uint8: once 3 GB of GgufValues
  std::string items(kCount, '\x07');
  write_bytes(path, build_gguf({{"big", 9, le<std::uint32_t>(0) + le(kCount) + items},
                                {"words", 9,
                                 le<std::uint32_t>(8) + le<std::uint64_t>(3) + gguf_string("a") +
                                     gguf_string("") + gguf_string("xyz")}},
                               {}));
  items.clear();
  items.shrink_to_fit();
  const std::size_t before = mallinfo2().uordblks + mallinfo2().hblkhd;
  const GgufFile file = GgufFile::open(path);
  const std::size_t after = mallinfo2().uordblks + mallinfo2().hblkhd;
  const GgufValue* big = file.find("big");
  ASSERT_NE(big, nullptr);
  EXPECT_EQ(big->array.size(), kCount);
  EXPECT_LE(big->array.held_bytes(), kCount + 64);
  EXPECT_LT(after - std::min(after, before), 2 * kCount) << "bytes held after open";
  EXPECT_EQ(big->array[kCount - 1].u, 7u);
  EXPECT_EQ(big->array_type, GgufValue::Type::kUInt8);
  EXPECT_EQ(file.get_int_array("big").size(), kCount);
  EXPECT_EQ(file.get_string_array("words"), (std::vector<std::string>{"a", "", "xyz"}));
  EXPECT_ERROR_HAS(big->array[kCount], "expected an index below 30000000");
}

}  // namespace
}  // namespace kvcache
