"""The model without its weights: the config read and checked, two skeletons on the meta
device (the one that runs, in the compute dtype; the one the checkpoint loader fills, in the
checkpoint's dtype), and the decoder linears swapped for empty :class:`QuantizedLinear`
modules that a streamed layer fills pass after pass (the packed strategy).
"""
from __future__ import annotations

from pathlib import Path
from typing import Dict, List, Tuple

import torch
from torch import nn

from . import transformers_adapter as hf
from .errors import ModelLoadError, UnsupportedArchitectureError
from .quantization import QuantizedLinear
from .quantization.execution import WeightScratch
from .quantization.modules import set_submodule


def read_config(model_dir: Path):
    """The model's transformers config.

    Raises:
        ModelLoadError: no readable config.json.
        UnsupportedArchitectureError: an encoder-decoder model.
    """
    try:
        config = hf.load_config(model_dir)
    except (ValueError, OSError, KeyError) as exc:
        raise ModelLoadError(f"cannot read {model_dir / 'config.json'} ({exc}); is it a transformers model?") from exc
    if getattr(config, "is_encoder_decoder", False):
        raise UnsupportedArchitectureError(
            f"{config.model_type!r} is an encoder-decoder model; sli streams decoder-only causal LMs")
    return config


def build_skeletons(config, compute_dtype: torch.dtype, storage_dtype: torch.dtype) -> Tuple[nn.Module, nn.Module]:
    """The skeleton that runs (``compute_dtype``, in eval mode) and the one the loader fills
    (``storage_dtype``). Raises :class:`UnsupportedArchitectureError` for a model_type
    transformers has no causal-LM class for."""
    try:
        model = hf.build_skeleton(config, compute_dtype)
        loader_model = hf.build_skeleton(config, storage_dtype)
    except ValueError as exc:
        raise UnsupportedArchitectureError(
            f"transformers has no causal-LM class for model_type {config.model_type!r} ({exc}); "
            "sli streams AutoModelForCausalLM models") from exc
    model.eval()
    return model, loader_model


def swap_linears(layers: nn.ModuleList, linears: List[Dict[str, bool]], compute_dtype: torch.dtype) -> None:
    """Every decoder linear (``linears[i]``: layer i's linear path → is it a Conv1D) becomes an
    empty :class:`QuantizedLinear` of its shape, loaded per pass."""
    scratch = WeightScratch()  # one dequantized row chunk at a time, for prompts
    for index, layer in enumerate(layers):
        for path, conv1d in linears[index].items():
            module = layer.get_submodule(path)
            in_f, out_f = module.weight.shape if conv1d else module.weight.shape[::-1]
            set_submodule(layer, path, QuantizedLinear(in_f, out_f, module.bias is not None, compute_dtype,
                                                       transposed=conv1d, scratch=scratch))
