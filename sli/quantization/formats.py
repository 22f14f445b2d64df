"""The data a codec produces: a quantized tensor, and a layer of them as the cache stores it."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, Tuple

import torch
from torch import Tensor

from ..device import pinned
from .config import parse_dtype


@dataclass
class QuantizedTensor:
    """A quantized weight: codec tensors plus JSON-able metadata.

    ``metadata`` always holds ``codec`` (the mode's value), ``shape`` (the original
    ``[out, in]``) and ``dtype`` (the original dtype's name). Tensor names starting with
    ``_`` are what a codec's ``prepare`` adds for computing; they are never stored.
    """

    tensors: Dict[str, Tensor]
    metadata: Dict[str, Any] = field(default_factory=dict)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors.values())

    @property
    def shape(self) -> torch.Size:
        return torch.Size(self.metadata["shape"])

    @property
    def dtype(self) -> torch.dtype:
        return parse_dtype(self.metadata["dtype"], "dtype")

    def to(self, device: torch.device, non_blocking: bool = False) -> "QuantizedTensor":
        moved = {k: v.to(device, non_blocking=non_blocking) for k, v in self.tensors.items()}
        return QuantizedTensor(moved, dict(self.metadata))


@dataclass
class CachedLayer:
    """The serialized form of one (quantized) layer: what the layer cache stores.

    ``tensors`` maps names inside the layer (``"self_attn.q_proj.weight"``,
    ``"self_attn.q_proj.weight.absmax"``, ``"input_layernorm.weight"``) to tensors;
    ``linears`` maps each quantized linear's module path (``"self_attn.q_proj"``) to its
    codec metadata (see :class:`QuantizedTensor`). Tensors of modules that are not
    quantized linears (norms, biases, embeddings) are stored as they are.
    """

    tensors: Dict[str, Tensor]
    linears: Dict[str, Dict[str, Any]] = field(default_factory=dict)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors.values())

    def pinned(self) -> "CachedLayer":
        """The same entry in page-locked host memory (:func:`sli.device.pinned`)."""
        return CachedLayer({k: pinned(t) for k, t in self.tensors.items()}, self.linears)


def split_cached(cached: CachedLayer) -> Tuple[Dict[str, QuantizedTensor], Dict[str, Tensor]]:
    """Group a cached layer's tensors: ({linear path: QuantizedTensor}, {name: plain tensor})."""
    grouped: Dict[str, Dict[str, Tensor]] = {path: {} for path in cached.linears}
    plain: Dict[str, Tensor] = {}
    # Longest linear path first, so "mlp.fc" does not claim "mlp.fc2"'s tensors.
    paths = sorted(cached.linears, key=len, reverse=True)
    for name, tensor in cached.tensors.items():
        owner = next((p for p in paths if name.startswith(p + ".")), None)
        if owner is None or name == owner + ".bias":
            plain[name] = tensor
        else:
            grouped[owner][name[len(owner) + 1:]] = tensor
    return {p: QuantizedTensor(t, cached.linears[p]) for p, t in grouped.items()}, plain


def join_path(prefix: str, name: str) -> str:
    """``"a.b"`` from ``("a", "b")``; either part may be empty."""
    return f"{prefix}.{name}" if prefix and name else prefix or name
