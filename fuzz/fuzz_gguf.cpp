// Fuzz target: a GGUF file. Opens it (header, metadata, tensor infos, data section), reads every
// metadata value through the typed getters and every array element, dequantizes every tensor
// small enough to be quick, then builds what the loaders build from it: ModelConfig::from_gguf,
// Tokenizer::from_gguf (and encodes and decodes a string) and LlamaModel::from_gguf.
#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

#include "fuzz_util.hpp"
#include "kvcache/model/config.hpp"
#include "kvcache/model/gguf.hpp"
#include "kvcache/model/llama.hpp"
#include "kvcache/tokenizer/tokenizer.hpp"

namespace {

using kvcache::fuzz::expect_only_errors;

// Touches every element of a metadata array (nested arrays too, to a fixed depth).
void walk(const kvcache::GgufValue& value, int depth) {
  if (value.type != kvcache::GgufValue::Type::kArray || depth > 4) return;
  for (std::size_t i = 0; i < value.array.size(); ++i) walk(value.array[i], depth + 1);
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  const kvcache::fuzz::MemoryFile file(data, size);
  expect_only_errors("GgufFile", [&] {
    const kvcache::GgufFile gguf = kvcache::GgufFile::open(file.path());
    for (const auto& entry : gguf.metadata()) {
      const std::string& key = entry.first;  // clang 14 cannot capture a structured binding
      walk(entry.second, 0);
      expect_only_errors("GgufFile::get_int", [&] { (void)gguf.get_int(key); });
      expect_only_errors("GgufFile::get_float", [&] { (void)gguf.get_float(key); });
      expect_only_errors("GgufFile::get_string", [&] { (void)gguf.get_string(key); });
      expect_only_errors("GgufFile::get_bool", [&] { (void)gguf.get_bool(key); });
      expect_only_errors("GgufFile::get_string_array", [&] { (void)gguf.get_string_array(key); });
      expect_only_errors("GgufFile::get_int_array", [&] { (void)gguf.get_int_array(key); });
    }
    for (const kvcache::GgufTensorInfo& info : gguf.tensors()) {
      if (info.numel() > (1 << 16)) continue;  // the loaders below read the big ones
      expect_only_errors("GgufFile::to_float32", [&] { (void)gguf.to_float32(info.name); });
      expect_only_errors("GgufFile::view", [&] { (void)gguf.view(info.name); });
    }
    expect_only_errors("ModelConfig::from_gguf",
                       [&] { (void)kvcache::ModelConfig::from_gguf(gguf); });
    expect_only_errors("Tokenizer::from_gguf", [&] {
      const kvcache::Tokenizer tokenizer = kvcache::Tokenizer::from_gguf(gguf);
      const std::vector<std::int64_t> ids = tokenizer.encode("Hello, world! 123 <|im_end|>");
      (void)tokenizer.decode(ids);
    });
  });
  expect_only_errors("LlamaModel::from_gguf",
                     [&] { (void)kvcache::LlamaModel::from_gguf(file.path()); });
  return 0;
}
