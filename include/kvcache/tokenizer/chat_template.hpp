// Chat templates of the ChatML family (SmolLM2, Qwen2, ...): each message becomes
// "<|im_start|>{role}\n{content}<|im_end|>\n", and a generation prompt "<|im_start|>assistant\n".
// kvcache does not run Jinja. It recognises a ChatML template by its markers and reads from the
// template's text the one thing that varies between them: the default system prompt the template
// inserts when the conversation does not start with a system message (a string literal
// "<|im_start|>system\n...<|im_end|>\n" in the template). A template it cannot interpret (no
// ChatML markers, reasoning blocks, a system block it cannot read) is a kvcache::Error that
// suggests --raw, sending the text without a template. Renderings are checked against
// transformers' apply_chat_template(..., tokenize=False) in tests/tokenizer/chat_template_test.cpp.
#pragma once

#include <optional>
#include <span>
#include <string>
#include <string_view>

namespace kvcache {

struct ChatMessage {
  std::string role{};  // "system", "user", "assistant", ...
  std::string content{};
};

class ChatTemplate {
 public:
  /// Reads a Jinja chat template (GGUF tokenizer.chat_template, tokenizer_config.json
  /// chat_template). Throws kvcache::Error, suggesting --raw, when it is not ChatML.
  static ChatTemplate parse(std::string_view template_text);

  /// The prompt text for `messages` (at least one), ending with "<|im_start|>assistant\n" when
  /// add_generation_prompt. The default system prompt comes first when messages[0] is not a
  /// system message.
  std::string apply(std::span<const ChatMessage> messages, bool add_generation_prompt) const;

  /// The system prompt the template inserts by default, if it has one.
  const std::optional<std::string>& default_system_prompt() const { return default_system_; }

 private:
  std::optional<std::string> default_system_;
};

/// ChatTemplate::parse(template_text).apply(messages, add_generation_prompt).
std::string apply_chat_template(std::span<const ChatMessage> messages, bool add_generation_prompt,
                                std::string_view template_text);

}  // namespace kvcache
