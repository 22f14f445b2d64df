"""What each decoder layer is given besides its hidden states, captured from one forward of
the processor's model with the layers standing in as the identity."""
from __future__ import annotations

import dataclasses
import logging
from typing import Any, Dict, List, Tuple

import torch
from torch import nn

from .. import settings
from ..errors import SLIError

logger = logging.getLogger(__name__)


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


COMPILE_MIN_VALUES = settings.DEFAULT_SETTINGS["calibration_compile_min_values"]
_compile_failed = False


def compiled(layer: nn.Module, hidden: torch.Tensor) -> nn.Module:
    """``layer`` as the calibration passes run it over chunks like ``hidden``: through
    ``torch.compile`` on CPU for chunks of :data:`COMPILE_MIN_VALUES` values or more, else as it
    is (``SLI_NO_COMPILE=1``, another device, a compile that failed once). Compiled, a layer's
    norms, rotary products and activation run fused (a 7B-shaped layer's pass over 4096 tokens
    in bfloat16: 1.34 → 1.08 s on the AMX Xeon), its products in the same oneDNN kernels. One
    compile a process (~3 s; ~20 s the first time on a machine, before inductor's on-disk cache
    holds it) serves every layer of a model: they share a structure and their
    weights are the graph's inputs. Hooks on its modules run eagerly (:func:`eager_hook`); the
    compiled code is guarded on where they are (:func:`run_layer`), so a layer hooked elsewhere,
    or the same layer hooked again, compiles anew instead of skipping its hooks."""
    if (_compile_failed or hidden.device.type != "cpu" or hidden.numel() < COMPILE_MIN_VALUES
            or settings.flag("SLI_NO_COMPILE")):
        return layer
    return torch.compile(layer, dynamic=False)


def eager_hook(hook):
    """``hook`` run as plain Python in a compiled layer (the compile stops at it and resumes after)."""
    import torch._dynamo

    return torch._dynamo.disable(hook)


def run_layer(layer: nn.Module, hidden: torch.Tensor, inputs: LayerArgs) -> torch.Tensor:
    """``layer``'s output hidden states for ``hidden`` and its other arguments, their float
    tensors (rotary tables, masks) in ``hidden``'s dtype, as the model gives them when it runs
    in that dtype. A :func:`compiled` layer whose compile fails runs eagerly, from then on."""
    args = tuple(_in_dtype(a, hidden.dtype) for a in inputs.args)
    kwargs = {k: _in_dtype(v, hidden.dtype) for k, v in inputs.kwargs.items()}
    eager = getattr(layer, "_orig_mod", None)  # a compiled layer's own module
    if eager is None or _compile_failed:
        out = (layer if eager is None else eager)(hidden, *args, **kwargs)
    else:
        out = _run_compiled(layer, eager, hidden, args, kwargs)
    return out[0] if isinstance(out, tuple) else out


def _run_compiled(layer: nn.Module, eager: nn.Module, hidden: torch.Tensor, args: tuple, kwargs: dict):
    """``layer`` (compiled from ``eager``) called, guarded on its modules' hooks (dynamo's default
    leaves them out: a hook added later would never run); where the compile fails, ``eager``."""
    global _compile_failed
    import torch._dynamo

    try:
        with torch._dynamo.config.patch(skip_nnmodule_hook_guards=False):
            return layer(hidden, *args, **kwargs)
    except Stop:
        raise
    except Exception as exc:  # no C compiler, an operation inductor cannot lower, ...
        _compile_failed = True
        logger.warning("calibration: torch.compile of the decoder layer failed (%s: %s); its passes run "
                       "eagerly (~20%% slower)", type(exc).__name__, str(exc).splitlines()[0] if str(exc) else "")
        return eager(hidden, *args, **kwargs)


def _in_dtype(value: Any, dtype: torch.dtype) -> Any:
    if isinstance(value, torch.Tensor):
        return value.to(dtype) if value.is_floating_point() else value
    if isinstance(value, tuple):
        return tuple(_in_dtype(v, dtype) for v in value)
    return value
