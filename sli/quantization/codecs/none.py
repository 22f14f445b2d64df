"""NONE: the weight as the checkpoint stores it (lossless)."""
from __future__ import annotations

from typing import Any, Dict, Optional

import torch
from torch import Tensor

from ... import kernels
from ..config import QuantizationConfig, QuantizationMode
from ..formats import QuantizedTensor
from .base import Codec, check_float, compute_into, write_into


class NoneCodec(Codec):
    """No quantization: the weight is kept as stored in the checkpoint."""

    mode = QuantizationMode.NONE
    upgrade = QuantizationMode.NONE

    def quantize(self, weight: Tensor, config: QuantizationConfig) -> QuantizedTensor:
        return QuantizedTensor({"weight": weight.contiguous()}, self._meta(weight, self.mode))

    def dequantize(self, q: QuantizedTensor, dtype: torch.dtype, out: Optional[Tensor] = None) -> Tensor:
        weight = q.tensors["weight"]
        if out is not None:
            return out.copy_(weight)
        return weight.to(dtype)

    def row_slice(self, q: QuantizedTensor, start: int, stop: int) -> Optional[QuantizedTensor]:
        return self._rows(q, start, stop, per_row=("weight",))

    def fused_linear(self, q: QuantizedTensor, x: Tensor, bias: Optional[Tensor]) -> Optional[Tensor]:
        weight = q.tensors["weight"]
        if weight.dtype != torch.bfloat16 or weight.dim() != 2:
            return None  # float32 weights go to BLAS as they are; fp16 has no kernel
        return kernels.matmul_bf16(x, weight, bias)

