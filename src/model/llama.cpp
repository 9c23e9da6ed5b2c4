// Loading and running Llama-family models on the CPU or the GPU. The forward pass reads top to
// bottom like transformers' LlamaModel.forward: embed, then per layer RMSNorm → q/k/v → RoPE →
// attention through the cache → o_proj → residual → RMSNorm → SiLU MLP → residual, then the final
// norm and the LM head for the kept positions. It is written once (forward_on<B>); the helpers in
// the anonymous namespace below hold the only places where the two backends differ.
#include "kvcache/model/llama.hpp"

#include <algorithm>
#include <array>
#include <cstdint>
#include <cstring>
#include <map>
#include <new>
#include <random>
#include <tuple>

#include "kvcache/attention/attention.hpp"
#include "kvcache/attention/mask.hpp"
#include "kvcache/attention/rope.hpp"
#include "kvcache/cache/dynamic_cache.hpp"
#include "kvcache/error.hpp"
#include "kvcache/memory.hpp"
#include "kvcache/model/safetensors.hpp"
#include "kvcache/tensor.hpp"

namespace kvcache {
namespace {

using WeightMap = std::map<std::string, cpu::Weight>;

std::string shape_text(std::span<const std::int64_t> shape) {
  std::string text = "[";
  for (std::size_t i = 0; i < shape.size(); ++i) text += (i ? ", " : "") + std::to_string(shape[i]);
  return text + "]";
}

// Looks a parameter up; the error names it and what the architecture expected.
const cpu::Weight& find(const WeightMap& weights, const std::string& name,
                        const std::string& where) {
  auto it = weights.find(name);
  KVCACHE_CHECK(it != weights.end(), where, ": expected tensor '", name,
                "', which the checkpoint does not hold");
  return it->second;
}

// A weight matrix [rows, cols], dense in a float dtype or quantized.
cpu::Weight require_matrix(const WeightMap& weights, const std::string& name, std::int64_t rows,
                           std::int64_t cols, const std::string& where) {
  const cpu::Weight& w = find(weights, name, where);
  const std::int64_t want[] = {rows, cols};
  if (w.is_quantized()) {
    KVCACHE_CHECK(w.rows() == rows && w.cols() == cols, where, ": expected '", name, "' shaped ",
                  shape_text(want), ", got ", w.describe());
    return w;
  }
  const Tensor& t = w.dense();
  KVCACHE_CHECK(t.rank() == 2 && t.size(0) == rows && t.size(1) == cols, where, ": expected '",
                name, "' shaped ", shape_text(want), ", got ", t.shape_string());
  KVCACHE_CHECK(is_floating(t.dtype()), where, ": expected '", name, "' in a float dtype, got ",
                dtype_name(t.dtype()));
  return w;
}

// A vector [size] (norm weights, biases): always dense.
Tensor require_vector(const WeightMap& weights, const std::string& name, std::int64_t size,
                      const std::string& where) {
  const cpu::Weight& w = find(weights, name, where);
  KVCACHE_CHECK(!w.is_quantized(), where, ": expected '", name,
                "' as a float vector, got a quantized ", w.describe());
  const Tensor& t = w.dense();
  KVCACHE_CHECK(t.rank() == 1 && t.size(0) == size, where, ": expected '", name, "' shaped [", size,
                "], got ", t.shape_string());
  KVCACHE_CHECK(is_floating(t.dtype()), where, ": expected '", name, "' in a float dtype, got ",
                dtype_name(t.dtype()));
  return t;
}

// Whether a dense matrix held in `target` is used as the file has it (no copy): the same dtype,
// data aligned to its element size (safetensors does not promise alignment), contiguous.
// hold_matrix and holding_bytes decide alike through it.
bool used_in_place(const Tensor& t, DType target) {
  const bool aligned = reinterpret_cast<std::uintptr_t>(t.data()) % dtype_size(target) == 0;
  return target == t.dtype() && aligned && t.is_contiguous();
}

// A weight matrix as the model holds it. Quantized: kept, or dequantized when a dtype is asked
// for. Dense: quantized when asked for; else in `dtype` when given, else as stored — float32 data
// is used in place when 4-byte aligned (safetensors does not promise alignment), else copied.
cpu::Weight hold_matrix(const cpu::Weight& w, const LoadOptions& options) {
  if (w.is_quantized()) {
    if (!options.dtype) return w;
    const Tensor dense = w.quantized().dequantize();
    return *options.dtype == DType::kFloat32 ? dense : cpu::cast(dense, *options.dtype);
  }
  const Tensor& t = w.dense();
  if (options.quantize) return cpu::QuantizedMatrix::quantize(t, *options.quantize);
  const DType target = options.dtype.value_or(t.dtype());
  if (used_in_place(t, target)) return t;
  return cpu::cast(t, target);
}

// Small vectors (norms, biases) are always float32.
Tensor hold_vector(const Tensor& t) {
  return t.dtype() == DType::kFloat32 ? cpu::clone(t) : cpu::cast(t, DType::kFloat32);
}

Tensor optional_vector(const WeightMap& weights, const std::string& name, bool wanted,
                       std::int64_t size, const std::string& where) {
  if (!wanted) return Tensor();
  return hold_vector(require_vector(weights, name, size, where));
}

// --- the GPU's holding of weights ---------------------------------------------------------------

// The one dtype a model on the GPU holds its matrices in: the asked one, else bfloat16 when the
// checkpoint has bfloat16 or quantized matrices, float16 when its matrices are float16, float32
// when they are all float32.
DType gpu_weight_dtype(const WeightMap& weights, const LoadOptions& options) {
  if (options.dtype) return *options.dtype;
  bool f16 = false;
  for (const auto& [name, w] : weights) {
    if (w.is_quantized() || w.dense().dtype() == DType::kBFloat16) return DType::kBFloat16;
    if (w.dense().rank() == 2 && w.dense().dtype() == DType::kFloat16) f16 = true;
  }
  return f16 ? DType::kFloat16 : DType::kFloat32;
}

// A tensor on the GPU in `dtype`: sent over as stored (so a 16-bit checkpoint crosses the bus at
// 2 bytes a weight) and converted there.
Tensor to_gpu(const Tensor& t, DType dtype) {
  const Tensor on_device =
      t.device() == Device::kCuda ? t : cuda::to_device(t.is_contiguous() ? t : cpu::clone(t));
  if (on_device.dtype() == dtype && on_device.is_contiguous()) return on_device;
  return cuda::cast(on_device, dtype);
}

// A matrix on the GPU: quantized blocks are dequantized exactly on the host and rounded to
// `dtype` on the device.
Tensor gpu_matrix(const cpu::Weight& w, DType dtype) {
  return to_gpu(w.is_quantized() ? w.quantized().dequantize() : w.dense(), dtype);
}

// Several matrices [rows_i, cols] stacked into one [Σ rows_i, cols] device matrix (q|k|v,
// gate|up), so one GEMM computes all of them; the parts are handed back as row views of it.
Tensor fuse_rows(std::span<cpu::Weight* const> parts, DType dtype) {
  std::int64_t rows = 0;
  for (const cpu::Weight* w : parts) rows += w->rows();
  const std::int64_t cols = parts[0]->cols();
  Tensor fused = cuda::empty({rows, cols}, dtype);
  std::int64_t r0 = 0;
  for (cpu::Weight* w : parts) {
    const std::int64_t r1 = r0 + w->rows();
    cuda::copy(fused.slice(0, r0, r1), gpu_matrix(*w, dtype));
    *w = fused.slice(0, r0, r1);
    r0 = r1;
  }
  return fused;
}

// The bytes holding the weights allocates on the model's device (what hold_m / hold_v and
// fuse_rows make of them): the tensors the model uses (lm_head only when not tied; biases only
// where the config has them), a matrix used in place as 0. Checked against what the device has
// before the first weight is converted, so a model that cannot fit fails at once.
std::uint64_t holding_bytes(const WeightMap& weights, const ModelConfig& c,
                            const LoadOptions& options, bool on_gpu, DType gpu_dtype) {
  std::uint64_t total = 0;
  auto matrix = [&](const std::string& name) {
    const auto it = weights.find(name);
    if (it == weights.end() || (!it->second.is_quantized() && it->second.dense().rank() != 2))
      return;  // missing or misshapen: the loading says so
    const cpu::Weight& w = it->second;
    const auto rows = static_cast<std::uint64_t>(w.rows()),
               cols = static_cast<std::uint64_t>(w.cols());
    if (on_gpu) {
      total += rows * cols * dtype_size(gpu_dtype);
    } else if (w.is_quantized()) {
      if (options.dtype) total += rows * cols * dtype_size(*options.dtype);
    } else if (options.quantize) {
      const auto granule = static_cast<std::uint64_t>(cpu::quant_row_granule(*options.quantize));
      total += rows * (cols / granule) * cpu::quant_block_bytes(*options.quantize);
    } else {
      const DType target = options.dtype.value_or(w.dense().dtype());
      if (!used_in_place(w.dense(), target)) total += rows * cols * dtype_size(target);
    }
  };
  auto vector = [&](const std::string& name, bool wanted) {
    const auto it = weights.find(name);
    if (!wanted || it == weights.end() || it->second.is_quantized()) return;
    total += static_cast<std::uint64_t>(it->second.dense().numel()) * sizeof(float);
  };
  matrix("model.embed_tokens.weight");
  vector("model.norm.weight", true);
  if (!c.tie_word_embeddings) matrix("lm_head.weight");
  for (std::int64_t l = 0; l < c.num_hidden_layers; ++l) {
    const std::string p = "model.layers." + std::to_string(l) + ".";
    for (const char* m : {"self_attn.q_proj.weight", "self_attn.k_proj.weight",
                          "self_attn.v_proj.weight", "self_attn.o_proj.weight",
                          "mlp.gate_proj.weight", "mlp.up_proj.weight", "mlp.down_proj.weight"})
      matrix(p + m);
    vector(p + "input_layernorm.weight", true);
    vector(p + "post_attention_layernorm.weight", true);
    for (const char* b :
         {"self_attn.q_proj.bias", "self_attn.k_proj.bias", "self_attn.v_proj.bias"})
      vector(p + b, c.qkv_bias);
    vector(p + "self_attn.o_proj.bias", c.o_bias);
    for (const char* b : {"mlp.gate_proj.bias", "mlp.up_proj.bias", "mlp.down_proj.bias"})
      vector(p + b, c.mlp_bias);
  }
  return total;
}

// --- where the forward pass differs per backend ---------------------------------------------

// A [rows, heads · head_dim] projection output (rows = batch · q_len, any row stride) seen as
// [batch, heads, q_len, head_dim], the layout attention and the cache take; no copy.
Tensor split_heads(const Tensor& p, std::int64_t batch, std::int64_t q_len, std::int64_t heads,
                   std::int64_t head_dim) {
  const std::int64_t row = p.stride(0);
  const std::int64_t shape[4] = {batch, heads, q_len, head_dim};
  const std::int64_t strides[4] = {q_len * row, head_dim, row, 1};
  return Tensor::from_storage(p.storage(), p.data(), shape, p.dtype(), p.device(), strides);
}

// The tokens of a step that are not leading padding, as flat rows b · q_len + i: token i of row b
// is leading padding when its mask column past + i and every column before it are 0 (a
// left-padded prompt's pads, which attend to nothing). Empty when there is no such token, or when
// every token is one (nothing to gain).
std::vector<std::int64_t> unpadded_rows(std::span<const std::uint8_t> mask, std::int64_t batch,
                                        std::int64_t past, std::int64_t q_len) {
  std::vector<std::int64_t> rows;
  if (mask.empty() || q_len < 2) return rows;
  const std::int64_t columns = past + q_len;
  rows.reserve(static_cast<std::size_t>(batch * q_len));
  for (std::int64_t b = 0; b < batch; ++b) {
    const std::uint8_t* row = mask.data() + b * columns;
    std::int64_t first = 0;  // the row's first attended column
    while (first < columns && row[first] == 0) ++first;
    for (std::int64_t i = std::max<std::int64_t>(0, first - past); i < q_len; ++i)
      rows.push_back(b * q_len + i);
  }
  if (rows.empty() || static_cast<std::int64_t>(rows.size()) == batch * q_len) rows.clear();
  return rows;
}

// Rows `rows` of a float32 [n, cols] CPU tensor (any row stride, rows contiguous), packed.
Tensor gather_rows(const Tensor& src, std::span<const std::int64_t> rows) {
  const std::int64_t cols = src.size(1);
  Tensor out = Tensor::empty({static_cast<std::int64_t>(rows.size()), cols}, DType::kFloat32);
  const float* from = src.data_as<float>();
  float* to = out.data_as<float>();
  for (std::size_t r = 0; r < rows.size(); ++r)
    std::memcpy(to + static_cast<std::int64_t>(r) * cols, from + rows[r] * src.stride(0),
                static_cast<std::size_t>(cols) * sizeof(float));
  return out;
}

// The inverse: a zeroed float32 [n, cols] CPU tensor whose rows `rows` are src's rows in order.
Tensor scatter_rows(const Tensor& src, std::span<const std::int64_t> rows, std::int64_t n) {
  const std::int64_t cols = src.size(1);
  Tensor out = Tensor::empty({n, cols}, DType::kFloat32);
  std::memset(out.data(), 0, out.nbytes());
  const float* from = src.data_as<float>();
  float* to = out.data_as<float>();
  for (std::size_t r = 0; r < rows.size(); ++r)
    std::memcpy(to + rows[r] * cols, from + static_cast<std::int64_t>(r) * src.stride(0),
                static_cast<std::size_t>(cols) * sizeof(float));
  return out;
}

// Bytes `offset..` of an uploaded buffer seen as a contiguous tensor of `shape` and `dtype`.
Tensor view_bytes(const Tensor& bytes, std::size_t offset,
                  std::initializer_list<std::int64_t> shape, DType dtype) {
  return Tensor::from_storage(bytes.storage(), static_cast<std::uint8_t*>(bytes.data()) + offset,
                              Shape(shape.begin(), shape.size()), dtype, bytes.device());
}

// A step's inputs on the backend's device. On the CPU they stay where they are; on the GPU ids,
// position ids, cache positions and the mask bytes travel in one upload.
struct StepInputs {
  Tensor ids;             // [batch · q_len] int64
  Tensor position_ids;    // [batch, q_len] int64
  Tensor cache_position;  // [q_len] int64 (GPU only)
  Tensor mask;            // CPU: the caller's mask; GPU: uint8 [batch, kv_len], or undefined
};

template <class B>
StepInputs step_inputs(const Tensor& ids, const Tensor& position_ids,
                       std::span<const std::int64_t> cache_position, const Tensor& mask,
                       std::int64_t kv_len, const char* where) {
  if constexpr (B::kDevice == Device::kCpu) {
    (void)cache_position, (void)kv_len, (void)where;
    return {cpu::clone(ids), position_ids, Tensor(), mask};
  } else {
    const std::int64_t batch = ids.size(0), q_len = ids.size(1);
    const std::vector<std::uint8_t> bytes = mask_to_bytes(mask, batch, kv_len, where);
    // A mask of all ones is sent as none: the kernels then read no mask at all.
    const bool padded = std::find(bytes.begin(), bytes.end(), std::uint8_t{0}) != bytes.end();
    const std::size_t n_ids = static_cast<std::size_t>(batch * q_len);
    const std::size_t pos_at = 8 * n_ids, cp_at = pos_at + 8 * n_ids,
                      mask_at = cp_at + 8 * static_cast<std::size_t>(q_len);
    std::vector<std::uint8_t> host(mask_at + (padded ? bytes.size() : 0));
    const Tensor ids_c = cpu::clone(ids), pos_c = cpu::clone(position_ids);
    std::memcpy(host.data(), ids_c.data(), 8 * n_ids);
    std::memcpy(host.data() + pos_at, pos_c.data(), 8 * n_ids);
    std::memcpy(host.data() + cp_at, cache_position.data(), 8 * cache_position.size());
    if (padded) std::memcpy(host.data() + mask_at, bytes.data(), bytes.size());
    const Tensor up = cuda::upload(host.data(), host.size());
    return {view_bytes(up, 0, {batch * q_len}, DType::kInt64),
            view_bytes(up, pos_at, {batch, q_len}, DType::kInt64),
            view_bytes(up, cp_at, {q_len}, DType::kInt64),
            padded ? view_bytes(up, mask_at, {batch, kv_len}, DType::kUInt8) : Tensor()};
  }
}

// Several projections of one RMS-normed hidden state (q/k/v; gate/up). CPU: the norm, then
// cpu::linear_fused. GPU: one GEMM over the fused matrix with the norm made inside its kernel
// (few rows; more rows norm first), biases added per part, the parts handed back as column views
// of the one output.
template <class B>
std::vector<Tensor> project_normed(const Tensor& hidden, const Tensor& norm_weight, double eps,
                                   std::span<const cpu::Weight* const> weights,
                                   std::span<const Tensor* const> biases, const Tensor& fused) {
  if constexpr (B::kDevice == Device::kCpu) {
    (void)fused;
    return cpu::linear_fused(cpu::rms_norm(hidden, norm_weight, static_cast<float>(eps)), weights,
                             biases);
  } else {
    Tensor out = cuda::empty({hidden.size(0), fused.size(0)}, fused.dtype());
    cuda::linear_rms_norm(hidden, norm_weight, static_cast<float>(eps), fused, out);
    std::vector<Tensor> parts;
    std::int64_t c0 = 0;
    for (std::size_t i = 0; i < weights.size(); ++i) {
      const std::int64_t c1 = c0 + weights[i]->rows();
      parts.push_back(out.slice(1, c0, c1));
      if (biases[i]->defined()) cuda::add_bias(parts.back(), *biases[i]);
      c0 = c1;
    }
    return parts;
  }
}

// hidden += x · Wᵀ (+ bias): the residual add, inside the GEMM on the GPU.
template <class B>
void add_projection(const Tensor& hidden, const Tensor& x, const cpu::Weight& w,
                    const Tensor& bias) {
  if constexpr (B::kDevice == Device::kCpu) {
    cpu::add_inplace(hidden, cpu::linear(x, w, bias));
  } else {
    cuda::linear(x, w.dense(), hidden, 1.0f);
    if (bias.defined()) cuda::add_bias(hidden, bias);
  }
}

// hidden += (silu(gate) · up) · W_downᵀ (+ bias): on the GPU the SiLU gate is made inside the
// down projection's kernel when few rows run (decode), so the activation never goes to memory.
template <class B>
void add_mlp_down(const Tensor& hidden, const Tensor& gate, const Tensor& up,
                  const cpu::Weight& down, const Tensor& bias) {
  if constexpr (B::kDevice == Device::kCpu) {
    add_projection<B>(hidden, cpu::silu_mul(gate, up), down, bias);
  } else {
    cuda::linear_silu_mul(gate, up, down.dense(), hidden, 1.0f);
    if (bias.defined()) cuda::add_bias(hidden, bias);
  }
}

}  // namespace

LlamaModel LlamaModel::from_pretrained(const std::string& dir, LoadOptions options) {
  return detail::out_of_memory_as_error("LlamaModel::from_pretrained", [&]() -> LlamaModel {
    // Before any file is read: no GPU is a clear error, not minutes of loading first.
    if (options.device == Device::kCuda) cuda::require_device("LlamaModel::from_pretrained");
    if (dir.size() > 5 && dir.compare(dir.size() - 5, 5, ".gguf") == 0)
      return from_gguf(dir, options);
    try {
      ModelConfig config = ModelConfig::from_file(dir + "/config.json");
      const SafetensorsCheckpoint checkpoint = SafetensorsCheckpoint::open(dir);
      std::vector<std::pair<std::string, Tensor>> weights;
      for (const std::string& name : checkpoint.names())
        weights.emplace_back(name, checkpoint.tensor(name));
      return from_weights(std::move(config), weights, options);
    } catch (const std::bad_alloc&) {
      KVCACHE_FAIL("checkpoint ", dir, ": out of memory loading the model");
    }
  });
}

LlamaModel LlamaModel::from_weights(ModelConfig config,
                                    const std::vector<std::pair<std::string, Tensor>>& list,
                                    LoadOptions options) {
  return detail::out_of_memory_as_error("LlamaModel::from_weights", [&]() -> LlamaModel {
    return from_weights(std::move(config),
                        std::vector<std::pair<std::string, cpu::Weight>>(list.begin(), list.end()),
                        options);
  });
}

LlamaModel LlamaModel::from_weights(ModelConfig config,
                                    const std::vector<std::pair<std::string, cpu::Weight>>& list,
                                    LoadOptions options) {
  return detail::out_of_memory_as_error("LlamaModel::from_weights", [&]() -> LlamaModel {
    const std::string where = "LlamaModel(" + config.architecture + ")";
    // The loaders validate as they read; a config built by hand is held to the same rules, so zero
    // layers or a pad id past the vocabulary fail here, not in a forward pass.
    config.validate(where);
    KVCACHE_CHECK(!options.dtype || is_floating(*options.dtype), where,
                  ": expected a float weight dtype, got ", dtype_name(*options.dtype));
    KVCACHE_CHECK(!options.dtype || !options.quantize, where,
                  ": LoadOptions asks for both a dtype (", dtype_name(*options.dtype),
                  ") and quantization; choose one");
    KVCACHE_CHECK(options.device == Device::kCpu || !options.quantize, where,
                  ": LoadOptions::quantize is for the CPU; on cuda quantized files are held as "
                  "bfloat16");
    WeightMap weights(list.begin(), list.end());
    const bool on_gpu = options.device == Device::kCuda;
    if (on_gpu) cuda::require_device(where.c_str());
    const DType gpu_dtype = on_gpu ? gpu_weight_dtype(weights, options) : DType::kFloat32;
    detail::require_memory(options.device,
                           holding_bytes(weights, config, options, on_gpu, gpu_dtype), where,
                           "holding the weights", options.max_memory);
    // The holding of a matrix and of a vector on the chosen device.
    auto hold_m = [&](const cpu::Weight& w) -> cpu::Weight {
      return on_gpu ? cpu::Weight(gpu_matrix(w, gpu_dtype)) : hold_matrix(w, options);
    };
    auto hold_v = [&](const Tensor& t) {
      return on_gpu ? to_gpu(t, DType::kFloat32) : hold_vector(t);
    };
    const ModelConfig& c = config;
    const std::int64_t hidden = c.hidden_size, inter = c.intermediate_size, hd = c.head_dim;
    const std::int64_t q_out = c.num_attention_heads * hd, kv_out = c.num_key_value_heads * hd;

    LlamaModel model;
    model.device_ = options.device;
    model.kv_dtype_ = gpu_dtype;
    model.embed_tokens_ =
        hold_m(require_matrix(weights, "model.embed_tokens.weight", c.vocab_size, hidden, where));
    model.final_norm_ = hold_v(require_vector(weights, "model.norm.weight", hidden, where));
    if (c.tie_word_embeddings) {
      model.lm_head_ = model.embed_tokens_;
    } else {
      model.lm_head_ =
          hold_m(require_matrix(weights, "lm_head.weight", c.vocab_size, hidden, where));
    }
    for (std::int64_t l = 0; l < c.num_hidden_layers; ++l) {
      const std::string p = "model.layers." + std::to_string(l) + ".";
      // Matrices [rows, cols] in the requested dtype; vectors [n] in float32 when `wanted`.
      // On the GPU the matrices that get fused are only checked here; fuse_rows holds them.
      auto matrix = [&](const std::string& name, std::int64_t rows, std::int64_t cols,
                        bool fused = false) -> cpu::Weight {
        const cpu::Weight& w = require_matrix(weights, p + name, rows, cols, where);
        return on_gpu && fused ? w : hold_m(w);
      };
      auto vector = [&](const std::string& name, bool wanted, std::int64_t n) {
        if (!on_gpu) return optional_vector(weights, p + name, wanted, n, where);
        return wanted ? hold_v(require_vector(weights, p + name, n, where)) : Tensor();
      };
      Layer layer;
      layer.input_norm = vector("input_layernorm.weight", true, hidden);
      layer.post_norm = vector("post_attention_layernorm.weight", true, hidden);
      layer.q = matrix("self_attn.q_proj.weight", q_out, hidden, true);
      layer.k = matrix("self_attn.k_proj.weight", kv_out, hidden, true);
      layer.v = matrix("self_attn.v_proj.weight", kv_out, hidden, true);
      layer.o = matrix("self_attn.o_proj.weight", hidden, q_out);
      layer.q_bias = vector("self_attn.q_proj.bias", c.qkv_bias, q_out);
      layer.k_bias = vector("self_attn.k_proj.bias", c.qkv_bias, kv_out);
      layer.v_bias = vector("self_attn.v_proj.bias", c.qkv_bias, kv_out);
      layer.o_bias = vector("self_attn.o_proj.bias", c.o_bias, hidden);
      layer.gate = matrix("mlp.gate_proj.weight", inter, hidden, true);
      layer.up = matrix("mlp.up_proj.weight", inter, hidden, true);
      layer.down = matrix("mlp.down_proj.weight", hidden, inter);
      layer.gate_bias = vector("mlp.gate_proj.bias", c.mlp_bias, inter);
      layer.up_bias = vector("mlp.up_proj.bias", c.mlp_bias, inter);
      layer.down_bias = vector("mlp.down_proj.bias", c.mlp_bias, hidden);
      if (on_gpu) {
        cpu::Weight* qkv[] = {&layer.q, &layer.k, &layer.v};
        cpu::Weight* gate_up[] = {&layer.gate, &layer.up};
        layer.qkv_fused = fuse_rows(qkv, gpu_dtype);
        layer.gate_up_fused = fuse_rows(gate_up, gpu_dtype);
      }
      model.layers_.push_back(std::move(layer));
    }
    if (on_gpu) {
      const RotaryEmbedding rope(c.rope);
      Tensor inv_freq =
          Tensor::empty({static_cast<std::int64_t>(rope.inv_freq().size())}, DType::kFloat32);
      std::copy(rope.inv_freq().begin(), rope.inv_freq().end(), inv_freq.data_as<float>());
      model.inv_freq_ = cuda::to_device(inv_freq);
      cuda::synchronize();
    }
    model.config_ = std::move(config);
    return model;
  });
}

std::size_t LlamaModel::weight_bytes() const {
  std::size_t total = embed_tokens_.nbytes() + final_norm_.nbytes();
  if (lm_head_.data() != embed_tokens_.data()) total += lm_head_.nbytes();
  for (const Layer& l : layers_) {
    for (const cpu::Weight* w : {&l.q, &l.k, &l.v, &l.o, &l.gate, &l.up, &l.down})
      total += w->nbytes();
    for (const Tensor* t : {&l.input_norm, &l.post_norm, &l.q_bias, &l.k_bias, &l.v_bias, &l.o_bias,
                            &l.gate_bias, &l.up_bias, &l.down_bias}) {
      if (t->defined()) total += t->nbytes();
    }
  }
  return total;
}

Tensor LlamaModel::forward(const ForwardArgs& args) const {
  return detail::out_of_memory_as_error("LlamaModel::forward", [&]() -> Tensor {
    const CacheRef& given = args.past_key_values;
    KVCACHE_CHECK(!given || given.device() == device_, "LlamaModel::forward: expected a cache on ",
                  device_name(device_), " (the model's device), got a cache on ",
                  device_name(given.device()));
    if (device_ == Device::kCuda)
      return forward_on<cuda::Backend>(args, given.get<cuda::Backend>());
    return forward_on<cpu::Backend>(args, given.get<cpu::Backend>());
  });
}

template <class B>
Tensor LlamaModel::forward_on(const ForwardArgs& args, Cache<B>* given,
                              const detail::DecodeReplay* replay) const {
  const char* where = "LlamaModel::forward";
  const ModelConfig& c = config_;
  const Tensor& ids = args.input_ids;
  KVCACHE_CHECK(ids.defined() && ids.rank() == 2 && ids.dtype() == DType::kInt64 &&
                    ids.device() == Device::kCpu,
                where, ": expected input_ids [batch, q_len] int64 on the CPU, got ",
                ids.describe());
  const std::int64_t batch = ids.size(0), q_len = ids.size(1);
  KVCACHE_CHECK(batch > 0 && q_len > 0, where, ": expected at least one row and one token, got ",
                ids.shape_string());
  for (std::int64_t b = 0; b < batch; ++b)
    for (std::int64_t i = 0; i < q_len; ++i) {
      const std::int64_t id = ids.data_as<std::int64_t>()[ids.offset({b, i})];
      KVCACHE_CHECK(id >= 0 && id < c.vocab_size, where, ": expected token ids in [0, ",
                    c.vocab_size, ") (the vocabulary), got ", id, " at row ", b, ", position ", i);
    }

  DynamicCache<B> local_cache;
  Cache<B>* cache = given && args.use_cache ? given : &local_cache;
  // use_cache = false with a cache given: attend over a deep copy of it (of its own kind) and
  // leave it unchanged.
  std::unique_ptr<Cache<B>> peek_copy;
  if (given && !args.use_cache) {
    peek_copy = given->clone();
    cache = peek_copy.get();
  }
  const std::int64_t past = cache->get_seq_length(0);

  std::vector<std::int64_t> cache_position = args.cache_position;
  if (cache_position.empty()) cache_position = make_cache_position(past, q_len);
  KVCACHE_CHECK(static_cast<std::int64_t>(cache_position.size()) == q_len, where, ": expected ",
                q_len, " cache positions (one per input token), got ", cache_position.size());
  // Layers with a sliding window (Mistral; Qwen2's upper layers when enabled): the attention
  // applies the window over what each cache layer holds, on either backend. Checked for every
  // layer here, before layer 0 touches the cache: the cache must still hold the keys each layer's
  // queries see (a sliding cache layer under a full or wider-windowed layer cannot).
  // A cache that evicts by design (SinkCache) is exempt: it drops the middle on purpose.
  for (std::int64_t l = 0; l < c.num_hidden_layers && !cache->evicts_tokens(); ++l) {
    const std::optional<std::int64_t> window = c.layer_sliding_window(l);
    check_keys_held(cache_position,
                    cache->get_mask_sizes(cache_position, static_cast<int>(l)).kv_offset, window,
                    static_cast<int>(l), where);
  }
  Tensor mask =
      args.attention_mask.defined() ? args.attention_mask : ones_mask(batch, past + q_len);
  // Checked here, before layer 0 touches the cache: a step that fails halfway through the layers
  // would leave the first layers' caches a token longer than the rest.
  const std::vector<std::uint8_t> mask_bytes = mask_to_bytes(mask, batch, past + q_len, where);
  check_cache_position(cache_position, q_len, past + q_len, 0, where);
  Tensor position_ids = args.position_ids;
  if (!position_ids.defined()) {
    KVCACHE_CHECK(mask.rank() == 2 && mask.size(1) >= q_len, where,
                  ": expected attention_mask [batch, past + ", q_len, "], got ",
                  mask.shape_string());
    // A cache with positions of its own (SinkCache: each token's index in the cache, as
    // StreamingLLM gives them) decides them; every other cache takes them from the mask.
    const std::optional<std::int64_t> start = cache->rope_position_start(q_len, 0);
    if (start) {
      position_ids = Tensor::empty({batch, q_len}, DType::kInt64);
      auto* p = position_ids.data_as<std::int64_t>();  // [batch, q_len]
      for (std::int64_t b = 0; b < batch; ++b)
        for (std::int64_t i = 0; i < q_len; ++i) p[b * q_len + i] = *start + i;
    } else {
      position_ids = position_ids_from_attention_mask(mask, q_len);
    }
  }
  KVCACHE_CHECK(position_ids.device() == Device::kCpu && position_ids.dtype() == DType::kInt64 &&
                    position_ids.rank() == 2 && position_ids.size(0) == batch &&
                    position_ids.size(1) == q_len,
                where, ": expected position_ids [", batch, ", ", q_len, "] int64 on the CPU, got ",
                position_ids.describe());

  const std::int64_t heads = c.num_attention_heads, kv_heads = c.num_key_value_heads,
                     hd = c.head_dim, q_out = heads * hd, kv_out = kv_heads * hd;
  // On the GPU every intermediate of the pass comes from the thread's scratch workspace (no
  // allocator call once warm); the cache's storage and the returned logits do not.
  std::optional<cuda::ScratchScope> scratch;
  if constexpr (B::kDevice == Device::kCuda) scratch.emplace();
  if constexpr (B::kDevice == Device::kCpu) {
    KVCACHE_CHECK(replay == nullptr, where, ": a replayed decode step runs on the GPU only");
  } else if (replay) {
    KVCACHE_CHECK(q_len == 1 && replay->storage.size() == layers_.size() &&
                      replay->ids.numel() == batch && replay->logits.defined(),
                  where, ": expected a replayed step of one token per row over ", layers_.size(),
                  " layers");
  }
  const StepInputs in =
      replay ? StepInputs{replay->ids, replay->position_ids, replay->cache_position, replay->mask}
             : step_inputs<B>(ids, position_ids, cache_position, mask, past + q_len, where);
  const RotaryEmbedding rope(c.rope);
  // RoPE: cos/sin tables made once per step on the CPU; computed inside the kernel on the GPU.
  Tensor cos, sin;
  if constexpr (B::kDevice == Device::kCpu)
    std::tie(cos, sin) = rope.cos_sin(position_ids, DType::kFloat32);
  auto rotate = [&](const Tensor& x) {
    if constexpr (B::kDevice == Device::kCpu) {
      RotaryEmbedding::apply_rotary(x, cos, sin);
    } else {
      cuda::rope(x, in.position_ids, inv_freq_, rope.attention_scaling());
    }
  };
  Tensor hidden;  // [batch · q_len, hidden] float32: the residual stream
  // Left-padded prompts of different lengths (CPU): the residual stream, the projections and the
  // MLP hold only the tokens that are not leading padding (`real`), so a batch costs what its real
  // tokens cost; q, k and v go back to [batch · q_len] rows (padding rows zero) for the RoPE, the
  // cache and the attention, whose output comes back to the real rows. A padding position's
  // hidden state is then zero (its logits those of a zero state): transformers computes one for
  // it from attending to nothing, which no caller reads. The GPU runs every position.
  std::vector<std::int64_t> real;
  if constexpr (B::kDevice == Device::kCpu) {
    hidden = cpu::embedding(embed_tokens_, in.ids);
    if (!replay) real = unpadded_rows(mask_bytes, batch, past, q_len);
    if (!real.empty()) hidden = gather_rows(hidden, real);
  } else {
    hidden = cuda::embedding(embed_tokens_.dense(), in.ids);
  }
  // Back to [batch · q_len] rows where the stream holds the real tokens only.
  auto all_rows = [&](const Tensor& t) {
    return real.empty() ? t : scatter_rows(t, real, batch * q_len);
  };

  for (std::size_t l = 0; l < layers_.size(); ++l) {
    const Layer& w = layers_[l];
    // Projections come out [batch * q_len, heads * head_dim]; seen as [batch, heads, q_len, hd].
    const cpu::Weight* qkv[] = {&w.q, &w.k, &w.v};
    const Tensor* qkv_bias[] = {&w.q_bias, &w.k_bias, &w.v_bias};
    std::vector<Tensor> proj =
        project_normed<B>(hidden, w.input_norm, c.rms_norm_eps, qkv, qkv_bias, w.qkv_fused);
    for (Tensor& part : proj) part = all_rows(part);
    const Tensor q = split_heads(proj[0], batch, q_len, heads, hd);
    const Tensor k = split_heads(proj[1], batch, q_len, kv_heads, hd);
    const Tensor v = split_heads(proj[2], batch, q_len, kv_heads, hd);
    if constexpr (B::kDevice == Device::kCpu) {
      rotate(q);
      rotate(k);
    } else {
      // q and k are neighbouring column ranges of the one q|k|v output: one launch rotates both.
      const Tensor qk = Tensor::from_storage(
          proj[0].storage(), proj[0].data(),
          std::array<std::int64_t, 2>{batch * q_len, q_out + kv_out}, proj[0].dtype(),
          proj[0].device(), std::array<std::int64_t, 2>{proj[0].stride(0), 1});
      const Tensor qk_heads = split_heads(qk, batch, q_len, heads + kv_heads, hd);
      if (replay) {
        // A replayed step: k rotated straight into the cache slot read on the device, v beside
        // it (the cache's bookkeeping is the caller's: mark_appended after the replay).
        const auto& [key_storage, value_storage] = replay->storage[l];
        cuda::rope_append(qk_heads, kv_heads, key_storage, value_storage, v, in.position_ids,
                          inv_freq_, rope.attention_scaling(), replay->cache_position);
      } else {
        rotate(qk_heads);
      }
    }
    const Attention attention(
        static_cast<int>(l),
        {.num_heads = heads,
         .num_kv_heads = kv_heads,
         .head_dim = hd,
         .sliding_window = c.layer_sliding_window(static_cast<std::int64_t>(l))});
    Tensor attn;  // [batch, q_len, heads, hd]
    if constexpr (B::kDevice == Device::kCuda) {
      if (replay) {
        // The keys and values are in their slots (rope_append); attention reads kv_len on the
        // device.
        const auto& [key_storage, value_storage] = replay->storage[l];
        attn = cuda::empty({batch, q_len, heads, hd}, q.dtype());
        cuda::attention(q, key_storage, value_storage, replay->mask, replay->cache_position, 0,
                        attention.scale(), attn, replay->kv_len,
                        c.layer_sliding_window(static_cast<std::int64_t>(l)));
      }
    }
    if (!attn.defined()) {
      attn = attention.forward(q, k, v, *cache, in.mask, cache_position, in.cache_position);
    }
    Tensor attn_rows = attn.view({batch * q_len, heads * hd});
    if (!real.empty()) attn_rows = gather_rows(attn_rows, real);
    add_projection<B>(hidden, attn_rows, w.o, w.o_bias);

    const cpu::Weight* gate_up[] = {&w.gate, &w.up};
    const Tensor* gate_up_bias[] = {&w.gate_bias, &w.up_bias};
    const std::vector<Tensor> mlp = project_normed<B>(hidden, w.post_norm, c.rms_norm_eps, gate_up,
                                                      gate_up_bias, w.gate_up_fused);
    add_mlp_down<B>(hidden, mlp[0], mlp[1], w.down, w.down_bias);
  }

  hidden = all_rows(hidden);
  // The LM head only for the last `keep` positions of every row.
  const std::int64_t keep = args.logits_to_keep > 0 ? std::min(args.logits_to_keep, q_len) : q_len;
  Tensor last = B::empty(std::array<std::int64_t, 3>{batch, keep, c.hidden_size}, DType::kFloat32);
  B::copy(last, hidden.view({batch, q_len, c.hidden_size}).slice(1, q_len - keep, q_len));
  const Tensor rows = last.view({batch * keep, c.hidden_size});
  if constexpr (B::kDevice == Device::kCpu) {
    const Tensor normed = cpu::rms_norm(rows, final_norm_, static_cast<float>(c.rms_norm_eps));
    return cpu::linear(normed, lm_head_).view({batch, keep, c.vocab_size});
  } else {
    Tensor logits =
        replay ? replay->logits
               : cuda::empty_persistent(std::array<std::int64_t, 2>{batch * keep, c.vocab_size},
                                        DType::kFloat32);
    cuda::linear_rms_norm(rows, final_norm_, static_cast<float>(c.rms_norm_eps), lm_head_.dense(),
                          logits);
    return logits.view({batch, keep, c.vocab_size});
  }
}

// DecodeGraph (src/generation/decode_graph.cpp) runs the GPU body with a replay layout.
template Tensor LlamaModel::forward_on<cuda::Backend>(const ForwardArgs&, Cache<cuda::Backend>*,
                                                      const detail::DecodeReplay*) const;

std::vector<std::pair<std::string, Tensor>> random_llama_weights(const ModelConfig& c,
                                                                 std::uint64_t seed, DType dtype,
                                                                 float scale, Device device) {
  std::mt19937_64 rng(seed);
  std::uniform_real_distribution<float> dist(-scale, scale);
  std::vector<std::pair<std::string, Tensor>> out;
  std::uint64_t stream = seed;  // the GPU's fills: one counter-based stream per tensor
  auto add = [&](const std::string& name, std::initializer_list<std::int64_t> shape, float center) {
    if (device == Device::kCuda) {
      Tensor t = cuda::empty(shape, dtype);
      cuda::fill_uniform(t, ++stream, center - scale, center + scale);
      out.emplace_back(name, t);
      return;
    }
    Tensor t = Tensor::empty(shape, DType::kFloat32);
    for (std::int64_t i = 0; i < t.numel(); ++i) t.data_as<float>()[i] = center + dist(rng);
    out.emplace_back(name, dtype == DType::kFloat32 ? t : cpu::cast(t, dtype));
  };
  const std::int64_t h = c.hidden_size, inter = c.intermediate_size,
                     q_out = c.num_attention_heads * c.head_dim,
                     kv_out = c.num_key_value_heads * c.head_dim;
  add("model.embed_tokens.weight", {c.vocab_size, h}, 0.0f);
  add("model.norm.weight", {h}, 1.0f);
  if (!c.tie_word_embeddings) add("lm_head.weight", {c.vocab_size, h}, 0.0f);
  for (std::int64_t l = 0; l < c.num_hidden_layers; ++l) {
    const std::string p = "model.layers." + std::to_string(l) + ".";
    add(p + "input_layernorm.weight", {h}, 1.0f);
    add(p + "post_attention_layernorm.weight", {h}, 1.0f);
    add(p + "self_attn.q_proj.weight", {q_out, h}, 0.0f);
    add(p + "self_attn.k_proj.weight", {kv_out, h}, 0.0f);
    add(p + "self_attn.v_proj.weight", {kv_out, h}, 0.0f);
    add(p + "self_attn.o_proj.weight", {h, q_out}, 0.0f);
    if (c.qkv_bias) {
      add(p + "self_attn.q_proj.bias", {q_out}, 0.0f);
      add(p + "self_attn.k_proj.bias", {kv_out}, 0.0f);
      add(p + "self_attn.v_proj.bias", {kv_out}, 0.0f);
    }
    if (c.o_bias) add(p + "self_attn.o_proj.bias", {h}, 0.0f);
    add(p + "mlp.gate_proj.weight", {inter, h}, 0.0f);
    add(p + "mlp.up_proj.weight", {inter, h}, 0.0f);
    add(p + "mlp.down_proj.weight", {h, inter}, 0.0f);
    if (c.mlp_bias) {
      add(p + "mlp.gate_proj.bias", {inter}, 0.0f);
      add(p + "mlp.up_proj.bias", {inter}, 0.0f);
      add(p + "mlp.down_proj.bias", {h}, 0.0f);
    }
  }
  return out;
}

Tensor last_position(const Tensor& logits) {
  KVCACHE_CHECK(logits.defined() && logits.rank() == 3 && logits.size(1) > 0,
                "last_position: expected logits [batch, positions, vocab], got ",
                logits.describe());
  const Tensor last = logits.slice(1, logits.size(1) - 1, logits.size(1));
  const std::int64_t shape[2] = {logits.size(0), logits.size(2)};
  const std::int64_t strides[2] = {logits.stride(0), logits.stride(2)};
  return Tensor::from_storage(last.storage(), last.data(), shape, last.dtype(), last.device(),
                              strides);
}

std::vector<std::int64_t> argmax_last(const Tensor& logits) {
  KVCACHE_CHECK(logits.defined() && logits.rank() == 3 && logits.dtype() == DType::kFloat32 &&
                    logits.size(1) > 0,
                "argmax_last: expected logits [batch, positions, vocab] float32, got ",
                logits.describe());
  if (logits.device() == Device::kCuda) {
    const Tensor ids = cuda::to_host(cuda::argmax(last_position(logits)));
    return {ids.data_as<std::int64_t>(), ids.data_as<std::int64_t>() + ids.numel()};
  }
  std::vector<std::int64_t> out;
  const std::int64_t vocab = logits.size(2);
  for (std::int64_t b = 0; b < logits.size(0); ++b) {
    const float* row = logits.data_as<float>() + logits.offset({b, logits.size(1) - 1, 0});
    std::int64_t best = 0;
    for (std::int64_t i = 1; i < vocab; ++i) {
      if (row[i] > row[best]) best = i;  // first maximum, as torch.argmax
    }
    out.push_back(best);
  }
  return out;
}

}  // namespace kvcache
