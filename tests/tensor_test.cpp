// Tensor views, ownership, copies between dtypes and the 16-bit conversions.
#include "kvcache/tensor.hpp"

#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <random>

#include "test_util.hpp"

namespace kvcache {
namespace {

using testing::to_doubles;

TEST(Tensor, EmptyIsContiguousAndOwning) {
  Tensor t = Tensor::empty({2, 3, 4, 5}, DType::kBFloat16);
  EXPECT_TRUE(t.defined());
  EXPECT_EQ(t.rank(), 4);
  EXPECT_EQ(t.numel(), 120);
  EXPECT_EQ(t.nbytes(), 240u);
  EXPECT_TRUE(t.is_contiguous());
  EXPECT_TRUE(t.owns_storage());
  EXPECT_EQ(t.stride(0), 60);
  EXPECT_EQ(t.stride(-1), 1);
  EXPECT_EQ(reinterpret_cast<std::uintptr_t>(t.data()) % 64, 0u);
  EXPECT_FALSE(Tensor().defined());
}

TEST(Tensor, FromBlobBorrowsCallerMemory) {
  std::vector<float> buffer(24);
  for (std::size_t i = 0; i < buffer.size(); ++i) buffer[i] = static_cast<float>(i);
  Tensor t = Tensor::from_blob(buffer.data(), {2, 3, 4}, DType::kFloat32);
  EXPECT_FALSE(t.owns_storage());
  EXPECT_EQ(t.data(), buffer.data());
  buffer[5] = 100.0f;
  EXPECT_EQ(t.data_as<float>()[5], 100.0f);
}

TEST(Tensor, SliceAndTransposeAreViews) {
  std::vector<float> buffer(2 * 3 * 4);
  for (std::size_t i = 0; i < buffer.size(); ++i) buffer[i] = static_cast<float>(i);
  Tensor t = Tensor::from_blob(buffer.data(), {2, 3, 4}, DType::kFloat32);
  Tensor s = t.slice(1, 1, 3);
  EXPECT_EQ(s.size(1), 2);
  EXPECT_FALSE(s.is_contiguous());
  EXPECT_EQ(to_doubles(s)[0], 4.0);  // element [0, 1, 0]
  Tensor tr = t.transpose(0, 2);
  EXPECT_EQ(tr.size(0), 4);
  EXPECT_EQ(tr.stride(0), 1);
  EXPECT_EQ(testing::element(tr, tr.offset({3, 2, 1})), buffer[1 * 12 + 2 * 4 + 3]);
}

TEST(Tensor, ViewNeedsContiguity) {
  Tensor t = Tensor::zeros({2, 6}, DType::kFloat32);
  EXPECT_EQ(t.view({3, 4}).size(0), 3);
  EXPECT_KVCACHE_ERROR(t.view({5, 2}), "expected a shape of 12 elements, got 10");
  EXPECT_KVCACHE_ERROR(t.transpose(0, 1).view({12}), "expected a contiguous tensor");
}

TEST(Tensor, BadArgumentsAreErrors) {
  Tensor t = Tensor::zeros({2, 3}, DType::kFloat32);
  EXPECT_KVCACHE_ERROR(t.slice(1, 2, 5), "expected 0 <= start <= end <= 3");
  EXPECT_KVCACHE_ERROR(t.size(2), "dimension 2 out of range for a tensor of rank 2");
  EXPECT_KVCACHE_ERROR(t.data_as<bfloat16>(), "expected dtype bfloat16, got float32");
  EXPECT_KVCACHE_ERROR(Tensor::empty({1, 2, 3, 4, 5}, DType::kFloat32),
                       "expected rank <= 4, got rank 5");
  EXPECT_KVCACHE_ERROR(Tensor::empty({2, -1}, DType::kFloat32), "expected non-negative sizes");
  EXPECT_KVCACHE_ERROR(Tensor::from_blob(nullptr, {2}, DType::kFloat32), "null data pointer");
  EXPECT_KVCACHE_ERROR(parse_dtype("float64"), "got 'float64'");
  EXPECT_EQ(parse_dtype("bf16"), DType::kBFloat16);
}

TEST(Float16, RoundTripsAndRounds) {
  // Values exactly representable in both formats survive.
  for (float x :
       {0.0f, -0.0f, 1.0f, -2.5f, 0.15625f, 65504.0f, 6.103515625e-05f, 5.9604644775390625e-08f}) {
    EXPECT_EQ(fp16_to_float(float_to_fp16(x)), x) << x;
  }
  for (float x : {0.0f, 1.0f, -3.0f, std::ldexp(1.5f, 100), -std::ldexp(1.25f, -64)})
    EXPECT_EQ(bf16_to_float(float_to_bf16(x)), x) << x;
  // Round to nearest even: 1 + 2^-11 is halfway between 1 and 1 + 2^-10 in binary16.
  EXPECT_EQ(fp16_to_float(float_to_fp16(1.0f + std::ldexp(1.0f, -11))), 1.0f);
  EXPECT_EQ(fp16_to_float(float_to_fp16(1.0f + 3 * std::ldexp(1.0f, -11))),
            1.0f + std::ldexp(1.0f, -9));
  EXPECT_TRUE(std::isinf(fp16_to_float(float_to_fp16(70000.0f))));
  EXPECT_TRUE(std::isnan(fp16_to_float(float_to_fp16(NAN))));
  EXPECT_TRUE(std::isnan(bf16_to_float(float_to_bf16(NAN))));
  EXPECT_EQ(bf16_to_float(float_to_bf16(1.0f + std::ldexp(1.0f, -8))), 1.0f);  // tie to even
  EXPECT_EQ(bf16_to_float(float_to_bf16(1.0f + 3 * std::ldexp(1.0f, -8))),
            1.0f + std::ldexp(1.0f, -6));
}

TEST(Float16, ExhaustiveHalfRoundTrip) {
  // Every finite binary16 value converts to float and back to the same bits.
  for (std::uint32_t bits = 0; bits < 0x10000; ++bits) {
    const float16 h{static_cast<std::uint16_t>(bits)};
    const float f = fp16_to_float(h);
    if (std::isnan(f)) continue;
    EXPECT_EQ(float_to_fp16(f).bits, h.bits) << std::hex << bits;
  }
}

TEST(CpuCopy, ConvertsBetweenDtypesWithAnyStrides) {
  std::mt19937 rng(3);
  Tensor src = testing::random_tensor({2, 3, 4, 5}, DType::kFloat32, rng);
  Tensor half = cpu::cast(src.transpose(1, 3), DType::kFloat16);
  EXPECT_TRUE(half.is_contiguous());
  const auto expected = to_doubles(src.transpose(1, 3));
  const auto got = to_doubles(half);
  for (std::size_t i = 0; i < got.size(); ++i) EXPECT_NEAR(got[i], expected[i], 1e-3);
  Tensor dst = Tensor::zeros({2, 3, 4, 5}, DType::kFloat32);
  EXPECT_KVCACHE_ERROR(cpu::copy(dst.slice(0, 0, 1), src),
                       "expected equal shapes, got [1, 3, 4, 5] and [2, 3, 4, 5]");
}

}  // namespace
}  // namespace kvcache
