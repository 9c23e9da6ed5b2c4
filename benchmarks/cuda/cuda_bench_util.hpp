// Helpers the GPU benchmark programs share: checked CUDA calls, the backend's stream, skipping
// without a device, GPU time between CUDA events, and the time per call of a batch of calls
// captured once into a CUDA graph and replayed (what the calls cost without the host's launches).
#pragma once

#include <benchmark/benchmark.h>
#include <cuda_runtime.h>

#include <chrono>
#include <exception>
#include <stdexcept>
#include <string>

#include "kvcache/backend/cuda.hpp"

namespace kvcache::bench_cuda {

inline void check(cudaError_t status, const char* what) {
  if (status != cudaSuccess)
    throw std::runtime_error(std::string(what) + ": " + cudaGetErrorString(status));
}

/// The stream kvcache's CUDA backend issues work on.
inline cudaStream_t stream() { return static_cast<cudaStream_t>(cuda::current_stream()); }

inline bool skip_without_device(benchmark::State& state) {
  if (cuda::device_count() > 0) return false;
  state.SkipWithError("no CUDA device");
  return true;
}

/// Seconds of GPU time between two events recorded around `work` on the backend's stream, and
/// (when asked) the host seconds `work` took to issue.
class EventTimer {
 public:
  EventTimer() {
    check(cudaEventCreate(&start_), "cudaEventCreate");
    check(cudaEventCreate(&stop_), "cudaEventCreate");
  }
  ~EventTimer() {
    (void)cudaEventDestroy(start_);
    (void)cudaEventDestroy(stop_);
  }
  EventTimer(const EventTimer&) = delete;
  EventTimer& operator=(const EventTimer&) = delete;

  template <class Work>
  double seconds(Work&& work, double* host_seconds = nullptr) {
    check(cudaEventRecord(start_, stream()), "cudaEventRecord");
    const auto issue = std::chrono::steady_clock::now();
    work();
    const auto issued = std::chrono::steady_clock::now();
    check(cudaEventRecord(stop_, stream()), "cudaEventRecord");
    check(cudaEventSynchronize(stop_), "cudaEventSynchronize");
    float ms = 0.0f;
    check(cudaEventElapsedTime(&ms, start_, stop_), "cudaEventElapsedTime");
    if (host_seconds) *host_seconds = std::chrono::duration<double>(issued - issue).count();
    return ms * 1e-3;
  }

 private:
  cudaEvent_t start_ = nullptr, stop_ = nullptr;
};

/// Seconds per call of `record` (which issues `calls` calls) captured once into a CUDA graph on
/// a stream of its own and replayed; 0 when the capture fails (then the row has no graph
/// counters). `bind` is called with the capture stream current before recording and with the
/// previous stream current after (for handles that remember a stream, like cuBLAS's).
template <class Record, class Bind>
double graph_seconds_per_call(int calls, Record&& record, Bind&& bind) {
  constexpr int kReplays = 20;
  const cuda::Stream previous = cuda::current_stream();
  cudaStream_t capture = nullptr;
  check(cudaStreamCreateWithFlags(&capture, cudaStreamNonBlocking), "cudaStreamCreate");
  cuda::set_stream(capture);
  bind();
  cudaGraph_t graph = nullptr;
  cudaGraphExec_t exec = nullptr;
  double seconds = 0.0;
  bool captured = false;
  if (cudaStreamBeginCapture(capture, cudaStreamCaptureModeThreadLocal) == cudaSuccess) {
    try {
      record();
    } catch (const std::exception&) {
      // not capturable: fall through with captured = false
    }
    captured = cudaStreamEndCapture(capture, &graph) == cudaSuccess && graph != nullptr &&
               cudaGraphInstantiate(&exec, graph, 0) == cudaSuccess;
  }
  if (captured) {
    EventTimer timer;
    timer.seconds([&] {
      for (int i = 0; i < 3; ++i) check(cudaGraphLaunch(exec, capture), "cudaGraphLaunch");
    });
    seconds = timer.seconds([&] {
      for (int i = 0; i < kReplays; ++i) check(cudaGraphLaunch(exec, capture), "cudaGraphLaunch");
    });
    seconds /= static_cast<double>(kReplays) * calls;
  }
  (void)cudaGetLastError();  // a failed capture leaves its error behind
  if (exec) (void)cudaGraphExecDestroy(exec);
  if (graph) (void)cudaGraphDestroy(graph);
  check(cudaStreamSynchronize(capture), "cudaStreamSynchronize");
  cuda::set_stream(previous);
  bind();
  (void)cudaStreamDestroy(capture);
  return seconds;
}

template <class Record>
double graph_seconds_per_call(int calls, Record&& record) {
  return graph_seconds_per_call(calls, record, [] {});
}

}  // namespace kvcache::bench_cuda
