"""Running a linear whose weight is quantized: which way, by the input's size and the CPU.

Three ways, chosen per call by :func:`linear`:

- a fused kernel (:meth:`Codec.fused_linear`, :mod:`sli.kernels`) for a few float32 rows
  on CPU: decoding a token reads the packed bytes once, nothing is dequantized; INT8 on a
  CPU with AMX at any row count (int8 activations in ``torch._int_mm``, oneDNN's int8 tiles);
- row chunks on CPU for a prompt: each chunk of output rows is dequantized into a buffer
  and multiplied in the prompt dtype (:func:`sli.kernels.prompt_dtype`): bfloat16 on a CPU
  with AMX or AVX-512 BF16 (oneDNN's matrix units; a few large chunks, each converted from
  float32 pieces that stay in the L2 cache), else float32 (chunks small enough to stay in
  the last-level cache while BLAS multiplies them). NONE keeps float32 everywhere, so an
  unquantized model's prompt equals ``transformers``' own;
- dequantize the whole weight, then BLAS: everywhere else (CUDA, codecs that cannot slice).
"""
from __future__ import annotations

import math
from typing import Dict, Iterable, Optional

import torch
from torch import Tensor

from .. import kernels, settings
from .codecs import Codec, codec_for
from .config import QuantizationConfig, QuantizationMode
from .formats import QuantizedTensor

# A prompt's linear dequantizes its weight this many bytes (float32) at a time; in bfloat16,
# this many bytes of bfloat16, each piece of them through a float32 buffer of the first size.
PROMPT_CHUNK_BYTES = settings.DEFAULT_SETTINGS["prompt_chunk_bytes"]
PROMPT_CHUNK_BYTES_BF16 = settings.DEFAULT_SETTINGS["prompt_chunk_bytes_bf16"]


class WeightScratch:
    """Reusable buffers for what a prompt's linear dequantizes, one per dtype: a row chunk of
    a weight (the whole weight where its codec cannot slice rows), one at a time (the layers
    run on one thread). Reusing them saves the page faults of a fresh allocation each time,
    which can cost more than the conversion itself."""

    def __init__(self) -> None:
        self._buffers: Dict[torch.dtype, Tensor] = {}

    def take(self, shape: torch.Size, dtype: torch.dtype) -> Tensor:
        numel = math.prod(shape)
        buffer = self._buffers.get(dtype)
        if buffer is None or buffer.numel() < numel:
            buffer = self._buffers[dtype] = torch.empty(numel, dtype=dtype)
        return buffer[:numel].view(shape)

    def held(self, dtype: torch.dtype) -> int:
        """Values of ``dtype`` its buffer holds (0 when it has none)."""
        buffer = self._buffers.get(dtype)
        return 0 if buffer is None else buffer.numel()


def linear(q: QuantizedTensor, x: Tensor, bias: Optional[Tensor] = None,
           scratch: Optional[WeightScratch] = None) -> Tensor:
    """``F.linear(x, W, bias)`` for the quantized weight ``W`` (``x`` already through the
    codec's :meth:`Codec.prepare_input`)."""
    codec = codec_for(q.metadata["codec"])
    if kernels.use_fused(x, int(q.metadata["shape"][1]), codec.fused_max_rows) or _int8_on_matrix_units(codec, x, q):
        y = codec.fused_linear(codec.prepare(q), x, bias)
        if y is not None:
            return y
    if x.device.type == "cpu":
        if _prompt_dtype(q) == torch.bfloat16:
            return _linear_bf16(codec, q, x, bias, scratch)
        y = _linear_by_row_chunks(codec, q, x, bias, scratch)
        if y is not None:
            return y
    out = scratch.take(q.shape, x.dtype) if scratch is not None else None
    return torch.nn.functional.linear(x, codec.dequantize(q, x.dtype, out=out), bias)


def _int8_on_matrix_units(codec: Codec, x: Tensor, q: QuantizedTensor) -> bool:
    """Whether a prompt's INT8 product runs fused anyway: int8 activations in
    ``torch._int_mm`` (AMX) beat dequantize + BLAS at any row count (docs/benchmarks.md)."""
    if codec.mode not in (QuantizationMode.INT8, QuantizationMode.INT8_DYNAMIC) or x.device.type != "cpu":
        return False
    rows = x.numel() // max(1, int(q.metadata["shape"][-1]))
    matrix_rows = kernels.int8_matrix_rows()
    return (x.dtype == torch.float32 and kernels.kernels_enabled() and 0 < matrix_rows <= rows
            and kernels.int8_activations(rows))


def _prompt_dtype(q: QuantizedTensor) -> torch.dtype:
    """The dtype a prompt multiplies ``q`` in: float32 for NONE (exactly ``transformers``'
    products) and for INT8 / INT8_DYNAMIC (bfloat16's rounding of x would cost as much as their
    quantization: INT8_DYNAMIC +0.08% -> +0.45% perplexity on SmolLM2), else
    :func:`sli.kernels.prompt_dtype`."""
    if q.metadata["codec"] in ("none", "int8", "int8_dynamic") or len(q.metadata["shape"]) != 2:
        return torch.float32
    return kernels.prompt_dtype()


def prompt_chunk_rows(q: QuantizedTensor, dtype: Optional[torch.dtype] = None) -> int:
    """How many rows a prompt's linear dequantizes at a time (``dtype``: the prompt dtype,
    by default the one :func:`linear` uses): about :data:`PROMPT_CHUNK_BYTES` worth in
    float32, :data:`PROMPT_CHUNK_BYTES_BF16` in bfloat16, in steps of 256 rows (which keep
    4-bit groups of block maxima whole); every row where the codec does not slice."""
    dtype = dtype or _prompt_dtype(q)
    out_features, in_features = (int(d) for d in q.metadata["shape"])
    chunk_bytes = PROMPT_CHUNK_BYTES_BF16 // 2 if dtype == torch.bfloat16 else PROMPT_CHUNK_BYTES // 4
    rows = max(256, chunk_bytes // in_features // 256 * 256)
    if rows >= out_features or codec_for(q.metadata["codec"]).row_slice(q, 0, rows) is None:
        return out_features
    return rows


def _straight_to_bfloat16(codec: Codec) -> bool:
    """Whether a bfloat16 prompt chunk of ``codec``'s weight is dequantized into it directly,
    with no float32 pieces (:attr:`Codec.writes_bfloat16`, on the CPU kernels)."""
    return codec.writes_bfloat16 and kernels.kernels_enabled()


def prompt_scratch_bytes(q: QuantizedTensor) -> int:
    """Bytes of the buffers a prompt's linear of ``q`` dequantizes into (:class:`WeightScratch`)."""
    in_features = int(q.metadata["shape"][1]) if len(q.metadata["shape"]) == 2 else 0
    if _prompt_dtype(q) != torch.bfloat16:
        return prompt_chunk_rows(q, torch.float32) * in_features * 4  # float32 chunks
    scratch = prompt_chunk_rows(q, torch.bfloat16) * in_features * 2
    if not _straight_to_bfloat16(codec_for(q.metadata["codec"])):
        scratch += prompt_chunk_rows(q, torch.float32) * in_features * 4  # the chunks' float32 pieces
    return scratch


def _linear_bf16(codec: Codec, q: QuantizedTensor, x: Tensor, bias: Optional[Tensor],
                 scratch: Optional[WeightScratch]) -> Tensor:
    """A prompt's ``F.linear`` in bfloat16 (float32 in and out): a few large row chunks, each
    dequantized into a bfloat16 buffer (straight, where the codec ``writes_bfloat16``: NF4/FP4
    2.2x faster than float32 pieces and a cast; else a float32 piece at a time, in the L2
    cache), then one ``torch.mm`` on the matrix units (many small products would pay oneDNN's
    set-up each)."""
    scratch = scratch or WeightScratch()
    out_features, in_features = (int(d) for d in q.metadata["shape"])
    q = codec.prepare(q)
    x2 = x.reshape(-1, in_features).to(torch.bfloat16)
    rows, piece = prompt_chunk_rows(q, torch.bfloat16), prompt_chunk_rows(q, torch.float32)
    direct = _straight_to_bfloat16(codec)
    parts = []
    for start in range(0, out_features, rows):
        stop = min(out_features, start + rows)
        chunk = q if rows == out_features else codec.row_slice(q, start, stop)
        weight = scratch.take((stop - start, in_features), torch.bfloat16)
        if direct:
            codec.dequantize(chunk, torch.bfloat16, out=weight)
        else:
            for first in range(0, stop - start, piece):
                last = min(stop - start, first + piece)
                part = chunk if piece >= stop - start else codec.row_slice(chunk, first, last)
                piece_out = scratch.take((last - first, in_features), torch.float32)
                weight[first:last].copy_(codec.dequantize(part, torch.float32, out=piece_out))
        parts.append(torch.mm(x2, weight.t()))
    y = (parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)).float()
    if bias is not None:
        y += bias
    return y.view(*x.shape[:-1], out_features)


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
        q = codec.prepare(codec.quantize_sample(weight, config))
        # one token, a few, from NF4/FP4's integer levels on (int8 activations), a prompt
        for rows in sorted({1, 2, kernels.INT8_LEVELS_ROWS or 2, kernels.FUSED_MAX_TOKENS + 1}):
            x = codec.prepare_input(torch.zeros(rows, weight.shape[1]))
            linear(q, x, None, scratch=WeightScratch())
