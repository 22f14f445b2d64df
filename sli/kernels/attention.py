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

from .fast_exp import exp_parts
from .jit import KERNEL
from .unpacked import _bf16_value, _int8_value


@njit(nogil=True, cache=True)  # no fastmath: exp_parts' two-part ln 2 as written
def exp_shifted(scores, top, powers, length):
    """``scores[t] = exp(scores[t] - top)`` for ``t < length`` (:func:`.fast_exp.exp_parts`);
    0 from ``scores[t] - top <= -87`` on, so a masked -inf position stays 0."""
    for t in range(length):
        scores[t], powers[t] = exp_parts(scores[t] - top)
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
