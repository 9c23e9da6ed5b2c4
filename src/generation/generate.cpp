// generate(): the seed's loop with transformers' generate() conventions — position ids from the
// mask, cache_position shared by the batch, finished rows emitting pad — plus sampling and timing.
// It runs over any Cache of the model's backend: the one passed, or one it builds from
// GenerationConfig::cache_implementation. On the GPU a DynamicCache of full layers and a
// StaticCache replay their decode steps from a CUDA graph (DecodeGraph writes into their storage);
// every other cache runs each step kernel by kernel, through the same forward().
#include "kvcache/generation/generate.hpp"

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <ctime>
#include <limits>
#include <memory>
#include <numeric>
#include <optional>
#include <random>

#include <fcntl.h>
#include <unistd.h>

#include "decode_graph.hpp"
#include "kvcache/attention/mask.hpp"
#include "kvcache/backend/cpu.hpp"
#include "kvcache/error.hpp"
#include "kvcache/memory.hpp"

namespace kvcache {

Tensor token_column(const std::vector<std::int64_t>& tokens) {
  Tensor out = Tensor::empty({static_cast<std::int64_t>(tokens.size()), 1}, DType::kInt64);
  std::copy(tokens.begin(), tokens.end(), out.data_as<std::int64_t>());
  return out;
}

std::pair<Tensor, Tensor> left_pad(const std::vector<std::vector<std::int64_t>>& rows,
                                   std::int64_t pad_token_id) {
  KVCACHE_CHECK(!rows.empty(), "left_pad: expected at least one row, got none");
  std::size_t longest = 0;
  for (std::size_t r = 0; r < rows.size(); ++r) {
    KVCACHE_CHECK(!rows[r].empty(), "left_pad: expected at least one token in every row, row ", r,
                  " is empty");
    longest = std::max(longest, rows[r].size());
  }
  const auto batch = static_cast<std::int64_t>(rows.size()),
             len = static_cast<std::int64_t>(longest);
  Tensor ids = Tensor::empty({batch, len}, DType::kInt64);
  Tensor mask = Tensor::zeros({batch, len}, DType::kInt64);
  for (std::int64_t b = 0; b < batch; ++b) {
    const auto& row = rows[static_cast<std::size_t>(b)];
    const std::int64_t pad = len - static_cast<std::int64_t>(row.size());
    for (std::int64_t j = 0; j < len; ++j) {
      ids.data_as<std::int64_t>()[b * len + j] =
          j < pad ? pad_token_id : row[static_cast<std::size_t>(j - pad)];
      mask.data_as<std::int64_t>()[b * len + j] = j < pad ? 0 : 1;
    }
  }
  return {ids, mask};
}

std::int64_t choose_token(const float* logits, std::int64_t vocab, const GenerationConfig& config,
                          std::uint64_t& rng_state) {
  if (!config.do_sample) {
    return std::max_element(logits, logits + vocab) - logits;  // first maximum, as torch.argmax
  }
  KVCACHE_CHECK(config.temperature > 0.0f, "generate: expected temperature > 0 when sampling, got ",
                config.temperature);
  KVCACHE_CHECK(config.top_p > 0.0f && config.top_p <= 1.0f,
                "generate: expected top_p in (0, 1], got ", config.top_p);
  // Candidates sorted by logit, best first; top-k and top-p then cut the tail.
  std::vector<std::int64_t> order(static_cast<std::size_t>(vocab));
  std::iota(order.begin(), order.end(), 0);
  std::stable_sort(order.begin(), order.end(),
                   [&](std::int64_t a, std::int64_t b) { return logits[a] > logits[b]; });
  std::size_t keep = order.size();
  if (config.top_k > 0) keep = std::min<std::size_t>(keep, static_cast<std::size_t>(config.top_k));
  std::vector<double> probs(keep);
  const double top = logits[order[0]] / config.temperature;
  double sum = 0;
  for (std::size_t i = 0; i < keep; ++i) {
    probs[i] = std::exp(logits[order[i]] / config.temperature - top);
    sum += probs[i];
  }
  if (config.top_p < 1.0f) {
    // Keep the smallest prefix whose probability reaches top_p (at least one token).
    double running = 0;
    std::size_t cut = 0;
    while (cut < keep) {
      running += probs[cut] / sum;
      ++cut;
      if (running >= config.top_p) break;
    }
    keep = cut;
    probs.resize(keep);
  }
  std::mt19937_64 rng(rng_state);
  rng_state = rng();
  std::discrete_distribution<std::size_t> pick(probs.begin(), probs.end());
  return order[pick(rng)];
}

namespace {

// New-token slots a DynamicCache built here reserves up front at most: a huge max_new_tokens
// (which EOS may cut short) must not allocate its whole length before the first token; past this
// the cache grows as it goes.
constexpr std::int64_t kMaxReservedNewTokens = 4096;

void check_cache_implementation(const std::string& name) {
  KVCACHE_CHECK(name == "dynamic" || name == "static" || name == "sliding" || name == "sink" ||
                    name == "quantized" || name == "offloaded",
                "generate: expected cache_implementation \"dynamic\", \"static\", \"sliding\", "
                "\"sink\", \"quantized\" or \"offloaded\", got \"",
                name, "\"");
}

// make_generation_cache's body (which wraps it for running out of memory).
template <CacheBackend B>
std::unique_ptr<Cache<B>> make_cache_of(const LlamaModel& model,
                                        const std::string& cache_implementation, std::int64_t batch,
                                        std::int64_t max_cache_len,
                                        const GenerationConfig::CacheConfig& cache_config) {
  check_cache_implementation(cache_implementation);
  KVCACHE_CHECK(model.device() == B::kDevice, "make_generation_cache: expected a model on ",
                device_name(B::kDevice), " (the cache's backend), got one on ",
                device_name(model.device()));
  KVCACHE_CHECK(batch >= 1 && max_cache_len >= 1,
                "make_generation_cache: expected batch >= 1 and max_cache_len >= 1, got ", batch,
                " and ", max_cache_len);
  const ModelConfig& c = model.config();
  if (cache_implementation == "offloaded") {
    // Layers in page-locked host memory, two of them on the device at a time.
    if constexpr (B::kDevice == Device::kCuda) {
      return std::make_unique<OffloadedCache>(OffloadedCacheOptions{
          .initial_capacity = std::min(max_cache_len, kMaxReservedNewTokens)});
    } else {
      KVCACHE_FAIL(
          "make_generation_cache: the offloaded cache keeps a GPU model's cache in host "
          "memory; a CPU model's cache is there already (use --device cuda, or "
          "\"dynamic\")");
    }
  }
  if (cache_implementation == "sink") {
    // Re-rotation uses the model's own inverse frequencies (scaling included).
    return std::make_unique<SinkCache<B>>(
        SinkCacheOptions{.window_length = cache_config.window_length,
                         .num_sink_tokens = cache_config.num_sink_tokens,
                         .rope_inv_freq = RotaryEmbedding(c.rope).inv_freq()});
  }
  if (cache_implementation == "quantized") {
    const std::string& axis = cache_config.axis_key;
    KVCACHE_CHECK(axis == "channel" || axis == "token",
                  "make_generation_cache: expected cache_config.axis_key \"channel\" or \"token\", "
                  "got \"",
                  axis, "\"");
    return std::make_unique<QuantizedCache<B>>(QuantizedCacheOptions{
        .nbits = cache_config.nbits,
        .group_size = cache_config.q_group_size,
        .key_axis = axis == "channel" ? QuantAxis::kPerChannel : QuantAxis::kPerToken,
        .residual_length = cache_config.residual_length});
  }
  if (cache_implementation == "dynamic" || cache_implementation == "sliding") {
    // The model's sliding layers get sliding cache layers, as transformers' DynamicCache(config)
    // makes them. "dynamic" on the GPU only when the generation goes past a window: until then a
    // sliding layer holds what a full one holds, and a cache of full layers replays its decode
    // step from a CUDA graph (sliding layers run kernel by kernel, in memory bounded by the
    // window). "sliding" always (transformers' "sliding_window"), and only for a model that has
    // sliding layers.
    DynamicCacheOptions options{.initial_capacity = max_cache_len};
    std::vector<std::int64_t> windows = c.sliding_windows();
    const bool has_a_window =
        std::any_of(windows.begin(), windows.end(), [](std::int64_t w) { return w > 0; });
    KVCACHE_CHECK(cache_implementation != "sliding" || has_a_window,
                  "make_generation_cache: expected a model with sliding-window layers for "
                  "cache_implementation \"sliding\" (config.json's sliding_window / layer_types), "
                  "got one whose ",
                  windows.size(), " layers all attend in full (use \"dynamic\")");
    const bool passes_a_window = std::any_of(
        windows.begin(), windows.end(), [&](std::int64_t w) { return w > 0 && max_cache_len > w; });
    if (B::kDevice == Device::kCpu || passes_a_window || cache_implementation == "sliding")
      options.sliding_windows = std::move(windows);
    // What the layers reserve at their first update (a full layer max_cache_len slots, a sliding
    // one at most its window), checked before the prefill allocates it layer by layer.
    const char* where = "make_generation_cache";
    std::int64_t per_token = 2 * static_cast<std::int64_t>(dtype_size(model.kv_dtype()));
    for (const std::int64_t n : {batch, c.num_key_value_heads, c.head_dim})
      per_token = detail::checked_mul(per_token, n, where, "the reservation");
    std::int64_t tokens = 0;
    for (std::int64_t l = 0; l < c.num_hidden_layers; ++l) {
      const std::size_t i = static_cast<std::size_t>(l);
      const std::int64_t w = i < options.sliding_windows.size() ? options.sliding_windows[i] : 0;
      tokens = detail::checked_add(tokens, w > 0 ? std::min(w, max_cache_len) : max_cache_len,
                                   where, "the reservation");
    }
    detail::require_memory(
        B::kDevice,
        static_cast<std::uint64_t>(
            detail::checked_mul(per_token, tokens, where, "the reservation")),
        where,
        "the dynamic cache's reservation of " + std::to_string(max_cache_len) + " tokens a layer");
    return std::make_unique<DynamicCache<B>>(std::move(options));
  }
  // "static": full-length layers for every layer, sliding ones included. Exact for a windowed
  // model too (the attention applies the window over the slots held), at full-length memory.
  KVCACHE_CHECK(c.num_hidden_layers >= 1 && c.num_hidden_layers <= std::numeric_limits<int>::max(),
                "make_generation_cache: expected a model with 1 to 2^31 - 1 layers, got ",
                c.num_hidden_layers);
  return std::make_unique<StaticCache<B>>(
      StaticCacheOptions{.max_batch_size = batch,
                         .max_cache_len = max_cache_len,
                         .num_layers = static_cast<int>(c.num_hidden_layers),
                         .num_kv_heads = c.num_key_value_heads,
                         .head_dim = c.head_dim,
                         .dtype = model.kv_dtype()});
}

}  // namespace

template <CacheBackend B>
std::unique_ptr<Cache<B>> make_generation_cache(const LlamaModel& model,
                                                const std::string& cache_implementation,
                                                std::int64_t batch, std::int64_t max_cache_len,
                                                const GenerationConfig::CacheConfig& cache_config) {
  return detail::out_of_memory_as_error("make_generation_cache", [&] {
    return make_cache_of<B>(model, cache_implementation, batch, max_cache_len, cache_config);
  });
}

template std::unique_ptr<Cache<cpu::Backend>> make_generation_cache<cpu::Backend>(
    const LlamaModel&, const std::string&, std::int64_t, std::int64_t,
    const GenerationConfig::CacheConfig&);
template std::unique_ptr<Cache<cuda::Backend>> make_generation_cache<cuda::Backend>(
    const LlamaModel&, const std::string&, std::int64_t, std::int64_t,
    const GenerationConfig::CacheConfig&);

namespace {

// CPU decode steps on a shared machine (GenerationConfig::adapt_decode_threads; issue #11). Each
// OpenMP region of a step ends in a barrier, so a team thread whose core another process keeps
// busy (off the CPU for whole scheduler slices) stalls every region. The signal is the process's
// CPU time over a step against threads × the step's wall time: near 1 with every thread on a core
// of its own (waiting workers spin), markedly below it when a thread was descheduled. Two such
// team steps in a row start a try of the calling thread alone: three steps (the team's workers
// may still spin on the free core during the first), judged by the fastest against the team's
// last step, kept when faster by a tenth. From then on the team is tried again, one step, after
// 16, 32, ... 1024 steps (each lost try doubles the wait), and only when /proc/stat shows at least
// half a core idle since the last look: beside a busy core a team step can stall for 80-180 ms
// waking its sleeping worker, so a try that cannot win is counted lost without running it. A lost
// one-thread try keeps the team and holds off the next try as long. On an idle machine the ratio
// stays near 1 and nothing is tried: the cost is two clock reads a step. Step 0 (the prefill) and
// step 1 (the workers' warm-up) always run on the full team and are not judged; the thread count
// in force is restored at the end. A machine of many cores gets only the all-or-one choice.
class DecodeThreads {
 public:
  DecodeThreads(bool enabled, std::int64_t first_judged_step)
      : full_(cpu::num_threads()), enabled_(enabled && full_ > 1), first_(first_judged_step) {}
  ~DecodeThreads() {
    if (solo_now_) cpu::set_num_threads(full_);
  }
  DecodeThreads(const DecodeThreads&) = delete;
  DecodeThreads& operator=(const DecodeThreads&) = delete;

  // Before step `step`: the thread count it runs on.
  void begin(std::int64_t step) {
    if (!enabled_) return;
    step_ = step;
    if (mode_solo_ && probe_ == step && !other_cores_idle()) {
      // No core sat idle since the last look: the team would only wait for a thread that other
      // processes keep off the CPU. The try counts as lost, without running it.
      interval_ = std::min(2 * interval_, kMaxInterval);
      probe_ = step + interval_;
    }
    const bool trying = probe_ >= 0 && step >= probe_ && step < probe_ + trial_steps();
    const bool solo = step >= first_ && (mode_solo_ != trying);
    if (solo != solo_now_) {
      cpu::set_num_threads(solo ? 1 : full_);
      solo_now_ = solo;
    }
    if (solo) ++solo_steps_;
    wall0_ = Clock::now();
    cpu0_ = process_cpu_seconds();
  }

  // Steps run on the calling thread alone so far.
  std::int64_t solo_steps() const { return solo_steps_; }

  // After the step begun last: judges it.
  void end() {
    if (!enabled_ || step_ < first_) return;
    const double wall = std::chrono::duration<double>(Clock::now() - wall0_).count();
    const double cpu = process_cpu_seconds() - cpu0_;
    const bool trying = probe_ >= 0 && step_ >= probe_ && step_ < probe_ + trial_steps();
    if (!trying) {
      baseline_ = wall;  // the latest step of the mode in force
      if (!solo_now_) {
        // Two team steps in a row that got markedly less CPU than they had wall time: try one
        // thread from the next step on.
        starved_ = cpu < kStarvedShare * wall * full_ ? starved_ + 1 : 0;
        if (starved_ >= 2 && probe_ < 0 && step_ >= quiet_until_) {
          probe_ = step_ + 1;
          best_try_ = 0.0;
        }
      }
      return;
    }
    best_try_ = best_try_ > 0.0 ? std::min(best_try_, wall) : wall;
    if (step_ + 1 < probe_ + trial_steps()) return;
    // The try is over: its fastest step against the mode in force.
    const bool wins = baseline_ > 0.0 && best_try_ < 0.9 * baseline_;
    if (wins) {
      mode_solo_ = !mode_solo_;
      interval_ = kFirstInterval;
      baseline_ = best_try_;
      if (mode_solo_) (void)other_cores_idle();  // the idle time is counted from here
    } else {
      interval_ = std::min(2 * interval_, kMaxInterval);  // it lost: wait twice as long
    }
    // One thread: try the team again after the interval. The team after a lost one-thread try: no
    // other try for the interval (after a won team try, starvation is watched at once).
    probe_ = mode_solo_ ? step_ + interval_ : -1;
    best_try_ = 0.0;
    if (!mode_solo_ && !wins) quiet_until_ = step_ + interval_;
    starved_ = 0;
  }

 private:
  using Clock = std::chrono::steady_clock;
  static constexpr double kStarvedShare = 0.8;
  static constexpr std::int64_t kFirstInterval = 16, kMaxInterval = 1024;

  // Steps a try runs: one thread gets three (the team's workers may still spin on the free core
  // for the first, and the scheduler moves the caller there after it), the team one.
  std::int64_t trial_steps() const { return mode_solo_ ? 1 : 3; }

  // Whether the machine's CPUs were idle for at least half a core on average since the last call
  // (the idle and iowait times of /proc/stat's first line; true where it cannot be read, so the
  // team is tried as it would be without this look).
  bool other_cores_idle() {
    double idle = 0.0;
    const auto now = Clock::now();
    if (!system_idle_seconds(idle)) return true;
    const double wall = std::chrono::duration<double>(now - idle_at_).count();
    const bool was_idle = idle_at_ == Clock::time_point{} || idle - idle0_ >= 0.5 * wall;
    idle0_ = idle;
    idle_at_ = now;
    return was_idle;
  }

  static bool system_idle_seconds(double& idle) {
    char buffer[512];
    const int fd = ::open("/proc/stat", O_RDONLY | O_CLOEXEC);
    if (fd < 0) return false;
    const ssize_t n = ::read(fd, buffer, sizeof(buffer) - 1);
    ::close(fd);
    if (n <= 0) return false;
    buffer[n] = '\0';
    unsigned long long v[5] = {};  // user nice system idle iowait
    if (std::sscanf(buffer, "cpu %llu %llu %llu %llu %llu", &v[0], &v[1], &v[2], &v[3], &v[4]) != 5)
      return false;
    const long ticks = ::sysconf(_SC_CLK_TCK);
    if (ticks <= 0) return false;
    idle = static_cast<double>(v[3] + v[4]) / static_cast<double>(ticks);
    return true;
  }

  static double process_cpu_seconds() {
    timespec t{};
    if (clock_gettime(CLOCK_PROCESS_CPUTIME_ID, &t) != 0) return 0.0;
    return static_cast<double>(t.tv_sec) + 1e-9 * static_cast<double>(t.tv_nsec);
  }

  int full_;
  bool enabled_;
  std::int64_t first_;
  bool mode_solo_ = false;        // the mode steps run in between tries
  bool solo_now_ = false;         // the thread count set now is 1
  std::int64_t probe_ = -1;       // the step that tries the other mode (-1: none planned)
  std::int64_t quiet_until_ = 0;  // no one-thread try before this step
  std::int64_t interval_ = kFirstInterval;
  int starved_ = 0;  // team steps in a row that got too little CPU
  std::int64_t solo_steps_ = 0;
  std::int64_t step_ = -1;
  double baseline_ = 0.0;  // the latest step's wall time in the mode in force
  double best_try_ = 0.0;  // the fastest step of the try under way
  Clock::time_point wall0_{};
  Clock::time_point idle_at_{};  // the last look at the machine's idle time
  double idle0_ = 0.0;
  double cpu0_ = 0.0;
};

// The GPU's sampling draws: one uniform per row from the seed's sequence (empty when greedy), the
// same whether the step is launched kernel by kernel or replayed from a graph.
std::vector<float> gpu_uniforms(std::int64_t batch, const GenerationConfig& config,
                                std::uint64_t& rng_state) {
  if (!config.do_sample) return {};
  std::vector<float> uniforms(static_cast<std::size_t>(batch));
  for (float& u : uniforms) {
    std::mt19937_64 rng(rng_state);
    rng_state = rng();
    u = std::uniform_real_distribution<float>(0.0f, 1.0f)(rng);
  }
  return uniforms;
}

// The next token of every row, from logits [batch, 1, vocab] on the model's device: on the GPU the
// choice runs there and only the ids come back.
// Finished rows get pad_token_id; on the CPU they draw nothing from the sampler's state.
std::vector<std::int64_t> choose_tokens(const Tensor& logits, const GenerationConfig& config,
                                        std::uint64_t& rng_state,
                                        const std::vector<bool>& finished) {
  const std::int64_t batch = logits.size(0), vocab = logits.size(2);
  if (logits.device() == Device::kCuda) {
    if (!config.do_sample) return argmax_last(logits);
    std::vector<float> uniforms = gpu_uniforms(batch, config, rng_state);
    const Tensor host_u = Tensor::from_blob(uniforms.data(), {batch}, DType::kFloat32);
    // Sent without waiting: reading the ids back stays the step's one wait for the GPU.
    const Tensor ids =
        cuda::to_host(cuda::sample(last_position(logits), config.temperature, config.top_k,
                                   config.top_p, cuda::upload(host_u)));
    return {ids.data_as<std::int64_t>(), ids.data_as<std::int64_t>() + batch};
  }
  std::vector<std::int64_t> next(static_cast<std::size_t>(batch));
  for (std::int64_t b = 0; b < batch; ++b) {
    const auto row = static_cast<std::size_t>(b);
    next[row] = finished[row]
                    ? config.pad_token_id.value_or(0)
                    : choose_token(logits.data_as<float>() + b * vocab, vocab, config, rng_state);
  }
  return next;
}

// The positions a generation gives its tokens must stay inside the model's context length
// (max_position_embeddings; a GGUF's llama.context_length) unless the caller opts in: RoPE
// computes any position alike, but the model never saw those past it in training, so its output
// there degrades (or, with some models, turns to nonsense) without any error. The span is the
// whole sequence, past + prompt + max_new_tokens, as transformers' max_length counts it. A
// SinkCache places tokens at positions of its own (their slots): past its window_length a step
// stays below the window, so only the prompt step (when it does not evict) can go past it.
void check_context_length(const LlamaModel& model, const GenerationConfig& config,
                          std::int64_t past, std::int64_t prompt, std::int64_t total,
                          std::optional<std::pair<std::int64_t, std::int64_t>> sink) {
  const std::int64_t context = model.config().max_position_embeddings;
  if (config.allow_past_context || context <= 0) return;
  std::int64_t span = total;
  if (sink) {
    const auto [window, sinks] = *sink;
    const std::int64_t prefill =
        past + prompt <= window || prompt > window - sinks ? past + prompt : window;
    span = std::max(prefill, std::min(total, window));
  }
  KVCACHE_CHECK(span <= context, "generate: expected past + prompt_len + max_new_tokens = ", past,
                " + ", prompt, " + ", config.max_new_tokens, " = ", total,
                sink ? " (positions in a SinkCache: " + std::to_string(span) + ")" : std::string(),
                " to stay within the model's context length of ", context,
                " (max_position_embeddings), got ", span - context,
                " position(s) past it; set GenerationConfig::allow_past_context "
                "(greedy_decode --allow-past-context) to generate past it anyway");
}

template <class B>
GenerateResult generate_on(const LlamaModel& model, const Tensor& input_ids,
                           const Tensor& attention_mask, const GenerationConfig& config,
                           Cache<B>* cache, const TokenCallback& on_token) {
  using Clock = std::chrono::steady_clock;
  const char* where = "generate";
  const std::int64_t batch = input_ids.size(0), prompt = input_ids.size(1);
  const std::int64_t past = cache ? cache->get_seq_length() : 0;
  // Every slot the generation may fill, checked without overflow before anything is allocated.
  const std::int64_t total =
      detail::checked_add(detail::checked_add(past, prompt, where, "past + prompt_len"),
                          config.max_new_tokens, where, "past + prompt_len + max_new_tokens");
  std::optional<std::pair<std::int64_t, std::int64_t>> sink;  // (window_length, sinks)
  if (const auto* s = dynamic_cast<const SinkCache<B>*>(cache)) {
    sink.emplace(s->window_length(), s->num_sink_tokens());
  } else if (!cache && config.cache_implementation == "sink") {
    sink.emplace(config.cache_config.window_length, config.cache_config.num_sink_tokens);
  }
  check_context_length(model, config, past, prompt, total, sink);
  std::unique_ptr<Cache<B>> local;
  if (!cache) {
    const bool dynamic = config.cache_implementation == "dynamic";
    const std::int64_t slots =
        dynamic ? prompt + std::min(config.max_new_tokens, kMaxReservedNewTokens) : total;
    local = make_generation_cache<B>(model, config.cache_implementation, batch,
                                     std::max<std::int64_t>(slots, 1), config.cache_config);
  }
  Cache<B>& past_key_values = cache ? *cache : *local;
  // A cache of bounded size must hold what the forward passes store: the last token needs none.
  const std::int64_t max_len = past_key_values.get_max_cache_shape();
  KVCACHE_CHECK(max_len < 0 || config.max_new_tokens == 0 || total - 1 <= max_len, where,
                ": expected the cache to hold past + prompt_len + max_new_tokens - 1 = ", past,
                " + ", prompt, " + ", config.max_new_tokens, " - 1 = ", total - 1,
                " tokens, but it holds at most ", max_len, " (get_max_cache_shape)");
  // On the GPU the decode steps after the first are replayed from a CUDA graph (captured at the
  // second), on a stream of the library's own: graphs are not captured on the default stream.
  std::optional<detail::ReplayCache> replayable;
  std::optional<cuda::StreamScope> stream;
  std::optional<detail::DecodeGraph> graph;
  if constexpr (B::kDevice == Device::kCuda) {
    replayable = detail::ReplayCache::of(model, &past_key_values, config);
    if (replayable && config.max_new_tokens >= 3) stream.emplace();
  }
  Tensor mask = attention_mask.defined() ? attention_mask : ones_mask(batch, past + prompt);
  const std::int64_t pad = config.pad_token_id.value_or(0);

  GenerateResult result;
  result.new_tokens.assign(static_cast<std::size_t>(batch), {});
  std::vector<bool> finished(static_cast<std::size_t>(batch), false);
  std::uint64_t rng_state = config.seed;
  std::vector<std::int64_t> cache_position = make_cache_position(past, prompt);
  Tensor step_ids = input_ids;
  const auto start = Clock::now();
  auto decode_start = start;
  // The graph's cache storage is reserved up front for at most kGraphTokens new tokens; steps past
  // that run kernel by kernel (the cache then grows as usual).
  constexpr std::int64_t kGraphTokens = 4096;
  const std::int64_t wanted = past + prompt + std::min(config.max_new_tokens, kGraphTokens);
  const std::int64_t graph_capacity = replayable ? replayable->capacity(wanted) : wanted;
  // CPU decode steps may drop to the calling thread alone on a shared machine (steps from 2 on).
  DecodeThreads threads(B::kDevice == Device::kCpu && config.adapt_decode_threads, 2);
  for (std::int64_t step = 0; step < config.max_new_tokens; ++step) {
    std::vector<std::int64_t> next;
    threads.begin(step);
    if (stream && step >= 2 && cache_position.front() + 1 <= graph_capacity) {
      // Step 1 ran kernel by kernel and sized the scratch workspace; step 2 captures.
      if constexpr (B::kDevice == Device::kCuda) {
        if (!graph) graph.emplace(model, *replayable, batch, graph_capacity, config);
        const std::vector<float> uniforms = gpu_uniforms(batch, config, rng_state);
        next = graph->step(step_ids, mask, cache_position.front(), uniforms);
      }
    } else {
      const Tensor logits = model.forward({.input_ids = step_ids,
                                           .attention_mask = mask,
                                           .cache_position = cache_position,
                                           .past_key_values = &past_key_values,
                                           .logits_to_keep = 1});
      next = choose_tokens(logits, config, rng_state, finished);
    }
    threads.end();
    if (step == 0) {
      decode_start = Clock::now();
      result.prefill_ms = std::chrono::duration<double, std::milli>(decode_start - start).count();
    }
    bool keep_going = true;
    for (std::int64_t b = 0; b < batch; ++b) {
      const auto row = static_cast<std::size_t>(b);
      if (finished[row]) next[row] = pad;
      result.new_tokens[row].push_back(next[row]);
      if (!finished[row] && std::find(config.eos_token_ids.begin(), config.eos_token_ids.end(),
                                      next[row]) != config.eos_token_ids.end()) {
        finished[row] = true;
      }
      if (on_token && !on_token(b, next[row], step)) keep_going = false;
    }
    if (step > 0) ++result.decode_steps;
    if (!keep_going || std::all_of(finished.begin(), finished.end(), [](bool f) { return f; }))
      break;
    if (step + 1 == config.max_new_tokens) break;  // the last token needs no forward pass
    step_ids = token_column(next);
    mask = extend_attention_mask(mask);
    cache_position = {cache_position.back() + 1};
  }
  const auto end = Clock::now();
  result.decode_ms = std::chrono::duration<double, std::milli>(end - decode_start).count();
  if (result.decode_steps > 0 && result.decode_ms > 0) {
    result.decode_tokens_per_s =
        static_cast<double>(result.decode_steps * batch) / (result.decode_ms / 1000.0);
  }
  if (graph) result.graph_steps = graph->replays();
  result.single_thread_steps = threads.solo_steps();
  result.cache_length = past_key_values.get_seq_length();
  result.cache_bytes = past_key_values.nbytes();
  return result;
}

}  // namespace

GenerateResult generate(const LlamaModel& model, const Tensor& input_ids,
                        const Tensor& attention_mask, const GenerationConfig& config,
                        CacheRef cache, const TokenCallback& on_token) {
  // Running out of memory anywhere below (the cache, a forward pass's activations, the token
  // lists) is one kvcache::Error naming generate.
  return detail::out_of_memory_as_error("generate", [&]() -> GenerateResult {
    KVCACHE_CHECK(
        input_ids.defined() && input_ids.rank() == 2 && input_ids.dtype() == DType::kInt64,
        "generate: expected input_ids [batch, prompt_len] int64, got ", input_ids.describe());
    KVCACHE_CHECK(config.max_new_tokens >= 0, "generate: expected max_new_tokens >= 0, got ",
                  config.max_new_tokens);
    check_cache_implementation(config.cache_implementation);
    KVCACHE_CHECK(!cache || cache.device() == model.device(), "generate: expected a cache on ",
                  device_name(model.device()), " (the model's device), got a cache on ",
                  device_name(cache.device()));
    if (model.device() == Device::kCuda) {
      return generate_on<cuda::Backend>(model, input_ids, attention_mask, config,
                                        cache.get<cuda::Backend>(), on_token);
    }
    return generate_on<cpu::Backend>(model, input_ids, attention_mask, config,
                                     cache.get<cpu::Backend>(), on_token);
  });
}

}  // namespace kvcache
