// The SentencePiece tokenizer against the sentencepiece library (tools/make_spm_reference.py):
// a small BPE model trained by spm_train with byte fallback, read two ways (its vocabulary as GGUF
// metadata, encoded by kvcache's own BPE; and its tokenizer.model through libsentencepiece), on a
// list of awkward strings. Each string's ids, pieces and decode must equal sentencepiece's, and
// the streamed pieces must concatenate to the decode. Then merge order on hand-made vocabularies,
// and hostile metadata: each a kvcache::Error that says what was expected and what came.
#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <fstream>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "kvcache/error.hpp"
#include "kvcache/model/gguf.hpp"
#include "kvcache/tokenizer/tokenizer.hpp"
#include "temp_dir.hpp"
#include "test_util.hpp"

#ifndef KVCACHE_TEST_DATA_DIR
#error "KVCACHE_TEST_DATA_DIR must name tests/data"
#endif

namespace kvcache {
namespace {

using nlohmann::json;
using Ids = std::vector<std::int64_t>;
using testing::error_of;

const std::string kSpmDir = std::string(KVCACHE_TEST_DATA_DIR) + "/spm";

const json& reference() {
  static const json r = [] {
    std::ifstream in(kSpmDir + "/spm_reference.json", std::ios::binary);
    EXPECT_TRUE(in.good()) << kSpmDir;
    return json::parse(in);
  }();
  return r;
}

const Tokenizer& gguf_tokenizer() {
  static const Tokenizer t = Tokenizer::from_gguf(GgufFile::open(kSpmDir + "/spm_tiny.gguf"));
  return t;
}

bool valid_utf8(const std::string& s) {
  // Every piece a StreamDecoder returns must be whole characters; decode() of them must not
  // change them (U+FFFD repair would).
  std::size_t i = 0;
  while (i < s.size()) {
    const auto b = static_cast<unsigned char>(s[i]);
    const std::size_t len = b < 0x80         ? 1
                            : (b >> 5) == 6  ? 2
                            : (b >> 4) == 14 ? 3
                            : (b >> 3) == 30 ? 4
                                             : 0;
    if (len == 0 || i + len > s.size()) return false;
    for (std::size_t k = 1; k < len; ++k)
      if ((static_cast<unsigned char>(s[i + k]) >> 6) != 2) return false;
    i += len;
  }
  return true;
}

// Checks one tokenizer against every reference case; `what` names it in failures.
void expect_matches_reference(const Tokenizer& tok, const std::string& what) {
  const json& r = reference();
  ASSERT_GE(r["cases"].size(), 40u);
  int byte_fallback = 0;
  for (const json& c : r["cases"]) {
    const std::string text = c["text"].get<std::string>();
    const Ids expected = c["ids"].get<Ids>();
    const Ids ids = tok.encode(text, /*parse_special=*/false);
    EXPECT_EQ(ids, expected) << what << ": encode \"" << text << "\"";
    if (ids != expected) continue;
    for (std::size_t k = 0; k < ids.size(); ++k) {
      EXPECT_EQ(tok.token_text(ids[k]), c["pieces"][k].get<std::string>()) << what << ": " << text;
      byte_fallback += tok.token_type(ids[k]) == TokenType::kByte;
    }
    // Without "<s>" or "</s>" in the text, matching control tokens changes nothing.
    if (text.find("<s>") == std::string::npos && text.find("</s>") == std::string::npos) {
      EXPECT_EQ(tok.encode(text, /*parse_special=*/true), expected) << what << ": " << text;
    }

    const std::string decoded = tok.decode(ids);
    EXPECT_EQ(decoded, c["decode"].get<std::string>()) << what << ": decode of \"" << text << "\"";
    StreamDecoder stream(tok);
    std::string streamed;
    for (const std::int64_t id : ids) {
      const std::string piece = stream.push(id);
      EXPECT_TRUE(valid_utf8(piece)) << what << ": " << text;
      streamed += piece;
    }
    streamed += stream.flush();
    EXPECT_EQ(streamed, decoded) << what << ": streamed decode of \"" << text << "\"";
  }
  EXPECT_GE(byte_fallback, 20) << what << ": the reference should reach byte fallback often";
}

TEST(TokenizerSpmGguf, ReadsTheVocabulary) {
  const Tokenizer& tok = gguf_tokenizer();
  const json& r = reference();
  EXPECT_EQ(tok.vocab_size(), r["vocab_size"].get<std::int64_t>());
  EXPECT_EQ(tok.bos_token_id(), r["bos_token_id"].get<std::int64_t>());
  EXPECT_EQ(tok.eos_token_id(), r["eos_token_id"].get<std::int64_t>());
  EXPECT_EQ(tok.unk_token_id(), r["unk_token_id"].get<std::int64_t>());
  EXPECT_TRUE(tok.add_bos_token());
  EXPECT_FALSE(tok.add_eos_token());
  EXPECT_EQ(tok.pre_tokenizer(), "sentencepiece");
  const auto types = r["token_types"].get<std::vector<int>>();
  ASSERT_EQ(types.size(), static_cast<std::size_t>(tok.vocab_size()));
  for (std::size_t i = 0; i < types.size(); ++i)
    EXPECT_EQ(static_cast<int>(tok.token_type(static_cast<std::int64_t>(i))), types[i]) << i;
  const std::optional<std::int64_t> newline = tok.token_id("<0x0A>");
  ASSERT_TRUE(newline.has_value());
  EXPECT_EQ(tok.token_bytes(*newline), "\n");
  const std::optional<std::int64_t> user = tok.token_id("<|user|>");
  ASSERT_TRUE(user.has_value());
  EXPECT_EQ(tok.token_type(*user), TokenType::kUserDefined);
}

TEST(TokenizerSpmGguf, EncodesAndDecodesLikeSentencepiece) {
  expect_matches_reference(gguf_tokenizer(), "GGUF");
}

#if KVCACHE_HAVE_SENTENCEPIECE
const Tokenizer& library_tokenizer() {
  static const Tokenizer t = Tokenizer::from_sentencepiece_file(kSpmDir + "/spm_tiny.model");
  return t;
}

TEST(TokenizerSpmLibrary, EncodesAndDecodesLikeSentencepiece) {
  expect_matches_reference(library_tokenizer(), "libsentencepiece");
}

TEST(TokenizerSpmLibrary, SameVocabularyAsTheGguf) {
  const Tokenizer& lib = library_tokenizer();
  const Tokenizer& gguf = gguf_tokenizer();
  ASSERT_EQ(lib.vocab_size(), gguf.vocab_size());
  for (std::int64_t i = 0; i < lib.vocab_size(); ++i) {
    EXPECT_EQ(lib.token_text(i), gguf.token_text(i)) << i;
    EXPECT_EQ(lib.token_type(i), gguf.token_type(i)) << i;
    EXPECT_EQ(lib.token_bytes(i), gguf.token_bytes(i)) << i;
  }
  EXPECT_EQ(lib.bos_token_id(), gguf.bos_token_id());
  EXPECT_EQ(lib.eos_token_id(), gguf.eos_token_id());
  EXPECT_EQ(lib.unk_token_id(), gguf.unk_token_id());
  EXPECT_EQ(lib.pad_token_id(), std::nullopt);  // trained with --pad_id=-1
  EXPECT_TRUE(lib.add_bos_token());
}

TEST(TokenizerSpmLibrary, BadFiles) {
  const testing::TempDir dir("kvcache_spm");
  const std::string junk = dir.file("junk.model");
  testing::write_bytes(junk, "this is not a protobuf");
  std::string e = error_of([&] { Tokenizer::from_sentencepiece_file(junk); });
  EXPECT_NE(e.find("junk.model"), std::string::npos) << e;
  EXPECT_NE(e.find("expected a sentencepiece model"), std::string::npos) << e;
  e = error_of([&] { Tokenizer::from_sentencepiece_file(dir.file("missing.model")); });
  EXPECT_NE(e.find("missing.model"), std::string::npos) << e;
}
#else
TEST(TokenizerSpmLibrary, BuiltWithoutTheLibrary) {
  const std::string e =
      error_of([] { Tokenizer::from_sentencepiece_file(kSpmDir + "/spm_tiny.model"); });
  EXPECT_NE(e.find("built without libsentencepiece"), std::string::npos) << e;
}
#endif

// Control tokens written in the text become their ids with parse_special; each run of text after
// one gets the dummy prefix again (llama.cpp's rule).
TEST(TokenizerSpmGguf, ParseSpecialAndControlTokensInDecode) {
  const Tokenizer& tok = gguf_tokenizer();
  const std::int64_t bos = *tok.bos_token_id(), eos = *tok.eos_token_id();
  Ids expected = {bos};
  for (const std::int64_t id : tok.encode(" Hello ", false)) expected.push_back(id);
  expected.push_back(eos);
  EXPECT_EQ(tok.encode("<s> Hello </s>", true), expected);
  EXPECT_NE(tok.encode("<s> Hello </s>", false), expected);

  Ids ids = {bos};
  for (const std::int64_t id : tok.encode("Hello world", false)) ids.push_back(id);
  ids.push_back(eos);
  // The dummy prefix's space goes from the first piece after the control token.
  EXPECT_EQ(tok.decode(ids, /*skip_special=*/true), "Hello world");
  EXPECT_EQ(tok.decode(ids), "<s>Hello world</s>");
  StreamDecoder stream(tok, /*skip_special=*/true);
  std::string streamed;
  for (const std::int64_t id : ids) streamed += stream.push(id);
  EXPECT_EQ(streamed + stream.flush(), "Hello world");
#if KVCACHE_HAVE_SENTENCEPIECE
  EXPECT_EQ(library_tokenizer().encode("<s> Hello </s>", true), expected);
#endif
}

// --- hand-made vocabularies ---------------------------------------------------------------------

SpmVocabulary small_vocabulary() {
  SpmVocabulary v;
  v.tokens = {"<unk>",
              "<s>",
              "</s>",
              "\xE2\x96\x81",
              "a",
              "b",
              "c",
              "ab",
              "bc",
              "\xE2\x96\x81"
              "a"};
  v.scores = {0, 0, 0, -1, -2, -2, -2, -5, -3, -4};
  v.token_types = {2, 3, 3, 1, 1, 1, 1, 1, 1, 1};
  v.bos_token_id = 1;
  v.eos_token_id = 2;
  return v;
}

TEST(TokenizerSpmMerges, HighestScoreFirstThenLeftmost) {
  SpmVocabulary v = small_vocabulary();
  // "▁abc": pairs ▁a (-4), ab (-5), bc (-3): bc first, then ▁a; ab never forms.
  EXPECT_EQ(Tokenizer::from_vocabulary(v).encode("abc"), (Ids{9, 8}));
  // Raise ab above the others: ▁ + ab, then c (▁ab is no piece).
  v.scores[7] = -0.5f;
  EXPECT_EQ(Tokenizer::from_vocabulary(v).encode("abc"), (Ids{3, 7, 6}));
  // Equal scores: the leftmost pair wins (ab over bc; bc first would give ▁a bc).
  v.scores = {0, 0, 0, -1, -2, -2, -2, -3, -3, -10};
  EXPECT_EQ(Tokenizer::from_vocabulary(v).encode("abc"), (Ids{3, 7, 6}));
  // Without the dummy prefix "abc" starts at "a": ab (-5) and bc (-3).
  v = small_vocabulary();
  v.add_dummy_prefix = false;
  EXPECT_EQ(Tokenizer::from_vocabulary(v).encode("abc"), (Ids{4, 8}));
  EXPECT_EQ(Tokenizer::from_vocabulary(v).decode(Ids{9, 8}), " abc");
}

TEST(TokenizerSpmMerges, UnknownCharactersAndUnusedPieces) {
  SpmVocabulary v = small_vocabulary();
  // No byte tokens: a character outside the vocabulary is the unknown token, which decodes to
  // sentencepiece's " ⁇ ".
  const Tokenizer tok = Tokenizer::from_vocabulary(v);
  EXPECT_EQ(tok.encode("a\xC3\xA9"), (Ids{9, 0}));
  EXPECT_EQ(tok.decode(Ids{9, 0}), "a \xE2\x81\x87 ");
  // An unused piece is merged through, then split back into its halves.
  v.token_types[8] = 5;  // "bc" unused
  v.tokens.push_back("abc");
  v.scores.push_back(-3.5f);
  v.token_types.push_back(1);
  // ▁abc: bc (-3, unused) merges first, then a+bc = abc (-3.5) beats ▁a (-4): ▁ abc.
  EXPECT_EQ(Tokenizer::from_vocabulary(v).encode("abc"), (Ids{3, 10}));
  // "bc" alone: merged into the unused piece, then resegmented into b c.
  EXPECT_EQ(Tokenizer::from_vocabulary(v).encode(" bc"), (Ids{3, 3, 5, 6}));
}

// --- hostile GGUF metadata ----------------------------------------------------------------------

// A GGUF file (version 3, no tensors) built key by key.
class GgufBuilder {
 public:
  GgufBuilder& string(const std::string& key, const std::string& value) {
    head(key, 8);
    str(value);
    return *this;
  }
  GgufBuilder& u32(const std::string& key, std::uint32_t value) {
    head(key, 4);
    raw(value);
    return *this;
  }
  GgufBuilder& strings(const std::string& key, const std::vector<std::string>& values) {
    array_head(key, 8, values.size());
    for (const std::string& v : values) str(v);
    return *this;
  }
  GgufBuilder& floats(const std::string& key, const std::vector<float>& values) {
    array_head(key, 6, values.size());
    for (float v : values) raw(v);
    return *this;
  }
  GgufBuilder& ints(const std::string& key, const std::vector<std::int32_t>& values) {
    array_head(key, 5, values.size());
    for (std::int32_t v : values) raw(v);
    return *this;
  }
  std::string write(const testing::TempDir& dir, const std::string& name) const {
    std::string bytes = "GGUF";
    auto put = [&](auto v) { bytes.append(reinterpret_cast<const char*>(&v), sizeof(v)); };
    put(std::uint32_t{3});
    put(std::uint64_t{0});
    put(count_);
    bytes += body_;
    while (bytes.size() % 32 != 0) bytes += '\0';
    const std::string path = dir.file(name);
    testing::write_bytes(path, bytes);
    return path;
  }

 private:
  template <class T>
  void raw(T v) {
    body_.append(reinterpret_cast<const char*>(&v), sizeof(v));
  }
  void str(const std::string& s) {
    raw(static_cast<std::uint64_t>(s.size()));
    body_ += s;
  }
  void head(const std::string& key, std::uint32_t type) {
    ++count_;
    str(key);
    raw(type);
  }
  void array_head(const std::string& key, std::uint32_t type, std::size_t n) {
    head(key, 9);
    raw(type);
    raw(static_cast<std::uint64_t>(n));
  }
  std::string body_;
  std::uint64_t count_ = 0;
};

// A valid SentencePiece vocabulary; each hostile case changes one thing.
struct SpmMetadata {
  std::vector<std::string> tokens = {"<unk>",
                                     "<s>",
                                     "</s>",
                                     "\xE2\x96\x81",
                                     "a",
                                     "\xE2\x96\x81"
                                     "a"};
  std::vector<float> scores = {0, 0, 0, -1, -2, -0.5f};
  std::vector<std::int32_t> types = {2, 3, 3, 1, 1, 1};
  std::optional<std::uint32_t> unk = 0, bos = 1, eos = 2;
  bool with_scores = true;
  std::string write(const testing::TempDir& dir, const std::string& name) const {
    GgufBuilder b;
    b.string("tokenizer.ggml.model", "llama").strings("tokenizer.ggml.tokens", tokens);
    if (with_scores) b.floats("tokenizer.ggml.scores", scores);
    b.ints("tokenizer.ggml.token_type", types);
    if (unk) b.u32("tokenizer.ggml.unknown_token_id", *unk);
    if (bos) b.u32("tokenizer.ggml.bos_token_id", *bos);
    if (eos) b.u32("tokenizer.ggml.eos_token_id", *eos);
    return b.write(dir, name);
  }
};

std::string load_error(const std::string& path) {
  return error_of([&] { Tokenizer::from_gguf(GgufFile::open(path)); });
}

TEST(TokenizerSpmErrors, TheBaselineLoads) {
  const testing::TempDir dir("kvcache_spm");
  const Tokenizer tok = Tokenizer::from_gguf(GgufFile::open(SpmMetadata{}.write(dir, "ok.gguf")));
  EXPECT_EQ(tok.encode("a a"), (Ids{5, 5}));
  EXPECT_EQ(tok.decode(Ids{5, 5}), "a a");
  EXPECT_EQ(tok.unk_token_id(), 0);
}

TEST(TokenizerSpmErrors, HostileMetadata) {
  const testing::TempDir dir("kvcache_spm");
  SpmMetadata m;
  m.scores.pop_back();
  std::string e = load_error(m.write(dir, "short_scores.gguf"));
  EXPECT_NE(e.find("tokenizer.ggml.scores: expected one score per token (6), got 5"),
            std::string::npos)
      << e;
  EXPECT_NE(e.find("short_scores.gguf"), std::string::npos) << e;

  m = {};
  m.with_scores = false;
  e = load_error(m.write(dir, "no_scores.gguf"));
  EXPECT_NE(e.find("tokenizer.ggml.scores: expected one score per token (6), got no such key"),
            std::string::npos)
      << e;

  m = {};
  m.types.push_back(1);
  e = load_error(m.write(dir, "long_types.gguf"));
  EXPECT_NE(e.find("tokenizer.ggml.token_type: expected one type per token (6), got 7"),
            std::string::npos)
      << e;

  m = {};
  m.types[4] = 9;
  e = load_error(m.write(dir, "type9.gguf"));
  EXPECT_NE(e.find("token 4 (\"a\"): expected a token type in 1..6, got 9"), std::string::npos)
      << e;

  m = {};
  m.scores[4] = std::nanf("");
  e = load_error(m.write(dir, "nan_score.gguf"));
  EXPECT_NE(e.find("token 4 (\"a\"): expected a finite score, got nan"), std::string::npos) << e;

  m = {};
  m.unk.reset();
  m.types[0] = 1;  // no token of type unknown either
  e = load_error(m.write(dir, "no_unk.gguf"));
  EXPECT_NE(e.find("expected an unknown token"), std::string::npos) << e;
  EXPECT_NE(e.find("got none"), std::string::npos) << e;

  m = {};
  m.unk.reset();  // the token of type unknown stands in
  EXPECT_EQ(Tokenizer::from_gguf(GgufFile::open(m.write(dir, "typed_unk.gguf"))).unk_token_id(), 0);

  m = {};
  m.bos = 99;
  e = load_error(m.write(dir, "bos99.gguf"));
  EXPECT_NE(e.find("bos token id: expected one in [0, 6), got 99"), std::string::npos) << e;

  m = {};
  m.unk = 4000000000u;
  e = load_error(m.write(dir, "unk_huge.gguf"));
  EXPECT_NE(e.find("unknown token id: expected one in [0, 6), got 4000000000"), std::string::npos)
      << e;

  m = {};
  m.tokens.push_back("<0x41>");
  m.scores.push_back(0);
  m.types.push_back(6);
  e = load_error(m.write(dir, "one_byte.gguf"));
  EXPECT_NE(e.find("byte fallback expects all 256 byte tokens <0x00>..<0xFF>, got 1 (no <0x00>)"),
            std::string::npos)
      << e;

  m = {};
  m.tokens.push_back("<0xZZ>");
  m.scores.push_back(0);
  m.types.push_back(6);
  e = load_error(m.write(dir, "bad_byte.gguf"));
  EXPECT_NE(e.find("has type byte: expected a name <0x00>..<0xFF>, got \"<0xZZ>\""),
            std::string::npos)
      << e;

  e = load_error(GgufBuilder()
                     .string("tokenizer.ggml.model", "llama")
                     .strings("tokenizer.ggml.tokens", {"<unk>", "a"})
                     .strings("tokenizer.ggml.scores", {"x", "y"})
                     .write(dir, "string_scores.gguf"));
  EXPECT_NE(e.find("tokenizer.ggml.scores: expected an array of float32"), std::string::npos) << e;

  e = load_error(GgufBuilder().string("tokenizer.ggml.model", "llama").write(dir, "empty.gguf"));
  EXPECT_NE(e.find("tokenizer.ggml.tokens: expected the vocabulary, got no such key"),
            std::string::npos)
      << e;
}

TEST(TokenizerSpmErrors, IdsOutOfRange) {
  const Tokenizer& tok = gguf_tokenizer();
  const std::string e = error_of([&] { (void)tok.decode(Ids{3, tok.vocab_size()}); });
  EXPECT_NE(e.find("expected a token id in [0, 700), got 700"), std::string::npos) << e;
  StreamDecoder stream(tok);
  EXPECT_NE(error_of([&] { (void)stream.push(-1); }).find("got -1"), std::string::npos);
}

}  // namespace
}  // namespace kvcache
