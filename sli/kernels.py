"""CPU kernels that multiply by quantized weights without dequantizing them first.

Decoding one token multiplies each weight by one activation row. Dequantizing a 4-bit
weight to float32 first costs several times the product itself, so a streamed decode would
be dequantization-bound (docs/benchmarks.md). The kernels here read the packed bytes once
and accumulate in registers instead: a row of the output is a dot product of the row's
decoded values with the activations, up to four activation rows per pass over a weight row.

The inner loops are SIMD helpers chosen at run time by what the CPU has (:func:`simd_path`):
AVX-512 or AVX2 numba intrinsics (:mod:`sli.simd`), else :mod:`sli.simd_fallback`'s plain
numba code. ``SLI_SIMD=avx512|avx2|plain`` asks for a level (capped at what the CPU has),
``SLI_NO_SIMD=1`` for the plain one. They are compiled with numba (``nogil``, split by output
rows across a small thread pool; ``cache=True``: compiled once per machine and level, then
loaded from ``__pycache__``). Every kernel has a plain torch equivalent in the codecs
(dequantize, then ``F.linear``); the processor uses the kernels for up to
:data:`FUSED_MAX_TOKENS` activation rows on CPU in float32, where they win, and the torch
path otherwise. ``SLI_NO_NUMBA=1`` turns them off.

All kernels take ``x`` as float32 ``[T, in]`` and write ``y`` float32 ``[T, out]``.
"""
from __future__ import annotations

import importlib.util
import logging
import os
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

SIMD_LEVELS = ("avx512", "avx2", "plain")  # best first

_lock = threading.Lock()
_kernels = None
_helpers = None


def kernels_enabled() -> bool:
    """Whether the numba kernels can be used (numba installed and not turned off)."""
    return not settings.flag("SLI_NO_NUMBA") and importlib.util.find_spec("numba") is not None


def requested_level() -> str:
    """The level ``SLI_SIMD`` / ``SLI_NO_SIMD`` ask for: "auto" (the best the CPU runs) or one
    of :data:`SIMD_LEVELS`."""
    if settings.flag("SLI_NO_SIMD"):
        return "plain"
    asked = os.environ.get("SLI_SIMD", "").strip().lower() or "auto"
    if asked not in SIMD_LEVELS + ("auto",):
        logger.warning("SLI_SIMD=%s is not one of %s; using the best this CPU runs", asked,
                       ", ".join(SIMD_LEVELS + ("auto",)))
        return "auto"
    return asked


def simd_helpers():
    """The helpers the kernels are built with: :mod:`sli.simd`'s for the best level the CPU
    runs (at most the one asked for), else :mod:`sli.simd_fallback`'s plain numba ones.

    :mod:`sli.simd` writes LLVM IR through numba's internals, which a numba release may
    move: a failure to import or build it falls back (with one warning), never breaks the
    kernels.
    """
    asked = requested_level()
    if asked != "plain":
        try:
            from . import simd

            runs = simd.host_levels()
            allowed = SIMD_LEVELS if asked == "auto" else SIMD_LEVELS[SIMD_LEVELS.index(asked):]
            chosen = next((level for level in allowed if level in runs), None)
            if asked != "auto" and chosen != asked:
                logger.warning("SLI_SIMD=%s: this CPU does not run it; using %s", asked, chosen or "plain")
            if chosen is not None:
                return simd.helpers(chosen)
        except Exception as exc:  # ImportError, AttributeError, LLVM errors: numba internals changed
            logger.warning("the SIMD helpers cannot be built against this numba (%s: %s); "
                           "using the plain kernels", type(exc).__name__, exc)
    from . import simd_fallback

    return simd_fallback.HELPERS


def simd_path() -> str:
    """The level the kernels were built with: "avx512", "avx2" or "plain" (builds them)."""
    _table()
    return _helpers.level


four_bit_path = simd_path  # the name before AVX-512


def _build(h):
    """Compile (or load from the on-disk cache) the kernels over helpers ``h``; called once, lazily."""
    import numpy as np
    from numba import njit

    lut4, lut4z, lut4n, dot8, dotbf16, decode64_4bit = h.lut4, h.lut4z, h.lut4n, h.dot8, h.dotbf16, h.decode64_4bit
    most = h.max_rows  # activation rows a helper multiplies in one pass
    # numba's cache keys each kernel by its closure (the helpers, with ids naming their level
    # and source; sli.simd_fallback.stable_id): each level has its own cached kernels.
    jit = njit(fastmath=True, cache=True, nogil=True)

    @jit
    def matmul_4bit(packed, absmax, code, x, y, blocksize, start, stop):
        # packed: uint8 [out*in/2] (first value in the high nibble); absmax: fp32 [out*in/blocksize];
        # x: fp32 [T, in] in lut4_order
        rows, cols = x.shape
        blocks_per_row = cols // blocksize
        xflat = x.reshape(x.size)
        acc = np.empty(most, np.float32)
        for o in range(start, stop):
            t = 0
            while t < rows:
                k = min(most, rows - t)
                lut4(packed, o * (cols // 2), code, absmax, o * blocks_per_row, blocksize, xflat, t * cols, cols, cols,
                     k, acc)
                for i in range(k):
                    y[t + i, o] = acc[i]
                t += k

    @jit
    def matmul_4bit_nested(packed, qabsmax, nested, nested_code, offset, nested_blocksize, code, x, y, blocksize,
                           start, stop):
        # double-quantized block maxima, decoded by the helper as each block starts:
        # absmax[b] = nested_code[qabsmax[b]] * nested[b // nested_blocksize] + offset
        rows, cols = x.shape
        blocks_per_row = cols // blocksize
        xflat = x.reshape(x.size)
        acc = np.empty(most, np.float32)
        total = np.empty(most, np.float32)
        for o in range(start, stop):
            b0 = o * blocks_per_row
            t = 0
            while t < rows:
                k = min(most, rows - t)
                total[:k] = 0.0
                blk = 0
                group = b0 // nested_blocksize
                while blk < blocks_per_row:  # one pass per group of block maxima the row meets (mostly one)
                    last = min(blocks_per_row, (group + 1) * nested_blocksize - b0)
                    lut4n(packed, o * (cols // 2) + blk * blocksize // 2, code, qabsmax, nested_code, nested[group],
                          offset, b0 + blk, blocksize, xflat, t * cols + blk * blocksize, (last - blk) * blocksize, cols,
                          k, acc)
                    for i in range(k):
                        total[i] += acc[i]
                    blk = last
                    group += 1
                for i in range(k):
                    y[t + i, o] = total[i]
                t += k

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
        # q: int8 [out*in]; y = (x @ q^T) * scale
        rows, cols = x.shape
        whole = cols // 64 * 64
        xflat = x.reshape(x.size)
        acc = np.empty(most, np.float32)
        for o in range(start, stop):
            t = 0
            while t < rows:
                k = min(most, rows - t)
                dot8(q, o * cols, xflat, t * cols, whole, cols, k, acc)
                for i in range(k):
                    s = acc[i]
                    for j in range(whole, cols):
                        s += np.float32(q[o * cols + j]) * x[t + i, j]
                    y[t + i, o] = s * scale[o]
                t += k

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
        # packed: uint8 [out*padded_in/2] (first value high nibble); scales, zeros: fp32 [out*groups];
        # x: fp32 [T, padded_in] in lut4_order. w = (q - zero) * scale: a 16-entry table per group.
        rows, cols = x.shape
        groups = cols // group
        code = np.arange(16).astype(np.float32)
        xflat = x.reshape(x.size)
        acc = np.empty(most, np.float32)
        for o in range(start, stop):
            t = 0
            while t < rows:
                k = min(most, rows - t)
                lut4z(packed, o * (cols // 2), code, scales, zeros, o * groups, group, xflat, t * cols, cols, cols, k,
                      acc)
                for i in range(k):
                    y[t + i, o] = acc[i]
                t += k

    @jit
    def matmul_bf16(w, x, y, start, stop):
        # w: bfloat16 bits as uint16 [out*in]; a bfloat16 is the top half of a float32
        rows, cols = x.shape
        whole = cols // 64 * 64
        xflat = x.reshape(x.size)
        acc = np.empty(most, np.float32)
        tail = np.empty(1, np.uint32)
        tail_value = tail.view(np.float32)
        for o in range(start, stop):
            t = 0
            while t < rows:
                k = min(most, rows - t)
                dotbf16(w, o * cols, xflat, t * cols, whole, cols, k, acc)
                for i in range(k):
                    s = acc[i]
                    for j in range(whole, cols):
                        tail[0] = np.uint32(w[o * cols + j]) << 16
                        s += tail_value[0] * x[t + i, j]
                    y[t + i, o] = s
                t += k

    return {"matmul_4bit": matmul_4bit, "matmul_4bit_nested": matmul_4bit_nested, "dequantize_4bit": dequantize_4bit,
            "dequantize_blockwise8": dequantize_blockwise8, "matmul_int8": matmul_int8,
            "matmul_lut8": matmul_lut8, "matmul_int4": matmul_int4, "matmul_bf16": matmul_bf16}


def _table() -> dict:
    """The kernels by name: numba dispatchers, built on first use."""
    global _kernels, _helpers
    if _kernels is None:
        with _lock:
            if _kernels is None:
                _helpers = simd_helpers()
                _kernels = _build(_helpers)
    return _kernels


def lanes() -> int:
    """How :func:`lut4_order` groups values for the 4-bit helpers (1: the weight's own order)."""
    _table()
    return _helpers.lanes


def lut4_order(rows: Tensor) -> Tensor:
    """``rows`` (float32 ``[T, n]``, ``n`` a multiple of 64) in the order the 4-bit helpers
    read: each ``2*lanes`` values as the even ones, then the odd ones (a register of high
    nibbles decodes the even values of ``2*lanes``). Once per call, shared by every weight row."""
    w = lanes()
    if w == 1:
        return rows
    t, n = rows.shape
    return rows.view(t, n // (2 * w), w, 2).transpose(2, 3).contiguous().view(t, n)


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


def _flat(t: Tensor) -> Tensor:
    return t.reshape(-1).contiguous()


def matmul_4bit(x: Tensor, packed: Tensor, absmax: Tensor, code: Tensor, blocksize: int, out_features: int,
                bias: Optional[Tensor] = None) -> Optional[Tensor]:
    """``x @ W^T (+ bias)`` for a bitsandbytes-layout 4-bit weight (``in`` a multiple of
    ``blocksize``, itself a multiple of 64), or None for other block sizes."""
    if blocksize % 64:
        return None
    rows = lut4_order(_rows(x, x.shape[-1]))
    y = _out(rows, out_features)
    _run("matmul_4bit", out_features, out_features * x.shape[-1] * rows.shape[0],
         _np(_flat(packed)), _np(_flat(absmax)), _np(code), _np(rows), _np(y), blocksize)
    return _finish(y, x, out_features, bias)


def matmul_4bit_nested(x: Tensor, packed: Tensor, qabsmax: Tensor, nested: Tensor, nested_code: Tensor, offset: float,
                       nested_blocksize: int, code: Tensor, blocksize: int, out_features: int,
                       bias: Optional[Tensor] = None) -> Optional[Tensor]:
    """:func:`matmul_4bit` with bitsandbytes' double-quantized (8-bit) block maxima."""
    if blocksize % 64:
        return None
    rows = lut4_order(_rows(x, x.shape[-1]))
    y = _out(rows, out_features)
    _run("matmul_4bit_nested", out_features, out_features * x.shape[-1] * rows.shape[0],
         _np(_flat(packed)), _np(_flat(qabsmax)), _np(nested), _np(nested_code), offset, nested_blocksize,
         _np(code), _np(rows), _np(y), blocksize)
    return _finish(y, x, out_features, bias)


def dequantize_4bit(packed: Tensor, absmax: Tensor, code: Tensor, blocksize: int, out: Tensor) -> Tensor:
    """Fill float32 ``out`` with ``code[nibble] * absmax[block]`` (bitsandbytes' values, ~5x faster here)."""
    _run("dequantize_4bit", absmax.shape[0], out.numel(), _np(_flat(packed)), _np(absmax), _np(code),
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
    _run("matmul_int8", q.shape[0], q.numel() * rows.shape[0], _np(_flat(q)), _np(scale), _np(rows), _np(y))
    return _finish(y, x, q.shape[0], bias)


def matmul_lut8(x: Tensor, q: Tensor, lut: Tensor, scale: Tensor, bias: Optional[Tensor] = None) -> Tensor:
    """``x @ (lut[q] * scale[:, None])^T (+ bias)`` for a one-byte code ``[out, in]`` (e.g. float8)."""
    rows = _rows(x, q.shape[1])
    y = _out(rows, q.shape[0])
    _run("matmul_lut8", q.shape[0], q.numel() * rows.shape[0], _np(q.view(torch.uint8)), _np(lut), _np(scale),
         _np(rows), _np(y))
    return _finish(y, x, q.shape[0], bias)


def matmul_int4(x: Tensor, packed: Tensor, scales: Tensor, zeros: Tensor, group: int, in_features: int,
                bias: Optional[Tensor] = None) -> Optional[Tensor]:
    """``x @ W^T (+ bias)`` for group-wise affine int4 (``w = (q - zero) * scale``), or None
    for a group size that is not a multiple of 64."""
    if group % 64:
        return None
    rows = _rows(x, in_features)
    padded = packed.shape[1] * 2
    if padded != in_features:
        rows = torch.nn.functional.pad(rows, (0, padded - in_features))
    rows = lut4_order(rows)
    y = _out(rows, packed.shape[0])
    _run("matmul_int4", packed.shape[0], packed.numel() * 2 * rows.shape[0], _np(_flat(packed)), _np(_flat(scales)),
         _np(_flat(zeros)), _np(rows), _np(y), group)
    return _finish(y, x, packed.shape[0], bias)


def matmul_bf16(x: Tensor, weight: Tensor, bias: Optional[Tensor] = None) -> Tensor:
    """``x @ weight^T (+ bias)`` in float32 for a bfloat16 weight, without converting it first."""
    rows = _rows(x, weight.shape[1])
    y = _out(rows, weight.shape[0])
    _run("matmul_bf16", weight.shape[0], weight.numel() * rows.shape[0],
         _np(_flat(weight).view(torch.int16)).view("uint16"), _np(rows), _np(y))
    return _finish(y, x, weight.shape[0], bias)
