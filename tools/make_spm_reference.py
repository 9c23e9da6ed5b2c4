#!/usr/bin/env python3
"""The sentencepiece library's own encodings, the oracle for kvcache's SentencePiece tokenizer.

Writes, under --out-dir (tests/data/spm):
  spm_tiny.model       a small BPE model trained here by Debian's spm_train on a corpus this script
                       writes (our own sentences, with some Greek, Cyrillic, CJK and accented Latin),
                       with Llama-2's normalizer settings: identity normalization, a dummy "▁"
                       prefix, extra white space kept, byte fallback (<0x00>..<0xFF>), digits split,
                       and one user-defined symbol ("<|user|>").
  spm_tiny.gguf        the same vocabulary as GGUF tokenizer metadata (tokenizer.ggml.model "llama":
                       tokens, scores, token types, bos/eos/unk ids, add_bos/add_eos), written with
                       the gguf package; no tensors.
  spm_reference.json   for each string of STRINGS: the ids and pieces of
                       SentencePieceProcessor.encode(text, add_bos=False, add_eos=False), and
                       decode(ids); plus the model's facts (sizes, special ids, versions).

Needs spm_train (apt-get install sentencepiece), the sentencepiece Python package
(pip install sentencepiece) and gguf (pip install gguf). Run from the repository root:
    python3 tools/make_spm_reference.py --out-dir tests/data/spm
Reruns give the same model and the same reference on the same spm_train version.
"""
import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile

VOCAB_SIZE = 700
USER_DEFINED = ["<|user|>"]

# --- the corpus -----------------------------------------------------------------------------------
_SENTENCES = [
    "The quick brown fox jumps over the lazy dog.",
    "A cache keeps the keys and values of every layer, so the next token costs one step.",
    "Tokenizers split text into pieces; the model only ever sees their ids.",
    "Hello world, hello again, and hello to everyone reading this line.",
    "She sells sea shells by the sea shore, and the shells she sells are surely sea shells.",
    "Numbers such as 12, 345 and 6789 are written one digit at a time.",
    "The year 2024 had 366 days, and 1,000,000 seconds is about 11.57 days.",
    "Please send the report by Friday; we will review it on Monday morning.",
    "Is this the real life? Is this just fantasy? Caught in a landslide.",
    "Water boils at 100 degrees Celsius at sea level, and freezes at 0.",
    "In the beginning the library held only a cache, then attention, then whole models.",
    "Greedy decoding picks the most likely token at every step until it sees the end.",
    "Streaming output prints each piece of text as soon as its last byte arrives.",
    "The weather today is sunny with a light breeze from the west.",
    "Our small village has a bakery, a library, a school and two old churches.",
    "Learning to play the piano takes patience, practice and a good teacher.",
    "He walked along the river, watching the boats drift slowly toward the bridge.",
    "The committee met on Tuesday and agreed on a plan for the next three years.",
    "Reading books every evening is a habit that many people find relaxing.",
    "Mathematics is the language in which the laws of nature are written.",
    "Καλημέρα σας, τι κάνετε σήμερα; Η θάλασσα είναι ήρεμη.",
    "Привет, как дела? Сегодня хорошая погода, и мы идём гулять.",
    "今日は良い天気です。私たちは公園に行きます。",
    "我们今天去图书馆看书，然后一起吃晚饭。",
    "Le café est très bon, mais le thé est meilleur à mon avis.",
    "Die Straße ist lang, und die Bäume sind grün im Frühling.",
    "El niño comió una manzana en el jardín de su abuela.",
    "São Paulo e Zürich são cidades grandes, com muitos museus.",
    "The <|user|> marker starts a turn in our chat format.",
    "Tabs\tand newlines\nare part of the text too.",
]


def write_corpus(path):
    # Every sentence a few times, and some recombined, so that BPE finds enough merges for
    # VOCAB_SIZE pieces; fixed order, so the model is the same on every run.
    lines = []
    for rep in range(3):
        for i, s in enumerate(_SENTENCES):
            lines.append(s)
            lines.append(s.lower() if rep == 1 else s.upper() if rep == 2 and i % 5 == 0 else s)
            lines.append(_SENTENCES[(i * 7 + rep) % len(_SENTENCES)] + " " + s)
    with open(path, "w", encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n")


# --- the strings ----------------------------------------------------------------------------------
STRINGS = [
    "",
    " ",
    "  ",
    "   ",
    "Hello world",
    "Hello, world!",
    "hello   world",
    "  leading spaces",
    "trailing spaces   ",
    "  both  ",
    "\n",
    "\t",
    "a\nb",
    "line1\nline2\r\nline3",
    "tabs\tand\t\ttabs",
    " \n \n ",
    "0",
    "12345",
    " 42",
    "3.14159 and 1,000,000",
    "2024-06-01T12:30:00Z",
    "!!!???...",
    "(a) [b] {c} <d> \"e\" 'f'",
    "it's don't you're",
    "emoji 😀 and 🎉🎉",
    "👍",
    "a😀b",
    "Καλημέρα κόσμε",
    "Привет мир",
    "今日は良い天気です",
    "我们今天去图书馆",
    "한국어 텍스트",
    "café naïve résumé Ångström",
    "e\u0301 a\u0300 n\u0303 combining marks",
    "\u0301 starts with a combining mark",
    "Zürich São Paulo Straße",
    "<s>",
    "</s>",
    "<s> Hello </s>",
    "text<s>inside</s>text",
    "<unk>",
    "<|user|> hi <|user|>",
    "<|user|><|user|>",
    "<0x41> written out",
    "▁ already a meta symbol ▁▁",
    "supercalifragilisticexpialidocious",
    "pneumonoultramicroscopicsilicovolcanoconiosis " * 3,
    "a" * 200,
    "ab" * 100,
    "The quick brown fox jumps over the lazy dog.",
    "Greedy decoding picks the most likely token at every step until it sees the end.",
    "\u00a0non-breaking\u00a0space",
    "\u200bzero\u200bwidth",
    "\x7f\x01\x02 control characters",
    "mixed: Hello Привет 你好 😀 123",
]


def train(spm_train, corpus, prefix):
    cmd = [
        spm_train,
        f"--input={corpus}",
        f"--model_prefix={prefix}",
        "--model_type=bpe",
        f"--vocab_size={VOCAB_SIZE}",
        "--byte_fallback=true",
        "--character_coverage=0.995",
        "--normalization_rule_name=identity",
        "--remove_extra_whitespaces=false",
        "--add_dummy_prefix=true",
        "--split_digits=true",
        "--allow_whitespace_only_pieces=true",
        f"--user_defined_symbols={','.join(USER_DEFINED)}",
        "--unk_id=0",
        "--bos_id=1",
        "--eos_id=2",
        "--pad_id=-1",
        "--num_threads=1",
        "--minloglevel=2",
    ]
    subprocess.run(cmd, check=True)


def write_gguf(sp, path):
    import gguf

    tokens, scores, types = [], [], []
    for i in range(sp.get_piece_size()):
        piece = sp.id_to_piece(i)
        tokens.append(piece)
        scores.append(sp.get_score(i))
        if sp.is_unknown(i):
            t = gguf.TokenType.UNKNOWN
        elif sp.is_control(i):
            t = gguf.TokenType.CONTROL
        elif sp.is_byte(i):
            t = gguf.TokenType.BYTE
        elif sp.is_unused(i):
            t = gguf.TokenType.UNUSED
        elif piece in USER_DEFINED:
            t = gguf.TokenType.USER_DEFINED
        else:
            t = gguf.TokenType.NORMAL
        types.append(int(t))
    w = gguf.GGUFWriter(path, arch="llama")
    w.add_tokenizer_model("llama")
    w.add_token_list(tokens)
    w.add_token_scores(scores)
    w.add_token_types(types)
    w.add_bos_token_id(sp.bos_id())
    w.add_eos_token_id(sp.eos_id())
    w.add_unk_token_id(sp.unk_id())
    w.add_add_bos_token(True)
    w.add_add_eos_token(False)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return types


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out-dir", default="tests/data/spm")
    ap.add_argument("--spm-train", default=shutil.which("spm_train") or "spm_train")
    args = ap.parse_args()

    import sentencepiece as spm

    os.makedirs(args.out_dir, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        corpus = os.path.join(tmp, "corpus.txt")
        write_corpus(corpus)
        train(args.spm_train, corpus, os.path.join(tmp, "spm_tiny"))
        model = os.path.join(args.out_dir, "spm_tiny.model")
        shutil.copyfile(os.path.join(tmp, "spm_tiny.model"), model)

    sp = spm.SentencePieceProcessor(model_file=model)
    types = write_gguf(sp, os.path.join(args.out_dir, "spm_tiny.gguf"))

    cases = []
    byte_fallback_cases = 0
    for text in STRINGS:
        ids = sp.encode(text, add_bos=False, add_eos=False)
        pieces = [sp.id_to_piece(i) for i in ids]
        decoded = sp.decode(ids)
        if any(sp.is_byte(i) for i in ids):
            byte_fallback_cases += 1
        cases.append({"text": text, "ids": ids, "pieces": pieces, "decode": decoded})
    if byte_fallback_cases < 5:
        sys.exit(f"only {byte_fallback_cases} strings reach byte fallback; expected at least 5")

    reference = {
        "generator": "tools/make_spm_reference.py",
        "sentencepiece_version": spm.__version__,
        "spm_train": subprocess.run(["dpkg-query", "-W", "-f=${Version}", "sentencepiece"],
                                    capture_output=True, text=True).stdout or "unknown",
        "vocab_size": sp.get_piece_size(),
        "bos_token_id": sp.bos_id(),
        "eos_token_id": sp.eos_id(),
        "unk_token_id": sp.unk_id(),
        "user_defined": USER_DEFINED,
        "token_types": types,
        "cases": cases,
    }
    with open(os.path.join(args.out_dir, "spm_reference.json"), "w", encoding="utf-8") as f:
        json.dump(reference, f, ensure_ascii=False, indent=1)
        f.write("\n")
    total = sum(os.path.getsize(os.path.join(args.out_dir, n))
                for n in ("spm_tiny.model", "spm_tiny.gguf", "spm_reference.json"))
    print(f"wrote {args.out_dir}: vocab {sp.get_piece_size()}, {len(cases)} strings "
          f"({byte_fallback_cases} with byte fallback), {total} bytes")


if __name__ == "__main__":
    main()
