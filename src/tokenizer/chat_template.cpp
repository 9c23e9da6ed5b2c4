// ChatTemplate: the conversation as the variables transformers' apply_chat_template gives a
// template (messages, add_generation_prompt, bos_token, eos_token, extra variables), rendered by
// the Jinja engine. Messages are checked for UTF-8 here, where an offset still points into the
// caller's own text (after rendering, the tokenizer could only name an offset into the prompt).
#include "kvcache/tokenizer/chat_template.hpp"

#include <utility>
#include <vector>

#include "../io_util.hpp"
#include "kvcache/error.hpp"
#include "kvcache/tokenizer/tokenizer.hpp"

namespace kvcache {
namespace {

constexpr std::string_view kRawHint = " (pass --raw to send the prompt without a chat template)";

}  // namespace

ChatTemplateOptions ChatTemplateOptions::from_tokenizer(const Tokenizer& tokenizer) {
  return detail::out_of_memory_as_error("ChatTemplateOptions::from_tokenizer",
                                        [&]() -> ChatTemplateOptions {
                                          ChatTemplateOptions options;
                                          if (const auto bos = tokenizer.bos_token_id())
                                            options.bos_token = tokenizer.token_text(*bos);
                                          if (const auto eos = tokenizer.eos_token_id())
                                            options.eos_token = tokenizer.token_text(*eos);
                                          return options;
                                        });
}

ChatTemplate ChatTemplate::parse(std::string_view text, ChatTemplateOptions options) {
  return detail::out_of_memory_as_error("ChatTemplate::parse", [&]() -> ChatTemplate {
    ChatTemplate result;
    try {
      result.template_ = jinja::Template::parse(text);
    } catch (const Error& e) {
      throw Error(std::string(e.what()) + std::string(kRawHint));
    }
    result.options_ = std::move(options);
    return result;
  });
}

std::string ChatTemplate::apply(std::span<const ChatMessage> messages,
                                bool add_generation_prompt) const {
  return detail::out_of_memory_as_error("apply_chat_template", [&]() -> std::string {
    KVCACHE_CHECK(!messages.empty(),
                  "apply_chat_template: expected at least one message, got none");
    jinja::Value::List list;
    for (std::size_t i = 0; i < messages.size(); ++i) {
      for (const auto& [field, text] :
           {std::pair{"role", std::string_view(messages[i].role)},
            std::pair{"content", std::string_view(messages[i].content)}}) {
        const std::size_t bad = detail::first_invalid_utf8(text);
        KVCACHE_CHECK(bad == std::string_view::npos, "apply_chat_template: message ", i, " (",
                      messages[i].role.size() <= 32 && field[0] == 'c' ? messages[i].role : "?",
                      "): expected UTF-8 text in its ", field, ", got an invalid byte 0x", std::hex,
                      static_cast<int>(static_cast<unsigned char>(text[bad])), std::dec,
                      " at offset ", bad, " of the ", field);
      }
      list.emplace_back(jinja::Value::Dict{{"role", jinja::Value(messages[i].role)},
                                           {"content", jinja::Value(messages[i].content)}});
    }
    jinja::Value::Dict context;
    for (const auto& [name, value] : options_.variables) context.emplace_back(name, value);
    context.emplace_back("messages", jinja::Value(std::move(list)));
    context.emplace_back("add_generation_prompt", jinja::Value(add_generation_prompt));
    context.emplace_back("bos_token", jinja::Value(options_.bos_token));
    context.emplace_back("eos_token", jinja::Value(options_.eos_token));
    try {
      return template_.render(context);
    } catch (const Error& e) {
      throw Error(std::string(e.what()) + std::string(kRawHint));
    }
  });
}

std::string apply_chat_template(std::span<const ChatMessage> messages, bool add_generation_prompt,
                                std::string_view template_text, ChatTemplateOptions options) {
  return detail::out_of_memory_as_error("apply_chat_template", [&]() -> std::string {
    return ChatTemplate::parse(template_text, std::move(options))
        .apply(messages, add_generation_prompt);
  });
}

}  // namespace kvcache
