"""Quantization modes and the config that says what a layer's linear weights become.

Each mode's codec (:mod:`sli.quantization.codecs`) declares a :class:`ModeSpec`: which config
fields change its bytes, the next mode up the precision ladder, and its preset. The config,
the presets, the fingerprint and the CLI read those declarations, so a new mode is an enum
member plus one codec file.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from enum import Enum
from typing import Any, Dict, List, Optional, Tuple, Union

import torch


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


@dataclass(frozen=True)
class ModeSpec:
    """What a codec declares about its mode (see :func:`register_mode`)."""

    mode: QuantizationMode
    byte_fields: Tuple[str, ...] = ()  # config fields, beyond mode and skip list, that change the bytes
    upgrade: Optional[QuantizationMode] = None  # one step up the precision ladder (AdaptiveQuantizer)
    preset: Dict[str, Any] = field(default_factory=dict)  # config fields of the named preset
    description: str = ""
    methods: Tuple[str, ...] = ("rtn",)  # how its values may be chosen (see METHOD_FIELDS)


_MODE_SPECS: Dict[QuantizationMode, ModeSpec] = {}


def register_mode(spec: ModeSpec) -> None:
    """Record a mode's declaration; a second declaration of the same mode is an error."""
    if spec.mode in _MODE_SPECS:
        raise ValueError(f"quantization mode {spec.mode.value!r} is declared twice; each mode has one codec")
    _MODE_SPECS[spec.mode] = spec


def mode_spec(mode: Union[QuantizationMode, str]) -> ModeSpec:
    mode = QuantizationMode(mode)
    if mode not in _MODE_SPECS:
        raise ValueError(f"quantization mode {mode.value!r} has no codec; import sli.quantization")
    return _MODE_SPECS[mode]


def available_modes() -> List[str]:
    """The names of every mode that has a codec, in the enum's order."""
    return [m.value for m in QuantizationMode if m in _MODE_SPECS]


# NF4/FP4 values a block maximum may cover (bitsandbytes' sizes; 32 takes ~0.125 bits a weight more than 64)
BLOCK_SIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)
# The sizes each sized field takes, in words for its errors (INT4: two values a byte)
SIZES_TAKEN = {"block_size": "a power of two from 32 to 4096", "group_size": "an even number >= 2"}


def size_fits(field: str, size: int) -> bool:
    """Whether ``size`` is one that ``field`` takes (:data:`SIZES_TAKEN`): NF4/FP4's
    ``block_size`` one of :data:`BLOCK_SIZES`, INT4's ``group_size`` any even number >= 2."""
    return size in BLOCK_SIZES if field == "block_size" else size >= 2 and size % 2 == 0


def parse_block_sizes(text: str) -> "Tuple[Optional[int], Dict[str, int]]":
    """``--block-size``'s text as (the size or None, some linears' own sizes by name):
    ``"32"``, ``"32,q_proj=64,o_proj=64"``, ``"q_proj=128"``. A size that is not an even number
    >= 2, or two sizes without names, is a ValueError that names the form; which sizes a mode
    takes (NF4/FP4 blocks: :data:`BLOCK_SIZES`; INT4 groups: any even number) its config checks.

    >>> parse_block_sizes("32,q_proj=64")
    (32, {'q_proj': 64})
    """
    size: Optional[int] = None
    named: Dict[str, int] = {}
    for item in (part.strip() for part in str(text).split(",")):
        name, sep, value = item.rpartition("=")
        name = name.strip()
        try:
            number = int(value)
        except ValueError:
            number = None
        malformed = (sep and not name) or (not sep and size is not None)  # a name without a size, two sizes
        if number is None or not size_fits("group_size", number) or malformed:
            blocks = ", ".join(map(str, BLOCK_SIZES))
            raise ValueError(f"block sizes {text!r}: give a size (NF4/FP4 blocks: one of {blocks}; INT4 groups: an "
                             "even number), then any linears of their own as NAME=SIZE, e.g. 32,q_proj=64")
        if sep:
            named[name] = number
        else:
            size = number
    return size, named


# How a weight's values are chosen. "rtn" rounds each weight to its nearest code (no data);
# "gptq" chooses them layer by layer against calibration activations (sli.calibration,
# sli.quantization.gptq) and writes the same byte layout. A method's fields change the bytes,
# so they enter the fingerprint, but only for that method: an "rtn" config's fingerprint is
# exactly what it was before methods existed.
METHOD_FIELDS: Dict[str, Tuple[str, ...]] = {
    "rtn": (),
    "gptq": ("method", "gptq_damp", "gptq_block_size", "gptq_act_order", "gptq_scale_search", "gptq_sequential",
             "gptq_asymmetric", "calibration", "calibration_tokens", "calibration_window"),
}
DEFAULT_CALIBRATION = "default"  # the built-in calibration text (sli.calibration.default_calibration_text)


_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


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
    """float32 on CPU (sli's CPU kernels compute in float32), 16-bit on CUDA."""
    device = torch.device(device) if device is not None else None
    if device is not None and device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32


HEAD_CHOICES = ("auto", "int8", "keep")
FOUR_BIT_MODES = ("nf4", "fp4", "int4")


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
    # NF4/FP4 block sizes, or INT4 group sizes, of some linears by name ({"q_proj": 64}: each linear
    # whose name is q_proj, has it as a dotted part or ends in ".q_proj" in blocks of 64, the others
    # in block_size's, or group_size's for INT4): a mix within a bit budget
    block_sizes: Optional[Dict[str, int]] = None
    group_size: int = 128  # INT4 values per scale/zero point
    # -- how values are chosen (METHOD_FIELDS): "rtn" (nearest code) or "gptq" (calibrated) --
    method: str = "rtn"
    gptq_damp: float = 0.01  # added to the Hessian's diagonal, as a fraction of its mean
    gptq_block_size: int = 128  # columns solved together before the rest of the weight is updated
    gptq_act_order: bool = True  # solve columns in decreasing Hessian diagonal (groups stay static)
    gptq_scale_search: bool = True  # group scales / block absmax chosen by a small clipping search
    gptq_sequential: bool = False  # each linear's Hessian from inputs with the linears before it quantized
    # each linear fitted toward the float model's outputs on the float model's own inputs, not its
    # own outputs on the quantized model's inputs (GPTAQ's asymmetric calibration): the fraction of
    # that least-squares correction applied. 0: plain GPTQ; 0.25 (GPTAQ's): on SmolLM2 nf4-gptq
    # +4.5% → +2.4% on pydoc_data.topics, at twice the time of a 7B-shaped layer and a third more
    # memory (a pass of the float layer and a drift matrix beside each Hessian; docs/quantization.md)
    gptq_asymmetric: float = 0.0
    calibration: str = DEFAULT_CALIBRATION  # the calibration text: "default" or calibration_id(text)
    calibration_tokens: int = 32768  # tokens of calibration text (windows of calibration_window)
    calibration_window: int = 512
    # The head (the last linear, outside the layers; resident, read whole every token) on CPU:
    # "int8" (row-wise int8, the INT8 kernels), "keep" (the checkpoint's dtype), or "auto":
    # int8 for the 4-bit modes (as llama.cpp's 4-bit files keep their output at 6-8 bits), kept
    # otherwise. Not part of the layer cache's bytes.
    head: str = "auto"

    def __post_init__(self) -> None:
        self.mode = QuantizationMode(self.mode)
        if self.head not in HEAD_CHOICES:
            raise ValueError(f"head={self.head!r} is not supported; use one of {', '.join(HEAD_CHOICES)}")
        self.method = str(self.method).lower()
        if self.method not in METHOD_FIELDS:
            raise ValueError(f"method={self.method!r} is not supported; use one of {', '.join(METHOD_FIELDS)}")
        spec = _MODE_SPECS.get(self.mode)
        if spec is not None and self.method not in spec.methods:
            raise ValueError(f"method={self.method!r} is not available for mode={self.mode.value!r} "
                             f"(it has {', '.join(spec.methods)})")
        if self.calibrated:  # the method's fields are read (and checked) only when it is used
            if not 0 <= float(self.gptq_damp) < 1:
                raise ValueError(f"gptq_damp={self.gptq_damp} must be in [0, 1); 0.01 is the usual value")
            if not 0 <= float(self.gptq_asymmetric) <= 1:
                raise ValueError(f"gptq_asymmetric={self.gptq_asymmetric} must be in [0, 1]; 0.25 is the usual value, "
                                 "0 turns it off")
            if int(self.gptq_block_size) < 1:
                raise ValueError(f"gptq_block_size={self.gptq_block_size} must be >= 1")
            if int(self.calibration_window) < 2 or int(self.calibration_tokens) < int(self.calibration_window):
                raise ValueError(f"calibration_tokens={self.calibration_tokens} and calibration_window="
                                 f"{self.calibration_window} must give at least one window of >= 2 tokens")
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
        if self.has_blocks and self.quant_type != self.mode.value:
            raise ValueError(
                f"quant_type={self.quant_type!r} contradicts mode={self.mode.value!r}; "
                f"use quant_type={self.mode.value!r} or mode={self.quant_type!r}"
            )
        for field in SIZES_TAKEN:
            if not size_fits(field, getattr(self, field)):
                raise ValueError(f"{field}={getattr(self, field)} is not supported; use {SIZES_TAKEN[field]}")
        self._check_block_sizes()
        if self.llm_int8_skip_modules is not None:
            self.llm_int8_skip_modules = list(self.llm_int8_skip_modules)

    def _check_block_sizes(self) -> None:
        if not self.block_sizes:
            self.block_sizes = None
            return
        self.block_sizes = {str(name): int(size) for name, size in dict(self.block_sizes).items()}
        if self.sized_field is None:
            raise ValueError(f"block_sizes sizes NF4/FP4 blocks and INT4 groups, and mode={self.mode.value!r} has "
                             "neither; use mode='nf4', 'fp4' or 'int4', or leave block_sizes out")
        wrong = {name: size for name, size in self.block_sizes.items()
                 if not name or not size_fits(self.sized_field, size)}
        if wrong:
            raise ValueError(f"block_sizes={wrong} is not supported; give linear names each "
                             f"{SIZES_TAKEN[self.sized_field]}, e.g. {{'q_proj': 64}}")

    @property
    def sized_field(self) -> Optional[str]:
        """The field a size of ``--block-size`` / :attr:`block_sizes` sets: ``"block_size"``
        (NF4/FP4 blocks), ``"group_size"`` (INT4 groups), or None (the mode has neither)."""
        if self.has_blocks:
            return "block_size"
        return "group_size" if self.mode == QuantizationMode.INT4 else None

    def for_linear(self, module_name: str) -> "QuantizationConfig":
        """This config as the linear ``module_name`` takes it: the block (or INT4 group) size of
        the first name in :attr:`block_sizes` that names it (the whole name, a dotted part or its
        dotted tail), if any."""
        for name, size in (self.block_sizes or {}).items():
            if _names(module_name, name):
                field = self.sized_field
                return self if size == getattr(self, field) else dataclasses.replace(self, **{field: size})
        return self

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
        """The fields that change the bytes this config writes to the cache (its codec says which)."""
        fields: Dict[str, Any] = {"mode": self.mode.value, "skip": sorted(self.llm_int8_skip_modules or [])}
        fields.update((name, getattr(self, name)) for name in mode_spec(self.mode).byte_fields)
        fields.update((name, getattr(self, name)) for name in METHOD_FIELDS[self.method])
        if self.block_sizes:  # only when set: every config without it keeps its fingerprint
            fields["block_sizes"] = dict(sorted(self.block_sizes.items()))
        return fields

    @property
    def int8_head(self) -> bool:
        """Whether a CPU run multiplies the head in int8 (:attr:`head`)."""
        return self.head == "int8" or (self.head == "auto" and self.mode.value in FOUR_BIT_MODES)

    @property
    def has_blocks(self) -> bool:
        """True when the weights are NF4/FP4 blocks, which ``block_size`` and ``block_sizes`` size."""
        return self.mode in (QuantizationMode.NF4, QuantizationMode.FP4)

    @property
    def calibrated(self) -> bool:
        """True when the bytes come from calibration (:mod:`sli.calibration`), not from the weight alone."""
        return self.method != "rtn"

    def fingerprint(self) -> str:
        """A short stable hash of :meth:`byte_fields`: the layer cache keys on it.

        compute_dtype is not part of it: stored tensors do not depend on it (NONE keeps
        the checkpoint's own dtype), so one warmed cache serves CPU and CUDA alike.
        """
        payload = json.dumps({"format": 1, **self.byte_fields()}, sort_keys=True)
        return hashlib.sha256(payload.encode()).hexdigest()[:16]

    def describe(self) -> str:
        """JSON of every field: what a cache entry records about the config that made it."""
        return json.dumps(self.to_dict(), sort_keys=True)

    def resolved_compute_dtype(self, device: Union[str, torch.device, None] = None) -> torch.dtype:
        return self.compute_dtype or default_compute_dtype(device)

    def skips(self, module_name: str) -> bool:
        """True when ``module_name`` matches an entry of ``llm_int8_skip_modules``."""
        return any(_names(module_name, skip) for skip in self.llm_int8_skip_modules or ())


def _names(module_name: str, name: str) -> bool:
    """Whether ``name`` names the module ``module_name``: the whole of it, one of its dotted parts,
    or its dotted tail."""
    return name == module_name or name in module_name.split(".") or module_name.endswith("." + name)
