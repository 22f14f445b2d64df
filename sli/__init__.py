"""sli: run language models larger than memory by streaming them layer by layer
through a quantized on-disk layer cache."""
from .quantization import (
    BITSANDBYTES_AVAILABLE,
    AdaptiveQuantizer,
    CachedLayer,
    LayerQuantizer,
    QuantizationConfig,
    QuantizationMode,
    QuantizationRegistry,
    QuantizedLinear,
    QuantizedTensor,
    calculate_quantization_error,
    codec_for,
    dequantize_layer,
    get_fp4_config,
    get_int8_config,
    get_mixed_precision_config,
    get_nf4_config,
    quantize_layer,
)
from .errors import CacheError, ModelLoadError, SLIError, UnsupportedArchitectureError

__version__ = "0.1.0"


def __getattr__(name):
    # The cache and the processor pull in diskcache and transformers: import on first use.
    if name == "LayerCache":
        from .layer_cache import LayerCache

        return LayerCache
    if name == "UniversalSLIProcessor":
        from .processor import UniversalSLIProcessor

        return UniversalSLIProcessor
    raise AttributeError(f"module 'sli' has no attribute {name!r}")


__all__ = [
    "AdaptiveQuantizer", "BITSANDBYTES_AVAILABLE", "CacheError", "CachedLayer", "LayerCache", "LayerQuantizer",
    "ModelLoadError", "QuantizationConfig", "QuantizationMode", "QuantizationRegistry", "QuantizedLinear",
    "QuantizedTensor", "SLIError", "UniversalSLIProcessor", "UnsupportedArchitectureError",
    "calculate_quantization_error", "codec_for", "dequantize_layer", "get_fp4_config", "get_int8_config",
    "get_mixed_precision_config", "get_nf4_config", "quantize_layer",
]
