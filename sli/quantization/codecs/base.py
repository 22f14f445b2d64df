"""The codec base class: one subclass per mode, each a matched quantize/dequantize pair.

A codec turns one linear weight ``[out, in]`` into a :class:`QuantizedTensor` (named tensors
storable in a safetensors file as they are, plus JSON-able metadata) and back, slices it by
output rows, and multiplies by it straight from its bytes where a kernel exists
(:meth:`Codec.fused_linear`). Choosing between that kernel, row chunks and
dequantize-then-BLAS is :mod:`sli.quantization.execution`'s job.

A subclass that sets ``mode`` registers itself and its :class:`ModeSpec`; a second codec
for the same mode is refused.
"""
from __future__ import annotations

import math
from typing import Any, Callable, ClassVar, Dict, Optional, Tuple

import torch
from torch import Tensor

from ..config import ModeSpec, QuantizationConfig, QuantizationMode, dtype_name, register_mode
from ..formats import QuantizedTensor

_REGISTRY: Dict["QuantizationMode | str", "Codec"] = {}  # by mode and by its value

Allocate = Callable[[int], Tensor]  # n -> a float32 buffer of n values (Codec.prepare)


class Codec:
    """Base class: subclasses set ``mode`` (and what their :class:`ModeSpec` needs) and
    implement quantize / dequantize."""

    mode: ClassVar[QuantizationMode]
    byte_fields: ClassVar[Tuple[str, ...]] = ()  # config fields that change this codec's bytes
    upgrade: ClassVar[Optional[QuantizationMode]] = None  # the next mode up in precision
    preset: ClassVar[Dict[str, Any]] = {}  # config fields of the mode's named preset
    methods: ClassVar[Tuple[str, ...]] = ("rtn",)  # how values may be chosen ("gptq": sli.quantization.gptq)
    # dequantize(q, torch.bfloat16, out=<bfloat16 buffer>) writes the buffer directly, with no
    # float32 pass (a prompt's bfloat16 chunks: sli.quantization.execution)
    writes_bfloat16: ClassVar[bool] = False
    # activation rows up to which a prompt's product stays in fused_linear on a SIMD level, where
    # that beats dequantizing for a matrix product (sli.kernels.use_fused; at least
    # kernels.FUSED_MAX_TOKENS, a token pass's rows)
    fused_max_rows: ClassVar[int] = 0

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "mode" not in cls.__dict__:  # abstract intermediates (no own mode) are not registered
            return
        if cls.mode in _REGISTRY:
            raise ValueError(f"a codec for mode {cls.mode.value!r} is already registered "
                             f"({type(_REGISTRY[cls.mode]).__name__}); each mode has one codec")
        register_mode(ModeSpec(cls.mode, tuple(cls.byte_fields), cls.upgrade, dict(cls.preset),
                               (cls.__doc__ or "").strip().splitlines()[0] if cls.__doc__ else "",
                               tuple(cls.methods)))
        _REGISTRY[cls.mode] = _REGISTRY[cls.mode.value] = cls()  # by value too: see codec_for

    def quantize(self, weight: Tensor, config: QuantizationConfig) -> QuantizedTensor:
        raise NotImplementedError

    def quantize_sample(self, weight: Tensor, config: QuantizationConfig) -> QuantizedTensor:
        """``weight`` in this mode's layout, to ready its kernels on (not for the cache: a codec
        may give other bytes than :meth:`quantize` where those cost a slow import)."""
        return self.quantize(weight, config)

    def dequantize(self, q: QuantizedTensor, dtype: torch.dtype, out: Optional[Tensor] = None) -> Tensor:
        """The weight ``[out, in]`` in ``dtype`` on the device ``q`` lives on.

        ``out``, when given, is a preallocated tensor of the right shape and dtype to
        write into (the streaming loader reuses buffers so freed layers are not kept by
        the allocator).
        """
        raise NotImplementedError

    def prepare_input(self, x: Tensor) -> Tensor:
        """What a linear layer feeds to the matmul: ``x`` itself for weight-only modes."""
        return x

    def prepare(self, q: QuantizedTensor, allocate: Optional[Allocate] = None) -> QuantizedTensor:
        """``q`` plus what :meth:`fused_linear` needs precomputed (``_``-prefixed tensors:
        float scales, decoded tables). Cheap next to a read; the loader runs it on the prefetch
        thread, or on the compute thread when that one already waits for the layer
        (:meth:`sli.streaming.LayerStreamer.get`). The result is for computing with, never for
        storing. ``allocate(n)``,
        where given, supplies the float32 buffers of the larger ones (the loader reuses them)."""
        return q

    def fused_linear(self, q: QuantizedTensor, x: Tensor, bias: Optional[Tensor]) -> Optional[Tensor]:
        """``x @ W^T + bias`` for float32 ``x`` straight from the prepared bytes
        (:mod:`sli.kernels`), or None where this weight has no kernel."""
        return None

    def row_product(self, q: QuantizedTensor, bias: Optional[Tensor]):
        """A :class:`sli.kernels.bound.RowProduct` of the prepared ``q`` (and ``bias``): the
        :meth:`fused_linear` of int8-quantized rows, looked up once; None where this weight has
        none (the decode step then calls the module)."""
        return None

    def row_slice(self, q: QuantizedTensor, start: int, stop: int) -> Optional[QuantizedTensor]:
        """Rows ``[start, stop)`` of the weight as a :class:`QuantizedTensor` of views (the
        prepared ``_`` tensors sliced too), or None where this codec does not slice."""
        return None

    # -- helpers for subclasses --------------------------------------------------------
    @staticmethod
    def _rows(q: QuantizedTensor, start: int, stop: int, per_row: Tuple[str, ...] = (),
              **sliced: Tensor) -> QuantizedTensor:
        """``q`` with the tensors named in ``per_row`` cut to rows ``[start, stop)``, the ones
        in ``sliced`` replaced, the rest shared."""
        tensors = {k: (v[start:stop] if k in per_row else v) for k, v in q.tensors.items()}
        tensors.update(sliced)
        return QuantizedTensor(tensors, {**q.metadata, "shape": [stop - start, *q.metadata["shape"][1:]]})

    @staticmethod
    def _prepared(q: QuantizedTensor, **extra: Tensor) -> QuantizedTensor:
        return QuantizedTensor({**q.tensors, **extra}, q.metadata)

    @staticmethod
    def _meta(weight: Tensor, mode: QuantizationMode, **extra: Any) -> Dict[str, Any]:
        return {"codec": mode.value, "shape": list(weight.shape), "dtype": dtype_name(weight.dtype), **extra}


def codec_for(mode: "QuantizationMode | str") -> Codec:
    """The registered codec of ``mode``."""
    codec = _REGISTRY.get(mode)  # the mode or its value (a metadata string), without the enum's lookup
    return codec if codec is not None else _REGISTRY[QuantizationMode(mode)]


def check_float(weight: Tensor) -> None:
    if weight.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise ValueError(f"cannot quantize a {weight.dtype} weight; use float32, float16 or bfloat16")


def write_into(result: Tensor, out: Optional[Tensor]) -> Tensor:
    """``result``, or ``out`` holding a copy of it."""
    if out is None:
        return result
    out.copy_(result.view(out.shape))
    return out


def compute_into(compute, shape: tuple, dtype: torch.dtype, device: torch.device, out: Optional[Tensor]) -> Tensor:
    """Run ``compute(buf)`` (fills an fp32 buffer of ``shape``) straight into ``out`` when that is a
    contiguous fp32 tensor of the same size (no extra pass), else into a fresh buffer, cast to ``dtype``."""
    numel = math.prod(int(s) for s in shape)
    if out is not None and out.dtype == torch.float32 and out.is_contiguous() and out.numel() == numel:
        compute(out.view(shape))
        return out
    res = compute(torch.empty(shape, dtype=torch.float32, device=device))
    return write_into(res if dtype == torch.float32 else res.to(dtype), out)
