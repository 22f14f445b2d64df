"""numba kernels for weights stored a value an element: INT8 (a float32 scale a row), FP8
(float8_e4m3fn bytes, a scale a row), a one-byte code with a table (``lut8``) and bfloat16.
INT8, FP8 and bfloat16 share one kernel: the ``dot8``/``dotfp8``/``dotbf16`` helpers widen
each 64 values to float32 in registers, a loop takes the last ``in % 64``. INT8 also meets int8
activations, through ``dot8q``.
"""
import numpy as np
from numba import njit

from .jit import KERNEL, STRICT_KERNEL, stable_id
from .plain import E4M3


# One weight value as float32, for the values after the last 64 (the helpers take the rest).
@njit(nogil=True)
def _int8_value(q):
    return np.float32(q)


@njit(nogil=True)
def _fp8_value(q):
    return E4M3[q]


@njit(nogil=True)
def _bf16_value(bits):
    return np.uint32(np.uint32(bits) << 16).view(np.float32)  # a bfloat16 is the top half of a float32


@njit(nogil=True)  # no fastmath: the same order of sums at each of a kernel's call sites (a row's bits
def _plus_kept(q, at, oidx, oval, t, s):  # must not depend on the pass that computes it)
    # s plus row t's values kept in float (quantize_rows' outliers) times the weight row at q[at:]
    for m in range(oidx.shape[1]):
        s += np.float32(q[at + oidx[t, m]]) * oval[t, m]
    return s


for _f in (_int8_value, _fp8_value, _bf16_value, _plus_kept):
    stable_id(_f, f"unpacked.{_f.__name__}")  # the kernels hold them in their closures


def build(h) -> dict:
    """The kernels by name, over helpers ``h`` (one SIMD level's or the plain ones)."""
    dot8q, dot8q_rows = h.dot8q, h.dot8q_rows
    most = h.max_rows  # activation rows a helper multiplies in one pass
    weight_rows = h.weight_rows  # weight rows dot8q_rows multiplies by one activation row
    dot8q_row, row_passes = h.dot8q_row, h.row_passes  # a token's INT8 product a row a pass
    dot8q_tile, tile_rows = h.dot8q_tile, h.tile_rows  # several rows' INT8 products: tile_rows weight rows a pass

    def widening_kernel(name, dot, dot_rows, value, scaled, at_once):
        @njit(nogil=True)  # no fastmath: the same order of sums at both call sites below
        def plus_tail(q, at, x, t, whole, cols, s):
            # s plus the row's values after the last 64 (the helpers take the rest)
            for j in range(whole, cols):
                s += value(q[at + j]) * x[t, j]
            return s

        stable_id(plus_tail, f"unpacked.plus_tail_{name}:{h.level}")

        @STRICT_KERNEL
        def matmul(q, scale, x, y, start, stop):
            # q: [out*in] values; y = (x @ value(q)^T) * scale (no scale where not scaled: bfloat16)
            rows, cols = x.shape
            whole = cols // 64 * 64
            xflat = x.reshape(x.size)
            acc = np.empty(max(most, weight_rows), np.float32)
            o = start
            if rows == 1 and weight_rows > 1:  # one token: weight_rows weight rows a pass (the same sums)
                while o + weight_rows <= stop:
                    dot_rows(q, o * cols, cols, xflat, 0, whole, acc)
                    for w in range(weight_rows):
                        s = plus_tail(q, (o + w) * cols, x, 0, whole, cols, acc[w])
                        y[0, o + w] = s * scale[o + w] if scaled else s
                    o += weight_rows
            for o in range(o, stop):
                for t in range(0, rows, at_once):
                    k = min(at_once, rows - t)
                    dot(q, o * cols, xflat, t * cols, whole, cols, k, acc)
                    for i in range(k):
                        s = plus_tail(q, o * cols, x, t + i, whole, cols, acc[i])
                        y[t + i, o] = s * scale[o] if scaled else s

        return matmul

    @STRICT_KERNEL
    def matmul_int8q(q, scale, xq, xs, corr, oidx, oval, xblock, y, start, stop):
        # q: int8 [out*in]; activations quantize_rows' int8 blocks + float outliers; y = (x @ q^T) * scale.
        # The loop of matmul_4bitq (sli.kernels.four_bit): at_once weight rows a pass
        rows = y.shape[0]
        cols = q.shape[0] // y.shape[1]
        acc = np.empty(max(most * tile_rows, weight_rows), np.float32)
        # One token, a weight row after another (the same sums), in a loop of its own: inside the
        # general loop below these passes took 1.4x as long on rows of 576 values (SmolLM2's head)
        if rows == 1 and row_passes:
            for o in range(start, stop):
                dot8q_row(q, o * cols, xq, xs, corr, cols, xblock, acc)
                y[0, o] = _plus_kept(q, o * cols, oidx, oval, 0, acc[0]) * scale[o]
            return
        o = start
        while o < stop:
            if rows == 1:  # one token: weight_rows weight rows a pass
                at_once = weight_rows if o + weight_rows <= stop else 1
            else:  # several rows: tile_rows weight rows by each pass of activation rows
                at_once = tile_rows if o + tile_rows <= stop else 1
            if rows == 1 and at_once > 1:
                dot8q_rows(q, o * cols, xq, xs, corr, 0, cols, xblock, acc)
            for t in range(0, rows, most):
                k = min(most, rows - t)
                if rows > 1 and at_once > 1:
                    dot8q_tile(q, o * cols, xq, xs, corr, t, k, cols, xblock, acc)
                elif at_once == 1:
                    dot8q(q, o * cols, xq, xs, corr, t, k, cols, xblock, acc)
                for w in range(at_once):
                    for i in range(k):
                        total = _plus_kept(q, (o + w) * cols, oidx, oval, t + i, acc[w * k + i])
                        y[t + i, o + w] = total * scale[o + w]
            o += at_once

    @KERNEL
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

    # bfloat16 (NONE, and the unquantized head) meets one row a pass: a helper sums a pass of 1,
    # 2 or more rows in 4, 2 or 1 chains, and the head's last bit must not depend on the batch
    # (a server's greedy tokens equal a lone request's); its widening is a shift, so passes of
    # one row cost little more
    return {"matmul_int8": widening_kernel("int8", h.dot8, h.dot8_rows, _int8_value, True, most),
            "matmul_fp8": widening_kernel("fp8", h.dotfp8, h.dotfp8_rows, _fp8_value, True, most),
            "matmul_bf16": widening_kernel("bf16", h.dotbf16, h.dotbf16_rows, _bf16_value, False, 1),  # no scale
            "matmul_int8q": matmul_int8q, "matmul_lut8": matmul_lut8}
