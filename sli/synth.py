"""Synthetic, randomly initialised checkpoints for tests and benchmarks.

``synth_model(out_dir, family, preset)`` writes a Hugging Face style folder (``config.json`` and
safetensors weights, optionally a byte-level tokenizer) deterministically from ``seed``. Small
presets are built with ``AutoModelForCausalLM.from_config`` and ``save_pretrained``; large ones
(over ~500 M parameters) are never held in memory whole: the layout comes from a meta-device
model and the tensors are written shard by shard, one decoder layer per shard.

>>> sorted(FAMILY_PRESETS["llama"])
['168m', '1b', '7b', 'small', 'smollm2-135m', 'tiny']
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any, Dict, List, Optional, Union

import torch

logger = logging.getLogger(__name__)

_TINY_COMMON: Dict[str, Any] = {"bos_token_id": 0, "eos_token_id": 1, "pad_token_id": 1,
                                "vocab_size": 256, "tie_word_embeddings": False}

_LLAMA_LIKE = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                   num_key_value_heads=2, max_position_embeddings=128, **_TINY_COMMON)

FAMILY_PRESETS: Dict[str, Dict[str, Dict[str, Any]]] = {
    "llama": {
        "tiny": dict(_LLAMA_LIKE),
        "small": dict(hidden_size=512, intermediate_size=1408, num_hidden_layers=8, num_attention_heads=8,
                      num_key_value_heads=8, max_position_embeddings=2048, **_TINY_COMMON, ) | {"vocab_size": 1024},
        "168m": dict(hidden_size=1024, intermediate_size=2816, num_hidden_layers=8, num_attention_heads=16,
                     num_key_value_heads=16, max_position_embeddings=2048, vocab_size=32000, bos_token_id=1,
                     eos_token_id=2, pad_token_id=0, tie_word_embeddings=False),
        # TinyLlama-1.1B's shapes.
        "1b": dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
                   num_key_value_heads=4, max_position_embeddings=2048, vocab_size=32000, bos_token_id=1,
                   eos_token_id=2, pad_token_id=0, tie_word_embeddings=False, rms_norm_eps=1e-5),
        # Llama-2-7B's shapes.
        "7b": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                   num_key_value_heads=32, max_position_embeddings=4096, vocab_size=32000, bos_token_id=1,
                   eos_token_id=2, pad_token_id=0, tie_word_embeddings=False, rms_norm_eps=1e-5),
        # SmolLM2-135M's shapes (the default model's).
        "smollm2-135m": dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                             num_key_value_heads=3, max_position_embeddings=8192, vocab_size=49152,
                             bos_token_id=1, eos_token_id=2, pad_token_id=2, tie_word_embeddings=True,
                             rms_norm_eps=1e-5, rope_theta=100000.0),
    },
    "mistral": {"tiny": dict(_LLAMA_LIKE, sliding_window=None)},
    "qwen2": {"tiny": dict(_LLAMA_LIKE)},
    "qwen3": {"tiny": dict(_LLAMA_LIKE, head_dim=16)},
    "gemma2": {"tiny": dict(_LLAMA_LIKE, head_dim=16, sliding_window=64)},
    "gemma": {"tiny": dict(_LLAMA_LIKE, head_dim=16)},
    "phi3": {"tiny": dict(_LLAMA_LIKE, pad_token_id=1)},
    "mixtral": {"tiny": dict(_LLAMA_LIKE, num_local_experts=4, num_experts_per_tok=2)},
    "stablelm": {"tiny": dict(_LLAMA_LIKE)},
    "olmo": {"tiny": dict(_LLAMA_LIKE)},
    "phi": {"tiny": dict(_LLAMA_LIKE)},
    "gpt2": {"tiny": dict(n_embd=64, n_layer=2, n_head=4, n_inner=128, n_positions=128, **_TINY_COMMON)},
    "gpt_neox": {"tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                              max_position_embeddings=128, rotary_pct=0.25, **_TINY_COMMON)},
    "falcon": {"tiny": dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_kv_heads=2,
                            new_decoder_architecture=True, max_position_embeddings=128, **_TINY_COMMON)},
    "qwen2_moe": {"tiny": dict(_LLAMA_LIKE, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
                               shared_expert_intermediate_size=64)},
    "qwen3_moe": {"tiny": dict(_LLAMA_LIKE, head_dim=16, num_experts=4, num_experts_per_tok=2,
                               moe_intermediate_size=32)},
    "gemma3_text": {"tiny": dict(_LLAMA_LIKE, head_dim=16, sliding_window=64)},
    "olmo2": {"tiny": dict(_LLAMA_LIKE)},
    "starcoder2": {"tiny": dict(_LLAMA_LIKE)},
    "granite": {"tiny": dict(_LLAMA_LIKE)},
    "cohere": {"tiny": dict(_LLAMA_LIKE)},
}

LARGE_PARAMS = 500_000_000


def known_presets() -> str:
    return "; ".join(f"{fam}: {', '.join(sorted(p))}" for fam, p in sorted(FAMILY_PRESETS.items()))


def make_config(family: str = "llama", preset: str = "tiny", num_layers: Optional[int] = None,
                tie_word_embeddings: Optional[bool] = None):
    """The transformers config of ``family``/``preset``.

    ``num_layers`` overrides the depth, ``tie_word_embeddings`` the preset's choice. Raises
    ``ValueError`` for an unknown family or preset or a depth below 1.
    """
    from transformers import AutoConfig

    if family not in FAMILY_PRESETS:
        raise ValueError(f"unknown model family {family!r}; known families and presets: {known_presets()}")
    if preset not in FAMILY_PRESETS[family]:
        raise ValueError(f"unknown preset {preset!r} for family {family!r}; known families and presets: "
                         f"{known_presets()}")
    kwargs = dict(FAMILY_PRESETS[family][preset])
    if num_layers is not None:
        if int(num_layers) < 1:
            raise ValueError(f"num_layers must be at least 1, got {num_layers}")
        key = "n_layer" if family == "gpt2" else "num_hidden_layers"
        kwargs[key] = int(num_layers)
    if tie_word_embeddings is not None:
        kwargs["tie_word_embeddings"] = bool(tie_word_embeddings)
    if family == "gemma2":
        n = kwargs["num_hidden_layers"]
        kwargs.setdefault("layer_types", ["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(n)])
    return AutoConfig.for_model(family, **kwargs)


def _param_count(config) -> int:
    """Parameters of ``config``'s model, tied ones once (built on the meta device: no memory)."""
    from transformers import AutoModelForCausalLM

    # torch.device("meta") rather than accelerate's init_empty_weights, which leaves
    # tied embeddings untied (and counted twice).
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    return sum(p.numel() for p in model.parameters())


def synth_model(out_dir: Union[str, os.PathLike], family: str = "llama", preset: str = "tiny",
                num_layers: Optional[int] = None, dtype: torch.dtype = torch.bfloat16, seed: int = 0,
                tie_word_embeddings: Optional[bool] = None, max_shard_size: Optional[Union[int, str]] = None,
                with_tokenizer: bool = False) -> Path:
    """Write a random ``family``/``preset`` checkpoint into ``out_dir``; return its path.

    :param num_layers: decoder layers (default: the preset's).
    :param dtype: dtype of the stored weights.
    :param seed: the same seed gives the same tensors, byte for byte.
    :param tie_word_embeddings: override the preset's choice (tied models store no ``lm_head``).
    :param max_shard_size: e.g. ``"5MB"``: shard the weights (``model.safetensors.index.json``).
        Large presets (over ~500 M parameters) are always written one decoder layer per shard.
    :param with_tokenizer: also write a byte-level tokenizer (see :func:`write_tokenizer`), for
        tools that need one in the folder.
    :raises ValueError: unknown family or preset.
    """
    config = make_config(family, preset, num_layers, tie_word_embeddings)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    config.dtype = dtype
    if _param_count(config) > LARGE_PARAMS:
        _write_large(out, config, dtype, seed)
    else:
        _write_small(out, config, dtype, seed, max_shard_size)
    if with_tokenizer:
        write_tokenizer(out, config)
    return out


def _write_small(out: Path, config, dtype: torch.dtype, seed: int,
                 max_shard_size: Optional[Union[int, str]]) -> None:
    from transformers import AutoModelForCausalLM

    # fork_rng: the caller's global random state is left as it was.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config)
    model = model.to(dtype)
    kwargs: Dict[str, Any] = {}
    if max_shard_size is not None:
        kwargs["max_shard_size"] = max_shard_size
    model.save_pretrained(out, **kwargs)  # safetensors is the only format transformers 5 writes
    if getattr(model, "generation_config", None) is not None and not (out / "generation_config.json").exists():
        model.generation_config.save_pretrained(out)


def _bytes_to_unicode() -> Dict[int, str]:
    """GPT-2's byte -> printable character table, the alphabet of byte-level BPE."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(
        range(ord("®"), ord("ÿ") + 1))
    table, extra = {}, 0
    for b in range(256):
        if b in keep:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return table


def write_tokenizer(out_dir: Union[str, os.PathLike], config) -> Path:
    """Write a byte-level tokenizer (one token per byte, no merges) that fits ``config``.

    Built offline with ``tokenizers``; ``AutoTokenizer.from_pretrained(out_dir)`` loads it. The
    config's bos/eos/pad ids become special tokens; bytes fill the other ids below
    ``vocab_size`` — printable ASCII first, so with a tiny vocabulary only rare bytes map to the
    unknown token (the eos token).
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    vocab_size = int(text_config.vocab_size)
    specials: Dict[str, str] = {}
    ids: Dict[str, int] = {}
    for role in ("bos", "eos", "pad"):
        token_id = getattr(text_config, f"{role}_token_id", None)
        if isinstance(token_id, list):
            token_id = token_id[0] if token_id else None
        if token_id is None or not 0 <= int(token_id) < vocab_size:
            continue
        name = next((t for t, i in ids.items() if i == int(token_id)), f"<|{role}|>")
        ids[name] = int(token_id)
        specials[role] = name
    if "eos" not in specials:  # the unknown byte needs a token
        free = next(i for i in range(vocab_size) if i not in ids.values())
        ids["<|eos|>"] = free
        specials["eos"] = "<|eos|>"
    table = _bytes_to_unicode()
    order = list(range(0x20, 0x7F)) + [0x0A, 0x09, 0x0D] + list(range(0x80, 0x100)) + [
        b for b in range(0x20) if b not in (0x0A, 0x09, 0x0D)] + [0x7F]
    free_ids = (i for i in range(vocab_size) if i not in set(ids.values()))
    for b in order:
        token_id = next(free_ids, None)
        if token_id is None:
            break
        ids[table[b]] = token_id
    tok = Tokenizer(models.BPE(vocab=ids, merges=[], unk_token=specials["eos"]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(sorted(set(specials.values())))
    max_len = getattr(text_config, "max_position_embeddings", None) or getattr(text_config, "n_positions", 2048)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, model_max_length=int(max_len),
                                   unk_token=specials["eos"],
                                   **{f"{role}_token": name for role, name in specials.items()})
    fast.save_pretrained(str(out_dir))
    return Path(out_dir)


def layer_of(name: str) -> Optional[int]:
    """The decoder-layer index in a checkpoint tensor name (``model.layers.3.mlp...`` -> 3), else None."""
    parts = name.split(".")
    for i, part in enumerate(parts[:-1]):
        if part in ("layers", "h", "blocks") and parts[i + 1].isdigit():
            return int(parts[i + 1])
    return None


def _write_large(out: Path, config, dtype: torch.dtype, seed: int) -> None:
    """Write a checkpoint too large to build in memory: one shard per decoder layer."""
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    state = model.state_dict()
    names = list(state.keys())
    if getattr(config, "tie_word_embeddings", False):
        names = [n for n in names if n != "lm_head.weight"]
    # Shards: what comes before the decoder layers in state-dict (registration) order
    # (embeddings), one per layer, then what comes after (final norm, head).
    groups: Dict[str, List[str]] = {}
    seen_layer = False
    for n in names:
        layer = layer_of(n)
        seen_layer = seen_layer or layer is not None
        key = f"layer{layer:05d}" if layer is not None else ("post" if seen_layer else "pre")
        groups.setdefault(key, []).append(n)
    keys = (["pre"] if "pre" in groups else []) + sorted(k for k in groups if k.startswith("layer")) + (
        ["post"] if "post" in groups else [])
    gen = torch.Generator().manual_seed(seed)
    weight_map: Dict[str, str] = {}
    total = 0
    for idx, key in enumerate(keys):
        fname = f"model-{idx + 1:05d}-of-{len(keys):05d}.safetensors"
        tensors = {}
        for n in groups[key]:
            shape = tuple(state[n].shape)
            leaf = n.rsplit(".", 1)[-1]
            if leaf == "bias":
                t = torch.zeros(shape, dtype=dtype)
            elif "norm" in n and len(shape) == 1:
                t = torch.ones(shape, dtype=dtype)
            else:
                t = (torch.randn(shape, generator=gen, dtype=torch.float32) * 0.02).to(dtype)
            tensors[n] = t.contiguous()
            total += t.numel() * t.element_size()
            weight_map[n] = fname
        tmp = out / (fname + ".tmp")
        save_file(tensors, str(tmp), metadata={"format": "pt"})
        os.replace(tmp, out / fname)
        logger.info("synth: wrote %s (%d tensors)", fname, len(tensors))
        del tensors
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    config.save_pretrained(out)
