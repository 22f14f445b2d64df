"""sli's defaults and the environment variables that change them, in one place.

Every tunable that more than one module reads lives here, with its unit. Figures measured
on a particular machine belong in docs/benchmarks.md; the comments here keep the rule.
"""
from __future__ import annotations

import os
from pathlib import Path

GB = 1024**3
MB = 1024**2

DEFAULT_SETTINGS = {
    # -- the layer cache ------------------------------------------------------------------
    "max_cache_size_gb": 50.0,  # disk tier size limit, GiB
    # memory tier size when not given: this share of the memory free to sli (sli.page_cache.memory_available)
    "memory_fraction": 0.10,
    "temporary_max_age_s": 3600.0,  # a temporary file older than this is a killed writer's leftover
    # A file whose checksum passed is not hashed again by this process while its identity
    # (device, inode, size, mtime) is unchanged, but only once its mtime is this much older
    # than the check: a write within the file system's timestamp granularity could otherwise
    # leave the mtime as it was (git's "racy clean" rule). Seconds.
    "racy_mtime_s": 2.0,
    # -- CPU execution ----------------------------------------------------------------------
    # Up to this many activation rows a linear runs through the fused kernels (they read the
    # packed bytes once); above it dequantize-then-BLAS wins (see docs/benchmarks.md).
    "fused_max_tokens": 16,
    # A prompt's linear dequantizes this many bytes (float32) of its weight at a time: small
    # enough to stay in the last-level cache while BLAS multiplies it, big enough for BLAS.
    "prompt_chunk_bytes": 8 * MB,
    # The same in bfloat16 on the matrix units (AMX): oneDNN's set-up per product makes
    # small chunks slow there, so a few large ones (see docs/benchmarks.md).
    "prompt_chunk_bytes_bf16": 32 * MB,
    # What the numba kernels' runtime adds to a process's peak RSS (import, loading or
    # compiling a mode's kernels); the memory plan reserves it. Bytes.
    "kernel_runtime_bytes": 160 * MB,
    # Below this many multiply-adds a kernel runs on the calling thread alone.
    "kernel_inline_work": 1 << 20,
    # The same with the kernel team (sli.kernels.team: threads that poll, no wake-up): products
    # from this many multiply-adds split across it.
    "kernel_team_work": 1 << 15,
    # Weights smaller than this many values quantize to 4 bits eagerly (a compile costs seconds).
    "compile_min_numel": 1 << 20,
    # Calibration passes over chunks of this many hidden-state values or more run compiled
    # (torch.compile fuses a layer's norms, rotary and activation; ~3 s to compile once a process,
    # ~20 s the first time on a machine).
    "calibration_compile_min_values": 1 << 22,
}

# Environment variables sli reads (all optional):
#   SLI_HOME        root of sli's files (default ~/.cache/sli): models/, layer-cache/
#   SLI_CACHE_DIR   the layer cache directory (default $SLI_HOME/layer-cache)
#   SLI_NO_NUMBA=1  no numba kernels: every linear dequantizes and uses torch
#   SLI_NO_SIMD=1   the plain numba kernels, not the SIMD ones (what a CPU without AVX2 runs)
#   SLI_SIMD=avx512|avx2|plain  the kernels' SIMD level (default: the best the CPU runs; capped at it)
#   SLI_TOKEN_PASS_ROWS=1|4  a token's INT8 and NF4/FP4 products a weight row a pass without software
#                   prefetch, or four rows a pass with it (default: 1 on AMD Zen 4 and later, 4 elsewhere)
#   SLI_FLOAT_ACTIVATIONS=1  INT8/INT4/NF4/FP4 kernels keep float activations at every row count
#                   (default: int8 activations from 1 row on; sli.kernels.INT8_ACTIVATION_ROWS, INT8_LEVELS_ROWS)
#   SLI_PROMPT_DTYPE=bfloat16|float32  a prompt's matrix products (default: bfloat16 where the CPU
#                   has AMX or AVX-512 BF16, else float32; NONE always float32)
#   SLI_INT8_MATMUL=torch|numba  INT8 products of 17 rows or more in torch._int_mm (oneDNN's int8
#                   tiles) or in sli's kernels (default: torch._int_mm on a CPU with AMX or AVX-512 VNNI)
#   SLI_HESSIAN_DTYPE=int8|float32  calibration's Hessians x^T x from int8 activations in
#                   torch._int_mm or in float32 (default: int8 where INT8 products run in torch._int_mm)
#   SLI_SIMD=avx2 with NUMBA_CPU_NAME=haswell NUMBA_CPU_FEATURES=+avx,+avx2,+fma,+f16c  the AVX2
#                   level built as an AVX2-only CPU runs it (sli.kernels.simd.host_levels)
#   SLI_KEPT_PAIRWISE=1|0  there, the values rows keep in float meet the weight pair by pair
#                   (sli's kept_products) or through their gathered columns (default: the cheaper
#                   by sli.kernels.matrix_units.kept_pairwise: many distinct columns, pair by pair)
#   SLI_NO_COMPILE=1  no torch.compile: the 4-bit quantizer's eager path (same bytes) and
#                   calibration's passes in eager modules (sli.calibration.layer_inputs.compiled)
#   SLI_NO_TEAM=1   kernels split across threads through a pool of sleeping threads, not the
#                   polling kernel team (sli.kernels.team)
#   SLI_NO_DECODE_STEP=1  a decode token runs transformers' modules layer by layer, not sli's
#                   one-token step for Llama-family layers (sli.decode_step)
#   SLI_NO_ONE_CALL=1  that step op by op from Python, not as one compiled call a layer
#                   (sli.kernels.layer_step); also turns the next one off
#   SLI_NO_RESIDENT_DECODE=1  a decode token over all-resident layers through the model's
#                   forward, not sli's token path (sli.resident_decode)
#   SLI_NO_DIRECT_READ=1  the streamed layers the page cache has no room for are read into the
#                   page cache and mapped, not read past it into reused buffers (O_DIRECT,
#                   sli.cache_disk.read_direct)


def flag(name: str) -> bool:
    """True when the environment variable ``name`` is set to anything but "" or "0"."""
    return os.environ.get(name, "") not in ("", "0")


def sli_home() -> Path:
    """``$SLI_HOME``, else ``~/.cache/sli``."""
    return Path(os.environ.get("SLI_HOME", Path.home() / ".cache" / "sli")).expanduser()


def default_cache_dir() -> Path:
    """``$SLI_CACHE_DIR``, else ``$SLI_HOME/layer-cache``."""
    if os.environ.get("SLI_CACHE_DIR"):
        return Path(os.environ["SLI_CACHE_DIR"]).expanduser()
    return sli_home() / "layer-cache"
