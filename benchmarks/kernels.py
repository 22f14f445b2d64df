"""Fused CPU kernels vs dequantize-then-BLAS, one Llama-2-7B feed-forward weight.

Run: .venv/bin/python benchmarks/kernels.py [--repeats 7] [--shape 11008 4096] [--modes nf4 int8]
     [--rows 1 4 16] [--no-dequantize] [--threads N] [--stat median|min] [--block-size 32] [--torch-ops]
     [--compare-paths] [--fused-vs-dequantized] [--from-ram N]

For each mode, the time of ``sli.quantization.execution.linear(q, x)`` (what a streamed
layer's linear does) for 1, 4 and 16 activation rows — the fused kernel path (sli.kernels) —
beside, in the same run: the float32 ``F.linear`` with the weight already dequantized (the
compute floor: what a fully loaded float32 model pays), and dequantize-into-a-reused-buffer
+ ``F.linear`` (what a streamed layer would pay without the kernels). Median of --repeats
after a warm-up call (``--stat min``: the fastest, the least disturbed on a shared machine), the
float32 floor measured right before each mode's kernels. The SIMD level is the CPU's best
unless ``SLI_SIMD=avx512|avx2|plain`` asks for another one. ``--torch-ops`` adds torch's own
quantized CPU products (``_weight_int8pack_mm``, ``_weight_int4pack_mm_for_cpu``, group 128).
Rows above 16 are a prompt's (bfloat16 on a CPU with AMX or AVX-512 BF16, INT8 in
``torch._int_mm`` on AMX); ``--compare-paths`` times them again with those paths off.
``--fused-vs-dequantized`` times, per row count, the fused kernel against the path a prompt
takes without it (dequantize in chunks into a reused scratch buffer, then a matrix product):
where each codec's ``fused_max_rows`` comes from.
``--from-ram N`` times one row through N distinct copies of each weight instead (past the
last-level cache) against a 1 GiB float32 read (``torch.sum`` or a numba loop, the faster): how
far each kernel is from the memory floor, the read timed again before each mode in each of
``--floor-rounds`` rounds (a warning names the N that clears twice the last-level cache; the
2-core Xeons here report 480 MiB of L3).
"""
import argparse
import contextlib
import datetime
import os
import statistics
import time
from pathlib import Path

import torch

from sli import kernels
from sli.quantization import QuantizationConfig, codec_for
from sli.quantization.execution import linear

MODES = ["none", "int8", "int8_dynamic", "nf4", "fp4", "int4", "fp8"]


STAT = statistics.median
BLOCK_SIZE = QuantizationConfig.block_size  # --block-size: NF4/FP4's values a block maximum
GROUP_SIZE = QuantizationConfig.group_size  # --group-size: INT4's values a group


def config_of(mode: str) -> QuantizationConfig:
    return QuantizationConfig(mode=mode, block_size=BLOCK_SIZE if mode in ("nf4", "fp4") else 64,
                              group_size=GROUP_SIZE)


def median_ms(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return 1e3 * STAT(times)


def torch_ops(weight: torch.Tensor, xs: dict, repeats: int) -> str:
    """torch's int8 (per row) and int4 (group 128, asymmetric) packed CPU products, ms per row count."""
    w = weight.float()
    out_f, in_f = w.shape
    scale = w.abs().amax(1) / 127
    q8 = torch.round(w / scale[:, None]).to(torch.int8)
    g = 128
    wg = w.view(out_f, in_f // g, g)
    low, high = wg.amin(-1), wg.amax(-1)
    step = ((high - low) / 15).clamp(min=1e-8)
    q4 = torch.clamp(torch.round((wg - low[..., None]) / step[..., None]), 0, 15).to(torch.int32).view(out_f, in_f)
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q4, 8)
    scales_zeros = torch.stack([step, low + 8 * step], -1).transpose(0, 1).contiguous()  # w = (q - 8) * s + z
    cells = []
    for r, x in xs.items():
        i8 = median_ms(lambda: torch.ops.aten._weight_int8pack_mm(x, q8, scale), repeats)
        i4 = median_ms(lambda: torch.ops.aten._weight_int4pack_mm_for_cpu(x, packed, g, scales_zeros), repeats)
        cells.append(f"{r} row{'s' if r > 1 else ''}: _weight_int8pack_mm {i8:.1f} ms, _weight_int4pack_mm_for_cpu {i4:.1f} ms")
    return "; ".join(cells)


@contextlib.contextmanager
def forced_env(**values):
    """Environment variables set for the block, restored after."""
    before = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in before.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _numba_read():
    """A float32 sum in a numba loop, split across the threads, as a second reader of the floor:
    ``torch.sum`` alone read slower than sli's INT8 kernel reads its weight (docs/benchmarks.md)."""
    import numba
    import numpy as np

    @numba.njit(parallel=True, fastmath=True)
    def read(values):
        parts = numba.get_num_threads()
        step = values.shape[0] // parts
        sums = np.zeros(parts, np.float32)
        for p in numba.prange(parts):
            total = np.float32(0.0)
            for i in range(p * step, (p + 1) * step):
                total += values[i]
            sums[p] = total
        return sums.sum()

    return read


def from_ram(weight: torch.Tensor, modes, copies: int, repeats: int, rounds: int = 1) -> None:
    """1 row times ``copies`` distinct copies of each mode's weight (so they come from RAM, not
    the last-level cache), against the time a 1 GiB float32 read takes for the same bytes (the
    faster of ``torch.sum`` and a numba loop).

    The read is timed again right before each mode's kernel, ``rounds`` times over: the machine's
    bandwidth moves 1.5x within minutes, so each ratio pairs two timings seconds apart, and the
    median of the rounds' ratios is the figure."""
    import numba

    big = torch.ones(256 * 1024 * 1024, dtype=torch.float32)
    numba_read = _numba_read()
    array = big.numpy()
    threads = torch.get_num_threads()  # the kernels' threads (--threads): the readers take as many

    def floor_bytes_per_s() -> float:  # the faster of two readers: torch.sum and a numba loop
        numba.set_num_threads(min(threads, numba.config.NUMBA_NUM_THREADS))
        fastest = min(median_ms(lambda: big.sum(), repeats), median_ms(lambda: numba_read(array), repeats))
        # numba's OpenMP layer sets OpenMP's thread count, which torch and so sli's kernels read:
        # without this, --threads 1 timed the kernels on every core after the first read
        torch.set_num_threads(threads)
        return big.numel() * 4 / (fastest / 1e3)

    x = torch.randn(1, weight.shape[1])
    prepared = {}
    for mode in modes:
        codec = codec_for(mode)
        q0 = codec.quantize(weight, config_of(mode))
        qs = [codec.prepare(type(q0)({k: v.clone() for k, v in q0.tensors.items()}, dict(q0.metadata)))
              for _ in range(copies)]
        nbytes = sum(v.numel() * v.element_size() for k, v in qs[0].tensors.items() if not k.startswith("_"))
        prepared[mode] = (qs, nbytes, codec.prepare_input(x))
    l3 = last_level_cache_bytes()
    smallest = min(nbytes for _, nbytes, _ in prepared.values()) * copies
    if l3 and smallest < 2 * l3:
        print(f"warning: {copies} copies of the smallest weight are {smallest / 2**20:.0f} MiB, under twice the "
              f"{l3 / 2**20:.0f} MiB last-level cache: raise --from-ram to {-(-2 * l3 * copies // smallest)} "
              "for a read from RAM")
    print(f"{copies} copies of each weight; the memory read floor (1 GiB float32 sum, torch's or numba's, "
          f"the faster) timed before each mode, {rounds} round(s)")
    print()
    print("| mode | ms per weight | GB/s | read floor GB/s | ÷ read floor, each round | median ÷ floor |")
    print("|---|---|---|---|---|---|")
    ratios = {mode: [] for mode in modes}
    last = {}
    for _ in range(rounds):
        for mode in modes:
            qs, nbytes, xq = prepared[mode]
            floor = floor_bytes_per_s()
            per = median_ms(lambda: [linear(q, xq) for q in qs], repeats) / copies
            ratios[mode].append(per / (nbytes / floor * 1e3))
            last[mode] = (per, nbytes, floor)
    for mode in modes:
        per, nbytes, floor = last[mode]
        each = " / ".join(f"{r:.2f}x" for r in ratios[mode])
        print(f"| {mode} | {per:.2f} | {nbytes / per / 1e6:.1f} | {floor / 1e9:.1f} | {each} | "
              f"**{statistics.median(ratios[mode]):.2f}x** |", flush=True)


def fused_vs_dequantized(weight: torch.Tensor, modes, rows, repeats: int) -> None:
    """Per mode and row count: ``fused_linear`` ms against :func:`linear` with the fused kernels
    (and INT8's ``torch._int_mm``) off, into one reused scratch buffer as a pass's linears have."""
    from unittest import mock

    from sli.quantization import execution

    g = torch.Generator().manual_seed(1)
    print("| mode (fused_max_rows) | " + " | ".join(f"{r} rows: fused / dequantized ms" for r in rows) + " |")
    print("|---" * (len(rows) + 1) + "|")
    for mode in modes:
        codec = codec_for(mode)
        q = codec.prepare(codec.quantize(weight, config_of(mode)))
        scratch = execution.WeightScratch()
        cells = []
        for r in rows:
            x = codec.prepare_input(torch.randn(r, weight.shape[1], generator=g))
            fused = median_ms(lambda: codec.fused_linear(q, x, None), repeats)
            with mock.patch.object(kernels, "use_fused", lambda *a, **k: False), \
                    mock.patch.object(execution, "_int8_on_matrix_units", lambda *a, **k: False):
                dequantized = median_ms(lambda: linear(q, x, scratch=scratch), repeats)
            cells.append(f"{fused:.1f} / {dequantized:.1f} ({fused / dequantized:.2f}x)")
        print(f"| {mode} ({codec.fused_max_rows or kernels.FUSED_MAX_TOKENS}) | " + " | ".join(cells) + " |",
              flush=True)


def last_level_cache_bytes() -> int:
    """The largest CPU cache's size in bytes (sysfs), or 0 when it cannot be read."""
    sizes = []
    for path in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*/size"):
        text = path.read_text().strip()
        unit = {"K": 2**10, "M": 2**20, "G": 2**30}.get(text[-1:], 1)
        sizes.append(int(text.rstrip("KMG")) * unit)
    return max(sizes, default=0)


def _level() -> str:
    level = getattr(kernels, "simd_path", None) or getattr(kernels, "four_bit_path")  # the name before 2026-12
    name = level()
    helpers = kernels.dispatch.simd_helpers() if hasattr(kernels, "dispatch") else None
    if getattr(helpers, "row_passes", None) is not None:  # since 2026-12-04: SLI_TOKEN_PASS_ROWS
        name += f" (a token's products {1 if helpers.row_passes else helpers.weight_rows} weight row(s) a pass)"
    return name


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown CPU"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--shape", type=int, nargs=2, default=[11008, 4096], metavar=("OUT", "IN"))
    ap.add_argument("--modes", nargs="+", default=MODES, choices=MODES)
    ap.add_argument("--rows", type=int, nargs="+", default=[1, 4, 16])
    ap.add_argument("--no-dequantize", action="store_true", help="skip the dequantize columns (faster)")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (the kernels use as many)")
    ap.add_argument("--stat", choices=["median", "min"], default="median")
    ap.add_argument("--block-size", type=int, default=QuantizationConfig.block_size,
                    help="NF4/FP4 values a block maximum (32 to 4096)")
    ap.add_argument("--group-size", type=int, default=QuantizationConfig.group_size,
                    help="INT4 values a group (even)")
    ap.add_argument("--torch-ops", action="store_true", help="also time torch's int8/int4 packed products")
    ap.add_argument("--from-ram", type=int, default=0, metavar="N",
                    help="instead: 1 row through N distinct copies of each mode's weight (past the L3 cache), "
                         "beside a 1 GiB float32 read: each kernel's GB/s and its time over the memory floor")
    ap.add_argument("--floor-rounds", type=int, default=5, metavar="K",
                    help="with --from-ram: K rounds, the read floor timed again before each mode's kernel; "
                         "the median of the K ratios is reported")
    ap.add_argument("--fused-vs-dequantized", action="store_true",
                    help="instead: per row count, the fused kernel against dequantizing for a matrix product "
                         "(where each codec's fused_max_rows comes from)")
    ap.add_argument("--compare-paths", action="store_true",
                    help="also time each row count with the matrix units off (SLI_PROMPT_DTYPE=float32, "
                         "SLI_INT8_MATMUL=numba): the float32 / numba path a CPU without AMX takes")
    args = ap.parse_args()
    if args.floor_rounds < 1:
        ap.error(f"--floor-rounds {args.floor_rounds}: give 1 or more rounds")
    if min(args.rows) < 1:
        ap.error(f"--rows {' '.join(map(str, args.rows))}: give row counts of 1 or more")
    global STAT, BLOCK_SIZE, GROUP_SIZE
    STAT = min if args.stat == "min" else statistics.median
    BLOCK_SIZE, GROUP_SIZE = args.block_size, args.group_size
    try:
        config_of("nf4")  # an unsupported --block-size or --group-size fails here, naming the sizes
    except ValueError as e:
        ap.error(str(e))
    if args.threads:
        torch.set_num_threads(args.threads)
    out_f, in_f = args.shape
    g = torch.Generator().manual_seed(0)
    weight = (torch.randn(out_f, in_f, generator=g) * 0.02).to(torch.bfloat16)
    dense = weight.float()
    rows = tuple(args.rows)
    xs = {r: torch.randn(r, in_f, generator=g) for r in rows}
    print(f"Command: SLI_SIMD={os.environ.get('SLI_SIMD', '')} .venv/bin/python benchmarks/kernels.py "
          f"--repeats {args.repeats} --shape {out_f} {in_f} --modes {' '.join(args.modes)} "
          f"--rows {' '.join(map(str, rows))}{' --no-dequantize' if args.no_dequantize else ''}"
          f"{f' --threads {args.threads}' if args.threads else ''} --stat {args.stat}"
          f"{f' --block-size {args.block_size}' if args.block_size != 64 else ''}"
          f"{f' --group-size {args.group_size}' if args.group_size != 128 else ''}"
          f"{' --torch-ops' if args.torch_ops else ''}{' --compare-paths' if args.compare_paths else ''}"
          f"{f' --from-ram {args.from_ram} --floor-rounds {args.floor_rounds}' if args.from_ram else ''}"
          f"{' --fused-vs-dequantized' if args.fused_vs_dequantized else ''}")
    print(f"Machine: {cpu_model()}, {os.cpu_count()} cores, torch {torch.__version__}, {torch.get_num_threads()} "
          f"threads, kernels {_level()}, matrix units {kernels.matrix_units() or 'none'} (prompt dtype "
          f"{str(kernels.prompt_dtype()).replace('torch.', '')}, INT8 in torch._int_mm from "
          f"{kernels.int8_matrix_rows() or 'never'}); {datetime.datetime.now().isoformat(timespec='minutes')}; "
          f"weight {out_f}x{in_f} from bf16")
    print()
    if args.from_ram:
        from_ram(weight, args.modes, args.from_ram, args.repeats, args.floor_rounds)
        return
    if args.fused_vs_dequantized:
        fused_vs_dequantized(weight, args.modes, rows, args.repeats)
        return
    head = "| mode | " + " | ".join(f"{r} row{'s' if r > 1 else ''}: sli ms (÷ fp32 floor)" for r in rows)
    if args.compare_paths:
        head += " | " + " | ".join(f"{r}: float32/numba ms (÷ sli)" for r in rows)
    if not args.no_dequantize:
        head += " | dequantize ms | dequantize + F.linear, 1 row ms"
    print(head + " |")
    print("|---" * (len(rows) * (2 if args.compare_paths else 1) + 1 + (0 if args.no_dequantize else 2)) + "|")
    for mode in args.modes:
        codec = codec_for(mode)
        q = codec.prepare(codec.quantize(weight, config_of(mode)))
        xq = {r: codec.prepare_input(xs[r]) for r in rows}
        floor = {r: median_ms(lambda r=r: torch.nn.functional.linear(xs[r], dense), args.repeats) for r in rows}
        fused = {r: median_ms(lambda r=r: linear(q, xq[r]), args.repeats) for r in rows}
        line = f"| {mode} | " + " | ".join(f"{fused[r]:.2f} ({fused[r] / floor[r]:.2f}x of {floor[r]:.2f})" for r in rows)
        if args.compare_paths:
            plain = {}
            with forced_env(SLI_PROMPT_DTYPE="float32", SLI_INT8_MATMUL="numba"):
                plain = {r: median_ms(lambda r=r: linear(q, xq[r]), args.repeats) for r in rows}
            line += " | " + " | ".join(f"{plain[r]:.2f} ({plain[r] / fused[r]:.2f}x)" for r in rows)
        if not args.no_dequantize:
            scratch = torch.empty(out_f, in_f)
            deq = median_ms(lambda: codec.dequantize(q, torch.float32, out=scratch), args.repeats)
            both = median_ms(lambda: torch.nn.functional.linear(xs[rows[0]], codec.dequantize(q, torch.float32,
                                                                                               out=scratch)),
                             args.repeats)
            line += f" | {deq:.1f} | {both:.1f}"
        print(line + " |", flush=True)
    if args.torch_ops:
        print()
        print("torch: " + torch_ops(weight, xs, args.repeats))


if __name__ == "__main__":
    main()
