"""LayerCache: the layer store plus the reference API that stores and returns modules.

:class:`sli.layer_store.LayerStore` keeps entries by (model id, layer, config fingerprint);
this class adds ``cache_layer`` / ``get_layer``, which quantize a module on the way in.
"""
from __future__ import annotations

from typing import Optional, Union

import torch

from .layer_store import ConfigLike, LayerStore, as_config
from .quantization import CachedLayer, LayerQuantizer, QuantizedLinear, split_cached
from .quantization.modules import is_conv1d, is_linear, set_submodule


class LayerCache(LayerStore):
    """A size-bounded store of quantized layers: a disk tier and an LRU memory tier.

    Args:
        cache_dir: the directory (created if missing). Several processes may share it.
        max_cache_size_gb: the disk tier's size limit in GiB, index included; least
            recently used entries are evicted to keep it.
        max_memory_cache_size_gb: the memory tier's size limit in GiB (0 turns it off);
            None means a share of the RAM psutil reports available.

    Raises:
        CacheError: the directory cannot be created or its index opened.

    >>> import tempfile, torch
    >>> with LayerCache(tempfile.mkdtemp(), max_cache_size_gb=0.01) as cache:
    ...     written = cache.put("m", 0, "none", CachedLayer({"w": torch.ones(4)}))
    ...     cache.get("m", 0, "none").tensors["w"].tolist()
    [1.0, 1.0, 1.0, 1.0]
    """

    # -- the reference API ------------------------------------------------------------
    def cache_layer(self, model_id: str, layer_index: Union[int, str], layer: Union[torch.nn.Module, CachedLayer],
                    quantization_mode: ConfigLike = "none") -> int:
        """Store a layer; returns the bytes written.

        ``layer`` is a :class:`CachedLayer` or an ``nn.Module`` (quantized already or not:
        :meth:`LayerQuantizer.to_cached` serializes it as it is). ``quantization_mode`` is a
        mode name, a :class:`QuantizationMode` or a :class:`QuantizationConfig`; it is the
        key the layer is filed under.
        """
        config = as_config(quantization_mode)
        if not isinstance(layer, CachedLayer):
            quantizer = config if isinstance(config, LayerQuantizer) else LayerQuantizer(config)
            if LayerQuantizer.is_quantized(layer):
                layer = quantizer.to_cached(layer)
            else:
                # Quantize from the tensors, leaving the caller's module as it was.
                state = {name: t.detach() for name, t in layer.state_dict().items()}
                paths = {name: is_conv1d(m) for name, m in layer.named_modules() if is_linear(m)}  # "": a bare linear
                layer = quantizer.quantize_state_dict(state, paths)
        return self.put(model_id, layer_index, config, layer)

    def get_layer(self, model_id: str, layer_index: Union[int, str],
                  quantization_config: Optional[ConfigLike] = None,
                  into: Optional[torch.nn.Module] = None) -> Union[CachedLayer, torch.nn.Module, None]:
        """The cached layer, or None.

        ``into``: a module of the cached layer's architecture (fresh, or on the meta device):
        it is returned holding the cached layer, quantized as stored (:class:`QuantizedLinear`
        in each quantized linear's place; ``LayerQuantizer.dequantize_layer`` makes it plain).
        Without it, the stored tensors (a :class:`CachedLayer`): the cache stores no code, so
        it cannot build the module by itself.

        With no config, the only entry cached for that layer; raises ``ValueError`` naming
        the fingerprints when several configs are cached for it.
        """
        if quantization_config is not None:
            cached = self.get(model_id, layer_index, quantization_config)
        else:
            keys = self._layer_keys(model_id, layer_index)
            if len(keys) > 1:
                raise ValueError(f"layer {layer_index} of {model_id} is cached under {len(keys)} configs "
                                 f"(fingerprints {', '.join(k.rsplit(chr(0), 1)[1] for k in keys)}); "
                                 "pass quantization_config")
            cached = self._get(keys[0], memory=True) if keys else None
        if cached is None or into is None:
            return cached
        return load_into(into, cached)


def load_into(module: torch.nn.Module, cached: CachedLayer, compute_dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    """``module`` holding ``cached``: its quantized linears as :class:`QuantizedLinear`, the rest
    of its tensors assigned in place."""
    qweights, plain = split_cached(cached)
    for path, qweight in qweights.items():
        meta = cached.linears[path]
        bias = plain.pop(f"{path}.bias", None)
        linear = QuantizedLinear.from_quantized(qweight, bias, compute_dtype, transposed=bool(meta.get("transposed")))
        if path:
            set_submodule(module, path, linear)
        else:
            module = linear
    state = {k: (v.to(compute_dtype) if v.is_floating_point() else v) for k, v in plain.items()}
    missing = module.load_state_dict(state, strict=False, assign=True).unexpected_keys
    if missing:
        raise ValueError(f"the cached layer has tensors the module lacks ({missing[:3]}); pass a module of the "
                         "cached layer's architecture")
    return module

