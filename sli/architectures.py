"""Finding the streamable parts of a transformers causal LM.

Discovery works from the built skeleton: the decoder layers are the ``nn.ModuleList``
whose length is the config's layer count; everything outside it (embeddings, final
norm, head, rotary embeddings) is shared and stays resident. The registry below holds
only what discovery cannot know, as data.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Dict, Optional

from torch import nn

from .errors import UnsupportedArchitectureError

logger = logging.getLogger(__name__)

# model_type -> overrides. Keys: "layers" (dotted path of the decoder-layer ModuleList),
# "num_layers_attr" (config attribute holding the layer count).
# Discovery finds every family tested so far (llama, mistral, qwen2, qwen3, gemma2, phi3,
# gpt2, gpt_neox, mixtral, ...) without an entry; add one here when a family keeps its
# layers elsewhere, e.g. {"my_family": {"layers": "backbone.blocks"}}.
ARCHITECTURE_OVERRIDES: Dict[str, Dict[str, str]] = {}


@dataclass(frozen=True)
class ModelLayout:
    """Where the decoder layers of a skeleton live."""

    layers_path: str  # e.g. "model.layers", "transformer.h", "gpt_neox.layers"
    num_layers: int

    def layer_prefix(self, index: int) -> str:
        return f"{self.layers_path}.{index}."


def _num_layers(config, override: Dict[str, str]) -> Optional[int]:
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    attr = override.get("num_layers_attr", "num_hidden_layers")
    return getattr(text_config, attr, None)


def discover_layout(model: nn.Module, config) -> ModelLayout:
    """The layout of ``model`` (built from ``config``), or an error saying how to add one."""
    model_type = getattr(config, "model_type", type(model).__name__)
    if getattr(config, "is_encoder_decoder", False):
        raise UnsupportedArchitectureError(
            f"{model_type!r} is an encoder-decoder model; sli streams decoder-only causal LMs "
            "(one stack of decoder layers run in order)")
    override = ARCHITECTURE_OVERRIDES.get(model_type, {})
    num_layers = _num_layers(config, override)
    if "layers" in override:
        layers = model.get_submodule(override["layers"])
        return ModelLayout(override["layers"], len(layers))
    candidates = [(name, m) for name, m in model.named_modules()
                  if isinstance(m, nn.ModuleList) and len(m) > 0 and (num_layers is None or len(m) == num_layers)]
    if not candidates:
        raise UnsupportedArchitectureError(
            f"found no list of {num_layers} decoder layers in {type(model).__name__}; add an entry "
            f"ARCHITECTURE_OVERRIDES[{model_type!r}] = {{'layers': '<path.to.layers>'}} in sli/architectures.py")
    # The decoder stack is the list holding the most parameters (MoE expert lists can
    # have the same length as the layer list but sit inside it).
    name, layers = max(candidates, key=lambda c: sum(p.numel() for p in c[1].parameters()))
    return ModelLayout(name, len(layers))
