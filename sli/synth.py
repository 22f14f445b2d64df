"""Synthetic, randomly initialised checkpoints for tests and benchmarks.

``synth_model(out_dir, family, preset)`` writes a Hugging Face style folder (``config.json`` and
safetensors weights) deterministically from ``seed``. Small presets are built with
``AutoModelForCausalLM.from_config`` and ``save_pretrained``; large ones (over ~500 M parameters)
are never held in memory whole: the layout comes from a meta-device model and the tensors are
written shard by shard, one decoder layer per shard.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Dict, Optional, Union

import torch

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
        "7b": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                   num_key_value_heads=32, max_position_embeddings=4096, vocab_size=32000, bos_token_id=1,
                   eos_token_id=2, pad_token_id=0, tie_word_embeddings=False, rms_norm_eps=1e-5),
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
}

LARGE_PARAMS = 500_000_000


def known_presets() -> str:
    return "; ".join(f"{fam}: {', '.join(sorted(p))}" for fam, p in sorted(FAMILY_PRESETS.items()))


def make_config(family: str = "llama", preset: str = "tiny", num_layers: Optional[int] = None):
    """The transformers config of ``family``/``preset`` (``num_layers`` overrides the depth)."""
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
    if family == "gemma2":
        n = kwargs["num_hidden_layers"]
        kwargs.setdefault("layer_types", ["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(n)])
    return AutoConfig.for_model(family, **kwargs)


def _param_count(config) -> int:
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(config)
    return sum(p.numel() for p in model.parameters())


def synth_model(out_dir: Union[str, os.PathLike], family: str = "llama", preset: str = "tiny",
                num_layers: Optional[int] = None, dtype: torch.dtype = torch.bfloat16, seed: int = 0,
                max_shard_size: Optional[Union[int, str]] = None) -> Path:
    """Write a random ``family``/``preset`` checkpoint into ``out_dir``; return its path.

    Deterministic in ``seed``. Raises ``ValueError`` for an unknown family or preset.
    """
    config = make_config(family, preset, num_layers)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    config.dtype = dtype
    if _param_count(config) > LARGE_PARAMS:
        _write_large(out, config, dtype, seed)
        return out
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    model = model.to(dtype)
    kwargs: Dict[str, Any] = {"safe_serialization": True}
    if max_shard_size is not None:
        kwargs["max_shard_size"] = max_shard_size
    try:
        model.save_pretrained(out, **kwargs)
    except TypeError:
        kwargs.pop("safe_serialization")
        model.save_pretrained(out, **kwargs)
    if getattr(model, "generation_config", None) is not None and not (out / "generation_config.json").exists():
        model.generation_config.save_pretrained(out)
    return out


def _layer_of(name: str) -> Optional[int]:
    parts = name.split(".")
    for i, part in enumerate(parts[:-1]):
        if part in ("layers", "h", "blocks") and parts[i + 1].isdigit():
            return int(parts[i + 1])
    return None


def _write_large(out: Path, config, dtype: torch.dtype, seed: int) -> None:
    """Write a checkpoint too large to build in memory: one shard per decoder layer."""
    from accelerate import init_empty_weights
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM

    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(config)
    state = model.state_dict()
    names = list(state.keys())
    if getattr(config, "tie_word_embeddings", False):
        names = [n for n in names if n != "lm_head.weight"]
    groups: Dict[str, list] = {}
    order: list = []
    for n in names:
        layer = _layer_of(n)
        key = "pre" if layer is None and not n.startswith(("lm_head", "model.norm")) else (
            "post" if layer is None else f"layer{layer:05d}")
        if key not in groups:
            groups[key] = []
            order.append(key)
        groups[key].append(n)
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
        del tensors
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    config.save_pretrained(out)
