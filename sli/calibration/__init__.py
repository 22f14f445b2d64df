"""Calibrated quantization (GPTQ), streamed layer by layer through the layer cache.

:func:`calibrate` fills a processor's cache with calibrated entries for every decoder layer.
Only one layer's weights, its Hessians and one chunk of activations are in memory at a time,
the chunk sized to the processor's memory budget (:mod:`.memory`):

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
3. with ``gptq_asymmetric`` above 0 (opt-in), the float model's own activations run beside them:
   each chunk goes through the float layer ``i`` on the float model's inputs first, each
   linear's input there is set against its input in the pass above (the drift, summed like
   the Hessian), and the float layer's outputs are the float model's inputs of layer ``i+1``.
   GPTQ then fits each linear toward the float model's outputs (:mod:`sli.quantization.gptq`).

The activations between layers live on disk, under ``<cache_dir>/calibration/<model>-<fingerprint>``
(``state.json`` says which layer they feed; the float model's in ``float/`` beside them), one
chunk read at a time. A calibration killed at any point resumes at the layer whose inputs are
stored; layers already in the cache are not solved again (only run, to make the next layer's
inputs). The folder is removed at the end.

The default calibration text is the second half of ``pydoc_data.topics`` (ships with CPython);
``sli eval`` scores the first 4×512 tokens of the same text, which lie in its first half.

Modules: :mod:`.text` (the calibration text and its windows), :mod:`.layer_inputs` (each layer's
arguments), :mod:`.activations` (the checkpoint between layers), :mod:`.layer_solve` (one layer:
Hessians and GPTQ); :func:`calibrate` here walks the layers.
"""
from __future__ import annotations

import hashlib
import logging
import time
from pathlib import Path
from typing import Dict, List, Optional, Union

import torch

from ..errors import SLIError
from ..quantization import dequantize_cached
from ..settings import GB
from .activations import Activations
from .layer_inputs import LayerArgs, layer_inputs
from .layer_solve import advance_floats, layer_module, pass_dtype, quantize_layer, run_chunks
from .memory import CalibrationMemory, calibration_memory
from .text import (calibration_config, calibration_id, calibration_settings, calibration_windows,
                   default_calibration_text)

logger = logging.getLogger(__name__)

__all__ = ["CalibrationMemory", "calibrate", "calibration_config", "calibration_id", "calibration_plan",
           "calibration_windows", "default_calibration_text", "layer_inputs"]

CHUNK_TOKENS = 4096  # tokens run through a layer at once (activations in memory: one chunk)


def _signature(processor, ids: torch.Tensor, chunk_windows: int) -> str:
    h = hashlib.sha256()
    h.update(processor.model_id.encode())
    h.update(processor.quantizer.fingerprint().encode())
    h.update(ids.numpy().tobytes())
    h.update(str((chunk_windows, str(pass_dtype(processor)))).encode())
    return h.hexdigest()[:16]


def calibration_plan(processor, window: int, tokens: int) -> CalibrationMemory:
    """What calibrating ``processor``'s model on ``tokens`` tokens in windows of ``window`` holds
    in memory (its widest layer's): :meth:`CalibrationMemory.chunk_tokens` sizes the chunks to a
    budget."""
    dtype = pass_dtype(processor)
    plans = [calibration_memory(processor, i, dtype, window, tokens) for i in range(processor.layout.num_layers)]
    return max(plans, key=lambda plan: plan.peak(window))


def calibrate(processor, text: Union[None, str, Path] = None, *, progress: bool = True,
              chunk_tokens: int = CHUNK_TOKENS, work_dir: Optional[Union[str, Path]] = None,
              report: Optional[List[Dict[str, float]]] = None) -> int:
    """Calibrate every decoder layer of ``processor`` into its cache (see the module docstring);
    returns how many layers were added. Resumable: layers already cached are kept and a killed
    run continues from the activations it left on disk.

    ``processor.quantizer`` must hold a calibrated config (``method="gptq"``); ``text`` is the
    calibration text its config names (None: the default text; a :class:`~pathlib.Path`: that
    file's text). ``report``, a list, gets one
    dict of timings per layer (``load_s``, ``groups_s``, ``hessians_s``, ``solve_s``, ``store_s``,
    ``build_s``: the quantized layer made, ``forward_s``: its pass).
    """
    from tqdm.auto import tqdm

    if isinstance(text, Path):
        text = text.read_text(encoding="utf-8")
    quantizer = processor.quantizer
    settings = calibration_settings(quantizer)
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
    memory = calibration_plan(processor, window, ids.numel())
    chunk_tokens = memory.chunk_tokens(processor.memory_budget, window, int(chunk_tokens), model_id)
    chunk_windows = chunk_tokens // window
    logger.info("calibration of %s: chunks of %d tokens, at most %.2f GiB in memory (budget %s)", model_id,
                chunk_tokens, memory.peak(chunk_tokens) / GB,
                "none" if processor.memory_budget is None else f"{processor.memory_budget / GB:.2f} GiB")
    bounds = [(s, min(s + chunk_windows, windows)) for s in range(0, windows, chunk_windows)]
    signature = _signature(processor, ids, chunk_windows)
    root = Path(work_dir) if work_dir is not None else Path(cache.cache_dir) / "calibration" / (
        f"{model_id}-{quantizer.fingerprint()}")
    activations = Activations(root, signature)
    asymmetric = any(c.calibrated and float(c.gptq_asymmetric) > 0 for c in quantizer.configs())
    floats = Activations(root / "float", signature) if asymmetric else None  # the float model's

    args_by_size: Dict[int, List[LayerArgs]] = {}  # chunk size → each layer's arguments
    start = activations.resume_layer()
    if start is not None and not all(cache.contains(model_id, i, quantizer) for i in range(start)):
        start = None  # an earlier layer left the cache: its entry must be made again, from layer 0
    if start is not None and floats is not None and floats.resume_layer() != start:
        start = None  # killed between the two commits of a layer: the float model's inputs are gone
    if start is None:
        for c, (s, e) in enumerate(bounds):
            hidden, layer_args = layer_inputs(processor, ids[s:e])
            args_by_size.setdefault(e - s, layer_args)
            activations.write(0, c, hidden)
            if floats is not None:
                floats.write(0, c, hidden)
        activations.commit(0, len(bounds))
        if floats is not None:
            floats.commit(0, len(bounds))
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
            next_floats = floats is not None and index + 1 < num_layers
            if cached is None:  # solve it: Hessians from the float layer on its inputs, then GPTQ
                state = processor._checkpoint_state(index)
                timing["load_s"] = time.perf_counter() - t0
                cached = quantize_layer(processor, index, state, activations, chunks, timing, floats, next_floats)
                del state
                t1 = time.perf_counter()
                cache.put(model_id, index, quantizer, cached, memory=False)
                timing["store_s"] = time.perf_counter() - t1
                added += 1
            elif next_floats:  # in the cache already: only the float model's activations move on
                advance_floats(processor, index, processor._checkpoint_state(index), floats, chunks)
            t1 = time.perf_counter()
            dtype = pass_dtype(processor)
            layer = layer_module(processor, index, dequantize_cached(cached, dtype))
            del cached
            timing["build_s"] = time.perf_counter() - t1
            t1 = time.perf_counter()
            if index + 1 < num_layers:
                run_chunks(processor, layer, index, activations, chunks)
                activations.commit(index + 1, len(chunks))
                if floats is not None:
                    floats.commit(index + 1, len(chunks))
            del layer
            timing["forward_s"] = time.perf_counter() - t1
            timing["total_s"] = time.perf_counter() - t0
            timing["cpu_s"] = time.process_time() - cpu0  # all threads' CPU time (the machine may be shared)
            if report is not None:
                report.append(timing)
            logger.debug("calibration of layer %d: %s", index,
                         ", ".join(f"{k} {v:.2f}" for k, v in timing.items() if k != "layer"))
    if floats is not None:
        floats.remove()
    activations.remove()
    logger.info("calibrated %d layers of %s in %.1f s", added, model_id, time.perf_counter() - t_start)
    return added
