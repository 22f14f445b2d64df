"""numba kernels for NF4/FP4 weights: bitsandbytes' 4-bit layout (two values a byte, the first
in the high nibble; 16 float levels ``code``; a float32 maximum a block of ``blocksize``
values, or 8-bit ones, double-quantized). They multiply by float32 activations through the
``lut4``/``lut4n`` helpers, by int8 activations with the levels as integers through ``dot4l``, and
dequantize through ``decode64_4bit``.
"""
import numpy as np

from .jit import KERNEL, stable_id

# NF4/FP4's levels meet integer activations as the integers round(code * LEVEL_SCALE): 127 * 64,
# passed split in two bytes (split_levels), which the dot4l helpers join back into 16-bit words
LEVEL_SCALE = 127 * 64


def split_levels(code: np.ndarray) -> np.ndarray:
    """The 16 float levels ``code`` as int8 ``[32]``: ``round(code * LEVEL_SCALE) = 64 *
    high + low`` with ``high = levels[:16]`` within +-127 and ``low = levels[16:]`` within +-32."""
    whole = np.rint(code.astype(np.float64) * LEVEL_SCALE)
    high = np.clip(np.rint(whole / 64), -127, 127)
    return np.concatenate([high, whole - 64 * high]).astype(np.int8)


def build(h) -> dict:
    """The kernels by name, over helpers ``h`` (one SIMD level's or the plain ones)."""
    from .activations import kept_nibbles  # in the closures, so the cache sees them (sli.kernels.jit)
    from .plain import block_scale, decode_pairs

    lut4, lut4n, dot4l, dot4l_rows, decode64_4bit = h.lut4, h.lut4n, h.dot4l, h.dot4l_rows, h.decode64_4bit
    most = h.max_rows  # activation rows a helper multiplies in one pass
    weight_rows = h.weight_rows  # weight rows dot4l_rows multiplies by one activation row

    @KERNEL
    def matmul_4bit(packed, absmax, code, x, y, blocksize, start, stop):
        # packed: uint8 [out*in/2] (first value in the high nibble); absmax: fp32 [out*in/blocksize];
        # x: fp32 [T, in] in lut4_order
        rows, cols = x.shape
        blocks_per_row = cols // blocksize
        xflat = x.reshape(x.size)
        acc = np.empty(most, np.float32)
        for o in range(start, stop):
            for t in range(0, rows, most):
                k = min(most, rows - t)
                lut4(packed, o * (cols // 2), code, absmax, o * blocks_per_row, blocksize, xflat, t * cols, cols, cols,
                     k, acc)
                for i in range(k):
                    y[t + i, o] = acc[i]

    @KERNEL
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
            for t in range(0, rows, most):
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

    @KERNEL
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
            decode_pairs(packed, whole, code, scale, np.float32(0.0), out, 2 * whole, last - whole)

    @KERNEL
    def dequantize_blockwise8(q, absmax, code, out, blocksize, offset, start, stop):
        # one byte per value: out[i] = code[q[i]] * absmax[i // blocksize] + offset
        for blk in range(start, stop):
            scale = absmax[blk]
            for i in range(blk * blocksize, min((blk + 1) * blocksize, q.shape[0])):
                out[i] = code[q[i]] * scale + offset

    @KERNEL
    def span_4bitq(packed, absmax, qabsmax, nested, nested_code, offset, nested_blocksize, levels, code, xq, xs, oidx,
                   oval, blocksize, y, start, stop):
        # rows start..stop of a 4-bit weight times integer activations (quantize_rows: one scale a
        # row, int16 on a SIMD level, laid out by levels_order), the 16 levels as integers (split_levels).
        # Block maxima: absmax (float32), or, where it is empty, double-quantized:
        # nested_code[qabsmax[b]] * nested[b // nested_blocksize] + offset (qabsmax uint8). One call
        # a span, not a row: a call between kernels passing arrays costs ~1000 cycles (reference counts)
        rows = y.shape[0]
        cols = xq.shape[0] // rows
        half = cols // 2
        blocks_per_row = cols // blocksize
        keep = oval.shape[1]
        kept = kept_nibbles(oidx, blocksize)
        # double-quantized maxima in groups of 2**shift blocks: the helpers look each up in a
        # table of 256 a group (its 8-bit code's value, scaled), made once for the groups a
        # pass meets; other group sizes are decoded a pass at a time (shift -1: float maxima)
        shift = -1
        if not absmax.shape[0] and nested_blocksize & (nested_blocksize - 1) == 0:
            shift = 0
            while (1 << shift) < nested_blocksize:
                shift += 1
        groups = weight_rows * blocks_per_row // nested_blocksize + 2 if shift >= 0 else 0
        decoded = np.empty(max(weight_rows * blocks_per_row, 256 * groups), np.float32)
        made = -1  # the first group decoded has its table at the start of ``decoded``
        made_count = 0
        acc = np.empty(max(most, weight_rows), np.float32)
        o = start
        while o < stop:
            # one token: weight_rows weight rows a pass (the same sums as one at a time)
            at_once = weight_rows if rows == 1 and o + weight_rows <= stop else 1
            b = o * blocks_per_row
            count = at_once * blocks_per_row
            if absmax.shape[0]:
                scales, sofs = absmax, b
            elif shift >= 0:
                first, last = b >> shift, (b + count - 1) >> shift
                if first != made or last - first + 1 > made_count:
                    for g in range(first, last + 1):
                        scale = nested[g]
                        for k in range(nested_code.shape[0]):
                            decoded[256 * (g - first) + k] = nested_code[k] * scale + offset
                    made, made_count = first, last - first + 1
                scales, sofs = decoded, b
            else:  # a group of block maxima at a time (mostly one for the rows)
                blk, group = 0, b // nested_blocksize
                while blk < count:
                    last = min(count, (group + 1) * nested_blocksize - b)
                    scale = nested[group]
                    for j in range(blk, last):
                        decoded[j] = nested_code[qabsmax[b + j]] * scale + offset
                    blk, group = last, group + 1
                scales, sofs = decoded, 0
            if at_once > 1:
                dot4l_rows(packed, o * half, levels, scales, qabsmax, shift, sofs, blocksize, xq, 0, cols, acc)
            for w in range(at_once):
                for t in range(0, rows, most):
                    k = min(most, rows - t)
                    if at_once == 1:
                        dot4l(packed, o * half, levels, scales, qabsmax, shift, sofs, blocksize, xq, t, k, cols, acc)
                    for i in range(k):
                        s = acc[w + i] * (xs[t + i] * np.float32(1.0 / LEVEL_SCALE))
                        for m in range(keep):  # the kept values meet the weight itself: code * absmax
                            byte = np.int64(packed[(o + w) * half + kept[t + i, m, 0]])
                            nibble = (byte >> kept[t + i, m, 1]) & 15
                            g = sofs + w * blocks_per_row + kept[t + i, m, 2]
                            s += (code[nibble] * block_scale(scales, qabsmax, shift, sofs, g)) * oval[t + i, m]
                        y[t + i, o + w] = s
            o += at_once

    stable_id(span_4bitq, f"four_bit.span_4bitq:{h.level}")  # the two kernels below hold it
    no_floats = np.empty(0, np.float32)
    no_bytes = np.empty(0, np.uint8)

    @KERNEL
    def matmul_4bitq(packed, absmax, levels, code, xq, xs, oidx, oval, blocksize, y, start, stop):
        # matmul_4bit with the levels as integers and int8 activations
        span_4bitq(packed, absmax, no_bytes, no_floats, no_floats, np.float32(0.0), 1, levels, code, xq, xs, oidx,
                   oval, blocksize, y, start, stop)

    @KERNEL
    def matmul_4bitq_nested(packed, qabsmax, nested, nested_code, offset, nested_blocksize, levels, code, xq, xs,
                            oidx, oval, blocksize, y, start, stop):
        span_4bitq(packed, no_floats, qabsmax, nested, nested_code, np.float32(offset), nested_blocksize, levels, code,
                   xq, xs, oidx, oval, blocksize, y, start, stop)

    return {"matmul_4bit": matmul_4bit, "matmul_4bit_nested": matmul_4bit_nested, "dequantize_4bit": dequantize_4bit,
            "dequantize_blockwise8": dequantize_blockwise8, "matmul_4bitq": matmul_4bitq,
            "matmul_4bitq_nested": matmul_4bitq_nested}
