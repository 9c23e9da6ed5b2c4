// Llama-family decoder-only models on the CPU or a GPU: LlamaForCausalLM (MHA and GQA, tied or
// untied embeddings, attention and MLP biases, explicit head_dim), Qwen2ForCausalLM (q/k/v biases)
// and MistralForCausalLM. The forward pass follows transformers' numerics: RMSNorm in float32, RoPE
// cos/sin in float32, softmax in float32, SiLU-gated MLP, and the LM head only for the positions
// asked for. Keys and values go through a Cache, so any cache kind of the CPU backend plugs in.
//
// Weights are read from a safetensors checkpoint or a GGUF file. Activations are float32. float32
// weights are used in place from the memory-mapped file (no copy) when suitably aligned; bfloat16
// and float16 weights are kept as they are by default and widened block by block inside each
// matrix product, or converted once to float32 at load with LoadOptions::dtype = kFloat32. Q8_0,
// Q4_1, Q5_0, Q5_1, Q4_K, Q5_K and Q6_K matrices from GGUF stay quantized (cpu::QuantizedMatrix,
// read by kernels that use the blocks directly; numerics in kvcache/backend/quantized.hpp) unless
// LoadOptions::dtype asks for a float dtype; LoadOptions::quantize turns float matrices into
// blocks at load.
//
// One model, two backends. The device is chosen at load (LoadOptions::device): the weights move
// there once, and forward() runs one body, templated on the backend (cpu::Backend or
// cuda::Backend), whose few device-specific steps (which kernel computes a projection, where the
// step's ids and mask live) are `if constexpr` branches of small helpers in src/model/llama.cpp.
// The cache passed in must be of the model's backend (a DynamicCache<cuda::Backend> for a model on
// the GPU); anything else is a kvcache::Error naming both devices.
//
// On the GPU: matrices are held in one float dtype (LoadOptions::dtype, else bfloat16 when the file
// holds bfloat16 or quantized blocks — Q8_0/Q4_1/Q4_0 are dequantized exactly and rounded to
// bfloat16 at load, 2 bytes a weight against the blocks' 0.56–1.06 —, float16 when it holds only
// float16, float32 when only float32); q/k/v and gate/up are stored as one fused matrix each so a
// step runs one GEMM for them. Activations between layers (the residual stream) are float32; the
// normed inputs of the projections, the keys and values (so the cache) and the attention output
// are in the weights' dtype; products accumulate in float32 (cuBLAS), the o and down projections
// add into the residual stream inside the GEMM. With float32 weights every step is float32 (TF32
// off), which is how the GPU matches transformers token for token. forward() returns logits on
// the model's device; a decode step's only wait for the GPU is reading the chosen ids back
// (argmax_last), and all of a step's inputs (ids, positions, mask) travel in one host-to-device
// copy.
#pragma once

#include <cstdint>
#include <optional>
#include <span>
#include <string>
#include <vector>

#include "kvcache/backend/cpu.hpp"
#include "kvcache/backend/cuda.hpp"
#include "kvcache/backend/quantized.hpp"
#include "kvcache/cache/cache.hpp"
#include "kvcache/model/config.hpp"
#include "kvcache/tensor.hpp"

namespace kvcache {

/// How LlamaModel::from_pretrained and from_gguf load: the weights' dtype, quantization at
/// load, and the device.
struct LoadOptions {
  /// Dtype the weights are held in: empty keeps each matrix as the file holds it (quantized
  /// blocks included); kFloat32 widens 16-bit weights and dequantizes quantized ones exactly, once
  /// at load; kBFloat16 / kFloat16 narrow float32 weights (and dequantized ones).
  std::optional<DType> dtype{};
  /// Quantizes float weight matrices (not norms or biases) to this block format at load, with
  /// ggml's reference rounding; matrices already quantized are kept. Not combinable with dtype.
  std::optional<cpu::QuantFormat> quantize{};
  /// Where the weights live and the forward pass runs: Device::kCpu, or Device::kCuda (the
  /// current CUDA device; an error where none is usable). Quantize is CPU-only.
  Device device = Device::kCpu;
  /// The most bytes holding the weights may allocate on `device` (transformers' max_memory); 0:
  /// no limit but what the device has available (kvcache::available_memory). Both are checked
  /// before the first weight is converted, so a model that cannot fit fails at once, with the
  /// bytes it needs. Weights used in place (a mapped float32 or quantized matrix held as the file
  /// has it) take none; LlamaModel::weight_bytes() is what the holding took in the end.
  std::uint64_t max_memory = 0;
};

/// The cache a forward pass reads and extends: a pointer to a cache of either backend (or null).
/// Converts from any Cache<cpu::Backend>* or Cache<cuda::Backend>*, so `&dynamic_cache` fits.
class CacheRef {
 public:
  CacheRef() = default;
  /// No cache: forward() uses one local to the call.
  CacheRef(std::nullptr_t) {}  // NOLINT(google-explicit-constructor)
  /// A CPU cache.
  CacheRef(Cache<cpu::Backend>* cache) : cpu_(cache) {}  // NOLINT(google-explicit-constructor)
  /// A GPU cache.
  CacheRef(Cache<cuda::Backend>* cache) : cuda_(cache) {}  // NOLINT(google-explicit-constructor)

  /// Whether a cache is referred to.
  explicit operator bool() const { return cpu_ != nullptr || cuda_ != nullptr; }
  /// The device of the cache's backend (kCpu for a null reference).
  Device device() const { return cuda_ ? Device::kCuda : Device::kCpu; }
  /// The cache as `Cache<B>*`, or null when it is of the other backend (or null).
  template <class B>
  Cache<B>* get() const {
    if constexpr (B::kDevice == Device::kCpu) {
      return cpu_;
    } else {
      return cuda_;
    }
  }

 private:
  Cache<cpu::Backend>* cpu_ = nullptr;
  Cache<cuda::Backend>* cuda_ = nullptr;
};

namespace detail {

/// A decode step laid out for CUDA-graph replay (generate() builds one; see
/// src/generation/decode_graph.hpp): every input that changes from step to step is read from
/// these device tensors, whose addresses stay fixed while the graph lives, and keys and values go
/// straight into the cache's storage at the slot read on the device.
struct DecodeReplay {
  Tensor ids{};             // [batch] int64
  Tensor position_ids{};    // [batch, 1] int64
  Tensor cache_position{};  // [1] int64: the step's slot, the cache length before it
  Tensor kv_len{};          // [1] int64: the keys after the append (cache_position + 1)
  Tensor mask{};            // [batch, capacity] uint8, or undefined when no row is padded
  Tensor logits{};          // [batch, vocab] float32, written by the step
  std::vector<std::pair<Tensor, Tensor>> storage{};  // per layer: keys, values [b, kv, capacity, d]
};

class DecodeGraph;

}  // namespace detail

/// Inputs of one forward pass, named as transformers names them.
struct ForwardArgs {
  /// Token ids [batch, q_len] int64 (host memory on either backend).
  Tensor input_ids{};  // [batch, q_len] int64
  /// [batch, past + q_len] int64/int32/uint8, 1 = attend, 0 = padding; undefined = all ones.
  Tensor attention_mask{};  // [batch, past + q_len] int64/int32/uint8; undefined = all ones
  /// [batch, q_len] int64 RoPE positions; undefined = from the mask (cumsum - 1, padded 1), or
  /// the cache's own positions (SinkCache).
  Tensor position_ids{};  // [batch, q_len] int64; undefined = from the mask (cumsum − 1, pads 1)
  /// The new tokens' cache slots, [q_len]; empty = past .. past + q_len - 1.
  std::vector<std::int64_t> cache_position{};  // [q_len]; empty = past .. past + q_len − 1
  /// The cache to read and extend, of the model's backend; null: a cache local to the call.
  CacheRef past_key_values{};  // of the model's backend; null: a cache local to this call
  /// false: the given cache is read but not updated.
  bool use_cache = true;  // false: the given cache is not updated
  /// Logits for the last logits_to_keep positions only; 0 = every position.
  std::int64_t logits_to_keep = 0;  // last positions to compute logits for; 0 = all
  // input_ids, attention_mask and position_ids are host (CPU) tensors on either backend.
};

/// A Llama-family decoder (LlamaForCausalLM, Qwen2ForCausalLM, MistralForCausalLM) loaded from a
/// checkpoint folder or a GGUF file, on the CPU or a GPU. Read-only once loaded: several threads
/// may call forward() at once, each with a cache of its own.
class LlamaModel {
 public:
  /// Loads config.json and the safetensors weights from `dir`. Throws kvcache::Error naming the
  /// file and tensor for anything missing or malformed.
  /// `path` may also be a .gguf file (see from_gguf).
  static LlamaModel from_pretrained(const std::string& dir, LoadOptions options = {});

  /// Loads a llama-architecture GGUF file (llama.cpp's format): the config from its metadata, the
  /// weights under transformers' names with llama.cpp's q/k row permutation undone. Q8_0 and
  /// Q4_1, Q5_0, Q5_1, Q4_K, Q5_K and Q6_K matrices stay quantized by default, as their own blocks
  /// (the default model holds 92 MiB of blocks; a Q4_K_M file's mix all stays in blocks), Q4_0
  /// ones too, as Q4_1 blocks with the same values (11% more bytes); Q2_K, Q3_K and Q8_K
  /// matrices are dequantized exactly to float32 (4 bytes a weight; no kernel reads their blocks
  /// yet); F32/F16/BF16 tensors are used in place from the mapping. With options.dtype quantized
  /// matrices are dequantized once at load (the default model: 538 MB as float32, 269 MB as
  /// bfloat16). Other types (the IQ family, TQ, MXFP4) are errors naming the type.
  static LlamaModel from_gguf(const std::string& path, LoadOptions options = {});

  /// The configuration the model was loaded with.
  const ModelConfig& config() const { return config_; }

  /// Logits [batch, kept positions, vocab_size] float32, on the model's device.
  Tensor forward(const ForwardArgs& args) const;

  /// The device the weights live on and forward() runs on.
  Device device() const { return device_; }
  /// The dtype of the keys and values forward() stores in the cache (float32 on the CPU; the
  /// weights' dtype on the GPU).
  DType kv_dtype() const { return kv_dtype_; }

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
    // GPU only: [q_out + 2·kv_out, hidden] and [2·inter, hidden], of which q/k/v and gate/up are
    // row views; undefined on the CPU.
    Tensor qkv_fused, gate_up_fused;
  };

  LlamaModel() = default;
  // `replay` (GPU only): the step reads its inputs from, and writes its logits and keys/values
  // to, the fixed buffers a captured graph replays over; null: an ordinary forward pass.
  template <class B>
  Tensor forward_on(const ForwardArgs& args, Cache<B>* cache,
                    const detail::DecodeReplay* replay = nullptr) const;
  friend class detail::DecodeGraph;

  ModelConfig config_;
  cpu::Weight embed_tokens_;  // [vocab, hidden]
  Tensor final_norm_;         // [hidden] float32
  cpu::Weight lm_head_;       // [vocab, hidden] (the embedding when tied)
  std::vector<Layer> layers_;
  Device device_ = Device::kCpu;
  DType kv_dtype_ = DType::kFloat32;
  Tensor inv_freq_;  // GPU only: RoPE's inverse frequencies [head_dim / 2] float32
};

/// Random weights for `config` under transformers' parameter names, uniform in [-scale, scale)
/// (norm weights near 1), for tests and benchmarks that need a model of a given shape. On
/// Device::kCuda they are drawn on the GPU (a counter-based generator, not the CPU's sequence), so
/// a 7B-shaped model takes seconds to make.
std::vector<std::pair<std::string, Tensor>> random_llama_weights(const ModelConfig& config,
                                                                 std::uint64_t seed,
                                                                 DType dtype = DType::kFloat32,
                                                                 float scale = 0.1f,
                                                                 Device device = Device::kCpu);

/// The greedy choice per row: argmax over the last position of logits [batch, positions, vocab]
/// on either device (CUDA logits: computed on the GPU, only the ids come back).
std::vector<std::int64_t> argmax_last(const Tensor& logits);

/// The last position of logits [batch, positions, vocab] as a [batch, vocab] view (no copy).
Tensor last_position(const Tensor& logits);

}  // namespace kvcache
