// Fuzz target: a chat template and the messages it renders. The input is split at NUL bytes: the
// template text first (a tokenizer_config.json or GGUF tokenizer.chat_template is untrusted),
// then role, content, role, content, ... Checks that the Jinja engine only ever throws
// kvcache::Error (bounded steps, output and depth: no hang, no crash) and renders the same
// conversation the same way twice. A template part that is a
// JSON object with a "chat_template" string (the seed, tokenizer_config.json) gives that string.
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <string>
#include <string_view>
#include <vector>

#include <nlohmann/json.hpp>

#include "fuzz_util.hpp"
#include "kvcache/tokenizer/chat_template.hpp"

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  const std::string_view input(reinterpret_cast<const char*>(data), size);
  std::vector<std::string_view> parts;
  for (std::size_t start = 0;;) {
    const std::size_t end = input.find('\0', start);
    parts.push_back(input.substr(start, end == std::string_view::npos ? end : end - start));
    if (end == std::string_view::npos || parts.size() > 64) break;
    start = end + 1;
  }
  std::vector<kvcache::ChatMessage> messages;
  for (std::size_t i = 1; i + 1 < parts.size(); i += 2)
    messages.push_back({std::string(parts[i]), std::string(parts[i + 1])});
  if (messages.empty()) messages.push_back({"user", "Hello, what's your name."});
  kvcache::fuzz::expect_only_errors("ChatTemplate", [&] {
    std::string text = std::string(parts[0]);
    const nlohmann::json config = nlohmann::json::parse(text, nullptr, /*allow_exceptions=*/false);
    if (config.is_object() && config.contains("chat_template") &&
        config["chat_template"].is_string())
      text = config["chat_template"].get<std::string>();
    const kvcache::ChatTemplate chat = kvcache::ChatTemplate::parse(
        text, {.bos_token = "<s>", .eos_token = "</s>", .variables = {}});
    for (const bool generation : {false, true}) {
      kvcache::fuzz::expect_only_errors("ChatTemplate::apply", [&] {
        // Any template renders now, so the output's shape is the template's business; what must
        // hold is that rendering is a function of its inputs.
        const std::string prompt_text = chat.apply(messages, generation);
        if (text.find("strftime_now") == std::string::npos &&  // the clock may tick between
            chat.apply(messages, generation) != prompt_text) {
          std::fprintf(stderr, "FINDING: two renderings of the same conversation differ\n");
          std::abort();
        }
      });
    }
  });
  return 0;
}
