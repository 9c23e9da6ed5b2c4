#!/usr/bin/env python3
"""transformers' own tokenizer outputs, the oracle for kvcache's BPE tokenizer and chat templates.

Writes, under --out-dir (tests/data/tokenizer):
  smollm2_encodings.json  the default model's tokenizer on a committed list of awkward strings:
                          ids (tokenizer(text, add_special_tokens=False)), ids with special tokens
                          split (split_special_tokens=True), token strings, decodes (with and
                          without skip_special_tokens, and id by id for some strings); and the
                          chat-template renderings (apply_chat_template(..., tokenize=False)) of a
                          few conversations with the GGUF's template, Qwen2.5's and plain ChatML,
                          with their ids.
  tiny_smollm/, tiny_llama3/ (tokenizer.json; tiny_smollm also tokenizer_config.json)
                          two small byte-level BPE tokenizers trained here with the tokenizers
                          library: SmolLM2's hub pre-tokenizer (Sequence[Digits(individual),
                          ByteLevel]) with merges written as "a b" strings, and Llama 3's (Split on
                          its regex, then ByteLevel without regex, ignore_merges) with merges as
                          [a, b] pairs; both with special and non-special added tokens (lstrip and
                          rstrip, and a normalized one, which is matched after the others).
  tiny_gpt2/tokenizer.json
                          tiny_smollm's vocabulary with GPT-2's pre-tokenizer (ByteLevel with
                          add_prefix_space).
  tiny_encodings.json     transformers' encodings (AutoTokenizer.from_pretrained(folder)) of the
                          same strings with the three small tokenizers.

Run from the repository root, with transformers, tokenizers and gguf installed (torch optional):
    python3 tools/make_tokenizer_reference.py --gguf models/SmolLM2-135M-Instruct.Q4_1.gguf

The default model's tokenizer is AutoTokenizer.from_pretrained(folder, gguf_file=name), i.e.
transformers' gguf integration, with one change: that integration builds a plain ByteLevel
pre-tokenizer whatever tokenizer.ggml.pre says, while SmolLM2's own tokenizer.json (and llama.cpp's
"smollm") first isolates every digit; the reference puts SmolLM2's pre-tokenizer back, and keeps
the integration's ids as ids_gguf_integration wherever they differ.

transformers' gguf integration imports torch at module level (transformers 5.x), although building
a tokenizer reads only metadata. Where torch is missing, this script stands in for the two
torch-only pieces on that path (the fast metadata reader's module, and the is_torch_available
check of the legacy reader) so that AutoTokenizer still takes its own legacy path: the metadata
is read by the gguf package and converted by transformers' GGUF converter, as with torch.
Checked: with the stand-in, the six prompts of tests/data/smollm2_reference.json (made with torch)
get the same template text and ids.
"""
import argparse
import hashlib
import json
import os
import sys
import types
import unicodedata

# --- the strings ----------------------------------------------------------------------------------
_ACCENTED = "café naïve résumé Ångström São Paulo Zürich"
STRINGS = [
    "",
    "Hello, world!",
    "Hello   world",
    "  leading spaces",
    "trailing spaces   ",
    " ",
    "   ",
    "\t",
    "\n",
    "\n\n\n",
    "a\tb\t\tc",
    "line1\nline2\r\nline3\rline4",
    " \n \n ",
    "tabs\t\t and  \t mixed \n\n  spaces  ",
    "0",
    "12345",
    " 42",
    "3.14159",
    "1,000,000 and 12345678901234567890",
    "2024-06-01T12:30:00Z",
    "x1y2z3 abc123def",
    "Ⅻ ½ ¾ ² ٣٤٥ ०१२",
    "it's don't you're we've I'm they'll he'd",
    "IT'S DON'T YOU'RE WE'VE I'M THEY'LL HE'D",
    "'s 't 're 've 'm 'll 'd",
    "rock'n'roll o'clock ''quoted''",
    "It’s curly ‘apostrophes’",
    "!!!???...",
    "--==>> <<== ;;;",
    "foo()[]{}<>",
    "\"double\" 'single' `back`",
    "#include <iostream>\nint main() { return 0; }",
    "C++ && C# || F# -> x != y",
    "email@example.com https://huggingface.co/HuggingFaceTB/SmolLM2-135M-Instruct?x=1&y=2",
    "def f(x):\n    return x ** 2\n\n\nclass A:\n\tpass\n",
    "😀",
    "Hello 👋 world 🌍!",
    "👨‍👩‍👧‍👦 family",
    "🏳️‍🌈 👍🏽 ❤️ 🇫🇷🇯🇵",
    "你好，世界",
    "日本語のテキストです。",
    "한국어 텍스트",
    "中文mixed English混合123",
    _ACCENTED,
    unicodedata.normalize("NFD", _ACCENTED),
    "Ελληνικά Привет, мир! ß ẞ ǅ",
    "مرحبا بالعالم",
    "नमस्ते दुनिया",
    "שלום עולם",
    "สวัสดีครับ",
    "e\u0301 Z\u0324\u0354\u0367\u0311o\u0319",
    "∑∫√∞ ≠ ≤ x² + y³",
    "a\u00a0b \u00a0\u00a0c",
    "a\u3000b",
    "a\u2028b\u2029c",
    "a\u0085b x \u0085y \u0085\u0085z",
    "a\u200bb\u200d",
    "\ufeffBOM",
    "nul\x00byte \x01\x7f",
    "supercalifragilisticexpialidocious antidisestablishmentarianism",
    "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa",
    " " * 40,
    "=" * 33,
    "\n" * 12,
    "The year 1999 was 'great'; wasn't it?\n\nYes!!! 🎉",
    "<|im_start|>user\nHi there<|im_end|>\n",
    "text<|endoftext|>more",
    "<|im_start|><|im_end|><|im_start|>",
    " <|im_start|> spaced <|im_end|> ",
    "<|im_start <|im_end| <|IM_START|> <|im_start|x",
    "<repo_name>kvcache<file_sep>main.cpp",
    "<mask> left <mask>right <extra>x<extra>",
    "zzqq zzqq",
]

# Strings whose every id is also decoded on its own: byte-level tokens of multi-byte characters.
DECODE_EACH = {"😀", "Hello 👋 world 🌍!", "👨‍👩‍👧‍👦 family", "你好，世界", "नमस्ते दुनिया",
               "e\u0301 Z\u0324\u0354\u0367\u0311o\u0319"}

CONVERSATIONS = [
    ("seed", [{"role": "user", "content": "Hello, what's your name."}]),
    ("with_system", [{"role": "system", "content": "You are a pirate. Answer in one line."},
                     {"role": "user", "content": "Where is the treasure?"}]),
    ("multi_turn", [{"role": "user", "content": "Give me a number between 1 and 10."},
                    {"role": "assistant", "content": "7"},
                    {"role": "user", "content": "Now double it.\nExplain  why."}]),
    ("system_later", [{"role": "user", "content": "Hi"},
                      {"role": "system", "content": "Be brief."},
                      {"role": "user", "content": "Tell me about 🌍 and 日本."}]),
    ("empty_and_spaces", [{"role": "user", "content": ""},
                          {"role": "assistant", "content": "  padded  "},
                          {"role": "user", "content": "\n"}]),
]

# Qwen2.5-Instruct's chat template (a ChatML template whose default system prompt sits outside the
# message loop and is written with \n escapes), as published with its tokenizer_config.json.
QWEN25_TEMPLATE = r"""{%- if tools %}
    {{- '<|im_start|>system\n' }}
    {%- if messages[0]['role'] == 'system' %}
        {{- messages[0]['content'] }}
    {%- else %}
        {{- 'You are Qwen, created by Alibaba Cloud. You are a helpful assistant.' }}
    {%- endif %}
    {{- "\n\n# Tools\n\nYou may call one or more functions to assist with the user query.\n\nYou are provided with function signatures within <tools></tools> XML tags:\n<tools>" }}
    {%- for tool in tools %}
        {{- "\n" }}
        {{- tool | tojson }}
    {%- endfor %}
    {{- "\n</tools>\n\nFor each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:\n<tool_call>\n{{\"name\": <function-name>, \"arguments\": <args-json-object>}}\n</tool_call><|im_end|>\n" }}
{%- else %}
    {%- if messages[0]['role'] == 'system' %}
        {{- '<|im_start|>system\n' + messages[0]['content'] + '<|im_end|>\n' }}
    {%- else %}
        {{- '<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n' }}
    {%- endif %}
{%- endif %}
{%- for message in messages %}
    {%- if (message.role == "user") or (message.role == "system" and not loop.first) or (message.role == "assistant" and not message.tool_calls) %}
        {{- '<|im_start|>' + message.role + '\n' + message.content + '<|im_end|>' + '\n' }}
    {%- elif message.role == "assistant" %}
        {{- '<|im_start|>' + message.role }}
        {%- if message.content %}
            {{- '\n' + message.content }}
        {%- endif %}
        {%- for tool_call in message.tool_calls %}
            {%- if tool_call.function is defined %}
                {%- set tool_call = tool_call.function %}
            {%- endif %}
            {{- '\n<tool_call>\n{"name": "' }}
            {{- tool_call.name }}
            {{- '", "arguments": ' }}
            {{- tool_call.arguments | tojson }}
            {{- '}\n</tool_call>' }}
        {%- endfor %}
        {{- '<|im_end|>\n' }}
    {%- elif message.role == "tool" %}
        {%- if (loop.index0 == 0) or (messages[loop.index0 - 1].role != "tool") %}
            {{- '<|im_start|>user' }}
        {%- endif %}
        {{- '\n<tool_response>\n' }}
        {{- message.content }}
        {{- '\n</tool_response>' }}
        {%- if loop.last or (messages[loop.index0 + 1].role != "tool") %}
            {{- '<|im_end|>\n' }}
        {%- endif %}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\n' }}
{%- endif %}
"""

# Plain ChatML with no default system prompt.
CHATML_TEMPLATE = ("{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n' + "
                   "message['content'] + '<|im_end|>' + '\\n'}}{% endfor %}"
                   "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")

# Training text for the two small tokenizers: enough repetition for a few hundred merges.
TINY_CORPUS = [
    "The quick brown fox jumps over the lazy dog. It's the dog's day; they'll see.",
    "In 2024, 12345 people visited 678 places and spent 9,999.99 dollars.",
    "Hello, world! Hello again, world. Hello hello hello.",
    "def main():\n    print('hello world')\n    return 0\n",
    "café naïve résumé 你好世界 こんにちは 😀😀 👍",
    "We've been there; I'm here; you're there; he'd go; she'll stay; don't stop.",
    "    indented code\n\tand tabs\n\n\nnewlines   and   spaces",
]


def install_torch_stand_in():
    """Lets transformers' gguf tokenizer path run without torch (see the module docstring)."""
    import gguf
    import transformers.modeling_gguf_pytorch_utils as legacy

    legacy.is_torch_available = lambda: True  # its tokenizer/config path only uses the gguf package
    fast = types.ModuleType("transformers.integrations.gguf")

    def read_gguf_metadata(path, string_arrays=()):
        reader = gguf.GGUFReader(path)
        field = reader.fields["general.architecture"]
        arch = bytes(field.parts[field.data[0]]).decode()
        return {"general.architecture": arch}, tuple(t.name for t in reader.tensors)

    def unused(*args, **kwargs):
        raise RuntimeError("the torch stand-in routes every architecture to the legacy reader")

    fast.read_gguf_metadata = read_gguf_metadata
    fast.GGUF_CONFIG_ARCHS = {}  # empty: AutoTokenizer and TokenizersBackend take the legacy path
    fast.GGUF_TOKENIZER_ARCHS = {}
    fast.get_gguf_config = unused
    fast.get_gguf_tokenizer = unused
    sys.modules["transformers.integrations.gguf"] = fast


def encode_case(tok, text, decode_each):
    ids = tok(text, add_special_tokens=False).input_ids
    split = tok(text, add_special_tokens=False, split_special_tokens=True).input_ids
    case = {
        "text": text,
        "ids": ids,
        "tokens": tok.convert_ids_to_tokens(ids),
        "decoded": tok.decode(ids, skip_special_tokens=False),
        "decoded_skip_special": tok.decode(ids, skip_special_tokens=True),
    }
    if split != ids:
        case["ids_split_special"] = split
    if decode_each:
        case["decode_each"] = [tok.decode([i]) for i in ids]
    return case


def train_tiny(out_dir, style, chat_template):
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(ignore_merges=(style == "llama3")))
    if style == "smollm":
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
    else:
        llama3 = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}|"
                  r" ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(llama3), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    trainer = trainers.BpeTrainer(vocab_size=600, min_frequency=2, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    corpus = TINY_CORPUS * 3 + [s for s in STRINGS if "zzqq" not in s]
    tok.train_from_iterator(corpus, trainer=trainer)
    # Two entries no merge reaches: only ignore_merges (Llama 3) makes "zzqq" one token.
    data = json.loads(tok.to_str())
    vocab = data["model"]["vocab"]
    assert sorted(vocab.values()) == list(range(len(vocab))) and "zzqq" not in vocab
    vocab.update({"zzqq": len(vocab), "\u0120zzqq": len(vocab) + 1})
    tok = Tokenizer.from_str(json.dumps(data))
    tok.add_tokens([AddedToken("<extra>", special=False, normalized=False),
                    AddedToken("<mask>", special=True, lstrip=True, rstrip=True, normalized=False),
                    AddedToken("x<ext", special=False, normalized=True)])  # matched after <extra>
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, "tokenizer.json")
    data = json.loads(tok.to_str())
    if style == "smollm":  # the older "a b" form of the merges, as SmolLM2's hub file has them
        data["model"]["merges"] = [" ".join(m) if isinstance(m, list) else m
                                   for m in data["model"]["merges"]]
    with open(path, "w", encoding="utf-8") as f:
        json.dump(data, f, ensure_ascii=False, indent=None, separators=(",", ":"))
        f.write("\n")
    if style == "smollm":  # special tokens and the chat template beside it, as on the hub
        config = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<|im_start|>",
                  "eos_token": {"__type": "AddedToken", "content": "<|im_end|>", "lstrip": False,
                                "normalized": False, "rstrip": False, "single_word": False,
                                "special": True}, "pad_token": "<|im_end|>",
                  "unk_token": "<|endoftext|>", "chat_template": chat_template}
        with open(os.path.join(out_dir, "tokenizer_config.json"), "w", encoding="utf-8") as f:
            json.dump(config, f, ensure_ascii=False, indent=1)
            f.write("\n")
    return path


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--gguf", default="models/SmolLM2-135M-Instruct.Q4_1.gguf")
    ap.add_argument("--out-dir", default="tests/data/tokenizer")
    args = ap.parse_args()

    import transformers  # noqa: E402  (is_torch_available is computed at this import)
    try:
        import torch  # noqa: F401
        torch_version = torch.__version__
    except ImportError:
        torch_version = None
        install_torch_stand_in()
    import tokenizers
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    folder, name = os.path.split(os.path.abspath(args.gguf))
    # transformers' gguf integration builds the tokenizer with a plain ByteLevel pre-tokenizer
    # whatever tokenizer.ggml.pre says. SmolLM2's own tokenizer.json (and llama.cpp's "smollm")
    # first isolates every digit (\p{N}): the reference is that tokenizer, the same vocabulary and
    # merges with the hub's pre-tokenizer; where the gguf integration's ids differ they are kept
    # beside it as ids_gguf_integration.
    from tokenizers import pre_tokenizers
    gguf_tok = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    tok = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    assert json.loads(tok.backend_tokenizer.to_str())["pre_tokenizer"]["type"] == "ByteLevel"
    tok.backend_tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
    with open(args.gguf, "rb") as f:
        sha = hashlib.sha256(f.read()).hexdigest()

    cases = [encode_case(tok, s, s in DECODE_EACH) for s in STRINGS]
    for case in cases:
        ids = gguf_tok(case["text"], add_special_tokens=False).input_ids
        if ids != case["ids"]:
            case["ids_gguf_integration"] = ids
    chats = []
    templates = (("gguf", None), ("qwen2.5", QWEN25_TEMPLATE), ("chatml", CHATML_TEMPLATE))
    for template_name, template in templates:
        for name_, messages in CONVERSATIONS:
            for gen in (False, True):
                text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=gen,
                                               chat_template=template)
                ids = tok(text, add_special_tokens=False).input_ids
                assert ids == gguf_tok(text, add_special_tokens=False).input_ids, name_
                chats.append({"name": name_, "template": template_name, "messages": messages,
                              "add_generation_prompt": gen, "text": text, "ids": ids})
    os.makedirs(args.out_dir, exist_ok=True)
    out = {
        "description": "transformers' tokenizer for the default model (vocabulary from the gguf "
                       "integration, SmolLM2's hub pre-tokenizer): encodings, decodes and chat "
                       "templates; made by tools/make_tokenizer_reference.py",
        "transformers_version": transformers.__version__,
        "tokenizers_version": tokenizers.__version__,
        "torch_version": torch_version,
        "gguf_file": name,
        "gguf_sha256": sha,
        "vocab_size": len(tok),
        "chat_template": tok.chat_template,
        "qwen25_template": QWEN25_TEMPLATE,
        "chatml_template": CHATML_TEMPLATE,
        "cases": cases,
        "chats": chats,
    }
    with open(os.path.join(args.out_dir, "smollm2_encodings.json"), "w", encoding="utf-8") as f:
        json.dump(out, f, ensure_ascii=False, indent=1)
        f.write("\n")

    tiny = {"description": "transformers' encodings with the small trained tokenizers; made by "
                           "tools/make_tokenizer_reference.py",
            "transformers_version": transformers.__version__,
            "tokenizers_version": tokenizers.__version__, "tokenizers": {}}
    for style in ("smollm", "llama3", "gpt2"):
        folder = os.path.join(args.out_dir, f"tiny_{style}")
        if style == "gpt2":  # tiny_smollm's vocabulary with GPT-2's ByteLevel(add_prefix_space)
            smollm = os.path.join(args.out_dir, "tiny_smollm", "tokenizer.json")
            with open(smollm, encoding="utf-8") as f:
                data = json.load(f)
            data["pre_tokenizer"] = {"type": "ByteLevel", "add_prefix_space": True,
                                     "trim_offsets": True, "use_regex": True}
            os.makedirs(folder, exist_ok=True)
            with open(os.path.join(folder, "tokenizer.json"), "w", encoding="utf-8") as f:
                json.dump(data, f, ensure_ascii=False, separators=(",", ":"))
                f.write("\n")
        else:
            train_tiny(folder, style, tok.chat_template)
        t = AutoTokenizer.from_pretrained(folder)
        assert isinstance(t, PreTrainedTokenizerFast), type(t)
        tiny["tokenizers"][style] = {
            "path": f"tiny_{style}/tokenizer.json",
            "vocab_size": len(t),
            "bos_token_id": t.bos_token_id, "eos_token_id": t.eos_token_id,
            "pad_token_id": t.pad_token_id, "unk_token_id": t.unk_token_id,
            "cases": [encode_case(t, s, s in DECODE_EACH) for s in STRINGS],
        }
    with open(os.path.join(args.out_dir, "tiny_encodings.json"), "w", encoding="utf-8") as f:
        json.dump(tiny, f, ensure_ascii=False, indent=1)
        f.write("\n")


if __name__ == "__main__":
    main()
