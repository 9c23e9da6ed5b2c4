// Helpers for the CUDA tests: a fixture that skips where no GPU is usable (CI), and device tensors
// poisoned with NaN before a kernel writes them, so an element a kernel forgets shows up.
#pragma once

#include <gtest/gtest.h>

#include <cstdint>
#include <cstring>
#include <limits>

#include "kvcache/backend/cpu.hpp"
#include "kvcache/backend/cuda.hpp"
#include "test_util.hpp"

namespace kvcache::testing {

class CudaTest : public ::testing::Test {
 protected:
  void SetUp() override {
    if (cuda::device_count() == 0) GTEST_SKIP() << "no CUDA device";
  }
};

/// A new contiguous device tensor whose every element is NaN (or 0xff bytes for integer types).
inline Tensor poisoned_device(Shape shape, DType dtype) {
  Tensor host = Tensor::empty(shape, DType::kFloat32);
  if (!is_floating(dtype)) {
    host = Tensor::empty(shape, dtype);
    std::memset(host.data(), 0xff, host.nbytes());
    return cuda::to_device(host);
  }
  float* p = host.data_as<float>();
  for (std::int64_t i = 0; i < host.numel(); ++i) p[i] = std::numeric_limits<float>::quiet_NaN();
  return cuda::to_device(dtype == DType::kFloat32 ? host : cpu::cast(host, dtype));
}
inline Tensor poisoned_device(std::initializer_list<std::int64_t> shape, DType dtype) {
  return poisoned_device(Shape(shape.begin(), shape.size()), dtype);
}

/// The float dtypes the CUDA kernels serve.
inline constexpr DType kFloatTypes[] = {DType::kFloat32, DType::kBFloat16, DType::kFloat16};

/// The attention kernels' bounds against cpu::attention on the same inputs: 16-bit outputs are
/// rounded once, and the tensor-core paths also round the probabilities to the input dtype before
/// P·V.
inline double attention_tolerance(DType dtype) {
  switch (dtype) {
    case DType::kBFloat16:
      return 2e-2;
    case DType::kFloat16:
      return 4e-3;
    default:
      return 2e-5;
  }
}

}  // namespace kvcache::testing
