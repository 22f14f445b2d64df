"""int8 activations: float32 rows quantized for the integer dot products (what
:func:`sli.kernels.quantize_rows` runs), and where each value a row keeps in float sits in a
packed 4-bit weight row."""
import numpy as np
from numba import njit

from .jit import stable_id


# Where ``xq`` is int16 (NF4/FP4's levels on a SIMD level, sli.kernels.simd_int8.make_dot4l) a
# value is x * WIDE / max|x|: 128x finer steps than int8's 127, fine enough to keep no value in
# float. The kernels' int32 sums stay exact: a lane adds at most 8 products of a level (|L| <=
# 8160, sli.kernels.four_bit.split_levels) and an activation before its block's sum is
# converted, 8 * 8160 * 16383 < 2**31 / 2.
WIDE = 16383


@njit(cache=True, nogil=True)
def largest_magnitude(row, start):
    # max(start, max |row|) in eight running maxima, not one chain of compares (a maximum is exact
    # in any order; a NaN is passed over, as the insertion pass below passes it over)
    m0 = m1 = m2 = m3 = m4 = m5 = m6 = m7 = start
    whole = row.shape[0] // 8 * 8
    for j in range(0, whole, 8):
        a0, a1, a2, a3 = abs(row[j]), abs(row[j + 1]), abs(row[j + 2]), abs(row[j + 3])
        a4, a5, a6, a7 = abs(row[j + 4]), abs(row[j + 5]), abs(row[j + 6]), abs(row[j + 7])
        m0, m1 = (a0 if a0 > m0 else m0), (a1 if a1 > m1 else m1)
        m2, m3 = (a2 if a2 > m2 else m2), (a3 if a3 > m3 else m3)
        m4, m5 = (a4 if a4 > m4 else m4), (a5 if a5 > m5 else m5)
        m6, m7 = (a6 if a6 > m6 else m6), (a7 if a7 > m7 else m7)
    best = start
    for m in (m0, m1, m2, m3, m4, m5, m6, m7):
        best = m if m > best else best
    for j in range(whole, row.shape[0]):
        a = abs(row[j])
        best = a if a > best else best
    return best


stable_id(largest_magnitude, "activations.largest_magnitude")  # quantize_rows calls it (its globals pickle it)


@njit(cache=True, nogil=True)  # no fastmath: x * 127 / a rounds as INT8_DYNAMIC's torch code does
def quantize_rows(x, xblock, sumblock, xq, xs, corr, bsum, oidx, oval):
    # x fp32 [T, in] -> xq int8 [T*in] with a scale a block of xblock values (xs [T*(in/xblock)]),
    # or xq int16 at WIDE levels (keep no values in float then: oidx, oval [T, 0]),
    # the oidx.shape[1] largest |x| of each row kept in float (oidx, oval [T, K]; 0 in xq);
    # corr[t] = 128 * sum over blocks of xs * sum(xq) (what dot8q's AVX-512 form subtracts);
    # bsum [T*(in/sumblock)]: sum(xq) a block of sumblock values
    rows, cols = x.shape
    sums = cols // sumblock
    keep = oidx.shape[1]
    blocks = cols // xblock
    limit = np.float32(WIDE) if xq.itemsize == 2 else np.float32(127.0)
    together = xblock % sumblock == 0  # bsum's blocks inside the scale's: summed as they are rounded
    step = sumblock if together else xblock
    row = np.empty(cols, np.float32)
    top = np.empty(keep + 1, np.float32)  # the keep + 1 largest |x|: the last is the rest's maximum
    at = np.empty(keep + 1, np.int64)
    for t in range(rows):
        for j in range(cols):
            row[j] = x[t, j]
        for k in range(keep + 1):
            top[k] = -1.0
            at[k] = 0
        if keep == 0:  # the row's maximum alone
            top[0] = largest_magnitude(row, top[0])
        else:
            for j in range(cols):  # by insertion: one pass, rarely taken
                a = abs(row[j])
                if a > top[keep]:
                    k = keep
                    while k > 0 and top[k - 1] < a:
                        top[k] = top[k - 1]
                        at[k] = at[k - 1]
                        k -= 1
                    top[k] = a
                    at[k] = j
        for k in range(keep):
            oidx[t, k] = at[k]
            oval[t, k] = row[at[k]]
            row[at[k]] = 0.0
        c = np.float32(0.0)
        for blk in range(blocks):
            amax = top[keep]  # a row's one block: known from the pass above
            if blocks > 1:
                amax = np.float32(0.0)
                for j in range(blk * xblock, (blk + 1) * xblock):
                    amax = max(amax, abs(row[j]))
            amax = max(amax, np.float32(1e-8))
            total = 0
            for part in range(blk * xblock // step, (blk + 1) * xblock // step):
                part_total = 0
                for j in range(part * step, (part + 1) * step):
                    v = np.rint(row[j] * limit / amax)
                    xq[t * cols + j] = v
                    part_total += np.int32(v)
                if together:
                    bsum[t * sums + part] = np.float32(part_total)
                total += part_total
            s = amax / limit
            xs[t * blocks + blk] = s
            c += s * np.float32(total)
        corr[t] = np.float32(128.0) * c
        for blk in range(0 if together else sums):
            total = 0
            for j in range(blk * sumblock, (blk + 1) * sumblock):
                total += np.int32(xq[t * cols + j])
            bsum[t * sums + blk] = np.float32(total)


@njit(cache=True, nogil=True)
def kept_nibbles(oidx, blocksize):
    # where each kept value's nibble is in a packed 4-bit row: byte, shift, block (once a call)
    rows, keep = oidx.shape
    kept = np.empty((rows, keep, 3), np.int64)
    for t in range(rows):
        for m in range(keep):
            j = oidx[t, m]
            kept[t, m, 0] = j // 2
            kept[t, m, 1] = 4 * (1 - j % 2)
            kept[t, m, 2] = j // blocksize
    return kept


stable_id(kept_nibbles, "activations.kept_nibbles")  # the 4-bit kernels hold it in their closures


@njit(cache=True, nogil=True)  # no fastmath: each sum in the pairs' order
def kept_products(q, columns, owners, values, out, start, end):
    # what the values rows keep in float add to a product by an int8 weight q [rows * in] (flat):
    # out[o, t] = sum of values[p] * q[o, columns[p]] over the pairs p whose owners[p] is row t,
    # for weight rows o in [start, end). The pairs come sorted by column, so each weight row is
    # read once, in order (no gather of the weight's columns, which reads the whole weight again
    # per block of columns); a row's sum is over its own kept values in column order, whatever
    # the other rows keep. (Adding straight into the product [T, out] was slower: its writes
    # scatter over T cache lines a weight row.)
    width = q.shape[0] // out.shape[0]
    for o in range(start, end):
        base = o * width
        for t in range(out.shape[1]):
            out[o, t] = 0.0
        for p in range(columns.shape[0]):
            out[o, owners[p]] += values[p] * np.float32(q[base + columns[p]])


def build(h) -> dict:
    """The kernels by name (the same at every SIMD level)."""
    return {"quantize_rows": quantize_rows, "kept_products": kept_products}
