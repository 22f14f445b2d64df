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

import json
import logging
import math
import os
from dataclasses import dataclass, field
from typing import Any, ClassVar, Dict, Iterable, Optional

import torch
from torch import Tensor

from . import kernels
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


class WeightScratch:
    """One reusable buffer for what a prompt's linear dequantizes: a row chunk of a weight
    (the whole weight where its codec cannot slice rows), one at a time (the layers run on
    one thread). Reusing it saves the page faults of a fresh allocation each time (~70 ms
    for a whole 4096×11008 float32 weight here: more than the conversion)."""

    def __init__(self) -> None:
        self._buffer = torch.empty(0)

    def take(self, shape: torch.Size, dtype: torch.dtype) -> Tensor:
        numel = math.prod(shape)
        if self._buffer.numel() < numel or self._buffer.dtype != dtype:
            self._buffer = torch.empty(numel, dtype=dtype)
        return self._buffer[:numel].view(shape)


class Codec:
    """Base class: subclasses set ``mode`` and implement quantize / dequantize."""

    mode: ClassVar[QuantizationMode]
    _registry: ClassVar[Dict[QuantizationMode, "Codec"]] = {}

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "mode" in cls.__dict__:  # abstract intermediates (no own mode) are not registered
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

    def prepare(self, q: QuantizedTensor) -> QuantizedTensor:
        """``q`` plus what :meth:`linear` needs precomputed (``_``-prefixed tensors: float
        scales, decoded block maxima). Cheap next to a read; the loader runs it off the
        compute thread. The result is for computing with, never for storing."""
        return q

    def fused_linear(self, q: QuantizedTensor, x: Tensor, bias: Optional[Tensor]) -> Optional[Tensor]:
        """``x @ W^T + bias`` straight from the codec's bytes (:mod:`sli.kernels`), or None
        where this weight has no kernel."""
        return None

    def linear(self, q: QuantizedTensor, x: Tensor, bias: Optional[Tensor] = None,
               scratch: Optional[WeightScratch] = None) -> Tensor:
        """``F.linear(x, W, bias)`` for the quantized weight ``W``: a fused kernel for a few
        float32 rows on CPU (decoding), else dequantize once (into ``scratch`` when given)
        and use BLAS (prefill)."""
        if kernels.use_fused(x, int(q.metadata["shape"][1])):
            y = self.fused_linear(self.prepare(q), x, bias)
            if y is not None:
                return y
        if x.device.type == "cpu":
            y = self._linear_by_row_chunks(q, x, bias, scratch)
            if y is not None:
                return y
        out = scratch.take(q.shape, x.dtype) if scratch is not None else None
        return torch.nn.functional.linear(x, self.dequantize(q, x.dtype, out=out), bias)

    def row_slice(self, q: QuantizedTensor, start: int, stop: int) -> Optional[QuantizedTensor]:
        """Rows ``[start, stop)`` of the weight as a :class:`QuantizedTensor` of views (the
        prepared ``_`` tensors sliced too), or None where this codec does not slice."""
        return None

    def prompt_chunk_rows(self, q: QuantizedTensor) -> int:
        """How many rows a prompt's linear dequantizes at a time: about
        :data:`PROMPT_CHUNK_BYTES` worth, in steps of 256 rows (which keep 4-bit groups of
        block maxima whole); every row where the codec does not slice."""
        out_features, in_features = (int(d) for d in q.metadata["shape"])
        rows = max(256, PROMPT_CHUNK_BYTES // (4 * in_features) // 256 * 256)
        if rows >= out_features or self.row_slice(q, 0, rows) is None:
            return out_features
        return rows

    def _linear_by_row_chunks(self, q: QuantizedTensor, x: Tensor, bias: Optional[Tensor],
                              scratch: Optional[WeightScratch]) -> Optional[Tensor]:
        """A prompt's ``F.linear`` a few hundred output rows at a time, on CPU.

        Each chunk is dequantized into a buffer small enough to stay in the last-level cache
        (:data:`PROMPT_CHUNK_BYTES`) and multiplied while it is there. Dequantizing the whole
        weight first writes it to RAM and the product reads it back: for a 4096×11008 bf16
        weight and 128 tokens that took 151 ms here, 97 ms chunked, and 151 ms for the
        float32 weight already in RAM. The buffer is also ~20x smaller than the weight.
        """
        out_features, in_features = (int(d) for d in q.metadata["shape"])
        rows = self.prompt_chunk_rows(q)
        if rows == out_features:
            return None
        q = self.prepare(q)
        x2 = x.reshape(-1, in_features)
        y_t = torch.empty(out_features, x2.shape[0], dtype=x.dtype)  # y transposed: each chunk's rows contiguous
        for start in range(0, out_features, rows):
            stop = min(out_features, start + rows)
            part = self.row_slice(q, start, stop)
            buffer = scratch.take((stop - start, in_features), x.dtype) if scratch is not None else None
            torch.mm(self.dequantize(part, x.dtype, out=buffer), x2.t(), out=y_t[start:stop])
        y = y_t.t().contiguous()
        if bias is not None:
            y += bias
        return y.view(*x.shape[:-1], out_features)

    @staticmethod
    def _rows(q: QuantizedTensor, start: int, stop: int, per_row: "tuple[str, ...]" = (),
              **sliced: Tensor) -> QuantizedTensor:
        """``q`` with the tensors named in ``per_row`` cut to rows ``[start, stop)``, the ones
        in ``sliced`` replaced, the rest shared."""
        tensors = {k: (v[start:stop] if k in per_row else v) for k, v in q.tensors.items()}
        tensors.update(sliced)
        return QuantizedTensor(tensors, {**q.metadata, "shape": [stop - start, *q.metadata["shape"][1:]]})

    @staticmethod
    def _prepared(q: QuantizedTensor, **extra: Tensor) -> QuantizedTensor:
        return QuantizedTensor({**q.tensors, **extra}, q.metadata)

    @staticmethod
    def _meta(weight: Tensor, mode: QuantizationMode, **extra: Any) -> Dict[str, Any]:
        return {"codec": mode.value, "shape": list(weight.shape), "dtype": dtype_name(weight.dtype), **extra}


# A prompt's linear dequantizes its weight this many bytes (float32) at a time; see
# Codec._linear_by_row_chunks. 8 MB: well inside this CPU's 32 MB L3, big enough for BLAS.
PROMPT_CHUNK_BYTES = 8 << 20


def codec_for(mode: QuantizationMode | str) -> Codec:
    """The registered codec of ``mode``."""
    return Codec._registry[QuantizationMode(mode)]


def warm_up_kernels(configs: Iterable[QuantizationConfig]) -> None:
    """Compile, or load from numba's on-disk cache, the CPU kernels ``configs`` use.

    Run on a tiny weight, once per process, so the first prompt and the first token do not
    pay for it (here 0.3–1.2 s per mode from the cache, seconds the first time on a machine).
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
        for rows in (1, 2, kernels.FUSED_MAX_TOKENS + 1):  # one token, a few, a prompt
            codec.linear(q, torch.zeros(rows, weight.shape[1]), None, scratch=WeightScratch())


def _write(result: Tensor, out: Optional[Tensor]) -> Tensor:
    if out is None:
        return result
    out.copy_(result.view(out.shape))
    return out


def _write_or_into(compute, shape: tuple, dtype: torch.dtype, device: torch.device, out: Optional[Tensor]) -> Tensor:
    """Run ``compute(buf)`` (fills an fp32 buffer of ``shape``) straight into ``out`` when that is a
    contiguous fp32 tensor of the same size (no extra pass), else into a fresh buffer, cast to ``dtype``."""
    numel = math.prod(int(s) for s in shape)
    if out is not None and out.dtype == torch.float32 and out.is_contiguous() and out.numel() == numel:
        compute(out.view(shape))
        return out
    res = compute(torch.empty(shape, dtype=torch.float32, device=device))
    return _write(res if dtype == torch.float32 else res.to(dtype), out)


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

    def row_slice(self, q: QuantizedTensor, start: int, stop: int) -> Optional[QuantizedTensor]:
        return self._rows(q, start, stop, per_row=("weight",))

    def fused_linear(self, q: QuantizedTensor, x: Tensor, bias: Optional[Tensor]) -> Optional[Tensor]:
        weight = q.tensors["weight"]
        if weight.dtype != torch.bfloat16 or weight.dim() != 2:
            return None  # float32 weights go to BLAS as they are; fp16 has no kernel
        return kernels.matmul_bf16(x, weight, bias)


# ---------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------

def _bnb_available() -> bool:
    # read at call time so tests can monkeypatch sli.quantization.BITSANDBYTES_AVAILABLE
    from . import quantization

    return bool(quantization.BITSANDBYTES_AVAILABLE)


def _check_float(weight: Tensor) -> None:
    if weight.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise ValueError(f"cannot quantize a {weight.dtype} weight; use float32, float16 or bfloat16")


def calculate_quantization_error(original: Tensor, dequantized: Tensor) -> Dict[str, float]:
    """Error figures of a round trip: max/mean absolute error, relative error (%) and SNR (dB).

    ``relative_error_pct`` is ``100 * ||err||_1 / ||w||_1``; ``snr_db`` is
    ``10 * log10(sum w^2 / sum err^2)`` (``inf`` for a lossless round trip).
    """
    w = original.detach().double().reshape(-1)
    err = dequantized.detach().double().reshape(-1).to(w.device) - w
    abs_err = err.abs()
    signal = float((w * w).sum())
    noise = float((err * err).sum())
    w_l1 = float(w.abs().sum())
    snr = float("inf") if noise == 0 else (10.0 * math.log10(signal / noise) if signal > 0 else float("-inf"))
    return {
        "max_abs_error": float(abs_err.max()) if abs_err.numel() else 0.0,
        "mean_abs_error": float(abs_err.mean()) if abs_err.numel() else 0.0,
        "relative_error_pct": 100.0 * float(abs_err.sum()) / w_l1 if w_l1 > 0 else (0.0 if noise == 0 else float("inf")),
        "snr_db": snr,
    }


def bits_per_weight(q: QuantizedTensor) -> float:
    """Stored bits per original weight value (all codec tensors counted)."""
    numel = 1
    for s in q.metadata["shape"]:
        numel *= int(s)
    return 8.0 * q.nbytes / max(numel, 1)


# ---------------------------------------------------------------------------
# INT8 (LLM.int8() layout) and INT8_DYNAMIC
# ---------------------------------------------------------------------------

_INT8_ROWS_PER_CHUNK = 1024  # bounds the float32 temporaries (16 MB for 4096-wide rows)


def _int8_rowwise(w: Tensor) -> "tuple[Tensor, Tensor]":
    q = torch.empty(w.shape, dtype=torch.int8, device=w.device)
    scb = torch.empty(w.shape[0], dtype=torch.float32, device=w.device)
    for start in range(0, w.shape[0], _INT8_ROWS_PER_CHUNK):
        part = w[start:start + _INT8_ROWS_PER_CHUNK].float()
        absmax = part.abs().amax(dim=1)
        scb[start:start + part.shape[0]] = absmax
        inv = 127.0 / absmax.clamp(min=1e-30)
        q[start:start + part.shape[0]] = torch.round(part * inv.unsqueeze(1)).clamp_(-127, 127)
    return q, scb


def _int8_dequant(q: QuantizedTensor, dtype: torch.dtype, out: Optional[Tensor]) -> Tensor:
    t = q.tensors
    scale = (t["SCB"].float() * (1.0 / 127.0)).unsqueeze(1)
    cols = t.get("weight.outlier_cols")
    if out is not None and out.dtype == torch.float32:
        # convert, then scale in place: no temporaries, and ~4x faster here than one
        # mixed-dtype torch.mul (int8 * fp32 takes a slow, unvectorized path)
        w = out.view(t["weight"].shape).copy_(t["weight"]).mul_(scale)
    else:
        w = t["weight"].float() * scale
    if cols is not None and cols.numel():
        w[:, cols] = t["weight.outliers"].float()
    if out is not None and out.dtype == torch.float32:
        return out
    return _write(w.to(dtype), out)


class Int8Codec(Codec):
    """Row-wise absmax int8 (bitsandbytes LLM.int8() checkpoint layout) with outlier columns.

    Input columns holding any ``|w| > llm_int8_threshold`` stay in the original dtype as
    ``weight.outliers`` [out, k] at ``weight.outlier_cols`` [k]; they are zeroed in the int8
    part and left out of ``SCB``.
    """

    mode = QuantizationMode.INT8

    def quantize(self, weight: Tensor, config: QuantizationConfig) -> QuantizedTensor:
        _check_float(weight)
        w = weight.detach()
        cols = None
        threshold = float(config.llm_int8_threshold or 0.0)
        if threshold > 0 and self.mode == QuantizationMode.INT8:
            mask = (w.abs() > threshold).any(dim=0)
            if bool(mask.any()):
                cols = torch.nonzero(mask).view(-1).to(torch.int64)
                w = w.clone()
                outliers = weight[:, cols].contiguous()
                w[:, cols] = 0
        q, scb = _int8_rowwise(w)
        tensors = {"weight": q, "SCB": scb, "weight_format": torch.tensor(0, dtype=torch.uint8)}
        extra: Dict[str, Any] = {}
        if cols is not None:
            tensors["weight.outlier_cols"] = cols
            tensors["weight.outliers"] = outliers
            extra["outlier_columns"] = int(cols.numel())
        if self.mode == QuantizationMode.INT8:
            extra["llm_int8_threshold"] = threshold
        return QuantizedTensor(tensors, self._meta(weight, self.mode, **extra))

    def dequantize(self, q: QuantizedTensor, dtype: torch.dtype, out: Optional[Tensor] = None) -> Tensor:
        return _int8_dequant(q, dtype, out)

    def row_slice(self, q: QuantizedTensor, start: int, stop: int) -> Optional[QuantizedTensor]:
        return self._rows(q, start, stop, per_row=("weight", "SCB", "weight.outliers", "_scale", "_outliers"))

    def prepare(self, q: QuantizedTensor) -> QuantizedTensor:
        if "_scale" in q.tensors:
            return q
        extra = {"_scale": q.tensors["SCB"].float() * (1.0 / 127.0)}
        if "weight.outliers" in q.tensors:
            extra["_outliers"] = q.tensors["weight.outliers"].float()
        return self._prepared(q, **extra)

    def fused_linear(self, q: QuantizedTensor, x: Tensor, bias: Optional[Tensor]) -> Optional[Tensor]:
        t = q.tensors
        y = kernels.matmul_int8(x, t["weight"], t["_scale"], bias)
        cols = t.get("weight.outlier_cols")
        if cols is not None and cols.numel():
            y += x[..., cols] @ t["_outliers"].t()  # the outlier columns' 16-bit part
        return y


class Int8DynamicCodec(Int8Codec):
    """Int8 weights (no outliers) plus per-token int8 fake-quantized activations: per token the
    ``outliers_per_token`` largest-|x| features stay in float, the rest is symmetric int8.

    Plain per-token absmax int8 cost +2.94% perplexity on SmolLM2-135M: the attention input
    has one strong feature per token (rms ~0.35, max ~6) that crushes every other value's
    resolution. Keeping the 4 largest per token in float brings it to +0.08% (INT8
    weight-only: +0.07%) while >99% of activation values stay int8. Chosen per token, not
    per column (LLM.int8()), so a token's result never depends on the rest of the batch.
    """

    mode = QuantizationMode.INT8_DYNAMIC

    outliers_per_token = 4

    def prepare_input(self, x: Tensor) -> Tensor:
        xf = x.float()
        k = min(self.outliers_per_token, xf.shape[-1] - 1)
        keep = torch.zeros_like(xf, dtype=torch.bool)
        if k > 0 and xf.numel():
            keep.scatter_(-1, xf.abs().topk(k, dim=-1).indices, True)
        rest = xf.masked_fill(keep, 0.0)
        a = rest.abs().amax(dim=-1, keepdim=True).clamp_(min=1e-8)
        q = torch.round(rest * 127 / a) * a / 127
        return torch.where(keep, xf, q).to(x.dtype)


# ---------------------------------------------------------------------------
# NF4 / FP4 (bitsandbytes bytes)
# ---------------------------------------------------------------------------

_NF4_CODE = [
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
    -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
    0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
    0.7229568362236023, 1.0,
]
_FP4_CODE = [0, 0.0625, 8.0, 12.0, 4.0, 6.0, 2.0, 3.0, -0, -0.0625, -8.0, -12.0, -4.0, -6.0, -2.0, -3.0]


def four_bit_code(quant_type: str) -> Tensor:
    """The 16-value code of ``quant_type`` exactly as bitsandbytes' ``get_4bit_type`` builds it."""
    data = torch.tensor(_NF4_CODE if quant_type == "nf4" else _FP4_CODE)
    data.div_(data.abs().max())
    return data


def dynamic_map() -> Tensor:
    """bitsandbytes' ``create_dynamic_map(signed=True)`` (the nested absmax code), in pure torch."""
    data: list = []
    max_exponent_bits, total_bits = 7, 8
    non_sign_bits = total_bits - 1
    additional_items = 2 ** (non_sign_bits - max_exponent_bits) - 1
    for i in range(max_exponent_bits):
        fraction_items = int(2 ** (i + non_sign_bits - max_exponent_bits) + 1)
        boundaries = torch.linspace(0.1, 1, fraction_items, dtype=torch.float32)
        means = (boundaries[:-1] + boundaries[1:]) / 2.0
        data += ((10 ** (-(max_exponent_bits - 1) + i)) * means).tolist()
        data += (-(10 ** (-(max_exponent_bits - 1) + i)) * means).tolist()
    if additional_items > 0:  # pragma: no cover - not reached for 8 bits / 7 exponent bits
        raise AssertionError
    data.append(0)
    data.append(1.0)
    data += [0] * (256 - len(data))
    data.sort()
    return torch.tensor(data, dtype=torch.float32)


# How the 4-bit quantizer matches bitsandbytes byte for byte, fast.
#
# bitsandbytes (CPU, 0.50.2, backends/default/ops.py) computes per 64-value block
# ``scaled = clamp(w.float() * (1 / absmax.clamp(min=1e-38)), -1, 1)`` (a reciprocal, then a
# multiply; the partial last block instead divides by its absmax), then
# ``code = order[bucketize(scaled, midpoints)]`` with ``midpoints`` the 15 fp32 midpoints of the
# sorted code and ``order = argsort(code)`` (identity for NF4; FP4's code is not sorted).
# ``bucketize`` (binary search, scalar) is ~90% of its time. It counts the midpoints below x,
# so ``order[count]`` telescopes into ``order[0] + sum_i (x > m_i) * (order[i+1] - order[i])``:
# 15 branch-free compare/select/adds that torch.compile (inductor) turns into one fused,
# vectorized loop. Every step is exact (fp32 compares against fp32 constants, small integers in
# fp32), so the bytes equal bitsandbytes' for any input. Eager PyTorch runs those 15 steps as 45
# full-tensor passes, slower than bucketize, so the eager fallback is bitsandbytes' own
# bucketize reference.

_COMPILE_MIN_NUMEL = 1 << 20  # smaller weights: eager is quicker than a compile (~3-15 s per dtype)
_compiled: Dict[str, Any] = {}
_compile_failed = False


def _four_bit_steps(quant_type: str) -> "tuple[Tensor, Tensor, float, list]":
    code = four_bit_code(quant_type)
    order = torch.argsort(code)  # same call as bitsandbytes (decides FP4's 0 / -0 tie)
    midpoints = (code[order[:-1]] + code[order[1:]]) / 2  # fp32, as bitsandbytes
    o = order.tolist()
    steps = [(float(m), float(o[i + 1] - o[i])) for i, m in enumerate(midpoints.tolist())]
    return midpoints, order, float(o[0]), steps


def _make_q4_kernel(quant_type: str):
    _, _, c0, steps = _four_bit_steps(quant_type)

    def count(s: Tensor) -> Tensor:
        q = torch.where(s > steps[0][0], c0 + steps[0][1], c0)
        for m, d in steps[1:]:
            q = q + torch.where(s > m, d, 0.0)
        return q  # the 4-bit code as fp32 (exact small integers)

    def q4_blocks(a: Tensor) -> "tuple[Tensor, Tensor]":
        # a: [blocks, bs] (bf16/fp16/fp32) -> packed uint8 [blocks, bs/2], absmax fp32 [blocks]
        af = a.float()
        absmax = af.abs().amax(dim=-1, keepdim=True)
        inv = 1.0 / absmax.clamp(min=1e-38)
        pairs = af.view(af.shape[0], -1, 2)  # first value of a pair -> high nibble
        hi = count(torch.clamp(pairs[..., 0] * inv, -1, 1))
        lo = count(torch.clamp(pairs[..., 1] * inv, -1, 1))
        return (hi * 16 + lo).to(torch.uint8), absmax.squeeze(1)

    return q4_blocks


def _codes_reference(scaled: Tensor, quant_type: str) -> Tensor:
    """bitsandbytes' eager reference: ``order[bucketize(scaled, midpoints)]`` as uint8."""
    midpoints, order, _, _ = _four_bit_steps(quant_type)
    q = torch.bucketize(scaled, midpoints.to(scaled.device), out_int32=True)
    if quant_type != "nf4":
        q = order.to(scaled.device)[q]
    return q.to(torch.uint8)


def _q4_reference(a: Tensor, quant_type: str) -> "tuple[Tensor, Tensor]":
    af = a.float()
    absmax = af.abs().amax(dim=-1)
    scaled = torch.clamp(af * (1.0 / absmax.clamp(min=1e-38)).unsqueeze(1), -1, 1)
    q = _codes_reference(scaled, quant_type).view(a.shape[0], -1, 2)
    return (q[..., 0] << 4) | q[..., 1], absmax


def _use_compile(a: Tensor) -> bool:
    return (not _compile_failed and a.device.type == "cpu" and a.numel() >= _COMPILE_MIN_NUMEL
            and os.environ.get("SLI_NO_COMPILE", "") in ("", "0"))


def _q4_full(a: Tensor, quant_type: str) -> "tuple[Tensor, Tensor]":
    """Full blocks ``a`` [blocks, bs] -> packed uint8 [blocks, bs/2], absmax fp32 [blocks]."""
    global _compile_failed
    if _use_compile(a):
        try:
            fn = _compiled.get(quant_type)
            if fn is None:
                fn = _compiled[quant_type] = torch.compile(_make_q4_kernel(quant_type), dynamic=False)
            torch._dynamo.maybe_mark_dynamic(a, 0)  # one compile per dtype and block size, any row count
            return fn(a)
        except Exception as exc:  # no C compiler, unsupported platform, ...
            _compile_failed = True
            logger.warning("torch.compile of the 4-bit quantizer failed (%s: %s); using the eager path "
                           "(same bytes, ~10x slower)", type(exc).__name__, exc)
    return _q4_reference(a, quant_type)


def quantize_4bit_torch(weight: Tensor, blocksize: int, quant_type: str) -> "tuple[Tensor, Tensor]":
    """Packed codes uint8 [ceil(n/2), 1] and absmax fp32, byte-identical to bitsandbytes'
    ``quantize_4bit`` (no bitsandbytes needed)."""
    if blocksize % 2:
        raise ValueError(f"block_size={blocksize} must be even (two 4-bit codes a byte)")
    flat = weight.reshape(-1)
    n = flat.numel()
    rem = n % blocksize
    full = n - rem
    parts, absmaxes = [], []
    if full:
        p, am = _q4_full(flat[:full].view(-1, blocksize), quant_type)
        parts.append(p.reshape(-1))
        absmaxes.append(am)
    if rem:
        tail = flat[full:].float()
        am = tail.abs().max().clamp(min=1e-38)
        scaled = torch.clamp(tail / am, -1, 1)  # bitsandbytes divides here (multiplies above)
        if rem % 2:  # bitsandbytes pads the odd last value with 0 (whose code fills the low nibble)
            scaled = torch.nn.functional.pad(scaled, (0, 1))
        q = _codes_reference(scaled, quant_type).view(-1, 2)
        parts.append((q[:, 0] << 4) | q[:, 1])
        absmaxes.append(am.reshape(1))
    packed = torch.cat(parts) if len(parts) > 1 else parts[0]
    absmax = torch.cat(absmaxes) if len(absmaxes) > 1 else absmaxes[0]
    return packed.unsqueeze(1), absmax


def quantize_blockwise_torch(a: Tensor, code: Tensor, blocksize: int) -> "tuple[Tensor, Tensor]":
    """bitsandbytes' default (pure torch) ``quantize_blockwise``; its native CPU kernel picks the
    neighbouring code on ~0.2% of values."""
    flat = a.reshape(-1).float()
    n = flat.numel()
    rem = n % blocksize
    full = n - rem
    com = flat[:full].reshape(-1, blocksize)
    absmax = com.abs().max(dim=-1)[0]
    scaled = torch.clamp(com * (1.0 / absmax.clamp(min=1e-38).view(-1, 1)), -1, 1).reshape(-1)
    if rem:
        am = flat[full:].abs().max().clamp(min=1e-38)
        absmax = torch.cat([absmax, am.unsqueeze(0)])
        scaled = torch.cat([scaled, torch.clamp(flat[full:] / am, -1, 1)])
    bounds = (code[:-1] + code[1:]) / 2
    q = torch.bucketize(scaled, bounds, out_int32=True).to(torch.uint8)
    return q, absmax


def _dequant_blockwise_torch(q: Tensor, absmax: Tensor, code: Tensor, blocksize: int) -> Tensor:
    vals = code.float()[q.reshape(-1).long()]
    n = vals.numel()
    rem = n % blocksize
    full = n - rem
    out = torch.empty(n, dtype=torch.float32, device=vals.device)
    out[:full] = (vals[:full].view(-1, blocksize) * absmax[: full // blocksize].view(-1, 1)).reshape(-1)
    if rem:
        out[full:] = vals[full:] * absmax[-1]
    return out


class _FourBitCodec(Codec):
    """NF4 / FP4 in bitsandbytes' bytes and transformers' checkpoint layout.

    Packed codes and absmax are byte-identical to ``bitsandbytes.functional.quantize_4bit``
    on either path. With double quant, bitsandbytes' native ``quantize_blockwise`` gives the
    nested absmax codes; the pure-torch path (no bitsandbytes) uses bitsandbytes' own torch
    reference, which picks the neighbouring code of the 256-value dynamic map on ~0.2% of
    the absmax values (never further than one code).
    """

    quant_type: ClassVar[str]

    def quantize(self, weight: Tensor, config: QuantizationConfig) -> QuantizedTensor:
        _check_float(weight)
        w = weight.detach().contiguous()
        bs = int(config.block_size)
        qt = self.quant_type
        packed, absmax = quantize_4bit_torch(w, bs, qt)
        state: Dict[str, Any] = {"quant_type": qt, "blocksize": bs, "dtype": dtype_name(w.dtype), "shape": list(w.shape)}
        tensors: Dict[str, Tensor] = {"weight": packed}
        if config.double_quant:
            offset = absmax.mean()
            if _bnb_available() and w.device.type == "cpu":
                import bitsandbytes.functional as bnbf

                qabsmax, state2 = bnbf.quantize_blockwise(absmax - offset, blocksize=256)
                nested_absmax, nested_code = state2.absmax, state2.code
            else:
                nested_code = dynamic_map().to(w.device)
                qabsmax, nested_absmax = quantize_blockwise_torch(absmax - offset, nested_code, 256)
            tensors["weight.absmax"] = qabsmax
            tensors["weight.quant_map"] = four_bit_code(qt).to(w.device)
            tensors["weight.nested_absmax"] = nested_absmax.float()
            tensors["weight.nested_quant_map"] = nested_code.float().clone()
            state.update(nested_blocksize=256, nested_dtype="float32", nested_offset=float(offset.item()))
        else:
            tensors["weight.absmax"] = absmax
            tensors["weight.quant_map"] = four_bit_code(qt).to(w.device)
        blob = json.dumps(state).encode("utf-8")
        tensors[f"weight.quant_state.bitsandbytes__{qt}"] = torch.tensor(list(blob), dtype=torch.uint8)
        meta = self._meta(w, self.mode, blocksize=bs, double_quant=bool(config.double_quant))
        if config.double_quant:
            meta["nested_offset"] = state["nested_offset"]
        return QuantizedTensor(tensors, meta)

    @staticmethod
    def _state(q: QuantizedTensor, qt: str) -> Dict[str, Any]:
        blob = q.tensors.get(f"weight.quant_state.bitsandbytes__{qt}")
        if blob is not None:
            return json.loads(bytes(blob.cpu().tolist()).decode("utf-8"))
        return {"blocksize": q.metadata["blocksize"], "nested_offset": q.metadata.get("nested_offset")}

    def prepare(self, q: QuantizedTensor) -> QuantizedTensor:
        # Double-quantized block maxima stay 8-bit: the kernel decodes one per 64-value block
        # as it goes, so readying a layer costs nothing and adds no float32 copy of them.
        if "_code" in q.tensors:
            return q
        t = q.tensors
        extra = {"_code": t["weight.quant_map"].float().contiguous()}
        if "weight.nested_absmax" in t:
            st = self._state(q, self.quant_type)
            extra["_nested"] = t["weight.nested_absmax"].float().contiguous()
            extra["_nested_code"] = t["weight.nested_quant_map"].float().contiguous()
            extra["_nested_offset"] = torch.tensor([float(st["nested_offset"]), float(st.get("nested_blocksize", 256))])
        else:
            extra["_absmax"] = t["weight.absmax"].float().contiguous()
        return self._prepared(q, **extra)

    def _absmax(self, q: QuantizedTensor) -> Tensor:
        """Every block's maximum as float32 (decoding the double-quantized ones)."""
        t = self.prepare(q).tensors
        if "_absmax" in t:
            return t["_absmax"]
        offset, nested_blocksize = t["_nested_offset"].tolist()
        nested = (t["weight.absmax"], t["_nested"], t["_nested_code"], int(nested_blocksize))
        if t["weight.absmax"].device.type == "cpu" and kernels.kernels_enabled():
            return kernels.dequantize_blockwise8(*nested, offset=offset)
        return _dequant_blockwise_torch(*nested) + offset

    def row_slice(self, q: QuantizedTensor, start: int, stop: int) -> Optional[QuantizedTensor]:
        in_features = int(q.metadata["shape"][1])
        bs = int(q.metadata["blocksize"])
        if in_features % bs:
            return None  # blocks straddle rows
        t = q.tensors
        first, last = start * in_features // bs, stop * in_features // bs  # the rows' blocks
        packed = t["weight"]
        sliced = {"weight": packed.reshape(-1)[first * bs // 2:last * bs // 2].view(-1, *packed.shape[1:])}
        for name in ("weight.absmax", "_absmax"):  # one per block (8-bit codes when double-quantized)
            if name in t:
                sliced[name] = t[name].reshape(-1)[first:last]
        if "weight.nested_absmax" in t:
            nested_blocksize = int(self._state(q, self.quant_type).get("nested_blocksize", 256))
            if first % nested_blocksize:
                return None  # the slice would start inside a group of block maxima
            groups = slice(first // nested_blocksize, -(-last // nested_blocksize))
            for name in ("weight.nested_absmax", "_nested"):
                if name in t:
                    sliced[name] = t[name][groups]
        return self._rows(q, start, stop, **sliced)

    def fused_linear(self, q: QuantizedTensor, x: Tensor, bias: Optional[Tensor]) -> Optional[Tensor]:
        out_features, in_features = q.metadata["shape"]
        bs = int(q.metadata["blocksize"])
        if in_features % bs:
            return None  # blocks straddle rows: dequantize instead
        t = q.tensors
        if "_absmax" in t:
            return kernels.matmul_4bit(x, t["weight"], t["_absmax"], t["_code"], bs, out_features, bias)
        offset, nested_blocksize = t["_nested_offset"].tolist()
        return kernels.matmul_4bit_nested(x, t["weight"], t["weight.absmax"], t["_nested"], t["_nested_code"], offset,
                                          int(nested_blocksize), t["_code"], bs, out_features, bias)

    def dequantize(self, q: QuantizedTensor, dtype: torch.dtype, out: Optional[Tensor] = None) -> Tensor:
        qt = self.quant_type
        t = q.tensors
        st = self._state(q, qt)
        bs = int(st["blocksize"])
        shape = tuple(q.metadata["shape"])
        packed = t["weight"]
        nested = "weight.nested_absmax" in t
        device = packed.device
        if device.type == "cpu" and kernels.kernels_enabled():
            # the numba kernel writes bitsandbytes' values ~5x faster than its CPU kernel
            prepared = self.prepare(q)
            absmax, code = self._absmax(prepared), prepared.tensors["_code"]
            return _write_or_into(lambda buf: kernels.dequantize_4bit(packed, absmax, code, bs, buf),
                                  shape, dtype, device, out)
        if _bnb_available() and device.type == "cpu":
            # bitsandbytes' native CPU kernel (it has no out= on CPU, hence the copy)
            import bitsandbytes.functional as bnbf

            state2 = None
            offset = None
            if nested:
                state2 = bnbf.QuantState(absmax=t["weight.nested_absmax"], code=t["weight.nested_quant_map"],
                                         blocksize=int(st.get("nested_blocksize", 256)), dtype=torch.float32)
                offset = torch.tensor(float(st["nested_offset"]))
            qs = bnbf.QuantState(absmax=t["weight.absmax"], shape=torch.Size(shape), dtype=dtype, blocksize=bs,
                                 code=t["weight.quant_map"], quant_type=qt, offset=offset, state2=state2)
            return _write(bnbf.dequantize_4bit(packed, qs), out)
        absmax = self._absmax(q)
        return _write_or_into(lambda buf: self._dequantize_torch(t, absmax, bs, buf), shape, dtype, device, out)

    @staticmethod
    def _dequantize_torch(t: Dict[str, Tensor], absmax: Tensor, bs: int, res: Tensor) -> Tensor:
        """Pure torch: one 256-entry byte -> (hi, lo) value gather, one multiply into ``res`` (fp32)."""
        device = res.device
        n = res.numel()
        code = t["weight.quant_map"].float().to(device)
        pair = torch.stack((code.repeat_interleave(16), code.repeat(16)), dim=1)  # [256, 2]: byte -> (hi, lo)
        vals = pair.index_select(0, t["weight"].reshape(-1).long()).view(-1)
        flat = res.view(-1)
        rem = n % bs
        full = n - rem
        if full:
            torch.mul(vals[:full].view(-1, bs), absmax[: full // bs].view(-1, 1), out=flat[:full].view(-1, bs))
        if rem:
            torch.mul(vals[full:n], absmax[-1], out=flat[full:])
        return res


class NF4Codec(_FourBitCodec):
    mode = QuantizationMode.NF4
    quant_type = "nf4"


class FP4Codec(_FourBitCodec):
    mode = QuantizationMode.FP4
    quant_type = "fp4"


# ---------------------------------------------------------------------------
# INT4 (group-wise asymmetric) and FP8
# ---------------------------------------------------------------------------

class Int4Codec(Codec):
    """Group-wise asymmetric int4: ``q = clamp(round(w / s) + z, 0, 15)``, two values a byte
    (first value in the high nibble). ``in`` is zero-padded to a multiple of the group size
    (``metadata["padded_in"]``)."""

    mode = QuantizationMode.INT4

    def quantize(self, weight: Tensor, config: QuantizationConfig) -> QuantizedTensor:
        _check_float(weight)
        g = int(config.group_size)
        w = weight.detach().float()
        if w.dim() != 2:
            w = w.reshape(w.shape[0], -1)
        rows, cols = w.shape
        padded = -(-cols // g) * g
        if padded != cols:
            w = torch.nn.functional.pad(w, (0, padded - cols))
        wg = w.view(rows, padded // g, g)
        wmin = wg.amin(dim=-1).clamp(max=0)
        wmax = wg.amax(dim=-1).clamp(min=0)
        scale = ((wmax - wmin) / 15.0).clamp(min=1e-8).to(torch.float16)
        scale = torch.where(scale == 0, torch.ones_like(scale), scale)  # fp16 underflow
        s = scale.float()
        zero = torch.round(-wmin / s).clamp(0, 15)
        q = (torch.round(wg / s.unsqueeze(-1)) + zero.unsqueeze(-1)).clamp_(0, 15).to(torch.uint8).view(rows, padded)
        packed = (q[:, 0::2] << 4) | q[:, 1::2]
        tensors = {"weight": packed.contiguous(), "weight.scales": scale, "weight.zeros": zero.to(torch.uint8)}
        return QuantizedTensor(tensors, self._meta(weight, self.mode, group_size=g, padded_in=padded))

    def dequantize(self, q: QuantizedTensor, dtype: torch.dtype, out: Optional[Tensor] = None) -> Tensor:
        t = q.tensors
        packed = t["weight"]
        rows = packed.shape[0]
        g = int(q.metadata["group_size"])
        padded = int(q.metadata.get("padded_in", packed.shape[1] * 2))
        vals = torch.stack((packed >> 4, packed & 0xF), dim=-1).view(rows, padded // g, g).float()
        w = (vals - t["weight.zeros"].float().unsqueeze(-1)) * t["weight.scales"].float().unsqueeze(-1)
        shape = tuple(q.metadata["shape"])
        w = w.view(rows, padded)[:, : int(shape[-1]) if len(shape) == 2 else padded]
        return _write(w.reshape(shape).to(dtype), out)

    def prepare(self, q: QuantizedTensor) -> QuantizedTensor:
        if "_scales" in q.tensors:
            return q
        t = q.tensors
        return self._prepared(q, _scales=t["weight.scales"].float(), _zeros=t["weight.zeros"].float())

    def row_slice(self, q: QuantizedTensor, start: int, stop: int) -> Optional[QuantizedTensor]:
        if len(q.metadata["shape"]) != 2:
            return None
        return self._rows(q, start, stop, per_row=("weight", "weight.scales", "weight.zeros", "_scales", "_zeros"))

    def fused_linear(self, q: QuantizedTensor, x: Tensor, bias: Optional[Tensor]) -> Optional[Tensor]:
        if len(q.metadata["shape"]) != 2:
            return None
        t = q.tensors
        return kernels.matmul_int4(x, t["weight"], t["_scales"], t["_zeros"], int(q.metadata["group_size"]),
                                   int(q.metadata["shape"][1]), bias)


class FP8Codec(Codec):
    """float8_e4m3fn with a per-output-channel fp32 scale (row absmax / 448)."""

    mode = QuantizationMode.FP8

    def quantize(self, weight: Tensor, config: QuantizationConfig) -> QuantizedTensor:
        _check_float(weight)
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
        return _write(w.to(dtype), out)

    def prepare(self, q: QuantizedTensor) -> QuantizedTensor:
        if "_scale" in q.tensors:
            return q
        return self._prepared(q, _scale=q.tensors["weight.scale"].float(), _lut=_float8_values())

    def row_slice(self, q: QuantizedTensor, start: int, stop: int) -> Optional[QuantizedTensor]:
        return self._rows(q, start, stop, per_row=("weight", "weight.scale", "_scale"))

    def fused_linear(self, q: QuantizedTensor, x: Tensor, bias: Optional[Tensor]) -> Optional[Tensor]:
        t = q.tensors
        return kernels.matmul_lut8(x, t["weight"], t["_lut"], t["_scale"], bias)


_FLOAT8_VALUES: Optional[Tensor] = None


def _float8_values() -> Tensor:
    """All 256 float8_e4m3fn values as float32, indexed by their byte (NaN bytes stay NaN)."""
    global _FLOAT8_VALUES
    if _FLOAT8_VALUES is None:
        _FLOAT8_VALUES = torch.arange(256, dtype=torch.int32).to(torch.uint8).view(torch.float8_e4m3fn).float()
    return _FLOAT8_VALUES
