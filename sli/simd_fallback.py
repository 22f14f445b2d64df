"""Plain numba versions of :mod:`sli.simd`'s 4-bit helpers: same names, same results.

What the 4-bit kernels use on a CPU without AVX2, with ``SLI_NO_SIMD=1``, or when the
intrinsics cannot be built against the installed numba.
"""
import numpy as np
from numba import njit


@njit(fastmath=True, nogil=True, inline="always")
def dot64_4bit(packed, pofs, x, xofs, code):
    s = np.float32(0.0)
    for k in range(32):
        b = packed[pofs + k]
        s += code[b >> 4] * x[xofs + 2 * k] + code[b & 15] * x[xofs + 2 * k + 1]
    return s


@njit(fastmath=True, nogil=True, inline="always")
def decode64_4bit(packed, pofs, code, scale, out, oofs):
    for k in range(32):
        b = packed[pofs + k]
        out[oofs + 2 * k] = code[b >> 4] * scale
        out[oofs + 2 * k + 1] = code[b & 15] * scale
