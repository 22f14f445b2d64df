"""FP8: float8_e4m3fn with a per-output-channel scale."""
from __future__ import annotations

from typing import Any, Dict, Optional

import torch
from torch import Tensor

from ... import kernels
from ..config import QuantizationConfig, QuantizationMode
from ..formats import QuantizedTensor
from .base import Allocate, Codec, check_float, compute_into, write_into


class FP8Codec(Codec):
    """float8_e4m3fn with a per-output-channel fp32 scale (row absmax / 448)."""

    mode = QuantizationMode.FP8
    upgrade = QuantizationMode.INT8

    def quantize(self, weight: Tensor, config: QuantizationConfig) -> QuantizedTensor:
        check_float(weight)
        w = weight.detach().float()
        scale = w.abs().amax(dim=1) / 448.0
        scale = torch.where(scale > 0, scale, torch.ones_like(scale))
        q = (w / scale.unsqueeze(1)).clamp_(-448, 448).to(torch.float8_e4m3fn)
        return QuantizedTensor({"weight": q, "weight.scale": scale}, self._meta(weight, self.mode))

    def dequantize(self, q: QuantizedTensor, dtype: torch.dtype, out: Optional[Tensor] = None) -> Tensor:
        scale = q.tensors["weight.scale"].float().unsqueeze(1)
        if out is not None and out.dtype == torch.float32:
            return out.copy_(q.tensors["weight"]).mul_(scale)  # in place: no temporaries
        w = q.tensors["weight"].float() * scale
        return write_into(w.to(dtype), out)

    def prepare(self, q: QuantizedTensor, allocate: Optional[Allocate] = None) -> QuantizedTensor:
        if "_scale" in q.tensors:
            return q
        return self._prepared(q, _scale=q.tensors["weight.scale"].float(), _lut=_float8_values())

    def row_slice(self, q: QuantizedTensor, start: int, stop: int) -> Optional[QuantizedTensor]:
        return self._rows(q, start, stop, per_row=("weight", "weight.scale", "_scale"))

    def fused_linear(self, q: QuantizedTensor, x: Tensor, bias: Optional[Tensor]) -> Optional[Tensor]:
        t = q.tensors
        return kernels.matmul_fp8(x, t["weight"], t["_scale"], bias)


_FLOAT8_VALUES: Optional[Tensor] = None


def _float8_values() -> Tensor:
    """All 256 float8_e4m3fn values as float32, indexed by their byte (NaN bytes stay NaN)."""
    global _FLOAT8_VALUES
    if _FLOAT8_VALUES is None:
        _FLOAT8_VALUES = torch.arange(256, dtype=torch.int32).to(torch.uint8).view(torch.float8_e4m3fn).float()
    return _FLOAT8_VALUES
