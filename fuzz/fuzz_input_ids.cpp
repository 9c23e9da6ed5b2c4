// Fuzz target: greedy_decode's --input-ids parser (examples/input_ids.hpp), two ways.
// 1. The bytes as the text of --input-ids, against a reference written differently (split on
//    every ';' and ',', keeping empty pieces, each piece trimmed and matched whole): both accept
//    the same texts with the same ids. An accepted text gives at least one row, no empty row, ids
//    in [0, 2^63 - 1], one row per ';' + 1 and one id per ',' + row, ends in a digit (never in a
//    separator) and prints back (format_input_ids) to a text that parses to the same rows. A
//    refused text is a kvcache::Error naming --input-ids whose message stays short however long
//    the text is.
// 2. The bytes as rows of ids (any in [0, 2^63 - 1]), written with whitespace, '+' and leading
//    zeros chosen by the bytes: they parse back to the same rows, and with a separator appended
//    they are refused with "ends with".
// A broken expectation is a finding (abort), as is any other exception, a crash or a sanitizer
// report.
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <limits>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "fuzz_util.hpp"
#include "input_ids.hpp"

namespace {

using Rows = std::vector<std::vector<std::int64_t>>;
using kvcache::examples::format_input_ids;
using kvcache::examples::parse_input_ids;
using kvcache::fuzz::ByteReader;

// A message names --input-ids and quotes at most 48 bytes of the text (4 characters each when
// escaped) plus fixed words: well under this bound for any input.
constexpr std::size_t kMaxMessage = 512;

bool is_space(char c) {
  return c == ' ' || c == '\t' || c == '\n' || c == '\v' || c == '\f' || c == '\r';
}

std::string_view trim(std::string_view s) {
  while (!s.empty() && is_space(s.front())) s.remove_prefix(1);
  while (!s.empty() && is_space(s.back())) s.remove_suffix(1);
  return s;
}

// Pieces of `s` between every `sep`, empty ones kept ("1," -> {"1", ""}).
std::vector<std::string_view> split(std::string_view s, char sep) {
  std::vector<std::string_view> out;
  std::size_t begin = 0;
  for (std::size_t i = 0; i <= s.size(); ++i) {
    if (i == s.size() || s[i] == sep) {
      out.push_back(s.substr(begin, i - begin));
      begin = i + 1;
    }
  }
  return out;
}

// One trimmed piece as an id: '+'? digit+, at most 2^63 - 1 (compared as digit strings).
std::optional<std::int64_t> reference_id(std::string_view piece) {
  piece = trim(piece);
  if (!piece.empty() && piece.front() == '+') piece.remove_prefix(1);
  if (piece.empty()) return std::nullopt;
  for (const char c : piece)
    if (c < '0' || c > '9') return std::nullopt;
  while (piece.size() > 1 && piece.front() == '0') piece.remove_prefix(1);
  constexpr std::string_view kMax = "9223372036854775807";
  if (piece.size() > kMax.size() || (piece.size() == kMax.size() && piece > kMax))
    return std::nullopt;
  std::int64_t v = 0;
  for (const char c : piece) v = v * 10 + (c - '0');
  return v;
}

// The reference parser: the rows, or nothing where the text is refused.
std::optional<Rows> reference_parse(std::string_view text) {
  Rows rows;
  for (const std::string_view row : split(text, ';')) {
    rows.emplace_back();
    for (const std::string_view piece : split(row, ',')) {
      const auto id = reference_id(piece);
      if (!id) return std::nullopt;
      rows.back().push_back(*id);
    }
  }
  return rows;
}

std::optional<Rows> parse_or_nothing(std::string_view text, std::string* message) {
  try {
    return parse_input_ids(text);
  } catch (const kvcache::Error& e) {
    *message = e.what();
    return std::nullopt;
  }
}

void check_text(std::string_view text) {
  std::string message;
  const std::optional<Rows> rows = parse_or_nothing(text, &message);
  const std::optional<Rows> want = reference_parse(text);
  FUZZ_ASSERT(rows.has_value() == want.has_value(), "parser %s, reference %s (%zu bytes)",
              rows ? "accepts" : "refuses", want ? "accepts" : "refuses", text.size());
  if (!rows) {
    FUZZ_ASSERT(message.rfind("--input-ids ", 0) == 0, "message: %s", message.c_str());
    FUZZ_ASSERT(message.size() <= kMaxMessage, "a %zu-byte message for %zu bytes of text",
                message.size(), text.size());
    return;
  }
  FUZZ_ASSERT(*rows == *want, "the parser and the reference read different ids");
  std::size_t semicolons = 0, commas = 0, ids = 0;
  for (const char c : text) {
    semicolons += c == ';';
    commas += c == ',';
    FUZZ_ASSERT(is_space(c) || c == ',' || c == ';' || c == '+' || (c >= '0' && c <= '9'),
                "accepted a text holding byte 0x%02x", static_cast<unsigned char>(c));
  }
  FUZZ_ASSERT(!rows->empty() && rows->size() == semicolons + 1, "%zu rows for %zu ';'",
              rows->size(), semicolons);
  for (const auto& row : *rows) {
    FUZZ_ASSERT(!row.empty(), "an empty row was accepted");
    for (const std::int64_t id : row)
      FUZZ_ASSERT(id >= 0, "a negative id %lld", static_cast<long long>(id));
    ids += row.size();
  }
  FUZZ_ASSERT(ids == commas + rows->size(), "%zu ids for %zu ',' in %zu rows", ids, commas,
              rows->size());
  const std::string_view body = trim(text);
  FUZZ_ASSERT(!body.empty() && body.back() >= '0' && body.back() <= '9',
              "accepted a text that does not end in a digit");
  const std::string printed = format_input_ids(*rows);
  const std::optional<Rows> again = parse_or_nothing(printed, &message);
  FUZZ_ASSERT(again && *again == *rows, "'%s' does not parse back to the same rows",
              printed.c_str());
  FUZZ_ASSERT(format_input_ids(*again) == printed, "printing is not stable: '%s'", printed.c_str());
}

// Rows of ids from the bytes, written with decorations the bytes choose.
void check_rows(ByteReader& in) {
  Rows rows(static_cast<std::size_t>(1 + in.below(4)));
  std::string text;
  const auto spaces = [&] {
    static constexpr char kSpaces[] = {' ', '\t', '\n', '\r'};
    for (std::int64_t n = in.below(3); n > 0; --n) text += kSpaces[in.below(4)];
  };
  for (std::size_t r = 0; r < rows.size(); ++r) {
    if (r > 0) text += ';';
    const std::int64_t n = 1 + in.below(6);
    for (std::int64_t i = 0; i < n; ++i) {
      // Any magnitude: the top bits cleared by a shift the bytes pick, so small ids are common.
      const std::int64_t id = static_cast<std::int64_t>(
          (static_cast<std::uint64_t>(in.i64()) & static_cast<std::uint64_t>(INT64_MAX)) >>
          in.below(64));
      rows[r].push_back(id);
      if (i > 0) text += ',';
      spaces();
      if (in.below(4) == 0) text += '+';
      text += std::string(static_cast<std::size_t>(in.below(3)), '0');
      text += std::to_string(id);
      spaces();
    }
  }
  std::string message;
  const std::optional<Rows> got = parse_or_nothing(text, &message);
  FUZZ_ASSERT(got && *got == rows, "'%s' did not parse to the rows it was written from: %s",
              text.c_str(), message.c_str());
  text += in.below(2) == 0 ? ',' : ';';
  spaces();
  FUZZ_ASSERT(!parse_or_nothing(text, &message), "a trailing separator was accepted: '%s'",
              text.c_str());
  FUZZ_ASSERT(message.find("ends with") != std::string::npos, "message: %s", message.c_str());
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  kvcache::fuzz::expect_only_errors("parse_input_ids", [&] {
    check_text(std::string_view(reinterpret_cast<const char*>(data), size));
    ByteReader in(data, size);
    check_rows(in);
  });
  return 0;
}
