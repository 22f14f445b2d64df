"""Long prompts inside the memory budget: peak memory and prompt throughput by prompt length.

Run: .venv/bin/python benchmarks/long_context.py [--lengths 1024,4096,8191] [--modes int8,nf4]
     [--budget-gb 0.3] [--kv-dtype bfloat16] [--quality]
     [--model-dir DIR] [--new-tokens N] [--cap-mb MB] [--cache-dir DIR]

For each mode and prompt length, a fresh process opens SmolLM2-135M (the default model) under
``--budget-gb``, reads its RSS after the imports, feeds the first N tokens of
``pydoc_data.topics`` and generates one token. It prints the peak RSS above the post-import RSS
(VmHWM − VmRSS after imports, against budget + 64 MB) and the prompt's tokens/s, and the ratio
of the longest prompt's throughput to the shortest's. ``--model-dir`` takes another model (its
tokenizer must read the text); ``--new-tokens N`` generates N tokens and reports the decode
seconds per token after the prompt (the first token excluded), and the ratio of the longest
prompt's to the shortest's; ``--cap-mb`` runs each child in a memory cgroup of that many MB
(RAM + page cache, ``benchmarks/memory_cap.py``; the layer cache is evicted from the page cache
first) and reports the cgroup's peak and OOM kills. ``--quality`` adds the perplexity of
each KV dtype: 4×512 tokens of the same text scored 64 tokens at a time through the KV cache
(so keys and values stored in that dtype serve every later chunk), against float32 KV.
"""
from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import time

from _measure import peak_rss_mb, rss_mb

CHILD = "--child"


def child(mode: str, length: int, budget_gb: float, kv_dtype: str, cache_dir: str, model_dir: str = "",
          new_tokens: int = 1) -> None:
    from sli import UniversalSLIProcessor, kernels
    from sli.default_model import ensure_default_model
    from sli.evaluation import load_eval_text

    model_dir = model_dir or ensure_default_model(progress=False)
    kernels.kernels_enabled() and kernels.four_bit_path()  # numba and its kernels: part of "imports"
    baseline = rss_mb()
    with UniversalSLIProcessor(model_dir, mode, cache_dir=cache_dir, device="cpu", memory_budget_gb=budget_gb,
                               kv_dtype=kv_dtype, max_context_tokens=length + new_tokens) as proc:
        proc.prewarm(progress=False)
        text = load_eval_text()
        ids = proc.tokenizer()(text * (1 + length // 20000), return_tensors="pt", verbose=False)["input_ids"][:, :length]
        token_at = []
        t0 = time.perf_counter()
        proc.generate(ids, max_new_tokens=new_tokens, eos_token_id=[],
                      callback=lambda t: token_at.append(time.perf_counter()))
        seconds = token_at[0] - t0
        decode = (token_at[-1] - token_at[0]) / (len(token_at) - 1) if len(token_at) > 1 else None
        plan = proc.plan
    print(json.dumps({"mode": mode, "length": length, "seconds": seconds, "tokens_per_s": length / seconds,
                      "decode_s_per_token": decode, "new_tokens": len(token_at),
                      "peak_above_imports_mb": peak_rss_mb() - baseline, "budget_mb": budget_gb * 1024,
                      "kv_in_memory_mb": plan.kv_bytes / 2**20, "kv_spilled_mb": plan.kv_spilled_bytes / 2**20,
                      "chunk": proc.prefill_chunk_tokens}))


def kv_quality(kv_dtypes, cache_dir: str, chunk: int = 64) -> dict:
    import torch

    from sli import UniversalSLIProcessor
    from sli.default_model import ensure_default_model
    from sli.evaluation import load_eval_text

    model_dir = ensure_default_model(progress=False)
    result = {}
    for kv_dtype in kv_dtypes:
        with UniversalSLIProcessor(model_dir, "none", cache_dir=cache_dir, device="cpu", kv_dtype=kv_dtype) as proc:
            ids = proc.tokenizer()(load_eval_text(), return_tensors="pt")["input_ids"][0]
            nll, count = 0.0, 0
            for w in range(4):
                window = ids[w * 512:(w + 1) * 512].view(1, -1)
                session = proc.new_session()
                for start in range(0, 512, chunk):
                    piece = window[:, start:start + chunk]
                    items = [(piece, torch.ones(1, start + piece.shape[1], dtype=torch.long),
                              torch.arange(start, start + piece.shape[1]).view(1, -1), session.kv_cache)]
                    logits = _all_logits(proc, items)
                    targets = window[0, start + 1:start + piece.shape[1] + 1]
                    nll += float(torch.nn.functional.cross_entropy(logits[:targets.numel()], targets, reduction="sum"))
                    count += targets.numel()
            result[kv_dtype] = math.exp(nll / count)
    return result


def _all_logits(proc, items):
    """Every position's logits of one chunk, through the KV cache (the model's own forward)."""
    from sli import transformers_adapter as hf

    ids, mask, positions, kv_cache = items[0]
    out = proc._run(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True,
                    **{hf.cache_argument(proc.model): kv_cache})
    return out.logits[0].float()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", default="1024,4096,8191")  # 8191 + 1 new token: SmolLM2's 8192 positions
    parser.add_argument("--modes", default="int8,nf4")
    parser.add_argument("--budget-gb", type=float, default=0.3)
    parser.add_argument("--kv-dtype", default="bfloat16")
    parser.add_argument("--cache-dir", default="/tmp/sli-long-context-cache")
    parser.add_argument("--quality", action="store_true")
    parser.add_argument("--model-dir", default="", help="a local model (default: SmolLM2-135M)")
    parser.add_argument("--new-tokens", type=int, default=1, help="tokens generated after the prompt")
    parser.add_argument("--cap-mb", type=float, default=None, help="run each child in a memory cgroup of this size")
    args = parser.parse_args()
    print("Command: .venv/bin/python benchmarks/long_context.py " + " ".join(sys.argv[1:]))
    lengths = [int(x) for x in args.lengths.split(",")]
    for mode in args.modes.split(","):
        rows = []
        def child_cmd(length, budget_gb, new_tokens):
            return [sys.executable, __file__, CHILD, mode, str(length), str(budget_gb), args.kv_dtype,
                    args.cache_dir, args.model_dir, str(new_tokens)]

        for length in lengths:
            cmd = child_cmd(length, args.budget_gb, args.new_tokens)
            cap = None
            if args.cap_mb:
                import memory_cap

                if length == lengths[0]:  # fill the layer cache outside the cap, once
                    subprocess.run(child_cmd(1, 64, 1), capture_output=True)  # a 1-token prompt, no budget to speak of
                memory_cap.evict([args.cache_dir, args.model_dir])
                cap = memory_cap.MemoryCap(args.cap_mb)
                cmd = cap.wrap(cmd)
            try:
                done = subprocess.run(cmd, capture_output=True, text=True)
                cap_stats = cap.stats() if cap else None
            finally:
                if cap:
                    cap.close()
            if done.returncode:
                print(f"{mode} {length}: failed (exit {done.returncode}; cgroup {cap_stats})\n{done.stderr[-2000:]}")
                continue
            row = json.loads(done.stdout.strip().splitlines()[-1])
            if cap_stats:
                row["cgroup_peak_mb"], row["oom_kills"] = cap_stats["max_usage_mb"], cap_stats["oom_kills"]
            rows.append(row)
            print(json.dumps(row), flush=True)
        print(f"\n{mode}, budget {args.budget_gb} GB, KV {args.kv_dtype}")
        print("| prompt | prompt tok/s | peak above imports (MB) | budget + 64 MB | KV in memory / on disk (MB) | chunk |")
        print("|---|---|---|---|---|---|")
        for r in rows:
            print(f"| {r['length']} | {r['tokens_per_s']:.0f} | {r['peak_above_imports_mb']:.0f} | "
                  f"{r['budget_mb'] + 64:.0f} | {r['kv_in_memory_mb']:.0f} / {r['kv_spilled_mb']:.0f} | {r['chunk']} |")
        if len(rows) >= 2:
            print(f"throughput at {rows[-1]['length']} / at {rows[0]['length']}: "
                  f"{rows[-1]['tokens_per_s'] / rows[0]['tokens_per_s']:.2f}")
            if rows[0].get("decode_s_per_token") and rows[-1].get("decode_s_per_token"):
                print(f"decode s/token at {rows[-1]['length']} / at {rows[0]['length']}: "
                      f"{rows[-1]['decode_s_per_token']:.2f} / {rows[0]['decode_s_per_token']:.2f} = "
                      f"{rows[-1]['decode_s_per_token'] / rows[0]['decode_s_per_token']:.2f}")
        for r in rows:
            if "cgroup_peak_mb" in r:
                print(f"{r['length']}: cgroup peak {r['cgroup_peak_mb']:.0f} MB of {args.cap_mb:.0f}, "
                      f"OOM kills {r['oom_kills']}")
    if args.quality:
        ppl = kv_quality(["float32", "bfloat16", "int8"], args.cache_dir)
        base = ppl["float32"]
        print("\n| KV dtype | perplexity (4x512, 64-token chunks through the cache) | change |")
        print("|---|---|---|")
        for name, value in ppl.items():
            print(f"| {name} | {value:.4f} | {100 * (value / base - 1):+.3f}% |")


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == CHILD:
        child(sys.argv[2], int(sys.argv[3]), float(sys.argv[4]), sys.argv[5], sys.argv[6],
              *(sys.argv[7:8]), *(int(a) for a in sys.argv[8:9]))
    else:
        main()
