"""The fused CPU kernels compute what dequantize-then-``F.linear`` computes (with int8
activations: what it computes on the activations as INT8_DYNAMIC quantizes them)."""
import numpy as np
import pytest
import torch

import sli.kernels as kernels
from sli.quantization import QuantizationConfig, codec_for
from sli.kernels.activations import WIDE
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


def _int8_reference(codec, q, x, bias=None):
    """dequantize-then-F.linear on x quantized as the int8-activation kernels quantize it
    (INT8_DYNAMIC's per-token int8, its KEEP_FLOAT largest |x| kept in float; kept values and INT8's
    outlier columns meet x). NF4/FP4's levels as integers (round(code * LEVEL_SCALE) / LEVEL_SCALE)
    meet x as int16 at WIDE levels a row on a SIMD level (sli.kernels.wide_levels)."""
    dense = codec.dequantize(q, torch.float32)
    weight = dense
    if codec.mode.value in ("nf4", "fp4"):
        q = codec.prepare(q)
        code = q.tensors["_code"]
        weight = torch.empty_like(dense)
        levels = torch.round(code.double() * kernels.LEVEL_SCALE) / kernels.LEVEL_SCALE
        kernels.dequantize_4bit(q.tensors["weight"], codec._absmax(q), levels.float(),
                                int(q.metadata["blocksize"]), weight)
        if kernels.wide_levels():  # int16 activations, one scale a row, nothing kept in float
            amax = x.abs().amax(-1, keepdim=True).clamp(min=1e-8)
            xq = torch.round(x * WIDE / amax) * (amax / WIDE)  # the kernels' float32 operations
            return torch.nn.functional.linear(xq, weight, bias)
    kept = x.abs().topk(min(kernels.KEEP_FLOAT, x.shape[-1] - 1), dim=-1).indices
    keep = torch.zeros_like(x, dtype=torch.bool).scatter_(-1, kept, True)
    xq = codec_for("int8_dynamic").prepare_input(x).masked_fill(keep, 0.0)
    y = torch.nn.functional.linear(xq, weight, bias) + torch.nn.functional.linear(x * keep, dense)
    cols = q.tensors.get("weight.outlier_cols")
    if cols is not None and cols.numel():
        y += (x[..., cols] * ~keep[..., cols] - xq[..., cols]) @ dense[:, cols].t()
    return y


def _expected(codec, q, x, bias=None):
    """The reference for the path the kernels take: int8 activations from 2 rows on (SIMD
    levels; INT8 where in % 64 == 0; INT4; NF4 and FP4 from INT8_LEVELS_ROWS rows), float otherwise."""
    rows = x.numel() // x.shape[-1]
    mode = codec.mode.value
    levels = bool(kernels.INT8_LEVELS_ROWS) and rows >= kernels.INT8_LEVELS_ROWS
    as_int8 = kernels.int8_activations(rows) and (mode == "int4" or (mode in ("nf4", "fp4") and levels)
                                                  or (mode == "int8" and x.shape[-1] % 64 == 0))
    return (_int8_reference if as_int8 else _reference)(codec, q, x, bias)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("rows", [1, 3, kernels.FUSED_MAX_TOKENS])
def test_fused_linear_equals_dequantize_then_linear(mode, rows, monkeypatch):
    # 384 x 1024: enough work to be split across threads
    monkeypatch.setenv("SLI_FLOAT_ACTIVATIONS", "1")  # INT8/INT4 with float activations; int8: below
    codec = codec_for(mode)
    weight = _weight((384, 1024), seed=rows)
    if mode == "int8":
        weight[:, 5] = 9.0  # an outlier column, kept in 16-bit
    q = codec.quantize(weight, QuantizationConfig(mode=mode))
    x = codec.prepare_input(torch.randn(rows, 1024))
    bias = torch.randn(384)
    assert kernels.use_fused(x, 1024)
    fused = codec.fused_linear(codec.prepare(q), x, bias)
    assert fused is not None, f"{mode} has no kernel"
    assert _rel_err(fused, _reference(codec, q, x, bias)) < 1e-5


# (mode, rows): NF4/FP4 take int8 activations from INT8_LEVELS_ROWS (set to 8 below) rows on
_INT8_ACTIVATION_CASES = [(mode, rows) for mode in ("int8", "int4", "nf4", "fp4")
                          for rows in (2, 5, 8, kernels.FUSED_MAX_TOKENS) if mode in ("int8", "int4") or rows >= 8]


@pytest.mark.parametrize("mode, rows", _INT8_ACTIVATION_CASES)
def test_int8_activations_are_int8_dynamic_s_quantization_of_x(mode, rows, monkeypatch):
    # From INT8_ACTIVATION_ROWS rows on (on a SIMD level) INT8 and INT4 multiply int8
    # activations with integer dot products (NF4/FP4 too, their 16 levels as int8, when
    # INT8_LEVELS_ROWS turns it on): exactly INT8_DYNAMIC's quantization of x, and within ~1.5%
    # of the float product on Gaussian activations with an outlier feature. On the plain level
    # (a CPU without AVX2) the activations stay float: the product is the float one.
    if mode in ("nf4", "fp4"):
        monkeypatch.setattr(kernels, "INT8_LEVELS_ROWS", 8)  # off by default (quality), tested on
    codec = codec_for(mode)
    weight = _weight((384, 1024), seed=rows)
    if mode == "int8":
        weight[:, 5] = 9.0  # an outlier column, kept in 16-bit: it meets x itself
    q = codec.prepare(codec.quantize(weight, QuantizationConfig(mode=mode)))
    x = torch.randn(rows, 1024)
    x[:, 7] *= 20  # an outlier feature: kept in float
    bias = torch.randn(384)
    fused = codec.fused_linear(q, x, bias)
    exact = _reference(codec, q, x, bias)
    if not kernels.int8_activations(rows):
        assert _rel_err(fused, exact) < 1e-5
        return
    assert _rel_err(fused, _int8_reference(codec, q, x, bias)) < 1e-5
    assert _rel_err(fused, _expected(codec, q, x, bias)) < 1e-5
    assert float((fused - exact).norm() / exact.norm()) < 1.5e-2
    if mode in ("nf4", "fp4"):  # int16 activations: within the levels' own rounding of the float product
        assert float((fused - exact).norm() / exact.norm()) < 1e-3


def test_int8_dynamic_takes_integer_products_exactly():
    # Its prepare_input put x on the int8 grid: the integer path gives the float path's values.
    codec = codec_for("int8_dynamic")
    q = codec.prepare(codec.quantize(_weight((256, 576)), QuantizationConfig(mode="int8_dynamic")))
    x = torch.randn(64, 576) * torch.rand(64, 1) * 3
    x[:, [3, 77, 200]] *= 30
    x[5] = 0
    x = codec.prepare_input(x)
    on_grid = kernels.matmul_int8(x, q.tensors["weight"], q.tensors["_scale"], activations="on-grid")
    as_float = kernels.matmul_int8(x, q.tensors["weight"], q.tensors["_scale"], activations="float")
    assert _rel_err(on_grid, as_float) < 1e-5


@pytest.mark.parametrize("mode, rows, in_features", [("int8", 17, 1024), ("int8", 40, 1024), ("int8", 40, 200),
                                                      ("int8_dynamic", 17, 576), ("int8_dynamic", 100, 576)])
def test_int8_on_the_matrix_units_takes_the_int8_kernels_values(mode, rows, in_features, monkeypatch):
    # SLI_INT8_MATMUL=torch (the default on AMX): from INT8_MATRIX_ROWS rows on (past a decode
    # batch's 16), also for a prompt's many rows, INT8 weights meet the same int8 activations in
    # torch._int_mm (oneDNN)
    monkeypatch.setenv("SLI_INT8_MATMUL", "torch")
    assert kernels.int8_matrix_rows() == kernels.matrix_units_module.INT8_MATRIX_ROWS <= rows
    codec = codec_for(mode)
    weight = _weight((384, in_features), seed=rows)
    weight[:, 5] = 9.0  # INT8: an outlier column, kept in 16-bit
    q = codec.prepare(codec.quantize(weight, QuantizationConfig(mode=mode)))
    x = torch.randn(rows, in_features)
    x[:, [7, 50, 99, 150]] *= 20  # outlier features, as a model's: kept in float, few distinct columns
    x = codec.prepare_input(x)
    bias = torch.randn(384)
    calls = []
    real = torch._int_mm
    monkeypatch.setattr(torch, "_int_mm", lambda *a: calls.append(a[0].shape) or real(*a))
    y = linear(q, x, bias)  # 40 and 100 rows: past FUSED_MAX_TOKENS, still fused
    assert calls == [(rows, in_features)]
    assert _rel_err(y, _int8_reference(codec, q, x, bias)) < 1e-5
    if mode == "int8_dynamic":  # x on the int8 grid: the product is exact
        assert _rel_err(y, _reference(codec, q, x, bias)) < 1e-5
    monkeypatch.setenv("SLI_INT8_MATMUL", "numba")
    assert kernels.int8_matrix_rows() == 0
    calls.clear()
    linear(q, x[:kernels.FUSED_MAX_TOKENS], bias)
    assert calls == []
    monkeypatch.setenv("SLI_INT8_MATMUL", "torch")
    linear(q, x[:kernels.FUSED_MAX_TOKENS], bias)  # a decode batch stays in sli's kernels
    assert calls == []


@pytest.mark.parametrize("units, rows", [("amx", 17), ("avx512-vnni", 17), ("", 0)])
def test_int8_prompts_take_torch_int_mm_on_a_cpu_with_int8_matrix_instructions(units, rows, monkeypatch):
    monkeypatch.delenv("SLI_INT8_MATMUL")  # the suite pins "numba" (conftest)
    monkeypatch.setattr(kernels.matrix_units_module, "int8_units", lambda: units)
    assert kernels.int8_matrix_rows() == rows
    monkeypatch.setenv("SLI_INT8_MATMUL", "numba")  # the switch that forces the fallback
    assert kernels.int8_matrix_rows() == 0


@pytest.mark.parametrize("pairwise", ["1", "0", ""])
def test_int8_rows_keeping_distinct_features_each_meet_their_own_weight_entries(pairwise, monkeypatch):
    # Each row keeps its own 4 features in float (a random model's prompt: hundreds of distinct
    # columns); in torch._int_mm's path they meet the weight pair by pair (sli's kept_products),
    # or through their gathered columns a bounded block at a time, or as kept_pairwise picks.
    monkeypatch.setenv("SLI_INT8_MATMUL", "torch")
    monkeypatch.setenv("SLI_KEPT_PAIRWISE", pairwise)
    monkeypatch.setattr(kernels.matrix_units_module, "KEPT_COLUMNS_AT_ONCE", 16)
    codec = codec_for("int8")
    q = codec.prepare(codec.quantize(_weight((384, 1024)), QuantizationConfig(mode="int8")))
    rows = 40
    x = torch.randn(rows, 1024)
    x[torch.arange(rows), torch.arange(rows) * 7] = 50.0  # a different strong feature in each row
    y = kernels.matmul_int8(x, q.tensors["weight"], q.tensors["_scale"])
    assert _rel_err(y, _int8_reference(codec, q, x)) < 1e-5


def test_kept_values_go_pair_by_pair_when_they_fall_in_many_distinct_columns():
    pairwise = kernels.matrix_units_module.kept_pairwise
    assert pairwise(pairs=128 * 4, columns=500)  # a random model's prompt: each row its own
    assert not pairwise(pairs=512 * 4, columns=66)  # SmolLM2's: a few dozen


def test_the_cpu_s_matrix_units_choose_the_prompt_dtype(monkeypatch, caplog):
    import logging
    monkeypatch.delenv("SLI_PROMPT_DTYPE")
    has_units = kernels.matrix_units() in ("amx", "avx512-bf16")
    with caplog.at_level(logging.INFO, logger="sli.kernels.matrix_units"):
        monkeypatch.setattr(kernels.matrix_units_module, "_chosen", None)
        assert kernels.prompt_dtype() == (torch.bfloat16 if has_units else torch.float32)
        kernels.prompt_dtype()
    assert len([r for r in caplog.records if "prompt matrix products" in r.getMessage()]) == 1  # logged once
    monkeypatch.setenv("SLI_PROMPT_DTYPE", "float32")
    assert kernels.prompt_dtype() == torch.float32
    monkeypatch.setenv("SLI_PROMPT_DTYPE", "bfloat16")
    assert kernels.prompt_dtype() == torch.bfloat16
    monkeypatch.delenv("SLI_INT8_MATMUL")
    assert bool(kernels.int8_matrix_rows()) == bool(kernels.matrix_units_module.int8_units())
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="sli.kernels.matrix_units"):
        for _ in range(3):  # read on every product: a bad value is said once, the CPU's choice made
            monkeypatch.setenv("SLI_PROMPT_DTYPE", "fp16")
            assert kernels.prompt_dtype() == (torch.bfloat16 if has_units else torch.float32)
            monkeypatch.setenv("SLI_INT8_MATMUL", "onednn")
            assert bool(kernels.int8_matrix_rows()) == bool(kernels.matrix_units_module.int8_units())
            monkeypatch.setenv("SLI_KEPT_PAIRWISE", "yes")
            assert kernels.matrix_units_module.kept_pairwise(pairs=10, columns=2) is True  # the rule: 5*2 >= 10
            assert kernels.matrix_units_module.kept_pairwise(pairs=11, columns=2) is False
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert warnings == ["SLI_PROMPT_DTYPE=fp16 is not one of bfloat16, float32; choosing by the CPU",
                        "SLI_INT8_MATMUL=onednn is not one of torch, numba; choosing by the CPU",
                        "SLI_KEPT_PAIRWISE=yes is not one of 1, 0; choosing by the product's sizes"]


def test_sli_float_activations_keeps_float_activations(monkeypatch):
    assert kernels.int8_activations(1) == (kernels.simd_path() != "plain")
    monkeypatch.setenv("SLI_FLOAT_ACTIVATIONS", "1")
    assert not kernels.int8_activations(1) and not kernels.int8_activations(kernels.FUSED_MAX_TOKENS)


@pytest.mark.parametrize("mode", ["int8", "int8_dynamic", "int4", "nf4", "fp4", "none"])
def test_a_row_gets_the_same_values_alone_and_in_a_batch(mode, monkeypatch):
    # A server's decode batch gives each sequence the tokens it gets alone: integer products,
    # and bfloat16 (NONE, the unquantized head) one row a pass. (FP8 sums a pass of 1, 2 or
    # more rows in 4, 2 or 1 chains: the last bit differs.)
    monkeypatch.delenv("SLI_INT8_MATMUL", raising=False)  # the CPU's own choice (AMX tiles where present)
    codec = codec_for(mode)
    g = torch.Generator().manual_seed(1)
    q = codec.prepare(codec.quantize((torch.randn(96, 1024, generator=g) * 0.02).to(torch.bfloat16),
                                     QuantizationConfig(mode=mode)))
    batch = codec.prepare_input(torch.randn(kernels.FUSED_MAX_TOKENS, 1024, generator=g))
    together = linear(q, batch, None)
    for rows in (1, 3, 8):
        assert torch.equal(linear(q, batch[:rows], None), together[:rows]), rows


@pytest.mark.parametrize("mode", MODES)
def test_linear_keeps_leading_dimensions(mode):
    codec = codec_for(mode)
    q = codec.quantize(_weight((96, 128)), QuantizationConfig(mode=mode))
    x = codec.prepare_input(torch.randn(2, 3, 128))
    y = linear(q, x)
    assert y.shape == (2, 3, 96)
    assert _rel_err(y, _expected(codec, q, x)) < 1e-5


def test_4bit_weights_whose_rows_straddle_blocks_are_dequantized_instead():
    codec = codec_for("nf4")
    q = codec.quantize(_weight((50, 200)), QuantizationConfig(mode="nf4"))  # 200 % 64 != 0
    x = torch.randn(1, 200)
    assert codec.fused_linear(codec.prepare(q), x, None) is None
    torch.testing.assert_close(linear(q, x), _reference(codec, q, x), rtol=0, atol=0)


def test_int4_pads_inputs_to_its_group_size():
    codec = codec_for("int4")
    q = codec.quantize(_weight((40, 200)), QuantizationConfig(mode="int4"))  # padded to 256
    for rows in (1, 2):
        x = torch.randn(rows, 200)
        assert _rel_err(codec.fused_linear(codec.prepare(q), x, None), _expected(codec, q, x)) < 1e-5


@pytest.mark.parametrize("group, width", [(64, 576), (192, 576), (64, 512)])
@pytest.mark.parametrize("rows", [1, 5])
def test_int4_groups_of_64s_take_the_int8_kernel_as_groups_of_128_do(group, width, rows):
    # 576 = 4.5 x 128, SmolLM2's width: groups of 64 and of 192 divide it (4.25 bits a weight, no
    # padding). Groups of 64 are read two a step, in 576 the last one alone; groups of 192 64 values a step
    codec = codec_for("int4")
    q = codec.prepare(codec.quantize(_weight((96, width)), QuantizationConfig(mode="int4", group_size=group)))
    x = torch.randn(rows, width)
    x[:, 7] *= 20  # an outlier feature: kept in float
    fused = codec.fused_linear(q, x, None)
    # int8 activations on a SIMD level (the float product is ~1% off)
    assert _rel_err(fused, _expected(codec, q, x)) < 1e-5
    if rows > 1:  # a row alone = the same row in a batch
        assert torch.equal(codec.fused_linear(q, x[:1], None), fused[:1])


@pytest.mark.parametrize("rows", [1, 5])
def test_int4_kernels_read_the_stored_scales_and_zeros_so_a_loaded_weight_holds_nothing_more(rows, monkeypatch):
    codec = codec_for("int4")
    w = _weight((64, 256)).float()
    w[:8] *= 1e-3  # these rows' group scales are float16 subnormals
    q = codec.quantize(w, QuantizationConfig(mode="int4"))
    assert (q.tensors["weight.scales"][:8].float() < 2 ** -14).all()
    prepared = codec.prepare(q)
    assert prepared.tensors.keys() == q.tensors.keys()  # no float32 copies of the scales and zeros
    x = torch.randn(rows, 256)
    y = linear(prepared, x)
    expected = _expected(codec, q, x)
    with monkeypatch.context() as m:
        m.setattr(kernels, "kernels_enabled", lambda: False)  # dequantized by torch's ops, float16 read by torch
        torch_expected = _expected(codec, q, x)
    assert torch.equal(expected, torch_expected)  # the dequantize kernel's weight is torch's, bit for bit
    assert _rel_err(y, expected) < 1e-5
    with pytest.raises(TypeError, match="float16 scales and uint8 zeros"):
        kernels.matmul_int4(x, q.tensors["weight"], q.tensors["weight.scales"].float(), q.tensors["weight.zeros"],
                            64, 256)


@pytest.mark.parametrize("cols, xblock, sumblock, keep, wide", [
    (204, 204, 68, 0, False),  # one scale a row, its block sums taken as it rounds; 204: a tail past the 8s
    (204, 204, 68, 0, True),  # NF4/FP4's int16 form
    (576, 576, 64, 4, False),  # a token's INT4 form: four kept in float
    (576, 64, 192, 0, False),  # scales a block of 64, sums a block of 192: sums in a pass of their own
    (576, 192, 64, 2, False),
])
def test_quantize_rows_rounds_as_int8_dynamic_and_sums_what_it_stored(cols, xblock, sumblock, keep, wide):
    g = torch.Generator().manual_seed(cols + keep)
    x = torch.randn(3, cols, generator=g)
    x[:, [5, cols - 1]] *= 40  # strong features, as a trained model's (the last in the tail)
    xq, xs, corr, bsum, oidx, oval = kernels._quantized(x.numpy(), xblock, keep, sumblock,
                                                         kernels.quantized_buffers(3, cols, xblock, keep, sumblock, wide))
    limit = WIDE if wide else 127
    top = x.abs().topk(keep, dim=-1).indices if keep else torch.zeros(3, 0, dtype=torch.long)
    rest = x.scatter(-1, top, 0.0)
    amax = rest.view(3, -1, xblock).abs().amax(-1, keepdim=True).clamp(min=1e-8)
    expected = torch.round(rest.view(3, -1, xblock) * limit / amax).view(3, cols)
    assert np.array_equal(xq.reshape(3, cols), expected.numpy())
    assert np.array_equal(xs, (amax / limit).flatten().numpy())
    assert np.array_equal(bsum, expected.view(3, -1, sumblock).sum(-1).flatten().numpy())
    assert np.array_equal(oidx, top.numpy()) and np.array_equal(oval, x.gather(-1, top).numpy())
    blocks = expected.view(3, -1, xblock).sum(-1) * (amax / limit).squeeze(-1)
    np.testing.assert_allclose(corr, 128 * blocks.sum(-1).numpy(), rtol=1e-5)


@pytest.mark.parametrize("keep", [2, 4])
@pytest.mark.parametrize("cols", [1024, 4096])  # short rows (four weight rows a pass) and long (one, on Zen 4)
@pytest.mark.parametrize("rows", [1, 3])
def test_int4_products_add_the_values_kept_in_float_on_short_and_long_rows(keep, cols, rows, monkeypatch):
    monkeypatch.setattr(kernels, "KEEP_FLOAT", keep)
    monkeypatch.setattr(type(codec_for("int8_dynamic")), "outliers_per_token", keep)  # the reference's rounding
    codec = codec_for("int4")
    q = codec.quantize(_weight((64, cols)), QuantizationConfig(mode="int4"))
    x = torch.randn(rows, cols)
    x[:, 7], x[:, cols - 3] = 40.0, -30.0  # outliers: int8 at one scale a row would flatten the rest
    y = linear(codec.prepare(q), x)
    assert _rel_err(y, _expected(codec, q, x)) < 1e-5


@pytest.mark.parametrize("rows", [1, 5])
def test_int4_groups_the_simd_helpers_do_not_step_in_take_the_plain_loops(rows):
    codec = codec_for("int4")
    q = codec.prepare(codec.quantize(_weight((48, 256)), QuantizationConfig(mode="int4", group_size=32)))
    x = torch.randn(rows, 256)
    assert _rel_err(codec.fused_linear(q, x, None), _reference(codec, q, x)) < 1e-5


def test_prompts_go_to_blas():
    x = torch.randn(kernels.FUSED_MAX_TOKENS + 1, 64)
    assert not kernels.use_fused(x, 64)
    assert not kernels.use_fused(torch.randn(1, 64, dtype=torch.bfloat16), 64)


def test_a_decode_pass_holds_torch_to_one_thread_and_the_kernels_to_all(monkeypatch):
    # torch's OpenMP workers spin after its ops on the cores the kernels' threads need
    from sli.kernels import dispatch
    monkeypatch.setattr(dispatch, "INLINE_WORK", 0)  # split even a small product across threads
    torch.set_num_threads(2)
    codec = codec_for("nf4")
    q = codec.prepare(codec.quantize(_weight((256, 128)), QuantizationConfig(mode="nf4")))
    x = torch.randn(1, 128)
    seen = []
    real = dispatch.ThreadPoolExecutor.submit
    monkeypatch.setattr(dispatch.ThreadPoolExecutor, "submit",
                        lambda pool, *a, **k: seen.append(torch.get_num_threads()) or real(pool, *a, **k))
    with kernels.fused_pass(1, torch.device("cpu")):
        assert torch.get_num_threads() == 1
        y = linear(q, x)
        with kernels.fused_pass(4, torch.device("cpu")):  # nested: no change
            assert torch.get_num_threads() == 1
    assert seen == [1]  # the second share went to the pool while torch had one thread
    assert torch.get_num_threads() == 2 and dispatch._threads() == 2
    assert _rel_err(y, _expected(codec, q, x)) < 1e-5
    with kernels.fused_pass(kernels.FUSED_MAX_TOKENS + 1, torch.device("cpu")):  # a prompt: torch's BLAS
        assert torch.get_num_threads() == 2
    with kernels.fused_pass(32, torch.device("cpu"), max_rows=32):  # a short prompt its codec keeps fused
        assert torch.get_num_threads() == 1
    with kernels.fused_pass(33, torch.device("cpu"), max_rows=32):
        assert torch.get_num_threads() == 2
    with monkeypatch.context() as patch:  # the plain level's kernels keep to a token pass's rows
        patch.setattr(kernels, "simd_path", lambda: "plain")
        with kernels.fused_pass(32, torch.device("cpu"), max_rows=32):
            assert torch.get_num_threads() == 2
    with kernels.fused_pass(1, torch.device("cpu"), context=kernels.FUSED_PASS_MAX_CONTEXT):  # a long context:
        assert torch.get_num_threads() == 2  # reading its keys and values and attending want the threads
    with pytest.raises(RuntimeError):
        with kernels.fused_pass(1, torch.device("cpu")):
            raise RuntimeError("a failed pass")
    assert torch.get_num_threads() == 2 and dispatch._kernel_threads is None


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


def test_fp8_kernel_decodes_every_float8_byte_exactly():
    # The kernel decodes e4m3 bytes by arithmetic (exponent shift, subnormals, NaN), not a table.
    from sli.kernels.plain import e4m3_values
    lut = torch.arange(256, dtype=torch.int32).to(torch.uint8).view(torch.float8_e4m3fn).float()
    table = torch.from_numpy(e4m3_values())
    assert torch.equal(lut.isnan(), table.isnan()) and torch.equal(lut[~lut.isnan()], table[~table.isnan()])
    every = torch.arange(256, dtype=torch.int32).to(torch.uint8)
    every = every[(every & 0x7F) != 0x7F].repeat(2)[:448]  # no NaN: a product with NaN is NaN
    q = every.view(7, 64).contiguous().view(torch.float8_e4m3fn)
    x = torch.eye(64)  # row j picks weight column j
    assert torch.equal(kernels.matmul_fp8(x, q, torch.ones(7)), q.float().t())


@pytest.mark.parametrize("double_quant", [False, True])
def test_4bit_kernel_reads_plain_and_double_quantized_block_maxima(double_quant):
    codec = codec_for("nf4")
    config = QuantizationConfig(mode="nf4", double_quant=double_quant, compress_statistics=double_quant)
    q = codec.quantize(_weight((320, 1024), seed=4), config)
    assert ("weight.nested_absmax" in q.tensors) == double_quant
    x = torch.randn(2, 1024)
    assert _rel_err(codec.fused_linear(codec.prepare(q), x, None), _expected(codec, q, x)) < 1e-5


def test_4bit_rows_that_straddle_groups_of_double_quantized_block_maxima():
    # 2560 values = 40 blocks a row; a group of 256 block maxima ends inside rows 6, 12, ...
    codec = codec_for("nf4")
    q = codec.quantize(_weight((64, 2560), seed=5), QuantizationConfig(mode="nf4"))
    assert "weight.nested_absmax" in q.tensors
    for rows in (1, 6):
        x = torch.randn(rows, 2560)
        assert _rel_err(codec.fused_linear(codec.prepare(q), x, None), _expected(codec, q, x)) < 1e-5


@pytest.mark.parametrize("mode", ["nf4", "fp4"])
def test_double_quantized_block_maxima_are_decoded_once_when_a_weight_is_prepared(mode):
    # the product reads float32 maxima: looking the 8-bit ones up in its loop cost NF4 1.4-1.8x
    from sli.quantization.codecs.four_bit_quantizer import dequantize_blockwise_torch

    codec = codec_for(mode)
    q = codec.quantize(_weight((9, 2560), seed=3), QuantizationConfig(mode=mode))
    t = q.tensors
    assert t["weight.absmax"].dtype == torch.uint8  # stored 8-bit
    decoded = dequantize_blockwise_torch(t["weight.absmax"], t["weight.nested_absmax"], t["weight.nested_quant_map"],
                                         256) + q.metadata["nested_offset"]
    prepared = codec.prepare(q).tensors["_absmax"]
    assert prepared.dtype == torch.float32 and _rel_err(prepared, decoded) < 1e-6
    for rows in (1, 3, 6):
        x = torch.randn(rows, 2560)
        y = codec.fused_linear(codec.prepare(q), x, None)
        assert torch.equal(y, kernels.matmul_4bit(x, t["weight"], prepared, t["weight.quant_map"], 64, 9))
        assert _rel_err(y, _expected(codec, q, x)) < 1e-5


@pytest.mark.parametrize("blocksize", [64, 256, 300])  # fewer values than the code's levels, as many, more
def test_blockwise_8bit_values_are_decoded_by_their_block_into_the_buffer_given(blocksize):
    from sli.quantization.codecs.four_bit_quantizer import dequantize_blockwise_torch

    g = torch.Generator().manual_seed(4)
    q = torch.randint(0, 256, (1000,), dtype=torch.uint8, generator=g)  # a last block shorter than the rest
    absmax, code = torch.rand(-(-1000 // blocksize), generator=g), torch.randn(256, generator=g)
    out = torch.full((1000,), float("nan"))
    got = kernels.dequantize_blockwise8(q, absmax, code, blocksize, offset=0.25, out=out)
    assert got.data_ptr() == out.data_ptr()
    assert _rel_err(got, dequantize_blockwise_torch(q, absmax, code, blocksize) + 0.25) < 1e-6


@pytest.mark.parametrize("block_size", [128, 256])
@pytest.mark.parametrize("rows", [1, 5])
def test_4bit_kernel_walks_blocks_larger_than_its_64_value_step(block_size, rows):
    codec = codec_for("fp4")
    config = QuantizationConfig(mode="fp4", block_size=block_size)
    q = codec.quantize(_weight((96, 1024), seed=block_size), config)
    x = torch.randn(rows, 1024)
    assert _rel_err(codec.fused_linear(codec.prepare(q), x, None), _expected(codec, q, x)) < 1e-5


@pytest.mark.parametrize("blocksize", [32, 64, 128])
def test_plain_integer_levels_scale_each_block_by_its_own_maximum(blocksize):
    # the plain level's dot4l (the interface every SIMD level implements): each block of 32
    # values or more meets its own scale, whether a 64-value step holds two blocks or one
    import numpy as np
    from sli.kernels import plain
    g = np.random.default_rng(blocksize)
    rows, cols = 3, 256
    codes = g.integers(0, 16, (rows, cols))
    packed = ((codes[:, 0::2] << 4) | codes[:, 1::2]).astype(np.uint8).reshape(-1)
    levels = kernels.split_levels(np.linspace(-1, 1, 16).astype(np.float32))
    whole = 64 * levels[:16].astype(np.int64) + levels[16:]
    scales = g.random(rows * cols // blocksize).astype(np.float32)
    x = g.integers(-127, 128, cols)
    xq = np.empty(cols, np.int8)  # each 64 values: the 32 even ones, then the 32 odd ones
    for c in range(0, cols, 64):
        xq[c:c + 32], xq[c + 32:c + 64] = x[c:c + 64:2], x[c + 1:c + 64:2]
    out = np.empty(1, np.float32)
    for row in range(rows):
        plain.dot4l(packed, row * cols // 2, levels, scales, row * cols // blocksize, blocksize, xq, 0, 1, cols, out)
        sums = (whole[codes[row]] * x).reshape(-1, blocksize).sum(-1)
        expected = float((scales[row * cols // blocksize:][:cols // blocksize] * sums).sum())
        assert out[0] == pytest.approx(expected, rel=1e-5)


_LEVEL_CHECK = """
import sys, torch, bitsandbytes.functional as bnbf
from sli import kernels
from sli.quantization import QuantizationConfig, codec_for
sys.path.insert(0, sys.argv[2])
from test_kernels import _expected
assert kernels.simd_path() == sys.argv[1], kernels.simd_path()
from sli.kernels import dispatch
torch.set_num_threads(2)
dispatch.TEAM_WORK = 0  # every product the team runs goes to it: its arguments on this level
kernels.INT8_LEVELS_ROWS = 8  # NF4/FP4's int8 levels: off by default (quality), tested on each level
g = torch.Generator().manual_seed(0)
w = torch.randn(96, 1024, generator=g) * 0.02
codec = codec_for("nf4")
q = codec.prepare(codec.quantize(w, QuantizationConfig(mode="nf4")))
packed, state = bnbf.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=True)
assert (codec.dequantize(q, torch.float32) - bnbf.dequantize_4bit(packed, state)).abs().max() <= 1e-7
for mode, blocks in (("none", 64), ("int8", 64), ("int8_dynamic", 64), ("nf4", 64), ("fp4", 64), ("int4", 128),
                     ("fp8", 64), ("nf4", 32), ("fp4", 32),  # 4-bit blocks of 32: two scales a 64-value step
                     ("int4", 64), ("int4", 192)):  # INT4 groups of 64: two a step (1024, 200 padded to
    # 256, 2560), a last one alone where 128 does not divide the row (576); groups of 192: 64 values a step
    codec = codec_for(mode)
    sized = {"group_size": blocks} if mode == "int4" else {"block_size": blocks}
    # 200: a tail after the last 64 values, int4 padding; 2560: rows straddling 4-bit groups of 256 block maxima;
    for shape in ((96, 1024), (40, 200), (24, 2560), (19, 576)):  # 576: 4 pairs of 4-bit blocks and one more;
        # 19 rows: INT8's one-row passes of 4 weight rows and 3 after them, its several-row passes of 2 and 1 after
        w = torch.randn(*shape, generator=g) * 0.02
        q = codec.prepare(codec.quantize(w.to(torch.bfloat16), QuantizationConfig(mode=mode, **sized)))
        for rows in (1, 2, 3, 4, 5, 6, 7, 8, 16):  # every pass size up to MAX_ROWS (8 on AVX-512)
            x = codec.prepare_input(torch.randn(rows, shape[1], generator=g))
            y = codec.fused_linear(q, x, None)
            if y is None:  # dequantize-then-linear takes them: rows of a partial 64-value step; blocks of
                # 32 in float activations (below INT8_LEVELS_ROWS rows, or the plain level's int8 ones)
                assert mode in ("nf4", "fp4") and (shape[1] % 64 or blocks == 32 and (
                    rows < kernels.INT8_LEVELS_ROWS or not kernels.int8_activations(rows))), (mode, blocks, shape, rows)
                continue
            assert kernels.int8_activations(rows) == (sys.argv[1] != "plain")
            ref = _expected(codec, q, x)
            err = float((y - ref).abs().max() / ref.abs().max())
            assert err < 1e-5, (mode, blocks, shape, rows, err)
            invariant = mode == "none" or (mode in ("int8", "int4") and sys.argv[1] != "plain")  # int8 activations
            if invariant and rows > 1 and shape[1] % 64 == 0:  # a row alone = the same row in a batch
                assert torch.equal(codec.fused_linear(q, x[:1], None), y[:1]), (mode, shape, rows)
# INT4's largest products: nibbles of 15 by activations of +-127 in every group (AVX2 adds a
# step's pairs as int16 words before widening them, Emit.dot_bytes_sum): exact, none saturated
codec = codec_for("int4")
w = torch.ones(8, 1024)
w[:, ::128] = -1.0  # each group's one minimum: the other 127 values quantize to 15
q = codec.prepare(codec.quantize(w.to(torch.bfloat16), QuantizationConfig(mode="int4")))
assert int((q.tensors["weight"] == 0xFF).sum()) > 8 * 1024 // 2 * 0.9
for sign in (1.0, -1.0):
    x = codec.prepare_input(torch.full((1, 1024), sign))
    ref = _expected(codec, q, x)
    assert float((codec.fused_linear(q, x, None) - ref).abs().max() / ref.abs().max()) < 1e-5, sign
sys.path.insert(0, sys.argv[2])
from test_attention import check_decode_attention  # the decode attention kernel on this level too
check_decode_attention()
assert dispatch.team() is not None
print("path ok", kernels.simd_path())
"""


# numba compiling for an AVX2-only CPU (sli.kernels.simd.host_levels): 16 registers, no AVX-512
AVX2_ONLY = {"NUMBA_CPU_NAME": "haswell", "NUMBA_CPU_FEATURES": "+avx,+avx2,+fma,+f16c"}


def _levels():
    try:
        from sli.kernels import simd
        levels = list(simd.host_levels())
    except Exception:
        return ["plain"]
    return levels + ["plain"] + (["avx2-only"] if "avx2" in levels else [])


@pytest.mark.parametrize("level", _levels())  # every level this CPU runs (plain always)
def test_each_simd_level_gives_the_values_of_dequantize_then_linear(level):
    # SLI_SIMD forces a level (SLI_SIMD=plain is the path of a CPU without AVX2); a fresh
    # process each, as the kernels are compiled once per process. "avx2-only": the AVX2 level
    # as compiled for a CPU without AVX-512 (on an AVX-512 CPU SLI_SIMD=avx2 alone keeps its
    # 32 registers).
    import os
    import subprocess
    import sys
    env = dict(os.environ, **(AVX2_ONLY if level == "avx2-only" else {}))
    level = "avx2" if level == "avx2-only" else level
    env["SLI_SIMD"] = level
    env.pop("SLI_NO_SIMD", None)
    here = os.path.dirname(os.path.abspath(__file__))
    done = subprocess.run([sys.executable, "-c", _LEVEL_CHECK, level, here], env=env, capture_output=True, text=True,
                          timeout=900)
    assert done.returncode == 0, done.stderr[-2000:]
    assert f"path ok {level}" in done.stdout


@pytest.mark.parametrize("level", [lv for lv in _levels() if lv != "avx2-only"])
def test_the_kernels_read_a_float16_scale_as_its_exact_value(level):
    # numba has no float16 arrays: INT4's stored scales reach the kernels as int16 bits, decoded
    # by integer operations on the plain level and by F16C's vcvtph2ps on the SIMD levels
    from numba import njit
    from sli.kernels import plain, simd
    half_value = plain.half_value if level == "plain" else simd.helpers(level).half_value

    @njit
    def decode(bits, out):
        for i in range(bits.shape[0]):
            out[i] = half_value(bits[i])

    bits = np.arange(65536, dtype=np.uint16)
    want = bits.view(np.float16).astype(np.float32)
    got = np.empty(65536, np.float32)
    decode(bits.view(np.int16), got)
    numbers = ~np.isnan(want)  # zeros of both signs, subnormals, normals, infinities
    assert np.array_equal(got[numbers], want[numbers])
    assert np.array_equal(np.signbit(got[numbers]), np.signbit(want[numbers]))
    assert np.isnan(got[~numbers]).all()


def test_numba_compiling_for_another_cpu_takes_the_levels_its_features_list(monkeypatch):
    from sli.kernels import simd
    host = simd.host_levels()
    monkeypatch.setenv("NUMBA_CPU_NAME", "haswell")
    monkeypatch.delenv("NUMBA_CPU_FEATURES", raising=False)
    assert simd.host_levels() == ()  # features not listed: none assumed
    monkeypatch.setenv("NUMBA_CPU_FEATURES", AVX2_ONLY["NUMBA_CPU_FEATURES"])
    assert simd.host_levels() == tuple(level for level in host if level == "avx2")
    monkeypatch.setenv("NUMBA_CPU_FEATURES", "+avx2,-fma")
    assert simd.host_levels() == ()
    monkeypatch.setenv("NUMBA_CPU_NAME", "host")
    assert simd.host_levels() == host


def test_sli_no_simd_takes_the_plain_kernels():
    import os
    import subprocess
    import sys
    env = dict(os.environ, SLI_NO_SIMD="1", SLI_SIMD="avx512")
    code = "from sli import kernels; print('path', kernels.simd_path())"
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "path plain" in done.stdout


_TOKEN_PASSES = """
import sys, torch
from sli import kernels
from sli.kernels import dispatch
from sli.quantization import QuantizationConfig, codec_for
assert kernels.simd_path() == sys.argv[1], kernels.simd_path()
print("row passes", dispatch.simd_helpers().row_passes)
torch.set_num_threads(2)
g = torch.Generator().manual_seed(0)
out = []
# 576: 9 int8 registers a row on AVX-512 (two units of 4 chains and one more), 4 NF4 steps of 128
# and one of 64; 4160: 65 registers; 37 rows: not a multiple of 4
for rows, cols in ((64, 576), (37, 1024), (40, 4160), (6, 256)):
    q = torch.randint(-127, 128, (rows, cols), dtype=torch.int8, generator=g)
    scale = torch.rand(rows, generator=g) * 0.01
    x = torch.randn(1, cols, generator=g) * 3
    out.append(kernels.matmul_int8(x, q, scale, activations="int8"))
    # INT4: groups of 128 (576, 4160 padded), 64 (pairs, a last one alone at 576) and 192 (64 a step)
    for mode, blocks in (("nf4", 64), ("fp4", 64), ("nf4", 32), ("int4", 128), ("int4", 64), ("int4", 192)):
        codec = codec_for(mode)
        sized = {"group_size": blocks} if mode == "int4" else {"block_size": blocks}
        w = codec.prepare(codec.quantize(torch.randn(rows, cols, generator=g) * 0.02,
                                         QuantizationConfig(mode=mode, **sized)))
        out.append(codec.fused_linear(w, codec.prepare_input(x), None))
torch.save(out, sys.argv[2])
"""


@pytest.mark.parametrize("level", [lv for lv in _levels() if lv not in ("plain", "avx2-only")])
def test_a_tokens_product_a_row_a_pass_gives_the_bits_of_four_rows_a_pass(level, tmp_path):
    # SLI_TOKEN_PASS_ROWS=1|4 forces how a token's INT8, NF4/FP4 and INT4 products walk the weight
    # (by default a row a pass on AMD Zen 4, four elsewhere): the same sums either way, so the same bits
    import os
    import subprocess
    import sys
    results = {}
    for passes in ("1", "4"):
        env = dict(os.environ, SLI_SIMD=level, SLI_TOKEN_PASS_ROWS=passes)
        env.pop("SLI_NO_SIMD", None)
        path = tmp_path / f"{passes}.pt"
        done = subprocess.run([sys.executable, "-c", _TOKEN_PASSES, level, str(path)], env=env, capture_output=True,
                              text=True, timeout=900)
        assert done.returncode == 0, done.stderr[-2000:]
        assert f"row passes {passes == '1'}" in done.stdout
        results[passes] = torch.load(path)
    assert len(results["1"]) == 28
    for row, rows in zip(results["1"], results["4"]):
        assert torch.equal(row, rows)
    g = torch.Generator().manual_seed(0)  # and they are the product (the int8 activations' rounding apart)
    q = torch.randint(-127, 128, (64, 576), dtype=torch.int8, generator=g)
    scale = torch.rand(64, generator=g) * 0.01
    x = torch.randn(1, 576, generator=g) * 3
    ref = torch.nn.functional.linear(x, q.float() * scale[:, None])
    assert float((results["1"][0] - ref).abs().max()) < 0.02 * float(ref.abs().max())


def test_a_token_takes_one_row_a_pass_on_zen_4_and_later_and_four_elsewhere(monkeypatch):
    # measured from RAM (docs/benchmarks.md): one stream a thread is faster on Zen 4, prefetched
    # four-row passes on Zen 3 and on the Intel Xeons
    from sli.kernels import simd

    monkeypatch.delenv("SLI_TOKEN_PASS_ROWS", raising=False)
    for name, rows in [("znver4", 1), ("znver5", 1), ("znver3", 4), ("znver2", 4), ("znver", 4),
                       ("sapphirerapids", 4), ("skylake-avx512", 4), ("generic", 4)]:
        monkeypatch.setattr(simd.binding, "get_host_cpu_name", lambda: name)
        assert simd.token_pass_rows() == rows, name
    monkeypatch.setenv("SLI_TOKEN_PASS_ROWS", "1")  # forced, whatever the CPU
    assert simd.token_pass_rows() == 1


def test_compiled_code_over_the_kernels_is_cached_apart_for_each_helpers_variant():
    # the team's and the one-call decode step's compiled code hold one variant's kernels (a
    # token's products a weight row a pass, "+row", or four): numba's on-disk cache keys them by
    # id, so another variant (SLI_TOKEN_PASS_ROWS) must get other ids, not load this one's code
    from sli.kernels import dispatch, layer_step, team

    table, level = dispatch.table(), dispatch.simd_path()
    ids = {}
    for variant in ("", "+row"):
        built = team.build(table, level, variant)
        step = layer_step.build(table, built["lead"], level, variant)
        held = [c.cell_contents._uuid for c in step.py_func.__closure__ if hasattr(c.cell_contents, "_set_uuid")]
        ids[variant] = {built["lead"]._uuid} | {u for u in held if u.startswith("sli:layer_step.")}
        assert team.build(table, level, variant) is built  # built once a process, for each variant
    assert len(ids[""]) == len(ids["+row"]) == 3  # the lead, the step's product and quantize
    assert ids[""].isdisjoint(ids["+row"])


_SIMD_BUILD_FAILS = """
import logging, sys, torch
sys.modules["sli.kernels.simd"] = None  # as if numba's internals moved: importing the intrinsics fails
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
    import os
    import subprocess
    import sys
    env = {k: v for k, v in os.environ.items() if k not in ("SLI_SIMD", "SLI_NO_SIMD")}  # the guarded import runs
    done = subprocess.run([sys.executable, "-c", _SIMD_BUILD_FAILS], env=env, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "path plain" in done.stdout
    assert "SIMD helpers cannot be built" in done.stderr


@pytest.mark.parametrize("mode", ["nf4", "fp4"])
@pytest.mark.parametrize("shape", [(96, 1024), (3, 100)])  # (3, 100): a last block of 44 values
def test_4bit_dequantizes_straight_into_bfloat16_as_the_float32_cast_rounds(mode, shape):
    codec = codec_for(mode)
    q = codec.prepare(codec.quantize(_weight(shape, seed=4), QuantizationConfig(mode=mode)))
    out = torch.empty(shape, dtype=torch.bfloat16)
    codec.dequantize(q, torch.bfloat16, out=out)
    assert torch.equal(out.view(torch.int16), codec.dequantize(q, torch.float32).to(torch.bfloat16).view(torch.int16))


def test_a_4bit_prompt_in_bfloat16_gives_the_float32_pieces_bits(monkeypatch):
    # a prompt's weight chunks dequantized straight into bfloat16 (writes_bfloat16), or float32
    # pieces cast: the same product
    from sli.quantization.execution import linear

    monkeypatch.setenv("SLI_PROMPT_DTYPE", "bfloat16")
    codec = codec_for("nf4")
    q = codec.prepare(codec.quantize(_weight((600, 512), seed=5), QuantizationConfig(mode="nf4")))
    x = torch.randn(40, 512)
    straight = linear(q, x)
    monkeypatch.setattr(type(codec), "writes_bfloat16", False)
    assert torch.equal(straight, linear(q, x))
