"""Plain numba versions of :mod:`sli.kernels.simd`'s helpers: same names, same arguments, same results.

What the kernels use on a CPU without AVX2, with ``SLI_SIMD=plain`` or ``SLI_NO_SIMD=1``,
or when the intrinsics cannot be built against the installed numba. ``x`` is in the
weight's own order here (:data:`lanes` 1: nothing to reorder).
"""
from types import SimpleNamespace

import numpy as np
from llvmlite import ir
from numba import njit, types
from numba.core.extending import intrinsic

from .jit import stable_id

# Arrays are sliced before the loops: an index that is a range's variable needs no negative-
# index check, which would keep LLVM from vectorizing (30x slower here).
_jit = njit(fastmath=True, nogil=True)

# Weight rows a one-activation-row pass of the SIMD helpers multiplies (a token's decode): their
# sums are independent chains of dot products, in flight together (``dot8q_rows``).
WEIGHT_ROWS = 4
# Weight rows a several-activation-row pass of the SIMD helpers multiplies (a prompt's, a batch's:
# ``dot8q_tile``, ``dot4l_tile``)
TILE_WEIGHT_ROWS = 2
# A token's 4-bit rows (INT4, NF4/FP4) of up to this many values take WEIGHT_ROWS weight rows a
# pass even where a token's products take one (AMD Zen 4: sli.kernels.simd.token_pass_rows): four
# short rows lie in one run of memory, and a row alone keeps fewer sums in flight. Measured on a
# Zen 4 (docs/benchmarks.md, 2026-12-07), SmolLM2's 576- and 1536-wide rows: its INT4 decode ÷ its
# NF4 decode in one process, median 0.82 -> 0.91, then its NF4 ÷ its INT8 1.43 -> 1.58; a 4096-wide
# INT4 weight from RAM took 1.07-1.18 ms a row a pass against 1.21-1.28 four. INT8 keeps one a
# pass (four were slower on SmolLM2).
SHORT_ROW = 2048


@intrinsic
def _float_of_bits(typingctx, bits):
    """The float32 whose 32 bits are the int32 ``bits``."""
    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], ir.FloatType())
    return types.float32(types.int32), codegen


@_jit
def half_value(bits):
    """The float32 value of the IEEE half whose 16 bits are ``bits`` (an int16 or uint16), exact:
    INT4's scales are read as stored, and numba has no float16 arrays. Integer operations, not
    ``fpext``, which needs F16C (or a library call numba does not link) on the plain level."""
    h = np.int32(bits) & 0xFFFF
    magnitude = h & 0x7FFF
    if magnitude < 0x400:  # zero or subnormal: mantissa * 2**-24
        value = np.float32(magnitude) * np.float32(5.9604644775390625e-08)
    elif magnitude >= 0x7C00:  # infinity or NaN
        value = _float_of_bits(np.int32((magnitude << 13) | 0x7F800000))
    else:  # the exponent's bias from 15 to 127
        value = _float_of_bits(np.int32((magnitude << 13) + (112 << 23)))
    return -value if h & 0x8000 else value


@_jit
def _rows_dot(values, x, base, stride, rows, out):
    # out[r] = values . x[base + r*stride:][:n] for each of the rows
    n = values.shape[0]
    out[:rows] = 0.0
    for r in range(rows):
        row = x[base + r * stride:base + r * stride + n]
        s = np.float32(0.0)
        for j in range(n):
            s += values[j] * row[j]
        out[r] += s


@_jit
def decode_pairs(packed, first, code, scale, zero, values, at, count):
    # values[at:at + 2*count] = (code[nibble] - zero) * scale for count bytes from packed[first]
    pairs = packed[first:first + count]
    out = values[at:at + 2 * count]
    for k in range(count):
        b = pairs[k]
        out[2 * k] = (code[b >> 4] - zero) * scale
        out[2 * k + 1] = (code[b & 15] - zero) * scale


@_jit
def lut4(packed, pofs, code, scales, sofs, blocksize, x, xofs, n, stride, rows, out):
    values = np.empty(n, np.float32)  # the row decoded once, then met by every activation row
    for blk in range(n // blocksize):
        decode_pairs(packed, pofs + blk * blocksize // 2, code, scales[sofs + blk], np.float32(0.0), values,
                     blk * blocksize, blocksize // 2)
    _rows_dot(values, x, xofs, stride, rows, out)


@_jit
def lut4z(packed, pofs, code, scales, zeros, sofs, blocksize, x, xofs, n, stride, rows, out):
    # INT4's helper: code is 0..15, so a value is (nibble - zero) * scale, no lookup (vectorizes);
    # scales, zeros as stored (float16 bits as int16, uint8)
    values = np.empty(n, np.float32)
    for blk in range(n // blocksize):
        scale, zero = half_value(scales[sofs + blk]), np.float32(zeros[sofs + blk])
        pairs = packed[pofs + blk * blocksize // 2:pofs + (blk + 1) * blocksize // 2]
        block = values[blk * blocksize:(blk + 1) * blocksize]
        for k in range(blocksize // 2):
            b = pairs[k]
            block[2 * k] = (np.float32(b >> 4) - zero) * scale
            block[2 * k + 1] = (np.float32(b & 15) - zero) * scale
    _rows_dot(values, x, xofs, stride, rows, out)


@_jit
def dot8(q, qofs, x, xofs, n, stride, rows, out):
    weights = q[qofs:qofs + n]
    if rows == 1:  # decoding: one pass, nothing stored
        row = x[xofs:xofs + n]
        s = np.float32(0.0)
        for j in range(n):
            s += np.float32(weights[j]) * row[j]
        out[0] = s
        return
    values = np.empty(n, np.float32)
    for j in range(n):
        values[j] = np.float32(weights[j])
    _rows_dot(values, x, xofs, stride, rows, out)


@_jit
def dot8_rows(q, qofs, qstride, x, xofs, n, out):
    for w in range(WEIGHT_ROWS):
        dot8(q, qofs + w * qstride, x, xofs, n, n, 1, out[w:])


def e4m3_values() -> np.ndarray:
    """The float32 value of each float8_e4m3fn byte (0x7f, 0xff: NaN)."""
    values = np.empty(256, np.float32)
    for byte in range(256):
        exponent, mantissa = (byte >> 3) & 15, byte & 7
        value = mantissa * 2.0 ** -9 if exponent == 0 else (1 + mantissa / 8) * 2.0 ** (exponent - 7)
        values[byte] = np.nan if byte & 0x7F == 0x7F else (-value if byte & 0x80 else value)
    return values


E4M3 = e4m3_values()


@_jit
def dotfp8(q, qofs, x, xofs, n, stride, rows, out):
    values = np.empty(n, np.float32)
    weights = q[qofs:qofs + n]
    for j in range(n):
        values[j] = E4M3[weights[j]]
    _rows_dot(values, x, xofs, stride, rows, out)


@_jit
def dotfp8_rows(q, qofs, qstride, x, xofs, n, out):
    for w in range(WEIGHT_ROWS):
        dotfp8(q, qofs + w * qstride, x, xofs, n, n, 1, out[w:])


@_jit
def dot8q(q, qofs, xq, xs, corr, t0, rows, cols, xblock, out):
    blocks = cols // xblock
    for r in range(rows):
        base = (t0 + r) * cols
        s = np.float32(0.0)
        for blk in range(blocks):
            d = np.int32(0)
            for j in range(blk * xblock, (blk + 1) * xblock):
                d += np.int32(q[qofs + j]) * np.int32(xq[base + j])
            s += np.float32(d) * xs[(t0 + r) * blocks + blk]
        out[r] = s


@_jit
def dot8q_rows(q, qofs, xq, xs, corr, t0, cols, xblock, out):
    for w in range(WEIGHT_ROWS):
        dot8q(q, qofs + w * cols, xq, xs, corr, t0, 1, cols, xblock, out[w:])


@_jit
def dot4q(packed, pofs, scales, zeros, sofs, group, xq, gsum, t0, rows, cols, out):
    # xq: each 128 values as the 64 even ones, then the 64 odd ones
    groups = cols // group
    for r in range(rows):
        base = (t0 + r) * cols
        s = np.float32(0.0)
        for g in range(groups):
            d = np.int32(0)
            for c in range(g * group, (g + 1) * group, 128):
                for k in range(64):
                    byte = packed[pofs + c // 2 + k]
                    d += np.int32(byte >> 4) * np.int32(xq[base + c + k]) + np.int32(byte & 15) * np.int32(xq[base + c + 64 + k])
            zero = np.float32(zeros[sofs + g])
            s += half_value(scales[sofs + g]) * (np.float32(d) - zero * gsum[(t0 + r) * groups + g])
        out[r] = s


@_jit
def dot4q_rows(packed, pofs, scales, zeros, sofs, group, xq, gsum, t0, cols, out):
    for w in range(WEIGHT_ROWS):
        dot4q(packed, pofs + w * (cols // 2), scales, zeros, sofs + w * (cols // group), group, xq, gsum, t0, 1, cols,
              out[w:])


@_jit
def dot4q_tile(packed, pofs, scales, zeros, sofs, group, xq, gsum, t0, rows, cols, out):
    for v in range(TILE_WEIGHT_ROWS):
        dot4q(packed, pofs + v * (cols // 2), scales, zeros, sofs + v * (cols // group), group, xq, gsum, t0, rows,
              cols, out[v * rows:])


@_jit
def dot4l(packed, pofs, levels, scales, sofs, blocksize, xq, t0, rows, cols, out):
    # xq: each 64 values as the 32 even ones, then the 32 odd ones; a level is
    # 64 * levels[n] + levels[16 + n] (see the SIMD helper); block b's maximum: scales[sofs + b]
    # blocks of 32: a 64-value step's first 16 bytes are one block, its next 16 the next
    span = max(blocksize, 64)  # values summed in int32 before they meet a scale
    for r in range(rows):
        base = (t0 + r) * cols
        s = np.float32(0.0)
        for first in range(0, cols, span):
            d, d_next = np.int32(0), np.int32(0)
            for c in range(first, first + span, 64):
                for k in range(32):
                    byte = packed[pofs + c // 2 + k]
                    high, low = byte >> 4, byte & 15
                    product = (np.int32(64) * np.int32(levels[high]) + np.int32(levels[16 + high])) \
                        * np.int32(xq[base + c + k]) \
                        + (np.int32(64) * np.int32(levels[low]) + np.int32(levels[16 + low])) \
                        * np.int32(xq[base + c + 32 + k])
                    if blocksize == 32 and k >= 16:
                        d_next += product
                    else:
                        d += product
            if blocksize == 32:
                s += scales[sofs + first // 32] * np.float32(d) + scales[sofs + first // 32 + 1] * np.float32(d_next)
            else:
                s += scales[sofs + first // blocksize] * np.float32(d)
        out[r] = s


@_jit
def dot4l_rows(packed, pofs, levels, scales, sofs, blocksize, xq, t0, cols, out):
    for w in range(WEIGHT_ROWS):
        dot4l(packed, pofs + w * (cols // 2), levels, scales, sofs + w * (cols // blocksize), blocksize, xq, t0, 1,
              cols, out[w:])


@_jit
def dotbf16(w, wofs, x, xofs, n, stride, rows, out):
    bits = np.empty(n, np.uint32)
    weights = w[wofs:wofs + n]
    for j in range(n):
        bits[j] = np.uint32(weights[j]) << 16
    _rows_dot(bits.view(np.float32), x, xofs, stride, rows, out)


@_jit
def dotbf16_rows(w, wofs, wstride, x, xofs, n, out):
    for v in range(WEIGHT_ROWS):
        dotbf16(w, wofs + v * wstride, x, xofs, n, n, 1, out[v:])


@_jit
def dot8q_row(q, qofs, xq, xs, corr, cols, xblock, out):
    dot8q(q, qofs, xq, xs, corr, 0, 1, cols, xblock, out)


@_jit
def dot8q_tile(q, qofs, xq, xs, corr, t0, rows, cols, xblock, out):
    for v in range(TILE_WEIGHT_ROWS):
        dot8q(q, qofs + v * cols, xq, xs, corr, t0, rows, cols, xblock, out[v * rows:])


@_jit
def dot4l_row(packed, pofs, levels, scales, sofs, blocksize, xq, cols, out):
    dot4l(packed, pofs, levels, scales, sofs, blocksize, xq, 0, 1, cols, out)


@_jit
def dot4l_tile(packed, pofs, levels, scales, sofs, blocksize, xq, t0, rows, cols, out):
    for v in range(TILE_WEIGHT_ROWS):
        dot4l(packed, pofs + v * (cols // 2), levels, scales, sofs + v * (cols // blocksize), blocksize, xq, t0, rows,
              cols, out[v * rows:])


@_jit
def decode64_4bit(packed, pofs, code, scale, out, oofs):
    decode_pairs(packed, pofs, code, scale, np.float32(0.0), out, oofs, 32)


for _f in (_float_of_bits, half_value, _rows_dot, decode_pairs, lut4, lut4z, dot8, dot8_rows, dotfp8, dotfp8_rows,
           dot8q, dot8q_rows, dot8q_row, dot8q_tile, dot4q, dot4q_rows, dot4q_tile, dot4l, dot4l_rows, dot4l_row,
           dot4l_tile, dotbf16, dotbf16_rows, decode64_4bit):
    stable_id(_f, f"plain.{_f.__name__}")

# The loops take any number of rows, so a block is decoded once for up to this many of them.
MAX_ROWS = 16
# The plain level multiplies one weight row at a time (weight_rows 1): its helpers are compiled
# with fastmath, and a helper inlined at a second call site may sum a row in another order (llvmlite
# 0.43 did), so a row's bits would depend on how a product's rows were split. The *_rows helpers
# keep the set the kernels are built over complete.
# row_passes: a token's products take the same one-row passes as a batch's (the *_row helpers
# are dot8q's and dot4l's own); tile_rows 1: a batch's INT8 products too (dot8q_tile, two dot8q
# calls, completes the set).
HELPERS = SimpleNamespace(level="plain", lanes=1, max_rows=MAX_ROWS, weight_rows=1, lut4=lut4, lut4z=lut4z,
                          dot8=dot8, dot8_rows=dot8_rows, dotfp8=dotfp8, dotfp8_rows=dotfp8_rows,
                          dot8q=dot8q, dot8q_rows=dot8q_rows, dot8q_row=dot8q_row, dot8q_tile=dot8q_tile,
                          dot4q=dot4q, dot4q_rows=dot4q_rows, dot4q_tile=dot4q_tile,
                          dot4l=dot4l, dot4l_rows=dot4l_rows, dot4l_row=dot4l_row, dot4l_tile=dot4l_tile,
                          dotbf16=dotbf16, dotbf16_rows=dotbf16_rows, decode64_4bit=decode64_4bit,
                          half_value=half_value,
                          tile_rows=1, row_passes=False, variant="")
