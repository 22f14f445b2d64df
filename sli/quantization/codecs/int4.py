"""INT4: group-wise asymmetric int4, a scale and a zero point per group."""
from __future__ import annotations

from typing import Any, Dict, Optional

import torch
from torch import Tensor

from ... import kernels
from ..config import QuantizationConfig, QuantizationMode, dtype_name
from ..formats import QuantizedTensor
from .base import Codec, check_float, compute_into, write_into


def grouped(weight: Tensor, g: int) -> Tensor:
    """``weight`` as float32 ``[out, groups, g]``, ``in`` zero-padded to a multiple of ``g``."""
    w = weight.detach().float()
    if w.dim() != 2:
        w = w.reshape(w.shape[0], -1)
    rows, cols = w.shape
    padded = -(-cols // g) * g
    if padded != cols:
        w = torch.nn.functional.pad(w, (0, padded - cols))
    return w.view(rows, padded // g, g)


def group_params(wmin: Tensor, wmax: Tensor) -> "tuple[Tensor, Tensor]":
    """The fp16 scale and the zero point (float, 0..15) whose grid spans ``[wmin, wmax]`` (0 included)."""
    wmin, wmax = wmin.clamp(max=0), wmax.clamp(min=0)
    scale = ((wmax - wmin) / 15.0).clamp(min=1e-8).to(torch.float16)
    scale = torch.where(scale == 0, torch.ones_like(scale), scale)  # fp16 underflow
    zero = torch.round(-wmin / scale.float()).clamp(0, 15)
    return scale, zero


def group_codes(wg: Tensor, s: Tensor, zero: Tensor) -> Tensor:
    """uint8 codes ``clamp(round(w / s) + z, 0, 15)`` of ``wg`` ``[..., g]`` (``s``, ``zero`` one per group)."""
    return (torch.round(wg / s.unsqueeze(-1)) + zero.unsqueeze(-1)).clamp_(0, 15).to(torch.uint8)


class Int4Codec(Codec):
    """Group-wise asymmetric int4: ``q = clamp(round(w / s) + z, 0, 15)``, two values a byte
    (first value in the high nibble). ``in`` is zero-padded to a multiple of the group size
    (``metadata["padded_in"]``)."""

    mode = QuantizationMode.INT4
    byte_fields = ("group_size",)
    upgrade = QuantizationMode.INT8
    methods = ("rtn", "gptq")
    # its dequantization is the slow part of a prompt's product: a 4096x11008 weight on the AMX
    # Xeon, fused 6.4 / 20.5 / 36.6 ms at 17 / 64 / 128 rows against 51-63 ms dequantizing. A
    # whole pass at 128 rows is slower fused (SmolLM2: 360 against 220 ms, torch's own ops on one
    # thread), at 64 faster (185 against 219; docs/benchmarks.md)
    fused_max_rows = 64

    def quantize(self, weight: Tensor, config: QuantizationConfig) -> QuantizedTensor:
        check_float(weight)
        g = int(config.group_size)
        wg = grouped(weight, g)
        scale, zero = group_params(wg.amin(dim=-1), wg.amax(dim=-1))
        return self._pack(weight, wg, scale, zero, g)

    def quantize_with(self, weight: Tensor, config: QuantizationConfig, scale: Tensor, zero: Tensor,
                      source_dtype: Optional[torch.dtype] = None) -> QuantizedTensor:
        """``weight`` rounded on the grid of the given per-group ``scale`` (fp16 ``[out, groups]``) and
        ``zero`` (``[out, groups]``, integers 0..15): how a calibrated method (GPTQ) writes its result.
        A weight already on that grid gives back its own codes. ``source_dtype``: the dtype the
        entry records as the original weight's (default ``weight``'s)."""
        check_float(weight)
        g = int(config.group_size)
        return self._pack(weight, grouped(weight, g), scale.to(torch.float16), zero.float(), g, source_dtype)

    def _pack(self, weight: Tensor, wg: Tensor, scale: Tensor, zero: Tensor, g: int,
              source_dtype: Optional[torch.dtype] = None) -> QuantizedTensor:
        rows, groups, _ = wg.shape
        padded = groups * g
        q = group_codes(wg, scale.float(), zero).view(rows, padded)
        packed = (q[:, 0::2] << 4) | q[:, 1::2]
        tensors = {"weight": packed.contiguous(), "weight.scales": scale, "weight.zeros": zero.to(torch.uint8)}
        meta = self._meta(weight, self.mode, group_size=g, padded_in=padded)
        if source_dtype is not None:
            meta["dtype"] = dtype_name(source_dtype)
        return QuantizedTensor(tensors, meta)

    def dequantize(self, q: QuantizedTensor, dtype: torch.dtype, out: Optional[Tensor] = None) -> Tensor:
        t = q.tensors
        packed = t["weight"]
        shape = tuple(q.metadata["shape"])
        if packed.device.type == "cpu" and len(shape) == 2 and kernels.kernels_enabled():
            return compute_into(lambda buf: kernels.dequantize_int4(packed, t["weight.scales"], t["weight.zeros"],
                                                                    int(q.metadata["group_size"]), buf),
                                shape, dtype, packed.device, out)  # the numba kernel: ~20x the torch ops below
        rows = packed.shape[0]
        g = int(q.metadata["group_size"])
        padded = int(q.metadata.get("padded_in", packed.shape[1] * 2))
        vals = torch.stack((packed >> 4, packed & 0xF), dim=-1).view(rows, padded // g, g).float()
        w = (vals - t["weight.zeros"].float().unsqueeze(-1)) * t["weight.scales"].float().unsqueeze(-1)
        shape = tuple(q.metadata["shape"])
        w = w.view(rows, padded)[:, : int(shape[-1]) if len(shape) == 2 else padded]
        return write_into(w.reshape(shape).to(dtype), out)

    def row_slice(self, q: QuantizedTensor, start: int, stop: int) -> Optional[QuantizedTensor]:
        if len(q.metadata["shape"]) != 2:
            return None
        return self._rows(q, start, stop, per_row=("weight", "weight.scales", "weight.zeros"))

    def fused_linear(self, q: QuantizedTensor, x: Tensor, bias: Optional[Tensor]) -> Optional[Tensor]:
        if len(q.metadata["shape"]) != 2:
            return None
        t = q.tensors
        return kernels.matmul_int4(x, t["weight"], t["weight.scales"], t["weight.zeros"], int(q.metadata["group_size"]),
                                   int(q.metadata["shape"][1]), bias)

    def row_product(self, q: QuantizedTensor, bias: Optional[Tensor]):
        if len(q.metadata["shape"]) != 2:
            return None
        from ...kernels import bound

        t = q.tensors
        return bound.int4(t["weight"], t["weight.scales"], t["weight.zeros"], int(q.metadata["group_size"]),
                          int(q.metadata["shape"][1]), bias)

