// Byte-level BPE tokenizers (GPT-2, Llama-3, SmolLM2, Qwen2 style), read from a GGUF file's
// tokenizer metadata or from transformers' tokenizer.json, encoding and decoding as transformers'
// fast tokenizer does (its encodings are the tests' oracle: tools/make_tokenizer_reference.py);
// and SentencePiece BPE tokenizers (Llama-2, TinyLlama, Mistral v0.1, Gemma), read from GGUF
// metadata (tokenizer.ggml.model "llama") or from a tokenizer.model file through libsentencepiece,
// encoding as the sentencepiece library does (tools/make_spm_reference.py).
//
// encode(): special tokens are matched whole first (longest match at the leftmost position, as the
// tokenizers library does); the text between them is split into pre-tokens by the model's
// pre-tokenizer regexes (PCRE2 with Unicode properties: \p{L}, \p{N}, white space), each
// pre-token's bytes are mapped to GPT-2's byte alphabet and merged by rank, lowest first. decode()
// maps tokens back to bytes and replaces invalid UTF-8 with U+FFFD as transformers does;
// StreamDecoder emits text token by token and holds back an incomplete trailing character until its
// last byte comes.
//
// SentencePiece encode(): each run of text between control tokens gets the dummy prefix "▁" and
// its spaces become "▁" (llama.cpp's rule: after a control token matched with parse_special the
// prefix is added again); user-defined pieces are matched whole, the rest starts as characters
// and the adjacent pair whose concatenation is the highest-scoring piece is merged, again and
// again; a piece left outside the vocabulary becomes its bytes' <0xNN> tokens (byte fallback) or
// the unknown token. decode() turns "▁" back into spaces and drops the one space the dummy prefix
// put before the first non-control piece, as sentencepiece does.
#pragma once

#include <cstdint>
#include <memory>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <vector>

namespace kvcache {

class GgufFile;

/// Kinds of vocabulary entries, with GGUF's numbering (tokenizer.ggml.token_type).
enum class TokenType : std::int32_t {
  kNormal = 1,
  kUnknown = 2,
  kControl = 3,      // special tokens: <|im_start|>, <|endoftext|>, ...; skipped by skip_special
  kUserDefined = 4,  // added tokens that are not special: always matched whole, never skipped
  kUnused = 5,
  kByte = 6,
};

/// The parts a byte-level BPE tokenizer is built from, as GGUF metadata holds them. from_gguf()
/// reads a file into one of these; tests and converters can fill one by hand.
struct BpeVocabulary {
  /// Vocabulary strings by id: normal tokens in GPT-2's byte alphabet ("Ġworld"), added tokens
  /// (control, user-defined) as their text ("<|im_start|>").
  std::vector<std::string> tokens{};
  /// Merges by rank, each "left right" (two vocabulary strings joined by one space).
  std::vector<std::string> merges{};
  /// TokenType numbers by id; empty means all normal.
  std::vector<std::int32_t> token_types{};
  /// llama.cpp's pre-tokenizer name (tokenizer.ggml.pre): "smollm" (each `\p{N}` character on its
  /// own, then GPT-2's regex, as SmolLM2's tokenizer.json and llama.cpp split; transformers' gguf
  /// integration skips the digit step), "gpt2" and "default" (GPT-2's regex, which is also what
  /// transformers uses for any GGUF file) or "llama-bpe" (Llama 3's regex; a pre-token that is a
  /// whole vocabulary entry is not merged). Any other name is an error naming it.
  std::string pre = "default";
  /// The BOS id, where the vocabulary names one.
  std::optional<std::int64_t> bos_token_id{}, eos_token_id{}, pad_token_id{}, unk_token_id{};
  /// \var eos_token_id
  /// The EOS id, where the vocabulary names one.
  /// \var pad_token_id
  /// The padding id, where the vocabulary names one.
  /// \var unk_token_id
  /// The unknown token's id, where the vocabulary names one.
  /// \var add_bos_token
  /// Whether the model expects BOS before a prompt (encode() never adds it).
  bool add_bos_token = false;
  /// The chat template shipped with the vocabulary (tokenizer.chat_template), if any.
  std::optional<std::string> chat_template{};
};

/// The parts of a SentencePiece BPE tokenizer, as GGUF metadata (tokenizer.ggml.model "llama")
/// holds them. from_gguf() reads a file into one of these; tests can fill one by hand.
struct SpmVocabulary {
  /// Pieces by id, as sentencepiece writes them ("▁world", "<s>", "<0x0A>").
  std::vector<std::string> tokens{};
  /// One score per token: the merge of the highest-scoring piece is made first.
  std::vector<float> scores{};
  /// TokenType numbers by id (one per token); empty means all normal. Byte tokens must be
  /// named <0xNN>, and a model with any must have all 256 (byte fallback).
  std::vector<std::int32_t> token_types{};
  /// The unknown token; when unset, the first token of type unknown (an error if none).
  std::optional<std::int64_t> unk_token_id{};
  /// The BOS id, where the vocabulary names one.
  std::optional<std::int64_t> bos_token_id{}, eos_token_id{}, pad_token_id{};
  /// \var eos_token_id
  /// The EOS id, where the vocabulary names one.
  /// \var pad_token_id
  /// The padding id, where the vocabulary names one.
  /// \var add_bos_token
  /// Whether the model expects BOS before a prompt (llama.cpp's default for SentencePiece).
  bool add_bos_token = true;  // llama.cpp's default for SentencePiece vocabularies
  /// Whether the model expects EOS after a prompt.
  bool add_eos_token = false;
  /// sentencepiece's add_dummy_prefix: "▁" before the text (llama.cpp: add_space_prefix).
  bool add_dummy_prefix = true;
  /// The chat template shipped with the vocabulary (tokenizer.chat_template), if any.
  std::optional<std::string> chat_template{};
};

/// A text tokenizer: token ids from UTF-8 text and back, with the vocabulary's special tokens and
/// the chat template it ships with. Read-only once built, so several threads may encode and
/// decode with one Tokenizer at once; copies share the vocabulary.
class Tokenizer {
 public:
  /// The tokenizer beside a model, as LlamaModel::from_pretrained takes the model: `path` is a
  /// .gguf file (its tokenizer metadata, as from_gguf) or a folder holding tokenizer.json (as
  /// from_json_file; tokenizer_config.json beside it is read too) or, without one, tokenizer.model
  /// (as from_sentencepiece_file). A path to a tokenizer.json or tokenizer.model file itself is
  /// read the same way. Anything else is a kvcache::Error naming the path and what it looked for.
  static Tokenizer from_pretrained(const std::string& path);

  /// Reads tokenizer.ggml.* and tokenizer.chat_template. Model "gpt2" (byte-level BPE): tokens,
  /// merges, token_type, pre, bos/eos/pad/unknown ids, add_bos_token. Model "llama"
  /// (SentencePiece BPE): tokens, scores, token_type, bos/eos/pad/unknown ids, add_bos_token,
  /// add_eos_token, add_space_prefix. Throws kvcache::Error for another model, an unknown
  /// pre-tokenizer, or inconsistent arrays (the error names what was expected and what came).
  static Tokenizer from_gguf(const GgufFile& file);

  /// Reads a sentencepiece model (tokenizer.model, sentencepiece's ModelProto) through
  /// libsentencepiece, which then encodes: the ids are the library's. A tokenizer_config.json
  /// beside it supplies add_bos_token, add_eos_token and the chat template. Throws
  /// kvcache::Error "built without libsentencepiece" where the library was not found when
  /// kvcache was configured.
  static Tokenizer from_sentencepiece_file(const std::string& path);

  /// Reads transformers' tokenizer.json: model BPE (vocab, merges as "a b" strings or [a, b]
  /// pairs, ignore_merges), added_tokens (special, lstrip, rstrip), no normalizer, pre_tokenizer
  /// ByteLevel or a Sequence of Split (regex, Isolated or Removed), Digits and ByteLevel. A
  /// tokenizer_config.json beside it supplies bos/eos/pad/unk tokens, add_bos_token and the chat
  /// template. Anything else (SentencePiece models, normalizers, other pre-tokenizers) throws.
  static Tokenizer from_json_file(const std::string& path);

  /// Builds from parts (what from_gguf reads); throws as from_gguf does.
  static Tokenizer from_vocabulary(const BpeVocabulary& vocabulary);
  /// Builds a SentencePiece tokenizer from parts (what from_gguf reads for model "llama");
  /// throws as from_gguf does.
  static Tokenizer from_vocabulary(const SpmVocabulary& vocabulary);

  /// Token ids of UTF-8 `text` (transformers' tokenizer(text, add_special_tokens=False)); no BOS
  /// or EOS is added. With parse_special, control tokens written in the text ("<|im_end|>") become
  /// their ids; without, they are encoded as plain text (split_special_tokens=True). User-defined
  /// tokens are matched either way. Invalid UTF-8 is an error naming the byte offset.
  std::vector<std::int64_t> encode(std::string_view text, bool parse_special = true) const;

  /// Text of `ids`; invalid UTF-8 (a character cut between ids) becomes U+FFFD, as in
  /// transformers. skip_special drops control tokens. An id out of range is an error.
  std::string decode(std::span<const std::int64_t> ids, bool skip_special = false) const;

  /// The vocabulary string of `id` ("Ġworld", "<|im_end|>"); token_id() is its inverse.
  const std::string& token_text(std::int64_t id) const;
  /// The bytes `id` decodes to (" world"); may be part of a UTF-8 character.
  const std::string& token_bytes(std::int64_t id) const;
  /// The kind of token `id` is (normal, control, byte, ...); an id out of range is an error.
  TokenType token_type(std::int64_t id) const;
  /// The id of vocabulary string `token` ("<|im_end|>", "Ġworld"), if the vocabulary has it.
  std::optional<std::int64_t> token_id(std::string_view token) const;
  /// Number of tokens (ids are 0 .. vocab_size() - 1).
  std::int64_t vocab_size() const;

  /// The BOS id, if the tokenizer has one.
  std::optional<std::int64_t> bos_token_id() const;
  /// The EOS id, if the tokenizer has one (a model may stop at more: ModelConfig::eos_token_ids).
  std::optional<std::int64_t> eos_token_id() const;
  /// The padding id, if the tokenizer has one.
  std::optional<std::int64_t> pad_token_id() const;
  /// The unknown token's id, if the tokenizer has one.
  std::optional<std::int64_t> unk_token_id() const;
  /// Whether the model expects BOS before a prompt (GGUF tokenizer.ggml.add_bos_token,
  /// tokenizer_config.json add_bos_token); encode() never adds it.
  bool add_bos_token() const;
  /// Whether the model expects EOS after a prompt (GGUF tokenizer.ggml.add_eos_token,
  /// tokenizer_config.json add_eos_token); encode() never adds it.
  bool add_eos_token() const;
  /// The chat template shipped with the tokenizer (GGUF tokenizer.chat_template,
  /// tokenizer_config.json chat_template), if any.
  const std::optional<std::string>& chat_template() const;
  /// The pre-tokenizer, in words ("smollm", "tokenizer.json: Digits, ByteLevel", ...;
  /// "sentencepiece" for SentencePiece models).
  const std::string& pre_tokenizer() const;

 private:
  struct Impl;
  explicit Tokenizer(std::shared_ptr<const Impl> impl);
  std::shared_ptr<const Impl> impl_;  // immutable once built, so copies share it
  friend class StreamDecoder;
};

/// Decodes ids one at a time for streaming output. push() returns the text that is complete so
/// far and holds back the bytes of a character whose last byte has not come yet; flush() returns
/// what is held (as U+FFFD if incomplete). The concatenation of every push() and the final
/// flush() equals Tokenizer::decode of all the ids, and each piece is valid UTF-8.
class StreamDecoder {
 public:
  /// Keeps a reference to `tokenizer`'s vocabulary (shared, so the Tokenizer may go first).
  explicit StreamDecoder(const Tokenizer& tokenizer, bool skip_special = false);

  /// Adds token `id` and returns the text complete so far (valid UTF-8; empty while a
  /// character waits for its last byte). An id out of range is an error.
  std::string push(std::int64_t id);
  /// Returns the bytes still held (U+FFFD for an incomplete character) and lets them go.
  std::string flush();

 private:
  std::shared_ptr<const Tokenizer::Impl> impl_;
  bool skip_special_;
  std::string pending_;   // bytes of an incomplete UTF-8 character (at most 3)
  bool at_start_ = true;  // SentencePiece: no non-control piece yet (its dummy space is dropped)
};

}  // namespace kvcache
