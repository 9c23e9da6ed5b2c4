// Private to the tokenizer and the Jinja engine: encoding one code point as UTF-8. Both build text
// from code points (the byte-level BPE table of 256 stand-in characters, a template's \x and \u
// escapes), and one writer keeps them encoding alike.
#pragma once

#include <string>

namespace kvcache::detail {

/// Appends code point `cp` (at most U+10FFFF; callers check) to `out` as 1 to 4 UTF-8 bytes.
inline void append_utf8(char32_t cp, std::string& out) {
  if (cp < 0x80) {
    out += static_cast<char>(cp);
  } else if (cp < 0x800) {
    out += static_cast<char>(0xC0 | (cp >> 6));
    out += static_cast<char>(0x80 | (cp & 0x3F));
  } else if (cp < 0x10000) {
    out += static_cast<char>(0xE0 | (cp >> 12));
    out += static_cast<char>(0x80 | ((cp >> 6) & 0x3F));
    out += static_cast<char>(0x80 | (cp & 0x3F));
  } else {
    out += static_cast<char>(0xF0 | (cp >> 18));
    out += static_cast<char>(0x80 | ((cp >> 12) & 0x3F));
    out += static_cast<char>(0x80 | ((cp >> 6) & 0x3F));
    out += static_cast<char>(0x80 | (cp & 0x3F));
  }
}

}  // namespace kvcache::detail
