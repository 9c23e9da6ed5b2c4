// Fuzz target: tokenizer_config.json, read beside a tokenizer.json (bos/eos/pad/unk tokens,
// add_bos_token, the chat template). A folder of this process's own holds the small SmolLM2-style
// tokenizer.json from tests/data and the input as tokenizer_config.json, each run; the loaded
// tokenizer then encodes a conversation rendered through its chat template, if it has one.
#include <stdlib.h>
#include <unistd.h>

#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <string>
#include <vector>

#include "fuzz_util.hpp"
#include "kvcache/tokenizer/chat_template.hpp"
#include "kvcache/tokenizer/tokenizer.hpp"

#ifndef KVCACHE_TEST_DATA_DIR
#error "KVCACHE_TEST_DATA_DIR must name tests/data"
#endif

namespace {

// A folder of its own for one run (under /dev/shm when there is one: no disk writes), removed
// when the run ends (libFuzzer leaves without running atexit handlers).
class RunFolder {
 public:
  RunFolder() {
    std::string pattern = std::filesystem::exists("/dev/shm") ? "/dev/shm/kvcache-fuzz-XXXXXX"
                                                              : "/tmp/kvcache-fuzz-XXXXXX";
    if (::mkdtemp(pattern.data()) == nullptr) std::abort();
    path_ = pattern;
  }
  RunFolder(const RunFolder&) = delete;
  RunFolder& operator=(const RunFolder&) = delete;
  ~RunFolder() {
    std::error_code ec;
    std::filesystem::remove_all(path_, ec);
  }
  void write(const char* name, const void* data, std::size_t size) const {
    std::ofstream out(path_ / name, std::ios::binary | std::ios::trunc);
    out.write(static_cast<const char*>(data), static_cast<std::streamsize>(size));
    if (!out) std::abort();
  }
  std::string file(const char* name) const { return (path_ / name).string(); }

 private:
  std::filesystem::path path_;
};

const std::string& tokenizer_json() {
  static const std::string text = [] {
    std::ifstream in(std::string(KVCACHE_TEST_DATA_DIR) + "/tokenizer/tiny_smollm/tokenizer.json",
                     std::ios::binary);
    std::string t((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
    if (t.empty()) std::abort();
    return t;
  }();
  return text;
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  const RunFolder folder;
  folder.write("tokenizer.json", tokenizer_json().data(), tokenizer_json().size());
  folder.write("tokenizer_config.json", data, size);
  kvcache::fuzz::expect_only_errors("Tokenizer::from_json_file (tokenizer_config.json)", [&] {
    const kvcache::Tokenizer tok =
        kvcache::Tokenizer::from_json_file(folder.file("tokenizer.json"));
    for (const auto id : {tok.bos_token_id(), tok.eos_token_id(), tok.pad_token_id()}) {
      if (id && (*id < 0 || *id >= tok.vocab_size())) {
        std::fprintf(stderr, "FINDING: a special id outside the vocabulary was accepted\n");
        std::abort();
      }
    }
    if (!tok.chat_template()) return;
    kvcache::fuzz::expect_only_errors("ChatTemplate (tokenizer_config.json)", [&] {
      const std::vector<kvcache::ChatMessage> messages = {{"user", "Hello, what's your name."}};
      const std::string prompt = kvcache::apply_chat_template(messages, true, *tok.chat_template());
      (void)tok.decode(tok.encode(prompt));
    });
  });
  return 0;
}
