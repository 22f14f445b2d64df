"""Quantization policy: which config each linear gets, and turning layers into cache entries.

:class:`LayerQuantizer` applies one :class:`QuantizationConfig` (minus a skip list);
:class:`AdaptiveQuantizer` picks a config per linear by its name (attention, feed-forward,
other). Both quantize a module in place (:class:`QuantizedLinear` in each linear's place) or
a layer's checkpoint tensors straight into a :class:`CachedLayer`.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
from typing import Any, Dict, Optional, Union

import torch
from torch import nn

from .codecs import codec_for
from .config import QuantizationConfig, QuantizationMode, mode_spec, parse_block_sizes, parse_dtype
from .formats import CachedLayer, QuantizedTensor, join_path, split_cached
from .modules import QuantizedLinear, is_conv1d, is_linear, linear_weight, set_submodule


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
        return None if self.config.skips(module_name) else self.config.for_linear(module_name)

    def fingerprint(self) -> str:
        return self.config.fingerprint()

    def describe(self) -> str:
        """JSON of the config(s): what a cache entry records about what made it."""
        return json.dumps({"config": self.config.to_dict()}, sort_keys=True)

    def configs(self) -> "list[QuantizationConfig]":
        """Every config this quantizer may give a linear."""
        return [self.config]

    def needs_calibration(self) -> bool:
        """True when some linear's bytes come from calibration (``method="gptq"``): its layers are
        made by :func:`sli.calibration.calibrate`, never from the weights alone."""
        return any(c.calibrated for c in self.configs())

    # -- module level ---------------------------------------------------
    def quantize_linear(self, module: nn.Module, config: QuantizationConfig) -> QuantizedLinear:
        weight = linear_weight(module).detach()
        qweight = _quantize_alone(weight, config)
        return QuantizedLinear.from_quantized(qweight, module.bias, config.resolved_compute_dtype(weight.device),
                                              transposed=is_conv1d(module))

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
            config = self.config_for(join_path(layer_name, name))
            if config is not None:
                set_submodule(layer, name, self.quantize_linear(module, config))
        return layer

    def dequantize_layer(self, layer: nn.Module) -> nn.Module:
        """Give back plain ``nn.Linear`` modules in compute dtype for every quantized one."""
        if isinstance(layer, QuantizedLinear):
            return _to_linear(layer)
        for name, module in [(n, m) for n, m in layer.named_modules() if isinstance(m, QuantizedLinear)]:
            set_submodule(layer, name, _to_linear(module))
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
                    tensors[join_path(path, name)] = tensor
                if module.bias is not None:
                    tensors[join_path(path, "bias")] = module.bias.data
                continue
            if any(path.startswith(p + ".") for p in linears):
                continue
            for name, tensor in list(module.named_parameters(recurse=False)) + list(module.named_buffers(recurse=False)):
                if tensor is not None and (path not in linears):
                    tensors[join_path(path, name)] = tensor.detach()
        return CachedLayer(tensors, linears)

    def quantize_state_dict(self, state_dict: Dict[str, torch.Tensor], linear_paths: Dict[str, bool],
                            layer_name: str = "", quantized: Optional[Dict[str, QuantizedTensor]] = None,
                            round_calibrated: bool = False) -> CachedLayer:
        """Quantize a layer's checkpoint tensors without building the module.

        ``linear_paths`` maps each linear module path inside the layer to whether it is
        a Conv1D (``[in, out]`` weight). Tensors of other modules are kept as they are.
        ``quantized`` gives linears already quantized (by path: calibrated methods, see
        :mod:`sli.calibration`); the others are quantized here. ``round_calibrated``: a calibrated
        linear not given is rounded instead (the same byte layout, not its values: for sizing).
        """
        quantized = quantized or {}
        tensors: Dict[str, torch.Tensor] = {}
        linears: Dict[str, Dict[str, Any]] = {}
        for name, tensor in state_dict.items():
            path, _, leaf = name.rpartition(".")
            config = self.config_for(join_path(layer_name, path)) if path in linear_paths and leaf == "weight" else None
            if config is None:
                tensors[name] = tensor
                continue
            transposed = linear_paths[path]
            weight = tensor.t() if transposed else tensor
            if path in quantized:
                qweight = quantized[path]
            elif round_calibrated and config.calibrated:
                qweight = codec_for(config.mode).quantize(weight, config)
            else:
                qweight = _quantize_alone(weight, config, join_path(layer_name, path))
            linears[path] = dict(qweight.metadata, transposed=transposed)
            for key, value in qweight.tensors.items():
                tensors[join_path(path, key)] = value
        return CachedLayer(tensors, linears)


def _quantize_alone(weight: torch.Tensor, config: QuantizationConfig, name: str = "") -> QuantizedTensor:
    """``weight`` quantized from its values alone; a calibrated config cannot be."""
    if config.calibrated:
        from ..errors import SLIError

        raise SLIError(f"{name or 'this linear'}: method={config.method!r} needs calibration data; calibrate the "
                       "model first (UniversalSLIProcessor.prewarm(calibration=...), sli.calibration.calibrate, "
                       "or sli warm --calibrate)")
    return codec_for(config.mode).quantize(weight, config)


def dequantize_cached(cached: CachedLayer, dtype: torch.dtype,
                      out: Optional[Dict[str, torch.Tensor]] = None) -> Dict[str, torch.Tensor]:
    """A plain state dict of the layer in ``dtype``: what the unquantized module holds.

    ``out`` maps state-dict names to preallocated tensors to write into (buffer reuse);
    names missing from it get fresh tensors.
    """
    out = out or {}
    qweights, plain = split_cached(cached)
    state: Dict[str, torch.Tensor] = {}
    for path, qweight in qweights.items():
        name = join_path(path, "weight")
        transposed = qweight.metadata.get("transposed", False)
        target = out.get(name)
        codec = codec_for(qweight.metadata["codec"])
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

    def __init__(self, base_config: Union[QuantizationConfig, "AdaptiveQuantizer", None] = None,
                 attention_config: Optional[QuantizationConfig] = None,
                 ffn_config: Optional[QuantizationConfig] = None) -> None:
        if isinstance(base_config, AdaptiveQuantizer):  # AdaptiveQuantizer(get_mixed_precision_config())
            attention_config = attention_config or base_config.attention_config
            ffn_config = ffn_config or base_config.ffn_config
            base_config = base_config.base_config
        base = base_config or QuantizationConfig()
        super().__init__(base)
        self.base_config = base
        upgrade = mode_spec(base.mode).upgrade
        self.attention_config = attention_config or dataclasses.replace(
            base, mode=upgrade, quant_type=None,
            method=base.method if base.method in mode_spec(upgrade).methods else "rtn")
        self.ffn_config = ffn_config or base

    def config_for(self, module_name: str) -> Optional[QuantizationConfig]:
        if self.base_config.skips(module_name):
            return None
        lowered = module_name.lower()
        if any(k in lowered for k in ATTENTION_KEYWORDS):
            return self.attention_config.for_linear(module_name)
        if any(k in lowered for k in FFN_KEYWORDS):
            return self.ffn_config.for_linear(module_name)
        return self.base_config.for_linear(module_name)

    def fingerprint(self) -> str:
        parts = [c.fingerprint() for c in (self.base_config, self.attention_config, self.ffn_config)]
        return hashlib.sha256(("adaptive:" + ":".join(parts)).encode()).hexdigest()[:16]

    def to_dict(self) -> Dict[str, Any]:
        """The three configs as JSON-able dicts (:meth:`from_dict` gives the quantizer back)."""
        return {name: getattr(self, name).to_dict() for name in ("base_config", "attention_config", "ffn_config")}

    @classmethod
    def from_dict(cls, data: Dict[str, Any]) -> "AdaptiveQuantizer":
        return cls(**{name: QuantizationConfig.from_dict(value) for name, value in data.items()})

    def describe(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    def configs(self) -> "list[QuantizationConfig]":
        return [self.base_config, self.attention_config, self.ffn_config]

    def quantize_model(self, model: nn.Module) -> nn.Module:
        """Quantize every linear of ``model`` with the config its name calls for."""
        return self.quantize_layer(model)


def get_mixed_precision_config() -> AdaptiveQuantizer:
    """Attention in INT8, feed-forward in NF4; the head and embeddings untouched."""
    from .presets import get_nf4_config

    keep = ["lm_head", "embed_tokens"]
    nf4 = dataclasses.replace(get_nf4_config(), llm_int8_skip_modules=keep)
    return AdaptiveQuantizer(nf4, attention_config=QuantizationConfig(mode=QuantizationMode.INT8,
                                                                      llm_int8_skip_modules=keep),
                             ffn_config=nf4)


def with_block_size(config: Union[QuantizationConfig, LayerQuantizer], size: Union[int, str]
                    ) -> Optional[Union[QuantizationConfig, LayerQuantizer]]:
    """``config`` (a config or a quantizer, an :class:`AdaptiveQuantizer`'s parts each) with its
    NF4/FP4 blocks, or INT4 groups, of ``size`` values, or as ``--block-size``'s text says
    (:func:`parse_block_sizes`: "32,q_proj=64", some linears sized apart: ``block_sizes``); None
    when it has no blocks or groups to size. A size its mode does not take is a ValueError."""
    size, by_name = parse_block_sizes(size) if isinstance(size, str) else (size, {})

    def sized(c: QuantizationConfig) -> QuantizationConfig:
        field = c.sized_field
        if field is None:
            return c
        return dataclasses.replace(c, **{field: size or getattr(c, field)}, block_sizes=by_name or c.block_sizes)

    if isinstance(config, AdaptiveQuantizer):
        parts = (config.base_config, config.attention_config, config.ffn_config)
        return AdaptiveQuantizer(*map(sized, parts)) if any(c.sized_field for c in parts) else None
    if isinstance(config, LayerQuantizer):
        return LayerQuantizer(sized(config.config)) if config.config.sized_field else None
    return sized(config) if config.sized_field else None


def quantize_layer(layer: nn.Module, mode: Union[str, QuantizationMode, QuantizationConfig, LayerQuantizer] = "int8",
                   **kwargs: Any) -> nn.Module:
    """One-line quantization: ``quantize_layer(layer, mode="nf4")``, or with a config or quantizer
    (``kwargs`` then replace its fields)."""
    if isinstance(mode, LayerQuantizer):
        if kwargs:
            raise ValueError("quantize_layer(layer, quantizer) takes no other settings; put them in the quantizer")
        return mode.quantize_layer(layer)
    config = dataclasses.replace(mode, **kwargs) if isinstance(mode, QuantizationConfig) else \
        QuantizationConfig(mode=mode, **kwargs)
    return LayerQuantizer(config).quantize_layer(layer)


def dequantize_layer(layer: nn.Module, compute_dtype: Optional[torch.dtype] = None) -> nn.Module:
    """One-line dequantization back to plain linears (in ``compute_dtype`` when given)."""
    if compute_dtype is not None:
        for module in layer.modules():
            if isinstance(module, QuantizedLinear):
                module.compute_dtype = compute_dtype
    return LayerQuantizer().dequantize_layer(layer)
