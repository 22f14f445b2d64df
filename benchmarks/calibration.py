"""GPTQ calibration cost of one 7B-shaped decoder layer (Llama-2-7B: 4096 hidden, 11008 MLP).

    python benchmarks/calibration.py --tokens 8192 --mode int4

Writes a two-layer random model of Llama-2-7B's shapes (``sli.synth``, byte tokenizer), calibrates
it through :func:`sli.calibration.calibrate` on ``--tokens`` tokens of the default calibration text
in windows of 512, and prints where layer 0's time went: the forward of one chunk that finds
which linears share an input (``groups_s``), the float pass(es) that collect the Hessians, the
GPTQ solve, the store, the quantized layer's build, and the pass through it that makes layer
1's inputs. The passes grow linearly with the token count, the rest is once a layer; the
issue's setting is 128 windows of 512 (65536 tokens), estimated from the run (or run it with
``--tokens 65536``). With ``--layers 3``, layer 1 is a whole layer of a process whose passes
are compiled already (``compiled_layer_wall_s``; layer 0's passes include the compiles). Wall and CPU
seconds are both printed (on a shared machine CPU time is the steadier figure), and the
process's peak RSS (VmHWM) beside its RSS before the processor was made (the interpreter and
its imports) and the calibration's own estimate of what it holds.

    python benchmarks/calibration.py --tokens 4096 --mode nf4 --budget-gb 2

calibrates under a memory budget (``memory_budget_gb``: the chunks are sized to it).
``--asymmetric 0`` times plain GPTQ (no pass of the float model beside the quantized one). The
cache starts empty each run.
"""
from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

import torch

from sli import UniversalSLIProcessor
from sli.calibration import CHUNK_TOKENS, calibrate, calibration_plan
from sli.quantization import QuantizationConfig
from sli.synth import synth_model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=8192, help="calibration tokens (windows of 512)")
    parser.add_argument("--mode", default="int4", choices=["int4", "nf4", "fp4"])
    parser.add_argument("--preset", default="7b", help="sli.synth preset of the layer's shapes")
    parser.add_argument("--sequential", action="store_true", help="gptq_sequential=True")
    parser.add_argument("--asymmetric", type=float, default=QuantizationConfig.gptq_asymmetric, metavar="A",
                        help="gptq_asymmetric (default %(default)s; 0: plain GPTQ, no float model's pass)")
    parser.add_argument("--block-size", type=int, default=QuantizationConfig.block_size,
                        help="NF4/FP4 values a block maximum (default %(default)s)")
    parser.add_argument("--work", help="folder for the model and the cache (default: a temporary one)")
    parser.add_argument("--budget-gb", type=float, default=None, help="memory_budget_gb of the processor")
    parser.add_argument("--layers", type=int, default=2,
                        help="decoder layers of the model (3: layer 1 is a whole layer once both passes are compiled)")
    args = parser.parse_args()
    if not 0 <= args.asymmetric <= 1:
        parser.error(f"--asymmetric {args.asymmetric}: give a fraction from 0 to 1")
    if args.layers < 1:
        parser.error(f"--layers {args.layers}: give 1 or more (3 times a whole layer once compiled)")
    if args.work:
        run(args, Path(args.work))
    else:  # a 7B-shaped layer's model and activations take GBs: never leave them behind
        with tempfile.TemporaryDirectory(prefix="sli-calib-bench-") as work:
            run(args, Path(work))


def run(args: argparse.Namespace, work: Path) -> None:
    model = work / f"{args.preset}-{args.layers}layers"
    if not (model / "config.json").is_file():
        synth_model(model, family="llama", preset=args.preset, num_layers=args.layers, with_tokenizer=True)
    config = QuantizationConfig(mode=args.mode, method="gptq", calibration_tokens=args.tokens, calibration_window=512,
                                gptq_sequential=args.sequential, gptq_asymmetric=args.asymmetric,
                                block_size=args.block_size)
    report: list = []
    shutil.rmtree(work / "cache", ignore_errors=True)
    before_mb = _status_kb("VmRSS:") / 1024
    t0, c0 = time.perf_counter(), time.process_time()
    with UniversalSLIProcessor(model, config, cache_dir=work / "cache", device="cpu", prefetch=False,
                               memory_budget_gb=args.budget_gb) as proc:
        plan = calibration_plan(proc, 512, args.tokens)
        chunk = plan.chunk_tokens(proc.memory_budget, 512, CHUNK_TOKENS, proc.model_id)
        calibrate(proc, progress=False, report=report)
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    layer = report[0] if report else {}
    scale = 65536 / args.tokens
    once = ("load_s", "groups_s", "solve_s", "store_s", "build_s")  # a layer's, whatever its token count
    estimate = sum(layer.get(k, 0) for k in once) + scale * (layer.get("hessians_s", 0) + layer.get("forward_s", 0))
    print(json.dumps({"preset": args.preset, "mode": args.mode, "tokens": args.tokens, "asymmetric": args.asymmetric,
                      "block_size": args.block_size,
                      "threads": torch.get_num_threads(),
                      "layer": {k: round(v, 2) for k, v in layer.items()},
                      "later_layers": [{k: round(v, 2) for k, v in later.items()} for later in report[1:]],
                      "compiled_layer_wall_s": round(report[1]["total_s"], 1) if len(report) > 2 else None,
                      "run_wall_s": round(wall, 1),
                      "run_cpu_s": round(cpu, 1), "layer0_wall_s_at_65536_tokens_estimate": round(estimate, 1),
                      "budget_gb": args.budget_gb, "chunk_tokens": chunk,
                      "estimate_mb": round(plan.peak(chunk) / 2 ** 20), "rss_before_mb": round(before_mb),
                      "peak_rss_mb": round(_status_kb("VmHWM:") / 1024),
                      "peak_above_before_mb": round(_status_kb("VmHWM:") / 1024 - before_mb)}, indent=1))


def _status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field):
                return int(line.split()[1])
    return -1


if __name__ == "__main__":
    main()
