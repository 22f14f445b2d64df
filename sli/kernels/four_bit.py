"""numba kernels for NF4/FP4 weights: bitsandbytes' 4-bit layout (two values a byte, the first
in the high nibble; 16 float levels ``code``; a float32 maximum a block of ``blocksize``
values: double-quantized 8-bit ones are decoded by ``dequantize_blockwise8`` when a weight is
prepared). They multiply by float32 activations through the ``lut4`` helper, by int8
activations with the levels as integers through ``dot4l``, and dequantize through
``decode64_4bit``.
"""
import numpy as np

from .jit import KERNEL
from .plain import SHORT_ROW

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
    from .plain import decode_pairs

    lut4, dot4l, dot4l_rows, decode64_4bit = h.lut4, h.dot4l, h.dot4l_rows, h.decode64_4bit
    dot4l_row, row_passes = h.dot4l_row, h.row_passes  # a token's product a row a pass (sli.kernels.simd)
    dot4l_tile, tile_rows = h.dot4l_tile, h.tile_rows  # several rows' products: tile_rows weight rows a pass
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
    def dequantize_4bit_bf16(packed, absmax, code, out, blocksize, start, stop):
        # dequantize_4bit's values as bfloat16 bits (out: uint16 [n]), rounded to nearest even as
        # torch's float32 -> bfloat16 cast rounds: a prompt's bfloat16 weight chunk in one pass, not
        # a float32 pass and a cast (the values are finite)
        half_block = blocksize // 2
        n_pairs = packed.shape[0]
        values = np.empty(64, np.float32)
        bits = values.view(np.uint32)
        for blk in range(start, stop):
            scale = absmax[blk]
            first = blk * half_block
            last = min(first + half_block, n_pairs)
            for k in range(first, last, 32):
                count = min(32, last - k)
                if count == 32:
                    decode64_4bit(packed, k, code, scale, values, 0)
                else:
                    decode_pairs(packed, k, code, scale, np.float32(0.0), values, 0, count)
                dst = out[2 * k:2 * k + 2 * count]
                for i in range(dst.shape[0]):
                    b = bits[i]
                    dst[i] = np.uint16((b + np.uint32(0x7FFF) + ((b >> np.uint32(16)) & np.uint32(1))) >> np.uint32(16))

    @KERNEL
    def dequantize_blockwise8(q, absmax, code, out, blocksize, offset, start, stop):
        # one byte per value: out[i] = code[q[i]] * absmax[i // blocksize] + offset. A block of
        # at least as many values as the code has levels (the 256-value blocks of double-quantized
        # maxima) scales the levels once, then only looks them up: 2x faster than the product
        # per value (0.42 against 0.88 ms for a 7B MLP weight's 704 k maxima)
        levels = code.shape[0]
        table = np.empty(levels, np.float32)
        for blk in range(start, stop):
            scale = absmax[blk]
            first = blk * blocksize
            last = min(first + blocksize, q.shape[0])
            if last - first >= levels:
                for j in range(levels):
                    table[j] = code[j] * scale + offset
                for i in range(first, last):
                    out[i] = table[q[i]]
            else:
                for i in range(first, last):
                    out[i] = code[q[i]] * scale + offset

    @KERNEL
    def matmul_4bitq(packed, absmax, levels, code, xq, xs, oidx, oval, blocksize, y, start, stop):
        # rows start..stop of a 4-bit weight times integer activations (quantize_rows: one scale a
        # row, int16 on a SIMD level, laid out by levels_order), the 16 levels as integers
        # (split_levels), float32 block maxima (double-quantized ones decoded when the weight is
        # prepared). One call a span, not a row: a call between kernels passing arrays costs ~1000
        # cycles (reference counts)
        rows = y.shape[0]
        cols = xq.shape[0] // rows
        half = cols // 2
        blocks_per_row = cols // blocksize
        keep = oval.shape[1]
        kept = kept_nibbles(oidx, blocksize)
        acc = np.empty(max(most * tile_rows, weight_rows), np.float32)
        short = cols <= SHORT_ROW  # a token's short rows weight_rows a pass wherever (plain.SHORT_ROW)
        one_row = rows == 1 and row_passes and not short  # one token, a row after another
        o = start
        while o < stop:
            if rows == 1:  # one token: weight_rows weight rows a pass (the same sums as one at a time)
                at_once = weight_rows if (not row_passes or short) and o + weight_rows <= stop else 1
            else:  # several rows: tile_rows weight rows by each pass of activation rows
                at_once = tile_rows if o + tile_rows <= stop else 1
            sofs = o * blocks_per_row
            if rows == 1 and at_once > 1:
                dot4l_rows(packed, o * half, levels, absmax, sofs, blocksize, xq, 0, cols, acc)
            elif one_row:
                dot4l_row(packed, o * half, levels, absmax, sofs, blocksize, xq, cols, acc)
            for t in range(0, rows, most):
                k = min(most, rows - t)
                if rows > 1 and at_once > 1:
                    dot4l_tile(packed, o * half, levels, absmax, sofs, blocksize, xq, t, k, cols, acc)
                elif at_once == 1 and not one_row:
                    dot4l(packed, o * half, levels, absmax, sofs, blocksize, xq, t, k, cols, acc)
                for w in range(at_once):
                    for i in range(k):
                        s = acc[w * k + i] * (xs[t + i] * np.float32(1.0 / LEVEL_SCALE))
                        for m in range(keep):  # the kept values meet the weight itself: code * absmax
                            byte = np.int64(packed[(o + w) * half + kept[t + i, m, 0]])
                            nibble = (byte >> kept[t + i, m, 1]) & 15
                            g = sofs + w * blocks_per_row + kept[t + i, m, 2]
                            s += (code[nibble] * absmax[g]) * oval[t + i, m]
                        y[t + i, o + w] = s
            o += at_once

    return {"matmul_4bit": matmul_4bit, "dequantize_4bit": dequantize_4bit, "dequantize_4bit_bf16": dequantize_4bit_bf16,
            "dequantize_blockwise8": dequantize_blockwise8, "matmul_4bitq": matmul_4bitq}
