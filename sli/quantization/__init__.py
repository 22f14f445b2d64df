"""Quantization, in layers with one-way dependencies:

``config`` (modes, :class:`QuantizationConfig`, mode declarations) ← ``formats``
(:class:`QuantizedTensor`, the cache entry :class:`CachedLayer`) ← ``codecs`` (one file per
format) ← ``execution`` (fused kernel, row chunks or dequantize-then-BLAS) ← ``modules``
(:class:`QuantizedLinear`) ← ``quantizer`` (:class:`LayerQuantizer`,
:class:`AdaptiveQuantizer`) and ``presets`` (:class:`QuantizationRegistry`).
"""
from .config import (QuantizationConfig, QuantizationMode, available_modes, default_compute_dtype, dtype_name,
                     mode_spec, parse_dtype)
from .formats import CachedLayer, QuantizedTensor, split_cached
from .codecs import Codec, codec_for
from .codecs.four_bit import BITSANDBYTES_AVAILABLE
from .metrics import bits_per_weight, calculate_quantization_error
from .modules import QuantizedLinear, is_linear, linear_weight
from .quantizer import (AdaptiveQuantizer, LayerQuantizer, dequantize_cached, dequantize_layer,
                        get_mixed_precision_config, quantize_layer)
from .presets import QuantizationRegistry, get_fp4_config, get_int8_config, get_nf4_config, preset_config

__all__ = [
    "AdaptiveQuantizer", "BITSANDBYTES_AVAILABLE", "CachedLayer", "Codec", "LayerQuantizer", "QuantizationConfig",
    "QuantizationMode", "QuantizationRegistry", "QuantizedLinear", "QuantizedTensor", "available_modes",
    "bits_per_weight", "calculate_quantization_error", "codec_for", "default_compute_dtype", "dequantize_cached",
    "dequantize_layer", "dtype_name", "get_fp4_config", "get_int8_config", "get_mixed_precision_config",
    "get_nf4_config", "is_linear", "linear_weight", "mode_spec", "parse_dtype", "preset_config", "quantize_layer",
    "split_cached",
]
