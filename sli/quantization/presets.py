"""Named quantization configs: one preset per mode (from its codec's declaration) plus a
user's own."""
from __future__ import annotations

import copy
import dataclasses
from typing import Any, Dict, List, Optional

from .config import METHOD_FIELDS, QuantizationConfig, QuantizationMode, available_modes, mode_spec


def preset_config(mode: str) -> QuantizationConfig:
    """The preset of ``mode``: the config its codec declares as the mode's sensible default."""
    return QuantizationConfig(mode=mode, **mode_spec(mode).preset)


def calibrated_names() -> List[str]:
    """``MODE-METHOD`` names of every calibrated method a mode offers: ``int4-gptq``, ``nf4-gptq``, ..."""
    return [f"{m}-{method}" for m in available_modes() for method in mode_spec(m).methods if method != "rtn"]


def calibrated_preset(name: str, **fields: Any) -> Optional[QuantizationConfig]:
    """The config a calibrated name stands for (``"int4-gptq"``: int4's preset with ``method="gptq"``,
    plus ``fields``), or None when ``name`` is not one."""
    mode, sep, method = str(name).lower().rpartition("-")
    if not sep or method not in METHOD_FIELDS or f"{mode}-{method}" not in calibrated_names():
        return None
    return QuantizationConfig.from_dict({**preset_config(mode).to_dict(), "method": method, **fields})


def get_int8_config() -> QuantizationConfig:
    """Row-wise int8 with outlier columns kept in 16-bit; head and embeddings untouched."""
    return preset_config(QuantizationMode.INT8.value)


def get_nf4_config() -> QuantizationConfig:
    """NF4 with double-quantized statistics (~4.13 bits/weight)."""
    return preset_config(QuantizationMode.NF4.value)


def get_fp4_config() -> QuantizationConfig:
    return preset_config(QuantizationMode.FP4.value)


class QuantizationRegistry:
    """Named configs: each mode's preset plus whatever a user registers."""

    _custom: Dict[str, object] = {}

    @classmethod
    def register(cls, name: str, config) -> None:
        """Name a :class:`QuantizationConfig` or a quantizer (an :class:`AdaptiveQuantizer`,
        e.g. ``get_mixed_precision_config()``). A mode's own name is refused: it names its preset."""
        from .quantizer import LayerQuantizer

        if not isinstance(config, (QuantizationConfig, LayerQuantizer)):
            raise TypeError(f"register({name!r}, ...) needs a QuantizationConfig or a quantizer, "
                            f"got {type(config).__name__}")
        if name in available_modes():
            raise ValueError(f"{name!r} is a built-in mode's preset; register your config under another name")
        cls._custom = {**cls._custom, name: config}

    @classmethod
    def get(cls, name: str):
        if name in cls._custom:
            found = cls._custom[name]
            return dataclasses.replace(found) if isinstance(found, QuantizationConfig) else copy.deepcopy(found)
        if name in available_modes():
            return preset_config(name)
        calibrated = calibrated_preset(name)
        if calibrated is not None:
            return calibrated
        raise KeyError(f"no quantization config named {name!r}; known: {', '.join(cls.list_configs())}")

    @classmethod
    def list_configs(cls) -> List[str]:
        named = available_modes() + calibrated_names()
        return named + [n for n in cls._custom if n not in named]

    @classmethod
    def unregister(cls, name: str) -> None:
        cls._custom = {k: v for k, v in cls._custom.items() if k != name}
