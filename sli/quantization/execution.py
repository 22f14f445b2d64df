"""Running a linear whose weight is quantized: which way, by the input's size and the CPU.

Three ways, chosen per call by :func:`linear`:

- a fused kernel (:meth:`Codec.fused_linear`, :mod:`sli.kernels`) for a few float32 rows
  on CPU: decoding a token reads the packed bytes once, nothing is dequantized;
- row chunks on CPU for a prompt: each chunk of output rows is dequantized into a buffer
  small enough to stay in the last-level cache and multiplied while it is there;
- dequantize the whole weight, then BLAS: everywhere else (CUDA, codecs that cannot slice).
"""
from __future__ import annotations

import math
from typing import Iterable, Optional

import torch
from torch import Tensor

from .. import kernels, settings
from .codecs import Codec, codec_for
from .config import QuantizationConfig
from .formats import QuantizedTensor

# A prompt's linear dequantizes its weight this many bytes (float32) at a time.
PROMPT_CHUNK_BYTES = settings.DEFAULT_SETTINGS["prompt_chunk_bytes"]


class WeightScratch:
    """One reusable buffer for what a prompt's linear dequantizes: a row chunk of a weight
    (the whole weight where its codec cannot slice rows), one at a time (the layers run on
    one thread). Reusing it saves the page faults of a fresh allocation each time, which
    can cost more than the conversion itself."""

    def __init__(self) -> None:
        self._buffer = torch.empty(0)

    def take(self, shape: torch.Size, dtype: torch.dtype) -> Tensor:
        numel = math.prod(shape)
        if self._buffer.numel() < numel or self._buffer.dtype != dtype:
            self._buffer = torch.empty(numel, dtype=dtype)
        return self._buffer[:numel].view(shape)


def linear(q: QuantizedTensor, x: Tensor, bias: Optional[Tensor] = None,
           scratch: Optional[WeightScratch] = None) -> Tensor:
    """``F.linear(x, W, bias)`` for the quantized weight ``W`` (``x`` already through the
    codec's :meth:`Codec.prepare_input`)."""
    codec = codec_for(q.metadata["codec"])
    if kernels.use_fused(x, int(q.metadata["shape"][1])):
        y = codec.fused_linear(codec.prepare(q), x, bias)
        if y is not None:
            return y
    if x.device.type == "cpu":
        y = _linear_by_row_chunks(codec, q, x, bias, scratch)
        if y is not None:
            return y
    out = scratch.take(q.shape, x.dtype) if scratch is not None else None
    return torch.nn.functional.linear(x, codec.dequantize(q, x.dtype, out=out), bias)


def prompt_chunk_rows(q: QuantizedTensor) -> int:
    """How many rows a prompt's linear dequantizes at a time: about
    :data:`PROMPT_CHUNK_BYTES` worth, in steps of 256 rows (which keep 4-bit groups of block
    maxima whole); every row where the codec does not slice."""
    out_features, in_features = (int(d) for d in q.metadata["shape"])
    rows = max(256, PROMPT_CHUNK_BYTES // (4 * in_features) // 256 * 256)
    if rows >= out_features or codec_for(q.metadata["codec"]).row_slice(q, 0, rows) is None:
        return out_features
    return rows


def _linear_by_row_chunks(codec: Codec, q: QuantizedTensor, x: Tensor, bias: Optional[Tensor],
                          scratch: Optional[WeightScratch]) -> Optional[Tensor]:
    """A prompt's ``F.linear`` a few hundred output rows at a time, on CPU, or None where the
    weight is a single chunk. Dequantizing the whole weight first would write it to RAM for
    the product to read back; a chunk stays in the last-level cache (docs/benchmarks.md)."""
    out_features, in_features = (int(d) for d in q.metadata["shape"])
    rows = prompt_chunk_rows(q)
    if rows == out_features:
        return None
    q = codec.prepare(q)
    x2 = x.reshape(-1, in_features)
    y_t = torch.empty(out_features, x2.shape[0], dtype=x.dtype)  # y transposed: each chunk's rows contiguous
    for start in range(0, out_features, rows):
        stop = min(out_features, start + rows)
        part = codec.row_slice(q, start, stop)
        buffer = scratch.take((stop - start, in_features), x.dtype) if scratch is not None else None
        torch.mm(codec.dequantize(part, x.dtype, out=buffer), x2.t(), out=y_t[start:stop])
    y = y_t.t().contiguous()
    if bias is not None:
        y += bias
    return y.view(*x.shape[:-1], out_features)


def warm_up_kernels(configs: Iterable[QuantizationConfig]) -> None:
    """Compile, or load from numba's on-disk cache, the CPU kernels ``configs`` use.

    Run on a tiny weight, once per process, so the first prompt and the first token do not
    pay for it (a fraction of a second per mode from the cache, seconds the first time).
    """
    if not kernels.kernels_enabled():
        return
    weight = torch.randn(64, 256, generator=torch.Generator().manual_seed(0)) * 0.02
    weight[:, 5] = 9.0  # an outlier column: INT8 keeps it in 16-bit, with a kernel of its own
    weight = weight.to(torch.bfloat16)
    seen = set()
    for config in configs:
        if config.fingerprint() in seen:
            continue
        seen.add(config.fingerprint())
        codec = codec_for(config.mode)
        q = codec.prepare(codec.quantize(weight, config))
        # one token, a few (int8 activations), more (NF4/FP4's int8 levels), a prompt
        for rows in sorted({1, 2, kernels.INT8_LEVELS_ROWS or 2, kernels.FUSED_MAX_TOKENS + 1}):
            x = codec.prepare_input(torch.zeros(rows, weight.shape[1]))
            linear(q, x, None, scratch=WeightScratch())
