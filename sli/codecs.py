"""Tensor codecs: one per quantization mode, each a matched quantize/dequantize pair.

A codec turns one linear weight ``[out, in]`` into a :class:`QuantizedTensor`: named
tensors (storable in a safetensors file as they are) plus a small JSON-able metadata
dict. Tensor names follow transformers' bitsandbytes checkpoints so quantized layers can
be exported as a checkpoint transformers loads:

=============  ==========================================================================
mode           tensors (names relative to the linear module)
=============  ==========================================================================
none           ``weight`` (the checkpoint's own dtype, lossless)
int8           ``weight`` int8 [out, in], ``SCB`` fp32 [out], ``weight_format`` uint8 [];
               outliers: ``weight.outlier_cols`` int64 [k], ``weight.outliers`` 16-bit [out, k]
int8_dynamic   ``weight`` int8 [out, in], ``SCB`` fp32 [out], ``weight_format`` uint8 []
nf4 / fp4      ``weight`` uint8 [numel/2, 1], ``weight.absmax``, ``weight.quant_map`` fp32[16],
               double quant: ``weight.nested_absmax``, ``weight.nested_quant_map``;
               ``weight.quant_state.bitsandbytes__nf4`` (or ``__fp4``): uint8 JSON bytes
int4           ``weight`` uint8 [out, in/2], ``weight.scales`` fp16 [out, in/g],
               ``weight.zeros`` uint8 [out, in/g]
fp8            ``weight`` float8_e4m3fn [out, in], ``weight.scale`` fp32 [out]
=============  ==========================================================================

Codecs register themselves by subclassing :class:`Codec` (``mode = ...``).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, ClassVar, Dict, Optional

import torch
from torch import Tensor

from .quantization import QuantizationConfig, QuantizationMode, dtype_name, parse_dtype

logger = logging.getLogger(__name__)


@dataclass
class QuantizedTensor:
    """A quantized weight: codec tensors plus JSON-able metadata.

    ``metadata`` always holds ``codec`` (the mode's value), ``shape`` (the original
    ``[out, in]``) and ``dtype`` (the original dtype's name).
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


class Codec:
    """Base class: subclasses set ``mode`` and implement quantize / dequantize."""

    mode: ClassVar[QuantizationMode]
    _registry: ClassVar[Dict[QuantizationMode, "Codec"]] = {}

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        Codec._registry[cls.mode] = cls()

    def quantize(self, weight: Tensor, config: QuantizationConfig) -> QuantizedTensor:
        raise NotImplementedError

    def dequantize(self, q: QuantizedTensor, dtype: torch.dtype, out: Optional[Tensor] = None) -> Tensor:
        """The weight ``[out, in]`` in ``dtype`` on the device ``q`` lives on.

        ``out``, when given, is a preallocated tensor of the right shape and dtype to
        write into (the streaming loader reuses buffers so freed layers are not kept by
        the allocator).
        """
        raise NotImplementedError

    def prepare_input(self, x: Tensor) -> Tensor:
        """What a linear layer feeds to the matmul: ``x`` itself for weight-only modes."""
        return x

    @staticmethod
    def _meta(weight: Tensor, mode: QuantizationMode, **extra: Any) -> Dict[str, Any]:
        return {"codec": mode.value, "shape": list(weight.shape), "dtype": dtype_name(weight.dtype), **extra}


def codec_for(mode: QuantizationMode | str) -> Codec:
    """The registered codec of ``mode``."""
    return Codec._registry[QuantizationMode(mode)]


def _write(result: Tensor, out: Optional[Tensor]) -> Tensor:
    if out is None:
        return result
    out.copy_(result.view(out.shape))
    return out


class NoneCodec(Codec):
    """No quantization: the weight is kept as stored in the checkpoint."""

    mode = QuantizationMode.NONE

    def quantize(self, weight: Tensor, config: QuantizationConfig) -> QuantizedTensor:
        return QuantizedTensor({"weight": weight.contiguous()}, self._meta(weight, self.mode))

    def dequantize(self, q: QuantizedTensor, dtype: torch.dtype, out: Optional[Tensor] = None) -> Tensor:
        weight = q.tensors["weight"]
        if out is not None:
            return out.copy_(weight)
        return weight.to(dtype)
