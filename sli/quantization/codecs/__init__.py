"""Tensor codecs, one module per format. Importing this package registers them all.

=============  ==========================================================================
mode           tensors (names relative to the linear module)
=============  ==========================================================================
none           ``weight`` (the checkpoint's own dtype, lossless)
int8           ``weight`` int8 [out, in], ``SCB`` fp32 [out], ``weight_format`` uint8 [];
               outliers: ``weight.outlier_cols`` int64 [k], ``weight.outliers`` 16-bit [out, k]
int8_dynamic   ``weight`` int8 [out, in], ``SCB`` fp32 [out], ``weight_format`` uint8 []
nf4 / fp4      ``weight`` uint8 [numel/2, 1], ``weight.absmax``, ``weight.quant_map`` fp32[16],
               double quant: ``weight.nested_absmax``, ``weight.nested_quant_map``;
               ``weight.quant_state.bitsandbytes__nf4`` (or ``__fp4``): uint8 JSON bytes
int4           ``weight`` uint8 [out, in/2], ``weight.scales`` fp16 [out, in/g],
               ``weight.zeros`` uint8 [out, in/g]
fp8            ``weight`` float8_e4m3fn [out, in], ``weight.scale`` fp32 [out]
=============  ==========================================================================

Names follow transformers' bitsandbytes checkpoints, so quantized layers can be exported
as a checkpoint transformers loads.
"""
from .base import Codec, codec_for
from . import none, int8, four_bit, int4, fp8  # noqa: F401,E401  (registration)

__all__ = ["Codec", "codec_for"]
