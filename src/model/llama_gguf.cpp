// Llama-family models from GGUF files: metadata to ModelConfig, llama.cpp's tensor names to
// transformers', and the q/k row permutation llama.cpp's converter applies undone, so the model
// (and its rotate_half RoPE) sees exactly the weights transformers sees when it loads the file.
#include <cstdint>
#include <new>
#include <optional>
#include <span>
#include <string>
#include <utility>
#include <vector>

#include "../io_util.hpp"
#include "kvcache/backend/cpu.hpp"
#include "kvcache/error.hpp"
#include "kvcache/model/config.hpp"
#include "kvcache/model/gguf.hpp"
#include "kvcache/model/llama.hpp"

namespace kvcache {
namespace {

// llama.cpp's converter stores q (and k) rows of each head interleaved: GGUF row h·hd + 2i + j
// holds transformers' row h·hd + j·hd/2 + i. This puts them back.
// Row i of the result is row order[i] of the GGUF tensor.
std::vector<std::int64_t> unpermuted_order(std::int64_t rows, std::int64_t heads) {
  const std::int64_t hd = rows / heads, half = hd / 2;
  KVCACHE_CHECK(rows % heads == 0 && hd % 2 == 0, "GGUF: expected q/k rows divisible into ", heads,
                " heads of even size, got ", rows, " rows");
  std::vector<std::int64_t> order(static_cast<std::size_t>(rows));
  for (std::int64_t h = 0; h < heads; ++h)
    for (std::int64_t i = 0; i < half; ++i)
      for (std::int64_t j = 0; j < 2; ++j)
        order[static_cast<std::size_t>(h * hd + j * half + i)] = h * hd + 2 * i + j;
  return order;
}

// The block format a GGUF matrix type is held in as it is (Q4_0 aside: held as Q4_1).
std::optional<cpu::QuantFormat> held_format(GgufType type) {
  switch (type) {
    case GgufType::kQ8_0:
      return cpu::QuantFormat::kQ8_0;
    case GgufType::kQ4_1:
      return cpu::QuantFormat::kQ4_1;
    case GgufType::kQ5_0:
      return cpu::QuantFormat::kQ5_0;
    case GgufType::kQ5_1:
      return cpu::QuantFormat::kQ5_1;
    case GgufType::kQ4_K:
      return cpu::QuantFormat::kQ4_K;
    case GgufType::kQ5_K:
      return cpu::QuantFormat::kQ5_K;
    case GgufType::kQ6_K:
      return cpu::QuantFormat::kQ6_K;
    default:
      return std::nullopt;
  }
}

Tensor gather_rows(const Tensor& w, const std::vector<std::int64_t>& order) {
  Tensor out = Tensor::empty(w.shape(), w.dtype());
  for (std::size_t to = 0; to < order.size(); ++to) {
    const auto t = static_cast<std::int64_t>(to);
    cpu::copy(out.slice(0, t, t + 1), w.slice(0, order[to], order[to] + 1));
  }
  return out;
}

}  // namespace

ModelConfig ModelConfig::from_gguf(const GgufFile& f) {
  return detail::out_of_memory_as_error("ModelConfig::from_gguf", [&]() -> ModelConfig {
    const std::string where = f.path();
    const std::string arch = f.get_string("general.architecture").value_or("");
    KVCACHE_CHECK(arch == "llama", where, ": expected general.architecture 'llama', got '",
                  detail::show_text(arch), "' (other GGUF architectures are not supported yet)");
    auto need = [&](const std::string& key) {
      const auto v = f.get_int(key);
      KVCACHE_CHECK(v.has_value(), where, ": expected metadata key '", key, "'");
      return *v;
    };
    ModelConfig c;
    c.architecture = "LlamaForCausalLM";
    c.model_type = "llama";
    c.hidden_size = need("llama.embedding_length");
    c.intermediate_size = need("llama.feed_forward_length");
    c.num_hidden_layers = need("llama.block_count");
    c.num_attention_heads = need("llama.attention.head_count");
    c.num_key_value_heads =
        f.get_int("llama.attention.head_count_kv").value_or(c.num_attention_heads);
    c.max_position_embeddings = need("llama.context_length");
    KVCACHE_CHECK(c.num_attention_heads > 0 && c.num_key_value_heads > 0 &&
                      c.num_attention_heads % c.num_key_value_heads == 0 &&
                      c.hidden_size % c.num_attention_heads == 0,
                  where, ": expected head counts that divide, got ", c.num_attention_heads,
                  " heads, ", c.num_key_value_heads, " kv heads, hidden ", c.hidden_size);
    c.head_dim = f.get_int("llama.attention.key_length")
                     .value_or(f.get_int("llama.rope.dimension_count")
                                   .value_or(c.hidden_size / c.num_attention_heads));
    const auto tokens = f.get_string_array("tokenizer.ggml.tokens");
    c.vocab_size = f.get_int("llama.vocab_size").value_or(static_cast<std::int64_t>(tokens.size()));
    c.rms_norm_eps = f.get_float("llama.attention.layer_norm_rms_epsilon").value_or(1e-5);
    c.tie_word_embeddings = f.find_tensor("output.weight") == nullptr;
    c.rope.head_dim = c.head_dim;
    c.rope.rope_theta = f.get_float("llama.rope.freq_base").value_or(10000.0);
    const std::string scaling = f.get_string("llama.rope.scaling.type").value_or("none");
    if (scaling == "linear") {
      c.rope.scaling.type = RopeType::kLinear;
      c.rope.scaling.factor = f.get_float("llama.rope.scaling.factor").value_or(1.0);
    } else {
      KVCACHE_CHECK(scaling == "none", where, ": RoPE scaling type '", scaling,
                    "' is not supported yet");
    }
    KVCACHE_CHECK(
        f.find_tensor("rope_freqs.weight") == nullptr, where,
        ": per-frequency RoPE factors (rope_freqs.weight, llama3 scaling in GGUF) are not "
        "supported yet");
    c.bos_token_id = f.get_int("tokenizer.ggml.bos_token_id");
    if (const auto eos = f.get_int("tokenizer.ggml.eos_token_id")) c.eos_token_ids = {*eos};
    c.pad_token_id = f.get_int("tokenizer.ggml.padding_token_id");
    // A layer is nine tensors in the file (blk.N.*): a block_count the tensors cannot back is
    // refused here, before anything loops over it.
    const auto tensor_count = static_cast<std::int64_t>(f.tensors().size());
    KVCACHE_CHECK(c.num_hidden_layers <= tensor_count, "GGUF ", where,
                  ": llama.block_count = ", c.num_hidden_layers, " layers, but the file holds ",
                  tensor_count, " tensors (each layer needs its own blk.N.* tensors)");
    c.validate("GGUF " + where);
    for (std::int64_t l = 0; l < c.num_hidden_layers; ++l) {
      const std::string name = "blk." + std::to_string(l) + ".attn_norm.weight";
      KVCACHE_CHECK(f.find_tensor(name) != nullptr, "GGUF ", where,
                    ": llama.block_count = ", c.num_hidden_layers, ", but layer ", l,
                    " has no tensor '", name, "'");
    }
    return c;
  });
}

LlamaModel LlamaModel::from_gguf(const std::string& path, LoadOptions options) {
  return detail::out_of_memory_as_error("LlamaModel::from_gguf", [&]() -> LlamaModel {
    if (options.device == Device::kCuda) cuda::require_device("LlamaModel::from_gguf");
    const GgufFile file = GgufFile::open(path);
    ModelConfig config = ModelConfig::from_gguf(file);
    // Q8_0, Q4_1, Q5_0, Q5_1, Q4_K, Q5_K and Q6_K matrices are repacked as blocks the CPU kernels
    // read directly (the same bytes as the file; Q4_0 as Q4_1, exact, 20 bytes a block instead of
    // 18); from_weights dequantizes them if options ask for a dtype. Q5_0 is held as itself (22
    // bytes a block), not as the exact Q8_0 (34), since decode reads bytes. Q2_K, Q3_K and Q8_K
    // are dequantized exactly to float32 at load (no kernel reads their blocks yet).
    std::vector<std::pair<std::string, cpu::Weight>> weights;
    auto take = [&](const std::string& gguf_name, const std::string& name,
                    std::int64_t unpermute_heads = 0) {
      const GgufTensorInfo* info = file.find_tensor(gguf_name);
      if (info == nullptr) return;
      const bool matrix = info->ne.size() == 2;
      const std::span<const std::byte> bytes{file.data(*info),
                                             static_cast<std::size_t>(info->nbytes)};
      std::optional<cpu::QuantizedMatrix> blocks;
      if (const std::optional<cpu::QuantFormat> format = held_format(info->type);
          matrix && format) {
        blocks = cpu::QuantizedMatrix::from_ggml(*format, bytes, info->ne[1], info->ne[0]);
      } else if (matrix && info->type == GgufType::kQ4_0) {
        blocks = cpu::QuantizedMatrix::from_ggml_q4_0(bytes, info->ne[1], info->ne[0]);
      }
      if (blocks) {
        if (unpermute_heads > 0)
          blocks = blocks->gather_rows(unpermuted_order(blocks->rows(), unpermute_heads));
        weights.emplace_back(name, std::move(*blocks));
        return;
      }
      // F32 / F16 / BF16 are used in place from the mapping (from_weights converts or copies them
      // as options say); anything else, or data the file left misaligned, is read as float32.
      const bool plain = info->type == GgufType::kF32 || info->type == GgufType::kF16 ||
                         info->type == GgufType::kBF16;
      const std::size_t element = info->type == GgufType::kF32 ? 4 : 2;
      const bool aligned = reinterpret_cast<std::uintptr_t>(file.data(*info)) % element == 0;
      Tensor t = plain && aligned ? file.view(gguf_name) : file.to_float32(gguf_name);
      if (unpermute_heads > 0) t = gather_rows(t, unpermuted_order(t.size(0), unpermute_heads));
      weights.emplace_back(name, std::move(t));
    };
    // Any error reading one tensor (a rank or shape the model cannot use, a type not served) names
    // the file and the tensor.
    auto take_named = [&](const std::string& gguf_name, const std::string& name,
                          std::int64_t unpermute_heads = 0) {
      try {
        if (const GgufTensorInfo* info = file.find_tensor(gguf_name);
            info != nullptr && unpermute_heads > 0) {
          KVCACHE_CHECK(info->ne.size() == 2, "expected a matrix (2 dimensions) of ",
                        unpermute_heads, " heads' rows, got ", info->ne.size(), " dimensions");
        }
        take(gguf_name, name, unpermute_heads);
      } catch (const Error& e) {
        KVCACHE_FAIL("GGUF ", path, ": tensor '", gguf_name, "': ", e.what());
      }
    };
    take_named("token_embd.weight", "model.embed_tokens.weight");
    take_named("output_norm.weight", "model.norm.weight");
    take_named("output.weight", "lm_head.weight");
    for (std::int64_t l = 0; l < config.num_hidden_layers; ++l) {
      const std::string g = "blk." + std::to_string(l) + ".",
                        p = "model.layers." + std::to_string(l) + ".";
      take_named(g + "attn_norm.weight", p + "input_layernorm.weight");
      take_named(g + "ffn_norm.weight", p + "post_attention_layernorm.weight");
      take_named(g + "attn_q.weight", p + "self_attn.q_proj.weight", config.num_attention_heads);
      take_named(g + "attn_k.weight", p + "self_attn.k_proj.weight", config.num_key_value_heads);
      take_named(g + "attn_v.weight", p + "self_attn.v_proj.weight");
      take_named(g + "attn_output.weight", p + "self_attn.o_proj.weight");
      take_named(g + "ffn_gate.weight", p + "mlp.gate_proj.weight");
      take_named(g + "ffn_up.weight", p + "mlp.up_proj.weight");
      take_named(g + "ffn_down.weight", p + "mlp.down_proj.weight");
    }
    try {
      return from_weights(std::move(config), weights, options);
    } catch (const Error& e) {
      KVCACHE_FAIL("GGUF ", path, ": ", e.what());  // shape errors name transformers' tensor names
    } catch (const std::bad_alloc&) {
      KVCACHE_FAIL("GGUF ", path, ": out of memory holding the model's weights");
    }
  });
}

}  // namespace kvcache
