// Generation settings, named as transformers' GenerationConfig names them.
#pragma once

#include <cstdint>
#include <optional>
#include <vector>

namespace kvcache {

struct GenerationConfig {
  std::int64_t max_new_tokens = 20;
  bool do_sample = false;  // false: greedy (argmax)
  float temperature = 1.0f;
  std::int64_t top_k = 0;                    // 0: off
  float top_p = 1.0f;                        // 1: off
  std::uint64_t seed = 0;                    // sampling seed; the same seed gives the same tokens
  std::vector<std::int64_t> eos_token_ids;   // a row that emits one of these is finished
  std::optional<std::int64_t> pad_token_id;  // emitted by finished rows (default 0)
};

}  // namespace kvcache
