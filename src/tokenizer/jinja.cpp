// The Jinja engine behind ChatTemplate (include/kvcache/tokenizer/jinja.hpp says what it covers).
// Three stages, each bounded against hostile templates:
//  - the lexer splits the source into text and tags, applying whitespace control there (`-`,
//    `+`, trim_blocks, lstrip_blocks, as jinja2's lexer does), and tokenizes inside tags;
//  - the parser builds an AST with jinja2's precedence (filters and tests bind tighter than
//    binary operators: `'a' + x | trim` trims x only);
//  - the renderer walks the AST with Python value semantics: scopes per for loop and macro call
//    (so `set` inside a loop does not leak, which is why templates use namespace()), a step
//    counter, a depth counter and an output limit.
// Errors travel as TemplateError carrying the innermost node's line and column, and leave
// Template::render as one kvcache::Error.
//
// Filters: abs, capitalize, count, d, default, dictsort, e, escape, first, float, indent, int,
// items, join, last, length, list, lower, map, max, min, reject, rejectattr, replace, reverse,
// round, safe, select, selectattr, sort, string, sum, title, tojson, trim, unique, upper,
// wordcount. Tests: boolean, callable, defined, divisibleby, eq / equalto / ==, even, false,
// float, ge, gt, in, integer, iterable, le, lower, lt, mapping, ne, none, number, odd, sameas,
// sequence, string, true, undefined, upper. Methods: strings' strip, lstrip, rstrip, split, rsplit,
// splitlines, startswith, endswith, upper, lower, title, capitalize, replace, find, count, join,
// format, isdigit, isspace, isalpha, isalnum; dicts' get, items, keys, values.
#include "kvcache/tokenizer/jinja.hpp"

#include <algorithm>
#include <charconv>
#include <cmath>
#include <ctime>
#include <optional>
#include <unordered_map>

#include "kvcache/error.hpp"
#include "utf8.hpp"

namespace kvcache::jinja {

// --- values ------------------------------------------------------------------------------------

Value Value::none() {
  Value v;
  v.kind_ = Kind::kNone;
  return v;
}
Value::Value(bool b) : kind_(Kind::kBool), b_(b) {}
Value::Value(std::int64_t i) : kind_(Kind::kInt), i_(i) {}
Value::Value(double d) : kind_(Kind::kFloat), d_(d) {}
Value::Value(std::string s)
    : kind_(Kind::kString), s_(std::make_shared<const std::string>(std::move(s))) {}
Value::Value(List list) : kind_(Kind::kList), depth_(1) {
  for (const Value& v : list) {
    depth_ = std::max(depth_, v.depth_ + 1);
    holds_namespace_ = holds_namespace_ || v.holds_namespace_;
  }
  list_ = std::make_shared<const List>(std::move(list));
}
Value::Value(Dict dict) : kind_(Kind::kDict), depth_(1) {
  for (const auto& [k, v] : dict) {
    depth_ = std::max(depth_, v.depth_ + 1);
    holds_namespace_ = holds_namespace_ || v.holds_namespace_;
  }
  dict_ = std::make_shared<Dict>(std::move(dict));
}
Value Value::tuple(List items) {
  Value v(std::move(items));
  v.namespace_ = true;
  return v;
}
Value Value::function(Function f) {
  Value v;
  v.kind_ = Kind::kCallable;
  v.f_ = std::make_shared<const Function>(std::move(f));
  return v;
}
Value Value::make_namespace(Dict initial) {
  Value v(std::move(initial));
  v.namespace_ = true;
  v.holds_namespace_ = true;
  return v;
}
const Value* Value::find(std::string_view key) const {
  if (kind_ != Kind::kDict) return nullptr;
  for (const auto& [k, v] : *dict_)
    if (k == key) return &v;
  return nullptr;
}
void Value::set_attribute(const std::string& key, Value v) const {
  for (auto& [k, old] : *dict_) {
    if (k == key) {
      old = std::move(v);
      return;
    }
  }
  dict_->emplace_back(key, std::move(v));
}

namespace {

// An error inside the engine; line 0 until the innermost node that sees it names its place.
struct TemplateError {
  std::string message;
  int line = 0, column = 0;
  bool raised = false;  // raise_exception() from the template itself
};

template <class... Parts>
[[noreturn]] void fail(Parts&&... parts) {
  throw TemplateError{kvcache::detail::concat(std::forward<Parts>(parts)...)};
}

const char* kind_name(const Value& v) {
  switch (v.kind()) {
    case Value::Kind::kUndefined:
      return "undefined";
    case Value::Kind::kNone:
      return "none";
    case Value::Kind::kBool:
      return "bool";
    case Value::Kind::kInt:
      return "int";
    case Value::Kind::kFloat:
      return "float";
    case Value::Kind::kString:
      return "string";
    case Value::Kind::kList:
      return "list";
    case Value::Kind::kDict:
      return v.is_namespace() ? "namespace" : "dict";
    case Value::Kind::kCallable:
      return "callable";
  }
  return "?";
}

// --- UTF-8: Python indexes strings by code point -------------------------------------------------

// Byte offsets of each code point's start, plus the end.
std::vector<std::size_t> code_points(const std::string& s) {
  std::vector<std::size_t> at;
  at.reserve(s.size() + 1);
  for (std::size_t i = 0; i < s.size(); ++i)
    if ((static_cast<unsigned char>(s[i]) & 0xC0) != 0x80) at.push_back(i);
  at.push_back(s.size());
  return at;
}

std::int64_t length_of(const std::string& s) {
  std::int64_t n = 0;
  for (char c : s) n += (static_cast<unsigned char>(c) & 0xC0) != 0x80;
  return n;
}

bool is_space(char c) {
  return c == ' ' || c == '\t' || c == '\n' || c == '\r' || c == '\v' || c == '\f';
}

// --- Python's str(), repr() and json.dumps ------------------------------------------------------

std::string float_repr(double d) {
  if (std::isnan(d)) return "nan";
  if (std::isinf(d)) return d < 0 ? "-inf" : "inf";
  char buf[64];
  auto [end, ec] = std::to_chars(buf, buf + sizeof buf, d, std::chars_format::scientific);
  std::string sci(buf, end);  // "-1.2345e+02": shortest digits that round-trip
  std::string sign;
  if (sci[0] == '-') {
    sign = "-";
    sci.erase(0, 1);
  }
  const std::size_t e = sci.find('e');
  std::string digits = sci.substr(0, e);
  digits.erase(std::remove(digits.begin(), digits.end(), '.'), digits.end());
  const int exp = std::stoi(sci.substr(e + 1));
  if (exp < -4 || exp >= 16) {  // Python's repr switches to exponent form here
    std::string out = sign + digits.substr(0, 1);
    if (digits.size() > 1) out += "." + digits.substr(1);
    const int a = std::abs(exp);
    out += exp < 0 ? "e-" : "e+";
    if (a < 10) out += "0";
    return out + std::to_string(a);
  }
  if (exp < 0) return sign + "0." + std::string(static_cast<std::size_t>(-exp - 1), '0') + digits;
  const std::size_t point = static_cast<std::size_t>(exp) + 1;
  if (digits.size() <= point) return sign + digits + std::string(point - digits.size(), '0') + ".0";
  return sign + digits.substr(0, point) + "." + digits.substr(point);
}

std::string repr(const Value& v);

std::string string_repr(const std::string& s) {
  const bool dq = s.find('\'') != std::string::npos && s.find('"') == std::string::npos;
  const char q = dq ? '"' : '\'';
  std::string out(1, q);
  for (char c : s) {
    const auto u = static_cast<unsigned char>(c);
    if (c == q || c == '\\') {
      out += '\\';
      out += c;
    } else if (c == '\n') {
      out += "\\n";
    } else if (c == '\r') {
      out += "\\r";
    } else if (c == '\t') {
      out += "\\t";
    } else if (u < 0x20 || u == 0x7F) {
      static const char* hex = "0123456789abcdef";
      out += "\\x";
      out += hex[u >> 4];
      out += hex[u & 15];
    } else {
      out += c;
    }
  }
  return out + q;
}

std::string repr(const Value& v) {
  switch (v.kind()) {
    case Value::Kind::kString:
      return string_repr(v.as_string());
    case Value::Kind::kList: {
      std::string out = v.is_tuple() ? "(" : "[";
      for (std::size_t i = 0; i < v.as_list().size(); ++i)
        out += (i ? ", " : "") + repr(v.as_list()[i]);
      if (v.is_tuple()) return out + (v.as_list().size() == 1 ? ",)" : ")");
      return out + "]";
    }
    case Value::Kind::kDict: {
      std::string out = v.is_namespace() ? "<Namespace {" : "{";
      bool first = true;
      for (const auto& [k, x] : v.as_dict()) {
        out += (first ? "" : ", ") + string_repr(k) + ": " + repr(x);
        first = false;
      }
      return out + (v.is_namespace() ? "}>" : "}");
    }
    default:
      return to_str(v);
  }
}

void json_string(std::string& out, const std::string& s) {
  out += '"';
  for (char c : s) {
    const auto u = static_cast<unsigned char>(c);
    switch (c) {
      case '"':
        out += "\\\"";
        break;
      case '\\':
        out += "\\\\";
        break;
      case '\n':
        out += "\\n";
        break;
      case '\r':
        out += "\\r";
        break;
      case '\t':
        out += "\\t";
        break;
      case '\b':
        out += "\\b";
        break;
      case '\f':
        out += "\\f";
        break;
      default:
        if (u < 0x20) {
          static const char* hex = "0123456789abcdef";
          out += "\\u00";
          out += hex[u >> 4];
          out += hex[u & 15];
        } else {
          out += c;
        }
    }
  }
  out += '"';
}

void json_dump(std::string& out, const Value& v, int indent, int level, bool sort_keys, int depth) {
  if (depth > 512) fail("tojson: expected a value nested at most 512 levels, got a deeper one");
  const auto newline = [&](int lv) {
    out += '\n';
    out.append(static_cast<std::size_t>(indent * lv), ' ');
  };
  switch (v.kind()) {
    case Value::Kind::kNone:
      out += "null";
      return;
    case Value::Kind::kBool:
      out += v.as_bool() ? "true" : "false";
      return;
    case Value::Kind::kInt:
      out += std::to_string(v.as_int());
      return;
    case Value::Kind::kFloat: {
      const double d = v.as_float();
      out += std::isnan(d)   ? "NaN"
             : std::isinf(d) ? (d < 0 ? "-Infinity" : "Infinity")
                             : float_repr(d);
      return;
    }
    case Value::Kind::kString:
      json_string(out, v.as_string());
      return;
    case Value::Kind::kList: {
      const Value::List& l = v.as_list();
      if (l.empty()) {
        out += "[]";
        return;
      }
      out += '[';
      for (std::size_t i = 0; i < l.size(); ++i) {
        if (i) out += indent >= 0 ? "," : ", ";
        if (indent >= 0) newline(level + 1);
        json_dump(out, l[i], indent, level + 1, sort_keys, depth + 1);
      }
      if (indent >= 0) newline(level);
      out += ']';
      return;
    }
    case Value::Kind::kDict: {
      if (v.is_namespace()) break;
      std::vector<const std::pair<std::string, Value>*> items;
      for (const auto& kv : v.as_dict()) items.push_back(&kv);
      if (sort_keys)
        std::stable_sort(items.begin(), items.end(),
                         [](auto* a, auto* b) { return a->first < b->first; });
      if (items.empty()) {
        out += "{}";
        return;
      }
      out += '{';
      for (std::size_t i = 0; i < items.size(); ++i) {
        if (i) out += indent >= 0 ? "," : ", ";
        if (indent >= 0) newline(level + 1);
        json_string(out, items[i]->first);
        out += ": ";
        json_dump(out, items[i]->second, indent, level + 1, sort_keys, depth + 1);
      }
      if (indent >= 0) newline(level);
      out += '}';
      return;
    }
    default:
      break;
  }
  fail("tojson: expected a JSON-serializable value, got ", kind_name(v));
}

}  // namespace

std::string to_str(const Value& v) {
  switch (v.kind()) {
    case Value::Kind::kUndefined:
      return "";
    case Value::Kind::kNone:
      return "None";
    case Value::Kind::kBool:
      return v.as_bool() ? "True" : "False";
    case Value::Kind::kInt:
      return std::to_string(v.as_int());
    case Value::Kind::kFloat:
      return float_repr(v.as_float());
    case Value::Kind::kString:
      return v.as_string();
    case Value::Kind::kCallable:
      return "<function>";
    default:
      return repr(v);
  }
}

std::string to_json(const Value& v, int indent) {
  std::string out;
  json_dump(out, v, indent, 0, false, 0);
  return out;
}

namespace {

// --- lexer -------------------------------------------------------------------------------------

enum class Tok {
  kText,
  kVarBegin,
  kVarEnd,
  kBlockBegin,
  kBlockEnd,
  kName,
  kString,
  kInt,
  kFloat,
  kOp,
  kEof
};

struct Token {
  Tok type;
  std::string text;  // text, name, operator, or the string literal's value
  int line = 1, column = 1;
  std::int64_t i = 0;
  double d = 0;
};

const char* tok_name(Tok t) {
  switch (t) {
    case Tok::kText:
      return "text";
    case Tok::kVarBegin:
      return "'{{'";
    case Tok::kVarEnd:
      return "'}}'";
    case Tok::kBlockBegin:
      return "'{%'";
    case Tok::kBlockEnd:
      return "'%}'";
    case Tok::kName:
      return "name";
    case Tok::kString:
      return "string";
    case Tok::kInt:
      return "integer";
    case Tok::kFloat:
      return "float";
    case Tok::kOp:
      return "operator";
    case Tok::kEof:
      return "end of template";
  }
  return "?";
}

std::string describe(const Token& t) {
  switch (t.type) {
    case Tok::kName:
      return "name '" + t.text + "'";
    case Tok::kOp:
      return "'" + t.text + "'";
    case Tok::kString:
      return "string " + string_repr(t.text.size() > 40 ? t.text.substr(0, 40) + "..." : t.text);
    case Tok::kInt:
    case Tok::kFloat:
      return std::string(tok_name(t.type)) + " " + t.text;
    default:
      return tok_name(t.type);
  }
}

class Lexer {
 public:
  explicit Lexer(std::string_view src) : src_(src) {
    // keep_trailing_newline=False: jinja2 drops one newline at the end of the source.
    if (src_.ends_with('\n')) src_.remove_suffix(1);
  }

  std::vector<Token> run() {
    bool line_starting = true;  // the text so far ends at the start of a line
    while (pos_ < src_.size()) {
      std::size_t open = pos_;
      for (;;) {
        open = src_.find('{', open);
        if (open == std::string_view::npos || open + 1 >= src_.size()) {
          open = std::string_view::npos;
          break;
        }
        const char k = src_[open + 1];
        if (k == '{' || k == '%' || k == '#') break;
        ++open;
      }
      std::string text(
          src_.substr(pos_, open == std::string_view::npos ? src_.size() - pos_ : open - pos_));
      const int text_line = line_, text_column = column_;
      advance(text.size());
      if (open == std::string_view::npos) {
        push_text(std::move(text), text_line, text_column);
        break;
      }
      const char kind = src_[open + 1];
      const char modifier = open + 2 < src_.size() ? src_[open + 2] : '\0';
      if (modifier == '-') {
        while (!text.empty() && is_space(text.back())) text.pop_back();
      } else if (modifier != '+' && kind != '{') {  // lstrip_blocks
        const std::size_t nl = text.rfind('\n');
        const std::size_t from = nl == std::string::npos ? 0 : nl + 1;
        if (nl != std::string::npos || line_starting) {
          if (text.find_first_not_of(" \t", from) == std::string::npos) text.resize(from);
        }
      }
      push_text(std::move(text), text_line, text_column);
      const int tag_line = line_, tag_column = column_;
      advance(2 + (modifier == '-' || modifier == '+'));
      if (kind == '#') {
        const std::size_t close = src_.find("#}", pos_);
        if (close == std::string_view::npos)
          error(tag_line, tag_column, "expected '#}' closing the comment, got the end of template");
        const bool strip = close > pos_ && src_[close - 1] == '-';
        const bool keep = close > pos_ && src_[close - 1] == '+';
        advance(close + 2 - pos_);
        line_starting = after_tag(strip, !keep);
        continue;
      }
      tokens_.push_back(
          {kind == '{' ? Tok::kVarBegin : Tok::kBlockBegin, "", tag_line, tag_column});
      line_starting = lex_tag(kind == '{' ? '}' : '%');
      if (kind == '%') maybe_raw();
    }
    tokens_.push_back({Tok::kEof, "", line_, column_});
    return std::move(tokens_);
  }

 private:
  [[noreturn]] void error(int line, int column, const std::string& message) {
    throw TemplateError{message, line, column};
  }

  void push_text(std::string text, int line, int column) {
    if (!text.empty()) tokens_.push_back({Tok::kText, std::move(text), line, column});
  }

  void advance(std::size_t n) {
    for (std::size_t i = 0; i < n && pos_ < src_.size(); ++i, ++pos_) {
      if (src_[pos_] == '\n') {
        ++line_;
        column_ = 1;
      } else {
        ++column_;
      }
    }
  }

  // After a tag's end: `-` strips all following whitespace, trim_blocks one newline. Returns
  // whether the text that follows starts a line.
  bool after_tag(bool strip, bool trim) {
    std::size_t n = 0;
    if (strip) {
      while (pos_ + n < src_.size() && is_space(src_[pos_ + n])) ++n;
    } else if (trim && pos_ < src_.size() && src_[pos_] == '\n') {
      n = 1;
    }
    const bool ends_line = n > 0 && src_[pos_ + n - 1] == '\n';
    advance(n);
    return ends_line;
  }

  // Tokens up to the tag's end ("}}" or "%}"); returns line_starting for the text after it.
  bool lex_tag(char closer) {
    for (;;) {
      while (pos_ < src_.size() && is_space(src_[pos_])) advance(1);
      if (pos_ >= src_.size())
        error(line_, column_,
              std::string("expected '") + closer + "}' closing the tag, got the end of template");
      const std::string_view rest = src_.substr(pos_);
      const std::string end = std::string(1, closer) + "}";
      for (const char m : {'-', '+', '\0'}) {
        const std::string marker = m ? std::string(1, m) + end : end;
        if (rest.starts_with(marker)) {
          tokens_.push_back({closer == '}' ? Tok::kVarEnd : Tok::kBlockEnd, "", line_, column_});
          advance(marker.size());
          return after_tag(m == '-', closer == '%' && m != '+');
        }
      }
      lex_token();
    }
  }

  void lex_token() {
    const int line = line_, column = column_;
    const char c = src_[pos_];
    if (std::isalpha(static_cast<unsigned char>(c)) || c == '_') {
      std::size_t n = 1;
      while (pos_ + n < src_.size() &&
             (std::isalnum(static_cast<unsigned char>(src_[pos_ + n])) || src_[pos_ + n] == '_'))
        ++n;
      tokens_.push_back({Tok::kName, std::string(src_.substr(pos_, n)), line, column});
      advance(n);
      return;
    }
    if (std::isdigit(static_cast<unsigned char>(c))) {
      std::size_t n = 0;
      auto digits = [&] {
        while (pos_ + n < src_.size() &&
               (std::isdigit(static_cast<unsigned char>(src_[pos_ + n])) || src_[pos_ + n] == '_'))
          ++n;
      };
      digits();
      bool is_float = false;
      if (pos_ + n + 1 < src_.size() && src_[pos_ + n] == '.' &&
          std::isdigit(static_cast<unsigned char>(src_[pos_ + n + 1]))) {
        is_float = true;
        ++n;
        digits();
      }
      if (pos_ + n < src_.size() && (src_[pos_ + n] == 'e' || src_[pos_ + n] == 'E')) {
        std::size_t m = n + 1;
        if (pos_ + m < src_.size() && (src_[pos_ + m] == '+' || src_[pos_ + m] == '-')) ++m;
        if (pos_ + m < src_.size() && std::isdigit(static_cast<unsigned char>(src_[pos_ + m]))) {
          is_float = true;
          n = m;
          digits();
        }
      }
      std::string text(src_.substr(pos_, n));
      std::string clean = text;
      clean.erase(std::remove(clean.begin(), clean.end(), '_'), clean.end());
      Token t{is_float ? Tok::kFloat : Tok::kInt, text, line, column};
      if (is_float) {
        t.d = std::strtod(clean.c_str(), nullptr);
      } else {
        auto [p, ec] = std::from_chars(clean.data(), clean.data() + clean.size(), t.i);
        if (ec != std::errc())
          error(line, column, "expected an integer that fits 64 bits, got " + text);
      }
      tokens_.push_back(std::move(t));
      advance(n);
      return;
    }
    if (c == '\'' || c == '"') {
      std::string value;
      std::size_t i = pos_ + 1;
      for (;; ++i) {
        if (i >= src_.size())
          error(
              line, column,
              std::string("expected a closing ") + c + " for the string, got the end of template");
        if (src_[i] == c) break;
        if (src_[i] != '\\' || i + 1 >= src_.size()) {
          value += src_[i];
          continue;
        }
        const char e = src_[++i];
        auto hex = [&](int count) {
          std::uint32_t cp = 0;
          for (int k = 0; k < count; ++k) {
            const char h = i + 1 < src_.size() ? src_[++i] : '\0';
            const int d = std::isdigit(static_cast<unsigned char>(h)) ? h - '0'
                          : (h >= 'a' && h <= 'f')                    ? h - 'a' + 10
                          : (h >= 'A' && h <= 'F')                    ? h - 'A' + 10
                                                                      : -1;
            if (d < 0) error(line, column, "expected hex digits in the string's \\x/\\u escape");
            cp = cp * 16 + static_cast<std::uint32_t>(d);
          }
          if (cp > 0x10FFFF) error(line, column, "expected a code point up to 0x10ffff");
          kvcache::detail::append_utf8(static_cast<char32_t>(cp), value);
        };
        switch (e) {
          case 'n':
            value += '\n';
            break;
          case 't':
            value += '\t';
            break;
          case 'r':
            value += '\r';
            break;
          case '\\':
            value += '\\';
            break;
          case '\'':
            value += '\'';
            break;
          case '"':
            value += '"';
            break;
          case 'a':
            value += '\a';
            break;
          case 'b':
            value += '\b';
            break;
          case 'f':
            value += '\f';
            break;
          case 'v':
            value += '\v';
            break;
          case '0':
            value += '\0';
            break;
          case '\n':
            break;  // a line continuation
          case 'x':
            hex(2);
            break;
          case 'u':
            hex(4);
            break;
          case 'U':
            hex(8);
            break;
          default:  // Python keeps an unknown escape as written
            value += '\\';
            value += e;
        }
      }
      tokens_.push_back({Tok::kString, std::move(value), line, column});
      advance(i + 1 - pos_);
      return;
    }
    static const char* const ops[] = {"//", "**", "==", "!=", "<=", ">=", "+", "-", "*",
                                      "/",  "%",  "~",  "<",  ">",  "=",  "(", ")", "[",
                                      "]",  "{",  "}",  ",",  ".",  ":",  "|"};
    for (const char* op : ops) {
      if (src_.substr(pos_).starts_with(op)) {
        tokens_.push_back({Tok::kOp, op, line, column});
        advance(std::char_traits<char>::length(op));
        return;
      }
    }
    error(line, column,
          std::string("expected an expression token, got the character ") +
              string_repr(std::string(1, c)));
  }

  // {% raw %}...{% endraw %}: the text between is kept as written.
  void maybe_raw() {
    const std::size_t n = tokens_.size();
    if (n < 3 || tokens_[n - 3].type != Tok::kBlockBegin || tokens_[n - 2].type != Tok::kName ||
        tokens_[n - 2].text != "raw")
      return;
    const int line = tokens_[n - 3].line, column = tokens_[n - 3].column;
    tokens_.resize(n - 3);
    std::size_t at = pos_;
    for (;;) {
      at = src_.find("{%", at);
      if (at == std::string_view::npos)
        error(line, column, "expected {% endraw %} closing the raw block, got the end of template");
      std::size_t k = at + 2;
      if (k < src_.size() && (src_[k] == '-' || src_[k] == '+')) ++k;
      while (k < src_.size() && is_space(src_[k])) ++k;
      if (src_.substr(k).starts_with("endraw")) break;
      at += 2;
    }
    std::string text(src_.substr(pos_, at - pos_));
    if (src_[at + 2] == '-')
      while (!text.empty() && is_space(text.back())) text.pop_back();
    push_text(std::move(text), line, column);
    advance(at - pos_);
    advance(2 + (src_[pos_ + 2] == '-' || src_[pos_ + 2] == '+'));
    lex_tag('%');  // "endraw %}"
    tokens_.resize(tokens_.size() - 2);
  }

  std::string_view src_;
  std::size_t pos_ = 0;
  int line_ = 1, column_ = 1;
  std::vector<Token> tokens_;
};

// --- AST -----------------------------------------------------------------------------------------

enum class E {
  kLiteral,
  kName,
  kList,
  kDict,
  kAttr,
  kItem,
  kSlice,
  kCall,
  kFilter,
  kTest,
  kNeg,
  kPos,
  kNot,
  kBinary,
  kAnd,
  kOr,
  kCompare,
  kCond
};

struct Expr;
using ExprP = std::unique_ptr<Expr>;

struct Expr {
  E kind;
  int line = 0, column = 0;
  std::string name;              // variable, attribute, filter, test or operator
  Value value;                   // a literal
  std::vector<ExprP> args;       // operands; for calls the callee (or filtered value) first
  std::vector<std::string> ops;  // a comparison chain's operators; keyword names of a call
  std::size_t positional = 0;    // calls, filters, tests: positional arguments after args[0]
  bool negated = false;          // `is not`; a kList written as a tuple
  std::size_t height = 1;        // 1 + the tallest operand's: bounds every walk of the tree
};

enum class S {
  kText,
  kOutput,
  kIf,
  kFor,
  kSet,
  kSetBlock,
  kMacro,
  kBreak,
  kContinue,
  kBlock,
  kFilterBlock
};

struct Stmt;
using Body = std::vector<std::unique_ptr<Stmt>>;

struct Stmt {
  S kind;
  int line = 0, column = 0;
  std::string text;                // kText; kSet's attribute (ns.attr); kMacro's name
  std::vector<std::string> names;  // targets of for / set; macro parameters
  std::vector<ExprP> exprs;        // kOutput / kSet: value; kIf: conditions; kFor: iter, filter
  std::vector<ExprP> defaults;     // macro parameter defaults (null when none)
  std::vector<Body> bodies;        // kIf: one per branch (+ else); kFor: body, else
  ExprP filter;                    // kFilterBlock: a kFilter node whose args[0] is null
};

}  // namespace

namespace detail {
struct Program {
  Body body;
  Limits limits;
};
}  // namespace detail

namespace {

// --- parser --------------------------------------------------------------------------------------

class Parser {
 public:
  Parser(std::vector<Token> tokens, const Limits& limits)
      : t_(std::move(tokens)), limits_(limits) {}

  Body run() {
    Body body = parse_body({});
    if (cur().type != Tok::kEof) unexpected("the end of template");
    return body;
  }

 private:
  struct Depth {
    Parser& p;
    explicit Depth(Parser& parser) : p(parser) {
      if (++p.depth_ > p.limits_.max_depth)
        p.error("expected templates nested at most " + std::to_string(p.limits_.max_depth) +
                " levels deep, got a deeper one");
    }
    ~Depth() { --p.depth_; }
  };

  const Token& cur() const { return t_[i_]; }
  const Token& peek(std::size_t k = 1) const { return t_[std::min(i_ + k, t_.size() - 1)]; }
  void next() {
    if (i_ + 1 < t_.size()) ++i_;
  }

  [[noreturn]] void error(const std::string& message) const {
    throw TemplateError{message, cur().line, cur().column};
  }
  [[noreturn]] void unexpected(const std::string& expected) const {
    error("expected " + expected + ", got " + describe(cur()));
  }

  bool is_op(const char* op) const { return cur().type == Tok::kOp && cur().text == op; }
  bool is_name(const char* name) const { return cur().type == Tok::kName && cur().text == name; }
  void expect_op(const char* op) {
    if (!is_op(op)) unexpected(std::string("'") + op + "'");
    next();
  }
  std::string expect_name(const char* what) {
    if (cur().type != Tok::kName) unexpected(what);
    std::string n = cur().text;
    next();
    return n;
  }
  void expect_block_end() {
    if (cur().type != Tok::kBlockEnd) unexpected("'%}'");
    next();
  }

  // Appends an operand (null where optional), keeping the tree no taller than max_depth: a
  // chain like a.b.c.d... or a+b+c+... is walked (and destroyed) recursively.
  void adopt(Expr& parent, ExprP child) {
    if (child) {
      parent.height = std::max(parent.height, child->height + 1);
      if (parent.height > limits_.max_depth)
        throw TemplateError{"expected an expression nested at most " +
                                std::to_string(limits_.max_depth) +
                                " levels deep, got a deeper one",
                            parent.line, parent.column};
    }
    parent.args.push_back(std::move(child));
  }

  ExprP make(E kind, const Token& at) {
    auto e = std::make_unique<Expr>();
    e->kind = kind;
    e->line = at.line;
    e->column = at.column;
    return e;
  }
  std::unique_ptr<Stmt> stmt(S kind, const Token& at) {
    auto s = std::make_unique<Stmt>();
    s->kind = kind;
    s->line = at.line;
    s->column = at.column;
    return s;
  }

  // Statements until a {% name %} in `ends` (left current: the name token after '{%').
  Body parse_body(std::initializer_list<const char*> ends) {
    Depth depth(*this);
    Body body;
    for (;;) {
      const Token& t = cur();
      if (t.type == Tok::kEof) {
        if (ends.size() == 0) return body;
        std::string list;
        for (const char* e : ends)
          list += (list.empty() ? "" : " or ") + std::string("{% ") + e + " %}";
        unexpected(list);
      }
      if (t.type == Tok::kText) {
        auto s = stmt(S::kText, t);
        s->text = t.text;
        body.push_back(std::move(s));
        next();
      } else if (t.type == Tok::kVarBegin) {
        auto s = stmt(S::kOutput, t);
        next();
        s->exprs.push_back(expression());
        if (cur().type != Tok::kVarEnd) unexpected("'}}'");
        next();
        body.push_back(std::move(s));
      } else if (t.type == Tok::kBlockBegin) {
        const Token& name = peek();
        if (name.type == Tok::kName)
          for (const char* e : ends)
            if (name.text == e) {
              next();
              return body;
            }
        next();
        body.push_back(statement());
      } else {
        unexpected("text, '{{' or '{%'");
      }
    }
  }

  void end_tag(const char* name) {  // after parse_body stopped at {% name
    expect_name(name);
    expect_block_end();
  }

  std::unique_ptr<Stmt> statement() {
    const Token at = cur();
    const std::string kw = expect_name("a statement name");
    if (kw == "if") {
      auto s = stmt(S::kIf, at);
      s->exprs.push_back(expression());
      expect_block_end();
      for (;;) {
        s->bodies.push_back(parse_body({"elif", "else", "endif"}));
        const std::string which = expect_name("elif, else or endif");
        if (which == "elif") {
          s->exprs.push_back(expression());
          expect_block_end();
        } else if (which == "else") {
          expect_block_end();
          s->bodies.push_back(parse_body({"endif"}));
          end_tag("endif");
          break;
        } else {
          expect_block_end();
          break;
        }
      }
      return s;
    }
    if (kw == "for") {
      auto s = stmt(S::kFor, at);
      s->names = targets();
      if (!is_name("in")) unexpected("'in'");
      next();
      s->exprs.push_back(or_expr());  // `if` here filters, it is not a conditional expression
      if (is_name("if")) {
        next();
        s->exprs.push_back(expression());
      } else {
        s->exprs.push_back(nullptr);
      }
      if (is_name("recursive")) error("expected a for loop without 'recursive' (not supported)");
      expect_block_end();
      ++loops_;
      s->bodies.push_back(parse_body({"else", "endfor"}));
      --loops_;
      if (is_name("else")) {
        end_tag("else");
        s->bodies.push_back(parse_body({"endfor"}));
      }
      end_tag("endfor");
      return s;
    }
    if (kw == "set") {
      const Token& target = cur();
      if (target.type == Tok::kName && peek().type == Tok::kOp && peek().text == ".") {
        auto s = stmt(S::kSet, at);
        s->names.push_back(target.text);
        next();
        next();
        s->text = expect_name("an attribute name");
        expect_op("=");
        s->exprs.push_back(expression());
        expect_block_end();
        return s;
      }
      std::vector<std::string> names = targets();
      if (cur().type == Tok::kBlockEnd) {
        if (names.size() != 1) unexpected("'='");
        auto s = stmt(S::kSetBlock, at);
        s->names = std::move(names);
        next();
        s->bodies.push_back(parse_body({"endset"}));
        end_tag("endset");
        return s;
      }
      auto s = stmt(S::kSet, at);
      s->names = std::move(names);
      expect_op("=");
      s->exprs.push_back(tuple_or_expression());
      expect_block_end();
      return s;
    }
    if (kw == "macro") {
      auto s = stmt(S::kMacro, at);
      s->text = expect_name("a macro name");
      expect_op("(");
      while (!is_op(")")) {
        s->names.push_back(expect_name("a parameter name"));
        if (is_op("=")) {
          next();
          s->defaults.push_back(expression());
        } else {
          s->defaults.push_back(nullptr);
        }
        if (!is_op(")")) expect_op(",");
      }
      next();
      expect_block_end();
      const int outer_loops = std::exchange(loops_, 0);  // a loop outside does not reach inside
      s->bodies.push_back(parse_body({"endmacro"}));
      loops_ = outer_loops;
      end_tag("endmacro");
      return s;
    }
    if (kw == "break" || kw == "continue") {
      if (loops_ == 0) error("expected '" + kw + "' inside a for loop");
      expect_block_end();
      return stmt(kw == "break" ? S::kBreak : S::kContinue, at);
    }
    if (kw == "generation") {  // transformers' AssistantTracker: rendered as its body
      expect_block_end();
      auto s = stmt(S::kBlock, at);
      s->bodies.push_back(parse_body({"endgeneration"}));
      end_tag("endgeneration");
      return s;
    }
    if (kw == "filter") {
      auto s = stmt(S::kFilterBlock, at);
      s->filter = filter_call(nullptr);
      expect_block_end();
      s->bodies.push_back(parse_body({"endfilter"}));
      end_tag("endfilter");
      return s;
    }
    i_ -= 1;
    error("expected a statement (if, for, set, macro, filter, break, continue, generation), got '" +
          kw + "'");
  }

  std::vector<std::string> targets() {
    std::vector<std::string> names;
    const bool paren = is_op("(");
    if (paren) next();
    names.push_back(expect_name("a variable name"));
    while (is_op(",")) {
      next();
      names.push_back(expect_name("a variable name"));
    }
    if (paren) expect_op(")");
    return names;
  }

  ExprP tuple_or_expression() {
    const Token at = cur();
    ExprP first = expression();
    if (!is_op(",")) return first;
    auto list = make(E::kList, at);
    list->negated = true;
    adopt(*list, std::move(first));
    while (is_op(",")) {
      next();
      adopt(*list, expression());
    }
    return list;
  }

  ExprP expression() {
    Depth depth(*this);
    ExprP e = or_expr();
    while (is_name("if")) {
      auto c = make(E::kCond, cur());
      next();
      ExprP cond = or_expr();
      ExprP otherwise;
      if (is_name("else")) {
        next();
        otherwise = expression();
      }
      adopt(*c, std::move(e));
      adopt(*c, std::move(cond));
      adopt(*c, std::move(otherwise));
      e = std::move(c);
    }
    return e;
  }

  ExprP or_expr() {
    ExprP e = and_expr();
    while (is_name("or")) {
      auto b = make(E::kOr, cur());
      next();
      adopt(*b, std::move(e));
      adopt(*b, and_expr());
      e = std::move(b);
    }
    return e;
  }
  ExprP and_expr() {
    ExprP e = not_expr();
    while (is_name("and")) {
      auto b = make(E::kAnd, cur());
      next();
      adopt(*b, std::move(e));
      adopt(*b, not_expr());
      e = std::move(b);
    }
    return e;
  }
  ExprP not_expr() {
    if (is_name("not")) {
      Depth depth(*this);
      auto n = make(E::kNot, cur());
      next();
      adopt(*n, not_expr());
      return n;
    }
    return compare();
  }
  ExprP compare() {
    const Token at = cur();
    ExprP first = math1();
    ExprP chain;
    for (;;) {
      std::string op;
      if (cur().type == Tok::kOp &&
          (cur().text == "==" || cur().text == "!=" || cur().text == "<" || cur().text == ">" ||
           cur().text == "<=" || cur().text == ">=")) {
        op = cur().text;
        next();
      } else if (is_name("in")) {
        op = "in";
        next();
      } else if (is_name("not") && peek().type == Tok::kName && peek().text == "in") {
        op = "not in";
        next();
        next();
      } else {
        break;
      }
      if (!chain) {
        chain = make(E::kCompare, at);
        adopt(*chain, std::move(first));
      }
      chain->ops.push_back(op);
      adopt(*chain, math1());
    }
    return chain ? std::move(chain) : std::move(first);
  }
  ExprP binary(ExprP left, ExprP right, const Token& at, const std::string& op) {
    auto b = make(E::kBinary, at);
    b->name = op;
    adopt(*b, std::move(left));
    adopt(*b, std::move(right));
    return b;
  }
  ExprP math1() {
    ExprP e = concat();
    while (is_op("+") || is_op("-")) {
      const Token at = cur();
      next();
      e = binary(std::move(e), concat(), at, at.text);
    }
    return e;
  }
  ExprP concat() {
    ExprP e = math2();
    while (is_op("~")) {
      const Token at = cur();
      next();
      e = binary(std::move(e), math2(), at, "~");
    }
    return e;
  }
  ExprP math2() {
    ExprP e = power();
    while (is_op("*") || is_op("/") || is_op("//") || is_op("%")) {
      const Token at = cur();
      next();
      e = binary(std::move(e), power(), at, at.text);
    }
    return e;
  }
  ExprP power() {
    ExprP e = unary(true);
    while (is_op("**")) {
      const Token at = cur();
      next();
      e = binary(std::move(e), unary(true), at, "**");
    }
    return e;
  }
  ExprP unary(bool with_filter) {
    Depth depth(*this);
    ExprP e;
    if (is_op("-") || is_op("+")) {
      e = make(is_op("-") ? E::kNeg : E::kPos, cur());
      next();
      adopt(*e, unary(false));
    } else {
      e = primary();
    }
    e = postfix(std::move(e));
    if (with_filter) e = filters(std::move(e));
    return e;
  }

  ExprP primary() {
    const Token at = cur();
    switch (at.type) {
      case Tok::kName: {
        next();
        auto e = make(E::kLiteral, at);
        if (at.text == "true" || at.text == "True") {
          e->value = Value(true);
        } else if (at.text == "false" || at.text == "False") {
          e->value = Value(false);
        } else if (at.text == "none" || at.text == "None") {
          e->value = Value::none();
        } else {
          e->kind = E::kName;
          e->name = at.text;
        }
        return e;
      }
      case Tok::kString: {
        std::string s;
        while (cur().type == Tok::kString) {  // adjacent literals join, as in Python
          s += cur().text;
          next();
        }
        auto e = make(E::kLiteral, at);
        e->value = Value(std::move(s));
        return e;
      }
      case Tok::kInt:
      case Tok::kFloat: {
        next();
        auto e = make(E::kLiteral, at);
        e->value = at.type == Tok::kInt ? Value(at.i) : Value(at.d);
        return e;
      }
      case Tok::kOp:
        if (at.text == "(") {
          next();
          if (is_op(")")) {  // the empty tuple
            next();
            auto empty = make(E::kList, at);
            empty->negated = true;
            return empty;
          }
          ExprP e = expression();
          if (is_op(",")) {
            auto list = make(E::kList, at);
            list->negated = true;
            adopt(*list, std::move(e));
            while (is_op(",")) {
              next();
              if (is_op(")")) break;
              adopt(*list, expression());
            }
            e = std::move(list);
          }
          expect_op(")");
          return e;
        }
        if (at.text == "[") {
          next();
          auto list = make(E::kList, at);
          while (!is_op("]")) {
            adopt(*list, expression());
            if (!is_op("]")) expect_op(",");
          }
          next();
          return list;
        }
        if (at.text == "{") {
          next();
          auto dict = make(E::kDict, at);
          while (!is_op("}")) {
            adopt(*dict, expression());
            expect_op(":");
            adopt(*dict, expression());
            if (!is_op("}")) expect_op(",");
          }
          next();
          return dict;
        }
        break;
      default:
        break;
    }
    unexpected("an expression");
  }

  ExprP postfix(ExprP e) {
    for (;;) {
      const Token at = cur();
      if (is_op(".")) {
        next();
        auto a = make(E::kAttr, at);
        if (cur().type == Tok::kInt) {  // x.0 is x[0] in Jinja
          auto index = make(E::kLiteral, cur());
          index->value = Value(cur().i);
          next();
          a->kind = E::kItem;
          adopt(*a, std::move(e));
          adopt(*a, std::move(index));
        } else {
          a->name = expect_name("an attribute name");
          adopt(*a, std::move(e));
        }
        e = std::move(a);
      } else if (is_op("[")) {
        next();
        ExprP parts[3];
        bool slice = false;
        for (int k = 0; k < 3; ++k) {
          if (!is_op(":") && !is_op("]")) parts[k] = expression();
          if (k < 2 && is_op(":")) {
            slice = true;
            next();
          } else {
            break;
          }
        }
        expect_op("]");
        auto s = make(slice ? E::kSlice : E::kItem, at);
        adopt(*s, std::move(e));
        if (!slice && !parts[0]) error("expected an index inside [ ]");
        adopt(*s, std::move(parts[0]));
        if (slice) {
          adopt(*s, std::move(parts[1]));
          adopt(*s, std::move(parts[2]));
        }
        e = std::move(s);
      } else if (is_op("(")) {
        e = call(std::move(e), E::kCall, at);
      } else {
        return e;
      }
    }
  }

  // (args, kw=args) after the callee; the callee is args[0].
  ExprP call(ExprP callee, E kind, const Token& at) {
    auto c = make(kind, at);
    adopt(*c, std::move(callee));
    expect_op("(");
    while (!is_op(")")) {
      if (cur().type == Tok::kName && peek().type == Tok::kOp && peek().text == "=") {
        c->ops.push_back(cur().text);
        next();
        next();
        adopt(*c, expression());
      } else {
        if (!c->ops.empty()) error("expected a keyword argument after keyword arguments");
        adopt(*c, expression());
        ++c->positional;
      }
      if (!is_op(")")) expect_op(",");
    }
    next();
    return c;
  }

  ExprP filter_call(ExprP input) {
    const Token at = cur();
    std::string name = expect_name("a filter name");
    while (is_op(".")) {  // dotted filter names are not ours, but read them for the message
      next();
      name += "." + expect_name("a filter name");
    }
    ExprP f;
    if (is_op("(")) {
      f = call(std::move(input), E::kFilter, at);
    } else {
      f = make(E::kFilter, at);
      adopt(*f, std::move(input));
    }
    f->name = name;
    return f;
  }

  ExprP filters(ExprP e) {
    for (;;) {
      if (is_op("|")) {
        next();
        e = filter_call(std::move(e));
      } else if (is_name("is")) {
        const Token at = cur();
        next();
        bool negated = false;
        if (is_name("not")) {
          negated = true;
          next();
        }
        const Token name_at = cur();
        std::string name =
            name_at.type == Tok::kOp &&
                    (name_at.text == "==" || name_at.text == "!=" || name_at.text == "<" ||
                     name_at.text == ">" || name_at.text == "<=" || name_at.text == ">=")
                ? (next(), name_at.text)
                : expect_name("a test name");
        ExprP t;
        if (is_op("(")) {
          t = call(std::move(e), E::kTest, at);
        } else {
          t = make(E::kTest, at);
          adopt(*t, std::move(e));
          const Token& c = cur();
          const bool arg =
              (c.type == Tok::kName && c.text != "else" && c.text != "or" && c.text != "and" &&
               c.text != "if" && c.text != "is" && c.text != "in" && c.text != "not") ||
              c.type == Tok::kString || c.type == Tok::kInt || c.type == Tok::kFloat ||
              (c.type == Tok::kOp && (c.text == "[" || c.text == "{"));
          if (arg) {
            adopt(*t, postfix(primary()));
            t->positional = 1;
          }
        }
        t->name = name;
        t->negated = negated;
        e = std::move(t);
      } else if (is_op("(")) {
        e = call(std::move(e), E::kCall, cur());
      } else {
        return e;
      }
    }
  }

  std::vector<Token> t_;
  std::size_t i_ = 0;
  const Limits& limits_;
  std::size_t depth_ = 0;
  int loops_ = 0;  // for loops around the statement being parsed (break / continue need one)
};

// --- renderer ------------------------------------------------------------------------------------

struct Frame {
  Value::Dict vars;
  std::shared_ptr<Frame> parent;

  const Value* lookup(std::string_view name) const {
    for (const Frame* f = this; f; f = f->parent.get())
      for (const auto& [k, v] : f->vars)
        if (k == name) return &v;
    return nullptr;
  }
  void set(const std::string& name, Value v) {
    for (auto& [k, old] : vars) {
      if (k == name) {
        old = std::move(v);
        return;
      }
    }
    vars.emplace_back(name, std::move(v));
  }
};
using FrameP = std::shared_ptr<Frame>;

enum class Flow { kNormal, kBreak, kContinue };

bool truthy(const Value& v) {
  switch (v.kind()) {
    case Value::Kind::kUndefined:
    case Value::Kind::kNone:
      return false;
    case Value::Kind::kBool:
      return v.as_bool();
    case Value::Kind::kInt:
      return v.as_int() != 0;
    case Value::Kind::kFloat:
      return v.as_float() != 0;
    case Value::Kind::kString:
      return !v.as_string().empty();
    case Value::Kind::kList:
      return !v.as_list().empty();
    case Value::Kind::kDict:
      return v.is_namespace() || !v.as_dict().empty();
    case Value::Kind::kCallable:
      return true;
  }
  return false;
}

// Python's bool is an int in arithmetic and comparisons.
bool numeric(const Value& v) { return v.is_number() || v.kind() == Value::Kind::kBool; }
bool integral(const Value& v) {
  return v.kind() == Value::Kind::kInt || v.kind() == Value::Kind::kBool;
}
std::int64_t int_of(const Value& v) {
  return v.kind() == Value::Kind::kBool ? v.as_bool() : v.as_int();
}
double float_of(const Value& v) {
  return v.kind() == Value::Kind::kBool ? v.as_bool() : v.as_float();
}

bool equals(const Value& a, const Value& b) {
  if (numeric(a) && numeric(b)) {
    if (integral(a) && integral(b)) return int_of(a) == int_of(b);
    return float_of(a) == float_of(b);
  }
  if (a.kind() != b.kind()) return false;
  switch (a.kind()) {
    case Value::Kind::kUndefined:
    case Value::Kind::kNone:
      return true;
    case Value::Kind::kString:
      return a.as_string() == b.as_string();
    case Value::Kind::kList: {
      const auto &x = a.as_list(), &y = b.as_list();
      if (x.size() != y.size()) return false;
      for (std::size_t i = 0; i < x.size(); ++i)
        if (!equals(x[i], y[i])) return false;
      return true;
    }
    case Value::Kind::kDict: {
      if (a.is_namespace() || b.is_namespace()) return &a.as_dict() == &b.as_dict();
      if (a.as_dict().size() != b.as_dict().size()) return false;
      for (const auto& [k, v] : a.as_dict()) {
        const Value* w = b.find(k);
        if (!w || !equals(v, *w)) return false;
      }
      return true;
    }
    case Value::Kind::kCallable:
      return &a.as_function() == &b.as_function();
    default:
      return false;
  }
}

// <0, 0, >0 as Python orders numbers, strings and lists; anything else is a TypeError.
int order(const Value& a, const Value& b, const char* op) {
  if (numeric(a) && numeric(b)) {
    if (integral(a) && integral(b)) return int_of(a) < int_of(b) ? -1 : int_of(a) > int_of(b);
    const double x = float_of(a), y = float_of(b);
    return x < y ? -1 : x > y;
  }
  if (a.is_string() && b.is_string()) return a.as_string().compare(b.as_string());
  if (a.kind() == Value::Kind::kList && b.kind() == Value::Kind::kList) {
    const auto &x = a.as_list(), &y = b.as_list();
    for (std::size_t i = 0; i < x.size() && i < y.size(); ++i)
      if (!equals(x[i], y[i])) return order(x[i], y[i], op);
    return x.size() < y.size() ? -1 : x.size() > y.size();
  }
  fail("expected two numbers, strings or lists for '", op, "', got ", kind_name(a), " and ",
       kind_name(b));
}

bool contains(const Value& container, const Value& item) {
  switch (container.kind()) {
    case Value::Kind::kUndefined:
      return false;
    case Value::Kind::kString:
      if (!item.is_string())
        fail("expected a string on the left of 'in <string>', got ", kind_name(item));
      return container.as_string().find(item.as_string()) != std::string::npos;
    case Value::Kind::kList:
      for (const Value& v : container.as_list())
        if (equals(v, item)) return true;
      return false;
    case Value::Kind::kDict:
      return item.is_string() && container.find(item.as_string()) != nullptr;
    default:
      fail("expected a string, list or dict on the right of 'in', got ", kind_name(container));
  }
}

// The items a for loop or a filter walks: a list's elements, a dict's keys, a string's
// characters; undefined is empty.
Value::List items_of(const Value& v, const char* what) {
  switch (v.kind()) {
    case Value::Kind::kUndefined:
      return {};
    case Value::Kind::kList:
      return v.as_list();
    case Value::Kind::kDict: {
      Value::List keys;
      for (const auto& [k, x] : v.as_dict()) keys.emplace_back(k);
      return keys;
    }
    case Value::Kind::kString: {
      Value::List chars;
      const std::vector<std::size_t> at = code_points(v.as_string());
      for (std::size_t i = 0; i + 1 < at.size(); ++i)
        chars.emplace_back(v.as_string().substr(at[i], at[i + 1] - at[i]));
      return chars;
    }
    default:
      fail("expected something to iterate for ", what, ", got ", kind_name(v));
  }
}

// Python's slice indices for a sequence of n items.
std::vector<std::int64_t> slice_indices(std::int64_t n, const Value& start, const Value& stop,
                                        const Value& step) {
  auto given = [](const Value& v) { return !v.is_undefined() && !v.is_none(); };
  for (const Value* v : {&start, &stop, &step})
    if (given(*v) && !integral(*v)) fail("expected integer slice indices, got ", kind_name(*v));
  const std::int64_t s = given(step) ? int_of(step) : 1;
  if (s == 0) fail("expected a slice step other than 0");
  auto clamp = [&](const Value& v, std::int64_t fallback) {
    if (!given(v)) return fallback;
    std::int64_t i = int_of(v);
    if (i < 0) i += n;
    if (s > 0) return std::clamp<std::int64_t>(i, 0, n);
    return std::clamp<std::int64_t>(i, -1, n - 1);
  };
  const std::int64_t b = clamp(start, s > 0 ? 0 : n - 1), e = clamp(stop, s > 0 ? n : -1);
  std::vector<std::int64_t> out;
  for (std::int64_t i = b; s > 0 ? i < e : i > e; i += s) out.push_back(i);
  return out;
}

std::string strip(const std::string& s, const Value& chars, bool left, bool right) {
  const std::string set = chars.is_string() ? chars.as_string() : std::string(" \t\n\r\v\f");
  std::size_t b = 0, e = s.size();
  if (left)
    while (b < e && set.find(s[b]) != std::string::npos) ++b;
  if (right)
    while (e > b && set.find(s[e - 1]) != std::string::npos) --e;
  return s.substr(b, e - b);
}

std::string lower(std::string s) {
  for (char& c : s) c = static_cast<char>(std::tolower(static_cast<unsigned char>(c)));
  return s;
}
std::string upper(std::string s) {
  for (char& c : s) c = static_cast<char>(std::toupper(static_cast<unsigned char>(c)));
  return s;
}
std::string capitalize(const std::string& s) {
  std::string out = lower(s);
  if (!out.empty()) out[0] = static_cast<char>(std::toupper(static_cast<unsigned char>(out[0])));
  return out;
}
std::string title(const std::string& s) {  // Python: a letter after a non-letter is upper-cased
  std::string out = s;
  bool prev_alpha = false;
  for (char& c : out) {
    const bool alpha = std::isalpha(static_cast<unsigned char>(c)) != 0;
    c = static_cast<char>(prev_alpha ? std::tolower(static_cast<unsigned char>(c))
                                     : std::toupper(static_cast<unsigned char>(c)));
    prev_alpha = alpha;
  }
  return out;
}

std::vector<std::string> split(const std::string& s, const Value& sep, std::int64_t maxsplit) {
  std::vector<std::string> out;
  if (!sep.is_string()) {  // runs of whitespace, no empty pieces
    std::size_t i = 0;
    while (i < s.size()) {
      while (i < s.size() && is_space(s[i])) ++i;
      if (i == s.size()) break;
      if (maxsplit >= 0 && static_cast<std::int64_t>(out.size()) == maxsplit) {
        std::size_t e = s.size();
        while (e > i && is_space(s[e - 1])) --e;
        out.push_back(s.substr(i, e - i));
        break;
      }
      std::size_t j = i;
      while (j < s.size() && !is_space(s[j])) ++j;
      out.push_back(s.substr(i, j - i));
      i = j;
    }
    return out;
  }
  const std::string& d = sep.as_string();
  if (d.empty()) fail("split: expected a non-empty separator");
  std::size_t i = 0;
  for (;;) {
    const std::size_t j = s.find(d, i);
    if (j == std::string::npos ||
        (maxsplit >= 0 && static_cast<std::int64_t>(out.size()) == maxsplit)) {
      out.push_back(s.substr(i));
      return out;
    }
    out.push_back(s.substr(i, j - i));
    i = j + d.size();
  }
}

std::string replace(const std::string& s, const std::string& from, const std::string& to,
                    std::int64_t count, std::size_t max_bytes) {
  std::string out;
  std::size_t i = 0;
  std::int64_t done = 0;
  if (from.empty()) {  // Python inserts `to` between characters
    const std::vector<std::size_t> at = code_points(s);
    for (std::size_t k = 0; k + 1 < at.size(); ++k) {
      if (count < 0 || done < count) {
        out += to;
        ++done;
      }
      out += s.substr(at[k], at[k + 1] - at[k]);
      if (out.size() > max_bytes)
        fail("replace: expected a result of at most ", max_bytes, " bytes");
    }
    if (count < 0 || done < count) out += to;
    return out;
  }
  for (;;) {
    const std::size_t j = s.find(from, i);
    if (j == std::string::npos || (count >= 0 && done == count)) break;
    out.append(s, i, j - i).append(to);
    if (out.size() > max_bytes) fail("replace: expected a result of at most ", max_bytes, " bytes");
    i = j + from.size();
    ++done;
  }
  return out.append(s, i, std::string::npos);
}

class Renderer {
 public:
  Renderer(const detail::Program& program) : p_(program), limits_(program.limits) {}

  std::string run(const Value::Dict& context) {
    auto globals = std::make_shared<Frame>();
    add_globals(*globals);
    auto root = std::make_shared<Frame>();
    root->parent = globals;
    for (const auto& [k, v] : context) root->set(k, v);
    std::string out;
    out_ = &out;
    exec(p_.body, root);
    return out;
  }

 private:
  struct Depth {
    Renderer& r;
    explicit Depth(Renderer& renderer) : r(renderer) {
      // Rendering nests deeper than parsing (macro calls, loops inside): four frames per level.
      if (++r.depth_ > 4 * r.limits_.max_depth)
        fail("expected rendering to nest at most ", 4 * r.limits_.max_depth,
             " levels deep (macro recursion?), got deeper");
    }
    ~Depth() { --r.depth_; }
  };

  void step() {
    if (++steps_ > limits_.max_steps)
      fail("expected the template to finish within ", limits_.max_steps,
           " steps (loop iterations, calls, output pieces), got more");
  }
  const std::string& sized(const std::string& s) const {
    if (s.size() > limits_.max_output_bytes)
      fail("expected strings of at most ", limits_.max_output_bytes, " bytes, got one of ",
           s.size());
    return s;
  }
  Value checked(Value v) const {
    if (v.depth() > 2 * limits_.max_depth)
      fail("expected lists and dicts nested at most ", 2 * limits_.max_depth,
           " levels deep, got deeper");
    return v;
  }
  void emit(const std::string& s) {
    step();
    if (out_->size() + s.size() > limits_.max_output_bytes)
      fail("expected output of at most ", limits_.max_output_bytes, " bytes, got more");
    out_->append(s);
  }

  // --- statements ---

  Flow exec(const Body& body, const FrameP& frame) {
    Depth depth(*this);
    for (const auto& s : body) {
      const Flow flow = exec_one(*s, frame);
      if (flow != Flow::kNormal) return flow;
    }
    return Flow::kNormal;
  }

  Flow exec_one(const Stmt& s, const FrameP& frame) {
    try {
      return exec_inner(s, frame);
    } catch (TemplateError& e) {
      if (e.line == 0) {
        e.line = s.line;
        e.column = s.column;
      }
      throw;
    }
  }

  Flow exec_inner(const Stmt& s, const FrameP& frame) {
    switch (s.kind) {
      case S::kText:
        emit(s.text);
        return Flow::kNormal;
      case S::kOutput:
        emit(to_str(eval(*s.exprs[0], frame)));
        return Flow::kNormal;
      case S::kIf:
        for (std::size_t i = 0; i < s.exprs.size(); ++i)
          if (truthy(eval(*s.exprs[i], frame))) return exec(s.bodies[i], frame);
        if (s.bodies.size() > s.exprs.size()) return exec(s.bodies.back(), frame);
        return Flow::kNormal;
      case S::kFor:
        return exec_for(s, frame);
      case S::kSet: {
        Value v = eval(*s.exprs[0], frame);
        if (!s.text.empty()) {  // ns.attr = v
          const Value* target = frame->lookup(s.names[0]);
          if (!target || !target->is_namespace())
            fail("expected '", s.names[0], "' to be a namespace() for '", s.names[0], ".", s.text,
                 " = ...', got ", target ? kind_name(*target) : "undefined");
          if (v.holds_namespace())
            fail("expected a value without namespaces to store in a namespace, got ", kind_name(v));
          target->set_attribute(s.text, std::move(v));
        } else {
          assign(s.names, v, *frame);
        }
        return Flow::kNormal;
      }
      case S::kSetBlock:
        frame->set(s.names[0], Value(capture(s.bodies[0], frame)));
        return Flow::kNormal;
      case S::kMacro:
        frame->set(s.text, macro(s, frame));
        return Flow::kNormal;
      case S::kBreak:
        return Flow::kBreak;
      case S::kContinue:
        return Flow::kContinue;
      case S::kBlock:
        return exec(s.bodies[0], frame);
      case S::kFilterBlock: {
        Value text(capture(s.bodies[0], frame));
        emit(to_str(filter(*s.filter, text, frame)));
        return Flow::kNormal;
      }
    }
    return Flow::kNormal;
  }

  std::string capture(const Body& body, const FrameP& frame) {
    std::string text;
    std::string* outer = std::exchange(out_, &text);
    try {
      exec(body, frame);
    } catch (...) {
      out_ = outer;
      throw;
    }
    out_ = outer;
    return text;
  }

  void assign(const std::vector<std::string>& names, const Value& v, Frame& frame) {
    if (names.size() == 1) {
      frame.set(names[0], v);
      return;
    }
    const Value::List items = items_of(v, "unpacking");
    if (items.size() != names.size())
      fail("expected ", names.size(), " values to unpack, got ", items.size());
    for (std::size_t i = 0; i < names.size(); ++i) frame.set(names[i], items[i]);
  }

  Flow exec_for(const Stmt& s, const FrameP& outer) {
    const Value::List all = items_of(eval(*s.exprs[0], outer), "a for loop");
    auto frame = std::make_shared<Frame>();
    frame->parent = outer;
    Value::List items;
    if (s.exprs[1]) {
      for (const Value& v : all) {
        step();
        assign(s.names, v, *frame);
        if (truthy(eval(*s.exprs[1], frame))) items.push_back(v);
      }
    } else {
      items = all;
    }
    const auto n = static_cast<std::int64_t>(items.size());
    for (std::int64_t i = 0; i < n; ++i) {
      step();
      Value cycle = Value::function([i](Arguments& a) -> Value {
        if (a.positional.empty()) fail("loop.cycle: expected at least one value");
        return a.positional[static_cast<std::size_t>(i) % a.positional.size()];
      });
      Value::Dict loop = {{"index", Value(i + 1)},
                          {"index0", Value(i)},
                          {"revindex", Value(n - i)},
                          {"revindex0", Value(n - i - 1)},
                          {"first", Value(i == 0)},
                          {"last", Value(i == n - 1)},
                          {"length", Value(n)},
                          {"depth", Value(1)},
                          {"depth0", Value(0)},
                          {"previtem", i > 0 ? items[i - 1] : Value()},
                          {"nextitem", i + 1 < n ? items[i + 1] : Value()},
                          {"cycle", cycle}};
      frame->set("loop", Value(std::move(loop)));
      assign(s.names, items[static_cast<std::size_t>(i)], *frame);
      if (exec(s.bodies[0], frame) == Flow::kBreak) break;
    }
    if (n == 0 && s.bodies.size() > 1) return exec(s.bodies[1], outer);
    return Flow::kNormal;
  }

  Value macro(const Stmt& s, const FrameP& defined_in) {
    const Stmt* def = &s;
    // The macro lives in the frame it was defined in: a weak reference back avoids a cycle.
    std::weak_ptr<Frame> scope = defined_in;
    return Value::function([this, def, scope](Arguments& a) -> Value {
      Depth depth(*this);
      auto frame = std::make_shared<Frame>();
      frame->parent = scope.lock();
      if (!frame->parent)
        fail("macro '", def->text, "': expected to be called inside the scope that defines it");
      if (a.positional.size() > def->names.size())
        fail("macro '", def->text, "': expected at most ", def->names.size(),
             " positional arguments, got ", a.positional.size());
      for (std::size_t i = 0; i < def->names.size(); ++i) {
        Value v;
        if (i < a.positional.size()) {
          v = a.positional[i];
        } else if (def->defaults[i]) {
          v = eval(*def->defaults[i], frame);
        }
        frame->set(def->names[i], v);
      }
      for (const auto& [k, v] : a.keyword) {
        if (std::find(def->names.begin(), def->names.end(), k) == def->names.end())
          fail("macro '", def->text, "': expected no keyword argument '", k, "'");
        frame->set(k, v);
      }
      return Value(capture(def->bodies[0], frame));
    });
  }

  // --- expressions ---

  Value eval(const Expr& e, const FrameP& frame) {
    try {
      return eval_inner(e, frame);
    } catch (TemplateError& err) {
      if (err.line == 0) {
        err.line = e.line;
        err.column = e.column;
      }
      throw;
    }
  }

  Arguments arguments(const Expr& e, const FrameP& frame) {
    Arguments a;
    for (std::size_t i = 1; i <= e.positional; ++i) a.positional.push_back(eval(*e.args[i], frame));
    for (std::size_t k = 0; k < e.ops.size(); ++k)
      a.keyword.emplace_back(e.ops[k], eval(*e.args[1 + e.positional + k], frame));
    return a;
  }

  static std::string what_undefined(const Expr& e) {
    if (e.kind == E::kName) return "'" + e.name + "' is undefined";
    if (e.kind == E::kAttr) return "no attribute '" + e.name + "'";
    return "an undefined value";
  }

  Value eval_inner(const Expr& e, const FrameP& frame) {
    switch (e.kind) {
      case E::kLiteral:
        return e.value;
      case E::kName: {
        const Value* v = frame->lookup(e.name);
        return v ? *v : Value();
      }
      case E::kList: {
        Value::List list;
        for (const auto& x : e.args) list.push_back(eval(*x, frame));
        return checked(e.negated ? Value::tuple(std::move(list)) : Value(std::move(list)));
      }
      case E::kDict: {
        Value::Dict dict;
        for (std::size_t i = 0; i + 1 < e.args.size(); i += 2) {
          const Value k = eval(*e.args[i], frame);
          if (!k.is_string()) fail("expected string keys in a dict literal, got ", kind_name(k));
          Value v = eval(*e.args[i + 1], frame);
          bool replaced = false;
          for (auto& [old_k, old_v] : dict)
            if (old_k == k.as_string()) {
              old_v = v;
              replaced = true;
            }
          if (!replaced) dict.emplace_back(k.as_string(), std::move(v));
        }
        return checked(Value(std::move(dict)));
      }
      case E::kAttr: {
        const Value obj = eval(*e.args[0], frame);
        if (obj.is_undefined())
          fail("expected a value before '.", e.name, "', got ", what_undefined(*e.args[0]));
        return attribute(obj, e.name);
      }
      case E::kItem: {
        const Value obj = eval(*e.args[0], frame);
        const Value key = eval(*e.args[1], frame);
        if (obj.is_undefined())
          fail("expected a value before '[...]', got ", what_undefined(*e.args[0]));
        return item(obj, key);
      }
      case E::kSlice: {
        const Value obj = eval(*e.args[0], frame);
        const Value start = e.args[1] ? eval(*e.args[1], frame) : Value();
        const Value stop = e.args[2] ? eval(*e.args[2], frame) : Value();
        const Value stride = e.args[3] ? eval(*e.args[3], frame) : Value();
        if (obj.kind() == Value::Kind::kList) {
          Value::List out;
          const auto& l = obj.as_list();
          for (std::int64_t i :
               slice_indices(static_cast<std::int64_t>(l.size()), start, stop, stride))
            out.push_back(l[static_cast<std::size_t>(i)]);
          return Value(std::move(out));
        }
        if (obj.is_string()) {
          const std::string& s = obj.as_string();
          const std::vector<std::size_t> at = code_points(s);
          std::string out;
          for (std::int64_t i :
               slice_indices(static_cast<std::int64_t>(at.size()) - 1, start, stop, stride))
            out.append(s, at[i], at[i + 1] - at[i]);
          return Value(std::move(out));
        }
        if (obj.is_undefined())
          fail("expected a value before '[...:...]', got ", what_undefined(*e.args[0]));
        fail("expected a list or string to slice, got ", kind_name(obj));
      }
      case E::kCall: {
        const Value callee = eval(*e.args[0], frame);
        if (callee.kind() != Value::Kind::kCallable)
          fail("expected something callable, got ",
               callee.is_undefined() ? what_undefined(*e.args[0]) : kind_name(callee));
        Arguments a = arguments(e, frame);
        step();
        Depth depth(*this);
        return checked(callee.as_function()(a));
      }
      case E::kFilter:
        return filter(e, eval(*e.args[0], frame), frame);
      case E::kTest: {
        const Value v = eval(*e.args[0], frame);
        Arguments a = arguments(e, frame);
        return Value(test(e.name, v, a) != e.negated);
      }
      case E::kNeg:
      case E::kPos: {
        const Value v = eval(*e.args[0], frame);
        if (!numeric(v))
          fail("expected a number after unary '", e.kind == E::kNeg ? "-" : "+", "', got ",
               kind_name(v));
        if (e.kind == E::kPos) return v;
        if (integral(v)) {
          if (int_of(v) == INT64_MIN) fail("expected an integer that fits 64 bits");
          return Value(-int_of(v));
        }
        return Value(-v.as_float());
      }
      case E::kNot:
        return Value(!truthy(eval(*e.args[0], frame)));
      case E::kAnd: {
        Value a = eval(*e.args[0], frame);
        return truthy(a) ? eval(*e.args[1], frame) : a;
      }
      case E::kOr: {
        Value a = eval(*e.args[0], frame);
        return truthy(a) ? a : eval(*e.args[1], frame);
      }
      case E::kCompare: {
        Value left = eval(*e.args[0], frame);
        for (std::size_t i = 0; i < e.ops.size(); ++i) {
          Value right = eval(*e.args[i + 1], frame);
          const std::string& op = e.ops[i];
          bool ok;
          if (op == "==") {
            ok = equals(left, right);
          } else if (op == "!=") {
            ok = !equals(left, right);
          } else if (op == "in") {
            ok = contains(right, left);
          } else if (op == "not in") {
            ok = !contains(right, left);
          } else {
            const int c = order(left, right, op.c_str());
            ok = op == "<" ? c < 0 : op == ">" ? c > 0 : op == "<=" ? c <= 0 : c >= 0;
          }
          if (!ok) return Value(false);
          left = std::move(right);
        }
        return Value(true);
      }
      case E::kCond:
        if (truthy(eval(*e.args[1], frame))) return eval(*e.args[0], frame);
        return e.args[2] ? eval(*e.args[2], frame) : Value();
      case E::kBinary:
        return binary(e.name, eval(*e.args[0], frame), eval(*e.args[1], frame));
    }
    return Value();
  }

  Value binary(const std::string& op, const Value& a, const Value& b) {
    if (op == "~") return Value(std::string(sized(to_str(a) + to_str(b))));
    if (a.is_undefined() || b.is_undefined())
      fail("expected two values for '", op, "', got an undefined ",
           a.is_undefined() ? "left" : "right", " operand");
    if (numeric(a) && numeric(b)) {
      const bool ints = integral(a) && integral(b);
      const std::int64_t x = int_of(a), y = int_of(b);
      const double fx = float_of(a), fy = float_of(b);
      std::int64_t r = 0;
      if (op == "+")
        return ints ? (__builtin_add_overflow(x, y, &r) ? overflow() : Value(r)) : Value(fx + fy);
      if (op == "-")
        return ints ? (__builtin_sub_overflow(x, y, &r) ? overflow() : Value(r)) : Value(fx - fy);
      if (op == "*")
        return ints ? (__builtin_mul_overflow(x, y, &r) ? overflow() : Value(r)) : Value(fx * fy);
      if (op == "/") {
        if (fy == 0) fail("expected a non-zero divisor for '/'");
        return Value(fx / fy);
      }
      if (op == "//" || op == "%") {
        if (ints) {
          if (y == 0) fail("expected a non-zero divisor for '", op, "'");
          if (x == INT64_MIN && y == -1) return overflow();
          std::int64_t q = x / y, m = x % y;
          if (m != 0 && ((m < 0) != (y < 0))) {
            --q;
            m += y;
          }
          return op == "//" ? Value(q) : Value(m);
        }
        if (fy == 0) fail("expected a non-zero divisor for '", op, "'");
        const double q = std::floor(fx / fy);
        return op == "//" ? Value(q) : Value(fx - q * fy);
      }
      if (op == "**") {
        if (ints && y >= 0) {
          std::int64_t p = 1;
          for (std::int64_t k = 0; k < y; ++k) {
            if (__builtin_mul_overflow(p, x, &p)) return overflow();
            if (p == 0 || p == 1) break;
          }
          if (x == -1 && y % 2 == 0) p = 1;
          return Value(p);
        }
        return Value(std::pow(fx, fy));
      }
    }
    if (op == "+" && a.is_string() && b.is_string())
      return Value(std::string(sized(a.as_string() + b.as_string())));
    if (op == "+" && a.kind() == Value::Kind::kList && b.kind() == Value::Kind::kList) {
      if (a.as_list().size() + b.as_list().size() > limits_.max_items) too_many();
      Value::List l = a.as_list();
      l.insert(l.end(), b.as_list().begin(), b.as_list().end());
      return Value(std::move(l));
    }
    if (op == "*" && (integral(a) || integral(b))) {
      const Value& seq = integral(a) ? b : a;
      const std::int64_t n = std::max<std::int64_t>(0, int_of(integral(a) ? a : b));
      if (seq.is_string()) {
        if (!seq.as_string().empty() &&
            static_cast<std::uint64_t>(n) > limits_.max_output_bytes / seq.as_string().size())
          sized(std::string(limits_.max_output_bytes + 1, ' '));
        std::string out;
        for (std::int64_t i = 0; i < n; ++i) out += seq.as_string();
        return Value(std::move(out));
      }
      if (seq.kind() == Value::Kind::kList) {
        if (!seq.as_list().empty() &&
            static_cast<std::uint64_t>(n) > limits_.max_items / seq.as_list().size())
          too_many();
        Value::List out;
        for (std::int64_t i = 0; i < n; ++i)
          out.insert(out.end(), seq.as_list().begin(), seq.as_list().end());
        return Value(std::move(out));
      }
    }
    fail("expected operands that support '", op, "', got ", kind_name(a), " and ", kind_name(b));
  }
  [[noreturn]] static Value overflow() { fail("expected integers that fit 64 bits"); }
  [[noreturn]] void too_many() const {
    fail("expected lists of at most ", limits_.max_items, " items");
  }

  // obj.name: a dict's method or entry, a string's method.
  Value attribute(const Value& obj, const std::string& name) {
    if (obj.kind() == Value::Kind::kDict) {
      if (!obj.is_namespace()) {
        if (Value m = dict_method(obj, name); !m.is_undefined()) return m;
      }
      const Value* v = obj.find(name);
      return v ? *v : Value();
    }
    if (obj.is_string()) return string_method(obj, name);
    return Value();
  }

  // obj[key]: a dict's entry (or method, as jinja2 falls back to getattr), a list's or string's
  // element by (negative) index; missing is undefined.
  Value item(const Value& obj, const Value& key) {
    if (obj.kind() == Value::Kind::kDict) {
      if (!key.is_string()) return Value();
      const Value* v = obj.find(key.as_string());
      return v ? *v : attribute(obj, key.as_string());
    }
    if (integral(key) && (obj.kind() == Value::Kind::kList || obj.is_string())) {
      std::int64_t i = int_of(key);
      if (obj.kind() == Value::Kind::kList) {
        const auto n = static_cast<std::int64_t>(obj.as_list().size());
        if (i < 0) i += n;
        return i >= 0 && i < n ? obj.as_list()[static_cast<std::size_t>(i)] : Value();
      }
      const std::vector<std::size_t> at = code_points(obj.as_string());
      const auto n = static_cast<std::int64_t>(at.size()) - 1;
      if (i < 0) i += n;
      if (i < 0 || i >= n) return Value();
      return Value(obj.as_string().substr(at[i], at[i + 1] - at[i]));
    }
    if (key.is_string()) return attribute(obj, key.as_string());
    return Value();
  }

  static const Value& arg(const Arguments& a, std::size_t i, std::string_view name) {
    static const Value undefined;
    if (i < a.positional.size()) return a.positional[i];
    for (const auto& [k, v] : a.keyword)
      if (k == name) return v;
    return undefined;
  }
  static const std::string& string_arg(const Arguments& a, std::size_t i, std::string_view name,
                                       const char* what) {
    const Value& v = arg(a, i, name);
    if (!v.is_string()) fail(what, ": expected a string for '", name, "', got ", kind_name(v));
    return v.as_string();
  }
  static std::int64_t int_arg(const Arguments& a, std::size_t i, std::string_view name,
                              std::int64_t fallback) {
    const Value& v = arg(a, i, name);
    if (v.is_undefined() || v.is_none()) return fallback;
    if (!integral(v)) fail("expected an integer for '", name, "', got ", kind_name(v));
    return int_of(v);
  }

  Value dict_method(const Value& obj, const std::string& name) {
    if (name == "get")
      return Value::function([obj](Arguments& a) -> Value {
        const Value& k = arg(a, 0, "key");
        const Value* v = k.is_string() ? obj.find(k.as_string()) : nullptr;
        if (v) return *v;
        const Value& d = arg(a, 1, "default");
        return d.is_undefined() ? Value::none() : d;
      });
    if (name == "items" || name == "keys" || name == "values")
      return Value::function([obj, name](Arguments&) -> Value {
        Value::List out;
        for (const auto& [k, v] : obj.as_dict())
          out.push_back(name == "items"  ? Value::tuple({Value(k), v})
                        : name == "keys" ? Value(k)
                                         : v);
        return Value(std::move(out));
      });
    return Value();
  }

  Value string_method(const Value& obj, const std::string& name) {
    const std::string s = obj.as_string();
    const std::size_t max_bytes = limits_.max_output_bytes;
    using F = std::function<Value(Arguments&)>;
    F f;
    if (name == "strip" || name == "lstrip" || name == "rstrip") {
      f = [s, name](Arguments& a) {
        return Value(strip(s, arg(a, 0, "chars"), name != "rstrip", name != "lstrip"));
      };
    } else if (name == "split" || name == "rsplit") {
      f = [s, name](Arguments& a) {
        const std::int64_t maxsplit = int_arg(a, 1, "maxsplit", -1);
        if (name == "rsplit" && maxsplit >= 0) fail("rsplit: expected no maxsplit (not supported)");
        Value::List out;
        for (std::string& piece : split(s, arg(a, 0, "sep"), maxsplit))
          out.emplace_back(std::move(piece));
        return Value(std::move(out));
      };
    } else if (name == "splitlines") {
      f = [s](Arguments&) {
        Value::List out;
        std::size_t i = 0;
        while (i < s.size()) {
          std::size_t j = s.find_first_of("\r\n", i);
          if (j == std::string::npos) {
            out.emplace_back(s.substr(i));
            break;
          }
          out.emplace_back(s.substr(i, j - i));
          i = j + (s.compare(j, 2, "\r\n") == 0 ? 2 : 1);
        }
        return Value(std::move(out));
      };
    } else if (name == "startswith" || name == "endswith") {
      f = [s, name](Arguments& a) {
        const Value& p = arg(a, 0, "prefix");
        Value::List options = p.kind() == Value::Kind::kList ? p.as_list() : Value::List{p};
        for (const Value& o : options) {
          if (!o.is_string()) fail(name, ": expected a string, got ", kind_name(o));
          if (name == "startswith" ? s.starts_with(o.as_string()) : s.ends_with(o.as_string()))
            return Value(true);
        }
        return Value(false);
      };
    } else if (name == "upper" || name == "lower" || name == "title" || name == "capitalize") {
      f = [s, name](Arguments&) {
        return Value(name == "upper"   ? upper(s)
                     : name == "lower" ? lower(s)
                     : name == "title" ? title(s)
                                       : capitalize(s));
      };
    } else if (name == "replace") {
      f = [s, max_bytes](Arguments& a) {
        return Value(replace(s, string_arg(a, 0, "old", "replace"),
                             string_arg(a, 1, "new", "replace"), int_arg(a, 2, "count", -1),
                             max_bytes));
      };
    } else if (name == "find" || name == "count") {
      f = [s, name](Arguments& a) {
        const std::string& sub = string_arg(a, 0, "sub", name.c_str());
        if (name == "find") {
          const std::size_t at = s.find(sub);
          return Value(at == std::string::npos ? std::int64_t{-1} : length_of(s.substr(0, at)));
        }
        if (sub.empty()) return Value(length_of(s) + 1);
        std::int64_t n = 0;
        for (std::size_t at = s.find(sub); at != std::string::npos;
             at = s.find(sub, at + sub.size()))
          ++n;
        return Value(n);
      };
    } else if (name == "join") {
      f = [s, max_bytes](Arguments& a) {
        std::string out;
        bool first = true;
        for (const Value& v : items_of(arg(a, 0, "iterable"), "join")) {
          if (!v.is_string()) fail("join: expected strings, got ", kind_name(v));
          if (!first) out += s;
          out += v.as_string();
          first = false;
          if (out.size() > max_bytes) fail("join: expected at most ", max_bytes, " bytes");
        }
        return Value(std::move(out));
      };
    } else if (name == "format") {
      f = [s, max_bytes](Arguments& a) {
        std::string out;
        std::size_t next_index = 0;
        for (std::size_t i = 0; i < s.size(); ++i) {
          if (s[i] == '{' && i + 1 < s.size() && s[i + 1] == '{') {
            out += '{';
            ++i;
          } else if (s[i] == '}' && i + 1 < s.size() && s[i + 1] == '}') {
            out += '}';
            ++i;
          } else if (s[i] == '{') {
            const std::size_t close = s.find('}', i);
            if (close == std::string::npos) fail("format: expected '}' in the format string");
            const std::string field = s.substr(i + 1, close - i - 1);
            if (field.empty()) {
              if (next_index >= a.positional.size())
                fail("format: expected more than ", a.positional.size(), " arguments");
              out += to_str(a.positional[next_index++]);
            } else if (std::isdigit(static_cast<unsigned char>(field[0]))) {
              const std::size_t k = std::stoul(field);
              if (k >= a.positional.size()) fail("format: expected argument ", k);
              out += to_str(a.positional[k]);
            } else {
              out += to_str(arg(a, SIZE_MAX, field));
            }
            i = close;
          } else {
            out += s[i];
          }
          if (out.size() > max_bytes) fail("format: expected at most ", max_bytes, " bytes");
        }
        return Value(std::move(out));
      };
    } else if (name == "isdigit" || name == "isspace" || name == "isalpha" || name == "isalnum") {
      f = [s, name](Arguments&) {
        if (s.empty()) return Value(false);
        for (char c : s) {
          const auto u = static_cast<unsigned char>(c);
          const bool ok = name == "isdigit"   ? std::isdigit(u) != 0
                          : name == "isspace" ? is_space(c)
                          : name == "isalpha" ? std::isalpha(u) != 0
                                              : std::isalnum(u) != 0;
          if (!ok) return Value(false);
        }
        return Value(true);
      };
    } else {
      return Value();
    }
    return Value::function(std::move(f));
  }

  bool test(const std::string& name, const Value& v, const Arguments& a) {
    const Value& other = arg(a, 0, "value");
    using K = Value::Kind;
    if (name == "defined") return !v.is_undefined();
    if (name == "undefined") return v.is_undefined();
    if (name == "none") return v.is_none();
    if (name == "string") return v.is_string();
    if (name == "number") return numeric(v) && v.kind() != K::kBool;
    if (name == "integer") return v.kind() == K::kInt;
    if (name == "float") return v.kind() == K::kFloat;
    if (name == "boolean") return v.kind() == K::kBool;
    if (name == "true") return v.kind() == K::kBool && v.as_bool();
    if (name == "false") return v.kind() == K::kBool && !v.as_bool();
    if (name == "mapping") return v.kind() == K::kDict;
    if (name == "sequence") return v.kind() == K::kList || v.is_string() || v.kind() == K::kDict;
    if (name == "iterable") return v.kind() == K::kList || v.is_string() || v.kind() == K::kDict;
    if (name == "callable") return v.kind() == K::kCallable;
    if (name == "lower") return v.is_string() && lower(v.as_string()) == v.as_string();
    if (name == "upper") return v.is_string() && upper(v.as_string()) == v.as_string();
    if (name == "odd" || name == "even" || name == "divisibleby") {
      if (!integral(v)) fail("test '", name, "': expected an integer, got ", kind_name(v));
      if (name == "divisibleby") {
        const std::int64_t d = int_arg(a, 0, "num", 0);
        if (d == 0) fail("test 'divisibleby': expected a non-zero divisor");
        return int_of(v) % d == 0;
      }
      return (int_of(v) % 2 != 0) == (name == "odd");
    }
    if (name == "eq" || name == "equalto" || name == "==") return equals(v, other);
    if (name == "ne" || name == "!=") return !equals(v, other);
    if (name == "sameas") {
      if (v.kind() != other.kind()) return false;
      if (v.kind() == K::kNone || v.kind() == K::kUndefined) return true;
      if (v.kind() == K::kBool) return v.as_bool() == other.as_bool();
      return equals(v, other);
    }
    if (name == "in") return contains(other, v);
    if (name == "lt" || name == "<") return order(v, other, "<") < 0;
    if (name == "le" || name == "<=") return order(v, other, "<=") <= 0;
    if (name == "gt" || name == ">") return order(v, other, ">") > 0;
    if (name == "ge" || name == ">=") return order(v, other, ">=") >= 0;
    fail("expected a known test after 'is', got '", name, "'");
  }

  // The attribute path "a.b" of a value, as selectattr and map read it.
  Value path_of(const Value& v, const std::string& path) {
    Value cur = v;
    std::size_t i = 0;
    while (i <= path.size()) {
      const std::size_t dot = std::min(path.find('.', i), path.size());
      const std::string part = path.substr(i, dot - i);
      cur = std::isdigit(static_cast<unsigned char>(part[0]))
                ? item(cur, Value(static_cast<std::int64_t>(std::stoll(part))))
                : item(cur, Value(part));
      i = dot + 1;
      if (cur.is_undefined()) break;
    }
    return cur;
  }

  Value filter(const Expr& e, const Value& v, const FrameP& frame) {
    Arguments a = arguments(e, frame);
    step();
    return checked(apply_filter(e.name, v, a));
  }

  Value apply_filter(const std::string& name, const Value& v, Arguments& a) {
    using K = Value::Kind;
    auto need_string = [&]() -> const std::string& {
      if (!v.is_string() && !v.is_undefined())
        fail("filter '", name, "': expected a string, got ", kind_name(v));
      static const std::string empty;
      return v.is_string() ? v.as_string() : empty;
    };
    if (name == "trim") return Value(strip(to_str(v), arg(a, 0, "chars"), true, true));
    if (name == "upper") return Value(upper(to_str(v)));
    if (name == "lower") return Value(lower(to_str(v)));
    if (name == "capitalize") return Value(capitalize(to_str(v)));
    if (name == "title") return Value(title(to_str(v)));
    if (name == "string") return v.is_string() ? v : Value(to_str(v));
    if (name == "safe") return v;
    if (name == "escape" || name == "e") {
      std::string out;
      for (char c : to_str(v)) {
        switch (c) {
          case '&':
            out += "&amp;";
            break;
          case '<':
            out += "&lt;";
            break;
          case '>':
            out += "&gt;";
            break;
          case '"':
            out += "&#34;";
            break;
          case '\'':
            out += "&#39;";
            break;
          default:
            out += c;
        }
      }
      return Value(sized(out));
    }
    if (name == "tojson") {
      const Value& indent = arg(a, 0, "indent");
      if (!indent.is_undefined() && !indent.is_none() && !integral(indent))
        fail("tojson: expected an integer indent, got ", kind_name(indent));
      std::string out;
      json_dump(
          out, v,
          integral(indent) ? static_cast<int>(std::clamp<std::int64_t>(int_of(indent), 0, 64)) : -1,
          0, truthy(arg(a, SIZE_MAX, "sort_keys")), 0);
      return Value(sized(out));
    }
    if (name == "length" || name == "count") {
      switch (v.kind()) {
        case K::kUndefined:
          return Value(0);
        case K::kString:
          return Value(length_of(v.as_string()));
        case K::kList:
          return Value(static_cast<std::int64_t>(v.as_list().size()));
        case K::kDict:
          return Value(static_cast<std::int64_t>(v.as_dict().size()));
        default:
          fail("filter 'length': expected a string, list or dict, got ", kind_name(v));
      }
    }
    if (name == "default" || name == "d") {
      const bool boolean = truthy(arg(a, 1, "boolean"));
      if (v.is_undefined() || (boolean && !truthy(v))) {
        const Value& d = arg(a, 0, "default_value");
        return d.is_undefined() ? Value(std::string()) : d;
      }
      return v;
    }
    if (name == "first" || name == "last") {
      const Value::List l = items_of(v, "filter 'first'/'last'");
      if (l.empty()) return Value();
      return name == "first" ? l.front() : l.back();
    }
    if (name == "list") return Value(items_of(v, "filter 'list'"));
    if (name == "reverse") {
      if (v.is_string()) {
        Value::List chars = items_of(v, "reverse");
        std::string out;
        for (auto it = chars.rbegin(); it != chars.rend(); ++it) out += it->as_string();
        return Value(std::move(out));
      }
      Value::List l = items_of(v, "filter 'reverse'");
      std::reverse(l.begin(), l.end());
      return Value(std::move(l));
    }
    if (name == "items") {
      if (v.is_undefined()) return Value(Value::List{});
      if (v.kind() != K::kDict) fail("filter 'items': expected a dict, got ", kind_name(v));
      Value::List out;
      for (const auto& [k, x] : v.as_dict()) out.push_back(Value::tuple({Value(k), x}));
      return Value(std::move(out));
    }
    if (name == "dictsort") {
      if (v.kind() != K::kDict) fail("filter 'dictsort': expected a dict, got ", kind_name(v));
      Value::List out;
      for (const auto& [k, x] : v.as_dict()) out.push_back(Value::tuple({Value(k), x}));
      std::stable_sort(out.begin(), out.end(), [](const Value& x, const Value& y) {
        return lower(x.as_list()[0].as_string()) < lower(y.as_list()[0].as_string());
      });
      return Value(std::move(out));
    }
    if (name == "join") {
      const Value& attr = arg(a, 1, "attribute");
      std::string sep = arg(a, 0, "d").is_undefined() ? "" : to_str(arg(a, 0, "d"));
      std::string out;
      bool first = true;
      for (const Value& x : items_of(v, "filter 'join'")) {
        if (!first) out += sep;
        out += to_str(attr.is_string() ? path_of(x, attr.as_string()) : x);
        first = false;
        sized(out);
      }
      return Value(std::move(out));
    }
    if (name == "replace") {
      const std::string& s = to_str(v);
      return Value(replace(s, to_str(arg(a, 0, "old")), to_str(arg(a, 1, "new")),
                           int_arg(a, 2, "count", -1), limits_.max_output_bytes));
    }
    if (name == "int") {
      if (integral(v)) return Value(int_of(v));
      if (v.kind() == K::kFloat) {
        if (!(std::fabs(v.as_float()) < 9.2e18)) return overflow();
        return Value(static_cast<std::int64_t>(v.as_float()));
      }
      if (v.is_string()) {
        const std::string t = strip(v.as_string(), Value(), true, true);
        std::int64_t i = 0;
        auto [p, ec] =
            std::from_chars(t.data() + (t.starts_with('+') ? 1 : 0), t.data() + t.size(), i);
        if (ec == std::errc() && p == t.data() + t.size()) return Value(i);
        char* end = nullptr;
        const double d = std::strtod(t.c_str(), &end);
        if (!t.empty() && end == t.c_str() + t.size() && std::fabs(d) < 9.2e18)
          return Value(static_cast<std::int64_t>(d));
      }
      const Value& d = arg(a, 0, "default");
      return d.is_undefined() ? Value(0) : d;
    }
    if (name == "float") {
      if (numeric(v)) return Value(float_of(v));
      if (v.is_string()) {
        const std::string t = strip(v.as_string(), Value(), true, true);
        char* end = nullptr;
        const double d = std::strtod(t.c_str(), &end);
        if (!t.empty() && end == t.c_str() + t.size()) return Value(d);
      }
      const Value& d = arg(a, 0, "default");
      return d.is_undefined() ? Value(0.0) : d;
    }
    if (name == "abs") {
      if (integral(v)) {
        if (int_of(v) == INT64_MIN) return overflow();
        return Value(std::abs(int_of(v)));
      }
      if (v.kind() == K::kFloat) return Value(std::fabs(v.as_float()));
      fail("filter 'abs': expected a number, got ", kind_name(v));
    }
    if (name == "round") {
      if (!numeric(v)) fail("filter 'round': expected a number, got ", kind_name(v));
      const std::int64_t precision = std::clamp<std::int64_t>(int_arg(a, 0, "precision", 0), 0, 15);
      const double scale = std::pow(10.0, static_cast<double>(precision));
      return Value(std::nearbyint(float_of(v) * scale) / scale);
    }
    if (name == "indent") {
      const Value& width_v = arg(a, 0, "width");
      const std::string pad = width_v.is_string()
                                  ? width_v.as_string()
                                  : std::string(static_cast<std::size_t>(std::clamp<std::int64_t>(
                                                    int_arg(a, 0, "width", 4), 0, 256)),
                                                ' ');
      const bool first = truthy(arg(a, 1, "first")), blank = truthy(arg(a, 2, "blank"));
      const std::string s = need_string();
      std::string out;
      std::size_t i = 0;
      bool line0 = true;
      while (i <= s.size()) {
        const std::size_t nl = std::min(s.find('\n', i), s.size());
        const std::string line = s.substr(i, nl - i);
        if ((!line0 || first) && (blank || !line.empty())) out += pad;
        out += line;
        if (nl < s.size()) out += '\n';
        sized(out);
        line0 = false;
        i = nl + 1;
      }
      return Value(std::move(out));
    }
    if (name == "wordcount") {
      return Value(static_cast<std::int64_t>(split(to_str(v), Value(), -1).size()));
    }
    if (name == "unique" || name == "sort" || name == "max" || name == "min" || name == "sum") {
      Value::List l = items_of(v, ("filter '" + name + "'").c_str());
      const Value& attr = arg(a, name == "sort" ? 2 : name == "sum" ? 0 : 1, "attribute");
      const bool cased = truthy(arg(a, name == "sort" ? 1 : 0, "case_sensitive"));
      auto key = [&](const Value& x) {
        Value k = attr.is_string() ? path_of(x, attr.as_string()) : x;
        return k.is_string() && !cased ? Value(lower(k.as_string())) : k;
      };
      if (name == "sum") {
        Value total = arg(a, 1, "start").is_undefined() ? Value(0) : arg(a, 1, "start");
        for (const Value& x : l) total = binary("+", total, key(x));
        return total;
      }
      if (name == "unique") {
        Value::List out, keys;
        for (const Value& x : l) {
          const Value k = key(x);
          if (!contains(Value(keys), k)) {
            keys.push_back(k);
            out.push_back(x);
          }
        }
        return Value(std::move(out));
      }
      if (name == "sort") {
        const bool reverse = truthy(arg(a, 0, "reverse"));
        std::stable_sort(l.begin(), l.end(), [&](const Value& x, const Value& y) {
          const int c = order(key(x), key(y), "sort");
          return reverse ? c > 0 : c < 0;
        });
        return Value(std::move(l));
      }
      if (l.empty()) return Value();
      Value best = l[0];
      for (const Value& x : l) {
        const int c = order(key(x), key(best), name.c_str());
        if (name == "max" ? c > 0 : c < 0) best = x;
      }
      return best;
    }
    if (name == "map") {
      Value::List out;
      const Value& attr = arg(a, SIZE_MAX, "attribute");
      for (const Value& x : items_of(v, "filter 'map'")) {
        step();
        if (attr.is_string()) {
          Value r = path_of(x, attr.as_string());
          if (r.is_undefined()) r = arg(a, SIZE_MAX, "default");
          out.push_back(std::move(r));
        } else {
          if (a.positional.empty() || !a.positional[0].is_string())
            fail("filter 'map': expected a filter name or attribute=");
          Arguments rest;
          rest.positional.assign(a.positional.begin() + 1, a.positional.end());
          rest.keyword = a.keyword;
          out.push_back(apply_filter(a.positional[0].as_string(), x, rest));
        }
      }
      return Value(std::move(out));
    }
    if (name == "select" || name == "reject" || name == "selectattr" || name == "rejectattr") {
      const bool by_attr = name.ends_with("attr");
      const bool keep = name.starts_with("select");
      const std::size_t first_arg = by_attr ? 1 : 0;
      std::string attr_name;
      if (by_attr) attr_name = string_arg(a, 0, "attribute", name.c_str());
      Value::List out;
      for (const Value& x : items_of(v, ("filter '" + name + "'").c_str())) {
        step();
        const Value subject = by_attr ? path_of(x, attr_name) : x;
        bool ok;
        if (a.positional.size() > first_arg) {
          if (!a.positional[first_arg].is_string())
            fail("filter '", name, "': expected a test name, got ",
                 kind_name(a.positional[first_arg]));
          Arguments rest;
          rest.positional.assign(a.positional.begin() + static_cast<std::ptrdiff_t>(first_arg) + 1,
                                 a.positional.end());
          ok = test(a.positional[first_arg].as_string(), subject, rest);
        } else {
          ok = truthy(subject);
        }
        if (ok == keep) out.push_back(x);
      }
      return Value(std::move(out));
    }
    fail("expected a known filter, got '", name, "'");
  }

  void add_globals(Frame& g) {
    g.set("raise_exception", Value::function([](Arguments& a) -> Value {
            TemplateError e{to_str(arg(a, 0, "message"))};
            e.raised = true;
            throw e;
          }));
    g.set("namespace", Value::function([](Arguments& a) -> Value {
            Value::Dict d;
            if (!a.positional.empty()) {
              if (a.positional[0].kind() != Value::Kind::kDict)
                fail("namespace: expected a dict or keyword arguments");
              d = a.positional[0].as_dict();
            }
            for (const auto& [k, v] : a.keyword) {
              if (v.holds_namespace()) fail("namespace: expected values without namespaces");
              d.emplace_back(k, v);
            }
            return Value::make_namespace(std::move(d));
          }));
    g.set("dict", Value::function([](Arguments& a) -> Value {
            Value::Dict d;
            if (!a.positional.empty() && a.positional[0].kind() == Value::Kind::kDict)
              d = a.positional[0].as_dict();
            for (const auto& [k, v] : a.keyword) d.emplace_back(k, v);
            return Value(std::move(d));
          }));
    const std::size_t max_items = limits_.max_items;
    g.set("range", Value::function([max_items](Arguments& a) -> Value {
            std::int64_t start = 0, stop = 0, stride = 1;
            if (a.positional.size() == 1) {
              stop = int_arg(a, 0, "stop", 0);
            } else if (a.positional.size() >= 2) {
              start = int_arg(a, 0, "start", 0);
              stop = int_arg(a, 1, "stop", 0);
              stride = int_arg(a, 2, "step", 1);
            } else {
              fail("range: expected 1 to 3 integers");
            }
            if (stride == 0) fail("range: expected a step other than 0");
            const double count =
                std::ceil((static_cast<double>(stop) - static_cast<double>(start)) /
                          static_cast<double>(stride));
            if (count > static_cast<double>(max_items))
              fail("range: expected at most ", max_items, " items, got ", count);
            Value::List out;
            for (std::int64_t i = start; stride > 0 ? i < stop : i > stop; i += stride)
              out.emplace_back(i);
            return Value(std::move(out));
          }));
    g.set("strftime_now", Value::function([](Arguments& a) -> Value {
            const std::string& format = string_arg(a, 0, "format", "strftime_now");
            const std::time_t now = std::time(nullptr);
            std::tm tm{};
            localtime_r(&now, &tm);
            char buf[256];
            const std::size_t n = std::strftime(buf, sizeof buf, format.c_str(), &tm);
            return Value(std::string(buf, n));
          }));
  }

  const detail::Program& p_;
  const Limits& limits_;
  std::string* out_ = nullptr;
  std::size_t steps_ = 0, depth_ = 0;
};

std::string where(const TemplateError& e) {
  return "line " + std::to_string(e.line) + ", column " + std::to_string(e.column);
}

}  // namespace

Template Template::parse(std::string_view source, Limits limits) {
  auto program = std::make_shared<detail::Program>();
  program->limits = limits;
  try {
    program->body = Parser(Lexer(source).run(), program->limits).run();
  } catch (const TemplateError& e) {
    KVCACHE_FAIL("chat template: ", where(e), ": ", e.message);
  }
  Template t;
  t.program_ = std::move(program);
  return t;
}

std::string Template::render(const Value::Dict& context) const {
  KVCACHE_CHECK(program_, "jinja::Template::render: expected a parsed template, got an empty one");
  try {
    return Renderer(*program_).run(context);
  } catch (const TemplateError& e) {
    if (e.raised) KVCACHE_FAIL("chat template raised an error at ", where(e), ": ", e.message);
    KVCACHE_FAIL("chat template: ", where(e), ": ", e.message);
  }
}

}  // namespace kvcache::jinja
