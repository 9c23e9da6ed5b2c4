// CPU decode on a shared machine (GenerationConfig::adapt_decode_threads, issue #11): generate()
// may run decode steps on the calling thread alone when other processes starve its team of CPU
// time. That is only safe because a decode step computes the same bits on any thread count, which
// the first test checks for each kind of weight holding (float32, bfloat16, the quantized block
// kernels of the default model) and for one row and a left-padded batch. The second runs
// generate() while busy processes take the cores, so that steps really do move to one thread on a
// small machine, and expects the tokens of an unloaded run. No timing is asserted: how many steps
// ran on one thread depends on the machine, and is only printed. A prefill computes the same bits
// on any thread count too (its GEMM panels are not sized per thread), checked past the row
// kernels' sizes.
#include <gtest/gtest.h>

#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <optional>
#include <string>
#include <vector>

#include <signal.h>
#include <sys/prctl.h>
#include <sys/wait.h>
#include <unistd.h>

#include "kvcache/attention/mask.hpp"
#include "kvcache/backend/cpu.hpp"
#include "kvcache/cache/dynamic_cache.hpp"
#include "kvcache/generation/generate.hpp"
#include "kvcache/model/llama.hpp"
#include "test_util.hpp"

namespace kvcache {
namespace {

// Restores the calling thread's CPU thread count.
class ThreadCountGuard {
 public:
  ThreadCountGuard() : saved_(cpu::num_threads()) {}
  ~ThreadCountGuard() { cpu::set_num_threads(saved_); }
  ThreadCountGuard(const ThreadCountGuard&) = delete;
  ThreadCountGuard& operator=(const ThreadCountGuard&) = delete;

 private:
  int saved_;
};

Tensor ids_tensor(const std::vector<std::vector<std::int64_t>>& rows) {
  const auto batch = static_cast<std::int64_t>(rows.size());
  const auto len = static_cast<std::int64_t>(rows[0].size());
  Tensor t = Tensor::empty({batch, len}, DType::kInt64);
  for (std::int64_t b = 0; b < batch; ++b)
    std::memcpy(t.data_as<std::int64_t>() + b * len, rows[static_cast<std::size_t>(b)].data(),
                static_cast<std::size_t>(len) * sizeof(std::int64_t));
  return t;
}

// The logits of one decode step after a prefill of `rows` (row 1, when there, left-padded by 3),
// with the step run on `threads` threads (the prefill always on the caller's count).
std::vector<float> decode_logits(const LlamaModel& model,
                                 const std::vector<std::vector<std::int64_t>>& rows, int threads) {
  const auto batch = static_cast<std::int64_t>(rows.size());
  const auto len = static_cast<std::int64_t>(rows[0].size());
  Tensor mask = Tensor::empty({batch, len}, DType::kInt64);
  for (std::int64_t b = 0; b < batch; ++b)
    for (std::int64_t i = 0; i < len; ++i)
      mask.data_as<std::int64_t>()[b * len + i] = b == 1 && i < 3 ? 0 : 1;
  DynamicCache<> cache;
  (void)model.forward({.input_ids = ids_tensor(rows),
                       .attention_mask = mask,
                       .cache_position = make_cache_position(0, len),
                       .past_key_values = &cache,
                       .logits_to_keep = 1});
  std::vector<std::vector<std::int64_t>> next(static_cast<std::size_t>(batch), {7});
  ThreadCountGuard guard;
  cpu::set_num_threads(threads);
  const Tensor logits = model.forward({.input_ids = ids_tensor(next),
                                       .attention_mask = extend_attention_mask(mask),
                                       .cache_position = make_cache_position(len, 1),
                                       .past_key_values = &cache,
                                       .logits_to_keep = 1});
  const float* p = logits.data_as<float>();
  return std::vector<float>(p, p + logits.numel());
}

void expect_thread_count_invariant(const LlamaModel& model, const std::string& what) {
  const std::int64_t vocab = model.config().vocab_size;
  std::vector<std::int64_t> prompt;
  for (std::int64_t i = 0; i < 21; ++i) prompt.push_back((5 + 37 * i) % vocab);
  std::vector<std::int64_t> other = prompt;
  std::reverse(other.begin(), other.end());
  for (const auto& rows : {std::vector<std::vector<std::int64_t>>{prompt},
                           std::vector<std::vector<std::int64_t>>{prompt, other}}) {
    const std::vector<float> one = decode_logits(model, rows, 1);
    for (int threads : {2, 3}) {
      const std::vector<float> many = decode_logits(model, rows, threads);
      ASSERT_EQ(many.size(), one.size());
      std::size_t differ = 0;
      for (std::size_t i = 0; i < one.size(); ++i) differ += std::memcmp(&one[i], &many[i], 4) != 0;
      EXPECT_EQ(differ, 0u) << what << ", batch " << rows.size() << ": " << threads
                            << " threads against 1";
    }
  }
}

// Processes that spin until this object goes (killed, also when the test fails or throws; and
// when this process dies first, through PR_SET_PDEATHSIG).
class BusyProcesses {
 public:
  explicit BusyProcesses(int n) {
    for (int i = 0; i < n; ++i) {
      const pid_t pid = ::fork();
      if (pid == 0) {
        ::prctl(PR_SET_PDEATHSIG, SIGKILL);
        volatile std::uint64_t spins = 0;
        for (;;) spins = spins + 1;
      }
      if (pid > 0) pids_.push_back(pid);
    }
  }
  ~BusyProcesses() {
    for (pid_t pid : pids_) ::kill(pid, SIGKILL);
    for (pid_t pid : pids_) ::waitpid(pid, nullptr, 0);
  }
  BusyProcesses(const BusyProcesses&) = delete;
  BusyProcesses& operator=(const BusyProcesses&) = delete;

 private:
  std::vector<pid_t> pids_;
};

std::optional<LlamaModel> default_gguf_model() {
#ifdef KVCACHE_DEFAULT_MODEL_PATH
  const std::string path = KVCACHE_DEFAULT_MODEL_PATH;
  if (std::filesystem::exists(path)) return LlamaModel::from_gguf(path);
#endif
  return std::nullopt;
}

TEST(DecodeThreads, ADecodeStepComputesTheSameBitsOnAnyThreadCount) {
  const ModelConfig config = testing::tiny_llama_config();
  for (DType dtype : {DType::kFloat32, DType::kBFloat16}) {
    const LlamaModel model =
        LlamaModel::from_weights(config, random_llama_weights(config, 5, dtype, 0.3f));
    expect_thread_count_invariant(model, "tiny model, " + std::string(dtype_name(dtype)));
  }
  ModelConfig blocks = config;  // Q4_1 rows need a multiple of 32 values
  blocks.intermediate_size = 64;
  const LlamaModel quantized =
      LlamaModel::from_weights(blocks, random_llama_weights(blocks, 6, DType::kFloat32, 0.3f),
                               {.quantize = cpu::QuantFormat::kQ4_1});
  expect_thread_count_invariant(quantized, "tiny model, Q4_1 at load");
  const std::optional<LlamaModel> model = default_gguf_model();
  if (!model) GTEST_SKIP() << "no default model (scripts/setup-model.sh)";
  expect_thread_count_invariant(*model, "default model (Q4_1 / Q8_0 blocks)");
}

// The last position's logits of a prefill of `tokens` tokens on `threads` threads.
std::vector<float> prefill_logits(const LlamaModel& model, std::int64_t tokens, int threads) {
  std::vector<std::int64_t> prompt;
  for (std::int64_t i = 0; i < tokens; ++i)
    prompt.push_back((3 + 41 * i) % model.config().vocab_size);
  ThreadCountGuard guard;
  cpu::set_num_threads(threads);
  DynamicCache<> cache;
  const Tensor logits = model.forward({.input_ids = ids_tensor({prompt}),
                                       .cache_position = make_cache_position(0, tokens),
                                       .past_key_values = &cache,
                                       .logits_to_keep = 1});
  const float* p = logits.data_as<float>();
  return std::vector<float>(p, p + logits.numel());
}

// Prefills long enough for the GEMM path (past the row kernels' 16 dense / 32 Q4_1 rows), whose
// panel split once followed the thread count.
void expect_prefill_thread_count_invariant(const LlamaModel& model, const std::string& what) {
  for (std::int64_t tokens : {40, 100}) {
    const std::vector<float> one = prefill_logits(model, tokens, 1);
    for (int threads : {2, 3}) {
      const std::vector<float> many = prefill_logits(model, tokens, threads);
      ASSERT_EQ(many.size(), one.size());
      std::size_t differ = 0;
      for (std::size_t i = 0; i < one.size(); ++i) differ += std::memcmp(&one[i], &many[i], 4) != 0;
      EXPECT_EQ(differ, 0u) << what << ", prefill of " << tokens << ": " << threads
                            << " threads against 1";
    }
  }
}

TEST(DecodeThreads, APrefillComputesTheSameBitsOnAnyThreadCount) {
  ModelConfig config = testing::tiny_llama_config();
  config.intermediate_size = 64;  // Q4_1 rows need a multiple of 32 values
  for (DType dtype : {DType::kFloat32, DType::kBFloat16}) {
    const LlamaModel model =
        LlamaModel::from_weights(config, random_llama_weights(config, 8, dtype, 0.3f));
    expect_prefill_thread_count_invariant(model, "tiny model, " + std::string(dtype_name(dtype)));
  }
  const LlamaModel quantized =
      LlamaModel::from_weights(config, random_llama_weights(config, 9, DType::kFloat32, 0.3f),
                               {.quantize = cpu::QuantFormat::kQ4_1});
  expect_prefill_thread_count_invariant(quantized, "tiny model, Q4_1 at load");
  const std::optional<LlamaModel> model = default_gguf_model();
  if (!model) GTEST_SKIP() << "no default model (scripts/setup-model.sh)";
  expect_prefill_thread_count_invariant(*model, "default model (Q4_1 / Q8_0 blocks)");
}

TEST(DecodeThreads, StepsMovedToOneThreadByBusyCoresGiveTheTokensOfAnIdleRun) {
  std::optional<LlamaModel> model = default_gguf_model();
  if (!model) GTEST_SKIP() << "no default model (scripts/setup-model.sh)";
  ThreadCountGuard guard;
  cpu::set_num_threads(2);
  const Tensor ids = ids_tensor({{1, 9690, 28, 940, 314, 597, 1431, 30}});
  GenerationConfig config{.max_new_tokens = 64};
  config.adapt_decode_threads = false;
  const GenerateResult idle = generate(*model, ids, Tensor(), config);
  EXPECT_EQ(idle.single_thread_steps, 0);

  // Two spinning processes (one per core on a 2-core machine) for the length of the run: other
  // processes, since the starvation signal is this process's CPU time.
  GenerateResult loaded;
  {
    BusyProcesses busy(2);
    config.adapt_decode_threads = true;
    loaded = generate(*model, ids, Tensor(), config);
  }
  EXPECT_EQ(loaded.new_tokens, idle.new_tokens);
  EXPECT_GE(loaded.single_thread_steps, 0);
  EXPECT_LE(loaded.single_thread_steps, loaded.decode_steps);
  std::printf("busy cores: %lld of %lld decode steps ran on one thread\n",
              static_cast<long long>(loaded.single_thread_steps),
              static_cast<long long>(loaded.decode_steps));
}

}  // namespace
}  // namespace kvcache
