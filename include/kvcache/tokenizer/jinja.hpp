// A Jinja template engine for the chat templates that GGUF files (tokenizer.chat_template) and
// tokenizer_config.json (chat_template) carry. It follows jinja2 as Hugging Face transformers
// configures it for apply_chat_template: trim_blocks and lstrip_blocks on, autoescape off, the
// loopcontrols extension (break / continue), `{% generation %}` blocks passed through,
// raise_exception(message) and tojson as json.dumps(..., ensure_ascii=False).
//
// Covered: {{ }} output, {% %} statements, {# #} comments, `-` / `+` whitespace control; for
// (tuple targets, an `if` filter, else, the loop object), if / elif / else, set (names,
// namespace attributes, tuples, block set), macros with defaults and keyword arguments;
// literals (strings with escapes, ints, floats, lists, tuples, dicts, true/false/none in both
// spellings); + - * / // % ** ~, comparisons (chained), and / or / not, in / not in, conditional
// expressions, `is` tests, attributes, subscripts and slices; the filters and methods chat
// templates use (see jinja.cpp's list). Values are Python's: none, bool, int, float, string, list,
// dict (ordered, string keys) and callables; an undefined variable renders as "", is falsy and
// fails `is defined`, as jinja2's default Undefined.
//
// Templates are untrusted: parsing and rendering have depth, step and output limits, and every
// failure is a kvcache::Error naming the template's line and column and what was expected.
#pragma once

#include <cstddef>
#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

namespace kvcache::jinja {

class Value;

struct Arguments;

/// A template value with Python semantics. Lists and dicts are immutable once built and shared
/// between copies; a namespace() object is the one mutable kind (attribute assignment).
class Value {
 public:
  /// What a value holds (a tuple is a kList, a namespace() object a kDict).
  enum class Kind { kUndefined, kNone, kBool, kInt, kFloat, kString, kList, kDict, kCallable };
  /// A list's (or tuple's) items.
  using List = std::vector<Value>;
  /// A dict's entries, in insertion order, keys unique.
  using Dict = std::vector<std::pair<std::string, Value>>;
  /// A callable: a global (range, namespace, ...), a method or a macro.
  using Function = std::function<Value(Arguments&)>;

  /// Undefined (jinja2's Undefined: prints empty, is falsy, `is defined` false).
  Value() = default;
  /// Python's None.
  static Value none();
  /// A bool.
  Value(bool b);  // NOLINT(google-explicit-constructor)
  /// An int.
  Value(int i) : Value(static_cast<std::int64_t>(i)) {}  // NOLINT(google-explicit-constructor)
  /// An int.
  Value(std::int64_t i);  // NOLINT(google-explicit-constructor)
  /// A float.
  Value(double d);  // NOLINT(google-explicit-constructor)
  /// A string (UTF-8).
  Value(const char* s) : Value(std::string(s)) {}  // NOLINT(google-explicit-constructor)
  /// A string (UTF-8).
  Value(std::string s);  // NOLINT(google-explicit-constructor)
  /// A list.
  Value(List list);  // NOLINT(google-explicit-constructor)
  /// A dict.
  Value(Dict dict);  // NOLINT(google-explicit-constructor)
  /// A list that prints as a Python tuple ("(1, 2)"); otherwise a list.
  static Value tuple(List items);
  /// A callable value.
  static Value function(Function f);
  /// A namespace() object: a dict whose entries `{% set ns.key = ... %}` may change.
  static Value make_namespace(Dict initial);

  /// What it holds.
  Kind kind() const { return kind_; }
  /// Whether it is undefined.
  bool is_undefined() const { return kind_ == Kind::kUndefined; }
  /// Whether it is None.
  bool is_none() const { return kind_ == Kind::kNone; }
  /// Whether it is a string.
  bool is_string() const { return kind_ == Kind::kString; }
  /// Whether it is an int or a float.
  bool is_number() const { return kind_ == Kind::kInt || kind_ == Kind::kFloat; }
  /// Whether it is a namespace() object.
  bool is_namespace() const { return kind_ == Kind::kDict && namespace_; }
  /// Whether it is a tuple.
  bool is_tuple() const { return kind_ == Kind::kList && namespace_; }
  /// Nesting of lists and dicts (0 for a scalar), and whether a namespace is inside: the renderer
  /// bounds the first and refuses cycles through namespaces with the second.
  std::uint32_t depth() const { return depth_; }
  /// See depth().
  bool holds_namespace() const { return holds_namespace_; }

  /// The bool it holds (kind kBool).
  bool as_bool() const { return b_; }
  /// The int it holds (kind kInt).
  std::int64_t as_int() const { return i_; }
  /// The number it holds as a double (kind kInt or kFloat).
  double as_float() const { return kind_ == Kind::kInt ? static_cast<double>(i_) : d_; }
  /// The string it holds (kind kString).
  const std::string& as_string() const { return *s_; }
  /// The items it holds (kind kList).
  const List& as_list() const { return *list_; }
  /// The entries it holds (kind kDict).
  const Dict& as_dict() const { return *dict_; }
  /// The callable it holds (kind kCallable).
  const Function& as_function() const { return *f_; }

  /// The entry `key` of a dict, or nullptr.
  const Value* find(std::string_view key) const;
  /// Sets `key` of a namespace object (inserting it at the end when new).
  void set_attribute(const std::string& key, Value v) const;

 private:
  Kind kind_ = Kind::kUndefined;
  bool b_ = false;
  bool namespace_ = false;  // a dict: namespace(); a list: a tuple
  bool holds_namespace_ = false;
  std::uint32_t depth_ = 0;
  std::int64_t i_ = 0;
  double d_ = 0;
  std::shared_ptr<const std::string> s_;
  std::shared_ptr<const List> list_;
  std::shared_ptr<Dict> dict_;  // mutable only through set_attribute on a namespace
  std::shared_ptr<const Function> f_;
};

/// Positional and keyword arguments of a call.
struct Arguments {
  std::vector<Value> positional{};                       ///< in call order
  std::vector<std::pair<std::string, Value>> keyword{};  ///< name = value, in call order
};

/// Limits against hostile templates; each one reached is a kvcache::Error.
struct Limits {
  std::size_t max_output_bytes = 16u << 20;  ///< the rendered text, and any one string built
  std::size_t max_steps = 2'000'000;         ///< loop iterations, calls and emitted pieces
  std::size_t max_depth = 200;               ///< nesting of statements, expressions and calls
  std::size_t max_items = 1'000'000;         ///< elements of one list (range(), list * n)
};

namespace detail {
struct Program;
}

/// A parsed template; render() may be called from several threads at once.
class Template {
 public:
  /// Parses `source` (trim_blocks and lstrip_blocks on, one trailing newline dropped, as
  /// transformers' environment). Throws kvcache::Error with the line and column of a syntax error.
  static Template parse(std::string_view source, Limits limits = {});

  /// Renders with `context`'s entries (a dict) as variables, beside the globals range, dict,
  /// namespace, raise_exception and strftime_now. raise_exception(msg) and every runtime error
  /// throw kvcache::Error; the message of raise_exception comes after "raised: ".
  std::string render(const Value::Dict& context) const;

 private:
  std::shared_ptr<const detail::Program> program_;
};

/// Python's str() of a value ("None", "True", "['a', 1]").
std::string to_str(const Value& v);
/// json.dumps(v, ensure_ascii=False, indent=indent) (indent < 0: none).
std::string to_json(const Value& v, int indent = -1);

}  // namespace kvcache::jinja
