"""Codec tests: round trips, bitsandbytes byte equality, pure-torch path, layouts."""
import json

import pytest
import torch
from safetensors.torch import load_file, save_file

import sli.quantization.codecs.four_bit as four_bit
import sli.quantization.codecs.four_bit_quantizer as four_bit_quantizer
import sli.quantization.execution as execution
from sli import kernels
from sli.quantization import QuantizationConfig, bits_per_weight, calculate_quantization_error, codec_for

import bitsandbytes.functional as bnbf  # noqa: E402  (a dependency of sli)

MODES = ["none", "int8", "int8_dynamic", "nf4", "fp4", "int4", "fp8"]
# (mode, min SNR dB on N(0, 0.02) weights, max bits per weight for 256x256)
SNR_BITS = [
    ("none", 200.0, 16.0),
    ("int8", 38.0, 8.2),
    ("int8_dynamic", 38.0, 8.2),
    ("nf4", 20.0, 4.3),
    ("fp4", 17.5, 4.3),
    ("int4", 17.0, 4.3),
    ("fp8", 28.0, 8.2),
]


def _w(shape=(256, 256), dtype=torch.bfloat16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=g) * 0.02).to(dtype)


def _cfg(mode, **kw):
    dq = kw.pop("double_quant", True)
    return QuantizationConfig(mode=mode, double_quant=dq, compress_statistics=dq, **kw)


@pytest.mark.parametrize("mode,min_snr,max_bits", SNR_BITS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_round_trip(mode, min_snr, max_bits, dtype):
    w = _w(dtype=dtype)
    original = w.clone()
    codec = codec_for(mode)
    q = codec.quantize(w, _cfg(mode))
    assert torch.equal(w, original)  # the caller's weight is read, never scaled in place
    assert q.metadata["codec"] == mode and q.metadata["shape"] == [256, 256]
    r = codec.dequantize(q, torch.float32)
    assert r.shape == w.shape and r.dtype == torch.float32
    assert codec.dequantize(q, dtype).dtype == dtype
    assert calculate_quantization_error(w, r)["snr_db"] >= min_snr
    if mode != "none" or dtype != torch.float32:
        assert bits_per_weight(q) <= max_bits


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("double_quant", [False, True])
@pytest.mark.parametrize("shape", [(128, 192), (37, 53)])  # 37*53 is not a multiple of 64 (and odd)
@pytest.mark.parametrize("blocks", [64, 32])
def test_4bit_bytes_equal_bitsandbytes(quant_type, dtype, double_quant, shape, blocks):
    w = _w(shape, dtype, seed=1)
    w[3, 5] = 0.3  # an outlier block
    q = codec_for(quant_type).quantize(w, _cfg(quant_type, double_quant=double_quant, block_size=blocks))
    packed, st = bnbf.quantize_4bit(w, blocksize=blocks, compress_statistics=double_quant, quant_type=quant_type)
    t = q.tensors
    assert t["weight"].dtype == torch.uint8 and t["weight"].shape == packed.shape
    assert torch.equal(t["weight"], packed)
    assert torch.equal(t["weight.absmax"], st.absmax)
    assert torch.equal(t["weight.quant_map"], st.code)
    state = json.loads(bytes(t[f"weight.quant_state.bitsandbytes__{quant_type}"].tolist()))
    assert state["quant_type"] == quant_type and state["blocksize"] == blocks and state["shape"] == list(shape)
    assert state["dtype"] == str(dtype).removeprefix("torch.")
    if double_quant:
        assert torch.equal(t["weight.nested_absmax"], st.state2.absmax)
        assert torch.equal(t["weight.nested_quant_map"], st.state2.code)
        assert state["nested_offset"] == pytest.approx(st.offset.item())
    else:
        assert "weight.nested_absmax" not in t
    # and bitsandbytes' own dequantization agrees with ours
    ref = bnbf.dequantize_4bit(packed, st)  # in the weight's dtype
    torch.testing.assert_close(codec_for(quant_type).dequantize(q, dtype), ref)


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("double_quant", [False, True])
def test_pure_torch_path_matches_bitsandbytes(monkeypatch, quant_type, double_quant):
    w = _w((512, 320), torch.bfloat16, seed=2)
    packed, st = bnbf.quantize_4bit(w, blocksize=64, compress_statistics=double_quant, quant_type=quant_type)
    monkeypatch.setattr(four_bit, "BITSANDBYTES_AVAILABLE", False)
    monkeypatch.setenv("SLI_NO_NUMBA", "1")  # neither bitsandbytes nor the numba kernels
    codec = codec_for(quant_type)
    q = codec.quantize(w, _cfg(quant_type, double_quant=double_quant))
    assert torch.equal(q.tensors["weight"], packed)
    if double_quant:
        # nested absmax codes: bitsandbytes' native kernel picks the neighbouring code on ~0.2%
        diff = (q.tensors["weight.absmax"].int() - st.absmax.int()).abs()
        assert int(diff.max()) <= 1 and float((diff > 0).float().mean()) <= 0.01
        assert torch.equal(q.tensors["weight.nested_quant_map"], st.state2.code)
        torch.testing.assert_close(q.tensors["weight.nested_absmax"], st.state2.absmax)
    else:
        assert torch.equal(q.tensors["weight.absmax"], st.absmax)
    ref = bnbf.dequantize_4bit(packed, st).float()
    r = codec.dequantize(q, torch.bfloat16).float()  # pure-torch dequantization
    tol = 0.02 * float(ref.abs().max()) if double_quant else 1e-3 * float(ref.abs().max())
    torch.testing.assert_close(r, ref, atol=tol, rtol=0)


@pytest.mark.parametrize("mode", MODES)
def test_out_buffer_reused(mode):
    w = _w((64, 256), torch.bfloat16, seed=3)
    codec = codec_for(mode)
    q = codec.quantize(w, _cfg(mode))
    out = torch.full((64, 256), float("nan"))
    res = codec.dequantize(q, torch.float32, out=out)
    assert res.data_ptr() == out.data_ptr()
    torch.testing.assert_close(out, codec.dequantize(q, torch.float32))


@pytest.mark.parametrize("threshold,expect_cols", [(6.0, [2, 7]), (0.0, []), (-1.0, [])])
def test_int8_outlier_columns(threshold, expect_cols):
    w = _w((32, 16), torch.float16, seed=4)
    w[5, 2] = 9.0
    w[0, 7] = -7.5
    q = codec_for("int8").quantize(w, _cfg("int8", llm_int8_threshold=threshold))
    t = q.tensors
    assert t["weight"].dtype == torch.int8 and t["SCB"].dtype == torch.float32
    assert t["weight_format"].dtype == torch.uint8 and t["weight_format"].dim() == 0
    if expect_cols:
        assert t["weight.outlier_cols"].tolist() == expect_cols
        assert t["weight.outlier_cols"].dtype == torch.int64
        assert torch.equal(t["weight.outliers"], w[:, expect_cols])
        assert t["weight.outliers"].dtype == torch.float16
        assert (t["weight"][:, expect_cols] == 0).all()
        assert float(t["SCB"].max()) < 1.0  # outliers left out of SCB
        r = codec_for("int8").dequantize(q, torch.float16)
        assert torch.equal(r[:, expect_cols], w[:, expect_cols])
    else:
        assert "weight.outlier_cols" not in t and "weight.outliers" not in t
        assert float(t["SCB"].max()) == pytest.approx(9.0)
    # int8 values follow round(W * 127 / SCB) outside the outlier columns
    keep = [c for c in range(16) if c not in expect_cols]
    expect = torch.round(w.float()[:, keep] * (127 / t["SCB"]).unsqueeze(1)).to(torch.int8)
    assert torch.equal(t["weight"][:, keep], expect)


def test_int8_dynamic_per_token():
    codec = codec_for("int8_dynamic")
    x = torch.randn(2, 3, 64, dtype=torch.bfloat16)
    x[0, 1] *= 100  # one loud token must not coarsen the others
    x[1, 2, 7] = 40.0  # one loud feature must not coarsen the rest of its token
    y = codec.prepare_input(x)
    assert y.dtype == x.dtype and y.shape == x.shape
    xf = x.float()
    keep = torch.zeros_like(xf, dtype=torch.bool).scatter_(-1, xf.abs().topk(4, dim=-1).indices, True)
    rest = xf.masked_fill(keep, 0)
    a = rest.abs().amax(-1, keepdim=True).clamp(min=1e-8)
    expect = torch.where(keep, xf, torch.round(rest * 127 / a) * a / 127).to(x.dtype)
    assert torch.equal(y, expect)
    assert y[1, 2, 7] == 40.0  # the outlier passes exactly
    x32 = torch.randn(5, 64)
    y32 = codec.prepare_input(x32)
    top4 = torch.zeros_like(x32, dtype=torch.bool).scatter_(-1, x32.abs().topk(4, dim=-1).indices, True)
    assert torch.equal(y32[top4], x32[top4])  # the 4 largest features pass exactly
    a32 = x32.abs().masked_fill(top4, 0).amax(-1, keepdim=True)
    levels = (y32 / a32 * 127)[~top4]
    assert torch.allclose(levels, levels.round(), atol=1e-3)  # the rest sits on the int8 grid
    assert torch.equal(codec.prepare_input(torch.zeros(4, 8)), torch.zeros(4, 8))
    assert codec_for("int8").prepare_input(x) is x
    q = codec.quantize(_w((16, 64)), _cfg("int8_dynamic", llm_int8_threshold=0.001))
    assert "weight.outlier_cols" not in q.tensors  # dynamic mode keeps no outliers


def test_int4_layout_and_padding():
    w = _w((8, 200), torch.float32, seed=5)  # 200 is not a multiple of 128
    q = codec_for("int4").quantize(w, _cfg("int4"))
    t = q.tensors
    assert t["weight"].shape == (8, 128) and t["weight"].dtype == torch.uint8
    assert t["weight.scales"].shape == (8, 2) and t["weight.scales"].dtype == torch.float16
    assert t["weight.zeros"].shape == (8, 2) and t["weight.zeros"].dtype == torch.uint8
    assert q.metadata["padded_in"] == 256 and q.metadata["group_size"] == 128
    r = codec_for("int4").dequantize(q, torch.float32)
    assert r.shape == (8, 200)
    assert float((r - w).abs().max()) <= float(t["weight.scales"].float().max()) * 0.51


def test_fp8_layout_and_zero_rows():
    w = _w((8, 64), torch.bfloat16)
    w[3] = 0
    q = codec_for("fp8").quantize(w, _cfg("fp8"))
    assert q.tensors["weight"].dtype == torch.float8_e4m3fn and q.tensors["weight.scale"].shape == (8,)
    r = codec_for("fp8").dequantize(q, torch.float32)
    assert torch.isfinite(r).all() and (r[3] == 0).all()


@pytest.mark.parametrize("mode", MODES)
def test_safetensors_round_trip(tmp_path, mode):
    w = _w((64, 192), torch.bfloat16, seed=6)
    w[1, 1] = 8.0
    codec = codec_for(mode)
    q = codec.quantize(w, _cfg(mode))
    path = tmp_path / "q.safetensors"
    save_file(q.tensors, str(path))
    loaded = load_file(str(path))
    assert set(loaded) == set(q.tensors)
    for k, v in q.tensors.items():
        assert loaded[k].dtype == v.dtype and torch.equal(loaded[k].view(torch.uint8), v.contiguous().view(torch.uint8))
    q2 = type(q)(loaded, q.metadata)
    assert torch.equal(codec.dequantize(q2, torch.float32), codec.dequantize(q, torch.float32))


# (mode, exact bits per weight of a 512x4096 weight: payload + per-block statistics + fixed tables)
BITS = [
    ("int8", 8 + 32 / 4096 + 8 / (512 * 4096)),  # int8 + fp32 SCB per row + uint8 weight_format
    ("nf4", 4 + 8 / 64 + 32 / (64 * 256)),  # 4-bit + uint8 absmax per 64 + fp32 nested absmax per 256 blocks (+ tables)
    ("int4", 4 + 24 / 128),  # 4-bit + fp16 scale + uint8 zero per 128
    ("fp8", 8 + 32 / 4096),  # fp8 + fp32 scale per row
]


@pytest.mark.parametrize("mode,expected", BITS)
def test_bits_per_weight(monkeypatch, mode, expected):
    monkeypatch.setenv("SLI_NO_COMPILE", "1")  # layout only: skip the compile warm-up
    q = codec_for(mode).quantize(_w((512, 4096)), _cfg(mode))
    tables = sum(t.numel() * t.element_size() for k, t in q.tensors.items()
                 if k in ("weight.quant_map", "weight.nested_quant_map") or "quant_state" in k)
    assert bits_per_weight(q) == pytest.approx(8 * q.nbytes / (512 * 4096))
    assert 8 * (q.nbytes - tables) / (512 * 4096) == pytest.approx(expected, rel=1e-6)
    assert bits_per_weight(q) <= {"int8": 8.01, "nf4": 4.2, "int4": 4.3, "fp8": 8.01}[mode]


def test_compiled_4bit_quantizer_matches_bitsandbytes(monkeypatch):
    # the torch.compile'd kernel (normally only for >= 1M values) on a small weight: same bytes as
    # bitsandbytes, including an all-zero block, a huge block and a partial last block
    assert not four_bit_quantizer._compile_failed, "torch.compile failed here: the eager fallback is in use"
    monkeypatch.setattr(four_bit_quantizer, "_COMPILE_MIN_NUMEL", 0)
    monkeypatch.delenv("SLI_NO_COMPILE", raising=False)
    w = _w((96, 200), torch.bfloat16, seed=7)  # 19200 values: 300 full blocks
    w[0, :64] = 0
    w[1, :64] *= 1000
    for shape in ((96, 200), (95, 201)):  # the second leaves a partial (odd) last block
        x = w[: shape[0], : shape[1]].contiguous()
        packed, absmax = four_bit_quantizer.quantize_4bit_torch(x, 64, "nf4")
        ref, st = bnbf.quantize_4bit(x, blocksize=64, compress_statistics=False, quant_type="nf4")
        assert torch.equal(packed, ref) and torch.equal(absmax, st.absmax)
    assert "nf4" in four_bit_quantizer._compiled and not four_bit_quantizer._compile_failed


def test_compile_failure_falls_back_once(monkeypatch, caplog):
    # no C compiler: the first failure is logged and remembered; the eager path gives the same bytes
    def broken(*args, **kwargs):
        raise RuntimeError("no compiler")

    monkeypatch.setattr(four_bit_quantizer, "_COMPILE_MIN_NUMEL", 0)
    monkeypatch.setattr(four_bit_quantizer, "_compiled", {})
    monkeypatch.setattr(four_bit_quantizer, "_compile_failed", False)
    monkeypatch.delenv("SLI_NO_COMPILE", raising=False)
    monkeypatch.setattr(torch, "compile", broken)
    w = _w((64, 128), torch.float16, seed=8)
    ref, st = bnbf.quantize_4bit(w, blocksize=64, compress_statistics=False, quant_type="fp4")
    for _ in range(2):
        packed, absmax = four_bit_quantizer.quantize_4bit_torch(w, 64, "fp4")
        assert torch.equal(packed, ref) and torch.equal(absmax, st.absmax)
    assert four_bit_quantizer._compile_failed
    assert sum("torch.compile" in r.getMessage() for r in caplog.records) == 1


def test_error_metrics():
    w = torch.tensor([1.0, -2.0, 2.0])
    e = calculate_quantization_error(w, w + torch.tensor([0.1, 0.0, -0.1]))
    assert e["max_abs_error"] == pytest.approx(0.1) and e["mean_abs_error"] == pytest.approx(0.2 / 3)
    assert e["relative_error_pct"] == pytest.approx(100 * 0.2 / 5)
    assert e["snr_db"] == pytest.approx(10 * torch.log10(torch.tensor(9 / 0.02)).item(), rel=1e-5)
    assert calculate_quantization_error(w, w)["snr_db"] == float("inf")


# -- a prompt's linear, a few hundred rows at a time -----------------------------------------

def _a_prompt_s_linear(mode, double_quant, out_features):
    """A 512-wide weight of ``mode`` (an INT8 outlier column) times 2 x 80 rows (a prompt past
    every codec's ``fused_max_rows``) through ``execution.linear``: (y, dequantize-then-F.linear,
    bias, the scratch it used)."""
    g = torch.Generator().manual_seed(1)
    weight = (torch.randn(out_features, 512, generator=g) * 0.02).to(torch.bfloat16)
    weight[:, 7] = 9.0  # an INT8 outlier column
    codec = codec_for(mode)
    q = codec.quantize(weight, QuantizationConfig(mode=mode, double_quant=double_quant,
                                                  compress_statistics=double_quant))
    x, bias = torch.randn(2, 80, 512, generator=g), torch.randn(out_features, generator=g)
    assert x.shape[0] * x.shape[1] > max(kernels.FUSED_MAX_TOKENS, codec.fused_max_rows)
    scratch = execution.WeightScratch()
    y = execution.linear(q, x, bias, scratch=scratch)
    return y, torch.nn.functional.linear(x, codec.dequantize(q, torch.float32), bias), bias, scratch


@pytest.mark.parametrize("mode", ["nf4", "fp4", "int4"])
@pytest.mark.parametrize("level", ["simd", "plain"])
def test_a_short_prompt_stays_in_the_fused_kernel_up_to_the_codec_s_row_limit(mode, level, monkeypatch):
    # Dequantizing a 4-bit weight costs more than the fused kernel's passes over a few dozen
    # rows (NF4/FP4 up to 48, INT4 up to 64; docs/benchmarks.md), on a SIMD level; the plain
    # level's kernels keep to a token pass's rows. Each row's result is what it gets alone.
    if level == "plain":
        monkeypatch.setattr(kernels, "simd_path", lambda: "plain")
    codec = codec_for(mode)
    limit = codec.fused_max_rows
    assert limit > kernels.FUSED_MAX_TOKENS
    g = torch.Generator().manual_seed(3)
    q = codec.quantize((torch.randn(96, 512, generator=g) * 0.02).to(torch.bfloat16), QuantizationConfig(mode=mode))
    x = torch.randn(limit + 1, 512, generator=g)
    fused, real = [], type(codec).fused_linear
    monkeypatch.setattr(type(codec), "fused_linear",
                        lambda self, q, x, bias: fused.append(x.shape[0]) or real(self, q, x, bias))
    at_limit, past = execution.linear(q, x[:limit]), execution.linear(q, x)
    if level == "plain":
        assert fused == []
        return
    assert fused == [limit]  # one row more: dequantize, then a matrix product
    alone = torch.cat([execution.linear(q, x[i:i + 1]) for i in range(limit)])
    assert torch.equal(at_limit, alone)
    expected = torch.nn.functional.linear(x, codec.dequantize(q, torch.float32))
    for y, want in ((at_limit, expected[:limit]), (past, expected)):
        assert ((y - want).norm() / want.norm()).item() < 0.01


@pytest.mark.parametrize("mode,double_quant", [("none", False), ("int8", False), ("int8_dynamic", False),
                                               ("nf4", True), ("nf4", False), ("fp4", True), ("int4", False),
                                               ("fp8", False)])
def test_a_prompt_dequantizes_its_weight_a_row_chunk_at_a_time(mode, double_quant, monkeypatch):
    monkeypatch.setenv("SLI_PROMPT_DTYPE", "float32")  # bfloat16: the next test
    monkeypatch.setenv("SLI_INT8_MATMUL", "numba")  # INT8 in torch._int_mm: tests/test_kernels.py
    monkeypatch.setattr(execution, "PROMPT_CHUNK_BYTES", 256 * 512 * 4)  # 256-row chunks of a 512-wide weight
    y, expected, _, scratch = _a_prompt_s_linear(mode, double_quant, 700)  # 3 chunks, the last partial
    torch.testing.assert_close(y, expected, rtol=1e-5, atol=1e-5)
    assert scratch.held(torch.float32) == 256 * 512  # one chunk's buffer, never the whole weight
    assert scratch.held(torch.bfloat16) == 0


@pytest.mark.parametrize("mode,double_quant", [("nf4", True), ("nf4", False), ("fp4", False),
                                               ("int4", False), ("fp8", False)])
def test_a_prompt_in_bfloat16_dequantizes_the_weight_a_large_chunk_at_a_time(mode, double_quant, monkeypatch):
    # what a CPU with AMX or AVX-512 BF16 runs by default; forced here on any CPU
    monkeypatch.setenv("SLI_PROMPT_DTYPE", "bfloat16")
    monkeypatch.setenv("SLI_INT8_MATMUL", "numba")
    monkeypatch.setattr(execution, "PROMPT_CHUNK_BYTES", 256 * 512 * 4)  # float32 pieces of 256 rows
    monkeypatch.setattr(execution, "PROMPT_CHUNK_BYTES_BF16", 512 * 512 * 2)  # bfloat16 chunks of 512 rows
    y, expected, bias, scratch = _a_prompt_s_linear(mode, double_quant, 1100)  # 3 chunks, the last partial
    assert y.dtype == torch.float32 and y.shape == expected.shape
    # bfloat16 rounds x and the weight (8 bits of mantissa): ~0.3% of the product's size, far
    # below 4-bit rounding (~10%); chunks (or their float32 pieces), never the whole weight
    assert ((y - expected).norm() / (expected - bias).norm()).item() < 0.01
    assert not torch.equal(y, expected)
    straight = codec_for(mode).writes_bfloat16  # NF4/FP4: chunks written in bfloat16, no float32 piece
    assert scratch.held(torch.bfloat16) == 512 * 512 and scratch.held(torch.float32) == (0 if straight else 256 * 512)
    q = codec_for(mode).quantize(torch.zeros(1100, 512, dtype=torch.bfloat16), QuantizationConfig(mode=mode))
    assert execution.prompt_scratch_bytes(q) == 512 * 512 * 2 + (0 if straight else 256 * 512 * 4)


@pytest.mark.parametrize("mode", ["none", "int8", "int8_dynamic"])
def test_unquantized_and_int8_prompts_stay_float32_on_any_cpu(mode, monkeypatch):
    # NONE is exactly transformers' product; INT8's error is bfloat16's size: both stay float32
    monkeypatch.setenv("SLI_PROMPT_DTYPE", "bfloat16")
    monkeypatch.setenv("SLI_INT8_MATMUL", "numba")
    weight = (torch.randn(300, 64) * 0.02).to(torch.bfloat16)
    codec = codec_for(mode)
    q = codec.quantize(weight, QuantizationConfig(mode=mode))
    x = torch.randn(40, 64)
    y, expected = execution.linear(q, x), torch.nn.functional.linear(x, codec.dequantize(q, torch.float32))
    if mode == "none":
        assert torch.equal(y, expected)
    torch.testing.assert_close(y, expected, rtol=1e-6, atol=1e-6)


def test_4bit_row_slices_never_split_a_block_or_a_group_of_block_maxima(monkeypatch):
    codec = codec_for("nf4")
    q = codec.prepare(codec.quantize((torch.randn(600, 192) * 0.02).to(torch.bfloat16), QuantizationConfig(mode="nf4")))
    # 3 blocks a row; double-quantized maxima come in groups of 256 blocks
    assert codec.row_slice(q, 0, 100) is not None and codec.row_slice(q, 100, 200) is None
    straddling = codec.quantize((torch.randn(600, 200) * 0.02).to(torch.bfloat16), QuantizationConfig(mode="nf4"))
    assert codec.row_slice(straddling, 0, 256) is None  # 200 % 64: blocks cross rows
    monkeypatch.setattr(execution, "PROMPT_CHUNK_BYTES", 256 * 200 * 4)
    x = torch.randn(30, 200)  # whole-weight path, same product
    torch.testing.assert_close(execution.linear(straddling, x),
                               torch.nn.functional.linear(x, codec.dequantize(straddling, torch.float32)),
                               rtol=1e-5, atol=1e-5)


def test_double_quant_imports_bitsandbytes_without_its_hub_kernel_warning(caplog):
    # On AVX-512 BF16 CPUs, importing bitsandbytes logs that it could not fetch a kernel sli never uses.
    import logging

    from sli.quantization.codecs.four_bit import _bitsandbytes_functional

    _bitsandbytes_functional()
    assert logging.getLogger("bitsandbytes.backends.cpu.ops").getEffectiveLevel() >= logging.ERROR
