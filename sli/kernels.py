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

    from .simd_fallback import source_hash, stable_id

    lut4, lut4z, lut4n, dot8, dot8q, dot4q, dotbf16 = h.lut4, h.lut4z, h.lut4n, h.dot8, h.dot8q, h.dot4q, h.dotbf16
    dotfp8, dot4l = h.dotfp8, h.dot4l
    from .simd_fallback import e4m3_values

    e4m3 = e4m3_values()  # float8_e4m3fn byte -> float32, for the values after the last 64
    decode64_4bit = h.decode64_4bit
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

    @njit(cache=True, nogil=True)  # no fastmath: x * 127 / a rounds as INT8_DYNAMIC's torch code does
    def quantize_rows(x, xblock, sumblock, xq, xs, corr, bsum, oidx, oval):
        # x fp32 [T, in] -> xq int8 [T*in] with a scale a block of xblock values (xs [T*(in/xblock)]),
        # the oidx.shape[1] largest |x| of each row kept in float (oidx, oval [T, K]; 0 in xq);
        # corr[t] = 128 * sum over blocks of xs * sum(xq) (what dot8q's AVX-512 form subtracts);
        # bsum [T*(in/sumblock)]: sum(xq) a block of sumblock values
        rows, cols = x.shape
        sums = cols // sumblock
        keep = oidx.shape[1]
        blocks = cols // xblock
        row = np.empty(cols, np.float32)
        top = np.empty(keep + 1, np.float32)  # the keep + 1 largest |x|: the last is the rest's maximum
        at = np.empty(keep + 1, np.int64)
        for t in range(rows):
            for j in range(cols):
                row[j] = x[t, j]
            for k in range(keep + 1):
                top[k] = -1.0
                at[k] = 0
            for j in range(cols):  # by insertion: one pass, rarely taken
                a = abs(row[j])
                if a > top[keep]:
                    k = keep
                    while k > 0 and top[k - 1] < a:
                        top[k] = top[k - 1]
                        at[k] = at[k - 1]
                        k -= 1
                    top[k] = a
                    at[k] = j
            for k in range(keep):
                oidx[t, k] = at[k]
                oval[t, k] = row[at[k]]
                row[at[k]] = 0.0
            c = np.float32(0.0)
            for blk in range(blocks):
                amax = top[keep]  # a row's one block: known from the pass above
                if blocks > 1:
                    amax = np.float32(0.0)
                    for j in range(blk * xblock, (blk + 1) * xblock):
                        amax = max(amax, abs(row[j]))
                amax = max(amax, np.float32(1e-8))
                total = 0
                for j in range(blk * xblock, (blk + 1) * xblock):
                    v = np.rint(row[j] * np.float32(127.0) / amax)
                    xq[t * cols + j] = np.int8(v)
                    total += np.int32(v)
                s = amax / np.float32(127.0)
                xs[t * blocks + blk] = s
                c += s * np.float32(total)
            corr[t] = np.float32(128.0) * c
            for blk in range(sums):
                total = 0
                for j in range(blk * sumblock, (blk + 1) * sumblock):
                    total += np.int32(xq[t * cols + j])
                bsum[t * sums + blk] = np.float32(total)

    @jit
    def matmul_int8q(q, scale, xq, xs, corr, oidx, oval, xblock, y, start, stop):
        # q: int8 [out*in]; activations quantize_rows' int8 blocks + float outliers; y = (x @ q^T) * scale
        rows = y.shape[0]
        cols = q.shape[0] // y.shape[1]
        keep = oidx.shape[1]
        acc = np.empty(most, np.float32)
        for o in range(start, stop):
            t = 0
            while t < rows:
                k = min(most, rows - t)
                dot8q(q, o * cols, xq, xs, corr, t, k, cols, xblock, acc)
                for i in range(k):
                    s = acc[i]
                    for m in range(keep):
                        s += np.float32(q[o * cols + oidx[t + i, m]]) * oval[t + i, m]
                    y[t + i, o] = s * scale[o]
                t += k

    @jit
    def matmul_int4q(packed, scales, zeros, xq, xs, gsum, oidx, oval, group, y, start, stop):
        # matmul_int4 with int8 activations (quantize_rows, one scale a row, in q4_order) and
        # their largest values in float (oidx: natural columns)
        rows = y.shape[0]
        cols = xq.shape[0] // rows
        half = cols // 2
        groups = cols // group
        keep = oidx.shape[1]
        at_byte = np.empty((rows, keep), np.int64)  # where each kept value's nibble is, once a call
        shift = np.empty((rows, keep), np.int64)
        at_group = np.empty((rows, keep), np.int64)
        for t in range(rows):
            for m in range(keep):
                j = oidx[t, m]
                at_byte[t, m] = j // 2
                shift[t, m] = 4 * (1 - j % 2)
                at_group[t, m] = j // group
        acc = np.empty(most, np.float32)
        for o in range(start, stop):
            t = 0
            while t < rows:
                k = min(most, rows - t)
                dot4q(packed, o * half, scales, zeros, o * groups, group, xq, gsum, t, k, cols, acc)
                for i in range(k):
                    s = acc[i] * xs[t + i]
                    for m in range(keep):
                        nibble = (packed[o * half + at_byte[t + i, m]] >> shift[t + i, m]) & 15
                        g = o * groups + at_group[t + i, m]
                        s += ((np.float32(nibble) - zeros[g]) * scales[g]) * oval[t + i, m]
                    y[t + i, o] = s
                t += k

    @jit
    def matmul_fp8(q, scale, x, y, start, stop):
        # q: float8_e4m3fn bytes [out*in]; y = (x @ float(q)^T) * scale
        rows, cols = x.shape
        whole = cols // 64 * 64
        xflat = x.reshape(x.size)
        acc = np.empty(most, np.float32)
        for o in range(start, stop):
            t = 0
            while t < rows:
                k = min(most, rows - t)
                dotfp8(q, o * cols, xflat, t * cols, whole, cols, k, acc)
                for i in range(k):
                    s = acc[i]
                    for j in range(whole, cols):
                        s += e4m3[q[o * cols + j]] * x[t + i, j]
                    y[t + i, o] = s * scale[o]
                t += k

    offset_levels = h.offset_levels  # dot4l subtracts corr (128 * sum of scale * sum(xq)): AVX-512's vpdpbusd

    @njit(fastmath=True, cache=True, nogil=True)
    def _rows_4bitq(packed, o, scales, levels, code, xq, bsum, xs, kept, oval, blocksize, corr, y, acc):
        # row o of a 4-bit weight (scales: its block maxima / 127) times int8 activations
        rows = y.shape[0]
        cols = xq.shape[0] // rows
        half = cols // 2
        blocks = cols // blocksize
        keep = oval.shape[1]
        if offset_levels:
            for t in range(rows):
                c = np.float32(0.0)
                for blk in range(blocks):
                    c += scales[blk] * bsum[t * blocks + blk]
                corr[t] = np.float32(128.0) * c
        t = 0
        while t < rows:
            k = min(most, rows - t)
            dot4l(packed, o * half, levels, scales, 0, blocksize, xq, corr, t, k, cols, acc)
            for i in range(k):
                s = acc[i] * xs[t + i]
                for m in range(keep):  # the kept values meet the weight itself: code * absmax
                    byte = np.int64(packed[o * half + kept[t + i, m, 0]])
                    nibble = (byte >> kept[t + i, m, 1]) & 15
                    s += (code[nibble] * (scales[kept[t + i, m, 2]] * np.float32(127.0))) * oval[t + i, m]
                y[t + i, o] = s
            t += k

    stable_id(_rows_4bitq, f"kernels._rows_4bitq:{h.level}:{source_hash(__file__)}")  # see stable_id

    @njit(cache=True, nogil=True)
    def _kept_at(oidx, blocksize):
        # where each kept value's nibble is: byte, shift, block (once a call)
        rows, keep = oidx.shape
        kept = np.empty((rows, keep, 3), np.int64)
        for t in range(rows):
            for m in range(keep):
                j = oidx[t, m]
                kept[t, m, 0] = j // 2
                kept[t, m, 1] = 4 * (1 - j % 2)
                kept[t, m, 2] = j // blocksize
        return kept

    stable_id(_kept_at, f"kernels._kept_at:{h.level}:{source_hash(__file__)}")

    @jit
    def matmul_4bitq(packed, absmax, levels, code, xq, bsum, xs, oidx, oval, blocksize, y, start, stop):
        # matmul_4bit with the 16 levels as int8 (levels = round(127 * code)) and int8 activations
        # (quantize_rows: one scale a row, in q4_order(..., 32); bsum a block)
        rows = y.shape[0]
        cols = xq.shape[0] // rows
        blocks_per_row = cols // blocksize
        scales = np.empty(blocks_per_row, np.float32)
        corr = np.empty(rows, np.float32)
        kept = _kept_at(oidx, blocksize)
        acc = np.empty(most, np.float32)
        for o in range(start, stop):
            for blk in range(blocks_per_row):
                scales[blk] = absmax[o * blocks_per_row + blk] * np.float32(1.0 / 127.0)
            _rows_4bitq(packed, o, scales, levels, code, xq, bsum, xs, kept, oval, blocksize, corr, y, acc)

    @jit
    def matmul_4bitq_nested(packed, qabsmax, nested, nested_code, offset, nested_blocksize, levels, code, xq, bsum,
                            xs, oidx, oval, blocksize, y, start, stop):
        rows = y.shape[0]
        cols = xq.shape[0] // rows
        blocks_per_row = cols // blocksize
        scales = np.empty(blocks_per_row, np.float32)
        corr = np.empty(rows, np.float32)
        kept = _kept_at(oidx, blocksize)
        acc = np.empty(most, np.float32)
        for o in range(start, stop):
            b = o * blocks_per_row
            group = b // nested_blocksize
            first = min(blocks_per_row, (group + 1) * nested_blocksize - b)
            scale = nested[group] * np.float32(1.0 / 127.0)
            add = offset * np.float32(1.0 / 127.0)
            for blk in range(first):
                scales[blk] = nested_code[qabsmax[b + blk]] * scale + add
            for blk in range(first, blocks_per_row):
                scales[blk] = (nested_code[qabsmax[b + blk]] * nested[(b + blk) // nested_blocksize] + offset) \
                    * np.float32(1.0 / 127.0)
            _rows_4bitq(packed, o, scales, levels, code, xq, bsum, xs, kept, oval, blocksize, corr, y, acc)

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

    from .simd_fallback import lut4z as lut4z_any  # any even group size, x in the weight's order

    @jit
    def matmul_int4_any(packed, scales, zeros, x, y, group, start, stop):
        # matmul_int4 for a group size the SIMD helpers do not step in (not a multiple of 64)
        rows, cols = x.shape
        groups = cols // group
        code = np.arange(16).astype(np.float32)
        xflat = x.reshape(x.size)
        acc = np.empty(rows, np.float32)
        for o in range(start, stop):
            lut4z_any(packed, o * (cols // 2), code, scales, zeros, o * groups, group, xflat, 0, cols, cols, rows, acc)
            for t in range(rows):
                y[t, o] = acc[t]

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
            "quantize_rows": quantize_rows, "matmul_int8q": matmul_int8q, "matmul_int4q": matmul_int4q,
            "matmul_lut8": matmul_lut8, "matmul_fp8": matmul_fp8, "matmul_4bitq": matmul_4bitq,
            "matmul_4bitq_nested": matmul_4bitq_nested, "matmul_int4": matmul_int4, "matmul_int4_any": matmul_int4_any, "matmul_bf16": matmul_bf16}


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


# NF4/FP4 can meet int8 activations too, their 16 levels as int8 (round(127 * code), llama.cpp
# IQ4_NL's way), from this many rows on: 0.75x their float kernel's time at 16 rows, 0.86x at 8,
# slower below 6 (each row pays a convert and a multiply-add per 64-value block). Off (0) by
# default: the int8 levels alone moved SmolLM2's NF4 perplexity by +0.8% (19.55 -> 19.71), past
# the 0.5% the issue allows (docs/benchmarks.md); bitsandbytes' levels are not on an int8 grid.
INT8_LEVELS_ROWS = 0


def _levels(code: Tensor) -> Tensor:
    return torch.round(code.float() * 127).clamp_(-127, 127).to(torch.int8)


def _int8_4bit(x: Tensor, blocksize: int):
    """``x``'s rows quantized for :func:`matmul_4bit`'s int8 path, or None where it stays float."""
    rows = _rows(x, x.shape[-1])
    if not (INT8_LEVELS_ROWS and rows.shape[0] >= INT8_LEVELS_ROWS and int8_activations(rows.shape[0])
            and blocksize % 64 == 0):
        return None
    xq, xs, _, bsum, oidx, oval = quantize_rows(rows, rows.shape[1], min(KEEP_FLOAT, rows.shape[1] - 1), blocksize)
    return rows, q4_order(xq.view(rows.shape), 32).view(-1), xs, bsum, oidx, oval


def matmul_4bit(x: Tensor, packed: Tensor, absmax: Tensor, code: Tensor, blocksize: int, out_features: int,
                bias: Optional[Tensor] = None) -> Optional[Tensor]:
    """``x @ W^T (+ bias)`` for a bitsandbytes-layout 4-bit weight (``in`` a multiple of
    ``blocksize``, itself a multiple of 64), or None for other block sizes. From
    :data:`INT8_ACTIVATION_ROWS` rows on, the 16 levels as int8 meet int8 activations."""
    if blocksize % 64:
        return None
    quantized = _int8_4bit(x, blocksize)
    if quantized is not None:
        rows, xq, xs, bsum, oidx, oval = quantized
        y = _out(rows, out_features)
        _run("matmul_4bitq", out_features, out_features * x.shape[-1] * rows.shape[0] // 4, _np(_flat(packed)),
             _np(_flat(absmax)), _np(_levels(code)), _np(code), _np(xq), _np(bsum), _np(xs), _np(oidx), _np(oval),
             blocksize, _np(y))
        return _finish(y, x, out_features, bias)
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
    quantized = _int8_4bit(x, blocksize)
    if quantized is not None:
        rows, xq, xs, bsum, oidx, oval = quantized
        y = _out(rows, out_features)
        _run("matmul_4bitq_nested", out_features, out_features * x.shape[-1] * rows.shape[0] // 4,
             _np(_flat(packed)), _np(_flat(qabsmax)), _np(nested), _np(nested_code), offset, nested_blocksize,
             _np(_levels(code)), _np(code), _np(xq), _np(bsum), _np(xs), _np(oidx), _np(oval), blocksize, _np(y))
        return _finish(y, x, out_features, bias)
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


# From this many activation rows on, INT8 and INT4 weights meet int8 activations (one scale
# a row, its KEEP_FLOAT largest |x| in float) in integer dot products, on a SIMD level: ~2x
# the float kernels at 16 rows (docs/benchmarks.md). One row stays float: it is bound by
# memory, not arithmetic, so int8 would cost accuracy for nothing. SLI_FLOAT_ACTIVATIONS=1
# keeps every product float.
INT8_ACTIVATION_ROWS = 2
KEEP_FLOAT = 4  # = INT8_DYNAMIC's outliers per token


def int8_activations(rows: int) -> bool:
    """Whether a product of ``rows`` activation rows by an INT8 or INT4 weight quantizes the
    activations to int8 (see :data:`INT8_ACTIVATION_ROWS`)."""
    return (rows >= INT8_ACTIVATION_ROWS and not settings.flag("SLI_FLOAT_ACTIVATIONS")
            and simd_path() != "plain")


def matmul_int8(x: Tensor, q: Tensor, scale: Tensor, bias: Optional[Tensor] = None,
                activations: str = "auto") -> Tensor:
    """``x @ (q * scale[:, None])^T (+ bias)`` for an int8 ``[out, in]`` weight.

    ``activations``: "float" multiplies ``x`` as it is; "int8" quantizes each row of ``x`` to
    int8 (one scale, its :data:`KEEP_FLOAT` largest |x| in float) and multiplies with integer
    dot products; "auto" picks by :func:`int8_activations`; "on-grid" is for an ``x`` already
    on that grid (INT8_DYNAMIC's :meth:`prepare_input`), where both give the same values: the
    faster one (int8 on a SIMD level).
    """
    rows = _rows(x, q.shape[1])
    y = _out(rows, q.shape[0])
    if activations == "auto":
        activations = "int8" if int8_activations(rows.shape[0]) else "float"
    elif activations == "on-grid":
        activations = "int8" if simd_path() != "plain" else "float"
    if activations == "int8" and q.shape[1] % 64 == 0:
        xq, xs, corr, _, oidx, oval = quantize_rows(rows, q.shape[1], min(KEEP_FLOAT, q.shape[1] - 1))
        _run("matmul_int8q", q.shape[0], q.numel() * rows.shape[0] // 4, _np(_flat(q)), _np(scale), _np(xq), _np(xs),
             _np(corr), _np(oidx), _np(oval), q.shape[1], _np(y))
    else:
        _run("matmul_int8", q.shape[0], q.numel() * rows.shape[0], _np(_flat(q)), _np(scale), _np(rows), _np(y))
    return _finish(y, x, q.shape[0], bias)


def quantize_rows(rows: Tensor, xblock: int, keep: int = 0, sumblock: Optional[int] = None):
    """``rows`` (float32 ``[T, in]``) as int8 blocks of ``xblock`` values with a float scale
    each, the ``keep`` largest |x| of each row kept in float: ``(xq, xs, corr, bsum, oidx, oval)``
    (``bsum``: the sum of ``xq`` a block of ``sumblock`` values)."""
    t, n = rows.shape
    sumblock = sumblock or n
    xq = torch.empty(t * n, dtype=torch.int8)
    xs = torch.empty(t * (n // xblock), dtype=torch.float32)
    corr = torch.empty(t, dtype=torch.float32)
    bsum = torch.empty(t * (n // sumblock), dtype=torch.float32)
    oidx = torch.empty(t, keep, dtype=torch.int64)
    oval = torch.empty(t, keep, dtype=torch.float32)
    _get("quantize_rows")(_np(rows), xblock, sumblock, _np(xq), _np(xs), _np(corr), _np(bsum), _np(oidx), _np(oval))
    return xq, xs, corr, bsum, oidx, oval


def matmul_lut8(x: Tensor, q: Tensor, lut: Tensor, scale: Tensor, bias: Optional[Tensor] = None) -> Tensor:
    """``x @ (lut[q] * scale[:, None])^T (+ bias)`` for a one-byte code ``[out, in]`` (e.g. float8)."""
    rows = _rows(x, q.shape[1])
    y = _out(rows, q.shape[0])
    _run("matmul_lut8", q.shape[0], q.numel() * rows.shape[0], _np(q.view(torch.uint8)), _np(lut), _np(scale),
         _np(rows), _np(y))
    return _finish(y, x, q.shape[0], bias)


def matmul_fp8(x: Tensor, q: Tensor, scale: Tensor, bias: Optional[Tensor] = None) -> Tensor:
    """``x @ (float(q) * scale[:, None])^T (+ bias)`` for a float8_e4m3fn ``[out, in]`` weight,
    its bytes decoded by arithmetic in registers (no table)."""
    rows = _rows(x, q.shape[1])
    y = _out(rows, q.shape[0])
    _run("matmul_fp8", q.shape[0], q.numel() * rows.shape[0], _np(_flat(q).view(torch.uint8)), _np(scale), _np(rows),
         _np(y))
    return _finish(y, x, q.shape[0], bias)


def q4_order(rows: Tensor, half: int = 64) -> Tensor:
    """int8 ``rows`` ``[T, n]`` (``n`` a multiple of ``2*half``) with each ``2*half`` values as
    the even ones, then the odd ones: the order of the nibbles of ``half`` packed bytes."""
    t, n = rows.shape
    return rows.view(t, n // (2 * half), half, 2).transpose(2, 3).contiguous().view(t, n)


def matmul_int4(x: Tensor, packed: Tensor, scales: Tensor, zeros: Tensor, group: int, in_features: int,
                bias: Optional[Tensor] = None, activations: str = "auto") -> Optional[Tensor]:
    """``x @ W^T (+ bias)`` for group-wise affine int4 (``w = (q - zero) * scale``).
    ``activations`` as in :func:`matmul_int8` (int8 needs a group size that is a multiple of
    128; a group size that is not a multiple of 64 takes the plain loops)."""
    rows = _rows(x, in_features)
    padded = packed.shape[1] * 2
    if padded != in_features:
        rows = torch.nn.functional.pad(rows, (0, padded - in_features))
    y = _out(rows, packed.shape[0])
    if group % 64:
        _run("matmul_int4_any", packed.shape[0], packed.numel() * 2 * rows.shape[0], _np(_flat(packed)),
             _np(_flat(scales)), _np(_flat(zeros)), _np(rows), _np(y), group)
        return _finish(y, x, packed.shape[0], bias)
    if activations == "auto":
        activations = "int8" if int8_activations(rows.shape[0]) else "float"
    if activations == "int8" and group % 128 == 0:
        xq, xs, _, gsum, oidx, oval = quantize_rows(rows, padded, min(KEEP_FLOAT, in_features - 1), group)
        _run("matmul_int4q", packed.shape[0], packed.numel() * 2 * rows.shape[0] // 4, _np(_flat(packed)),
             _np(_flat(scales)), _np(_flat(zeros)), _np(q4_order(xq.view(rows.shape)).view(-1)), _np(xs), _np(gsum),
             _np(oidx), _np(oval), group, _np(y))
    else:
        _run("matmul_int4", packed.shape[0], packed.numel() * 2 * rows.shape[0], _np(_flat(packed)),
             _np(_flat(scales)), _np(_flat(zeros)), _np(lut4_order(rows)), _np(y), group)
    return _finish(y, x, packed.shape[0], bias)


def matmul_bf16(x: Tensor, weight: Tensor, bias: Optional[Tensor] = None) -> Tensor:
    """``x @ weight^T (+ bias)`` in float32 for a bfloat16 weight, without converting it first."""
    rows = _rows(x, weight.shape[1])
    y = _out(rows, weight.shape[0])
    _run("matmul_bf16", weight.shape[0], weight.numel() * rows.shape[0],
         _np(_flat(weight).view(torch.int16)).view("uint16"), _np(rows), _np(y))
    return _finish(y, x, weight.shape[0], bias)
