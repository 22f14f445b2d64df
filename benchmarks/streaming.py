"""Streaming benchmark: sli beside a full transformers load, accelerate disk offload and AirLLM.

Run:
    .venv/bin/python benchmarks/streaming.py --model-dir DIR [--budget-gb 2] [--prompt-len 128]
        [--new-tokens 16] [--contenders full,accelerate,airllm,airllm-4bit,sli] [--modes none,int8,nf4]
        [--warm] [--cold] [--json out.json] [--plot timeline.png]
    .venv/bin/python benchmarks/streaming.py --synth 7b --synth-layers 8 ...   # random Llama, 7B shapes

Each contender runs in a fresh process (``benchmarks/peers.py``), so its peak RSS (``VmHWM``) is its
own; its baseline is the RSS right after ``import torch, transformers``. For each it reports the
load time, prefill (a ``--prompt-len`` prompt, to the first new token), decode tokens/s (greedy,
``--new-tokens``), peak RSS and bytes read from disk per decoded token (``/proc/self/io``
``read_bytes``: real disk reads only, page-cache hits count zero), and whether the greedy tokens
of every unquantized contender agree.

Warm: the model files (and AirLLM's shards, sli's cache) are read once into the page cache before
the child starts. Cold (root only): the page cache is dropped before the child starts, after its
load and before every decode step, so every pass reads its weights from disk.

Floors: the I/O floor is the time to read the streamed bytes once (the decoder layers' tensors of
the checkpoint; for sli the files of its layer cache), warm and cold; the compute floor is one
token's float32 matrix-vector products through every layer and the head with the weights resident
(``_measure.compute_floor``). sli's decode time per token is compared with max(I/O, compute).

``--plot timeline.png`` draws each sli run's per-layer timeline (read, dequantize, waiting,
compute; ``sli.timeline``) of the prefill and the last decode step, one file per run:
``timeline-sli-nf4-warm.png``, ... (needs matplotlib: the ``bench`` extra).
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import _measure as M  # noqa: E402

ALL_CONTENDERS = ("full", "accelerate", "airllm", "airllm-4bit", "sli")
MB = 1e6


def ram_bytes() -> int:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def fp32_bytes(model_dir) -> int:
    """Bytes the model takes in float32 (parameter count from the safetensors headers)."""
    total = 0
    for path in M.safetensors_files(model_dir):
        _, header = M._header(path)
        for info in header.values():
            n = 1
            for d in info["shape"]:
                n *= d
            total += 4 * n
    return total


def build_model(args) -> Path:
    name = f"llama-{args.synth}" + (f"-{args.synth_layers}l" if args.synth_layers else "")
    out = Path(args.work_dir) / "models" / name
    if (out / "config.json").exists():
        return out
    try:
        from sli.synth import synth_model
    except ImportError:
        synth_model = None
    if synth_model is not None:
        print(f"building {out} with sli.synth.synth_model(family='llama', preset={args.synth!r}, "
              f"num_layers={args.synth_layers})", flush=True)
        tmp = out.with_name(out.name + ".partial")
        synth_model(tmp, family="llama", preset=args.synth, num_layers=args.synth_layers)
        tmp.rename(out)
    else:
        print(f"sli.synth unavailable: building a random 168M Llama at {out} with transformers", flush=True)
        M.build_llama_fallback(out, layers=args.synth_layers or 8)
    return out


def prime(paths) -> None:
    """Read every file under ``paths`` once so a warm run finds them in the page cache."""
    for p in paths:
        if Path(p).exists():
            M.time_read(M.file_ranges(p), cold=False)


def run_child(args, contender, mode, cold, new_tokens, extra=()) -> dict:
    out = Path(tempfile.mkstemp(prefix=f"{contender}-", suffix=".json", dir=args.work_dir)[1])
    cmd = [sys.executable, str(HERE / "peers.py"), "--contender", contender, "--model-dir", str(args.model_dir),
           "--out", str(out), "--budget-gb", str(args.budget_gb), "--prompt-len", str(args.prompt_len),
           "--new-tokens", str(new_tokens), "--work-dir", str(args.work_dir)]
    if mode:
        cmd += ["--mode", mode]
    cmd += list(extra)
    if cold:
        cmd.append("--cold")
        if not M.drop_caches():
            print("  (cannot drop the page cache: not root; the cold run is warm)", flush=True)
    else:
        name = Path(args.model_dir).resolve().name
        prime([args.model_dir, Path(args.work_dir) / "airllm-shards" / name,
               Path(args.work_dir) / "sli-cache" / f"{name}-{mode}" if mode else ""])
    label = contender + (f"[{mode}]" if mode else "")
    print(f"-- {label} ({'cold' if cold else 'warm'}): {' '.join(cmd[1:])}", flush=True)
    t0 = time.perf_counter()
    env = dict(os.environ, TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout, env=env)
        tail = (proc.stdout + proc.stderr).strip().splitlines()[-3:]
        result = json.loads(out.read_text()) if out.stat().st_size else {
            "contender": contender, "ok": False, "error": f"child exited {proc.returncode}: {' | '.join(tail)}"}
    except subprocess.TimeoutExpired:
        result = {"contender": contender, "ok": False, "error": f"timed out after {args.timeout}s"}
    finally:
        out.unlink(missing_ok=True)
    result.update(label=label, mode=mode, cache="cold" if cold else "warm", wall_s=time.perf_counter() - t0)
    if result.get("ok") and "prefill_s" not in result:
        print(f"   done: {json.dumps({k: v for k, v in result.items() if k.endswith(('_s', '_mb', '_bytes'))})}")
    elif result.get("ok"):
        print(f"   prefill {result['prefill_s']:.2f} s, decode {result.get('decode_tok_s', float('nan')):.3f} tok/s, "
              f"peak RSS {result['peak_rss_mb']:.0f} MB, wall {result['wall_s']:.0f} s", flush=True)
    else:
        print(f"   FAILED: {result.get('error')}", flush=True)
    return result


def floors(args, results) -> dict:
    ranges, layer_bytes, other_bytes = M.layer_ranges(args.model_dir)
    out = {"checkpoint_layer_bytes": layer_bytes, "checkpoint_other_bytes": other_bytes, "io": {}}
    sources = {"checkpoint": ranges}
    name = Path(args.model_dir).resolve().name
    for mode in args.modes:
        cache = Path(args.work_dir) / "sli-cache" / f"{name}-{mode}"
        if cache.exists() and M.dir_bytes(cache):
            sources[f"sli-{mode}"] = M.file_ranges(cache)
    for key, rng in sources.items():
        warm_s, nbytes = M.time_read(rng, cold=False)
        warm_s, nbytes = M.time_read(rng, cold=False)  # the first pass may have been cold
        row = {"bytes": nbytes, "warm_s": warm_s}
        if "cold" in args.caches and M.can_drop_caches():
            row["cold_s"], _ = M.time_read(rng, cold=True)
        out["io"][key] = row
    out["compute"] = M.compute_floor(args.model_dir)
    return out


def fmt(x, spec=".2f", none="-"):
    return none if x is None else format(x, spec)


def report(args, results, fl) -> str:
    lines = []
    ref = {}  # cache -> tokens of the first unquantized contender
    for r in results:
        if r.get("ok") and (r["contender"] != "sli" or r.get("mode") == "none") and r["contender"] != "airllm-4bit":
            ref.setdefault(r["cache"], r["tokens"])
    lines.append("| contender | cache | load s | prefill s | decode tok/s | s/token | peak RSS MB | baseline RSS MB "
                 "| peak RSS in generate MB | MB read/token | greedy tokens |")
    lines.append("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in results:
        if not r.get("ok"):
            lines.append(f"| {r['label']} | {r['cache']} | failed: {r.get('error', '?')} |||||||||")
            continue
        toks = r["tokens"]
        base = ref.get(r["cache"], [])
        n = min(len(toks), len(base))
        same = toks[:n] == base[:n]
        agree = ("same" if same else "differ") + (f" (first {n})" if n < len(base) else "")
        if r["contender"] == "sli" and r.get("mode") != "none":
            agree += " (quantized)"
        extra = r.get("prewarm_s")
        load = fmt(r["load_s"]) + (f" (+{extra:.1f} prewarm)" if extra is not None else "")
        rb = r.get("decode_read_bytes_per_token")
        lines.append(f"| {r['label']} | {r['cache']} | {load} | {fmt(r['prefill_s'])} | {fmt(r.get('decode_tok_s'), '.3f')} "
                     f"| {fmt(r.get('decode_s_per_token'), '.3f')} | {r['peak_rss_mb']:.0f} | {r['baseline_rss_mb']:.0f} "
                     f"| {fmt(r.get('generate_peak_rss_mb'), '.0f')} "
                     f"| {fmt(None if rb is None else rb / MB, '.0f')} | {agree} |")
    lines.append("")
    comp = fl["compute"]
    lines.append(f"Compute floor (fp32 matrix-vector, one token, weights resident): layers {comp['layers_s']:.3f} s + "
                 f"head {comp['head_s']:.3f} s = {comp['total_s']:.3f} s/token.")
    for key, row in fl["io"].items():
        lines.append(f"I/O floor, {key}: {row['bytes'] / MB:.0f} MB in {row['warm_s']:.3f} s warm"
                     + (f", {row['cold_s']:.3f} s cold" if "cold_s" in row else "")
                     + f" ({row['bytes'] / MB / row['warm_s']:.0f} MB/s warm"
                     + (f", {row['bytes'] / MB / row['cold_s']:.0f} MB/s cold)" if "cold_s" in row else ")"))
    lines.append("")
    # ratios
    by = {(r["contender"], r.get("mode"), r["cache"]): r for r in results if r.get("ok")}
    rows = []
    for cache in args.caches:
        for mode in args.modes:
            s = by.get(("sli", mode, cache))
            if s is None or not s.get("decode_tok_s"):
                continue
            air, acc, full = (by.get((c, None, cache)) for c in ("airllm", "accelerate", "full"))
            io = fl["io"].get(f"sli-{mode}", fl["io"]["checkpoint"])
            io_s = io.get("cold_s" if cache == "cold" else "warm_s", io["warm_s"])
            floor = max(io_s, comp["total_s"])
            rows.append(f"| sli[{mode}] | {cache} | {fmt(s['decode_tok_s'] / air['decode_tok_s'] if air and air.get('decode_tok_s') else None)}x "
                        f"| {fmt(s['decode_tok_s'] / acc['decode_tok_s'] if acc and acc.get('decode_tok_s') else None)}x "
                        f"| {fmt(s['decode_s_per_token'] / floor)}x (floor {floor:.3f} s: {'I/O' if io_s >= comp['total_s'] else 'compute'}) "
                        f"| {fmt(s['prefill_s'] / full['prefill_s'] if full else None)}x |")
    if rows:
        lines.append("| sli | cache | decode tok/s ÷ AirLLM | ÷ accelerate | s/token ÷ max(I/O, compute floor) "
                     "| prefill ÷ full prefill |")
        lines.append("|---|---|---|---|---|---|")
        lines.extend(rows)
    else:
        lines.append("sli ratios: no successful sli run in this invocation.")
    return "\n".join(lines)


def plot_runs(args, results) -> list:
    """One timeline per sli run: ``--plot`` with ``-sli-MODE-CACHE`` before its suffix."""
    from sli.timeline import plot_timeline

    base, paths = Path(args.plot), []
    for r in results:
        if r.get("contender") != "sli" or not r.get("ok") or not r.get("timings"):
            continue
        name = f"{r['contender']}-{r.get('mode')}-{r['cache']}"
        path = base.with_name(f"{base.stem}-{name}{base.suffix or '.png'}")
        title = (f"sli[{r.get('mode')}], {r['cache']} page cache: {Path(args.model_dir).name}, "
                 f"budget {args.budget_gb} GB, prompt {args.prompt_len} tokens")
        paths.append(plot_timeline(r["timings"], path, title=title, prefill=True))
    return paths


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description="sli beside full transformers, accelerate disk offload and AirLLM.")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--model-dir", help="a local transformers model directory (safetensors)")
    src.add_argument("--synth", help="build a random Llama of this sli.synth preset (168m, 7b, ...) in --work-dir")
    p.add_argument("--synth-layers", type=int, default=None, help="decoder layers of the --synth model")
    p.add_argument("--contenders", default=",".join(ALL_CONTENDERS))
    p.add_argument("--modes", default="none,int8,nf4", help="sli quantization modes")
    p.add_argument("--budget-gb", type=float, default=2.0, help="RAM budget for accelerate's max_memory and sli")
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--new-tokens", type=int, default=16)
    p.add_argument("--airllm-new-tokens", type=int, default=None, help="fewer new tokens for AirLLM (slow)")
    p.add_argument("--warm", action="store_true", help="warm page cache runs (default: both)")
    p.add_argument("--cold", action="store_true", help="cold page cache runs (default: both)")
    p.add_argument("--work-dir", default=os.path.join(tempfile.gettempdir(), "slibench"))
    p.add_argument("--timeout", type=int, default=600, help="seconds per contender run")
    p.add_argument("--json", help="write the results here")
    p.add_argument("--plot", metavar="FILE.png",
                   help="draw each sli run's per-layer timeline to FILE-sli-MODE-CACHE.png (needs matplotlib)")
    args = p.parse_args(argv)
    if args.plot:
        from sli.errors import SLIError
        from sli.timeline import require_matplotlib

        try:
            require_matplotlib()  # now, not after the runs
        except SLIError as exc:
            p.error(str(exc))
    if args.model_dir and not (Path(args.model_dir) / "config.json").is_file():
        p.error(f"--model-dir {args.model_dir} has no config.json: pass a local transformers model directory, "
                "or --synth 7b --synth-layers 8 to build one")
    Path(args.work_dir).mkdir(parents=True, exist_ok=True)
    args.model_dir = Path(args.model_dir) if args.model_dir else build_model(args)
    args.caches = [c for c, on in (("warm", args.warm), ("cold", args.cold)) if on] or ["warm", "cold"]
    args.modes = [m.strip().lower() for m in args.modes.split(",") if m.strip()]
    contenders = [c.strip() for c in args.contenders.split(",") if c.strip()]
    bad = set(contenders) - set(ALL_CONTENDERS)
    if bad:
        p.error(f"unknown contenders {sorted(bad)}; choose from {', '.join(ALL_CONTENDERS)}")
    if "cold" in args.caches and not M.can_drop_caches():
        print("note: not root, the page cache cannot be dropped; 'cold' runs are warm", flush=True)
    notes = []
    size32 = fp32_bytes(args.model_dir)
    if "full" in contenders and size32 > 0.7 * ram_bytes():
        contenders.remove("full")
        notes.append(f"full skipped: {size32 / 1e9:.1f} GB in fp32 > 70% of {ram_bytes() / 1e9:.1f} GB RAM")
    results, setup = [], {}
    # One-time conversions (AirLLM's per-layer split, sli's cache fill) from scratch, each in its own
    # process, so that their time and peak RSS are reported apart from the runs.
    name = Path(args.model_dir).resolve().name
    if any(c.startswith("airllm") for c in contenders):
        shutil.rmtree(Path(args.work_dir) / "airllm-shards" / name, ignore_errors=True)
        setup["airllm-split"] = run_child(args, "airllm", None, False, 1, ["--setup-only"])
    if "sli" in contenders:
        for mode in args.modes:
            shutil.rmtree(Path(args.work_dir) / "sli-cache" / f"{name}-{mode}", ignore_errors=True)
            setup[f"sli-{mode}-prewarm"] = run_child(args, "sli", mode, False, 1, ["--setup-only"])
    for cache in args.caches:
        for c in contenders:
            for mode in (args.modes if c == "sli" else [None]):
                n = args.airllm_new_tokens if c.startswith("airllm") and args.airllm_new_tokens else args.new_tokens
                results.append(run_child(args, c, mode, cache == "cold", n))
    for r in results:
        pw = setup.get(f"sli-{r.get('mode')}-prewarm")
        if r.get("contender") == "sli" and pw and pw.get("ok"):
            r["prewarm_s"], r["prewarm_peak_rss_mb"] = pw["prewarm_s"], pw["peak_rss_mb"]
    fl = floors(args, results)
    uname = platform.uname()
    head = (f"Model {args.model_dir} ({size32 / 4e9:.2f} B parameters, "
            f"{sum(f.stat().st_size for f in M.safetensors_files(args.model_dir)) / 1e9:.2f} GB on disk); "
            f"budget {args.budget_gb} GB; prompt {args.prompt_len} tokens; {args.new_tokens} new tokens"
            + (f" ({args.airllm_new_tokens} for AirLLM)" if args.airllm_new_tokens else "")
            + f"; {os.cpu_count()} CPUs, {ram_bytes() / 2**30:.0f} GiB, {uname.machine}; "
            f"{datetime.date.today().isoformat()}")
    for key, r in setup.items():
        notes.append(f"set-up {key}: " + (f"{r['load_s'] + r.get('prewarm_s', 0):.1f} s, peak RSS {r['peak_rss_mb']:.0f} MB"
                                          if r.get("ok") else f"failed: {r.get('error')}"))
    text = head + "\n" + "".join(f"Note: {n}\n" for n in notes) + "\n" + report(args, results, fl)
    print("\n" + text)
    if args.json:
        Path(args.json).write_text(json.dumps({"argv": sys.argv, "header": head, "notes": notes, "results": results,
                                               "floors": fl, "setup": setup, "model_dir": str(args.model_dir)}, indent=1, default=str))
    if args.plot:
        for path in plot_runs(args, results):
            print(f"timeline: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
