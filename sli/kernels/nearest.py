"""numba kernels that round values to the nearest level of a 16-level code (NF4/FP4), for
GPTQ (:mod:`sli.quantization.gptq`): its per-column rounding and its search of each block's
maximum.

The nearest level is found by table: ``[-1, 1]`` in ``bins`` bins, ``below[bin]`` the count of
midpoints between sorted levels below the bin, one compare with the next midpoint finishing
the count (``torch.bucketize``'s rule: a value on a midpoint takes the lower level). This is
the rule of GPTQ's torch fallback, so both give the same levels.
"""
import numpy as np

from .jit import KERNEL


@KERNEL
def _level_index(v, below, next_mid, bins):
    # the sorted level nearest v (clamped to [-1, 1]): bucketize's count of midpoints below v.
    # The bin is clamped again as an integer, which fastmath cannot drop: an all-zero block's
    # 0 / 1e-38 (a denormal floor) came out NaN under fastmath, the float clamp let it through
    # (fastmath assumes no NaN), it converted to INT64_MIN, and the vectorized search gathered
    # below[INT64_MIN]: SIGBUS (numba 0.60 / llvmlite 0.43 on AMD Zen 4; 0.68 compiled it safely).
    v = min(max(v, np.float32(-1.0)), np.float32(1.0))
    b = min(max(np.int64((v + np.float32(1.0)) * np.float32(bins // 2)), 0), bins - 1)
    k = below[b]
    if v > next_mid[k]:
        k += 1
    return k


@KERNEL
def round_to_levels(values, below, next_mid, sorted_code, out, start, stop):
    # out[i] = the nearest level of values[i] (fp32, already divided by its scale)
    bins = below.shape[0]
    for i in range(start, stop):
        out[i] = sorted_code[_level_index(values[i], below, next_mid, bins)]


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


def build(h) -> dict:
    """The kernels by name (the same at every SIMD level)."""
    return {"round_to_levels": round_to_levels, "search_block_maxima": search_block_maxima}
