// Shared test helpers: random tensors (never zeros), element reads in float64, error matching.
#pragma once

#include <gtest/gtest.h>

#include <cmath>
#include <cstdint>
#include <random>
#include <string>
#include <vector>

#include "kvcache/kvcache.hpp"

namespace kvcache::testing {

/// Reads element `offset` (in elements) of a CPU tensor as double.
inline double element(const Tensor& t, std::int64_t offset) {
  const void* p = t.data();
  switch (t.dtype()) {
    case DType::kFloat32:
      return static_cast<const float*>(p)[offset];
    case DType::kFloat16:
      return fp16_to_float(static_cast<const float16*>(p)[offset]);
    case DType::kBFloat16:
      return bf16_to_float(static_cast<const bfloat16*>(p)[offset]);
    case DType::kInt32:
      return static_cast<const std::int32_t*>(p)[offset];
    case DType::kInt64:
      return static_cast<double>(static_cast<const std::int64_t*>(p)[offset]);
    case DType::kUInt8:
      return static_cast<const std::uint8_t*>(p)[offset];
  }
  return 0;
}

/// A rank-4 CPU tensor's elements in row-major order as doubles (any strides).
inline std::vector<double> to_doubles(const Tensor& t) {
  std::vector<double> out;
  out.reserve(static_cast<std::size_t>(t.numel()));
  std::int64_t dims[4] = {1, 1, 1, 1}, strides[4] = {0, 0, 0, 0};
  const int pad = 4 - t.rank();
  for (int i = 0; i < t.rank(); ++i) {
    dims[pad + i] = t.size(i);
    strides[pad + i] = t.stride(i);
  }
  for (std::int64_t a = 0; a < dims[0]; ++a)
    for (std::int64_t b = 0; b < dims[1]; ++b)
      for (std::int64_t c = 0; c < dims[2]; ++c)
        for (std::int64_t d = 0; d < dims[3]; ++d)
          out.push_back(
              element(t, a * strides[0] + b * strides[1] + c * strides[2] + d * strides[3]));
  return out;
}

/// A new CPU tensor of `dtype` with uniform random values in [-scale, scale), never all zero.
inline Tensor random_tensor(std::initializer_list<std::int64_t> shape, DType dtype,
                            std::mt19937& rng, float scale = 1.0f) {
  Tensor f = Tensor::empty(shape, DType::kFloat32);
  std::uniform_real_distribution<float> dist(-scale, scale);
  float* p = f.data_as<float>();
  for (std::int64_t i = 0; i < f.numel(); ++i) p[i] = dist(rng);
  return dtype == DType::kFloat32 ? f : cpu::cast(f, dtype);
}

/// Fills a tensor with NaN (float dtypes) so a kernel that skips an element is caught.
inline void poison(const Tensor& t) {
  Tensor nan = Tensor::empty(t.shape(), DType::kFloat32);
  std::fill_n(nan.data_as<float>(), nan.numel(), std::nanf(""));
  cpu::copy(t, nan);
}

struct ErrorStats {
  double max_abs = 0;
  double max_rel = 0;
};

/// Max absolute and relative (to max(|expected|, floor)) difference.
inline ErrorStats compare(const std::vector<double>& actual, const std::vector<double>& expected,
                          double floor = 1e-3) {
  ErrorStats s;
  EXPECT_EQ(actual.size(), expected.size());
  for (std::size_t i = 0; i < std::min(actual.size(), expected.size()); ++i) {
    const double diff = std::abs(actual[i] - expected[i]);
    if (std::isnan(actual[i]) || std::isnan(expected[i])) {
      s.max_abs = s.max_rel = INFINITY;
      continue;
    }
    s.max_abs = std::max(s.max_abs, diff);
    s.max_rel = std::max(s.max_rel, diff / std::max(std::abs(expected[i]), floor));
  }
  return s;
}

/// The message of the kvcache::Error `f` throws; a test failure (and an empty message) when it
/// throws another exception type or nothing, so a check on the message cannot pass by accident.
template <class F>
std::string error_of(F&& f) {
  try {
    f();
  } catch (const Error& e) {
    return e.what();
  } catch (const std::exception& e) {
    ADD_FAILURE() << "expected kvcache::Error, got another exception: " << e.what();
    return {};
  }
  ADD_FAILURE() << "expected kvcache::Error, got none";
  return {};
}

/// Expects `statement` to throw kvcache::Error whose message contains `needle`.
#define EXPECT_KVCACHE_ERROR(statement, needle)                                     \
  do {                                                                              \
    try {                                                                           \
      statement;                                                                    \
      ADD_FAILURE() << "expected kvcache::Error containing \"" << (needle) << "\""; \
    } catch (const ::kvcache::Error& e) {                                           \
      EXPECT_NE(std::string(e.what()).find(needle), std::string::npos) << e.what(); \
    }                                                                               \
  } while (false)

/// The tests' tiny Llama-family config: vocab 97, hidden 32, ffn 48, 2 layers, 4 heads / 2 kv
/// heads of 16; Qwen2 gets its q/k/v biases.
inline ModelConfig tiny_llama_config(const std::string& arch = "LlamaForCausalLM") {
  ModelConfig c;
  c.architecture = arch;
  c.vocab_size = 97;
  c.hidden_size = 32;
  c.intermediate_size = 48;
  c.num_hidden_layers = 2;
  c.num_attention_heads = 4;
  c.num_key_value_heads = 2;
  c.head_dim = 16;
  c.max_position_embeddings = 256;
  c.rms_norm_eps = 1e-5;
  c.qkv_bias = arch == "Qwen2ForCausalLM";
  c.rope = {.head_dim = 16, .rope_theta = 10000.0};
  return c;
}

}  // namespace kvcache::testing
