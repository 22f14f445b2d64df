"""UniversalSLIProcessor: run a causal LM layer by layer from the quantized layer cache.

A thin facade: :mod:`sli.model_skeleton` builds the model without weights,
:mod:`sli.shared_modules` loads what stays resident, :mod:`sli.memory_sizing` and
:mod:`sli.memory_plan` decide what the budget holds, :class:`sli.layer_runner.LayerRunner`
streams the decoder layers, :mod:`sli.prompt_ids` checks a prompt, :mod:`sli.generation` runs
the decode loop over this processor's forward step, and :mod:`sli.batched_step` runs several
sequences in one pass (:meth:`UniversalSLIProcessor.step_many`).
"""
from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Union

import torch
from torch import nn

from . import attention, batched_step, decode_step
from . import device as device_calls
from . import kernels
from . import memory_sizing, settings
from . import page_cache
from . import transformers_adapter as hf
from .architectures import ModelLayout, discover_layout
from .batched_step import StepInput
from .checkpoint import Checkpoint, SkeletonLoader, checkpoint_model_id, resolve_model_dir
from .chunked_prefill import chunkable
from .errors import ModelLoadError, SLIError
from .generation import GenerationSession, generate_tokens
from .kv_cache import compact_kv_layer, link_spilled
from .layer_cache import LayerCache
from .resident_decode import ResidentDecode
from .layer_runner import LayerJob, LayerRunner
from .memory_plan import MemoryPlan, plan_memory
from .model_check import max_positions
from .model_skeleton import build_skeletons, read_config, swap_linears
from .processor_options import (as_quantizer, budget_bytes, check_kv_options, choose_strategy,
                                return_freed_buffers_to_the_os)
from .prompt_ids import check_length, check_token_ids, encode_prompts
from .quantization import CachedLayer, QuantizationConfig, codec_for, default_compute_dtype
from .quantization.execution import warm_up_kernels
from .quantization.modules import linear_paths
from .settings import GB, default_cache_dir
from .shared_modules import INT8_HEAD, load_shared_modules, mapped_embedding
from .streaming import LayerStreamer, LayerTiming

logger = logging.getLogger(__name__)

__all__ = ["UniversalSLIProcessor", "default_cache_dir"]


class UniversalSLIProcessor:
    """Streams a local Hugging Face causal LM through a quantized layer cache.

    Args:
        model_name: a local model directory (config.json + safetensors or .bin weights).
        quantization_config: a :class:`QuantizationConfig`, an :class:`AdaptiveQuantizer`,
            or None for NONE (the checkpoint's weights as they are).
        cache_dir: the layer cache directory (default :func:`sli.settings.default_cache_dir`).
        device: "cpu", "cuda" or a torch.device (default CUDA when present).
        max_cache_size_gb: the disk tier's size limit.
        max_memory_cache_size_gb: the cache's in-memory tier (quantized layers); 0 by
            default on CPU when a memory budget is set, since those bytes count against it.
            On CUDA it is pinned host RAM (10% of the memory free to sli by default, a
            container's limit included), which the GPU budget does not cover.
        max_gpu_memory_gb: on CUDA, the budget for resident + streamed layers.
        memory_budget_gb: on CPU, the RAM budget for resident + streamed layers (default: half the
            memory this process can still take, within its cgroup's limit in a container).
        prefetch: load the next layer in the background while the current one runs.
        prefetch_depth: how many layers ahead to load.
        kv_dtype: how keys and values are kept: "bfloat16" (default), "int8" (a scale per
            token and head) or "float32" (exactly what transformers keeps on CPU).
        max_context_tokens: the context the memory plan reserves keys and values for (default:
            the model's positions, at most 4096).
        prefill_chunk_tokens: a prompt longer than this runs in chunks of it inside each layer
            (activations bounded by the chunk; one pass over the weights all the same).
            Default: what an eighth of the memory budget holds of one token's activations
            (64 to 2048 tokens), or 512 without a budget.
        strategy: how a streamed layer computes. "packed" (CPU's default): its linears
            multiply by the cached bytes (fused kernels, no dequantized copy). "dequantize"
            (CUDA's, and selectable on CPU): each layer is dequantized into reused
            compute-dtype buffers and runs as plain modules.

    Raises:
        ModelLoadError: missing directory, no weights, unreadable shard.
        UnsupportedArchitectureError: a layout that cannot stream (encoder-decoder, ...).
    """

    def __init__(self, model_name: Union[str, Path], quantization_config=None, *, cache_dir=None, device=None,
                 max_cache_size_gb: Optional[float] = None, max_memory_cache_size_gb: Optional[float] = None,
                 max_gpu_memory_gb: Optional[float] = None, memory_budget_gb: Optional[float] = None,
                 prefetch: bool = True, prefetch_depth: int = 1, model_id: Optional[str] = None,
                 strategy: Optional[str] = None, kv_dtype: str = "bfloat16",
                 max_context_tokens: Optional[int] = None, prefill_chunk_tokens: Optional[int] = None) -> None:
        self.model_dir = resolve_model_dir(model_name)
        return_freed_buffers_to_the_os()
        try:
            self.device = device_calls.resolve(device)
        except ValueError as exc:
            raise SLIError(str(exc)) from exc
        self.strategy = choose_strategy(strategy, self.device)
        self.quantizer = as_quantizer(quantization_config)
        # the rows a pass's products stay in the fused kernels for, every linear's codec agreeing
        self._fused_max_rows = min(codec_for(c.mode).fused_max_rows for c in self.quantizer.configs())
        self.quantization_config = self.quantizer.config
        self.compute_dtype = self.quantization_config.compute_dtype or default_compute_dtype(self.device)

        check_kv_options(kv_dtype, prefill_chunk_tokens)
        self.kv_dtype = kv_dtype
        self.checkpoint = Checkpoint(self.model_dir)
        self.config = read_config(self.model_dir)
        self.max_positions = max_positions(self.config.to_dict())
        self.max_context_tokens = max_context_tokens or min(self.max_positions or 4096, 4096)
        self.model, loader_model = build_skeletons(self.config, self.compute_dtype, self.checkpoint.storage_dtype())
        self.reads_kv_in_place = attention.install(self.model, kv_dtype, self.device)  # decode attention from KV bytes
        self.layout: ModelLayout = discover_layout(self.model, self.config)
        self.layers: nn.ModuleList = self.model.get_submodule(self.layout.layers_path)
        self._loader = SkeletonLoader(self.checkpoint, loader_model, self.layout.layers_path)
        self._loader_layers = loader_model.get_submodule(self.layout.layers_path)
        # from the content (config, safetensors headers, sampled weight bytes), not the folder:
        # copies share entries, a re-saved model does not reuse stale ones
        self.model_id = model_id or checkpoint_model_id(self.model_dir)
        # linear path → is it a Conv1D, per layer (read before the linears are swapped)
        self._linears: List[Dict[str, bool]] = [linear_paths(layer) for layer in self.layers]
        self.packed = self.strategy == "packed"
        if self.packed:
            swap_linears(self.layers, self._linears, self.compute_dtype)
            if self.compute_dtype == torch.float32:
                # NONE too: a bfloat16 head multiplies with the bf16 kernel, and skipped linears stay as stored;
                # INT8 for an int8 head (the 4-bit modes)
                head = [INT8_HEAD] if self.quantization_config.int8_head else []
                warm_up_kernels(self.quantizer.configs() + [QuantizationConfig()] + head)
                decode_step.warm_up()

        self.memory_budget = budget_bytes(self.device, max_gpu_memory_gb, memory_budget_gb)
        on_gpu = self.device.type == "cuda"
        if max_memory_cache_size_gb is None and self.memory_budget is not None and not on_gpu:
            max_memory_cache_size_gb = 0.0  # on CPU the tier's bytes count against the RAM budget
        # On CUDA the budget is GPU memory; the tier keeps entries in pinned host RAM, so a
        # token's layers cross the bus at full speed instead of being read from disk again
        self.cache = LayerCache(cache_dir or default_cache_dir(), max_cache_size_gb=max_cache_size_gb,
                                max_memory_cache_size_gb=max_memory_cache_size_gb, pin_memory=on_gpu)
        self.shared_bytes = load_shared_modules(self.model, self._loader, self.checkpoint, self.layout.layers_path,
                                                self.device, self.compute_dtype, self.packed,
                                                self.quantization_config.int8_head)
        self.mapped_embedding_bytes, self._embedding_row_bytes = mapped_embedding(self.model)
        self._plan: Optional[MemoryPlan] = None
        self._kept_seen: set = set()  # layers the plan keeps in the page cache, read once already (_check_kept)
        self._prefetch_depth = prefetch_depth if prefetch else 0
        self.streamer = LayerStreamer(self._cached_layer, self.device, self.compute_dtype,
                                      depth=prefetch_depth, prefetch=prefetch, packed=self.packed,
                                      page_in=self._page_in_layer,
                                      read_into=None if settings.flag("SLI_NO_DIRECT_READ") else self._read_layer_into)
        self.runner = LayerRunner(self.layers, self.streamer, self.device)
        self._resident_decode = ResidentDecode.build(self.model, self.runner, self.device)
        self._one_calls_ready: set = set()  # resident layers whose one-token call is made (_ready_one_calls)
        self.prefill_chunk_tokens = prefill_chunk_tokens or self._default_chunk_tokens()

    # ------------------------------------------------------------------ layers from the cache
    def _layer_key(self, index: int) -> str:
        return f"{self.layout.layers_path}.{index}"

    def _cached_layer(self, index: int, owned: bool = False) -> CachedLayer:
        """Layer ``index`` from the cache, quantizing it from the checkpoint on a miss.

        On CPU a disk hit of a streamed layer is mapped, not read: its linears compute straight
        from the page cache's copy of the entry (see :meth:`LayerCache.get`). An ``owned`` one
        (a resident layer) is read into this process's memory."""
        pressed = self._plan is not None and bool(self._plan.page_dropped_layers)  # the page cache is short
        if pressed and not owned and index not in self._plan.page_dropped_layers:
            self._check_kept(index)
        # a streamed layer past the page cache's room, or a resident one once read (never read again)
        drop = pressed and (owned or index in self._plan.page_dropped_layers)
        cached = self.cache.get(self.model_id, index, self.quantizer, mapped=self.packed and not owned,
                                drop_pages=drop)
        if cached is not None:
            return cached
        cached = self._quantized_from_checkpoint(index)
        self.cache.put(self.model_id, index, self.quantizer, cached)
        self._check_cache_room(cached.nbytes)
        return cached

    def _check_kept(self, index: int) -> None:
        """Layer ``index``, one the plan keeps in the page cache, about to be fetched: where this
        process read it before and most of its pages are gone now, the room the plan measured is
        gone (another reader under the same memory limit, or the page cache dropped, as
        ``benchmarks/streaming.py --cold`` does before every token). It is then read from the disk
        past the page cache from now on, as the layers without room are, so the others stay."""
        if index not in self._kept_seen:
            self._kept_seen.add(index)
            return
        share = self.cache.cached_share(self.model_id, index, self.quantizer)
        if share is None or share >= 0.5:
            return
        self._plan.page_dropped_layers = sorted({*self._plan.page_dropped_layers, index})
        self.runner.disk_layers = self.runner.disk_layers | {index}
        logger.info("layer %d was meant to stay in the page cache but %.0f%% of it was reclaimed: it is read "
                    "from the disk from now on", index, 100 * (1 - share))

    def _read_layer_into(self, index: int, take) -> Optional[CachedLayer]:
        """A disk layer (one the page cache has no room for) read past the page cache into a buffer
        ``take(size)`` gives (:meth:`LayerStore.get`'s ``read_into``), or None where it is not on disk."""
        return self.cache.get(self.model_id, index, self.quantizer, read_into=take)

    def _page_in_layer(self, index: int) -> int:
        """Layer ``index``'s cached bytes into the page cache, ahead of :meth:`_cached_layer`."""
        return self.cache.page_in(self.model_id, index, self.quantizer)

    def _sizing_layer(self) -> CachedLayer:
        """Layer 0 as the cache holds it, or would: a calibrated entry not made yet has the
        rounded entry's layout, so that one (not stored) tells its size."""
        if not self.quantizer.needs_calibration() or self.cache.contains(self.model_id, 0, self.quantizer):
            return self._cached_layer(0)
        return self._quantized_from_checkpoint(0, round_calibrated=True)

    def _checkpoint_state(self, index: int) -> Dict[str, torch.Tensor]:
        """Layer ``index``'s tensors as the checkpoint stores them (its files released after)."""
        state = self._loader.layer_state(index, self._loader_layers[index])
        self.checkpoint.release()
        return state

    def _quantized_from_checkpoint(self, index: int, round_calibrated: bool = False) -> CachedLayer:
        return self.quantizer.quantize_state_dict(self._checkpoint_state(index), self._linears[index],
                                                  self._layer_key(index), round_calibrated=round_calibrated)

    def _check_cache_room(self, layer_bytes: int) -> None:
        """Warn once when the disk cache cannot hold the whole quantized model: its oldest
        layers would be evicted and quantized again on every pass."""
        if getattr(self, "_cache_room_checked", False):
            return
        self._cache_room_checked = True
        needed = layer_bytes * self.layout.num_layers
        if needed > self.cache.size_limit:
            logger.warning("the layer cache's limit (%.3f GB) is below this model's %d quantized layers (~%.3f GB): "
                           "evicted layers are quantized again on every pass; raise max_cache_size_gb "
                           "(--max-cache-size-gb) above %.3f", self.cache.size_limit / GB, self.layout.num_layers,
                           needed / GB, needed * 1.05 / GB)

    # ------------------------------------------------------------------ memory
    def _layer_bytes(self) -> "tuple[int, int]":
        """(bytes of one ready-to-run layer, bytes of transient work buffers)."""
        if not self.packed:
            return memory_sizing.module_layer_bytes(self.layers[0], self.compute_dtype), 0
        return memory_sizing.packed_layer_bytes(self._sizing_layer(), self.compute_dtype)

    def _entry_file_bytes(self) -> int:
        """The bytes of layer 0's cache file (its tensors' where it is not on disk yet)."""
        path = self.cache.entry_path(self.model_id, 0, self.quantizer)
        try:
            return os.path.getsize(path) if path is not None else self._sizing_layer().nbytes
        except OSError:
            return self._sizing_layer().nbytes

    @property
    def plan(self) -> MemoryPlan:
        """How the memory budget is spent; made on first use (it reads layer 0's cache entry,
        quantizing it on a miss, to know what a ready layer weighs)."""
        if self._plan is None:
            layer_bytes, scratch = self._layer_bytes()
            # a prompt of the planned context runs layer-major: its hidden states and one layer's keys and values
            scratch += memory_sizing.prompt_work_bytes(self.config, self.compute_dtype, self.max_context_tokens)
            available = device_calls.available_bytes(self.device)
            runtime = kernels.RUNTIME_BYTES if self.packed and kernels.kernels_enabled() else 0
            self._plan = plan_memory(self.memory_budget, num_layers=self.layout.num_layers,
                                     shared_bytes=self._resident_shared_bytes(), layer_bytes=layer_bytes,
                                     scratch_bytes=scratch,
                                     prefetch_depth=self._prefetch_depth, runtime_bytes=runtime,
                                     available_bytes=int(available),
                                     kv_layer_bytes=self.kv_bytes(self.max_context_tokens) // self.layout.num_layers,
                                     kv_can_spill=self.kv_dtype in ("bfloat16", "int8"))
            if self.packed:  # streamed layers are computed from the page cache (mapped) or read past it
                self._plan.split_streamed(page_cache.room(self._plan.pending_bytes),
                                          self.streamer.read_buffer_bytes(self._entry_file_bytes()))
                self.runner.disk_layers = set(self._plan.page_dropped_layers)
                self.runner.unread_kept = (set(self._plan.streamed_layers) - self.runner.disk_layers) - self._kept_seen
            if self._plan.over_budget:
                logger.warning("memory budget %.2f GB is below the shared modules + streaming + kernel runtime + "
                               "KV in flight (%.2f GB); every layer streams", self._plan.budget / GB,
                               self._plan.fixed_bytes / GB)
            logger.info("%s: %d layers at %s; %s", self.model_id, self.layout.num_layers, self.layout.layers_path,
                        self._plan.describe())
        return self._plan

    def _resident_shared_bytes(self, tokens: Optional[int] = None) -> int:
        """The shared modules' bytes the plan counts: all of them, but an embedding that is a
        view of the checkpoint's file mapping by the rows ``tokens`` tokens can look up (default:
        the planned context's; :func:`sli.shared_modules.mapped_embedding`; a 7B model's bfloat16
        table is 262 MB, a token reads 8 KB of it)."""
        tokens = self.max_context_tokens if tokens is None else tokens
        touched = min(self.mapped_embedding_bytes, self._embedding_row_bytes * tokens)
        return self.shared_bytes - self.mapped_embedding_bytes + touched

    def _default_chunk_tokens(self) -> int:
        return memory_sizing.default_prefill_chunk_tokens(self.config, self.compute_dtype, self.memory_budget)

    def kv_bytes(self, tokens: int, batch: int = 1) -> int:
        """Bytes the keys and values of ``tokens`` positions take, every layer (an upper bound:
        sliding-window layers hold less)."""
        return memory_sizing.kv_bytes(self.config, self.layout.num_layers, self.kv_dtype, tokens, batch)

    @property
    def timings(self) -> List[LayerTiming]:
        """Where each layer's time went, pass after pass (the runner's record)."""
        return self.runner.timings

    # ------------------------------------------------------------------ public API
    def prewarm(self, progress: bool = True, calibration: Union[None, str, Path] = None) -> int:
        """Quantize every decoder layer into the cache; returns how many were added.

        Resumable: layers already in the cache are skipped, so a prewarm killed half-way
        and started again does only the missing ones. A calibrated config (``method="gptq"``)
        is warmed by :func:`sli.calibration.calibrate` on ``calibration``: the text (a ``str``),
        a file holding it (a :class:`~pathlib.Path`), or None for the default text; the config
        must name the same text (:func:`sli.calibration.calibration_config`).
        """
        from tqdm.auto import tqdm

        if self.quantizer.needs_calibration():
            from .calibration import calibrate

            return calibrate(self, calibration, progress=progress)
        if calibration is not None:
            raise SLIError("prewarm(calibration=...) needs a calibrated config: QuantizationConfig(mode='int4' or "
                           "'nf4', method='gptq'), or sli.calibration.calibration_config(config, text=...)")
        added = 0
        for index in tqdm(range(self.layout.num_layers), desc=f"warming {self.model_id}", unit="layer",
                          disable=not progress):
            if self.cache.contains(self.model_id, index, self.quantizer):
                continue
            self._cached_layer(index)
            added += 1
        return added

    def _run(self, **kwargs):
        """One pass of the model's own forward, its decoder layers streamed by the runner."""
        self.runner.make_resident(self.plan.resident_layers)
        self._ready_one_calls()
        ids = kwargs.get("input_ids")
        with self._fused_pass(0 if ids is None else ids.numel(), [kwargs.get("position_ids")]):
            return self.runner.run(lambda: self.model(**kwargs))

    def _ready_one_calls(self) -> None:
        """The resident layers' one-token steps as compiled calls, made and loaded now (the
        first pass: a prompt) rather than in the first decode token."""
        if self.kv_dtype not in ("int8", "bfloat16") or not self.reads_kv_in_place:
            return
        for index in self.runner.resident:
            if index not in self._one_calls_ready:
                self._one_calls_ready.add(index)
                step = self.runner.decode_step(index)
                call = step.one_call() if step is not None and decode_step.one_call_enabled() else None
                if call is not None:
                    call.ready(self.kv_dtype)

    def _run_layer_major(self, jobs: List[LayerJob]) -> None:
        """Captured layer jobs, each layer once for all of them (see :meth:`step_many`)."""
        self.runner.make_resident(self.plan.resident_layers)
        self._ready_one_calls()
        rows = max((job.hidden.shape[:-1].numel() for job in jobs), default=0)
        with self._fused_pass(rows, [job.layer_inputs[0][1].get("position_ids") for job in jobs if job.layer_inputs]):
            self.runner.run_layer_major(jobs)

    def _fused_pass(self, rows: int, positions: List[Optional[torch.Tensor]]):
        """:func:`sli.kernels.fused_pass` for a pass of ``rows`` rows at ``positions`` (the context: the
        furthest of them; none counts when attention reads the KV bytes in place, in the kernels)."""
        context = [int(p.max()) for p in positions if p is not None and p.numel() and not self.reads_kv_in_place]
        return kernels.fused_pass(rows, self.device, max(context, default=0), self._fused_max_rows)

    def forward(self, input_ids, attention_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Logits ``[B, S, V]`` for ``input_ids`` ``[B, S]`` (one pass over the layers)."""
        input_ids = check_token_ids(input_ids, self._vocab_size(), self.device)
        if attention_mask is not None:
            attention_mask = attention_mask.to(self.device)
        return self._run(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits

    __call__ = forward

    def tokenizer(self):
        """The model directory's tokenizer, or an error saying none is there."""
        if getattr(self, "_tokenizer", None) is None:
            try:
                self._tokenizer = hf.load_tokenizer(self.model_dir)
            except (OSError, ValueError) as exc:
                raise ModelLoadError(f"{self.model_dir} has no tokenizer ({exc}); pass token ids instead of text") from exc
        return self._tokenizer

    def _vocab_size(self) -> int:
        return self.model.get_input_embeddings().num_embeddings

    def new_session(self, reserve: Optional[int] = None) -> GenerationSession:
        """An empty conversation: pass it to :meth:`generate` turn after turn, and each turn
        feeds only its own tokens (the KV cache keeps the rest). ``reserve``: the positions its
        keys and values get room for at once (default ``max_context_tokens``; more grow it)."""
        return GenerationSession(self._new_kv_cache(reserve or self.max_context_tokens))

    def _new_kv_cache(self, reserve: int):
        """An empty KV cache: compact layers with room for ``reserve`` positions, the plan's
        spilled layers as file maps in the cache directory."""
        if self.kv_dtype is None:  # transformers' own (a test's reference)
            return hf.new_kv_cache(self.config)
        spilled, spill_dir = set(self.plan.kv_spilled_layers), self.cache.cache_dir / "kv-spill"
        return link_spilled(hf.new_kv_cache(self.config, lambda index: compact_kv_layer(
            self.kv_dtype, reserve, spill_dir if index in spilled else None, self.reads_kv_in_place)))

    def _step(self, ids: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor, kv_cache):
        """One forward over new positions with the KV cache: (last logits [B, V], cache).
        A prompt longer than a chunk runs in chunks inside each layer (one pass)."""
        if ids.shape[1] > self.prefill_chunk_tokens and chunkable(kv_cache):
            return self.step_many([(ids, mask, positions, kv_cache)])[0], kv_cache
        if self._resident_decode is not None:  # one token over resident layers: no model forward
            logits = self._resident_decode.run(ids, mask, positions, kv_cache)
            if logits is not None:
                return logits, kv_cache
        out = self._run(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True,
                        **{hf.cache_argument(self.model): kv_cache}, **hf.last_logits_kwargs(self.model))
        return out.logits[:, -1, :], hf.output_cache(out)

    def step_many(self, items: Sequence[StepInput]) -> List[torch.Tensor]:
        """One pass over the layers for several independent sequences, each with its own new
        ids ``[B, S]``, attention mask ``[B, P + S]`` (``P`` positions already in its cache),
        positions ``[B, S]`` and KV cache: each layer is fetched once and runs every sequence
        (a long prompt a chunk at a time, see :mod:`sli.chunked_prefill`) before the next.
        Returns each sequence's last-position logits ``[B, V]``; the caches hold the new positions.
        Single tokens of several sequences (decoding) run as one batch: each layer multiplies
        them together, every row attending to its own keys and values. One sequence's step no
        longer than a prefill chunk (a server's lone client) takes :meth:`generate`'s own path.
        """
        if len(items) == 1 and items[0][0].shape[1] <= self.prefill_chunk_tokens:
            return [self._step(*items[0])[0]]
        return batched_step.step_many(self.model, self.layers, items, chunk_tokens=self.prefill_chunk_tokens,
                                      run_jobs=self._run_layer_major, device=self.device,
                                      new_kv_cache=lambda: hf.new_kv_cache(self.config))

    @torch.inference_mode()
    def generate(self, input_ids_or_prompt, max_new_tokens: int = 32, do_sample: bool = False,
                 temperature: float = 1.0, top_k: Optional[int] = None, top_p: Optional[float] = None,
                 eos_token_id: Optional[Union[int, Sequence[int]]] = None, attention_mask: Optional[torch.Tensor] = None,
                 callback: Optional[Callable[[torch.Tensor], None]] = None, seed: Optional[int] = None,
                 session: Optional[GenerationSession] = None,
                 should_stop: Optional[Callable[[], bool]] = None, min_p: Optional[float] = None,
                 repetition_penalty: float = 1.0) -> torch.Tensor:
        """Generate up to ``max_new_tokens`` tokens with a KV cache; returns the new ids ``[B, T]``.

        ``input_ids_or_prompt``: token ids ``[S]``/``[B, S]`` (left-padded with
        ``attention_mask`` for a batch), or text / a list of texts (needs a tokenizer).
        Each new token streams the layers once over one position. ``callback`` gets each
        step's new tokens ``[B]`` as they come. A finished row (EOS) keeps emitting EOS.
        ``session`` (:meth:`new_session`, one sequence) continues a conversation: the call feeds
        only the new prompt, after what the session's KV cache already holds. ``should_stop()``
        returning True ends generation after the current token. ``repetition_penalty`` (> 0, 1 =
        off) and ``min_p`` (in [0, 1], 0 = off) act as transformers' (:mod:`sli.generation`); the
        penalty counts the prompt, a session's earlier turns and the answer.
        """
        if max_new_tokens < 0:
            raise ValueError(f"max_new_tokens={max_new_tokens} is negative; pass 0 or more")
        if temperature <= 0 and do_sample:
            raise ValueError(f"temperature={temperature} must be > 0 when sampling; use do_sample=False for greedy")
        input_ids, mask = encode_prompts(input_ids_or_prompt, self.tokenizer, self._vocab_size(), self.device)
        if attention_mask is not None:
            mask = attention_mask.to(self.device)
        if eos_token_id is None:
            eos_token_id = self.config.eos_token_id
        eos = [eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id or [])
        generator = torch.Generator(device=self.device).manual_seed(seed) if seed is not None else None
        if session is None:
            check_length(input_ids.shape[1] + max_new_tokens, self.max_positions)
            kv_cache = self._new_kv_cache(input_ids.shape[1] + max_new_tokens)
            return generate_tokens(self._step, input_ids, mask, kv_cache, max_new_tokens, eos,
                                   do_sample, temperature, top_k, top_p, generator, callback, should_stop,
                                   min_p=min_p, repetition_penalty=repetition_penalty)
        if input_ids.shape[0] != 1:
            raise ValueError(f"a session holds one conversation; got a batch of {input_ids.shape[0]} prompts")
        ids, mask = session.continue_with(input_ids[mask.bool()].view(1, -1))
        check_length(session.length + ids.shape[1] + max_new_tokens, self.max_positions)
        history = torch.tensor([session.token_ids[:session.length]], dtype=torch.long, device=self.device)
        new = generate_tokens(self._step, ids, mask, session.kv_cache, max_new_tokens, eos,
                              do_sample, temperature, top_k, top_p, generator, callback, should_stop,
                              min_p=min_p, repetition_penalty=repetition_penalty, history=history)
        session.record(ids, new)
        return new

    def stats(self) -> Dict[str, object]:
        """Cache statistics and the memory plan."""
        return {"cache": self.cache.stats().to_dict(), "memory_plan": self.plan.describe(),
                "resident_layers": len(self.plan.resident_layers), "num_layers": self.layout.num_layers,
                "kv_dtype": self.kv_dtype, "kv_bytes_in_memory": self.plan.kv_bytes,
                "kv_bytes_spilled": self.plan.kv_spilled_bytes}

    def close(self) -> None:
        self.streamer.close()
        self.cache.close()

    def __enter__(self) -> "UniversalSLIProcessor":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
