// Chat templates as GGUF files (tokenizer.chat_template) and tokenizer_config.json
// (chat_template) write them: Jinja, rendered by kvcache's own engine (jinja.hpp) the way
// transformers' apply_chat_template(..., tokenize=False) renders them. The template sees
// `messages` (a list of {"role", "content"} dicts), `add_generation_prompt`, `bos_token`,
// `eos_token` and any extra string variables the caller passes. No template family is
// special-cased: Llama-2, Llama-3, Mistral, ChatML (Qwen2, SmolLM2), Gemma, Phi-3 and Zephyr
// templates are checked against Python's jinja2 in
// tests/tokenizer/chat_template_reference_test.cpp. A template the engine cannot parse or render (a
// construct it lacks, raise_exception from the template) is a kvcache::Error naming the template's
// line and column that suggests --raw.
#pragma once

#include <span>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "kvcache/tokenizer/jinja.hpp"

namespace kvcache {

class Tokenizer;

/// One turn of a conversation, as a chat template's `messages` entries carry them.
struct ChatMessage {
  std::string role{};     ///< "system", "user", "assistant", ...
  std::string content{};  ///< the turn's text (UTF-8)
};

/// What a chat template sees besides the messages.
struct ChatTemplateOptions {
  std::string bos_token{};  ///< the tokenizer's BOS token text ("<s>", "<|begin_of_text|>"), or ""
  std::string eos_token{};  ///< the tokenizer's EOS token text ("</s>", "<|im_end|>"), or ""
  /// Further string variables (name, value), e.g. {"date_string", "26 Jul 2024"}.
  std::vector<std::pair<std::string, std::string>> variables{};

  /// bos_token and eos_token from `tokenizer`'s BOS and EOS ids (empty where it has none).
  static ChatTemplateOptions from_tokenizer(const Tokenizer& tokenizer);
};

/// A parsed chat template, rendered by kvcache's Jinja engine (kvcache/tokenizer/jinja.hpp).
class ChatTemplate {
 public:
  /// Parses a Jinja chat template (GGUF tokenizer.chat_template, tokenizer_config.json
  /// chat_template). Throws kvcache::Error with the line and column of a syntax error, suggesting
  /// --raw.
  static ChatTemplate parse(std::string_view template_text, ChatTemplateOptions options = {});

  /// The prompt text for `messages` (at least one), as transformers' apply_chat_template(messages,
  /// add_generation_prompt=..., tokenize=False) renders it. Throws kvcache::Error (suggesting
  /// --raw) where the template raises or cannot be rendered, or a message is not UTF-8.
  std::string apply(std::span<const ChatMessage> messages, bool add_generation_prompt) const;

  /// The options it renders with (bos/eos token texts, extra variables).
  const ChatTemplateOptions& options() const { return options_; }

 private:
  jinja::Template template_;
  ChatTemplateOptions options_;
};

/// ChatTemplate::parse(template_text, options).apply(messages, add_generation_prompt).
std::string apply_chat_template(std::span<const ChatMessage> messages, bool add_generation_prompt,
                                std::string_view template_text, ChatTemplateOptions options = {});

}  // namespace kvcache
