"""AVX-512 and AVX2 building blocks for the kernels in :mod:`sli.kernels`: the levels this
CPU runs, and the set of helpers each level builds.

numba cannot express a 16-entry table lookup, an int8 dot product or a 512-bit register,
and LLVM does not vectorize the plain loops well here (the 4-bit lookup stays scalar:
2–3 instructions a value). The helpers are numba intrinsics that write the LLVM IR
directly, through llvmlite; callers use them like functions inside ``@njit`` code. Each
multiplies a whole weight row (or a few) by up to ``MAX_ROWS`` activation rows, keeping its
sums in vector registers from the row's first value to its last.

:func:`helpers` builds one set per instruction level, with the same names and arguments
as :mod:`sli.kernels.plain`'s numba functions (:mod:`sli.kernels.simd_float` and
:mod:`sli.kernels.simd_int8` emit them; :mod:`sli.kernels.simd_ir` holds their shared IR):

- ``"avx512"`` (AVX-512 F/BW/DQ/VL/VNNI + FMA; a CPU with AVX-512 but not VNNI takes
  "avx2"): 16 floats a register. A 4-bit code's 16 float
  levels fill one register, so one ``vpermps`` decodes 16 values, no blend;
- ``"avx2"`` (AVX2 + FMA): 8 floats a register; a lookup is two ``vpermps`` (table halves
  0–7 and 8–15) and a blend on the index's bit 3.

The float helpers (``n`` values of each row, a multiple of 64; ``rows`` from 1 to MAX_ROWS
activation rows ``x[xofs + r*stride : ...]``; ``out[r]`` receives row ``r``'s sum):

- ``lut4(packed, pofs, code, scales, sofs, blocksize, x, xofs, n, stride, rows, out)``: a
  4-bit row (``packed[pofs:]``, two values a byte, the first in the high nibble) whose
  value is ``code[nibble] * scales[sofs + block]``. ``x`` is in the order of the level's
  ``lanes`` (:func:`sli.kernels.lut4_order`): each ``2*lanes`` values as the even ones,
  then the odd ones, so that a register of high nibbles meets a register of ``x``;
- ``lut4z(packed, pofs, code, scales, zeros, sofs, blocksize, ...)``: the same with value
  ``(code[nibble] - zeros[sofs + block]) * scales[sofs + block]`` (INT4, ``code`` = 0..15);
- ``dot8(q, qofs, x, xofs, n, stride, rows, out)``: an int8 row times float rows;
- ``dotfp8(q, qofs, ...)``: a float8_e4m3fn row (its bytes), decoded by arithmetic;
- ``dotbf16(w, wofs, ...)``: a bfloat16 row (its bits as uint16) times float rows;
- ``decode64_4bit(packed, pofs, code, scale, out, oofs)``: ``out[oofs:oofs+64] =
  code[nibbles] * scale`` in the weight's order (dequantizing);
- ``half_value(bits)``: a float16's bits as its float32 value (INT4's stored scales).

The int8 helpers ``dot8q``, ``dot4q`` and ``dot4l`` (:mod:`sli.kernels.simd_int8`) meet int8
activation rows; ``dot8q_rows``, ``dot4q_rows``, ``dot4l_rows`` and
``dot8_rows``/``dotfp8_rows``/``dotbf16_rows`` are those helpers for ``weight_rows`` weight rows
by one activation row, ``dot8q_tile``, ``dot4q_tile`` and ``dot4l_tile`` for ``tile_rows`` weight
rows by several.

This module and the three it builds on reach into numba's and llvmlite's internals:
:mod:`sli.kernels.dispatch` imports it inside a guard and uses the plain functions when it
cannot be built, when the CPU lacks the instructions, or when ``SLI_SIMD`` /
``SLI_NO_SIMD`` ask for another level.
"""
from __future__ import annotations

import logging
import os
from types import SimpleNamespace
from typing import Dict, Tuple

from llvmlite import binding

from .simd_float import make_decode64, make_half_value, make_lut4, make_widening_dot, make_widening_dot_rows
from .simd_int8 import (make_dot4l, make_dot4l_row, make_dot4l_rows, make_dot4l_tile, make_dot4q,
                        make_dot4q_rows, make_dot4q_tile, make_dot8q, make_dot8q_row, make_dot8q_rows, make_dot8q_tile)
from .plain import TILE_WEIGHT_ROWS, WEIGHT_ROWS
from .simd_ir import LEVELS, MAX_ROWS, NEEDS, WIDTH

logger = logging.getLogger(__name__)


def host_levels() -> Tuple[str, ...]:
    """The levels this CPU runs and numba compiles for, best first.

    numba compiles for the host unless ``NUMBA_CPU_NAME`` names another CPU. Then the levels
    are those its ``NUMBA_CPU_FEATURES`` list (``+avx2,+fma``; the features a name implies are
    not known here) and this CPU runs, and none without the list. So
    ``NUMBA_CPU_NAME=haswell NUMBA_CPU_FEATURES=+avx,+avx2,+fma,+f16c SLI_SIMD=avx2`` builds the
    AVX2 level as an AVX2-only CPU runs it (16 registers, no AVX-512 encodings), which
    ``SLI_SIMD=avx2`` alone on an AVX-512 CPU does not."""
    host = binding.get_host_cpu_features()
    runs = [level for level in LEVELS if all(host.get(name) for name in NEEDS[level])]
    if os.environ.get("NUMBA_CPU_NAME", "host") == "host":
        return tuple(runs)
    listed = {part.strip()[1:] for part in os.environ.get("NUMBA_CPU_FEATURES", "").split(",")
              if part.strip().startswith("+")}
    return tuple(level for level in runs if set(NEEDS[level]) <= listed)


def token_pass_rows() -> int:
    """Weight rows a pass of a token's INT8 and NF4/FP4 products: 1, a row after another with
    no software prefetch (``dot8q_row``, ``dot4l_row``), or :data:`WEIGHT_ROWS` (4) with it.

    Measured from RAM (docs/benchmarks.md): on AMD Zen 4 one row a pass is ~1.1-1.2x faster
    (its prefetchers follow one stream a thread; four rows are four streams, and prefetch
    instructions only add to them); on the Intel Xeon VMs software prefetch was what took
    INT8 from 15 to 19 GB/s (their hardware prefetchers restart at each 4 KB page), and on an
    AMD Zen 3 (AVX2 only) four rows with it were ~1.1-1.2x faster too. So Zen 4 and later
    (LLVM's host name ``znver4`` on) take one row a pass, others four.
    ``SLI_TOKEN_PASS_ROWS=1|4`` forces either."""
    asked = os.environ.get("SLI_TOKEN_PASS_ROWS", "").strip()
    if asked in ("1", str(WEIGHT_ROWS)):
        return int(asked)
    if asked:
        logger.warning("SLI_TOKEN_PASS_ROWS=%s is not 1 or %d; choosing by the CPU", asked, WEIGHT_ROWS)
    return 1 if zen_generation(binding.get_host_cpu_name()) >= 4 else WEIGHT_ROWS


def zen_generation(cpu_name: str) -> int:
    """The AMD Zen generation LLVM's CPU name ``znverN`` gives (``znver3``: 3), 0 for any other CPU."""
    digits = cpu_name[len("znver"):] if cpu_name.startswith("znver") else ""
    return int(digits) if digits.isdigit() else 0


_built: Dict[str, SimpleNamespace] = {}


def helpers(level: str) -> SimpleNamespace:
    """The helpers of ``level`` ("avx512" or "avx2"), built once."""
    if level not in _built:
        row_passes = token_pass_rows() == 1
        _built[level] = SimpleNamespace(
            level=level, lanes=WIDTH[level], max_rows=MAX_ROWS[level], weight_rows=WEIGHT_ROWS,
            lut4=make_lut4(level, "scale"), lut4z=make_lut4(level, "affine"),
            dot8=make_widening_dot(level, "int8"), dotfp8=make_widening_dot(level, "fp8"),
            dotbf16=make_widening_dot(level, "bf16"), dot8_rows=make_widening_dot_rows(level, "int8"),
            dotfp8_rows=make_widening_dot_rows(level, "fp8"), dotbf16_rows=make_widening_dot_rows(level, "bf16"),
            decode64_4bit=make_decode64(level), half_value=make_half_value(level),
            dot8q=make_dot8q(level), dot8q_rows=make_dot8q_rows(level), dot8q_row=make_dot8q_row(level),
            dot8q_tile=make_dot8q_tile(level), tile_rows=TILE_WEIGHT_ROWS,
            dot4q=make_dot4q(level), dot4q_rows=make_dot4q_rows(level),
            dot4q_tile=make_dot4q_tile(level), dot4l=make_dot4l(level), dot4l_rows=make_dot4l_rows(level),
            dot4l_row=make_dot4l_row(level), dot4l_tile=make_dot4l_tile(level), row_passes=row_passes,
            variant="+row" if row_passes else "")
    return _built[level]
