// Generation loops over a LlamaModel and a cache of its backend: generate() for the whole job
// (greedy or sampled, EOS handling, a callback per token, timings), and the pieces a hand-written
// loop needs. Both run over any Cache<B> (DynamicCache, StaticCache, …): generate() uses the one
// passed, or builds GenerationConfig::cache_implementation's kind (make_generation_cache). To
// reuse a prefilled prompt for several conversations, give each a clone() of the prompt cache.
// The seed's Python loop in C++:
//
//   DynamicCache<> past_key_values;
//   Tensor attention_mask = ...;                                   // [batch, prompt_len]
//   auto cache_position = make_cache_position(0, prompt_len);      // torch.arange(prompt_len)
//   Tensor input_ids = prompt;
//   for (int i = 0; i < max_new_tokens; ++i) {
//     Tensor logits = model.forward({.input_ids = input_ids, .attention_mask = attention_mask,
//                                    .cache_position = cache_position,
//                                    .past_key_values = &past_key_values, .logits_to_keep = 1});
//     auto next = argmax_last(logits);                             // logits[:, -1].argmax(-1)
//     input_ids = token_column(next);
//     attention_mask = extend_attention_mask(attention_mask);      // one more column of ones
//     cache_position = {cache_position.back() + 1};                // cache_position[-1:] + 1
//   }
#pragma once

#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "kvcache/cache/dynamic_cache.hpp"
#include "kvcache/cache/offloaded_cache.hpp"
#include "kvcache/cache/quantized_cache.hpp"
#include "kvcache/cache/sink_cache.hpp"
#include "kvcache/cache/static_cache.hpp"
#include "kvcache/generation/config.hpp"
#include "kvcache/model/llama.hpp"

namespace kvcache {

/// What generate() returns: the new tokens of each row and the run's figures.
struct GenerateResult {
  /// The new tokens per row: max_new_tokens of them, or fewer when every row stopped (a row
  /// that met an EOS id emits pad_token_id until the others stop).
  std::vector<std::vector<std::int64_t>>
      new_tokens{};  // per row, max_new_tokens or fewer if all stopped
  /// Time of the first forward pass (the prompt), in milliseconds.
  double prefill_ms = 0;
  /// Time of the decode steps after the prefill, in milliseconds.
  double decode_ms = 0;  // all steps after the prefill
  /// Decode steps run (one token per row each).
  std::int64_t decode_steps = 0;
  /// Decode throughput: decode_steps x batch / decode time.
  double decode_tokens_per_s = 0;  // decode steps × batch / decode time
  /// Tokens the cache holds at the end: past + prompt + new tokens - 1 (the last is never fed).
  std::int64_t cache_length = 0;  // tokens in the cache at the end
  /// Bytes of keys and values the cache holds at the end (Cache::nbytes).
  std::size_t cache_bytes = 0;  // bytes of keys and values held
  /// Decode steps replayed from a CUDA graph (GPU only; 0 on the CPU).
  std::int64_t graph_steps = 0;  // decode steps replayed from a CUDA graph (GPU only)
  /// CPU decode steps run on the calling thread alone because the full team was starved of CPU
  /// time (GenerationConfig::adapt_decode_threads; 0 on an idle machine and on the GPU).
  std::int64_t single_thread_steps = 0;  // CPU decode steps run on one thread (shared machine)
};

/// Called for every generated token: (row, token, step). Return false to stop generating.
using TokenCallback = std::function<bool(std::int64_t row, std::int64_t token, std::int64_t step)>;

/// Generates up to config.max_new_tokens tokens after `input_ids` [batch, prompt_len] (left-padded;
/// `attention_mask` [batch, prompt_len] marks real tokens, undefined = no padding). Rows that emit
/// an EOS token are finished and emit pad_token_id afterwards; generation stops when all are.
/// Uses `cache` when given, of any kind (which may hold an earlier conversation: the mask must then
/// cover it), else a fresh one of kind config.cache_implementation ("dynamic": a DynamicCache
/// reserving prompt + max_new_tokens slots, up to 4096 new ones; "static": a StaticCache of
/// max_cache_len prompt + max_new_tokens), of the model's backend either way. A cache of bounded
/// size (get_max_cache_shape() >= 0) must hold past + prompt + max_new_tokens - 1 tokens, checked
/// before the prefill, and past + prompt + max_new_tokens must stay within the model's context
/// length (max_position_embeddings) unless config.allow_past_context (see there). On the GPU the
/// logits stay there:
/// the token choice (argmax, or sampling from one uniform per row drawn on the host from `seed`)
/// runs on the device and only the chosen ids come back, the step's one wait for the GPU.
///
/// Errors are kvcache::Error, running out of memory included ("...: out of memory", naming the
/// call that could not allocate). A failed generate() does not restore a cache passed to it: each
/// layer keeps what it held before the call, plus the tokens of the forward passes that finished
/// and, for the pass that failed, its tokens in the layers it had stored them in (every cache
/// update is all or nothing, and layers are updated in order, so a layer holds them only if every
/// layer before it does). For a DynamicCache or StaticCache of full layers, crop(past) with the
/// length the cache had before the call returns it to what it held (layers the call added stay,
/// empty); a sliding, sink or quantized cache may have dropped or requantized tokens already.
GenerateResult generate(const LlamaModel& model, const Tensor& input_ids,
                        const Tensor& attention_mask, const GenerationConfig& config,
                        CacheRef cache = {}, const TokenCallback& on_token = {});

/// A cache of kind `cache_implementation` for generating on `model` (of its backend B): "dynamic",
/// a DynamicCache reserving max_cache_len slots (it grows past them; the model's sliding layers
/// get sliding-window layers, ModelConfig::sliding_windows, on the GPU only when max_cache_len
/// passes a window), "sliding", the same with the sliding layers on both backends (an error for a
/// model without them), "static", a StaticCache of `batch` rows and max_cache_len slots with
/// every layer allocated here in the model's key/value dtype, "sink" / "quantized" with
/// `cache_config`'s options (a SinkCache re-rotating with the model's RoPE inverse frequencies; a
/// QuantizedCache), or "offloaded" (an OffloadedCache; B = cuda::Backend only). What generate()
/// builds when no cache is passed; other names are a kvcache::Error.
template <CacheBackend B>
std::unique_ptr<Cache<B>> make_generation_cache(
    const LlamaModel& model, const std::string& cache_implementation, std::int64_t batch,
    std::int64_t max_cache_len, const GenerationConfig::CacheConfig& cache_config = {});

/// [batch, 1] int64 column of the given tokens (the next step's input_ids).
Tensor token_column(const std::vector<std::int64_t>& tokens);

/// Left-pads rows of token ids into input_ids [batch, longest] (pad_token_id) and the matching
/// attention_mask (0 for pads). Every row needs at least one token.
std::pair<Tensor, Tensor> left_pad(const std::vector<std::vector<std::int64_t>>& rows,
                                   std::int64_t pad_token_id);

/// Picks the next token of one row from its logits [vocab] float32: greedy, or sampled with
/// temperature, top-k and top-p (in that order, as transformers applies them).
std::int64_t choose_token(const float* logits, std::int64_t vocab, const GenerationConfig& config,
                          std::uint64_t& rng_state);

}  // namespace kvcache
