// Shared by the benchmark programs: a console reporter that also keeps each benchmark's result
// (the median when repetitions run, else the single run) so main() can print the verdicts the
// issues ask for, and the main() that wires it up.
#pragma once

#include <benchmark/benchmark.h>
#include <unistd.h>

#include <map>
#include <string>
#include <vector>

namespace kvcache::bench {

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

}  // namespace kvcache::bench
