"""GPTQ: 4-bit weights chosen against calibration activations, in the codecs' own byte layouts.

For a linear ``y = x W^T`` whose inputs ``X`` were seen during calibration, GPTQ (Frantar et
al., 2022) quantizes ``W`` column by column and spreads each column's rounding error over the
columns not yet quantized, weighted by the inverse of the Hessian ``H = 2 X^T X`` of the
layer-wise loss ``||X W^T - X Wq^T||^2``. Here:

- the Hessian is dampened (``gptq_damp`` of its mean diagonal on the diagonal) and factored
  once; the updates are weighted by that factor's columns, in the form of LDLQ (Chee et al.,
  2023), which gives GPTQ's codes without inverting the Hessian (:func:`_error_weights`);
- columns are solved ``gptq_block_size`` at a time, the rest of the weight updated by one
  matrix product per block. On CPU a block is one call of :func:`sli.kernels.gptq_block`
  (each column rounded and its error spread over the block's later columns, a tile of rows
  at a time, rows split across threads); elsewhere torch operations do it, a column at a time
  inside 16 columns and a matrix product per 16;
- ``gptq_act_order`` solves columns in decreasing ``diag(H)`` but keeps **static groups**: each
  column's scale (INT4: scale and zero point per 128 columns of a row; NF4/FP4: absmax per 64
  values) is fixed before the solve from the original weight, for the group it has in the
  original column order. The stored bytes are the codec's ordinary layout (no group index, no
  permutation), so the fused kernels and the GPU path read them unchanged;
- ``gptq_scale_search`` picks each group's scale (INT4: the clipping of ``[min, max]``) or each
  block's absmax (NF4/FP4) from a small grid, by the rounding error weighted by ``diag(H)``;
- NF4/FP4 maxima are double-quantized before the solve, and the solve rounds against the
  maxima as they will be decoded, so the stored codes are exactly the solve's;
- ``gptq_asymmetric`` (GPTAQ, Li et al., 2025): the target of a linear is the float model's
  output ``F W^T`` on the float model's own inputs ``F``, not ``X W^T`` on the quantized model's
  inputs ``X``. With ``D = X^T (F - X)`` (:class:`InputDrift`) the least-squares weight for that
  target is ``W* = W + W D^T H^-1``; GPTQ on ``W*`` against ``H`` then minimizes
  ``||X Wq^T - F W^T||^2`` (the two differ by a constant). A fraction ``alpha`` of the
  correction is applied (0.25, GPTAQ's own: on SmolLM2 the whole one overshoots and the
  perplexity triples; docs/benchmarks.md). Off by default: it needs the float model's pass.

The result goes through the codec's ``quantize_with`` (the weight GPTQ chose, on the grid of the
scales it used), which gives a :class:`QuantizedTensor` like the codec's own ``quantize``.

Linears that read the same input (q/k/v, gate/up) share one Hessian; :func:`gptq_quantize`
factors it once for them.
"""
from __future__ import annotations

import logging
from typing import Dict, List, Optional, Tuple, Union

import torch
from torch import Tensor

from .. import kernels
from .codecs import codec_for
from .codecs.four_bit_quantizer import LEVEL_BINS, level_table
from .codecs.int4 import group_params
from .config import QuantizationConfig, QuantizationMode
from .formats import QuantizedTensor

logger = logging.getLogger(__name__)

# Clipping candidates of the scale search: the group's range (INT4) or absmax (4-bit) times these.
SEARCH_GRID = tuple(1.0 - 0.025 * k for k in range(13))  # 1.0 .. 0.70
_INNER = 16  # columns a rank-1 update touches at most (inside a block)
_SEARCH_VALUES = 1 << 20  # weight values the scale search takes at once
SOLVE_VALUES = 1 << 25  # weight values solved at once (a slab of rows, 128 MB of float32)


HESSIAN_BLOCK = 1024  # rows of the Hessian one product fills, from the diagonal on
INT8_GRAM_TOKENS = (2 ** 31 - 1) // (127 * 127)  # tokens one int8 Gram product sums at most
QUANTIZE_VALUES = 1 << 22  # activation values quantized to int8 at once (16 MB of float32)


class Hessian:
    """The running ``sum x^T x`` of a linear's inputs (``x`` rows are tokens), float32.

    Never a bfloat16 product (~1.9x float32's rate on AMX): torch has no float32 output for one
    on CPU, and rounded to bfloat16 it made a 7B-shaped layer's Hessians indefinite (they needed
    10-100x the dampening, docs/benchmarks.md).

    On a CPU whose int8 products run in ``torch._int_mm`` (AMX, AVX-512 VNNI:
    :func:`sli.kernels.hessian_int8`), each chunk's activations are quantized to int8 per
    column first and their Gram matrix is summed in int32 (2.2-2.7 TOP/s against float32's
    0.35 TFLOP/s on the AMX Xeon). On SmolLM2 this moved the calibrated perplexities by less than
    the choice of calibration windows does (docs/benchmarks.md). bfloat16 activations are
    quantized by :func:`sli.kernels.quantize_columns_bf16` and each int32 block is scaled into
    the sums in one pass (:func:`sli.kernels.add_scaled_gram`): a 4096-token chunk of an
    11008-wide input 0.48 → 0.36 s, of a 4096-wide one 0.12 → 0.07 s.

    The matrix is symmetric, so :meth:`add` sums only its upper triangle, :data:`HESSIAN_BLOCK`
    rows a product (a 4096-token chunk of a 7B model's 11008-wide input in float32: 1.55 s
    against 2.91 for the whole square; in int8 0.54 s); reading :attr:`matrix` mirrors it into
    the lower one."""

    def __init__(self, in_features: int, device: Optional[torch.device] = None) -> None:
        self._sums: Optional[Tensor] = torch.zeros(in_features, in_features, dtype=torch.float32, device=device)
        self.tokens = 0

    @property
    def matrix(self) -> Optional[Tensor]:
        """The whole symmetric matrix (None once taken)."""
        sums = self._sums
        if sums is not None:
            _mirror_upper(sums)
        return sums

    def take(self) -> Tensor:
        """The matrix, handed over: this Hessian holds it no longer (it can be freed once used)."""
        matrix, self._sums = self.matrix, None
        return matrix

    def add(self, x: Tensor) -> None:
        x = x.reshape(-1, x.shape[-1])
        n = x.shape[1]
        if int8_hessians(x.device):
            self._add_int8(x)  # x in its own dtype: quantized a piece at a time
        else:
            x = x.float()
            for i0 in range(0, n, HESSIAN_BLOCK):
                i1 = min(i0 + HESSIAN_BLOCK, n)
                self._sums[i0:i1, i0:].addmm_(x[:, i0:i1].t(), x[:, i0:])
        self.tokens += x.shape[0]

    def _add_int8(self, x: Tensor) -> None:
        """``x``'s columns quantized to int8 (one scale each, over this chunk's tokens) and their
        Gram matrix summed exactly in int32: the Hessian of those activations, so never
        indefinite (a float product rounded to bfloat16 was)."""
        if x.shape[0] > INT8_GRAM_TOKENS:  # int32 sums of more than this many 127 * 127 could overflow
            for t0 in range(0, x.shape[0], INT8_GRAM_TOKENS):
                self._add_int8(x[t0:t0 + INT8_GRAM_TOKENS])
            return
        n = x.shape[1]
        fused = kernels.kernels_enabled()
        if fused and x.dtype == torch.bfloat16:
            q, scale = kernels.quantize_columns_bf16(x.contiguous())
        else:
            x = x.float()
            scale = torch.maximum(x.amax(dim=0), x.amin(dim=0).neg_()).clamp_(min=1e-30).div_(127)
            q = torch.empty(x.shape, dtype=torch.int8, device=x.device)
            step = max(1, QUANTIZE_VALUES // n)  # rows quantized at once: bounded float temporaries
            for t0 in range(0, x.shape[0], step):
                q[t0:t0 + step] = torch.round(x[t0:t0 + step] / scale)
        for i0 in range(0, n, HESSIAN_BLOCK):
            i1 = min(i0 + HESSIAN_BLOCK, n)
            gram = torch._int_mm(q[:, i0:i1].t(), q[:, i0:])  # a transposed view: as fast as a copy
            if fused:  # one pass: the product's int32 sums scaled into the float32 ones
                kernels.add_scaled_gram(self._sums[i0:i1, i0:], gram, scale[i0:i1], scale[i0:])
            else:
                self._sums[i0:i1, i0:].add_(gram.float().mul_(scale[i0:i1, None]).mul_(scale[None, i0:]))


class InputDrift:
    """The running ``sum x^T (f - x)`` float32 ``[in, in]`` of a linear's inputs ``x`` in the model
    being quantized and ``f``, the float model's inputs for the same tokens (rows are tokens).

    A chunk's product runs in ``x``'s dtype where that is bfloat16 (the matrix units:
    ~1.9 TFLOP/s against float32's 0.35 on the AMX Xeon), rounded to bfloat16 once per chunk
    before it is summed in float32: the sums feed a correction that is itself a fraction of the
    weight's rounding, not a factor that must stay positive definite like :class:`Hessian`'s."""

    def __init__(self, in_features: int, device: Optional[torch.device] = None) -> None:
        self._sums: Optional[Tensor] = torch.zeros(in_features, in_features, dtype=torch.float32, device=device)
        self.tokens = 0

    def add(self, x: Tensor, f: Tensor) -> None:
        n = self._sums.shape[0]
        x, f = x.reshape(-1, n), f.reshape(-1, n)
        if x.shape != f.shape:
            raise ValueError(f"the float model's inputs {tuple(f.shape)} do not match {tuple(x.shape)}")
        dtype = torch.bfloat16 if x.dtype == torch.bfloat16 else torch.float32
        drift = (f.float() - x.float()).to(dtype)  # neither input changed
        x = x.to(dtype)
        for i0 in range(0, n, HESSIAN_BLOCK):
            i1 = min(i0 + HESSIAN_BLOCK, n)
            self._sums[i0:i1].add_(torch.mm(x[:, i0:i1].t(), drift))
        self.tokens += x.shape[0]

    @property
    def sums(self) -> Optional[Tensor]:
        """The sums (None once taken)."""
        return self._sums

    def take(self) -> Tensor:
        """The sums, handed over (this object holds them no longer)."""
        sums, self._sums = self._sums, None
        return sums


def int8_hessians(device: torch.device) -> bool:
    """Whether :meth:`Hessian.add` sums inputs on ``device`` from int8 activations (CPU, where
    :func:`sli.kernels.hessian_int8` says so)."""
    return device.type == "cpu" and kernels.hessian_int8()


@torch.inference_mode()  # the sums may be inference tensors (made in a calibration pass)
def _mirror_upper(sums: Tensor) -> None:
    """``sums``' lower triangle from its upper one, its diagonal blocks made exactly symmetric."""
    n = sums.shape[0]
    for i0 in range(0, n, HESSIAN_BLOCK):
        i1 = min(i0 + HESSIAN_BLOCK, n)
        sums[i0:i1, :i0].copy_(sums[:i0, i0:i1].t())
        block = sums[i0:i1, i0:i1]  # summed whole by one product: symmetric but for rounding
        block.copy_(block.triu() + block.triu(1).t())


def supports(config: QuantizationConfig, weight_shape: Tuple[int, int]) -> bool:
    """Whether GPTQ can write this weight in ``config``'s layout (4-bit blocks must not straddle rows)."""
    if config.has_blocks:
        return weight_shape[1] % int(config.block_size) == 0
    return config.mode == QuantizationMode.INT4


class _Grid:
    """A format's grid, one scale per (row, group of columns in the original order)."""

    def __init__(self, config: QuantizationConfig, weight: Tensor, importance: Tensor) -> None:
        self.config = config
        self.int4 = config.mode == QuantizationMode.INT4
        self.group = int(config.group_size if self.int4 else config.block_size)
        rows, cols = weight.shape
        wg = weight.view(rows, cols // self.group, self.group)
        imp = importance.view(1, cols // self.group, self.group)
        grid = SEARCH_GRID if config.gptq_scale_search else (1.0,)
        step = max(1, _SEARCH_VALUES // cols)  # rows searched at once: bounded temporaries
        if self.int4:
            if _on_kernels(weight):
                factors = torch.tensor(grid, dtype=torch.float32)
                factor = factors[kernels.search_int4_clipping(weight, self.group, importance, factors)]
                self.scale, self.zero = group_params(wg.amin(dim=-1) * factor, wg.amax(dim=-1) * factor)
            else:
                found = [self._search_int4(wg[r:r + step], imp, grid) for r in range(0, rows, step)]
                self.scale = torch.cat([f[0] for f in found])  # fp16
                self.zero = torch.cat([f[1] for f in found])  # float
            self.col_scale = self.scale.float()
        else:
            table = level_table(config.quant_type)  # nearest level by table, bucketize's rule
            self.below, self.next_mid, self.sorted_code = (t.to(weight.device) for t in
                                                           (table.below, table.next_mid, table.sorted_code))
            # raw, before double quant
            if _on_kernels(weight):
                self.absmax = kernels.search_block_maxima(weight, self.group, importance, torch.tensor(grid),
                                                          self.below, self.next_mid, self.sorted_code)
            else:
                self.absmax = torch.cat([self._search_absmax(wg[r:r + step], imp, grid)
                                         for r in range(0, rows, step)])
            codec = codec_for(config.mode)
            stored, state = codec.encode_absmax(self.absmax.reshape(-1), config, weight.device)
            self.col_scale = codec.decoded_absmax(stored, state).view(rows, -1)  # what dequantization reads
            self.zero = None

    # -- the scale search (static groups: from the original weight) --------------------------
    @staticmethod
    def _search_int4(wg: Tensor, imp: Tensor, grid) -> Tuple[Tensor, Tensor]:
        wmin, wmax = wg.amin(dim=-1), wg.amax(dim=-1)
        best_err = best_scale = best_zero = None
        for p in grid:
            scale, zero = group_params(wmin * p, wmax * p)
            s = scale.float().unsqueeze(-1)
            z = zero.unsqueeze(-1)
            dq = (torch.round(wg / s) + z).clamp_(0, 15).sub_(z).mul_(s)
            err = dq.sub_(wg).square_().mul_(imp).sum(dim=-1)
            if best_err is None:
                best_err, best_scale, best_zero = err, scale, zero
            else:
                better = err < best_err
                best_err = torch.where(better, err, best_err)
                best_scale = torch.where(better, scale, best_scale)
                best_zero = torch.where(better, zero, best_zero)
        return best_scale, best_zero

    def _search_absmax(self, wg: Tensor, imp: Tensor, grid) -> Tensor:
        absmax = wg.abs().amax(dim=-1)
        best_err = best = None
        for p in grid:
            a = (absmax * p).clamp(min=1e-38).unsqueeze(-1)
            dq = self._round4(wg / a).mul_(a)
            err = dq.sub_(wg).square_().mul_(imp).sum(dim=-1)
            if best_err is None:
                best_err, best = err, absmax * p
            else:
                better = err < best_err
                best_err = torch.where(better, err, best_err)
                best = torch.where(better, absmax * p, best)
        return best

    def _round4(self, scaled: Tensor) -> Tensor:
        """The nearest code value of each ``scaled``: the count of midpoints below it (bucketize's
        rule, by table: torch's bucketize is a scalar binary search) indexes the sorted code.
        On CPU the numba kernel applies the same rule in one pass over the values."""
        if _on_kernels(scaled):
            return kernels.round_to_levels(scaled, self.below, self.next_mid, self.sorted_code)
        bins = (scaled.clamp(-1, 1) + 1).mul_(LEVEL_BINS / 2).long().clamp_(max=LEVEL_BINS - 1)
        below = self.below[bins]
        return self.sorted_code[below.add_(scaled > self.next_mid[below])]

    # -- one column ----------------------------------------------------------------------------
    def quantize(self, w: Tensor, s: Tensor, z: Optional[Tensor]) -> Tensor:
        """Column ``w`` [rows] on the grid of its rows' scales ``s`` (and zero points ``z``)."""
        if self.int4:
            q = torch.round(w / s).add_(z).clamp_(0, 15)
            return q.sub_(z).mul_(s)
        return self._round4(w / s.clamp(min=1e-38)).mul_(s)

    def finish(self, config: QuantizationConfig, wq: Tensor, rows: slice, source_dtype: torch.dtype) -> QuantizedTensor:
        codec = codec_for(config.mode)
        if self.int4:
            return codec.quantize_with(wq, config, self.scale[rows], self.zero[rows], source_dtype=source_dtype)
        return codec.quantize_with(wq, config, self.absmax[rows].reshape(-1), source_dtype=source_dtype)


def _on_kernels(t: Tensor) -> bool:
    """Whether ``t``'s rounding goes through sli's numba kernels (CPU float32, kernels on)."""
    return t.device.type == "cpu" and t.dtype == torch.float32 and kernels.kernels_enabled()


def _factor(H: Tensor, order: Tensor, diagonal: Tensor, damp: float) -> Tensor:
    """``M^T``, ``M`` the lower Cholesky factor of ``J P J``, where ``P`` is ``H[order][:, order]``
    with ``diagonal`` (in ``H``'s order) on its diagonal plus ``damp·mean(diagonal)``, and ``J``
    the reversal permutation; more damping if ``P`` is not positive definite enough. ``H`` is
    read, not changed; one ``[n, n]`` float32 buffer is made, gathered a slab of rows at a time
    and factored in place (LAPACK reads the symmetric matrix's rows as the columns it factors)."""
    n = H.shape[0]
    mean_diag = float(diagonal.mean())
    reversed_order = order.flip(0)
    work = torch.empty(n, n, dtype=torch.float32, device=H.device)
    info = torch.empty((), dtype=torch.int32, device=H.device)
    for attempt in range(6):
        _gather_square(H, reversed_order, work)
        work.diagonal().copy_(diagonal[reversed_order]).add_(max(damp, 1e-6) * (10 ** attempt) * mean_diag)
        torch.linalg.cholesky_ex(work.mT, out=(work.mT, info))
        if int(info) == 0:
            if attempt:
                logger.info("GPTQ: Hessian needed %.3g dampening", damp * 10 ** attempt)
            return work
    raise RuntimeError("GPTQ: the Hessian is not positive definite even with strong dampening")


def _error_weights(factor: Tensor) -> Tensor:
    """GPTQ's error weights from :func:`_factor`'s ``M^T`` (consumed): with ``R = J M J`` upper
    triangular and ``P = R R^T``, ``U = -R diag(R)^-1`` with a unit diagonal. A column ``k``
    is rounded after ``w_k + sum_{j<k} e_j (-U_jk)`` is added to it, ``e_j`` the rounding errors
    of the original values of the columns before it.

    This is GPTQ in the form of LDLQ (Chee et al., 2023, QuIP, theorem 1): the same codes as the
    paper's update through the Cholesky factor of ``P^-1``, without ``P^-1``. The triangular
    inverse is gone (as much arithmetic as the factor's: 2.3 s of a 7B-shaped layer's solve on
    the AMX Xeon). The reversed memory of ``M^T`` is ``R^T``: each of its rows is divided by
    minus its diagonal entry in place, and the transposed view, ``U`` in LAPACK's column-major
    layout, is returned."""
    _reverse_in_place(factor)  # now R^T
    diagonal = factor.diagonal().clone()
    if not bool(torch.isfinite(diagonal).all()) or bool((diagonal <= 0).any()):
        raise RuntimeError("GPTQ: the Hessian's factor is not positive definite; raise gptq_damp")
    factor.div_(diagonal.neg_()[:, None])
    factor.diagonal().fill_(1.0)
    return factor.mT


def _gather_square(H: Tensor, order: Tensor, out: Tensor, slab_values: int = 1 << 19) -> None:
    """``out = H[order][:, order]``, a slab of rows at a time (temporaries of ``slab_values``)."""
    n = H.shape[0]
    step = max(1, slab_values // n)
    for r0 in range(0, n, step):
        rows = order[r0:r0 + step]
        torch.index_select(H.index_select(0, rows), 1, order, out=out[r0:r0 + rows.numel()])


def _reverse_in_place(t: Tensor, chunk: int = 1 << 19) -> None:
    """Reverse contiguous ``t``'s memory (for a square matrix: rows and columns both reversed)."""
    flat = t.view(-1)
    total = flat.numel()
    for s in range(0, total // 2, chunk):
        e = min(s + chunk, total // 2)
        head, tail = flat[s:e], flat[total - e:total - s]
        saved = head.flip(0)
        head.copy_(tail.flip(0))
        tail.copy_(saved)


def _solve(Wt: Tensor, U: Tensor, grid: _Grid, rows: slice, group_of: Tensor, block: int, original: Tensor,
           order: Tensor) -> None:
    """GPTQ over the columns of ``W`` (its ``rows`` of the grid) in ``order``, in place on ``Wt``
    (``W[:, order]`` transposed: a column is a contiguous row): each becomes its quantized value.
    ``U``: :func:`_error_weights`; ``group_of``: each column's group (int64, solve order);
    ``original``: the slab's rows of ``W`` as they were, whose columns become each block's errors.
    A block of columns is solved by :func:`sli.kernels.gptq_block` on CPU (one call), else by
    :func:`_solve_block`; the columns after it are updated by one matrix product."""
    n = Wt.shape[0]
    scale_t = grid.col_scale[rows].t().contiguous()  # [groups, rows]
    zero_t = grid.zero[rows].t().contiguous() if grid.zero is not None else None
    fused = _on_kernels(Wt)
    groups = group_of.tolist() if not fused else None
    for i1 in range(0, n, block):
        i2 = min(i1 + block, n)
        W1 = Wt[i1:i2]  # a view: updated in place
        Err = original.index_select(1, order[i1:i2]).t().contiguous()  # becomes the block's errors
        if fused:
            kernels.gptq_block(W1, U[i1:i2, i1:i2], Err, group_of[i1:i2], scale_t, zero_t,
                               None if grid.int4 else (grid.below, grid.next_mid, grid.sorted_code))
        else:
            _solve_block(W1, U[i1:i2, i1:i2], Err, groups[i1:i2], grid, scale_t, zero_t)
        if i2 < n:
            Wt[i2:].addmm_(U[i1:i2, i2:].t(), Err, alpha=-1)


def _solve_block(W1: Tensor, U1: Tensor, Err: Tensor, groups: List[int], grid: _Grid, scale_t: Tensor,
                 zero_t: Optional[Tensor]) -> None:
    """:func:`sli.kernels.gptq_block` in torch operations: a column at a time inside
    :data:`_INNER` columns, a matrix product for the block's columns after them."""
    count = W1.shape[0]
    for j1 in range(0, count, _INNER):
        j2 = min(j1 + _INNER, count)
        for j in range(j1, j2):
            w = W1[j]
            g = groups[j]
            q = grid.quantize(w, scale_t[g], zero_t[g] if zero_t is not None else None)
            err = Err[j]
            err.sub_(q)  # the original value's error
            w.copy_(q)
            if j + 1 < j2:
                W1[j + 1:j2].addr_(U1[j, j + 1:j2], err, alpha=-1)
        if j2 < count:
            W1[j2:].addmm_(U1[j1:j2, j2:].t(), Err[j1:j2], alpha=-1)


def gptq_quantize(weights: Dict[str, Tensor], hessian: Union[Tensor, Hessian],
                  config: QuantizationConfig, drift: Union[None, Tensor, InputDrift] = None) -> Dict[str, QuantizedTensor]:
    """GPTQ-quantize linears that read the same inputs (``weights``: name → ``[out, in]``, one
    ``in``) against their inputs' Hessian ``sum x^T x`` (``[in, in]``): a tensor, left as it
    is, or a :class:`Hessian`, whose matrix is taken (:meth:`Hessian.take`) and freed once
    factored, before the solve (a 7B model's ``down_proj`` Hessian: 485 MB). ``drift``: the
    inputs' :class:`InputDrift` (taken likewise) or its sums; with ``config.gptq_asymmetric``
    above 0 each weight is first moved that fraction toward the float model's outputs (the
    module docstring); None or 0: plain GPTQ.

    The Hessian's factor and the column order are computed once for all of them; each weight
    gets its own scales (NF4/FP4: its own double-quantized maxima, as the codec stores them) and is
    solved a slab of rows at a time (rows are independent given ``H``: bounded memory).
    Returns name → the codec's :class:`QuantizedTensor` in ``config``'s layout.
    """
    cols = {w.shape[1] for w in weights.values()}
    if len(cols) != 1:
        raise ValueError(f"weights sharing a Hessian must have one input size, got {sorted(cols)}")
    cols = cols.pop()
    device = next(iter(weights.values())).device
    H = (hessian.take() if isinstance(hessian, Hessian) else hessian).to(device=device, dtype=torch.float32)
    del hessian
    if H.shape != (cols, cols):
        raise ValueError(f"Hessian of shape {tuple(H.shape)} for weights with {cols} input features")
    int4 = config.mode == QuantizationMode.INT4
    group = int(config.group_size if int4 else config.block_size)
    if not int4 and cols % group:
        raise ValueError(f"GPTQ {config.mode.value}: {cols} input features are not whole blocks of {group}")
    padded = -(-cols // group) * group
    alpha = float(config.gptq_asymmetric)
    D = drift.take() if isinstance(drift, InputDrift) else drift
    del drift
    if D is not None and D.shape != (cols, cols):
        raise ValueError(f"input drift of shape {tuple(D.shape)} for weights with {cols} input features")
    if padded != cols:  # INT4 pads each row with zeros; they are dead columns here
        H = torch.nn.functional.pad(H, (0, padded - cols, 0, padded - cols))
    diagonal = torch.diagonal(H).clone()
    dead = diagonal == 0
    diagonal[dead] = 1.0
    if config.gptq_act_order:
        perm = torch.argsort(diagonal, descending=True, stable=True)
    else:
        perm = torch.arange(padded, device=device)
    importance = diagonal.clone()
    importance[dead] = 0.0
    inverse_perm = torch.argsort(perm)
    # The drift's pull on each weight, D W^T, solved through the factor into its correction.
    # Where the weights sharing the input have more rows than it has columns (q/k/v, gate/up),
    # the drift itself is solved once (P^-1 D, [in, in]) and each correction is one product
    # with it; otherwise (o_proj, down_proj) each pull is made before the drift is freed, then
    # solved, one weight at a time. float32: rounded to bfloat16, the unit test's corrections
    # flipped 12-20% of the codes GPTQ chose (its error feedback carries each flip on), against
    # under 1% for float rounding alone
    corrections: Dict[str, Tensor] = {}
    drift_solved = None  # alpha (P^-1 D)^T ([in, padded]) where the drift is solved once
    if D is not None and alpha > 0:
        D = D.to(device=device, dtype=torch.float32)  # read, not changed
        live = ~dead[:cols]
        if cols < sum(w.shape[0] for w in weights.values()):
            drift_solved = torch.nn.functional.pad(D, (0, 0, 0, padded - cols))  # a copy
            drift_solved[:, ~live] = 0.0  # dead columns: no input, no pull
            drift_solved[:cols][~live] = 0.0
        else:
            for name, weight in weights.items():
                pull = D @ (weight.detach().float() * live).t()
                pull[~live] = 0.0
                corrections[name] = torch.nn.functional.pad(pull, (0, 0, 0, padded - cols))
                del pull
    del D
    factor = _factor(H, perm, diagonal, float(config.gptq_damp))
    del H  # the caller's Hessian, when it was handed over: freed before the solve
    for name in corrections:  # each pull replaced by its correction, one at a time
        corrections[name] = _toward_float(corrections[name], factor, perm, inverse_perm, alpha)
    if drift_solved is not None:
        drift_solved = _toward_float(drift_solved, factor, perm, inverse_perm, alpha)
    U = _error_weights(factor)  # a view of the factor's buffer
    del factor
    group_of = perm // group
    slab = max(1, SOLVE_VALUES // padded)
    out: Dict[str, QuantizedTensor] = {}
    for name, weight in weights.items():
        W = weight.detach().float()
        if padded != cols:
            W = torch.nn.functional.pad(W, (0, padded - cols))
        elif W.data_ptr() == weight.data_ptr():
            W = W.clone()
        if name in corrections:
            W.add_(corrections.pop(name))
        elif drift_solved is not None:
            W.addmm_(weight.detach().float(), drift_solved)
        W[:, dead] = 0.0
        grid = _Grid(config, W, importance)
        for r0 in range(0, W.shape[0], slab):
            rows = slice(r0, min(r0 + slab, W.shape[0]))
            Wt = W[rows].index_select(1, perm).t().contiguous()  # [columns in solve order, rows]
            _solve(Wt, U, grid, rows, group_of, int(config.gptq_block_size), W[rows], perm)
            W[rows] = Wt.index_select(0, inverse_perm).t()  # the quantized values, in the original column order
            del Wt
        out[name] = grid.finish(config, W[:, :cols], slice(None), weight.dtype)
        del W
    return out


def _toward_float(pull: Tensor, factor: Tensor, perm: Tensor, inverse_perm: Tensor, alpha: float) -> Tensor:
    """``alpha * (P^-1 pull)^T`` in the original column order (``pull = D W^T``, ``[in, out]``),
    ``P`` the dampened Hessian :func:`_factor` factored (``factor = M^T``, ``J P[perm][:, perm] J
    = M M^T``): two triangular solves in place, ``P^-1 = J M^-T M^-1 J`` in the solve order (the
    reversal ``J`` folded into the gathers), float32."""
    last = perm.numel() - 1
    y = pull.index_select(0, perm.flip(0))  # J P-order
    torch.linalg.solve_triangular(factor.mT, y, upper=False, out=y)
    torch.linalg.solve_triangular(factor, y, upper=True, out=y)
    return y.index_select(0, last - inverse_perm).t().mul_(alpha)


def layer_output_error(x: Tensor, weight: Tensor, qweight: QuantizedTensor) -> float:
    """``||x W^T - x Wq^T||^2 / ||x W^T||^2`` (what GPTQ minimizes, relative)."""
    ref = x.float() @ weight.float().t()
    approx = x.float() @ codec_for(qweight.metadata["codec"]).dequantize(qweight, torch.float32).t()
    return float((ref - approx).square().sum() / ref.square().sum().clamp(min=1e-30))


def group_by_input(inputs: Dict[str, int]) -> List[List[str]]:
    """Linear names grouped by the identity of the input they read (``inputs``: name → id)."""
    groups: Dict[int, List[str]] = {}
    for name, key in inputs.items():
        groups.setdefault(key, []).append(name)
    return list(groups.values())
