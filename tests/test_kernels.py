"""The fused CPU kernels compute what dequantize-then-``F.linear`` computes."""
import pytest
import torch

import sli.kernels as kernels
from sli.quantization import QuantizationConfig, codec_for
from sli.quantization.execution import linear

import bitsandbytes.functional as bnbf  # noqa: E402  (a dependency of sli)

MODES = ["none", "int8", "int8_dynamic", "nf4", "fp4", "int4", "fp8"]


def _weight(shape, seed=0, dtype=torch.bfloat16):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g) * 0.02).to(dtype)


def _reference(codec, q, x, bias=None):
    return torch.nn.functional.linear(x, codec.dequantize(q, torch.float32), bias)


def _rel_err(y, ref):
    return float((y - ref).abs().max() / ref.abs().max())


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("rows", [1, 3, kernels.FUSED_MAX_TOKENS])
def test_fused_linear_equals_dequantize_then_linear(mode, rows):
    # 384 x 1024: enough work to be split across threads
    codec = codec_for(mode)
    weight = _weight((384, 1024), seed=rows)
    if mode == "int8":
        weight[:, 5] = 9.0  # an outlier column, kept in 16-bit
    q = codec.quantize(weight, QuantizationConfig(mode=mode))
    x = torch.randn(rows, 1024)
    bias = torch.randn(384)
    assert kernels.use_fused(x, 1024)
    fused = codec.fused_linear(codec.prepare(q), x, bias)
    assert fused is not None, f"{mode} has no kernel"
    assert _rel_err(fused, _reference(codec, q, x, bias)) < 1e-5


@pytest.mark.parametrize("mode", MODES)
def test_linear_keeps_leading_dimensions(mode):
    codec = codec_for(mode)
    q = codec.quantize(_weight((96, 128)), QuantizationConfig(mode=mode))
    x = torch.randn(2, 3, 128)
    y = linear(q, x)
    assert y.shape == (2, 3, 96)
    assert _rel_err(y, _reference(codec, q, x)) < 1e-5


def test_4bit_weights_whose_rows_straddle_blocks_are_dequantized_instead():
    codec = codec_for("nf4")
    q = codec.quantize(_weight((50, 200)), QuantizationConfig(mode="nf4"))  # 200 % 64 != 0
    x = torch.randn(1, 200)
    assert codec.fused_linear(codec.prepare(q), x, None) is None
    torch.testing.assert_close(linear(q, x), _reference(codec, q, x), rtol=0, atol=0)


def test_int4_pads_inputs_to_its_group_size():
    codec = codec_for("int4")
    q = codec.quantize(_weight((40, 200)), QuantizationConfig(mode="int4"))  # padded to 256
    x = torch.randn(2, 200)
    assert _rel_err(codec.fused_linear(codec.prepare(q), x, None), _reference(codec, q, x)) < 1e-5


def test_prompts_go_to_blas():
    x = torch.randn(kernels.FUSED_MAX_TOKENS + 1, 64)
    assert not kernels.use_fused(x, 64)
    assert not kernels.use_fused(torch.randn(1, 64, dtype=torch.bfloat16), 64)


def test_the_kernels_can_be_turned_off(monkeypatch):
    monkeypatch.setenv("SLI_NO_NUMBA", "1")
    assert not kernels.use_fused(torch.randn(1, 64), 64)
    codec = codec_for("nf4")
    q = codec.quantize(_weight((64, 128)), QuantizationConfig(mode="nf4"))
    x = torch.randn(1, 128)
    assert _rel_err(linear(q, x), _reference(codec, q, x)) < 1e-6


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("double_quant", [False, True])
@pytest.mark.parametrize("shape", [(256, 1024), (50, 200)], ids=["whole-blocks", "partial-last-block"])
def test_4bit_dequantization_gives_bitsandbytes_values(quant_type, double_quant, shape):
    weight = _weight(shape, dtype=torch.float32)
    config = QuantizationConfig(mode=quant_type, compress_statistics=double_quant, double_quant=double_quant)
    q = codec_for(quant_type).quantize(weight, config)
    packed, state = bnbf.quantize_4bit(weight, blocksize=64, quant_type=quant_type, compress_statistics=double_quant)
    expected = bnbf.dequantize_4bit(packed, state)
    assert kernels.kernels_enabled()
    torch.testing.assert_close(codec_for(quant_type).dequantize(q, torch.float32), expected, rtol=0, atol=1e-7)


def test_fp8_table_holds_every_float8_value():
    codec = codec_for("fp8")
    lut = codec.prepare(codec.quantize(_weight((4, 64)), QuantizationConfig(mode="fp8"))).tensors["_lut"]
    finite = torch.arange(256).to(torch.uint8).view(torch.float8_e4m3fn).float()
    assert torch.equal(lut.isnan(), finite.isnan())
    assert torch.equal(lut[~lut.isnan()], finite[~finite.isnan()])


@pytest.mark.parametrize("double_quant", [False, True])
def test_4bit_kernel_reads_plain_and_double_quantized_block_maxima(double_quant):
    codec = codec_for("nf4")
    config = QuantizationConfig(mode="nf4", double_quant=double_quant, compress_statistics=double_quant)
    q = codec.quantize(_weight((320, 1024), seed=4), config)
    assert ("weight.nested_absmax" in q.tensors) == double_quant
    x = torch.randn(2, 1024)
    assert _rel_err(codec.fused_linear(codec.prepare(q), x, None), _reference(codec, q, x)) < 1e-5


@pytest.mark.parametrize("block_size", [128, 256])
@pytest.mark.parametrize("rows", [1, 5])
def test_4bit_kernel_walks_blocks_larger_than_its_64_value_step(block_size, rows):
    codec = codec_for("fp4")
    config = QuantizationConfig(mode="fp4", block_size=block_size)
    q = codec.quantize(_weight((96, 1024), seed=block_size), config)
    x = torch.randn(rows, 1024)
    assert _rel_err(codec.fused_linear(codec.prepare(q), x, None), _reference(codec, q, x)) < 1e-5


_PLAIN_4BIT_CHECK = """
import torch, bitsandbytes.functional as bnbf
from sli import kernels
from sli.quantization import QuantizationConfig, codec_for
assert kernels.four_bit_path() == "plain"
codec = codec_for("nf4")
w = (torch.randn(96, 1024, generator=torch.Generator().manual_seed(0)) * 0.02)
q = codec.prepare(codec.quantize(w, QuantizationConfig(mode="nf4")))
dense = codec.dequantize(q, torch.float32)
packed, state = bnbf.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=True)
assert (dense - bnbf.dequantize_4bit(packed, state)).abs().max() <= 1e-7
for rows in (1, 3):
    x = torch.randn(rows, 1024)
    ref = torch.nn.functional.linear(x, dense)
    err = float((codec.fused_linear(q, x, None) - ref).abs().max() / ref.abs().max())
    assert err < 1e-5, err
print("plain path ok")
"""


def test_4bit_kernels_without_avx2_give_the_same_values():
    # SLI_NO_SIMD=1 is the path a CPU without AVX2 takes; a fresh process, as the kernels
    # are compiled once per process.
    import os
    import subprocess
    import sys
    env = dict(os.environ, SLI_NO_SIMD="1")
    done = subprocess.run([sys.executable, "-c", _PLAIN_4BIT_CHECK], env=env, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "plain path ok" in done.stdout


_SIMD_BUILD_FAILS = """
import logging, sys, torch
sys.modules["sli.simd"] = None  # as if numba's internals moved: importing the intrinsics fails
logging.basicConfig(level=logging.WARNING)
from sli import kernels
from sli.quantization import QuantizationConfig, codec_for
codec = codec_for("nf4")
w = torch.randn(64, 256, generator=torch.Generator().manual_seed(0)) * 0.02
q = codec.prepare(codec.quantize(w, QuantizationConfig(mode="nf4")))
x = torch.randn(1, 256)
ref = torch.nn.functional.linear(x, codec.dequantize(q, torch.float32))
assert float((codec.fused_linear(q, x, None) - ref).abs().max()) < 1e-4
print("path", kernels.four_bit_path())
"""


def test_a_simd_build_failure_falls_back_to_the_plain_kernels():
    import subprocess
    import sys
    done = subprocess.run([sys.executable, "-c", _SIMD_BUILD_FAILS], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "path plain" in done.stdout
    assert "SIMD 4-bit helpers cannot be built" in done.stderr
