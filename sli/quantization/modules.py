"""The one quantized-linear module, and the few facts about linear-like modules it needs."""
from __future__ import annotations

from typing import Dict, List, Optional

import torch
from torch import nn

from .codecs import codec_for
from .execution import WeightScratch, linear
from .formats import QuantizedTensor


def is_conv1d(module: nn.Module) -> bool:
    """GPT-2 style Conv1D: a linear whose weight is stored ``[in, out]``."""
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf")


def is_linear(module: nn.Module) -> bool:
    """True for the modules a quantizer replaces: nn.Linear and GPT-2's Conv1D."""
    return isinstance(module, nn.Linear) or is_conv1d(module)


def linear_weight(module: nn.Module) -> torch.Tensor:
    """The ``[out, in]`` weight of a linear-like module (Conv1D stores it transposed)."""
    return module.weight.t() if is_conv1d(module) else module.weight


def linear_paths(module: nn.Module) -> Dict[str, bool]:
    """Every linear inside ``module``: its path → whether it is a Conv1D."""
    return {name: is_conv1d(m) for name, m in module.named_modules() if name and is_linear(m)}


def set_submodule(root: nn.Module, path: str, module: nn.Module) -> None:
    """Put ``module`` at the dotted ``path`` inside ``root``."""
    parent_path, _, name = path.rpartition(".")
    parent = root.get_submodule(parent_path) if parent_path else root
    setattr(parent, name, module)


class QuantizedLinear(nn.Module):
    """A linear layer whose weight is a codec's :class:`QuantizedTensor`, multiplied as stored.

    The forward feeds ``x`` through the codec's ``prepare_input`` (INT8_DYNAMIC quantizes the
    activations per token; other modes pass it on) and multiplies by the quantized weight
    (:func:`sli.quantization.execution.linear`: a fused kernel for a few rows on CPU, row
    chunks or dequantize-then-BLAS otherwise). No dequantized copy of the weight is kept.

    The weight can be swapped: a streamed layer's linears get their weight with :meth:`load`
    when the layer is fetched and drop it with :meth:`unload` after it ran. The codec's
    tensors are buffers (names with ``.`` written as ``__``), so ``.to()`` and ``state_dict``
    see them. ``transposed`` records that the original module was a Conv1D; the quantized
    weight is always ``[out, in]``.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = False,
                 compute_dtype: torch.dtype = torch.float32, qweight: Optional[QuantizedTensor] = None,
                 transposed: bool = False, scratch: Optional[WeightScratch] = None) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.compute_dtype = compute_dtype
        self.transposed = transposed
        self.scratch = scratch
        self.metadata: Dict[str, object] = {}
        self._names: List[str] = []
        self._held: Optional[QuantizedTensor] = None  # qweight's view of the buffers, built once
        self.bias = nn.Parameter(torch.empty(out_features, dtype=compute_dtype, device="meta"),
                                 requires_grad=False) if bias else None
        if qweight is not None:
            self.load(qweight)

    @classmethod
    def from_quantized(cls, qweight: QuantizedTensor, bias: Optional[torch.Tensor], compute_dtype: torch.dtype,
                       transposed: bool = False) -> "QuantizedLinear":
        """A module holding ``qweight`` and a copy-free ``bias``."""
        out_features, in_features = qweight.metadata["shape"]
        module = cls(in_features, out_features, False, compute_dtype, qweight, transposed)
        if bias is not None:
            module.bias = nn.Parameter(bias.detach(), requires_grad=False)
        return module

    def load(self, qweight: QuantizedTensor) -> None:
        """Hold ``qweight`` (its tensors become this module's buffers)."""
        self.unload()
        self.metadata = dict(qweight.metadata)
        self._names = list(qweight.tensors)
        for name, tensor in qweight.tensors.items():
            self.register_buffer(name.replace(".", "__"), tensor)

    def unload(self) -> None:
        """Drop the weight's tensors (a streamed layer after it ran)."""
        for name in self._names:
            delattr(self, name.replace(".", "__"))
        self._names = []
        self._held = None

    def _apply(self, fn, recurse=True):  # .to(), .float(), ...: new buffers, a new view
        self._held = None
        return super()._apply(fn, recurse)

    def _load_from_state_dict(self, *args, **kwargs):
        self._held = None
        return super()._load_from_state_dict(*args, **kwargs)

    @property
    def loaded(self) -> bool:
        return bool(self._names)

    @property
    def qweight(self) -> QuantizedTensor:
        # Built once per load: a small model's decode calls it ~200 times a token. Buffers
        # change only through load/unload, _apply and load_state_dict, which drop it.
        held = self._held
        if held is None:
            if not self._names:
                raise RuntimeError("this QuantizedLinear has no weight loaded (a streamed layer runs only once fetched)")
            buffers = self._buffers
            held = self._held = QuantizedTensor({name: buffers[name.replace(".", "__")] for name in self._names},
                                                self.metadata)
        return held

    @property
    def codec(self):
        return codec_for(self.metadata["codec"])

    def dequantized_weight(self, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
        """The ``[out, in]`` weight in ``dtype`` (default: compute dtype)."""
        return self.codec.dequantize(self.qweight, dtype or self.compute_dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q = self.qweight
        x = self.codec.prepare_input(x.to(self.compute_dtype))
        bias = self.bias.to(self.compute_dtype) if self.bias is not None else None
        return linear(q, x, bias, scratch=self.scratch)

    def extra_repr(self) -> str:
        codec = self.metadata.get("codec", "not loaded")
        return f"in_features={self.in_features}, out_features={self.out_features}, codec={codec}"
