"""Which dtype a prompt's matrix products run in on CPU: bfloat16 on the CPU's matrix units
where it has them, else float32.

A prompt multiplies many activation rows by each weight, so it is bound by arithmetic, not by
memory. On a CPU with AMX tiles (or AVX-512 BF16's dot products) oneDNN, through ``torch.mm``,
multiplies bfloat16 several times faster than float32 (docs/benchmarks.md); elsewhere
bfloat16 is emulated and slower. The choice is made once per process from what the CPU has,
logged once; ``SLI_PROMPT_DTYPE=float32|bfloat16`` forces either (the tests run both).
"""
from __future__ import annotations

import functools
import logging
import os
from typing import Optional

import torch

from .dispatch import run as run_kernel

logger = logging.getLogger(__name__)

PROMPT_DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32}

_chosen: Optional[torch.dtype] = None


@functools.lru_cache(maxsize=None)
def _warn_unknown(variable: str, value: str, known: str, chooser: str = "the CPU") -> None:
    """One warning per unknown value of a switch (the switches are read on every product)."""
    logger.warning("%s=%s is not one of %s; choosing by %s", variable, value, known, chooser)


@functools.lru_cache(maxsize=1)
def matrix_units() -> str:
    """What bfloat16 matrix hardware this CPU has: "amx", "avx512-bf16" or "" (none)."""
    cpu = getattr(torch, "cpu", None)
    if cpu is not None and getattr(cpu, "_is_amx_tile_supported", lambda: False)():
        return "amx"
    if cpu is not None and getattr(cpu, "_is_avx512_bf16_supported", lambda: False)():
        return "avx512-bf16"
    return ""


@functools.lru_cache(maxsize=1)
def int8_units() -> str:
    """What int8 matrix hardware this CPU has: "amx", "avx512-vnni" or "" (none)."""
    if matrix_units() == "amx":
        return "amx"
    cpu = getattr(torch, "cpu", None)
    if cpu is not None and getattr(cpu, "_is_vnni_supported", lambda: False)():
        return "avx512-vnni"
    return ""


def prompt_dtype() -> torch.dtype:
    """bfloat16 where the CPU multiplies it in hardware, else float32; ``SLI_PROMPT_DTYPE``
    forces one. Read from the environment every call (cheap), logged the first time."""
    global _chosen
    asked = os.environ.get("SLI_PROMPT_DTYPE", "").strip().lower()
    if asked in PROMPT_DTYPES:
        dtype, why = PROMPT_DTYPES[asked], f"SLI_PROMPT_DTYPE={asked}"
    else:
        if asked:
            _warn_unknown("SLI_PROMPT_DTYPE", asked, ", ".join(PROMPT_DTYPES))
        units = matrix_units()
        dtype = torch.bfloat16 if units else torch.float32
        why = f"this CPU has {units}" if units else "this CPU has no AMX or AVX-512 BF16"
    if dtype != _chosen:
        _chosen = dtype
        logger.info("prompt matrix products in %s (%s)", str(dtype).replace("torch.", ""), why)
    return dtype


# From this many activation rows on, on a CPU with AMX, an INT8 weight meets int8 activations
# in ``torch._int_mm`` (oneDNN's int8 tiles) instead of sli's kernels: even with them at 16
# rows, 5x them (and 5x the float32 prompt path) at 24-32, 1.3-2x at 64-512 with random
# activations, whose kept values fall in many columns (docs/benchmarks.md); below 16 rows,
# sli's kernels are faster. On AVX-512 VNNI without AMX (the Zen 4) oneDNN's int8 product is
# 1.7-1.8x sli's path at 32-128 rows and 2x its own bfloat16 one. A decode batch (up to 16 rows,
# FUSED_MAX_TOKENS) stays in sli's kernels, where each row's values are those it gets alone;
# oneDNN's float epilogue is not.
INT8_MATRIX_ROWS = 17


def int8_matrix_rows() -> int:
    """The row count from which INT8 products run in ``torch._int_mm``; 0: never.
    ``SLI_INT8_MATMUL=torch`` uses it from :data:`INT8_MATRIX_ROWS` rows on any CPU (oneDNN
    has an int8 path for AVX2 too), ``=numba`` never; by default on AMX or AVX-512 VNNI."""
    asked = os.environ.get("SLI_INT8_MATMUL", "").strip().lower()
    if asked not in ("", "torch", "numba"):
        _warn_unknown("SLI_INT8_MATMUL", asked, "torch, numba")
    if asked == "numba" or not hasattr(torch, "_int_mm"):
        return 0
    units = int8_units()
    rows = INT8_MATRIX_ROWS if asked == "torch" or units else 0
    _log_int8_choice(rows, asked, units)
    return rows


@functools.lru_cache(maxsize=None)
def _log_int8_choice(rows: int, asked: str, units: str) -> None:
    """Said once a choice (the switch is read on every product)."""
    where = f"torch._int_mm from {rows} rows" if rows else "sli's kernels"
    why = f"SLI_INT8_MATMUL={asked}" if asked else f"this CPU has {units or 'no AMX or VNNI'}"
    logger.info("INT8 prompt products in %s (%s)", where, why)


HESSIAN_DTYPES = ("int8", "float32")


def hessian_int8() -> bool:
    """Whether calibration sums its Hessians ``xᵀx`` from int8 activations in
    ``torch._int_mm`` (:class:`sli.quantization.gptq.Hessian`): by default where INT8 products
    run there (AMX or AVX-512 VNNI; ``SLI_INT8_MATMUL``), else float32;
    ``SLI_HESSIAN_DTYPE=int8|float32`` asks for either."""
    asked = os.environ.get("SLI_HESSIAN_DTYPE", "").strip().lower()
    if asked not in ("",) + HESSIAN_DTYPES:
        _warn_unknown("SLI_HESSIAN_DTYPE", asked, ", ".join(HESSIAN_DTYPES))
        asked = ""
    int8 = hasattr(torch, "_int_mm") and (asked == "int8" or (not asked and int8_matrix_rows() > 0))
    _log_hessian_choice(int8, asked)
    return int8


@functools.lru_cache(maxsize=None)
def _log_hessian_choice(int8: bool, asked: str) -> None:
    why = f"SLI_HESSIAN_DTYPE={asked}" if asked else ("INT8 products in torch._int_mm" if int8 else "no int8 matrix units")
    logger.info("calibration Hessians from %s activations (%s)", "int8" if int8 else "float32", why)


def int_mm_int8(xq: torch.Tensor, xs: torch.Tensor, oidx: torch.Tensor, oval: torch.Tensor,
                q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """``x @ (q * scale[:, None])^T`` as float32 ``[T, out]``, ``x`` given as int8 rows ``xq``
    ``[T, in]`` with a scale ``xs`` ``[T]`` each and, per row, values kept in float (``oval`` at
    columns ``oidx``, zero in ``xq``; :func:`sli.kernels.quantize_rows`' output). The integer
    part is exact; the kept values meet their weight entries in float32 (:func:`add_kept`)."""
    y = torch._int_mm(xq, q.t()).float()
    y *= xs.view(-1, 1)
    if oidx.shape[1]:
        add_kept(y, oidx, oval, q)
    y *= scale.view(1, -1)
    return y


# The values kept in float, when they fall in few distinct columns (a trained model's outlier
# features), meet those columns gathered as float32, this many at a time: a bounded buffer.
KEPT_COLUMNS_AT_ONCE = 256


def add_kept(y: torch.Tensor, oidx: torch.Tensor, oval: torch.Tensor, q: torch.Tensor) -> None:
    """``y[t] += sum_j oval[t, j] * q[:, oidx[t, j]]`` in float32, the cheaper of two ways
    (:func:`kept_pairwise`): few distinct columns (a trained model: a few dozen over a 512-row
    prompt) are gathered and meet a dense ``[T, columns]`` matrix in BLAS; many (a random
    model: every row its own) go pair by pair through sli's ``kept_products`` kernel, which reads
    each weight row once instead of gathering the weight's columns again per block."""
    columns, where = torch.unique(oidx, return_inverse=True)
    if kept_pairwise(oidx.numel(), columns.numel()):
        _add_kept_pairs(y, oidx, oval, q)
    else:
        _add_kept_columns(y, columns, where, oval, q)


def _add_kept_pairs(y: torch.Tensor, oidx: torch.Tensor, oval: torch.Tensor, q: torch.Tensor) -> None:
    order = torch.argsort(oidx.reshape(-1), stable=True)  # the (row, column, value) pairs by column
    owners = torch.div(order, oidx.shape[1], rounding_mode="floor")
    kept = torch.empty(q.shape[0], y.shape[0], dtype=torch.float32)  # [out, T]: a weight row's sums together
    run_kernel("kept_products", q.shape[0], q.shape[0] * oidx.numel(), q.reshape(-1).numpy(),
               oidx.reshape(-1)[order].numpy(), owners.numpy(), oval.reshape(-1)[order].contiguous().numpy(),
               kept.numpy())
    y += kept.t()


def _add_kept_columns(y: torch.Tensor, columns: torch.Tensor, where: torch.Tensor, oval: torch.Tensor,
                      q: torch.Tensor) -> None:
    dense = torch.zeros(y.shape[0], columns.numel(), dtype=torch.float32)
    dense.scatter_add_(1, where, oval)
    for first in range(0, columns.numel(), KEPT_COLUMNS_AT_ONCE):
        last = min(columns.numel(), first + KEPT_COLUMNS_AT_ONCE)
        y += dense[:, first:last] @ q[:, columns[first:last]].float().t()


def kept_pairwise(pairs: int, columns: int) -> bool:
    """Whether the kept values' ``pairs`` go one by one (``kept_products``) rather than through
    their ``columns`` gathered: one by one when the columns are at least a fifth of the pairs.
    Measured on 2 cores of an AMD Zen 4 (docs/benchmarks.md: 7B and SmolLM2 shapes, 128 and 512
    rows), where the two cross between a tenth and a quarter. ``SLI_KEPT_PAIRWISE=1|0`` forces
    either."""
    forced = os.environ.get("SLI_KEPT_PAIRWISE", "").strip()
    if forced in ("0", "1"):
        return forced == "1"
    if forced:
        _warn_unknown("SLI_KEPT_PAIRWISE", forced, "1, 0", "the product's sizes")
    return 5 * columns >= pairs
