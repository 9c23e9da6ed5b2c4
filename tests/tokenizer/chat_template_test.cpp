// ChatML chat templates against transformers' apply_chat_template(..., tokenize=False)
// (tools/make_tokenizer_reference.py): SmolLM2's template as its GGUF file carries it (default
// system prompt inside the message loop, real newlines in the literal), Qwen2.5's (default outside
// the loop, written with \n escapes) and plain ChatML (no default), for conversations with and
// without a system message and with and without the generation prompt; the rendered text and its
// token ids must be transformers'. Templates beyond ChatML render too (the other families are
// checked against jinja2 in jinja_test.cpp); a template that fails says where and suggests --raw.
#include "kvcache/tokenizer/chat_template.hpp"

#include <gtest/gtest.h>

#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <vector>

#include "kvcache/error.hpp"
#include "kvcache/model/gguf.hpp"
#include "kvcache/tokenizer/tokenizer.hpp"
#include "test_util.hpp"

#ifndef KVCACHE_TEST_DATA_DIR
#error "KVCACHE_TEST_DATA_DIR must name tests/data"
#endif
#ifndef KVCACHE_DEFAULT_MODEL_PATH
#error "KVCACHE_DEFAULT_MODEL_PATH must name the default model's GGUF file"
#endif

namespace kvcache {
namespace {

using nlohmann::json;

const json& reference() {
  static const json r = [] {
    std::ifstream in(std::string(KVCACHE_TEST_DATA_DIR) + "/tokenizer/smollm2_encodings.json");
    return json::parse(in);
  }();
  return r;
}

std::vector<ChatMessage> messages_of(const json& list) {
  std::vector<ChatMessage> messages;
  for (const json& m : list) messages.push_back({m["role"], m["content"]});
  return messages;
}

std::string template_named(const std::string& name) {
  if (name == "gguf") return reference()["chat_template"];
  if (name == "qwen2.5") return reference()["qwen25_template"];
  if (name == "chatml") return reference()["chatml_template"];
  ADD_FAILURE() << "unknown template " << name;
  return {};
}

TEST(ChatTemplate, RendersLikeTransformers) {
  const json& chats = reference()["chats"];
  ASSERT_EQ(chats.size(), 30u);
  for (const json& chat : chats) {
    const std::string name = chat["template"].get<std::string>() + "/" +
                             chat["name"].get<std::string>() +
                             (chat["add_generation_prompt"].get<bool>() ? "+gen" : "");
    const std::string text = apply_chat_template(messages_of(chat["messages"]),
                                                 chat["add_generation_prompt"].get<bool>(),
                                                 template_named(chat["template"]));
    EXPECT_EQ(text, chat["text"].get<std::string>()) << name;
  }
}

TEST(ChatTemplate, IdsEqualTransformersWithTheGgufTemplate) {
  ASSERT_TRUE(std::filesystem::exists(KVCACHE_DEFAULT_MODEL_PATH))
      << KVCACHE_DEFAULT_MODEL_PATH << " is missing: run scripts/setup-model.sh";
  const Tokenizer tok = Tokenizer::from_gguf(GgufFile::open(KVCACHE_DEFAULT_MODEL_PATH));
  ASSERT_TRUE(tok.chat_template().has_value());
  const ChatTemplate chat_template = ChatTemplate::parse(*tok.chat_template());
  for (const json& chat : reference()["chats"]) {
    const std::vector<ChatMessage> messages = messages_of(chat["messages"]);
    const bool gen = chat["add_generation_prompt"].get<bool>();
    const std::string text =
        chat["template"] == "gguf"
            ? chat_template.apply(messages, gen)
            : apply_chat_template(messages, gen, template_named(chat["template"]));
    EXPECT_EQ(tok.encode(text), chat["ids"].get<std::vector<std::int64_t>>())
        << chat["template"] << "/" << chat["name"];
  }
}

TEST(ChatTemplate, RendersTheDefaultSystemPromptTheTemplateWrites) {
  const std::vector<ChatMessage> hi = {{"user", "Hi"}};
  EXPECT_EQ(apply_chat_template(hi, false, template_named("gguf")),
            "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging "
            "Face<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n");
  EXPECT_EQ(apply_chat_template(hi, false, template_named("qwen2.5")),
            "<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful "
            "assistant.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n");
  EXPECT_EQ(apply_chat_template(hi, false, template_named("chatml")),
            "<|im_start|>user\nHi<|im_end|>\n");
  const std::string custom =
      "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
      "{{ \"<|im_start|>system\\nBe \\\"terse\\\".\\tOK<|im_end|>\\n\" }}{% endif %}"
      "{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n'}}"
      "{% endfor %}";
  EXPECT_EQ(apply_chat_template(hi, true, custom),
            "<|im_start|>system\nBe \"terse\".\tOK<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n");
  // A system message of the caller's replaces the default.
  const std::vector<ChatMessage> with_system = {{"system", "S"}, {"user", "Hi"}};
  EXPECT_EQ(apply_chat_template(with_system, false, custom),
            "<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n");
}

using testing::error_of;

// Templates the marker-based reader refused now render through the Jinja engine.
TEST(ChatTemplate, RendersTemplatesBeyondChatML) {
  const std::vector<ChatMessage> hi = {{"user", "Hi"}};
  const std::string llama3 =
      "{% for message in messages %}{{ '<|start_header_id|>' + message['role'] + "
      "'<|end_header_id|>\\n\\n' + message['content'] | trim + '<|eot_id|>' }}{% endfor %}";
  EXPECT_EQ(apply_chat_template(hi, true, llama3),
            "<|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|>");

  const std::string thinking =
      "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n' + "
      "message['content'] + '<|im_end|>\\n'}}{% endfor %}{{ '<|im_start|>assistant\\n<think>\\n' "
      "}}";
  EXPECT_EQ(apply_chat_template(hi, true, thinking),
            "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n<think>\n");

  // The default system turn assembled from pieces and a caller's variable.
  const std::string pieces =
      "{% if messages[0]['role'] != 'system' %}{{ '<|im_start|>' + 'system\\n' + default_system "
      "+ '<|im_end|>\\n' }}{% endif %}{% for message in messages %}{{'<|im_start|>' + "
      "message['role'] + '\\n' + message['content'] + '<|im_end|>\\n'}}{% endfor %}";
  EXPECT_EQ(apply_chat_template(
                hi, false, pieces,
                {.bos_token = "", .eos_token = "", .variables = {{"default_system", "D"}}}),
            "<|im_start|>system\nD<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n");
  // Without the variable, jinja2's + refuses an undefined operand: an error naming the place.
  std::string e = error_of([&] { apply_chat_template(hi, false, pieces); });
  EXPECT_NE(e.find("line 1, column"), std::string::npos) << e;
  EXPECT_NE(e.find("--raw"), std::string::npos) << e;

  e = error_of([] { ChatTemplate::parse("{{ '<|im_start|>user\\n<|im_end|>"); });
  EXPECT_NE(e.find("expected a closing '"), std::string::npos) << e;
  EXPECT_NE(e.find("--raw"), std::string::npos) << e;

  e = error_of([] { apply_chat_template({}, true, "<|im_start|><|im_end|>"); });
  EXPECT_NE(e.find("expected at least one message, got none"), std::string::npos) << e;
}

}  // namespace
}  // namespace kvcache
