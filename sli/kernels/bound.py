"""Products bound to one weight: the kernel and its arrays looked up once, for a decode step
that calls them every token (:mod:`sli.decode_step`).

:func:`sli.kernels.matmul_int8` and its siblings take torch tensors and decide, every call,
which kernel runs, how the activations are quantized and where the output goes: ~20-40 µs a
call, as much as the product of a small model's weight. A :class:`RowProduct` is that
decision made once, for rows of int8 activations: it holds the weight's numpy arrays and
calls its kernel with activations quantized beforehand (:class:`Activations`), which several
products of the same input (a layer's q, k and v) share. Its output is bit for bit
the wrapper's for the same rows.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional, Tuple

import numpy as np
import torch
from torch import Tensor

from . import (INT8_LEVELS_ROWS, KEEP_FLOAT, _levels, _np, _q4_order, _quantized, int4_groups, int4_half,
               int8_activations, int8_matrix_rows, levels_buffer, levels_fit, levels_keep, levels_order,
               quantized_buffers, wide_levels)
from . import dispatch
from .int4 import token_kernel as int4_token_kernel
from .dispatch import run, table


def _flat_np(t: Tensor) -> np.ndarray:
    """``t`` as a flat numpy array: a view where ``t`` is contiguous. numpy's reshape costs
    ~1 µs; torch's ``reshape(-1)`` of a streamed layer's file-mapped tensor took ~190 µs here
    (a streamed layer binds its 7 products every pass)."""
    return np.ascontiguousarray(_np(t)).reshape(-1)


QuantizedRows = Tuple[np.ndarray, ...]  # (xq, xs, corr, bsum, oidx, oval), as the kernels take them


@dataclass(frozen=True)
class Activations:
    """The int8 form a product takes its activation rows in: ``width`` columns (zeros past the
    input's), one scale a row, the ``keep`` largest |x| of a row in float, the int8 sums a
    block of ``sumblock``; ``half`` > 0: each ``2*half`` int8 values in the nibble order of
    ``half`` packed bytes (INT4's kernel); ``levels``: in the order NF4/FP4's kernel reads
    (:func:`sli.kernels.levels_order`)."""

    width: int
    sumblock: int
    keep: int
    half: int = 0
    levels: bool = False
    wide: bool = False  # xq int16 (sli.kernels.wide_levels)

    def buffers(self, rows: int) -> "QuantizeBuffers":
        """Room to quantize ``rows`` rows, for :meth:`quantize` to reuse."""
        return QuantizeBuffers(self, rows)

    def quantize(self, rows: np.ndarray, into: Optional["QuantizeBuffers"] = None) -> QuantizedRows:
        """float32 ``rows`` ``[T, in]`` (``in`` ≤ ``width``) in this form, written into
        ``into`` (its arrays returned) or fresh arrays."""
        t, n = rows.shape
        into = into if into is not None and into.rows == t else QuantizeBuffers(self, t)
        if n != self.width:
            into.padded[:, :n] = rows
            rows = into.padded
        xq, xs, corr, bsum, oidx, oval = _quantized(rows, self.width, self.keep, self.sumblock, into.arrays)
        if self.levels:
            xq = levels_order(xq, t, self.width, into.ordered)
        elif self.half:  # each 2*half values: the even ones, then the odd ones
            xq = _q4_order(xq, t, self.width, self.half, into.ordered)
        return xq, xs, corr, bsum, oidx, oval


    def order(self) -> np.ndarray:
        """Where each value of one row's int8 form comes from: ``form[i] = xq[order[i]]``
        (:func:`levels_order` or :func:`q4_order` applied to the positions); empty where the
        form keeps ``xq``'s order."""
        n = self.width
        positions = np.arange(n, dtype=np.int64)
        if self.levels:
            return levels_order(positions, 1, n, np.empty(n, np.int64))
        if self.half:
            return _q4_order(positions, 1, n, self.half, np.empty(n, np.int64))
        return np.empty(0, np.int64)


class QuantizeBuffers:
    """The arrays :meth:`Activations.quantize` writes for ``rows`` rows."""

    def __init__(self, form: Activations, rows: int) -> None:
        n = form.width
        self.rows = rows
        self.arrays = quantized_buffers(rows, n, n, form.keep, form.sumblock, form.wide)
        self.ordered = levels_buffer(rows, n) if form.levels else np.empty(rows * n, np.int8) if form.half else None
        self.padded = np.zeros((rows, n), np.float32)  # only the first columns are written

    def quantized(self) -> QuantizedRows:
        """The arrays :meth:`Activations.quantize` into these buffers returns."""
        xq, *rest = self.arrays
        return (xq if self.ordered is None else self.ordered, *rest)


class RowProduct:
    """``y = x @ W^T (+ bias)``: ``product(rows, quantized, y)`` fills float32 ``y``
    ``[T, out_features]`` from ``rows`` (float32 ``[T, in]``) and their int8 form
    ``quantized`` (``product.activations.quantize(rows)``). ``columns``/``outliers``: INT8's
    outlier columns, whose float part meets the rows' float values.

    ``kernel`` (a name in :func:`~sli.kernels.dispatch.table`) runs over the output rows with
    ``arguments(quantized, y)``; a product below the threads' threshold calls it on this
    thread directly, as :func:`sli.kernels.dispatch.run` would."""

    def __init__(self, activations: Activations, out_features: int, work_per_row: int, kernel: str,
                 arguments: Callable[[QuantizedRows, np.ndarray], tuple], bias: Optional[Tensor],
                 columns: Optional[Tensor] = None, outliers: Optional[Tensor] = None) -> None:
        self.activations = activations
        self.out_features = out_features
        self.work_per_row = work_per_row
        self.kernel = kernel
        self.arguments = arguments
        self._go = _runner(kernel, out_features)
        self.bias = None if bias is None else bias.float().contiguous()
        self.columns = None if columns is None else _np(columns.long().contiguous())
        self.outliers = None if outliers is None else _np(outliers.float().contiguous())

    def __call__(self, rows: np.ndarray, quantized: QuantizedRows, y: np.ndarray) -> None:
        self._go(self.work_per_row * y.shape[0], *self.arguments(quantized, y))
        if self.bias is not None:
            torch.from_numpy(y).add_(self.bias)  # as the wrappers do it (torch's sums, bit for bit)
        if self.columns is not None:
            table()["add_columns"](rows, self.columns, self.outliers, y)  # as the INT8 codec adds them


def _runner(name: str, count: int):
    """``go(work, *args)``: kernel ``name`` over ``[0, count)``, on this thread below
    :data:`~sli.kernels.dispatch.TEAM_WORK` (skipping :func:`run`'s lookups), else split."""
    kernel = table()[name]

    def go(work: int, *args) -> None:
        if work < min(dispatch.TEAM_WORK, dispatch.INLINE_WORK):
            kernel(*args, 0, count)
        else:
            run(name, count, work, *args)

    return go


def takes(rows: int) -> bool:
    """Whether products of ``rows`` rows take int8 activations in sli's kernels, the case a
    :class:`RowProduct` reproduces (not on the plain level, with float activations asked for,
    or where ``torch._int_mm`` takes INT8's rows)."""
    matrix_rows = int8_matrix_rows()
    return int8_activations(rows) and INT8_LEVELS_ROWS and rows >= INT8_LEVELS_ROWS and not (
        matrix_rows and rows >= matrix_rows)


def int8(q: Tensor, scale: Tensor, bias: Optional[Tensor], columns: Optional[Tensor] = None,
         outliers: Optional[Tensor] = None) -> Optional[RowProduct]:
    """An INT8 weight ``q`` ``[out, in]`` with a float32 scale a row (:func:`sli.kernels.matmul_int8`),
    and its outlier ``columns`` in float (``outliers`` ``[out, len(columns)]``) if any."""
    out_features, in_features = q.shape
    if in_features % 64:
        return None
    qf, sf = _flat_np(q), _np(scale.contiguous())

    def arguments(a: QuantizedRows, y: np.ndarray) -> tuple:
        xq, xs, corr, _, oidx, oval = a
        return qf, sf, xq, xs, corr, oidx, oval, in_features, y

    return RowProduct(Activations(in_features, in_features, min(KEEP_FLOAT, in_features - 1)), out_features,
                      q.numel() // 4, "matmul_int8q", arguments, bias, columns, outliers)


def four_bit(packed: Tensor, code: Tensor, blocksize: int, out_features: int, in_features: int,
             bias: Optional[Tensor], absmax: Tensor) -> Optional[RowProduct]:
    """An NF4/FP4 weight with float32 block maxima ``absmax`` (:func:`sli.kernels.matmul_4bit`)."""
    if not levels_fit(blocksize, in_features):
        return None
    pf, levels, cf, maxima = _flat_np(packed), _levels(code), _np(code), _flat_np(absmax)

    def arguments(a: QuantizedRows, y: np.ndarray) -> tuple:
        xq, xs, _, _, oidx, oval = a
        return pf, maxima, levels, cf, xq, xs, oidx, oval, blocksize, y

    activations = Activations(in_features, in_features, levels_keep(in_features), levels=True, wide=wide_levels())
    return RowProduct(activations, out_features, out_features * in_features // 4, "matmul_4bitq", arguments, bias)


def int4(packed: Tensor, scales: Tensor, zeros: Tensor, group: int, in_features: int,
         bias: Optional[Tensor]) -> Optional[RowProduct]:
    """A group-wise affine INT4 weight (:func:`sli.kernels.matmul_int4`)."""
    if group % 64:
        return None
    out_features, padded = packed.shape[0], packed.shape[1] * 2
    pf = _flat_np(packed)
    sf, zf = int4_groups(scales, zeros)

    kernel, group_argument = int4_token_kernel(group)

    def arguments(a: QuantizedRows, y: np.ndarray) -> tuple:
        xq, xs, _, gsum, oidx, oval = a
        return (pf, sf, zf, xq, xs, gsum, oidx, oval, *group_argument, y)

    activations = Activations(padded, group, min(KEEP_FLOAT, in_features - 1), int4_half(group))
    return RowProduct(activations, out_features, packed.numel() * 2 // 4, kernel, arguments, bias)
