"""What each decoder layer is given besides its hidden states, captured from one forward of
the processor's model with the layers standing in as the identity."""
from __future__ import annotations

import dataclasses
from typing import Any, Dict, List, Tuple

import torch
from torch import nn

from ..errors import SLIError


class Stop(Exception):
    pass


@dataclasses.dataclass
class LayerArgs:
    """What a decoder layer's forward takes besides the hidden states (the same for every layer)."""

    args: Tuple[Any, ...]
    kwargs: Dict[str, Any]


@torch.inference_mode()
def layer_inputs(processor, ids: torch.Tensor) -> Tuple[torch.Tensor, List[LayerArgs]]:
    """(hidden states, each decoder layer's other arguments) that the processor's model gives its
    layers for ``ids`` ``[B, S]``. One forward with every layer standing in as the identity (it
    records its arguments), stopped at the last: nothing is streamed or computed but the embeddings.
    Per layer, because layers may differ (sliding-window masks, local rotary tables)."""
    layers = processor.layers
    seen: List[Tuple[tuple, Dict[str, Any]]] = []

    def recorder(index: int):
        def forward(*args, **kwargs):
            seen.append((args, dict(kwargs)))
            if index == len(layers) - 1:
                raise Stop
            return args[0] if args else kwargs["hidden_states"]
        return forward

    saved = [layer.__dict__.get("forward") for layer in layers]  # the runner's own, when it set one
    for index, layer in enumerate(layers):
        layer.forward = recorder(index)
    try:
        processor.model(input_ids=ids.to(processor.device), use_cache=False)
    except Stop:
        pass
    finally:
        for layer, forward in zip(layers, saved):
            if forward is None:
                del layer.forward
            else:
                layer.forward = forward
    if len(seen) != len(layers):
        raise SLIError(f"the model's forward called {len(seen)} of its {len(layers)} decoder layers")
    hidden = seen[0][0][0] if seen[0][0] else seen[0][1]["hidden_states"]
    out = []
    for args, kwargs in seen:
        kwargs.pop("hidden_states", None)
        out.append(LayerArgs(tuple(args[1:]), kwargs))
    return hidden, out


def run_layer(layer: nn.Module, hidden: torch.Tensor, inputs: LayerArgs) -> torch.Tensor:
    """``layer``'s output hidden states for ``hidden`` and its other arguments, their float
    tensors (rotary tables, masks) in ``hidden``'s dtype, as the model gives them when it runs
    in that dtype."""
    args = tuple(_in_dtype(a, hidden.dtype) for a in inputs.args)
    kwargs = {k: _in_dtype(v, hidden.dtype) for k, v in inputs.kwargs.items()}
    out = layer(hidden, *args, **kwargs)
    return out[0] if isinstance(out, tuple) else out


def _in_dtype(value: Any, dtype: torch.dtype) -> Any:
    if isinstance(value, torch.Tensor):
        return value.to(dtype) if value.is_floating_point() else value
    if isinstance(value, tuple):
        return tuple(_in_dtype(v, dtype) for v in value)
    return value
