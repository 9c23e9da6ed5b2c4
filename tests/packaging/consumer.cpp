// Packaging check, shared by the consumer projects (find_package against the installed kvcache,
// add_subdirectory of its source tree; KVCACHE_CONSUMER names which). It fills a DynamicCache with
// a 3-token prompt and one decode step and exits non-zero unless the cache reports 4 tokens, so
// CTest fails when the package builds but does not work.
//
// It is also the client the README's designated-initializer style is checked against: every public
// aggregate is written here as `Type{.some_field = x}`, leaving the other fields out, and the
// consumer projects compile this file with -Wall -Wextra -Werror. GCC 12 warns
// (-Wmissing-field-initializers) for every left-out member without a default member initializer,
// so a new field without `= value` or `{}` fails the packaging tests. Built with
// KVCACHE_CONSUMER_CUDA (the cuda component's consumer), it also calls the CUDA runtime itself.
#include <cstdint>
#include <iostream>
#include <kvcache/kvcache.hpp>
#include <kvcache/model/gguf.hpp>
#include <vector>
#ifdef KVCACHE_CONSUMER_CUDA
#include <cuda_runtime.h>  // from CUDA::cudart, which kvcache::cuda brings
#endif

namespace {

// [batch 1, num_kv_heads 2, seq_len, head_dim 4] float32 states, every element nonzero.
kvcache::Tensor states(std::int64_t seq_len) {
  kvcache::Tensor t = kvcache::Tensor::empty({1, 2, seq_len, 4}, kvcache::DType::kFloat32);
  float* p = t.data_as<float>();
  for (std::int64_t i = 0; i < t.numel(); ++i) p[i] = 0.5f + static_cast<float>(i);
  return t;
}

// Every public aggregate, each with one field named and the rest left to their defaults. Returns
// the number of defaults that do not hold (0 when all is well), so the values are used.
int designated_initializers() {
  using namespace kvcache;
  int wrong = 0;
  const LoadOptions load{.dtype = DType::kBFloat16};
  wrong += load.device != Device::kCpu || load.quantize.has_value();
  const LoadOptions quantized{.quantize = cpu::QuantFormat::kQ4_1};
  wrong += quantized.dtype.has_value();
  const GenerationConfig generation{.max_new_tokens = 20};
  wrong += generation.do_sample || !generation.eos_token_ids.empty() ||
           generation.cache_implementation != "dynamic";
  const GenerationConfig sink{.cache_implementation = "sink",
                              .cache_config = {.window_length = 64}};
  wrong += sink.cache_config.num_sink_tokens != 4;
  const GenerationConfig::CacheConfig cache_config{.nbits = 2};
  wrong += cache_config.residual_length != 128;
  const GenerateResult result{.decode_steps = 3};
  wrong += !result.new_tokens.empty();
  const ForwardArgs forward{.input_ids = states(1), .logits_to_keep = 1};
  wrong += forward.attention_mask.defined() || !forward.use_cache;
  const DynamicCacheOptions dynamic{.initial_capacity = 16};
  wrong += !dynamic.sliding_windows.empty();
  const StaticCacheOptions fixed{
      .max_cache_len = 8, .num_layers = 1, .num_kv_heads = 2, .head_dim = 4};
  wrong += fixed.max_batch_size != 1 || fixed.dtype != DType::kFloat32;
  const SinkCacheOptions sink_options{.window_length = 8};
  wrong += sink_options.num_sink_tokens != 4 || !sink_options.rope_inv_freq.empty();
  const QuantizedCacheOptions quantized_cache{.nbits = 8};
  wrong += quantized_cache.group_size != 64;
  const AttentionOptions attention{.num_heads = 4, .num_kv_heads = 2, .head_dim = 4};
  wrong += attention.scale.has_value() || attention.sliding_window.has_value();
  const RopeScaling scaling{.factor = 8.0};
  wrong += scaling.high_freq_factor != 4.0;
  const RopeOptions rope{.head_dim = 4};
  wrong += rope.scaling.type != RopeType::kDefault;
  const ModelConfig config{.vocab_size = 32};
  wrong += !config.architecture.empty() || config.rope.rope_theta != 10000.0;
  const CacheKwargs kwargs{.sin = states(1)};
  wrong += !kwargs.cache_position.empty() || kwargs.cos.defined();
  const MaskSizes mask_sizes{.kv_length = 4};
  wrong += mask_sizes.kv_offset != 0;
  const cuda::MemoryStats memory{.in_use = 1};
  wrong += memory.peak_reserved != 0;
  const ChatMessage message{.role = "user"};
  wrong += !message.content.empty();
  const BpeVocabulary bpe{.tokens = {"a", "b"}};
  wrong += bpe.pre != "default" || bpe.add_bos_token || bpe.chat_template.has_value();
  const SpmVocabulary spm{.tokens = {"<unk>"}, .scores = {0.0f}};
  wrong += !spm.add_bos_token || !spm.add_dummy_prefix || spm.unk_token_id.has_value();
  const SafetensorsEntry entry{.name = "w"};
  wrong += entry.dtype.has_value() || entry.end != 0;
  const GgufTensorInfo info{.name = "w"};
  wrong += info.type != GgufType::kF32 || !info.ne.empty();
  const GgufValue value{.type = GgufValue::Type::kInt64, .i = 3};
  wrong += !value.s.empty() || value.array.size() != 0;
  const float16 half{.bits = 0x3c00};
  const bfloat16 brain{};
  wrong += half.bits == 0 || brain.bits != 0;
  if (wrong) std::cerr << wrong << " aggregate defaults did not hold\n";
  return wrong;
}

}  // namespace

int main() {
  kvcache::DynamicCache<> cache;
  cache.update(states(3), states(3), /*layer_idx=*/0);                // prompt
  const auto [keys, values] = cache.update(states(1), states(1), 0);  // one decode step
  const std::int64_t seq_len = cache.get_seq_length();
  std::cout << "kvcache " << kvcache::kVersion << " (" KVCACHE_CONSUMER "): seq_len " << seq_len
            << ", keys " << keys.describe() << ", CUDA devices " << kvcache::cuda::device_count()
            << "\n";
  if (seq_len != 4 || keys.size(2) != 4 || values.size(2) != 4) {
    std::cerr << "expected 4 cached tokens, got " << seq_len << "\n";
    return 1;
  }
#ifdef KVCACHE_CONSUMER_CUDA
  int runtime_version = 0;
  if (cudaRuntimeGetVersion(&runtime_version) != cudaSuccess || runtime_version <= 0) {
    std::cerr << "cudaRuntimeGetVersion failed beside kvcache::cuda\n";
    return 1;
  }
  std::cout << "CUDA runtime " << runtime_version << " (kvcache::cuda)\n";
#endif
  return designated_initializers() == 0 ? 0 : 1;
}
