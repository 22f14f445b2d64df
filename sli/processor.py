"""UniversalSLIProcessor: run a causal LM layer by layer from the quantized layer cache.

A thin facade: :mod:`sli.transformers_adapter` builds the skeleton, :mod:`sli.shared_modules`
loads what stays resident, :mod:`sli.memory_plan` decides what the budget holds,
:class:`sli.layer_runner.LayerRunner` streams the decoder layers, and
:mod:`sli.generation` runs the decode loop over this processor's forward step.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

import torch
from torch import nn

from . import device as device_calls
from . import kernels
from . import transformers_adapter as hf
from .architectures import ModelLayout, discover_layout
from .checkpoint import Checkpoint, SkeletonLoader, checkpoint_model_id, resolve_model_dir
from .errors import ModelLoadError, SLIError, UnsupportedArchitectureError
from .chunked_prefill import (capture_layer_inputs, chunk_bounds, chunkable, finish_forward, set_cache_length,
                              set_row_lengths)
from .generation import GenerationSession, generate_tokens
from .kv_cache import KV_DTYPES, compact_kv_layer, kv_bytes_per_token, stack_caches
from .layer_cache import LayerCache
from .layer_runner import LayerRunner
from .memory_plan import MemoryPlan, plan_memory
from .model_check import max_positions
from .quantization import (CachedLayer, LayerQuantizer, QuantizationConfig, QuantizedLinear, default_compute_dtype,
                           split_cached)
from .quantization.execution import WeightScratch, prompt_chunk_rows, warm_up_kernels
from .quantization.modules import linear_paths, set_submodule
from .settings import GB, default_cache_dir
from .shared_modules import load_shared_modules
from .streaming import LayerStreamer, LayerTiming, ready_bytes

logger = logging.getLogger(__name__)

__all__ = ["UniversalSLIProcessor", "default_cache_dir"]

# step_many's input: (new ids [B, S], attention mask [B, P + S], positions [B, S], KV cache)
StepInput = Tuple[torch.Tensor, torch.Tensor, torch.Tensor, Any]

# "packed": linears multiply by the cached bytes (CPU); "dequantize": each layer is
# dequantized into reused compute-dtype buffers and runs as plain modules (CUDA, or CPU).
STRATEGIES = ("packed", "dequantize")


def _return_freed_buffers_to_the_os() -> None:
    """Make glibc serve large allocations with mmap, always.

    glibc raises its mmap threshold after large blocks are freed (up to 32 MB), after
    which freed layer buffers stay in the heap and count against RSS. A fixed threshold
    keeps layer-sized buffers mmapped, so freeing one gives the memory back at once.
    """
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        M_MMAP_THRESHOLD = -3
        libc.mallopt(M_MMAP_THRESHOLD, 1 << 20)
    except (OSError, AttributeError):  # not glibc: nothing to tune
        pass


def _as_quantizer(quantization_config) -> LayerQuantizer:
    if isinstance(quantization_config, LayerQuantizer):
        return quantization_config
    if isinstance(quantization_config, QuantizationConfig):
        return LayerQuantizer(quantization_config)
    if isinstance(quantization_config, str) or quantization_config is None:
        return LayerQuantizer(QuantizationConfig(mode=quantization_config or "none"))
    raise TypeError("quantization_config must be a QuantizationConfig, an AdaptiveQuantizer, a mode name or None")


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
            default when a memory budget is set, since those bytes count against it.
        max_gpu_memory_gb: on CUDA, the budget for resident + streamed layers.
        memory_budget_gb: on CPU, the RAM budget for resident + streamed layers.
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
        _return_freed_buffers_to_the_os()
        try:
            self.device = device_calls.resolve(device)
        except ValueError as exc:
            raise SLIError(str(exc)) from exc
        self.strategy = self._check_strategy(strategy)
        self.quantizer = _as_quantizer(quantization_config)
        self.quantization_config = self.quantizer.config
        self.compute_dtype = self.quantization_config.compute_dtype or default_compute_dtype(self.device)

        if kv_dtype not in KV_DTYPES:
            raise ValueError(f"kv_dtype={kv_dtype!r} is not one of {', '.join(KV_DTYPES)}")
        self.kv_dtype = kv_dtype
        if prefill_chunk_tokens is not None and prefill_chunk_tokens < 1:
            raise ValueError(f"prefill_chunk_tokens={prefill_chunk_tokens} must be >= 1")
        self.checkpoint = Checkpoint(self.model_dir)
        self.config = self._read_config()
        self.max_positions = max_positions(self.config.to_dict())
        self.max_context_tokens = max_context_tokens or min(self.max_positions or 4096, 4096)
        self.model, loader_model = self._build_skeletons()
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
            self._swap_linears()
            if self.compute_dtype == torch.float32:
                # NONE too: a bfloat16 head multiplies with the bf16 kernel, and skipped linears stay as stored
                warm_up_kernels(self.quantizer.configs() + [QuantizationConfig()])

        budget_gb = max_gpu_memory_gb if self.device.type == "cuda" else memory_budget_gb
        self.memory_budget = int(budget_gb * GB) if budget_gb is not None else None
        if max_memory_cache_size_gb is None and self.memory_budget is not None:
            max_memory_cache_size_gb = 0.0
        self.cache = LayerCache(cache_dir or default_cache_dir(), max_cache_size_gb=max_cache_size_gb,
                                max_memory_cache_size_gb=max_memory_cache_size_gb)
        self.shared_bytes = load_shared_modules(self.model, self._loader, self.checkpoint, self.layout.layers_path,
                                                self.device, self.compute_dtype, self.packed)
        self._plan: Optional[MemoryPlan] = None
        self._prefetch_depth = prefetch_depth if prefetch else 0
        self.streamer = LayerStreamer(self._cached_layer, self.device, self.compute_dtype,
                                      depth=prefetch_depth, prefetch=prefetch, packed=self.packed)
        self.runner = LayerRunner(self.layers, self.streamer, self.device)
        self.prefill_chunk_tokens = prefill_chunk_tokens or self._default_chunk_tokens()

    # ------------------------------------------------------------------ building
    def _check_strategy(self, strategy: Optional[str]) -> str:
        default = "packed" if self.device.type == "cpu" else "dequantize"
        strategy = strategy or default
        if strategy not in STRATEGIES:
            raise ValueError(f"strategy={strategy!r} is not one of {', '.join(STRATEGIES)}")
        if strategy == "packed" and self.device.type != "cpu":
            raise ValueError("strategy='packed' runs on CPU only (its kernels are CPU kernels); "
                             "use strategy='dequantize' on CUDA")
        return strategy

    def _read_config(self):
        try:
            config = hf.load_config(self.model_dir)
        except (ValueError, OSError, KeyError) as exc:
            raise ModelLoadError(f"cannot read {self.model_dir / 'config.json'} ({exc}); is it a transformers model?") from exc
        if getattr(config, "is_encoder_decoder", False):
            raise UnsupportedArchitectureError(
                f"{config.model_type!r} is an encoder-decoder model; sli streams decoder-only causal LMs")
        return config

    def _build_skeletons(self):
        """The skeleton that runs (compute dtype) and the one the loader fills (storage dtype)."""
        try:
            model = hf.build_skeleton(self.config, self.compute_dtype)
            loader_model = hf.build_skeleton(self.config, self.checkpoint.storage_dtype())
        except ValueError as exc:
            raise UnsupportedArchitectureError(
                f"transformers has no causal-LM class for model_type {self.config.model_type!r} ({exc}); "
                "sli streams AutoModelForCausalLM models") from exc
        model.eval()
        return model, loader_model

    def _swap_linears(self) -> None:
        """Every decoder linear becomes an empty :class:`QuantizedLinear` (loaded per pass)."""
        scratch = WeightScratch()  # one dequantized row chunk at a time, for prompts
        for index, layer in enumerate(self.layers):
            for path, conv1d in self._linears[index].items():
                module = layer.get_submodule(path)
                in_f, out_f = module.weight.shape if conv1d else module.weight.shape[::-1]
                set_submodule(layer, path, QuantizedLinear(in_f, out_f, module.bias is not None, self.compute_dtype,
                                                           transposed=conv1d, scratch=scratch))

    def _layer_key(self, index: int) -> str:
        return f"{self.layout.layers_path}.{index}"

    def _cached_layer(self, index: int) -> CachedLayer:
        """Layer ``index`` from the cache, quantizing it from the checkpoint on a miss.

        On CPU a disk hit is mapped, not read: the layer's linears compute straight from the
        page cache's copy of the entry (see :meth:`LayerCache.get`)."""
        cached = self.cache.get(self.model_id, index, self.quantizer, mapped=self.packed)
        if cached is not None:
            return cached
        state = self._loader.layer_state(index, self._loader_layers[index])
        self.checkpoint.release()
        cached = self.quantizer.quantize_state_dict(state, self._linears[index], self._layer_key(index))
        del state
        self.cache.put(self.model_id, index, self.quantizer, cached)
        self._check_cache_room(cached.nbytes)
        return cached

    def _sizing_layer(self) -> CachedLayer:
        """Layer 0 as the cache holds it, or would: a calibrated entry not made yet has the
        rounded entry's layout, so that one (not stored) tells its size."""
        if not self.quantizer.needs_calibration() or self.cache.contains(self.model_id, 0, self.quantizer):
            return self._cached_layer(0)
        state = self._loader.layer_state(0, self._loader_layers[0])
        self.checkpoint.release()
        return self.quantizer.quantize_state_dict(state, self._linears[0], self._layer_key(0), round_calibrated=True)

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
            params = sum(p.numel() for p in self.layers[0].parameters())
            return params * torch.finfo(self.compute_dtype).bits // 8, 0
        # What a loaded layer holds: the cached bytes, the kernels' precomputed scales and
        # the norms in compute dtype; plus, for a prompt, one weight's dequantized row chunk.
        cached = self._sizing_layer()
        qweights, _ = split_cached(cached)
        chunk = max((prompt_chunk_rows(q) * int(q.metadata["shape"][1]) for q in qweights.values()), default=0)
        return ready_bytes(cached, self.compute_dtype), chunk * torch.finfo(self.compute_dtype).bits // 8

    @property
    def plan(self) -> MemoryPlan:
        """How the memory budget is spent; made on first use (it reads layer 0's cache entry,
        quantizing it on a miss, to know what a ready layer weighs)."""
        if self._plan is None:
            layer_bytes, scratch = self._layer_bytes()
            available = device_calls.available_bytes(self.device)
            runtime = kernels.RUNTIME_BYTES if self.packed and kernels.kernels_enabled() else 0
            self._plan = plan_memory(self.memory_budget, num_layers=self.layout.num_layers,
                                     shared_bytes=self.shared_bytes, layer_bytes=layer_bytes, scratch_bytes=scratch,
                                     prefetch_depth=self._prefetch_depth, runtime_bytes=runtime,
                                     available_bytes=int(available),
                                     kv_layer_bytes=self._kv_bytes(self.max_context_tokens) // self.layout.num_layers,
                                     kv_can_spill=self.kv_dtype in ("bfloat16", "int8"))
            if self._plan.over_budget:
                logger.warning("memory budget %.2f GB is below the shared modules + streaming + kernel runtime + "
                               "KV in flight (%.2f GB); every layer streams", self._plan.budget / GB,
                               self._plan.fixed_bytes / GB)
            logger.info("%s: %d layers at %s; %s", self.model_id, self.layout.num_layers, self.layout.layers_path,
                        self._plan.describe())
        return self._plan

    def _default_chunk_tokens(self) -> int:
        """What an eighth of the budget holds of one token's activations in a layer (hidden
        states, attention projections, the MLP's intermediates), 64 to 2048 tokens."""
        if self.memory_budget is None:
            return 512
        text = hf.text_config(self.config)
        hidden = text.hidden_size
        intermediate = getattr(text, "intermediate_size", None) or getattr(text, "n_inner", None) or 4 * hidden
        per_token = torch.finfo(self.compute_dtype).bits // 8 * (4 * hidden + 3 * intermediate)
        return int(min(2048, max(64, self.memory_budget // 8 // per_token)))

    def _kv_bytes(self, tokens: int, batch: int = 1) -> int:
        """Bytes the keys and values of ``tokens`` positions take, every layer (an upper bound:
        sliding-window layers hold less)."""
        text = hf.text_config(self.config)
        heads = getattr(text, "num_attention_heads", None) or getattr(text, "n_head", 1)
        kv_heads = getattr(text, "num_key_value_heads", None) or heads
        head_dim = getattr(text, "head_dim", None) or text.hidden_size // heads
        return batch * tokens * kv_bytes_per_token(self.layout.num_layers, kv_heads, head_dim, self.kv_dtype)

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

    def _check_ids(self, input_ids: torch.Tensor) -> torch.Tensor:
        if not isinstance(input_ids, torch.Tensor):
            input_ids = torch.tensor(input_ids, dtype=torch.long)
        if input_ids.dim() == 1:
            input_ids = input_ids.unsqueeze(0)
        if input_ids.numel() == 0:
            raise ValueError("the prompt is empty; pass at least one token id")
        vocab = self.model.get_input_embeddings().num_embeddings
        low, high = int(input_ids.min()), int(input_ids.max())
        if low < 0 or high >= vocab:
            raise ValueError(f"token id {high if high >= vocab else low} is outside the vocabulary [0, {vocab}); "
                             "use the model's own tokenizer")
        return input_ids.to(self.device)

    def _run(self, **kwargs):
        """One pass of the model's own forward, its decoder layers streamed by the runner."""
        self.runner.make_resident(self.plan.resident_layers)
        return self.runner.run(lambda: self.model(**kwargs))

    def forward(self, input_ids, attention_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Logits ``[B, S, V]`` for ``input_ids`` ``[B, S]`` (one pass over the layers)."""
        input_ids = self._check_ids(input_ids)
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

    def _encode(self, prompts) -> "tuple[torch.Tensor, torch.Tensor]":
        if isinstance(prompts, str) or (isinstance(prompts, list) and prompts and isinstance(prompts[0], str)):
            texts = [prompts] if isinstance(prompts, str) else prompts
            if any(not t for t in texts):
                raise ValueError("the prompt is empty; pass some text")
            tok = self.tokenizer()
            tok.padding_side = "left"
            if tok.pad_token is None:
                tok.pad_token = tok.eos_token
            enc = tok(texts, return_tensors="pt", padding=True)
            return self._check_ids(enc["input_ids"]), enc["attention_mask"].to(self.device)
        ids = self._check_ids(prompts)
        return ids, torch.ones_like(ids)

    def _check_length(self, total: int) -> None:
        if self.max_positions is not None and total > self.max_positions:
            raise ValueError(f"the prompt and new tokens need {total} positions, more than this model's "
                             f"{self.max_positions} (max_position_embeddings); shorten the prompt or max_new_tokens")

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
        return hf.new_kv_cache(self.config, lambda index: compact_kv_layer(
            self.kv_dtype, reserve, spill_dir if index in spilled else None))

    def _step(self, ids: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor, kv_cache):
        """One forward over new positions with the KV cache: (last logits [B, V], cache).
        A prompt longer than a chunk runs in chunks inside each layer (one pass)."""
        if ids.shape[1] > self.prefill_chunk_tokens and chunkable(kv_cache):
            return self.step_many([(ids, mask, positions, kv_cache)])[0], kv_cache
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
        them together, every row attending to its own keys and values.
        """
        items = list(items)
        tokens = [i for i, (ids, _, _, kv) in enumerate(items) if ids.shape == (1, 1) and chunkable(kv)]
        batched = None
        if len(tokens) > 1:
            batched = self._decode_batch([items[i] for i in tokens])
            items = [item for i, item in enumerate(items) if i not in set(tokens)] + [batched]
        plans = []  # per item: (past, length, bounds, forward_kwargs, jobs)
        with torch.inference_mode():
            for ids, mask, positions, kv_cache in items:
                past, length = kv_cache.get_seq_length(), ids.shape[1]
                chunked = chunkable(kv_cache)
                bounds = chunk_bounds(length, self.prefill_chunk_tokens if chunked else length)

                def forward_kwargs(start, stop, ids=ids, mask=mask, positions=positions, kv_cache=kv_cache,
                                   length=length) -> dict:
                    return dict(input_ids=ids[:, start:stop], attention_mask=mask[:, :mask.shape[1] - length + stop],
                                position_ids=positions[:, start:stop], use_cache=True,
                                **{hf.cache_argument(self.model): kv_cache}, **hf.last_logits_kwargs(self.model))

                jobs = []
                for start, stop in bounds:
                    if chunked:
                        set_cache_length(kv_cache, past + start)  # what this chunk's mask sees before it
                    jobs.append(capture_layer_inputs(self.model, self.layers, forward_kwargs(start, stop)))
                if chunked:
                    set_cache_length(kv_cache, past)
                plans.append((kv_cache, chunked, past, length, bounds, forward_kwargs, jobs))
            self.runner.make_resident(self.plan.resident_layers)
            self.runner.run_layer_major([job for plan in plans for job in plan[-1]])
            logits = []
            for kv_cache, chunked, past, length, bounds, forward_kwargs, jobs in plans:
                # the norm and head's forward sees the cache as the last chunk's mask did
                rows = getattr(kv_cache.layers[0], "rows", None) if kv_cache.layers else None
                if rows is not None:  # a decode batch: each row one position back, then forward again
                    set_row_lengths(kv_cache, -1)
                elif chunked:
                    set_cache_length(kv_cache, past + bounds[-1][0])
                out = finish_forward(self.model, self.layers, forward_kwargs(*bounds[-1]), jobs[-1])
                if rows is not None:
                    set_row_lengths(kv_cache, +1)
                elif chunked:
                    set_cache_length(kv_cache, past + length)
                logits.append(out.logits[:, -1, :])
        if batched is None:
            return logits
        rows = iter(logits.pop().split(1))  # the batch came last, its rows in the order of `tokens`
        others = iter(logits)
        return [next(rows) if i in set(tokens) else next(others) for i in range(len(tokens) + len(logits))]

    def _decode_batch(self, items: Sequence[StepInput]) -> StepInput:
        """Single-token items of several sequences as one batch: ids ``[N, 1]``, each row's own
        position, a mask left-padded to the longest history, and a cache whose rows are theirs."""
        lengths = [kv.get_seq_length() for _, _, _, kv in items]
        longest = max(lengths)
        mask = torch.zeros(len(items), longest + 1, dtype=torch.long)
        for row, length in enumerate(lengths):
            mask[row, longest - length:] = 1
        ids = torch.cat([ids for ids, _, _, _ in items])
        positions = torch.cat([positions for _, _, positions, _ in items])
        cache = stack_caches([kv for _, _, _, kv in items], lambda: hf.new_kv_cache(self.config))
        return ids.to(self.device), mask.to(self.device), positions.to(self.device), cache

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
        input_ids, mask = self._encode(input_ids_or_prompt)
        if attention_mask is not None:
            mask = attention_mask.to(self.device)
        if eos_token_id is None:
            eos_token_id = self.config.eos_token_id
        eos = [eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id or [])
        generator = torch.Generator(device=self.device).manual_seed(seed) if seed is not None else None
        if session is None:
            self._check_length(input_ids.shape[1] + max_new_tokens)
            kv_cache = self._new_kv_cache(input_ids.shape[1] + max_new_tokens)
            return generate_tokens(self._step, input_ids, mask, kv_cache, max_new_tokens, eos,
                                   do_sample, temperature, top_k, top_p, generator, callback, should_stop,
                                   min_p=min_p, repetition_penalty=repetition_penalty)
        if input_ids.shape[0] != 1:
            raise ValueError(f"a session holds one conversation; got a batch of {input_ids.shape[0]} prompts")
        ids, mask = session.continue_with(input_ids[mask.bool()].view(1, -1))
        self._check_length(session.length + ids.shape[1] + max_new_tokens)
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
