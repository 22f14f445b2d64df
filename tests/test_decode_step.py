"""A Llama-family layer's one-token step in a few kernel calls (sli.decode_step)."""
import inspect

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from sli import UniversalSLIProcessor, decode_step, kernels
from sli.kernels import bound
from sli.kv_cache import compact_kv_layer
from sli.quantization import QuantizationConfig, QuantizedLinear


def _source(cls, name):
    return inspect.getsource(getattr(cls, name)).replace(cls.__name__, "X")


@pytest.mark.parametrize("family", ["Mistral", "Qwen2"])
def test_the_step_s_families_still_have_llamas_layer(family):
    # The step reimplements LlamaDecoderLayer's forward; a transformers release that changes
    # one of these classes must fail here, not give wrong tokens.
    import importlib

    llama = importlib.import_module("transformers.models.llama.modeling_llama")
    other = importlib.import_module(f"transformers.models.{family.lower()}.modeling_{family.lower()}")
    for part in ("DecoderLayer", "MLP", "RMSNorm"):
        assert (inspect.getsource(getattr(other, family + part).forward)
                == inspect.getsource(getattr(llama, "Llama" + part).forward)), part
    mine = [line for line in inspect.getsource(getattr(other, family + "Attention").forward).splitlines()
            if "sliding_window" not in line]
    theirs = inspect.getsource(llama.LlamaAttention.forward).splitlines()
    body = lambda lines: [line for line in lines[lines.index(next(x for x in lines if "input_shape =" in x)):]]
    assert body(mine) == body(theirs)  # the signature's annotations differ; the body is Llama's + a window


def _processor(model_dir, tmp_path, mode="int8", **kwargs):
    return UniversalSLIProcessor(model_dir, QuantizationConfig(mode=mode), cache_dir=tmp_path / mode, device="cpu",
                                 memory_budget_gb=1.0, **kwargs)


def _decode_logits(proc, ids, steps=3, masked=0):
    """Logits of ``steps`` greedy decode steps after the prompt ``ids`` (its first ``masked``
    positions masked out, as a left-padded row)."""
    n = ids.shape[1]
    kv = proc._new_kv_cache(n + steps)
    mask = torch.ones(1, n + steps, dtype=torch.long)
    mask[0, :masked] = 0
    with torch.inference_mode():
        logits, kv = proc._step(ids, mask[:, :n], torch.arange(n)[None], kv)
        out = []
        for i in range(steps):
            token = logits.argmax(-1, keepdim=True)
            logits, kv = proc._step(token, mask[:, :n + i + 1], torch.tensor([[n + i]]), kv)
            out.append(logits)
    return torch.cat(out)


def _count_steps(monkeypatch):
    monkeypatch.setenv("SLI_NO_RESIDENT_DECODE", "1")  # each layer through the model's forward (its own test)
    calls = []
    real = decode_step.DecodeStep._step
    monkeypatch.setattr(decode_step.DecodeStep, "_step", lambda self, *a: calls.append(self.layer_idx) or real(self, *a))
    return calls


@pytest.mark.parametrize("family", ["llama", "mistral", "qwen2"])
@pytest.mark.parametrize("mode", ["int8", "nf4", "fp4", "int4"])
@pytest.mark.parametrize("kv_dtype", ["bfloat16", "int8"])
def test_the_step_gives_the_modules_logits(family, mode, kv_dtype, model_factory, tmp_path, monkeypatch):
    ids = torch.randint(0, 256, (1, 7), generator=torch.Generator().manual_seed(1))
    with _processor(model_factory(family), tmp_path, mode, kv_dtype=kv_dtype) as proc:
        calls = _count_steps(monkeypatch)
        stepped = _decode_logits(proc, ids)
        assert sorted(set(calls)) == list(range(proc.layout.num_layers)) and len(calls) == 3 * proc.layout.num_layers
        monkeypatch.setenv("SLI_NO_DECODE_STEP", "1")
        proc.runner._steps.clear()
        calls.clear()
        modules = _decode_logits(proc, ids)
        assert calls == []
    # the products are the same kernels; the norms and SiLU sum in another order
    assert float((stepped - modules).abs().max()) < 1e-4 * float(modules.abs().max())


def _count_one_calls(monkeypatch):
    """Each one-row step's output through :meth:`OneCallStep.run` (None: it fell back)."""
    monkeypatch.setenv("SLI_NO_RESIDENT_DECODE", "1")  # each layer through the model's forward (its own test)
    ran = []
    real = decode_step.OneCallStep.run
    monkeypatch.setattr(decode_step.OneCallStep, "run", lambda self, *a: ran.append(real(self, *a)) or ran[-1])
    return ran


def _one_call_and_op_by_op(proc, ids, monkeypatch, masked=0, after_one_call=lambda: None):
    ran = _count_one_calls(monkeypatch)
    one_call = _decode_logits(proc, ids, masked=masked)
    assert len(ran) == 3 * proc.layout.num_layers and all(out is not None for out in ran)
    after_one_call()
    monkeypatch.setenv("SLI_NO_ONE_CALL", "1")
    ran.clear()
    op_by_op = _decode_logits(proc, ids, masked=masked)
    assert ran == []
    monkeypatch.delenv("SLI_NO_ONE_CALL")
    return one_call, op_by_op


@pytest.mark.parametrize("family", ["llama", "qwen2"])  # qwen2: q/k/v have biases
@pytest.mark.parametrize("mode", ["int8", "nf4", "fp4", "int4"])
@pytest.mark.parametrize("kv_dtype", ["bfloat16", "int8"])
def test_one_call_gives_the_op_by_op_step_bit_for_bit(family, mode, kv_dtype, model_factory, tmp_path, monkeypatch):
    ids = torch.randint(0, 256, (1, 7), generator=torch.Generator().manual_seed(1))
    with _processor(model_factory(family), tmp_path, mode, kv_dtype=kv_dtype) as proc:
        one_call, op_by_op = _one_call_and_op_by_op(proc, ids, monkeypatch, masked=2 if family == "llama" else 0)
    assert torch.equal(one_call, op_by_op)


def test_one_call_with_int4_groups_of_three_sizes_gives_the_op_by_op_step_bit_for_bit(model_factory, tmp_path,
                                                                                     monkeypatch):
    # groups of 128 (q/k/v/o) and 192 (gate/up), kernels of their own, and 64 (down: the group an
    # argument) in one layer's step
    from sli.kernels import dispatch

    monkeypatch.setattr(dispatch, "TEAM_WORK", 0)  # every product on the team: the leader and the worker
    config = QuantizationConfig(mode="int4", block_sizes={"gate_proj": 192, "up_proj": 192, "down_proj": 64})
    ids = torch.randint(0, 256, (1, 7), generator=torch.Generator().manual_seed(1))
    with UniversalSLIProcessor(model_factory("llama"), config, cache_dir=tmp_path, device="cpu",
                               memory_budget_gb=1.0) as proc:
        one_call, op_by_op = _one_call_and_op_by_op(proc, ids, monkeypatch)
    assert torch.equal(one_call, op_by_op)


@pytest.mark.parametrize("path", ["no team", "every product on the team", "attention between two calls"])
def test_one_call_s_paths_give_the_same_bits(path, model_factory, tmp_path, monkeypatch):
    from sli.kernels import dispatch

    split: list = []
    if path == "no team":
        monkeypatch.setenv("SLI_NO_TEAM", "1")
    elif path == "every product on the team":
        monkeypatch.setattr(dispatch, "TEAM_WORK", 0)
    else:  # attention split across threads between the call's two halves
        monkeypatch.setattr(dispatch, "INLINE_WORK", 64)
        monkeypatch.setattr(kernels, "ATTENTION_SPLIT_WORK", 64)
        real = kernels.decode_attention_arrays
        monkeypatch.setattr(kernels, "decode_attention_arrays", lambda *a, **k: split.append(1) or real(*a, **k))
    ids = torch.randint(0, 256, (1, 9), generator=torch.Generator().manual_seed(3))
    with _processor(model_factory("llama"), tmp_path, "nf4") as proc:
        splits, before = [], len(split)  # (loading warms the attention kernel up through it)
        one_call, op_by_op = _one_call_and_op_by_op(proc, ids, monkeypatch,
                                                    after_one_call=lambda: splits.append(len(split) - before))
    assert torch.equal(one_call, op_by_op)
    assert splits == [3 * proc.layout.num_layers if split else 0]  # a split a layer and token


def test_one_call_adds_int8_outlier_columns_as_the_op_by_op_step(model_factory, tmp_path, monkeypatch):
    from test_resident_decode import _with_outlier_columns

    model_dir = _with_outlier_columns(model_factory("llama"), tmp_path / "outliers")
    ids = torch.randint(0, 256, (1, 7), generator=torch.Generator().manual_seed(2))
    with _processor(model_dir, tmp_path, "int8") as proc:
        one_call, op_by_op = _one_call_and_op_by_op(proc, ids, monkeypatch)
        assert proc.layers[0].mlp.down_proj.qweight.tensors["weight.outlier_cols"].tolist() == [3]
    assert torch.equal(one_call, op_by_op)


def test_a_layer_the_step_does_not_cover_runs_its_module(model_factory, tmp_path, monkeypatch):
    ids = torch.tensor([[3, 4, 5, 6]])
    for family, mode in [("qwen3", "int8"), ("gemma", "int8"), ("llama", "int8_dynamic"), ("llama", "none")]:
        with _processor(model_factory(family), tmp_path / family, mode) as proc:
            calls = _count_steps(monkeypatch)
            proc.generate(ids, max_new_tokens=3, eos_token_id=[])
            assert calls == [], (family, mode)
            monkeypatch.undo()


def test_float_activations_and_a_batch_past_the_kernels_rows_take_the_modules(model_factory, tmp_path, monkeypatch):
    with _processor(model_factory("llama"), tmp_path) as proc:
        calls = _count_steps(monkeypatch)
        monkeypatch.setenv("SLI_FLOAT_ACTIVATIONS", "1")  # the float kernels: no RowProduct for them
        proc.generate(torch.tensor([[3, 4, 5]]), max_new_tokens=2, eos_token_id=[])
        assert calls == []
        monkeypatch.delenv("SLI_FLOAT_ACTIVATIONS")
        batch = torch.randint(0, 256, (kernels.FUSED_MAX_TOKENS + 1, 4), generator=torch.Generator().manual_seed(2))
        proc.generate(batch, max_new_tokens=2, eos_token_id=[])
        assert calls == []
        proc.generate(batch[:3], max_new_tokens=2, eos_token_id=[])
        assert len(calls) == proc.layout.num_layers  # a batch of 3 rows: one step per layer for the 2nd token


@pytest.mark.parametrize("mode", ["int8", "nf4", "fp4", "int4"])
@pytest.mark.parametrize("rows", [1, 3])
def test_a_bound_product_is_the_modules_product_bit_for_bit(mode, rows):
    # in = 320: INT4's groups of 128 pad it to 384; INT8 keeps outlier columns in float
    from sli.quantization import LayerQuantizer

    g = torch.Generator().manual_seed(4)
    weight = torch.randn(48, 320, generator=g) * 0.05
    weight[::3, 7] = 7.0  # an outlier column (INT8 keeps |w| > 6 in 16-bit)
    bias = torch.randn(48, generator=g)
    quantizer = LayerQuantizer(QuantizationConfig(mode=mode))
    layer = torch.nn.Sequential(torch.nn.Linear(320, 48))
    layer[0].weight.data, layer[0].bias.data = weight.bfloat16().float(), bias
    qlayer = quantizer.quantize_layer(layer)
    module = qlayer[0]
    assert isinstance(module, QuantizedLinear)
    if mode == "int8":
        assert module.qweight.tensors["weight.outlier_cols"].numel() > 0
    x = torch.randn(rows, 320, generator=g)
    product = module.codec.row_product(module.codec.prepare(module.qweight), module.bias)
    y = np.empty((rows, 48), np.float32)
    product(x.numpy(), product.activations.quantize(x.numpy()), y)
    with torch.inference_mode():
        want = module(x)
    assert torch.equal(torch.from_numpy(y), want)
    buffers = product.activations.buffers(rows)  # reused buffers give the same
    y2 = np.empty_like(y)
    product(x.numpy(), product.activations.quantize(x.numpy(), buffers), y2)
    assert np.array_equal(y, y2)


@pytest.mark.parametrize("kv_dtype", ["bfloat16", "int8"])
def test_append_one_writes_what_update_writes(kv_dtype):
    g = torch.Generator().manual_seed(6)
    by_update, by_append = compact_kv_layer(kv_dtype, reserve=8), compact_kv_layer(kv_dtype, reserve=8)
    prompt = torch.randn(1, 2, 3, 16, generator=g)
    for layer in (by_update, by_append):
        layer.update(prompt, prompt * 2)
    assert not compact_kv_layer(kv_dtype).append_one(np.zeros(32, np.float32), np.zeros(32, np.float32))
    for _ in range(4):
        k, v = torch.randn(1, 2, 1, 16, generator=g) * 5, torch.randn(1, 2, 1, 16, generator=g)
        by_update.update(k, v)
        assert by_append.append_one(k.reshape(-1).numpy().copy(), v.reshape(-1).numpy().copy())
    assert by_update.length == by_append.length == 7
    for a, b in ((by_update._keys, by_append._keys), (by_update._values, by_append._values)):
        assert torch.equal(a.data[:, :, :7], b.data[:, :, :7])
        if kv_dtype == "int8":
            assert torch.equal(a.scale[:, :, :7], b.scale[:, :, :7])
    full = compact_kv_layer(kv_dtype, reserve=1)
    full.update(prompt[:, :, :1], prompt[:, :, :1])
    assert not full.append_one(np.zeros(32, np.float32), np.zeros(32, np.float32))  # no room: update grows it


def test_the_small_kernels_equal_torch():
    ops = kernels.layer_ops()
    g = torch.Generator().manual_seed(7)
    x, delta, w = torch.randn(3, 96, generator=g), torch.randn(3, 96, generator=g), torch.randn(96, generator=g)
    out = np.empty((3, 96), np.float32)
    ops["rms_norm"](x.numpy(), w.numpy(), 1e-5, out)
    want = w * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-5))
    assert torch.allclose(torch.from_numpy(out), want, atol=1e-5)
    residual = x.clone()
    ops["add_rms_norm"](residual.numpy(), delta.numpy(), w.numpy(), 1e-5, out)
    s = x + delta
    assert torch.equal(residual, s)
    assert torch.allclose(torch.from_numpy(out), w * (s * torch.rsqrt(s.pow(2).mean(-1, keepdim=True) + 1e-5)), atol=1e-5)
    q = torch.randn(3, 4 * 16, generator=g)
    cos, sin = torch.randn(3, 16, generator=g), torch.randn(3, 16, generator=g)
    rotated = q.clone()
    ops["rotate"](rotated.numpy(), 4, cos.numpy(), sin.numpy())
    heads = q.view(3, 4, 16)
    half = torch.cat((-heads[..., 8:], heads[..., :8]), dim=-1)
    assert torch.allclose(rotated.view(3, 4, 16), heads * cos[:, None] + half * sin[:, None], atol=1e-6)
    gate, up = torch.randn(3, 96, generator=g) * 4, torch.randn(3, 96, generator=g)
    gate[0, :4] = torch.tensor([100.0, -100.0, 0.0, -90.0])  # past exp's float32 range either way
    ops["silu_mul"](gate.numpy(), up.numpy(), out)
    want = F.silu(gate) * up
    assert torch.allclose(torch.from_numpy(out), want, rtol=3e-7, atol=1e-6)
    assert torch.allclose(torch.from_numpy(out[0, :4]), want[0, :4], rtol=1e-7, atol=1e-30)  # no inf, no NaN


def test_streamed_layers_keep_the_op_by_op_step_and_resident_ones_are_ready_after_the_prompt(
        model_factory, tmp_path, monkeypatch):
    ids = torch.randint(0, 256, (1, 5), generator=torch.Generator().manual_seed(9))
    with _processor(model_factory("llama"), tmp_path, "int8") as proc:  # every layer resident
        monkeypatch.setenv("SLI_NO_RESIDENT_DECODE", "1")
        proc._step(ids, torch.ones(1, 5, dtype=torch.long), torch.arange(5)[None], proc._new_kv_cache(8))
        steps = [proc.runner.decode_step(i) for i in range(proc.layout.num_layers)]
        assert all(step._one_call is not None for step in steps)  # made (and compiled) by the prompt's pass
    with UniversalSLIProcessor(model_factory("llama"), QuantizationConfig(mode="int8"), cache_dir=tmp_path / "s",
                               device="cpu", memory_budget_gb=0.0) as proc:  # every layer streamed
        assert proc.plan.resident_layers == []
        ran = _count_one_calls(monkeypatch)
        steps = _count_steps(monkeypatch)
        proc.generate(ids, max_new_tokens=3, eos_token_id=[])
        assert ran == [] and len(steps) == 2 * proc.layout.num_layers  # the op-by-op step, every layer
