"""GPTQ (sli.quantization.gptq) and streamed calibration (sli.calibration)."""
import dataclasses
import importlib
import json

import pytest
import torch

from sli import UniversalSLIProcessor
from sli import kernels as kernels_module
from sli.errors import SLIError
from sli.quantization import (LayerQuantizer, QuantizationConfig, QuantizedLinear, codec_for, get_int8_config,
                              get_mixed_precision_config)
from sli.quantization import gptq as gptq_module
from sli.quantization.gptq import Hessian, gptq_quantize, layer_output_error

FOUR_BIT = ["int4", "nf4", "fp4"]


def _problem(rows=128, cols=256, tokens=1024, seed=0):
    """A weight and inputs with correlated features and a few outlier channels (as LLM activations have)."""
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(cols, cols, generator=g) / cols ** 0.5
    x = torch.randn(tokens, cols, generator=g) @ mix + 0.1 * torch.randn(tokens, cols, generator=g)
    x[:, :4] *= 8
    weight = (0.02 * torch.randn(rows, cols, generator=g)).to(torch.bfloat16)
    hessian = Hessian(cols)
    hessian.add(x)
    return weight, x, hessian.matrix


# -- the solver -------------------------------------------------------------------------------

@pytest.mark.parametrize("mode", FOUR_BIT)
def test_gptq_output_error_is_lower_than_rtn_in_the_same_layout(mode):
    weight, x, H = _problem()
    rtn = codec_for(mode).quantize(weight, QuantizationConfig(mode=mode))
    for options in ({}, {"gptq_act_order": False, "gptq_scale_search": False}):
        q = gptq_quantize({"w": weight}, H, QuantizationConfig(mode=mode, method="gptq", **options))["w"]
        # the codec's own layout: same tensors, shapes and dtypes (the quant state is JSON), same metadata keys
        def layout(qt):
            return {k: (v.dtype, None if "quant_state" in k else v.shape) for k, v in qt.tensors.items()}

        assert layout(q) == layout(rtn)
        assert q.metadata.keys() == rtn.metadata.keys() and q.metadata["dtype"] == "bfloat16"
        assert layer_output_error(x, weight, q) < 0.6 * layer_output_error(x, weight, rtn), options


@pytest.mark.parametrize("mode, blocks", [("int4", 64), ("nf4", 64), ("fp4", 64), ("nf4", 32)])
def test_gptq_bytes_are_what_the_codec_and_its_kernels_read(mode, blocks):
    weight, x, H = _problem(rows=96, cols=512, seed=1)
    config = QuantizationConfig(mode=mode, method="gptq", block_size=blocks)
    q = gptq_quantize({"w": weight}, H, config)["w"]
    codec = codec_for(mode)
    dense = codec.dequantize(q, torch.float32)
    # codes are exactly the solve's: coding the dequantized weight on the same scales gives the same bytes
    if mode == "int4":
        again = codec.quantize_with(dense, config, q.tensors["weight.scales"], q.tensors["weight.zeros"])
    else:
        grid = gptq_module._Grid(config, weight.float(), torch.ones(weight.shape[1]))
        absmax = codec.decoded_absmax({k: v for k, v in q.tensors.items() if k != "weight"},
                                      json.loads(bytes(q.tensors[f"weight.quant_state.bitsandbytes__{mode}"].tolist())))
        again = codec.quantize_with(dense, config, absmax)
        assert grid.col_scale.shape == (96, 512 // blocks)
    assert torch.equal(again.tensors["weight"], q.tensors["weight"])
    # the fused kernels (a token, a short prompt) and the row-chunk / dequantize path (a longer
    # prompt) compute dequantize-then-linear (INT4's fused kernels through int8 activations: 2%)
    module = QuantizedLinear.from_quantized(q, None, torch.float32)
    for rows, tolerance in ((1, 2e-2), (4, 2e-2), (40, 2e-2), (codec.fused_max_rows + 1, 1e-5)):
        xs = x[:rows]
        ref = torch.nn.functional.linear(xs, dense)
        assert float((module(xs) - ref).abs().max() / ref.abs().max()) < tolerance, rows


@pytest.mark.parametrize("mode", ["nf4", "fp4"])
def test_blocks_of_32_values_lower_the_layer_s_error_of_blocks_of_64(mode):
    weight, x, H = _problem(seed=3)
    errors = {}
    for blocks in (64, 32):
        q = gptq_quantize({"w": weight}, H, QuantizationConfig(mode=mode, method="gptq", block_size=blocks))["w"]
        assert q.tensors["weight.absmax"].numel() == weight.numel() // blocks
        errors[blocks] = layer_output_error(x, weight, q)
    assert errors[32] < 0.97 * errors[64]  # ~5% on these Gaussian weights; equal if 32 were read as 64


@pytest.mark.parametrize("mode", ["nf4", "fp4"])
def test_the_rounding_kernels_give_the_torch_rule_s_levels_and_maxima(mode, monkeypatch):
    # sli.kernels.nearest on CPU; the torch table (SLI_NO_NUMBA=1, or another device) elsewhere
    weight, _, H = _problem(rows=64, cols=512, seed=2)
    w = weight.float()
    w[0, :64] = 0.0  # an all-zero block
    config = QuantizationConfig(mode=mode, method="gptq")
    importance = torch.diagonal(H).clone()
    scaled = torch.cat([torch.linspace(-1.2, 1.2, 20001), torch.randn(4096)])  # past both ends too
    with_kernels = gptq_module._Grid(config, w, importance)
    rounded = with_kernels._round4(scaled)
    monkeypatch.setenv("SLI_NO_NUMBA", "1")
    plain = gptq_module._Grid(config, w, importance)
    assert torch.equal(rounded, plain._round4(scaled))
    assert set(rounded.unique().tolist()) <= set(plain.sorted_code.tolist())
    # NaN (fastmath lets the float clamp pass it) still reads inside the level table
    monkeypatch.delenv("SLI_NO_NUMBA")
    nan = with_kernels._round4(torch.full((4096,), float("nan")))
    assert set(nan.unique().tolist()) <= set(plain.sorted_code.tolist())
    # the search's sums run in another order: a near tie may pick a neighbouring factor
    same = with_kernels.absmax == plain.absmax
    assert float(same.float().mean()) > 0.99 and bool(same[0, 0])
    assert torch.allclose(with_kernels.absmax, plain.absmax, rtol=0.03)


@pytest.mark.parametrize("mode", ["nf4", "fp4"])
def test_the_codes_kernel_gives_bitsandbytes_codes(mode, monkeypatch):
    # how the codec codes GPTQ's output (quantize_with): sli's table kernel on CPU, bitsandbytes'
    # bucketize elsewhere; midpoints themselves included (they take the lower level)
    from sli.quantization.codecs.four_bit_quantizer import _codes_reference, level_table, nearest_codes

    midpoints = level_table(mode).next_mid[:-1]
    scaled = torch.cat([torch.linspace(-1, 1, 40001), midpoints, torch.rand(4096) * 2 - 1])
    fused = nearest_codes(scaled, mode)
    assert fused.dtype == torch.uint8
    assert torch.equal(fused, _codes_reference(scaled, mode))
    monkeypatch.setenv("SLI_NO_NUMBA", "1")
    assert torch.equal(nearest_codes(scaled, mode), fused)


def test_int4_clipping_search_kernel_picks_the_torch_search_s_grids(monkeypatch):
    # sli.kernels.gptq.search_int4_clipping on CPU; torch's search (SLI_NO_NUMBA=1, other devices) elsewhere
    weight, _, H = _problem(rows=64, cols=512, seed=2)
    w = weight.float()
    w[0, :128] = 0.0  # an all-zero group: its fp16 scale underflows and becomes 1
    w[1, :128] = 1e-9
    w[2, :128] = w[2, :128].abs()  # a group without negative values (zero point 0)
    config = QuantizationConfig(mode="int4", method="gptq")
    importance = torch.diagonal(H).clone()
    with_kernels = gptq_module._Grid(config, w, importance)
    monkeypatch.setenv("SLI_NO_NUMBA", "1")
    plain = gptq_module._Grid(config, w, importance)
    assert with_kernels.scale.dtype == plain.scale.dtype == torch.float16
    same = (with_kernels.scale == plain.scale) & (with_kernels.zero == plain.zero)
    assert float(same.float().mean()) > 0.99 and bool(same[:3, 0].all())
    assert float(with_kernels.scale[0, 0]) == 1.0


@pytest.mark.parametrize("mode", FOUR_BIT)
def test_the_column_block_kernel_solves_as_the_torch_operations_do(mode, monkeypatch):
    # sli.kernels.gptq_block on CPU; the torch loop (SLI_NO_NUMBA=1, other devices) elsewhere. The
    # sums run in another order, so a value near a rounding boundary may round the other way
    weight, x, H = _problem(rows=96, cols=512, seed=1)
    config = QuantizationConfig(mode=mode, method="gptq")
    fused = gptq_quantize({"w": weight}, H, config)["w"]
    monkeypatch.setenv("SLI_NO_NUMBA", "1")
    plain = gptq_quantize({"w": weight}, H, config)["w"]
    assert float((fused.tensors["weight"] == plain.tensors["weight"]).float().mean()) > 0.99
    fused_error, plain_error = layer_output_error(x, weight, fused), layer_output_error(x, weight, plain)
    assert abs(fused_error - plain_error) < 0.01 * plain_error


def _ordered_dampened(H, order):
    """``H`` in float64, its rows and columns in ``order``, with the preset's 1% dampening: the
    matrix GPTQ factors."""
    P = H[order][:, order].double()
    P.diagonal().add_(0.01 * float(P.diagonal().mean()))
    return P


def _textbook_gptq(weight, H, grid, order):
    """GPTQ as its paper writes it, in float64: columns in ``order``, each rounded on ``grid``
    (``_Grid.quantize``) and its error, divided by the diagonal of the upper Cholesky factor of
    ``H^-1``, subtracted from the later columns through that factor's row."""
    C = torch.linalg.cholesky(torch.linalg.inv(_ordered_dampened(H, order)), upper=True)
    W = weight.double()[:, order].clone()
    groups = (order // grid.group).tolist()
    for j in range(W.shape[1]):
        g = groups[j]
        q = grid.quantize(W[:, j].float(), grid.col_scale[:, g], None if grid.zero is None else grid.zero[:, g]).double()
        err = (W[:, j] - q) / C[j, j]
        W[:, j] = q
        W[:, j + 1:] -= err[:, None] * C[j, j + 1:][None]
    return W[:, torch.argsort(order)].float()


@pytest.mark.parametrize("mode", FOUR_BIT)
def test_the_solve_gives_the_codes_of_gptq_through_the_inverse_hessian_s_factor(mode):
    # sli solves GPTQ in LDLQ's form, without inverting H: the same codes up to float rounding
    weight, x, H = _problem(rows=64, cols=256, seed=6)
    config = QuantizationConfig(mode=mode, method="gptq")
    q = gptq_quantize({"w": weight}, H, config)["w"]
    codec = codec_for(mode)
    ours = codec.dequantize(q, torch.float32)
    order = torch.argsort(torch.diagonal(H), descending=True, stable=True)
    grid = gptq_module._Grid(config, weight.float(), torch.diagonal(H).clone())
    reference = _textbook_gptq(weight.float(), H, grid, order)
    assert float((ours == reference).float().mean()) > 0.99

    def output_error(dense):
        exact = x @ weight.float().t()
        return float((exact - x @ dense.t()).square().sum() / exact.square().sum())

    assert abs(output_error(ours) - output_error(reference)) < 0.01 * output_error(reference)


def test_linears_sharing_an_input_solve_as_one_matrix():
    weight, x, H = _problem(rows=64, cols=256, seed=2)
    other = (0.02 * torch.randn(32, 256, generator=torch.Generator().manual_seed(3))).to(torch.bfloat16)
    config = QuantizationConfig(mode="int4", method="gptq")
    joint = gptq_quantize({"a": weight, "b": other}, H, config)
    alone = gptq_quantize({"b": other}, H, config)["b"]
    assert joint["a"].metadata["shape"] == [64, 256] and joint["b"].metadata["shape"] == [32, 256]
    for name, tensor in alone.tensors.items():  # rows are independent given H
        assert torch.equal(joint["b"].tensors[name], tensor), name


def _codes(q):
    """Each value's 4-bit code (NF4/FP4 maxima differ in their last bits: compare codes)."""
    packed = q.tensors["weight"].reshape(-1)
    return torch.stack([packed >> 4, packed & 15])


@pytest.mark.parametrize("mode", FOUR_BIT)
@pytest.mark.parametrize("rows", [64, 320])  # 320 > 256 columns: the drift is solved once, not each pull
def test_asymmetric_gptq_is_gptq_of_the_weight_moved_toward_the_float_model_s_outputs(mode, rows):
    # the quantized model's inputs x drifted from the float model's f: each linear is fitted toward
    # f W^T, the float model's outputs: GPTQ of W + alpha (W D^T H^-1), D = x^T (f - x)
    weight, x, H = _problem(rows=rows, cols=256, seed=7)
    g = torch.Generator().manual_seed(8)  # a drift mostly linear in x (what a weight can undo), and noise
    f = x + 0.3 * x @ torch.randn(256, 256, generator=g) / 16 + 0.05 * torch.randn(x.shape, generator=g) * x.std(dim=0)
    drift = gptq_module.InputDrift(256)
    drift.add(x, f)
    D = x.t() @ (f - x)
    assert torch.allclose(drift.sums, D, rtol=1e-4, atol=1e-3 * float(D.abs().max()))
    config = QuantizationConfig(mode=mode, method="gptq", gptq_asymmetric=0.25)
    plain = dataclasses.replace(config, gptq_asymmetric=0.0)
    ours = gptq_quantize({"w": weight}, H, config, drift=drift)["w"]
    assert drift.sums is None  # handed over
    dampened = H.double() + config.gptq_damp * float(H.diagonal().mean()) * torch.eye(256, dtype=torch.float64)
    moved = weight.double() + 0.25 * torch.linalg.solve(dampened, D.double() @ weight.double().t()).t()
    reference = gptq_quantize({"w": moved.float()}, H, plain)["w"]

    assert float((_codes(ours) == _codes(reference)).float().mean()) > 0.99
    # the whole correction: much closer to the float model's outputs than plain GPTQ on the drifted inputs
    codec = codec_for(mode)
    target = f @ weight.float().t()

    def error(q):
        return float((x @ codec.dequantize(q, torch.float32).t() - target).square().sum())

    whole = gptq_quantize({"w": weight}, H, dataclasses.replace(config, gptq_asymmetric=1.0), drift=D)["w"]
    assert error(whole) < 0.5 * error(gptq_quantize({"w": weight}, H, plain)["w"])
    # no drift, or alpha 0: plain GPTQ's bytes
    for q in (gptq_quantize({"w": weight}, H, config, drift=torch.zeros(256, 256)),
              gptq_quantize({"w": weight}, H, plain, drift=D)):
        expected = gptq_quantize({"w": weight}, H, plain)["w"]
        assert all(torch.equal(q["w"].tensors[k], v) for k, v in expected.tensors.items())


@pytest.mark.parametrize("mode", FOUR_BIT)
def test_a_weight_moves_toward_the_float_model_alike_alone_or_beside_linears_that_outnumber_its_inputs(mode):
    # alone (64 rows < 192 inputs) its pull D W^T is solved; beside a 256-row linear the drift
    # itself is solved once and each correction is a product with it: the same weight, up to
    # float rounding. INT4 pads 192 columns to 256; a dead input column (never nonzero) pulls nothing
    weight, x, H = _problem(rows=64, cols=192, seed=9)
    x[:, 5] = 0.0
    H = x.t() @ x
    f = x + 0.1 * x @ torch.randn(192, 192, generator=torch.Generator().manual_seed(10)) / 14
    D = x.t() @ (f - x)
    other = (0.02 * torch.randn(256, 192, generator=torch.Generator().manual_seed(11))).to(torch.bfloat16)
    config = QuantizationConfig(mode=mode, method="gptq", gptq_asymmetric=0.25, block_size=64)
    alone = gptq_quantize({"w": weight}, H, config, drift=D)["w"]
    beside = gptq_quantize({"w": weight, "other": other}, H, config, drift=D)["w"]
    plain = gptq_quantize({"w": weight}, H, dataclasses.replace(config, gptq_asymmetric=0.0))["w"]

    assert float((_codes(alone) == _codes(beside)).float().mean()) > 0.99
    assert float((_codes(alone) == _codes(plain)).float().mean()) < 0.97  # the correction moved codes


def _peak_rss_bytes_during(fn):
    """(fn's result, how far the process's peak RSS rose above its RSS before ``fn``)."""
    def status(field):
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith(field))

    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # the peak (VmHWM) starts again from the current RSS
    before = status("VmRSS:")
    result = fn()
    return result, status("VmHWM:") - before


def test_the_error_weights_are_made_in_two_buffers_once_the_hessian_is_handed_over():
    n = 3072  # a matrix of 36 MB: above glibc's largest mmap threshold, so a freed one leaves the RSS
    weight, x, _ = _problem(rows=8, cols=n, tokens=2 * n, seed=5)
    hessian = Hessian(n)
    hessian.add(x)
    order = torch.randperm(n, generator=torch.Generator().manual_seed(0))
    P = _ordered_dampened(hessian.matrix, order)
    # U = -R diag(R)^-1 with a unit diagonal, R upper triangular and P = R R^T, whatever the order:
    # N = 2I - U is unit upper triangular and N^-1 P N^-T is diagonal (P's LDL factors)
    factor = gptq_module._factor(hessian.matrix, order, torch.diagonal(hessian.matrix).clone(), 0.01)
    U = gptq_module._error_weights(factor).double()
    assert torch.equal(U, U.triu()) and bool((U.diagonal() == 1).all())
    N = 2 * torch.eye(n, dtype=torch.float64) - U
    D = torch.linalg.solve_triangular(N, torch.linalg.solve_triangular(N, P, upper=True).t(), upper=True)
    off = D - torch.diag(D.diagonal())
    assert float(off.abs().max()) < 1e-4 * float(D.diagonal().abs().max())
    # handed over, the Hessian is freed once factored: the solve's matrices never take more than
    # two [n, n] float32 buffers beyond what the weights take (the old path: five)
    config = QuantizationConfig(mode="nf4", method="gptq", gptq_scale_search=False)
    kept = gptq_quantize({"w": weight}, hessian.matrix, config)["w"]
    matrix_bytes = n * n * 4
    taken, rise = _peak_rss_bytes_during(lambda: gptq_quantize({"w": weight}, hessian, config)["w"])
    assert hessian.matrix is None
    assert rise < 1.6 * matrix_bytes, rise / matrix_bytes
    for name, tensor in kept.tensors.items():  # handing the matrix over changes nothing in the result
        assert torch.equal(taken.tensors[name], tensor), name


def test_int4_gptq_pads_input_features_like_the_codec():
    weight, x, H = _problem(rows=32, cols=200, seed=4)  # 200 is not a multiple of 128
    rtn = codec_for("int4").quantize(weight, QuantizationConfig(mode="int4"))
    q = gptq_quantize({"w": weight}, H, QuantizationConfig(mode="int4", method="gptq"))["w"]
    assert q.metadata["padded_in"] == rtn.metadata["padded_in"] == 256
    assert layer_output_error(x, weight, q) < layer_output_error(x, weight, rtn)


# -- the config -------------------------------------------------------------------------------

def test_rtn_fingerprints_are_unchanged_and_gptq_ones_differ():
    # existing caches are keyed on these: the method fields must not enter an RTN fingerprint
    assert QuantizationConfig(mode="nf4").fingerprint() == "74d24539471c9e33"
    assert get_int8_config().fingerprint() == "1c3d8a07d2a56a68"
    assert QuantizationConfig(mode="int4").fingerprint() == "dc0bbb9e51ad73c5"
    rtn = QuantizationConfig(mode="int4")
    gptq = QuantizationConfig(mode="int4", method="gptq")
    assert gptq.fingerprint() != rtn.fingerprint()
    assert dataclasses.replace(rtn, gptq_damp=0.1, calibration_tokens=64).fingerprint() == rtn.fingerprint()
    for change in ({"gptq_damp": 0.1}, {"gptq_block_size": 64}, {"gptq_act_order": False},
                   {"gptq_scale_search": False}, {"calibration": "sha256:0123456789abcdef"},
                   {"calibration_tokens": 1024}, {"calibration_window": 256}, {"group_size": 64},
                   {"gptq_asymmetric": 0.25}):
        assert dataclasses.replace(gptq, **change).fingerprint() != gptq.fingerprint(), change
    assert QuantizationConfig.from_dict(json.loads(json.dumps(gptq.to_dict()))) == gptq


@pytest.mark.parametrize("kwargs, field", [
    ({"mode": "int8", "method": "gptq"}, "method"),  # no calibrated int8 layout
    ({"mode": "int4", "method": "awq"}, "method"),
    ({"mode": "int4", "method": "gptq", "gptq_damp": 1.5}, "gptq_damp"),
    ({"mode": "int4", "method": "gptq", "calibration_tokens": 8}, "calibration_tokens"),
    ({"mode": "nf4", "method": "gptq", "gptq_asymmetric": 1.5}, "gptq_asymmetric"),
])
def test_invalid_calibrated_config_names_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        QuantizationConfig(**kwargs)


def test_a_calibrated_config_never_rounds_silently():
    quantizer = LayerQuantizer(QuantizationConfig(mode="nf4", method="gptq"))
    assert quantizer.needs_calibration() and not LayerQuantizer(QuantizationConfig(mode="nf4")).needs_calibration()
    with pytest.raises(SLIError, match="calibrat"):
        quantizer.quantize_state_dict({"fc.weight": torch.randn(8, 64)}, {"fc": False}, "model.layers.0")


# -- streamed calibration ---------------------------------------------------------------------

def _config(**kwargs):
    return QuantizationConfig(**{"mode": "int4", "method": "gptq", "group_size": 32, "calibration_tokens": 1024,
                                 "calibration_window": 64, **kwargs})


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from sli.synth import synth_model

    return synth_model(tmp_path_factory.mktemp("gptq-llama"), family="llama", preset="tiny", num_layers=3,
                       with_tokenizer=True)


def _entries(proc):
    return [proc.cache.get(proc.model_id, i, proc.quantizer, mapped=False) for i in range(proc.layout.num_layers)]


@pytest.mark.parametrize("asymmetric", [0.0, 0.25])  # 0.25: the float model's activations resume beside
def test_streamed_calibration_fills_the_cache_resumes_and_generates(tiny, tmp_path, monkeypatch, asymmetric):
    from sli import calibration

    # an uninterrupted run
    with UniversalSLIProcessor(tiny, _config(gptq_asymmetric=asymmetric), cache_dir=tmp_path / "straight", device="cpu") as proc:
        assert calibration.calibrate(proc, progress=False) == 3
        straight = _entries(proc)
        assert calibration.calibrate(proc, progress=False) == 0  # all cached: nothing to do
    assert all(e is not None for e in straight)
    assert straight[0].linears["self_attn.q_proj"]["codec"] == "int4"

    # a run killed while storing layer 1 resumes there, from the activations it left on disk
    solved = []
    real_solve = calibration.layer_solve.gptq_quantize
    monkeypatch.setattr(calibration.layer_solve, "gptq_quantize", lambda *a, **k: solved.append(1) or real_solve(*a, **k))
    with UniversalSLIProcessor(tiny, _config(gptq_asymmetric=asymmetric), cache_dir=tmp_path / "killed", device="cpu") as proc:
        real_put = proc.cache.put

        def put(model_id, layer, *args, **kwargs):
            if layer == 1:
                raise KeyboardInterrupt  # the kill
            return real_put(model_id, layer, *args, **kwargs)

        monkeypatch.setattr(proc.cache, "put", put)
        with pytest.raises(KeyboardInterrupt):
            calibration.calibrate(proc, progress=False)
        work = next((tmp_path / "killed" / "calibration").iterdir())
        assert json.loads((work / "state.json").read_text())["layer"] == 1
        per_layer = len(solved) // 2  # layers 0 and 1 were solved, 1 never stored
        monkeypatch.setattr(proc.cache, "put", real_put)
        assert calibration.calibrate(proc, progress=False) == 2  # layers 1 and 2
        assert len(solved) == 4 * per_layer  # layer 0 was not solved again
        assert not work.exists()  # the activations are removed at the end
        resumed = _entries(proc)
        for a, b in zip(straight, resumed):
            assert a.tensors.keys() == b.tensors.keys()
            assert all(torch.equal(a.tensors[k], b.tensors[k]) for k in a.tensors)

        # the processor streams the calibrated entries (a miss would raise: GPTQ never rounds silently)
        out = proc.generate(torch.tensor([[5, 6, 7, 8]]), max_new_tokens=4)
        assert out.shape == (1, 4)


def test_asymmetric_calibration_runs_the_float_model_beside_the_quantized_one(tiny, tmp_path, monkeypatch):
    from sli import calibration
    from sli.calibration.activations import Activations

    entries = {}
    for alpha in (0.0, 0.25):
        with UniversalSLIProcessor(tiny, _config(gptq_asymmetric=alpha), cache_dir=tmp_path / str(alpha),
                                   device="cpu") as proc:
            assert calibration.calibrate(proc, progress=False) == 3
            entries[alpha] = _entries(proc)
    plain, moved = entries[0.0], entries[0.25]

    def same(a, b):
        return all(torch.equal(a.tensors[k], b.tensors[k]) for k in a.tensors)

    assert same(plain[0], moved[0])  # layer 0: both models' inputs are the embeddings, no drift
    with UniversalSLIProcessor(tiny, _config(), cache_dir=tmp_path / "plan", device="cpu") as proc:
        without = calibration.calibration_plan(proc, 64, 1024)
    with UniversalSLIProcessor(tiny, _config(gptq_asymmetric=0.25), cache_dir=tmp_path / "plan", device="cpu") as proc:
        beside = calibration.calibration_plan(proc, 64, 1024)
    assert beside.hessians > 1.9 * without.hessians and beside.per_token > without.per_token  # the drifts, the float pass
    assert not same(plain[1], moved[1]) and not same(plain[2], moved[2])

    # a layer none of whose linears is quantized still moves the float model's activations on
    linears = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
               "mlp.up_proj", "mlp.down_proj"]
    skip = [f"model.layers.1.{p}" for p in linears]
    with UniversalSLIProcessor(tiny, _config(gptq_asymmetric=0.25, llm_int8_skip_modules=skip),
                               cache_dir=tmp_path / "skip", device="cpu") as proc:
        assert calibration.calibrate(proc, progress=False) == 3
        kept = _entries(proc)
    assert kept[1].tensors["self_attn.q_proj.weight"].is_floating_point()  # as the checkpoint has it
    assert not same(kept[2], moved[2])  # layer 2 fitted against the float model's inputs all the same

    # killed after layer 1's float inputs were committed but not the model's (between the two
    # commits): the float model's inputs of layer 1 are gone, so it starts again from layer 0,
    # whose entry it keeps (only its float pass runs again), and ends with the same bytes
    real_commit = Activations.commit

    def commit(self, layer, chunks):
        if layer == 2 and self.root.name != "float":
            raise KeyboardInterrupt
        return real_commit(self, layer, chunks)

    with UniversalSLIProcessor(tiny, _config(gptq_asymmetric=0.25), cache_dir=tmp_path / "killed",
                               device="cpu") as proc:
        monkeypatch.setattr(Activations, "commit", commit)
        with pytest.raises(KeyboardInterrupt):
            calibration.calibrate(proc, progress=False)
        work = next((tmp_path / "killed" / "calibration").iterdir())
        assert json.loads((work / "state.json").read_text())["layer"] == 1
        state = json.loads((work / "float" / "state.json").read_text())
        (work / "float" / "state.json").write_text(json.dumps({**state, "layer": 0}))  # behind the model's
        monkeypatch.setattr(Activations, "commit", real_commit)
        assert calibration.calibrate(proc, progress=False) == 1  # layer 2 (layers 0 and 1 are cached)
        assert all(same(a, b) for a, b in zip(moved, _entries(proc)))


@pytest.mark.parametrize("sequential, pass_dtype, compiled, asymmetric", [
    (False, "float32", False, 0.0), (True, "float32", False, 0.0), (False, "bfloat16", False, 0.0),
    (False, "bfloat16", True, 0.0), (True, "bfloat16", True, 0.0), (False, "bfloat16", True, 0.25),
    (True, "bfloat16", True, 0.25)])
def test_calibrated_layers_track_the_float_model_better_than_rtn(tiny, tmp_path, sequential, pass_dtype, compiled,
                                                                 asymmetric, monkeypatch):
    # SLI_PROMPT_DTYPE: the passes in bfloat16 (a CPU with matrix units) or float32 (any other);
    # compiled: the passes through torch.compile, as a large model's run (hooks and stops included;
    # sequential: each stage's hooks at other linears than the stage's before); asymmetric: the
    # float model's pass first on each chunk (sequential: through a copy of the float layer)
    from sli import calibration
    from sli.evaluation import load_eval_text

    layer_inputs = importlib.import_module("sli.calibration.layer_inputs")  # the package re-exports a function of that name

    monkeypatch.setenv("SLI_PROMPT_DTYPE", pass_dtype)
    monkeypatch.setattr(layer_inputs, "COMPILE_MIN_VALUES", 0 if compiled else 1 << 62)
    compiles = []
    real_compile = torch.compile
    monkeypatch.setattr(torch, "compile", lambda *a, **k: compiles.append(1) or real_compile(*a, **k))

    with UniversalSLIProcessor(tiny, "none", cache_dir=tmp_path, device="cpu") as proc:
        # text like the calibration text's, from the half it does not use
        ids = torch.tensor([proc.tokenizer()(load_eval_text()[:2000], add_special_tokens=False)["input_ids"][:128]])
        ref = proc.forward(ids)
    errors = {}
    for name, config in (("rtn", dataclasses.replace(_config(), method="rtn")),
                         ("gptq", _config(gptq_sequential=sequential, gptq_asymmetric=asymmetric))):
        with UniversalSLIProcessor(tiny, config, cache_dir=tmp_path, device="cpu") as proc:
            if config.calibrated:
                calibration.calibrate(proc, progress=False)
            errors[name] = float((proc.forward(ids) - ref).square().mean())
    assert errors["gptq"] < 0.5 * errors["rtn"]  # measured: 0.24x
    assert bool(compiles) is compiled


def test_a_compiled_pass_tracks_the_eager_one_and_a_failed_compile_runs_eagerly(tiny, tmp_path, monkeypatch, caplog):
    from sli.calibration.layer_inputs import Stop, compiled, eager_hook, layer_inputs as inputs_of, run_layer
    from sli.calibration.layer_solve import layer_module

    layer_inputs = importlib.import_module("sli.calibration.layer_inputs")
    monkeypatch.setenv("SLI_PROMPT_DTYPE", "bfloat16")
    monkeypatch.setattr(layer_inputs, "COMPILE_MIN_VALUES", 0)
    monkeypatch.setattr(layer_inputs, "_compile_failed", False)
    with UniversalSLIProcessor(tiny, _config(), cache_dir=tmp_path, device="cpu") as proc, torch.inference_mode():
        hidden, args = inputs_of(proc, torch.randint(5, 200, (2, 64)))
        hidden = hidden.to(torch.bfloat16)
        layer = layer_module(proc, 0, proc._checkpoint_state(0))
        eager = run_layer(layer, hidden, args[0])
        fast = compiled(layer, hidden)
        assert fast is not layer
        out = run_layer(fast, hidden, args[0])
        assert float((out.float() - eager.float()).abs().max()) < 0.05 * float(eager.float().abs().max())
        # a hook added after the layer ran compiled (the compiled code is guarded on hooks: dynamo's
        # default is not, and skipped it) stops the compiled pass too, and sees the same input
        seen = []

        def stop(module, inputs):
            seen.append(inputs[0].clone())
            raise Stop

        handle = layer.mlp.down_proj.register_forward_pre_hook(eager_hook(stop))
        for runs in (layer, fast):
            with pytest.raises(Stop):
                run_layer(runs, hidden, args[0])
        handle.remove()
        assert float((seen[1].float() - seen[0].float()).abs().max()) < 0.05 * float(seen[0].float().abs().max())
        # a compile that fails (no C compiler, say) warns once and the passes run eagerly from then on
        monkeypatch.setattr(torch, "compile", lambda module, **k: _Failing(module))
        failing = compiled(layer, hidden)
        with caplog.at_level("WARNING"):
            assert torch.equal(run_layer(failing, hidden, args[0]), eager)
            assert torch.equal(run_layer(failing, hidden, args[0]), eager)
        assert sum("torch.compile of the decoder layer failed" in r.message for r in caplog.records) == 1
        assert compiled(layer, hidden) is layer
        monkeypatch.setenv("SLI_NO_COMPILE", "1")
        monkeypatch.setattr(layer_inputs, "_compile_failed", False)
        assert compiled(layer, hidden) is layer


def test_the_grouping_forward_takes_one_window_unless_an_argument_has_one_per_window():
    from sli.calibration.layer_inputs import LayerArgs
    from sli.calibration.layer_solve import _has_windows

    rotary = (torch.zeros(1, 512, 64), torch.zeros(1, 512, 64))  # broadcast over the windows
    assert not _has_windows(LayerArgs((), {"position_embeddings": rotary, "attention_mask": None}), 8)
    masks = torch.zeros(8, 1, 512, 512)  # a mask per window: the whole chunk must run
    assert _has_windows(LayerArgs((), {"position_embeddings": rotary, "attention_mask": masks}), 8)
    assert _has_windows(LayerArgs((masks,), {}), 8)


class _Failing(torch.nn.Module):
    """What torch.compile gives where it cannot compile: a wrapper whose call raises."""

    def __init__(self, module):
        super().__init__()
        self._orig_mod = module

    def forward(self, *args, **kwargs):
        raise RuntimeError("InductorError: no working C compiler found")


def test_calibration_text_is_recorded_and_checked(tiny, tmp_path):
    from sli import calibration
    from sli.evaluation import load_eval_text

    text = load_eval_text()
    assert calibration.default_calibration_text() == text[len(text) // 2:]  # eval windows come from the start
    own = "calibrate on this. " * 400
    config = calibration.calibration_config(QuantizationConfig(mode="nf4"), text=own, tokens=256)
    assert config.method == "gptq" and config.calibration == calibration.calibration_id(own)
    assert config.calibration_tokens == 256 and config.calibration_window == 256
    with UniversalSLIProcessor(tiny, dataclasses.replace(config, calibration_window=64), cache_dir=tmp_path,
                               device="cpu") as proc:
        with pytest.raises(SLIError, match="hash"):
            calibration.calibrate(proc, "another text " * 400, progress=False)
        with pytest.raises(SLIError, match="pass that text"):
            calibration.calibrate(proc, progress=False)
        assert calibration.calibrate(proc, own, progress=False) == 3
    with UniversalSLIProcessor(tiny, _config(calibration_window=512, calibration_tokens=512), cache_dir=tmp_path,
                               device="cpu") as proc:
        with pytest.raises(SLIError, match="positions"):
            calibration.calibrate(proc, progress=False)


# -- names and evaluation ---------------------------------------------------------------------

def test_a_memory_budget_sizes_the_calibration_s_chunks_and_one_too_small_is_refused(tiny, tmp_path, monkeypatch):
    from sli import calibration
    from sli.calibration.activations import Activations

    window, tokens = 64, 1024
    with UniversalSLIProcessor(tiny, _config(), cache_dir=tmp_path / "plan", device="cpu") as proc:
        plan = calibration.calibration_plan(proc, window, tokens)
    # a budget for one window's activations beside the layer, its Hessians and the solve: chunks of one window
    budget_gb = (plan.peak(window) + plan.per_token * window // 2) / 2 ** 30
    assert plan.peak(2 * window) > budget_gb * 2 ** 30 >= plan.peak(window)
    written = []
    real_write = Activations.write
    def write(self, layer, chunk, hidden):
        written.append(hidden.shape)
        return real_write(self, layer, chunk, hidden)

    monkeypatch.setattr(Activations, "write", write)
    with UniversalSLIProcessor(tiny, _config(), cache_dir=tmp_path / "fits", device="cpu",
                               memory_budget_gb=budget_gb) as proc:
        assert proc.prewarm(progress=False) == 3
    assert {tuple(shape[:2]) for shape in written} == {(1, window)}
    assert len(written) == 3 * tokens // window  # layers 0, 1 and 2's inputs
    # a budget below one window's: refused before anything is written, naming the budget that fits
    with UniversalSLIProcessor(tiny, _config(), cache_dir=tmp_path / "small", device="cpu",
                               memory_budget_gb=plan.peak(window) / 2 ** 30 * 0.9) as proc:
        with pytest.raises(SLIError, match=rf"needs a memory budget of at least {plan.peak(window) / 2 ** 30:.2f} GiB"):
            proc.prewarm(progress=False)
        assert proc.cache.entries() == [] and not (tmp_path / "small" / "calibration").exists()


def test_calibrated_modes_have_names():
    from sli.quantization import QuantizationRegistry
    from sli.quantization.presets import calibrated_names

    assert set(calibrated_names()) == {"int4-gptq", "nf4-gptq", "fp4-gptq"}
    config = QuantizationRegistry.get("nf4-gptq")
    assert config.method == "gptq" and config.double_quant and config.block_size == 64
    assert "int4-gptq" in QuantizationRegistry.list_configs()
    with pytest.raises(KeyError):
        QuantizationRegistry.get("int8-gptq")


def test_eval_reports_calibrated_modes(tiny, tmp_path):
    from sli.evaluation import evaluate_modes

    report = evaluate_modes(tiny, ["none", "int4", "int4-gptq"], num_windows=2, window=64, progress=False,
                            cache_dir=tmp_path, calibration={"group_size": 32, "calibration_tokens": 1024,
                                                             "calibration_window": 64})
    modes = report["modes"]
    assert modes["int4-gptq"]["perplexity"] > 0 and modes["int4-gptq"]["weight_snr_db"] > 0
    # int4's layout at g32 (the tiny model's inputs, 64 and 128, are whole groups): 4 bits + fp16 scale + u8 zero
    assert modes["int4-gptq"]["bits_per_weight"] == pytest.approx(4 + 24 / 32, abs=1e-6)


def test_sli_eval_asymmetric_sets_the_calibrated_modes_field(tiny, capsys, monkeypatch):
    from sli import evaluation
    from sli.cli import main

    seen = []
    monkeypatch.setattr(evaluation, "evaluate_modes", lambda *a, **k: seen.append(k["calibration"]) or {"modes": {}})
    assert main(["eval", str(tiny), "--modes", "none,nf4,nf4-gptq", "--asymmetric", "0.25", "--json", "-q"]) == 0
    assert seen == [{"gptq_asymmetric": 0.25}]
    capsys.readouterr()
    assert main(["eval", str(tiny), "--modes", "none,nf4", "--asymmetric", "0.25", "-q"]) == 1
    assert "--asymmetric applies to calibrated modes" in _cli_error(capsys)


def test_eval_block_size_sets_the_nf4_and_fp4_modes_blocks(tiny, tmp_path, capsys):
    from sli.cli import main
    from sli.evaluation import evaluate_modes
    from sli.quantization.quantizer import with_block_size

    fields = {"calibration_tokens": 512, "calibration_window": 64}
    bits = {}
    for size in (64, 32, "32,down_proj=64"):
        report = evaluate_modes(tiny, ["none", "nf4", "nf4-gptq", "int8"], num_windows=1, window=64, progress=False,
                                cache_dir=tmp_path, calibration=fields, block_size=size)
        bits[size] = {m: r["bits_per_weight"] for m, r in report["modes"].items()}
    # an 8-bit maximum a block (double quant): 1/8 bit a weight more at 32 than at 64; int8 untouched
    for mode in ("nf4", "nf4-gptq"):
        assert bits[32][mode] - bits[64][mode] == pytest.approx(8 / 32 - 8 / 64, abs=0.01)
        assert bits[64][mode] + 0.01 < bits["32,down_proj=64"][mode] < bits[32][mode] - 0.01  # down_proj at 64
    assert bits[32]["int8"] == bits[64]["int8"]
    mixed = with_block_size(get_mixed_precision_config(), 32)  # attention INT8 as it was, the MLP's NF4 in 32s
    assert (mixed.ffn_config.block_size, mixed.attention_config.mode.value) == (32, "int8")
    assert with_block_size(QuantizationConfig(mode="int8"), 32) is None
    capsys.readouterr()  # the evaluations' progress bars
    assert main(["eval", str(tiny), "--modes", "none,int8", "--block-size", "32", "-q"]) == 1
    assert "--block-size applies to NF4/FP4 blocks and INT4 groups" in _cli_error(capsys)
    for wrong in ("48", "32,down_proj=48"):  # even, so an INT4 group's size, but no NF4 block's
        assert main(["eval", str(tiny), "--modes", "none,nf4", "--block-size", wrong, "-q"]) == 1
        assert "is not supported" in (error := _cli_error(capsys)) and "a power of two from 32 to 4096" in error
    for wrong in ("32,64", "33", "0"):
        assert main(["eval", str(tiny), "--modes", "none,nf4", "--block-size", wrong, "-q"]) == 2
        assert "give a size (NF4/FP4 blocks: one of 32, 64" in capsys.readouterr().err


def test_calibration_passes_run_in_bfloat16_where_the_cpu_multiplies_it(tiny, tmp_path, monkeypatch):
    from sli.calibration import layer_solve
    from sli.quantization.gptq import Hessian

    with UniversalSLIProcessor(tiny, _config(), cache_dir=tmp_path, device="cpu") as proc:
        for asked, dtype in (("bfloat16", torch.bfloat16), ("float32", torch.float32)):
            monkeypatch.setenv("SLI_PROMPT_DTYPE", asked)
            assert layer_solve.pass_dtype(proc) == dtype
            assert layer_solve.layer_module(proc, 0, proc._checkpoint_state(0)).self_attn.q_proj.weight.dtype == dtype
    # a bfloat16 chunk's x^T x is multiplied in float32: a bfloat16 product, rounded, made
    # correlated inputs' Hessians indefinite (outlier channels: the rounding of their large
    # entries outweighs the 1% dampening)
    monkeypatch.setenv("SLI_HESSIAN_DTYPE", "float32")
    g = torch.Generator().manual_seed(0)
    x = torch.randn(256, 128, generator=g) @ torch.randn(128, 128, generator=g)
    x[:, :4] *= 30
    x = x.bfloat16()
    hessian = Hessian(128)
    hessian.add(x)
    exact = x.double().t() @ x.double()
    assert hessian.matrix.dtype == torch.float32 and hessian.tokens == 256
    assert float((hessian.matrix.double() - exact).abs().max() / exact.abs().max()) < 1e-6


@pytest.mark.parametrize("dtype", ["float32", "int8"])
def test_the_hessian_sums_its_upper_triangle_a_block_of_rows_at_a_time_and_hands_over_the_whole(monkeypatch, dtype):
    from sli.quantization import gptq

    monkeypatch.setenv("SLI_HESSIAN_DTYPE", dtype)
    monkeypatch.setattr(gptq, "HESSIAN_BLOCK", 32)
    g = torch.Generator().manual_seed(1)
    hessian, exact = gptq.Hessian(100), torch.zeros(100, 100, dtype=torch.float64)  # blocks of 32, 32, 32, 4
    for tokens in (5, 64):
        x = torch.randn(tokens, 100, generator=g)
        hessian.add(x)
        exact += x.double().t() @ x.double()
    matrix = hessian.take()
    assert hessian.matrix is None and hessian.tokens == 69
    assert torch.equal(matrix, matrix.t())
    error = float((matrix.double() - exact).abs().max() / exact.abs().max())
    assert error < (1e-6 if dtype == "float32" else 2e-2), error
    if dtype == "int8":
        assert error > 1e-6  # int8 activations: not the float32 sums


@pytest.mark.parametrize("dtype, kernels_on", [(torch.float32, True), (torch.bfloat16, True), (torch.bfloat16, False)])
def test_int8_hessians_are_the_exact_gram_matrix_of_int8_activations_never_indefinite(monkeypatch, dtype, kernels_on):
    # bfloat16 activations (the calibration passes' on AMX) are quantized by sli.kernels.gptq's
    # kernels, and the int32 sums scaled by one; SLI_NO_NUMBA=1: the same in torch operations
    from sli.quantization import gptq

    monkeypatch.setenv("SLI_HESSIAN_DTYPE", "int8")
    if not kernels_on:
        monkeypatch.setenv("SLI_NO_NUMBA", "1")
    monkeypatch.setattr(gptq, "INT8_GRAM_TOKENS", 100)  # 300 tokens: three int32 sums
    g = torch.Generator().manual_seed(2)
    x = torch.randn(300, 64, generator=g) @ torch.randn(64, 64, generator=g)
    x[:, :4] *= 30  # outlier channels (their rounding in bfloat16 made float Hessians indefinite)
    x[:, 60:] = x[:, :4] * 0.5 + 1e-3 * torch.randn(300, 4, generator=g)  # nearly dependent columns
    x = x.to(dtype).float()  # the values the Hessian sees, whatever dtype it is given them in
    hessian = gptq.Hessian(64)
    hessian.add(x.to(dtype))
    matrix = hessian.take().double()
    exact = x.double().t() @ x.double()
    assert hessian.tokens == 300
    assert float((matrix - exact).norm() / exact.norm()) < 1e-2
    # each 100-token part's columns on an int8 grid, their Gram matrix summed: what add() holds
    expected = torch.zeros(64, 64, dtype=torch.float64)
    for part in x.split(100):
        scale = part.abs().amax(dim=0) / 127
        codes = torch.round(part / scale)
        assert codes.abs().max() == 127
        q = codes.double() * scale.double()
        expected += q.t() @ q
    assert torch.allclose(matrix, expected, rtol=1e-5, atol=1e-5 * float(expected.abs().max()))
    if dtype == torch.bfloat16 and kernels_on:  # the kernels' codes are torch's, bit for bit
        part = x[:100].to(dtype)
        q, scale = kernels_module.quantize_columns_bf16(part)
        assert torch.equal(scale, part.float().abs().amax(dim=0) / 127)
        assert torch.equal(q, torch.round(part.float() / scale).to(torch.int8))
    assert float(torch.linalg.eigvalsh(matrix).min()) > -1e-5 * float(matrix.diagonal().max())


def test_sli_hessian_dtype_chooses_the_hessian_s_products(monkeypatch):
    from sli import kernels

    for asked, int8 in (("int8", True), ("float32", False)):
        monkeypatch.setenv("SLI_HESSIAN_DTYPE", asked)
        assert kernels.hessian_int8() is int8
    monkeypatch.setenv("SLI_HESSIAN_DTYPE", "")
    monkeypatch.setenv("SLI_INT8_MATMUL", "numba")  # int8 products not in torch._int_mm: float32
    assert kernels.hessian_int8() is False


def test_the_hessian_pass_stops_as_the_last_linear_s_input_arrives(tiny, tmp_path):
    from sli.calibration import layer_inputs, layer_solve

    with UniversalSLIProcessor(tiny, _config(), cache_dir=tmp_path, device="cpu") as proc, torch.inference_mode():
        hidden, per_layer = layer_inputs(proc, torch.arange(1, 33).unsqueeze(0))
        layer = layer_solve.layer_module(proc, 0, proc._checkpoint_state(0))
        paths = [p for p in proc._linears[0]]
        groups = layer_solve._input_groups(layer, paths, hidden, per_layer[0])
        assert groups[-1] == ["mlp.down_proj"]
        ran = []
        layer.mlp.down_proj.register_forward_hook(lambda *a: ran.append(1))
        hessians, drifts = layer_solve._hessians(layer, groups, None, lambda chunk: hidden, [(0, per_layer[0])] * 2,
                                                 torch.device("cpu"))
    assert ran == [] and drifts is None  # down_proj's product is never computed, its input's Hessian is
    assert [h.tokens for h in hessians] == [64] * len(groups)
    assert all(bool(h.matrix.diagonal().gt(0).all()) for h in hessians)


@pytest.mark.parametrize("family", ["gpt2", "phi3", "gemma2"])
def test_calibration_runs_other_layouts(tmp_path, family, monkeypatch):
    # GPT-2: Conv1D weights ([in, out]) and blocks that take positional arguments; Phi-3: fused qkv /
    # gate_up; Gemma-2: sliding-window and full layers alternate (windows of 128 > its window of 64),
    # so each layer gets its own mask
    from sli import calibration
    from sli.synth import synth_model

    monkeypatch.setenv("SLI_PROMPT_DTYPE", "bfloat16")  # their masks and rotary tables follow the pass's dtype
    path = synth_model(tmp_path / family, family=family, preset="tiny", with_tokenizer=True)
    config = QuantizationConfig(mode="nf4", method="gptq", calibration_tokens=512, calibration_window=128,
                                gptq_sequential=True)
    with UniversalSLIProcessor(path, config, cache_dir=tmp_path / "cache", device="cpu") as proc:
        if family == "gemma2":
            _, per_layer = calibration.layer_inputs(proc, torch.arange(128).unsqueeze(0))
            masks = [args.kwargs["attention_mask"] for args in per_layer]
            # the sliding layer's mask is a tensor; the full layer's is another tensor, or None where
            # transformers leaves plain causal attention to SDPA (5.16)
            assert masks[0] is not None
            assert masks[1] is None or not torch.equal(masks[0], masks[1])
        assert calibration.calibrate(proc, progress=False) == proc.layout.num_layers
        assert proc.generate(torch.tensor([[5, 6, 7]]), max_new_tokens=2).shape == (1, 2)


# -- the API and CLI ways in: prewarm(calibration=...), sli warm --calibrate -----------------------

def test_eval_block_size_sets_int4_groups_some_linears_apart(tiny, tmp_path):
    from sli.evaluation import evaluate_modes

    bits = {}
    for size in (32, 64, "32,down_proj=64"):  # the tiny model's inputs are 64 and 128 wide: no padding
        report = evaluate_modes(tiny, ["none", "int4"], num_windows=1, window=64, progress=False,
                                cache_dir=tmp_path, block_size=size)
        bits[size] = report["modes"]["int4"]["bits_per_weight"]
    # a float16 scale and an 8-bit zero a group: 24 bits a group
    assert bits[32] - bits[64] == pytest.approx(24 / 32 - 24 / 64, abs=0.01)
    assert bits[64] + 0.01 < bits["32,down_proj=64"] < bits[32] - 0.01


def _cli_error(capsys):
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1 and err[0].startswith("sli: error: "), err
    return err[0]


def test_prewarm_calibrates_a_calibrated_config_on_the_text_given(tmp_path):
    from sli.calibration import calibration_config, default_calibration_text
    from sli.synth import synth_model

    path = synth_model(tmp_path / "m", family="llama", preset="tiny", with_tokenizer=True)
    text = default_calibration_text()[:20000][::-1]  # not the default text
    base = QuantizationConfig(mode="int4", calibration_window=64)
    config = calibration_config(base, text=text, tokens=256)
    assert config.method == "gptq" and config.calibration.startswith("sha256:") and config.calibration_tokens == 256
    with UniversalSLIProcessor(path, config, cache_dir=tmp_path / "cache", device="cpu") as proc:
        with pytest.raises(SLIError, match="pass that text"):
            proc.prewarm(progress=False)  # the config names another text than the default
        with pytest.raises(SLIError, match="hash"):
            proc.prewarm(progress=False, calibration="some other text " * 200)
        assert proc.prewarm(progress=False, calibration=text) == proc.layout.num_layers
        assert proc.prewarm(progress=False) == 0  # all cached: the text is not needed again
        calibrated = proc.cache.entries()
    with UniversalSLIProcessor(path, base, cache_dir=tmp_path / "cache", device="cpu") as proc:
        with pytest.raises(SLIError, match="needs a calibrated config"):
            proc.prewarm(progress=False, calibration=text)
        assert proc.prewarm(progress=False) == proc.layout.num_layers  # RTN entries never mix with calibrated ones
        assert {e["fingerprint"] for e in proc.cache.entries()} > {e["fingerprint"] for e in calibrated}


def test_sli_warm_calibrate_then_generate_reads_the_calibrated_entries(tmp_path, capsys):
    from sli.cli import main
    from sli.synth import synth_model

    path = str(synth_model(tmp_path / "m", family="llama", preset="tiny", with_tokenizer=True))
    text = tmp_path / "calib.txt"
    text.write_text("The quick brown fox jumps over the lazy dog. " * 300, encoding="utf-8")
    cache = ["--cache-dir", str(tmp_path / "cache")]
    calib = ["--calibration-file", str(text), "--calibration-tokens", "256"]
    assert main(["warm", path, "--mode", "nf4", "--calibrate", *calib, *cache, "--json", "-q"]) == 0
    warmed = json.loads(capsys.readouterr().out)
    assert warmed["added"] == warmed["layers"] == 2
    # the same calibrated config by its name: nothing to calibrate again
    assert main(["warm", path, "--mode", "nf4-gptq", *calib, *cache, "--json", "-q"]) == 0
    assert json.loads(capsys.readouterr().out)["added"] == 0
    assert main(["generate", path, "Hello", "--mode", "nf4-gptq", *calib, *cache, "--max-new-tokens", "2",
                 "--json", "-q"]) == 0
    generated = json.loads(capsys.readouterr().out)
    assert generated["cache"]["disk_misses"] == 0 and generated["new_tokens"] == 2
    # the file is part of the config's identity: without it (the default text) the entries are another
    # config's, calibrated anew beside the first
    assert main(["generate", path, "Hello", "--mode", "nf4-gptq", "--calibration-tokens", "256", *cache,
                 "--max-new-tokens", "1", "--json", "-q"]) == 0
    assert json.loads(capsys.readouterr().out)["new_tokens"] == 1
    # fitted toward the float model's outputs: another config, its own entries
    assert main(["warm", path, "--mode", "nf4", "--calibrate", *calib, "--asymmetric", "0.25", *cache, "--json",
                 "-q"]) == 0
    assert json.loads(capsys.readouterr().out)["added"] == 2
    from sli.layer_cache import LayerCache

    with LayerCache(tmp_path / "cache") as layer_cache:
        entries = layer_cache.entries()
    assert len(entries) == 6 and len({e["fingerprint"] for e in entries}) == 3


def test_sli_warm_block_size_writes_blocks_of_that_many_values_a_config_of_their_own(tmp_path, capsys):
    from safetensors.torch import load_file

    from sli.cli import main
    from sli.synth import synth_model

    path = str(synth_model(tmp_path / "m", family="llama", preset="tiny", with_tokenizer=True))
    cache = ["--cache-dir", str(tmp_path / "cache")]
    calib = ["--calibration-tokens", "256"]
    for argv in (["--mode", "nf4"], ["--mode", "nf4", "--block-size", "32"], ["--mode", "nf4-gptq", *calib],
                 ["--mode", "nf4-gptq", *calib, "--block-size", "32"]):
        assert main(["warm", path, *argv, *cache, "--json", "-q"]) == 0
        assert json.loads(capsys.readouterr().out)["added"] == 2, argv  # none of them the other's entries
    found = {}  # the payloads on disk (safetensors): down_proj's block size and maxima in each entry
    for payload in (tmp_path / "cache").rglob("*.val"):
        tensors = load_file(payload)
        state = json.loads(bytes(tensors["mlp.down_proj.weight.quant_state.bitsandbytes__nf4"].tolist()))
        found.setdefault(state["blocksize"], []).append(tensors["mlp.down_proj.weight.absmax"].numel())
    assert sorted(found) == [32, 64] and len(found[32]) == len(found[64]) == 4
    assert set(found[32]) == {2 * n for n in found[64]}  # twice the maxima: one per 32 values
    assert main(["generate", path, "Hello", "--mode", "nf4-gptq", *calib, "--block-size", "32", *cache,
                 "--max-new-tokens", "2", "--json", "-q"]) == 0
    generated = json.loads(capsys.readouterr().out)
    assert generated["cache"]["disk_misses"] == 0 and generated["new_tokens"] == 2
    # some linears apart: down_proj in blocks of 64, the rest of 32, a config of its own again
    assert main(["warm", path, "--mode", "nf4-gptq", *calib, "--block-size", "32,down_proj=64", *cache, "--json",
                 "-q"]) == 0
    assert json.loads(capsys.readouterr().out)["added"] == 2
    mixes = []  # each entry's (down_proj, up_proj, q_proj) block sizes
    for payload in (tmp_path / "cache").rglob("*.val"):
        tensors = load_file(payload)
        mixes.append(tuple(json.loads(bytes(tensors[f"{name}.weight.quant_state.bitsandbytes__nf4"].tolist()))
                           ["blocksize"] for name in ("mlp.down_proj", "mlp.up_proj", "self_attn.q_proj")))
    assert sorted(mixes) == [(32, 32, 32)] * 4 + [(64, 32, 32)] * 2 + [(64, 64, 64)] * 4


@pytest.mark.parametrize("argv, message", [
    (["--mode", "int8", "--block-size", "32"], "--block-size applies to NF4/FP4 blocks and INT4 groups"),
    (["--mode", "nf4", "--block-size", "96"], "--block-size 96: block_size=96 is not supported; use a power of two"),
    (["--mode", "int8", "--calibrate"], "has no calibrated method"),
    (["--mode", "int8", "--calibration-tokens", "64"], "apply to calibrated modes"),
    (["--mode", "nf4", "--asymmetric", "0.25"], "apply to calibrated modes"),
    (["--mode", "int4-gptq", "--calibration-file", "/no/such/file.txt"], "is not a file"),
    (["--mode", "nf4-gptq", "--memory-budget-gb", "0.001"], "needs a memory budget of at least"),
])
def test_sli_warm_calibration_options_are_checked(tmp_path, capsys, argv, message):
    from sli.cli import main
    from sli.synth import synth_model

    path = str(synth_model(tmp_path / "m", family="llama", preset="tiny", with_tokenizer=True))
    capsys.readouterr()  # save_pretrained's progress bars, when they are on
    assert main(["warm", path, *argv, "--cache-dir", str(tmp_path / "cache"), "-q"]) == 1
    assert message in _cli_error(capsys)
    assert not (tmp_path / "cache").exists() or not any((tmp_path / "cache").glob("*.safetensors"))
