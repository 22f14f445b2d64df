"""One decoder layer's calibration: its float module, the Hessians of its linears' inputs
(linears reading one tensor share one; with ``gptq_asymmetric``, their drift from the float
model's inputs too), and the GPTQ solve into the codec's bytes."""
from __future__ import annotations

import copy
import dataclasses
import logging
import time
from typing import Callable, Dict, List, Optional, Tuple

import torch
from torch import nn

from .. import kernels
from ..errors import SLIError
from ..quantization import QuantizedTensor, codec_for
from ..quantization.gptq import Hessian, InputDrift, gptq_quantize, supports
from ..quantization.modules import is_conv1d
from .activations import Activations
from .layer_inputs import LayerArgs, Stop, compiled, eager_hook, run_layer

logger = logging.getLogger(__name__)


def pass_dtype(processor) -> torch.dtype:
    """The dtype calibration runs a layer in: the processor's compute dtype, except on a CPU
    that multiplies bfloat16 in hardware (:func:`sli.kernels.prompt_dtype`: AMX, AVX-512 BF16)
    where that is float32: then bfloat16. The passes are products of thousands of rows by
    each weight, bound by arithmetic, which those units do several times faster (a 7B-shaped
    layer: docs/benchmarks.md); the Hessians are multiplied and summed in float32."""
    if processor.device.type == "cpu" and processor.compute_dtype == torch.float32:
        return kernels.prompt_dtype()
    return processor.compute_dtype


def layer_module(processor, index: int, state: Dict[str, torch.Tensor]) -> nn.Module:
    """Decoder layer ``index`` as a module holding ``state`` in :func:`pass_dtype` on the processor's device."""
    layer = copy.deepcopy(processor._loader_layers[index])  # on the meta device: costs nothing
    dtype = pass_dtype(processor)
    layer.load_state_dict({k: v.to(processor.device, dtype if v.is_floating_point() else v.dtype)
                           for k, v in state.items()}, strict=True, assign=True)
    return layer.eval()


def _input_groups(layer: nn.Module, paths: List[str], hidden: torch.Tensor, kwargs: LayerArgs) -> List[List[str]]:
    """``paths`` grouped by the tensor they read (q/k/v, gate/up share one), groups and members in the
    order they run (one forward of ``hidden``'s first window where the layer's other arguments
    have no windows of their own: a 7B-shaped layer's 4096-token chunk took 1.4 s)."""
    if hidden.dim() > 2 and hidden.shape[0] > 1 and not _has_windows(kwargs, hidden.shape[0]):
        hidden = hidden[:1]
    seen: List[Tuple[str, torch.Tensor]] = []
    handles = [layer.get_submodule(p).register_forward_hook(lambda m, args, out, p=p: seen.append((p, args[0])))
               for p in paths]
    try:
        run_layer(layer, hidden, kwargs)
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


def _has_windows(kwargs: LayerArgs, windows: int) -> bool:
    """Whether a tensor among the layer's other arguments has ``windows`` rows (a mask per window)."""
    def windowed(value) -> bool:
        if isinstance(value, torch.Tensor):
            return value.dim() > 0 and value.shape[0] == windows
        if isinstance(value, (tuple, list)):
            return any(windowed(v) for v in value)
        return False
    return windowed(kwargs.args) or windowed(tuple(kwargs.kwargs.values()))


@dataclasses.dataclass
class FloatPass:
    """The float model's side of a layer's passes (``gptq_asymmetric``): ``layer`` holds the
    layer's float weights (the layer being quantized itself, unless earlier linears of it are
    already rounded), ``read(chunk)`` gives the float model's inputs of the layer, and
    ``write(chunk, out)``, where given, stores the float layer's outputs for the next layer."""

    layer: nn.Module
    read: Callable[[int], torch.Tensor]
    write: Optional[Callable[[int, torch.Tensor], None]]


def _hessians(layer: nn.Module, groups: List[List[str]], stop_after: Optional[str], read, chunks,
              device: torch.device, floats: Optional[FloatPass] = None
              ) -> Tuple[List[Hessian], Optional[List[InputDrift]]]:
    """Each group's Hessian over every chunk (``read(chunk)``: its input); the forward stops after
    ``stop_after`` runs (the rest of the layer is not needed yet), or, with None, as the last
    group's input arrives (its product and what follows it are not needed: a 7B-shaped layer's
    down_proj is ~1/8 of the pass's arithmetic).

    With ``floats``, each chunk first runs through the float layer on the float model's inputs
    (to its end where its outputs are stored, else to the last group's input), its groups'
    inputs held until the same chunk's pass reaches them and each group's :class:`InputDrift`
    adds them."""
    hessians = [Hessian(_in_features(layer.get_submodule(g[0])), device) for g in groups]
    drifts = None if floats is None else [InputDrift(_in_features(layer.get_submodule(g[0])), device) for g in groups]
    phase = ["model"]
    held: Dict[int, torch.Tensor] = {}

    def collect(number: int, stop: bool):
        def hook(module, args):
            if phase[0] == "float":
                held[number] = args[0]
                if floats.write is None and number == len(groups) - 1:
                    raise Stop
                return
            hessians[number].add(args[0])
            if drifts is not None:
                drifts[number].add(args[0], held.pop(number))
            if stop:
                raise Stop
        return eager_hook(hook)

    modules = [layer] if floats is None or floats.layer is layer else [layer, floats.layer]
    handles = [m.get_submodule(g[0]).register_forward_pre_hook(collect(n, stop_after is None and n == len(groups) - 1))
               for m in modules for n, g in enumerate(groups)]
    if stop_after is not None:
        handles.append(layer.get_submodule(stop_after).register_forward_hook(eager_hook(_raise_stop)))
    try:
        runs = float_runs = None
        for chunk, kwargs in chunks:
            if floats is not None:
                phase[0] = "float"
                hidden = floats.read(chunk)
                float_runs = compiled(floats.layer, hidden) if float_runs is None else float_runs
                try:
                    out = run_layer(float_runs, hidden, kwargs)
                    floats.write(chunk, out)
                except Stop:
                    pass
                phase[0] = "model"
            hidden = read(chunk)
            runs = compiled(layer, hidden) if runs is None else runs
            try:
                run_layer(runs, hidden, kwargs)
            except Stop:
                pass
            held.clear()
    finally:
        for h in handles:
            h.remove()
    return hessians, drifts


def _in_features(module: nn.Module) -> int:
    return module.weight.shape[0] if is_conv1d(module) else module.weight.shape[1]


def _raise_stop(module, args, out):
    raise Stop


def _set_weight(layer: nn.Module, path: str, q: QuantizedTensor, conv1d: bool) -> None:
    """Put ``q``'s dequantized weight in the float layer's linear ``path``."""
    module = layer.get_submodule(path)
    weight = codec_for(q.metadata["codec"]).dequantize(q, torch.float32)
    module.weight.copy_(weight.t() if conv1d else weight)


def quantize_layer(processor, index: int, state: Dict[str, torch.Tensor], activations: Activations,
                    chunks: List[Tuple[int, LayerArgs]], timing: Dict[str, float],
                    floats: Optional[Activations] = None, write_floats: bool = False):
    """Collect the Hessians of layer ``index`` (``state``: its checkpoint tensors) on its stored
    inputs and quantize its linears; the float layer is freed before the last solve.

    Sequential (``gptq_sequential``): the linears that read one input are solved in the order
    they run, each on inputs computed with the linears before it already quantized (as the layer
    will run); each such pass stops after the linears it collects for. Otherwise one float pass
    collects every Hessian.

    ``floats``: the float model's inputs of each layer (``gptq_asymmetric``): the passes also
    collect each group's :class:`InputDrift`, and with ``write_floats`` the float layer's
    outputs on them become the next layer's float inputs (written, not committed)."""
    quantizer = processor.quantizer
    layer_key = processor._layer_key(index)
    conv1d = processor._linears[index]
    configs = {path: quantizer.config_for(f"{layer_key}.{path}") for path in conv1d}
    calibrated = [p for p, c in configs.items() if c is not None and c.calibrated]
    solved: Dict[str, QuantizedTensor] = {}
    if not calibrated:
        if floats is not None and write_floats:
            advance_floats(processor, index, state, floats, chunks)
        return quantizer.quantize_state_dict(state, conv1d, layer_key)
    sequential = any(configs[p].gptq_sequential for p in calibrated)
    device, dtype = processor.device, pass_dtype(processor)

    def read(chunk: int) -> torch.Tensor:
        return activations.read(index, chunk).to(device, dtype)

    layer = layer_module(processor, index, state)
    float_layer = layer
    if floats is not None and sequential:  # the float weights of linears rounded before a stage
        float_layer = layer_module(processor, index, {k: v.clone() for k, v in state.items()})
    if sequential:  # rounded linears run as they will
        for p, config in configs.items():
            if config is not None and not config.calibrated:
                solved[p] = codec_for(config.mode).quantize(_checkpoint_weight(state, p, conv1d[p]), config)
                _set_weight(layer, p, solved[p], conv1d[p])
    t0 = time.perf_counter()
    groups = _input_groups(layer, calibrated, read(chunks[0][0]), chunks[0][1])
    timing["groups_s"] = time.perf_counter() - t0
    stages = [[g] for g in groups] if sequential else [groups]
    timing["hessians_s"] = timing["solve_s"] = 0.0
    for number, stage in enumerate(stages):
        t0 = time.perf_counter()
        last = number == len(stages) - 1
        float_pass = None
        if floats is not None:
            float_pass = FloatPass(float_layer, lambda chunk: floats.read(index, chunk).to(device, dtype),
                                   (lambda chunk, out: floats.write(index + 1, chunk, out))
                                   if last and write_floats else None)
        hessians, drifts = _hessians(layer, stage, None if last else stage[-1][-1], read, chunks, device, float_pass)
        del float_pass
        if last:
            del layer, float_layer
        t1 = time.perf_counter()
        timing["hessians_s"] += t1 - t0
        for paths in stage:
            hessian = hessians.pop(0)  # freed by its last solve (gptq_quantize takes it)
            drift = drifts.pop(0) if drifts is not None else None
            by_config: Dict[str, List[str]] = {}
            for p in paths:
                by_config.setdefault(configs[p].fingerprint(), []).append(p)
            groups_by_config = list(by_config.values())
            for same in groups_by_config:
                config = configs[same[0]]
                weights = {p: _checkpoint_weight(state, p, conv1d[p]) for p in same}
                ok = [p for p in same if supports(config, tuple(weights[p].shape))]
                for p in same:
                    if p not in ok:  # e.g. NF4 blocks that would straddle rows
                        logger.warning("layer %d %s: GPTQ cannot write %s in %s blocks; rounded to nearest",
                                       index, p, tuple(weights[p].shape), config.mode.value)
                        solved[p] = codec_for(config.mode).quantize(weights[p], config)
                if ok:
                    final = same is groups_by_config[-1]
                    solved.update(gptq_quantize({p: weights[p].to(device) for p in ok},
                                                hessian if final else hessian.matrix, config,
                                                drift=drift if final or drift is None else drift.sums))
            del hessian, drift
            if not last:
                for p in paths:
                    _set_weight(layer, p, solved[p], conv1d[p])
        del hessians, drifts
        timing["solve_s"] += time.perf_counter() - t1
    solved = {p: QuantizedTensor({k: v.cpu() for k, v in q.tensors.items()}, q.metadata) for p, q in solved.items()}
    return quantizer.quantize_state_dict(state, conv1d, layer_key, quantized=solved)


def run_chunks(processor, layer: nn.Module, index: int, store: Activations, chunks: List[Tuple[int, LayerArgs]]) -> None:
    """``layer`` (decoder layer ``index``) run on each chunk of its inputs in ``store``, its
    outputs written there as layer ``index + 1``'s (not committed)."""
    device, dtype = processor.device, pass_dtype(processor)
    runs = None
    for chunk, kwargs in chunks:
        hidden = store.read(index, chunk).to(device, dtype)
        runs = compiled(layer, hidden) if runs is None else runs
        store.write(index + 1, chunk, run_layer(runs, hidden, kwargs))


def advance_floats(processor, index: int, state: Dict[str, torch.Tensor], floats: Activations,
                   chunks: List[Tuple[int, LayerArgs]]) -> None:
    """The float layer ``index`` (``state``: its checkpoint tensors) run on the float model's
    inputs, its outputs written as the next layer's (for a layer already in the cache)."""
    run_chunks(processor, layer_module(processor, index, state), index, floats, chunks)


def _checkpoint_weight(state: Dict[str, torch.Tensor], path: str, conv1d: bool) -> torch.Tensor:
    weight = state[f"{path}.weight"]
    return weight.t() if conv1d else weight
