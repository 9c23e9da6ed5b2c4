// The byte-level BPE tokenizer against transformers' own (tools/make_tokenizer_reference.py):
// the default model's tokenizer read from its GGUF file, and two small tokenizer.json files
// (SmolLM2's hub pre-tokenizer, Llama 3's), on a list of awkward strings. Each string's ids, token
// strings, ids with special tokens split, decodes (whole, skipping special tokens, id by id) and
// the streaming decode must equal transformers'; the streamed pieces must each be valid UTF-8.
// Then the errors: unknown pre-tokenizers and models, ids out of range, invalid UTF-8.
#include "kvcache/tokenizer/tokenizer.hpp"

#include <gtest/gtest.h>

#include <filesystem>
#include <fstream>
#include <functional>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "kvcache/error.hpp"
#include "kvcache/model/gguf.hpp"
#include "temp_dir.hpp"
#include "test_util.hpp"

#ifndef KVCACHE_TEST_DATA_DIR
#error "KVCACHE_TEST_DATA_DIR must name tests/data"
#endif
#ifndef KVCACHE_DEFAULT_MODEL_PATH
#error "KVCACHE_DEFAULT_MODEL_PATH must name the default model's GGUF file"
#endif

namespace kvcache {
namespace {

using nlohmann::json;
using Ids = std::vector<std::int64_t>;

const std::string kDataDir = std::string(KVCACHE_TEST_DATA_DIR) + "/tokenizer";

json load_json(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  EXPECT_TRUE(in.good()) << path;
  return json::parse(in);
}

const json& smollm2_reference() {
  static const json reference = load_json(kDataDir + "/smollm2_encodings.json");
  return reference;
}

const json& tiny_reference() {
  static const json reference = load_json(kDataDir + "/tiny_encodings.json");
  return reference;
}

const Tokenizer& smollm2() {
  static const Tokenizer tokenizer =
      Tokenizer::from_gguf(GgufFile::open(KVCACHE_DEFAULT_MODEL_PATH));
  return tokenizer;
}

bool model_present() { return std::filesystem::exists(KVCACHE_DEFAULT_MODEL_PATH); }

// Whether `s` is well-formed UTF-8 (Unicode's table 3-7: no overlongs, surrogates or > U+10FFFF).
bool valid_utf8(std::string_view s) {
  const auto* p = reinterpret_cast<const unsigned char*>(s.data());
  std::size_t i = 0, n = s.size();
  while (i < n) {
    const unsigned char b = p[i];
    int len = 0;
    unsigned char lo = 0x80, hi = 0xBF;
    if (b < 0x80) {
      len = 1;
    } else if (b >= 0xC2 && b <= 0xDF) {
      len = 2;
    } else if (b >= 0xE0 && b <= 0xEF) {
      len = 3;
      lo = b == 0xE0 ? 0xA0 : 0x80;
      hi = b == 0xED ? 0x9F : 0xBF;
    } else if (b >= 0xF0 && b <= 0xF4) {
      len = 4;
      lo = b == 0xF0 ? 0x90 : 0x80;
      hi = b == 0xF4 ? 0x8F : 0xBF;
    } else {
      return false;
    }
    if (i + static_cast<std::size_t>(len) > n) return false;
    for (int k = 1; k < len; ++k) {
      const unsigned char c = p[i + static_cast<std::size_t>(k)];
      if (k == 1 ? (c < lo || c > hi) : (c < 0x80 || c > 0xBF)) return false;
    }
    i += static_cast<std::size_t>(len);
  }
  return true;
}

std::string printable(const std::string& s) { return json(s).dump(); }

// Every check of one reference case against `tok`.
void check_case(const Tokenizer& tok, const json& c) {
  const std::string text = c["text"].get<std::string>();
  const Ids want = c["ids"].get<Ids>();
  SCOPED_TRACE("text " + printable(text));

  const Ids ids = tok.encode(text);
  EXPECT_EQ(ids, want);
  const Ids split = c.contains("ids_split_special") ? c["ids_split_special"].get<Ids>() : want;
  EXPECT_EQ(tok.encode(text, /*parse_special=*/false), split);

  const auto tokens = c["tokens"].get<std::vector<std::string>>();
  ASSERT_EQ(tokens.size(), want.size());
  for (std::size_t i = 0; i < want.size(); ++i) {
    EXPECT_EQ(tok.token_text(want[i]), tokens[i]);
    EXPECT_EQ(tok.token_id(tokens[i]), want[i]);
  }

  EXPECT_EQ(tok.decode(want), c["decoded"].get<std::string>());
  EXPECT_EQ(tok.decode(want, /*skip_special=*/true), c["decoded_skip_special"].get<std::string>());
  if (c.contains("decode_each")) {
    const auto each = c["decode_each"].get<std::vector<std::string>>();
    ASSERT_EQ(each.size(), want.size());
    for (std::size_t i = 0; i < want.size(); ++i)
      EXPECT_EQ(tok.decode(Ids{want[i]}), each[i]) << "id " << want[i];
  }

  for (const bool skip : {false, true}) {
    StreamDecoder stream(tok, skip);
    std::string streamed;
    for (const std::int64_t id : want) {
      const std::string piece = stream.push(id);
      EXPECT_TRUE(valid_utf8(piece)) << "push(" << id << ") gave invalid UTF-8";
      streamed += piece;
    }
    const std::string rest = stream.flush();
    EXPECT_TRUE(valid_utf8(rest));
    streamed += rest;
    EXPECT_EQ(streamed, c[skip ? "decoded_skip_special" : "decoded"].get<std::string>())
        << "skip_special " << skip;
  }
}

TEST(TokenizerGguf, ReadsSmolLM2Metadata) {
  ASSERT_TRUE(model_present()) << KVCACHE_DEFAULT_MODEL_PATH
                               << " is missing: run scripts/setup-model.sh";
  const Tokenizer& tok = smollm2();
  const json& ref = smollm2_reference();
  EXPECT_EQ(tok.vocab_size(), ref["vocab_size"].get<std::int64_t>());
  EXPECT_EQ(tok.pre_tokenizer(), "smollm");
  // GGUF's ids (transformers' gguf integration reports <|im_start|> as EOS; the file says 2).
  EXPECT_EQ(tok.bos_token_id(), 1);
  EXPECT_EQ(tok.eos_token_id(), 2);
  EXPECT_EQ(tok.pad_token_id(), 2);
  EXPECT_EQ(tok.unk_token_id(), 0);
  EXPECT_FALSE(tok.add_bos_token());
  EXPECT_EQ(tok.token_text(2), "<|im_end|>");
  EXPECT_EQ(tok.token_type(2), TokenType::kControl);
  EXPECT_EQ(tok.token_type(100), TokenType::kNormal);
  EXPECT_EQ(tok.token_id("<|im_start|>"), 1);
  EXPECT_EQ(tok.token_id("Ġworld"), 905);
  EXPECT_EQ(tok.token_bytes(905), " world");
  EXPECT_EQ(tok.token_id("no such token"), std::nullopt);
  ASSERT_TRUE(tok.chat_template().has_value());
  EXPECT_EQ(*tok.chat_template(), ref["chat_template"].get<std::string>());
}

TEST(TokenizerGguf, EncodesAndDecodesLikeTransformers) {
  ASSERT_TRUE(model_present()) << KVCACHE_DEFAULT_MODEL_PATH
                               << " is missing: run scripts/setup-model.sh";
  const json& cases = smollm2_reference()["cases"];
  ASSERT_GT(cases.size(), 60u);
  for (const json& c : cases) {
    check_case(smollm2(), c);
    // transformers round-trips every one of these strings; so must we.
    const std::string text = c["text"].get<std::string>();
    EXPECT_EQ(smollm2().decode(smollm2().encode(text)), text) << printable(text);
  }
}

// transformers' gguf integration ignores tokenizer.ggml.pre and pre-tokenizes with GPT-2's regex
// alone; SmolLM2's tokenizer.json and llama.cpp first isolate each \p{N} character. The two differ
// only where a space or letter precedes a non-ASCII numeral (" ½": "ĠÂ" + "½" instead of "Ġ" +
// "½"). kvcache follows the model's own tokenizer; "gpt2" reproduces the gguf integration.
TEST(TokenizerGguf, DiffersFromTheGgufIntegrationOnlyWhereItDropsDigitSplitting) {
  ASSERT_TRUE(model_present()) << KVCACHE_DEFAULT_MODEL_PATH
                               << " is missing: run scripts/setup-model.sh";
  const GgufFile file = GgufFile::open(KVCACHE_DEFAULT_MODEL_PATH);
  BpeVocabulary v;
  v.tokens = file.get_string_array("tokenizer.ggml.tokens");
  v.merges = file.get_string_array("tokenizer.ggml.merges");
  for (std::int64_t t : file.get_int_array("tokenizer.ggml.token_type"))
    v.token_types.push_back(static_cast<std::int32_t>(t));
  v.pre = "gpt2";
  const Tokenizer gpt2 = Tokenizer::from_vocabulary(v);
  std::vector<std::string> differing;
  for (const json& c : smollm2_reference()["cases"]) {
    const std::string text = c["text"].get<std::string>();
    const Ids integration = c.contains("ids_gguf_integration")
                                ? c["ids_gguf_integration"].get<Ids>()
                                : c["ids"].get<Ids>();
    EXPECT_EQ(gpt2.encode(text), integration) << printable(text);
    if (c.contains("ids_gguf_integration")) differing.push_back(text);
  }
  EXPECT_EQ(differing, std::vector<std::string>{"Ⅻ ½ ¾ ² ٣٤٥ ०१२"});
}

TEST(TokenizerGguf, LongInputsRoundTrip) {
  ASSERT_TRUE(model_present()) << KVCACHE_DEFAULT_MODEL_PATH
                               << " is missing: run scripts/setup-model.sh";
  std::string letters(200000, 'a');
  std::string spaces(200000, ' ');
  std::string mixed;
  for (int i = 0; i < 5000; ++i) mixed += "Hello, wörld 42 ½ 😀 你好\n\t";
  for (const std::string& s : {letters, spaces, mixed}) {
    const Ids ids = smollm2().encode(s);
    EXPECT_LT(ids.size(), s.size());
    EXPECT_EQ(smollm2().decode(ids), s);
  }
}

TEST(TokenizerJson, EncodesAndDecodesLikeTransformers) {
  for (const auto& [style, ref] : tiny_reference()["tokenizers"].items()) {
    SCOPED_TRACE("tiny_" + style);
    const Tokenizer tok =
        Tokenizer::from_json_file(kDataDir + "/" + ref["path"].get<std::string>());
    EXPECT_EQ(tok.vocab_size(), ref["vocab_size"].get<std::int64_t>());
    // (ref passed in: clang 14 cannot capture a structured binding.)
    auto id_or_none = [](const nlohmann::json& r, const char* key) -> std::optional<std::int64_t> {
      if (r[key].is_null()) return std::nullopt;
      return r[key].get<std::int64_t>();
    };
    EXPECT_EQ(tok.bos_token_id(), id_or_none(ref, "bos_token_id"));
    EXPECT_EQ(tok.eos_token_id(), id_or_none(ref, "eos_token_id"));
    EXPECT_EQ(tok.pad_token_id(), id_or_none(ref, "pad_token_id"));
    EXPECT_EQ(tok.unk_token_id(), id_or_none(ref, "unk_token_id"));
    EXPECT_EQ(tok.chat_template().has_value(), style == "smollm");
    EXPECT_EQ(tok.token_type(*tok.token_id("<extra>")), TokenType::kUserDefined);
    EXPECT_EQ(tok.token_type(*tok.token_id("<mask>")), TokenType::kControl);
    for (const json& c : ref["cases"]) check_case(tok, c);
  }
}

// GGUF's "llama-bpe" (Llama 3's regex, merges ignored for whole vocabulary entries) on
// tiny_llama3's vocabulary, as a GGUF file would carry it, against tokenizer.json's Split +
// ByteLevel.
TEST(TokenizerJson, LlamaBpeFromVocabularyMatchesTheJsonPreTokenizer) {
  const json& ref = tiny_reference()["tokenizers"]["llama3"];
  const json j = load_json(kDataDir + "/tiny_llama3/tokenizer.json");
  BpeVocabulary v;
  v.tokens.resize(ref["vocab_size"].get<std::size_t>());
  v.token_types.assign(v.tokens.size(), 1);
  for (const auto& [token, id] : j["model"]["vocab"].items())
    v.tokens[id.get<std::size_t>()] = token;
  for (const json& a : j["added_tokens"]) {
    v.tokens[a["id"].get<std::size_t>()] = a["content"].get<std::string>();
    v.token_types[a["id"].get<std::size_t>()] = a["special"].get<bool>() ? 3 : 4;
  }
  for (const json& m : j["model"]["merges"])
    v.merges.push_back(m[0].get<std::string>() + " " + m[1].get<std::string>());
  v.pre = "llama-bpe";
  const Tokenizer tok = Tokenizer::from_vocabulary(v);
  int checked = 0;
  for (const json& c : ref["cases"]) {
    const std::string text = c["text"].get<std::string>();
    // GGUF has no lstrip/rstrip or normalized flags for added tokens.
    if (text.find("<mask>") != std::string::npos) continue;
    EXPECT_EQ(tok.encode(text), c["ids"].get<Ids>()) << printable(text);
    ++checked;
  }
  EXPECT_GT(checked, 60);
}

TEST(Tokenizer, StreamDecoderHoldsBackPartialCharacters) {
  ASSERT_TRUE(model_present()) << KVCACHE_DEFAULT_MODEL_PATH
                               << " is missing: run scripts/setup-model.sh";
  const Tokenizer& tok = smollm2();
  // "😀" is four bytes, one token each: nothing comes out until the last one.
  const Ids ids = tok.encode("😀!");
  ASSERT_EQ(ids.size(), 4u);
  StreamDecoder stream(tok);
  EXPECT_EQ(stream.push(ids[0]), "");
  EXPECT_EQ(stream.push(ids[1]), "");
  EXPECT_EQ(stream.push(ids[2]), "😀");
  EXPECT_EQ(stream.push(ids[3]), "!");
  EXPECT_EQ(stream.flush(), "");
  // A character cut short: flush() gives U+FFFD, as decode() does.
  StreamDecoder cut(tok);
  EXPECT_EQ(cut.push(ids[0]), "");
  EXPECT_EQ(cut.flush(), "\xEF\xBF\xBD");
  EXPECT_EQ(tok.decode(Ids{ids[0]}), "\xEF\xBF\xBD");
  // A lead byte followed by a non-continuation: the lead byte is replaced at once.
  StreamDecoder broken(tok);
  EXPECT_EQ(broken.push(ids[0]), "");
  EXPECT_EQ(broken.push(ids[3]), "\xEF\xBF\xBD!");
}

// --- errors
// ---------------------------------------------------------------------------------------

using testing::error_of;

TEST(TokenizerErrors, IdsOutOfRange) {
  ASSERT_TRUE(model_present()) << KVCACHE_DEFAULT_MODEL_PATH
                               << " is missing: run scripts/setup-model.sh";
  const Tokenizer& tok = smollm2();
  const std::int64_t n = tok.vocab_size();
  EXPECT_NE(error_of([&] {
              tok.decode(Ids{5, n});
            }).find("decode: expected a token id in [0, 49152), got 49152"),
            std::string::npos);
  EXPECT_NE(error_of([&] { tok.decode(Ids{-1}); }).find("got -1"), std::string::npos);
  EXPECT_NE(error_of([&] { tok.token_text(n); }).find("token_text"), std::string::npos);
  StreamDecoder stream(tok);
  EXPECT_NE(error_of([&] { stream.push(n + 7); }).find("got 49159"), std::string::npos);
}

TEST(TokenizerErrors, InvalidUtf8) {
  ASSERT_TRUE(model_present()) << KVCACHE_DEFAULT_MODEL_PATH
                               << " is missing: run scripts/setup-model.sh";
  const std::string e = error_of([] { smollm2().encode("ok \xC3(bad"); });
  EXPECT_NE(e.find("expected UTF-8 text, got an invalid byte 0xc3 at offset 3"), std::string::npos)
      << e;
  EXPECT_NE(error_of([] { smollm2().encode("\xED\xA0\x80"); }).find("offset 0"),
            std::string::npos);  // a UTF-16 surrogate
}

BpeVocabulary tiny_vocabulary() {
  BpeVocabulary v;
  const std::string alphabet[] = {"a", "b", "ab", "<|end|>"};
  v.tokens.assign(std::begin(alphabet), std::end(alphabet));
  v.merges = {"a b"};
  v.token_types = {1, 1, 1, 3};
  v.pre = "smollm";
  return v;
}

TEST(TokenizerErrors, UnknownPreTokenizerAndBadVocabularies) {
  BpeVocabulary v = tiny_vocabulary();
  EXPECT_EQ(Tokenizer::from_vocabulary(v).encode("abab<|end|>"), (Ids{2, 2, 3}));
  v.pre = "qwen2";
  EXPECT_NE(error_of([&] { Tokenizer::from_vocabulary(v); })
                .find("tokenizer.ggml.pre: expected one of \"smollm\", \"gpt2\", \"default\", "
                      "\"llama-bpe\", got \"qwen2\""),
            std::string::npos);
  v = tiny_vocabulary();
  v.merges = {"a c"};
  EXPECT_NE(error_of([&] { Tokenizer::from_vocabulary(v); }).find("merge 0 (\"a c\")"),
            std::string::npos);
  v = tiny_vocabulary();
  v.merges = {"ab"};
  EXPECT_NE(
      error_of([&] { Tokenizer::from_vocabulary(v); }).find("two tokens separated by a space"),
      std::string::npos);
  v = tiny_vocabulary();
  v.token_types = {1, 1};
  EXPECT_NE(
      error_of([&] { Tokenizer::from_vocabulary(v); }).find("one token type per token (4), got 2"),
      std::string::npos);
  v = tiny_vocabulary();
  v.eos_token_id = 9;
  EXPECT_NE(error_of([&] {
              Tokenizer::from_vocabulary(v);
            }).find("eos token id: expected one in [0, 4), got 9"),
            std::string::npos);
}

// A minimal GGUF file (version 3, no tensors) holding the given string and string-array keys.
void write_gguf(const std::string& path,
                const std::vector<std::pair<std::string, std::string>>& strings,
                const std::vector<std::pair<std::string, std::vector<std::string>>>& arrays) {
  std::string bytes = "GGUF";
  auto u32 = [&](std::uint32_t v) { bytes.append(reinterpret_cast<const char*>(&v), 4); };
  auto u64 = [&](std::uint64_t v) { bytes.append(reinterpret_cast<const char*>(&v), 8); };
  auto str = [&](const std::string& s) {
    u64(s.size());
    bytes += s;
  };
  u32(3);
  u64(0);
  u64(strings.size() + arrays.size());
  for (const auto& [key, value] : strings) {
    str(key);
    u32(8);  // string
    str(value);
  }
  for (const auto& [key, values] : arrays) {
    str(key);
    u32(9);  // array
    u32(8);  // of strings
    u64(values.size());
    for (const std::string& v : values) str(v);
  }
  while (bytes.size() % 32 != 0) bytes += '\0';
  testing::write_bytes(path, bytes);
}

TEST(TokenizerErrors, GgufModelAndPreTokenizer) {
  const testing::TempDir dir("kvcache_tokenizer");
  const std::vector<std::pair<std::string, std::vector<std::string>>> arrays = {
      {"tokenizer.ggml.tokens", {"a", "b", "ab"}}, {"tokenizer.ggml.merges", {"a b"}}};
  const std::string ok = dir.file("ok.gguf");
  write_gguf(ok, {{"tokenizer.ggml.model", "gpt2"}, {"tokenizer.ggml.pre", "gpt2"}}, arrays);
  const Tokenizer tok = Tokenizer::from_gguf(GgufFile::open(ok));
  EXPECT_EQ(tok.encode("aab"), (Ids{0, 2}));
  EXPECT_EQ(tok.pre_tokenizer(), "gpt2");

  const std::string spm = dir.file("spm.gguf");
  write_gguf(spm, {{"tokenizer.ggml.model", "bert"}}, arrays);
  std::string e = error_of([&] { Tokenizer::from_gguf(GgufFile::open(spm)); });
  EXPECT_NE(e.find("tokenizer.ggml.model: expected \"gpt2\" (byte-level BPE) or \"llama\" "
                   "(SentencePiece), got \"bert\""),
            std::string::npos)
      << e;
  EXPECT_NE(e.find("spm.gguf"), std::string::npos) << e;

  const std::string pre = dir.file("pre.gguf");
  write_gguf(pre, {{"tokenizer.ggml.model", "gpt2"}, {"tokenizer.ggml.pre", "deepseek-llm"}},
             arrays);
  e = error_of([&] { Tokenizer::from_gguf(GgufFile::open(pre)); });
  EXPECT_NE(e.find("tokenizer.ggml.pre: expected one of"), std::string::npos) << e;
  EXPECT_NE(e.find("got \"deepseek-llm\""), std::string::npos) << e;

  const std::string none = dir.file("none.gguf");
  write_gguf(none, {}, arrays);
  e = error_of([&] { Tokenizer::from_gguf(GgufFile::open(none)); });
  EXPECT_NE(e.find("tokenizer.ggml.model: expected \"gpt2\" or \"llama\", got no such key"),
            std::string::npos)
      << e;
}

TEST(TokenizerErrors, JsonLayouts) {
  const json base = load_json(kDataDir + "/tiny_smollm/tokenizer.json");
  const testing::TempDir dir("kvcache_tokenizer");
  const std::string path = dir.file("tokenizer.json");
  auto error_with = [&](const std::function<void(json&)>& edit) {
    json j = base;
    edit(j);
    testing::write_bytes(path, j.dump());
    return error_of([&] { Tokenizer::from_json_file(path); });
  };
  EXPECT_NE(error_with([](json& j) {
              j["pre_tokenizer"] = {{"type", "Metaspace"}};
            })
                .find("pre_tokenizer: expected ByteLevel, Digits, Split or a Sequence of them, got "
                      "Metaspace"),
            std::string::npos);
  EXPECT_NE(error_with([](json& j) {
              j["model"]["type"] = "Unigram";
            }).find("model.type: expected BPE, got Unigram"),
            std::string::npos);
  EXPECT_NE(error_with([](json& j) {
              j["normalizer"] = {{"type", "NFC"}};
            }).find("normalizer: expected none"),
            std::string::npos);
  EXPECT_NE(error_with([](json& j) {
              j["pre_tokenizer"] = {{"type", "Digits"}, {"individual_digits", true}};
            }).find("expected a ByteLevel step"),
            std::string::npos);
  EXPECT_NE(error_with([](json& j) {
              j["pre_tokenizer"]["pretokenizers"][0] = {{"type", "Split"},
                                                        {"pattern", {{"Regex", "\\s+"}}},
                                                        {"behavior", "MergedWithNext"}};
            }).find("expected behavior Isolated or Removed, got MergedWithNext"),
            std::string::npos);
  EXPECT_NE(error_with([](json& j) {
              j["added_tokens"][0]["single_word"] = true;
            }).find("single_word tokens are not served"),
            std::string::npos);
  EXPECT_NE(error_of([] {
              Tokenizer::from_json_file("/nonexistent/tokenizer.json");
            }).find("cannot open"),
            std::string::npos);
}

}  // namespace
}  // namespace kvcache
