// Private to the library: carrying an exception out of an OpenMP parallel region.
//
// Why: an exception that leaves an OpenMP structured block (or a thread of the team) calls
// std::terminate, so a std::bad_alloc from a scratch buffer resized inside a region (or a
// kvcache::Error from a check there) would abort the program instead of reaching the caller.
// Each piece of work in a region that can throw runs through ParallelErrors::run, which keeps
// the first exception and makes the rest of the team skip their remaining pieces; after the
// region the caller rethrows it. The pieces are caught one by one (not the whole region), so
// every thread still reaches every worksharing construct and barrier of the region: a thread
// that left early would leave the others waiting at the next `omp for` for ever.
#pragma once

#include <atomic>
#include <exception>
#include <mutex>

namespace kvcache::detail {

class ParallelErrors {
 public:
  /// Runs f() (one piece of a region's work) unless a piece has failed already; an exception
  /// from it is kept (the first one only) instead of leaving the region.
  template <class F>
  void run(F&& f) noexcept {
    if (failed_.load(std::memory_order_relaxed)) return;
    try {
      f();
    } catch (...) {
      // current_exception() takes a reference to the exception in flight: no allocation.
      const std::lock_guard<std::mutex> lock(mutex_);
      if (!error_) error_ = std::current_exception();
      failed_.store(true, std::memory_order_relaxed);
    }
  }

  /// After the region: rethrows the kept exception, if a piece failed.
  void rethrow_if_failed() {
    const std::lock_guard<std::mutex> lock(mutex_);
    if (error_) std::rethrow_exception(error_);
  }

 private:
  std::atomic<bool> failed_{false};
  std::mutex mutex_;
  std::exception_ptr error_;
};

}  // namespace kvcache::detail
