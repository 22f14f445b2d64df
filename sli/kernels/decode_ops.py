"""numba kernels for the small operations of a decoder layer's one-token step
(:mod:`sli.decode_step`): RMSNorm, the rotary embedding, SiLU-gated products' activation and the
residual adds, each over a few rows in one call; and one position of keys or values written into
a compact KV buffer (bfloat16 or int8, the bytes :mod:`sli.kv_cache`'s torch code writes).

In ``transformers``' modeling code each of them is several torch operations (RMSNorm alone is
six), at ~3-10 µs apiece for rows of a few hundred values: on SmolLM2-135M they were most of a
decode step. Here each is one call of a few microseconds. They compute in float32 like the
modeling code (the sums in another order: equal to ~1e-6, not bit for bit).
"""
import numpy as np
from numba import njit

from .fast_exp import LARGEST, exp_parts
from .jit import KERNEL, STRICT_KERNEL


@KERNEL
def rms_norm(x, weight, eps, out):
    # out[t] = weight * x[t] / sqrt(mean(x[t]^2) + eps); x, out fp32 [T, H]
    rows, width = x.shape
    for t in range(rows):
        total = np.float32(0.0)
        for j in range(width):
            total += x[t, j] * x[t, j]
        scale = np.float32(1.0) / np.sqrt(total / np.float32(width) + np.float32(eps))
        for j in range(width):
            out[t, j] = weight[j] * (x[t, j] * scale)


@KERNEL
def add_rms_norm(x, delta, weight, eps, out):
    # x[t] += delta[t] (the residual), then out[t] = rms_norm(x[t])
    rows, width = x.shape
    for t in range(rows):
        total = np.float32(0.0)
        for j in range(width):
            v = x[t, j] + delta[t, j]
            x[t, j] = v
            total += v * v
        scale = np.float32(1.0) / np.sqrt(total / np.float32(width) + np.float32(eps))
        for j in range(width):
            out[t, j] = weight[j] * (x[t, j] * scale)


@KERNEL
def add(x, delta):
    # x += delta, fp32 [T, H]
    rows, width = x.shape
    for t in range(rows):
        for j in range(width):
            x[t, j] += delta[t, j]


@KERNEL
def rotate(x, heads, cos, sin):
    # in place: each head of x fp32 [T, heads*D] as x*cos + rotate_half(x)*sin, cos/sin fp32 [T, D]
    # (rotate_half(x) = [-x2, x1]: the two halves of the head swapped, the first negated)
    rows = x.shape[0]
    dim = cos.shape[1]
    half = dim // 2
    for t in range(rows):
        for h in range(heads):
            at = h * dim
            for j in range(half):
                a = x[t, at + j]
                b = x[t, at + half + j]
                x[t, at + j] = a * cos[t, j] - b * sin[t, j]
                x[t, at + half + j] = b * cos[t, half + j] + a * sin[t, half + j]


@STRICT_KERNEL  # no fastmath: exp_parts' two-part ln 2 as written
def silu_mul(gate, up, out):
    # out = silu(gate) * up = gate / (1 + exp(-gate)) * up, fp32 [T, I]; exp by exp_parts, which
    # vectorizes (libm's exp a value was ~4 us of a 1536-wide row, most of this kernel)
    rows, width = gate.shape
    e = np.empty(width, np.float32)
    powers = np.empty(width, np.int32)
    scale = powers.view(np.float32)
    for t in range(rows):
        for j in range(width):
            e[j], powers[j] = exp_parts(min(-gate[t, j], LARGEST))
        for j in range(width):
            out[t, j] = gate[t, j] / (np.float32(1.0) + e[j] * scale[j]) * up[t, j]


@KERNEL
def store_bf16(x, heads, data, position):
    # write one position of keys or values: x fp32 [heads*D] -> data uint16 [heads, capacity, D]
    # at `position`, each value rounded to bfloat16 to nearest-even as torch does (NaN: 0xFFFF, as
    # its vectorized conversion writes it)
    dim = data.shape[2]
    bits = x.view(np.uint32)
    for h in range(heads):
        for j in range(dim):
            b = bits[h * dim + j]
            if (b & np.uint32(0x7FFFFFFF)) > np.uint32(0x7F800000):
                data[h, position, j] = np.uint16(0xFFFF)
            else:
                data[h, position, j] = np.uint16((b + np.uint32(0x7FFF) + ((b >> np.uint32(16)) & np.uint32(1)))
                                                 >> np.uint32(16))


def _store_int8(x, heads, data, scale, position):
    # one position as int8 with a scale a head: scale = max(|x|, 1e-8) / 127, round(x / scale)
    # clamped to +-127 (sli.kv_cache's torch code, value for value)
    dim = data.shape[2]
    for h in range(heads):
        amax = np.float32(0.0)
        for j in range(dim):
            amax = max(amax, abs(x[h * dim + j]))
        s = max(amax, np.float32(1e-8)) / np.float32(127.0)
        scale[h, position] = s
        for j in range(dim):
            data[h, position, j] = np.int8(min(max(np.rint(x[h * dim + j] / s), np.float32(-127.0)),
                                               np.float32(127.0)))


store_int8 = njit(cache=True, nogil=True)(_store_int8)  # no fastmath: x / s rounds as torch's division


@njit(cache=True, nogil=True)  # no fastmath: the same sums wherever it is compiled in (a row's bits must not
def add_columns(x, columns, weights, y):  # depend on the caller: a lone token and a batch, one call and op by op)
    # y[t, o] += sum over c of x[t, columns[c]] * weights[o, c]: INT8's outlier columns in float,
    # x fp32 [T, in], columns int64 [k], weights fp32 [out, k], y fp32 [T, out]
    for t in range(y.shape[0]):
        for o in range(y.shape[1]):
            total = np.float32(0.0)
            for c in range(columns.shape[0]):
                total += x[t, columns[c]] * weights[o, c]
            y[t, o] += total


def build(h) -> dict:
    """The kernels by name (the same at every SIMD level)."""
    return {"rms_norm": rms_norm, "add_rms_norm": add_rms_norm, "add": add, "rotate": rotate, "silu_mul": silu_mul,
            "store_bf16": store_bf16, "store_int8": store_int8, "add_columns": add_columns}
