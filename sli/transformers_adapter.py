"""Every use of ``transformers`` beyond its public ``Auto*`` API, in one place.

sli builds a model's skeleton from transformers' own modeling code, loads checkpoint tensors
through transformers' key renaming and conversion rules (so every family it loads loads
here), and runs the model's forward with a KV cache. Those calls use internals whose names
and signatures move between releases, so they live here alone: the installed version is
checked against :data:`SUPPORTED_TRANSFORMERS` at import (one line naming the range), and
tests/test_transformers_adapter.py pins each signature used, so an upgrade fails in one
clear place and not deep inside a forward pass.
"""
from __future__ import annotations

import contextlib
import inspect
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Tuple

import torch
import transformers
from torch import nn

from .errors import SLIError

SUPPORTED_TRANSFORMERS = ("5.16", "6")  # [lowest tested, first unsupported major)


def _version_tuple(version: str) -> Tuple[int, ...]:
    return tuple(int(p) for p in version.split(".")[:2] if p.isdigit())


def check_transformers_version(version: str = transformers.__version__) -> None:
    low, high = SUPPORTED_TRANSFORMERS
    if not _version_tuple(low) <= _version_tuple(version) < _version_tuple(high):
        raise SLIError(f"transformers {version} is installed; sli supports transformers>={low},<{high}: "
                       f"pip install 'transformers>={low},<{high}'")


check_transformers_version()

from transformers.conversion_mapping import get_model_conversion_mapping  # noqa: E402
from transformers.core_model_loading import (WeightConverter, WeightRenaming,  # noqa: E402
                                             convert_and_load_state_dict_in_model, rename_source_key)
from transformers.integrations.sdpa_attention import sdpa_attention_forward  # noqa: E402
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask  # noqa: E402
from transformers.modeling_utils import LoadStateDictConfig  # noqa: E402
from transformers.utils import logging as hf_logging  # noqa: E402


def load_config(model_dir: Path):
    """The model directory's config (offline)."""
    return transformers.AutoConfig.from_pretrained(model_dir, local_files_only=True)


def load_tokenizer(model_dir: Path):
    return transformers.AutoTokenizer.from_pretrained(model_dir, local_files_only=True)


def build_skeleton(config, dtype: torch.dtype) -> nn.Module:
    """The causal LM of ``config`` with its parameters on the meta device (buffers such as
    rotary tables real). Raises ``ValueError`` when transformers has no causal-LM class."""
    from accelerate import init_empty_weights

    with init_empty_weights():
        return transformers.AutoModelForCausalLM.from_config(config, dtype=dtype)


@contextlib.contextmanager
def _no_progress_bars() -> Iterator[None]:
    enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if enabled:
            hf_logging.enable_progress_bar()


@contextlib.contextmanager
def gguf_files_read_once() -> Iterator[None]:
    """Meanwhile each GGUF file is parsed once, and gguf's tensor-name map built once an
    architecture. transformers parses the file anew for the config, the tokenizer and the
    weights (``gguf.GGUFReader``: ~8 s each for SmolLM2's 49152-token vocabulary on a 2-core
    Zen 3) and builds the name map again for each module it walks; the default model's
    conversion took 27-31 s, with this 14 s, writing the same bytes (docs/benchmarks.md).
    The readers are read-only file maps, dropped at the end. (gguf's module attributes are
    replaced meanwhile: a conversion is not run beside another use of gguf.)"""
    import functools

    import gguf

    reader, name_map = gguf.GGUFReader, gguf.get_tensor_name_map
    opened: Dict[tuple, Any] = {}

    def read_once(path, *args, **kwargs):
        key = (str(path), args, tuple(sorted(kwargs.items())))
        if key not in opened:
            opened[key] = reader(path, *args, **kwargs)
        return opened[key]

    gguf.GGUFReader, gguf.get_tensor_name_map = read_once, functools.lru_cache(maxsize=None)(name_map)
    try:
        yield
    finally:
        gguf.GGUFReader, gguf.get_tensor_name_map = reader, name_map
        opened.clear()


class KeyMapper:
    """Where each checkpoint tensor lands in a model: transformers' renaming and conversion
    rules for the model's family (MoE experts stored one by one and fused in the module, ...)."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.weight_mapping = get_model_conversion_mapping(model)
        self._renamings = [w for w in self.weight_mapping if isinstance(w, WeightRenaming)]
        self._converters = [w for w in self.weight_mapping if isinstance(w, WeightConverter)]
        self._meta_state = model.state_dict()

    def target(self, checkpoint_key: str) -> str:
        """The model's state-dict name that ``checkpoint_key`` loads into."""
        target, _ = rename_source_key(checkpoint_key, self._renamings, self._converters,
                                      self.model.base_model_prefix, self._meta_state)
        if target not in self._meta_state and checkpoint_key in self._meta_state:
            return checkpoint_key
        return target

    def load(self, model: nn.Module, state: Dict[str, torch.Tensor], dtype: Optional[torch.dtype],
             device: str = "cpu") -> None:
        """Load checkpoint tensors ``state`` (checkpoint names) into ``model`` where they belong,
        converted to ``dtype`` (None keeps each tensor's own)."""
        config = LoadStateDictConfig(dtype=dtype, weight_mapping=self.weight_mapping, device_map={"": device})
        with _no_progress_bars():
            convert_and_load_state_dict_in_model(model, state, config)


def new_kv_cache(config, make_layer=None) -> Any:
    """An empty KV cache object for a model of ``config``. With ``make_layer(index)``, each
    full-attention layer's cache is what it returns (sli's compact layers); sliding-window and
    other layer kinds keep transformers' own."""
    cache = transformers.DynamicCache(config=config)
    if make_layer is not None:
        if not cache.layers:  # no per-layer types in the config: one full-attention layer each
            cache.layers = [transformers.DynamicLayer() for _ in range(text_config(config).num_hidden_layers)]
        cache.layers = [make_layer(index) if type(layer) is transformers.DynamicLayer else layer
                        for index, layer in enumerate(cache.layers)]
    return cache


def full_attention_cache_layer() -> type:
    """transformers' per-layer cache class for full attention (what a compact layer replaces)."""
    return transformers.DynamicLayer


def sdpa_attention(module: nn.Module, query, key, value, attention_mask, **kwargs):
    """transformers' SDPA attention function: ``(attn_output [B, S, H, D], None)``."""
    return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)


def use_attention(model: nn.Module, name: str, forward) -> bool:
    """Run ``model``'s attention through ``forward`` (the attention-interface signature),
    registered as ``name`` with SDPA's masks, when the model runs SDPA; returns whether it does
    now. A model on another implementation (eager, flash), or whose modeling code does not
    call the attention interface (``_supports_attention_backend`` unset: Falcon), keeps its own."""
    if (getattr(model.config, "_attn_implementation", None) != "sdpa"
            or not getattr(model, "_supports_attention_backend", False)):
        return False
    transformers.AttentionInterface.register(name, forward)
    AttentionMaskInterface.register(name, sdpa_mask)
    model.set_attn_implementation(name)
    return model.config._attn_implementation == name


def cache_argument(model: nn.Module) -> str:
    """The forward's KV-cache argument: ``cache`` from transformers 5.24 on (``past_key_values``
    is deprecated there), ``past_key_values`` before."""
    params = inspect.signature(model.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def output_cache(output) -> Any:
    """The KV cache a forward returned."""
    cache = getattr(output, "cache", None)
    return cache if cache is not None else output.past_key_values


def last_logits_kwargs(model: nn.Module) -> Dict[str, int]:
    """Forward kwargs that compute logits for the last position only (where supported)."""
    return {"logits_to_keep": 1} if "logits_to_keep" in inspect.signature(model.forward).parameters else {}


@dataclass
class DecoderParts:
    """The modules a causal LM's forward runs around its decoder layers."""

    base: nn.Module  # the base model (LlamaModel, ...), whose class says what its forward does
    embed: nn.Module
    rotary: nn.Module  # rotary(hidden, position_ids) -> (cos, sin)
    norm: nn.Module
    head: nn.Module


def decoder_parts(model: nn.Module) -> Optional[DecoderParts]:
    """``model``'s embedding, rotary embedding, final norm and head (transformers' names), or
    None where it has not all of them."""
    base = model.get_decoder() if hasattr(model, "get_decoder") else None
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    parts = [getattr(base, name, None) for name in ("embed_tokens", "rotary_emb", "norm")]
    if base is None or head is None or any(part is None for part in parts):
        return None
    return DecoderParts(base, *parts, head)


def text_config(config):
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def internals_used() -> List[Tuple[Any, List[str]]]:
    """Each internal callable sli uses with the parameters it passes (pinned by a test)."""
    return [
        (convert_and_load_state_dict_in_model, ["model", "state_dict", "load_config"]),
        (rename_source_key, ["source_key", "weight_renamings", "weight_converters", "base_model_prefix",
                             "meta_state_dict"]),
        (get_model_conversion_mapping, ["model"]),
        (LoadStateDictConfig, ["dtype", "weight_mapping", "device_map"]),
        (transformers.DynamicCache, ["config"]),
        (transformers.DynamicLayer.update, ["key_states", "value_states"]),
        (transformers.DynamicLayer.get_mask_sizes, ["query_length"]),
        (sdpa_attention_forward, ["module", "query", "key", "value", "attention_mask", "dropout", "scaling"]),
        (transformers.PreTrainedModel.set_attn_implementation, ["attn_implementation"]),
    ]
