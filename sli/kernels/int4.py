"""numba kernels for INT4 weights: group-wise affine 4-bit values (``w = (q - zero) * scale``,
two a byte, the first in the high nibble; a scale and a zero point a group of ``group``
values). They multiply by float32 activations through the ``lut4z`` helper (a group size
the SIMD helpers do not step in, not a multiple of 64: the plain one), by int8 activations
through ``dot4q``: a token's four weight rows a pass (``dot4q_rows``; one where that is faster,
AMD Zen 4: :func:`sli.kernels.simd.token_pass_rows`, for rows longer than
:data:`sli.kernels.plain.SHORT_ROW`), several activation rows two weight rows a pass
(``dot4q_tile``) up to :data:`TILE_MAX_ROWS` of them.

The int8-activation product is built once with the group size an argument (``matmul_int4q``)
and once for each size in :data:`CONSTANT_GROUPS` with it a constant (``matmul_int4q_g128``,
no group argument): the SIMD helpers step through a group in a loop whose trip count is the
group size over 128 or 64, and LLVM folds that loop only where the size is known when it
compiles (a 11008x4096 weight times a token from RAM on one thread: 1.4-1.6 ms against
1.8-2.4; a 7B-shaped INT4 token ~17% less time: docs/benchmarks.md, 2026-12-07 17:20).
"""
import numpy as np
from numba import njit

from .jit import KERNEL, stable_id
from .plain import SHORT_ROW

# INT4 group sizes with int8-activation kernels of their own (the group a compile-time constant):
# INT4's default (128) and the MLP's groups in int4-gptq's 4.25-bit mix (192).
CONSTANT_GROUPS = (128, 192)

# Activation rows up to which INT4's several-row products take two weight rows a pass. Measured
# on the AMX Xeon (docs/benchmarks.md, 2026-12-07), a 11008x4096 weight hot: 2 rows 0.85x the
# time of one weight row a pass, 3 rows 0.77x, but 4 to 32 rows 0.91-1.31x, median 1.07x (each
# pair's sums are held at once: two weight rows by 8 activation rows fill AVX-512's registers).
TILE_MAX_ROWS = 3


def constant_group_kernel(group: int) -> str:
    """The name of the int8-activation kernel built for groups of ``group`` (in :data:`CONSTANT_GROUPS`)."""
    return f"matmul_int4q_g{group}"


def token_kernel(group: int) -> "tuple[str, tuple]":
    """The int8-activation kernel for groups of ``group`` and what it takes for the group between
    ``oval`` and ``y``: nothing where the size is built in, else the size."""
    if group in CONSTANT_GROUPS:
        return constant_group_kernel(group), ()
    return "matmul_int4q", (group,)


def build(h) -> dict:
    """The kernels by name, over helpers ``h`` (one SIMD level's or the plain ones)."""
    from . import plain  # in the closures, so the cache sees them (sli.kernels.jit)
    from .activations import kept_nibbles

    dot4q, dot4q_rows, dot4q_tile, half_value = h.dot4q, h.dot4q_rows, h.dot4q_tile, h.half_value
    most = h.max_rows  # activation rows a helper multiplies in one pass
    weight_rows, row_passes = h.weight_rows, h.row_passes  # a token's weight rows a pass (see four_bit)
    tile_rows = h.tile_rows  # weight rows a pass of several activation rows

    def float_kernel(lut4z, most):
        @KERNEL
        def matmul_int4(packed, scales, zeros, x, y, group, start, stop):
            # packed: uint8 [out*padded_in/2] (first value high nibble); scales: float16 bits as int16,
            # zeros: uint8, [out*groups] both;
            # x: fp32 [T, padded_in] in the helper's order. w = (q - zero) * scale: a 16-entry table per group.
            rows, cols = x.shape
            groups = cols // group
            code = np.arange(16).astype(np.float32)
            xflat = x.reshape(x.size)
            acc = np.empty(most, np.float32)
            for o in range(start, stop):
                for t in range(0, rows, most):
                    k = min(most, rows - t)
                    lut4z(packed, o * (cols // 2), code, scales, zeros, o * groups, group, xflat, t * cols, cols, cols,
                          k, acc)
                    for i in range(k):
                        y[t + i, o] = acc[i]

        return matmul_int4

    # fastmath as KERNEL's, inlined into each kernel below (numba's IR): compiled there, with its group
    @njit(fastmath=True, cache=True, nogil=True, inline="always")
    def token_product(packed, scales, zeros, xq, xs, gsum, oidx, oval, group, y, start, stop):
        # matmul_int4 with int8 activations (quantize_rows, one scale a row, in q4_order) and
        # their largest values in float (oidx: natural columns); scales, zeros as stored (float16
        # bits as int16, uint8). One token: weight_rows weight rows a pass (where a token's products
        # take one, rows up to SHORT_ROW long still four); several: tile_rows
        # weight rows by each pass of activation rows (the same sums as one at a time), as matmul_4bitq
        rows = y.shape[0]
        cols = xq.shape[0] // rows
        half = cols // 2
        groups = cols // group
        keep = oidx.shape[1]
        kept = kept_nibbles(oidx, group)
        acc = np.empty(max(most * tile_rows, weight_rows), np.float32)
        short = cols <= SHORT_ROW  # a token's short rows weight_rows a pass wherever
        o = start
        while o < stop:
            if rows == 1:  # one token: weight_rows weight rows a pass
                at_once = weight_rows if (not row_passes or short) and o + weight_rows <= stop else 1
            else:  # several rows: tile_rows weight rows by each pass of activation rows
                at_once = tile_rows if o + tile_rows <= stop and rows <= TILE_MAX_ROWS else 1
            if rows == 1 and at_once > 1:
                dot4q_rows(packed, o * half, scales, zeros, o * groups, group, xq, gsum, 0, cols, acc)
            for t in range(0, rows, most):
                k = min(most, rows - t)
                if rows > 1 and at_once > 1:
                    dot4q_tile(packed, o * half, scales, zeros, o * groups, group, xq, gsum, t, k, cols, acc)
                elif at_once == 1:
                    dot4q(packed, o * half, scales, zeros, o * groups, group, xq, gsum, t, k, cols, acc)
                for w in range(at_once):
                    for i in range(k):
                        s = acc[w * k + i] * xs[t + i]
                        for m in range(keep):
                            nibble = (packed[(o + w) * half + kept[t + i, m, 0]] >> kept[t + i, m, 1]) & 15
                            g = (o + w) * groups + kept[t + i, m, 2]
                            s += ((np.float32(nibble) - np.float32(zeros[g])) * half_value(scales[g])) * oval[t + i, m]
                        y[t + i, o + w] = s
            o += at_once

    stable_id(token_product, f"int4.token_product:{h.level}{h.variant}")  # the kernels below hold it

    @KERNEL
    def matmul_int4q(packed, scales, zeros, xq, xs, gsum, oidx, oval, group, y, start, stop):
        token_product(packed, scales, zeros, xq, xs, gsum, oidx, oval, group, y, start, stop)

    def constant_group(group):
        @KERNEL
        def matmul_int4q_group(packed, scales, zeros, xq, xs, gsum, oidx, oval, y, start, stop):
            token_product(packed, scales, zeros, xq, xs, gsum, oidx, oval, group, y, start, stop)

        return matmul_int4q_group

    @KERNEL
    def dequantize_int4(packed, scales, zeros, out, group, start, stop):
        # out: fp32 [out_rows, cols] (cols <= padded_in: a padded tail is dropped); rows [start, stop)
        cols = out.shape[1]
        half = packed.shape[0] // out.shape[0]
        groups = 2 * half // group
        for o in range(start, stop):
            row = out[o]
            for g in range((cols + group - 1) // group):
                s = half_value(scales[o * groups + g])
                z = np.float32(zeros[o * groups + g])
                first = o * half + g * (group // 2)
                j = g * group
                for b in range(min(group, cols - j) // 2):  # bytes whose two values are both kept
                    byte = packed[first + b]
                    row[j + 2 * b] = (np.float32(byte >> 4) - z) * s  # as the codec's torch dequantize
                    row[j + 2 * b + 1] = (np.float32(byte & 15) - z) * s
                if min(group, cols - j) % 2:  # an odd last column
                    row[cols - 1] = (np.float32(packed[first + (cols - 1 - j) // 2] >> 4) - z) * s

    return {"matmul_int4": float_kernel(h.lut4z, most), "matmul_int4q": matmul_int4q,
            **{constant_group_kernel(group): constant_group(group) for group in CONSTANT_GROUPS},
            "dequantize_int4": dequantize_int4,
            # a group size the SIMD helpers do not step in: the plain helper, x in the weight's order
            "matmul_int4_any": float_kernel(plain.lut4z, plain.MAX_ROWS)}
