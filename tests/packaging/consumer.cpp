// Packaging check, shared by both consumer projects (find_package against the installed kvcache,
// add_subdirectory of its source tree; KVCACHE_CONSUMER names which). It fills a DynamicCache with
// a 3-token prompt and one decode step and exits non-zero unless the cache reports 4 tokens, so
// CTest fails when the package builds but does not work.
#include <cstdint>
#include <iostream>
#include <kvcache/kvcache.hpp>

namespace {

// [batch 1, num_kv_heads 2, seq_len, head_dim 4] float32 states, every element nonzero.
kvcache::Tensor states(std::int64_t seq_len) {
  kvcache::Tensor t = kvcache::Tensor::empty({1, 2, seq_len, 4}, kvcache::DType::kFloat32);
  float* p = t.data_as<float>();
  for (std::int64_t i = 0; i < t.numel(); ++i) p[i] = 0.5f + static_cast<float>(i);
  return t;
}

}  // namespace

int main() {
  kvcache::DynamicCache<> cache;
  cache.update(states(3), states(3), /*layer_idx=*/0);                // prompt
  const auto [keys, values] = cache.update(states(1), states(1), 0);  // one decode step
  const std::int64_t seq_len = cache.get_seq_length();
  std::cout << "kvcache " << kvcache::kVersion << " (" KVCACHE_CONSUMER "): seq_len " << seq_len
            << ", keys " << keys.describe() << "\n";
  if (seq_len != 4 || keys.size(2) != 4 || values.size(2) != 4) {
    std::cerr << "expected 4 cached tokens, got " << seq_len << "\n";
    return 1;
  }
  return 0;
}
