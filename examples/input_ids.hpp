// greedy_decode's --input-ids text ("1,2,3;4,5": ',' between ids, ';' between rows) read into rows
// of token ids, in a header of its own so that fuzz/fuzz_input_ids.cpp runs the very parser the
// example runs. Every malformed text is a kvcache::Error saying what was expected, what came and
// at which byte; messages quote at most a few dozen bytes of the text, escaped, however long or
// binary it is (issue #10).
//
// The grammar, whitespace (space, \t, \n, \v, \f, \r) allowed around every id:
//   ids := row (';' row)*      row := id (',' id)*      id := '+'? digit+   (at most 2^63 - 1)
// So every separator is followed by an id: "1,2," and "1;" are refused like ",1", "1,,2" and
// "1;;2". Ids are non-negative (whether they are inside a model's vocabulary is the caller's
// check). format_input_ids() writes rows back in this grammar.
#pragma once

#include <charconv>
#include <cstddef>
#include <cstdint>
#include <string>
#include <string_view>
#include <system_error>
#include <vector>

#include "kvcache/error.hpp"

namespace kvcache::examples {

namespace input_ids_detail {

inline bool is_space(char c) {
  return c == ' ' || c == '\t' || c == '\n' || c == '\v' || c == '\f' || c == '\r';
}

// One byte as the messages show it: printable ASCII as itself, anything else as \xNN.
inline std::string show_byte(char c) {
  const auto u = static_cast<unsigned char>(c);
  if (u >= 0x20 && u < 0x7f) return std::string(1, c);
  constexpr char kHex[] = "0123456789abcdef";
  return std::string("\\x") + kHex[u >> 4] + kHex[u & 0xf];
}

// The start of the text for a message: at most 48 bytes, escaped, "..." when there is more.
inline std::string show_text(std::string_view text) {
  constexpr std::size_t kMaxShown = 48;
  std::string out;
  for (std::size_t i = 0; i < text.size() && i < kMaxShown; ++i) out += show_byte(text[i]);
  if (text.size() > kMaxShown) out += "...";
  return out;
}

[[noreturn]] inline void fail(std::string_view text, const std::string& what) {
  throw Error("--input-ids " + what +
              ": expected non-negative integers separated by ',' and rows by ';' (e.g. "
              "\"1,2,3;4,5\"), got '" +
              show_text(text) + "' (" + std::to_string(text.size()) + " bytes)");
}

}  // namespace input_ids_detail

/// "1,2,3;4,5" -> {{1, 2, 3}, {4, 5}}: at least one row, no row empty, every id in
/// [0, 2^63 - 1]. Throws kvcache::Error for anything else (see the grammar above).
inline std::vector<std::vector<std::int64_t>> parse_input_ids(std::string_view text) {
  using input_ids_detail::fail;
  using input_ids_detail::show_byte;
  std::size_t pos = 0;  // the next byte to read
  const auto skip_space = [&] {
    while (pos < text.size() && input_ids_detail::is_space(text[pos])) ++pos;
  };
  const auto at = [](std::size_t byte) { return " at byte " + std::to_string(byte); };
  skip_space();
  if (pos == text.size()) fail(text, "is empty");
  std::vector<std::vector<std::int64_t>> rows(1);
  char separator = '\0';  // the separator before the id being read; none before the first
  std::size_t separator_pos = 0;
  while (true) {
    skip_space();
    // An id: '+'? digit+.
    const std::size_t start = pos;
    if (pos < text.size() && text[pos] == '+') ++pos;
    const std::size_t digits = pos;
    while (pos < text.size() && text[pos] >= '0' && text[pos] <= '9') ++pos;
    if (pos == digits) {
      if (start == text.size())
        fail(text, "ends with '" + std::string(1, separator) + "'" + at(separator_pos) +
                       " where an id should follow");
      const char c = text[start];
      if (c == ';' && separator != ',')
        fail(text, "has an empty row (row " + std::to_string(rows.size() - 1) + ")" + at(start));
      if (c == ',' || c == ';')
        fail(text, "has an empty id before the '" + show_byte(c) + "'" + at(start));
      if (c == '-') fail(text, "has a negative id" + at(start));
      fail(text, "has '" + show_byte(text[digits < text.size() ? digits : start]) + "'" +
                     at(digits < text.size() ? digits : start) + " where an id was expected");
    }
    std::int64_t id = 0;
    const auto [end, ec] = std::from_chars(text.data() + digits, text.data() + pos, id);
    if (ec != std::errc() || end != text.data() + pos)
      fail(text, "has an id past the largest 64-bit integer (9223372036854775807)" + at(start));
    rows.back().push_back(id);
    skip_space();
    if (pos == text.size()) return rows;
    separator = text[pos];
    separator_pos = pos;
    if (separator == ';') {
      rows.emplace_back();
    } else if (separator != ',') {
      fail(text, "has '" + show_byte(separator) + "'" + at(pos) +
                     " where ',', ';' or the end should follow an id");
    }
    ++pos;
  }
}

/// The text parse_input_ids() reads back as `rows`: ids joined by ',' and rows by ';'.
inline std::string format_input_ids(const std::vector<std::vector<std::int64_t>>& rows) {
  std::string out;
  for (std::size_t r = 0; r < rows.size(); ++r) {
    if (r > 0) out += ';';
    for (std::size_t i = 0; i < rows[r].size(); ++i) {
      if (i > 0) out += ',';
      out += std::to_string(rows[r][i]);
    }
  }
  return out;
}

}  // namespace kvcache::examples
