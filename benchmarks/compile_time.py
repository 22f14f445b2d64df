"""How long numba takes to compile sli's CPU kernels into an empty cache, and where it goes.

    python benchmarks/compile_time.py [--modes none,int8,int8_dynamic,int4,nf4,fp4,fp8]

A fresh checkout (CI, a new venv, a new SIMD level) compiles every kernel once before numba's
on-disk cache serves them. This runs, in a child process with an empty ``NUMBA_CACHE_DIR``, each
mode's kernel warm-up (what loading a processor does) and then the compiled decode step's, and
prints the seconds each took and the functions numba spent longest compiling (seconds inside a
function's own compile, less the callees compiled from it). ``SLI_SIMD=avx2`` (or ``plain``)
measures another level.
"""
from __future__ import annotations

import argparse
import collections
import os
import subprocess
import sys
import tempfile
import time

MODES = "none,int8,int8_dynamic,int4,nf4,fp4,fp8"


def measure(modes: list, top: int) -> None:
    """In this process (its numba cache already pointed at an empty folder): the compile times."""
    from numba.core import event

    own = collections.defaultdict(float)
    stack: list = []

    class Compiles(event.Listener):
        def on_start(self, e):
            stack.append([time.perf_counter(), 0.0])

        def on_end(self, e):
            start, inner = stack.pop()
            spent = time.perf_counter() - start
            dispatcher = e.data["dispatcher"]
            own[getattr(dispatcher, "py_func", dispatcher).__qualname__] += spent - inner
            if stack:
                stack[-1][1] += spent

    event.register("numba:compile", Compiles())
    start = time.perf_counter()
    from sli import decode_step, kernels
    from sli.quantization import QuantizationConfig
    from sli.quantization.execution import warm_up_kernels

    print(f"SIMD level {kernels.simd_path()}; import {time.perf_counter() - start:.1f} s", flush=True)
    for mode in modes:
        began = time.perf_counter()
        warm_up_kernels([QuantizationConfig(mode=mode)])
        print(f"{mode:14s} {time.perf_counter() - began:6.1f} s", flush=True)
    began = time.perf_counter()
    decode_step.warm_up()
    print(f"{'decode step':14s} {time.perf_counter() - began:6.1f} s")
    print(f"{'in all':14s} {time.perf_counter() - start:6.1f} s\nlongest compiles (own seconds):")
    for name, seconds in sorted(own.items(), key=lambda item: -item[1])[:top]:
        print(f"{seconds:6.1f}  {name}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--modes", default=MODES)
    parser.add_argument("--top", type=int, default=12, help="functions listed")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    modes = args.modes.split(",")
    if args.child:
        measure(modes, args.top)
        return
    with tempfile.TemporaryDirectory(prefix="sli-numba-cache-") as cache:
        env = dict(os.environ, NUMBA_CACHE_DIR=cache)
        command = [sys.executable, __file__, "--child", "--modes", args.modes, "--top", str(args.top)]
        sys.exit(subprocess.run(command, env=env).returncode)


if __name__ == "__main__":
    main()
