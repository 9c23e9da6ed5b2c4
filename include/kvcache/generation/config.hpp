// Generation settings, named as transformers' GenerationConfig names them.
#pragma once

#include <cstdint>
#include <optional>
#include <string>
#include <vector>

namespace kvcache {

struct GenerationConfig {
  std::int64_t max_new_tokens = 20;
  bool do_sample = false;  // false: greedy (argmax)
  float temperature = 1.0f;
  std::int64_t top_k = 0;                      // 0: off
  float top_p = 1.0f;                          // 1: off
  std::uint64_t seed = 0;                      // sampling seed; the same seed gives the same tokens
  std::vector<std::int64_t> eos_token_ids{};   // a row that emits one of these is finished
  std::optional<std::int64_t> pad_token_id{};  // emitted by finished rows (default 0)
  /// On the GPU, with a DynamicCache of full layers or a StaticCache (the one passed or the one
  /// cache_implementation builds), when max_new_tokens >= 3: the decode step (one token per
  /// row) is captured as a CUDA graph at the second decode step and replayed from then on, one
  /// launch a step instead of one per kernel (GenerateResult::graph_steps counts the steps run
  /// from the graph, the capturing one included). false: every step is launched kernel by kernel.
  /// The computation is the same except that the replayed attention splits its keys across blocks
  /// by a plan made for the cache's capacity instead of the current length, which can change the
  /// last bits of its float32 sums (tokens then differ only at near-ties).
  /// On by default; a hand-written loop calling forward() always runs kernel by kernel.
  bool cuda_graph = true;
  /// The cache generate() builds when none is passed (as transformers' cache_implementation):
  /// "dynamic" (a DynamicCache, the default, with sliding-window layers for the model's sliding
  /// layers as transformers' DynamicCache(config); on the GPU only when prompt + max_new_tokens
  /// passes a window, since full layers replay from a CUDA graph) or "static" (a StaticCache of
  /// the prompt's batch and max_cache_len = prompt + max_new_tokens, allocated before the prefill;
  /// full-length layers, exact for a windowed model too), "sink" (a SinkCache of cache_config's
  /// window_length and num_sink_tokens, re-rotating with the model's RoPE; CPU only) or
  /// "quantized" (a QuantizedCache of cache_config's nbits, q_group_size, axis_key and
  /// residual_length; CPU only). Any other name is an error, also when a cache is passed (which is
  /// then used as it is).
  std::string cache_implementation = "dynamic";
  /// Options of the "sink" and "quantized" kinds (transformers' cache_config).
  struct CacheConfig {
    std::int64_t window_length = 256;    // sink: tokens kept per layer, sinks included
    std::int64_t num_sink_tokens = 4;    // sink: leading tokens kept for good
    int nbits = 4;                       // quantized: 2, 4 or 8
    std::int64_t q_group_size = 64;      // quantized: values per scale/min group
    std::string axis_key = "channel";    // quantized: keys grouped per "channel" (KIVI) or "token"
    std::int64_t residual_length = 128;  // quantized: recent tokens kept in full precision
  };
  CacheConfig cache_config{};
};

}  // namespace kvcache
