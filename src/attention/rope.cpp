// RoPE: inverse frequencies (default, linear, llama3), cos/sin tables and the rotation itself.
// The arithmetic follows transformers' float32 order so float32 runs match it to rounding.
#include "kvcache/attention/rope.hpp"

#include <cmath>
#include <numbers>

#include "kvcache/backend/cpu.hpp"
#include "kvcache/error.hpp"

namespace kvcache {

RopeType parse_rope_type(std::string_view name) {
  if (name == "default") return RopeType::kDefault;
  if (name == "linear") return RopeType::kLinear;
  if (name == "llama3") return RopeType::kLlama3;
  KVCACHE_FAIL("RoPE: expected rope_type default, linear or llama3, got '", name,
               "', which kvcache does not implement yet");
}

std::string_view rope_type_name(RopeType type) {
  switch (type) {
    case RopeType::kDefault:
      return "default";
    case RopeType::kLinear:
      return "linear";
    case RopeType::kLlama3:
      return "llama3";
  }
  return "?";
}

RotaryEmbedding::RotaryEmbedding(RopeOptions options) : options_(options) {
  const std::int64_t dim = options.head_dim;
  KVCACHE_CHECK(dim > 0 && dim % 2 == 0, "RotaryEmbedding: expected an even head_dim > 0, got ",
                dim);
  KVCACHE_CHECK(options.rope_theta > 0, "RotaryEmbedding: expected rope_theta > 0, got ",
                options.rope_theta);
  const RopeScaling& s = options.scaling;
  if (s.type != RopeType::kDefault) {
    KVCACHE_CHECK(s.factor > 0, "RotaryEmbedding: expected a ", rope_type_name(s.type),
                  " scaling factor > 0, got ", s.factor);
  }
  // transformers: 1.0 / (base ** (arange(0, dim, 2).float() / dim)), all float32.
  const auto base = static_cast<float>(options.rope_theta);
  inv_freq_.resize(static_cast<std::size_t>(dim / 2));
  for (std::int64_t k = 0; k < dim / 2; ++k) {
    const float exponent = static_cast<float>(2 * k) / static_cast<float>(dim);
    inv_freq_[static_cast<std::size_t>(k)] = 1.0f / std::pow(base, exponent);
  }
  if (s.type == RopeType::kLinear) {
    for (float& f : inv_freq_) f /= static_cast<float>(s.factor);
  } else if (s.type == RopeType::kLlama3) {
    KVCACHE_CHECK(
        s.high_freq_factor != s.low_freq_factor && s.low_freq_factor > 0 &&
            s.original_max_position_embeddings > 0,
        "RotaryEmbedding: expected llama3 scaling with low_freq_factor > 0, high_freq_factor != "
        "low_freq_factor and original_max_position_embeddings > 0, got ",
        s.low_freq_factor, ", ", s.high_freq_factor, ", ", s.original_max_position_embeddings);
    // Long wavelengths are divided by factor, short ones kept, the band between interpolated.
    const double old_len = static_cast<double>(s.original_max_position_embeddings);
    const double low_freq_wavelen = old_len / s.low_freq_factor;
    const double high_freq_wavelen = old_len / s.high_freq_factor;
    const auto factor = static_cast<float>(s.factor);
    for (float& f : inv_freq_) {
      const float wavelen = 2.0f * std::numbers::pi_v<float> / f;
      float scaled = wavelen > low_freq_wavelen ? f / factor : f;
      const bool medium = !(wavelen < high_freq_wavelen) && !(wavelen > low_freq_wavelen);
      if (medium) {
        const float smooth =
            (static_cast<float>(old_len) / wavelen - static_cast<float>(s.low_freq_factor)) /
            static_cast<float>(s.high_freq_factor - s.low_freq_factor);
        scaled = (1.0f - smooth) * scaled / factor + smooth * scaled;
      }
      f = scaled;
    }
  }
}

namespace {

void check_position_ids(const Tensor& position_ids, const char* where) {
  KVCACHE_CHECK(position_ids.defined() && position_ids.rank() == 2 &&
                    position_ids.dtype() == DType::kInt64 && position_ids.device() == Device::kCpu,
                where, ": expected position_ids [batch, q_len] int64 on the CPU, got ",
                position_ids.describe());
}

template <class T>
void rotate(const Tensor& x, const Tensor& cos, const Tensor& sin) {
  const std::int64_t batch = x.size(0), heads = x.size(1), q_len = x.size(2), d = x.size(3),
                     half = d / 2;
  T* xb = x.data_as<T>();
  const T* cb = cos.data_as<T>();
  const T* sb = sin.data_as<T>();
  // Rounding each product and the sum to T mirrors torch's elementwise ops in T.
  auto round = [](float v) { return to_float(from_float<T>(v)); };
  for (std::int64_t b = 0; b < batch; ++b)
    for (std::int64_t h = 0; h < heads; ++h)
      for (std::int64_t i = 0; i < q_len; ++i) {
        T* row = xb + b * x.stride(0) + h * x.stride(1) + i * x.stride(2);
        const T* c = cb + b * cos.stride(0) + i * cos.stride(1);
        const T* s = sb + b * sin.stride(0) + i * sin.stride(1);
        const std::int64_t xs = x.stride(3), cs = cos.stride(2), ss = sin.stride(2);
        for (std::int64_t k = 0; k < half; ++k) {
          const float x1 = to_float(row[k * xs]);
          const float x2 = to_float(row[(k + half) * xs]);
          const float first =
              round(round(x1 * to_float(c[k * cs])) + round(-x2 * to_float(s[k * ss])));
          const float second = round(round(x2 * to_float(c[(k + half) * cs])) +
                                     round(x1 * to_float(s[(k + half) * ss])));
          row[k * xs] = from_float<T>(first);
          row[(k + half) * xs] = from_float<T>(second);
        }
      }
}

}  // namespace

std::pair<Tensor, Tensor> RotaryEmbedding::cos_sin(const Tensor& position_ids, DType dtype) const {
  check_position_ids(position_ids, "RotaryEmbedding::cos_sin");
  KVCACHE_CHECK(is_floating(dtype), "RotaryEmbedding::cos_sin: expected a float dtype, got ",
                dtype_name(dtype));
  const std::int64_t batch = position_ids.size(0), q_len = position_ids.size(1),
                     d = options_.head_dim, half = d / 2;
  Tensor cos = Tensor::empty({batch, q_len, d}, DType::kFloat32);
  Tensor sin = Tensor::empty({batch, q_len, d}, DType::kFloat32);
  const std::int64_t* pos = position_ids.data_as<std::int64_t>();
  float* c = cos.data_as<float>();
  float* s = sin.data_as<float>();
  for (std::int64_t b = 0; b < batch; ++b)
    for (std::int64_t i = 0; i < q_len; ++i) {
      const auto p =
          static_cast<float>(pos[b * position_ids.stride(0) + i * position_ids.stride(1)]);
      float* crow = c + (b * q_len + i) * d;
      float* srow = s + (b * q_len + i) * d;
      for (std::int64_t k = 0; k < half; ++k) {
        const float angle = inv_freq_[static_cast<std::size_t>(k)] * p;
        crow[k] = crow[k + half] = std::cos(angle) * attention_scaling_;
        srow[k] = srow[k + half] = std::sin(angle) * attention_scaling_;
      }
    }
  if (dtype == DType::kFloat32) return {cos, sin};
  return {cpu::cast(cos, dtype), cpu::cast(sin, dtype)};
}

void RotaryEmbedding::apply_rotary(const Tensor& x, const Tensor& cos, const Tensor& sin) {
  const char* where = "RotaryEmbedding::apply_rotary";
  KVCACHE_CHECK(
      x.defined() && x.rank() == 4 && x.device() == Device::kCpu && is_floating(x.dtype()), where,
      ": expected x [batch, heads, q_len, head_dim] float on the CPU, got ", x.describe());
  KVCACHE_CHECK(x.size(3) % 2 == 0, where, ": expected an even head_dim, got ", x.size(3));
  for (const Tensor* t : {&cos, &sin}) {
    KVCACHE_CHECK(t->defined() && t->rank() == 3 && t->size(0) == x.size(0) &&
                      t->size(1) == x.size(2) && t->size(2) == x.size(3) &&
                      t->dtype() == x.dtype() && t->device() == Device::kCpu,
                  where, ": expected cos/sin [", x.size(0), ", ", x.size(2), ", ", x.size(3), "] ",
                  dtype_name(x.dtype()), " cpu, got ", t->describe());
  }
  switch (x.dtype()) {
    case DType::kFloat32:
      return rotate<float>(x, cos, sin);
    case DType::kFloat16:
      return rotate<float16>(x, cos, sin);
    case DType::kBFloat16:
      return rotate<bfloat16>(x, cos, sin);
    default:
      break;
  }
}

void RotaryEmbedding::apply(const Tensor& x, const Tensor& position_ids) const {
  KVCACHE_CHECK(x.defined() && x.rank() == 4 && x.size(3) == options_.head_dim,
                "RotaryEmbedding::apply: expected x [batch, heads, q_len, ", options_.head_dim,
                "], got ", x.describe());
  check_position_ids(position_ids, "RotaryEmbedding::apply");
  KVCACHE_CHECK(position_ids.size(0) == x.size(0) && position_ids.size(1) == x.size(2),
                "RotaryEmbedding::apply: expected position_ids [", x.size(0), ", ", x.size(2),
                "], got ", position_ids.shape_string());
  auto [cos, sin] = cos_sin(position_ids, x.dtype());
  apply_rotary(x, cos, sin);
}

Tensor position_ids_from_attention_mask(const Tensor& attention_mask, std::int64_t q_len) {
  KVCACHE_CHECK(
      attention_mask.defined() && attention_mask.rank() == 2 &&
          attention_mask.device() == Device::kCpu,
      "position_ids_from_attention_mask: expected a [batch, length] mask on the CPU, got ",
      attention_mask.describe());
  const std::int64_t batch = attention_mask.size(0), length = attention_mask.size(1);
  KVCACHE_CHECK(q_len <= length, "position_ids_from_attention_mask: expected q_len <= ", length,
                " (the mask length), got ", q_len);
  const std::int64_t keep = q_len < 0 ? length : q_len;
  const Tensor mask = cpu::cast(attention_mask, DType::kInt64);
  const std::int64_t* m = mask.data_as<std::int64_t>();
  Tensor out = Tensor::empty({batch, keep}, DType::kInt64);
  std::int64_t* o = out.data_as<std::int64_t>();
  for (std::int64_t b = 0; b < batch; ++b) {
    std::int64_t running = 0;
    for (std::int64_t j = 0; j < length; ++j) {
      running += m[b * length + j];
      const std::int64_t pos = m[b * length + j] == 0 ? 1 : running - 1;
      if (j >= length - keep) o[b * keep + (j - (length - keep))] = pos;
    }
  }
  return out;
}

Tensor next_position_ids(const Tensor& position_ids) {
  KVCACHE_CHECK(
      position_ids.defined() && position_ids.rank() == 2 && position_ids.size(1) > 0 &&
          position_ids.dtype() == DType::kInt64 && position_ids.device() == Device::kCpu,
      "next_position_ids: expected position_ids [batch, q_len >= 1] int64 on the CPU, got ",
      position_ids.describe());
  const std::int64_t batch = position_ids.size(0);
  Tensor out = Tensor::empty({batch, 1}, DType::kInt64);
  const std::int64_t* p = position_ids.data_as<std::int64_t>();
  for (std::int64_t b = 0; b < batch; ++b) {
    out.data_as<std::int64_t>()[b] =
        p[b * position_ids.stride(0) + (position_ids.size(1) - 1) * position_ids.stride(1)] + 1;
  }
  return out;
}

}  // namespace kvcache
