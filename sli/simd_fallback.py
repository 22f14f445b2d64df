"""Plain numba versions of :mod:`sli.simd`'s helpers: same names, same arguments, same results.

What the kernels use on a CPU without AVX2, with ``SLI_SIMD=plain`` or ``SLI_NO_SIMD=1``,
or when the intrinsics cannot be built against the installed numba. ``x`` is in the
weight's own order here (:data:`lanes` 1: nothing to reorder).
"""
import hashlib
from types import SimpleNamespace

import numpy as np
from numba import njit


def stable_id(obj, name: str):
    """Give a numba intrinsic or dispatcher the id ``name`` before anything pickles it.

    numba's on-disk cache keys a kernel by its bytecode and its closure, pickled; an
    intrinsic or a jitted function in a closure pickles as a random id unless given one, so
    each process would compile the kernel again. A stable id that names the helper's level
    and the contents of the file that emits it keeps the cache valid across processes and
    apart across levels and versions.
    """
    obj._set_uuid(f"sli:{name}")
    return obj


def source_hash(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()[:16]


_jit = njit(fastmath=True, nogil=True, inline="always")


@_jit
def lut4(packed, pofs, code, scales, sofs, blocksize, x, xofs, n, stride, rows, out):
    for r in range(rows):
        base = xofs + r * stride
        s = np.float32(0.0)
        for blk in range(n // blocksize):
            scale = scales[sofs + blk]
            d = np.float32(0.0)
            for k in range(blk * blocksize // 2, (blk + 1) * blocksize // 2):
                b = packed[pofs + k]
                d += (code[b >> 4] * scale) * x[base + 2 * k] + (code[b & 15] * scale) * x[base + 2 * k + 1]
            s += d
        out[r] = s


@_jit
def lut4z(packed, pofs, code, scales, zeros, sofs, blocksize, x, xofs, n, stride, rows, out):
    for r in range(rows):
        base = xofs + r * stride
        s = np.float32(0.0)
        for blk in range(n // blocksize):
            scale = scales[sofs + blk]
            zero = zeros[sofs + blk]
            d = np.float32(0.0)
            for k in range(blk * blocksize // 2, (blk + 1) * blocksize // 2):
                b = packed[pofs + k]
                d += ((code[b >> 4] - zero) * scale) * x[base + 2 * k] + ((code[b & 15] - zero) * scale) * x[base + 2 * k + 1]
            s += d
        out[r] = s


@_jit
def lut4n(packed, pofs, code, qabsmax, nested_code, nested, offset, sofs, blocksize, x, xofs, n, stride, rows, out):
    for r in range(rows):
        base = xofs + r * stride
        s = np.float32(0.0)
        for blk in range(n // blocksize):
            scale = nested_code[qabsmax[sofs + blk]] * nested + offset
            d = np.float32(0.0)
            for k in range(blk * blocksize // 2, (blk + 1) * blocksize // 2):
                b = packed[pofs + k]
                d += (code[b >> 4] * scale) * x[base + 2 * k] + (code[b & 15] * scale) * x[base + 2 * k + 1]
            s += d
        out[r] = s


@_jit
def dot8(q, qofs, x, xofs, n, stride, rows, out):
    for r in range(rows):
        base = xofs + r * stride
        s = np.float32(0.0)
        for j in range(n):
            s += np.float32(q[qofs + j]) * x[base + j]
        out[r] = s


@_jit
def dotbf16(w, wofs, x, xofs, n, stride, rows, out):
    for r in range(rows):
        base = xofs + r * stride
        bits = np.empty(n, np.uint32)
        for j in range(n):
            bits[j] = np.uint32(w[wofs + j]) << 16
        values = bits.view(np.float32)
        s = np.float32(0.0)
        for j in range(n):
            s += values[j] * x[base + j]
        out[r] = s


@_jit
def decode64_4bit(packed, pofs, code, scale, out, oofs):
    for k in range(32):
        b = packed[pofs + k]
        out[oofs + 2 * k] = code[b >> 4] * scale
        out[oofs + 2 * k + 1] = code[b & 15] * scale


for _f in (lut4, lut4z, lut4n, dot8, dotbf16, decode64_4bit):
    stable_id(_f, f"simd_fallback.{_f.__name__}:{source_hash(__file__)}")

HELPERS = SimpleNamespace(level="plain", lanes=1, max_rows=4, lut4=lut4, lut4z=lut4z, lut4n=lut4n, dot8=dot8, dotbf16=dotbf16,
                          decode64_4bit=decode64_4bit)
