"""numba kernels of GPTQ (:mod:`sli.quantization.gptq`): rounding to the nearest level of a
16-level code (NF4/FP4), the search of each block's maximum (NF4/FP4) or each group's clipping
(INT4), and the solve of a block of columns.

The nearest level is found by table: ``[-1, 1]`` in ``bins`` bins, ``below[bin]`` the count of
midpoints between sorted levels below the bin, one compare with the next midpoint finishing
the count (``torch.bucketize``'s rule: a value on a midpoint takes the lower level). This is
the rule of GPTQ's torch fallback, so both give the same levels.
"""
import math

import numpy as np

from .jit import KERNEL, STRICT_KERNEL

# Rows a column block is solved for at once (gptq_block_*): 128 columns of them, values and
# errors, stay in the core's L2 cache (256 KB) while each column's error updates the others.
TILE_ROWS = 256


@KERNEL
def _level_index(v, below, next_mid, bins):
    # the sorted level nearest v (clamped to [-1, 1]): bucketize's count of midpoints below v.
    # The bin is clamped again as an integer, which fastmath cannot drop: an all-zero block's
    # 0 / 1e-38 (a denormal floor) came out NaN under fastmath, the float clamp let it through
    # (fastmath assumes no NaN), it converted to INT64_MIN, and the vectorized search gathered
    # below[INT64_MIN]: SIGBUS (numba 0.60 / llvmlite 0.43 on AMD Zen 4; 0.68 compiled it safely).
    # All in int32 (below is int32) and the last compare without a branch: the loops over a
    # block vectorize, 16 lanes a gather on AVX-512 (the block maxima search 1.9x faster).
    v = min(max(v, np.float32(-1.0)), np.float32(1.0))
    b = min(max(np.int32((v + np.float32(1.0)) * np.float32(bins // 2)), np.int32(0)), np.int32(bins - 1))
    k = below[b]
    return k + np.int32(v > next_mid[k])


@KERNEL
def round_to_levels(values, below, next_mid, sorted_code, out, start, stop):
    # out[i] = the nearest level of values[i] (fp32, already divided by its scale)
    bins = below.shape[0]
    for i in range(start, stop):
        out[i] = sorted_code[_level_index(values[i], below, next_mid, bins)]


@KERNEL
def nearest_code_indices(values, below, next_mid, order, out, start, stop):
    # out[i] = the code (order: sorted level -> code) of the level nearest values[i] (fp32, already
    # divided by its scale); bitsandbytes' bucketize rule, as round_to_levels
    bins = below.shape[0]
    for i in range(start, stop):
        out[i] = order[_level_index(values[i], below, next_mid, bins)]


@KERNEL
def search_block_maxima(w, importance, grid, below, next_mid, sorted_code, best, start, stop):
    # blocks start..stop of w (fp32 [rows * cols] flat, cols = importance.shape[0], blocks of
    # bs = w.size // best.size values): best[block] = the absmax * grid[p] whose rounding error
    # sum over the block of importance[col] * (level * a - w)^2 is least (the first on ties)
    bs = w.shape[0] // best.shape[0]
    cols = importance.shape[0]
    bins = below.shape[0]
    for blk in range(start, stop):
        first = blk * bs
        col0 = first % cols
        absmax = np.float32(0.0)
        for j in range(bs):
            absmax = max(absmax, abs(w[first + j]))
        best_err = np.float32(np.inf)
        chosen = absmax * grid[0]
        for p in range(grid.shape[0]):
            a = max(absmax * grid[p], np.float32(1e-38))
            err = np.float32(0.0)
            for j in range(bs):
                x = w[first + j]
                d = sorted_code[_level_index(x / a, below, next_mid, bins)] * a - x
                err += d * d * importance[col0 + j]
            if err < best_err:
                best_err = err
                chosen = absmax * grid[p]
        best[blk] = chosen


@KERNEL
def _half(v):
    # v >= 0 rounded to the nearest float16 (ties to even; subnormals on their 2**-24 grid), as a float
    if v >= 65520.0:
        return np.float32(np.inf)
    e = math.frexp(v)[1]
    ulp = math.ldexp(1.0, max(e - 11, -24))
    return np.float32(np.rint(v / ulp) * ulp)


@KERNEL
def search_int4_clipping(w, importance, grid, best, start, stop):
    # groups start..stop of w (fp32 [rows * cols] flat, cols = importance.shape[0], groups of
    # g = w.size // best.size values): best[group] = the index p of grid whose clipping of the
    # group's [min, max] to [min * grid[p], max * grid[p]] rounds with the least error sum of
    # importance[col] * (dequantized - w)^2 (the first on ties), the grid spanning the clipped
    # range with 0 included, an fp16 scale and a zero point (sli.quantization.codecs.int4.group_params)
    g = w.shape[0] // best.shape[0]
    cols = importance.shape[0]
    for grp in range(start, stop):
        first = grp * g
        col0 = first % cols
        wmin = np.float32(np.inf)
        wmax = np.float32(-np.inf)
        for j in range(g):
            wmin = min(wmin, w[first + j])
            wmax = max(wmax, w[first + j])
        best_err = np.float32(np.inf)
        chosen = 0
        for p in range(grid.shape[0]):
            lo = min(wmin * grid[p], np.float32(0.0))
            hi = max(wmax * grid[p], np.float32(0.0))
            s = _half(max((hi - lo) / np.float32(15.0), np.float32(1e-8)))
            if s == 0:
                s = np.float32(1.0)
            z = min(max(np.rint(-lo / s), np.float32(0.0)), np.float32(15.0))
            err = np.float32(0.0)
            for j in range(g):
                x = w[first + j]
                d = (min(max(np.rint(x / s) + z, np.float32(0.0)), np.float32(15.0)) - z) * s - x
                err += d * d * importance[col0 + j]
            if err < best_err:
                best_err = err
                chosen = p
        best[grp] = chosen


@KERNEL
def _spread_error(w, u, e, j, r0, r1):
    # column j's error e (its rows r0..r1) moved onto the block's later columns, as u's row j
    # weighs it (1-d slices: numba vectorizes their loops, not 2-d indexing's)
    for k in range(j + 1, w.shape[0]):
        c = u[j, k]
        wk = w[k, r0:r1]
        for r in range(wk.shape[0]):
            wk[r] -= c * e[r]


@KERNEL
def gptq_block_int4(w, u, err, groups, scale, zero, start, stop):
    # rows start..stop of a block of columns w ([columns, rows], solve order, fp32), in place:
    # each column rounded on its rows' group grid (scale, zero: [groups, rows]; groups: a
    # column's group); err[j] holds column j's original values and becomes their rounding
    # error, spread onto the block's later columns through u (GPTQ's error weights, LDLQ's form)
    for r0 in range(start, stop, TILE_ROWS):
        r1 = min(r0 + TILE_ROWS, stop)
        for j in range(w.shape[0]):
            wj, e = w[j, r0:r1], err[j, r0:r1]
            s, z = scale[groups[j], r0:r1], zero[groups[j], r0:r1]
            for r in range(wj.shape[0]):
                q = (min(max(np.rint(wj[r] / s[r]) + z[r], np.float32(0.0)), np.float32(15.0)) - z[r]) * s[r]
                e[r] -= q
                wj[r] = q
            _spread_error(w, u, e, j, r0, r1)


@KERNEL
def gptq_block_levels(w, u, err, groups, scale, below, next_mid, sorted_code, start, stop):
    # gptq_block_int4 for a 16-level code: a column's value of row r is the level nearest
    # w / scale[g, r] (divided by at least 1e-38) times scale[g, r]
    bins = below.shape[0]
    for r0 in range(start, stop, TILE_ROWS):
        r1 = min(r0 + TILE_ROWS, stop)
        for j in range(w.shape[0]):
            wj, e, s = w[j, r0:r1], err[j, r0:r1], scale[groups[j], r0:r1]
            for r in range(wj.shape[0]):
                q = sorted_code[_level_index(wj[r] / max(s[r], np.float32(1e-38)), below, next_mid, bins)] * s[r]
                e[r] -= q
                wj[r] = q
            _spread_error(w, u, e, j, r0, r1)


@KERNEL
def add_scaled_gram(sums, gram, scale_rows, scale_cols, start, stop):
    # rows start..stop: sums[i, j] += gram[i, j] * scale_rows[i] * scale_cols[j] (gram int32,
    # an int8 Gram block; sums a float32 block of the Hessian, rows may be strided)
    for i in range(start, stop):
        si = scale_rows[i]
        row, g = sums[i], gram[i]
        for j in range(row.shape[0]):
            row[j] += np.float32(g[j]) * si * scale_cols[j]


@KERNEL
def column_absmax_bf16(bits, out, start, stop):
    # columns start..stop of bfloat16 bits [tokens, n]: out[c] = the bits of the largest |x| of
    # column c (the sign cleared, the bits of non-negative floats order as integers)
    o = out[start:stop]
    for c in range(o.shape[0]):
        o[c] = 0
    for t in range(bits.shape[0]):
        row = bits[t, start:stop]
        for c in range(row.shape[0]):
            o[c] = max(o[c], row[c] & 0x7FFF)


@STRICT_KERNEL  # exact division: the codes of torch.round(x / scale)
def quantize_columns_bf16(bits, scale, q, start, stop):
    # rows start..stop of bfloat16 bits [tokens, n]: q[t, c] = round(x[t, c] / scale[c]), half to even
    n = bits.shape[1]
    wide = np.empty(n, np.uint32)
    x = wide.view(np.float32)
    for t in range(start, stop):
        row, out = bits[t], q[t]
        for c in range(n):
            wide[c] = np.uint32(row[c]) << 16
        for c in range(n):
            out[c] = np.int8(np.rint(x[c] / scale[c]))


def build(h) -> dict:
    """The kernels by name (the same at every SIMD level)."""
    return {"round_to_levels": round_to_levels, "nearest_code_indices": nearest_code_indices,
            "search_block_maxima": search_block_maxima,
            "search_int4_clipping": search_int4_clipping, "gptq_block_int4": gptq_block_int4,
            "gptq_block_levels": gptq_block_levels, "add_scaled_gram": add_scaled_gram,
            "column_absmax_bf16": column_absmax_bf16, "quantize_columns_bf16": quantize_columns_bf16}
