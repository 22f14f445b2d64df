"""Quantization modes, configs and the layer quantizer.

The byte-level work lives in :mod:`sli.codecs`; this module decides *which* codec a
weight gets (config, skip list, adaptive choice per module name) and swaps
``nn.Linear`` modules for :class:`QuantizedLinear` ones that hold the codec's tensors.
"""
from __future__ import annotations

import dataclasses
import hashlib
import importlib.util
import json
import logging
from dataclasses import dataclass, field
from enum import Enum
from typing import Any, Dict, List, Optional, Union

import torch
from torch import nn

logger = logging.getLogger(__name__)

# bitsandbytes is optional: every codec has a pure-torch path with the same bytes. It is
# found here, not imported: importing it costs ~115 MB of RSS, which a process streaming
# under a memory budget should not pay unless a codec actually calls it.
BITSANDBYTES_AVAILABLE = importlib.util.find_spec("bitsandbytes") is not None


class QuantizationMode(Enum):
    """How a linear weight is stored in the layer cache."""

    NONE = "none"  # the tensor as is (lossless), computed in compute_dtype
    INT8 = "int8"  # row-wise absmax int8 (LLM.int8() layout), outlier columns in 16-bit
    INT8_DYNAMIC = "int8_dynamic"  # int8 weights + per-token int8 activations (4 outliers kept)
    NF4 = "nf4"  # 4-bit NormalFloat, 64-value blocks (bitsandbytes bytes)
    FP4 = "fp4"  # 4-bit float, 64-value blocks (bitsandbytes bytes)
    INT4 = "int4"  # group-wise asymmetric int4, scale + zero point per group
    FP8 = "fp8"  # float8_e4m3fn with a per-output-channel scale

    @classmethod
    def _missing_(cls, value: object) -> "QuantizationMode":
        if isinstance(value, str):
            for mode in cls:
                if mode.value == value.lower() or mode.name == value.upper():
                    return mode
        valid = ", ".join(m.value for m in cls)
        raise ValueError(f"unknown quantization mode {value!r}; valid modes: {valid}")


FOUR_BIT_MODES = (QuantizationMode.NF4, QuantizationMode.FP4)
INT8_MODES = (QuantizationMode.INT8, QuantizationMode.INT8_DYNAMIC)

_DTYPES = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
}


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def parse_dtype(value: Union[str, torch.dtype, None], field_name: str) -> Optional[torch.dtype]:
    """A torch dtype from a dtype or its name ("bfloat16", "torch.float32"); "auto" gives None."""
    if value is None or isinstance(value, torch.dtype):
        return value
    name = str(value).removeprefix("torch.")
    if name == "auto":
        return None
    dtype = getattr(torch, name, None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"{field_name}={value!r} is not a torch dtype; use e.g. 'float32', 'bfloat16' or 'auto'")
    return dtype


def default_compute_dtype(device: Union[str, torch.device, None] = None) -> torch.dtype:
    """float32 on CPU (bf16/fp16 matmuls are ~50x slower without AVX-512 BF16), float16 on CUDA."""
    device = torch.device(device) if device is not None else None
    if device is not None and device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32


@dataclass
class QuantizationConfig:
    """What a layer's linear weights become in the cache.

    ``compute_dtype=None`` means "auto": float32 on CPU, 16-bit on CUDA.
    ``double_quant`` and ``compress_statistics`` are the same switch under its two
    usual names (the 4-bit absmax is itself block-quantized); they must agree.
    """

    mode: QuantizationMode = QuantizationMode.NONE
    compute_dtype: Optional[torch.dtype] = None
    compress_statistics: bool = True
    quant_storage_dtype: torch.dtype = torch.uint8
    double_quant: bool = True
    quant_type: Optional[str] = None  # "nf4" or "fp4"; derived from mode when None
    llm_int8_threshold: float = 6.0  # |w| above this keeps the whole input column in 16-bit; <=0 turns it off
    llm_int8_skip_modules: Optional[List[str]] = None
    block_size: int = 64  # NF4/FP4 values per absmax
    group_size: int = 128  # INT4 values per scale/zero point

    def __post_init__(self) -> None:
        self.mode = QuantizationMode(self.mode)
        self.compute_dtype = parse_dtype(self.compute_dtype, "compute_dtype")
        self.quant_storage_dtype = parse_dtype(self.quant_storage_dtype, "quant_storage_dtype") or torch.uint8
        if self.quant_storage_dtype != torch.uint8:
            raise ValueError(f"quant_storage_dtype={self.quant_storage_dtype} is not supported; use torch.uint8")
        if self.compute_dtype is not None and self.compute_dtype not in _DTYPES.values():  # e.g. float64
            raise ValueError(f"compute_dtype={self.compute_dtype} is not supported; use float32, float16 or bfloat16")
        if bool(self.double_quant) != bool(self.compress_statistics):
            raise ValueError(
                f"double_quant={self.double_quant} and compress_statistics={self.compress_statistics} "
                "name the same switch; set both to True or both to False"
            )
        if self.quant_type is None:
            self.quant_type = "fp4" if self.mode == QuantizationMode.FP4 else "nf4"
        if self.quant_type not in ("nf4", "fp4"):
            raise ValueError(f"quant_type={self.quant_type!r} is not supported; use 'nf4' or 'fp4'")
        if self.mode in FOUR_BIT_MODES and self.quant_type != self.mode.value:
            raise ValueError(
                f"quant_type={self.quant_type!r} contradicts mode={self.mode.value!r}; "
                f"use quant_type={self.mode.value!r} or mode={self.quant_type!r}"
            )
        if self.block_size not in (64, 128, 256, 512, 1024, 2048, 4096):
            raise ValueError(f"block_size={self.block_size} is not supported; use a power of two from 64 to 4096")
        if self.group_size < 2 or self.group_size % 2:
            raise ValueError(f"group_size={self.group_size} must be an even number >= 2 (two int4 values a byte)")
        if self.llm_int8_skip_modules is not None:
            self.llm_int8_skip_modules = list(self.llm_int8_skip_modules)

    # -- serialization -------------------------------------------------
    def to_dict(self) -> Dict[str, Any]:
        """A JSON-able dict; :meth:`from_dict` gives the config back."""
        data = dataclasses.asdict(self)
        data["mode"] = self.mode.value
        data["compute_dtype"] = dtype_name(self.compute_dtype) if self.compute_dtype else "auto"
        data["quant_storage_dtype"] = dtype_name(self.quant_storage_dtype)
        return data

    @classmethod
    def from_dict(cls, data: Dict[str, Any]) -> "QuantizationConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"unknown QuantizationConfig fields {sorted(unknown)}; known fields: {sorted(known)}")
        return cls(**data)

    def byte_fields(self) -> Dict[str, Any]:
        """The fields that change the bytes this config writes to the cache."""
        fields: Dict[str, Any] = {"mode": self.mode.value, "skip": sorted(self.llm_int8_skip_modules or [])}
        if self.mode in FOUR_BIT_MODES:
            fields.update(block_size=self.block_size, double_quant=self.double_quant)
        elif self.mode == QuantizationMode.INT8:
            fields.update(llm_int8_threshold=self.llm_int8_threshold)
        elif self.mode == QuantizationMode.INT4:
            fields.update(group_size=self.group_size)
        return fields

    def fingerprint(self) -> str:
        """A short stable hash of :meth:`byte_fields`: the layer cache keys on it.

        compute_dtype is not part of it: stored tensors do not depend on it (NONE keeps
        the checkpoint's own dtype), so one warmed cache serves CPU and CUDA alike.
        """
        payload = json.dumps({"format": 1, **self.byte_fields()}, sort_keys=True)
        return hashlib.sha256(payload.encode()).hexdigest()[:16]

    def resolved_compute_dtype(self, device: Union[str, torch.device, None] = None) -> torch.dtype:
        return self.compute_dtype or default_compute_dtype(device)

    def skips(self, module_name: str) -> bool:
        """True when ``module_name`` matches an entry of ``llm_int8_skip_modules``."""
        if not self.llm_int8_skip_modules:
            return False
        parts = module_name.split(".")
        return any(skip == module_name or skip in parts or module_name.endswith("." + skip)
                   for skip in self.llm_int8_skip_modules)


@dataclass
class CachedLayer:
    """The serialized form of one (quantized) layer: what the layer cache stores.

    ``tensors`` maps names inside the layer (``"self_attn.q_proj.weight"``,
    ``"self_attn.q_proj.weight.absmax"``, ``"input_layernorm.weight"``) to tensors;
    ``linears`` maps each quantized linear's module path (``"self_attn.q_proj"``) to its
    codec metadata (see :class:`sli.codecs.QuantizedTensor`). Tensors of modules that are
    not quantized linears (norms, biases, embeddings) are stored as they are.
    """

    tensors: Dict[str, torch.Tensor]
    linears: Dict[str, Dict[str, Any]] = field(default_factory=dict)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors.values())


# ----------------------------------------------------------------------------------
# Quantized modules and the layer quantizer
# ----------------------------------------------------------------------------------


def _codecs():
    # codecs imports this module for the config types; import it lazily to keep one
    # direction of module-level imports.
    from . import codecs

    return codecs


def _is_conv1d(module: nn.Module) -> bool:
    # GPT-2 style Conv1D: a linear whose weight is stored [in, out].
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf")


def is_linear(module: nn.Module) -> bool:
    """True for the modules a quantizer replaces: nn.Linear and GPT-2's Conv1D."""
    return isinstance(module, nn.Linear) or _is_conv1d(module)


def linear_weight(module: nn.Module) -> torch.Tensor:
    """The ``[out, in]`` weight of a linear-like module (Conv1D stores it transposed)."""
    return module.weight.t() if _is_conv1d(module) else module.weight


class QuantizedLinear(nn.Module):
    """A linear layer whose weight is held as a codec's tensors.

    The forward multiplies by the codec's tensors (:meth:`sli.codecs.Codec.linear`: a fused
    kernel for a few rows on CPU, else dequantize into ``compute_dtype`` and ``F.linear``);
    INT8_DYNAMIC also quantizes the activations per token first. Buffer names are the
    codec's tensor names with ``.`` written as ``__`` (module attributes cannot hold dots).
    """

    def __init__(self, qweight: "Any", bias: Optional[torch.Tensor], compute_dtype: torch.dtype,
                 transposed: bool = False) -> None:
        super().__init__()
        out_features, in_features = qweight.metadata["shape"]
        self.in_features, self.out_features = in_features, out_features
        self.metadata = dict(qweight.metadata)
        self.compute_dtype = compute_dtype
        self.transposed = transposed  # the original module was a Conv1D ([in, out] weight)
        self._names = list(qweight.tensors)
        for name, tensor in qweight.tensors.items():
            self.register_buffer(name.replace(".", "__"), tensor)
        self.bias = nn.Parameter(bias.detach(), requires_grad=False) if bias is not None else None

    @property
    def codec(self):
        return _codecs().codec_for(self.metadata["codec"])

    @property
    def qweight(self):
        tensors = {name: getattr(self, name.replace(".", "__")) for name in self._names}
        return _codecs().QuantizedTensor(tensors, self.metadata)

    def dequantized_weight(self, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
        """The ``[out, in]`` weight in ``dtype`` (default: compute dtype)."""
        return self.codec.dequantize(self.qweight, dtype or self.compute_dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.codec.prepare_input(x.to(self.compute_dtype))
        bias = self.bias.to(self.compute_dtype) if self.bias is not None else None
        return self.codec.linear(self.qweight, x, bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, codec={self.metadata['codec']}"


def _set_submodule(root: nn.Module, path: str, module: nn.Module) -> None:
    parent_path, _, name = path.rpartition(".")
    parent = root.get_submodule(parent_path) if parent_path else root
    setattr(parent, name, module)


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix and name else prefix or name


ATTENTION_KEYWORDS = ("attn", "attention", "query", "key", "value", "qkv", "q_proj", "k_proj", "v_proj", "o_proj")
FFN_KEYWORDS = ("ffn", "mlp", "feedforward", "feed_forward", "fc", "experts", "gate_proj", "up_proj", "down_proj")


class LayerQuantizer:
    """Quantizes the linear weights of a layer with one :class:`QuantizationConfig`.

    >>> q = LayerQuantizer(QuantizationConfig(mode="int8"))
    >>> layer = q.quantize_layer(nn.Sequential(nn.Linear(64, 64)))
    >>> q.is_quantized(layer)
    True
    """

    def __init__(self, config: Optional[QuantizationConfig] = None) -> None:
        self.config = config or QuantizationConfig()

    def config_for(self, module_name: str) -> Optional[QuantizationConfig]:
        """The config that applies to the linear ``module_name``; None leaves it as is."""
        return None if self.config.skips(module_name) else self.config

    def fingerprint(self) -> str:
        return self.config.fingerprint()

    # -- module level ---------------------------------------------------
    def quantize_linear(self, module: nn.Module, config: QuantizationConfig) -> QuantizedLinear:
        weight = linear_weight(module).detach()
        qweight = _codecs().codec_for(config.mode).quantize(weight, config)
        return QuantizedLinear(qweight, module.bias, config.resolved_compute_dtype(weight.device),
                               transposed=_is_conv1d(module))

    def quantize_layer(self, layer: nn.Module, layer_name: str = "") -> nn.Module:
        """Replace every linear of ``layer`` not skipped by a :class:`QuantizedLinear`.

        Norms, embeddings and biases stay as they are. Returns the layer (changed in
        place), or the new module when ``layer`` is itself a linear.
        """
        if is_linear(layer):
            config = self.config_for(layer_name)
            return self.quantize_linear(layer, config) if config else layer
        targets = [(name, m) for name, m in layer.named_modules() if name and is_linear(m)]
        for name, module in targets:
            config = self.config_for(_join(layer_name, name))
            if config is not None:
                _set_submodule(layer, name, self.quantize_linear(module, config))
        return layer

    def dequantize_layer(self, layer: nn.Module) -> nn.Module:
        """Give back plain ``nn.Linear`` modules in compute dtype for every quantized one."""
        if isinstance(layer, QuantizedLinear):
            return _to_linear(layer)
        for name, module in [(n, m) for n, m in layer.named_modules() if isinstance(m, QuantizedLinear)]:
            _set_submodule(layer, name, _to_linear(module))
        return layer

    @staticmethod
    def is_quantized(layer: nn.Module) -> bool:
        return any(isinstance(m, QuantizedLinear) for m in layer.modules())

    @staticmethod
    def get_quantized_size_ratio(layer: nn.Module) -> float:
        """Bytes the layer holds now ÷ bytes it held before quantization."""
        held = original = 0
        quantized_buffers = set()
        for module in layer.modules():
            if isinstance(module, QuantizedLinear):
                nbytes = module.qweight.nbytes
                out_features, in_features = module.metadata["shape"]
                dtype = parse_dtype(module.metadata["dtype"], "dtype")
                held += nbytes
                original += out_features * in_features * dtype.itemsize
                quantized_buffers.update(id(b) for b in module.buffers(recurse=False))
        for tensor in list(layer.parameters()) + list(layer.buffers()):
            if id(tensor) in quantized_buffers:
                continue
            nbytes = tensor.numel() * tensor.element_size()
            held += nbytes
            original += nbytes
        return held / original if original else 1.0

    # -- serialized form ------------------------------------------------
    def to_cached(self, layer: nn.Module) -> CachedLayer:
        """The layer's tensors in the cache's form (quantized linears by codec name)."""
        tensors: Dict[str, torch.Tensor] = {}
        linears: Dict[str, Dict[str, Any]] = {}
        for path, module in layer.named_modules():
            if isinstance(module, QuantizedLinear):
                linears[path] = dict(module.metadata, transposed=module.transposed)
                for name, tensor in module.qweight.tensors.items():
                    tensors[_join(path, name)] = tensor
                if module.bias is not None:
                    tensors[_join(path, "bias")] = module.bias.data
                continue
            if any(path.startswith(p + ".") for p in linears):
                continue
            for name, tensor in list(module.named_parameters(recurse=False)) + list(module.named_buffers(recurse=False)):
                if tensor is not None and (path not in linears):
                    tensors[_join(path, name)] = tensor.detach()
        return CachedLayer(tensors, linears)

    def quantize_state_dict(self, state_dict: Dict[str, torch.Tensor], linear_paths: Dict[str, bool],
                            layer_name: str = "") -> CachedLayer:
        """Quantize a layer's checkpoint tensors without building the module.

        ``linear_paths`` maps each linear module path inside the layer to whether it is
        a Conv1D (``[in, out]`` weight). Tensors of other modules are kept as they are.
        """
        codecs = _codecs()
        tensors: Dict[str, torch.Tensor] = {}
        linears: Dict[str, Dict[str, Any]] = {}
        for name, tensor in state_dict.items():
            path, _, leaf = name.rpartition(".")
            config = self.config_for(_join(layer_name, path)) if path in linear_paths and leaf == "weight" else None
            if config is None:
                tensors[name] = tensor
                continue
            transposed = linear_paths[path]
            weight = tensor.t() if transposed else tensor
            qweight = codecs.codec_for(config.mode).quantize(weight, config)
            linears[path] = dict(qweight.metadata, transposed=transposed)
            for key, value in qweight.tensors.items():
                tensors[_join(path, key)] = value
        return CachedLayer(tensors, linears)


def split_cached(cached: CachedLayer) -> "tuple[Dict[str, Any], Dict[str, torch.Tensor]]":
    """Group a cached layer's tensors: ({linear path: QuantizedTensor}, {name: plain tensor})."""
    codecs = _codecs()
    grouped: Dict[str, Dict[str, torch.Tensor]] = {path: {} for path in cached.linears}
    plain: Dict[str, torch.Tensor] = {}
    # Longest linear path first, so "mlp.fc" does not claim "mlp.fc2"'s tensors.
    paths = sorted(cached.linears, key=len, reverse=True)
    for name, tensor in cached.tensors.items():
        owner = next((p for p in paths if name.startswith(p + ".")), None)
        if owner is None or name == owner + ".bias":
            plain[name] = tensor
        else:
            grouped[owner][name[len(owner) + 1:]] = tensor
    qweights = {p: codecs.QuantizedTensor(t, cached.linears[p]) for p, t in grouped.items()}
    return qweights, plain


def dequantize_cached(cached: CachedLayer, dtype: torch.dtype,
                      out: Optional[Dict[str, torch.Tensor]] = None) -> Dict[str, torch.Tensor]:
    """A plain state dict of the layer in ``dtype``: what the unquantized module holds.

    ``out`` maps state-dict names to preallocated tensors to write into (buffer reuse);
    names missing from it get fresh tensors.
    """
    codecs = _codecs()
    out = out or {}
    qweights, plain = split_cached(cached)
    state: Dict[str, torch.Tensor] = {}
    for path, qweight in qweights.items():
        name = _join(path, "weight")
        transposed = qweight.metadata.get("transposed", False)
        target = out.get(name)
        codec = codecs.codec_for(qweight.metadata["codec"])
        if transposed:
            weight = codec.dequantize(qweight, dtype)
            state[name] = target.copy_(weight.t()) if target is not None else weight.t().contiguous()
        else:
            state[name] = codec.dequantize(qweight, dtype, out=target)
    for name, tensor in plain.items():
        target = out.get(name)
        if not tensor.is_floating_point():
            state[name] = tensor
        elif target is not None:
            state[name] = target.copy_(tensor)
        else:
            state[name] = tensor.to(dtype)
    return state


def _to_linear(module: QuantizedLinear) -> nn.Module:
    weight = module.dequantized_weight()
    linear = nn.Linear(module.in_features, module.out_features, bias=module.bias is not None,
                       device=weight.device, dtype=weight.dtype)
    with torch.no_grad():
        linear.weight.copy_(weight)
        if module.bias is not None:
            linear.bias.copy_(module.bias)
    linear.requires_grad_(False)
    return linear


class AdaptiveQuantizer(LayerQuantizer):
    """Different configs for attention, feed-forward and other linears, chosen by name.

    When ``attention_config`` is not given it is ``base_config`` one step up the
    precision ladder (NF4/FP4/INT4/FP8 → INT8 → INT8_DYNAMIC → NONE).
    """

    UPGRADE = {
        QuantizationMode.NF4: QuantizationMode.INT8,
        QuantizationMode.FP4: QuantizationMode.INT8,
        QuantizationMode.INT4: QuantizationMode.INT8,
        QuantizationMode.FP8: QuantizationMode.INT8,
        QuantizationMode.INT8: QuantizationMode.INT8_DYNAMIC,
        QuantizationMode.INT8_DYNAMIC: QuantizationMode.NONE,
        QuantizationMode.NONE: QuantizationMode.NONE,
    }

    def __init__(self, base_config: Optional[QuantizationConfig] = None,
                 attention_config: Optional[QuantizationConfig] = None,
                 ffn_config: Optional[QuantizationConfig] = None) -> None:
        base = base_config or QuantizationConfig()
        super().__init__(base)
        self.base_config = base
        self.attention_config = attention_config or dataclasses.replace(
            base, mode=self.UPGRADE[base.mode], quant_type=None)
        self.ffn_config = ffn_config or base

    def config_for(self, module_name: str) -> Optional[QuantizationConfig]:
        if self.base_config.skips(module_name):
            return None
        lowered = module_name.lower()
        if any(k in lowered for k in ATTENTION_KEYWORDS):
            return self.attention_config
        if any(k in lowered for k in FFN_KEYWORDS):
            return self.ffn_config
        return self.base_config

    def fingerprint(self) -> str:
        parts = [c.fingerprint() for c in (self.base_config, self.attention_config, self.ffn_config)]
        return hashlib.sha256(("adaptive:" + ":".join(parts)).encode()).hexdigest()[:16]

    def quantize_model(self, model: nn.Module) -> nn.Module:
        """Quantize every linear of ``model`` with the config its name calls for."""
        return self.quantize_layer(model)


# ----------------------------------------------------------------------------------
# Presets, registry and one-line helpers
# ----------------------------------------------------------------------------------


def get_int8_config() -> QuantizationConfig:
    """Row-wise int8 with outlier columns kept in 16-bit; head and embeddings untouched."""
    return QuantizationConfig(mode=QuantizationMode.INT8, llm_int8_skip_modules=["lm_head", "embed_tokens"])


def get_nf4_config() -> QuantizationConfig:
    """NF4 with double-quantized statistics (~4.13 bits/weight)."""
    return QuantizationConfig(mode=QuantizationMode.NF4, double_quant=True, compress_statistics=True)


def get_fp4_config() -> QuantizationConfig:
    return QuantizationConfig(mode=QuantizationMode.FP4, double_quant=True, compress_statistics=True)


def get_mixed_precision_config() -> AdaptiveQuantizer:
    """Attention in INT8, feed-forward in NF4."""
    return AdaptiveQuantizer(get_nf4_config(), attention_config=QuantizationConfig(mode=QuantizationMode.INT8),
                             ffn_config=get_nf4_config())


class QuantizationRegistry:
    """Named configs: the built-in presets plus whatever a user registers."""

    _builtin = {
        "none": lambda: QuantizationConfig(),
        "int8": get_int8_config,
        "int8_dynamic": lambda: QuantizationConfig(mode=QuantizationMode.INT8_DYNAMIC),
        "nf4": get_nf4_config,
        "fp4": get_fp4_config,
        "int4": lambda: QuantizationConfig(mode=QuantizationMode.INT4),
        "fp8": lambda: QuantizationConfig(mode=QuantizationMode.FP8),
    }
    _custom: Dict[str, QuantizationConfig] = {}

    @classmethod
    def register(cls, name: str, config: QuantizationConfig) -> None:
        if not isinstance(config, QuantizationConfig):
            raise TypeError(f"register({name!r}, ...) needs a QuantizationConfig, got {type(config).__name__}")
        cls._custom = {**cls._custom, name: config}

    @classmethod
    def get(cls, name: str) -> QuantizationConfig:
        if name in cls._custom:
            return dataclasses.replace(cls._custom[name])
        if name in cls._builtin:
            return cls._builtin[name]()
        raise KeyError(f"no quantization config named {name!r}; known: {', '.join(cls.list_configs())}")

    @classmethod
    def list_configs(cls) -> List[str]:
        return list(cls._builtin) + [n for n in cls._custom if n not in cls._builtin]

    @classmethod
    def unregister(cls, name: str) -> None:
        cls._custom = {k: v for k, v in cls._custom.items() if k != name}


def quantize_layer(layer: nn.Module, mode: Union[str, QuantizationMode] = "int8", **kwargs: Any) -> nn.Module:
    """One-line quantization: ``quantize_layer(layer, mode="nf4")``."""
    return LayerQuantizer(QuantizationConfig(mode=mode, **kwargs)).quantize_layer(layer)


def dequantize_layer(layer: nn.Module, compute_dtype: Optional[torch.dtype] = None) -> nn.Module:
    """One-line dequantization back to plain linears (in ``compute_dtype`` when given)."""
    if compute_dtype is not None:
        for module in layer.modules():
            if isinstance(module, QuantizedLinear):
                module.compute_dtype = compute_dtype
    return LayerQuantizer().dequantize_layer(layer)
