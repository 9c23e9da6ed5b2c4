#!/usr/bin/env python3
"""Builds the reference fixtures that kvcache's C++ tests compare against.

For every fixture it builds a tiny random Llama-family model (LlamaForCausalLM, Qwen2ForCausalLM,
MistralForCausalLM), saves it with save_pretrained (safetensors), reloads it in float32 with
attn_implementation="eager" on the CPU, and records what transformers computes:

  - a hand-written greedy loop over a DynamicCache, exactly like the loop on transformers' caching
    page (tokens, the last-position logits of every step, the cache contents after the prefill);
  - model.generate(), greedy, on the same left-padded batch.

Usage (on a machine with torch and transformers 5.x; the CPU is enough and is forced):

    python3 tools/make_reference.py --out tests/data
    python3 tools/make_reference.py --out tests/data --only llama_gqa llama_eos

Written against torch 2.11, transformers 5.17.0, safetensors 0.8. See tools/README.md.
"""

from __future__ import annotations

import os

# Force the CPU before torch is imported: fixtures must not depend on a GPU's kernels.
os.environ["CUDA_VISIBLE_DEVICES"] = ""
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import argparse
import inspect
import json
import math
import shutil
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable


def _die(msg: str) -> None:
    print(f"\nmake_reference.py: ERROR: {msg}", file=sys.stderr)
    sys.exit(1)


try:
    import torch
except ImportError as e:  # pragma: no cover - depends on the machine
    _die(f"cannot import torch ({e}). Run this script where torch 2.x is installed.")

try:
    import transformers
    from transformers import (
        AutoConfig,
        DynamicCache,
        LlamaConfig,
        LlamaForCausalLM,
        MistralConfig,
        MistralForCausalLM,
        Qwen2Config,
        Qwen2ForCausalLM,
    )
except ImportError as e:  # pragma: no cover
    _die(f"cannot import transformers ({e}). Run this script where transformers 5.x is installed.")

try:
    import safetensors
    from safetensors import safe_open
    from safetensors.torch import save_file
except ImportError as e:  # pragma: no cover
    _die(f"cannot import safetensors ({e}).")


# ------------------------------------------------------------------------------------------------
# Constants

TESTED_TRANSFORMERS = "5.17.0"
TESTED_TORCH = "2.11"
PAD_ID = 0
MARGIN_MIN = 1e-2  # top1 - top2 of the float32 logits, every step, every row
SIZE_BUDGET_BYTES = 8 * 1024 * 1024  # all of --out together
CACHED_VS_FULL_ATOL = 2e-3  # cached loop logits vs one cacheless forward over the whole sequence

BASE_CONFIG: dict[str, Any] = dict(
    vocab_size=256,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=1024,
    rms_norm_eps=1e-5,
    hidden_act="silu",
    pad_token_id=PAD_ID,
    bos_token_id=None,
    eos_token_id=None,
    tie_word_embeddings=False,
)

# Weight scales (the default init, std 0.02, gives nearly flat logits where float32 noise flips
# greedy choices). Every parameter is re-drawn from a seeded generator after construction, so the
# fixtures depend only on the seed, not on transformers' init code.
HIDDEN_GAIN = 1.5  # Linear weights ~ N(0, (gain / sqrt(fan_in))^2): attention scores of std ~gain^2
EMBED_STD = 0.75  # embeddings (and a tied lm_head): logits of std ~ 0.75 * sqrt(64) = 6
LM_HEAD_STD = 0.75  # untied lm_head
BIAS_STD = 0.2
NORM_LOW, NORM_HIGH = 0.8, 1.2  # RMSNorm weights ~ U(0.8, 1.2)


# ------------------------------------------------------------------------------------------------
# Fixture table


@dataclass
class Fixture:
    name: str
    description: str
    arch: str  # "llama" | "qwen2" | "mistral"
    lengths: list[int]
    new_tokens: int
    config: dict[str, Any] = field(default_factory=dict)
    logit_steps: int | None = None  # None: all steps
    save_dtype: str = "float32"  # dtype the checkpoint is saved in
    max_shard_size: str | None = None
    rewrite_v4_config: bool = False
    eos_from: tuple[int, int] | None = None  # (row, step) of loop_tokens that becomes the EOS id
    base_seed: int = 0
    expect_bias: dict[str, bool] = field(default_factory=dict)  # module suffix -> has bias


ARCHS: dict[str, tuple[type, type]] = {
    "llama": (LlamaConfig, LlamaForCausalLM),
    "qwen2": (Qwen2Config, Qwen2ForCausalLM),
    "mistral": (MistralConfig, MistralForCausalLM),
}

NO_BIAS = {"q_proj": False, "k_proj": False, "v_proj": False, "o_proj": False,
           "gate_proj": False, "up_proj": False, "down_proj": False}

FIXTURES: list[Fixture] = [
    Fixture(
        name="llama_mha",
        description="LlamaForCausalLM, multi-head attention (4 heads, 4 kv heads), q/k/v/o and MLP "
        "biases, explicit head_dim 24 (hidden/heads would be 16), untied embeddings; "
        "left-padded batch of 2.",
        arch="llama",
        lengths=[7, 4],
        new_tokens=12,
        config=dict(num_key_value_heads=4, attention_bias=True, mlp_bias=True, head_dim=24,
                    tie_word_embeddings=False),
        base_seed=1000,
        expect_bias={k: True for k in NO_BIAS},
    ),
    Fixture(
        name="llama_gqa",
        description="LlamaForCausalLM, grouped-query attention (4 heads, 2 kv heads), no biases; "
        "left-padded batch of 3 rows of different lengths.",
        arch="llama",
        lengths=[9, 5, 2],
        new_tokens=16,
        base_seed=2000,
        expect_bias=dict(NO_BIAS),
    ),
    Fixture(
        name="qwen2_bias",
        description="Qwen2ForCausalLM: q/k/v biases (o_proj and MLP without), GQA 4/2, untied "
        "embeddings, no sliding window; left-padded batch of 2.",
        arch="qwen2",
        lengths=[6, 3],
        new_tokens=12,
        config=dict(tie_word_embeddings=False),
        base_seed=3000,
        expect_bias=dict(NO_BIAS, q_proj=True, k_proj=True, v_proj=True),
    ),
    Fixture(
        name="mistral",
        description="MistralForCausalLM with sliding_window 64 (larger than prompt + new tokens, so "
        "the window never drops a token), GQA 4/2; batch of 2 equal-length rows (no padding).",
        arch="mistral",
        lengths=[8, 8],
        new_tokens=12,
        config=dict(sliding_window=64),
        base_seed=4000,
        expect_bias=dict(NO_BIAS),
    ),
    Fixture(
        name="llama_tied_bf16",
        description="LlamaForCausalLM with tied embeddings, checkpoint saved in bfloat16; the "
        "reference ran in float32 on the saved (bf16-rounded) weights upcast; batch of 2.",
        arch="llama",
        lengths=[5, 9],
        new_tokens=12,
        config=dict(tie_word_embeddings=True),
        save_dtype="bfloat16",
        base_seed=5000,
        expect_bias=dict(NO_BIAS),
    ),
    Fixture(
        name="llama_sharded",
        description="LlamaForCausalLM GQA saved with max_shard_size 100KB: several "
        "model-0000N-of-0000M.safetensors shards and model.safetensors.index.json; batch of 1.",
        arch="llama",
        lengths=[6],
        new_tokens=10,
        max_shard_size="100KB",
        base_seed=6000,
        expect_bias=dict(NO_BIAS),
    ),
    Fixture(
        name="llama3_rope",
        description="LlamaForCausalLM GQA with llama3 RoPE scaling (factor 8, low_freq_factor 1, "
        "high_freq_factor 4, original_max_position_embeddings 64, rope_theta 500000) in "
        "transformers 5's rope_parameters; batch of 2.",
        arch="llama",
        lengths=[10, 6],
        new_tokens=12,
        config=dict(rope_parameters={
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 64,
            "rope_theta": 500000.0,
        }),
        base_seed=7000,
        expect_bias=dict(NO_BIAS),
    ),
    Fixture(
        name="llama_v4_config",
        description="LlamaForCausalLM GQA with linear RoPE scaling (factor 2, rope_theta 10000); "
        "config.json rewritten after save_pretrained into the older transformers 4 form "
        "(top-level rope_theta and rope_scaling, torch_dtype, no rope_parameters); "
        "transformers 5 reloads it to the same RoPE and the same logits; batch of 2.",
        arch="llama",
        lengths=[7, 3],
        new_tokens=12,
        config=dict(rope_parameters={"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0}),
        rewrite_v4_config=True,
        base_seed=8000,
        expect_bias=dict(NO_BIAS),
    ),
    Fixture(
        name="llama_long",
        description="LlamaForCausalLM GQA, one 300-token prompt and 200 new tokens; step_logits "
        "keep only the first 16 steps.",
        arch="llama",
        lengths=[300],
        new_tokens=200,
        logit_steps=16,
        base_seed=9000,
        expect_bias=dict(NO_BIAS),
    ),
    Fixture(
        name="llama_eos",
        description="LlamaForCausalLM GQA, batch of 3; eos_token_id is the token row 0 greedily "
        "produces at step 3 (also written to config.json). loop_tokens ignore EOS; "
        "generate_tokens stop each row at its first EOS and pad it with 0 afterwards.",
        arch="llama",
        lengths=[6, 4, 8],
        new_tokens=16,
        eos_from=(0, 3),
        base_seed=10000,
        expect_bias=dict(NO_BIAS),
    ),
]

# Past the window: every later query sees only the last `sliding_window` key slots (transformers'
# rule: key slot in (q - window, q], padded slots counting as slots), and a sliding layer's cache
# keeps only the last window - 1 tokens after each update.
FIXTURES += [
    Fixture(
        name="mistral_window",
        description="MistralForCausalLM with sliding_window 6, smaller than the prompt: every layer "
        "slides; a left-padded batch of 2 (9 and 4 tokens) and 20 new tokens, so both rows run "
        "far past the window. prefill_keys/values hold what transformers' DynamicCache keeps of "
        "each layer after the prefill.",
        arch="mistral",
        lengths=[9, 4],
        new_tokens=20,
        config=dict(sliding_window=6),
        base_seed=11000,
        expect_bias=dict(NO_BIAS),
    ),
    Fixture(
        name="qwen2_window",
        description="Qwen2ForCausalLM with use_sliding_window, sliding_window 5 and "
        "max_window_layers 1 over 2 layers: layer 0 full attention, layer 1 sliding "
        "(config.layer_types); q/k/v biases; a left-padded batch of 2 (7 and 3 tokens) and 16 "
        "new tokens.",
        arch="qwen2",
        lengths=[7, 3],
        new_tokens=16,
        config=dict(tie_word_embeddings=False, use_sliding_window=True, sliding_window=5,
                    max_window_layers=1),
        base_seed=12000,
        expect_bias=dict(NO_BIAS, q_proj=True, k_proj=True, v_proj=True),
    ),
]

FIXTURES_BY_NAME = {f.name: f for f in FIXTURES}


def sliding_layers(config) -> list[bool]:
    """Which layers slide, as the config resolves it (transformers 5's layer_types)."""
    types = getattr(config, "layer_types", None)
    window = getattr(config, "sliding_window", None)
    if window is None:
        return [False] * config.num_hidden_layers
    if not types:  # Mistral: one window for every layer, as DynamicCache(config=...) reads it
        return [True] * config.num_hidden_layers
    return [t == "sliding_attention" for t in types]


# ------------------------------------------------------------------------------------------------
# Small helpers


class FixtureError(RuntimeError):
    """A check failed: the fixture would be wrong, so nothing is written for it."""


class RetrySeed(RuntimeError):
    """This seed's model is unusable (e.g. too small a logit margin): try the next seed."""


def check(cond: bool, msg: str) -> None:
    if not cond:
        raise FixtureError(msg)


def log(msg: str = "") -> None:
    print(msg, flush=True)


def torch_dtype(name: str) -> torch.dtype:
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


def folder_size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def human(n: int) -> str:
    if n >= 1024 * 1024:
        return f"{n / (1024 * 1024):.2f} MiB"
    return f"{n / 1024:.1f} KiB"


def version_tuple(v: str) -> tuple[int, ...]:
    out = []
    for part in v.split("+")[0].split("."):
        digits = "".join(ch for ch in part if ch.isdigit())
        out.append(int(digits) if digits else 0)
    return tuple(out)


def from_pretrained_fp32(cls: type, path: Path):
    """Loads a checkpoint in float32 with eager attention on the CPU (v5: `dtype=`)."""
    kwargs = dict(attn_implementation="eager")
    try:
        model = cls.from_pretrained(str(path), dtype=torch.float32, **kwargs)
    except TypeError as e:
        if "dtype" not in str(e):
            raise
        model = cls.from_pretrained(str(path), torch_dtype=torch.float32, **kwargs)  # transformers 4
    model.eval()
    for name, p in model.named_parameters():
        check(p.dtype == torch.float32, f"reloaded parameter {name} is {p.dtype}, not float32")
        check(p.device.type == "cpu", f"reloaded parameter {name} is on {p.device}, not the CPU")
    impl = getattr(model.config, "_attn_implementation", None)
    check(impl == "eager", f"attention implementation is {impl!r}, not 'eager'")
    return model


def make_dynamic_cache(config) -> Any:
    """DynamicCache(config=...) as in transformers 5 (builds sliding-window layers for Mistral)."""
    params = inspect.signature(DynamicCache.__init__).parameters
    check("config" in params,
          f"DynamicCache.__init__ has no 'config' parameter (signature: {list(params)}); "
          "this script expects transformers 5's DynamicCache(config=...)")
    return DynamicCache(config=config)


def cache_layer_kv(cache, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The keys/values a DynamicCache holds for one layer (v5: cache.layers[L].keys / .values)."""
    layers = getattr(cache, "layers", None)
    check(layers is not None,
          "DynamicCache has no .layers (transformers 5 stores per-layer DynamicLayer objects there)")
    check(layer < len(layers), f"DynamicCache has {len(layers)} layers, asked for layer {layer}")
    k, v = layers[layer].keys, layers[layer].values
    check(isinstance(k, torch.Tensor) and isinstance(v, torch.Tensor),
          f"cache.layers[{layer}].keys/.values are not tensors ({type(k)}, {type(v)})")
    return k, v


def position_ids_from_mask(mask: torch.Tensor) -> torch.Tensor:
    """What generate() does for left padding: cumsum(mask) - 1, padded slots 1."""
    pos = mask.long().cumsum(-1) - 1
    pos.masked_fill_(mask == 0, 1)
    return pos


# ------------------------------------------------------------------------------------------------
# Model construction


def build_config(fx: Fixture):
    config_cls, _ = ARCHS[fx.arch]
    kwargs = dict(BASE_CONFIG)
    kwargs.update(fx.config)
    try:
        config = config_cls(**kwargs)
    except Exception as e:
        raise FixtureError(f"{config_cls.__name__}(**{kwargs}) failed: {type(e).__name__}: {e}") from e
    # What the config must say, whatever the defaults of this transformers version.
    check(config.vocab_size == 256 and config.hidden_size == 64, "vocab/hidden not as asked")
    check(config.num_hidden_layers == kwargs["num_hidden_layers"], "num_hidden_layers not as asked")
    check(config.num_key_value_heads == kwargs["num_key_value_heads"], "num_key_value_heads not as asked")
    check(config.pad_token_id == PAD_ID, f"pad_token_id is {config.pad_token_id}, not {PAD_ID}")
    check(config.eos_token_id is None, f"eos_token_id is {config.eos_token_id}, expected None")
    if "head_dim" in fx.config:
        check(getattr(config, "head_dim", None) == fx.config["head_dim"],
              f"head_dim is {getattr(config, 'head_dim', None)}, asked {fx.config['head_dim']}")
    if "rope_parameters" in fx.config:
        rp = getattr(config, "rope_parameters", None)
        check(isinstance(rp, dict), f"config.rope_parameters is {rp!r}: transformers 5 expected")
        for k, v in fx.config["rope_parameters"].items():
            check(k in rp and rp[k] == v, f"config.rope_parameters[{k!r}] is {rp.get(k)!r}, asked {v!r}")
    if fx.arch == "mistral":
        check(config.sliding_window == fx.config["sliding_window"],
              f"sliding_window is {config.sliding_window}")
    if fx.arch == "qwen2" and not fx.config.get("use_sliding_window"):
        check(getattr(config, "sliding_window", None) is None,
              "Qwen2 config has a sliding window; the fixture expects none (use_sliding_window=False)")
    if fx.arch == "qwen2" and fx.config.get("use_sliding_window"):
        first = fx.config["max_window_layers"]
        want = [i >= first for i in range(config.num_hidden_layers)]
        check(config.sliding_window == fx.config["sliding_window"],
              f"sliding_window is {config.sliding_window}")
        check(sliding_layers(config) == want,
              f"layer_types {getattr(config, 'layer_types', None)}: expected layers >= {first} to slide")
    return config


def head_dim_of(config) -> int:
    hd = getattr(config, "head_dim", None)
    return int(hd) if hd else config.hidden_size // config.num_attention_heads


@torch.no_grad()
def init_weights(model, seed: int) -> None:
    """Re-draws every parameter from a seeded generator (see the scale constants above)."""
    g = torch.Generator().manual_seed(seed)
    out_emb = model.get_output_embeddings()
    seen: set[int] = set()

    def fill_normal(p: torch.Tensor, std: float) -> None:
        p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float32) * std)

    for mname, module in model.named_modules():
        cls_name = type(module).__name__
        params = [(n, p) for n, p in module.named_parameters(recurse=False)]
        if not params:
            continue
        for pname, p in params:
            if id(p) in seen:  # tied weights: drawn once
                continue
            seen.add(id(p))
            full = f"{mname}.{pname}" if mname else pname
            if isinstance(module, torch.nn.Embedding) and pname == "weight":
                fill_normal(p, EMBED_STD)
            elif isinstance(module, torch.nn.Linear) and pname == "weight":
                if module is out_emb:
                    fill_normal(p, LM_HEAD_STD)
                else:
                    fill_normal(p, HIDDEN_GAIN / math.sqrt(module.in_features))
            elif isinstance(module, torch.nn.Linear) and pname == "bias":
                fill_normal(p, BIAS_STD)
            elif "RMSNorm" in cls_name and pname == "weight":
                p.copy_(torch.empty(p.shape).uniform_(NORM_LOW, NORM_HIGH, generator=g))
            else:
                raise FixtureError(f"don't know how to initialise parameter {full} of {cls_name}")
    n_params = sum(1 for _ in model.parameters())
    check(len(seen) == n_params, f"initialised {len(seen)} of {n_params} parameters")


def check_structure(model, fx: Fixture) -> None:
    cfg = model.config
    tied = bool(cfg.tie_word_embeddings)
    emb_w = model.get_input_embeddings().weight
    head_w = model.get_output_embeddings().weight
    if tied:
        check(head_w.data_ptr() == emb_w.data_ptr(), "tie_word_embeddings=True but lm_head is not tied")
    else:
        check(head_w.data_ptr() != emb_w.data_ptr(), "tie_word_embeddings=False but lm_head is tied")
    layer0 = model.model.layers[0]
    mods = {
        "q_proj": layer0.self_attn.q_proj, "k_proj": layer0.self_attn.k_proj,
        "v_proj": layer0.self_attn.v_proj, "o_proj": layer0.self_attn.o_proj,
        "gate_proj": layer0.mlp.gate_proj, "up_proj": layer0.mlp.up_proj,
        "down_proj": layer0.mlp.down_proj,
    }
    for name, want in fx.expect_bias.items():
        has = mods[name].bias is not None
        check(has == want, f"{name} bias present={has}, fixture expects {want}")
    hd = head_dim_of(cfg)
    check(mods["q_proj"].out_features == cfg.num_attention_heads * hd, "q_proj width != heads * head_dim")
    check(mods["k_proj"].out_features == cfg.num_key_value_heads * hd, "k_proj width != kv_heads * head_dim")


def expected_tensor_names(model_cfg, fx: Fixture) -> set[str]:
    names = {"model.embed_tokens.weight", "model.norm.weight"}
    if not model_cfg.tie_word_embeddings:
        names.add("lm_head.weight")
    for i in range(model_cfg.num_hidden_layers):
        p = f"model.layers.{i}"
        names |= {f"{p}.input_layernorm.weight", f"{p}.post_attention_layernorm.weight"}
        for m in ("q_proj", "k_proj", "v_proj", "o_proj"):
            names.add(f"{p}.self_attn.{m}.weight")
            if fx.expect_bias.get(m):
                names.add(f"{p}.self_attn.{m}.bias")
        for m in ("gate_proj", "up_proj", "down_proj"):
            names.add(f"{p}.mlp.{m}.weight")
            if fx.expect_bias.get(m):
                names.add(f"{p}.mlp.{m}.bias")
    return names


def checkpoint_files(path: Path) -> tuple[list[Path], bool]:
    """The safetensors files of a saved checkpoint and whether it is sharded (checked)."""
    index = path / "model.safetensors.index.json"
    single = path / "model.safetensors"
    if index.exists():
        with open(index) as f:
            wm = json.load(f).get("weight_map")
        check(isinstance(wm, dict) and wm, f"{index} has no weight_map")
        files = sorted({path / v for v in wm.values()})
        for p in files:
            check(p.exists(), f"shard {p.name} named in the index does not exist")
        return files, True
    check(single.exists(), f"save_pretrained wrote neither model.safetensors nor an index in {path}: "
          f"{sorted(p.name for p in path.iterdir())}")
    return [single], False


def read_checkpoint(path: Path) -> dict[str, torch.Tensor]:
    files, _ = checkpoint_files(path)
    out: dict[str, torch.Tensor] = {}
    for p in files:
        with safe_open(str(p), framework="pt") as f:
            for k in f.keys():
                check(k not in out, f"tensor {k} appears in two shards")
                out[k] = f.get_tensor(k)
    return out


def check_checkpoint(path: Path, fx: Fixture, cfg, ref_state: dict[str, torch.Tensor]) -> dict[str, Any]:
    """The saved tensors: names, dtype, values (== the in-memory weights, bf16-rounded if asked)."""
    files, sharded = checkpoint_files(path)
    if fx.max_shard_size:
        check(sharded and len(files) >= 2,
              f"max_shard_size={fx.max_shard_size} gave {len(files)} file(s), sharded={sharded}; "
              "at least 2 shards and model.safetensors.index.json expected")
    else:
        check(not sharded, "checkpoint is sharded but the fixture did not ask for it")
    tensors = read_checkpoint(path)
    want = expected_tensor_names(cfg, fx)
    missing = sorted(want - set(tensors))
    extra = sorted(set(tensors) - want)
    check(not missing, f"checkpoint lacks tensors {missing}")
    if cfg.tie_word_embeddings and "lm_head.weight" in extra:
        log("    note: tied checkpoint also stores lm_head.weight")
        extra.remove("lm_head.weight")
    check(not extra, f"checkpoint has unexpected tensors {extra}")
    sdt = torch_dtype(fx.save_dtype)
    for k, t in tensors.items():
        check(t.dtype == sdt, f"checkpoint tensor {k} is {t.dtype}, expected {sdt}")
        if k in ref_state:
            ref = ref_state[k].to(sdt)
            check(t.shape == ref.shape, f"checkpoint tensor {k} has shape {tuple(t.shape)}, "
                  f"in-memory {tuple(ref.shape)}")
            check(torch.equal(t, ref), f"checkpoint tensor {k} differs from the in-memory weights")
    return {"files": [p.name for p in files], "sharded": sharded, "tensors": len(tensors)}


# ------------------------------------------------------------------------------------------------
# Prompts


def make_prompts(lengths: list[int], vocab: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    batch, width = len(lengths), max(lengths)
    input_ids = torch.full((batch, width), PAD_ID, dtype=torch.long)
    mask = torch.zeros((batch, width), dtype=torch.long)
    for i, n in enumerate(lengths):
        check(1 <= n <= width, f"bad prompt length {n}")
        input_ids[i, width - n:] = torch.randint(1, vocab, (n,), generator=g, dtype=torch.long)
        mask[i, width - n:] = 1
    return input_ids, mask


# ------------------------------------------------------------------------------------------------
# The reference runs


@dataclass
class LoopResult:
    tokens: torch.Tensor  # [batch, new] int64
    logits: torch.Tensor  # [new, batch, vocab] float32
    prefill_kv: list[tuple[torch.Tensor, torch.Tensor]]
    cache_position_passed: bool
    returned_same_cache: bool


def forward_accepts_cache_position(model) -> bool:
    """transformers 5 models take cache_position explicitly or absorb it in **kwargs (recent
    versions ignore it). Either way it may be passed; False only if forward rejects it."""
    params = inspect.signature(model.forward).parameters
    return "cache_position" in params or any(p.kind == p.VAR_KEYWORD for p in params.values())


@torch.no_grad()
def greedy_loop(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, new_tokens: int) -> LoopResult:
    """The seed's loop: DynamicCache, a mask that gains a column each step, cache_position[-1:] + 1."""
    cfg = model.config
    batch, prompt_len = input_ids.shape
    past_key_values = make_dynamic_cache(cfg)
    cache_position = torch.arange(prompt_len, dtype=torch.long)
    pass_cache_position = forward_accepts_cache_position(model)
    mask = attention_mask.clone()
    cur = input_ids
    tokens, logits = [], []
    prefill_kv: list[tuple[torch.Tensor, torch.Tensor]] = []
    same_cache = True
    for step in range(new_tokens):
        q_len = cur.shape[1]
        position_ids = position_ids_from_mask(mask)[:, -q_len:]
        kwargs = dict(input_ids=cur, attention_mask=mask, position_ids=position_ids,
                      past_key_values=past_key_values, use_cache=True)
        if pass_cache_position:
            kwargs["cache_position"] = cache_position
        out = model(**kwargs)
        check(out.logits.shape[:2] == (batch, q_len),
              f"step {step}: logits shape {tuple(out.logits.shape)}, expected ({batch}, {q_len}, vocab)")
        if getattr(out, "past_key_values", None) is not past_key_values:
            same_cache = False
        last = out.logits[:, -1, :].to(torch.float32)
        next_token = last.argmax(-1)
        logits.append(last.clone())
        tokens.append(next_token.clone())
        if step == 0:
            n_layers = len(getattr(past_key_values, "layers", []))
            check(n_layers == cfg.num_hidden_layers,
                  f"after prefill the cache has {n_layers} layers, model has {cfg.num_hidden_layers}")
            hd = head_dim_of(cfg)
            slides = sliding_layers(cfg)
            for layer in range(cfg.num_hidden_layers):
                k, v = cache_layer_kv(past_key_values, layer)
                # A sliding layer keeps the last window - 1 tokens (all of a shorter prompt).
                kept = min(prompt_len, cfg.sliding_window - 1) if slides[layer] else prompt_len
                shape = (batch, cfg.num_key_value_heads, kept, hd)
                check(tuple(k.shape) == shape and tuple(v.shape) == shape,
                      f"prefill cache layer {layer}: keys {tuple(k.shape)}, values {tuple(v.shape)}, "
                      f"expected {shape}")
                prefill_kv.append((k.detach().to(torch.float32).clone().contiguous(),
                                   v.detach().to(torch.float32).clone().contiguous()))
        cur = next_token[:, None]
        mask = torch.cat([mask, mask.new_ones((batch, 1))], dim=-1)
        cache_position = cache_position[-1:] + 1
    seen = past_key_values.get_seq_length()
    check(int(seen) == prompt_len + new_tokens - 1,
          f"cache holds {int(seen)} tokens after the loop, expected {prompt_len + new_tokens - 1}")
    return LoopResult(torch.stack(tokens, dim=1), torch.stack(logits, dim=0), prefill_kv,
                      pass_cache_position, same_cache)


def margins(logits: torch.Tensor) -> tuple[float, float]:
    """Smallest top1 - top2 over every step and row; and that margin relative to max |logit|."""
    top2 = logits.topk(2, dim=-1).values  # [steps, batch, 2]
    gap = top2[..., 0] - top2[..., 1]
    scale = logits.abs().amax(dim=-1).clamp_min(1e-30)
    return float(gap.min()), float((gap / scale).min())


@torch.no_grad()
def check_against_full_forward(model, input_ids, attention_mask, loop: LoopResult) -> float:
    """One cacheless forward over prompt + generated tokens must give the loop's logits."""
    batch, prompt_len = input_ids.shape
    new = loop.tokens.shape[1]
    seq = torch.cat([input_ids, loop.tokens[:, :-1]], dim=1)
    mask = torch.cat([attention_mask, attention_mask.new_ones((batch, new - 1))], dim=1)
    out = model(input_ids=seq, attention_mask=mask, position_ids=position_ids_from_mask(mask),
                use_cache=False)
    full = out.logits[:, prompt_len - 1:, :].to(torch.float32).transpose(0, 1)  # [new, batch, vocab]
    check(full.shape == loop.logits.shape, f"full-forward logits {tuple(full.shape)} vs loop "
          f"{tuple(loop.logits.shape)}")
    diff = float((full - loop.logits).abs().max())
    check(diff <= CACHED_VS_FULL_ATOL,
          f"cached loop and cacheless forward disagree: max |diff| {diff:.3e} > {CACHED_VS_FULL_ATOL}")
    check(torch.equal(full.argmax(-1).transpose(0, 1), loop.tokens),
          "cached loop and cacheless forward pick different greedy tokens")
    return diff


@torch.no_grad()
def run_generate(model, input_ids, attention_mask, new_tokens: int, eos: int | None,
                 pass_eos: bool = True) -> torch.Tensor:
    """model.generate, greedy; returns the new tokens [batch, new_tokens] (pad-filled if it stopped
    early because every row finished)."""
    gc = model.generation_config
    gc.pad_token_id = PAD_ID
    if pass_eos:
        gc.eos_token_id = eos
    kwargs = dict(max_new_tokens=new_tokens, do_sample=False, num_beams=1, pad_token_id=PAD_ID,
                  return_dict_in_generate=False, use_cache=True)
    if pass_eos:
        kwargs["eos_token_id"] = eos
    out = model.generate(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
    seqs = out.sequences if hasattr(out, "sequences") else out
    check(isinstance(seqs, torch.Tensor), f"generate returned {type(out)}")
    batch, prompt_len = input_ids.shape
    check(seqs.shape[0] == batch and prompt_len < seqs.shape[1] <= prompt_len + new_tokens,
          f"generate returned shape {tuple(seqs.shape)} for prompt {tuple(input_ids.shape)} and "
          f"max_new_tokens={new_tokens}")
    check(torch.equal(seqs[:, :prompt_len], input_ids), "generate changed the prompt part of its output")
    new = seqs[:, prompt_len:].to(torch.long)
    if new.shape[1] < new_tokens:
        check(eos is not None, f"generate stopped after {new.shape[1]} of {new_tokens} tokens with no EOS")
        pad = torch.full((batch, new_tokens - new.shape[1]), PAD_ID, dtype=torch.long)
        new = torch.cat([new, pad], dim=1)
    return new.contiguous()


def apply_eos(tokens: torch.Tensor, eos: int) -> torch.Tensor:
    """What greedy generate() makes of a no-EOS greedy sequence: a row keeps its first EOS, then pads."""
    out = tokens.clone()
    for r in range(out.shape[0]):
        hits = (out[r] == eos).nonzero()
        if hits.numel():
            out[r, int(hits[0]) + 1:] = PAD_ID
    return out


# ------------------------------------------------------------------------------------------------
# The older (transformers 4) config.json form


def normalise_rope(rp: dict | None) -> dict[str, Any]:
    out = {}
    for k, v in (rp or {}).items():
        if v is None or k == "type":
            continue
        out[k] = float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else v
    return out


V4_ROPE_THETA = 10000.0
V4_ROPE_SCALING = {"rope_type": "linear", "factor": 2.0}


def rewrite_config_v4(path: Path, expected_rope: dict[str, Any]) -> dict[str, Any]:
    """config.json in the transformers 4 form: top-level rope_theta + rope_scaling, torch_dtype."""
    cfg_path = path / "config.json"
    with open(cfg_path) as f:
        cfg = json.load(f)
    rp = cfg.pop("rope_parameters", None)
    check(isinstance(rp, dict), f"saved config.json has no rope_parameters dict (got {rp!r}); "
          "transformers 5 writes one")
    want = normalise_rope(dict(V4_ROPE_SCALING, rope_theta=V4_ROPE_THETA))
    check(normalise_rope(rp) == want, f"saved rope_parameters {rp} are not {want}")
    check(normalise_rope(expected_rope) == want, f"the model's rope_parameters {expected_rope} are not {want}")
    cfg.pop("rope_scaling", None)
    cfg["rope_theta"] = V4_ROPE_THETA
    cfg["rope_scaling"] = dict(V4_ROPE_SCALING)
    if "dtype" in cfg:  # transformers 4 wrote torch_dtype
        cfg["torch_dtype"] = cfg.pop("dtype")
    with open(cfg_path, "w") as f:
        json.dump(cfg, f, indent=2, sort_keys=True)
        f.write("\n")
    return cfg


@torch.no_grad()
def verify_v4_config(path: Path, fx: Fixture, ref_model, loop: LoopResult, input_ids, attention_mask) -> None:
    with open(path / "config.json") as f:
        raw = json.load(f)
    check("rope_parameters" not in raw and "rope_theta" in raw and "rope_scaling" in raw,
          "rewritten config.json is not in the older form")
    loaded = AutoConfig.from_pretrained(str(path))
    check(type(loaded).__name__ == "LlamaConfig", f"AutoConfig gave {type(loaded).__name__}")
    a = normalise_rope(getattr(loaded, "rope_parameters", None))
    b = normalise_rope(ref_model.config.rope_parameters)
    check(a == b, f"transformers loads the rewritten config to rope_parameters {a}, the model had {b}")
    _, model_cls = ARCHS[fx.arch]
    model = from_pretrained_fp32(model_cls, path)
    r0, r1 = ref_model.model.rotary_emb, model.model.rotary_emb
    check(torch.equal(r0.inv_freq, r1.inv_freq), "inv_freq differs after reloading the older config")
    check(float(getattr(r0, "attention_scaling", 1.0)) == float(getattr(r1, "attention_scaling", 1.0)),
          "attention_scaling differs after reloading the older config")
    again = greedy_loop(model, input_ids, attention_mask, fx.new_tokens)
    check(torch.equal(again.tokens, loop.tokens), "tokens differ when run from the older config")
    diff = float((again.logits - loop.logits).abs().max())
    check(diff <= 1e-5, f"logits differ by {diff:.3e} when run from the older config")
    log(f"    older config.json reloads to rope_parameters {a}; same logits (max |diff| {diff:.1e})")


# ------------------------------------------------------------------------------------------------
# One fixture


@dataclass
class Summary:
    name: str
    arch: str
    batch: int
    lengths: list[int]
    new_tokens: int
    seed: int
    tries: int
    min_margin: float
    size: int
    seconds: float


def attempt(fx: Fixture, seed: int, work: Path, input_ids, attention_mask) -> dict[str, Any]:
    """Builds, saves, reloads and runs one seed's model in `work`. Raises RetrySeed on small margins."""
    config_cls, model_cls = ARCHS[fx.arch]
    torch.manual_seed(seed)
    config = build_config(fx)
    model = model_cls(config)
    model.eval()
    init_weights(model, seed)
    check_structure(model, fx)
    ref_state = {k: v.detach().clone() for k, v in model.state_dict().items()}

    ckpt = work / "checkpoint"
    save_kwargs: dict[str, Any] = {}
    if fx.max_shard_size:
        save_kwargs["max_shard_size"] = fx.max_shard_size
    if fx.save_dtype != "float32":
        model = model.to(torch_dtype(fx.save_dtype))
    model.save_pretrained(str(ckpt), **save_kwargs)
    gen_cfg = ckpt / "generation_config.json"
    if gen_cfg.exists():
        gen_cfg.unlink()
    ckpt_info = check_checkpoint(ckpt, fx, config, ref_state)
    del model

    # The reference runs on what the checkpoint holds, reloaded in float32.
    ref = from_pretrained_fp32(model_cls, ckpt)
    check_structure(ref, fx)
    loaded = ref.state_dict()
    for k, v in ref_state.items():
        if k in loaded:
            want = v.to(torch_dtype(fx.save_dtype)).to(torch.float32)
            check(torch.equal(loaded[k], want), f"reloaded {k} differs from the saved weights")

    loop = greedy_loop(ref, input_ids, attention_mask, fx.new_tokens)
    m_abs, m_rel = margins(loop.logits)
    if not (m_abs > MARGIN_MIN):
        raise RetrySeed(f"min top1-top2 margin {m_abs:.3e} <= {MARGIN_MIN}")
    full_diff = check_against_full_forward(ref, input_ids, attention_mask, loop)

    eos = None
    if fx.eos_from is not None:
        row, step = fx.eos_from
        eos = int(loop.tokens[row, step])
    gen = run_generate(ref, input_ids, attention_mask, fx.new_tokens, eos)
    if eos is None:
        if not torch.equal(gen, loop.tokens):
            raise FixtureError(f"generate() and the hand-written loop disagree with no EOS:\n"
                               f"generate={gen.tolist()}\nloop    ={loop.tokens.tolist()}")
    else:
        want = apply_eos(loop.tokens, eos)
        if not torch.equal(gen, want):
            raise FixtureError(f"generate() with eos_token_id={eos} gave {gen.tolist()}, expected "
                               f"{want.tolist()} (loop tokens {loop.tokens.tolist()})")
        if torch.equal(gen, loop.tokens):
            raise RetrySeed("generate_tokens equal loop_tokens despite the EOS")

    return dict(ckpt=ckpt, ckpt_info=ckpt_info, ref=ref, loop=loop, margin=m_abs, margin_rel=m_rel,
                full_diff=full_diff, eos=eos, gen=gen)


def write_fixture(fx: Fixture, out_dir: Path, max_tries: int) -> Summary:
    t0 = time.time()
    log(f"== {fx.name}: {fx.arch}, batch {len(fx.lengths)} {fx.lengths}, {fx.new_tokens} new tokens")
    vocab = BASE_CONFIG["vocab_size"]
    prompt_seed = fx.base_seed
    input_ids, attention_mask = make_prompts(fx.lengths, vocab, prompt_seed)
    out_dir.mkdir(parents=True, exist_ok=True)
    work_root = Path(tempfile.mkdtemp(prefix=f".tmp-{fx.name}-", dir=str(out_dir)))
    try:
        result = None
        tries = 0
        for tries in range(1, max_tries + 1):
            seed = fx.base_seed + tries  # weights seed; prompts stay fixed
            work = work_root / f"seed{seed}"
            work.mkdir()
            try:
                result = attempt(fx, seed, work, input_ids, attention_mask)
                break
            except RetrySeed as e:
                log(f"    seed {seed}: {e}; trying the next seed")
                shutil.rmtree(work, ignore_errors=True)
        if result is None:
            raise FixtureError(f"no usable seed in {max_tries} tries (seeds {fx.base_seed + 1}.."
                               f"{fx.base_seed + max_tries}); raise --max-tries")

        loop: LoopResult = result["loop"]
        ckpt: Path = result["ckpt"]
        eos = result["eos"]
        cfg = result["ref"].config
        logit_steps = fx.logit_steps if fx.logit_steps is not None else fx.new_tokens
        check(1 <= logit_steps <= fx.new_tokens, "bad logit_steps")

        if eos is not None:
            # "as configured": the checkpoint's config.json carries the EOS id.
            cpath = ckpt / "config.json"
            with open(cpath) as f:
                raw = json.load(f)
            raw["eos_token_id"] = eos
            with open(cpath, "w") as f:
                json.dump(raw, f, indent=2, sort_keys=True)
                f.write("\n")
            check(AutoConfig.from_pretrained(str(ckpt)).eos_token_id == eos,
                  "config.json's eos_token_id does not load back")
            # Cross-check (informational): generate() taking the EOS from the config alone.
            _, model_cls = ARCHS[fx.arch]
            m2 = from_pretrained_fp32(model_cls, ckpt)
            g2 = run_generate(m2, input_ids, attention_mask, fx.new_tokens, None, pass_eos=False)
            if not torch.equal(g2, result["gen"]):
                log("    WARNING: generate() with the EOS taken from config.json differs from "
                    f"generate(eos_token_id={eos}): {g2.tolist()}")
            del m2

        if fx.rewrite_v4_config:
            rewrite_config_v4(ckpt, dict(result["ref"].config.rope_parameters))
            verify_v4_config(ckpt, fx, result["ref"], loop, input_ids, attention_mask)

        tensors: dict[str, torch.Tensor] = {
            "input_ids": input_ids.to(torch.int64).contiguous(),
            "attention_mask": attention_mask.to(torch.int64).contiguous(),
            "loop_tokens": loop.tokens.to(torch.int64).contiguous(),
            "step_logits": loop.logits[:logit_steps].to(torch.float32).contiguous(),
            "generate_tokens": result["gen"].to(torch.int64).contiguous(),
        }
        for layer, (k, v) in enumerate(loop.prefill_kv):
            tensors[f"prefill_keys.{layer}"] = k.contiguous()
            tensors[f"prefill_values.{layer}"] = v.contiguous()
        for name, t in tensors.items():
            check(t.device.type == "cpu" and t.is_contiguous(), f"{name} not a contiguous CPU tensor")
        save_file(tensors, str(ckpt / "expected.safetensors"), metadata={"fixture": fx.name})

        seed_used = fx.base_seed + tries
        expected = {
            "fixture": fx.name,
            "description": fx.description,
            "transformers_version": transformers.__version__,
            "torch_version": torch.__version__,
            "safetensors_version": getattr(safetensors, "__version__", "unknown"),
            "architecture": type(result["ref"]).__name__,
            "model_type": cfg.model_type,
            "new_tokens": fx.new_tokens,
            "logit_steps": logit_steps,
            "batch": len(fx.lengths),
            "prompt_len": int(input_ids.shape[1]),
            "prompt_lengths": list(fx.lengths),
            "pad_token_id": PAD_ID,
            "eos_token_id": eos,
            "dtype_of_weights": fx.save_dtype,
            "reference_dtype": "float32",
            "attn_implementation": "eager",
            "num_hidden_layers": cfg.num_hidden_layers,
            "num_key_value_heads": cfg.num_key_value_heads,
            "head_dim": head_dim_of(cfg),
            "sliding_window": getattr(cfg, "sliding_window", None) if any(sliding_layers(cfg)) else None,
            "sliding_layers": sliding_layers(cfg),
            "vocab_size": cfg.vocab_size,
            "seed": seed_used,
            "prompt_seed": prompt_seed,
            "seed_tries": tries,
            "min_logit_margin": result["margin"],
            "min_logit_margin_relative": result["margin_rel"],
            "margin_threshold": MARGIN_MIN,
            "max_abs_diff_cached_vs_full_forward": result["full_diff"],
            "cache_position_passed": loop.cache_position_passed,
            "checkpoint_files": result["ckpt_info"]["files"],
            "checkpoint_sharded": result["ckpt_info"]["sharded"],
            "config_form": "transformers4 (rope_theta + rope_scaling)" if fx.rewrite_v4_config
            else "transformers5 (rope_parameters)",
        }
        with open(ckpt / "expected.json", "w") as f:
            json.dump(expected, f, indent=2)
            f.write("\n")

        final = out_dir / fx.name
        if final.is_symlink() or final.is_file():
            raise FixtureError(f"{final} exists and is not a folder; remove it by hand")
        if final.exists():
            shutil.rmtree(final)
        ckpt.rename(final)
        final.chmod(0o755)
        for p in final.iterdir():  # some writers create 0600 files
            if p.is_file():
                p.chmod(0o644)
        size = folder_size(final)
        log(f"    seed {seed_used} (try {tries}); min margin {result['margin']:.3e} "
            f"(relative {result['margin_rel']:.2e}); cached vs full forward {result['full_diff']:.1e}; "
            f"{'EOS ' + str(eos) + '; ' if eos is not None else ''}"
            f"forward returned the same cache object: {loop.returned_same_cache}; "
            f"{human(size)} -> {final}")
        return Summary(fx.name, fx.arch, len(fx.lengths), list(fx.lengths), fx.new_tokens, seed_used,
                       tries, result["margin"], size, time.time() - t0)
    finally:
        shutil.rmtree(work_root, ignore_errors=True)


# ------------------------------------------------------------------------------------------------
# main


def check_versions() -> None:
    tv, pv = transformers.__version__, torch.__version__
    log(f"transformers {tv}, torch {pv}, safetensors {getattr(safetensors, '__version__', '?')}, "
        f"python {sys.version.split()[0]}")
    if version_tuple(tv)[0] < 5:
        _die(f"transformers {tv} is too old: this script needs transformers 5 (rope_parameters, "
             f"DynamicCache(config=...), cache.layers); it was written against {TESTED_TRANSFORMERS}")
    if tv != TESTED_TRANSFORMERS:
        log(f"WARNING: written against transformers {TESTED_TRANSFORMERS}; running {tv}")
    if not pv.startswith(TESTED_TORCH):
        log(f"WARNING: written against torch {TESTED_TORCH}; running {pv}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, type=Path, help="output folder, e.g. tests/data")
    ap.add_argument("--only", nargs="+", metavar="NAME", help="build only these fixtures")
    ap.add_argument("--max-tries", type=int, default=40,
                    help="seeds to try per fixture before giving up (default 40)")
    ap.add_argument("--keep-going", action="store_true",
                    help="after a failing fixture, go on with the others (exit status still 1)")
    ap.add_argument("--list", action="store_true", help="list the fixtures and exit")
    args = ap.parse_args(argv)

    if args.list:
        for fx in FIXTURES:
            print(f"{fx.name:18s} {fx.description}")
        return 0

    names = args.only or [f.name for f in FIXTURES]
    unknown = [n for n in names if n not in FIXTURES_BY_NAME]
    if unknown:
        _die(f"unknown fixture(s) {unknown}; known: {[f.name for f in FIXTURES]}")
    if args.max_tries < 1:
        _die("--max-tries must be at least 1")

    check_versions()
    torch.set_default_dtype(torch.float32)
    torch.set_num_threads(1)
    if torch.cuda.is_available():  # CUDA_VISIBLE_DEVICES="" should have hidden every GPU
        log("note: a GPU is visible to torch; everything here still runs on the CPU")

    out_dir: Path = args.out
    out_dir.mkdir(parents=True, exist_ok=True)
    summaries: list[Summary] = []
    failed: list[str] = []
    for name in names:
        fx = FIXTURES_BY_NAME[name]
        try:
            summaries.append(write_fixture(fx, out_dir, args.max_tries))
        except FixtureError as e:
            print(f"\nFIXTURE {name} FAILED: {e}\n", file=sys.stderr, flush=True)
            failed.append(name)
            if not args.keep_going:
                break
        except Exception:
            print(f"\nFIXTURE {name} FAILED with an exception:", file=sys.stderr)
            traceback.print_exc()
            failed.append(name)
            if not args.keep_going:
                break

    # Summary table
    log("")
    log(f"{'fixture':18s} {'arch':8s} {'batch':>5s} {'prompt lengths':16s} {'new':>4s} "
        f"{'seed':>6s} {'tries':>5s} {'min margin':>10s} {'size':>10s} {'time':>6s}")
    for s in summaries:
        log(f"{s.name:18s} {s.arch:8s} {s.batch:5d} {str(s.lengths):16s} {s.new_tokens:4d} "
            f"{s.seed:6d} {s.tries:5d} {s.min_margin:10.3e} {human(s.size):>10s} {s.seconds:5.1f}s")
    log("")
    log("sizes of every fixture folder in " + str(out_dir) + ":")
    total = 0
    for d in sorted(p for p in out_dir.iterdir() if p.is_dir() and not p.name.startswith(".")):
        sz = folder_size(d)
        total += sz
        log(f"  {d.name:18s} {human(sz):>10s}")
    loose = sum(p.stat().st_size for p in out_dir.iterdir() if p.is_file())
    total += loose
    log(f"  {'total':18s} {human(total):>10s} (budget {human(SIZE_BUDGET_BYTES)})")

    status = 0
    if total > SIZE_BUDGET_BYTES:
        print(f"\nERROR: {out_dir} holds {human(total)}, over the {human(SIZE_BUDGET_BYTES)} budget",
              file=sys.stderr)
        status = 1
    if failed:
        print(f"\nFAILED fixtures: {failed}" + ("" if args.keep_going else
              " (stopped at the first failure; --keep-going runs the rest)"), file=sys.stderr)
        status = 1
    elif status == 0:
        log(f"\nall {len(summaries)} fixture(s) written")
    return status


if __name__ == "__main__":
    sys.exit(main())
