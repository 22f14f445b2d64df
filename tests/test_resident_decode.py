"""One sequence's decode token over resident layers without the model's forward
(sli.resident_decode): the forward's logits, bit for bit, and the forward wherever it does not apply."""
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from sli import UniversalSLIProcessor, resident_decode
from sli.quantization import QuantizationConfig


def _processor(model_dir, tmp_path, mode="int8", budget_gb=1.0, **kwargs):
    return UniversalSLIProcessor(model_dir, QuantizationConfig(mode=mode), cache_dir=tmp_path / mode, device="cpu",
                                 memory_budget_gb=budget_gb, **kwargs)


def _count_tokens(monkeypatch):
    """Whether each decode token took the resident path (True) or the forward (False)."""
    took = []
    real = resident_decode.ResidentDecode.run
    monkeypatch.setattr(resident_decode.ResidentDecode, "run",
                        lambda self, *a: took.append(real(self, *a)) or took[-1])
    return took


def _decode(proc, ids, steps=4, mask=None):
    """Each greedy decode step's logits after the prompt ``ids``."""
    n = ids.shape[1]
    mask = torch.ones(ids.shape[0], n + steps, dtype=torch.long) if mask is None else mask
    kv = proc._new_kv_cache(n + steps)
    with torch.inference_mode():
        logits, kv = proc._step(ids, mask[:, :n], torch.arange(n).expand(ids.shape[0], n), kv)
        out = []
        for i in range(steps):
            token = logits.argmax(-1, keepdim=True)
            logits, kv = proc._step(token, mask[:, :n + i + 1], torch.full((ids.shape[0], 1), n + i), kv)
            out.append(logits)
    return torch.stack(out)


def _both_ways(proc, ids, monkeypatch, **kwargs):
    took = _count_tokens(monkeypatch)
    resident = _decode(proc, ids, **kwargs)
    paths = [out is not None for out in took]
    monkeypatch.setenv("SLI_NO_RESIDENT_DECODE", "1")
    forward = _decode(proc, ids, **kwargs)
    monkeypatch.delenv("SLI_NO_RESIDENT_DECODE")
    return resident, forward, paths


def _with_outlier_columns(model_dir, out_dir):
    """A copy of ``model_dir`` whose first layer's q and down weights have a column INT8 keeps in float."""
    out = shutil.copytree(model_dir, out_dir)
    path = out / "model.safetensors"
    tensors = load_file(path)
    for name in ("model.layers.0.self_attn.q_proj.weight", "model.layers.0.mlp.down_proj.weight"):
        tensors[name][:, 3] = 7.0  # |w| > 6: an outlier column
    save_file(tensors, path, metadata={"format": "pt"})
    return out


@pytest.mark.parametrize("family", ["llama", "mistral", "qwen2"])
@pytest.mark.parametrize("mode", ["int8", "nf4", "int4"])
@pytest.mark.parametrize("kv_dtype", ["bfloat16", "int8"])
def test_a_resident_token_gives_the_forward_s_logits_bit_for_bit(family, mode, kv_dtype, model_factory, tmp_path,
                                                                 monkeypatch):
    ids = torch.randint(0, 256, (1, 6), generator=torch.Generator().manual_seed(5))
    with _processor(model_factory(family), tmp_path, mode, kv_dtype=kv_dtype) as proc:
        resident, forward, paths = _both_ways(proc, ids, monkeypatch)
    assert paths == [False] + [True] * 4  # the prompt through the forward, every decode token the resident way
    assert torch.equal(resident, forward)


def test_int8_outlier_columns_take_the_same_path_and_bits(model_factory, tmp_path, monkeypatch):
    model_dir = _with_outlier_columns(model_factory("llama"), tmp_path / "outliers")
    ids = torch.randint(0, 256, (1, 6), generator=torch.Generator().manual_seed(6))
    with _processor(model_dir, tmp_path, "int8") as proc:
        resident, forward, paths = _both_ways(proc, ids, monkeypatch)
        layer = proc.layers[0]
        assert layer.self_attn.q_proj.qweight.tensors["weight.outlier_cols"].tolist() == [3]
    assert paths == [False] + [True] * 4
    assert torch.equal(resident, forward)


def test_what_the_resident_path_does_not_take_goes_through_the_forward(model_factory, tmp_path, monkeypatch):
    ids = torch.randint(0, 256, (2, 5), generator=torch.Generator().manual_seed(7))
    with _processor(model_factory("llama"), tmp_path, "int8") as proc:
        _, _, paths = _both_ways(proc, ids, monkeypatch)  # a batch of two
        assert paths == [False] * 5
        mask = torch.ones(1, 9, dtype=torch.long)
        mask[0, 0] = 0  # a left-padded row
        resident, forward, paths = _both_ways(proc, ids[:1], monkeypatch, mask=mask)
        assert paths == [False] * 5 and torch.equal(resident, forward)
    with _processor(model_factory("llama"), tmp_path, "int8", budget_gb=0.0) as proc:  # every layer streamed
        assert proc.plan.resident_layers == []
        _, _, paths = _both_ways(proc, ids[:1], monkeypatch)
        assert paths == [False] * 5


def test_generate_gives_the_same_tokens_either_way(model_factory, tmp_path, monkeypatch):
    ids = torch.randint(0, 256, (1, 5), generator=torch.Generator().manual_seed(8))
    with _processor(model_factory("llama"), tmp_path, "nf4") as proc:
        took = _count_tokens(monkeypatch)
        resident = proc.generate(ids, max_new_tokens=8, eos_token_id=[])
        assert took[0] is None and len(took) == 8 and all(out is not None for out in took[1:])  # the prompt: the forward
        monkeypatch.setenv("SLI_NO_RESIDENT_DECODE", "1")
        forward = proc.generate(ids, max_new_tokens=8, eos_token_id=[])
    assert torch.equal(resident, forward)


def test_one_sequence_s_step_many_decodes_as_generate_does(model_factory, tmp_path, monkeypatch):
    # the server's step for a lone client (step_many with one sequence) takes generate's path,
    # here the resident one: generate's logits, bit for bit
    ids = torch.randint(0, 256, (1, 6), generator=torch.Generator().manual_seed(9))
    n, steps = ids.shape[1], 4
    with _processor(model_factory("llama"), tmp_path, "nf4") as proc:
        lone = _decode(proc, ids, steps)
        took = _count_tokens(monkeypatch)
        kv = proc._new_kv_cache(n + steps)
        out = []
        with torch.inference_mode():
            logits, kv = proc._step(ids, torch.ones(1, n, dtype=torch.long), torch.arange(n)[None], kv)
            for i in range(steps):
                token = logits.argmax(-1, keepdim=True)
                item = (token, torch.ones(1, n + i + 1, dtype=torch.long), torch.full((1, 1), n + i), kv)
                logits = proc.step_many([item])[0]
                out.append(logits)
    assert took[0] is None and len(took) == 1 + steps and all(t is not None for t in took[1:])
    assert torch.equal(torch.stack(out), lone)
