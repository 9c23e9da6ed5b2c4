// Decode's projections on the GPU: cuda::linear with 1 or 8 rows of x (the GEMV kernel of
// cuda/gemv.cu) against cuBLAS doing the same product, for the matrices of three models:
//
// - BM_GemvCuda/<shape>/<rows>: cuda::linear, bfloat16 weights; out bfloat16 (beta 0) for the
//   fused q|k|v and gate|up projections, float32 with beta 1 (the residual add) for o and down,
//   float32 (beta 0, the logits) for the LM head.
// - BM_GemvSiluCuda/<down shape>/<rows>: cuda::linear_silu_mul, the down projection with its input
//   silu(gate) · up made on the fly from the halves of a [rows, 2 · in] gate|up output (one fused
//   kernel where it serves the call, silu_mul then linear elsewhere).
// - BM_GemvRmsNormCuda/<q|k|v or gate|up shape>/<rows>: cuda::linear_rms_norm, the projection
//   with its input rms_norm(hidden) made on the fly from float32 hidden rows (one fused kernel
//   where it serves the call); BM_RmsNormThenGemvCuda the same as cuda::rms_norm then
//   cuda::linear, two launches.
// - BM_GemmCublasCuda/<shape>/<rows>: the same product through cublasGemmEx, configured as
//   cuda::linear configures it (float32 compute, no reduced-precision reduction, a 32 MiB
//   workspace of ours), for comparison.
//
// read_TBps is weight bytes read per second (x and out are a few KiB); call_us the GPU time of
// one call, from CUDA events around a batch of calls (UseManualTime); host_us the CPU time to issue
// one call (while the GPU is busy, so the issue never waits). Every timed call reads a different
// copy of the weight, cycling through enough copies that 512 MiB lies between two reads of the
// same bytes: the 50 MiB L2 never holds them, as in a real model's step. graph_call_us and
// graph_read_TBps replay the same calls as a CUDA graph, without the host's launch cost between
// them (which, for the small matrices, exceeds the kernel's time). Every benchmark skips where no
// GPU is present.
#include <benchmark/benchmark.h>
#include <cublas_v2.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <stdexcept>
#include <string>
#include <vector>

#include "cuda_bench_util.hpp"
#include "kvcache/backend/cuda.hpp"
#include "kvcache/tensor.hpp"

namespace {

using kvcache::DType;
using kvcache::Tensor;
namespace cuda = kvcache::cuda;
using kvcache::bench_cuda::check;
using kvcache::bench_cuda::EventTimer;
using kvcache::bench_cuda::graph_seconds_per_call;
using kvcache::bench_cuda::skip_without_device;
using kvcache::bench_cuda::stream;

constexpr int kCallsPerIteration = 32;  // calls between two events
constexpr double kColdBytes = 512.0 * (1 << 20);

void check(cublasStatus_t status, const char* what) {
  if (status != CUBLAS_STATUS_SUCCESS)
    throw std::runtime_error(std::string(what) + ": " + cublasGetStatusString(status));
}

// --- the shapes ----------------------------------------------------------------------------------

enum class Output {
  kBFloat16,  // bfloat16, beta 0: a fused projection's output
  kResidual,  // float32, beta 1: the residual stream
  kLogits,    // float32, beta 0
};

struct Shape {
  const char* name;
  std::int64_t out_features, in;
  Output output;
};

constexpr Shape kShapes[] = {
    {"tinyllama_qkv", 2560, 2048, Output::kBFloat16},
    {"tinyllama_o", 2048, 2048, Output::kResidual},
    {"tinyllama_gate_up", 11264, 2048, Output::kBFloat16},
    {"tinyllama_down", 2048, 5632, Output::kResidual},
    {"tinyllama_lm_head", 32000, 2048, Output::kLogits},
    {"llama2_7b_qkv", 12288, 4096, Output::kBFloat16},
    {"llama2_7b_o", 4096, 4096, Output::kResidual},
    {"llama2_7b_gate_up", 22016, 4096, Output::kBFloat16},
    {"llama2_7b_down", 4096, 11008, Output::kResidual},
    {"llama2_7b_lm_head", 32000, 4096, Output::kLogits},
    {"smollm2_qkv", 960, 576, Output::kBFloat16},
    {"smollm2_o", 576, 576, Output::kResidual},
    {"smollm2_gate_up", 3072, 576, Output::kBFloat16},
    {"smollm2_down", 576, 1536, Output::kResidual},
    {"smollm2_lm_head", 49152, 576, Output::kLogits},
};

bool is_down(const Shape& shape) { return std::string(shape.name).ends_with("_down"); }
bool is_normed(const Shape& shape) {
  const std::string name = shape.name;
  return name.ends_with("_qkv") || name.ends_with("_gate_up");
}

// What one benchmark row holds: `copies` bfloat16 weights [out_features, in] in one allocation,
// x (or gate|up) and out.
struct Problem {
  Tensor weights;  // [copies, out_features, in]
  std::vector<Tensor> weight;
  Tensor x;      // [rows, in] bfloat16
  Tensor fused;  // [rows, 2 · in] bfloat16: gate | up
  Tensor out;    // [rows, out_features]
  float beta = 0.0f;
  double weight_bytes = 0.0;

  Problem(const Shape& shape, std::int64_t rows) {
    weight_bytes = 2.0 * static_cast<double>(shape.out_features * shape.in);
    const auto copies = std::max<std::int64_t>(
        2, static_cast<std::int64_t>((kColdBytes + weight_bytes - 1) / weight_bytes));
    weights = cuda::empty({copies, shape.out_features, shape.in}, DType::kBFloat16);
    cuda::fill_uniform(weights, 1, -1.0f, 1.0f);
    for (std::int64_t c = 0; c < copies; ++c)
      weight.push_back(weights.slice(0, c, c + 1).view({shape.out_features, shape.in}));
    x = cuda::empty({rows, shape.in}, DType::kBFloat16);
    cuda::fill_uniform(x, 2, -1.0f, 1.0f);
    fused = cuda::empty({rows, 2 * shape.in}, DType::kBFloat16);
    cuda::fill_uniform(fused, 3, -4.0f, 4.0f);
    const DType out_dtype = shape.output == Output::kBFloat16 ? DType::kBFloat16 : DType::kFloat32;
    out = cuda::empty({rows, shape.out_features}, out_dtype);
    cuda::fill_uniform(out, 4, -1.0f, 1.0f);
    beta = shape.output == Output::kResidual ? 1.0f : 0.0f;
  }
};

// Times `call(weight)` over the problem's weight copies and sets the row's counters.
template <class Call, class Bind>
void run(benchmark::State& state, Problem& p, Call&& call, Bind&& bind) {
  std::size_t next = 0;
  auto calls = [&](int count) {
    for (int c = 0; c < count; ++c) {
      call(p.weight[next]);
      next = (next + 1) % p.weight.size();
    }
  };
  EventTimer timer;
  timer.seconds([&] { calls(static_cast<int>(2 * p.weight.size()) + 4); });  // warm-up
  double total = 0.0, host_total = 0.0;
  for (auto _ : state) {
    double host = 0.0;
    const double s = timer.seconds([&] { calls(kCallsPerIteration); }, &host);
    state.SetIterationTime(s);
    total += s;
    host_total += host;
  }
  const double n = static_cast<double>(state.iterations()) * kCallsPerIteration;
  state.SetBytesProcessed(static_cast<std::int64_t>(p.weight_bytes * n));
  state.counters["call_us"] = total / n * 1e6;
  state.counters["host_us"] = host_total / n * 1e6;
  state.counters["read_TBps"] = p.weight_bytes * n / total * 1e-12;
  state.counters["copies"] = static_cast<double>(p.weight.size());
  const double graph_s = graph_seconds_per_call(
      kCallsPerIteration, [&] { calls(kCallsPerIteration); }, bind);
  if (graph_s > 0.0) {
    state.counters["graph_call_us"] = graph_s * 1e6;
    state.counters["graph_read_TBps"] = p.weight_bytes / graph_s * 1e-12;
  }
}

void bm_gemv_cuda(benchmark::State& state, const Shape& shape, std::int64_t rows) {
  if (skip_without_device(state)) return;
  Problem p(shape, rows);
  run(
      state, p, [&](const Tensor& w) { cuda::linear(p.x, w, p.out, p.beta); }, [] {});
}

void bm_gemv_silu_cuda(benchmark::State& state, const Shape& shape, std::int64_t rows) {
  if (skip_without_device(state)) return;
  Problem p(shape, rows);
  const Tensor gate = p.fused.slice(1, 0, shape.in);
  const Tensor up = p.fused.slice(1, shape.in, 2 * shape.in);
  run(
      state, p, [&](const Tensor& w) { cuda::linear_silu_mul(gate, up, w, p.out, p.beta); }, [] {});
}

// The float32 hidden rows and the norm weight for the rms_norm rows.
struct NormInputs {
  Tensor hidden, norm_weight;
  NormInputs(const Shape& shape, std::int64_t rows) {
    hidden = cuda::empty({rows, shape.in}, DType::kFloat32);
    cuda::fill_uniform(hidden, 5, -3.0f, 3.0f);
    norm_weight = cuda::empty({shape.in}, DType::kFloat32);
    cuda::fill_uniform(norm_weight, 6, 0.5f, 1.5f);
  }
};

void bm_gemv_rms_norm_cuda(benchmark::State& state, const Shape& shape, std::int64_t rows) {
  if (skip_without_device(state)) return;
  Problem p(shape, rows);
  const NormInputs n(shape, rows);
  run(
      state, p,
      [&](const Tensor& w) {
        cuda::linear_rms_norm(n.hidden, n.norm_weight, 1e-5f, w, p.out, p.beta);
      },
      [] {});
}

void bm_rms_norm_then_gemv_cuda(benchmark::State& state, const Shape& shape, std::int64_t rows) {
  if (skip_without_device(state)) return;
  Problem p(shape, rows);
  const NormInputs n(shape, rows);
  run(
      state, p,
      [&](const Tensor& w) {
        cuda::linear(cuda::rms_norm(n.hidden, n.norm_weight, 1e-5f, DType::kBFloat16), w, p.out,
                     p.beta);
      },
      [] {});
}

// cublasGemmEx as cuda::linear calls it (cuda/gemm.cu): C = Wᵀ·x in column-major terms.
class Cublas {
 public:
  Cublas() {
    check(cublasCreate(&handle_), "cublasCreate");
    check(cublasSetPointerMode(handle_, CUBLAS_POINTER_MODE_HOST), "cublasSetPointerMode");
    check(cublasSetMathMode(
              handle_, static_cast<cublasMath_t>(CUBLAS_DEFAULT_MATH |
                                                 CUBLAS_MATH_DISALLOW_REDUCED_PRECISION_REDUCTION)),
          "cublasSetMathMode");
    workspace_ = cuda::empty({kWorkspaceBytes}, DType::kUInt8);
    bind();
  }
  ~Cublas() { (void)cublasDestroy(handle_); }
  Cublas(const Cublas&) = delete;
  Cublas& operator=(const Cublas&) = delete;

  /// Binds the handle to the backend's current stream (which resets the workspace: set it again).
  void bind() {
    check(cublasSetStream(handle_, stream()), "cublasSetStream");
    check(cublasSetWorkspace(handle_, workspace_.data(), kWorkspaceBytes), "cublasSetWorkspace");
  }

  void gemm(const Tensor& x, const Tensor& w, const Tensor& out, float beta) {
    const float alpha = 1.0f;
    const int m = static_cast<int>(w.size(0)), n = static_cast<int>(x.size(0));
    const int k = static_cast<int>(w.size(1));
    const cudaDataType_t out_type = out.dtype() == DType::kFloat32 ? CUDA_R_32F : CUDA_R_16BF;
    check(cublasGemmEx(handle_, CUBLAS_OP_T, CUBLAS_OP_N, m, n, k, &alpha, w.data(), CUDA_R_16BF, k,
                       x.data(), CUDA_R_16BF, k, &beta, out.data(), out_type, m, CUBLAS_COMPUTE_32F,
                       CUBLAS_GEMM_DEFAULT),
          "cublasGemmEx");
  }

 private:
  static constexpr std::int64_t kWorkspaceBytes = 32 << 20;
  cublasHandle_t handle_ = nullptr;
  Tensor workspace_;
};

void bm_gemm_cublas_cuda(benchmark::State& state, const Shape& shape, std::int64_t rows) {
  if (skip_without_device(state)) return;
  Problem p(shape, rows);
  Cublas cublas;
  run(
      state, p, [&](const Tensor& w) { cublas.gemm(p.x, w, p.out, p.beta); },
      [&] { cublas.bind(); });
}

}  // namespace

int main(int argc, char** argv) {
  const std::int64_t row_counts[] = {1, 8};
  auto add = [](const std::string& name, auto fn, const Shape& shape, std::int64_t rows) {
    benchmark::RegisterBenchmark(name.c_str(), fn, shape, rows)
        ->UseManualTime()
        ->Unit(benchmark::kMicrosecond);
  };
  for (const Shape& shape : kShapes)
    for (std::int64_t rows : row_counts)
      add(std::string("BM_GemvCuda/") + shape.name + "/" + std::to_string(rows), bm_gemv_cuda,
          shape, rows);
  for (const Shape& shape : kShapes) {
    if (!is_down(shape)) continue;
    for (std::int64_t rows : row_counts)
      add(std::string("BM_GemvSiluCuda/") + shape.name + "/" + std::to_string(rows),
          bm_gemv_silu_cuda, shape, rows);
  }
  for (const Shape& shape : kShapes) {
    if (!is_normed(shape)) continue;
    for (std::int64_t rows : row_counts) {
      add(std::string("BM_GemvRmsNormCuda/") + shape.name + "/" + std::to_string(rows),
          bm_gemv_rms_norm_cuda, shape, rows);
      add(std::string("BM_RmsNormThenGemvCuda/") + shape.name + "/" + std::to_string(rows),
          bm_rms_norm_then_gemv_cuda, shape, rows);
    }
  }
  for (const Shape& shape : kShapes)
    for (std::int64_t rows : row_counts)
      add(std::string("BM_GemmCublasCuda/") + shape.name + "/" + std::to_string(rows),
          bm_gemm_cublas_cuda, shape, rows);
  benchmark::Initialize(&argc, argv);
  if (benchmark::ReportUnrecognizedArguments(argc, argv)) return 1;
  benchmark::RunSpecifiedBenchmarks();
  benchmark::Shutdown();
  return 0;
}
