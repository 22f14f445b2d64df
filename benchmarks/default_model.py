"""The default model (SmolLM2-135M-Instruct) decoding beside llama.cpp on the same GGUF file.

    .venv/bin/python benchmarks/default_model.py --llama-cpp BUILD/bin [--modes int8,nf4]
        [--new-tokens 64] [--rounds 2] [--no-decode-step] [--depth N]

Every layer resident (the whole model is ~100 MB). sli: ``generate`` of ``--new-tokens`` greedy
tokens after a 12-token prompt, EOS ignored, through the API in this process (the model
converted once by ``sli demo``); decode tokens/s = tokens after the first ÷ the time from the
first to the last, and the median gap between tokens. llama.cpp: ``llama-bench -m
SmolLM2-135M-Instruct.Q4_1.gguf -p 16 -n NEW -t 2 -r 2 --repack 0``, its tg tokens/s (the
package's own GGUF, the file sli converts). The contenders alternate, ``--rounds`` times, so
drift of the machine's speed (1.5x within an hour here) hits both; ratios are within a round.
``--no-decode-step`` also runs each sli mode with ``SLI_NO_DECODE_STEP=1`` (transformers' modules
per layer) for the before/after of sli.decode_step. ``--depth N`` decodes after a context of N
tokens instead (sli: the first N tokens of ``pydoc_data.topics`` as the prompt, the prompt's time
not counted; llama.cpp: ``-p 0 -d N``, which fills its context with N tokens before timing), so
the per-token cost of attending to a long context is compared too.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

PROMPT = "Write a long story about a dragon who learns to read."


def gguf_file() -> Path:
    from sli.default_model import find_default_gguf

    return find_default_gguf()


def sli_decode(proc, ids, new_tokens: int):
    stamps = []
    proc.generate(ids, max_new_tokens=new_tokens, eos_token_id=[], callback=lambda t: stamps.append(time.perf_counter()))
    gaps = sorted(b - a for a, b in zip(stamps, stamps[1:]))
    return (len(stamps) - 1) / (stamps[-1] - stamps[0]), gaps[len(gaps) // 2]


def llama_decode(bin_dir: Path, new_tokens: int, depth: int = 0) -> float:
    prompt = ["-p", "0", "-d", str(depth)] if depth else ["-p", "16"]
    out = subprocess.run([str(bin_dir / "llama-bench"), "-m", str(gguf_file()), *prompt, "-n", str(new_tokens),
                          "-t", "2", "-r", "2", "--repack", "0", "-o", "json"], capture_output=True, text=True,
                         check=True).stdout
    return next(r["avg_ts"] for r in json.loads(out) if r["n_gen"] > 0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--llama-cpp", type=Path, default=os.environ.get("LLAMA_CPP_DIR"),
                        help="llama.cpp's build/bin (llama-bench); default $LLAMA_CPP_DIR; 'none' (or neither): sli alone")
    parser.add_argument("--modes", default="int8,nf4")
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--no-decode-step", action="store_true", help="also each mode with SLI_NO_DECODE_STEP=1")
    parser.add_argument("--depth", type=int, default=0, help="decode after a context of this many tokens")
    args = parser.parse_args()
    if args.depth < 0:
        parser.error(f"--depth {args.depth}: pass a number of context tokens, 0 or more")

    from sli import QuantizationConfig, UniversalSLIProcessor
    from sli.default_model import ensure_default_model

    model_dir = ensure_default_model()
    procs = {m: UniversalSLIProcessor(model_dir, QuantizationConfig(mode=m), memory_budget_gb=2.0)
             for m in args.modes.split(",")}
    tokenizer = next(iter(procs.values())).tokenizer()
    if args.depth:
        from sli.evaluation import load_eval_text

        ids = torch.tensor([tokenizer.encode(load_eval_text())[:args.depth]])
        if ids.shape[1] < args.depth:
            parser.error(f"--depth {args.depth}: the text has only {ids.shape[1]} tokens; pass a smaller depth")
    else:
        ids = torch.tensor([tokenizer.encode(PROMPT)])
    for proc in procs.values():
        proc.prewarm(progress=False)
        sli_decode(proc, ids, 4)  # warm-up: every layer resident, kernels compiled
    variants = [("", False)] + ([(" (modules)", True)] if args.no_decode_step else [])
    for r in range(args.rounds):
        row = {}
        for mode, proc in procs.items():
            for label, off in variants:
                os.environ.pop("SLI_NO_DECODE_STEP", None)
                if off:
                    os.environ["SLI_NO_DECODE_STEP"] = "1"
                proc.runner._steps.clear()
                row[f"sli {mode}{label}"] = sli_decode(proc, ids, args.new_tokens)
            os.environ.pop("SLI_NO_DECODE_STEP", None)
        use_llama = args.llama_cpp and str(args.llama_cpp) != "none"
        llama = llama_decode(args.llama_cpp, args.new_tokens, args.depth) if use_llama else None
        cells = [f"{name} {tps:.1f} tok/s (median gap {gap * 1e3:.1f} ms)" for name, (tps, gap) in row.items()]
        if llama:
            cells.append(f"llama.cpp Q4_1 {llama:.1f} tok/s")
            cells += [f"{name} ÷ llama.cpp {tps / llama:.2f}x" for name, (tps, _) in row.items()]
        print(f"round {r}: " + "; ".join(cells), flush=True)


if __name__ == "__main__":
    sys.exit(main())
