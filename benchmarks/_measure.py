"""Measurement helpers shared by the streaming benchmark and its per-contender children.

Everything here reads Linux ``/proc`` files: peak RSS is ``VmHWM`` of the process itself
(``ru_maxrss`` survives ``exec`` and would report the parent's peak), disk traffic is
``read_bytes`` of ``/proc/self/io`` (bytes that really came from the block device: page-cache
hits count zero), and a cold page cache is ``echo 3 > /proc/sys/vm/drop_caches`` (root only).
"""
from __future__ import annotations

import json
import os
import struct
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Dict, Iterable, List, Tuple

from sli.cache_disk import read_direct, send_to_null
from sli.layer_store import owned_buffer
from sli.streaming import ReadBuffers
from sli.synth import layer_of  # the one parser of layer names

MB = 1024 * 1024


def proc_status_kb(field: str) -> int:
    """A ``kB`` field of ``/proc/self/status`` (``VmRSS``, ``VmHWM``), or -1 when absent."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return -1


def rss_mb() -> float:
    return proc_status_kb("VmRSS") / 1024


def peak_rss_mb() -> float:
    return proc_status_kb("VmHWM") / 1024


def reset_peak_rss() -> bool:
    """Reset ``VmHWM`` to the current RSS (``clear_refs`` 5, Linux >= 4.0); False if refused."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def read_bytes(pid="self") -> int:
    """Bytes a process (all threads; default this one) has read from the block device so far, or -1."""
    try:
        with open(f"/proc/{pid}/io") as f:
            for line in f:
                if line.startswith("read_bytes:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return -1


def can_drop_caches() -> bool:
    return os.access("/proc/sys/vm/drop_caches", os.W_OK)


def drop_caches() -> bool:
    """Write back dirty pages and drop the page cache; False (and nothing done) without root."""
    if not can_drop_caches():
        return False
    os.sync()
    try:
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
    except OSError:
        return False
    return True


def dir_bytes(path) -> int:
    """Total size of the regular files under ``path``."""
    total = 0
    for root, _, files in os.walk(path):
        for name in files:
            p = os.path.join(root, name)
            if os.path.isfile(p) and not os.path.islink(p):
                total += os.path.getsize(p)
    return total


# ----------------------------------------------------------------------------- checkpoints
def safetensors_files(model_dir) -> List[Path]:
    return sorted(Path(model_dir).glob("*.safetensors"))


def _header(path: Path) -> Tuple[int, Dict[str, dict]]:
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
    header.pop("__metadata__", None)
    return 8 + n, header



def layer_ranges(model_dir) -> Tuple[List[Tuple[Path, int, int]], int, int]:
    """Byte ranges of the decoder layers' tensors in the checkpoint.

    Returns ``(ranges, layer_bytes, other_bytes)``: ``ranges`` is ``(file, offset, length)``
    for each decoder-layer tensor, ``other_bytes`` the embeddings / norm / head.
    """
    ranges, layer_total, other = [], 0, 0
    for path in safetensors_files(model_dir):
        base, header = _header(path)
        for name, info in header.items():
            start, end = info["data_offsets"]
            if layer_of(name) is None:
                other += end - start
            else:
                ranges.append((path, base + start, end - start))
                layer_total += end - start
    ranges.sort(key=lambda r: (str(r[0]), r[1]))
    return ranges, layer_total, other


def model_shapes(model_dir) -> dict:
    with open(Path(model_dir) / "config.json") as f:
        cfg = json.load(f)
    return cfg


def time_read(ranges: Iterable[Tuple[Path, int, int]], cold: bool, chunk: int = 16 * MB,
              streams: int = 4, direct: bool = False) -> Tuple[float, int]:
    """Read every ``(file, offset, length)`` once; ``(seconds, bytes)``.

    ``cold`` drops the page cache first (the drop itself is not timed) and reads from the disk
    as fast as it serves: ``streams`` chunks at once, each sent to /dev/null (the way sli pages
    a layer in: on these VMs one stream reads 1.65-1.85 GB/s, four 1.95-2.0, and a copy into
    this process ~1.4), or with ``direct`` (whole files only) each file read past the page cache
    into one reused buffer (huge pages, faulted in before the timing), four parts at once, by
    ``sli.cache_disk.read_direct``: the way sli reads the layers the page cache has no room for.
    Warm, the chunks are copied into one reused buffer, a pass over memory.
    """
    ranges = list(ranges)
    if direct and any(offset or length != Path(path).stat().st_size for path, offset, length in ranges):
        raise ValueError("time_read(direct=True) reads whole files only")
    if cold:
        drop_caches()
    if direct:
        buffer = owned_buffer(ReadBuffers.rounded(max(length for _, _, length in ranges)))  # as sli's
        buffer.write(bytes(len(buffer)))  # faulted in before the timing, as sli's reused buffers are
        t0 = time.perf_counter()
        total = sum(read_direct(str(path), buffer, length, streams) for path, _, length in ranges)
        return time.perf_counter() - t0, total
    fds: Dict[Path, int] = {}
    try:
        for path, _, _ in ranges:
            if path not in fds:
                fds[path] = os.open(path, os.O_RDONLY)
        pieces = [(fds[path], start, min(chunk, offset + length - start))
                  for path, offset, length in ranges for start in range(offset, offset + length, chunk)]
        t0 = time.perf_counter()
        if cold:  # what sli.cache_disk.page_in does, over byte ranges
            with ThreadPoolExecutor(streams) as pool:
                total = sum(pool.map(lambda piece: send_to_null(piece[0], piece[1], piece[1] + piece[2]), pieces))
        else:
            view = memoryview(bytearray(chunk))
            total = sum(_copy(view, *piece) for piece in pieces)
        return time.perf_counter() - t0, total
    finally:
        for fd in fds.values():
            os.close(fd)


def _copy(view: memoryview, fd: int, offset: int, length: int) -> int:
    done = 0
    while done < length:
        n = os.preadv(fd, [view[:length - done]], offset + done)
        if n <= 0:
            break
        done += n
    return done


def file_ranges(path) -> List[Tuple[Path, int, int]]:
    """Whole files under ``path`` as ranges (for a cache directory)."""
    out = []
    for root, _, files in os.walk(path):
        for name in sorted(files):
            p = Path(root) / name
            if p.is_file() and not p.is_symlink():
                out.append((p, 0, p.stat().st_size))
    return out


def compute_floor(model_dir, repeats: int = 3) -> Dict[str, float]:
    """Seconds for one token's float32 matrix-vector products through every decoder layer and
    the head, weights resident: the compute floor of one decode step (attention over a short
    context and norms are left out: they are small next to the weight products).

    Two layers' weights are allocated and used alternately (each is far larger than the CPU
    caches, so reuse does not flatter the figure); best of ``repeats``.
    """
    import torch
    import torch.nn.functional as F

    cfg = model_shapes(model_dir)
    h = cfg["hidden_size"]
    i = cfg.get("intermediate_size", 4 * h)
    heads = cfg.get("num_attention_heads", 1)
    kv = cfg.get("num_key_value_heads", heads)
    hd = cfg.get("head_dim", h // heads)
    n_layers = cfg["num_hidden_layers"]
    vocab = cfg["vocab_size"]
    shapes = [(heads * hd, h), (kv * hd, h), (kv * hd, h), (h, heads * hd), (i, h), (i, h), (h, i)]
    g = torch.Generator().manual_seed(0)
    layers = [[torch.randn(o, n, generator=g) * 0.02 for o, n in shapes] for _ in range(2)]
    head = torch.randn(vocab, h, generator=g) * 0.02
    x = torch.randn(1, h, generator=g)
    xi = torch.randn(1, i, generator=g)
    best_layers = best_head = float("inf")
    with torch.inference_mode():
        for _ in range(repeats):
            t0 = time.perf_counter()
            for li in range(n_layers):
                w = layers[li % 2]
                for k, (o, n) in enumerate(shapes):
                    F.linear(xi if n == i and k == 6 else x, w[k])
            t1 = time.perf_counter()
            F.linear(x, head)
            t2 = time.perf_counter()
            best_layers, best_head = min(best_layers, t1 - t0), min(best_head, t2 - t1)
    layer_params = sum(o * n for o, n in shapes)
    return {"layers_s": best_layers, "head_s": best_head, "total_s": best_layers + best_head,
            "layer_params": layer_params * n_layers, "head_params": vocab * h}


# ----------------------------------------------------------------------------- fallback model
def build_llama_fallback(out_dir, hidden: int = 1024, intermediate: int = 2816, layers: int = 8, heads: int = 16,
                         vocab: int = 32000, seed: int = 0) -> Path:
    """A random Llama written with transformers (bf16 safetensors); used when ``sli.synth``
    cannot be imported. Small models only: the whole model is built in memory."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
                         num_attention_heads=heads, num_key_value_heads=heads, vocab_size=vocab,
                         max_position_embeddings=2048, bos_token_id=1, eos_token_id=2, pad_token_id=0,
                         tie_word_embeddings=False)
    model = LlamaForCausalLM(config).to(torch.bfloat16)
    out = Path(out_dir)
    model.save_pretrained(out)
    return out


def ensure_tokenizer(model_dir) -> bool:
    """Write a word-level tokenizer (``t0``..``t{vocab-1}``) into ``model_dir`` when it has none.

    AirLLM's constructor calls ``AutoTokenizer.from_pretrained(model_dir)`` and fails without
    one; the benchmark feeds token ids, so any tokenizer with the right vocabulary size will do.
    Returns True when one was written.
    """
    d = Path(model_dir)
    if (d / "tokenizer.json").exists() or (d / "tokenizer.model").exists():
        return False
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    cfg = model_shapes(d)
    vocab = {f"t{i}": i for i in range(cfg["vocab_size"])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="t0"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="t0", bos_token=f"t{cfg.get('bos_token_id') or 1}",
                                   eos_token=f"t{cfg.get('eos_token_id') or 2}", pad_token=f"t{cfg.get('pad_token_id') or 0}")
    fast.save_pretrained(d)
    return True
