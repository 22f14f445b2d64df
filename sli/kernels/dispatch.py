"""Which helpers the kernels are built with, the kernels built once over them, and running a
kernel across threads.

The helpers are chosen at run time by what the CPU has (:func:`simd_path`): AVX-512 or AVX2
numba intrinsics (:mod:`sli.kernels.simd`), else :mod:`sli.kernels.plain`'s numba code.
``SLI_SIMD=avx512|avx2|plain`` asks for a level (capped at what the CPU has), ``SLI_NO_SIMD=1``
for the plain one. numba is imported only when the kernels are first built.
"""
from __future__ import annotations

import contextlib
import functools
import importlib.util
import logging
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Optional

import torch

from .. import settings
from . import team as kernel_team

logger = logging.getLogger(__name__)

SIMD_LEVELS = ("avx512", "avx2", "plain")  # best first

_lock = threading.Lock()
_kernels = None
_helpers = None


def kernels_enabled() -> bool:
    """Whether the numba kernels can be used (numba installed and not turned off)."""
    return not settings.flag("SLI_NO_NUMBA") and _numba_installed()


@functools.lru_cache(maxsize=None)
def _numba_installed() -> bool:
    return importlib.util.find_spec("numba") is not None


def requested_level() -> str:
    """The level ``SLI_SIMD`` / ``SLI_NO_SIMD`` ask for: "auto" (the best the CPU runs) or one
    of :data:`SIMD_LEVELS`."""
    if settings.flag("SLI_NO_SIMD"):
        return "plain"
    asked = os.environ.get("SLI_SIMD", "").strip().lower() or "auto"
    if asked not in SIMD_LEVELS + ("auto",):
        logger.warning("SLI_SIMD=%s is not one of %s; using the best this CPU runs", asked,
                       ", ".join(SIMD_LEVELS + ("auto",)))
        return "auto"
    return asked


def simd_helpers():
    """The helpers the kernels are built with: :mod:`sli.kernels.simd`'s for the best level the
    CPU runs (at most the one asked for), else :mod:`sli.kernels.plain`'s numba ones.

    :mod:`sli.kernels.simd` writes LLVM IR through numba's internals, which a numba release may
    move: a failure to import or build it falls back (with one warning), never breaks the
    kernels.
    """
    asked = requested_level()
    if asked != "plain":
        try:
            from . import simd

            runs = simd.host_levels()
            allowed = SIMD_LEVELS if asked == "auto" else SIMD_LEVELS[SIMD_LEVELS.index(asked):]
            chosen = next((level for level in allowed if level in runs), None)
            if asked != "auto" and chosen != asked:
                logger.warning("SLI_SIMD=%s: this CPU does not run it; using %s", asked, chosen or "plain")
            if chosen is not None:
                return simd.helpers(chosen)
        except Exception as exc:  # ImportError, AttributeError, LLVM errors: numba internals changed
            logger.warning("the SIMD helpers cannot be built against this numba (%s: %s); "
                           "using the plain kernels", type(exc).__name__, exc)
    from . import plain

    return plain.HELPERS


def _build(h) -> dict:
    """Compile (or load from the on-disk cache) the kernels over helpers ``h``; called once, lazily."""
    from . import activations, attention, four_bit, int4, decode_ops, gptq, unpacked
    from .jit import stable_id

    kernels = {}
    for module in (four_bit, unpacked, activations, int4, attention, gptq, decode_ops):
        kernels.update(module.build(h))
    for name, kernel in kernels.items():  # compiled code that calls them (the team's) holds them in closures
        stable_id(kernel, f"kernel.{name}:{h.level}{h.variant}")
    return kernels


def table() -> dict:
    """The kernels by name: numba dispatchers, built on first use."""
    global _kernels, _helpers
    if _kernels is None:
        with _lock:
            if _kernels is None:
                _helpers = simd_helpers()
                _kernels = _build(_helpers)
    return _kernels


def simd_path() -> str:
    """The level the kernels were built with: "avx512", "avx2" or "plain" (builds them)."""
    table()
    return _helpers.level


def variant() -> str:
    """The helpers' variant (``+row`` where a token's products take a weight row a pass:
    :mod:`sli.kernels.simd`; builds them): part of the ids of compiled code that calls the kernels."""
    table()
    return _helpers.variant


def lanes() -> int:
    """How :func:`sli.kernels.lut4_order` groups values for the 4-bit helpers (1: the weight's
    own order)."""
    table()
    return _helpers.lanes


_pool: Optional[ThreadPoolExecutor] = None
INLINE_WORK = settings.DEFAULT_SETTINGS["kernel_inline_work"]  # below: one thread beats the pool
TEAM_WORK = settings.DEFAULT_SETTINGS["kernel_team_work"]  # below: one thread beats the team


_kernel_threads: Optional[int] = None  # set while torch_on_one_thread() holds torch to one


def _threads() -> int:
    return max(1, _kernel_threads or torch.get_num_threads())


@contextlib.contextmanager
def torch_on_one_thread():
    """For a pass whose products are the fused kernels (a token, a few rows): torch's own ops
    on the calling thread alone, the kernels still on ``torch.get_num_threads()`` threads.

    After each of its ops torch's OpenMP workers spin for a while on the cores the kernels'
    threads need; between a layer's many small torch ops (norms, rotary, attention) that
    took ~1/3 of a 7B-shaped model's decode on 2 cores (docs/benchmarks.md). The small ops
    gain nothing from more threads."""
    global _kernel_threads
    threads = torch.get_num_threads()
    if threads <= 1 or _kernel_threads is not None:
        yield
        return
    _kernel_threads = threads
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)
        _kernel_threads = None


def team():
    """The kernel team (:mod:`sli.kernels.team`) for this many threads, or None."""
    kernels = table()  # sets _helpers
    return kernel_team.get(kernels, _helpers.level, _threads(), _helpers.variant)


def run(name: str, count: int, work: int, *args) -> None:
    """Run kernel ``name`` over items ``[0, count)`` split across threads.

    From :data:`TEAM_WORK` multiply-adds on, the kernels the team runs go to it (threads
    that poll for work). Otherwise the kernels release the GIL (``nogil``), so plain Python
    threads of a pool run them in parallel.
    This is used instead of numba's ``parallel=True``: its OpenMP layer fought torch's own
    OpenMP threads here (12 ms per call on a 2-core machine) and its workqueue layer may
    not be entered from two threads at once (the prefetch thread dequantizes while the
    compute thread multiplies).
    """
    global _pool
    kernel = table()[name]
    threads = min(_threads(), count)
    if threads > 1 and work >= TEAM_WORK:
        workers = team()
        if workers is not None and workers.run(name, count, args):
            return
    if threads <= 1 or work < INLINE_WORK:
        kernel(*args, 0, count)
        return
    if _pool is None:
        with _lock:
            if _pool is None:
                _pool = ThreadPoolExecutor(max_workers=_threads(), thread_name_prefix="sli-kernel")
    bounds = [count * i // threads for i in range(threads + 1)]
    futures = [_pool.submit(kernel, *args, bounds[i], bounds[i + 1]) for i in range(1, threads)]
    kernel(*args, bounds[0], bounds[1])  # this thread takes the first share
    for future in futures:
        future.result()
