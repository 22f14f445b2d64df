"""Layer-loading benchmark: one Llama-2-7B decoder layer from the LayerCache, per tier and mode.

Run: .venv/bin/python benchmarks/layer_loading.py [--quick] [--repeats 3] [--cache-dir DIR]

The layer has Llama-2-7B's shapes (hidden 4096, intermediate 11008: q/k/v/o 4096x4096,
gate/up 11008x4096, down 4096x11008, two RMSNorm weights; 202M parameters, bf16 source),
N(0, 0.02) weights, stored as NONE, INT8 and NF4. "Ready-to-run" is what the processor
does on CPU before a layer runs (sli.streaming.ready_packed): its linears multiply by the
cached bytes through the fused kernels, so only the kernels' scales are decoded and the
norms converted to float32. For each mode the same run times:

- get() from the memory tier, alone and + readying;
- get() from the disk tier with a warm and with a cold page cache (drop_caches), alone and +
  readying, beside a raw read of the same file into a reused buffer (warm and cold). The disk gets
  map the file (``mapped=True``), as the processor's CPU loader does, after reading it into the
  page cache (sendfile to /dev/null), so the bytes are read either way. A process checks a
  file's checksum on its first read and again only if the file changes; "get" rows are such
  later reads (what a streamed layer pays every token after the first), "first get" rows open
  a fresh LayerCache each time, so they include the checksum. The entry's mtime is set 10 s
  back first, as for a cache warmed earlier (a file younger than 2 s is always re-checked);
- readying alone, the xxh3 checksum alone, and, for reference, a full dequantization of
  every weight to float32 (what a GPU, or a prompt's BLAS path, does per weight).

Prints a markdown table (median of --repeats, ms) and the targets. --quick uses a layer of
hidden 1024 / intermediate 2752 and one repeat. Needs root for the cold rows (it says so
otherwise).
"""
import argparse
import datetime
import os
import platform
import shutil
import statistics
import subprocess
import tempfile
import time

import torch

from sli.cache_format import checksum
from sli.layer_cache import LayerCache
from sli.quantization import CachedLayer, QuantizationConfig, QuantizedTensor, codec_for
from sli.settings import GB
from sli.streaming import ready_packed

LINEARS = {  # module path -> (out, in) as multiples of (hidden, intermediate)
    "self_attn.q_proj": ("h", "h"), "self_attn.k_proj": ("h", "h"), "self_attn.v_proj": ("h", "h"),
    "self_attn.o_proj": ("h", "h"), "mlp.gate_proj": ("i", "h"), "mlp.up_proj": ("i", "h"),
    "mlp.down_proj": ("h", "i"),
}
NORMS = ("input_layernorm.weight", "post_attention_layernorm.weight")


def make_layer(hidden: int, intermediate: int, config: QuantizationConfig) -> CachedLayer:
    dims = {"h": hidden, "i": intermediate}
    codec = codec_for(config.mode)
    tensors, linears = {}, {}
    g = torch.Generator().manual_seed(0)
    for path, (out_dim, in_dim) in LINEARS.items():
        w = (torch.randn(dims[out_dim], dims[in_dim], generator=g) * 0.02).to(torch.bfloat16)
        q = codec.quantize(w, config)
        for name, t in q.tensors.items():
            tensors[f"{path}.{name}"] = t
        linears[path] = q.metadata
    for name in NORMS:
        tensors[name] = torch.ones(hidden, dtype=torch.bfloat16)
    return CachedLayer(tensors, linears)


def ready_to_run(entry: CachedLayer):
    """What the processor's CPU loader does before the layer runs."""
    return ready_packed(entry, torch.float32)


def dequantized(entry: CachedLayer) -> dict:
    """Every weight as a float32 tensor."""
    state = {}
    for path, meta in entry.linears.items():
        prefix = path + "."
        sub = {k[len(prefix):]: t for k, t in entry.tensors.items() if k.startswith(prefix)}
        state[path + ".weight"] = codec_for(meta["codec"]).dequantize(QuantizedTensor(sub, meta), torch.float32)
    for name in NORMS:
        state[name] = entry.tensors[name].to(torch.float32)
    return state


def drop_caches() -> bool:
    try:
        os.sync()
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
        return True
    except OSError:
        return False


_RAW_BUFFER = bytearray()


def raw_read(path: str) -> bytearray:
    """The file's bytes read into a buffer that is reused (already faulted in): pure I/O."""
    global _RAW_BUFFER
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        if len(_RAW_BUFFER) != size:
            _RAW_BUFFER = bytearray(size)
        f.readinto(_RAW_BUFFER)
    return _RAW_BUFFER


def median_ms(fn, repeats: int, before=None, setup=None) -> float:
    """Median of ``fn()``'s time; ``before()`` runs untimed ahead of each call, and with
    ``setup`` the call is ``fn(setup())``, ``setup`` untimed too."""
    times = []
    for _ in range(repeats):
        if before is not None:
            before()
        args = (setup(),) if setup is not None else ()
        t = time.perf_counter()
        fn(*args)
        times.append(time.perf_counter() - t)
    return 1e3 * statistics.median(times)


def cpu_name() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        return next(line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Model name"))
    except Exception:  # lscpu missing: the platform string will do
        return platform.processor() or "unknown CPU"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="hidden 1024 / intermediate 2752, one repeat")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--cache-dir", help="where the cache lives (default: a temporary directory, removed after)")
    args = ap.parse_args()
    hidden, intermediate = (1024, 2752) if args.quick else (4096, 11008)
    repeats = 1 if args.quick else args.repeats
    torch.set_num_threads(os.cpu_count() or 1)
    cache_dir = args.cache_dir or tempfile.mkdtemp(prefix="sli-bench-")
    cold_ok = drop_caches()
    rows = {}
    try:
        for mode in ("none", "int8", "nf4"):
            config = QuantizationConfig(mode=mode)
            entry = make_layer(hidden, intermediate, config)
            with LayerCache(cache_dir, max_cache_size_gb=8.0, max_memory_cache_size_gb=4.0) as cache, \
                    LayerCache(cache_dir, max_cache_size_gb=8.0, max_memory_cache_size_gb=0) as disk:
                nbytes = cache.put("bench", 0, config, entry)  # also in cache's memory tier
                handle = cache._disk.get(cache.key("bench", 0, config), read=True)
                handle.close()
                path = handle.name
                aged = time.time() - 10.0
                os.utime(path, (aged, aged))
                ready_to_run(entry)  # warm-up (lazy imports, compiled kernels)
                r = {"MB": nbytes / 1e6}
                dequantized(entry)
                r["fp32 dequant"] = median_ms(lambda: dequantized(entry), repeats)
                r["ready"] = median_ms(lambda: ready_to_run(entry), repeats)
                buffer = raw_read(path)
                r["xxh3"] = median_ms(lambda: checksum(buffer), repeats)
                del buffer
                r["mem get"] = median_ms(lambda: cache.get("bench", 0, config), repeats)
                r["mem get+ready"] = median_ms(lambda: ready_to_run(cache.get("bench", 0, config)), repeats)
                r["raw warm"] = median_ms(lambda: raw_read(path), repeats)
                r["disk warm get"] = median_ms(lambda: disk.get("bench", 0, config, mapped=True), repeats)
                r["disk warm get+ready"] = median_ms(lambda: ready_to_run(disk.get("bench", 0, config, mapped=True)), repeats)
                fresh = lambda: LayerCache(cache_dir, max_cache_size_gb=8.0, max_memory_cache_size_gb=0)  # noqa: E731
                first_get = lambda c: c.get("bench", 0, config, mapped=True)  # noqa: E731
                r["disk warm first get"] = median_ms(first_get, repeats, setup=fresh)
                if cold_ok:
                    r["raw cold"] = median_ms(lambda: raw_read(path), repeats, before=drop_caches)
                    r["disk cold get"] = median_ms(lambda: disk.get("bench", 0, config, mapped=True), repeats, before=drop_caches)
                    r["disk cold get+ready"] = median_ms(lambda: ready_to_run(disk.get("bench", 0, config, mapped=True)), repeats,
                                                       before=drop_caches)
                    r["disk cold first get"] = median_ms(first_get, repeats, before=drop_caches, setup=fresh)
                assert disk.stats().corrupt == 0 and disk.stats().memory_hits == 0
                rows[mode] = r
                cache.clear()
    finally:
        if not args.cache_dir:
            shutil.rmtree(cache_dir, ignore_errors=True)

    params = sum(LINEARS_numel for LINEARS_numel in [
        {"h": hidden, "i": intermediate}[o] * {"h": hidden, "i": intermediate}[i] for o, i in LINEARS.values()])
    print(f"Command: .venv/bin/python benchmarks/layer_loading.py{' --quick' if args.quick else ''}"
          f" (repeats {repeats}, median)")
    print(f"Machine: {os.cpu_count()} cores, {cpu_name()}, {psutil_gb():.0f} GiB RAM, torch {torch.__version__}; "
          f"{datetime.date.today().isoformat()}; layer {hidden}/{intermediate}, {params / 1e6:.0f}M linear params, "
          "bf16 source")
    if not cold_ok:
        print("Cold rows skipped: /proc/sys/vm/drop_caches is not writable (run as root).")
    print()
    cols = ["MB", "fp32 dequant", "ready", "xxh3", "mem get", "mem get+ready", "raw warm", "disk warm get",
            "disk warm get+ready", "disk warm first get"]
    if cold_ok:
        cols += ["raw cold", "disk cold get", "disk cold get+ready", "disk cold first get"]
    print("| mode | " + " | ".join(c + ("" if c == "MB" else " ms") for c in cols) + " |")
    print("|---" * (len(cols) + 1) + "|")
    for mode, r in rows.items():
        print(f"| {mode} | " + " | ".join(f"{r[c]:.1f}" if r[c] >= 1 else f"{r[c]:.3f}" for c in cols) + " |")
    print()
    print("| mode | disk warm get+ready ÷ (raw warm + ready) | disk cold get+ready ÷ (raw cold + ready) "
          "| mem get+ready ÷ disk cold get+ready | mem get ÷ disk cold get | xxh3 ÷ raw cold "
          "| cold first get ÷ (raw cold + xxh3) |")
    print("|---|---|---|---|---|---|---|")
    for mode, r in rows.items():
        warm = r["disk warm get+ready"] / (r["raw warm"] + r["ready"])
        if cold_ok:
            cold = r["disk cold get+ready"] / (r["raw cold"] + r["ready"])
            mem = r["mem get+ready"] / r["disk cold get+ready"]
            mem_get = r["mem get"] / r["disk cold get"]
            hash_share = r["xxh3"] / r["raw cold"]
            first = r["disk cold first get"] / (r["raw cold"] + r["xxh3"])
            print(f"| {mode} | {warm:.2f}x | {cold:.2f}x | {100 * mem:.1f}% | {100 * mem_get:.3f}% "
                  f"| {100 * hash_share:.1f}% | {first:.2f}x |")
        else:
            print(f"| {mode} | {warm:.2f}x | - | - | - | - | - |")
    if cold_ok:
        none, nf4 = rows["none"], rows["nf4"]
        print()
        print(f"NF4 vs NONE, cold get (bytes off disk, checked, parsed): "
              f"{none['disk cold get'] / nf4['disk cold get']:.2f}x faster; cold get+ready (ready-to-run): "
              f"{none['disk cold get+ready'] / nf4['disk cold get+ready']:.2f}x")


def psutil_gb() -> float:
    import psutil

    return psutil.virtual_memory().total / GB


if __name__ == "__main__":
    main()
