// Fuzz target: text and ids through a loaded tokenizer (the small trained GPT-2, Llama-3 and
// SmolLM2-style tokenizers in tests/data/tokenizer, the first byte picks one). The rest of the
// input is encoded as text, with and without special tokens, and read as 16-bit ids to decode.
// Invalid UTF-8 may only be a kvcache::Error; beyond that it checks what the header promises:
// encode(text, parse_special=false) never yields a control token, and the pieces a StreamDecoder
// emits concatenate to decode() of the same ids, each piece valid UTF-8.
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <string>
#include <string_view>
#include <vector>

#include "fuzz_util.hpp"
#include "kvcache/tokenizer/tokenizer.hpp"

#ifndef KVCACHE_TEST_DATA_DIR
#error "KVCACHE_TEST_DATA_DIR must name tests/data"
#endif

namespace {

using kvcache::Tokenizer;
using kvcache::TokenType;

const std::vector<Tokenizer>& tokenizers() {
  static const std::vector<Tokenizer> all = [] {
    std::vector<Tokenizer> t;
    for (const char* name : {"tiny_gpt2", "tiny_llama3", "tiny_smollm"})
      t.push_back(Tokenizer::from_json_file(std::string(KVCACHE_TEST_DATA_DIR) + "/tokenizer/" +
                                            name + "/tokenizer.json"));
    return t;
  }();
  return all;
}

bool valid_utf8(std::string_view s) {
  std::size_t i = 0;
  while (i < s.size()) {
    const auto c = static_cast<unsigned char>(s[i]);
    const std::size_t n = c < 0x80         ? 1
                          : (c >> 5) == 6  ? 2
                          : (c >> 4) == 14 ? 3
                          : (c >> 3) == 30 ? 4
                                           : 0;
    if (n == 0 || i + n > s.size()) return false;
    for (std::size_t k = 1; k < n; ++k)
      if ((static_cast<unsigned char>(s[i + k]) >> 6) != 2) return false;
    i += n;
  }
  return true;
}

void check(bool cond, const char* what) {
  if (!cond) {
    std::fprintf(stderr, "FINDING: %s\n", what);
    std::abort();
  }
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  if (size == 0) return 0;
  const Tokenizer& tok = tokenizers()[data[0] % tokenizers().size()];
  const std::string_view text(reinterpret_cast<const char*>(data) + 1, size - 1);
  for (const bool parse_special : {false, true}) {
    kvcache::fuzz::expect_only_errors("Tokenizer::encode", [&] {
      const std::vector<std::int64_t> ids = tok.encode(text, parse_special);
      for (const std::int64_t id : ids) {
        check(id >= 0 && id < tok.vocab_size(), "encode gave an id outside the vocabulary");
        if (!parse_special)
          check(tok.token_type(id) != TokenType::kControl,
                "encode(parse_special=false) gave a control token");
      }
      const std::string decoded = tok.decode(ids);
      check(valid_utf8(decoded), "decode gave invalid UTF-8");
    });
  }
  // The bytes as little-endian 16-bit ids (most in range for these vocabularies).
  std::vector<std::int64_t> ids;
  for (std::size_t i = 1; i + 1 < size && ids.size() < 256; i += 2)
    ids.push_back((data[i] | data[i + 1] << 8) % (tok.vocab_size() + 2) - 1);
  for (const bool skip : {false, true}) {
    std::string whole;
    bool decoded = false;
    kvcache::fuzz::expect_only_errors("Tokenizer::decode", [&] {
      whole = tok.decode(ids, skip);
      decoded = true;
    });
    kvcache::fuzz::expect_only_errors("StreamDecoder", [&] {
      kvcache::StreamDecoder stream(tok, skip);
      std::string streamed;
      for (const std::int64_t id : ids) {
        const std::string piece = stream.push(id);
        check(valid_utf8(piece), "StreamDecoder::push gave invalid UTF-8");
        streamed += piece;
      }
      streamed += stream.flush();
      check(decoded && streamed == whole, "the streamed pieces differ from decode()");
    });
  }
  return 0;
}
