// Tokenizer::from_pretrained: the tokenizer beside a model, found the way LlamaModel's
// from_pretrained finds the model. A .gguf file must give what from_gguf gives, a folder with
// tokenizer.json what from_json_file gives (tokenizer_config.json included), a folder with only
// tokenizer.model what from_sentencepiece_file gives, and tokenizer.json wins when both are there.
// "The same tokenizer" is checked by encoding and decoding a few awkward strings with both and by
// the special tokens and chat template they report. Paths that hold none of these are errors that
// name the path and what was looked for.
#include <gtest/gtest.h>

#include <filesystem>
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

const std::string kData = KVCACHE_TEST_DATA_DIR;

// Strings that exercise digits, spaces, accents, emoji and a special token written in the text.
const std::vector<std::string> kTexts = {"Hello, world!", "  two  spaces and 12345 digits",
                                         "caf\xc3\xa9 \xf0\x9f\x98\x80",
                                         "<|im_start|>user\nhi<|im_end|>", "line one\nline two\n"};

// Expects `a` and `b` to be the same tokenizer as far as a caller can see.
void expect_same_tokenizer(const Tokenizer& a, const Tokenizer& b) {
  EXPECT_EQ(a.vocab_size(), b.vocab_size());
  EXPECT_EQ(a.bos_token_id(), b.bos_token_id());
  EXPECT_EQ(a.eos_token_id(), b.eos_token_id());
  EXPECT_EQ(a.pad_token_id(), b.pad_token_id());
  EXPECT_EQ(a.add_bos_token(), b.add_bos_token());
  EXPECT_EQ(a.chat_template(), b.chat_template());
  EXPECT_EQ(a.pre_tokenizer(), b.pre_tokenizer());
  for (const std::string& text : kTexts) {
    const std::vector<std::int64_t> ids = a.encode(text);
    EXPECT_EQ(ids, b.encode(text)) << text;
    EXPECT_EQ(a.encode(text, /*parse_special=*/false), b.encode(text, false)) << text;
    EXPECT_EQ(a.decode(ids), b.decode(ids)) << text;
  }
}

TEST(TokenizerFromPretrained, GgufFileReadsItsMetadata) {
  const std::string path = kData + "/spm/spm_tiny.gguf";
  const Tokenizer t = Tokenizer::from_pretrained(path);
  EXPECT_EQ(t.pre_tokenizer(), "sentencepiece");
  expect_same_tokenizer(t, Tokenizer::from_gguf(GgufFile::open(path)));
}

TEST(TokenizerFromPretrained, FolderWithTokenizerJsonReadsItAndItsConfig) {
  const std::string dir = kData + "/tokenizer/tiny_smollm";
  const Tokenizer t = Tokenizer::from_pretrained(dir);
  // tokenizer_config.json beside tokenizer.json supplies the chat template and special tokens.
  EXPECT_TRUE(t.chat_template().has_value());
  EXPECT_TRUE(t.eos_token_id().has_value());
  expect_same_tokenizer(t, Tokenizer::from_json_file(dir + "/tokenizer.json"));
  // The file itself is read the same way.
  expect_same_tokenizer(Tokenizer::from_pretrained(dir + "/tokenizer.json"), t);
}

TEST(TokenizerFromPretrained, FolderWithOnlyTokenizerModelReadsSentencePiece) {
  const testing::TempDir dir("from_pretrained");
  std::filesystem::copy_file(kData + "/spm/spm_tiny.model", dir.file("tokenizer.model"));
#if KVCACHE_HAVE_SENTENCEPIECE
  const Tokenizer t = Tokenizer::from_pretrained(dir.str());
  EXPECT_EQ(t.pre_tokenizer(), "sentencepiece");
  expect_same_tokenizer(t, Tokenizer::from_sentencepiece_file(dir.file("tokenizer.model")));
#else
  EXPECT_NE(testing::error_of([&] {
              Tokenizer::from_pretrained(dir.str());
            }).find("built without libsentencepiece"),
            std::string::npos);
#endif
}

TEST(TokenizerFromPretrained, TokenizerJsonWinsOverTokenizerModel) {
  const testing::TempDir dir("from_pretrained");
  std::filesystem::copy_file(kData + "/tokenizer/tiny_gpt2/tokenizer.json",
                             dir.file("tokenizer.json"));
  std::filesystem::copy_file(kData + "/spm/spm_tiny.model", dir.file("tokenizer.model"));
  const Tokenizer t = Tokenizer::from_pretrained(dir.str());
  EXPECT_NE(t.pre_tokenizer(), "sentencepiece");
  expect_same_tokenizer(t, Tokenizer::from_json_file(dir.file("tokenizer.json")));
}

TEST(TokenizerFromPretrained, PathsWithoutATokenizerAreErrors) {
  const testing::TempDir dir("from_pretrained");
  const std::string empty_folder =
      testing::error_of([&] { Tokenizer::from_pretrained(dir.str()); });
  EXPECT_NE(empty_folder.find("expected tokenizer.json or tokenizer.model in the folder"),
            std::string::npos)
      << empty_folder;
  EXPECT_NE(empty_folder.find(dir.str()), std::string::npos) << empty_folder;

  const std::string missing =
      testing::error_of([&] { Tokenizer::from_pretrained(dir.file("nothing_here")); });
  EXPECT_NE(missing.find("a path that does not exist"), std::string::npos) << missing;

  testing::write_bytes(dir.file("notes.txt"), "not a tokenizer");
  const std::string other =
      testing::error_of([&] { Tokenizer::from_pretrained(dir.file("notes.txt")); });
  EXPECT_NE(other.find("a file of none of these kinds"), std::string::npos) << other;

  // A .gguf path goes to the GGUF reader, whose errors name the file.
  testing::write_bytes(dir.file("broken.gguf"), "GGUF");
  const std::string broken =
      testing::error_of([&] { Tokenizer::from_pretrained(dir.file("broken.gguf")); });
  EXPECT_NE(broken.find("broken.gguf"), std::string::npos) << broken;
}

}  // namespace
}  // namespace kvcache
