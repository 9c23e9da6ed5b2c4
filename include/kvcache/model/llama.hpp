// Llama-family decoder-only models on the CPU: LlamaForCausalLM (MHA and GQA, tied or untied
// embeddings, attention and MLP biases, explicit head_dim), Qwen2ForCausalLM (q/k/v biases) and
// MistralForCausalLM. The forward pass follows transformers' numerics: RMSNorm in float32, RoPE
// cos/sin in float32, softmax in float32, SiLU-gated MLP, and the LM head only for the positions
// asked for. Keys and values go through a Cache, so any cache kind of the CPU backend plugs in.
//
// Weights are read from a safetensors checkpoint or a GGUF file. Activations are float32. float32
// weights are used in place from the memory-mapped file (no copy) when suitably aligned; bfloat16
// and float16 weights are kept as they are by default and widened block by block inside each
// matrix product, or converted once to float32 at load with LoadOptions::dtype = kFloat32. Q8_0
// and Q4_1 matrices from GGUF stay quantized (cpu::QuantizedMatrix, read by kernels that use the
// blocks directly; numerics in kvcache/backend/quantized.hpp) unless LoadOptions::dtype asks for
// a float dtype; LoadOptions::quantize turns float matrices into blocks at load.
#pragma once

#include <cstdint>
#include <optional>
#include <span>
#include <string>
#include <vector>

#include "kvcache/backend/cpu.hpp"
#include "kvcache/backend/quantized.hpp"
#include "kvcache/cache/cache.hpp"
#include "kvcache/model/config.hpp"
#include "kvcache/tensor.hpp"

namespace kvcache {

struct LoadOptions {
  /// Dtype the weights are held in: empty keeps each matrix as the file holds it (quantized
  /// blocks included); kFloat32 widens 16-bit weights and dequantizes quantized ones exactly, once
  /// at load; kBFloat16 / kFloat16 narrow float32 weights (and dequantized ones).
  std::optional<DType> dtype;
  /// Quantizes float weight matrices (not norms or biases) to this block format at load, with
  /// ggml's reference rounding; matrices already quantized are kept. Not combinable with dtype.
  std::optional<cpu::QuantFormat> quantize;
};

/// Inputs of one forward pass, named as transformers names them.
struct ForwardArgs {
  Tensor input_ids;       // [batch, q_len] int64
  Tensor attention_mask;  // [batch, past + q_len] int64/int32/uint8; undefined = all ones
  Tensor position_ids;    // [batch, q_len] int64; undefined = from the mask (cumsum − 1, pads 1)
  std::vector<std::int64_t> cache_position;        // [q_len]; empty = past .. past + q_len − 1
  Cache<cpu::Backend>* past_key_values = nullptr;  // null: a cache local to this call
  bool use_cache = true;                           // false: the given cache is not updated
  std::int64_t logits_to_keep = 0;                 // last positions to compute logits for; 0 = all
};

class LlamaModel {
 public:
  /// Loads config.json and the safetensors weights from `dir`. Throws kvcache::Error naming the
  /// file and tensor for anything missing or malformed.
  /// `path` may also be a .gguf file (see from_gguf).
  static LlamaModel from_pretrained(const std::string& dir, LoadOptions options = {});

  /// Loads a llama-architecture GGUF file (llama.cpp's format): the config from its metadata, the
  /// weights under transformers' names with llama.cpp's q/k row permutation undone. Q8_0 and
  /// Q4_1 matrices stay quantized by default (the default model holds 92 MiB of blocks), Q4_0 ones
  /// too, as Q4_1 blocks with the same values (11% more bytes); F32/F16/BF16 tensors are used in
  /// place from the mapping. With options.dtype quantized matrices are dequantized once at load
  /// (the default model: 538 MB as float32, 269 MB as bfloat16). Other types are errors naming
  /// the type.
  static LlamaModel from_gguf(const std::string& path, LoadOptions options = {});

  const ModelConfig& config() const { return config_; }

  /// Logits [batch, kept positions, vocab_size] float32.
  Tensor forward(const ForwardArgs& args) const;

  /// Bytes of weights held (what a decode step reads).
  std::size_t weight_bytes() const;

  /// Builds a model from already-loaded weights (used by from_pretrained and by tests and
  /// benchmarks that make random weights). `weights` maps transformers' parameter names
  /// ("model.layers.0.self_attn.q_proj.weight", ...) to tensors.
  static LlamaModel from_weights(ModelConfig config,
                                 const std::vector<std::pair<std::string, Tensor>>& weights,
                                 LoadOptions options = {});
  /// The same with matrices that may be quantized.
  static LlamaModel from_weights(ModelConfig config,
                                 const std::vector<std::pair<std::string, cpu::Weight>>& weights,
                                 LoadOptions options = {});

 private:
  struct Layer {
    Tensor input_norm, post_norm;           // [hidden] float32
    cpu::Weight q, k, v, o;                 // [out, in]
    Tensor q_bias, k_bias, v_bias, o_bias;  // [out] float32 or undefined
    cpu::Weight gate, up, down;             // [inter, hidden], [inter, hidden], [hidden, inter]
    Tensor gate_bias, up_bias, down_bias;
  };

  LlamaModel() = default;

  ModelConfig config_;
  cpu::Weight embed_tokens_;  // [vocab, hidden]
  Tensor final_norm_;         // [hidden] float32
  cpu::Weight lm_head_;       // [vocab, hidden] (the embedding when tied)
  std::vector<Layer> layers_;
};

/// Random weights for `config` under transformers' parameter names, uniform in [-scale, scale)
/// (norm weights near 1), for tests and benchmarks that need a model of a given shape.
std::vector<std::pair<std::string, Tensor>> random_llama_weights(const ModelConfig& config,
                                                                 std::uint64_t seed,
                                                                 DType dtype = DType::kFloat32,
                                                                 float scale = 0.1f);

/// The greedy choice per row: argmax over the last position of logits [batch, positions, vocab].
std::vector<std::int64_t> argmax_last(const Tensor& logits);

}  // namespace kvcache
