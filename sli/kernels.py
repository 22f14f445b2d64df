"""CPU kernels that multiply by quantized weights without dequantizing them first.

Decoding one token multiplies each weight by one activation row. Dequantizing a 4-bit
weight to float32 first costs several times the product itself, so a streamed decode would
be dequantization-bound (docs/benchmarks.md). The kernels here read the packed bytes once and accumulate in registers instead: a row of the
output is a dot product of the row's decoded values with the activations.

The 4-bit kernels decode 64 values at a time with AVX2 table lookups (:mod:`sli.simd`,
numba intrinsics; :mod:`sli.simd_fallback`'s plain numba code on other CPUs, chosen at run
time by :func:`four_bit_helpers`). They are compiled with numba (``nogil``,
split by output rows across a small thread pool;
``cache=True``: compiled once per machine, then loaded from ``__pycache__``). Every kernel has a plain
torch equivalent in :mod:`sli.codecs` (dequantize, then ``F.linear``); the processor uses
the kernels for up to :data:`FUSED_MAX_TOKENS` activation rows on CPU in float32, where
they win, and the torch path otherwise. ``SLI_NO_NUMBA=1`` turns them off.

All kernels take ``x`` as float32 ``[T, in]`` and write ``y`` float32 ``[T, out]``.
"""
from __future__ import annotations

import importlib.util
import logging
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Optional

import torch
from torch import Tensor

from . import settings

logger = logging.getLogger(__name__)

# Above this many activation rows dequantize-then-BLAS beats the fused kernels.
FUSED_MAX_TOKENS = settings.DEFAULT_SETTINGS["fused_max_tokens"]

# What numba adds to a process's peak RSS; the memory plan reserves it.
RUNTIME_BYTES = settings.DEFAULT_SETTINGS["kernel_runtime_bytes"]

_lock = threading.Lock()
_kernels = None


def kernels_enabled() -> bool:
    """Whether the numba kernels can be used (numba installed and not turned off)."""
    return not settings.flag("SLI_NO_NUMBA") and importlib.util.find_spec("numba") is not None


_four_bit_path: Optional[str] = None


def four_bit_helpers():
    """``(dot64_4bit, decode64_4bit, path)``: the SIMD helpers of :mod:`sli.simd` where they
    build and the CPU has what they need, else :mod:`sli.simd_fallback`'s plain numba ones.

    :mod:`sli.simd` writes LLVM IR through numba's internals, which a numba release may
    move: a failure to import or build it falls back (with one warning), never breaks the
    kernels. ``path`` is "avx2" or "plain".
    """
    if not settings.flag("SLI_NO_SIMD"):
        try:
            from . import simd

            if simd.ENABLED:
                return simd.dot64_4bit, simd.decode64_4bit, "avx2"
        except Exception as exc:  # ImportError, AttributeError, LLVM errors: numba internals changed
            logger.warning("the SIMD 4-bit helpers cannot be built against this numba (%s: %s); "
                           "using the plain kernels", type(exc).__name__, exc)
    from . import simd_fallback

    return simd_fallback.dot64_4bit, simd_fallback.decode64_4bit, "plain"


def four_bit_path() -> str:
    """Which 4-bit helpers the kernels were built with: "avx2" or "plain" (builds them)."""
    _table()
    return _four_bit_path


def _build():
    """Compile (or load from the on-disk cache) the kernels; called once, lazily."""
    import numpy as np
    from numba import njit

    global _four_bit_path
    dot64_4bit, decode64_4bit, _four_bit_path = four_bit_helpers()
    # The plain path compiles afresh rather than meet, in numba's on-disk cache, kernels
    # compiled with the SIMD helpers under the same names.
    cache = _four_bit_path != "plain"
    jit = njit(fastmath=True, cache=cache, nogil=True)

    @njit(fastmath=True, cache=cache, nogil=True, inline="always")  # inlined: as fast as one kernel
    def row_4bit(packed, scales, code, x, xflat, y, o, blocksize, decoded, acc):
        # y[:, o] = x · row o of a 4-bit weight whose block maxima are ``scales``;
        # packed: uint8 [out*in/2], first value in the high nibble; xflat: x as 1-D.
        # 64 values at a time through sli.simd (AVX2 table lookups; blocksize is a multiple of 64).
        rows, cols = x.shape
        row_first = o * (cols // 2)
        if rows == 1:  # decoding a token: one fused pass, nothing stored
            s = np.float32(0.0)
            for blk in range(cols // blocksize):
                j0 = blk * blocksize
                d = np.float32(0.0)
                for sub in range(j0, j0 + blocksize, 64):
                    d += dot64_4bit(packed, row_first + sub // 2, xflat, sub, code)
                s += d * scales[blk]
            y[0, o] = s
            return
        acc[:] = 0.0
        for blk in range(cols // blocksize):  # a few rows: decode each block once, reuse it per row
            j0 = blk * blocksize
            for sub in range(0, blocksize, 64):
                decode64_4bit(packed, row_first + (j0 + sub) // 2, code, scales[blk], decoded, sub)
            for t in range(rows):
                s = np.float32(0.0)
                for j in range(blocksize):
                    s += decoded[j] * x[t, j0 + j]
                acc[t] += s
        for t in range(rows):
            y[t, o] = acc[t]

    @jit
    def matmul_4bit(packed, absmax, code, x, y, blocksize, start, stop):
        # absmax: fp32 [out*in/blocksize]
        blocks_per_row = x.shape[1] // blocksize
        decoded = np.empty(blocksize, np.float32)
        acc = np.empty(x.shape[0], np.float32)
        xflat = x.reshape(x.size)
        for o in range(start, stop):
            row_4bit(packed, absmax[o * blocks_per_row:(o + 1) * blocks_per_row], code, x, xflat, y, o, blocksize,
                     decoded, acc)

    @jit
    def matmul_4bit_nested(packed, qabsmax, nested, nested_code, offset, nested_blocksize, code, x, y, blocksize,
                           start, stop):
        # double-quantized block maxima, decoded a row at a time, out of the hot loop:
        # absmax[b] = nested_code[qabsmax[b]] * nested[b // nested_blocksize] + offset
        blocks_per_row = x.shape[1] // blocksize
        scales = np.empty(blocks_per_row, np.float32)
        decoded = np.empty(blocksize, np.float32)
        acc = np.empty(x.shape[0], np.float32)
        xflat = x.reshape(x.size)
        for o in range(start, stop):
            for blk in range(blocks_per_row):
                b = o * blocks_per_row + blk
                scales[blk] = nested_code[qabsmax[b]] * nested[b // nested_blocksize] + offset
            row_4bit(packed, scales, code, x, xflat, y, o, blocksize, decoded, acc)

    @jit
    def dequantize_4bit(packed, absmax, code, out, blocksize, start, stop):
        # out: fp32 [n]; the last block may be partial
        half_block = blocksize // 2
        n_pairs = packed.shape[0]
        for blk in range(start, stop):
            scale = absmax[blk]
            first = blk * half_block
            last = min(first + half_block, n_pairs)
            whole = first + (last - first) // 32 * 32
            for k in range(first, whole, 32):
                decode64_4bit(packed, k, code, scale, out, 2 * k)
            for k in range(whole, last):
                b = packed[k]
                out[2 * k] = code[b >> 4] * scale
                out[2 * k + 1] = code[b & 15] * scale

    @jit
    def dequantize_blockwise8(q, absmax, code, out, blocksize, offset, start, stop):
        # one byte per value: out[i] = code[q[i]] * absmax[i // blocksize] + offset
        for blk in range(start, stop):
            scale = absmax[blk]
            for i in range(blk * blocksize, min((blk + 1) * blocksize, q.shape[0])):
                out[i] = code[q[i]] * scale + offset

    @jit
    def matmul_int8(q, scale, x, y, start, stop):
        # q: int8 [out, in]; y = (x @ q^T) * scale
        rows, cols = x.shape
        for o in range(start, stop):
            for t in range(rows):
                s = np.float32(0.0)
                for j in range(cols):
                    s += np.float32(q[o, j]) * x[t, j]
                y[t, o] = s * scale[o]

    @jit
    def matmul_lut8(q, lut, scale, x, y, start, stop):
        # q: uint8 codes [out, in] (float8 bytes), lut: fp32 [256]; y = (x @ lut[q]^T) * scale
        rows, cols = x.shape
        for o in range(start, stop):
            decoded = np.empty(cols, np.float32)
            for j in range(cols):
                decoded[j] = lut[q[o, j]]
            for t in range(rows):
                s = np.float32(0.0)
                for j in range(cols):
                    s += decoded[j] * x[t, j]
                y[t, o] = s * scale[o]

    @jit
    def matmul_int4(packed, scales, zeros, x, y, group, start, stop):
        # packed: uint8 [out, padded_in/2] (first value high nibble); x: fp32 [T, padded_in]
        # w = (q - zero) * scale per group, so x·w = scale * (x·q - zero * sum(x))
        rows, cols = x.shape
        groups = cols // group
        xsum = np.zeros((rows, groups), np.float32)
        for t in range(rows):
            for g in range(groups):
                s = np.float32(0.0)
                for j in range(g * group, (g + 1) * group):
                    s += x[t, j]
                xsum[t, g] = s
        half_group = group // 2
        for o in range(start, stop):
            decoded = np.empty(group, np.float32)
            acc = np.zeros(rows, np.float32)
            for g in range(groups):
                for k in range(half_group):
                    b = packed[o, g * half_group + k]
                    decoded[2 * k] = np.float32(b >> 4)
                    decoded[2 * k + 1] = np.float32(b & 15)
                for t in range(rows):
                    s = np.float32(0.0)
                    for j in range(group):
                        s += decoded[j] * x[t, g * group + j]
                    acc[t] += scales[o, g] * (s - zeros[o, g] * xsum[t, g])
            for t in range(rows):
                y[t, o] = acc[t]

    @jit
    def matmul_bf16(w, x, y, start, stop):
        # w: bfloat16 bits as uint16 [out, in]; a bfloat16 is the top half of a float32
        rows, cols = x.shape
        for o in range(start, stop):
            bits = np.empty(cols, np.uint32)
            for j in range(cols):
                bits[j] = np.uint32(w[o, j]) << 16
            decoded = bits.view(np.float32)
            for t in range(rows):
                s = np.float32(0.0)
                for j in range(cols):
                    s += decoded[j] * x[t, j]
                y[t, o] = s

    return {"matmul_4bit": matmul_4bit, "matmul_4bit_nested": matmul_4bit_nested, "dequantize_4bit": dequantize_4bit,
            "dequantize_blockwise8": dequantize_blockwise8, "matmul_int8": matmul_int8,
            "matmul_lut8": matmul_lut8, "matmul_int4": matmul_int4, "matmul_bf16": matmul_bf16}


def _table() -> dict:
    """The kernels by name: numba dispatchers, built on first use."""
    global _kernels
    if _kernels is None:
        with _lock:
            if _kernels is None:
                _kernels = _build()
    return _kernels


def _get(name: str):
    return _table()[name]


_pool: Optional[ThreadPoolExecutor] = None
_INLINE_WORK = settings.DEFAULT_SETTINGS["kernel_inline_work"]  # below: one thread beats handing out


def _threads() -> int:
    return max(1, torch.get_num_threads())


def _run(name: str, count: int, work: int, *args) -> None:
    """Run kernel ``name`` over items ``[0, count)`` split across threads.

    The kernels release the GIL (``nogil``), so plain Python threads run them in parallel.
    This is used instead of numba's ``parallel=True``: its OpenMP layer fought torch's own
    OpenMP threads here (12 ms per call on a 2-core machine) and its workqueue layer may
    not be entered from two threads at once (the prefetch thread dequantizes while the
    compute thread multiplies).
    """
    global _pool
    kernel = _get(name)
    threads = min(_threads(), count)
    if threads <= 1 or work < _INLINE_WORK:
        kernel(*args, 0, count)
        return
    if _pool is None:
        with _lock:
            if _pool is None:
                _pool = ThreadPoolExecutor(max_workers=_threads(), thread_name_prefix="sli-kernel")
    bounds = [count * i // threads for i in range(threads + 1)]
    futures = [_pool.submit(kernel, *args, bounds[i], bounds[i + 1]) for i in range(1, threads)]
    kernel(*args, bounds[0], bounds[1])  # this thread takes the first share
    for future in futures:
        future.result()


def use_fused(x: Tensor, in_features: int) -> bool:
    """Whether ``x`` (``[..., in]``) should go through a fused kernel rather than dequantize + BLAS."""
    return (x.device.type == "cpu" and x.dtype == torch.float32 and x.numel() // max(1, in_features) <= FUSED_MAX_TOKENS
            and kernels_enabled())


def _rows(x: Tensor, in_features: int) -> Tensor:
    return x.reshape(-1, in_features).contiguous()


def _np(t: Tensor):
    return t.detach().numpy()


def _out(rows: Tensor, out_features: int) -> Tensor:
    return torch.empty(rows.shape[0], out_features, dtype=torch.float32)


def _finish(y: Tensor, x: Tensor, out_features: int, bias: Optional[Tensor]) -> Tensor:
    if bias is not None:
        y += bias
    return y.view(*x.shape[:-1], out_features)


def matmul_4bit(x: Tensor, packed: Tensor, absmax: Tensor, code: Tensor, blocksize: int, out_features: int,
                bias: Optional[Tensor] = None) -> Tensor:
    """``x @ W^T (+ bias)`` for a bitsandbytes-layout 4-bit weight (``in`` a multiple of ``blocksize``)."""
    rows = _rows(x, x.shape[-1])
    y = _out(rows, out_features)
    _run("matmul_4bit", out_features, out_features * x.shape[-1] * rows.shape[0],
         _np(packed.reshape(-1)), _np(absmax), _np(code), _np(rows), _np(y), blocksize)
    return _finish(y, x, out_features, bias)


def matmul_4bit_nested(x: Tensor, packed: Tensor, qabsmax: Tensor, nested: Tensor, nested_code: Tensor, offset: float,
                       nested_blocksize: int, code: Tensor, blocksize: int, out_features: int,
                       bias: Optional[Tensor] = None) -> Tensor:
    """:func:`matmul_4bit` with bitsandbytes' double-quantized (8-bit) block maxima."""
    rows = _rows(x, x.shape[-1])
    y = _out(rows, out_features)
    _run("matmul_4bit_nested", out_features, out_features * x.shape[-1] * rows.shape[0],
         _np(packed.reshape(-1)), _np(qabsmax.reshape(-1)), _np(nested), _np(nested_code), offset, nested_blocksize,
         _np(code), _np(rows), _np(y), blocksize)
    return _finish(y, x, out_features, bias)


def dequantize_4bit(packed: Tensor, absmax: Tensor, code: Tensor, blocksize: int, out: Tensor) -> Tensor:
    """Fill float32 ``out`` with ``code[nibble] * absmax[block]`` (bitsandbytes' values, ~5x faster here)."""
    _run("dequantize_4bit", absmax.shape[0], out.numel(), _np(packed.reshape(-1)), _np(absmax), _np(code),
         _np(out.view(-1)), blocksize)
    return out


def dequantize_blockwise8(q: Tensor, absmax: Tensor, code: Tensor, blocksize: int, offset: float = 0.0) -> Tensor:
    """``code[q] * absmax[block] + offset`` as float32 (bitsandbytes' blockwise 8-bit, e.g. the
    double-quantized block maxima of a 4-bit weight)."""
    flat = q.reshape(-1)
    out = torch.empty(flat.numel(), dtype=torch.float32)
    _run("dequantize_blockwise8", absmax.numel(), flat.numel(), _np(flat), _np(absmax.float().reshape(-1)),
         _np(code.float()), _np(out), blocksize, offset)
    return out


def matmul_int8(x: Tensor, q: Tensor, scale: Tensor, bias: Optional[Tensor] = None) -> Tensor:
    """``x @ (q * scale[:, None])^T (+ bias)`` for an int8 ``[out, in]`` weight."""
    rows = _rows(x, q.shape[1])
    y = _out(rows, q.shape[0])
    _run("matmul_int8", q.shape[0], q.numel() * rows.shape[0], _np(q), _np(scale), _np(rows), _np(y))
    return _finish(y, x, q.shape[0], bias)


def matmul_lut8(x: Tensor, q: Tensor, lut: Tensor, scale: Tensor, bias: Optional[Tensor] = None) -> Tensor:
    """``x @ (lut[q] * scale[:, None])^T (+ bias)`` for a one-byte code ``[out, in]`` (e.g. float8)."""
    rows = _rows(x, q.shape[1])
    y = _out(rows, q.shape[0])
    _run("matmul_lut8", q.shape[0], q.numel() * rows.shape[0], _np(q.view(torch.uint8)), _np(lut), _np(scale),
         _np(rows), _np(y))
    return _finish(y, x, q.shape[0], bias)


def matmul_int4(x: Tensor, packed: Tensor, scales: Tensor, zeros: Tensor, group: int, in_features: int,
                bias: Optional[Tensor] = None) -> Tensor:
    """``x @ W^T (+ bias)`` for group-wise affine int4 (``w = (q - zero) * scale``)."""
    rows = _rows(x, in_features)
    padded = packed.shape[1] * 2
    if padded != in_features:
        rows = torch.nn.functional.pad(rows, (0, padded - in_features))
    y = _out(rows, packed.shape[0])
    _run("matmul_int4", packed.shape[0], packed.numel() * 2 * rows.shape[0], _np(packed), _np(scales), _np(zeros),
         _np(rows), _np(y), group)
    return _finish(y, x, packed.shape[0], bias)


def matmul_bf16(x: Tensor, weight: Tensor, bias: Optional[Tensor] = None) -> Tensor:
    """``x @ weight^T (+ bias)`` in float32 for a bfloat16 weight, without converting it first."""
    rows = _rows(x, weight.shape[1])
    y = _out(rows, weight.shape[0])
    _run("matmul_bf16", weight.shape[0], weight.numel() * rows.shape[0],
         _np(weight.view(torch.int16)).view("uint16"), _np(rows), _np(y))
    return _finish(y, x, weight.shape[0], bias)
