"""numba kernels for a decode step's attention, read straight from compact keys and values.

Decoding one token attends one query row per head to every earlier position. With keys and
values kept in int8 (a scale per position and head) or bfloat16, widening the whole cache to
float32 first and handing it to ``scaled_dot_product_attention`` costs a full read and write
of the context in float32 every layer, every token: 53-74 ms a layer at 2048 positions of a
7B-shaped model, against ~3 ms to read the int8 bytes once (docs/benchmarks.md). These
kernels widen each key and value row in registers instead, the way the weight kernels do.

One kernel call takes a range of key-value heads; the query heads that share one (grouped
attention) are scored together, so each key row is read once for all of them.
"""
import numpy as np
from numba import njit

from .jit import KERNEL
from .unpacked import _bf16_value, _int8_value

LOG2_E = np.float32(1.4426950408889634)
LN2_HIGH, LN2_LOW = np.float32(0.693359375), np.float32(-2.12194440e-4)  # ln 2 = their sum, HIGH exact in 9 bits
# exp(r) for |r| <= ln(2)/2: its Taylor series to r**7 (the next term < 6e-9 of it)
EXP_TERMS = tuple(np.float32(1.0 / np.prod(np.arange(1, k + 1, dtype=np.float64))) for k in range(7, -1, -1))


@njit(nogil=True, cache=True)  # no fastmath: r = x - n * ln 2 in two parts, as written
def exp_shifted(scores, top, powers, length):
    """``scores[t] = exp(scores[t] - top)`` for ``t < length``; 0 from ``scores[t] - top <= -87``
    on (near float32's smallest normal), so a masked -inf position stays 0. numba's ``np.exp``
    is a libm call a value (no SVML here), ~a fifth of the attention kernel's time; this is
    2**n * exp(r), n = round(x / ln 2), r = x - n ln 2 (Cody and Waite's two-part ln 2): a
    polynomial and an exponent written into float bits, each value on its own, so LLVM
    vectorizes it (2.7x libm's speed). Within 1e-7 of exp where a weight can matter."""
    c7, c6, c5, c4, c3, c2, c1, c0 = EXP_TERMS
    for t in range(length):
        x = max(scores[t] - top, np.float32(-88.0))
        n = np.rint(x * LOG2_E)
        r = (x - n * LN2_HIGH) - n * LN2_LOW
        scores[t] = ((((((c7 * r + c6) * r + c5) * r + c4) * r + c3) * r + c2) * r + c1) * r + c0
        powers[t] = (np.int32(n) + 127) << 23 if x > np.float32(-87.0) else 0  # 2**n as float bits, or 0
    scale = powers.view(np.float32)
    for t in range(length):
        scores[t] *= scale[t]


def build(h) -> dict:
    """The kernels by name, over helpers ``h`` (their ``dot8`` / ``dotbf16`` score a key row)."""

    most = h.max_rows  # query rows a helper scores in one pass

    def decode_attention(dot, value):
        @KERNEL
        def attend(q, k, kscale, v, vscale, bias, length, scaling, out, start, stop):
            # q fp32 [H, D]; k, v [Hk, C, D] (int8, or bfloat16 bits as uint16), positions [0, length)
            # valid; kscale, vscale fp32 [Hk, C] (size 0: unscaled); bias fp32 [length] (-inf: masked);
            # out fp32 [H, D] = softmax(q k^T * scaling + bias) v, for the query heads of kv heads [start, stop)
            heads, dim = q.shape
            capacity = k.shape[1]
            group = heads // k.shape[0]
            whole = dim // 64 * 64
            scaled = kscale.size > 0
            kflat = k.reshape(k.size)
            qflat = q.reshape(q.size)
            scores = np.empty((group, length), np.float32)
            acc = np.empty(group, np.float32)
            row = np.empty(dim, np.float32)
            powers = np.empty(length, np.int32)
            for g in range(start, stop):
                first = g * group  # the group's first query head
                for t in range(length):
                    at = (g * capacity + t) * dim
                    for i in range(0, group, most):
                        if whole:
                            dot(kflat, at, qflat, (first + i) * dim, whole, dim, min(most, group - i), acc[i:])
                        else:
                            acc[i:] = 0.0
                    s = kscale[g, t] * scaling if scaled else np.float32(scaling)
                    for i in range(group):
                        total = acc[i]
                        for j in range(whole, dim):
                            total += value(kflat[at + j]) * q[first + i, j]
                        scores[i, t] = total * s + bias[t]
                for i in range(group):
                    top = scores[i, 0]
                    for t in range(1, length):
                        top = max(top, scores[i, t])
                    exp_shifted(scores[i], top, powers, length)
                    total = np.float32(0.0)
                    for t in range(length):
                        total += scores[i, t]
                    for t in range(length):
                        scores[i, t] = scores[i, t] / total * (vscale[g, t] if scaled else np.float32(1.0))
                    for j in range(dim):
                        out[first + i, j] = 0.0
                for t in range(length):
                    for j in range(dim):
                        row[j] = value(v[g, t, j])
                    for i in range(group):
                        p = scores[i, t]
                        if p != 0.0:
                            for j in range(dim):
                                out[first + i, j] += p * row[j]

        return attend

    return {"decode_attention_int8": decode_attention(h.dot8, _int8_value),
            "decode_attention_bf16": decode_attention(h.dotbf16, _bf16_value)}
