"""UniversalSLIProcessor: run a causal LM layer by layer from the quantized layer cache."""
from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Union

import psutil
import torch
from torch import nn

from . import kernels
from .architectures import ModelLayout, discover_layout
from .checkpoint import Checkpoint, SkeletonLoader, resolve_model_dir
from .codecs import QuantizedTensor, WeightScratch, codec_for, warm_up_kernels
from .errors import ModelLoadError, SLIError, UnsupportedArchitectureError
from .generation import sample_next_token
from .layer_cache import LayerCache
from .quantization import (AdaptiveQuantizer, CachedLayer, LayerQuantizer, QuantizationConfig, QuantizationMode, _is_conv1d,
                           default_compute_dtype, is_linear, split_cached)
from .streaming import LayerStreamer, LayerTiming, LoadedLayer, StreamedLinear, ready_bytes

logger = logging.getLogger(__name__)

GB = 1024**3


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


def default_cache_dir() -> Path:
    """``$SLI_CACHE_DIR``, else ``$SLI_HOME/layer-cache``, else ``~/.cache/sli/layer-cache``."""
    if os.environ.get("SLI_CACHE_DIR"):
        return Path(os.environ["SLI_CACHE_DIR"])
    home = Path(os.environ.get("SLI_HOME", Path.home() / ".cache" / "sli"))
    return home / "layer-cache"


@dataclass
class MemoryPlan:
    """How the memory budget is spent (bytes)."""

    budget: Optional[int]
    shared_bytes: int  # embeddings, final norm, head, rotary: always resident
    layer_bytes: int  # one ready decoder layer (CPU: its cached bytes + kernel tables; CUDA: dequantized)
    streaming_bytes: int  # layers in flight (running + prefetched) and one prompt-sized work buffer
    runtime_bytes: int = 0  # the kernels' runtime (numba), paid once
    resident_layers: List[int] = field(default_factory=list)

    def describe(self) -> str:
        b = "unbounded" if self.budget is None else f"{self.budget / GB:.2f} GB"
        return (f"budget {b}: shared {self.shared_bytes / GB:.2f} GB, {len(self.resident_layers)} resident layers "
                f"of {self.layer_bytes / GB:.3f} GB, streaming {self.streaming_bytes / GB:.3f} GB, "
                f"kernels {self.runtime_bytes / GB:.2f} GB")


class UniversalSLIProcessor:
    """Streams a local Hugging Face causal LM through a quantized layer cache.

    Args:
        model_name: a local model directory (config.json + safetensors or .bin weights).
        quantization_config: a :class:`QuantizationConfig`, an :class:`AdaptiveQuantizer`,
            or None for NONE (the checkpoint's weights as they are).
        cache_dir: the layer cache directory (default :func:`default_cache_dir`).
        device: "cpu", "cuda" or a torch.device (default CUDA when present).
        max_cache_size_gb: the disk tier's size limit.
        max_memory_cache_size_gb: the cache's in-memory tier (quantized layers); 0 by
            default when a memory budget is set, since those bytes count against it.
        max_gpu_memory_gb: on CUDA, the budget for resident + streamed layers.
        memory_budget_gb: on CPU, the RAM budget for resident + streamed layers.
        prefetch: load the next layer in the background while the current one runs.
        prefetch_depth: how many layers ahead to load.

    Raises:
        ModelLoadError: missing directory, no weights, unreadable shard.
        UnsupportedArchitectureError: a layout that cannot stream (encoder-decoder, ...).
    """

    def __init__(self, model_name: Union[str, Path], quantization_config=None, *, cache_dir=None, device=None,
                 max_cache_size_gb: Optional[float] = None, max_memory_cache_size_gb: Optional[float] = None,
                 max_gpu_memory_gb: Optional[float] = None, memory_budget_gb: Optional[float] = None,
                 prefetch: bool = True, prefetch_depth: int = 1, model_id: Optional[str] = None) -> None:
        from accelerate import init_empty_weights
        from transformers import AutoConfig, AutoModelForCausalLM

        self.model_dir = resolve_model_dir(model_name)
        _return_freed_buffers_to_the_os()
        self.device = torch.device(device) if device is not None else torch.device(
            "cuda" if torch.cuda.is_available() else "cpu")
        if self.device.type == "cuda" and not torch.cuda.is_available():
            raise SLIError("device='cuda' was asked for but torch sees no CUDA GPU; use device='cpu'")
        if isinstance(quantization_config, (str, QuantizationConfig)) or quantization_config is None:
            config = quantization_config if isinstance(quantization_config, QuantizationConfig) else \
                QuantizationConfig(mode=quantization_config or "none")
            self.quantizer: LayerQuantizer = LayerQuantizer(config)
        elif isinstance(quantization_config, LayerQuantizer):
            self.quantizer = quantization_config
        else:
            raise TypeError("quantization_config must be a QuantizationConfig, an AdaptiveQuantizer, a mode name or None")
        self.quantization_config = self.quantizer.config
        self.compute_dtype = self.quantization_config.compute_dtype or default_compute_dtype(self.device)

        self.checkpoint = Checkpoint(self.model_dir)
        try:
            self.config = AutoConfig.from_pretrained(self.model_dir, local_files_only=True)
        except (ValueError, OSError, KeyError) as exc:
            raise ModelLoadError(f"cannot read {self.model_dir / 'config.json'} ({exc}); is it a transformers model?") from exc
        if getattr(self.config, "is_encoder_decoder", False):
            raise UnsupportedArchitectureError(
                f"{self.config.model_type!r} is an encoder-decoder model; sli streams decoder-only causal LMs")
        storage_dtype = self.checkpoint.storage_dtype()
        try:
            with init_empty_weights():  # parameters on meta; buffers (rotary tables) real
                self.model = AutoModelForCausalLM.from_config(self.config, dtype=self.compute_dtype)
                loader_model = AutoModelForCausalLM.from_config(self.config, dtype=storage_dtype)
        except ValueError as exc:
            raise UnsupportedArchitectureError(
                f"transformers has no causal-LM class for model_type {self.config.model_type!r} ({exc}); "
                "sli streams AutoModelForCausalLM models") from exc
        self.model.eval()
        self.layout: ModelLayout = discover_layout(self.model, self.config)
        self.layers: nn.ModuleList = self.model.get_submodule(self.layout.layers_path)
        self._loader = SkeletonLoader(self.checkpoint, loader_model, self.layout.layers_path)
        self._loader_layers = loader_model.get_submodule(self.layout.layers_path)
        self.model_id = model_id or f"{self.model_dir.name}-{self.checkpoint.identity()}"
        # linear path → is it a Conv1D, per layer (read before the linears are swapped)
        self._linears: List[Dict[str, bool]] = [
            {name: _is_conv1d(m) for name, m in layer.named_modules() if name and is_linear(m)} for layer in self.layers]
        # On CPU, linears multiply by the cached bytes directly (StreamedLinear); on CUDA,
        # layers are dequantized into device buffers by the side stream.
        self.packed = self.device.type == "cpu"
        if self.packed:
            self._swap_linears()
            if self.compute_dtype == torch.float32:
                warm_up_kernels(self._configs_in_use())

        budget_gb = max_gpu_memory_gb if self.device.type == "cuda" else memory_budget_gb
        self.memory_budget = int(budget_gb * GB) if budget_gb is not None else None
        if max_memory_cache_size_gb is None and self.memory_budget is not None:
            max_memory_cache_size_gb = 0.0
        self.cache = LayerCache(cache_dir or default_cache_dir(),
                                max_cache_size_gb=max_cache_size_gb if max_cache_size_gb is not None else 50.0,
                                max_memory_cache_size_gb=max_memory_cache_size_gb)

        self._load_shared()
        self._plan: Optional[MemoryPlan] = None
        self._prefetch_depth = prefetch_depth if prefetch else 0
        self.streamer = LayerStreamer(self._cached_layer, self.device, self.compute_dtype,
                                      depth=prefetch_depth, prefetch=prefetch, packed=self.packed)
        self._resident: Dict[int, bool] = {}
        self.timings: List[LayerTiming] = []
        self._current: Dict[int, LoadedLayer] = {}
        self._pass_start = 0.0
        self._install_hooks()

    def _configs_in_use(self) -> List[QuantizationConfig]:
        q = self.quantizer
        configs = [q.attention_config, q.ffn_config] if isinstance(q, AdaptiveQuantizer) else [q.config]
        # NONE too: a bfloat16 head multiplies with the bf16 kernel, and skipped linears stay as stored
        return configs + [QuantizationConfig()]

    # ------------------------------------------------------------------ loading
    def _load_shared(self) -> None:
        """Embeddings, final norm, head: loaded once, kept on the compute device."""
        shared = self._loader.names_by_layer.get(None, [])
        state = self.checkpoint.get_many(shared)
        # On CPU a bfloat16 checkpoint's embedding and head stay bfloat16 (see
        # _narrow_embeddings), so they are loaded as they are stored, never widened first.
        narrow = (self.packed and self.compute_dtype == torch.float32
                  and all(t.dtype == torch.bfloat16 for t in state.values() if t.is_floating_point()))
        from transformers.core_model_loading import convert_and_load_state_dict_in_model
        from transformers.modeling_utils import LoadStateDictConfig
        from transformers.utils import logging as hf_logging

        if narrow:  # the skeleton's (meta) tables take the checkpoint's dtype; the loader keeps it
            for module in (self.model.get_input_embeddings(), self.model.get_output_embeddings()):
                if module is not None:
                    module.to(torch.bfloat16)
        bars = hf_logging.is_progress_bar_enabled()
        hf_logging.disable_progress_bar()
        try:
            convert_and_load_state_dict_in_model(
                self.model, state, LoadStateDictConfig(dtype=self.compute_dtype,
                                                       weight_mapping=self._loader.weight_mapping,
                                                       device_map={"": str(self.device)}))
        finally:
            if bars:
                hf_logging.enable_progress_bar()
        del state
        self.checkpoint.release()
        self.model.tie_weights()
        for name, tensor in list(self.model.named_parameters()) + list(self.model.named_buffers()):
            if name.startswith(self.layout.layers_path + "."):
                continue
            if tensor.device.type == "meta":
                raise ModelLoadError(f"the checkpoint has no tensor for {name!r}; the model files are incomplete: re-save the model")
        kept_head = self._narrow_embeddings() if narrow else None
        # Non-persistent buffers (rotary tables) were made on CPU by the skeleton.
        self.model.to(self.device) if self.device.type == "cuda" else None
        shared = {t.data_ptr(): t.numel() * t.element_size() for n, t in self.model.state_dict().items()
                  if not n.startswith(self.layout.layers_path + ".") and t.device.type != "meta"}
        if kept_head is not None:
            shared[kept_head.data_ptr()] = kept_head.numel() * kept_head.element_size()
        self.shared_bytes = sum(shared.values())  # a tied head shares the embedding's storage

    def _narrow_embeddings(self) -> Optional[torch.Tensor]:
        """Keep the bfloat16 embedding and head as they are; widen every other shared weight.

        Half the bytes of float32 copies (0.5 GB of a 7B model's 1 GB), same results: the
        head becomes a :class:`StreamedLinear` over its bfloat16 weight (the fused kernel for
        a token's logits, BLAS for a prompt's), and a plain ``nn.Embedding`` widens the rows
        it looks up. Other modules (norms, scaled embeddings) get float32 weights. Returns
        the head's weight when the state dict no longer lists it (an untied head).
        """
        embedding, head = self.model.get_input_embeddings(), self.model.get_output_embeddings()
        kept = None
        if type(head) is nn.Linear:
            streamed = StreamedLinear(head.in_features, head.out_features, head.bias is not None, self.compute_dtype)
            if head.bias is not None:
                streamed.bias = nn.Parameter(head.bias.detach().to(self.compute_dtype), requires_grad=False)
            kept = head.weight.detach()
            streamed.qweight = QuantizedTensor({"weight": kept}, {"codec": "none", "shape": list(kept.shape),
                                                                  "dtype": "bfloat16"})
            self.model.set_output_embeddings(streamed)
        plain_embedding = type(embedding) is nn.Embedding
        if plain_embedding:
            embedding.register_forward_hook(lambda module, args, out: out.to(torch.float32))
        for name, param in self.model.named_parameters():
            if name.startswith(self.layout.layers_path + ".") or not param.is_floating_point():
                continue
            if not (plain_embedding and param is embedding.weight):
                param.data = param.data.to(self.compute_dtype)
        if kept is not None and plain_embedding and embedding.weight.data_ptr() == kept.data_ptr():
            return None  # tied: the state dict counts it once, as the embedding
        return kept

    def _linear_paths(self, index: int) -> Dict[str, bool]:
        return self._linears[index]

    def _swap_linears(self) -> None:
        from .quantization import _set_submodule

        self._scratch = WeightScratch()  # one dequantized row chunk at a time, for prompts

        for index, layer in enumerate(self.layers):
            for path, conv1d in self._linears[index].items():
                module = layer.get_submodule(path)
                in_f, out_f = module.weight.shape if conv1d else module.weight.shape[::-1]
                _set_submodule(layer, path, StreamedLinear(in_f, out_f, module.bias is not None, self.compute_dtype,
                                                           scratch=self._scratch))

    def _layer_key(self, index: int) -> str:
        return f"{self.layout.layers_path}.{index}"

    def _cached_layer(self, index: int) -> CachedLayer:
        """Layer ``index`` from the cache, quantizing it from the checkpoint on a miss.

        On CPU a disk hit is mapped, not read: the layer's linears compute straight from the
        page cache's copy of the entry (see :meth:`LayerCache.get`)."""
        fingerprint_config = self.quantizer
        cached = self.cache.get(self.model_id, index, fingerprint_config, mapped=self.packed)
        if cached is not None:
            return cached
        state = self._loader.layer_state(index, self._loader_layers[index])
        self.checkpoint.release()
        cached = self.quantizer.quantize_state_dict(state, self._linear_paths(index), self._layer_key(index))
        del state
        self.cache.put(self.model_id, index, fingerprint_config, cached)
        return cached

    def _layer_bytes(self) -> "tuple[int, int]":
        """(bytes of one ready-to-run layer, bytes of transient work buffers)."""
        layer0 = self.layers[0]
        if not self.packed:
            return sum(p.numel() for p in layer0.parameters()) * torch.finfo(self.compute_dtype).bits // 8, 0
        # What a loaded layer holds: the cached bytes, the kernels' precomputed scales and
        # the norms in compute dtype; plus, for a prompt, one weight's dequantized row chunk
        # at a time (the whole weight where its codec cannot slice rows).
        cached = self._cached_layer(0)
        qweights, _ = split_cached(cached)
        chunk = max((codec_for(q.metadata["codec"]).prompt_chunk_rows(q) * int(q.metadata["shape"][1])
                     for q in qweights.values()), default=0)
        return ready_bytes(cached, self.compute_dtype), chunk * torch.finfo(self.compute_dtype).bits // 8

    @property
    def plan(self) -> MemoryPlan:
        """How the memory budget is spent; made on first use (it reads layer 0's cache entry,
        quantizing it on a miss, to know what a ready layer weighs)."""
        if self._plan is None:
            self._plan = self._plan_memory(self._prefetch_depth)
            logger.info("%s: %d layers at %s; %s", self.model_id, self.layout.num_layers, self.layout.layers_path,
                        self._plan.describe())
        return self._plan

    def _plan_memory(self, depth: int) -> MemoryPlan:
        layer_bytes, scratch = self._layer_bytes()
        slots = (depth + 1) * layer_bytes + scratch
        runtime = kernels.RUNTIME_BYTES if self.packed and kernels.kernels_enabled() else 0
        plan = MemoryPlan(self.memory_budget, self.shared_bytes, layer_bytes, slots, runtime)
        budget = self.memory_budget
        if budget is None:
            free = (torch.cuda.mem_get_info(self.device)[0] * 0.8 if self.device.type == "cuda"
                    else psutil.virtual_memory().available * 0.5)
            budget = int(free)
        fixed = self.shared_bytes + slots + runtime
        spare = budget - fixed
        if self.memory_budget is not None and spare < 0:
            logger.warning("memory budget %.2f GB is below the shared modules + streaming + kernel runtime (%.2f GB); "
                           "every layer streams", budget / GB, fixed / GB)
        count = max(0, min(self.layout.num_layers, spare // layer_bytes if layer_bytes else 0))
        plan.resident_layers = list(range(int(count)))
        return plan

    # ------------------------------------------------------------------ hooks
    def _install_hooks(self) -> None:
        for index, layer in enumerate(self.layers):
            layer.register_forward_pre_hook(self._make_pre_hook(index), with_kwargs=True)
            layer.register_forward_hook(self._make_post_hook(index), with_kwargs=True)
            # Weight-only codecs need nothing at run time; INT8_DYNAMIC also quantizes
            # each linear's input per token.
            for path in self._linear_paths(index):
                config = self.quantizer.config_for(f"{self._layer_key(index)}.{path}")
                if config is not None and config.mode == QuantizationMode.INT8_DYNAMIC:
                    codec = codec_for(config.mode)
                    layer.get_submodule(path).register_forward_pre_hook(
                        lambda module, args, codec=codec: (codec.prepare_input(args[0]), *args[1:]))

    def _materialize(self, index: int, loaded: LoadedLayer) -> None:
        layer = self.layers[index]
        layer.load_state_dict(loaded.state, strict=False, assign=True)
        for path, qweight in loaded.qweights.items():
            layer.get_submodule(path).qweight = qweight

    def _unload(self, index: int) -> None:
        layer = self.layers[index]
        layer.to("meta")
        for module in layer.modules():
            if isinstance(module, StreamedLinear):
                module.qweight = None

    def _next_streamed(self, index: int) -> List[int]:
        ahead = []
        i = index + 1
        while len(ahead) < self.streamer.depth and i < self.layout.num_layers:
            if i not in self._resident:
                ahead.append(i)
            i += 1
        return ahead

    def _make_pre_hook(self, index: int):
        def pre_hook(module, args, kwargs):
            if index in self._resident:
                self._current_timing = LayerTiming(self.streamer.step, index, resident=True)
            else:
                loaded = self.streamer.get(index)
                self._materialize(index, loaded)
                self._current[index] = loaded
                self._current_timing = loaded.timing
            ahead = self._next_streamed(index)
            for next_index in ahead:
                self.streamer.prefetch(next_index)
            if not ahead:
                # wrap around: the next pass starts with the first streamed layer
                first = next((i for i in range(self.layout.num_layers) if i not in self._resident), None)
                if first is not None and first != index:
                    self.streamer.prefetch(first)
            self._current_timing.start = time.perf_counter() - self._pass_start
            self._compute_t0 = time.perf_counter()
            return None
        return pre_hook

    def _make_post_hook(self, index: int):
        def post_hook(module, args, kwargs, output):
            if self.device.type == "cuda":
                torch.cuda.current_stream(self.device).synchronize()
            timing = self._current_timing
            timing.compute_s = time.perf_counter() - self._compute_t0
            self.timings.append(timing)
            loaded = self._current.pop(index, None)
            if loaded is not None:
                self._unload(index)
                self.streamer.release(loaded)
            return None
        return post_hook

    def _load_resident(self) -> None:
        for index in self.plan.resident_layers:
            if index not in self._resident:
                loaded = self.streamer._load(index)
                if loaded.slot is not None:  # dequantized into a reused buffer: keep a copy
                    kept = LoadedLayer({k: v.clone() for k, v in loaded.state.items()}, loaded.timing)
                    self.streamer.release(loaded)
                    loaded = kept
                self._materialize(index, loaded)
                self._resident[index] = True

    # ------------------------------------------------------------------ public API
    def prewarm(self, progress: bool = True) -> int:
        """Quantize every decoder layer into the cache; returns how many were added.

        Resumable: layers already in the cache are skipped, so a prewarm killed half-way
        and started again does only the missing ones.
        """
        from tqdm.auto import tqdm

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

    @torch.inference_mode()
    def _run(self, **kwargs):
        self._load_resident()
        self._pass_start = time.perf_counter()
        try:
            return self.model(**kwargs)
        except BaseException:
            self.streamer.cancel()
            for index in list(self._current):
                self._unload(index)
                self.streamer.release(self._current.pop(index))
            raise
        finally:
            self.streamer.step += 1

    def forward(self, input_ids, attention_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Logits ``[B, S, V]`` for ``input_ids`` ``[B, S]`` (one pass over the layers)."""
        input_ids = self._check_ids(input_ids)
        if attention_mask is not None:
            attention_mask = attention_mask.to(self.device)
        out = self._run(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
        return out.logits

    __call__ = forward

    def tokenizer(self):
        """The model directory's tokenizer, or an error saying none is there."""
        if getattr(self, "_tokenizer", None) is None:
            from transformers import AutoTokenizer

            try:
                self._tokenizer = AutoTokenizer.from_pretrained(self.model_dir, local_files_only=True)
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

    @torch.inference_mode()
    def generate(self, input_ids_or_prompt, max_new_tokens: int = 32, do_sample: bool = False,
                 temperature: float = 1.0, top_k: Optional[int] = None, top_p: Optional[float] = None,
                 eos_token_id: Optional[Union[int, Sequence[int]]] = None, attention_mask: Optional[torch.Tensor] = None,
                 callback: Optional[Callable[[torch.Tensor], None]] = None, seed: Optional[int] = None) -> torch.Tensor:
        """Generate up to ``max_new_tokens`` tokens with a KV cache; returns the new ids ``[B, T]``.

        ``input_ids_or_prompt``: token ids ``[S]``/``[B, S]`` (left-padded with
        ``attention_mask`` for a batch), or text / a list of texts (needs a tokenizer).
        Each new token streams the layers once over one position. ``callback`` gets each
        step's new tokens ``[B]`` as they come. A finished row (EOS) keeps emitting EOS.
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
        eos = torch.tensor([eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id or []),
                           device=self.device, dtype=torch.long)
        generator = torch.Generator(device=self.device).manual_seed(seed) if seed is not None else None
        batch = input_ids.shape[0]
        new_tokens = torch.empty(batch, 0, dtype=torch.long, device=self.device)
        if max_new_tokens == 0:
            return new_tokens
        from transformers import DynamicCache

        past = DynamicCache(config=self.config)
        positions = (mask.long().cumsum(-1) - 1).clamp(min=0)
        ids, finished = input_ids, torch.zeros(batch, dtype=torch.bool, device=self.device)
        for step in range(max_new_tokens):
            out = self._run(input_ids=ids, attention_mask=mask, position_ids=positions, past_key_values=past,
                            use_cache=True, **self._keep_last())
            past = out.past_key_values
            logits = out.logits[:, -1, :].float()
            token = sample_next_token(logits, do_sample, temperature, top_k, top_p, generator)
            if eos.numel():
                token = torch.where(finished, eos[0], token)
                finished |= torch.isin(token, eos)
            new_tokens = torch.cat([new_tokens, token[:, None]], dim=1)
            if callback is not None:
                callback(token)
            if eos.numel() and bool(finished.all()):
                break
            ids = token[:, None]
            mask = torch.cat([mask, torch.ones(batch, 1, dtype=mask.dtype, device=self.device)], dim=1)
            positions = positions[:, -1:] + 1
        return new_tokens

    def _keep_last(self) -> Dict[str, int]:
        import inspect

        if not hasattr(self, "_keep_kw"):
            params = inspect.signature(self.model.forward).parameters
            self._keep_kw = {"logits_to_keep": 1} if "logits_to_keep" in params else {}
        return self._keep_kw

    def stats(self) -> Dict[str, object]:
        """Cache statistics and the memory plan."""
        return {"cache": self.cache.stats().to_dict(), "memory_plan": self.plan.describe(),
                "resident_layers": len(self.plan.resident_layers), "num_layers": self.layout.num_layers}

    def close(self) -> None:
        self.streamer.close()
        self.cache.close()

    def __enter__(self) -> "UniversalSLIProcessor":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
