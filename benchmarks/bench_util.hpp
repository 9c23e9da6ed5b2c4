// Shared by the benchmark programs: a console reporter that also keeps each benchmark's result
// (the median when repetitions run, else the single run) so main() can print the verdicts the
// issues ask for, the main() that wires it up, and the streaming read that bandwidth-bound
// benchmarks (attention decode, model decode) are measured against.
#pragma once

#include <benchmark/benchmark.h>
#include <omp.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <map>
#include <string>
#include <vector>

#include "kvcache/backend/cpu.hpp"
#include "kvcache/tensor.hpp"

namespace kvcache::bench {

// --- streaming read --------------------------------------------------------------------------

// 1 GiB: far past the last-level cache (the VM reports 480 MiB, but reads of 256 MiB already run
// at DRAM speed here), so the read measures DRAM.
inline constexpr std::int64_t kStreamFloats = (std::int64_t{1} << 30) / 4;
inline constexpr int kStreamCalibrationPasses = 7;

/// What the streaming read has measured in this process: every pass's seconds from
/// BM_StreamingRead (all repetitions), and their median in bytes/s (0 until measured).
struct StreamingRead {
  std::vector<double> pass_seconds;
  double bytes_per_second = 0.0;
};

inline StreamingRead& streaming_read() {
  static StreamingRead state;
  return state;
}

/// A float buffer [count] touched first by the threads that later read it, outside any timing,
/// so page faults and zeroing never count as read time.
inline Tensor make_stream_buffer(std::int64_t count) {
  Tensor buffer = Tensor::empty({count}, DType::kFloat32);
  float* data = buffer.data_as<float>();
#pragma omp parallel for schedule(static)
  for (std::int64_t i = 0; i < count; ++i) data[i] = static_cast<float>(i & 1023) * 1e-3f;
  return buffer;
}

inline const Tensor& stream_buffer() {
  static const Tensor buffer = make_stream_buffer(kStreamFloats);
  return buffer;
}

/// One pass: each of the library's threads sums its contiguous share of the buffer. 64
/// independent partial sums keep the adds off the critical path so the loop is bound by loads
/// alone.
inline double stream_pass_seconds(const Tensor& buffer) {
  const float* data = buffer.data_as<float>();
  const std::int64_t count = buffer.numel();
  const auto start = std::chrono::steady_clock::now();
  float total = 0.0f;
#pragma omp parallel reduction(+ : total)
  {
    const std::int64_t threads = omp_get_num_threads(), t = omp_get_thread_num();
    constexpr std::int64_t kLanes = 64;  // the share boundaries stay multiples of this
    const std::int64_t blocks = count / kLanes;
    const std::int64_t begin = blocks * t / threads * kLanes;
    const std::int64_t end = blocks * (t + 1) / threads * kLanes;
    float partial[kLanes] = {};
    for (std::int64_t i = begin; i < end; i += kLanes)
      for (std::int64_t j = 0; j < kLanes; ++j) partial[j] += data[i + j];
    for (float p : partial) total += p;
  }
  benchmark::DoNotOptimize(total);
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
}

inline double median(std::vector<double> values) {
  std::sort(values.begin(), values.end());
  const std::size_t n = values.size();
  return n % 2 ? values[n / 2] : 0.5 * (values[n / 2 - 1] + values[n / 2]);
}

inline constexpr double stream_bytes() { return static_cast<double>(kStreamFloats) * 4.0; }

inline void bm_streaming_read(benchmark::State& state) {
  StreamingRead& stream = streaming_read();
  const Tensor& buffer = stream_buffer();
  stream_pass_seconds(buffer);  // warm the TLB and the threads; not a measurement
  for (auto _ : state) {
    const double seconds = stream_pass_seconds(buffer);
    state.SetIterationTime(seconds);
    stream.pass_seconds.push_back(seconds);
  }
  stream.bytes_per_second = stream_bytes() / median(stream.pass_seconds);
  state.SetBytesProcessed(state.iterations() * static_cast<std::int64_t>(stream_bytes()));
  state.counters["threads"] = cpu::num_threads();
  // The figure the bandwidth ratios divide by: median pass over every repetition so far, GB/s.
  state.counters["median_GBps"] = stream.bytes_per_second * 1e-9;
}

/// Registers BM_StreamingRead. Register it first, so it runs first and the ratios of the
/// benchmarks after it divide by this run's figure.
inline benchmark::internal::Benchmark* register_streaming_read() {
  return benchmark::RegisterBenchmark("BM_StreamingRead", bm_streaming_read)
      ->UseManualTime()
      ->Unit(benchmark::kMillisecond);
}

/// The streaming bandwidth the ratios use, in bytes/s. When BM_StreamingRead was filtered out, a
/// few passes are timed here so the ratios still mean something.
inline double streaming_bytes_per_second() {
  StreamingRead& stream = streaming_read();
  if (stream.bytes_per_second <= 0.0) {
    const Tensor& buffer = stream_buffer();
    stream_pass_seconds(buffer);
    std::vector<double> seconds;
    for (int i = 0; i < kStreamCalibrationPasses; ++i)
      seconds.push_back(stream_pass_seconds(buffer));
    stream.bytes_per_second = stream_bytes() / median(seconds);
  }
  return stream.bytes_per_second;
}

// --- reporting -------------------------------------------------------------------------------

class CollectingReporter : public benchmark::ConsoleReporter {
 public:
  struct Result {
    double cpu_ns = -1.0;  // per iteration; negative: did not run (filtered out or failed)
    double real_ns = -1.0;
    benchmark::UserCounters counters;
  };

  using ConsoleReporter::ConsoleReporter;

  void ReportRuns(const std::vector<Run>& runs) override {
    ConsoleReporter::ReportRuns(runs);
    for (const Run& run : runs) {
      if (run.error_occurred) continue;
      const bool median = run.run_type == Run::RT_Aggregate && run.aggregate_name == "median";
      if (run.run_type == Run::RT_Aggregate && !median) continue;
      std::string key = run.run_name.function_name;
      if (!run.run_name.args.empty()) key += "/" + run.run_name.args;
      Seen& seen = seen_[key];
      if (seen.from_median && !median) continue;
      const double to_ns = 1e9 / benchmark::GetTimeUnitMultiplier(run.time_unit);
      seen = {{run.GetAdjustedCPUTime() * to_ns, run.GetAdjustedRealTime() * to_ns, run.counters},
              median};
    }
  }

  /// Result of `name` ("<function>/<args>").
  Result result(const std::string& name) const {
    auto it = seen_.find(name);
    return it == seen_.end() ? Result{} : it->second.result;
  }

  /// Counter `counter` of `name`, or a negative value if it did not run.
  double counter(const std::string& name, const std::string& counter) const {
    const Result r = result(name);
    auto c = r.counters.find(counter);
    return c == r.counters.end() ? -1.0 : c->second.value;
  }

 private:
  struct Seen {
    Result result;
    bool from_median = false;
  };
  std::map<std::string, Seen> seen_;
};

/// Registers, runs with the collecting reporter, then prints the program's summary.
template <class Register, class Summary>
int run_main(int argc, char** argv, Register register_benchmarks, Summary print_summary) {
  register_benchmarks();
  benchmark::Initialize(&argc, argv);
  if (benchmark::ReportUnrecognizedArguments(argc, argv)) return 1;
  CollectingReporter reporter(isatty(STDOUT_FILENO) ? benchmark::ConsoleReporter::OO_Color
                                                    : benchmark::ConsoleReporter::OO_None);
  benchmark::RunSpecifiedBenchmarks(&reporter);
  print_summary(reporter);
  benchmark::Shutdown();
  return 0;
}

/// "<family>/<dtype>". Built by appending: g++ 12 gives a false -Wrestrict for "literal" + string.
inline std::string family_name(const char* family, DType dtype) {
  std::string name = family;
  name += '/';
  name += kvcache::dtype_name(dtype);
  return name;
}

/// The summary's first line: this run's streaming read, when it ran or was calibrated.
inline void print_streaming_read() {
  const double stream = streaming_read().bytes_per_second;
  if (stream > 0.0) {
    std::printf("Streaming read (%d threads, 1 GiB, median pass): %.1f GB/s\n",
                kvcache::cpu::num_threads(), stream * 1e-9);
  }
}

}  // namespace kvcache::bench
