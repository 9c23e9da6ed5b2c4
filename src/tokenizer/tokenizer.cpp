// Byte-level BPE as the tokenizers library (transformers' fast tokenizers) runs it: added tokens
// split out first, the pre-tokenizer's regexes (PCRE2, UTF + UCP, so \p{L} and \p{N} are Unicode's)
// cut the rest into pre-tokens, each pre-token's bytes become GPT-2's printable byte alphabet and
// are merged pair by pair, lowest merge rank first (leftmost first among equal ranks). Decoding
// maps the alphabet back to bytes and repairs invalid UTF-8 the way Rust's from_utf8_lossy does, so
// the text equals transformers' decode() character for character.
#include "kvcache/tokenizer/tokenizer.hpp"

#define PCRE2_CODE_UNIT_WIDTH 8
#include <pcre2.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <filesystem>
#include <functional>
#include <nlohmann/json.hpp>
#include <queue>
#include <unordered_map>
#include <utility>

#include "../io_util.hpp"
#include "kvcache/error.hpp"
#include "kvcache/model/gguf.hpp"
#include "utf8.hpp"

#if KVCACHE_HAVE_SENTENCEPIECE
#include <sentencepiece_processor.h>
#endif

namespace kvcache {
namespace {

// --- UTF-8 ------------------------------------------------------------------------------------

constexpr std::string_view kReplacement = "\xEF\xBF\xBD";  // U+FFFD
constexpr std::string_view kMeta = "\xE2\x96\x81";         // U+2581 "▁", SentencePiece's space

// Length of the well-formed UTF-8 sequence at s[0..n) (Unicode's table 3-7): > 0 for a complete
// character, 0 when the bytes so far are a valid but incomplete start (more must come), -k when
// the first k bytes are a maximal invalid subpart (each replaced by one U+FFFD).
int utf8_sequence(const unsigned char* s, std::size_t n) {
  const unsigned char b0 = s[0];
  if (b0 < 0x80) return 1;
  int len;
  unsigned char lo = 0x80, hi = 0xBF;  // range of the second byte
  if (b0 >= 0xC2 && b0 <= 0xDF) {
    len = 2;
  } else if (b0 >= 0xE0 && b0 <= 0xEF) {
    len = 3;
    if (b0 == 0xE0) lo = 0xA0;
    if (b0 == 0xED) hi = 0x9F;
  } else if (b0 >= 0xF0 && b0 <= 0xF4) {
    len = 4;
    if (b0 == 0xF0) lo = 0x90;
    if (b0 == 0xF4) hi = 0x8F;
  } else {
    return -1;
  }
  for (int i = 1; i < len; ++i) {
    if (static_cast<std::size_t>(i) >= n) return 0;
    const unsigned char b = s[i];
    const bool ok = i == 1 ? (b >= lo && b <= hi) : (b >= 0x80 && b <= 0xBF);
    if (!ok) return -i;
  }
  return len;
}

// Appends bytes[0..n) to `out` with each maximal invalid subpart replaced by U+FFFD. Unless
// `final`, an incomplete character at the end is left unconsumed; returns the bytes consumed.
std::size_t append_utf8_lossy(std::string_view bytes, bool final, std::string& out) {
  const auto* s = reinterpret_cast<const unsigned char*>(bytes.data());
  const std::size_t n = bytes.size();
  std::size_t i = 0;
  while (i < n) {
    const int k = utf8_sequence(s + i, n - i);
    if (k > 0) {
      out.append(bytes.data() + i, static_cast<std::size_t>(k));
      i += static_cast<std::size_t>(k);
    } else if (k < 0) {
      out += kReplacement;
      i += static_cast<std::size_t>(-k);
    } else if (!final) {
      return i;  // an incomplete character: wait for its other bytes
    } else {
      out += kReplacement;
      return n;
    }
  }
  return n;
}

// Offset of the first byte that is not part of well-formed UTF-8, or npos.
std::size_t invalid_utf8_offset(std::string_view text) {
  const auto* s = reinterpret_cast<const unsigned char*>(text.data());
  std::size_t i = 0;
  while (i < text.size()) {
    const int k = utf8_sequence(s + i, text.size() - i);
    if (k <= 0) return i;
    i += static_cast<std::size_t>(k);
  }
  return std::string_view::npos;
}

// The code point at text[i] (well-formed UTF-8) and its length.
std::pair<char32_t, std::size_t> next_code_point(std::string_view text, std::size_t i) {
  const auto* s = reinterpret_cast<const unsigned char*>(text.data()) + i;
  const int len = utf8_sequence(s, text.size() - i);
  if (len <= 1) return {s[0], 1};
  char32_t cp = s[0] & (0x7F >> len);
  for (int k = 1; k < len; ++k) cp = (cp << 6) | (s[k] & 0x3F);
  return {cp, static_cast<std::size_t>(len)};
}

// Unicode's White_Space property (the 25 code points PropList.txt lists), which Rust's
// char::is_whitespace and Oniguruma's \s test: added tokens' lstrip/rstrip use it.
bool is_white_space(char32_t c) {
  return (c >= 0x09 && c <= 0x0D) || c == 0x20 || c == 0x85 || c == 0xA0 || c == 0x1680 ||
         (c >= 0x2000 && c <= 0x200A) || c == 0x2028 || c == 0x2029 || c == 0x202F || c == 0x205F ||
         c == 0x3000;
}

// --- GPT-2's byte alphabet ----------------------------------------------------------------------

// bytes_to_unicode(): printable Latin-1 bytes stand for themselves, the other 68 bytes (controls,
// space, DEL, NBSP, soft hyphen) become U+0100.. in byte order, so every byte is a visible char.
struct ByteAlphabet {
  std::array<std::string, 256> utf8;     // byte -> its character, UTF-8 encoded
  std::array<std::int16_t, 324> byte{};  // code point (< 324) -> byte, -1 where none
  ByteAlphabet() {
    byte.fill(-1);
    int extra = 0;
    for (int b = 0; b < 256; ++b) {
      const bool printable = (b >= 0x21 && b <= 0x7E) || (b >= 0xA1 && b <= 0xAC) || b >= 0xAE;
      const char32_t cp =
          printable ? static_cast<char32_t>(b) : static_cast<char32_t>(256 + extra++);
      detail::append_utf8(cp, utf8[static_cast<std::size_t>(b)]);
      byte[cp] = static_cast<std::int16_t>(b);
    }
  }
};

const ByteAlphabet& byte_alphabet() {
  static const ByteAlphabet alphabet;
  return alphabet;
}

// What the ByteLevel decoder makes of one token: its characters mapped back to bytes, or the
// token's own UTF-8 when some character is outside the alphabet (as the tokenizers library does).
std::string byte_level_decode(std::string_view token) {
  const ByteAlphabet& alphabet = byte_alphabet();
  std::string out;
  if (invalid_utf8_offset(token) != std::string_view::npos) return std::string(token);
  for (std::size_t i = 0; i < token.size();) {
    const auto [cp, len] = next_code_point(token, i);
    if (cp >= alphabet.byte.size() || alphabet.byte[cp] < 0) return std::string(token);
    out += static_cast<char>(alphabet.byte[cp]);
    i += len;
  }
  return out;
}

// --- regexes ----------------------------------------------------------------------------------

// The pre-tokenizer patterns, as the tokenizers library writes them (Oniguruma syntax).
constexpr std::string_view kGpt2Pattern =
    R"('s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+)";
constexpr std::string_view kLlama3Pattern =
    R"((?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*)"
    R"(|\s*[\r\n]+|\s+(?!\S)|\s+)";

// Oniguruma's \s (the tokenizers library's engine) is Unicode's White_Space. Spelling \s and \S
// out as that class keeps the split independent of what the installed PCRE2's \s covers under UCP.
std::string onig_to_pcre2(std::string_view pattern) {
  constexpr std::string_view kSpace = R"(\t-\r\x{85}\p{Z})";
  std::string out;
  bool in_class = false;
  for (std::size_t i = 0; i < pattern.size(); ++i) {
    const char c = pattern[i];
    if (c == '\\' && i + 1 < pattern.size()) {
      const char e = pattern[++i];
      if (e == 's') {
        out += in_class ? std::string(kSpace) : "[" + std::string(kSpace) + "]";
      } else if (e == 'S') {
        KVCACHE_CHECK(!in_class,
                      "pre-tokenizer regex: \\S inside a character class is not served, in ",
                      pattern);
        out += "[^" + std::string(kSpace) + "]";
      } else {
        out += c;
        out += e;
      }
      continue;
    }
    if (c == '[' && !in_class) {
      in_class = true;
      out += c;
      // A ']' right after '[' or '[^' is a literal member, not the end of the class.
      if (i + 1 < pattern.size() && pattern[i + 1] == '^') out += pattern[++i];
      if (i + 1 < pattern.size() && pattern[i + 1] == ']') out += pattern[++i];
      continue;
    }
    if (c == ']' && in_class) in_class = false;
    out += c;
  }
  return out;
}

struct CodeFree {
  void operator()(pcre2_code* code) const { pcre2_code_free(code); }
};
struct MatchDataFree {
  void operator()(pcre2_match_data* data) const { pcre2_match_data_free(data); }
};

class Regex {
 public:
  // `pattern` in the tokenizers library's syntax; `literal` matches it as plain text.
  Regex(std::string_view pattern, bool literal) : source_(pattern) {
    const std::string translated = literal ? std::string(pattern) : onig_to_pcre2(pattern);
    int error = 0;
    PCRE2_SIZE offset = 0;
    const std::uint32_t options = PCRE2_UTF | PCRE2_UCP | (literal ? PCRE2_LITERAL : 0u);
    pcre2_code* code = pcre2_compile(reinterpret_cast<PCRE2_SPTR>(translated.data()),
                                     translated.size(), options, &error, &offset, nullptr);
    if (code == nullptr) {
      PCRE2_UCHAR message[256];
      pcre2_get_error_message(error, message, sizeof(message));
      KVCACHE_FAIL("pre-tokenizer regex: PCRE2 cannot compile ", pattern, " (as ", translated,
                   "): ", reinterpret_cast<const char*>(message), " at offset ", offset);
    }
    code_.reset(code);
    pcre2_jit_compile(code, PCRE2_JIT_COMPLETE);  // where JIT is missing, the interpreter runs
  }

  // [begin, end) of each non-empty match in `subject` (well-formed UTF-8), left to right.
  void find_all(std::string_view subject,
                std::vector<std::pair<std::size_t, std::size_t>>& matches) const {
    matches.clear();
    std::unique_ptr<pcre2_match_data, MatchDataFree> data(
        pcre2_match_data_create_from_pattern(code_.get(), nullptr));
    KVCACHE_CHECK(data != nullptr, "pre-tokenizer regex: out of memory for match data");
    const auto* s = reinterpret_cast<PCRE2_SPTR>(subject.data());
    std::size_t start = 0;
    while (start < subject.size()) {
      const int rc = pcre2_match(code_.get(), s, subject.size(), start, PCRE2_NO_UTF_CHECK,
                                 data.get(), nullptr);
      if (rc == PCRE2_ERROR_NOMATCH) break;
      if (rc < 0) {
        PCRE2_UCHAR message[256];
        pcre2_get_error_message(rc, message, sizeof(message));
        KVCACHE_FAIL("pre-tokenizer regex ", source_,
                     ": PCRE2 match failed: ", reinterpret_cast<const char*>(message));
      }
      const PCRE2_SIZE* ovector = pcre2_get_ovector_pointer(data.get());
      const std::size_t begin = ovector[0], end = ovector[1];
      if (end == begin) {  // an empty match splits nothing: step over one character
        if (begin >= subject.size()) break;
        start = begin + next_code_point(subject, begin).second;
        continue;
      }
      matches.emplace_back(begin, end);
      start = end;
    }
  }

 private:
  std::string source_;
  std::unique_ptr<pcre2_code, CodeFree> code_;
};

// One step of pre-tokenization; each splits every piece the steps before it made.
struct PreStep {
  enum class Kind {
    kIsolate,      // matches and the text between them all become pieces (Split "Isolated")
    kRemove,       // matches are dropped, the text between them stays (Split "Removed")
    kPrefixSpace,  // a piece that does not start with ' ' gets one (ByteLevel add_prefix_space)
  };
  Kind kind;
  std::shared_ptr<const Regex> regex;  // for kIsolate and kRemove
};

PreStep isolate(std::string_view pattern, bool literal = false) {
  return {PreStep::Kind::kIsolate, std::make_shared<const Regex>(pattern, literal)};
}

struct StringHash {
  using is_transparent = void;
  std::size_t operator()(std::string_view s) const { return std::hash<std::string_view>{}(s); }
};

struct AddedToken {
  std::string text;
  std::int64_t id;
  bool special;     // skipped by skip_special, not matched without parse_special
  bool lstrip;      // the match takes the white space before it
  bool rstrip;      // ... and after it
  bool normalized;  // matched in the second pass (the tokenizers library's order)
};

}  // namespace

struct Tokenizer::Impl {
  std::vector<std::string> tokens;  // id -> vocabulary string
  std::vector<std::string> bytes;   // id -> the bytes it decodes to
  std::vector<TokenType> types;     // id -> kind
  std::unordered_map<std::string, std::int64_t, StringHash, std::equal_to<>> ids;  // string -> id
  struct Merge {
    std::int32_t rank;
    std::int64_t id;  // the merged token
  };
  std::unordered_map<std::uint64_t, Merge> merges;  // (left id << 32 | right id) -> merge
  std::array<std::int64_t, 256> byte_ids{};         // byte -> id of its one-character token, or -1
  std::array<std::int64_t, 256> byte_fallback_ids{};  // byte -> id of "<0xXX>", or -1
  bool byte_fallback = false;
  bool fuse_unk = false;
  // The BPE model's own unknown token (tokenizer.json model.unk_token), which a byte without a
  // token becomes; never an added token, so text cannot encode to a control id. Without one such
  // bytes are dropped, as the tokenizers library drops them (GGUF's unknown_token_id and
  // tokenizer_config.json's unk_token only name the token; they do not enter encoding).
  std::optional<std::int64_t> model_unk;
  bool ignore_merges = false;  // a pre-token that is a whole vocabulary entry is not merged
  std::vector<PreStep> pre_steps;
  std::string pre_name;
  std::vector<AddedToken> added;  // longest first, so the first match at a position is longest
  std::array<std::vector<std::uint32_t>, 256> added_by_byte;  // first byte -> indices into added
  std::optional<std::int64_t> bos, eos, pad, unk;
  bool add_bos = false;
  bool add_eos = false;
  std::optional<std::string> chat_template;

  // SentencePiece models (from_vocabulary(SpmVocabulary), from_sentencepiece_file).
  bool sentencepiece = false;
  std::vector<float> scores;                                 // id -> score (merge priority)
  bool add_dummy_prefix = true;                              // "▁" before each run of text
  std::vector<std::string> user_defined;                     // user-defined pieces, longest first
  std::array<std::vector<std::uint32_t>, 256> user_by_byte;  // first byte -> into user_defined
#if KVCACHE_HAVE_SENTENCEPIECE
  // Set by from_sentencepiece_file: the library encodes (thread-safe: Encode is const).
  std::shared_ptr<const sentencepiece::SentencePieceProcessor> library;
#endif

  void check_id(std::int64_t id, const char* where) const {
    KVCACHE_CHECK(id >= 0 && id < static_cast<std::int64_t>(tokens.size()), where,
                  ": expected a token id in [0, ", tokens.size(), "), got ", id);
  }

  static std::uint64_t pair_key(std::int64_t left, std::int64_t right) {
    return (static_cast<std::uint64_t>(left) << 32) | static_cast<std::uint64_t>(right);
  }

  struct Segment {
    std::string_view text;
    std::int64_t id = -1;  // >= 0: an added token
  };
  // Appends the text runs of `text` and the added tokens in it, in order (leftmost match, longest
  // first). Pass 1 matches added tokens with normalized == false, pass 2 the others in what pass 1
  // left, as the tokenizers library does.
  void split_added(std::string_view text, bool parse_special, bool normalized_pass,
                   std::vector<Segment>& out) const {
    std::size_t pos = 0, text_begin = 0;
    while (pos < text.size()) {
      const AddedToken* found = nullptr;
      for (const std::uint32_t k : added_by_byte[static_cast<unsigned char>(text[pos])]) {
        const AddedToken& a = added[k];
        if (a.normalized != normalized_pass || (a.special && !parse_special)) continue;
        if (text.compare(pos, a.text.size(), a.text) == 0) {
          found = &a;
          break;
        }
      }
      if (found == nullptr) {
        pos += next_code_point(text, pos).second;
        continue;
      }
      std::size_t begin = pos, end = pos + found->text.size();
      if (found->lstrip) {
        std::size_t b = text_begin;  // the last non-space character before the match ends here
        for (std::size_t i = text_begin; i < begin;) {
          const auto [cp, len] = next_code_point(text, i);
          i += len;
          if (!is_white_space(cp)) b = i;
        }
        begin = b;
      }
      if (found->rstrip) {
        while (end < text.size()) {
          const auto [cp, len] = next_code_point(text, end);
          if (!is_white_space(cp)) break;
          end += len;
        }
      }
      if (begin > text_begin) out.push_back({text.substr(text_begin, begin - text_begin)});
      out.push_back({{}, found->id});
      pos = text_begin = end;
    }
    if (text_begin < text.size()) out.push_back({text.substr(text_begin)});
  }

  // Splits `text` by the pre-tokenizer steps into `pieces`.
  void pre_tokenize(std::string_view text, std::vector<std::string>& pieces) const {
    pieces.assign(1, std::string(text));
    std::vector<std::string> next;
    std::vector<std::pair<std::size_t, std::size_t>> matches;
    for (const PreStep& step : pre_steps) {
      next.clear();
      for (std::string& piece : pieces) {
        if (step.kind == PreStep::Kind::kPrefixSpace) {
          if (piece.empty() || piece[0] != ' ') piece.insert(piece.begin(), ' ');
          next.push_back(std::move(piece));
          continue;
        }
        step.regex->find_all(piece, matches);
        std::size_t last = 0;
        for (const auto& [begin, end] : matches) {
          if (begin > last) next.push_back(piece.substr(last, begin - last));
          if (step.kind == PreStep::Kind::kIsolate)
            next.push_back(piece.substr(begin, end - begin));
          last = end;
        }
        if (last < piece.size()) next.push_back(piece.substr(last));
      }
      pieces.swap(next);
    }
  }

  // Byte-pair encodes one pre-token and appends its ids.
  void bpe(std::string_view piece, std::vector<std::int64_t>& out) const {
    if (piece.empty()) return;
    if (ignore_merges) {
      std::string mapped;
      for (unsigned char b : piece) mapped += byte_alphabet().utf8[b];
      if (auto it = ids.find(mapped); it != ids.end()) {
        out.push_back(it->second);
        return;
      }
    }
    struct Symbol {
      std::int64_t id;
      std::int64_t prev, next;  // neighbours in the list, -1 at the ends
      bool alive;
    };
    std::vector<Symbol> symbols;
    symbols.reserve(piece.size());
    for (unsigned char b : piece) {
      std::int64_t id = byte_ids[b];
      if (id < 0 && byte_fallback) id = byte_fallback_ids[b];
      if (id < 0) {
        if (!model_unk) continue;  // no token for this byte and no unknown token: dropped, as in HF
        if (fuse_unk && !symbols.empty() && symbols.back().id == *model_unk) continue;
        id = *model_unk;
      }
      symbols.push_back({id, -1, -1, true});
    }
    const auto n = static_cast<std::int64_t>(symbols.size());
    for (std::int64_t i = 0; i < n; ++i) {
      symbols[static_cast<std::size_t>(i)].prev = i - 1;
      symbols[static_cast<std::size_t>(i)].next = i + 1 < n ? i + 1 : -1;
    }
    struct Candidate {
      std::int32_t rank;
      std::int64_t pos;  // left symbol
      std::int64_t id;   // merged token
      bool operator>(const Candidate& o) const {
        return rank != o.rank ? rank > o.rank : pos > o.pos;
      }
    };
    std::priority_queue<Candidate, std::vector<Candidate>, std::greater<>> queue;
    auto push_pair = [&](std::int64_t left) {
      if (left < 0) return;
      const std::int64_t right = symbols[static_cast<std::size_t>(left)].next;
      if (right < 0) return;
      const auto it = merges.find(pair_key(symbols[static_cast<std::size_t>(left)].id,
                                           symbols[static_cast<std::size_t>(right)].id));
      if (it != merges.end()) queue.push({it->second.rank, left, it->second.id});
    };
    for (std::int64_t i = 0; i + 1 < n; ++i) push_pair(i);
    while (!queue.empty()) {
      const Candidate top = queue.top();
      queue.pop();
      Symbol& left = symbols[static_cast<std::size_t>(top.pos)];
      if (!left.alive || left.next < 0) continue;
      Symbol& right = symbols[static_cast<std::size_t>(left.next)];
      // Stale when either side changed since the candidate was queued.
      const auto it = merges.find(pair_key(left.id, right.id));
      if (it == merges.end() || it->second.id != top.id) continue;
      left.id = top.id;
      right.alive = false;
      left.next = right.next;
      if (right.next >= 0) symbols[static_cast<std::size_t>(right.next)].prev = top.pos;
      push_pair(left.prev);
      push_pair(top.pos);
    }
    for (const Symbol& s : symbols)
      if (s.alive) out.push_back(s.id);
  }

  // Fills bytes, ids, byte tables and added tokens from tokens and types.
  void index(const std::vector<bool>& normalized) {
    const ByteAlphabet& alphabet = byte_alphabet();
    ids.clear();
    bytes.assign(tokens.size(), {});
    added.clear();
    user_defined.clear();
    for (std::size_t i = 0; i < tokens.size(); ++i) {
      const auto id = static_cast<std::int64_t>(i);
      ids[tokens[i]] = id;
      const TokenType type = types[i];
      if (sentencepiece) {
        index_sentencepiece(i);
        continue;
      }
      if (type == TokenType::kControl || type == TokenType::kUserDefined) {
        bytes[i] = tokens[i];
        if (!tokens[i].empty()) {
          added.push_back({tokens[i], id, type == TokenType::kControl, false, false,
                           !normalized.empty() && normalized[i]});
        }
      } else {
        bytes[i] = byte_level_decode(tokens[i]);
      }
    }
    std::stable_sort(added.begin(), added.end(), [](const AddedToken& a, const AddedToken& b) {
      return a.text.size() > b.text.size();
    });
    for (auto& list : added_by_byte) list.clear();
    for (std::size_t k = 0; k < added.size(); ++k)
      added_by_byte[static_cast<unsigned char>(added[k].text[0])].push_back(
          static_cast<std::uint32_t>(k));
    std::stable_sort(
        user_defined.begin(), user_defined.end(),
        [](const std::string& a, const std::string& b) { return a.size() > b.size(); });
    for (auto& list : user_by_byte) list.clear();
    for (std::size_t k = 0; k < user_defined.size(); ++k)
      user_by_byte[static_cast<unsigned char>(user_defined[k][0])].push_back(
          static_cast<std::uint32_t>(k));
    byte_ids.fill(-1);
    byte_fallback_ids.fill(-1);
    for (int b = 0; b < 256; ++b) {
      if (auto it = ids.find(alphabet.utf8[static_cast<std::size_t>(b)]); it != ids.end())
        byte_ids[static_cast<std::size_t>(b)] = it->second;
      char name[8];
      std::snprintf(name, sizeof(name), "<0x%02X>", b);
      if (auto it = ids.find(std::string_view(name)); it != ids.end())
        byte_fallback_ids[static_cast<std::size_t>(b)] = it->second;
    }
  }

  // Ranks the merges ("left right", by rank); a later duplicate takes the later rank, as the
  // tokenizers library's HashMap does.
  void add_merges(const std::vector<std::pair<std::string, std::string>>& pairs) {
    merges.clear();
    merges.reserve(pairs.size());
    for (std::size_t rank = 0; rank < pairs.size(); ++rank) {
      const auto& [a, b] = pairs[rank];
      const auto left = ids.find(a), right = ids.find(b), merged = ids.find(a + b);
      KVCACHE_CHECK(left != ids.end() && right != ids.end() && merged != ids.end(), "merge ", rank,
                    " (\"", detail::show_text(a + " " + b),
                    "\"): expected both halves and their concatenation in the vocabulary, got \"",
                    detail::show_text(left == ids.end()    ? a
                                      : right == ids.end() ? b
                                                           : a + b),
                    "\" missing");
      merges[pair_key(left->second, right->second)] = {static_cast<std::int32_t>(rank),
                                                       merged->second};
    }
  }

  // --- SentencePiece ------------------------------------------------------------------------

  // What index() records for token i of a SentencePiece vocabulary: control tokens are matched
  // whole (with parse_special) and decode to their text; user-defined pieces are matched whole
  // inside the text; byte tokens decode to their byte, the unknown token to sentencepiece's
  // " ⁇ ", every other piece to its text with "▁" turned back into spaces.
  void index_sentencepiece(std::size_t i) {
    const std::string& t = tokens[i];
    const auto id = static_cast<std::int64_t>(i);
    switch (types[i]) {
      case TokenType::kControl:
        bytes[i] = t;
        if (!t.empty()) added.push_back({t, id, true, false, false, false});
        return;
      case TokenType::kUnknown:
        bytes[i] = " \xE2\x81\x87 ";  // " ⁇ "
        return;
      case TokenType::kByte:
        if (const int b = byte_token_value(t); b >= 0)
          bytes[i] = std::string(1, static_cast<char>(b));
        return;  // a badly named byte token is an error in finish_sentencepiece()
      case TokenType::kUserDefined:
        if (!t.empty()) user_defined.push_back(t);
        break;
      default:
        break;
    }
    bytes[i] = meta_to_spaces(t);
  }

  static std::string meta_to_spaces(std::string_view piece) {
    std::string out;
    for (std::size_t k = 0; k < piece.size();) {
      if (piece.compare(k, kMeta.size(), kMeta) == 0) {
        out += ' ';
        k += kMeta.size();
      } else {
        out += piece[k++];
      }
    }
    return out;
  }

  // 0..255 for a byte token's name "<0xNN>", -1 for anything else.
  static int byte_token_value(std::string_view t) {
    if (t.size() != 6 || t.substr(0, 3) != "<0x" || t[5] != '>') return -1;
    int value = 0;
    for (const char c : t.substr(3, 2)) {
      const int digit = c >= '0' && c <= '9'   ? c - '0'
                        : c >= 'A' && c <= 'F' ? c - 'A' + 10
                        : c >= 'a' && c <= 'f' ? c - 'a' + 10
                                               : -1;
      if (digit < 0) return -1;
      value = value * 16 + digit;
    }
    return value;
  }

  // The id of a piece that merges may produce (sentencepiece's pieces: normal, user-defined and
  // unused ones), or -1.
  std::int64_t mergeable_id(std::string_view piece) const {
    const auto it = ids.find(piece);
    if (it == ids.end()) return -1;
    const TokenType type = types[static_cast<std::size_t>(it->second)];
    return type == TokenType::kNormal || type == TokenType::kUserDefined ||
                   type == TokenType::kUnused
               ? it->second
               : -1;
  }

  // SentencePiece BPE of one run of text (no control tokens in it): normalize (the dummy prefix,
  // spaces as "▁"), split into user-defined pieces and characters, merge the best pair until no
  // pair is a piece, then look each symbol up (byte fallback or the unknown token when absent).
  void spm_encode(std::string_view text, std::vector<std::int64_t>& out) const {
    if (text.empty()) return;
    std::string normalized;
    normalized.reserve(text.size() + text.size() / 2 + kMeta.size());
    if (add_dummy_prefix) normalized += kMeta;
    for (const char c : text) {
      if (c == ' ')
        normalized += kMeta;
      else
        normalized += c;
    }

    struct Symbol {
      std::size_t begin, size;  // bytes of `normalized`; size 0 once merged into its left
      std::int64_t prev, next;  // neighbours, -1 at the ends
      bool frozen;              // a user-defined piece: never merged
    };
    std::vector<Symbol> symbols;
    for (std::size_t pos = 0; pos < normalized.size();) {
      std::size_t size = 0;
      bool frozen = false;
      for (const std::uint32_t k : user_by_byte[static_cast<unsigned char>(normalized[pos])]) {
        if (normalized.compare(pos, user_defined[k].size(), user_defined[k]) == 0) {
          size = user_defined[k].size();
          frozen = true;
          break;
        }
      }
      if (!frozen) size = next_code_point(normalized, pos).second;
      const auto index = static_cast<std::int64_t>(symbols.size());
      symbols.push_back({pos, size, index - 1, -1, frozen});
      if (index > 0) symbols[static_cast<std::size_t>(index - 1)].next = index;
      pos += size;
    }

    struct Pair {
      float score;
      std::int64_t left, right;
      std::size_t size;  // bytes of the merged piece, to spot a pair whose sides changed
    };
    // Highest score first; among equal scores the leftmost, as sentencepiece orders its agenda.
    const auto lower = [](const Pair& a, const Pair& b) {
      return a.score != b.score ? a.score < b.score : a.left > b.left;
    };
    std::priority_queue<Pair, std::vector<Pair>, decltype(lower)> agenda(lower);
    // A merge into an unused piece is made, then undone at the end (sentencepiece's resegment).
    std::unordered_map<std::string_view, std::pair<std::string_view, std::string_view>> unmerge;
    const auto view = [&](const Symbol& s) {
      return std::string_view(normalized).substr(s.begin, s.size);
    };
    const auto push_pair = [&](std::int64_t left, std::int64_t right) {
      if (left < 0 || right < 0) return;
      const Symbol& l = symbols[static_cast<std::size_t>(left)];
      const Symbol& r = symbols[static_cast<std::size_t>(right)];
      if (l.frozen || r.frozen) return;
      const std::string_view piece = std::string_view(normalized).substr(l.begin, l.size + r.size);
      const std::int64_t id = mergeable_id(piece);
      if (id < 0) return;
      agenda.push({scores[static_cast<std::size_t>(id)], left, right, piece.size()});
      if (types[static_cast<std::size_t>(id)] == TokenType::kUnused)
        unmerge[piece] = {view(l), view(r)};
    };
    for (std::size_t i = 1; i < symbols.size(); ++i)
      push_pair(static_cast<std::int64_t>(i) - 1, static_cast<std::int64_t>(i));
    while (!agenda.empty()) {
      const Pair top = agenda.top();
      agenda.pop();
      Symbol& left = symbols[static_cast<std::size_t>(top.left)];
      Symbol& right = symbols[static_cast<std::size_t>(top.right)];
      if (left.size == 0 || right.size == 0 || left.next != top.right ||
          left.size + right.size != top.size)
        continue;  // stale: a side was merged into something else since it was queued
      left.size += right.size;
      left.next = right.next;
      if (right.next >= 0) symbols[static_cast<std::size_t>(right.next)].prev = top.left;
      right.size = 0;
      push_pair(left.prev, top.left);
      push_pair(top.left, left.next);
    }

    const std::function<void(std::string_view)> emit = [&](std::string_view piece) {
      if (const auto it = ids.find(piece); it != ids.end()) {
        if (types[static_cast<std::size_t>(it->second)] == TokenType::kUnused) {
          if (const auto u = unmerge.find(piece); u != unmerge.end()) {
            emit(u->second.first);
            emit(u->second.second);
            return;
          }
        }
        out.push_back(it->second);
      } else if (byte_fallback) {
        for (const unsigned char b : piece) out.push_back(byte_fallback_ids[b]);
      } else {
        out.push_back(*unk);
      }
    };
    for (std::int64_t i = symbols.empty() ? -1 : 0; i >= 0;
         i = symbols[static_cast<std::size_t>(i)].next)
      emit(view(symbols[static_cast<std::size_t>(i)]));
  }

  // Appends what token i decodes to. SentencePiece drops the dummy prefix's space from the first
  // piece that is not a control token (not from a byte or the unknown token, as sentencepiece).
  void append_decoded(std::size_t i, bool skip_special, bool& at_start, std::string& out) const {
    const TokenType type = types[i];
    if (type == TokenType::kControl) {
      if (!skip_special) out += bytes[i];
      return;
    }
    std::string_view b = bytes[i];
    if (sentencepiece && at_start) {
      at_start = false;
      if (add_dummy_prefix && type != TokenType::kByte && type != TokenType::kUnknown &&
          !b.empty() && b[0] == ' ')
        b.remove_prefix(1);
    }
    out += b;
  }

  // Byte tokens, the unknown token and the rest of what a SentencePiece vocabulary must hold,
  // checked once index() has run. `unk_id` is the metadata's unknown token id, if any.
  void finish_sentencepiece(std::optional<std::int64_t> unk_id) {
    byte_fallback_ids.fill(-1);
    byte_ids.fill(-1);
    std::size_t byte_tokens = 0;
    for (std::size_t i = 0; i < tokens.size(); ++i) {
      if (types[i] != TokenType::kByte) continue;
      const int b = byte_token_value(tokens[i]);
      KVCACHE_CHECK(b >= 0, "tokenizer: token ", i,
                    " has type byte: expected a name <0x00>..<0xFF>, got \"",
                    detail::show_text(tokens[i]), "\"");
      auto& slot = byte_fallback_ids[static_cast<std::size_t>(b)];
      KVCACHE_CHECK(slot < 0, "tokenizer: expected one token per byte, got tokens ", slot, " and ",
                    i, " for \"", tokens[i], "\"");
      slot = static_cast<std::int64_t>(i);
      ++byte_tokens;
    }
    if (byte_tokens > 0) {
      for (int b = 0; b < 256; ++b) {
        char name[8];
        std::snprintf(name, sizeof(name), "<0x%02X>", b);
        KVCACHE_CHECK(byte_fallback_ids[static_cast<std::size_t>(b)] >= 0,
                      "tokenizer: byte fallback expects all 256 byte tokens <0x00>..<0xFF>, got ",
                      byte_tokens, " (no ", name, ")");
      }
      byte_fallback = true;
    }
    if (!unk_id) {
      for (std::size_t i = 0; i < tokens.size() && !unk_id; ++i)
        if (types[i] == TokenType::kUnknown) unk_id = static_cast<std::int64_t>(i);
    }
    KVCACHE_CHECK(unk_id.has_value(),
                  "tokenizer: expected an unknown token (tokenizer.ggml.unknown_token_id or a "
                  "token of type unknown), got none");
    unk = unk_id;
    pre_name = "sentencepiece";
  }

  void check_special_ids() const {
    for (const auto& [name, id] : {std::pair{"bos", bos}, std::pair{"eos", eos},
                                   std::pair{"pad", pad}, std::pair{"unknown", unk}}) {
      if (id) {
        KVCACHE_CHECK(*id >= 0 && *id < static_cast<std::int64_t>(tokens.size()), name,
                      " token id: expected one in [0, ", tokens.size(), "), got ", *id);
      }
    }
  }
};

namespace {

std::vector<std::pair<std::string, std::string>> split_merges(
    const std::vector<std::string>& merges) {
  std::vector<std::pair<std::string, std::string>> pairs;
  pairs.reserve(merges.size());
  for (std::size_t i = 0; i < merges.size(); ++i) {
    const std::string& m = merges[i];
    // A space at position 0 would belong to the left token (llama.cpp splits the same way).
    const std::size_t space = m.find(' ', 1);
    KVCACHE_CHECK(space != std::string::npos, "merge ", i,
                  ": expected two tokens separated by a space, got \"", detail::show_text(m), "\"");
    pairs.emplace_back(m.substr(0, space), m.substr(space + 1));
  }
  return pairs;
}

std::vector<PreStep> gguf_pre_steps(const std::string& pre, bool& ignore_merges) {
  ignore_merges = false;
  if (pre == "smollm") return {isolate(R"(\p{N})"), isolate(kGpt2Pattern)};
  if (pre == "gpt2" || pre == "default") return {isolate(kGpt2Pattern)};
  if (pre == "llama-bpe") {
    ignore_merges = true;
    return {isolate(kLlama3Pattern)};
  }
  KVCACHE_FAIL(
      "tokenizer.ggml.pre: expected one of \"smollm\", \"gpt2\", \"default\", "
      "\"llama-bpe\", got \"",
      detail::show_text(pre), "\"");
}

}  // namespace

Tokenizer::Tokenizer(std::shared_ptr<const Impl> impl) : impl_(std::move(impl)) {}

Tokenizer Tokenizer::from_vocabulary(const BpeVocabulary& v) {
  return detail::out_of_memory_as_error("Tokenizer::from_vocabulary", [&]() -> Tokenizer {
    auto impl = std::make_shared<Impl>();
    KVCACHE_CHECK(!v.tokens.empty(), "tokenizer: expected a vocabulary, got no tokens");
    KVCACHE_CHECK(v.token_types.empty() || v.token_types.size() == v.tokens.size(),
                  "tokenizer: expected one token type per token (", v.tokens.size(), "), got ",
                  v.token_types.size());
    impl->tokens = v.tokens;
    impl->types.assign(v.tokens.size(), TokenType::kNormal);
    for (std::size_t i = 0; i < v.token_types.size(); ++i) {
      const std::int32_t t = v.token_types[i];
      KVCACHE_CHECK(t >= 1 && t <= 6, "tokenizer: token ", i, " (\"",
                    detail::show_text(v.tokens[i]), "\"): expected a token type in 1..6, got ", t);
      impl->types[i] = static_cast<TokenType>(t);
    }
    impl->index({});
    impl->add_merges(split_merges(v.merges));
    impl->pre_steps = gguf_pre_steps(v.pre, impl->ignore_merges);
    impl->pre_name = v.pre;
    impl->bos = v.bos_token_id;
    impl->eos = v.eos_token_id;
    impl->pad = v.pad_token_id;
    impl->unk = v.unk_token_id;
    impl->check_special_ids();
    impl->add_bos = v.add_bos_token;
    impl->chat_template = v.chat_template;
    return Tokenizer(std::move(impl));
  });
}

namespace {

// Elements of a GGUF array value, before any of it is read (so sizes can be compared before
// allocating); nullopt when the key is absent or not an array (the typed read reports that).
std::optional<std::size_t> gguf_array_size(const GgufFile& file, const std::string& key) {
  const GgufValue* value = file.find(key);
  if (value == nullptr || value->type != GgufValue::Type::kArray) return std::nullopt;
  return value->array.size();
}

// The SentencePiece half of from_gguf (tokenizer.ggml.model "llama").
SpmVocabulary gguf_spm_vocabulary(const GgufFile& file) {
  const std::optional<std::size_t> n = gguf_array_size(file, "tokenizer.ggml.tokens");
  KVCACHE_CHECK(n.has_value() || file.find("tokenizer.ggml.tokens") != nullptr,
                "tokenizer.ggml.tokens: expected the vocabulary, got no such key");
  const std::optional<std::size_t> scores = gguf_array_size(file, "tokenizer.ggml.scores");
  const std::optional<std::size_t> types = gguf_array_size(file, "tokenizer.ggml.token_type");
  if (n) {
    KVCACHE_CHECK(scores.has_value() || file.find("tokenizer.ggml.scores") != nullptr,
                  "tokenizer.ggml.scores: expected one score per token (", *n,
                  "), got no such key");
    KVCACHE_CHECK(!scores || *scores == *n, "tokenizer.ggml.scores: expected one score per token (",
                  *n, "), got ", *scores);
    KVCACHE_CHECK(!types || *types == *n,
                  "tokenizer.ggml.token_type: expected one type per token (", *n, "), got ",
                  *types);
  }
  SpmVocabulary v;
  v.tokens = file.get_string_array("tokenizer.ggml.tokens");
  const GgufValue* s = file.find("tokenizer.ggml.scores");
  KVCACHE_CHECK(s != nullptr && s->type == GgufValue::Type::kArray &&
                    (s->array_type == GgufValue::Type::kFloat32 ||
                     s->array_type == GgufValue::Type::kFloat64),
                "tokenizer.ggml.scores: expected an array of float32, got value type ",
                s == nullptr ? -1 : static_cast<int>(s->type),
                s != nullptr && s->type == GgufValue::Type::kArray
                    ? " of element type " + std::to_string(static_cast<int>(s->array_type))
                    : std::string());
  v.scores.reserve(s->array.size());
  for (std::size_t i = 0; i < s->array.size(); ++i)
    v.scores.push_back(static_cast<float>(s->array[i].f));
  for (std::int64_t t : file.get_int_array("tokenizer.ggml.token_type"))
    v.token_types.push_back(static_cast<std::int32_t>(std::clamp<std::int64_t>(t, -1, 1000)));
  v.bos_token_id = file.get_int("tokenizer.ggml.bos_token_id");
  v.eos_token_id = file.get_int("tokenizer.ggml.eos_token_id");
  v.pad_token_id = file.get_int("tokenizer.ggml.padding_token_id");
  v.unk_token_id = file.get_int("tokenizer.ggml.unknown_token_id");
  v.add_bos_token = file.get_bool("tokenizer.ggml.add_bos_token").value_or(true);
  v.add_eos_token = file.get_bool("tokenizer.ggml.add_eos_token").value_or(false);
  v.add_dummy_prefix = file.get_bool("tokenizer.ggml.add_space_prefix").value_or(true);
  v.chat_template = file.get_string("tokenizer.chat_template");
  return v;
}

}  // namespace

Tokenizer Tokenizer::from_vocabulary(const SpmVocabulary& v) {
  return detail::out_of_memory_as_error("Tokenizer::from_vocabulary", [&]() -> Tokenizer {
    auto impl = std::make_shared<Impl>();
    impl->sentencepiece = true;
    const std::size_t n = v.tokens.size();
    KVCACHE_CHECK(n > 0, "tokenizer: expected a vocabulary, got no tokens");
    KVCACHE_CHECK(v.scores.size() == n, "tokenizer: expected one score per token (", n, "), got ",
                  v.scores.size());
    KVCACHE_CHECK(v.token_types.empty() || v.token_types.size() == n,
                  "tokenizer: expected one token type per token (", n, "), got ",
                  v.token_types.size());
    for (std::size_t i = 0; i < n; ++i) {
      // NaN would break the merge queue's ordering; an infinite score is no ranking either.
      KVCACHE_CHECK(std::isfinite(v.scores[i]), "tokenizer: token ", i, " (\"",
                    detail::show_text(v.tokens[i]), "\"): expected a finite score, got ",
                    v.scores[i]);
    }
    impl->tokens = v.tokens;
    impl->scores = v.scores;
    impl->types.assign(n, TokenType::kNormal);
    for (std::size_t i = 0; i < v.token_types.size(); ++i) {
      const std::int32_t t = v.token_types[i];
      KVCACHE_CHECK(t >= 1 && t <= 6, "tokenizer: token ", i, " (\"",
                    detail::show_text(v.tokens[i]), "\"): expected a token type in 1..6, got ", t);
      impl->types[i] = static_cast<TokenType>(t);
    }
    impl->add_dummy_prefix = v.add_dummy_prefix;
    impl->index({});
    impl->bos = v.bos_token_id;
    impl->eos = v.eos_token_id;
    impl->pad = v.pad_token_id;
    impl->unk = v.unk_token_id;
    impl->check_special_ids();  // before the unknown token id is used to index anything
    impl->finish_sentencepiece(v.unk_token_id);
    impl->add_bos = v.add_bos_token;
    impl->add_eos = v.add_eos_token;
    impl->chat_template = v.chat_template;
    return Tokenizer(std::move(impl));
  });
}

Tokenizer Tokenizer::from_gguf(const GgufFile& file) {
  return detail::out_of_memory_as_error("Tokenizer::from_gguf", [&]() -> Tokenizer {
    try {
      const std::optional<std::string> model = file.get_string("tokenizer.ggml.model");
      KVCACHE_CHECK(model.has_value(),
                    "tokenizer.ggml.model: expected \"gpt2\" or \"llama\", got no such key");
      if (*model == "llama") return from_vocabulary(gguf_spm_vocabulary(file));
      KVCACHE_CHECK(*model == "gpt2",
                    "tokenizer.ggml.model: expected \"gpt2\" (byte-level BPE) or \"llama\" "
                    "(SentencePiece), got \"",
                    detail::show_text(*model), "\"");
      BpeVocabulary v;
      v.tokens = file.get_string_array("tokenizer.ggml.tokens");
      v.merges = file.get_string_array("tokenizer.ggml.merges");
      for (std::int64_t t : file.get_int_array("tokenizer.ggml.token_type"))
        v.token_types.push_back(static_cast<std::int32_t>(std::clamp<std::int64_t>(t, -1, 1000)));
      v.pre = file.get_string("tokenizer.ggml.pre").value_or("default");
      v.bos_token_id = file.get_int("tokenizer.ggml.bos_token_id");
      v.eos_token_id = file.get_int("tokenizer.ggml.eos_token_id");
      v.pad_token_id = file.get_int("tokenizer.ggml.padding_token_id");
      v.unk_token_id = file.get_int("tokenizer.ggml.unknown_token_id");
      v.add_bos_token = file.get_bool("tokenizer.ggml.add_bos_token").value_or(false);
      v.chat_template = file.get_string("tokenizer.chat_template");
      KVCACHE_CHECK(!v.merges.empty(), "tokenizer.ggml.merges: expected BPE merges, got none");
      return from_vocabulary(v);
    } catch (const Error& e) {
      throw Error(file.path() + ": " + e.what());
    } catch (const std::bad_alloc&) {
      KVCACHE_FAIL(file.path(), ": out of memory building the vocabulary");
    }
  });
}

namespace {

using nlohmann::json;

// Appends the steps of one tokenizer.json pre_tokenizer; `byte_level` is set by ByteLevel, which
// must come last (it maps the text to the byte alphabet for everything after it).
void json_pre_steps(const json& p, std::vector<PreStep>& steps, std::string& name,
                    bool& byte_level) {
  KVCACHE_CHECK(p.is_object() && p.contains("type"),
                "pre_tokenizer: expected an object with a type, got ", detail::show_json(p));
  const std::string type = p["type"].get<std::string>();
  KVCACHE_CHECK(!byte_level, "pre_tokenizer: expected ByteLevel last, got ", type, " after it");
  if (type == "Sequence") {
    for (const json& q : p.at("pretokenizers")) json_pre_steps(q, steps, name, byte_level);
    return;
  }
  name += name.empty() ? type : ", " + type;
  if (type == "ByteLevel") {
    byte_level = true;
    if (p.value("add_prefix_space", false)) steps.push_back({PreStep::Kind::kPrefixSpace, {}});
    if (p.value("use_regex", true)) steps.push_back(isolate(kGpt2Pattern));
  } else if (type == "Digits") {
    steps.push_back(isolate(p.value("individual_digits", false) ? R"(\p{N})" : R"(\p{N}+)"));
  } else if (type == "Split") {
    const json& pattern = p.at("pattern");
    const std::string behavior = p.value("behavior", std::string("Isolated"));
    KVCACHE_CHECK(!p.value("invert", false),
                  "pre_tokenizer Split: expected invert false, got true");
    KVCACHE_CHECK(behavior == "Isolated" || behavior == "Removed",
                  "pre_tokenizer Split: expected behavior Isolated or Removed, got ", behavior);
    const bool literal = pattern.contains("String");
    const std::string text = pattern.at(literal ? "String" : "Regex").get<std::string>();
    steps.push_back({behavior == "Isolated" ? PreStep::Kind::kIsolate : PreStep::Kind::kRemove,
                     std::make_shared<const Regex>(text, literal)});
  } else {
    KVCACHE_FAIL("pre_tokenizer: expected ByteLevel, Digits, Split or a Sequence of them, got ",
                 detail::show_text(type));
  }
}

// A special token of tokenizer_config.json: a string or {"content": ...}.
std::optional<std::string> config_token(const json& config, const char* key) {
  if (!config.contains(key) || config[key].is_null()) return std::nullopt;
  const json& t = config[key];
  if (t.is_string()) return t.get<std::string>();
  if (t.is_object() && t.contains("content")) return t["content"].get<std::string>();
  KVCACHE_FAIL("tokenizer_config.json ", key, ": expected a string or {\"content\": ...}, got ",
               detail::show_json(t));
}

// The member `key` of `object`, or `fallback` when it has none. Unlike json::value(key, default),
// which returns a copy, this copies nothing: a copy of a non-empty array or object allocates when
// it is destroyed, in a noexcept destructor (see detail::release_json).
const json& member_or(const json& object, const char* key, const json& fallback) {
  const auto it = object.find(key);
  return it == object.end() ? fallback : *it;
}
const json kNoJson;                          // null: a member that is absent
const json kEmptyJsonArray = json::array();  // a list that is absent

// The file must be regular (a FIFO would block) and its JSON nested at most
// detail::kMaxJsonDepth levels (every walk of the value recurses).
json read_json(const std::string& path) {
  return detail::parse_json(detail::read_regular_file(path, "tokenizer"), path);
}

}  // namespace

Tokenizer Tokenizer::from_json_file(const std::string& path) {
  return detail::out_of_memory_as_error("Tokenizer::from_json_file", [&]() -> Tokenizer {
    json root = read_json(path);
    const detail::ReleaseJsonAtExit release_root(root);  // its destructor must not allocate
    try {
      auto impl = std::make_shared<Impl>();
      const json& model = root.at("model");
      const std::string type = model.value("type", std::string("BPE"));
      KVCACHE_CHECK(type == "BPE", "model.type: expected BPE, got ", type);
      KVCACHE_CHECK(!model.contains("dropout") || model["dropout"].is_null() ||
                        model["dropout"].get<double>() == 0.0,
                    "model.dropout: expected none, got ", detail::show_json(model["dropout"]));
      for (const char* key : {"continuing_subword_prefix", "end_of_word_suffix"}) {
        KVCACHE_CHECK(!model.contains(key) || model[key].is_null() || model[key] == "", "model.",
                      key, ": expected none, got ", detail::show_json(model[key]));
      }
      const json& normalizer = member_or(root, "normalizer", kNoJson);
      KVCACHE_CHECK(normalizer.is_null() || (normalizer.value("type", "") == "Sequence" &&
                                             member_or(normalizer, "normalizers", kNoJson).empty()),
                    "normalizer: expected none, got ", detail::show_json(normalizer));

      // Vocabulary: model.vocab plus added_tokens (which may add ids past it). Every id must be one
      // of 0 .. entries - 1 (the ids are dense, each entry one id), checked before any table is
      // sized by them: a negative id, 2^63 - 1 or 10^12 is an error, not a write out of bounds or
      // an allocation of terabytes.
      const json& vocab = model.at("vocab");
      KVCACHE_CHECK(vocab.is_object(), "model.vocab: expected an object of token: id, got ",
                    detail::show_json(vocab));
      const json& added = member_or(root, "added_tokens", kEmptyJsonArray);
      KVCACHE_CHECK(added.is_array(), "added_tokens: expected a list, got ",
                    detail::show_json(added));
      const auto entries = static_cast<std::int64_t>(vocab.size() + added.size());
      const auto checked_id = [&](const json& id, const std::string& token, const char* where) {
        KVCACHE_CHECK(id.is_number_integer() &&
                          (id.is_number_unsigned()
                               ? id.get<std::uint64_t>() < static_cast<std::uint64_t>(entries)
                               : id.get<std::int64_t>() >= 0 && id.get<std::int64_t>() < entries),
                      where, " \"", detail::show_text(token), "\": expected an id in [0, ", entries,
                      ") (the vocabulary and added tokens hold ", entries, " entries), got ",
                      detail::show_json(id));
        return id.get<std::int64_t>();
      };
      std::int64_t size = 0;
      for (const auto& [token, id] : vocab.items())
        size = std::max(size, checked_id(id, token, "model.vocab") + 1);
      for (const json& a : added) {
        KVCACHE_CHECK(a.is_object(), "added_tokens: expected objects, got ", detail::show_json(a));
        size = std::max(
            size, checked_id(a.at("id"), a.value("content", std::string()), "added_tokens") + 1);
      }
      KVCACHE_CHECK(size > 0, "model.vocab: expected tokens, got none");
      std::vector<bool> present(static_cast<std::size_t>(size), false), normalized(present);
      impl->tokens.assign(static_cast<std::size_t>(size), {});
      impl->types.assign(static_cast<std::size_t>(size), TokenType::kNormal);
      for (const auto& [token, id] : vocab.items()) {
        const auto i = static_cast<std::size_t>(id.get<std::int64_t>());
        impl->tokens[i] = token;
        present[i] = true;
      }
      struct Strip {
        bool lstrip, rstrip;
      };
      std::unordered_map<std::int64_t, Strip> strips;
      for (const json& a : added) {
        const std::int64_t id = a.at("id").get<std::int64_t>();
        KVCACHE_CHECK(id >= 0, "added_tokens: expected ids >= 0, got ", id);
        const std::string content = a.at("content").get<std::string>();
        KVCACHE_CHECK(!a.value("single_word", false), "added_tokens: \"",
                      detail::show_text(content), "\": single_word tokens are not served");
        const auto i = static_cast<std::size_t>(id);
        impl->tokens[i] = content;
        present[i] = true;
        impl->types[i] = a.value("special", false) ? TokenType::kControl : TokenType::kUserDefined;
        normalized[i] = a.value("normalized", !a.value("special", false));
        strips[id] = {a.value("lstrip", false), a.value("rstrip", false)};
      }
      for (std::size_t i = 0; i < present.size(); ++i)
        KVCACHE_CHECK(present[i], "model.vocab: expected ids 0..", size - 1, ", got no token ", i);
      impl->index(normalized);
      for (AddedToken& a : impl->added) {
        if (auto it = strips.find(a.id); it != strips.end()) {
          a.lstrip = it->second.lstrip;
          a.rstrip = it->second.rstrip;
        }
      }

      std::vector<std::pair<std::string, std::string>> pairs;
      std::vector<std::string> strings;
      for (const json& m : member_or(model, "merges", kEmptyJsonArray)) {
        if (m.is_string()) {
          strings.push_back(m.get<std::string>());
        } else {
          KVCACHE_CHECK(m.is_array() && m.size() == 2,
                        "model.merges: expected \"a b\" or [a, b], got ", detail::show_json(m));
          pairs.emplace_back(m[0].get<std::string>(), m[1].get<std::string>());
        }
      }
      if (!strings.empty()) {
        KVCACHE_CHECK(pairs.empty(),
                      "model.merges: expected one form, got strings and pairs mixed");
        pairs = split_merges(strings);
      }
      impl->add_merges(pairs);
      impl->ignore_merges = model.value("ignore_merges", false);
      impl->byte_fallback = model.value("byte_fallback", false);
      impl->fuse_unk = model.value("fuse_unk", false);
      if (model.contains("unk_token") && model["unk_token"].is_string()) {
        const std::string unk = model["unk_token"].get<std::string>();
        const auto it = impl->ids.find(unk);
        KVCACHE_CHECK(it != impl->ids.end(),
                      "model.unk_token: expected a token of the vocabulary, got \"",
                      detail::show_text(unk), "\"");
        impl->unk = it->second;
        // An added (special or user-defined) unknown token is reported by unk_token_id() but never
        // produced from text: encode() drops a byte without a token instead.
        const TokenType unk_type = impl->types[static_cast<std::size_t>(it->second)];
        if (unk_type != TokenType::kControl && unk_type != TokenType::kUserDefined)
          impl->model_unk = it->second;
      }

      bool byte_level = false;
      std::string name;
      KVCACHE_CHECK(root.contains("pre_tokenizer") && !root["pre_tokenizer"].is_null(),
                    "pre_tokenizer: expected ByteLevel (byte-level BPE), got none");
      json_pre_steps(root["pre_tokenizer"], impl->pre_steps, name, byte_level);
      KVCACHE_CHECK(byte_level, "pre_tokenizer: expected a ByteLevel step (byte-level BPE), got ",
                    name);
      impl->pre_name = "tokenizer.json: " + name;
      if (const json& decoder = member_or(root, "decoder", kNoJson); !decoder.is_null()) {
        const std::string d = decoder.dump(-1, ' ', false, json::error_handler_t::replace);
        KVCACHE_CHECK(d.find("\"ByteLevel\"") != std::string::npos,
                      "decoder: expected ByteLevel (alone or in a Sequence), got ",
                      detail::show_json(decoder));
      }

      // tokenizer_config.json beside it: special tokens, add_bos_token, the chat template.
      const auto config_path = std::filesystem::path(path).parent_path() / "tokenizer_config.json";
      if (std::error_code ec; std::filesystem::exists(config_path, ec)) {
        json config = read_json(config_path.string());
        const detail::ReleaseJsonAtExit release_config(config);  // see release_root
        auto id_of = [&](const char* key) -> std::optional<std::int64_t> {
          const std::optional<std::string> token = config_token(config, key);
          if (!token) return std::nullopt;
          const auto it = impl->ids.find(*token);
          KVCACHE_CHECK(it != impl->ids.end(), "tokenizer_config.json ", key,
                        ": expected a token of ", "the vocabulary, got \"",
                        detail::show_text(*token), "\"");
          return it->second;
        };
        impl->bos = id_of("bos_token");
        impl->eos = id_of("eos_token");
        impl->pad = id_of("pad_token");
        if (auto unk = id_of("unk_token")) impl->unk = unk;
        impl->add_bos = config.value("add_bos_token", false);
        impl->add_eos = config.value("add_eos_token", false);
        if (config.contains("chat_template")) {
          const json& t = config["chat_template"];
          if (t.is_string()) {
            impl->chat_template = t.get<std::string>();
          } else if (t.is_array() && !t.empty()) {  // [{"name": ..., "template": ...}, ...]
            impl->chat_template = t[0].at("template").get<std::string>();
            for (const json& named : t)
              if (named.value("name", "") == "default")
                impl->chat_template = named.at("template").get<std::string>();
          }
        }
      }
      impl->check_special_ids();
      return Tokenizer(std::move(impl));
    } catch (const json::exception& e) {
      KVCACHE_FAIL(path, ": unexpected tokenizer.json layout: ", e.what());
    } catch (const Error& e) {
      throw Error(path + ": " + e.what());
    } catch (const std::bad_alloc&) {
      KVCACHE_FAIL(path, ": out of memory building the vocabulary");
    }
  });
}

#if KVCACHE_HAVE_SENTENCEPIECE
namespace {

// The few fields of sentencepiece's ModelProto that libsentencepiece's API does not report (its
// header lacks the protobuf classes): each piece's type (which tells user-defined pieces from
// normal ones) and normalizer_spec.add_dummy_prefix. Protobuf wire format: a key varint
// (field << 3 | wire type), then a varint, 8 bytes, a length and that many bytes, or 4 bytes.
struct ModelProtoFacts {
  std::vector<std::int32_t> types;  // by piece; NORMAL (1) where the field is absent
  bool add_dummy_prefix = true;
};

class ProtoReader {
 public:
  explicit ProtoReader(std::string_view bytes) : p_(bytes.data()), end_(p_ + bytes.size()) {}
  bool done() const { return p_ == end_; }
  bool varint(std::uint64_t& v) {
    v = 0;
    for (int shift = 0; shift < 64 && p_ < end_; shift += 7) {
      const auto b = static_cast<unsigned char>(*p_++);
      v |= static_cast<std::uint64_t>(b & 0x7F) << shift;
      if ((b & 0x80) == 0) return true;
    }
    return false;
  }
  // Reads one field: its number, wire type, varint value or length-delimited bytes.
  bool field(std::uint64_t& number, std::uint64_t& varint_value, std::string_view& bytes) {
    std::uint64_t key = 0;
    if (!varint(key)) return false;
    number = key >> 3;
    switch (key & 7) {
      case 0:
        return varint(varint_value);
      case 1:
        return skip(8);
      case 2: {
        std::uint64_t size = 0;
        if (!varint(size) || size > static_cast<std::uint64_t>(end_ - p_)) return false;
        bytes = std::string_view(p_, static_cast<std::size_t>(size));
        p_ += size;
        return true;
      }
      case 5:
        return skip(4);
      default:
        return false;
    }
  }

 private:
  bool skip(std::size_t n) {
    if (n > static_cast<std::size_t>(end_ - p_)) return false;
    p_ += n;
    return true;
  }
  const char* p_;
  const char* end_;
};

std::optional<ModelProtoFacts> model_proto_facts(std::string_view proto) {
  ModelProtoFacts facts;
  ProtoReader top(proto);
  while (!top.done()) {
    std::uint64_t number = 0, value = 0;
    std::string_view bytes;
    if (!top.field(number, value, bytes)) return std::nullopt;
    if (number == 1) {  // repeated SentencePiece pieces = 1 {piece = 1, score = 2, type = 3}
      std::int32_t type = 1;
      ProtoReader piece(bytes);
      while (!piece.done()) {
        std::uint64_t n = 0, v = 0;
        std::string_view b;
        if (!piece.field(n, v, b)) return std::nullopt;
        if (n == 3) type = static_cast<std::int32_t>(std::min<std::uint64_t>(v, 1000));
      }
      facts.types.push_back(type);
    } else if (number == 3) {  // NormalizerSpec normalizer_spec = 3 {add_dummy_prefix = 3}
      ProtoReader spec(bytes);
      while (!spec.done()) {
        std::uint64_t n = 0, v = 0;
        std::string_view b;
        if (!spec.field(n, v, b)) return std::nullopt;
        if (n == 3) facts.add_dummy_prefix = v != 0;
      }
    }
  }
  return facts;
}

}  // namespace
#endif  // KVCACHE_HAVE_SENTENCEPIECE

Tokenizer Tokenizer::from_sentencepiece_file(const std::string& path) {
  return detail::out_of_memory_as_error("Tokenizer::from_sentencepiece_file", [&]() -> Tokenizer {
#if !KVCACHE_HAVE_SENTENCEPIECE
    KVCACHE_FAIL(path,
                 ": reading a sentencepiece model needs libsentencepiece, and kvcache was built "
                 "without libsentencepiece (install libsentencepiece-dev and configure again), "
                 "or read the model's GGUF file with Tokenizer::from_gguf");
#else
    const std::string proto = detail::read_regular_file(path, "sentencepiece model");
    try {
      auto library = std::make_shared<sentencepiece::SentencePieceProcessor>();
      const auto status = library->LoadFromSerializedProto(proto);
      KVCACHE_CHECK(status.ok(), "expected a sentencepiece model (ModelProto), got one ",
                    "libsentencepiece cannot load: ", status.ToString());
      const std::optional<ModelProtoFacts> facts = model_proto_facts(proto);
      const int n = library->GetPieceSize();
      KVCACHE_CHECK(facts.has_value() && facts->types.size() == static_cast<std::size_t>(n),
                    "expected ", n, " pieces in the ModelProto, got a proto that does not parse");
      SpmVocabulary v;
      v.tokens.reserve(static_cast<std::size_t>(n));
      for (int i = 0; i < n; ++i) {
        v.tokens.push_back(library->IdToPiece(i));
        v.scores.push_back(library->GetScore(i));
        v.token_types.push_back(facts->types[static_cast<std::size_t>(i)]);
      }
      const auto id_or_none = [](int id) {
        return id >= 0 ? std::optional<std::int64_t>(id) : std::nullopt;
      };
      v.unk_token_id = id_or_none(library->unk_id());
      v.bos_token_id = id_or_none(library->bos_id());
      v.eos_token_id = id_or_none(library->eos_id());
      v.pad_token_id = id_or_none(library->pad_id());
      v.add_bos_token = v.bos_token_id.has_value();
      v.add_dummy_prefix = facts->add_dummy_prefix;

      // tokenizer_config.json beside it (transformers' LlamaTokenizer folders).
      const auto config_path = std::filesystem::path(path).parent_path() / "tokenizer_config.json";
      if (std::error_code ec; std::filesystem::exists(config_path, ec)) {
        json config = read_json(config_path.string());
        const detail::ReleaseJsonAtExit release_config(config);  // see release_root
        try {
          v.add_bos_token = config.value("add_bos_token", v.add_bos_token);
          v.add_eos_token = config.value("add_eos_token", false);
          if (config.contains("chat_template") && config["chat_template"].is_string())
            v.chat_template = config["chat_template"].get<std::string>();
        } catch (const json::exception& e) {
          KVCACHE_FAIL(config_path.string(), ": unexpected tokenizer_config.json layout: ", e.what());
        }
      }
      Tokenizer tokenizer = from_vocabulary(v);
      auto impl = std::const_pointer_cast<Impl>(tokenizer.impl_);  // not shared with anyone yet
      impl->library = std::move(library);
      return tokenizer;
    } catch (const Error& e) {
      throw Error(path + ": " + e.what());
    } catch (const std::bad_alloc&) {
      KVCACHE_FAIL(path, ": out of memory building the vocabulary");
    }
#endif
  });
}

Tokenizer Tokenizer::from_pretrained(const std::string& path) {
  return detail::out_of_memory_as_error("Tokenizer::from_pretrained", [&]() -> Tokenizer {
    namespace fs = std::filesystem;
    const auto ends_with = [&](std::string_view suffix) {
      return path.size() >= suffix.size() &&
             path.compare(path.size() - suffix.size(), suffix.size(), suffix) == 0;
    };
    std::error_code ec;
    if (fs::is_directory(path, ec)) {
      // transformers' order: the fast tokenizer's tokenizer.json first, the slow one's model after.
      const fs::path json = fs::path(path) / "tokenizer.json";
      if (fs::exists(json, ec)) return from_json_file(json.string());
      const fs::path model = fs::path(path) / "tokenizer.model";
      if (fs::exists(model, ec)) return from_sentencepiece_file(model.string());
      KVCACHE_FAIL("Tokenizer::from_pretrained(", detail::show_text(path),
                   "): expected tokenizer.json or tokenizer.model in the folder, found neither");
    }
    if (ends_with(".gguf")) return from_gguf(GgufFile::open(path));
    if (ends_with(".json")) return from_json_file(path);
    if (ends_with(".model")) return from_sentencepiece_file(path);
    KVCACHE_CHECK(
        fs::exists(path, ec), "Tokenizer::from_pretrained(", detail::show_text(path),
        "): expected a .gguf file or a folder with tokenizer.json or tokenizer.model, got ",
        "a path that does not exist");
    KVCACHE_FAIL("Tokenizer::from_pretrained(", detail::show_text(path),
                 "): expected a .gguf file, a tokenizer.json or tokenizer.model file, or a folder "
                 "holding one of them, got a file of none of these kinds");
  });
}

std::vector<std::int64_t> Tokenizer::encode(std::string_view text, bool parse_special) const {
  return detail::out_of_memory_as_error("Tokenizer::encode", [&]() -> std::vector<std::int64_t> {
    const std::size_t bad = invalid_utf8_offset(text);
    KVCACHE_CHECK(bad == std::string_view::npos,
                  "encode: expected UTF-8 text, got an invalid byte 0x", std::hex,
                  static_cast<int>(static_cast<unsigned char>(text[bad])), std::dec, " at offset ",
                  bad);
    std::vector<Impl::Segment> first, segments;
    impl_->split_added(text, parse_special, /*normalized_pass=*/false, first);
    for (const Impl::Segment& s : first) {
      if (s.id >= 0)
        segments.push_back(s);
      else
        impl_->split_added(s.text, parse_special, /*normalized_pass=*/true, segments);
    }
    std::vector<std::int64_t> out;
    std::vector<std::string> pieces;
    for (const Impl::Segment& s : segments) {
      if (s.id >= 0) {
        out.push_back(s.id);
        continue;
      }
      if (impl_->sentencepiece) {
#if KVCACHE_HAVE_SENTENCEPIECE
        if (impl_->library) {
          std::vector<int> ids;
          const auto status = impl_->library->Encode(s.text, &ids);
          KVCACHE_CHECK(status.ok(), "encode: libsentencepiece failed: ", status.ToString());
          out.insert(out.end(), ids.begin(), ids.end());
          continue;
        }
#endif
        impl_->spm_encode(s.text, out);
        continue;
      }
      impl_->pre_tokenize(s.text, pieces);
      for (const std::string& piece : pieces) impl_->bpe(piece, out);
    }
    return out;
  });
}

std::string Tokenizer::decode(std::span<const std::int64_t> ids, bool skip_special) const {
  return detail::out_of_memory_as_error("Tokenizer::decode", [&]() -> std::string {
    std::string bytes;
    bool at_start = true;
    for (const std::int64_t id : ids) {
      impl_->check_id(id, "decode");
      impl_->append_decoded(static_cast<std::size_t>(id), skip_special, at_start, bytes);
    }
    std::string text;
    append_utf8_lossy(bytes, /*final=*/true, text);
    return text;
  });
}

const std::string& Tokenizer::token_text(std::int64_t id) const {
  impl_->check_id(id, "token_text");
  return impl_->tokens[static_cast<std::size_t>(id)];
}

const std::string& Tokenizer::token_bytes(std::int64_t id) const {
  impl_->check_id(id, "token_bytes");
  return impl_->bytes[static_cast<std::size_t>(id)];
}

TokenType Tokenizer::token_type(std::int64_t id) const {
  impl_->check_id(id, "token_type");
  return impl_->types[static_cast<std::size_t>(id)];
}

std::optional<std::int64_t> Tokenizer::token_id(std::string_view token) const {
  const auto it = impl_->ids.find(token);
  if (it == impl_->ids.end()) return std::nullopt;
  return it->second;
}

std::int64_t Tokenizer::vocab_size() const {
  return static_cast<std::int64_t>(impl_->tokens.size());
}
std::optional<std::int64_t> Tokenizer::bos_token_id() const { return impl_->bos; }
std::optional<std::int64_t> Tokenizer::eos_token_id() const { return impl_->eos; }
std::optional<std::int64_t> Tokenizer::pad_token_id() const { return impl_->pad; }
std::optional<std::int64_t> Tokenizer::unk_token_id() const { return impl_->unk; }
bool Tokenizer::add_bos_token() const { return impl_->add_bos; }
bool Tokenizer::add_eos_token() const { return impl_->add_eos; }
const std::optional<std::string>& Tokenizer::chat_template() const { return impl_->chat_template; }
const std::string& Tokenizer::pre_tokenizer() const { return impl_->pre_name; }

StreamDecoder::StreamDecoder(const Tokenizer& tokenizer, bool skip_special)
    : impl_(tokenizer.impl_), skip_special_(skip_special) {}

std::string StreamDecoder::push(std::int64_t id) {
  return detail::out_of_memory_as_error("StreamDecoder::push", [&]() -> std::string {
    impl_->check_id(id, "StreamDecoder::push");
    impl_->append_decoded(static_cast<std::size_t>(id), skip_special_, at_start_, pending_);
    std::string text;
    pending_.erase(0, append_utf8_lossy(pending_, /*final=*/false, text));
    return text;
  });
}

std::string StreamDecoder::flush() {
  return detail::out_of_memory_as_error("StreamDecoder::flush", [&]() -> std::string {
    std::string text;
    append_utf8_lossy(pending_, /*final=*/true, text);
    pending_.clear();
    return text;
  });
}

}  // namespace kvcache
