"""A decode step's attention reads int8 / bfloat16 keys and values in place (sli.attention)."""
import pytest
import torch
import torch.nn.functional as F

from sli import UniversalSLIProcessor, kernels
from sli import attention as sli_attention
from sli.kv_cache import KVRead, compact_kv_layer


def _reference(q, k, k_scale, v, v_scale, bias, length, scaling):
    kf = k.float() if k_scale is None else k.float() * k_scale[..., None]
    vf = v.float() if v_scale is None else v.float() * v_scale[..., None]
    return F.scaled_dot_product_attention(q[None, :, None], kf[None, :, :length], vf[None, :, :length],
                                          attn_mask=bias[None, None, None], scale=scaling, enable_gqa=True)[0, :, 0]


def check_decode_attention():
    """The kernel against SDPA on the widened values: int8 and bfloat16, grouped heads, head
    sizes with and without a tail past the last 64 values, masked positions, a buffer longer
    than the context."""
    g = torch.Generator().manual_seed(0)
    for heads, kv_heads, dim, capacity, length in [(8, 8, 128, 70, 64), (9, 3, 64, 40, 33), (12, 2, 80, 9, 9),
                                                    (4, 4, 32, 5, 1), (16, 1, 64, 20, 17)]:
        q = torch.randn(heads, dim, generator=g)
        k, v = torch.randn(kv_heads, capacity, dim, generator=g), torch.randn(kv_heads, capacity, dim, generator=g)
        k_scale, v_scale = k.abs().amax(-1) / 127, v.abs().amax(-1) / 127
        bias = torch.zeros(length)
        bias[: length // 3] = float("-inf")  # a left-padded row
        for stored in [(torch.round(k / k_scale[..., None]).to(torch.int8), k_scale,
                        torch.round(v / v_scale[..., None]).to(torch.int8), v_scale),
                       (k.bfloat16(), None, v.bfloat16(), None)]:
            got = kernels.decode_attention(q, stored[0], stored[1], stored[2], stored[3], bias, length, dim ** -0.5)
            want = _reference(q, *stored, bias, length, dim ** -0.5)
            assert float((got - want).abs().max()) < 1e-5, (heads, kv_heads, dim, stored[0].dtype)


def test_decode_attention_kernel_equals_sdpa_on_the_widened_values():
    check_decode_attention()


@pytest.mark.parametrize("length, split", [(128, False), (4096, True)])
def test_decode_attention_is_split_across_threads_from_a_long_context_on(length, split, monkeypatch):
    # a 7B-shaped layer's 32 heads of 128: at 128 positions one thread (the pool's thread beside
    # a polling team worker waited for a core), at 4096 split; the same values either way
    from sli.kernels import dispatch

    monkeypatch.setattr(dispatch, "INLINE_WORK", 0)
    runs = []
    real_run = kernels._run
    monkeypatch.setattr(kernels, "_run", lambda name, *a: runs.append(name) or real_run(name, *a))
    g = torch.Generator().manual_seed(1)
    q = torch.randn(32, 128, generator=g)
    k, v = (torch.randint(-127, 128, (32, length, 128), generator=g, dtype=torch.int8) for _ in range(2))
    scale = torch.rand(32, length, generator=g) / 127
    got = kernels.decode_attention(q, k, scale, v, scale, torch.zeros(length), length, 128 ** -0.5)
    assert runs == (["decode_attention_int8"] if split else [])
    assert float((got - _reference(q, k, scale, v, scale, torch.zeros(length), length, 128 ** -0.5)).abs().max()) < 1e-4


def _processor(model_dir, tmp_path, kv_dtype, **kwargs):
    return UniversalSLIProcessor(model_dir, "int8", cache_dir=tmp_path / "c", device="cpu", memory_budget_gb=0.0,
                                 kv_dtype=kv_dtype, **kwargs)


def _count_kernel_calls(monkeypatch):
    """The context length of each decode attention kernel call (through sli.attention's
    function or the decode step's own call)."""
    calls = []
    real = kernels.decode_attention_arrays
    monkeypatch.setattr(kernels, "decode_attention_arrays", lambda *a: calls.append(a[6]) or real(*a))
    return calls


@pytest.mark.parametrize("kv_dtype", ["int8", "bfloat16"])
def test_decode_reads_compact_kv_in_place_and_gives_the_float_copys_tokens(kv_dtype, model_factory, tmp_path,
                                                                           monkeypatch):
    model_dir = model_factory("llama")
    # a left-padded batch: row 0's first three positions are masked in every step
    ids = torch.randint(0, 256, (2, 9), generator=torch.Generator().manual_seed(3))
    mask = torch.ones(2, 9, dtype=torch.long)
    mask[0, :3] = 0
    with _processor(model_dir, tmp_path, kv_dtype) as proc:
        assert proc.reads_kv_in_place and proc.model.config._attn_implementation == "sli"
        calls = _count_kernel_calls(monkeypatch)
        in_place = proc.generate(ids, attention_mask=mask, max_new_tokens=6, eos_token_id=[])
        proc.reads_kv_in_place = False  # the layers hand attention float copies, as before
        copies = proc.generate(ids, attention_mask=mask, max_new_tokens=6, eos_token_id=[])
    layers, rows, decode_steps = proc.layout.num_layers, 2, 5  # the first new token comes from the prompt pass
    assert len(calls) == layers * rows * decode_steps and set(calls) == set(range(10, 15))  # context per step
    assert in_place.tolist() == copies.tolist()


def test_in_place_logits_match_the_float_copies_closely(model_factory, tmp_path):
    model_dir = model_factory("llama")
    ids = torch.randint(0, 256, (1, 12), generator=torch.Generator().manual_seed(5))
    logits = []
    for in_place in (True, False):
        with _processor(model_dir, tmp_path, "int8") as proc:
            proc.reads_kv_in_place = in_place
            session = proc.new_session()
            seen = []
            proc.generate(ids, max_new_tokens=4, eos_token_id=[], session=session,
                          callback=lambda token: seen.append(int(token[0])))
            kv = session.kv_cache
            step_ids = torch.tensor([[seen[-1]]])
            length = kv.get_seq_length()
            logits.append(proc.step_many([(step_ids, torch.ones(1, length + 1, dtype=torch.long),
                                           torch.tensor([[length]]), kv)])[0])
    assert float((logits[0] - logits[1]).abs().max()) < 1e-4 * float(logits[1].abs().max())


def test_a_batch_of_sequences_at_different_lengths_reads_each_row_in_place(model_factory, tmp_path, monkeypatch):
    # A server's decode step: each row attends to its own stored positions, no padded float copy.
    prompts = [torch.tensor([[3, 4, 5, 6, 7, 8, 9]]), torch.tensor([[20, 21]]), torch.tensor([[40, 41, 42, 43]])]
    with _processor(model_factory("llama"), tmp_path, "int8") as proc:
        alone = [proc.generate(p, max_new_tokens=3, eos_token_id=[])[0].tolist() for p in prompts]
        sessions = [proc.new_session() for _ in prompts]
        items = []
        for p, session in zip(prompts, sessions):
            ids, mask = session.continue_with(p)
            items.append((ids, mask, torch.arange(ids.shape[1]).view(1, -1), session.kv_cache))
        answers = [[] for _ in prompts]
        calls = _count_kernel_calls(monkeypatch)
        for _ in range(3):
            rows = []
            for i, (logit, session) in enumerate(zip(proc.step_many(items), sessions)):
                token = int(logit.argmax(-1))
                answers[i].append(token)
                length = session.kv_cache.get_seq_length()
                rows.append((torch.tensor([[token]]), torch.ones(1, length + 1, dtype=torch.long),
                             torch.tensor([[length]]), session.kv_cache))
            items = rows
    assert answers == alone
    assert sorted(set(calls)) == [3, 4, 5, 6, 8, 9]  # steps 2 and 3: each row its own context length


def test_a_prompt_chunk_gets_float_copies_and_sdpa(model_factory, tmp_path, monkeypatch):
    with _processor(model_factory("llama"), tmp_path, "bfloat16") as proc:
        calls = _count_kernel_calls(monkeypatch)
        proc.forward(torch.tensor([[1, 2, 3, 4]]))
        proc.generate(torch.tensor([[1, 2, 3, 4]]), max_new_tokens=1, eos_token_id=[])
    assert calls == []


def test_float32_kv_and_turned_off_kernels_keep_sdpa(model_factory, tmp_path, monkeypatch):
    with _processor(model_factory("llama"), tmp_path, "float32") as proc:
        assert not proc.reads_kv_in_place and proc.model.config._attn_implementation == "sdpa"
    monkeypatch.setenv("SLI_NO_NUMBA", "1")
    with _processor(model_factory("llama"), tmp_path, "int8") as proc:
        calls = _count_kernel_calls(monkeypatch)
        proc.generate(torch.tensor([[1, 2, 3, 4]]), max_new_tokens=3, eos_token_id=[])
    assert calls == []


def test_a_kv_read_releases_a_spilled_layers_pages_after_attention(tmp_path):
    layer = compact_kv_layer("int8", reserve=8, spill_dir=tmp_path, packed_reads=True)
    released = []
    layer.release = lambda: released.append(True)
    keys, values = layer.update(torch.randn(1, 2, 3, 16), torch.randn(1, 2, 3, 16))
    assert isinstance(keys, KVRead) and keys.dtype == torch.int8 and not released
    module = torch.nn.Module()
    out, _ = sli_attention.attention_forward(module, torch.randn(1, 2, 1, 16), keys, values, None)
    assert out.shape == (1, 1, 2, 16) and released == [True]


def test_softmax_exponentials_are_exp_to_float_precision_and_masked_positions_weigh_nothing():
    # the attention kernels' own exp (numba's np.exp is a libm call a value): within a few ulps
    # of exp where a softmax weight can matter, and exactly 0 for a masked (-inf) position
    import numpy as np

    from sli.kernels.attention import exp_shifted

    x = np.concatenate([np.linspace(-80, 0, 20001), [-np.inf, -1e30]]).astype(np.float32)
    got = x.copy()
    exp_shifted(got, np.float32(0.0), np.empty(x.size, np.int32), x.size)
    want = np.exp(x.astype(np.float64))
    assert float((np.abs(got[:-2] - want[:-2]) / want[:-2]).max()) < 3e-7
    assert got[-2] == 0.0 and got[-1] == 0.0
    shifted = np.array([5.0, 3.0, -np.inf], np.float32)  # scores less their maximum, as a softmax takes them
    exp_shifted(shifted, np.float32(5.0), np.empty(3, np.int32), 3)
    assert np.allclose(shifted, [1.0, np.exp(-2.0), 0.0], rtol=3e-7, atol=0)


def test_a_masked_positions_values_never_reach_the_output():
    # a left-padded row's masked positions may hold anything (NaN included): their weight is 0
    g = torch.Generator().manual_seed(1)
    q, k, v = torch.randn(4, 64, generator=g), torch.randn(2, 12, 64, generator=g), torch.randn(2, 12, 64, generator=g)
    bias = torch.zeros(12)
    bias[:5] = float("-inf")
    want = _reference(q, k.bfloat16(), None, v.bfloat16(), None, bias, 12, 0.125)
    v[:, :5] = float("nan")
    got = kernels.decode_attention(q, k.bfloat16(), None, v.bfloat16(), None, bias, 12, 0.125)
    assert torch.isfinite(got).all()
    assert float((got - want).abs().max()) < 1e-5
