// The CUDA model operations (kvcache/backend/cuda.hpp) against the CPU path: cast, embedding,
// RMSNorm, bias, SiLU·mul, residual add, RoPE, linear (cuBLAS), argmax and sampling. Inputs are
// random (never zeros), row sizes not powers of two (576, 4097, 151936), views strided and
// misaligned (a column slice of a wider tensor) so both the vectorised and the scalar kernels run,
// and outputs the API writes into are poisoned with NaN first. Where the CPU is itself an
// approximation (exp, a serial sum) the CUDA result is also checked against float64.
//
// Bit-exact expectations: cast, embedding, add_bias and add_inplace equal the CPU's bits. RoPE
// equals, bit for bit, a host re-computation in torch's float32 order (no FMA, correctly rounded
// cos/sin); against the CPU backend it is within a few ulp, because g++ contracts the CPU's
// x1·c + (−x2·s) into an FMA under -std=gnu++20 -march=native and glibc's cosf is not always
// correctly rounded. RMSNorm is within 6e-7 of float64 (a tree sum), the CPU within about 5e-6 (a
// serial sum). Every test skips where no GPU is usable.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <limits>
#include <numeric>
#include <random>
#include <vector>

#include "cuda_test_util.hpp"
#include "kvcache/kvcache.hpp"

namespace kvcache {
namespace {

using testing::poisoned_device;
using testing::random_tensor;
using testing::to_doubles;

class CudaOps : public testing::CudaTest {};

constexpr DType kFloatTypes[] = {DType::kFloat32, DType::kBFloat16, DType::kFloat16};

// Half an ulp at 1 of a dtype: the relative error of one rounding to it.
double unit_roundoff(DType dtype) {
  switch (dtype) {
    case DType::kBFloat16:
      return 0x1p-8;  // 8 significant bits: half an ulp is 2^-8 relative
    case DType::kFloat16:
      return 0x1p-11;
    default:
      return 0x1p-24;
  }
}

std::vector<double> device_values(const Tensor& device) {
  return to_doubles(cuda::to_host(device));
}

// Distance in float32 ulps (0 for equal values, +0 and −0 equal).
std::int64_t ulp_distance(float a, float b) {
  auto key = [](float f) {
    std::int32_t i;
    std::memcpy(&i, &f, sizeof i);
    return i >= 0 ? static_cast<std::int64_t>(i) : -static_cast<std::int64_t>(i & 0x7fffffff);
  };
  const std::int64_t d = key(a) - key(b);
  return d < 0 ? -d : d;
}

Tensor int64_tensor(const std::vector<std::int64_t>& values, std::vector<std::int64_t> shape) {
  Tensor t = Tensor::empty(Shape(shape.data(), shape.size()), DType::kInt64);
  std::copy(values.begin(), values.end(), t.data_as<std::int64_t>());
  return t;
}

Tensor float_tensor(const std::vector<float>& values) {
  Tensor t = Tensor::empty({static_cast<std::int64_t>(values.size())}, DType::kFloat32);
  std::copy(values.begin(), values.end(), t.data_as<float>());
  return t;
}

// --- cast ---------------------------------------------------------------------------------------

TEST_F(CudaOps, CastMatchesCpuForEveryDtypePairAndStrides) {
  std::mt19937 rng(11);
  for (DType from : kFloatTypes) {
    for (DType to : kFloatTypes) {
      const Tensor host = random_tensor({2, 5, 3, 7}, from, rng, 4.0f);
      const Tensor device = cuda::to_device(host);
      const Tensor got = cuda::cast(device, to);
      EXPECT_EQ(got.dtype(), to);
      EXPECT_EQ(device_values(got), to_doubles(cpu::cast(host, to)))
          << dtype_name(from) << " -> " << dtype_name(to);
      // A transposed, sliced view: the strided kernel.
      const Tensor view = device.transpose(1, 3).slice(2, 1, 3);
      const Tensor strided = cuda::cast(view, to);
      EXPECT_TRUE(strided.is_contiguous());
      EXPECT_EQ(strided.shape_string(), view.shape_string());
      EXPECT_EQ(device_values(strided),
                to_doubles(cpu::cast(host.transpose(1, 3).slice(2, 1, 3), to)))
          << dtype_name(from) << " -> " << dtype_name(to) << " (strided)";
      // Rank 1, with an odd length.
      const Tensor flat = random_tensor({4097}, from, rng);
      EXPECT_EQ(device_values(cuda::cast(cuda::to_device(flat), to)),
                to_doubles(cpu::cast(flat, to)));
    }
  }
  const Tensor ids = cuda::to_device(int64_tensor({1, 2, 3}, {3}));
  EXPECT_KVCACHE_ERROR(cuda::cast(ids, DType::kFloat32), "expected a float32, float16 or bfloat16");
  EXPECT_KVCACHE_ERROR(cuda::cast(random_tensor({3}, DType::kFloat32, rng), DType::kBFloat16),
                       "CUDA tensor");
  EXPECT_KVCACHE_ERROR(
      cuda::cast(cuda::to_device(random_tensor({3}, DType::kFloat32, rng)), DType::kInt32),
      "float destination dtype");
}

// --- embedding ----------------------------------------------------------------------------------

TEST_F(CudaOps, EmbeddingMatchesCpu) {
  std::mt19937 rng(12);
  const Tensor ids = int64_tensor({0, 49, 7, 7, 23, 1}, {2, 3});
  for (DType dtype : kFloatTypes) {
    for (std::int64_t hidden : {576, 4097}) {
      const Tensor table = random_tensor({50, hidden}, dtype, rng);
      const Tensor got = cuda::embedding(cuda::to_device(table), cuda::to_device(ids));
      ASSERT_EQ(got.dtype(), DType::kFloat32);
      ASSERT_EQ(got.size(0), 6);
      ASSERT_EQ(got.size(1), hidden);
      EXPECT_EQ(device_values(got), to_doubles(cpu::embedding(table, ids)))
          << dtype_name(dtype) << " hidden " << hidden;
    }
  }
  const Tensor table = cuda::to_device(random_tensor({50, 8}, DType::kFloat32, rng));
  EXPECT_KVCACHE_ERROR(cuda::embedding(table, cuda::to_device(cpu::cast(ids, DType::kInt32))),
                       "int64");
  EXPECT_KVCACHE_ERROR(cuda::embedding(cuda::to_host(table), cuda::to_device(ids)), "CUDA table");
  EXPECT_KVCACHE_ERROR(cuda::embedding(table, ids), "CUDA ids");
}

// --- rms_norm -----------------------------------------------------------------------------------

TEST_F(CudaOps, RmsNormIsCloseToFloat64AndTheCpu) {
  std::mt19937 rng(13);
  const float eps = 1e-5f;
  for (std::int64_t rows : {1, 3, 64}) {
    for (std::int64_t hidden : {576, 4096, 4097}) {
      for (bool strided : {false, true}) {
        // Strided: a column slice starting at column 1 of a wider tensor (unaligned rows).
        const Tensor wide =
            random_tensor({rows, hidden + (strided ? 3 : 0)}, DType::kFloat32, rng, 3.0f);
        const Tensor x =
            strided ? cuda::to_device(wide).slice(1, 1, 1 + hidden) : cuda::to_device(wide);
        const Tensor x_host = cuda::to_host(x);
        const Tensor w = random_tensor({hidden}, DType::kFloat32, rng, 2.0f);
        const Tensor w_device = cuda::to_device(w);
        const Tensor cpu_y = cpu::rms_norm(x_host, w, eps);
        const float* xs = x_host.data_as<float>();
        const float* ws = w.data_as<float>();
        for (DType out : kFloatTypes) {
          SCOPED_TRACE(::testing::Message() << "rows " << rows << " hidden " << hidden
                                            << (strided ? " strided " : " ") << dtype_name(out));
          const Tensor y = cuda::rms_norm(x, w_device, eps, out);
          ASSERT_EQ(y.dtype(), out);
          const std::vector<double> got = device_values(y);
          std::int64_t max_ulp = 0, equal = 0;
          double max_rel = 0;
          for (std::int64_t r = 0; r < rows; ++r) {
            double ss = 0;
            for (std::int64_t i = 0; i < hidden; ++i)
              ss += double(xs[r * hidden + i]) * xs[r * hidden + i];
            const double inv = 1.0 / std::sqrt(ss / double(hidden) + eps);
            for (std::int64_t i = 0; i < hidden; ++i) {
              const std::int64_t at = r * hidden + i;
              const double g = got[static_cast<std::size_t>(at)];
              const double c = cpu_y.data_as<float>()[at];
              const double want = ws[i] * (xs[at] * inv);
              ASSERT_TRUE(std::isfinite(g)) << "element " << at;
              if (out == DType::kFloat32) {
                // The GPU's tree sum is within about 1e-7 of float64, the CPU's serial float32
                // sum within a few 1e-6 (the bound the CPU's own test uses is 1e-5).
                const std::int64_t d = ulp_distance(static_cast<float>(g), static_cast<float>(c));
                max_ulp = std::max(max_ulp, d);
                equal += d == 0;
                ASSERT_NEAR(g, want, 6e-7 * std::fabs(want) + 1e-30) << "element " << at;
                ASSERT_NEAR(g, c, 1e-5 * std::fabs(c) + 1e-30) << "element " << at << " (cpu)";
                max_rel = std::max(max_rel, std::fabs(g - want) / std::max(std::fabs(want), 1e-30));
              } else {
                // One rounding of (nearly) the CPU's float32 value; float16's subnormals below.
                const double tol = 2 * unit_roundoff(out) * std::fabs(c) + 1e-7;
                ASSERT_NEAR(g, c, tol) << "element " << at;
              }
            }
          }
          if (out == DType::kFloat32) {
            std::printf(
                "[   info   ] rms_norm rows %lld hidden %lld%s: max %lld ulp from the CPU, "
                "%.1f%% equal, max rel %.2e from float64\n",
                static_cast<long long>(rows), static_cast<long long>(hidden),
                strided ? " strided" : "", static_cast<long long>(max_ulp),
                100.0 * double(equal) / double(rows * hidden), max_rel);
          }
        }
      }
    }
  }
  const Tensor x = cuda::to_device(random_tensor({2, 576}, DType::kFloat32, rng));
  const Tensor w = cuda::to_device(random_tensor({576}, DType::kFloat32, rng));
  EXPECT_KVCACHE_ERROR(cuda::rms_norm(cuda::cast(x, DType::kBFloat16), w, eps, DType::kFloat32),
                       "float32 CUDA tensor");
  EXPECT_KVCACHE_ERROR(cuda::rms_norm(x, w.slice(0, 0, 100), eps, DType::kFloat32),
                       "expected weight [576]");
  EXPECT_KVCACHE_ERROR(cuda::rms_norm(cuda::to_host(x), w, eps, DType::kFloat32), "CUDA tensor");
  EXPECT_KVCACHE_ERROR(cuda::rms_norm(x, w, eps, DType::kInt64), "float output dtype");
}

// --- add_bias, silu_mul, add_inplace ------------------------------------------------------------

TEST_F(CudaOps, AddBiasIsOneFloat32AddRoundedOnce) {
  std::mt19937 rng(14);
  for (DType dtype : kFloatTypes) {
    for (std::int64_t n : {1000, 4097}) {
      for (std::int64_t offset : {0, 1}) {  // aligned rows (vector path) and unaligned ones
        const std::int64_t rows = 3, width = n + 4;
        const Tensor wide_host = random_tensor({rows, width}, dtype, rng, 2.0f);
        const Tensor wide = cuda::to_device(wide_host);
        const Tensor y = wide.slice(1, offset, offset + n);
        const Tensor bias = random_tensor({n}, DType::kFloat32, rng);
        cuda::add_bias(y, cuda::to_device(bias));
        // Expected: the untouched columns as they were, the view's as round(float(y) + bias).
        Tensor want = cpu::cast(wide_host, DType::kFloat32);
        for (std::int64_t r = 0; r < rows; ++r)
          for (std::int64_t i = 0; i < n; ++i)
            want.data_as<float>()[r * width + offset + i] += bias.data_as<float>()[i];
        EXPECT_EQ(device_values(wide), to_doubles(cpu::cast(want, dtype)))
            << dtype_name(dtype) << " n " << n << " offset " << offset;
      }
    }
  }
  const Tensor y = cuda::to_device(random_tensor({2, 8}, DType::kFloat32, rng));
  EXPECT_KVCACHE_ERROR(cuda::add_bias(y, cuda::to_device(random_tensor({7}, DType::kFloat32, rng))),
                       "expected bias [8]");
  EXPECT_KVCACHE_ERROR(
      cuda::add_bias(y, cuda::to_device(random_tensor({8}, DType::kBFloat16, rng))),
      "expected bias [8] float32");
  EXPECT_KVCACHE_ERROR(
      cuda::add_bias(cuda::to_host(y), cuda::to_device(random_tensor({8}, DType::kFloat32, rng))),
      "float CUDA tensor");
}

TEST_F(CudaOps, SiluMulIsWithinAFewUlpOfFloat64) {
  std::mt19937 rng(15);
  for (DType dtype : kFloatTypes) {
    for (std::int64_t rows : {1, 3}) {
      for (std::int64_t n : {1536, 4097}) {
        SCOPED_TRACE(::testing::Message() << dtype_name(dtype) << " rows " << rows << " n " << n);
        // gate and up as the two halves of one fused projection output [rows, 2n].
        Tensor fused = random_tensor({rows, 2 * n}, DType::kFloat32, rng, 10.0f);
        // The far ends: e^−g overflows (g ≪ 0) or vanishes (g ≫ 0); zero.
        const float specials[] = {-100.0f, -87.5f, 88.9f, 100.0f, 0.0f, -30.0f, 30.0f};
        for (std::size_t i = 0; i < std::size(specials); ++i)
          fused.data_as<float>()[i] = specials[i];
        fused = dtype == DType::kFloat32 ? fused : cpu::cast(fused, dtype);
        const Tensor fused_device = cuda::to_device(fused);
        const Tensor gate = fused_device.slice(1, 0, n), up = fused_device.slice(1, n, 2 * n);
        const Tensor y = cuda::silu_mul(gate, up);
        ASSERT_EQ(y.dtype(), dtype);
        ASSERT_TRUE(y.is_contiguous());
        const std::vector<double> got = device_values(y);
        const std::vector<double> g = to_doubles(cuda::to_host(gate));
        const std::vector<double> u = to_doubles(cuda::to_host(up));
        std::vector<double> cpu_y;
        if (dtype == DType::kFloat32) {
          cpu_y = to_doubles(cpu::silu_mul(cuda::to_host(gate), cuda::to_host(up)));
        }
        double max_rel = 0;
        for (std::size_t i = 0; i < got.size(); ++i) {
          const double want = g[i] / (1.0 + std::exp(-g[i])) * u[i];
          ASSERT_TRUE(std::isfinite(got[i])) << "element " << i;
          if (dtype == DType::kFloat32) {
            ASSERT_NEAR(got[i], want, 6e-7 * std::fabs(want) + 1e-37)
                << "g " << g[i] << " u " << u[i];
            ASSERT_NEAR(got[i], cpu_y[i], 1e-6 * std::fabs(want) + 1e-37) << "element " << i;
            if (std::fabs(want) > 1e-30)
              max_rel = std::max(max_rel, std::fabs(got[i] - want) / std::fabs(want));
          } else {
            ASSERT_NEAR(got[i], want, 1.01 * unit_roundoff(dtype) * std::fabs(want) + 1e-7)
                << "g " << g[i] << " u " << u[i];
          }
        }
        if (dtype == DType::kFloat32) {
          std::printf("[   info   ] silu_mul rows %lld n %lld: max rel %.2e from float64\n",
                      static_cast<long long>(rows), static_cast<long long>(n), max_rel);
        }
      }
    }
  }
  const Tensor a = cuda::to_device(random_tensor({2, 8}, DType::kFloat32, rng));
  EXPECT_KVCACHE_ERROR(cuda::silu_mul(a, cuda::cast(a, DType::kBFloat16)), "expected up like gate");
  EXPECT_KVCACHE_ERROR(cuda::silu_mul(a, a.slice(1, 0, 4)), "expected up like gate");
  EXPECT_KVCACHE_ERROR(cuda::silu_mul(cuda::to_host(a), a), "float CUDA tensor");
}

TEST_F(CudaOps, AddInplaceEqualsCpu) {
  std::mt19937 rng(16);
  for (std::int64_t rows : {3, 5}) {
    for (std::int64_t n : {576, 4097}) {
      const Tensor y_host = random_tensor({rows, n}, DType::kFloat32, rng, 3.0f);
      const Tensor x_host = random_tensor({rows, n}, DType::kFloat32, rng, 3.0f);
      const Tensor y = cuda::to_device(y_host);
      cuda::add_inplace(y, cuda::to_device(x_host));
      const Tensor want = cpu::clone(y_host);
      cpu::add_inplace(want, x_host);
      EXPECT_EQ(device_values(y), to_doubles(want)) << rows << " x " << n;
    }
  }
  // Contiguous but not 16-byte aligned (a 1-d slice starting at element 1): the scalar kernel.
  const Tensor y_host = random_tensor({4099}, DType::kFloat32, rng);
  const Tensor x_host = random_tensor({4099}, DType::kFloat32, rng);
  const Tensor y = cuda::to_device(y_host);
  cuda::add_inplace(y.slice(0, 1, 4099), cuda::to_device(x_host).slice(0, 0, 4098));
  std::vector<double> want = to_doubles(y_host);
  for (std::size_t i = 1; i < want.size(); ++i)
    want[i] = y_host.data_as<float>()[i] + x_host.data_as<float>()[i - 1];
  EXPECT_EQ(device_values(y), want);

  const Tensor a = cuda::to_device(random_tensor({2, 8}, DType::kFloat32, rng));
  EXPECT_KVCACHE_ERROR(cuda::add_inplace(a, cuda::cast(a, DType::kBFloat16)), "float32");
  EXPECT_KVCACHE_ERROR(cuda::add_inplace(a, a.slice(1, 0, 4)), "of one size");
  EXPECT_KVCACHE_ERROR(cuda::add_inplace(a, cuda::to_host(a)), "CUDA tensors");
}

// --- rope
// -----------------------------------------------------------------------------------------

// The kernel's arithmetic on the host: torch's float32 order with every product rounded (volatile
// keeps g++ from contracting into an FMA), cos/sin correctly rounded from double, then one
// rounding to x's dtype. x [batch, heads, q_len, d] CPU (any strides) is rotated in place.
void rope_reference(const Tensor& x, const Tensor& positions, const std::vector<float>& inv_freq,
                    float scaling) {
  const std::int64_t batch = x.size(0), heads = x.size(1), q_len = x.size(2), half = x.size(3) / 2;
  Tensor f = cpu::cast(x, DType::kFloat32);  // contiguous float32 copy
  float* p = f.data_as<float>();
  for (std::int64_t b = 0; b < batch; ++b)
    for (std::int64_t i = 0; i < q_len; ++i) {
      const auto pos = static_cast<float>(positions.data_as<std::int64_t>()[b * q_len + i]);
      for (std::int64_t k = 0; k < half; ++k) {
        volatile float angle = inv_freq[static_cast<std::size_t>(k)] * pos;
        volatile float c = static_cast<float>(std::cos(static_cast<double>(angle)));
        volatile float s = static_cast<float>(std::sin(static_cast<double>(angle)));
        c = c * scaling;
        s = s * scaling;
        for (std::int64_t h = 0; h < heads; ++h) {
          float* row = p + ((b * heads + h) * q_len + i) * 2 * half;
          const float x1 = row[k], x2 = row[k + half];
          volatile float a1 = x1 * c, b1 = -x2 * s, a2 = x2 * c, b2 = x1 * s;
          row[k] = a1 + b1;
          row[k + half] = a2 + b2;
        }
      }
    }
  cpu::copy(x, f);  // one rounding to x's dtype
}

TEST_F(CudaOps, RopeEqualsTorchOrderAndIsWithinAFewUlpOfCpu) {
  std::mt19937 rng(17);
  RopeScaling llama3;
  llama3.type = RopeType::kLlama3;
  llama3.factor = 8.0;
  const RotaryEmbedding ropes[] = {
      RotaryEmbedding({.head_dim = 64, .rope_theta = 10000.0}),
      RotaryEmbedding({.head_dim = 128, .rope_theta = 500000.0, .scaling = llama3}),
      RotaryEmbedding({.head_dim = 6, .rope_theta = 10000.0}),
  };
  const std::int64_t batch = 2, heads = 3, q_len = 5;
  std::uniform_int_distribution<std::int64_t> far(0, 40000);
  std::vector<std::int64_t> pos_values;
  for (std::int64_t i = 0; i < q_len; ++i) pos_values.push_back(i);         // row 0: 0..4 (prefill)
  for (std::int64_t i = 0; i < q_len; ++i) pos_values.push_back(far(rng));  // row 1: far ones
  const Tensor positions = int64_tensor(pos_values, {batch, q_len});
  const Tensor positions_device = cuda::to_device(positions);
  for (const RotaryEmbedding& rope : ropes) {
    const std::int64_t d = rope.head_dim(), half = d / 2;
    const Tensor inv_freq = cuda::to_device(float_tensor(rope.inv_freq()));
    for (DType dtype : kFloatTypes) {
      SCOPED_TRACE(::testing::Message() << "head_dim " << d << " " << dtype_name(dtype));
      // [batch, q_len, heads, d] as a fused projection leaves it, seen as [batch, heads, q_len, d].
      const Tensor base = random_tensor({batch, q_len, heads, d}, dtype, rng, 2.0f);
      const Tensor base_device = cuda::to_device(base);
      cuda::rope(base_device.transpose(1, 2), positions_device, inv_freq, rope.attention_scaling());
      const Tensor got = cuda::to_host(base_device).transpose(1, 2);

      const Tensor torch_order = cpu::clone(base).transpose(1, 2);
      rope_reference(torch_order, positions, rope.inv_freq(), rope.attention_scaling());
      EXPECT_EQ(to_doubles(got), to_doubles(torch_order)) << "against the torch-order reference";

      const Tensor cpu_x = cpu::clone(base).transpose(1, 2);
      rope.apply(cpu_x, positions);
      const std::vector<double> g = to_doubles(got), c = to_doubles(cpu_x);
      const std::vector<double> x0 = to_doubles(base.transpose(1, 2));
      // CPU vs GPU: cos/sin within an ulp, an FMA or not, and for 16-bit types the CPU's extra
      // roundings (cos/sin and each product in the 16-bit type): bounded by (|x1| + |x2|) · tol.
      const double tol = dtype == DType::kFloat32 ? 0x1p-21 : 8 * unit_roundoff(dtype);
      std::int64_t equal = 0;
      for (std::size_t at = 0; at < g.size(); ++at) {
        const std::size_t k = at % static_cast<std::size_t>(d);
        const std::size_t pair = k < static_cast<std::size_t>(half) ? at + half : at - half;
        const double scale = std::fabs(x0[at]) + std::fabs(x0[pair]);
        ASSERT_NEAR(g[at], c[at], tol * scale + 1e-7) << "element " << at;
        equal += g[at] == c[at];
      }
      std::printf("[   info   ] rope head_dim %lld %s: %.1f%% bit-equal to the CPU backend\n",
                  static_cast<long long>(d), std::string(dtype_name(dtype)).c_str(),
                  100.0 * double(equal) / double(g.size()));
    }
  }
  const Tensor x = cuda::to_device(random_tensor({2, 3, 5, 64}, DType::kFloat32, rng));
  const Tensor inv = cuda::to_device(float_tensor(ropes[0].inv_freq()));
  EXPECT_KVCACHE_ERROR(cuda::rope(x, positions, inv, 1.0f), "position_ids [2, 5]");
  EXPECT_KVCACHE_ERROR(cuda::rope(x, positions_device, inv.slice(0, 0, 16), 1.0f), "inv_freq [32]");
  EXPECT_KVCACHE_ERROR(cuda::rope(x.slice(3, 0, 63), positions_device, inv, 1.0f), "even");
  EXPECT_KVCACHE_ERROR(cuda::rope(cuda::to_host(x), positions_device, inv, 1.0f), "float on CUDA");
}

// --- linear
// -----------------------------------------------------------------------------------------

struct LinearCase {
  std::int64_t rows, in, out;
};

// Σ_i x[r, i] · w[o, i] and Σ_i |x[r, i] · w[o, i]| in float64 from the (already rounded) inputs.
void float64_product(const std::vector<double>& x, const std::vector<double>& w, std::int64_t rows,
                     std::int64_t in, std::int64_t out, std::vector<double>& value,
                     std::vector<double>& magnitude) {
  value.assign(static_cast<std::size_t>(rows * out), 0.0);
  magnitude.assign(static_cast<std::size_t>(rows * out), 0.0);
  for (std::int64_t r = 0; r < rows; ++r)
    for (std::int64_t o = 0; o < out; ++o) {
      double s = 0, m = 0;
      for (std::int64_t i = 0; i < in; ++i) {
        const double p =
            x[static_cast<std::size_t>(r * in + i)] * w[static_cast<std::size_t>(o * in + i)];
        s += p;
        m += std::fabs(p);
      }
      value[static_cast<std::size_t>(r * out + o)] = s;
      magnitude[static_cast<std::size_t>(r * out + o)] = m;
    }
}

TEST_F(CudaOps, LinearMatchesCpuAndFloat64WithStridedViewsAndBeta) {
  std::mt19937 rng(18);
  const LinearCase cases[] = {{1, 576, 1536}, {3, 576, 1000}, {37, 4097, 129}};
  struct Types {
    DType weight, out;
  };
  const Types types[] = {{DType::kFloat32, DType::kFloat32},
                         {DType::kBFloat16, DType::kFloat32},
                         {DType::kBFloat16, DType::kBFloat16},
                         {DType::kFloat16, DType::kFloat32},
                         {DType::kFloat16, DType::kFloat16}};
  for (const LinearCase& lc : cases) {
    for (const Types& t : types) {
      for (float beta : {0.0f, 1.0f}) {
        SCOPED_TRACE(::testing::Message()
                     << "rows " << lc.rows << " in " << lc.in << " out " << lc.out << " weight "
                     << dtype_name(t.weight) << " out " << dtype_name(t.out) << " beta " << beta);
        // x: columns [3, 3 + in) of a wider [rows, in + 7] tensor (row stride in + 7, unaligned).
        const Tensor x_wide = random_tensor({lc.rows, lc.in + 7}, t.weight, rng);
        const Tensor x = cuda::to_device(x_wide).slice(1, 3, 3 + lc.in);
        const Tensor w_host = random_tensor({lc.out, lc.in}, t.weight, rng);
        const Tensor w = cuda::to_device(w_host);
        // out: columns [2, 2 + out) of a wider [rows, out + 9] tensor, poisoned (beta = 0) or
        // holding a residual to add to (beta = 1).
        Tensor out_wide;
        Tensor residual;
        if (beta == 0.0f) {
          out_wide = poisoned_device({lc.rows, lc.out + 9}, t.out);
        } else {
          residual = random_tensor({lc.rows, lc.out + 9}, t.out, rng);
          out_wide = cuda::to_device(residual);
        }
        const Tensor out = out_wide.slice(1, 2, 2 + lc.out);
        cuda::linear(x, w, out, beta);

        const std::vector<double> xs = to_doubles(cuda::to_host(x));
        const std::vector<double> ws = to_doubles(w_host);
        std::vector<double> value, magnitude;
        float64_product(xs, ws, lc.rows, lc.in, lc.out, value, magnitude);
        std::vector<double> cpu_y;
        if (t.weight == DType::kFloat32) {
          cpu_y = to_doubles(cpu::linear(cuda::to_host(x), w_host));
        }
        const std::vector<double> got = device_values(out_wide);
        const std::vector<double> res = beta != 0.0f ? to_doubles(residual) : std::vector<double>();
        const std::int64_t width = lc.out + 9;
        double max_err = 0;
        for (std::int64_t r = 0; r < lc.rows; ++r) {
          for (std::int64_t c = 0; c < width; ++c) {
            const double g = got[static_cast<std::size_t>(r * width + c)];
            const std::int64_t o = c - 2;
            if (o < 0 || o >= lc.out) {  // outside the view: untouched
              if (beta == 0.0f) {
                ASSERT_TRUE(std::isnan(g)) << "column " << c << " of row " << r << " was written";
              } else {
                ASSERT_EQ(g, res[static_cast<std::size_t>(r * width + c)]);
              }
              continue;
            }
            const std::size_t at = static_cast<std::size_t>(r * lc.out + o);
            const double add = beta != 0.0f ? res[static_cast<std::size_t>(r * width + c)] : 0.0;
            const double want = value[at] + add;
            // float32 accumulation (measured ~4e-8 of Σ|x·w| on the CPU; TF32 would be ~1e-5),
            // then one rounding to the output dtype.
            const double tol = 1e-6 * (magnitude[at] + std::fabs(add)) +
                               2 * unit_roundoff(t.out) * std::fabs(want) + 1e-30;
            ASSERT_TRUE(std::isfinite(g)) << "row " << r << " out " << o;
            ASSERT_NEAR(g, want, tol) << "row " << r << " out " << o;
            max_err = std::max(max_err, std::fabs(g - want) / std::max(magnitude[at], 1e-30));
            if (!cpu_y.empty()) {
              ASSERT_NEAR(g, cpu_y[at] + add, 2e-6 * (magnitude[at] + std::fabs(add)) + 1e-30)
                  << "row " << r << " out " << o << " against cpu::linear";
            }
          }
        }
        std::printf("[   info   ] linear %lldx%lldx%lld %s->%s beta %g: max err %.2e of sum|x w|\n",
                    static_cast<long long>(lc.rows), static_cast<long long>(lc.in),
                    static_cast<long long>(lc.out), std::string(dtype_name(t.weight)).c_str(),
                    std::string(dtype_name(t.out)).c_str(), static_cast<double>(beta), max_err);
      }
    }
  }
  const Tensor x = cuda::to_device(random_tensor({2, 16}, DType::kFloat32, rng));
  const Tensor w = cuda::to_device(random_tensor({8, 16}, DType::kFloat32, rng));
  const Tensor out = cuda::empty({2, 8}, DType::kFloat32);
  EXPECT_KVCACHE_ERROR(cuda::linear(x, cuda::cast(w, DType::kBFloat16), out),
                       "got x float32 and weight bfloat16");
  EXPECT_KVCACHE_ERROR(cuda::linear(x, w, cuda::empty({2, 8}, DType::kFloat16)),
                       "got out float16 for weight float32");
  EXPECT_KVCACHE_ERROR(cuda::linear(x, cuda::to_host(w), out), "CUDA weight");
  EXPECT_KVCACHE_ERROR(cuda::linear(x.slice(1, 0, 15), w, out), "expected x [rows, 16]");
  EXPECT_KVCACHE_ERROR(cuda::linear(x, w, cuda::empty({2, 9}, DType::kFloat32)),
                       "expected out [2, 8]");
}

// cuBLAS writes every element of a contiguous output at the prefill shapes of graph_cuda_test's
// small model (hidden 64, intermediate 96, 4 + 2 + 2 heads of 16, vocabulary 100; three prompts
// of 7 tokens, 21 rows). compute-sanitizer's initcheck reports reads of unwritten bytes in the
// silu_mul that follows the fused gate|up product there: the output here starts as NaN, so an
// element cuBLAS skipped would stay NaN and fail, and a value it wrote must be the product; the
// halves then go through silu_mul as the prefill's do.
TEST_F(CudaOps, LinearWritesEveryElementOfAContiguousOutput) {
  std::mt19937 rng(29);
  const LinearCase cases[] = {{21, 64, 128}, {21, 64, 64}, {21, 64, 192}, {21, 96, 64},
                              {21, 64, 100}, {9, 64, 192}, {7, 64, 192}};
  for (DType wt : kFloatTypes) {
    for (const LinearCase& lc : cases) {
      for (DType ot : {wt, DType::kFloat32}) {
        SCOPED_TRACE(::testing::Message()
                     << "rows " << lc.rows << " in " << lc.in << " out " << lc.out << " weight "
                     << dtype_name(wt) << " out " << dtype_name(ot));
        if (wt == DType::kFloat32 && ot != wt) continue;
        const Tensor x_host = random_tensor({lc.rows, lc.in}, wt, rng);
        const Tensor w_host = random_tensor({lc.out, lc.in}, wt, rng);
        // The output is rows 1.. of a poisoned buffer one row taller (out.data() past the
        // buffer's 256-byte aligned start): row 0 must stay untouched.
        const Tensor buffer = poisoned_device({lc.rows + 1, lc.out}, ot);
        const Tensor out = buffer.slice(0, 1, lc.rows + 1);
        cuda::linear(cuda::to_device(x_host), cuda::to_device(w_host), out);
        std::vector<double> value, magnitude;
        float64_product(to_doubles(x_host), to_doubles(w_host), lc.rows, lc.in, lc.out, value,
                        magnitude);
        const std::vector<double> whole = device_values(buffer);
        for (std::int64_t i = 0; i < lc.out; ++i) {
          ASSERT_TRUE(std::isnan(whole[static_cast<std::size_t>(i)]))
              << "element " << i << " of the row before the output was written";
        }
        const std::vector<double> got(whole.begin() + lc.out, whole.end());
        for (std::size_t at = 0; at < got.size(); ++at) {
          ASSERT_TRUE(std::isfinite(got[at])) << "element " << at << " was not written";
          const double tol =
              1e-6 * magnitude[at] + 2 * unit_roundoff(ot) * std::fabs(value[at]) + 1e-30;
          ASSERT_NEAR(got[at], value[at], tol) << "element " << at;
        }
        // The fused gate|up's halves through silu_mul, as the model's prefill reads them.
        if (lc.out % 2 == 0 && ot == wt) {
          const std::int64_t half = lc.out / 2;
          const Tensor silu = cuda::silu_mul(out.slice(1, 0, half), out.slice(1, half, lc.out));
          const std::vector<double> y = device_values(silu);
          const double rel = ot == DType::kFloat32 ? 6e-7 : 1.01 * unit_roundoff(ot);
          for (std::int64_t r = 0; r < lc.rows; ++r) {
            for (std::int64_t i = 0; i < half; ++i) {
              const double g = got[static_cast<std::size_t>(r * lc.out + i)];
              const double u = got[static_cast<std::size_t>(r * lc.out + half + i)];
              const double want = g / (1.0 + std::exp(-g)) * u;
              ASSERT_NEAR(y[static_cast<std::size_t>(r * half + i)], want,
                          rel * std::fabs(want) + 1e-7)
                  << "silu_mul row " << r << " element " << i;
            }
          }
        }
      }
    }
  }
}

// --- argmax -------------------------------------------------------------------------------------

TEST_F(CudaOps, ArgmaxIsTheFirstMaximum) {
  std::mt19937 rng(19);
  for (std::int64_t vocab : {1, 7, 4099, 32000, 151936}) {
    for (std::int64_t offset : {0, 1}) {  // aligned rows (float4 loads) and unaligned ones
      const std::int64_t rows = 4, width = vocab + 4;
      Tensor wide = random_tensor({rows, width}, DType::kFloat32, rng, 8.0f);
      float* p = wide.data_as<float>();
      auto at = [&](std::int64_t r, std::int64_t i) -> float& { return p[r * width + offset + i]; };
      if (vocab > 2) {
        at(0, vocab / 3) = at(0, vocab - 1) = 20.0f;  // a tie: the lower index wins
        at(1, vocab - 1) = 20.0f;                     // the maximum in the tail
      }
      for (std::int64_t i = 0; i < vocab; ++i) at(2, i) = -INFINITY;  // all −inf: index 0
      const Tensor logits = cuda::to_device(wide).slice(1, offset, offset + vocab);
      const Tensor got = cuda::to_host(cuda::argmax(logits));
      ASSERT_EQ(got.dtype(), DType::kInt64);
      for (std::int64_t r = 0; r < rows; ++r) {
        const float* row = p + r * width + offset;
        EXPECT_EQ(got.data_as<std::int64_t>()[r], std::max_element(row, row + vocab) - row)
            << "vocab " << vocab << " offset " << offset << " row " << r;
      }
    }
  }
  const Tensor logits = cuda::to_device(random_tensor({2, 10}, DType::kFloat32, rng));
  EXPECT_KVCACHE_ERROR(cuda::argmax(cuda::cast(logits, DType::kBFloat16)), "float32");
  EXPECT_KVCACHE_ERROR(cuda::argmax(cuda::to_host(logits)), "on CUDA");
}

// --- sample -------------------------------------------------------------------------------------

// choose_token's steps with the draw made from u: the entries best first (stable: equal logits in
// index order), top-k, probabilities in double, the top-p cut, then the first entry whose
// cumulative normalised probability exceeds u. `ambiguous` marks a decision within 1e-6 of a
// boundary, where float32 vs float64 rounding may legitimately decide either way.
struct Drawn {
  std::int64_t token = -1;
  bool ambiguous = false;
  std::vector<std::int64_t> kept;  // best first
  std::vector<double> probs;       // of the kept entries, normalised
};

Drawn reference_draw(const float* logits, std::int64_t vocab, float temperature, std::int64_t top_k,
                     float top_p, double u) {
  constexpr double kMargin = 1e-6;
  Drawn d;
  std::vector<std::int64_t> order(static_cast<std::size_t>(vocab));
  std::iota(order.begin(), order.end(), 0);
  std::stable_sort(order.begin(), order.end(),
                   [&](std::int64_t a, std::int64_t b) { return logits[a] > logits[b]; });
  std::size_t keep = order.size();
  if (top_k > 0) keep = std::min<std::size_t>(keep, static_cast<std::size_t>(top_k));
  std::vector<double> probs(keep);
  const double top = logits[order[0]] / temperature;
  double sum = 0;
  for (std::size_t i = 0; i < keep; ++i) {
    probs[i] = std::exp(logits[order[i]] / temperature - top);
    sum += probs[i];
  }
  if (top_p < 1.0f) {
    double running = 0;
    std::size_t cut = 0;
    while (cut < keep) {
      running += probs[cut] / sum;
      ++cut;
      if (std::fabs(running - top_p) < kMargin) d.ambiguous = true;
      if (running >= top_p) break;
    }
    keep = cut;
    probs.resize(keep);
  }
  const double kept_sum = std::accumulate(probs.begin(), probs.end(), 0.0);
  double cumulative = 0;
  for (std::size_t j = 0; j < keep; ++j) {
    d.kept.push_back(order[j]);
    d.probs.push_back(probs[j] / kept_sum);
  }
  for (std::size_t j = 0; j < keep; ++j) {
    cumulative += probs[j] / kept_sum;
    if (std::fabs(cumulative - u) < kMargin && j + 1 < keep) d.ambiguous = true;
    if (d.token < 0 && cumulative > u) d.token = order[j];
  }
  if (d.token < 0) d.token = order[keep - 1];
  return d;
}

Tensor sample_on_device(const Tensor& logits_host, float temperature, std::int64_t top_k,
                        float top_p, const std::vector<float>& uniforms) {
  return cuda::to_host(cuda::sample(cuda::to_device(logits_host), temperature, top_k, top_p,
                                    cuda::to_device(float_tensor(uniforms))));
}

std::vector<float> random_uniforms(std::int64_t n, std::mt19937& rng) {
  std::uniform_real_distribution<float> dist(0.0f, 1.0f);
  std::vector<float> u(static_cast<std::size_t>(n));
  for (float& v : u) v = dist(rng);
  return u;
}

TEST_F(CudaOps, SampleWithTopK1OrUZeroOrTinyTemperatureIsArgmax) {
  std::mt19937 rng(20);
  const std::int64_t rows = 5, vocab = 32003;
  Tensor logits = random_tensor({rows, vocab}, DType::kFloat32, rng, 5.0f);
  // A clear winner per row (one above the rest), for the tiny-temperature case.
  for (std::int64_t r = 0; r < rows; ++r)
    logits.data_as<float>()[r * vocab + (r * 7919) % vocab] = 6.0f;
  const Tensor best = cuda::to_host(cuda::argmax(cuda::to_device(logits)));
  auto expect_argmax = [&](const Tensor& got, const char* what) {
    for (std::int64_t r = 0; r < rows; ++r)
      EXPECT_EQ(got.data_as<std::int64_t>()[r], best.data_as<std::int64_t>()[r])
          << what << " row " << r;
  };
  std::vector<float> u = random_uniforms(rows, rng);
  u[0] = 0.0f;
  u[1] = 0.99999994f;
  expect_argmax(sample_on_device(logits, 0.8f, 1, 1.0f, u), "top_k 1");
  expect_argmax(sample_on_device(logits, 1.5f, 1, 0.3f, u), "top_k 1, top_p 0.3");
  const std::vector<float> zeros(static_cast<std::size_t>(rows), 0.0f);
  expect_argmax(sample_on_device(logits, 1.0f, 0, 1.0f, zeros), "u 0");
  expect_argmax(sample_on_device(logits, 0.7f, 50, 0.9f, zeros), "u 0, top_k 50, top_p 0.9");
  expect_argmax(sample_on_device(logits, 1e-3f, 0, 1.0f, u), "temperature 1e-3");
}

TEST_F(CudaOps, SampleFollowsTheReferenceAndItsDistribution) {
  std::mt19937 rng(21);
  // One row of logits repeated over n rows, with u spread evenly over [0, 1): token j must then
  // be drawn for the u's falling in its interval of the cumulative distribution, so its count is
  // n · p_j within ±1 (±2 for boundaries a rounding may move) — and tokens outside the kept set
  // never appear.
  const std::int64_t n = 4096, vocab = 200;
  const Tensor row = random_tensor({vocab}, DType::kFloat32, rng, 4.0f);
  Tensor logits = Tensor::empty({n, vocab}, DType::kFloat32);
  for (std::int64_t r = 0; r < n; ++r)
    std::copy_n(row.data_as<float>(), vocab, logits.data_as<float>() + r * vocab);
  std::vector<float> u(static_cast<std::size_t>(n));
  for (std::int64_t r = 0; r < n; ++r)
    u[static_cast<std::size_t>(r)] = (float(r) + 0.5f) / float(n);
  struct Config {
    float temperature;
    std::int64_t top_k;
    float top_p;
  };
  for (const Config& c :
       {Config{0.7f, 0, 1.0f}, Config{1.0f, 20, 1.0f}, Config{1.3f, 0, 0.9f},
        Config{0.8f, 50, 0.8f}, Config{1.0f, 0, 0.05f}, Config{2.0f, 300, 1.0f}}) {
    SCOPED_TRACE(::testing::Message() << "temperature " << c.temperature << " top_k " << c.top_k
                                      << " top_p " << c.top_p);
    const Tensor got = sample_on_device(logits, c.temperature, c.top_k, c.top_p, u);
    std::vector<std::int64_t> count(static_cast<std::size_t>(vocab), 0);
    std::int64_t compared = 0;
    Drawn ref;
    for (std::int64_t r = 0; r < n; ++r) {
      const std::int64_t token = got.data_as<std::int64_t>()[r];
      ASSERT_GE(token, 0);
      ASSERT_LT(token, vocab);
      ++count[static_cast<std::size_t>(token)];
      ref = reference_draw(row.data_as<float>(), vocab, c.temperature, c.top_k, c.top_p,
                           u[static_cast<std::size_t>(r)]);
      if (!ref.ambiguous) {
        ++compared;
        EXPECT_EQ(token, ref.token) << "row " << r << " u " << u[static_cast<std::size_t>(r)];
      }
    }
    EXPECT_GT(compared, n * 9 / 10);
    std::vector<double> expected(static_cast<std::size_t>(vocab), 0.0);
    for (std::size_t j = 0; j < ref.kept.size(); ++j)
      expected[static_cast<std::size_t>(ref.kept[j])] = ref.probs[j] * double(n);
    for (std::int64_t t = 0; t < vocab; ++t) {
      const auto at = static_cast<std::size_t>(t);
      const bool kept = std::find(ref.kept.begin(), ref.kept.end(), t) != ref.kept.end();
      if (!kept) {
        EXPECT_EQ(count[at], 0) << "token " << t << " is outside the kept set";
      } else {
        EXPECT_NEAR(double(count[at]), expected[at], 2.0) << "token " << t;
      }
    }
  }
}

TEST_F(CudaOps, SampleOnALargeVocabularyMatchesTheReference) {
  std::mt19937 rng(22);
  const std::int64_t rows = 3, vocab = 151936;
  const Tensor logits = random_tensor({rows, vocab}, DType::kFloat32, rng, 10.0f);
  struct Config {
    float temperature;
    std::int64_t top_k;
    float top_p;
  };
  for (const Config& c : {Config{1.0f, 0, 1.0f}, Config{1.0f, 0, 0.95f}, Config{0.6f, 40, 1.0f},
                          Config{0.9f, 1000, 0.5f}}) {
    for (int trial = 0; trial < 4; ++trial) {
      const std::vector<float> u = random_uniforms(rows, rng);
      const Tensor got = sample_on_device(logits, c.temperature, c.top_k, c.top_p, u);
      for (std::int64_t r = 0; r < rows; ++r) {
        const Drawn ref = reference_draw(logits.data_as<float>() + r * vocab, vocab, c.temperature,
                                         c.top_k, c.top_p, u[static_cast<std::size_t>(r)]);
        if (ref.ambiguous) continue;
        EXPECT_EQ(got.data_as<std::int64_t>()[r], ref.token)
            << "temperature " << c.temperature << " top_k " << c.top_k << " top_p " << c.top_p
            << " row " << r << " u " << u[static_cast<std::size_t>(r)];
      }
    }
  }
  // Strided logits (a column slice of a wider tensor) give the same tokens.
  const Tensor wide = random_tensor({rows, vocab + 5}, DType::kFloat32, rng);
  const Tensor view = cuda::to_device(wide).slice(1, 5, 5 + vocab);
  const std::vector<float> u = random_uniforms(rows, rng);
  const Tensor uniforms = cuda::to_device(float_tensor(u));
  EXPECT_EQ(to_doubles(cuda::to_host(cuda::sample(view, 1.0f, 0, 0.9f, uniforms))),
            to_doubles(cuda::to_host(
                cuda::sample(cuda::cast(view, DType::kFloat32), 1.0f, 0, 0.9f, uniforms))));
}

TEST_F(CudaOps, SampleBreaksTiesByLowerIndex) {
  // All logits equal: the best-first order is the index order, so u picks token floor(u · vocab)
  // (or floor(u · top_k) with top-k).
  const std::int64_t n = 1000, vocab = 10;
  Tensor logits = Tensor::empty({n, vocab}, DType::kFloat32);
  std::fill_n(logits.data_as<float>(), n * vocab, 1.25f);
  std::vector<float> u(static_cast<std::size_t>(n));
  for (std::int64_t r = 0; r < n; ++r)
    u[static_cast<std::size_t>(r)] = (float(r) + 0.5f) / float(n);
  for (std::int64_t top_k : {0, 3}) {
    const Tensor got = sample_on_device(logits, 1.0f, top_k, 1.0f, u);
    const double kept = top_k > 0 ? double(top_k) : double(vocab);
    for (std::int64_t r = 0; r < n; ++r) {
      const double scaled = u[static_cast<std::size_t>(r)] * kept;
      if (std::fabs(scaled - std::round(scaled)) < 1e-4) continue;  // on a boundary
      EXPECT_EQ(got.data_as<std::int64_t>()[r], static_cast<std::int64_t>(scaled))
          << "top_k " << top_k << " u " << u[static_cast<std::size_t>(r)];
    }
  }
}

TEST_F(CudaOps, SampleRejectsBadArguments) {
  std::mt19937 rng(23);
  const Tensor logits = cuda::to_device(random_tensor({2, 10}, DType::kFloat32, rng));
  const Tensor u = cuda::to_device(float_tensor({0.25f, 0.75f}));
  EXPECT_KVCACHE_ERROR(cuda::sample(logits, 0.0f, 0, 1.0f, u), "temperature > 0");
  EXPECT_KVCACHE_ERROR(cuda::sample(logits, 1.0f, 0, 0.0f, u), "top_p in (0, 1]");
  EXPECT_KVCACHE_ERROR(cuda::sample(logits, 1.0f, 0, 1.5f, u), "top_p in (0, 1]");
  EXPECT_KVCACHE_ERROR(cuda::sample(logits, 1.0f, 0, 1.0f, u.slice(0, 0, 1)), "uniforms [2]");
  EXPECT_KVCACHE_ERROR(cuda::sample(logits, 1.0f, 0, 1.0f, cuda::to_host(u)), "uniforms [2]");
  EXPECT_KVCACHE_ERROR(cuda::sample(cuda::cast(logits, DType::kBFloat16), 1.0f, 0, 1.0f, u),
                       "float32");
}

// --- few-row linear: the GEMV kernel (and its fused silu·up input) -------------------------------
//
// Rows 1 to 8 of a bfloat16 or float16 x go to gemv.cu's kernel when the rows are 16-byte aligned;
// the checks below hold the result to what float32 accumulation allows (1e-6 of Σ|x·w|, measured
// ~1e-7) plus one rounding to the output dtype, against float64 from the same 16-bit inputs.

// Checks out_wide (device [rows, out_f + 9], the product in columns [2, 2 + out_f)) against the
// float64 product `value` (with |x·w| sums `magnitude`) plus, for beta = 1, `residual` (what
// out_wide held before; undefined for beta = 0, where out_wide was poisoned and must stay NaN
// outside the view). Returns the largest error as a fraction of Σ|x·w| through max_err.
void expect_product(const Tensor& out_wide, const Tensor& residual,
                    const std::vector<double>& value, const std::vector<double>& magnitude,
                    std::int64_t rows, std::int64_t out_f, DType out_dtype, double& max_err) {
  const std::vector<double> got = device_values(out_wide);
  const std::vector<double> res = residual.defined() ? to_doubles(residual) : std::vector<double>();
  const std::int64_t width = out_f + 9;
  const double u = unit_roundoff(out_dtype);
  max_err = 0;
  for (std::int64_t r = 0; r < rows; ++r) {
    for (std::int64_t c = 0; c < width; ++c) {
      const std::size_t at_wide = static_cast<std::size_t>(r * width + c);
      const double g = got[at_wide];
      const std::int64_t o = c - 2;
      if (o < 0 || o >= out_f) {  // outside the view: untouched
        if (res.empty()) {
          ASSERT_TRUE(std::isnan(g)) << "column " << c << " of row " << r << " was written";
        } else {
          ASSERT_EQ(g, res[at_wide]) << "column " << c << " of row " << r << " was written";
        }
        continue;
      }
      const std::size_t at = static_cast<std::size_t>(r * out_f + o);
      const double add = res.empty() ? 0.0 : res[at_wide];
      const double want = value[at] + add;
      // float32 accumulation, then one rounding to the output dtype.
      const double e = 1e-6 * (magnitude[at] + std::fabs(add)) + 1e-30;
      const double tol = e + u * (std::fabs(want) + e);
      ASSERT_TRUE(std::isfinite(g)) << "row " << r << " out " << o;
      ASSERT_NEAR(g, want, tol) << "row " << r << " out " << o;
      max_err = std::max(max_err, std::fabs(g - want) / std::max(magnitude[at], 1e-30));
    }
  }
}

// A [rows, out_f + 9] device tensor in `dtype`: NaN (beta 0) or random values kept in `residual`.
Tensor output_for(std::int64_t rows, std::int64_t out_f, DType dtype, float beta, std::mt19937& rng,
                  Tensor& residual) {
  residual = Tensor();
  if (beta == 0.0f) return poisoned_device({rows, out_f + 9}, dtype);
  residual = random_tensor({rows, out_f + 9}, dtype, rng);
  return cuda::to_device(residual);
}

TEST_F(CudaOps, LinearWithFewRowsMatchesFloat64ForEveryRowCount) {
  std::mt19937 rng(24);
  const LinearCase shapes[] = {{0, 576, 257}, {0, 2048, 1000}, {0, 4104, 2560}};
  for (DType wt : {DType::kBFloat16, DType::kFloat16}) {
    for (const LinearCase& shape : shapes) {
      const Tensor w_host = random_tensor({shape.out, shape.in}, wt, rng);
      const Tensor w = cuda::to_device(w_host);
      const std::vector<double> ws = to_doubles(w_host);
      for (std::int64_t rows = 1; rows <= 8; ++rows) {
        // x: columns [8, 8 + in) of [rows, in + 24]: rows 16-byte aligned, row stride in + 24.
        const Tensor x_wide = random_tensor({rows, shape.in + 24}, wt, rng);
        const Tensor x = cuda::to_device(x_wide).slice(1, 8, 8 + shape.in);
        std::vector<double> value, magnitude;
        float64_product(to_doubles(x_wide.slice(1, 8, 8 + shape.in)), ws, rows, shape.in, shape.out,
                        value, magnitude);
        for (DType ot : {wt, DType::kFloat32}) {
          for (float beta : {0.0f, 1.0f}) {
            SCOPED_TRACE(::testing::Message() << "rows " << rows << " in " << shape.in << " out "
                                              << shape.out << " weight " << dtype_name(wt)
                                              << " out " << dtype_name(ot) << " beta " << beta);
            Tensor residual;
            const Tensor out_wide = output_for(rows, shape.out, ot, beta, rng, residual);
            cuda::linear(x, w, out_wide.slice(1, 2, 2 + shape.out), beta);
            double max_err = 0;
            expect_product(out_wide, residual, value, magnitude, rows, shape.out, ot, max_err);
            if (HasFatalFailure()) return;
            if (rows == 1 || rows == 8) {
              std::printf(
                  "[   info   ] linear %lldx%lldx%lld %s->%s beta %g: max err %.2e of "
                  "sum|x w|\n",
                  static_cast<long long>(rows), static_cast<long long>(shape.in),
                  static_cast<long long>(shape.out), std::string(dtype_name(wt)).c_str(),
                  std::string(dtype_name(ot)).c_str(), static_cast<double>(beta), max_err);
            }
          }
        }
      }
    }
  }
}

TEST_F(CudaOps, LinearWithFewUnalignedRowsFallsBackAndStillMatches) {
  std::mt19937 rng(25);
  struct Case {
    std::int64_t rows, in, out, x_offset;  // x: columns [x_offset, x_offset + in) of a wider x
  };
  // in = 4097 (rows not 16-byte multiples); x at an odd column; a one-row x at an odd column.
  const Case cases[] = {{2, 4097, 300, 0}, {4, 2048, 515, 3}, {1, 576, 96, 1}};
  for (DType wt : {DType::kBFloat16, DType::kFloat16}) {
    for (const Case& k : cases) {
      SCOPED_TRACE(::testing::Message() << "rows " << k.rows << " in " << k.in << " out " << k.out
                                        << " x offset " << k.x_offset << " " << dtype_name(wt));
      const Tensor x_wide = random_tensor({k.rows, k.in + 5}, wt, rng);
      const Tensor x = cuda::to_device(x_wide).slice(1, k.x_offset, k.x_offset + k.in);
      const Tensor w_host = random_tensor({k.out, k.in}, wt, rng);
      std::vector<double> value, magnitude;
      float64_product(to_doubles(x_wide.slice(1, k.x_offset, k.x_offset + k.in)),
                      to_doubles(w_host), k.rows, k.in, k.out, value, magnitude);
      for (float beta : {0.0f, 1.0f}) {
        Tensor residual;
        const Tensor out_wide = output_for(k.rows, k.out, DType::kFloat32, beta, rng, residual);
        cuda::linear(x, cuda::to_device(w_host), out_wide.slice(1, 2, 2 + k.out), beta);
        double max_err = 0;
        expect_product(out_wide, residual, value, magnitude, k.rows, k.out, DType::kFloat32,
                       max_err);
        if (HasFatalFailure()) return;
      }
    }
  }
}

TEST_F(CudaOps, LinearSiluMulEqualsSiluMulThenLinear) {
  std::mt19937 rng(26);
  struct Case {
    std::int64_t in, out;
    std::vector<std::int64_t> rows;
  };
  // 1536 → 576 fuses at every row count; 5632 → 2048 fuses up to 4 rows and runs silu_mul then
  // linear beyond (as do 9 rows, past the kernel's 8).
  const Case cases[] = {{1536, 576, {1, 2, 3, 4, 5, 6, 7, 8, 9}}, {5632, 2048, {1, 3, 4, 5, 8}}};
  for (DType wt : kFloatTypes) {
    for (const Case& k : cases) {
      if (wt == DType::kFloat32 && k.in != 1536) continue;
      const Tensor w_host = random_tensor({k.out, k.in}, wt, rng);
      const Tensor w = cuda::to_device(w_host);
      const std::vector<double> ws = to_doubles(w_host);
      for (std::int64_t rows : k.rows) {
        // gate and up: the two halves of a fused [rows, 2 · in] gate|up output; gate over the
        // curved part of silu and its far ends.
        Tensor fused = random_tensor({rows, 2 * k.in}, DType::kFloat32, rng, 6.0f);
        const float specials[] = {-100.0f, -87.5f, 88.9f, 100.0f, 0.0f, -30.0f, 30.0f};
        for (std::size_t i = 0; i < std::size(specials); ++i)
          fused.data_as<float>()[i] = specials[i];
        fused = wt == DType::kFloat32 ? fused : cpu::cast(fused, wt);
        const Tensor fused_device = cuda::to_device(fused);
        const Tensor gate = fused_device.slice(1, 0, k.in);
        const Tensor up = fused_device.slice(1, k.in, 2 * k.in);
        // The reference's x is silu_mul's own output, so the fused path must match it exactly.
        const Tensor x = cuda::silu_mul(gate, up);
        std::vector<double> value, magnitude;
        float64_product(device_values(x), ws, rows, k.in, k.out, value, magnitude);
        const std::vector<DType> outs = wt == DType::kFloat32
                                            ? std::vector<DType>{DType::kFloat32}
                                            : std::vector<DType>{wt, DType::kFloat32};
        for (DType ot : outs) {
          const float beta = ot == DType::kFloat32 ? 1.0f : 0.0f;  // the residual add, or none
          SCOPED_TRACE(::testing::Message()
                       << "rows " << rows << " in " << k.in << " out " << k.out << " weight "
                       << dtype_name(wt) << " out " << dtype_name(ot) << " beta " << beta);
          Tensor residual;
          const Tensor fused_out = output_for(rows, k.out, ot, beta, rng, residual);
          const Tensor split_out =
              beta == 0.0f ? poisoned_device({rows, k.out + 9}, ot) : cuda::to_device(residual);
          cuda::linear_silu_mul(gate, up, w, fused_out.slice(1, 2, 2 + k.out), beta);
          cuda::linear(x, w, split_out.slice(1, 2, 2 + k.out), beta);
          double max_err = 0;
          expect_product(fused_out, residual, value, magnitude, rows, k.out, ot, max_err);
          if (HasFatalFailure()) return;
          // Against silu_mul then linear: both within float32 accumulation of the same product.
          const std::vector<double> a = device_values(fused_out), b = device_values(split_out);
          const std::vector<double> res =
              residual.defined() ? to_doubles(residual) : std::vector<double>();
          const double u = unit_roundoff(ot);
          for (std::int64_t r = 0; r < rows; ++r) {
            for (std::int64_t o = 0; o < k.out; ++o) {
              const std::size_t at = static_cast<std::size_t>(r * (k.out + 9) + o + 2);
              const double add = res.empty() ? 0.0 : std::fabs(res[at]);
              const double sum = magnitude[static_cast<std::size_t>(r * k.out + o)];
              ASSERT_NEAR(a[at], b[at],
                          2e-6 * (sum + add) + u * (std::fabs(a[at]) + std::fabs(b[at])) + 1e-30)
                  << "row " << r << " out " << o;
            }
          }
        }
      }
    }
  }
  // Argument checks.
  const Tensor g = cuda::to_device(random_tensor({2, 16}, DType::kBFloat16, rng));
  const Tensor w = cuda::to_device(random_tensor({8, 16}, DType::kBFloat16, rng));
  const Tensor out = cuda::empty({2, 8}, DType::kFloat32);
  EXPECT_KVCACHE_ERROR(cuda::linear_silu_mul(g, g.slice(0, 0, 1), w, out), "expected up like gate");
  EXPECT_KVCACHE_ERROR(cuda::linear_silu_mul(g, g, cuda::cast(w, DType::kFloat16), out),
                       "expected gate [rows, 16] float16");
  EXPECT_KVCACHE_ERROR(cuda::linear_silu_mul(g, g, w, cuda::empty({2, 9}, DType::kFloat32)),
                       "expected out [2, 8]");
  EXPECT_KVCACHE_ERROR(cuda::linear_silu_mul(g, g, w, cuda::empty({2, 8}, DType::kFloat16)),
                       "got out float16 for weight bfloat16");
  EXPECT_KVCACHE_ERROR(cuda::linear_silu_mul(g, g, cuda::to_host(w), out), "float CUDA weight");
}

// Bytes of two device tensors of one shape and dtype: equal, or the first differing element.
void expect_same_bits(const Tensor& a_device, const Tensor& b_device) {
  const Tensor a = cuda::to_host(a_device), b = cuda::to_host(b_device);
  ASSERT_EQ(a.nbytes(), b.nbytes());
  if (std::memcmp(a.data(), b.data(), a.nbytes()) == 0) return;
  const std::vector<double> av = to_doubles(a), bv = to_doubles(b);
  const std::size_t elem = a.nbytes() / av.size();
  for (std::size_t i = 0; i < av.size(); ++i) {
    if (std::memcmp(static_cast<const unsigned char*>(a.data()) + i * elem,
                    static_cast<const unsigned char*>(b.data()) + i * elem, elem) != 0) {
      FAIL() << "element " << i << " (row " << static_cast<std::int64_t>(i) / a.size(1)
             << ", column " << static_cast<std::int64_t>(i) % a.size(1) << "): fused " << av[i]
             << ", rms_norm then linear " << bv[i];
    }
  }
}

// linear_rms_norm against rms_norm then linear. For 16-bit weights and 1 to 8 rows the GEMV kernel
// makes x itself, with norms.cu's reduction order and rounding, so x holds the same bits, and then
// runs the very plan linear runs on x: the results must be equal bit for bit. 9 rows, float32
// weights, rows too wide to fuse (8 × 4104) and unaligned x take rms_norm then linear, equal too.
TEST_F(CudaOps, LinearRmsNormEqualsRmsNormThenLinearBitForBit) {
  std::mt19937 rng(27);
  struct Case {
    std::int64_t in, out, x_offset;  // x: columns [x_offset, x_offset + in) of [rows, in + 12]
    float eps;
  };
  const Case cases[] = {{576, 257, 4, 1e-5f},
                        {2048, 2560, 4, 1e-6f},
                        {4104, 257, 4, 1e-5f},
                        {576, 2560, 0, 1e-6f},
                        {2048, 257, 1, 1e-5f}};
  for (DType wt : kFloatTypes) {
    for (const Case& k : cases) {
      if (wt == DType::kFloat32 && k.in == 4104) continue;
      const Tensor w_host = random_tensor({k.out, k.in}, wt, rng);
      const Tensor w = cuda::to_device(w_host);
      // norm_weight around 1, as a trained model's are, with a few sign flips.
      Tensor nw_host = random_tensor({k.in}, DType::kFloat32, rng, 0.5f);
      for (std::int64_t i = 0; i < k.in; ++i)
        nw_host.data_as<float>()[i] += i % 7 == 3 ? -1.0f : 1.0f;
      const Tensor nw = cuda::to_device(nw_host);
      for (std::int64_t rows = 1; rows <= 9; ++rows) {
        // hidden: a residual stream with a row of large and a row of tiny values.
        Tensor x_wide = random_tensor({rows, k.in + 12}, DType::kFloat32, rng, 3.0f);
        const float row_scale[] = {1.0f, 40.0f, 1e-3f};
        for (std::int64_t r = 0; r < rows; ++r)
          for (std::int64_t i = 0; i < k.in + 12; ++i)
            x_wide.data_as<float>()[r * (k.in + 12) + i] *= row_scale[r % 3];
        const Tensor x = cuda::to_device(x_wide).slice(1, k.x_offset, k.x_offset + k.in);
        const Tensor normed = cuda::rms_norm(x, nw, k.eps, wt);
        const std::vector<DType> outs = wt == DType::kFloat32
                                            ? std::vector<DType>{DType::kFloat32}
                                            : std::vector<DType>{wt, DType::kFloat32};
        for (DType ot : outs) {
          for (float beta : {0.0f, 1.0f}) {
            SCOPED_TRACE(::testing::Message()
                         << "rows " << rows << " in " << k.in << " out " << k.out << " x offset "
                         << k.x_offset << " weight " << dtype_name(wt) << " out " << dtype_name(ot)
                         << " beta " << beta);
            Tensor residual;
            const Tensor fused_out = output_for(rows, k.out, ot, beta, rng, residual);
            const Tensor split_out =
                beta == 0.0f ? poisoned_device({rows, k.out + 9}, ot) : cuda::to_device(residual);
            cuda::linear_rms_norm(x, nw, k.eps, w, fused_out.slice(1, 2, 2 + k.out), beta);
            cuda::linear(normed, w, split_out.slice(1, 2, 2 + k.out), beta);
            expect_same_bits(fused_out, split_out);
            if (HasFatalFailure()) return;
            if (rows == 1 || rows == 8) {  // and both are the product, within float32 accumulation
              std::vector<double> value, magnitude;
              float64_product(device_values(normed), to_doubles(w_host), rows, k.in, k.out, value,
                              magnitude);
              double max_err = 0;
              expect_product(fused_out, residual, value, magnitude, rows, k.out, ot, max_err);
              if (HasFatalFailure()) return;
            }
          }
        }
      }
    }
  }
  // Argument checks.
  const Tensor x = cuda::to_device(random_tensor({2, 16}, DType::kFloat32, rng));
  const Tensor nw = cuda::to_device(random_tensor({16}, DType::kFloat32, rng));
  const Tensor w = cuda::to_device(random_tensor({8, 16}, DType::kBFloat16, rng));
  const Tensor out = cuda::empty({2, 8}, DType::kFloat32);
  EXPECT_KVCACHE_ERROR(cuda::linear_rms_norm(cuda::cast(x, DType::kBFloat16), nw, 1e-5f, w, out),
                       "expected x [rows, 16] float32");
  EXPECT_KVCACHE_ERROR(cuda::linear_rms_norm(x.slice(1, 0, 8), nw, 1e-5f, w, out),
                       "expected x [rows, 16] float32");
  EXPECT_KVCACHE_ERROR(cuda::linear_rms_norm(x, nw.slice(0, 0, 8), 1e-5f, w, out),
                       "expected norm_weight [16] float32");
  EXPECT_KVCACHE_ERROR(cuda::linear_rms_norm(x, cuda::cast(nw, DType::kBFloat16), 1e-5f, w, out),
                       "expected norm_weight [16] float32");
  EXPECT_KVCACHE_ERROR(cuda::linear_rms_norm(x, nw, 1e-5f, w, cuda::empty({2, 9}, DType::kFloat32)),
                       "expected out [2, 8]");
  EXPECT_KVCACHE_ERROR(cuda::linear_rms_norm(x, nw, 1e-5f, w, cuda::empty({2, 8}, DType::kFloat16)),
                       "got out float16 for weight bfloat16");
  EXPECT_KVCACHE_ERROR(cuda::linear_rms_norm(x, nw, 1e-5f, cuda::to_host(w), out),
                       "float CUDA weight");
}

}  // namespace
}  // namespace kvcache
