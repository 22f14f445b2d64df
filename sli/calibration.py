"""Calibrated quantization (GPTQ), streamed layer by layer through the layer cache.

:func:`calibrate` fills a processor's cache with calibrated entries for every decoder layer.
Only one layer's weights, its Hessians and one chunk of activations are in memory at a time:

1. the calibration text is cut into windows (``calibration_window`` tokens each, the first
   ``calibration_tokens`` tokens of the text); one forward of the processor's model, its decoder
   layers standing in as the identity, gives layer 0's inputs (the embeddings) and each layer's
   other arguments (attention mask, position embeddings, ...), per batch size;
2. for each layer ``i``: its float weights are read from the checkpoint; the layer runs in
   float on the stored inputs, with a hook on each linear adding ``x^T x`` to the Hessian of
   its input (linears that read the same tensor, q/k/v and gate/up, share one); the linears are
   GPTQ-quantized (:mod:`sli.quantization.gptq`) into the codec's ordinary bytes and the entry
   is stored under the config's fingerprint; then the activations go through the **quantized**
   layer ``i`` and become layer ``i+1``'s inputs.

The activations between layers live on disk, under ``<cache_dir>/calibration/<model>-<fingerprint>``
(``state.json`` says which layer they feed), one chunk read at a time. A calibration killed
at any point resumes at the layer whose inputs are stored; layers already in the cache are
not solved again (only run, to make the next layer's inputs). The folder is removed at the end.

The default calibration text is the second half of ``pydoc_data.topics`` (ships with CPython);
``sli eval`` scores the first 4×512 tokens of the same text, which lie in its first half.
"""
from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import logging
import os
import shutil
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple, Union

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from .errors import SLIError
from .quantization import QuantizationConfig, QuantizedTensor, codec_for, dequantize_cached
from .quantization.config import DEFAULT_CALIBRATION
from .quantization.gptq import Hessian, gptq_quantize, supports
from .quantization.modules import is_conv1d

logger = logging.getLogger(__name__)

__all__ = ["calibrate", "calibration_config", "calibration_id", "calibration_windows", "default_calibration_text"]

CHUNK_TOKENS = 4096  # tokens run through a layer at once (activations in memory: one chunk)


def default_calibration_text() -> str:
    """The second half of ``pydoc_data.topics`` (entries in key order, as :func:`sli.evaluation.load_eval_text`
    joins them): disjoint from the evaluation windows, which are the text's first tokens."""
    from pydoc_data.topics import topics

    text = "\n".join(topics[k] for k in sorted(topics))
    return text[len(text) // 2:]


def calibration_id(text: str) -> str:
    """What a config records about a calibration text that is not the default: its hash."""
    return "sha256:" + hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


def calibration_config(config: QuantizationConfig, text: Optional[str] = None, path: Optional[Union[str, Path]] = None,
                       tokens: Optional[int] = None, method: str = "gptq") -> QuantizationConfig:
    """``config`` made calibrated: ``method`` (default GPTQ), the text (``text`` or the file at
    ``path``; neither: the default text) recorded by its hash, and ``tokens`` of it."""
    if text is None and path is not None:
        text = Path(path).read_text(encoding="utf-8")
    changes: Dict[str, Any] = {"method": method if config.method == "rtn" else config.method}
    if text is not None:
        changes["calibration"] = calibration_id(text)
    if tokens is not None:
        changes["calibration_tokens"] = int(tokens)
        if int(tokens) < config.calibration_window:
            changes["calibration_window"] = int(tokens)
    return dataclasses.replace(config, **changes)


def _calibration_settings(quantizer) -> QuantizationConfig:
    configs = [c for c in quantizer.configs() if c.calibrated]
    if not configs:
        raise SLIError("calibration needs a calibrated config: QuantizationConfig(mode='int4' or 'nf4', method='gptq')")
    first = configs[0]
    for other in configs[1:]:
        if (other.calibration, other.calibration_tokens, other.calibration_window) != (
                first.calibration, first.calibration_tokens, first.calibration_window):
            raise SLIError("the quantizer's calibrated configs name different calibration texts or sizes; use one")
    return first


def _resolve_text(config: QuantizationConfig, text: Optional[str]) -> str:
    if text is None:
        if config.calibration != DEFAULT_CALIBRATION:
            raise SLIError(f"the config was calibrated on the text {config.calibration}; pass that text "
                           "(calibrate(processor, text) / --calibration-file)")
        return default_calibration_text()
    if config.calibration == DEFAULT_CALIBRATION:
        if text != default_calibration_text():
            raise SLIError("a calibration text was given but the config names the default one; make the config "
                           "with sli.calibration.calibration_config(config, text=...) so its fingerprint records it")
    elif calibration_id(text) != config.calibration:
        raise SLIError(f"the calibration text's hash {calibration_id(text)} is not the config's {config.calibration}")
    return text


def calibration_windows(tokenizer, config: QuantizationConfig, text: Optional[str] = None) -> torch.Tensor:
    """``[windows, calibration_window]`` token ids: the first ``calibration_tokens`` tokens of the
    calibration text (no special tokens, as :mod:`sli.evaluation` scores text), whole windows only."""
    text = _resolve_text(config, text)
    window, wanted = int(config.calibration_window), int(config.calibration_tokens)
    count = wanted // window * window
    ids: List[int] = []
    chars = max(count * 8, 4096)
    while True:  # tokenize a prefix: a long text need not be tokenized whole
        part = text[:chars]
        ids = tokenizer(part, add_special_tokens=False, verbose=False)["input_ids"]
        if len(ids) > count or len(part) == len(text):
            break
        chars *= 4
    usable = min(len(ids), count) // window * window
    if usable == 0:
        raise SLIError(f"the calibration text has {len(ids)} tokens, fewer than one window of {window}")
    if usable < count:
        logger.warning("the calibration text has %d tokens; calibrating on %d windows of %d, not %d",
                       len(ids), usable // window, window, count // window)
    return torch.tensor(ids[:usable], dtype=torch.long).view(-1, window)


# ---------------------------------------------------------------------------------------------
# layer 0's inputs
# ---------------------------------------------------------------------------------------------

class _Stop(Exception):
    pass


@dataclasses.dataclass
class LayerArgs:
    """What a decoder layer's forward takes besides the hidden states (the same for every layer)."""

    args: Tuple[Any, ...]
    kwargs: Dict[str, Any]


@torch.inference_mode()
def layer_inputs(processor, ids: torch.Tensor) -> Tuple[torch.Tensor, List[LayerArgs]]:
    """(hidden states, each decoder layer's other arguments) that the processor's model gives its
    layers for ``ids`` ``[B, S]``. One forward with every layer standing in as the identity (it
    records its arguments), stopped at the last: nothing is streamed or computed but the embeddings.
    Per layer, because layers may differ (sliding-window masks, local rotary tables)."""
    layers = processor.layers
    seen: List[Tuple[tuple, Dict[str, Any]]] = []

    def recorder(index: int):
        def forward(*args, **kwargs):
            seen.append((args, dict(kwargs)))
            if index == len(layers) - 1:
                raise _Stop
            return args[0] if args else kwargs["hidden_states"]
        return forward

    saved = [layer.__dict__.get("forward") for layer in layers]  # the runner's own, when it set one
    for index, layer in enumerate(layers):
        layer.forward = recorder(index)
    try:
        processor.model(input_ids=ids.to(processor.device), use_cache=False)
    except _Stop:
        pass
    finally:
        for layer, forward in zip(layers, saved):
            if forward is None:
                del layer.forward
            else:
                layer.forward = forward
    if len(seen) != len(layers):
        raise SLIError(f"the model's forward called {len(seen)} of its {len(layers)} decoder layers")
    hidden = seen[0][0][0] if seen[0][0] else seen[0][1]["hidden_states"]
    out = []
    for args, kwargs in seen:
        kwargs.pop("hidden_states", None)
        out.append(LayerArgs(tuple(args[1:]), kwargs))
    return hidden, out


# ---------------------------------------------------------------------------------------------
# activations on disk
# ---------------------------------------------------------------------------------------------

class _Activations:
    """The calibration activations between layers: one safetensors file per chunk, and
    ``state.json`` naming the layer they feed (written last, atomically)."""

    def __init__(self, root: Path, signature: str) -> None:
        self.root = root
        self.signature = signature

    def resume_layer(self) -> Optional[int]:
        try:
            state = json.loads((self.root / "state.json").read_text())
        except (OSError, ValueError):
            return None
        if state.get("signature") != self.signature:
            return None
        layer = int(state["layer"])
        return layer if self._complete(layer, int(state["chunks"])) else None

    def _complete(self, layer: int, chunks: int) -> bool:
        return all((self.root / self._name(layer, c)).is_file() for c in range(chunks))

    @staticmethod
    def _name(layer: int, chunk: int) -> str:
        return f"h{layer:05d}_{chunk:05d}.safetensors"

    def read(self, layer: int, chunk: int) -> torch.Tensor:
        return load_file(str(self.root / self._name(layer, chunk)))["h"]

    def write(self, layer: int, chunk: int, hidden: torch.Tensor) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        final = self.root / self._name(layer, chunk)
        part = final.with_suffix(".part")
        save_file({"h": hidden.detach().to("cpu").contiguous()}, str(part))
        _fsync(part)
        os.replace(part, final)

    def commit(self, layer: int, chunks: int) -> None:
        """The inputs of ``layer`` are whole on disk: record it, then drop the previous layer's."""
        state = self.root / "state.json"
        part = state.with_suffix(".part")
        part.write_text(json.dumps({"signature": self.signature, "layer": layer, "chunks": chunks}))
        _fsync(part)
        os.replace(part, state)
        _fsync(self.root)
        for name in os.listdir(self.root):
            if name.startswith("h") and not name.startswith(f"h{layer:05d}_"):
                try:
                    os.remove(self.root / name)
                except OSError:
                    pass

    def remove(self) -> None:
        shutil.rmtree(self.root, ignore_errors=True)


def _fsync(path: Path) -> None:
    fd = os.open(str(path), os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# ---------------------------------------------------------------------------------------------
# one layer
# ---------------------------------------------------------------------------------------------

def _layer_module(processor, index: int, state: Dict[str, torch.Tensor]) -> nn.Module:
    """Decoder layer ``index`` as a module holding ``state`` in compute dtype on the processor's device."""
    layer = copy.deepcopy(processor._loader_layers[index])  # on the meta device: costs nothing
    dtype = processor.compute_dtype
    layer.load_state_dict({k: v.to(processor.device, dtype if v.is_floating_point() else v.dtype)
                           for k, v in state.items()}, strict=True, assign=True)
    return layer.eval()


def _checkpoint_state(processor, index: int) -> Dict[str, torch.Tensor]:
    """Layer ``index``'s tensors as the checkpoint stores them."""
    state = processor._loader.layer_state(index, processor._loader_layers[index])
    processor.checkpoint.release()
    return state


def _run(layer: nn.Module, hidden: torch.Tensor, inputs: LayerArgs) -> torch.Tensor:
    out = layer(hidden, *inputs.args, **inputs.kwargs)
    return out[0] if isinstance(out, tuple) else out


def _input_groups(layer: nn.Module, paths: List[str], hidden: torch.Tensor, kwargs: LayerArgs) -> List[List[str]]:
    """``paths`` grouped by the tensor they read (q/k/v, gate/up share one), groups and members in the
    order they run (one forward of ``hidden``)."""
    seen: List[Tuple[str, torch.Tensor]] = []
    handles = [layer.get_submodule(p).register_forward_hook(lambda m, args, out, p=p: seen.append((p, args[0])))
               for p in paths]
    try:
        _run(layer, hidden, kwargs)
    finally:
        for h in handles:
            h.remove()
    groups: List[Tuple[List[str], torch.Tensor]] = []
    for path, x in seen:
        same = next((g for g, y in groups if y is x), None)
        if same is None:
            groups.append(([path], x))
        elif path not in same:
            same.append(path)
    found = {p for g, _ in groups for p in g}
    missing = [p for p in paths if p not in found]
    if missing:
        raise SLIError(f"linears {missing[:3]} never ran during calibration; cannot collect their inputs")
    return [g for g, _ in groups]


def _hessians(layer: nn.Module, groups: List[List[str]], stop_after: Optional[str], read, chunks,
              device: torch.device) -> List[Hessian]:
    """Each group's Hessian over every chunk (``read(chunk)``: its input); the forward stops after
    ``stop_after`` runs (the rest of the layer is not needed yet)."""
    hessians = [Hessian(_in_features(layer.get_submodule(g[0])), device) for g in groups]
    handles = [layer.get_submodule(g[0]).register_forward_hook(lambda m, args, out, h=h: h.add(args[0]))
               for g, h in zip(groups, hessians)]
    if stop_after is not None:
        handles.append(layer.get_submodule(stop_after).register_forward_hook(_raise_stop))
    try:
        for chunk, kwargs in chunks:
            try:
                _run(layer, read(chunk), kwargs)
            except _Stop:
                pass
    finally:
        for h in handles:
            h.remove()
    return hessians


def _in_features(module: nn.Module) -> int:
    return module.weight.shape[0] if is_conv1d(module) else module.weight.shape[1]


def _raise_stop(module, args, out):
    raise _Stop


def _set_weight(layer: nn.Module, path: str, q: QuantizedTensor, conv1d: bool) -> None:
    """Put ``q``'s dequantized weight in the float layer's linear ``path``."""
    module = layer.get_submodule(path)
    weight = codec_for(q.metadata["codec"]).dequantize(q, torch.float32)
    module.weight.copy_(weight.t() if conv1d else weight)


def _quantize_layer(processor, index: int, state: Dict[str, torch.Tensor], activations: _Activations,
                    chunks: List[Tuple[int, LayerArgs]], timing: Dict[str, float]):
    """Collect the Hessians of layer ``index`` (``state``: its checkpoint tensors) on its stored
    inputs and quantize its linears; the float layer is freed before the last solve.

    Sequential (``gptq_sequential``): the linears that read one input are solved in the order
    they run, each on inputs computed with the linears before it already quantized (as the layer
    will run); each such pass stops after the linears it collects for. Otherwise one float pass
    collects every Hessian."""
    quantizer = processor.quantizer
    layer_key = processor._layer_key(index)
    conv1d = processor._linears[index]
    configs = {path: quantizer.config_for(f"{layer_key}.{path}") for path in conv1d}
    calibrated = [p for p, c in configs.items() if c is not None and c.calibrated]
    solved: Dict[str, QuantizedTensor] = {}
    if not calibrated:
        return quantizer.quantize_state_dict(state, conv1d, layer_key)
    sequential = any(configs[p].gptq_sequential for p in calibrated)
    device, dtype = processor.device, processor.compute_dtype

    def read(chunk: int) -> torch.Tensor:
        return activations.read(index, chunk).to(device, dtype)

    layer = _layer_module(processor, index, state)
    if sequential:  # rounded linears run as they will
        for p, config in configs.items():
            if config is not None and not config.calibrated:
                solved[p] = codec_for(config.mode).quantize(_checkpoint_weight(state, p, conv1d[p]), config)
                _set_weight(layer, p, solved[p], conv1d[p])
    groups = _input_groups(layer, calibrated, read(chunks[0][0]), chunks[0][1])
    stages = [[g] for g in groups] if sequential else [groups]
    timing["hessians_s"] = timing["solve_s"] = 0.0
    for number, stage in enumerate(stages):
        t0 = time.perf_counter()
        last = number == len(stages) - 1
        hessians = _hessians(layer, stage, None if last else stage[-1][-1], read, chunks, device)
        if last:
            del layer
        t1 = time.perf_counter()
        timing["hessians_s"] += t1 - t0
        for paths, hessian in zip(stage, hessians):
            by_config: Dict[str, List[str]] = {}
            for p in paths:
                by_config.setdefault(configs[p].fingerprint(), []).append(p)
            for same in by_config.values():
                config = configs[same[0]]
                weights = {p: _checkpoint_weight(state, p, conv1d[p]) for p in same}
                ok = [p for p in same if supports(config, tuple(weights[p].shape))]
                for p in same:
                    if p not in ok:  # e.g. NF4 blocks that would straddle rows
                        logger.warning("layer %d %s: GPTQ cannot write %s in %s blocks; rounded to nearest",
                                       index, p, tuple(weights[p].shape), config.mode.value)
                        solved[p] = codec_for(config.mode).quantize(weights[p], config)
                if ok:
                    solved.update(gptq_quantize({p: weights[p].to(device) for p in ok}, hessian.matrix, config))
            if not last:
                for p in paths:
                    _set_weight(layer, p, solved[p], conv1d[p])
        del hessians
        timing["solve_s"] += time.perf_counter() - t1
    solved = {p: QuantizedTensor({k: v.cpu() for k, v in q.tensors.items()}, q.metadata) for p, q in solved.items()}
    return quantizer.quantize_state_dict(state, conv1d, layer_key, quantized=solved)


def _checkpoint_weight(state: Dict[str, torch.Tensor], path: str, conv1d: bool) -> torch.Tensor:
    weight = state[f"{path}.weight"]
    return weight.t() if conv1d else weight


def _signature(processor, ids: torch.Tensor, chunk_windows: int) -> str:
    h = hashlib.sha256()
    h.update(processor.model_id.encode())
    h.update(processor.quantizer.fingerprint().encode())
    h.update(ids.numpy().tobytes())
    h.update(str((chunk_windows, str(processor.compute_dtype))).encode())
    return h.hexdigest()[:16]


def calibrate(processor, text: Union[None, str, Path] = None, *, progress: bool = True,
              chunk_tokens: int = CHUNK_TOKENS, work_dir: Optional[Union[str, Path]] = None,
              report: Optional[List[Dict[str, float]]] = None) -> int:
    """Calibrate every decoder layer of ``processor`` into its cache (see the module docstring);
    returns how many layers were added. Resumable: layers already cached are kept and a killed
    run continues from the activations it left on disk.

    ``processor.quantizer`` must hold a calibrated config (``method="gptq"``); ``text`` is the
    calibration text its config names (None: the default text; a :class:`~pathlib.Path`: that
    file's text). ``report``, a list, gets one
    dict of timings per layer (``load_s``, ``hessians_s``, ``solve_s``, ``store_s``, ``forward_s``).
    """
    from tqdm.auto import tqdm

    if isinstance(text, Path):
        text = text.read_text(encoding="utf-8")
    quantizer = processor.quantizer
    settings = _calibration_settings(quantizer)
    num_layers = processor.layout.num_layers
    cache, model_id = processor.cache, processor.model_id
    if all(cache.contains(model_id, i, quantizer) for i in range(num_layers)):
        return 0
    positions = getattr(processor.config, "max_position_embeddings", None)
    if positions and settings.calibration_window > positions:
        raise SLIError(f"calibration_window={settings.calibration_window} is longer than the model's {positions} "
                       f"positions; use calibration_window={positions} or less")
    ids = calibration_windows(processor.tokenizer(), settings, text)
    windows, window = ids.shape
    chunk_windows = max(1, int(chunk_tokens) // window)
    bounds = [(s, min(s + chunk_windows, windows)) for s in range(0, windows, chunk_windows)]
    signature = _signature(processor, ids, chunk_windows)
    root = Path(work_dir) if work_dir is not None else Path(cache.cache_dir) / "calibration" / (
        f"{model_id}-{quantizer.fingerprint()}")
    activations = _Activations(root, signature)

    args_by_size: Dict[int, List[LayerArgs]] = {}  # chunk size → each layer's arguments
    start = activations.resume_layer()
    if start is not None and not all(cache.contains(model_id, i, quantizer) for i in range(start)):
        start = None  # an earlier layer left the cache: its entry must be made again, from layer 0
    if start is None:
        for c, (s, e) in enumerate(bounds):
            hidden, layer_args = layer_inputs(processor, ids[s:e])
            args_by_size.setdefault(e - s, layer_args)
            activations.write(0, c, hidden)
        activations.commit(0, len(bounds))
        start = 0
    else:
        logger.info("calibration of %s resumes at layer %d (activations in %s)", model_id, start, root)
    for s, e in bounds:
        if e - s not in args_by_size:
            args_by_size[e - s] = layer_inputs(processor, ids[s:e])[1]

    added = 0
    t_start = time.perf_counter()
    with torch.inference_mode():
        for index in tqdm(range(start, num_layers), desc=f"calibrating {model_id}", unit="layer",
                          disable=not progress, initial=start, total=num_layers):
            t0, cpu0 = time.perf_counter(), time.process_time()
            timing: Dict[str, float] = {"layer": index}
            chunks = [(c, args_by_size[e - s][index]) for c, (s, e) in enumerate(bounds)]
            cached = cache.get(model_id, index, quantizer, mapped=False)
            if cached is None:  # solve it: Hessians from the float layer on its inputs, then GPTQ
                state = _checkpoint_state(processor, index)
                timing["load_s"] = time.perf_counter() - t0
                cached = _quantize_layer(processor, index, state, activations, chunks, timing)
                del state
                t1 = time.perf_counter()
                cache.put(model_id, index, quantizer, cached, memory=False)
                timing["store_s"] = time.perf_counter() - t1
                added += 1
            t1 = time.perf_counter()
            layer = _layer_module(processor, index, dequantize_cached(cached, processor.compute_dtype))
            del cached
            if index + 1 < num_layers:
                for chunk, kwargs in chunks:
                    hidden = activations.read(index, chunk).to(processor.device, processor.compute_dtype)
                    activations.write(index + 1, chunk, _run(layer, hidden, kwargs))
                activations.commit(index + 1, len(chunks))
            del layer
            timing["forward_s"] = time.perf_counter() - t1
            timing["total_s"] = time.perf_counter() - t0
            timing["cpu_s"] = time.process_time() - cpu0  # all threads' CPU time (the machine may be shared)
            if report is not None:
                report.append(timing)
            logger.debug("calibration of layer %d: %s", index,
                         ", ".join(f"{k} {v:.2f}" for k, v in timing.items() if k != "layer"))
    activations.remove()
    logger.info("calibrated %d layers of %s in %.1f s", added, model_id, time.perf_counter() - t_start)
    return added
