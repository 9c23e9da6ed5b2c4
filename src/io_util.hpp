// Private to the file readers (config.json, tokenizer.json, safetensors headers and indexes, GGUF):
// reading a whole small file without blocking on a FIFO or a device, parsing JSON with a bounded
// nesting depth, and quoting a JSON value in an error message with a bounded length.
//
// Why: a FIFO passed as a model path blocks open() for ever, so the path is stat()ed first and
// only a regular file is opened (with O_NONBLOCK, against a swap between stat and open); JSON
// nested 60,000 levels deep parses (nlohmann's parser keeps its own stack) but then overflows the
// thread's stack in every recursive walk (dump, copy, our readers), so it is refused while
// parsing; and a message never quotes more than a few hundred bytes of a hostile file.
#pragma once

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cstdint>
#include <cstring>
#include <limits>
#include <new>
#include <nlohmann/json.hpp>
#include <string>
#include <string_view>

#include "kvcache/error.hpp"

namespace kvcache::detail {

/// JSON files the library reads nest a handful of levels (tokenizer.json about 6); anything
/// deeper than this is refused while parsing.
inline constexpr int kMaxJsonDepth = 128;

/// Bytes of a JSON value (or a string from a file) quoted in an error message at most.
inline constexpr std::size_t kMaxQuoted = 200;

/// Refuses `path` unless it names a regular file (stat() does not open it, so a FIFO or device
/// cannot block here); `what` starts the message ("config", "tokenizer.json", ...).
inline void require_regular_file(const std::string& path, std::string_view what) {
  struct stat st {};
  KVCACHE_CHECK(::stat(path.c_str(), &st) == 0, what, " ", path,
                ": cannot open: ", std::strerror(errno));
  KVCACHE_CHECK(S_ISREG(st.st_mode), what, " ", path, ": expected a regular file, got ",
                S_ISDIR(st.st_mode)                          ? "a directory"
                : S_ISFIFO(st.st_mode)                       ? "a FIFO"
                : S_ISSOCK(st.st_mode)                       ? "a socket"
                : S_ISCHR(st.st_mode) || S_ISBLK(st.st_mode) ? "a device"
                                                             : "a special file");
}

/// The whole content of the regular file `path` (JSON files: configs, tokenizers, indexes).
/// Every failure, allocation included, is a kvcache::Error starting with `what` and the path.
inline std::string read_regular_file(const std::string& path, std::string_view what) {
  require_regular_file(path, what);
  // O_NONBLOCK: if the path became a FIFO after stat(), open() must not wait for a writer.
  const int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC | O_NONBLOCK);
  KVCACHE_CHECK(fd >= 0, what, " ", path, ": cannot open: ", std::strerror(errno));
  struct Closer {
    int fd;
    ~Closer() { (void)::close(fd); }
  } closer{fd};
  struct stat st {};
  KVCACHE_CHECK(::fstat(fd, &st) == 0 && S_ISREG(st.st_mode), what, " ", path,
                ": expected a regular file");
  std::string text;
  try {
    text.reserve(static_cast<std::size_t>(st.st_size));
    char buffer[1 << 16];
    for (;;) {
      const ssize_t n = ::read(fd, buffer, sizeof buffer);
      if (n < 0 && errno == EINTR) continue;
      KVCACHE_CHECK(n >= 0, what, " ", path, ": cannot read: ", std::strerror(errno));
      if (n == 0) break;
      text.append(buffer, static_cast<std::size_t>(n));
    }
  } catch (const std::bad_alloc&) {
    KVCACHE_FAIL(what, " ", path, ": out of memory reading ", st.st_size, " bytes");
  }
  return text;
}

/// Parses JSON text, refusing nesting deeper than kMaxJsonDepth; throws kvcache::Error starting
/// with `where` for invalid JSON, too deep a nesting or too little memory. `Json` is the
/// document's type (nlohmann::ordered_json for safetensors headers), parsed as that type: a
/// conversion from another would copy the document and destroy the original (see release_json).
template <class Json = nlohmann::json>
Json parse_json(std::string_view text, const std::string& where) {
  const typename Json::parser_callback_t limit_depth = [&where](int depth,
                                                                typename Json::parse_event_t event,
                                                                Json&) {
    if ((event == Json::parse_event_t::object_start || event == Json::parse_event_t::array_start) &&
        depth >= kMaxJsonDepth) {
      KVCACHE_FAIL(where, ": expected JSON nested at most ", kMaxJsonDepth,
                   " levels deep, got deeper nesting");
    }
    return true;
  };
  try {
    return Json::parse(text.begin(), text.end(), limit_depth);
  } catch (const typename Json::exception& e) {
    KVCACHE_FAIL(where, ": not valid JSON: ", e.what());
  } catch (const std::bad_alloc&) {
    KVCACHE_FAIL(where, ": out of memory parsing ", text.size(), " bytes of JSON");
  }
}

/// Empties a JSON value leaves first, so that destroying it afterwards allocates nothing.
///
/// Why: nlohmann_json's destructor (basic_json::json_value::destroy, 3.11) moves the children of
/// a non-empty array or object onto a std::vector it allocates (so that deep nesting does not
/// recurse), inside a noexcept destructor: when that allocation fails, std::terminate. Destroying
/// an empty array or object, a string or a number allocates nothing, so clearing each container
/// after its children are emptied frees the whole tree without allocating. The recursion is as
/// deep as the value's nesting: documents from parse_json nest at most kMaxJsonDepth levels.
template <class Json>
void release_json(Json& value) noexcept {
  if (value.is_array()) {
    auto& array = *value.template get_ptr<typename Json::array_t*>();
    for (Json& child : array) release_json(child);
    array.clear();
  } else if (value.is_object()) {
    auto& object = *value.template get_ptr<typename Json::object_t*>();
    for (auto& entry : object) release_json(entry.second);
    object.clear();
  }
}

/// Calls release_json on a document when the scope that parsed it ends, by return or by throw:
/// declare it right after the document, so that it runs before the document's destructor.
template <class Json>
class ReleaseJsonAtExit {
 public:
  explicit ReleaseJsonAtExit(Json& value) noexcept : value_(value) {}
  ~ReleaseJsonAtExit() { release_json(value_); }
  ReleaseJsonAtExit(const ReleaseJsonAtExit&) = delete;
  ReleaseJsonAtExit& operator=(const ReleaseJsonAtExit&) = delete;

 private:
  Json& value_;
};

namespace json_show {
inline void append(const nlohmann::json& value, std::string& out, std::size_t max) {
  using Json = nlohmann::json;
  constexpr auto kReplace = Json::error_handler_t::replace;
  if (out.size() > max) return;
  if (value.is_object()) {
    out += '{';
    bool first = true;
    for (auto it = value.begin(); it != value.end() && out.size() <= max; ++it) {
      if (!first) out += ',';
      first = false;
      out += Json(std::string(it.key().substr(0, max))).dump(-1, ' ', false, kReplace);
      out += ':';
      append(it.value(), out, max);
    }
    out += '}';
  } else if (value.is_array()) {
    out += '[';
    bool first = true;
    for (auto it = value.begin(); it != value.end() && out.size() <= max; ++it) {
      if (!first) out += ',';
      first = false;
      append(*it, out, max);
    }
    out += ']';
  } else if (value.is_string()) {
    const auto& s = value.get_ref<const std::string&>();
    out += Json(s.substr(0, max + 1)).dump(-1, ' ', false, kReplace);
  } else {
    out += value.dump(-1, ' ', false, kReplace);
  }
}
}  // namespace json_show

/// A JSON value for an error message: at most kMaxQuoted bytes, then "...". Never serialises
/// more of the value than it shows, and invalid UTF-8 in strings is replaced.
inline std::string show_json(const nlohmann::json& value) {
  std::string out;
  json_show::append(value, out, kMaxQuoted);
  if (out.size() > kMaxQuoted) out = out.substr(0, kMaxQuoted) + "...";
  return out;
}

/// Offset of the first byte of `text` that is not part of well-formed UTF-8 (Unicode's table
/// 3-7: no overlong forms, surrogates or code points past U+10FFFF), or npos.
inline std::size_t first_invalid_utf8(std::string_view text) {
  const auto byte = [&](std::size_t i) { return static_cast<unsigned char>(text[i]); };
  std::size_t i = 0;
  while (i < text.size()) {
    const unsigned char lead = byte(i);
    std::size_t length = 1;
    unsigned char low = 0x80, high = 0xBF;  // the allowed range of the second byte
    if (lead < 0x80) {
      ++i;
      continue;
    } else if (lead >= 0xC2 && lead <= 0xDF) {
      length = 2;
    } else if (lead >= 0xE0 && lead <= 0xEF) {
      length = 3;
      if (lead == 0xE0) low = 0xA0;
      if (lead == 0xED) high = 0x9F;
    } else if (lead >= 0xF0 && lead <= 0xF4) {
      length = 4;
      if (lead == 0xF0) low = 0x90;
      if (lead == 0xF4) high = 0x8F;
    } else {
      return i;
    }
    if (text.size() - i < length || byte(i + 1) < low || byte(i + 1) > high) return i;
    for (std::size_t k = 2; k < length; ++k)
      if (byte(i + k) < 0x80 || byte(i + k) > 0xBF) return i;
    i += length;
  }
  return std::string_view::npos;
}

/// A string from a file for an error message: at most kMaxQuoted bytes, then "...".
inline std::string show_text(std::string_view text) {
  if (text.size() <= kMaxQuoted) return std::string(text);
  return std::string(text.substr(0, kMaxQuoted)) + "...";
}

}  // namespace kvcache::detail
