"""Quality of each quantization mode: perplexity, KL and top-1 agreement against the unquantized model.

The default text is Python's own ``pydoc_data.topics`` (always installed, nothing downloaded).
For SmolLM2-135M the fp32 perplexity on its first 4×512 tokens is 15.26.
"""

from __future__ import annotations

import copy
import logging
import math
import time
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import nn

from .quantization import available_modes
from .quantization.presets import calibrated_names

logger = logging.getLogger(__name__)

ALL_MODES = (*available_modes(), "mixed")  # every registered mode, then attention INT8 + FFN NF4
CALIBRATED_MODES = tuple(calibrated_names())  # int4-gptq, nf4-gptq, fp4-gptq: calibrated through sli.calibration


def calibrated_config(name: str, **fields: Any):
    """The config of a calibrated mode name (``"int4-gptq"`` → int4's preset with ``method="gptq"``
    and ``fields``), or None when ``name`` is not one."""
    from .quantization.presets import calibrated_preset

    return calibrated_preset(name, **fields)


def second_eval_text() -> str:
    """A second evaluation text from the standard library, unlike ``pydoc_data.topics``: IDLE's
    manual (``idlelib/help.html``) as plain text."""
    import html.parser
    import idlelib

    class _Text(html.parser.HTMLParser):
        def __init__(self) -> None:
            super().__init__()
            self.parts: List[str] = []
            self._skip = 0

        def handle_starttag(self, tag, attrs):
            self._skip += tag in ("script", "style", "head")

        def handle_endtag(self, tag):
            self._skip -= tag in ("script", "style", "head") and self._skip > 0

        def handle_data(self, data):
            if not self._skip:
                self.parts.append(data)

    parser = _Text()
    parser.feed((Path(idlelib.__file__).parent / "help.html").read_text(encoding="utf-8"))
    lines = (" ".join(line.split()) for line in "".join(parser.parts).splitlines())
    return "\n".join(line for line in lines if line)


def load_eval_text(path: Optional[Union[str, Path]] = None) -> str:
    """The text of ``path``, or by default every ``pydoc_data.topics`` entry in key order.

    ``pydoc_data`` ships with CPython, so the default needs no download. ``path="idle-help"``
    is :func:`second_eval_text` (IDLE's manual).

    >>> load_eval_text().startswith('The "assert" statement')
    True
    """
    if path is not None and str(path) == "idle-help":
        return second_eval_text()
    if path is not None:
        return Path(path).read_text(encoding="utf-8")
    from pydoc_data.topics import topics

    return "\n".join(topics[k] for k in sorted(topics))


def _ids_1d(token_ids: Any) -> torch.Tensor:
    ids = torch.as_tensor(token_ids, dtype=torch.long)
    if ids.dim() == 2:
        if ids.shape[0] != 1:
            raise ValueError(f"token_ids must be one sequence, got shape {tuple(ids.shape)}")
        ids = ids[0]
    if ids.dim() != 1:
        raise ValueError(f"token_ids must be 1-D or [1, N], got shape {tuple(ids.shape)}")
    return ids


def _windows(token_ids: Any, window: int, num_windows: int) -> List[torch.Tensor]:
    if window < 2 or num_windows < 1:
        raise ValueError(f"need window >= 2 and num_windows >= 1, got window={window}, num_windows={num_windows}")
    ids = _ids_1d(token_ids)
    out = []
    for i in range(num_windows):
        chunk = ids[i * window:(i + 1) * window]
        if chunk.numel() < 2:
            break
        out.append(chunk.unsqueeze(0))
    if not out:
        raise ValueError(f"need at least 2 tokens, got {ids.numel()}")
    return out


def _nll(logits: torch.Tensor, ids: torch.Tensor) -> "tuple[float, int]":
    logits = logits.reshape(-1, logits.shape[-1])[:-1].float()
    target = ids.reshape(-1)[1:]
    return float(F.cross_entropy(logits, target, reduction="sum")), int(target.numel())


def perplexity(logits_fn: Callable[[torch.Tensor], torch.Tensor], token_ids: Any, window: int = 512,
               num_windows: int = 4) -> float:
    """exp(mean next-token NLL) over non-overlapping windows of the first ``num_windows*window`` tokens.

    :param logits_fn: maps ``[1, S]`` ids to ``[1, S, V]`` logits; each window is scored on its
        own (no context carried over), so a window of S tokens scores S - 1 predictions.
    :param token_ids: 1-D or ``[1, N]`` ids; fewer than ``num_windows*window`` uses what there is.
    :raises ValueError: fewer than 2 tokens, ``window < 2`` or ``num_windows < 1``.

    >>> round(perplexity(lambda x: torch.zeros(1, x.shape[1], 10), torch.arange(8) % 10, window=4), 6)
    10.0
    """
    total, count = 0.0, 0
    with torch.no_grad():
        for chunk in _windows(token_ids, window, num_windows):
            logits = logits_fn(chunk)
            if tuple(logits.shape[:2]) != tuple(chunk.shape):
                raise ValueError(f"logits_fn returned shape {tuple(logits.shape)} for ids of shape "
                                 f"{tuple(chunk.shape)}; expected [1, S, V]")
            nll, n = _nll(logits.cpu(), chunk)
            total, count = total + nll, count + n
    return math.exp(total / count)


def compare_logits(ref_logits: torch.Tensor, logits: torch.Tensor) -> Dict[str, float]:
    """Mean per-token KL(ref ‖ q) in nats and the fraction of tokens whose argmax agrees.

    Both are ``[..., V]`` logits of the same tokens; ``ref_logits`` is the reference (the
    unquantized model). Returns ``{"kl": float, "top1_agreement": float}``.

    :raises ValueError: the shapes differ.
    """
    if ref_logits.shape != logits.shape:
        raise ValueError(f"logit shapes differ: {tuple(ref_logits.shape)} vs {tuple(logits.shape)}")
    ref = ref_logits.reshape(-1, ref_logits.shape[-1]).float()
    logits = logits.reshape(-1, logits.shape[-1]).float()
    ref_lp = F.log_softmax(ref, dim=-1)
    lp = F.log_softmax(logits, dim=-1)
    kl = (ref_lp.exp() * (ref_lp - lp)).sum(-1).clamp_min(0.0)
    top1 = (ref.argmax(-1) == logits.argmax(-1)).float()
    return {"kl": float(kl.mean()), "top1_agreement": float(top1.mean())}


# ----------------------------------------------------------------------------------
# Per-mode evaluation of a transformers model
# ----------------------------------------------------------------------------------


def _decoder_layers(model: nn.Module) -> "tuple[str, nn.ModuleList]":
    """The decoder-layer list (e.g. ``model.model.layers``), found as the processor finds it."""
    from .architectures import discover_layout

    layout = discover_layout(model, model.config)
    return layout.layers_path, model.get_submodule(layout.layers_path)


def _quantizer(mode: str, block_size: Union[int, str, None] = None):
    from .quantization import LayerQuantizer, QuantizationConfig, get_mixed_precision_config

    quantizer = get_mixed_precision_config() if mode == "mixed" else LayerQuantizer(QuantizationConfig(mode=mode))
    return _sized(quantizer, block_size)


def _sized(config, block_size: Union[int, str, None]):
    """``config`` (a config or a quantizer) with NF4/FP4 blocks or INT4 groups of ``block_size`` values (or as its
    text says: "32,q_proj=64", :func:`sli.quantization.config.parse_block_sizes`) where it has
    such blocks and a size is given, else as it is."""
    from .quantization.quantizer import with_block_size

    return (with_block_size(config, block_size) if block_size else None) or config


def check_block_size(mode: str, block_size: Union[int, str]) -> None:
    """Raise the ValueError ``mode``'s config gives ``block_size`` where it does not take it
    (NF4/FP4 blocks: powers of two from 32)."""
    _sized(calibrated_config(mode) or _quantizer(mode), block_size)


def takes_block_size(mode: str) -> bool:
    """Whether ``mode`` (a known one) has NF4/FP4 blocks or INT4 groups for ``block_size`` to size."""
    from .quantization.quantizer import with_block_size

    return with_block_size(calibrated_config(mode) or _quantizer(mode), 32) is not None


def _snr_db(weight: torch.Tensor, approx: torch.Tensor) -> float:
    w = weight.float()
    err = (w - approx.float()).pow(2).sum()
    sig = w.pow(2).sum()
    if float(err) == 0.0:
        return float("inf")
    return float(10.0 * torch.log10(sig / err))


def _quantize_model(model: nn.Module, mode: str, checkpoint_dtype: torch.dtype,
                    block_size: Optional[int] = None) -> Dict[str, Any]:
    """Quantize ``model``'s decoder layers in place; return SNR and byte counts of its linears."""
    from .quantization import QuantizedLinear, is_linear, linear_weight

    quantizer = _quantizer(mode, block_size)
    prefix, layers = _decoder_layers(model)
    snrs: List[float] = []
    qbytes = 0
    orig_bytes = 0
    for i, layer in enumerate(layers):
        originals = {}
        for name, module in layer.named_modules():
            if name and is_linear(module):
                # The codecs work on the checkpoint's weights (bf16 on disk), not an fp32 upcast.
                module.weight.data = module.weight.data.to(checkpoint_dtype)
                originals[name] = linear_weight(module).detach().clone()
        layer_name = f"{prefix}.{i}" if prefix else str(i)
        new = quantizer.quantize_layer(layer, layer_name)
        if new is not layer:
            layers[i] = new
            layer = new
        for name, module in layer.named_modules():
            if isinstance(module, QuantizedLinear) and name in originals:
                w = originals[name]
                snrs.append(_snr_db(w, module.dequantized_weight(torch.float32)))
                qbytes += sum(b.numel() * b.element_size() for b in module.buffers(recurse=False))
                orig_bytes += w.numel() * w.element_size()
            elif name in originals:  # skipped linear: stays as it is
                module.weight.data = module.weight.data.float()
                qbytes += originals[name].numel() * originals[name].element_size()
                orig_bytes += originals[name].numel() * originals[name].element_size()
    finite = [s for s in snrs if math.isfinite(s)]
    snr = (sum(finite) / len(finite)) if finite else None
    return {"weight_snr_db": snr, "linear_bytes": qbytes, "checkpoint_linear_bytes": orig_bytes}


def _load_calibrated(model: nn.Module, mode: str, model_dir: Path, checkpoint_dtype: torch.dtype,
                     cache_dir: Optional[Union[str, Path]], progress: bool,
                     calibration: Optional[Dict[str, Any]] = None,
                     block_size: Union[int, str, None] = None) -> Dict[str, Any]:
    """Calibrate ``mode`` (e.g. ``"int4-gptq"``) into the layer cache through a processor (resumable;
    nothing to do when the cache holds it), then put the cached weights in ``model``'s decoder
    layers; return SNR and byte counts as :func:`_quantize_model` does."""
    from .calibration import calibrate
    from .processor import UniversalSLIProcessor
    from .quantization import QuantizedLinear, linear_weight, split_cached
    from .quantization.modules import set_submodule

    config = _sized(calibrated_config(mode, **(calibration or {})), block_size)
    _, layers = _decoder_layers(model)
    snrs: List[float] = []
    qbytes = orig_bytes = 0
    with UniversalSLIProcessor(model_dir, config, cache_dir=cache_dir, device="cpu", prefetch=False) as proc:
        calibrate(proc, progress=progress)
        for i, layer in enumerate(layers):
            cached = proc.cache.get(proc.model_id, i, proc.quantizer, mapped=False)
            qweights, _ = split_cached(cached)
            for path, q in qweights.items():
                module = layer.get_submodule(path)
                w = linear_weight(module).detach().to(checkpoint_dtype)
                q = type(q)({k: v.clone() for k, v in q.tensors.items()}, dict(q.metadata))
                transposed = bool(q.metadata.get("transposed", False))
                new = QuantizedLinear.from_quantized(q, module.bias, torch.float32, transposed=transposed)
                set_submodule(layer, path, new)
                snrs.append(_snr_db(w, new.dequantized_weight(torch.float32)))
                qbytes += q.nbytes
                orig_bytes += w.numel() * w.element_size()
    finite = [s for s in snrs if math.isfinite(s)]
    return {"weight_snr_db": (sum(finite) / len(finite)) if finite else None, "linear_bytes": qbytes,
            "checkpoint_linear_bytes": orig_bytes}


def _checkpoint_dtype(model_dir: Path) -> torch.dtype:
    """The dtype of the weights stored in ``model_dir`` (read from the files, not from a loaded
    config: loading with ``dtype=torch.float32`` rewrites ``config.dtype``)."""
    from safetensors import safe_open

    files = sorted(model_dir.glob("*.safetensors"))
    for f in files:
        with safe_open(str(f), "pt") as h:
            for name in h.keys():
                if name.endswith("weight"):
                    dt = h.get_slice(name).get_dtype()
                    dt = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32}.get(dt)
                    if dt is not None:
                        return dt
    return torch.bfloat16


def evaluate_modes(model_dir: Union[str, Path], modes: Iterable[str] = ALL_MODES,
                   text_path: Optional[Union[str, Path]] = None, num_windows: int = 4, window: int = 512,
                   progress: bool = True, cache_dir: Optional[Union[str, Path]] = None,
                   calibration: Optional[Dict[str, Any]] = None, block_size: Union[int, str, None] = None
                   ) -> Dict[str, Any]:
    """Perplexity, KL and top-1 agreement versus ``none``, weight SNR, bytes and latency per mode.

    Loads the full transformers model from ``model_dir`` (fp32 compute), and for each mode
    quantizes a copy's decoder layers in place with ``LayerQuantizer(QuantizationConfig(mode))
    .quantize_layer(layer)`` (``mixed``: the adaptive INT8-attention / NF4-MLP quantizer), then
    scores the same ``num_windows`` windows of ``window`` tokens of the text. ``none`` is always
    run first as the reference. ``progress`` logs each mode at INFO (else DEBUG).

    Calibrated modes (:data:`CALIBRATED_MODES`, e.g. ``int4-gptq``) are calibrated on the default
    calibration text (:func:`sli.calibration.default_calibration_text`, disjoint from the default
    evaluation windows) into the layer cache at ``cache_dir`` (default: sli's cache directory),
    through a streamed processor, once: a later evaluation reads the cached entries. ``calibration``
    sets config fields of those modes (e.g. ``{"calibration_tokens": 65536}``). ``block_size`` sets
    the NF4/FP4 blocks' values a maximum (``nf4``, ``fp4``, their calibrated modes, ``mixed``'s NF4;
    default 64) and INT4's values a group (``int4``, ``int4-gptq``; default 128), or as
    ``--block-size``'s text says (``"32,q_proj=64"``: some linears apart).

    :returns: ``{"modes": {mode: {"perplexity", "perplexity_change_pct", "kl", "top1_agreement",
        "weight_snr_db", "linear_bytes", "checkpoint_linear_bytes", "forward_latency_s",
        "quantize_s"}}, ...}``; format it with :func:`format_report`.
    :raises ValueError: unknown mode.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model_dir = Path(model_dir)
    modes = [str(m).lower() for m in modes]
    for m in modes:
        if m not in ALL_MODES and calibrated_config(m) is None:
            raise ValueError(f"unknown mode {m!r}; known modes: {', '.join(ALL_MODES + CALIBRATED_MODES)}")

    def log(msg: str) -> None:
        logger.log(logging.INFO if progress else logging.DEBUG, "%s", msg)

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    base.eval()
    ckpt_dtype = _checkpoint_dtype(model_dir)
    text = load_eval_text(text_path)
    ids = tokenizer(text, return_tensors="pt", add_special_tokens=False, verbose=False)["input_ids"][0][: num_windows * window]
    windows = _windows(ids, window, num_windows)
    log(f"{model_dir.name}: {len(windows)} windows of up to {window} tokens ({ids.numel()} tokens)")

    run_order = ["none"] + [m for m in modes if m != "none"]
    ref_logits: List[torch.Tensor] = []
    results: Dict[str, Dict[str, Any]] = {}
    for mode in run_order:
        t0 = time.perf_counter()
        model = copy.deepcopy(base)
        if calibrated_config(mode) is not None:
            stats = _load_calibrated(model, mode, model_dir, ckpt_dtype, cache_dir, progress, calibration,
                                     block_size)
        else:
            stats = _quantize_model(model, mode, ckpt_dtype, block_size)
        quant_s = time.perf_counter() - t0
        total, count, latencies = 0.0, 0, []
        kls, agree, ntok = 0.0, 0.0, 0
        with torch.no_grad():
            for w_i, chunk in enumerate(windows):
                t1 = time.perf_counter()
                logits = model(chunk).logits.float()
                latencies.append(time.perf_counter() - t1)
                nll, n = _nll(logits, chunk)
                total, count = total + nll, count + n
                if mode == "none":
                    ref_logits.append(logits[0])
                cmp = compare_logits(ref_logits[w_i], logits[0])
                k = chunk.shape[1]
                kls, agree, ntok = kls + cmp["kl"] * k, agree + cmp["top1_agreement"] * k, ntok + k
        ppl = math.exp(total / count)
        results[mode] = {
            "perplexity": ppl,
            "kl": kls / ntok,
            "top1_agreement": agree / ntok,
            "weight_snr_db": stats["weight_snr_db"],
            "linear_bytes": stats["linear_bytes"],
            "checkpoint_linear_bytes": stats["checkpoint_linear_bytes"],
            "forward_latency_s": sorted(latencies)[len(latencies) // 2],
            "quantize_s": quant_s,
        }
        log(f"{mode}: perplexity {ppl:.3f}")
        del model
    ref_ppl = results["none"]["perplexity"]
    for r in results.values():
        r["perplexity_change_pct"] = 100.0 * (r["perplexity"] / ref_ppl - 1.0)
        weights = r["checkpoint_linear_bytes"] / ckpt_dtype.itemsize
        r["bits_per_weight"] = 8.0 * r["linear_bytes"] / weights if weights else None
    return {
        "model_dir": str(model_dir),
        "text": str(text_path) if text_path else "pydoc_data.topics",
        "tokens": int(sum(c.shape[1] for c in windows)),
        "window": window,
        "num_windows": len(windows),
        "checkpoint_dtype": str(ckpt_dtype).replace("torch.", ""),
        "modes": {m: results[m] for m in modes},
    }


def format_report(report: Dict[str, Any]) -> str:
    """A markdown table of :func:`evaluate_modes`'s report."""
    lines = [f"Model: `{report.get('model_dir', '?')}` — text: {report.get('text', '?')}, "
             f"{report.get('tokens', '?')} tokens in {report.get('num_windows', '?')}×{report.get('window', '?')} windows",
             "",
             "| mode | perplexity | Δ vs none | KL/token (nats) | top-1 agree | weight SNR (dB) | linear MB | forward (s) |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for mode, r in report.get("modes", {}).items():
        snr = r.get("weight_snr_db")
        snr_s = "lossless" if snr is None else f"{snr:.1f}"
        lines.append(f"| {mode} | {r['perplexity']:.3f} | {r.get('perplexity_change_pct', 0.0):+.2f}% | "
                     f"{r['kl']:.4f} | {100 * r['top1_agreement']:.1f}% | {snr_s} | "
                     f"{r['linear_bytes'] / 1e6:.1f} | {r['forward_latency_s']:.3f} |")
    return "\n".join(lines)
