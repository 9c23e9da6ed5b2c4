// The GGUF types beyond Q8_0 / Q4_0 / Q4_1: Q5_0, Q5_1 and the K-quants (Q2_K … Q6_K, Q8_K).
// tests/data/gguf/quant_types.gguf (tools/make_quant_type_fixtures.py) holds random blocks of each
// type beside the values gguf-py's quants.py dequantizes them to; kvcache must give the same
// floats bit for bit. tiny_q4_k_m.gguf, a one-layer llama mixing those types the way a llama.cpp
// "Q4_K_M" file does, must load and run, held as blocks where a kernel reads them (Q5_0 as Q8_0)
// and as float32 otherwise.
#include <gtest/gtest.h>

#include <bit>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <string>
#include <utility>
#include <vector>

#include "kvcache/backend/quantized.hpp"
#include "kvcache/generation/generate.hpp"
#include "kvcache/model/gguf.hpp"
#include "kvcache/model/llama.hpp"

namespace kvcache {
namespace {

const std::string kDir = std::string(KVCACHE_TEST_DATA_DIR) + "/gguf";
constexpr const char* kTypes[] = {"Q5_0", "Q5_1", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "Q8_K"};

// Elements whose bits differ.
std::size_t bit_mismatches(const float* a, const float* b, std::size_t n) {
  std::size_t count = 0;
  for (std::size_t i = 0; i < n; ++i)
    count += std::bit_cast<std::uint32_t>(a[i]) != std::bit_cast<std::uint32_t>(b[i]);
  return count;
}

TEST(GgufQuantTypes, DequantizeBitForBitAsGgufPy) {
  const GgufFile file = GgufFile::open(kDir + "/quant_types.gguf");
  for (const char* type : kTypes) {
    SCOPED_TRACE(type);
    const GgufTensorInfo* info = file.find_tensor(type);
    ASSERT_NE(info, nullptr);
    EXPECT_EQ(gguf_type_name(info->type), type);
    const Tensor got = file.to_float32(type);
    const Tensor want = file.to_float32(std::string(type) + ".expected");
    ASSERT_EQ(got.shape_string(), want.shape_string());
    ASSERT_EQ(got.numel(), 3 * 512);
    EXPECT_EQ(bit_mismatches(got.data_as<float>(), want.data_as<float>(),
                             static_cast<std::size_t>(got.numel())),
              0u);
    // Not all zeros or one value: the blocks are random, so the check above means something.
    std::size_t distinct_from_first = 0;
    for (std::int64_t i = 1; i < got.numel(); ++i)
      distinct_from_first += got.data_as<float>()[i] != got.data_as<float>()[0];
    EXPECT_GT(distinct_from_first, 1000u);
    // One row through dequantize_row gives the same floats.
    const std::uint64_t row_bytes = gguf_type_bytes(info->type, 512);
    std::vector<float> row(512);
    dequantize_row(info->type, file.data(*info) + row_bytes, row.data(), 512);
    EXPECT_EQ(bit_mismatches(row.data(), want.data_as<float>() + 512, 512), 0u);
  }
}

TEST(GgufQuantTypes, PartialBlocksAreRefused) {
  const GgufFile file = GgufFile::open(kDir + "/quant_types.gguf");
  const GgufTensorInfo* info = file.find_tensor("Q4_K");
  ASSERT_NE(info, nullptr);
  std::vector<float> out(512);
  EXPECT_THROW(dequantize_row(GgufType::kQ4_K, file.data(*info), out.data(), 100), Error);
  EXPECT_THROW(dequantize_row(GgufType::kQ5_0, file.data(*info), out.data(), 48), Error);
}

TEST(GgufQuantTypes, HeldBlocksKeepEveryValue) {
  // Each type a kernel reads, repacked from the file's blocks, dequantizes bit for bit as the
  // GGUF reader does (which is checked against the gguf package above).
  const GgufFile file = GgufFile::open(kDir + "/quant_types.gguf");
  const std::pair<const char*, cpu::QuantFormat> held[] = {{"Q5_0", cpu::QuantFormat::kQ5_0},
                                                           {"Q5_1", cpu::QuantFormat::kQ5_1},
                                                           {"Q4_K", cpu::QuantFormat::kQ4_K},
                                                           {"Q5_K", cpu::QuantFormat::kQ5_K},
                                                           {"Q6_K", cpu::QuantFormat::kQ6_K}};
  for (const auto& [name, format] : held) {
    const GgufTensorInfo* info = file.find_tensor(name);
    ASSERT_NE(info, nullptr) << name;
    const std::span<const std::byte> bytes{file.data(*info),
                                           static_cast<std::size_t>(info->nbytes)};
    const cpu::QuantizedMatrix m = cpu::QuantizedMatrix::from_ggml(format, bytes, 3, 512);
    EXPECT_EQ(m.nbytes(), bytes.size()) << name;
    const Tensor held_values = m.dequantize();
    const Tensor want = file.to_float32(std::string(name) + ".expected");
    ASSERT_EQ(held_values.numel(), want.numel()) << name;
    EXPECT_EQ(bit_mismatches(held_values.data_as<float>(), want.data_as<float>(), 3 * 512), 0u)
        << name;
  }
}

TEST(GgufQuantTypes, Q5_0HeldAsQ8_0KeepsEveryValue) {
  const GgufFile file = GgufFile::open(kDir + "/quant_types.gguf");
  const GgufTensorInfo* info = file.find_tensor("Q5_0");
  ASSERT_NE(info, nullptr);
  const std::span<const std::byte> bytes{file.data(*info), static_cast<std::size_t>(info->nbytes)};
  const cpu::QuantizedMatrix m = cpu::QuantizedMatrix::from_ggml_q5_0(bytes, 3, 512);
  EXPECT_EQ(m.format(), cpu::QuantFormat::kQ8_0);
  const Tensor held = m.dequantize();
  const Tensor want = file.to_float32("Q5_0.expected");
  ASSERT_EQ(held.numel(), want.numel());
  EXPECT_EQ(bit_mismatches(held.data_as<float>(), want.data_as<float>(), 3 * 512), 0u);
  EXPECT_THROW(cpu::QuantizedMatrix::from_ggml_q5_0(bytes.first(bytes.size() - 1), 3, 512), Error);
  EXPECT_THROW(cpu::QuantizedMatrix::from_ggml_q5_0(bytes, 3, 500), Error);
}

TEST(GgufQuantTypes, AMixedKQuantModelLoadsAndRuns) {
  const std::string path = kDir + "/tiny_q4_k_m.gguf";
  const LlamaModel blocks = LlamaModel::from_gguf(path);
  const LlamaModel exact = LlamaModel::from_gguf(path, {.dtype = DType::kFloat32});
  const ModelConfig& c = blocks.config();
  EXPECT_EQ(c.hidden_size, 256);
  EXPECT_EQ(c.num_hidden_layers, 1);
  EXPECT_EQ(c.vocab_size, 320);
  EXPECT_FALSE(c.tie_word_embeddings);
  // Q8_0, Q5_0, Q5_1, Q4_K, Q5_K and Q6_K stay blocks in the default holding (Q2_K and Q3_K
  // are float32 in both).
  EXPECT_LT(blocks.weight_bytes(), exact.weight_bytes());

  Tensor ids = Tensor::empty({1, 6}, DType::kInt64);
  for (std::int64_t i = 0; i < 6; ++i) ids.data_as<std::int64_t>()[i] = (37 * i + 5) % 320;
  const Tensor a = blocks.forward({.input_ids = ids});
  const Tensor b = exact.forward({.input_ids = ids});
  ASSERT_EQ(a.shape_string(), "[1, 6, 320]");
  ASSERT_EQ(b.shape_string(), "[1, 6, 320]");
  // The block kernels round activations to int8 per block, so the two holdings agree closely, not
  // exactly; both are finite and neither is all zeros. Six tokens run the decode kernels (up to
  // quantized_decode_rows() rows); one token more per call below runs them for a decode step.
  double max_diff = 0, max_abs = 0;
  for (std::int64_t i = 0; i < a.numel(); ++i) {
    const float x = a.data_as<float>()[i], y = b.data_as<float>()[i];
    ASSERT_TRUE(std::isfinite(x) && std::isfinite(y)) << "at " << i;
    max_diff = std::max(max_diff, static_cast<double>(std::fabs(x - y)));
    max_abs = std::max(max_abs, static_cast<double>(std::fabs(y)));
  }
  EXPECT_GT(max_abs, 0.0);
  EXPECT_LT(max_diff, 0.05 * max_abs);

  // Every format the file mixes, held as blocks, against the float32 dequantization of the same
  // blocks: one decode row through each kernel (Q6_K, Q4_K, Q5_K, Q5_0, Q5_1, Q8_0).
  Tensor one = Tensor::empty({1, 1}, DType::kInt64);
  one.data_as<std::int64_t>()[0] = ids.data_as<std::int64_t>()[0];
  const Tensor a1 = blocks.forward({.input_ids = one});
  const Tensor b1 = exact.forward({.input_ids = one});
  double diff1 = 0, abs1 = 0;
  for (std::int64_t i = 0; i < a1.numel(); ++i) {
    diff1 = std::max(
        diff1, static_cast<double>(std::fabs(a1.data_as<float>()[i] - b1.data_as<float>()[i])));
    abs1 = std::max(abs1, static_cast<double>(std::fabs(b1.data_as<float>()[i])));
  }
  EXPECT_GT(abs1, 0.0);
  EXPECT_LT(diff1, 0.05 * abs1);

  const GenerateResult r = generate(exact, ids, Tensor(), {.max_new_tokens = 8});
  ASSERT_EQ(r.new_tokens.size(), 1u);
  EXPECT_EQ(r.new_tokens[0].size(), 8u);
  for (std::int64_t t : r.new_tokens[0]) EXPECT_TRUE(t >= 0 && t < 320);
}

}  // namespace
}  // namespace kvcache
