"""Keys and values in preallocated compact buffers, in the memory plan, and across turns."""
import pytest
import torch

from sli import UniversalSLIProcessor
from sli import transformers_adapter as hf
from sli.kv_cache import compact_kv_layer, kv_bytes_per_token


def open_processor(model_factory, tmp_path, **kwargs):
    return UniversalSLIProcessor(model_factory("llama"), "none", cache_dir=tmp_path / "cache", device="cpu",
                                 memory_budget_gb=0.0, **kwargs)


def test_float32_kv_gives_transformers_own_results(model_factory, tmp_path):
    ids = torch.randint(0, 256, (1, 9), generator=torch.Generator().manual_seed(4))
    with open_processor(model_factory, tmp_path, kv_dtype="float32") as proc:
        compact = proc.generate(ids, max_new_tokens=8, eos_token_id=[])
        proc.kv_dtype = None  # transformers' DynamicCache (torch.cat per token)
        dynamic = proc.generate(ids, max_new_tokens=8, eos_token_id=[])
    assert compact.tolist() == dynamic.tolist()


@pytest.mark.parametrize("kv_dtype, tolerance", [("bfloat16", 1e-2), ("int8", 2e-2)])
def test_compact_kv_reads_back_what_was_written(kv_dtype, tolerance):
    layer = compact_kv_layer(kv_dtype, reserve=64)
    keys, values = torch.randn(1, 2, 5, 16), torch.randn(1, 2, 5, 16)
    layer.update(keys, values)
    more_k, more_v = torch.randn(1, 2, 1, 16), torch.randn(1, 2, 1, 16)
    k, v = layer.update(more_k, more_v)
    assert k.dtype == torch.float32 and k.shape == (1, 2, 6, 16) and layer.get_seq_length() == 6
    expected = torch.cat([keys, more_k], dim=2)
    assert float((k - expected).abs().max() / expected.abs().max()) < tolerance
    assert float((v - torch.cat([values, more_v], dim=2)).abs().max()) < tolerance * 5


def test_buffers_are_written_in_place_token_after_token(model_factory, tmp_path):
    # No torch.cat per token: the reserved buffer is the same storage at every step.
    with open_processor(model_factory, tmp_path) as proc:
        pointers = []
        real_step = proc._step

        def step(ids, mask, positions, kv_cache):
            out = real_step(ids, mask, positions, kv_cache)
            pointers.append(kv_cache.layers[0]._keys.data.data_ptr())
            return out

        proc._step = step
        proc.generate(torch.tensor([[1, 2, 3]]), max_new_tokens=6, eos_token_id=[])
    assert len(set(pointers)) == 1 and len(pointers) == 6


def test_a_session_turn_feeds_only_its_own_tokens_and_matches_one_long_call(model_factory, tmp_path):
    first, second = torch.tensor([[5, 6, 7, 8]]), torch.tensor([[9, 10, 11]])
    with open_processor(model_factory, tmp_path, kv_dtype="float32") as proc:
        fed = []
        real_step = proc._step
        proc._step = lambda ids, *rest: fed.append(ids.shape[1]) or real_step(ids, *rest)
        session = proc.new_session()
        answer1 = proc.generate(first, max_new_tokens=4, eos_token_id=[], session=session)
        fed.clear()
        answer2 = proc.generate(second, max_new_tokens=4, eos_token_id=[], session=session)
        assert fed[0] == 1 + 3  # the first turn's last token, then the new prompt: nothing re-run
        assert session.length == 4 + 4 + 3 + 3 and session.pending == answer2[0, -1:].tolist()
        whole = torch.cat([first, answer1, second], dim=1)
        assert proc.generate(whole, max_new_tokens=4, eos_token_id=[]).tolist() == answer2.tolist()


def test_the_plan_reserves_the_context_keys_and_values(model_factory, tmp_path):
    with UniversalSLIProcessor(model_factory("llama"), "none", cache_dir=tmp_path / "cache", device="cpu",
                               kv_dtype="int8", max_context_tokens=100) as proc:  # no budget: all in memory
        config = proc.config
        per_token = kv_bytes_per_token(config.num_hidden_layers, config.num_key_value_heads,
                                       config.hidden_size // config.num_attention_heads, "int8")
        assert proc.plan.kv_bytes == 100 * per_token and "KV" in proc.plan.describe()
        assert proc.stats()["kv_bytes_in_memory"] == 100 * per_token and proc.stats()["kv_bytes_spilled"] == 0


def test_a_prompt_past_the_models_positions_is_refused_naming_the_limit(model_factory, tmp_path):
    with open_processor(model_factory, tmp_path) as proc:
        limit = proc.max_positions
        with pytest.raises(ValueError, match=f"more than this model's {limit}"):
            proc.generate(torch.ones(1, limit - 2, dtype=torch.long), max_new_tokens=5)


def test_unknown_kv_dtype_is_named(model_factory, tmp_path):
    with pytest.raises(ValueError, match="kv_dtype='fp16' is not one of float32, bfloat16, int8"):
        open_processor(model_factory, tmp_path, kv_dtype="fp16")


def test_sliding_window_layers_keep_transformers_cache(model_factory):
    config = hf.load_config(model_factory("gemma2"))
    cache = hf.new_kv_cache(config, lambda index: compact_kv_layer("bfloat16"))
    kinds = {type(layer).__name__ for layer in cache.layers}
    assert "CompactKVLayer" in kinds and len(kinds) == 2  # full attention compact, sliding as transformers keeps it


@pytest.mark.parametrize("family", ["llama", "gpt2", "qwen2", "mixtral", "phi3"])
def test_a_prompt_in_chunks_inside_each_layer_equals_one_piece(family, model_factory, tmp_path):
    model_dir = model_factory(family)
    ids = torch.randint(0, 200, (1, 23), generator=torch.Generator().manual_seed(5))
    with UniversalSLIProcessor(model_dir, "none", cache_dir=tmp_path / "c", device="cpu", memory_budget_gb=0.0,
                               kv_dtype="float32") as proc:
        whole = proc.generate(ids, max_new_tokens=5, eos_token_id=[])
        proc.prefill_chunk_tokens = 6  # 4 chunks: 6, 6, 6, 5
        proc.runner.timings.clear()
        chunked = proc.generate(ids, max_new_tokens=5, eos_token_id=[])
        first_pass = [t.layer for t in proc.timings if t.step == proc.timings[0].step]
    assert chunked.tolist() == whole.tolist()
    assert first_pass == list(range(proc.layout.num_layers))  # one pass over the layers for the prompt


def test_several_sequences_share_one_pass_and_each_gets_its_own_answer(model_factory, tmp_path):
    # What a server's batching step does: each layer fetched once, every sequence run through it.
    prompts = [torch.tensor([[3, 4, 5, 6, 7, 8, 9]]), torch.tensor([[20, 21]]), torch.tensor([[40, 41, 42, 43]])]
    with UniversalSLIProcessor(model_factory("llama"), "int8", cache_dir=tmp_path / "c", device="cpu",
                               memory_budget_gb=0.0, prefill_chunk_tokens=3) as proc:
        alone = [proc.generate(p, max_new_tokens=1, eos_token_id=[])[0, 0].item() for p in prompts]
        sessions = [proc.new_session() for _ in prompts]
        items = []
        for p, session in zip(prompts, sessions):
            ids, mask = session.continue_with(p)
            items.append((ids, mask, torch.arange(ids.shape[1]).view(1, -1), session.kv_cache))
        proc.runner.timings.clear()
        logits = proc.step_many(items)
        assert [int(l.argmax(-1)) for l in logits] == alone
        assert [t.layer for t in proc.timings] == list(range(proc.layout.num_layers))  # one pass for all
        assert [s.kv_cache.get_seq_length() for s in sessions] == [7, 2, 4]


def test_kv_the_budget_cannot_hold_spills_to_disk_and_leaves_memory_after_each_layer(model_factory, tmp_path):
    model_dir = model_factory("llama", num_layers=4)
    ids = torch.randint(0, 200, (1, 40), generator=torch.Generator().manual_seed(6))
    with UniversalSLIProcessor(model_dir, "int8", cache_dir=tmp_path / "c", device="cpu", kv_dtype="bfloat16",
                               memory_budget_gb=0.0, max_context_tokens=64) as reference:
        expected = reference.generate(ids, max_new_tokens=6, eos_token_id=[])
    probe = UniversalSLIProcessor(model_dir, "int8", cache_dir=tmp_path / "c", device="cpu", max_context_tokens=64)
    kv_layer = probe.plan.kv_bytes // 4
    budget = probe.plan.shared_bytes + probe.plan.streaming_bytes + probe.plan.runtime_bytes + 2 * kv_layer + 1
    probe.close()
    with UniversalSLIProcessor(model_dir, "int8", cache_dir=tmp_path / "c", device="cpu", kv_dtype="bfloat16",
                               memory_budget_gb=budget / 2**30, max_context_tokens=64) as proc:
        assert proc.plan.kv_spilled_layers == [1, 2, 3] and proc.plan.kv_bytes == 2 * kv_layer
        assert proc.stats()["kv_bytes_spilled"] == 3 * kv_layer
        session = proc.new_session()
        got = proc.generate(ids, max_new_tokens=6, eos_token_id=[], session=session)
        spilled = [layer for layer in session.kv_cache.layers if layer.spilled]
        assert len(spilled) == 3 and not list((tmp_path / "c" / "kv-spill").glob("*"))  # unlinked at once
    assert got.tolist() == expected.tolist()  # same bytes, wherever they wait


def test_single_tokens_of_several_sequences_run_as_one_batch_and_match_each_alone(model_factory, tmp_path):
    # A server's decode step: N sequences at different lengths, one [N, 1] batch through each layer.
    prompts = [torch.tensor([[3, 4, 5, 6, 7, 8, 9]]), torch.tensor([[20, 21]]), torch.tensor([[40, 41, 42, 43]])]
    with UniversalSLIProcessor(model_factory("llama"), "int8", cache_dir=tmp_path / "c", device="cpu",
                               memory_budget_gb=0.0, kv_dtype="float32") as proc:
        alone = [proc.generate(p, max_new_tokens=4, eos_token_id=[])[0].tolist() for p in prompts]
        sessions = [proc.new_session() for _ in prompts]
        answers = [[] for _ in prompts]
        items = []
        for p, session in zip(prompts, sessions):
            ids, mask = session.continue_with(p)
            items.append((ids, mask, torch.arange(ids.shape[1]).view(1, -1), session.kv_cache))
        for step in range(4):
            rows = []
            logits = proc.step_many(items)
            for i, (l, session) in enumerate(zip(logits, sessions)):
                token = int(l.argmax(-1))
                answers[i].append(token)
                length = session.kv_cache.get_seq_length()
                rows.append((torch.tensor([[token]]), torch.ones(1, length + 1, dtype=torch.long),
                             torch.tensor([[length]]), session.kv_cache))
            items = rows
            if step == 1:
                seen = []
                real = proc.runner._forwards[0]
                proc.runner._forwards[0] = lambda hidden, *a, **k: seen.append(hidden.shape[0]) or real(hidden, *a, **k)
        proc.runner._forwards[0] = real
        assert seen == [3, 3]  # steps 3 and 4: one call of layer 0 carrying all three rows
    assert answers == alone


def test_a_long_context_takes_shorter_prompt_chunks():
    from sli.chunked_prefill import MIN_CHUNK, chunk_bounds

    assert chunk_bounds(23, 6) == [(0, 6), (6, 12), (12, 18), (18, 23)]
    bounds = chunk_bounds(8191, 1456, max_pairs=1456 ** 2)
    assert bounds[0] == (0, 1456) and bounds[-1][1] == 8191
    assert all(a[1] == b[0] for a, b in zip(bounds, bounds[1:]))  # contiguous, in order
    # each chunk's queries x the keys they see stay within a chunk's square (or the shortest chunk)
    assert all((stop - start) * stop <= 1456 ** 2 or stop - start == MIN_CHUNK for start, stop in bounds)
    assert bounds[-1][1] - bounds[-1][0] < 300  # at 8k positions a chunk is a fifth of 1456
    past = chunk_bounds(100, 64, past=10_000, max_pairs=64 ** 2)  # after a long cached history
    assert {stop - start for start, stop in past[:-1]} == {MIN_CHUNK}


def test_a_spilled_layer_done_with_its_attention_starts_reading_the_next_spilled_one(tmp_path):
    from sli.kv_cache import link_spilled

    class Cache:
        layers = [compact_kv_layer("int8", 8, tmp_path), compact_kv_layer("int8", 8), compact_kv_layer("int8", 8, tmp_path),
                  compact_kv_layer("int8", 8, tmp_path)]

    cache = link_spilled(Cache())
    first, in_memory, second, third = cache.layers
    assert (first.next_spilled, second.next_spilled, third.next_spilled) == (second, third, first)  # wraps to the next token
    assert in_memory.next_spilled is None
    asked = []
    second.will_need = lambda: asked.append("second")
    first.update(torch.randn(1, 2, 3, 16), torch.randn(1, 2, 3, 16))  # its float copies read: pages dropped
    assert asked == ["second"]
    third.update(torch.randn(1, 2, 3, 16), torch.randn(1, 2, 3, 16))
    first.will_need()  # madvise over the positions written: no error, nothing changes
    assert first.get_seq_length() == 3
