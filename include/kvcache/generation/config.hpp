// Generation settings, named as transformers' GenerationConfig names them.
#pragma once

#include <cstdint>
#include <optional>
#include <string>
#include <vector>

namespace kvcache {

/// What generate() does, named as transformers' GenerationConfig names it.
struct GenerationConfig {
  /// Tokens to generate per row at most (fewer when every row met an EOS id).
  std::int64_t max_new_tokens = 20;
  /// Sample from the distribution (temperature, top_k, top_p) instead of taking the argmax.
  bool do_sample = false;  // false: greedy (argmax)
  /// Logits are divided by it before sampling (do_sample only).
  float temperature = 1.0f;
  /// Sample among the k most likely tokens only; 0 turns it off.
  std::int64_t top_k = 0;  // 0: off
  /// Sample among the most likely tokens whose probabilities sum to top_p; 1 turns it off.
  float top_p = 1.0f;  // 1: off
  /// The sampling seed: the same seed gives the same tokens.
  std::uint64_t seed = 0;  // sampling seed; the same seed gives the same tokens
  /// Ids that finish a row (ModelConfig::eos_token_ids gives the model's); empty: none.
  std::vector<std::int64_t> eos_token_ids{};  // a row that emits one of these is finished
  /// What finished rows emit while others go on (0 when unset).
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
  /// full-length layers, exact for a windowed model too), "sliding" (a DynamicCache whose sliding
  /// layers are sliding-window rings on both backends from the first step, transformers'
  /// "sliding_window"; an error for a model without sliding layers), "sink" (a SinkCache of
  /// cache_config's window_length and num_sink_tokens, re-rotating with the model's RoPE),
  /// "quantized" (a QuantizedCache of cache_config's nbits, q_group_size, axis_key and
  /// residual_length) or "offloaded" (an OffloadedCache: the layers in page-locked host memory,
  /// two on the device; GPU only). All but "offloaded" run on the CPU and the GPU. Any other name
  /// is an error, also when a cache is passed (which is then used as it is).
  std::string cache_implementation = "dynamic";
  /// Options of the "sink" and "quantized" kinds (transformers' cache_config).
  struct CacheConfig {
    /// "sink": tokens kept per layer, sinks included.
    std::int64_t window_length = 256;  // sink: tokens kept per layer, sinks included
    /// "sink": leading tokens kept for good.
    std::int64_t num_sink_tokens = 4;  // sink: leading tokens kept for good
    /// "quantized": bits per value, 2, 4 or 8.
    int nbits = 4;  // quantized: 2, 4 or 8
    /// "quantized": values per scale/min group.
    std::int64_t q_group_size = 64;  // quantized: values per scale/min group
    /// "quantized": keys grouped per "channel" (KIVI) or per "token".
    std::string axis_key = "channel";  // quantized: keys grouped per "channel" (KIVI) or "token"
    /// "quantized": recent tokens kept in full precision.
    std::int64_t residual_length = 128;  // quantized: recent tokens kept in full precision
  };
  /// Options of the "sink" and "quantized" cache kinds.
  CacheConfig cache_config{};
  /// Generate past the model's context length (ModelConfig::max_position_embeddings, a GGUF's
  /// llama.context_length). false (the default): generate() refuses, before the prefill, a call
  /// whose past + prompt_len + max_new_tokens passes it, with a kvcache::Error naming the sum and
  /// the context length (with a SinkCache, whose tokens take positions inside its window, the
  /// positions it will give are counted instead). true: the tokens past it get the positions
  /// that follow (RoPE computes any position alike; no error, nothing truncated), but the model
  /// never saw them in training and its output there typically degrades.
  bool allow_past_context = false;
  /// CPU decode on a shared machine. With more than one CPU thread, every OpenMP region of a
  /// decode step waits for its slowest thread, so a thread whose core another process keeps busy
  /// stalls the whole step (two threads then decode slower than one). true (the default): a
  /// decode step that got markedly less CPU time than its threads had wall time (the process's
  /// CPU time against threads × wall time) has the next step tried on the calling thread alone;
  /// while one thread is faster, decode steps run on one, and the full team is tried again at
  /// growing intervals (8 to 256 steps). The prefill always runs on the full team, and a decode
  /// step's results do not depend on its thread count, so the tokens are the same either way.
  /// false: every step runs on the thread count in force (cpu::set_num_threads).
  bool adapt_decode_threads = true;
};

}  // namespace kvcache
