"""Streaming benchmark: sli beside a full transformers load, accelerate disk offload and AirLLM.

Run:
    .venv/bin/python benchmarks/streaming.py --model-dir DIR [--budget-gb 2] [--prompt-len 128]
        [--new-tokens 16] [--contenders full,accelerate,airllm,airllm-4bit,sli] [--modes none,int8,nf4]
        [--warm] [--cold] [--json out.json] [--plot timeline.png]
    .venv/bin/python benchmarks/streaming.py --synth 7b --synth-layers 8 ...   # random Llama, 7B shapes
    ... --contenders sli,llama.cpp-q4_0,llama.cpp-q8_0 --llama-cpp BUILD/bin [--cap-mb 2048] [--rounds 3]

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
the checkpoint; for sli the files of its layer cache), warm (copied from the page cache) and cold
(from the disk, four requests at once: ``_measure.time_read``; for sli's caches the faster of
``sendfile`` into the page cache and ``O_DIRECT`` past it into one reused buffer, sli's two ways
of reading a layer); the compute floor is one
token's float32 matrix-vector products through every layer and the head with the weights resident
(``_measure.compute_floor``). sli's decode time per token is compared with max(I/O, compute).

llama.cpp (``llama.cpp-q4_0``, ``llama.cpp-q8_0``, ``llama.cpp-bf16``): the same checkpoint as a GGUF
(``benchmarks/gguf_export.py``: written once beside the model directory, then ``llama-quantize``),
run by ``llama-bench -m FILE -p PROMPT -n NEW -t THREADS -r 1 --repack 0 -ngl 0 -lm mmap -o json
--progress`` started directly (no Python in its process). Its prompt test gives the prefill
seconds, its generation test (``NEW`` tokens, one at a time, from an empty context) decode
tokens/s; peak RSS is the child's ``VmHWM`` polled every 20 ms (mmapped weights count as they are
touched: ``RssFile``), bytes read are its ``/proc/PID/io`` ``read_bytes`` sampled at llama-bench's
``--progress`` lines and at its exit. llama-bench runs one warm-up of each
test first (its default) and feeds random token ids, so there are no greedy tokens to compare.
``--repack 0``: the CPU "extra buffer" repacking (AMX / AVX-512 layouts) died with SIGILL on these
Xeon VMs, and repacked weights are anonymous memory, which a memory cap would have to hold whole
(the mmapped GGUF, by contrast, is page cache the kernel can drop and read again). The build
directory comes from ``--llama-cpp DIR`` or ``$LLAMA_CPP_DIR``.

``--cap-mb N`` (root, cgroup v1): every contender run (not the one-time set-ups) lives in a fresh
memory cgroup, a child of the benchmark's own, with ``memory.limit_in_bytes`` = N MB, so its RAM
and the page cache it brings in are limited as on a machine with N MB (``benchmarks/memory_cap.py``).
The model files are evicted from the page cache before each capped run (pages cached by another
cgroup would be free for the child), the cgroup's peak usage, limit hits and OOM kills are
reported, and the ratios use the cold (disk) I/O floor.

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
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import _measure as M  # noqa: E402
import gguf_export  # noqa: E402
import memory_cap  # noqa: E402

PEER_CONTENDERS = ("full", "accelerate", "airllm", "airllm-4bit", "sli")
LLAMA_CONTENDERS = ("llama.cpp-q4_0", "llama.cpp-q8_0", "llama.cpp-bf16")
ALL_CONTENDERS = PEER_CONTENDERS + LLAMA_CONTENDERS
DEFAULT_LLAMA = ("llama.cpp-q4_0", "llama.cpp-q8_0")
# the llama.cpp file each sli mode is compared with (same bits per weight, roughly)
LLAMA_PEER = {"nf4": "llama.cpp-q4_0", "fp4": "llama.cpp-q4_0", "int4": "llama.cpp-q4_0",
              "int4-gptq": "llama.cpp-q4_0", "nf4-gptq": "llama.cpp-q4_0", "fp4-gptq": "llama.cpp-q4_0",
              "int8": "llama.cpp-q8_0", "int8_dynamic": "llama.cpp-q8_0", "fp8": "llama.cpp-q8_0",
              "none": "llama.cpp-bf16"}
MB = 1e6


def llama_quant(contender: str) -> str:
    return contender.split("-", 1)[1].upper()  # llama.cpp-q4_0 -> Q4_0


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


CPU_FLAGS = ("avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512_vnni", "avx512_bf16", "avx512_fp16",
             "avx_vnni", "amx_tile", "amx_int8", "amx_bf16")


def cpu_info() -> dict:
    """The CPU's model name and the SIMD flags that decide the kernels (``/proc/cpuinfo``)."""
    model, flags = platform.processor() or "?", set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, val = line.partition(":")
                if key.strip() == "model name" and model in ("?", "", "x86_64"):
                    model = val.strip()
                elif key.strip() == "flags":
                    flags = set(val.split())
                    break
    except OSError:
        pass
    return {"model": model, "flags": [f for f in CPU_FLAGS if f in flags]}


def prime(paths) -> None:
    """Read every file under ``paths`` once so a warm run finds them in the page cache."""
    for p in paths:
        if Path(p).exists():
            M.time_read(M.file_ranges(p), cold=False)


def bench_files(args) -> list:
    """Every file set a contender may read: the model, AirLLM's shards, sli's caches, the GGUFs."""
    name = Path(args.model_dir).resolve().name
    out = [args.model_dir, Path(args.work_dir) / "airllm-shards" / name]
    out += [Path(args.work_dir) / "sli-cache" / f"{name}-{m}" for m in args.modes]
    if getattr(args, "ggufs", None):
        out += list(args.ggufs["files"].values())
    return out


def prepare_cache(args, contender, mode, cold) -> None:
    """Cold: drop the page cache. Capped: evict the model files (so the child pays for what it
    reads). Otherwise prime the files this contender reads."""
    if cold:
        if not M.drop_caches():
            print("  (cannot drop the page cache: not root; the cold run is warm)", flush=True)
    elif args.cap_mb:
        memory_cap.evict(bench_files(args))
    elif contender.startswith("llama.cpp"):
        prime([args.ggufs["files"][llama_quant(contender)]])
    else:
        name = Path(args.model_dir).resolve().name
        prime([args.model_dir, Path(args.work_dir) / "airllm-shards" / name,
               Path(args.work_dir) / "sli-cache" / f"{name}-{mode}" if mode else ""])


def make_cap(args, capped: bool):
    return memory_cap.MemoryCap(args.cap_mb) if capped and args.cap_mb else None


def finish_cap(cap, result: dict, pid_cgroup) -> None:
    """Attach the cgroup's figures to ``result`` and remove the cgroup."""
    if cap is None:
        return
    st = cap.stats()
    st["child_cgroup"] = pid_cgroup
    st["child_in_cgroup"] = pid_cgroup == cap.rel
    result["memory_cap"] = st
    if not cap.close():
        print(f"  (could not remove the cgroup {cap.path})", flush=True)


def report_line(result: dict) -> None:
    if result.get("ok") and "prefill_s" not in result:
        print(f"   done: {json.dumps({k: v for k, v in result.items() if k.endswith(('_s', '_mb', '_bytes'))})}")
    elif result.get("ok"):
        print(f"   prefill {result['prefill_s']:.2f} s, decode {result.get('decode_tok_s', float('nan')):.3f} tok/s, "
              f"peak RSS {result['peak_rss_mb']:.0f} MB, wall {result['wall_s']:.0f} s", flush=True)
    else:
        print(f"   FAILED: {result.get('error')}", flush=True)
    cap = result.get("memory_cap")
    if cap:
        print(f"   cgroup {cap['cgroup']} (cap {cap['cap_mb']:.0f} MB): peak {fmt(cap['max_usage_mb'], '.0f')} MB, "
              f"at the cap: {cap['hit_limit']} (failcnt {cap['failcnt']}), OOM kills {cap['oom_kills']}, "
              f"child inside: {cap['child_in_cgroup']}",
              flush=True)


def watch_cgroup(proc, cap, wait_s: float = 5.0):
    """The memory cgroup ``proc`` lives in once the wrapper has moved it (polled for up to
    ``wait_s``), or None without a cap."""
    if cap is None:
        return None
    seen, deadline = None, time.perf_counter() + wait_s
    while time.perf_counter() < deadline:  # no proc.poll(): it would reap a child run_llama_cpp waits for itself
        seen = memory_cap.cgroup_of(proc.pid)
        if seen == cap.rel:
            break
        time.sleep(0.01)
    return seen


def run_child(args, contender, mode, cold, new_tokens, extra=(), capped=True) -> dict:
    if contender.startswith("llama.cpp"):
        return run_llama_cpp(args, contender, cold, new_tokens, capped=capped)
    out = Path(tempfile.mkstemp(prefix=f"{contender}-", suffix=".json", dir=args.work_dir)[1])
    cmd = [sys.executable, str(HERE / "peers.py"), "--contender", contender, "--model-dir", str(args.model_dir),
           "--out", str(out), "--budget-gb", str(args.budget_gb), "--prompt-len", str(args.prompt_len),
           "--new-tokens", str(new_tokens), "--work-dir", str(args.work_dir)]
    if mode:
        cmd += ["--mode", mode]
    cmd += list(extra)
    if cold:
        cmd.append("--cold")
    prepare_cache(args, contender, mode, cold)
    label = contender + (f"[{mode}]" if mode else "")
    cap = make_cap(args, capped)
    print(f"-- {label} ({'cold' if cold else 'warm'}{f', cap {args.cap_mb} MB' if cap else ''}): "
          f"{' '.join(cmd[1:])}", flush=True)
    t0 = time.perf_counter()
    env = dict(os.environ, TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    proc = subprocess.Popen(cap.wrap(cmd) if cap else cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, errors="replace", env=env)
    pid_cgroup = watch_cgroup(proc, cap)
    try:
        output, _ = proc.communicate(timeout=args.timeout)
        tail = output.strip().splitlines()[-3:]
        result = json.loads(out.read_text()) if out.stat().st_size else {
            "contender": contender, "ok": False, "error": f"child exited {proc.returncode}: {' | '.join(tail)}"}
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        result = {"contender": contender, "ok": False, "error": f"timed out after {args.timeout}s"}
    finally:
        out.unlink(missing_ok=True)
    finish_cap(cap, result, pid_cgroup or result.get("memory_cgroup"))
    if cap and not result.get("ok") and result["memory_cap"].get("oom_kills"):
        result["error"] = f"{result.get('error')} ({memory_cap_kill(result)})"
    result.update(label=label, mode=mode, cache="cold" if cold else "warm", wall_s=time.perf_counter() - t0)
    report_line(result)
    return result


def _proc_status_kb(pid: int, fields=("VmHWM", "RssAnon", "RssFile")) -> dict:
    out = {}
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                key = line.split(":", 1)[0]
                if key in fields:
                    out[key] = int(line.split()[1])
    except OSError:
        pass
    return out


def run_llama_cpp(args, contender, cold, new_tokens, capped=True) -> dict:
    """One ``llama-bench`` run of ``contender``'s GGUF, in the shape of ``peers.py``'s results."""
    import re
    import threading

    quant = llama_quant(contender)
    gguf = args.ggufs["files"][quant]
    threads = args.llama_threads
    cmd = [str(args.llama_bin / "llama-bench"), "-m", str(gguf), "-p", str(args.prompt_len), "-n", str(new_tokens),
           "-t", str(threads), "-r", "1", "--repack", "0", "-ngl", "0", "-lm", "mmap", "-o", "json", "--progress"]
    prepare_cache(args, contender, None, cold)
    cap = make_cap(args, capped)
    print(f"-- {contender} ({'cold' if cold else 'warm'}{f', cap {args.cap_mb} MB' if cap else ''}): "
          f"{' '.join(cmd)}", flush=True)
    result = {"contender": contender, "mode": None, "ok": False, "prompt_len": args.prompt_len,
              "new_tokens": new_tokens, "threads": threads, "gguf": str(gguf), "gguf_bytes": gguf.stat().st_size,
              "config": " ".join(["llama-bench"] + cmd[1:]), "baseline_rss_mb": None, "tokens": None}
    stdout = tempfile.TemporaryFile(mode="w+", dir=args.work_dir)
    marks = []  # (phase text, time, read_bytes)
    log_tail = []
    t0 = time.perf_counter()
    proc = subprocess.Popen(cap.wrap(cmd) if cap else cmd, stdout=stdout, stderr=subprocess.PIPE, text=True,
                            errors="replace")
    killed = []
    timer = threading.Timer(args.timeout, lambda: (killed.append(True), proc.kill()))
    timer.start()
    pid_cgroup = watch_cgroup(proc, cap)
    # Peak RSS: the child's own VmHWM, polled (ru_maxrss from wait4 would carry the forking Python's
    # RSS across exec); also the largest anonymous / file-backed RSS seen.
    peaks = {"VmHWM": 0, "RssAnon": 0, "RssFile": 0}
    done = threading.Event()

    def poll_status():
        while not done.is_set():
            for k, v in _proc_status_kb(proc.pid).items():
                peaks[k] = max(peaks[k], v)
            done.wait(0.02)

    poller = threading.Thread(target=poll_status, daemon=True)
    poller.start()
    progress = re.compile(r"llama-bench: benchmark (\d+)/(\d+): (.*)$")
    try:
        for line in proc.stderr:
            line = line.rstrip("\n")
            m = progress.search(line)
            if m:
                marks.append((f"{m.group(1)}: {m.group(3)}", time.perf_counter(), M.read_bytes(proc.pid)))
            elif line.strip():
                log_tail = (log_tail + [line.strip()])[-6:]
        os.waitid(os.P_PID, proc.pid, os.WEXITED | os.WNOWAIT)  # exited, not reaped: /proc/PID/io still there
        end_read = M.read_bytes(proc.pid)
        done.set()
        poller.join()
        _, status, _ = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
    finally:
        done.set()
        timer.cancel()
        if proc.returncode is None:
            proc.kill()
            proc.wait()
    wall = time.perf_counter() - t0
    finish_cap(cap, result, pid_cgroup)
    stdout.seek(0)
    text = stdout.read()
    stdout.close()
    result.update(label=contender, cache="cold" if cold else "warm", wall_s=wall,
                  peak_rss_mb=peaks["VmHWM"] / 1024, peak_rss_anon_mb=peaks["RssAnon"] / 1024,
                  peak_rss_file_mb=peaks["RssFile"] / 1024, read_bytes=end_read, progress=[(p, t - t0, rb) for p, t, rb in marks])
    try:
        tests = json.loads(text) if text.strip() else []
    except json.JSONDecodeError:
        tests = []
    pp = next((t for t in tests if t.get("n_prompt") and not t.get("n_gen")), None)
    tg = next((t for t in tests if t.get("n_gen") and not t.get("n_prompt")), None)
    if proc.returncode != 0 or pp is None or tg is None:
        why = (f"timed out after {args.timeout}s" if killed else f"llama-bench exited {proc.returncode}"
               + (f" ({memory_cap_kill(result)})" if result.get("memory_cap") else ""))
        result["error"] = f"{why}: {' | '.join(log_tail[-3:])}"
        report_line(result)
        return result

    def mark(prefix):
        return next(((t, rb) for p, t, rb in marks if p.startswith(prefix)), (None, None))

    start1, _ = mark("1: starting")
    warm1, _ = mark("1: warmup")  # "starting" is printed before the model loads, the warm-up after
    _, pp_rb = mark("1: prompt run")
    _, start2_rb = mark("2: starting")
    _, tg_rb = mark("2: generation run")
    result.update(ok=True, prefill_s=pp["avg_ns"] / 1e9, prompt_tok_s=pp["avg_ts"],
                  decode_tok_s=tg["avg_ts"], decode_s_per_token=tg["avg_ns"] / 1e9 / tg["n_gen"],
                  decode_steps=tg["n_gen"], load_s=(warm1 - start1) if start1 and warm1 else None,
                  generate_peak_rss_mb=None, llama_bench=tests)
    if pp_rb is not None and start2_rb is not None and pp_rb >= 0:
        result["prefill_read_bytes"] = start2_rb - pp_rb
    if tg_rb is not None and tg_rb >= 0 and end_read >= 0:
        result["decode_read_bytes_per_token"] = (end_read - tg_rb) / tg["n_gen"]
    report_line(result)
    return result


def memory_cap_kill(result) -> str:
    cap = result["memory_cap"]
    return f"cgroup OOM kills {cap.get('oom_kills')}, peak {fmt(cap.get('max_usage_mb'), '.0f')} MB of {cap['cap_mb']:.0f}"


def floors(args, results) -> dict:
    ranges, layer_bytes, other_bytes = M.layer_ranges(args.model_dir)
    out = {"checkpoint_layer_bytes": layer_bytes, "checkpoint_other_bytes": other_bytes, "io": {}}
    sources = {"checkpoint": ranges}
    name = Path(args.model_dir).resolve().name
    for mode in args.modes:
        cache = Path(args.work_dir) / "sli-cache" / f"{name}-{mode}"
        if cache.exists() and M.dir_bytes(cache):
            sources[f"sli-{mode}"] = M.file_ranges(cache)
    for c in sorted({r["contender"] for r in results if r["contender"].startswith("llama.cpp")}):
        path = args.ggufs["files"][llama_quant(c)]
        sources[c] = [(path, 0, path.stat().st_size)]
    for key, rng in sources.items():
        warm_s, nbytes = M.time_read(rng, cold=False)
        warm_s, nbytes = M.time_read(rng, cold=False)  # the first pass may have been cold
        row = {"bytes": nbytes, "warm_s": warm_s}
        if ("cold" in args.caches or args.cap_mb) and M.can_drop_caches():
            # the disk's speed either way sli reads (sendfile into the page cache; O_DIRECT for the
            # layers the page cache has no room for, whole files): the floor is the faster
            row["cold_s"] = row["cold_sendfile_s"] = M.time_read(rng, cold=True)[0]
            if key.startswith("sli-"):  # whole files of a layer each (the others: byte ranges, or one file)
                row["cold_direct_s"] = M.time_read(rng, cold=True, direct=True)[0]
                row["cold_s"] = min(row["cold_sendfile_s"], row["cold_direct_s"])
        out["io"][key] = row
    out["compute"] = M.compute_floor(args.model_dir)
    return out


def fmt(x, spec=".2f", none="-"):
    return none if x is None else format(x, spec)


def io_floor_s(fl, key, cache, capped) -> tuple:
    """(seconds, bytes) to read ``key``'s files once: cold (from disk) for cold runs and under a
    memory cap (the files do not stay cached), warm otherwise."""
    io = fl["io"].get(key, fl["io"]["checkpoint"])
    cold = cache == "cold" or capped
    return io.get("cold_s" if cold else "warm_s", io["warm_s"]), io["bytes"]


def show_cache(args, cache: str) -> str:
    return cache if not args.cap_mb else ("capped" if cache == "warm" else "cold, capped")


def report(args, results, fl) -> str:
    lines = []
    ref = {}  # cache -> tokens of the first unquantized contender
    for r in results:
        if (r.get("ok") and (r["contender"] != "sli" or r.get("mode") == "none") and r["contender"] != "airllm-4bit"
                and r.get("tokens") is not None):
            ref.setdefault(r["cache"], r["tokens"])
    capped = bool(args.cap_mb)
    cap_cols = " cgroup peak MB | at the cap / OOM kills |" if capped else ""
    lines.append("| contender | cache | load s | prefill s | decode tok/s | s/token | peak RSS MB | baseline RSS MB "
                 "| peak RSS in generate MB | MB read/token | greedy tokens |" + cap_cols)
    lines.append("|---|---|---|---|---|---|---|---|---|---|---|" + ("---|---|" if capped else ""))
    for r in results:
        cap = r.get("memory_cap") or {}
        cap_txt = (f" {fmt(cap.get('max_usage_mb'), '.0f')} | {'yes' if cap.get('hit_limit') else 'no'} / {cap.get('oom_kills')}"
                   + ("" if cap.get("child_in_cgroup", True) else " (child NOT in the cgroup)") + " |") if capped else ""
        shown = show_cache(args, r["cache"])
        if not r.get("ok"):
            lines.append(f"| {r['label']} | {shown} | failed: {r.get('error', '?')} |||||||||" + cap_txt)
            continue
        toks = r.get("tokens")
        if toks is None:
            agree = "n/a (random ids)"
        elif r["cache"] not in ref:
            agree = "- (no unquantized run)"
        else:
            base = ref.get(r["cache"], [])
            n = min(len(toks), len(base))
            same = toks[:n] == base[:n]
            agree = ("same" if same else "differ") + (f" (first {n})" if n < len(base) else "")
            if r["contender"] == "sli" and r.get("mode") != "none":
                agree += " (quantized)"
        extra = r.get("prewarm_s")
        load = fmt(r.get("load_s")) + (f" (+{extra:.1f} prewarm)" if extra is not None else "")
        rb = r.get("decode_read_bytes_per_token")
        lines.append(f"| {r['label']} | {shown} | {load} | {fmt(r['prefill_s'])} | {fmt(r.get('decode_tok_s'), '.3f')} "
                     f"| {fmt(r.get('decode_s_per_token'), '.3f')} | {r['peak_rss_mb']:.0f} "
                     f"| {fmt(r.get('baseline_rss_mb'), '.0f')} "
                     f"| {fmt(r.get('generate_peak_rss_mb'), '.0f')} "
                     f"| {fmt(None if rb is None else rb / MB, '.0f')} | {agree} |" + cap_txt)
    lines.append("")
    comp = fl["compute"]
    lines.append(f"Compute floor (fp32 matrix-vector, one token, weights resident): layers {comp['layers_s']:.3f} s + "
                 f"head {comp['head_s']:.3f} s = {comp['total_s']:.3f} s/token.")
    for key, row in fl["io"].items():
        lines.append(f"I/O floor, {key}: {row['bytes'] / MB:.0f} MB in {row['warm_s']:.3f} s warm"
                     + (f", {row['cold_s']:.3f} s cold" if "cold_s" in row else "")
                     + (f" (the faster of sendfile {row['cold_sendfile_s']:.3f} s and O_DIRECT "
                        f"{row['cold_direct_s']:.3f} s)" if "cold_direct_s" in row else "")
                     + f" ({row['bytes'] / MB / row['warm_s']:.0f} MB/s warm"
                     + (f", {row['bytes'] / MB / row['cold_s']:.0f} MB/s cold)" if "cold_s" in row else ")"))
    if capped:
        lines.append(f"Under the {args.cap_mb} MB cap the disk floor is the cold read above: a model larger than the "
                     "cap is read from disk again every token, less what the cap lets stay cached. Cache 'capped' = "
                     "the model files evicted from the page cache before the run, not dropped during it.")
    lines.append("")
    # ratios, within each round
    by = {(r["contender"], r.get("mode"), r["cache"], r.get("round", 0)): r for r in results if r.get("ok")}
    rows, decode_ratios = [], {}
    for cache, mode, round_ in ((c, m, k) for c in args.caches for m in args.modes for k in range(args.rounds)):
        s = by.get(("sli", mode, cache, round_))
        if s is None or not s.get("decode_tok_s"):
            continue
        air, acc, full = (by.get((c, None, cache, round_)) for c in ("airllm", "accelerate", "full"))
        lname = LLAMA_PEER.get(mode)
        lc = by.get((lname, None, cache, round_)) if lname else None
        if lc and lc.get("decode_tok_s"):
            decode_ratios.setdefault((mode, cache), []).append(s["decode_tok_s"] / lc["decode_tok_s"])
        io_s, _ = io_floor_s(fl, f"sli-{mode}", cache, capped)
        floor = max(io_s, comp["total_s"])
        lc_dec = f"{fmt(s['decode_tok_s'] / lc['decode_tok_s'])}x ({lname[10:]})" if lc and lc.get("decode_tok_s") else "-"
        lc_pre = (f"{fmt((args.prompt_len / s['prefill_s']) / lc['prompt_tok_s'])}x" if lc and lc.get("prompt_tok_s")
                  else "-")
        rows.append(f"| {s['label']} | {show_cache(args, cache)} | {lc_dec} | {lc_pre} "
                    f"| {fmt(s['decode_tok_s'] / air['decode_tok_s'] if air and air.get('decode_tok_s') else None)}x "
                    f"| {fmt(s['decode_tok_s'] / acc['decode_tok_s'] if acc and acc.get('decode_tok_s') else None)}x "
                    f"| {fmt(s['decode_s_per_token'] / floor)}x (floor {floor:.3f} s: {'I/O' if io_s >= comp['total_s'] else 'compute'}) "
                    f"| {fmt(s['prefill_s'] / full['prefill_s'] if full else None)}x |")
    if rows:
        lines.append("| sli | cache | decode tok/s ÷ llama.cpp | prompt tok/s ÷ llama.cpp | ÷ AirLLM | ÷ accelerate "
                     "| s/token ÷ max(I/O, compute floor) | prefill ÷ full prefill |")
        lines.append("|---|---|---|---|---|---|---|---|")
        lines.extend(rows)
        if args.rounds > 1:
            for (mode, cache), ratios in decode_ratios.items():
                lines.append(f"\nsli[{mode}] {show_cache(args, cache)} decode ÷ {LLAMA_PEER[mode][10:]} over "
                             f"{len(ratios)} rounds: median {statistics.median(ratios):.2f}x "
                             f"({', '.join(f'{x:.2f}' for x in ratios)})")
    else:
        lines.append("sli ratios: no successful sli run in this invocation.")
    budget_mb = args.budget_gb * 1024
    for r in results:
        if r.get("ok") and r["contender"] == "sli" and r.get("import_rss_mb"):
            above = r["peak_rss_mb"] - r["import_rss_mb"]
            lines.append(f"\n{r['label']} {show_cache(args, r['cache'])}: peak RSS {r['peak_rss_mb']:.0f} MB = "
                         f"{r['import_rss_mb']:.0f} MB with sli imported + {above:.0f} MB, "
                         f"{above / budget_mb:.0%} of the {budget_mb:.0f} MB budget")
    lrows = []
    for r in results:
        if r.get("ok") and r["contender"].startswith("llama.cpp") and r.get("decode_s_per_token"):
            io_s, nbytes = io_floor_s(fl, r["contender"], r["cache"], capped)
            floor = max(io_s, comp["total_s"])
            lrows.append(f"| {r['label']} | {show_cache(args, r['cache'])} | {nbytes / MB:.0f} | {args.prompt_len / r['prefill_s']:.1f} "
                         f"| {fmt(r['decode_s_per_token'] / floor)}x (floor {floor:.3f} s: "
                         f"{'I/O' if io_s >= comp['total_s'] else 'compute'}) |")
    if lrows:
        lines.append("")
        lines.append("| llama.cpp | cache | GGUF MB | prompt tok/s | s/token ÷ max(I/O, compute floor) |")
        lines.append("|---|---|---|---|---|")
        lines.extend(lrows)
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
    p = argparse.ArgumentParser(description="sli beside llama.cpp, full transformers, accelerate disk offload and "
                                            "AirLLM.")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--model-dir", help="a local transformers model directory (safetensors)")
    src.add_argument("--synth", help="build a random Llama of this sli.synth preset (168m, 7b, ...) in --work-dir")
    p.add_argument("--synth-layers", type=int, default=None, help="decoder layers of the --synth model")
    p.add_argument("--contenders", default=None,
                   help=f"comma-separated, from {', '.join(ALL_CONTENDERS)} (default: {', '.join(PEER_CONTENDERS)}, "
                        f"and {', '.join(DEFAULT_LLAMA)} when a llama.cpp build is given)")
    p.add_argument("--modes", default="none,int8,nf4", help="sli quantization modes")
    p.add_argument("--budget-gb", type=float, default=2.0, help="RAM budget for accelerate's max_memory and sli")
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--new-tokens", type=int, default=16)
    p.add_argument("--airllm-new-tokens", type=int, default=None, help="fewer new tokens for AirLLM (slow)")
    p.add_argument("--warm", action="store_true", help="warm page cache runs (default: both)")
    p.add_argument("--cold", action="store_true", help="cold page cache runs (default: both)")
    p.add_argument("--work-dir", default=os.path.join(tempfile.gettempdir(), "slibench"))
    p.add_argument("--timeout", type=int, default=600, help="seconds per contender run")
    p.add_argument("--rounds", type=int, default=1,
                   help="run every contender this many times, the order reversed every other round, and give "
                        "each round's ratios (the machine's speed drifts between runs)")
    p.add_argument("--llama-cpp", metavar="DIR", default=None,
                   help="llama.cpp build directory with llama-bench and llama-quantize (default: $LLAMA_CPP_DIR)")
    p.add_argument("--llama-threads", type=int, default=None,
                   help="llama-bench -t (default: torch's thread count, what sli computes with)")
    p.add_argument("--keep-gguf-16bit", action="store_true",
                   help="keep the 16-bit GGUF after quantizing (as large as the checkpoint; needed again only "
                        "to re-quantize or for llama.cpp-bf16)")
    p.add_argument("--keep-setup", action="store_true",
                   help="reuse sli's layer caches (and AirLLM's shards) from an earlier run in --work-dir: the "
                        "prewarm then only fills what is missing (its time is no longer a from-scratch figure)")
    p.add_argument("--cap-mb", type=int, default=None, metavar="N",
                   help="run every contender in a cgroup v1 memory cgroup limited to N MB of RAM + page cache "
                        "(root; set-ups run uncapped)")
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
    if args.rounds < 1:
        p.error(f"--rounds {args.rounds}: pass 1 or more (each round runs every contender once)")
    if args.cap_mb is not None:
        if args.cap_mb <= 0:
            p.error("--cap-mb must be a positive number of MB")
        try:
            memory_cap.check()
        except memory_cap.CapError as exc:
            p.error(str(exc))
    explicit = args.contenders is not None
    contenders = [c.strip() for c in args.contenders.split(",") if c.strip()] if explicit else list(PEER_CONTENDERS)
    bad = set(contenders) - set(ALL_CONTENDERS)
    if bad:
        p.error(f"unknown contenders {sorted(bad)}; choose from {', '.join(ALL_CONTENDERS)}")
    args.llama_bin = None
    if any(c.startswith("llama.cpp") for c in contenders) or (not explicit and (args.llama_cpp or
                                                                                os.environ.get("LLAMA_CPP_DIR"))):
        try:
            args.llama_bin = gguf_export.find_llama_cpp(args.llama_cpp)
        except gguf_export.ExportError as exc:
            p.error(str(exc))
        if not explicit:
            contenders += list(DEFAULT_LLAMA)
    Path(args.work_dir).mkdir(parents=True, exist_ok=True)
    args.model_dir = Path(args.model_dir) if args.model_dir else build_model(args)
    args.caches = [c for c, on in (("warm", args.warm), ("cold", args.cold)) if on] or ["warm", "cold"]
    args.modes = [m.strip().lower() for m in args.modes.split(",") if m.strip()]
    if args.llama_threads is None:
        import torch

        args.llama_threads = torch.get_num_threads()
    if "cold" in args.caches and not M.can_drop_caches():
        print("note: not root, the page cache cannot be dropped; 'cold' runs are warm", flush=True)
    notes = []
    size32 = fp32_bytes(args.model_dir)
    if "full" in contenders and size32 > 0.7 * ram_bytes():
        contenders.remove("full")
        notes.append(f"full skipped: {size32 / 1e9:.1f} GB in fp32 > 70% of {ram_bytes() / 1e9:.1f} GB RAM")
    results, setup = [], {}
    args.ggufs = None
    llamas = [c for c in contenders if c.startswith("llama.cpp")]
    if llamas:
        # One-time: the checkpoint as GGUF files beside it (reused while the model is unchanged).
        print(f"-- GGUF for llama.cpp ({', '.join(llama_quant(c) for c in llamas)})", flush=True)
        try:
            t0 = time.perf_counter()
            args.ggufs = gguf_export.ensure_ggufs(
                args.model_dir, args.llama_bin, [llama_quant(c) for c in llamas], work_dir=args.work_dir,
                keep_16bit=args.keep_gguf_16bit or "llama.cpp-bf16" in llamas, log=lambda m: print(m, flush=True))
            setup["gguf"] = {"ok": True, "seconds": time.perf_counter() - t0, "dir": str(args.ggufs["dir"]),
                             "made": args.ggufs["made_now"], "llama_cpp": gguf_export.llama_cpp_version(args.llama_bin)}
        except gguf_export.ExportError as exc:
            if explicit:
                p.exit(2, f"error: {exc}\n")
            notes.append(f"llama.cpp skipped: {exc}")
            contenders = [c for c in contenders if not c.startswith("llama.cpp")]
    # One-time conversions (AirLLM's per-layer split, sli's cache fill) from scratch, each in its own
    # process, so that their time and peak RSS are reported apart from the runs.
    name = Path(args.model_dir).resolve().name
    if any(c.startswith("airllm") for c in contenders):
        if not args.keep_setup:
            shutil.rmtree(Path(args.work_dir) / "airllm-shards" / name, ignore_errors=True)
        setup["airllm-split"] = run_child(args, "airllm", None, False, 1, ["--setup-only"], capped=False)
    if "sli" in contenders:
        for mode in args.modes:
            if not args.keep_setup:
                shutil.rmtree(Path(args.work_dir) / "sli-cache" / f"{name}-{mode}", ignore_errors=True)
            setup[f"sli-{mode}-prewarm"] = run_child(args, "sli", mode, False, 1, ["--setup-only"], capped=False)
    for round_ in range(args.rounds):
        for cache in args.caches:
            for c in (contenders if round_ % 2 == 0 else contenders[::-1]):
                for mode in (args.modes if c == "sli" else [None]):
                    n = args.airllm_new_tokens if c.startswith("airllm") and args.airllm_new_tokens else args.new_tokens
                    result = run_child(args, c, mode, cache == "cold", n)
                    result["round"] = round_
                    if args.rounds > 1:
                        result["label"] += f" r{round_}"
                    results.append(result)
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
            f"{datetime.date.today().isoformat()}"
            + (f"; memory cap {args.cap_mb} MB (cgroup v1) on every contender run" if args.cap_mb else ""))
    cpu = cpu_info()
    head += f"\nCPU: {cpu['model']}; flags: {' '.join(cpu['flags']) or '-'}"
    if setup.get("gguf"):
        g = setup["gguf"]
        head += (f"\nllama.cpp: {g['llama_cpp']} ({args.llama_bin}); llama-bench -t {args.llama_threads} -r 1 "
                 f"--repack 0 -ngl 0 -lm mmap; GGUFs in {g['dir']}")
    for key, r in setup.items():
        if key == "gguf":
            made = ", ".join(f"{q} {m['bytes'] / MB:.0f} MB in {m['seconds']:.1f} s" for q, m in r["made"].items())
            notes.append(f"set-up gguf: {made + (' (uncapped)' if args.cap_mb else '') if made else 'reused the GGUFs made earlier'}")
            continue
        notes.append(f"set-up {key}: " + (f"{r['load_s'] + r.get('prewarm_s', 0):.1f} s, peak RSS {r['peak_rss_mb']:.0f} MB"
                                          if r.get("ok") else f"failed: {r.get('error')}")
                     + (" (uncapped)" if args.cap_mb else ""))
    text = head + "\n" + "".join(f"Note: {n}\n" for n in notes) + "\n" + report(args, results, fl)
    print("\n" + text)
    if args.json:
        Path(args.json).write_text(json.dumps({"argv": sys.argv, "header": head, "notes": notes, "results": results,
                                               "floors": fl, "setup": setup, "model_dir": str(args.model_dir),
                                               "cap_mb": args.cap_mb, "cpu": cpu}, indent=1, default=str))
    if args.plot:
        for path in plot_runs(args, results):
            print(f"timeline: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
