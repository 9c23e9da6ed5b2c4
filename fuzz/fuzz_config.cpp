// Fuzz target: config.json text through ModelConfig::from_json (which ends in validate()), then
// what callers derive from a config: the per-layer sliding windows.
#include <cstddef>
#include <cstdint>
#include <string>

#include "fuzz_util.hpp"
#include "kvcache/model/config.hpp"

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  const std::string text(reinterpret_cast<const char*>(data), size);
  kvcache::fuzz::expect_only_errors("ModelConfig::from_json", [&] {
    const kvcache::ModelConfig config = kvcache::ModelConfig::from_json(text);
    (void)config.sliding_windows();
    config.validate("again");  // what from_json accepted stays valid
  });
  return 0;
}
