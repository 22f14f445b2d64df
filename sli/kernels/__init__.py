"""CPU kernels that multiply by quantized weights without dequantizing them first.

Decoding one token multiplies each weight by one activation row. Dequantizing a 4-bit
weight to float32 first costs several times the product itself, so a streamed decode would
be dequantization-bound (docs/benchmarks.md). The kernels read the packed bytes once
and accumulate in registers instead: a row of the output is a dot product of the row's
decoded values with the activations, a few activation rows per pass over a weight row.

This module holds the entry points on torch tensors and the knobs that choose a path. The
package below it, each importing only those after it:

- :mod:`~sli.kernels.dispatch`: the SIMD level chosen at run time (:func:`simd_path`;
  ``SLI_SIMD=avx512|avx2|plain``, ``SLI_NO_SIMD=1``), the kernels built once, a thread pool;
- :mod:`~sli.kernels.four_bit`, :mod:`~sli.kernels.int4`, :mod:`~sli.kernels.unpacked`,
  :mod:`~sli.kernels.activations`: the numba kernels per format, built over one level's helpers;
  :mod:`~sli.kernels.attention`: a decode step's attention over int8 or bfloat16 keys and values;
  :mod:`~sli.kernels.gptq`: GPTQ's rounding, scale searches and column-block solve;
- :mod:`~sli.kernels.simd` (with :mod:`~sli.kernels.simd_float`, :mod:`~sli.kernels.simd_int8`,
  :mod:`~sli.kernels.simd_ir`): the AVX-512 / AVX2 helpers, numba intrinsics, imported behind a
  guard; :mod:`~sli.kernels.plain`: the same helpers in plain numba;
- :mod:`~sli.kernels.jit`: numba's options and the ids that keep its on-disk cache valid;
- :mod:`~sli.kernels.matrix_units`: the dtype of a prompt's matrix products (bfloat16 on AMX
  or AVX-512 BF16, else float32; ``SLI_PROMPT_DTYPE``).

The kernels are compiled with numba (``nogil``, split by output rows across a small thread
pool; ``cache=True``: compiled once per machine and level, then loaded from ``__pycache__``).
Every kernel has a plain torch equivalent in the codecs (dequantize, then ``F.linear``); the
processor uses the kernels for up to :data:`FUSED_MAX_TOKENS` activation rows on CPU in
float32, where they win, and the torch path otherwise. ``SLI_NO_NUMBA=1`` turns them off.

All kernels take ``x`` as float32 ``[T, in]`` and write ``y`` float32 ``[T, out]``.
"""
from __future__ import annotations

import contextlib
from typing import Optional

import numpy as np
import torch
from torch import Tensor

from .. import settings
from .dispatch import SIMD_LEVELS, kernels_enabled, lanes, requested_level, simd_helpers, simd_path, torch_on_one_thread
from .dispatch import run as _run
from . import matrix_units as matrix_units_module
from .matrix_units import hessian_int8, int8_matrix_rows, int_mm_int8, matrix_units, prompt_dtype
from .dispatch import table as _table  # tests/test_processor.py counts the compiled signatures
from .four_bit import LEVEL_SCALE, split_levels
from .int4 import token_kernel as int4_token_kernel

__all__ = [
    "FUSED_MAX_TOKENS", "RUNTIME_BYTES", "SIMD_LEVELS", "INT8_LEVELS_ROWS", "INT8_ACTIVATION_ROWS", "KEEP_FLOAT",
    "LEVEL_SCALE", "kernels_enabled", "requested_level", "simd_helpers", "simd_path", "four_bit_path", "lanes", "lut4_order",
    "q4_order", "fused_rows", "use_fused", "int8_activations", "quantize_rows", "matmul_4bit",
    "dequantize_4bit", "dequantize_blockwise8", "matmul_int8", "matmul_int4", "matmul_lut8", "matmul_fp8",
    "matmul_bf16", "dequantize_int4", "matrix_units", "prompt_dtype", "int8_matrix_rows", "hessian_int8", "torch_on_one_thread",
    "fused_pass", "FUSED_PASS_MAX_CONTEXT", "decode_attention", "decode_attention_arrays", "kv_arrays", "layer_ops",
    "add_columns", "decode_attention_work", "split_attention", "ATTENTION_SPLIT_WORK",
]

# Above this many activation rows dequantize-then-BLAS beats the fused kernels.
FUSED_MAX_TOKENS = settings.DEFAULT_SETTINGS["fused_max_tokens"]

# What numba adds to a process's peak RSS; the memory plan reserves it.
RUNTIME_BYTES = settings.DEFAULT_SETTINGS["kernel_runtime_bytes"]

# From this many activation rows on, INT8 and INT4 weights meet int8 activations (one scale
# a row, its KEEP_FLOAT largest |x| in float) in integer dot products, on a SIMD level: ~2x
# the float kernels at 16 rows (docs/benchmarks.md). One row too: a row's values then do not
# depend on how many rows share its pass (a server's batch gives each sequence the tokens it
# gets alone; with float single rows 4 of 16 SmolLM2 chat answers differed from the lone ones),
# and one row is no slower (14% faster for INT8). SLI_FLOAT_ACTIVATIONS=1 keeps every product float.
INT8_ACTIVATION_ROWS = 1
KEEP_FLOAT = 4  # = INT8_DYNAMIC's outliers per token

# NF4/FP4 meet integer activations too, from this many rows on, their 16 levels as the integers
# round(code * LEVEL_SCALE), looked up as 16-bit words and multiplied by int16 activations
# (sli.kernels.simd_int8.make_dot4l, levels_order): 0.5-0.9x the split-byte form they replaced
# on AVX2 and AVX-512 (docs/benchmarks.md).
# Integer sums make a row's values the same alone and in a batch, as for INT8/INT4. The
# activations are int16 here, one scale a row and no value kept in float (wide_levels): on
# SmolLM2 with every linear through the kernels NF4's perplexity is 19.549 against 19.543 with
# float activations (int8 ones with 4 kept values gave 19.611-19.639), FP4's 22.543 against
# 22.530 (docs/benchmarks.md). Levels rounded to one byte instead (llama.cpp IQ4_NL's way) had
# moved NF4 +0.82% by themselves. 0 turns the path off.
INT8_LEVELS_ROWS = 1


four_bit_path = simd_path  # the name before AVX-512


def fused_rows(max_rows: int = 0) -> int:
    """The most activation rows a product stays in a fused kernel for: :data:`FUSED_MAX_TOKENS`,
    or ``max_rows`` (a codec's ``fused_max_rows``) where larger, on a SIMD level (the plain
    level's kernels are for a token's few rows)."""
    return max_rows if max_rows > FUSED_MAX_TOKENS and simd_path() != "plain" else FUSED_MAX_TOKENS


def use_fused(x: Tensor, in_features: int, max_rows: int = 0) -> bool:
    """Whether ``x`` (``[..., in]``) should go through a fused kernel rather than dequantize + BLAS:
    up to :func:`fused_rows` rows."""
    if not (x.device.type == "cpu" and x.dtype == torch.float32 and kernels_enabled()):
        return False
    rows = x.numel() // max(1, in_features)
    return rows <= FUSED_MAX_TOKENS or rows <= fused_rows(max_rows)  # (a token's products ask nothing more)


# Below this many positions of context a decode pass holds torch to one thread: its own ops
# (reading the keys and values, attention) grow with the context, and past ~512 positions they
# want the threads back (7B-shaped NF4 with int8 KV in RAM: 0.48 vs 0.69 s/token at 16
# positions, 1.41 vs 1.44 at 512, 2.21 vs 1.66 at 1024; docs/benchmarks.md). A pass whose
# attention reads the keys and values in place (sli.attention, in the kernels) passes context 0:
# 0.57 s/token at 1024 positions then, against 0.84 with this limit.
FUSED_PASS_MAX_CONTEXT = 512


def fused_pass(rows: int, device: torch.device, context: int = 0, max_rows: int = 0):
    """The context manager a pass of ``rows`` activation rows over ``context`` earlier
    positions runs in: :func:`torch_on_one_thread` where its products are the fused kernels
    (CPU, up to :func:`fused_rows` rows) and its context is short. (torch's threads waiting for
    work beside the kernels' slow both: SmolLM2's 32-row NF4 prompt took 173-183 ms with them,
    97-112 ms on one thread.)"""
    if (device.type == "cpu" and 0 < rows <= fused_rows(max_rows) and context < FUSED_PASS_MAX_CONTEXT
            and kernels_enabled()):
        return torch_on_one_thread()
    return contextlib.nullcontext()


def add_columns(x: Tensor, columns: Tensor, weights: Tensor, y: Tensor) -> None:
    """``y += x[..., columns] @ weights.T`` in place (INT8's outlier columns: ``weights``
    ``[out, k]``), on CPU with the kernels in a fixed order a row (a row's bits do not depend on
    its batch or on which path computes it), else in torch."""
    if y.device.type != "cpu" or y.dtype != torch.float32 or not kernels_enabled():
        y += x[..., columns] @ weights.t()
        return
    rows, out = _rows(x.float(), x.shape[-1]), y.view(-1, y.shape[-1])
    _table()["add_columns"](_np(rows), _np(columns.long().contiguous()), _np(weights.float().contiguous()), _np(out))


def layer_ops() -> dict:
    """The decode step's small kernels by name (:mod:`sli.kernels.decode_ops`): ``rms_norm``,
    ``add_rms_norm``, ``add``, ``rotate``, ``silu_mul``, ``store_bf16``, ``store_int8``."""
    return _table()


def int8_activations(rows: int) -> bool:
    """Whether a product of ``rows`` activation rows by an INT8 or INT4 weight quantizes the
    activations to int8 (see :data:`INT8_ACTIVATION_ROWS`)."""
    return (rows >= INT8_ACTIVATION_ROWS and not settings.flag("SLI_FLOAT_ACTIVATIONS")
            and simd_path() != "plain")


def _rows(x: Tensor, in_features: int) -> Tensor:
    return x.reshape(-1, in_features).contiguous()


def _np(t: Tensor):
    return t.detach().numpy() if t.requires_grad else t.numpy()


def _bf16_bits(t: Tensor):
    """A bfloat16 tensor's bits as a uint16 array (numpy has no bfloat16; the kernels widen them)."""
    return _np(t.view(torch.int16)).view("uint16")


def _out(rows: Tensor, out_features: int) -> np.ndarray:
    # numpy's allocations and views cost ~0.3 us a call, torch's ~2: on a small model's
    # decode (~210 products a token) the wrappers' own cost was most of a product's time
    return np.empty((rows.shape[0], out_features), np.float32)


def _finish(y: "np.ndarray | Tensor", x: Tensor, out_features: int, bias: Optional[Tensor]) -> Tensor:
    if isinstance(y, np.ndarray):
        y = torch.from_numpy(y)
    if bias is not None:
        y += bias
    return y.view(*x.shape[:-1], out_features)


def _flat(t: Tensor) -> Tensor:
    return t.reshape(-1).contiguous()


def lut4_order(rows: Tensor) -> Tensor:
    """``rows`` (float32 ``[T, n]``, ``n`` a multiple of 64) in the order the 4-bit helpers
    read: each ``2*lanes`` values as the even ones, then the odd ones (a register of high
    nibbles decodes the even values of ``2*lanes``). Once per call, shared by every weight row."""
    w = lanes()
    if w == 1:
        return rows
    t, n = rows.shape
    return rows.view(t, n // (2 * w), w, 2).transpose(2, 3).contiguous().view(t, n)


def q4_order(rows: Tensor, half: int = 64) -> Tensor:
    """int8 ``rows`` ``[T, n]`` (``n`` a multiple of ``2*half``) with each ``2*half`` values as
    the even ones, then the odd ones: the order of the nibbles of ``half`` packed bytes."""
    t, n = rows.shape
    return torch.from_numpy(_q4_order(_np(rows.contiguous()).reshape(-1), t, n, half)).view(t, n)


def quantize_rows(rows: Tensor, xblock: int, keep: int = 0, sumblock: Optional[int] = None):
    """``rows`` (float32 ``[T, in]``) as int8 blocks of ``xblock`` values with a float scale
    each, the ``keep`` largest |x| of each row kept in float: ``(xq, xs, corr, bsum, oidx, oval)``
    (``bsum``: the sum of ``xq`` a block of ``sumblock`` values)."""
    return tuple(torch.from_numpy(a) for a in _quantized(_np(rows), xblock, keep, sumblock))


def quantized_buffers(t: int, n: int, xblock: int, keep: int = 0, sumblock: Optional[int] = None,
                      wide: bool = False):
    """Empty arrays for :func:`_quantized` of ``t`` rows of ``n`` values: ``(xq, xs, corr, bsum, oidx, oval)``
    (``wide``: ``xq`` int16, quantized at :data:`sli.kernels.activations.WIDE` levels)."""
    sumblock = sumblock or n
    return (np.empty(t * n, np.int16 if wide else np.int8), np.empty(t * (n // xblock), np.float32),
            np.empty(t, np.float32), np.empty(t * (n // sumblock), np.float32), np.empty((t, keep), np.int64),
            np.empty((t, keep), np.float32))


def _quantized(rows: np.ndarray, xblock: int, keep: int = 0, sumblock: Optional[int] = None, out=None):
    """:func:`quantize_rows` on and to numpy arrays (what the kernels take), written into ``out``
    (:func:`quantized_buffers`) when given."""
    t, n = rows.shape
    sumblock = sumblock or n
    out = out if out is not None else quantized_buffers(t, n, xblock, keep, sumblock)
    _table()["quantize_rows"](rows, xblock, sumblock, *out)
    return out


def _q4_order(xq: np.ndarray, t: int, n: int, half: int = 64, out: Optional[np.ndarray] = None) -> np.ndarray:
    """:func:`q4_order` on a numpy array: int8 rows ``xq`` (``[T * n]``, flat) to flat (what the
    kernels take), into ``out`` when given. Where ``2*half`` does not divide ``n``, a row's
    last ``n % (2*half)`` values are ordered with ``half`` 32 (INT4's groups of 64 in a row
    of 576)."""
    main = n - n % (2 * half)
    rows = xq.reshape(t, n)
    result = (np.empty(t * n, xq.dtype) if out is None else out).reshape(t, n)
    for start, stop, part_half in ((0, main, half), (main, n, 32)):
        blocks = (stop - start) // (2 * part_half)
        into = result[:, start:stop].reshape(t, blocks, 2, part_half)  # a view: each row's run split
        into[...] = rows[:, start:stop].reshape(t, blocks, part_half, 2).transpose(0, 1, 3, 2)
    return result.reshape(-1)


def levels_order(xq: np.ndarray, t: int, n: int, out: Optional[np.ndarray] = None) -> np.ndarray:
    """int8 rows ``xq`` (``[T * n]``, flat; ``n`` a multiple of 64) as the NF4/FP4 helper
    ``dot4l`` reads them, flat, into ``out`` (:func:`levels_buffer`) when given: in
    :func:`q4_order` with ``half`` 32 (plain), as int16 on the SIMD levels
    (:func:`sli.kernels.simd_int8.make_dot4l`): on AVX-512 each 128 values as the 32 values
    ``4i``, then the ``4i + 1``, ``4i + 2``, ``4i + 3`` ones, a row's last 64 (when 128 does not
    divide it) in q4_order; on AVX2 each 32 values of q4_order as their 0-7, 16-23, 8-15, 24-31
    (the values a ``vpunpcklbw``/``vpunpckhbw`` of looked-up bytes holds)."""
    level = simd_path()
    if level == "plain":
        return _q4_order(xq, t, n, 32, out)
    if level == "avx512":  # int16: each 128 values as the 4 groups of values 4i + m, a last 64 in q4_order
        out = levels_buffer(t, n) if out is None else out
        whole = n // 128 * 128
        rows, ordered = xq.reshape(t, n), out.reshape(t, n)
        chunks = rows[:, :whole].reshape(t, whole // 128, 32, 4).transpose(0, 1, 3, 2)
        if whole == n:
            ordered.reshape(chunks.shape)[...] = chunks
        else:
            ordered[:, :whole] = chunks.reshape(t, whole)
            ordered[:, whole:] = rows[:, whole:].reshape(t, 32, 2).transpose(0, 2, 1).reshape(t, 64)
        return out
    # value 2 * (16 * lane + 8 * h + i) + odd of each 64 -> position 32 * odd + 16 * h + 8 * lane + i
    ordered = xq.reshape(t, n // 64, 2, 2, 8, 2).transpose(0, 1, 5, 3, 2, 4)
    out = levels_buffer(t, n) if out is None else out
    out.reshape(ordered.shape)[...] = ordered
    return out


def levels_buffer(t: int, n: int) -> np.ndarray:
    """Room for :func:`levels_order` of ``t`` rows of ``n`` values."""
    return np.empty(t * n, np.int8 if simd_path() == "plain" else np.int16)


_split: dict = {}  # the code's bytes -> its split levels (a mode has one or two codes)


def _levels(code: Tensor) -> np.ndarray:
    values = _np(code.float())
    key = values.tobytes()
    levels = _split.get(key)
    if levels is None:
        levels = _split[key] = split_levels(values)
    return levels


def wide_levels() -> bool:
    """Whether NF4/FP4's integer levels meet int16 activations (one scale a row at
    :data:`~sli.kernels.activations.WIDE` levels, no value kept in float): on a SIMD level, whose
    kernels read the activations as 16-bit words anyway. On SmolLM2 NF4's perplexity moved +0.07%
    against float activations where int8 ones with 4 kept values moved it +0.42%, and the
    kept values' lookups were a fifth of a 576-wide product (docs/benchmarks.md). The plain
    level reads int8 activations and keeps :data:`KEEP_FLOAT` values."""
    return simd_path() != "plain"


def levels_keep(in_features: int) -> int:
    """The values a row keeps in float for NF4/FP4's integer levels (see :func:`wide_levels`)."""
    return 0 if wide_levels() else min(KEEP_FLOAT, in_features - 1)


def levels_fit(blocksize: int, in_features: int) -> bool:
    """Whether the integer-level kernels (``dot4l``) take a 4-bit weight of these blocks: whole
    blocks of 32 values or of a multiple of 64, rows of whole 64-value steps."""
    return (blocksize == 32 or blocksize % 64 == 0) and in_features % max(blocksize, 64) == 0


def _int8_4bit(x: Tensor, blocksize: int):
    """``x``'s rows quantized for :func:`matmul_4bit`'s integer path, or None where it stays float."""
    rows = _rows(x, x.shape[-1])
    if not (INT8_LEVELS_ROWS and rows.shape[0] >= INT8_LEVELS_ROWS and int8_activations(rows.shape[0])
            and levels_fit(blocksize, rows.shape[1])):
        return None
    t, n = rows.shape
    keep = levels_keep(n)
    xq, xs, _, _, oidx, oval = _quantized(_np(rows), n, keep, out=quantized_buffers(t, n, n, keep, n, wide_levels()))
    return rows, levels_order(xq, t, n), xs, oidx, oval


def matmul_4bit(x: Tensor, packed: Tensor, absmax: Tensor, code: Tensor, blocksize: int, out_features: int,
                bias: Optional[Tensor] = None) -> Optional[Tensor]:
    """``x @ W^T (+ bias)`` for a bitsandbytes-layout 4-bit weight with float32 block maxima
    ``absmax`` (``in`` a multiple of ``blocksize``), or None where no kernel takes the weight.
    From :data:`INT8_LEVELS_ROWS` rows on, the 16 levels as integers meet int8 activations
    (blocks of 32 values or of a multiple of 64, :func:`levels_fit`); below, float activations
    meet blocks of a multiple of 64."""
    maxima = _np(_flat(absmax))
    quantized = _int8_4bit(x, blocksize)
    if quantized is not None:
        rows, xq, xs, oidx, oval = quantized
        y = _out(rows, out_features)
        _run("matmul_4bitq", out_features, out_features * x.shape[-1] * rows.shape[0] // 4, _np(_flat(packed)),
             maxima, _levels(code), _np(code), xq, xs, oidx, oval, blocksize, y)
        return _finish(y, x, out_features, bias)
    if blocksize % 64:
        return None
    rows = lut4_order(_rows(x, x.shape[-1]))
    y = _out(rows, out_features)
    _run("matmul_4bit", out_features, out_features * x.shape[-1] * rows.shape[0], _np(_flat(packed)), maxima,
         _np(code), _np(rows), y, blocksize)
    return _finish(y, x, out_features, bias)


def dequantize_4bit(packed: Tensor, absmax: Tensor, code: Tensor, blocksize: int, out: Tensor) -> Tensor:
    """Fill float32 ``out`` with ``code[nibble] * absmax[block]`` (bitsandbytes' values, ~5x faster here),
    or bfloat16 ``out`` with those values rounded as ``.to(torch.bfloat16)`` rounds them."""
    name, flat = "dequantize_4bit", out.view(-1)
    if out.dtype == torch.bfloat16:
        name, flat = "dequantize_4bit_bf16", flat.view(torch.uint16)
    _run(name, absmax.shape[0], out.numel(), _np(_flat(packed)), _np(absmax), _np(code), _np(flat), blocksize)
    return out


def round_to_levels(values: Tensor, below: Tensor, next_mid: Tensor, sorted_code: Tensor) -> Tensor:
    """Each of float32 ``values`` (divided by their scale) as the nearest of a 16-level code's
    ``sorted_code``, found through the table ``below`` / ``next_mid`` (:mod:`sli.kernels.gptq`)."""
    flat = _flat(values)
    out = np.empty(flat.numel(), np.float32)
    _run("round_to_levels", flat.numel(), flat.numel() * 4, _np(flat), _np(below), _np(next_mid), _np(sorted_code), out)
    return torch.from_numpy(out).view(values.shape)


def nearest_codes(values: Tensor, below: Tensor, next_mid: Tensor, order: Tensor) -> Tensor:
    """uint8 code of the 16-level code's level nearest each of float32 ``values`` (divided by their
    scale), found through the table ``below`` / ``next_mid`` (``order``: sorted level → code;
    :mod:`sli.kernels.gptq`)."""
    flat = _flat(values)
    out = np.empty(flat.numel(), np.uint8)
    _run("nearest_code_indices", flat.numel(), flat.numel() * 4, _np(flat), _np(below), _np(next_mid), _np(order), out)
    return torch.from_numpy(out).view(values.shape)


def search_block_maxima(weight: Tensor, blocksize: int, importance: Tensor, grid: Tensor, below: Tensor,
                        next_mid: Tensor, sorted_code: Tensor) -> Tensor:
    """Each ``blocksize``-value block of float32 ``weight`` ``[rows, cols]``: its absmax times the
    factor of ``grid`` whose rounding to the code's levels has the least error weighted by
    ``importance`` ``[cols]`` (:mod:`sli.kernels.gptq`). Returns float32 ``[rows, cols // blocksize]``."""
    rows, cols = weight.shape
    best = np.empty(rows * (cols // blocksize), np.float32)
    _run("search_block_maxima", best.shape[0], weight.numel() * grid.numel() * 8, _np(_flat(weight)),
         _np(importance.float().contiguous()), _np(grid.float().contiguous()), _np(below), _np(next_mid),
         _np(sorted_code), best)
    return torch.from_numpy(best).view(rows, cols // blocksize)


def search_int4_clipping(weight: Tensor, group: int, importance: Tensor, grid: Tensor) -> Tensor:
    """Each ``group``-value group of float32 ``weight`` ``[rows, cols]``: the index into ``grid``
    of the clipping of its ``[min, max]`` whose INT4 rounding has the least error weighted by
    ``importance`` ``[cols]`` (:mod:`sli.kernels.gptq`). Returns int64 ``[rows, cols // group]``."""
    rows, cols = weight.shape
    best = np.empty(rows * (cols // group), np.int64)
    _run("search_int4_clipping", best.shape[0], weight.numel() * grid.numel() * 8, _np(_flat(weight)),
         _np(importance.float().contiguous()), _np(grid.float().contiguous()), best)
    return torch.from_numpy(best).view(rows, cols // group)


def quantize_columns_bf16(x: Tensor) -> "tuple[Tensor, Tensor]":
    """bfloat16 ``x`` ``[tokens, n]`` (contiguous) quantized to int8 a column at a time:
    ``(q, scale)`` with ``scale = max |x[:, c]| / 127`` (float32, at least 1e-30 / 127) and
    ``q = round(x / scale)`` as torch rounds it (:mod:`sli.kernels.gptq`)."""
    tokens, n = x.shape
    bits = _bf16_bits(x)
    absmax = np.empty(n, np.uint16)
    _run("column_absmax_bf16", n, x.numel(), bits, absmax)
    scale = torch.from_numpy(absmax.view(np.int16)).view(torch.bfloat16).float().clamp_(min=1e-30).div_(127)
    q = torch.empty(x.shape, dtype=torch.int8)
    _run("quantize_columns_bf16", tokens, x.numel() * 4, bits, _np(scale), _np(q))
    return q, scale


def add_scaled_gram(sums: Tensor, gram: Tensor, scale_rows: Tensor, scale_cols: Tensor) -> None:
    """``sums += gram * scale_rows[:, None] * scale_cols[None, :]`` in one pass (float32 ``sums``,
    its rows contiguous; int32 ``gram``): an int8 Gram block added to a Hessian (:mod:`sli.kernels.gptq`)."""
    rows, cols = gram.shape
    _run("add_scaled_gram", rows, rows * cols, _np(sums), _np(gram), _np(scale_rows.contiguous()),
         _np(scale_cols.contiguous()))


def gptq_block(w: Tensor, u: Tensor, err: Tensor, groups: Tensor, scale: Tensor, zero: Optional[Tensor] = None,
               levels: Optional[tuple] = None) -> None:
    """GPTQ's solve of a block of columns, in place: ``w`` float32 ``[columns, rows]`` (solve
    order, contiguous), each column rounded on its group's grid (``scale``, and for INT4 ``zero``,
    float32 ``[groups, rows]``; ``groups`` int64 ``[columns]``; a 16-level code's ``levels``:
    ``(below, next_mid, sorted_code)``); ``err[j]``, column ``j``'s original values on entry,
    becomes their rounding error, spread onto the block's later columns through ``u`` (the
    ``[columns, columns]`` block of GPTQ's error weights, :mod:`sli.quantization.gptq`). Rows
    are independent: split across threads (:mod:`sli.kernels.gptq`)."""
    rows = w.shape[1]
    work = w.shape[0] * w.shape[0] * rows // 2
    u = _np(u.contiguous())
    if zero is not None:
        _run("gptq_block_int4", rows, work, _np(w), u, _np(err), _np(groups), _np(scale), _np(zero))
    else:
        below, next_mid, sorted_code = levels
        _run("gptq_block_levels", rows, work, _np(w), u, _np(err), _np(groups), _np(scale), _np(below),
             _np(next_mid), _np(sorted_code))


def dequantize_blockwise8(q: Tensor, absmax: Tensor, code: Tensor, blocksize: int, offset: float = 0.0,
                          out: Optional[Tensor] = None) -> Tensor:
    """``code[q] * absmax[block] + offset`` as float32 (bitsandbytes' blockwise 8-bit, e.g. the
    double-quantized block maxima of a 4-bit weight), into ``out`` (float32, ``q.numel()``
    values) where given."""
    flat = q.reshape(-1)
    if out is None:
        out = torch.empty(flat.numel(), dtype=torch.float32)
    _run("dequantize_blockwise8", absmax.numel(), flat.numel(), _np(flat), _np(absmax.float().reshape(-1)),
         _np(code.float()), _np(out), blocksize, offset)
    return out


def matmul_int8(x: Tensor, q: Tensor, scale: Tensor, bias: Optional[Tensor] = None,
                activations: str = "auto") -> Tensor:
    """``x @ (q * scale[:, None])^T (+ bias)`` for an int8 ``[out, in]`` weight.

    ``activations``: "float" multiplies ``x`` as it is; "int8" quantizes each row of ``x`` to
    int8 (one scale, its :data:`KEEP_FLOAT` largest |x| in float) and multiplies with integer
    dot products; "auto" picks by :func:`int8_activations`; "on-grid" is for an ``x`` already
    on that grid (INT8_DYNAMIC's :meth:`prepare_input`), where both give the same values: the
    faster one (int8 on a SIMD level).
    """
    rows = _rows(x, q.shape[1])
    matrix_rows = int8_matrix_rows()
    if activations == "auto":
        activations = "int8" if int8_activations(rows.shape[0]) else "float"
    elif activations == "on-grid":
        activations = "int8" if simd_path() != "plain" or matrix_rows else "float"
    if activations != "float" and matrix_rows and rows.shape[0] >= matrix_rows:  # oneDNN's int8 tiles
        xq, xs, _, _, oidx, oval = quantize_rows(rows, q.shape[1], min(KEEP_FLOAT, q.shape[1] - 1))
        return _finish(int_mm_int8(xq.view(rows.shape), xs, oidx, oval, q, scale), x, q.shape[0], bias)
    y = _out(rows, q.shape[0])
    if activations == "int8" and q.shape[1] % 64 == 0:
        xq, xs, corr, _, oidx, oval = _quantized(_np(rows), q.shape[1], min(KEEP_FLOAT, q.shape[1] - 1))
        _run("matmul_int8q", q.shape[0], q.numel() * rows.shape[0] // 4, _np(_flat(q)), _np(scale), xq, xs, corr, oidx,
             oval, q.shape[1], y)
    else:
        _run("matmul_int8", q.shape[0], q.numel() * rows.shape[0], _np(_flat(q)), _np(scale), _np(rows), y)
    return _finish(y, x, q.shape[0], bias)


def int4_groups(scales: Tensor, zeros: Tensor) -> "tuple[np.ndarray, np.ndarray]":
    """INT4's group scales and zeros as its kernels read them, the stored bytes themselves: the
    float16 scales' bits as int16 (numba has no float16 arrays) and the uint8 zeros."""
    if scales.dtype != torch.float16 or zeros.dtype != torch.uint8:
        raise TypeError(f"INT4 groups are float16 scales and uint8 zeros, not {scales.dtype} and {zeros.dtype}")
    # numpy's reshape, not torch's: ~1 us against ~190 for a file-mapped tensor (bound.py)
    return (np.ascontiguousarray(_np(scales.view(torch.int16))).reshape(-1),
            np.ascontiguousarray(_np(zeros)).reshape(-1))


def dequantize_int4(packed: Tensor, scales: Tensor, zeros: Tensor, group: int, out: Tensor) -> Tensor:
    """Fill float32 ``out`` ``[rows, in]`` with ``(q - zero) * scale`` of group-wise affine int4
    (``packed`` ``[rows, padded_in / 2]``; the padding past ``in`` is dropped; ``scales``
    float16 and ``zeros`` uint8, as stored)."""
    _run("dequantize_int4", packed.shape[0], out.numel(), _np(_flat(packed)), *int4_groups(scales, zeros),
         _np(out), group)
    return out


def int4_half(group: int) -> int:
    """The :func:`q4_order` ``half`` INT4's int8 kernel reads groups of ``group`` values in
    (a multiple of 64): 64 where 128 divides the group or the group is 64 (two groups a step;
    a row's last 64 values in ``half`` 32 where 128 does not divide it), else 32 (64 values a
    step)."""
    return 64 if group % 128 == 0 or group == 64 else 32


def matmul_int4(x: Tensor, packed: Tensor, scales: Tensor, zeros: Tensor, group: int, in_features: int,
                bias: Optional[Tensor] = None, activations: str = "auto") -> Optional[Tensor]:
    """``x @ W^T (+ bias)`` for group-wise affine int4 (``w = (q - zero) * scale``; ``scales``
    float16 and ``zeros`` uint8, as stored). ``activations`` as in :func:`matmul_int8` (a group
    size that is not a multiple of 64 takes the plain loops)."""
    rows = _rows(x, in_features)
    padded = packed.shape[1] * 2
    if padded != in_features:
        rows = torch.nn.functional.pad(rows, (0, padded - in_features))
    y = _out(rows, packed.shape[0])
    if group % 64:
        _run("matmul_int4_any", packed.shape[0], packed.numel() * 2 * rows.shape[0], _np(_flat(packed)),
             *int4_groups(scales, zeros), _np(rows), y, group)
        return _finish(y, x, packed.shape[0], bias)
    if activations == "auto":
        activations = "int8" if int8_activations(rows.shape[0]) else "float"
    if activations == "int8":
        xq, xs, _, gsum, oidx, oval = _quantized(_np(rows), padded, min(KEEP_FLOAT, in_features - 1), group)
        kernel, group_argument = int4_token_kernel(group)
        _run(kernel, packed.shape[0], packed.numel() * 2 * rows.shape[0] // 4, _np(_flat(packed)),
             *int4_groups(scales, zeros), _q4_order(xq, rows.shape[0], padded, int4_half(group)), xs, gsum,
             oidx, oval, *group_argument, y)
    else:
        _run("matmul_int4", packed.shape[0], packed.numel() * 2 * rows.shape[0], _np(_flat(packed)),
             *int4_groups(scales, zeros), _np(lut4_order(rows)), y, group)
    return _finish(y, x, packed.shape[0], bias)


def matmul_lut8(x: Tensor, q: Tensor, lut: Tensor, scale: Tensor, bias: Optional[Tensor] = None) -> Tensor:
    """``x @ (lut[q] * scale[:, None])^T (+ bias)`` for a one-byte code ``[out, in]`` (e.g. float8)."""
    rows = _rows(x, q.shape[1])
    y = _out(rows, q.shape[0])
    _run("matmul_lut8", q.shape[0], q.numel() * rows.shape[0], _np(q.view(torch.uint8)), _np(lut), _np(scale),
         _np(rows), y)
    return _finish(y, x, q.shape[0], bias)


def matmul_fp8(x: Tensor, q: Tensor, scale: Tensor, bias: Optional[Tensor] = None) -> Tensor:
    """``x @ (float(q) * scale[:, None])^T (+ bias)`` for a float8_e4m3fn ``[out, in]`` weight,
    its bytes decoded by arithmetic in registers (no table)."""
    rows = _rows(x, q.shape[1])
    y = _out(rows, q.shape[0])
    _run("matmul_fp8", q.shape[0], q.numel() * rows.shape[0], _np(_flat(q).view(torch.uint8)), _np(scale), _np(rows),
         y)
    return _finish(y, x, q.shape[0], bias)


_NO_SCALE = torch.empty(0).numpy()  # matmul_bf16's kernel: the INT8 / FP8 one, unscaled


def matmul_bf16(x: Tensor, weight: Tensor, bias: Optional[Tensor] = None) -> Tensor:
    """``x @ weight^T (+ bias)`` in float32 for a bfloat16 weight, without converting it first."""
    rows = _rows(x, weight.shape[1])
    y = _out(rows, weight.shape[0])
    _run("matmul_bf16", weight.shape[0], weight.numel() * rows.shape[0], _bf16_bits(_flat(weight)), _NO_SCALE,
         _np(rows), y)
    return _finish(y, x, weight.shape[0], bias)


def decode_attention(query: Tensor, keys: Tensor, key_scale: Optional[Tensor], values: Tensor,
                     value_scale: Optional[Tensor], bias: Tensor, length: int, scaling: float) -> Tensor:
    """One query row per head attending to the first ``length`` positions of compact keys and
    values: ``softmax(query @ keys^T * scaling + bias) @ values`` as float32 ``[H, D]``.

    ``query`` float32 ``[H, D]``; ``keys``, ``values`` ``[Hk, capacity, D]``, int8 with float32
    scales ``[Hk, capacity]`` (a scale per position and head) or bfloat16 with scales None;
    ``H`` a multiple of ``Hk`` (grouped attention); ``bias`` float32 ``[length]`` (-inf masks
    a position)."""
    stored = (*kv_arrays(keys, key_scale), *kv_arrays(values, value_scale))
    return torch.from_numpy(decode_attention_arrays(_np(query.contiguous()), *stored, _np(bias), length, scaling))


def kv_arrays(stored: Tensor, scale: Optional[Tensor]) -> "tuple[np.ndarray, np.ndarray]":
    """Keys or values ``[Hk, capacity, D]`` as the decode attention kernels take them: int8 with
    its float32 scales ``[Hk, capacity]``, or bfloat16 as its bits (uint16) with an empty scale."""
    if stored.dtype == torch.int8:
        return _np(stored), _np(scale)
    if stored.dtype == torch.bfloat16:
        return _bf16_bits(stored), _NO_SCALE_2D
    raise ValueError(f"decode_attention reads int8 or bfloat16 keys and values, not {stored.dtype}")


# From this many multiply-adds on (a 7B-shaped layer's 32 heads of 128 at 4096 positions), a
# decode step's attention is split across threads. Below it one thread is as fast (memory-bound:
# 0.95 ms alone against 0.85 split at 1024 positions, 0.13 against 0.17-0.20 at 128), and the
# pool's thread, beside a team worker still polling, waited up to a scheduler slice for a core:
# 0.5-0.7 s a 7B token at 128 positions against 0.29-0.31 (docs/benchmarks.md).
ATTENTION_SPLIT_WORK = 1 << 25


def decode_attention_work(keys: np.ndarray, length: int) -> int:
    """The multiply-adds of one query row a head attending to ``length`` positions of
    ``keys`` ``[Hk, capacity, D]``."""
    return 2 * length * keys.shape[0] * keys.shape[2]


def split_attention(keys: np.ndarray, length: int) -> bool:
    """Whether a decode step's attention over ``length`` positions of ``keys`` is split across
    threads (:data:`ATTENTION_SPLIT_WORK`)."""
    return decode_attention_work(keys, length) >= ATTENTION_SPLIT_WORK


def decode_attention_arrays(query: np.ndarray, keys: np.ndarray, key_scale: np.ndarray, values: np.ndarray,
                            value_scale: np.ndarray, bias: np.ndarray, length: int, scaling: float,
                            out: Optional[np.ndarray] = None) -> np.ndarray:
    """:func:`decode_attention` on numpy arrays: bfloat16 keys and values as their bits
    (uint16) with empty ``[0, 0]`` scales, int8 ones with theirs. Returns float32 ``[H, D]``
    (``out`` when given)."""
    heads, dim = query.shape
    out = np.empty((heads, dim), np.float32) if out is None else out
    name = "decode_attention_int8" if keys.dtype == np.int8 else "decode_attention_bf16"
    args = (query, keys, key_scale, values, value_scale, bias, length, float(scaling), out)
    if split_attention(keys, length):
        _run(name, keys.shape[0], decode_attention_work(keys, length), *args)
    else:
        _table()[name](*args, 0, keys.shape[0])
    return out


_NO_SCALE_2D = torch.empty(0, 0).numpy()  # decode_attention's bfloat16 kernel: unscaled
