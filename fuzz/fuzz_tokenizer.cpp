// Fuzz target: tokenizer.json. Loads it as Tokenizer::from_json_file does (the bytes as the file),
// then encodes a few fixed strings and the input's last bytes (arbitrary, often invalid UTF-8),
// with and without special tokens, decodes what came out, and decodes and streams ids taken from
// the input (out-of-range ones included).
#include <cstddef>
#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

#include "fuzz_util.hpp"
#include "kvcache/tokenizer/tokenizer.hpp"

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  using kvcache::fuzz::expect_only_errors;
  const kvcache::fuzz::MemoryFile file(data, size);
  expect_only_errors("Tokenizer::from_json_file", [&] {
    const kvcache::Tokenizer tokenizer = kvcache::Tokenizer::from_json_file(file.path());
    const std::size_t tail = size < 48 ? size : 48;
    const std::string_view texts[] = {
        "Hello, world! It's 2024: 12345 apples.",
        " \t\n  leading spaces and   runs\r\n",
        "caf\xc3\xa9 \xe4\xb8\xad\xe6\x96\x87 \xf0\x9f\x98\x80 <|im_start|>user<|im_end|>",
        std::string_view(reinterpret_cast<const char*>(data) + size - tail, tail),
    };
    for (const std::string_view text : texts) {
      for (const bool parse_special : {true, false}) {
        expect_only_errors("Tokenizer::encode", [&] {
          const std::vector<std::int64_t> ids = tokenizer.encode(text, parse_special);
          (void)tokenizer.decode(ids);
          (void)tokenizer.decode(ids, /*skip_special=*/true);
        });
      }
    }
    // Ids from the input, around the vocabulary's range.
    const std::int64_t vocab = tokenizer.vocab_size();
    std::vector<std::int64_t> ids;
    for (std::size_t i = 0; i < tail && i < 16; ++i) {
      const std::uint8_t b = data[size - tail + i];
      ids.push_back(b == 255 ? vocab : b == 254 ? -1 : (vocab > 0 ? b % vocab : b));
    }
    expect_only_errors("Tokenizer::decode", [&] { (void)tokenizer.decode(ids); });
    expect_only_errors("StreamDecoder", [&] {
      kvcache::StreamDecoder stream(tokenizer);
      for (const std::int64_t id : ids) (void)stream.push(id);
      (void)stream.flush();
    });
    for (const std::int64_t id : ids)
      expect_only_errors("Tokenizer::token_text", [&] {
        (void)tokenizer.token_text(id);
        (void)tokenizer.token_bytes(id);
        (void)tokenizer.token_type(id);
      });
  });
  return 0;
}
