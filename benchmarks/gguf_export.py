"""A Hugging Face Llama checkpoint (safetensors) as GGUF files for llama.cpp, for the streaming benchmark.

    .venv/bin/python benchmarks/gguf_export.py --model-dir DIR [--llama-cpp BUILD_DIR] [--quants Q4_0,Q8_0]

writes ``DIR-gguf/bf16.gguf`` (the checkpoint's own 16-bit dtype: BF16, or F16 / F32 when the
checkpoint has those) next to the model directory, then ``q4_0.gguf`` / ``q8_0.gguf`` with
``llama-quantize`` (a llama.cpp build: ``--llama-cpp`` or ``$LLAMA_CPP_DIR``). Files already
there are reused while ``source.json`` (config.json and each safetensors file's name, size and
mtime) still matches the model.

What the file holds, as llama.cpp's own ``convert_hf_to_gguf.py`` writes a Llama
(``conversion/llama.py``, ``LlamaModel``): llama.cpp's tensor names (``token_embd``,
``blk.N.attn_q`` ... ``ffn_down``, ``output_norm``, ``output``), q and k rows permuted the way
``LlamaModel.permute`` does (llama.cpp's rotary embedding pairs neighbouring dimensions, Hugging
Face's the two halves of a head), 1-D tensors (norms) in float32, and the ``llama.*`` hyper-
parameters it reads. A random checkpoint has no tokenizer, so the vocabulary is a placeholder:
a SentencePiece-style (``tokenizer.ggml.model = "llama"``) list of ``vocab_size`` tokens
``<tok_i>`` with scores and types, the config's BOS / EOS as ``<s>`` / ``</s>`` (control), an
``<unk>``, and the 256 byte tokens ``<0x00>``..``<0xFF>`` when the vocabulary has room for them
(llama.cpp looks up ``<0x0A>`` as its newline token and warns without it). llama-bench feeds
random token ids, so the text of the tokens never matters.

Memory: the GGUF is written one tensor at a time (``GGUFWriter.add_tensor_info`` for every
tensor from the safetensors headers, then ``write_tensor_data`` per tensor in the same order), so
converting a 13.5 GB model holds one tensor (at most the 262 MB embedding of a 7B) and its
permuted copy in memory, not the model.

Only plain Llama checkpoints (``model_type`` llama or mistral without a sliding window; no
attention / MLP biases; default rotary embedding or linear scaling) are converted; anything else
is refused with one line.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import struct
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional, Tuple

BUILD_HINT = ("build llama.cpp: `pip download --no-deps llama-cpp-python==0.3.36`, unpack it, then in its "
              "vendor/llama.cpp `cmake -B build -G Ninja -DCMAKE_BUILD_TYPE=Release -DGGML_NATIVE=ON -DLLAMA_CURL=OFF "
              "-DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_SERVER=OFF` and `cmake --build build --target llama-bench "
              "llama-quantize -j 2` (~15-30 min on 2 cores), and pass --llama-cpp vendor/llama.cpp/build/bin "
              "or set LLAMA_CPP_DIR")

QUANTS = ("Q4_0", "Q8_0")
FORMAT_VERSION = 1  # bump when the written file changes, so cached GGUFs are rebuilt

# Hugging Face Llama names (after "model.layers.N.") -> llama.cpp's block tensor names
_BLOCK = {
    "self_attn.q_proj.weight": "attn_q.weight",
    "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.v_proj.weight": "attn_v.weight",
    "self_attn.o_proj.weight": "attn_output.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight",
    "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
    "input_layernorm.weight": "attn_norm.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
}
_GLOBAL = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
           "lm_head.weight": "output.weight"}
_ST_DTYPES = {"BF16": "BF16", "F16": "F16", "F32": "F32"}


class ExportError(RuntimeError):
    """A one-line reason the GGUF could not be written or quantized."""


# ----------------------------------------------------------------------------- llama.cpp build
def find_llama_cpp(path: Optional[str] = None) -> Path:
    """The llama.cpp build directory holding ``llama-bench`` and ``llama-quantize``
    (``path``, else ``$LLAMA_CPP_DIR``); ``ExportError`` with the build commands if absent.
    A source tree (``build/bin`` below it) or a ``build`` folder are accepted too."""
    raw = path or os.environ.get("LLAMA_CPP_DIR")
    if not raw:
        raise ExportError(f"no llama.cpp: pass --llama-cpp DIR or set LLAMA_CPP_DIR; to {BUILD_HINT}")
    base = Path(raw).expanduser()
    for cand in (base, base / "bin", base / "build" / "bin"):
        if all((cand / tool).is_file() and os.access(cand / tool, os.X_OK) for tool in ("llama-bench", "llama-quantize")):
            return cand.resolve()
    raise ExportError(f"no llama-bench and llama-quantize in {base} (nor its bin/, build/bin/); to {BUILD_HINT}")


def llama_cpp_version(bin_dir: Path) -> str:
    """``llama-bench --version``'s first line (build number and commit), or '?'."""
    try:
        out = subprocess.run([str(bin_dir / "llama-bench"), "--version"], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired):
        return "?"
    lines = [ln.strip() for ln in (out.stdout + out.stderr).splitlines() if ln.strip().startswith("version")]
    return lines[0] if lines else "?"


# ----------------------------------------------------------------------------- checkpoint
def _st_header(path: Path) -> Tuple[int, Dict[str, dict]]:
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
    header.pop("__metadata__", None)
    return 8 + n, header


def _tensors(model_dir: Path) -> Dict[str, Tuple[Path, dict]]:
    """Every tensor of the checkpoint: name -> (file, header entry with ``abs_offset`` added)."""
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise ExportError(f"{model_dir} has no *.safetensors files")
    out = {}
    for path in files:
        base, header = _st_header(path)
        for name, info in header.items():
            out[name] = (path, dict(info, abs_offset=base + info["data_offsets"][0]))
    return out


def _read_tensor(fd: int, info: dict):
    """One tensor read with ``pread`` into its own buffer (no mmap: the file's pages do not
    stay in this process's RSS), as a torch tensor of its dtype and shape."""
    import torch

    start, end = info["data_offsets"]
    buf = bytearray(end - start)
    view, done = memoryview(buf), 0
    while done < len(buf):
        n = os.preadv(fd, [view[done:]], info["abs_offset"] + done)
        if n <= 0:
            raise ExportError(f"short read at offset {info['abs_offset'] + done}")
        done += n
    dt = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32}[info["dtype"]]
    if not buf:
        return torch.empty(info["shape"], dtype=dt)
    return torch.frombuffer(buf, dtype=dt).reshape(info["shape"])


def source_stamp(model_dir: Path) -> dict:
    """What the GGUF was made from: config.json's hash and each safetensors file's name, size, mtime."""
    cfg = (model_dir / "config.json").read_bytes()
    files = [{"name": p.name, "size": p.stat().st_size, "mtime_ns": p.stat().st_mtime_ns}
             for p in sorted(model_dir.glob("*.safetensors"))]
    return {"format": FORMAT_VERSION, "model_dir": str(model_dir.resolve()),
            "config_sha256": hashlib.sha256(cfg).hexdigest(), "files": files}


def _rope_theta(cfg: dict) -> float:
    rp = cfg.get("rope_parameters") or {}
    if isinstance(rp, dict) and "rope_theta" in rp:
        return float(rp["rope_theta"])
    return float(cfg.get("rope_theta", 10000.0))


def _rope_scaling(cfg: dict) -> Optional[dict]:
    rp = cfg.get("rope_parameters") or cfg.get("rope_scaling") or {}
    kind = (rp.get("rope_type") or rp.get("type") or "default") if isinstance(rp, dict) else "default"
    if kind == "default":
        return None
    if kind == "linear":
        return {"type": "linear", "factor": float(rp["factor"])}
    raise ExportError(f"rope type {kind!r} is not converted (only default and linear); use convert_hf_to_gguf.py")


def check_config(cfg: dict) -> None:
    mt = cfg.get("model_type")
    if mt not in ("llama", "mistral"):
        raise ExportError(f"model_type {mt!r}: only Llama checkpoints are converted; use llama.cpp's convert_hf_to_gguf.py")
    if mt == "mistral" and cfg.get("sliding_window"):
        raise ExportError("a Mistral with a sliding window is not converted; use llama.cpp's convert_hf_to_gguf.py")
    if cfg.get("attention_bias") or cfg.get("mlp_bias"):
        raise ExportError("attention / MLP biases are not converted; use llama.cpp's convert_hf_to_gguf.py")
    _rope_scaling(cfg)


def permute(w, n_head: int, n_head_kv: Optional[int] = None):
    """llama.cpp's ``LlamaModel.permute`` (convert_hf_to_gguf): q / k rows from Hugging Face's
    rotary layout (first half, second half of each head) to llama.cpp's (interleaved pairs)."""
    if n_head_kv is not None and n_head != n_head_kv:
        n_head = n_head_kv
    return (w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:])
            .swapaxes(1, 2)
            .reshape(w.shape))


def placeholder_vocab(n_vocab: int, bos: Optional[int], eos: Optional[int]) -> Tuple[List[str], List[float], List[int], int]:
    """``(tokens, scores, types, unk_id)``: ``<tok_i>`` tokens (normal), BOS / EOS as ``<s>`` /
    ``</s>`` (control), ``<unk>``, and the byte tokens ``<0x00>``..``<0xFF>`` when there is room."""
    import gguf

    tokens = [f"<tok_{i}>" for i in range(n_vocab)]
    scores = [-float(i) for i in range(n_vocab)]
    types = [int(gguf.TokenType.NORMAL)] * n_vocab
    special = {i for i in (bos, eos) if i is not None and 0 <= i < n_vocab}
    if bos in special:
        tokens[bos], types[bos], scores[bos] = "<s>", int(gguf.TokenType.CONTROL), 0.0
    if eos in special and eos != bos:
        tokens[eos], types[eos], scores[eos] = "</s>", int(gguf.TokenType.CONTROL), 0.0
    unk = next(i for i in range(n_vocab) if i not in special)
    tokens[unk], types[unk], scores[unk] = "<unk>", int(gguf.TokenType.UNKNOWN), 0.0
    free = [i for i in range(n_vocab) if i not in special and i != unk]
    if len(free) >= 256 + 16:  # room for the byte tokens and a few plain ones
        for b, i in zip(range(256), free):
            tokens[i], types[i], scores[i] = f"<0x{b:02X}>", int(gguf.TokenType.BYTE), 0.0
    return tokens, scores, types, unk


def _plan(model_dir: Path, cfg: dict):
    """``[(gguf_name, source_name, file, info, kind)]`` in the order they are written
    (embedding, each block, final norm, head); kind is 'q', 'k' or ''."""
    tensors = _tensors(model_dir)
    n_layer = int(cfg["num_hidden_layers"])
    plan = []

    def add(gname, sname, kind=""):
        if sname not in tensors:
            raise ExportError(f"{model_dir}: tensor {sname} missing")
        path, info = tensors.pop(sname)
        if info["dtype"] not in _ST_DTYPES:
            raise ExportError(f"{sname}: dtype {info['dtype']} is not converted (BF16, F16, F32 only)")
        plan.append((gname, sname, path, info, kind))

    add("token_embd.weight", "model.embed_tokens.weight")
    for i in range(n_layer):
        for hf, gg in _BLOCK.items():
            add(f"blk.{i}.{gg}", f"model.layers.{i}.{hf}",
                "q" if hf.startswith("self_attn.q_") else "k" if hf.startswith("self_attn.k_") else "")
    add("output_norm.weight", "model.norm.weight")
    if "lm_head.weight" in tensors:
        add("output.weight", "lm_head.weight")
    elif not cfg.get("tie_word_embeddings", False):
        raise ExportError(f"{model_dir}: no lm_head.weight and tie_word_embeddings is false")
    rest = sorted(n for n in tensors if not n.endswith("rotary_emb.inv_freq"))
    if rest:
        raise ExportError(f"{model_dir}: tensors not converted: {', '.join(rest[:4])}"
                          + (f" (+{len(rest) - 4})" if len(rest) > 4 else ""))
    return plan


def write_gguf(model_dir, out_path, log=print) -> dict:
    """Write ``model_dir`` (a Llama, safetensors) as one 16-bit GGUF at ``out_path``, one tensor
    at a time; returns ``{"seconds", "bytes", "dtype", "tensors"}``."""
    import numpy as np
    import gguf
    import torch

    model_dir, out_path = Path(model_dir), Path(out_path)
    cfg = json.loads((model_dir / "config.json").read_text())
    check_config(cfg)
    plan = _plan(model_dir, cfg)
    t0 = time.perf_counter()
    hidden, n_head = int(cfg["hidden_size"]), int(cfg["num_attention_heads"])
    n_kv = int(cfg.get("num_key_value_heads") or n_head)
    head_dim = int(cfg.get("head_dim") or hidden // n_head)
    big = {info["dtype"] for _, _, _, info, _ in plan if len(info["shape"]) > 1}
    dtype = "BF16" if "BF16" in big else "F16" if "F16" in big else "F32"
    qtype = {"BF16": gguf.GGMLQuantizationType.BF16, "F16": gguf.GGMLQuantizationType.F16,
             "F32": gguf.GGMLQuantizationType.F32}[dtype]
    npdt = {"BF16": np.uint16, "F16": np.float16, "F32": np.float32}[dtype]
    ftype = {"BF16": gguf.LlamaFileType.MOSTLY_BF16, "F16": gguf.LlamaFileType.MOSTLY_F16,
             "F32": gguf.LlamaFileType.ALL_F32}[dtype]

    w = gguf.GGUFWriter(None, "llama")
    w.add_name(model_dir.resolve().name)
    w.add_context_length(int(cfg.get("max_position_embeddings", 2048)))
    w.add_embedding_length(hidden)
    w.add_block_count(int(cfg["num_hidden_layers"]))
    w.add_feed_forward_length(int(cfg["intermediate_size"]))
    w.add_head_count(n_head)
    w.add_head_count_kv(n_kv)
    w.add_rope_dimension_count(head_dim)
    w.add_rope_freq_base(_rope_theta(cfg))
    scaling = _rope_scaling(cfg)
    if scaling:
        w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(scaling["factor"])
    w.add_layer_norm_rms_eps(float(cfg.get("rms_norm_eps", 1e-6)))
    if cfg.get("head_dim") is not None:
        w.add_key_length(head_dim)
        w.add_value_length(head_dim)
    n_vocab = int(cfg["vocab_size"])
    w.add_vocab_size(n_vocab)
    w.add_file_type(int(ftype))
    bos, eos = cfg.get("bos_token_id"), cfg.get("eos_token_id")
    bos = bos[0] if isinstance(bos, list) else bos
    eos = eos[0] if isinstance(eos, list) else eos
    tokens, scores, types, unk = placeholder_vocab(n_vocab, bos, eos)
    w.add_tokenizer_model("llama")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_scores(scores)
    w.add_token_types(types)
    if bos is not None:
        w.add_bos_token_id(int(bos))
    if eos is not None:
        w.add_eos_token_id(int(eos))
    w.add_unk_token_id(unk)
    pad = cfg.get("pad_token_id")
    if pad is not None and 0 <= int(pad) < n_vocab:
        w.add_pad_token_id(int(pad))
    w.add_add_bos_token(bos is not None)
    w.add_add_eos_token(False)

    def gguf_kind(info):  # 1-D tensors (norms) in float32, as convert_hf_to_gguf.py writes them
        return (np.float32, gguf.GGMLQuantizationType.F32, 4) if len(info["shape"]) == 1 else (
            npdt, qtype, np.dtype(npdt).itemsize)

    for gname, _, _, info, _ in plan:
        dt, qt, size = gguf_kind(info)
        n = 1
        for d in info["shape"]:
            n *= d
        w.add_tensor_info(gname, info["shape"], np.dtype(dt), n * size, raw_dtype=qt)

    tmp = out_path.with_name(out_path.name + ".partial")
    out_path.parent.mkdir(parents=True, exist_ok=True)
    w.write_header_to_file(tmp)
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    fds = {}
    try:
        for k, (gname, sname, path, info, kind) in enumerate(plan):
            if path not in fds:
                fds[path] = os.open(path, os.O_RDONLY)
            t = _read_tensor(fds[path], info)
            if kind == "q":
                t = permute(t, n_head, n_head)
            elif kind == "k":
                t = permute(t, n_head, n_kv)
            dt, _, _ = gguf_kind(info)
            if dt is np.float32:
                arr = t.to(torch.float32).numpy()
            elif dtype == "BF16":
                arr = t.to(torch.bfloat16).contiguous().view(torch.int16).numpy().view(np.uint16)
            elif dtype == "F16":
                arr = t.to(torch.float16).numpy()
            else:
                arr = t.to(torch.float32).numpy()
            w.write_tensor_data(np.ascontiguousarray(arr))
            del t, arr
            if log and (k % 50 == 0 or k == len(plan) - 1):
                log(f"   gguf: {k + 1}/{len(plan)} tensors written")
    finally:
        for fd in fds.values():
            os.close(fd)
        w.close()
    os.replace(tmp, out_path)
    return {"seconds": time.perf_counter() - t0, "bytes": out_path.stat().st_size, "dtype": dtype,
            "tensors": len(plan)}


# ----------------------------------------------------------------------------- quantize
def quantize(bin_dir: Path, src: Path, dst: Path, qtype: str, threads: Optional[int] = None) -> dict:
    """``llama-quantize src dst QTYPE [threads]``; returns ``{"seconds", "bytes"}``."""
    tmp = dst.with_name(dst.name + ".partial")
    cmd = [str(bin_dir / "llama-quantize"), str(src), str(tmp), qtype]
    if threads:
        cmd.append(str(threads))
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0 or not tmp.is_file():
        tmp.unlink(missing_ok=True)
        tail = " | ".join((proc.stdout + proc.stderr).strip().splitlines()[-3:])
        raise ExportError(f"llama-quantize {qtype} exited {proc.returncode}: {tail}")
    os.replace(tmp, dst)
    return {"seconds": time.perf_counter() - t0, "bytes": dst.stat().st_size}


def gguf_dir(model_dir, work_dir=None) -> Path:
    """Where the GGUFs of ``model_dir`` are kept: ``DIR-gguf`` beside it, or
    ``WORK_DIR/gguf/NAME`` when its parent is not writable."""
    model_dir = Path(model_dir).resolve()
    beside = model_dir.with_name(model_dir.name + "-gguf")
    if os.access(model_dir.parent, os.W_OK) or work_dir is None:
        return beside
    return Path(work_dir) / "gguf" / model_dir.name


def ensure_ggufs(model_dir, bin_dir: Optional[Path], quants=QUANTS, work_dir=None, keep_16bit: bool = True,
                 log=print) -> dict:
    """The GGUFs of ``model_dir``: ``{"dir", "files": {"BF16"|"F16"|"F32"|"Q4_0"|...: path}, "made": {...},
    "made_now": {...}}`` (``made``: how each file was made, ever; ``made_now``: in this call).

    Reuses files whose ``source.json`` matches the model; otherwise writes the 16-bit GGUF and
    quantizes it with ``bin_dir``'s ``llama-quantize`` into each of ``quants``. ``keep_16bit=False``
    deletes the 16-bit file once every quantized one exists (it is as large as the checkpoint).
    """
    model_dir = Path(model_dir)
    out = gguf_dir(model_dir, work_dir)
    stamp = source_stamp(model_dir)
    stamp_path = out / "source.json"
    old = json.loads(stamp_path.read_text()) if stamp_path.is_file() else None
    if old is not None and {k: v for k, v in old.items() if k != "made"} != stamp:
        log(f"   gguf: {out} was made from another version of the model: rebuilding")
        shutil.rmtree(out)
        old = None
    out.mkdir(parents=True, exist_ok=True)
    made = dict((old or {}).get("made", {}))
    made_now = {}
    files = {}
    quants = [q.upper() for q in quants]
    wanted = {q: out / f"{q.lower()}.gguf" for q in quants}
    base = next((p for p in (out / f"{d}.gguf" for d in ("bf16", "f16", "f32")) if p.is_file()), None)
    need_base = base is None and (any(not p.is_file() for q, p in wanted.items() if q not in _ST_DTYPES)
                                  or any(q in _ST_DTYPES for q in quants))
    if need_base:
        tmp = out / "16bit.gguf"
        log(f"   gguf: writing {model_dir} as a 16-bit GGUF ...")
        info = write_gguf(model_dir, tmp, log=log)
        base = out / f"{info['dtype'].lower()}.gguf"
        os.replace(tmp, base)
        made[info["dtype"]] = made_now[info["dtype"]] = info
        log(f"   gguf: {base} ({info['bytes'] / 1e6:.0f} MB, {info['dtype']}) in {info['seconds']:.1f} s")
    if base is not None:
        files[base.stem.upper()] = base
    for q, path in wanted.items():
        if q in _ST_DTYPES:
            if q not in files:
                raise ExportError(f"the 16-bit GGUF is {base.stem.upper()}, not {q}")
            continue
        if not path.is_file():
            if bin_dir is None:
                raise ExportError(f"{path} is missing and there is no llama.cpp to quantize it; to {BUILD_HINT}")
            log(f"   gguf: llama-quantize {base.name} -> {path.name} ({q}) ...")
            made[q] = made_now[q] = quantize(bin_dir, base, path, q)
            log(f"   gguf: {path} ({made[q]['bytes'] / 1e6:.0f} MB) in {made[q]['seconds']:.1f} s")
        files[q] = path
    stamp_path.write_text(json.dumps(dict(stamp, made=made), indent=1))
    if not keep_16bit and base is not None and all(p.is_file() for p in wanted.values()) \
            and not any(q in _ST_DTYPES for q in quants):
        base.unlink()
        files.pop(base.stem.upper(), None)
        log(f"   gguf: removed {base} (the quantized files are kept)")
    return {"dir": out, "files": files, "made": made, "made_now": made_now}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description="Convert a Llama checkpoint to GGUF and quantize it with llama.cpp.")
    p.add_argument("--model-dir", required=True)
    p.add_argument("--llama-cpp", default=None, help="llama.cpp build dir with llama-quantize (or $LLAMA_CPP_DIR)")
    p.add_argument("--quants", default=",".join(QUANTS), help="llama-quantize types, e.g. Q4_0,Q8_0 (BF16: no quantizing)")
    p.add_argument("--work-dir", default=None, help="used when the model's parent directory is not writable")
    p.add_argument("--drop-16bit", action="store_true", help="delete the 16-bit GGUF once the quantized files exist")
    args = p.parse_args(argv)
    quants = [q.strip().upper() for q in args.quants.split(",") if q.strip()]
    try:
        bin_dir = find_llama_cpp(args.llama_cpp) if any(q not in _ST_DTYPES for q in quants) else None
        res = ensure_ggufs(args.model_dir, bin_dir, quants, work_dir=args.work_dir, keep_16bit=not args.drop_16bit)
    except ExportError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    for q, path in res["files"].items():
        print(f"{q}: {path} ({path.stat().st_size / 1e6:.0f} MB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
