"""sli: run language models larger than memory by streaming them layer by layer
through a quantized on-disk layer cache.

The public names load on first use (``sli.UniversalSLIProcessor`` imports torch and
transformers; ``import sli`` alone, as ``sli --help`` does, imports neither).
"""
from importlib import import_module

__version__ = "0.1.0"

# public name -> the module that defines it
_EXPORTS = {
    **dict.fromkeys(["BITSANDBYTES_AVAILABLE", "AdaptiveQuantizer", "CachedLayer", "LayerQuantizer",
                     "QuantizationConfig", "QuantizationMode", "QuantizationRegistry", "QuantizedLinear",
                     "QuantizedTensor", "calculate_quantization_error", "codec_for", "dequantize_layer",
                     "get_fp4_config", "get_int8_config", "get_mixed_precision_config", "get_nf4_config",
                     "quantize_layer"], ".quantization"),
    **dict.fromkeys(["CacheError", "ModelLoadError", "SLIError", "UnsupportedArchitectureError"], ".errors"),
    "LayerCache": ".layer_cache",
    "UniversalSLIProcessor": ".processor",
}


def __getattr__(name):
    if name in _EXPORTS:
        value = getattr(import_module(_EXPORTS[name], __name__), name)
        globals()[name] = value  # next time a plain attribute
        return value
    raise AttributeError(f"module 'sli' has no attribute {name!r}")


def __dir__():
    return sorted(list(globals()) + list(_EXPORTS))


__all__ = sorted(_EXPORTS)
