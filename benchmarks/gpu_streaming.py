"""The CUDA path measured: sli streaming a model far larger than its GPU budget, beside the
host->device copy floor of the same bytes and accelerate's GPU offload.

Run (on a machine with a CUDA GPU): python benchmarks/gpu_streaming.py --model-dir DIR
    --budget-gb 2 --modes none,int8,nf4 --out OUT_DIR

Per mode: decode tokens/s, prefill seconds, bytes copied host->device per token (the streamed
layers' cached bytes), the floor (a pinned copy of those bytes, timed alone), the ratio to it,
and torch.cuda.max_memory_allocated against the budget; accelerate (device_map="auto" with
max_memory={0: budget}) decode tokens/s on the same model. Writes OUT_DIR/gpu_streaming.json
and a per-layer timeline PNG per mode.
"""
from __future__ import annotations

import argparse
import json
import time
import traceback
from pathlib import Path

import torch


def copy_floor_s(nbytes: int, repeats: int = 5) -> float:
    """Seconds to copy ``nbytes`` from pinned host memory to the GPU (best of ``repeats``)."""
    host = torch.empty(nbytes, dtype=torch.uint8).pin_memory()
    device = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    best = float("inf")
    for _ in range(repeats):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        device.copy_(host, non_blocking=True)
        torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t0)
    return best


def measure_sli(model_dir: str, mode: str, budget_gb: float, prompt_len: int, new_tokens: int, out: Path) -> dict:
    from sli import UniversalSLIProcessor
    from sli.timeline import plot_timeline

    with UniversalSLIProcessor(model_dir, mode, device="cuda", max_gpu_memory_gb=budget_gb,
                               cache_dir=str(out / "cache")) as proc:
        proc.prewarm(progress=False)
        ids = torch.randint(0, 1000, (1, prompt_len))
        torch.cuda.reset_peak_memory_stats()
        stamps = []
        t0 = time.perf_counter()
        proc.generate(ids, max_new_tokens=new_tokens, eos_token_id=[], callback=lambda t: stamps.append(time.perf_counter()))
        prefill = stamps[0] - t0
        decode_tps = (len(stamps) - 1) / (stamps[-1] - stamps[0])
        peak_gb = torch.cuda.max_memory_allocated() / 2**30  # before the floor's own buffers
        last = proc.timings[-1].step
        streamed = sum(t.nbytes for t in proc.timings if t.step == last and not t.resident)
        floor = copy_floor_s(streamed) if streamed else 0.0
        plot_timeline(proc.timings, str(out / f"timeline-{mode}.png"))
        return {"mode": mode, "prefill_s": prefill, "decode_tokens_per_s": decode_tps,
                "h2d_bytes_per_token": streamed, "copy_floor_s": floor,
                "decode_vs_floor": (1 / decode_tps) / floor if floor else None,
                "max_memory_allocated_gb": peak_gb, "budget_gb": budget_gb,
                "resident_layers": len(proc.plan.resident_layers),
                "host_tier_gb": proc.cache.stats().memory_bytes / 2**30, "num_layers": proc.layout.num_layers}


def measure_accelerate(model_dir: str, budget_gb: float, prompt_len: int, new_tokens: int, out: Path) -> dict:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16, device_map="auto",
                                                 max_memory={0: f"{budget_gb}GiB", "cpu": "200GiB"},
                                                 offload_folder=str(out / "offload"))
    ids = torch.randint(0, 1000, (1, prompt_len), device="cuda")
    model.generate(ids, max_new_tokens=1, do_sample=False)
    t0 = time.perf_counter()
    model.generate(ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
    return {"contender": "accelerate", "decode_tokens_per_s": new_tokens / (time.perf_counter() - t0)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-dir", required=True)
    parser.add_argument("--modes", default="none,int8,nf4")
    parser.add_argument("--budget-gb", type=float, default=2.0)
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=16)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results = {"gpu": torch.cuda.get_device_name(0), "sli": [], "peers": []}
    for mode in args.modes.split(","):
        try:
            results["sli"].append(measure_sli(args.model_dir, mode, args.budget_gb, args.prompt_len, args.new_tokens, out))
        except Exception as exc:  # one mode that fails is reported; the others still run
            traceback.print_exc()
            results["sli"].append({"mode": mode, "error": f"{type(exc).__name__}: {exc}"})
        print(json.dumps(results["sli"][-1]))
    try:
        results["peers"].append(measure_accelerate(args.model_dir, args.budget_gb, args.prompt_len, args.new_tokens, out))
    except Exception as exc:  # a peer that fails is reported, not fatal
        results["peers"].append({"contender": "accelerate", "error": f"{type(exc).__name__}: {exc}"})
    print(json.dumps(results["peers"]))
    (out / "gpu_streaming.json").write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
