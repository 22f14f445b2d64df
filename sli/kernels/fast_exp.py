"""An exponential that LLVM vectorizes, for the kernels' softmax and SiLU.

numba's ``np.exp`` is a libm call a value (no SVML here): ~a fifth of the attention kernel's
time and most of SiLU's. :func:`exp_parts` splits ``exp(x)`` as ``2**n * exp(r)``,
``n = round(x / ln 2)``, ``r = x - n ln 2`` (Cody and Waite's two-part ln 2), a polynomial for
``exp(r)`` and ``2**n`` as float32 bits; every value on its own, so a loop over it vectorizes
(2.7x libm's speed in the attention kernel). Within 3e-7 of exp where a weight can matter.
"""
import numpy as np
from numba import njit

from .jit import stable_id

LOG2_E = np.float32(1.4426950408889634)
LN2_HIGH, LN2_LOW = np.float32(0.693359375), np.float32(-2.12194440e-4)  # ln 2 = their sum, HIGH exact in 9 bits
# exp(r) for |r| <= ln(2)/2: its Taylor series to r**7 (the next term < 6e-9 of it)
EXP_TERMS = tuple(np.float32(1.0 / np.prod(np.arange(1, k + 1, dtype=np.float64))) for k in range(7, -1, -1))
SMALLEST = np.float32(-87.0)  # exp(x) is 0 from here down (near float32's smallest normal)
LARGEST = np.float32(88.0)  # the largest x it takes: exp(88) ~ 1.65e38


@njit(inline="always", nogil=True)  # callers without fastmath: r = x - n * ln 2 in two parts, as written
def exp_parts(x):
    """``(e, bits)``: ``exp(x) = e * bits.view(float32)``, ``bits`` 0 for ``x <= -87``; ``x``
    float32 and at most :data:`LARGEST` (a softmax's shifted scores are <= 0; SiLU clamps)."""
    c7, c6, c5, c4, c3, c2, c1, c0 = EXP_TERMS
    x = max(x, np.float32(-88.0))
    n = np.rint(x * LOG2_E)
    r = (x - n * LN2_HIGH) - n * LN2_LOW
    e = ((((((c7 * r + c6) * r + c5) * r + c4) * r + c3) * r + c2) * r + c1) * r + c0
    return e, (np.int32(n) + 127) << 23 if x > SMALLEST else np.int32(0)


stable_id(exp_parts, "fast_exp.exp_parts")  # silu_mul and the attention kernels call it (their globals pickle it)
