// Private to the CPU backend: how many threads a parallel region gets, and how its rows are
// handed out, so that decode (and prefill) do not collapse when another process takes a core.
//
// A decode step is ~150 short parallel regions (every matrix-vector product, the attention), each
// ending in OpenMP's join barrier. When a core is shared with a busy process, one of our threads
// is off the CPU for whole scheduler slices (milliseconds) and every region waits at its barrier
// for it; worse, libgomp's idle workers spin (GOMP_SPINCOUNT, ~300000 pauses) on the other core,
// so the scheduler never moves the calling thread off the busy one. Decode fell from 40–51 tok/s
// single-threaded to 10–15 (once 0.35) with two threads. libgomp's wait policy cannot be changed
// once it has read its environment, so two things are done here instead:
//   - rows go out in chunks from a shared counter (DynamicRows), so a thread that starts late or
//     runs slowly takes fewer rows and the others take the rest, instead of a fixed share each;
//   - every thread marks when its work ends (Timer); the spread between the first and the last
//     mark is how late the slowest thread was, whichever it is (the caller or a worker). A spread
//     over kStallSeconds and over half the region's work means a thread was not running: the
//     following regions then run on the calling thread alone (no barrier, no wake-up; the
//     workers stop spinning and sleep, so the scheduler can put the caller on the freer core) for
//     a stretch that doubles with every stall (kMinSoloRegions up to kMaxSoloRegions, about a
//     hundred decode steps), after which one region tries the full team again. kResetRegions
//     full-team regions in a row without a stall bring the stretch back to its minimum.
// On an idle machine no region stalls and every region gets the full team (the cost is a clock
// read and two atomics per thread per region). The state is per calling thread, like OpenMP's own
// thread count. Which rows a thread computes never changes a result: every output row is computed
// by the same code whichever thread takes it.
#pragma once

#include <omp.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdint>
#include <limits>

namespace kvcache::cpu::team {

inline constexpr double kStallSeconds = 200e-6;
inline constexpr std::int64_t kMinSoloRegions = 64;
inline constexpr std::int64_t kMaxSoloRegions = 16384;
inline constexpr std::int64_t kResetRegions = 256;

struct State {
  std::int64_t solo_left = 0;                   // regions still to run on the caller alone
  std::int64_t solo_stretch = kMinSoloRegions;  // how long the next solo stretch is
  std::int64_t clean_regions = 0;               // full-team regions in a row without a stall
  std::int64_t stalls = 0;                      // stalls seen (for debugging)
};

inline State& state() {
  thread_local State per_thread;
  return per_thread;
}

/// Threads for the next region: OpenMP's maximum, or 1 during a solo stretch.
inline int size() {
  const int max_threads = omp_get_max_threads();
  if (max_threads <= 1) return 1;
  State& s = state();
  if (s.solo_left > 0) {
    --s.solo_left;
    return 1;
  }
  return max_threads;
}

/// What the calling thread learnt from one region run on `team` threads: `work_s` from the
/// region's start to the first thread's end of work, `spread_s` from there to the last thread's
/// (a thread that started late, or was taken off its core mid-chunk, makes the spread).
inline void report_region(int team, double work_s, double spread_s) {
  if (team <= 1) return;
  State& s = state();
  if (spread_s > kStallSeconds && spread_s > 0.5 * work_s) {
    ++s.stalls;
    s.solo_left = s.solo_stretch;
    s.solo_stretch = std::min(kMaxSoloRegions, s.solo_stretch * 2);
    s.clean_regions = 0;
  } else if (++s.clean_regions >= kResetRegions) {
    s.solo_stretch = kMinSoloRegions;
  }
}

/// Times one region: construct it before `#pragma omp parallel num_threads(team)`, call
/// mark_done() on every thread of the team after its last chunk, and finish() after the region.
/// Whichever thread lags, the calling thread or a worker, shows as the spread between the first
/// and the last mark_done().
class Timer {
 public:
  explicit Timer(int team) : team_(team), start_(now_ns()) {}
  void mark_done() {
    const std::int64_t t = now_ns();
    std::int64_t seen = first_.load(std::memory_order_relaxed);
    while (t < seen && !first_.compare_exchange_weak(seen, t, std::memory_order_relaxed)) {
    }
    seen = last_.load(std::memory_order_relaxed);
    while (t > seen && !last_.compare_exchange_weak(seen, t, std::memory_order_relaxed)) {
    }
  }
  void finish() const {
    const std::int64_t first = first_.load(std::memory_order_relaxed),
                       last = last_.load(std::memory_order_relaxed);
    if (last < first) return;  // no thread marked
    report_region(team_, 1e-9 * static_cast<double>(first - start_),
                  1e-9 * static_cast<double>(last - first));
  }

 private:
  static std::int64_t now_ns() {
    return std::chrono::duration_cast<std::chrono::nanoseconds>(
               std::chrono::steady_clock::now().time_since_epoch())
        .count();
  }
  int team_;
  std::int64_t start_;
  std::atomic<std::int64_t> first_{std::numeric_limits<std::int64_t>::max()};
  std::atomic<std::int64_t> last_{std::numeric_limits<std::int64_t>::min()};
};

/// Hands out [0, total) in chunks of `chunk` (a multiple of 4 rows) from a shared counter.
class DynamicRows {
 public:
  DynamicRows(std::int64_t total, int team) : total_(total) {
    const std::int64_t per = (total + 8 * team - 1) / (8 * team);  // about 8 chunks per thread
    chunk_ = std::max<std::int64_t>(32, (per + 3) / 4 * 4);
  }
  /// The next chunk [begin, end); false when none is left.
  bool next(std::int64_t& begin, std::int64_t& end) {
    const std::int64_t c = next_.fetch_add(1, std::memory_order_relaxed);
    begin = c * chunk_;
    if (begin >= total_) return false;
    end = std::min(total_, begin + chunk_);
    return true;
  }

 private:
  std::int64_t total_;
  std::int64_t chunk_ = 32;
  std::atomic<std::int64_t> next_{0};
};

}  // namespace kvcache::cpu::team
