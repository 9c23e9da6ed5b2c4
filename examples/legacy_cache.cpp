// legacy_cache: converting between the legacy cache format and DynamicCache. It is the C++ form
// of transformers' snippet
//
//   generation_outputs = model.generate(**inputs, return_dict_in_generate=True,
//                                       return_legacy_cache=True, max_new_tokens=5)
//   cache = DynamicCache.from_legacy_cache(generation_outputs.past_key_values)
//   legacy_format_cache = cache.to_legacy_cache()
//
// There is no model yet, so a made-up "generation output" stands in for past_key_values: a
// LegacyCache (one (key, value) pair per layer) of 4 layers, each [batch 1, kv_heads 2, seq 5,
// head_dim 8]. The program converts it to a DynamicCache, appends one decode step to every layer,
// converts back, and checks that the 5 original positions came through bit for bit. It exits
// non-zero if they did not. It takes no arguments but --help.
#include <algorithm>
#include <cstdint>
#include <cstring>
#include <iostream>
#include <kvcache/kvcache.hpp>
#include <string>

namespace {

constexpr int kNumLayers = 4;
constexpr std::int64_t kBatch = 1, kNumKvHeads = 2, kHeadDim = 8;
constexpr std::int64_t kPromptLen = 5;  // tokens in the "generation output"

// New [batch, num_kv_heads, seq_len, head_dim] float32 states whose elements are nonzero and
// differ across layers, keys/values and positions, so a misplaced copy cannot go unnoticed.
kvcache::Tensor states(std::int64_t seq_len, float base) {
  auto t =
      kvcache::Tensor::empty({kBatch, kNumKvHeads, seq_len, kHeadDim}, kvcache::DType::kFloat32);
  float* p = t.data_as<float>();
  for (std::int64_t i = 0; i < t.numel(); ++i) p[i] = base + 0.001f * static_cast<float>(i + 1);
  return t;
}

// True when a and b have the same shape and bit-identical elements, whatever their strides (the
// tensors to_legacy_cache returns are views into the cache's larger storage).
bool identical(const kvcache::Tensor& a, const kvcache::Tensor& b) {
  const kvcache::Tensor ca = kvcache::cpu::clone(a), cb = kvcache::cpu::clone(b);  // contiguous
  return ca.dtype() == cb.dtype() && std::ranges::equal(ca.shape(), cb.shape()) &&
         std::memcmp(ca.data(), cb.data(), ca.nbytes()) == 0;
}

int run() {
  // The "generation output": legacy[layer] = (keys, values), each [1, 2, 5, 8].
  kvcache::LegacyCache legacy;
  for (int layer = 0; layer < kNumLayers; ++layer) {
    legacy.emplace_back(states(kPromptLen, 1.0f + layer), states(kPromptLen, -1.0f - layer));
  }

  // cache = DynamicCache.from_legacy_cache(past_key_values): copies every layer into the cache.
  auto cache = kvcache::DynamicCache<>::from_legacy_cache(legacy);

  // One more decode step, as the next forward pass would add: one new token in every layer.
  kvcache::LegacyCache step;
  for (int layer = 0; layer < kNumLayers; ++layer) {
    step.emplace_back(states(1, 10.0f + layer), states(1, -10.0f - layer));
    cache.update(step.back().first, step.back().second, layer);
  }

  // legacy_format_cache = cache.to_legacy_cache(): views of the cache's storage, no copy.
  const kvcache::LegacyCache restored = cache.to_legacy_cache();

  // Lossless: positions [0, 5) of every layer equal the original legacy cache, and position 5
  // equals the decode step.
  bool lossless = restored.size() == legacy.size();
  for (std::size_t i = 0; lossless && i < restored.size(); ++i) {
    const auto& [keys, values] = restored[i];
    lossless = identical(keys.slice(2, 0, kPromptLen), legacy[i].first) &&
               identical(values.slice(2, 0, kPromptLen), legacy[i].second) &&
               identical(keys.slice(2, kPromptLen, kPromptLen + 1), step[i].first) &&
               identical(values.slice(2, kPromptLen, kPromptLen + 1), step[i].second);
  }

  std::cout << "legacy cache:    " << legacy.size() << " layers of (key, value), each "
            << legacy[0].first.describe() << "\n"
            << "DynamicCache:    " << cache.num_layers() << " layers, sequence length "
            << cache.get_seq_length() << " after one decode step\n"
            << "cache bytes:     " << cache.nbytes() << " in use, " << cache.capacity_bytes()
            << " allocated (" << cache.capacity() << " token slots a layer)\n"
            << "to_legacy_cache: " << restored.size() << " layers, keys "
            << restored[0].first.describe() << "\n";
  if (!lossless) {
    std::cerr << "round trip: NOT lossless, the restored cache differs from the original\n";
    return 1;
  }
  std::cout << "round trip:      lossless (positions 0.." << kPromptLen - 1
            << " equal the original, position " << kPromptLen << " the decode step)\n";
  return 0;
}

}  // namespace

constexpr const char* kUsage =
    "usage: legacy_cache [--help]\n"
    "\n"
    "Converts a made-up legacy cache (4 layers of (key, value) pairs) to a DynamicCache, appends\n"
    "one decode step, converts back and checks the original positions came through bit for bit.\n"
    "Takes no other arguments; exits non-zero if the check fails.\n"
    "\n"
    "  -h, --help  print this help and exit\n";

int main(int argc, char** argv) {
  for (int i = 1; i < argc; ++i) {
    const std::string arg = argv[i];
    if (arg == "--help" || arg == "-h") {
      std::cout << kUsage;
      return 0;
    }
    std::cerr << "legacy_cache: unknown " << (arg.starts_with("-") ? "flag" : "argument") << " '"
              << arg << "'\n"
              << kUsage;
    return 2;
  }
  // Every failure, kvcache::Error or not, ends in a message and a non-zero exit.
  try {
    return run();
  } catch (const std::exception& e) {
    std::cerr << "legacy_cache: " << e.what() << "\n";
  } catch (...) {
    std::cerr << "legacy_cache: unexpected error of an unknown type\n";
  }
  return 1;
}
