"""4-bit quantization in bitsandbytes' bytes, without bitsandbytes (codes, the nested map, the quantizer)."""
from __future__ import annotations

import functools
import logging
from typing import Any, Dict, NamedTuple

import torch
from torch import Tensor

from ... import kernels, settings

logger = logging.getLogger(__name__)
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

_COMPILE_MIN_NUMEL = settings.DEFAULT_SETTINGS["compile_min_numel"]  # smaller: eager beats a compile
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


LEVEL_BINS = 4096  # the nearest-level table's bins over [-1, 1]


class LevelTable(NamedTuple):
    """A 16-level code's nearest-level table: ``[-1, 1]`` in :data:`LEVEL_BINS` bins, each
    holding at most one midpoint between sorted levels (the smallest gap, FP4's, is 0.0026).
    ``below[bin]``: how many midpoints lie below the bin; one compare with ``next_mid`` finishes
    the count, which is ``bucketize``'s (a value on a midpoint takes the lower level).
    ``sorted_code[count]`` is the level, ``order[count]`` its code."""

    below: Tensor  # int32 [LEVEL_BINS]
    next_mid: Tensor  # float32 [16]: the midpoints, then inf
    sorted_code: Tensor  # float32 [16]
    order: Tensor  # uint8 [16]: sorted position -> code


@functools.lru_cache(maxsize=None)
def level_table(quant_type: str) -> LevelTable:
    midpoints, order, _, _ = _four_bit_steps(quant_type)
    edges = torch.linspace(-1, 1, LEVEL_BINS + 1)[:-1]
    return LevelTable(torch.bucketize(edges, midpoints, out_int32=True), torch.cat([midpoints, midpoints.new_tensor([float("inf")])]),
                      four_bit_code(quant_type)[order].contiguous(), order.to(torch.uint8))


def nearest_codes(scaled: Tensor, quant_type: str) -> Tensor:
    """uint8 index of the code nearest to each value of ``scaled`` (in [-1, 1]), bitsandbytes' rule:
    by :func:`level_table` in sli's kernels on CPU (float32; 2.8 → 0.3 s for a 7B layer's GPTQ
    output), else bitsandbytes' own ``bucketize``."""
    if scaled.device.type == "cpu" and scaled.dtype == torch.float32 and kernels.kernels_enabled():
        table = level_table(quant_type)
        return kernels.nearest_codes(scaled, table.below, table.next_mid, table.order)
    return _codes_reference(scaled, quant_type)


def _q4_reference(a: Tensor, quant_type: str) -> "tuple[Tensor, Tensor]":
    af = a.float()
    absmax = af.abs().amax(dim=-1)
    scaled = torch.clamp(af * (1.0 / absmax.clamp(min=1e-38)).unsqueeze(1), -1, 1)
    q = _codes_reference(scaled, quant_type).view(a.shape[0], -1, 2)
    return (q[..., 0] << 4) | q[..., 1], absmax


def _use_compile(a: Tensor) -> bool:
    return (not _compile_failed and a.device.type == "cpu" and a.numel() >= _COMPILE_MIN_NUMEL
            and not settings.flag("SLI_NO_COMPILE"))


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


def dequantize_blockwise_torch(q: Tensor, absmax: Tensor, code: Tensor, blocksize: int) -> Tensor:
    vals = code.float()[q.reshape(-1).long()]
    n = vals.numel()
    rem = n % blocksize
    full = n - rem
    out = torch.empty(n, dtype=torch.float32, device=vals.device)
    out[:full] = (vals[:full].view(-1, blocksize) * absmax[: full // blocksize].view(-1, 1)).reshape(-1)
    if rem:
        out[full:] = vals[full:] * absmax[-1]
    return out

