// ChatML rendering without a Jinja engine. The template text is scanned for its string literals
// (inside {{ }} and {% %} tags, with Jinja's escapes) and its plain text (outside tags); the
// default system prompt is the one literal that is a whole system turn,
// "<|im_start|>system\n...<|im_end|>\n". Everything else about ChatML is fixed, so only the
// template's shape is checked: the markers are there, and nothing kvcache would render wrongly
// (reasoning blocks, a system turn it cannot read) is.
#include "kvcache/tokenizer/chat_template.hpp"

#include <utility>
#include <vector>

#include "../io_util.hpp"
#include "kvcache/error.hpp"

namespace kvcache {
namespace {

constexpr std::string_view kStart = "<|im_start|>";
constexpr std::string_view kEnd = "<|im_end|>";
constexpr std::string_view kRawHint = "; pass --raw to send the prompt without a chat template";

// Decodes a Jinja (Python-style) string literal's escapes: \n \t \r \\ \' \" and \uXXXX-free text.
std::string unescape(std::string_view body) {
  std::string out;
  for (std::size_t i = 0; i < body.size(); ++i) {
    if (body[i] != '\\' || i + 1 == body.size()) {
      out += body[i];
      continue;
    }
    const char e = body[++i];
    switch (e) {
      case 'n':
        out += '\n';
        break;
      case 't':
        out += '\t';
        break;
      case 'r':
        out += '\r';
        break;
      case '\\':
        out += '\\';
        break;
      case '\'':
        out += '\'';
        break;
      case '"':
        out += '"';
        break;
      default:  // an escape Python keeps as written
        out += '\\';
        out += e;
    }
  }
  return out;
}

// The template's string literals and plain-text runs, in order, unescaped.
std::vector<std::string> literals(std::string_view t) {
  std::vector<std::string> out;
  std::size_t i = 0;
  while (i < t.size()) {
    const std::size_t open = t.find('{', i);
    const bool tag = open != std::string_view::npos && open + 1 < t.size() &&
                     (t[open + 1] == '{' || t[open + 1] == '%' || t[open + 1] == '#');
    if (!tag) {
      const std::size_t stop = open == std::string_view::npos ? t.size() : open + 1;
      out.emplace_back(t.substr(i, stop - i));
      i = stop;
      continue;
    }
    if (open > i) out.emplace_back(t.substr(i, open - i));
    const char kind = t[open + 1];
    const std::string_view close = kind == '{' ? "}}" : kind == '%' ? "%}" : "#}";
    std::size_t j = open + 2;
    while (j < t.size() && t.compare(j, 2, close) != 0) {
      if (kind != '#' && (t[j] == '\'' || t[j] == '"')) {  // a string literal inside the tag
        const char quote = t[j];
        std::size_t k = j + 1;
        while (k < t.size() && t[k] != quote) k += t[k] == '\\' ? 2 : 1;
        KVCACHE_CHECK(k < t.size(), "chat template: expected a closing ", quote,
                      " for the string at offset ", j, kRawHint);
        out.push_back(unescape(t.substr(j + 1, k - j - 1)));
        j = k + 1;
      } else {
        ++j;
      }
    }
    KVCACHE_CHECK(j < t.size(), "chat template: expected ", close, " for the tag at offset ", open,
                  kRawHint);
    i = j + 2;
  }
  return out;
}

}  // namespace

ChatTemplate ChatTemplate::parse(std::string_view text) {
  KVCACHE_CHECK(
      text.find(kStart) != std::string_view::npos && text.find(kEnd) != std::string_view::npos,
      "chat template: expected a ChatML template (with ", kStart, " and ", kEnd,
      "), got one kvcache cannot interpret", kRawHint);
  KVCACHE_CHECK(text.find("<think>") == std::string_view::npos,
                "chat template: expected plain ChatML, got one with <think> reasoning blocks, "
                "which kvcache does not render",
                kRawHint);
  ChatTemplate result;
  const std::string system_head = std::string(kStart) + "system\n";
  const std::string system_tail = std::string(kEnd) + "\n";
  for (const std::string& s : literals(text)) {
    if (s.size() > system_head.size() + system_tail.size() && s.starts_with(system_head) &&
        s.ends_with(system_tail)) {
      const std::string body =
          s.substr(system_head.size(), s.size() - system_head.size() - system_tail.size());
      KVCACHE_CHECK(body.find(kStart) == std::string::npos && body.find(kEnd) == std::string::npos,
                    "chat template: expected one system turn in the literal \"", s, "\"", kRawHint);
      result.default_system_ = body;
      break;
    }
  }
  // A template that branches on system messages but has no whole system turn as a literal builds
  // its default some other way (pieces joined by +, a variable): refuse rather than guess.
  if (!result.default_system_) {
    for (const std::string& s : literals(text)) {
      KVCACHE_CHECK(s != "system" && s.find(system_head) == std::string::npos,
                    "chat template: expected its default system prompt as one literal \"", kStart,
                    "system\\n...", kEnd, "\\n\", got a template that handles system messages ",
                    "some other way (at \"", s, "\")", kRawHint);
    }
  }
  return result;
}

std::string ChatTemplate::apply(std::span<const ChatMessage> messages,
                                bool add_generation_prompt) const {
  KVCACHE_CHECK(!messages.empty(), "apply_chat_template: expected at least one message, got none");
  // Checked here, where the offset is still one into the caller's own text: after rendering, the
  // tokenizer could only name an offset into the whole prompt.
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
  }
  std::string out;
  auto turn = [&out](std::string_view role, std::string_view content) {
    out.append(kStart).append(role).append("\n").append(content).append(kEnd).append("\n");
  };
  if (default_system_ && messages.front().role != "system") turn("system", *default_system_);
  for (const ChatMessage& m : messages) turn(m.role, m.content);
  if (add_generation_prompt) out.append(kStart).append("assistant\n");
  return out;
}

std::string apply_chat_template(std::span<const ChatMessage> messages, bool add_generation_prompt,
                                std::string_view template_text) {
  return ChatTemplate::parse(template_text).apply(messages, add_generation_prompt);
}

}  // namespace kvcache
