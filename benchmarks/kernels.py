"""Fused CPU kernels vs dequantize-then-BLAS, one Llama-2-7B feed-forward weight.

Run: .venv/bin/python benchmarks/kernels.py [--repeats 5] [--shape 11008 4096]

For each mode, the time of ``codec.linear(q, x)`` (what a streamed layer's linear does) for
1, 4 and 16 activation rows — the fused kernel path (sli.kernels) — beside, in the same run:
the float32 ``F.linear`` with the weight already dequantized (the compute floor: what a fully
loaded float32 model pays), and dequantize-into-a-reused-buffer + ``F.linear`` (what a
streamed layer would pay without the kernels). Median of --repeats after a warm-up call.
"""
import argparse
import datetime
import os
import statistics
import time

import torch

from sli.quantization import QuantizationConfig, codec_for

MODES = ["none", "int8", "int8_dynamic", "nf4", "fp4", "int4", "fp8"]


def median_ms(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return 1e3 * statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--shape", type=int, nargs=2, default=[11008, 4096], metavar=("OUT", "IN"))
    args = ap.parse_args()
    out_f, in_f = args.shape
    g = torch.Generator().manual_seed(0)
    weight = (torch.randn(out_f, in_f, generator=g) * 0.02).to(torch.bfloat16)
    dense = weight.float()
    rows = (1, 4, 16)
    xs = {r: torch.randn(r, in_f, generator=g) for r in rows}
    floor = {r: median_ms(lambda r=r: torch.nn.functional.linear(xs[r], dense), args.repeats) for r in rows}
    print(f"Command: .venv/bin/python benchmarks/kernels.py --repeats {args.repeats} --shape {out_f} {in_f}")
    print(f"Machine: {os.cpu_count()} cores, torch {torch.__version__}, {torch.get_num_threads()} threads; "
          f"{datetime.datetime.now().isoformat(timespec='minutes')}; weight {out_f}x{in_f} from bf16")
    print()
    print("| mode | " + " | ".join(f"fused {r} row{'s' if r > 1 else ''} ms" for r in rows)
          + " | dequantize ms | dequantize + F.linear, 1 row ms | fused ÷ fp32 floor, 1 row | fused ÷ dequantize+F.linear, 1 row |")
    print("|---" * (len(rows) + 5) + "|")
    print("| fp32 F.linear (floor) | " + " | ".join(f"{floor[r]:.1f}" for r in rows) + " | - | - | 1.00x | - |")
    for mode in MODES:
        codec = codec_for(mode)
        q = codec.prepare(codec.quantize(weight, QuantizationConfig(mode=mode)))
        fused = {r: median_ms(lambda r=r: codec.linear(q, xs[r]), args.repeats) for r in rows}
        scratch = torch.empty(out_f, in_f)
        deq = median_ms(lambda: codec.dequantize(q, torch.float32, out=scratch), args.repeats)
        both = median_ms(lambda: torch.nn.functional.linear(xs[1], codec.dequantize(q, torch.float32, out=scratch)),
                         args.repeats)
        print(f"| {mode} | " + " | ".join(f"{fused[r]:.1f}" for r in rows)
              + f" | {deq:.1f} | {both:.1f} | {fused[1] / floor[1]:.2f}x | {fused[1] / both:.2f}x |")


if __name__ == "__main__":
    main()
