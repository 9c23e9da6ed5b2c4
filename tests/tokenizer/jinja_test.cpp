// The Jinja engine against Python's jinja2 (tools/make_chat_template_reference.py writes
// tests/data/chat_templates/reference.json with transformers' environment): the chat templates of
// Llama-2, Llama-3, Mistral v0.1 and v0.3, ChatML (Qwen2, SmolLM2), Gemma, Phi-3 and Zephyr over
// conversations with and without system prompts, multi-turn, quotes, newlines and unicode, through
// ChatTemplate with each model's bos/eos tokens (the cases the template refuses must throw
// kvcache::Error carrying the template's own message); and one small template per construct.
// Then what jinja2 cannot check for us: syntax and runtime errors name line and column and what
// was expected, and hostile templates (endless loops, huge output, deep nesting, recursion)
// end in a kvcache::Error instead of a hang or a crash.
#include "kvcache/tokenizer/jinja.hpp"

#include <gtest/gtest.h>

#include <fstream>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "kvcache/error.hpp"
#include "kvcache/tokenizer/chat_template.hpp"
#include "test_util.hpp"

#ifndef KVCACHE_TEST_DATA_DIR
#error "KVCACHE_TEST_DATA_DIR must name tests/data"
#endif

namespace kvcache {
namespace {

using json = nlohmann::ordered_json;  // dict order matters to tojson and loops
using jinja::Template;
using jinja::Value;
using testing::error_of;

const json& reference() {
  static const json r = [] {
    std::ifstream in(std::string(KVCACHE_TEST_DATA_DIR) + "/chat_templates/reference.json");
    return json::parse(in);
  }();
  return r;
}

Value value_of(const json& j) {
  if (j.is_null()) return Value::none();
  if (j.is_boolean()) return Value(j.get<bool>());
  if (j.is_number_integer()) return Value(j.get<std::int64_t>());
  if (j.is_number()) return Value(j.get<double>());
  if (j.is_string()) return Value(j.get<std::string>());
  if (j.is_array()) {
    Value::List list;
    for (const json& x : j) list.push_back(value_of(x));
    return Value(std::move(list));
  }
  Value::Dict dict;
  for (const auto& [k, v] : j.items()) dict.emplace_back(k, value_of(v));
  return Value(std::move(dict));
}

std::string render(std::string_view source, const Value::Dict& context = {},
                   jinja::Limits limits = {}) {
  return Template::parse(source, limits).render(context);
}

TEST(JinjaReference, ChatTemplatesRenderAsJinja2) {
  const json& r = reference();
  ASSERT_GE(r["chats"].size(), 100u);
  std::size_t raised = 0;
  for (const json& c : r["chats"]) {
    const json& t = r["templates"][c["template"].get<std::string>()];
    std::vector<ChatMessage> messages;
    for (const json& m : r["conversations"][c["conversation"].get<std::string>()])
      messages.push_back({m["role"], m["content"]});
    const ChatTemplate chat = ChatTemplate::parse(
        t["template"].get<std::string>(),
        {.bos_token = t["bos_token"], .eos_token = t["eos_token"], .variables = {}});
    const bool gen = c["add_generation_prompt"];
    const std::string name = c["template"].get<std::string>() + "/" +
                             c["conversation"].get<std::string>() + (gen ? "+gen" : "");
    if (c.contains("error")) {
      ++raised;
      const std::string e = error_of([&] { chat.apply(messages, gen); });
      EXPECT_NE(e.find("raised an error"), std::string::npos) << name << ": " << e;
      EXPECT_NE(e.find(c["error"].get<std::string>()), std::string::npos) << name << ": " << e;
      EXPECT_NE(e.find("--raw"), std::string::npos) << name << ": " << e;
    } else {
      EXPECT_EQ(chat.apply(messages, gen), c["expected"].get<std::string>()) << name;
    }
  }
  EXPECT_GE(raised, 10u);
}

TEST(JinjaReference, ConstructsRenderAsJinja2) {
  for (const json& c : reference()["constructs"]) {
    const std::string source = c["template"];
    const Value::Dict context = value_of(c["context"]).as_dict();
    if (c.contains("error")) {
      const std::string e = error_of([&] { render(source, context); });
      EXPECT_NE(e.find(c["error"].get<std::string>()), std::string::npos) << c["name"] << ": " << e;
    } else {
      std::string got;
      try {
        got = render(source, context);
      } catch (const Error& e) {
        ADD_FAILURE() << c["name"] << ": " << e.what();
        continue;
      }
      EXPECT_EQ(got, c["expected"].get<std::string>()) << c["name"] << "\n" << source;
    }
  }
}

TEST(Jinja, ValuesPrintAsPython) {
  EXPECT_EQ(jinja::to_str(Value(0.1)), "0.1");
  EXPECT_EQ(jinja::to_str(Value(1e16)), "1e+16");
  EXPECT_EQ(jinja::to_str(Value(1e-5)), "1e-05");
  EXPECT_EQ(jinja::to_str(Value(100.0)), "100.0");
  EXPECT_EQ(jinja::to_str(Value::tuple({Value(1)})), "(1,)");
  EXPECT_EQ(jinja::to_str(Value(Value::List{Value("it's"), Value::none()})), "[\"it's\", None]");
  EXPECT_EQ(jinja::to_json(Value(Value::Dict{{"a", Value("\x01")}}), 1),
            "{\n \"a\": \"\\u0001\"\n}");
}

TEST(Jinja, ExtraVariablesReachTheTemplate) {
  const std::vector<ChatMessage> hi = {{"user", "Hi"}};
  const std::string t = "{{ bos_token }}{{ date_string }}|{{ messages[0].content }}{{ eos_token }}";
  EXPECT_EQ(
      apply_chat_template(
          hi, true, t,
          {.bos_token = "<s>", .eos_token = "</s>", .variables = {{"date_string", "26 Jul 2024"}}}),
      "<s>26 Jul 2024|Hi</s>");
  // The generation prompt flag and an untouched default: no bos/eos given renders them empty.
  EXPECT_EQ(apply_chat_template(hi, true, "[{{ bos_token }}]{{ add_generation_prompt }}"),
            "[]True");
}

TEST(Jinja, GenerationBlocksRenderTheirBody) {
  EXPECT_EQ(render("a{% generation %}b{{ 1 }}{% endgeneration %}c"), "ab1c");
}

TEST(Jinja, MacrosRecurseWithinTheLimit) {
  EXPECT_EQ(render("{% macro f(n) %}{% if n > 0 %}{{ n }}{{ f(n - 1) }}{% endif %}{% endmacro %}"
                   "{{ f(5) }}"),
            "54321");
}

// --- errors name the place and what was expected -------------------------------------------

TEST(JinjaErrors, SyntaxErrorsNameLineAndColumn) {
  std::string e = error_of([] { render("line one\n{% if x %}\nno end"); });
  EXPECT_NE(e.find("line 3"), std::string::npos) << e;
  EXPECT_NE(e.find("expected {% elif %} or {% else %} or {% endif %}, got end of template"),
            std::string::npos)
      << e;

  e = error_of([] { render("ab\n  {{ 1 + }}"); });
  EXPECT_NE(e.find("line 2, column 10: expected an expression, got '}}'"), std::string::npos) << e;

  e = error_of([] { render("{{ 'open }}"); });
  EXPECT_NE(e.find("line 1, column 4: expected a closing ' for the string"), std::string::npos)
      << e;

  e = error_of([] { render("{% for x in xs %}{{ x }}"); });
  EXPECT_NE(e.find("expected {% else %} or {% endfor %}"), std::string::npos) << e;

  e = error_of([] { render("{% frobnicate %}"); });
  EXPECT_NE(e.find("line 1, column 4: expected a statement"), std::string::npos) << e;
  EXPECT_NE(e.find("got 'frobnicate'"), std::string::npos) << e;

  e = error_of([] { render("{% break %}"); });
  EXPECT_NE(e.find("expected 'break' inside a for loop"), std::string::npos) << e;

  e = error_of([] { render("{{ x ]] }}"); });
  EXPECT_NE(e.find("expected '}}', got ']'"), std::string::npos) << e;

  e = error_of([] { render("{# never closed"); });
  EXPECT_NE(e.find("expected '#}'"), std::string::npos) << e;

  e = error_of([] { render("{{ 99999999999999999999 }}"); });
  EXPECT_NE(e.find("fits 64 bits"), std::string::npos) << e;
}

TEST(JinjaErrors, RuntimeErrorsNameLineAndColumn) {
  std::string e = error_of([] { render("ok\n{{ 1 + 'a' }}"); });
  EXPECT_NE(e.find("line 2, column 6: expected operands that support '+', got int and string"),
            std::string::npos)
      << e;

  e = error_of([] { render("{{ missing.attr }}"); });
  EXPECT_NE(e.find("expected a value before '.attr', got 'missing' is undefined"),
            std::string::npos)
      << e;

  e = error_of([] { render("{{ 'x' | nosuchfilter }}"); });
  EXPECT_NE(e.find("expected a known filter, got 'nosuchfilter'"), std::string::npos) << e;

  e = error_of([] { render("{{ 1 // 0 }}"); });
  EXPECT_NE(e.find("non-zero divisor"), std::string::npos) << e;

  e = error_of([] { render("{{ x is frob }}"); });
  EXPECT_NE(e.find("expected a known test after 'is', got 'frob'"), std::string::npos) << e;

  e = error_of([] { render("{% set x.y = 1 %}"); });
  EXPECT_NE(e.find("expected 'x' to be a namespace()"), std::string::npos) << e;

  e = error_of([] { render("  {{ raise_exception('Only user and assistant') }}"); });
  EXPECT_NE(e.find("chat template raised an error at line 1, column 21: Only user and assistant"),
            std::string::npos)
      << e;

  // Through ChatTemplate, every failure suggests --raw.
  const std::vector<ChatMessage> hi = {{"user", "Hi"}};
  e = error_of([&] { apply_chat_template(hi, true, "{{ messages | frob }}"); });
  EXPECT_NE(e.find("--raw"), std::string::npos) << e;
  e = error_of([&] { ChatTemplate::parse("{% if %}"); });
  EXPECT_NE(e.find("--raw"), std::string::npos) << e;
}

// --- hostile templates ---------------------------------------------------------------------

TEST(JinjaHostile, EndlessLoopsHitTheStepLimit) {
  const std::string e = error_of([] {
    render("{% for a in range(100000) %}{% for b in range(100000) %}{% endfor %}{% endfor %}");
  });
  EXPECT_NE(e.find("expected the template to finish within"), std::string::npos) << e;
}

TEST(JinjaHostile, HugeRangesAndListsAreRefused) {
  std::string e = error_of([] { render("{{ range(10000000000) | length }}"); });
  EXPECT_NE(e.find("range: expected at most"), std::string::npos) << e;
  e = error_of([] { render("{{ ([1] * 100000) * 100000 }}"); });
  EXPECT_NE(e.find("expected lists of at most"), std::string::npos) << e;
}

TEST(JinjaHostile, OutputAndStringsAreBounded) {
  jinja::Limits small;
  small.max_output_bytes = 1 << 16;
  std::string e = error_of([&] { render("{{ 'x' * 100000000000 }}", {}, small); });
  EXPECT_NE(e.find("expected strings of at most"), std::string::npos) << e;
  e = error_of([&] {
    render(
        "{% set ns = namespace(s='xx') %}{% for i in range(40) %}{% set ns.s = ns.s + ns.s %}"
        "{% endfor %}",
        {}, small);
  });
  EXPECT_NE(e.find("expected strings of at most"), std::string::npos) << e;
  e = error_of([&] { render("{% for i in range(100000) %}0123456789{% endfor %}", {}, small); });
  EXPECT_NE(e.find("expected output of at most"), std::string::npos) << e;
}

TEST(JinjaHostile, DeepNestingIsRefusedNotOverflowed) {
  const std::string parens = std::string(100000, '(') + "1" + std::string(100000, ')');
  std::string e = error_of([&] { render("{{ " + parens + " }}"); });
  EXPECT_NE(e.find("nested at most"), std::string::npos) << e;

  std::string chain = "{{ x";
  for (int i = 0; i < 200000; ++i) chain += ".a";
  e = error_of([&] { render(chain + " }}"); });
  EXPECT_NE(e.find("nested at most"), std::string::npos) << e;

  std::string sum = "{{ 1";
  for (int i = 0; i < 200000; ++i) sum += " + 1";
  e = error_of([&] { render(sum + " }}"); });
  EXPECT_NE(e.find("nested at most"), std::string::npos) << e;

  std::string ifs;
  for (int i = 0; i < 50000; ++i) ifs += "{% if true %}";
  e = error_of([&] { render(ifs); });
  EXPECT_NE(e.find("nested at most"), std::string::npos) << e;

  e = error_of([] { render("{{ " + std::string(100000, '-') + "1 }}"); });
  EXPECT_NE(e.find("nested at most"), std::string::npos) << e;
  e = error_of([] { render("{{ " + std::string(100000, '[') + " }}"); });
  EXPECT_NE(e.find("nested at most"), std::string::npos) << e;
}

TEST(JinjaHostile, RecursionAndSelfNestingAreBounded) {
  std::string e = error_of([] { render("{% macro f() %}{{ f() }}{% endmacro %}{{ f() }}"); });
  EXPECT_NE(e.find("levels deep"), std::string::npos) << e;

  e = error_of([] {
    render(
        "{% set ns = namespace(x=[]) %}{% for i in range(100000) %}{% set ns.x = [ns.x] %}"
        "{% endfor %}{{ ns.x }}");
  });
  EXPECT_NE(e.find("nested at most"), std::string::npos) << e;

  e = error_of([] { render("{% set ns = namespace() %}{% set ns.me = [ns] %}"); });
  EXPECT_NE(e.find("without namespaces"), std::string::npos) << e;
}

TEST(JinjaHostile, GarbageNeverCrashes) {
  // Truncations of a real template at every byte: each parses or fails with a kvcache::Error.
  const std::string t = reference()["templates"]["mistral_v0.3"]["template"];
  const Value::Dict context = {
      {"messages",
       Value(Value::List{Value(Value::Dict{{"role", Value("user")}, {"content", Value("hi")}})})},
      {"bos_token", Value("<s>")},
      {"eos_token", Value("</s>")}};
  for (std::size_t n = 0; n <= t.size(); n += 7) {
    try {
      render(std::string_view(t).substr(0, n), context);
    } catch (const Error&) {
    }
  }
}

}  // namespace
}  // namespace kvcache
