"""UniversalSLIProcessor against the full transformers model, family by family."""
import json
import os
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

from sli import ModelLoadError, QuantizationConfig, UnsupportedArchitectureError
from sli.quantization import codec_for
from sli.processor import UniversalSLIProcessor
from sli.streaming import BufferPool, LayerStreamer
from sli.quantization import QuantizedLinear, is_linear, linear_weight

FAMILIES = ["llama", "mistral", "qwen2", "qwen3", "gemma2", "phi3", "gpt2", "gpt_neox", "mixtral",
            "falcon", "stablelm", "olmo", "phi", "gemma", "qwen2_moe", "qwen3_moe", "gemma3_text", "olmo2",
            "starcoder2", "granite", "cohere"]


def reference_model(model_dir, config=None):
    """The full transformers model in float32, its decoder linears replaced by dequantize(quantize(w))."""
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    if config is None or config.mode.value == "none":
        return model
    storage = next(iter(load_file(next(Path(model_dir).glob("*.safetensors"))).values())).dtype
    codec = codec_for(config.mode)
    layers = next(m for n, m in model.named_modules() if isinstance(m, torch.nn.ModuleList)
                  and len(m) == model.config.get_text_config().num_hidden_layers)
    for layer in layers:
        for module in [m for m in layer.modules() if is_linear(m)]:
            weight = linear_weight(module).detach().to(storage)
            restored = codec.dequantize(codec.quantize(weight, config), torch.float32)
            with torch.no_grad():
                target = restored.t() if type(module).__name__ == "Conv1D" else restored
                module.weight.copy_(target)
            if config.mode.value == "int8_dynamic":
                module.register_forward_pre_hook(lambda m, a: (codec.prepare_input(a[0]),))
    return model


def open_processor(model_dir, tmp_path, mode="none", **kwargs):
    kwargs.setdefault("memory_budget_gb", 0.0)  # stream every layer
    return UniversalSLIProcessor(model_dir, QuantizationConfig(mode=mode), cache_dir=tmp_path / "cache", **kwargs)


@pytest.mark.parametrize("family", FAMILIES)
def test_none_mode_equals_transformers(family, model_factory, tmp_path):
    model_dir = model_factory(family)
    reference = reference_model(model_dir)
    ids = torch.randint(0, reference.config.get_text_config().vocab_size, (2, 12), generator=torch.Generator().manual_seed(1))
    with open_processor(model_dir, tmp_path) as proc:
        with torch.no_grad():
            expected = reference(ids).logits
        torch.testing.assert_close(proc.forward(ids), expected, atol=1e-5, rtol=1e-5)
        want = reference.generate(ids[:1], max_new_tokens=6, do_sample=False, eos_token_id=None, pad_token_id=0)[:, 12:]
        got = proc.generate(ids[:1], max_new_tokens=6, eos_token_id=[])
        assert got.tolist() == want.tolist()


@pytest.mark.parametrize("mode", ["int8", "int8_dynamic", "nf4", "fp4", "int4", "fp8"])
def test_quantized_mode_equals_dequantized_reference(mode, model_factory, tmp_path):
    model_dir = model_factory("llama")
    # the layers against their dequantized reference; the 4-bit modes' int8 head has its own
    # test (test_the_4bit_modes_multiply_the_head_in_int8_on_cpu)
    config = QuantizationConfig(mode=mode, head="keep")
    reference = reference_model(model_dir, config)
    # 140 rows: past every codec's fused_max_rows, so the layers dequantize (exact in float32)
    ids = torch.randint(0, 256, (2, 70), generator=torch.Generator().manual_seed(2))
    with UniversalSLIProcessor(model_dir, config, cache_dir=tmp_path / "cache", memory_budget_gb=0.0) as proc:
        with torch.no_grad():
            expected = reference(ids).logits
        torch.testing.assert_close(proc.forward(ids), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("mode", ["int8", "int8_dynamic", "nf4", "int4"])
def test_a_prompt_on_the_matrix_units_stays_within_bfloat16_rounding_of_the_reference(mode, model_factory, tmp_path,
                                                                                       monkeypatch):
    # what a CPU with AMX runs by default: a prompt's products in bfloat16, INT8 in torch._int_mm
    monkeypatch.setenv("SLI_PROMPT_DTYPE", "bfloat16")
    monkeypatch.setenv("SLI_INT8_MATMUL", "torch")
    model_dir = model_factory("llama")
    config = QuantizationConfig(mode=mode)
    reference = reference_model(model_dir, config)
    ids = torch.randint(0, 256, (1, 140), generator=torch.Generator().manual_seed(2))  # past every fused_max_rows
    with UniversalSLIProcessor(model_dir, config, cache_dir=tmp_path / "cache", memory_budget_gb=0.0) as proc:
        with torch.no_grad():
            expected = reference(ids).logits
        got = proc.forward(ids)
    error = ((got - expected).norm() / expected.norm()).item()
    assert 0 < error < 0.01, error


def test_generation_streams_each_layer_once_per_token_over_one_position(model_factory, tmp_path):
    model_dir = model_factory("llama")
    seen_lengths = []
    with open_processor(model_dir, tmp_path) as proc:
        proc.layers[0].register_forward_pre_hook(lambda m, args, kwargs: seen_lengths.append(
            (args[0] if args else kwargs["hidden_states"]).shape[1]), with_kwargs=True)
        proc.generate(torch.arange(1, 9), max_new_tokens=5, eos_token_id=[])
        streamed = [t for t in proc.timings if not t.resident]
    assert seen_lengths == [8, 1, 1, 1, 1]
    assert len(streamed) == 5 * proc.layout.num_layers


def test_left_padded_batch_matches_each_prompt_alone(model_factory, tmp_path):
    model_dir = model_factory("llama")
    short, long_ = [5, 6, 7], [9, 10, 11, 12, 13, 14]
    ids = torch.tensor([[0, 0, 0] + short, long_])
    mask = torch.tensor([[0, 0, 0, 1, 1, 1], [1, 1, 1, 1, 1, 1]])
    with open_processor(model_dir, tmp_path) as proc:
        batch = proc.generate(ids, max_new_tokens=5, attention_mask=mask, eos_token_id=[])
        alone = [proc.generate(torch.tensor(p), max_new_tokens=5, eos_token_id=[]) for p in (short, long_)]
    assert batch[0].tolist() == alone[0][0].tolist()
    assert batch[1].tolist() == alone[1][0].tolist()


def test_callback_receives_each_token_as_it_comes(model_factory, tmp_path):
    model_dir = model_factory("llama")
    received = []
    with open_processor(model_dir, tmp_path) as proc:
        out = proc.generate(torch.arange(1, 6), max_new_tokens=4, eos_token_id=[], callback=received.append)
    assert [int(t[0]) for t in received] == out[0].tolist()


def test_resident_layers_are_not_streamed(model_factory, tmp_path):
    model_dir = model_factory("llama")
    with open_processor(model_dir, tmp_path, memory_budget_gb=1.0) as proc:
        assert proc.plan.resident_layers == list(range(proc.layout.num_layers))
        logits = proc.forward(torch.arange(1, 6))
        assert all(t.resident for t in proc.timings)
    with open_processor(model_dir, tmp_path) as streamed:
        torch.testing.assert_close(streamed.forward(torch.arange(1, 6)), logits, atol=0, rtol=0)


@pytest.mark.parametrize("mode", ["nf4", "fp4"])
def test_streamed_4bit_layers_decode_their_block_maxima_into_buffers_released_layers_gave_back(
        mode, model_factory, tmp_path, monkeypatch):
    # Fresh memory for each layer's decoded maxima costs more than decoding them (docs/benchmarks.md).
    model_dir = model_factory("llama")
    taken = []  # kept alive here, so a buffer's id repeats only when the pool hands it out again
    real_take = BufferPool.take
    monkeypatch.setattr(BufferPool, "take", lambda pool, n: taken.append(real_take(pool, n)) or taken[-1])
    with open_processor(model_dir, tmp_path, mode=mode, memory_budget_gb=1.0) as resident:
        expected = resident.generate(torch.arange(1, 9), max_new_tokens=4, eos_token_id=[])
        expected_logits = resident.forward(torch.arange(1, 4))
    assert taken == []  # a resident layer keeps what it prepared for good, and borrows nothing
    with open_processor(model_dir, tmp_path, mode=mode) as streamed:
        got = streamed.generate(torch.arange(1, 9), max_new_tokens=4, eos_token_id=[])
        got_logits = streamed.forward(torch.arange(1, 4))
        linears = sum(isinstance(m, QuantizedLinear) for m in streamed.layers[0].modules())
        loads = len([t for t in streamed.timings if not t.resident])
    assert got.tolist() == expected.tolist()
    torch.testing.assert_close(got_logits, expected_logits, atol=0, rtol=0)
    assert len(taken) >= linears * loads  # (and a prefetch of the next pass's first layer)
    assert len({id(buffer) for buffer in taken}) <= linears * (streamed.streamer.depth + 2)


def test_prewarm_is_resumable(model_factory, tmp_path):
    model_dir = model_factory("llama")
    with open_processor(model_dir, tmp_path, mode="nf4") as proc:
        assert proc.prewarm(progress=False) == proc.layout.num_layers
        assert proc.prewarm(progress=False) == 0
        proc.cache.delete(proc.model_id, 1, proc.quantization_config)
    with open_processor(model_dir, tmp_path, mode="nf4") as proc:
        assert proc.prewarm(progress=False) == 1


def test_a_cache_warmed_under_another_config_is_never_served(model_factory, tmp_path):
    model_dir = model_factory("llama")
    ids = torch.arange(1, 25)  # more rows than the fused kernels take: the float path, exact to the reference
    with open_processor(model_dir, tmp_path, mode="nf4") as proc:
        proc.prewarm(progress=False)
    reference = reference_model(model_dir, QuantizationConfig(mode="int8"))
    with open_processor(model_dir, tmp_path, mode="int8") as proc:
        with torch.no_grad():
            expected = reference(ids[None]).logits
        torch.testing.assert_close(proc.forward(ids), expected, atol=1e-5, rtol=1e-5)
        assert proc.cache.stats().entries == 2 * proc.layout.num_layers  # nf4 entries kept, int8 added


# -- bad input --------------------------------------------------------------------

def test_missing_directory_names_the_path(tmp_path):
    with pytest.raises(ModelLoadError, match="does not exist"):
        UniversalSLIProcessor(tmp_path / "nope", cache_dir=tmp_path / "c")


def test_hub_id_says_nothing_is_downloaded(tmp_path):
    with pytest.raises(ModelLoadError, match="downloads nothing"):
        UniversalSLIProcessor("meta-llama/Llama-2-7b", cache_dir=tmp_path / "c")


def test_directory_without_weights(model_factory, tmp_path):
    empty = tmp_path / "m"
    empty.mkdir()
    (empty / "config.json").write_text((Path(model_factory("llama")) / "config.json").read_text())
    with pytest.raises(ModelLoadError, match="no weights"):
        UniversalSLIProcessor(empty, cache_dir=tmp_path / "c")


def test_corrupt_shard(model_factory, tmp_path):
    broken = tmp_path / "m"
    broken.mkdir()
    src = Path(model_factory("llama"))
    (broken / "config.json").write_text((src / "config.json").read_text())
    data = (src / "model.safetensors").read_bytes()
    (broken / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(ModelLoadError, match="corrupt"):
        UniversalSLIProcessor(broken, cache_dir=tmp_path / "c")


def test_encoder_decoder_is_refused_with_the_reason(tmp_path):
    from transformers import T5Config, T5ForConditionalGeneration

    model_dir = tmp_path / "t5"
    T5ForConditionalGeneration(T5Config(d_model=32, d_ff=64, num_layers=1, num_heads=2, d_kv=16, vocab_size=64)).save_pretrained(model_dir)
    with pytest.raises(UnsupportedArchitectureError, match="encoder-decoder"):
        UniversalSLIProcessor(model_dir, cache_dir=tmp_path / "c")


@pytest.mark.parametrize("call, message", [
    (lambda p: p.forward(torch.tensor([[1, 99999]])), "outside the vocabulary"),
    (lambda p: p.forward(torch.tensor([[-1, 2]])), "outside the vocabulary"),
    (lambda p: p.generate(torch.tensor([], dtype=torch.long), max_new_tokens=2), "empty"),
    (lambda p: p.generate(torch.tensor([1, 2]), max_new_tokens=-1), "negative"),
])
def test_bad_generation_input(call, message, model_factory, tmp_path):
    with open_processor(model_factory("llama"), tmp_path) as proc:
        with pytest.raises(ValueError, match=message):
            call(proc)
        # the processor still works afterwards
        assert proc.forward(torch.tensor([[1, 2]])).shape[:2] == (1, 2)


# -- memory -----------------------------------------------------------------------

PEAK_SCRIPT = textwrap.dedent("""
    import json, sys, torch, transformers
    def status(field):
        for line in open('/proc/self/status'):
            if line.startswith(field): return int(line.split()[1]) * 1024
    torch.set_num_threads(2)
    from transformers import LlamaForCausalLM  # the modeling code every contender imports
    from sli import QuantizationConfig
    from sli.processor import UniversalSLIProcessor
    base = status('VmRSS:')  # the budget's zero: torch, the model's code and sli imported
    model_dir, cache_dir, budget = sys.argv[1], sys.argv[2], float(sys.argv[3])
    proc = UniversalSLIProcessor(model_dir, QuantizationConfig(mode='none'), cache_dir=cache_dir,
                                 memory_budget_gb=budget, max_context_tokens=40)
    proc.generate(torch.arange(1, 33), max_new_tokens=4, eos_token_id=[])
    plan = proc.plan
    print(json.dumps({"growth": status('VmHWM:') - base, "runtime_bytes": plan.runtime_bytes,
                      "resident": len(plan.resident_layers),
                      "planned": plan.fixed_bytes + len(plan.resident_layers) * plan.layer_bytes,
                      "over_budget": plan.over_budget}))
""")


def test_peak_rss_is_bounded_by_the_budget_not_the_model(tmp_path):
    from transformers import LlamaConfig

    torch.manual_seed(0)
    model_dir = tmp_path / "model"  # 151 M parameters: 0.6 GB in float32, 12 layers of 49 MB
    config = LlamaConfig(hidden_size=1024, intermediate_size=2816, num_hidden_layers=12, num_attention_heads=16,
                         num_key_value_heads=16, vocab_size=1024, bos_token_id=0, eos_token_id=1)
    AutoModelForCausalLM.from_config(config).to(torch.bfloat16).save_pretrained(model_dir)
    model_bytes = sum(f.stat().st_size for f in model_dir.glob("*.safetensors")) * 2  # as float32 in memory
    with open_processor(model_dir, tmp_path) as proc:  # warm the cache outside the measured process
        proc.prewarm(progress=False)
    script = tmp_path / "peak.py"
    script.write_text(PEAK_SCRIPT)

    def peak(budget):
        out = subprocess.run([sys.executable, str(script), str(model_dir), str(tmp_path / "cache"), str(budget / 2**30)],
                             capture_output=True, text=True, check=True, env={**os.environ, "TQDM_DISABLE": "1"})
        return json.loads(out.stdout.strip().splitlines()[-1])

    peak(model_bytes / 10)  # a first process compiles any kernel numba has not cached yet (~100 MB more, once)
    for budget in (model_bytes / 10, model_bytes / 2):
        result = peak(budget)
        growth = result["growth"]
        # what the plan counts, from sli's import: the layers in flight and the kernels' runtime
        # however small the budget, then resident layers up to it
        assert growth <= result["planned"], \
            f"peak grew {growth / 2**20:.0f} MiB, the plan counts {result['planned'] / 2**20:.0f} MiB"
        assert result["over_budget"] or growth <= budget
        assert (result["resident"] > 0) == (budget > model_bytes / 10)
        # far below what loading the model would take
        assert growth - result["runtime_bytes"] < model_bytes / 3


def _file_mappings(folder):
    """The address ranges of this process's mappings of files under ``folder``."""
    folder = os.path.realpath(folder) + os.sep
    spans = []
    with open("/proc/self/maps") as maps:
        for line in maps:
            fields = line.split()
            if len(fields) > 5 and os.path.realpath(fields[5]).startswith(folder):
                start, end = (int(v, 16) for v in fields[0].split("-"))
                spans.append((start, end))
    return spans


@pytest.mark.parametrize("tied", [False, True])
def test_a_bfloat16_checkpoint_keeps_its_embedding_and_head_in_bfloat16_on_cpu(tied, model_factory, tmp_path):
    model_dir = model_factory("llama", tie_word_embeddings=tied)
    reference = reference_model(model_dir)
    config = reference.config
    ids = torch.arange(1, 9)
    with open_processor(model_dir, tmp_path, device="cpu") as proc:
        embedding = proc.model.get_input_embeddings()
        assert embedding.weight.dtype == torch.bfloat16
        table = config.vocab_size * config.hidden_size * 2
        norm = config.hidden_size * 4
        assert proc.shared_bytes == norm + (table if tied else 2 * table)  # half of float32's
        # the head in this process's memory, not the checkpoint's file mapping: every token reads
        # all of it, and under a memory cap its file pages were evicted and read again each token
        head = proc.model.get_output_embeddings().weight
        assert not any(start <= head.data_ptr() < end for start, end in _file_mappings(model_dir))
        assert (embedding.weight.data_ptr() == head.data_ptr()) == tied
        with torch.no_grad():
            torch.testing.assert_close(proc.forward(ids), reference(ids[None]).logits, atol=1e-5, rtol=1e-5)
            token = proc.generate(ids, max_new_tokens=3, eos_token_id=[])  # the head's one-row kernel
            expected = reference.generate(ids[None], max_new_tokens=3, do_sample=False, eos_token_id=None)[0, 8:]
        assert token[0].tolist() == expected.tolist()


def test_a_bfloat16_head_is_quantized_to_int8_without_widening_it_whole(model_factory, monkeypatch):
    # a 7B model's head widened to float32 at once was 524 MB more at load than its int8 result
    from sli import shared_modules
    from sli.shared_modules import INT8_HEAD, narrow_embeddings, quantize_head

    model = AutoModelForCausalLM.from_pretrained(model_factory("llama"), dtype=torch.bfloat16).eval()
    narrow_embeddings(model, "model.layers", torch.float32)
    weight = model.get_output_embeddings().qweight.tensors["weight"]
    assert weight.dtype == torch.bfloat16
    expected = codec_for("int8").quantize(weight.float(), INT8_HEAD)
    monkeypatch.setattr(QuantizedLinear, "dequantized_weight", lambda *args, **kwargs: pytest.fail("widened whole"))
    monkeypatch.setattr(shared_modules, "SLICE_BYTES", weight.shape[1] * 2 * 7)  # slices of 7 rows, the last shorter
    assert quantize_head(model, torch.float32)
    got = model.get_output_embeddings().qweight
    assert torch.equal(got.tensors["weight"], expected.tensors["weight"])
    assert torch.equal(got.tensors["SCB"], expected.tensors["SCB"])
    assert got.metadata == {**expected.metadata, "dtype": "bfloat16"}


def test_the_int8_head_is_prepared_once_not_in_every_tokens_product(model_factory, monkeypatch):
    # the head is resident: its float32 row scales (the codec's prepare) are made once, not a fresh
    # tensor in each token's product
    from sli.quantization.codecs.base import Codec
    from sli.shared_modules import quantize_head

    model = AutoModelForCausalLM.from_pretrained(model_factory("llama"), dtype=torch.float32).eval()
    expected = model.get_output_embeddings().weight.detach().clone()
    assert quantize_head(model, torch.float32)
    head = model.get_output_embeddings()
    monkeypatch.setattr(Codec, "_prepared", staticmethod(lambda *a, **k: pytest.fail("prepared again")))
    x = torch.randn(1, 1, head.in_features, generator=torch.Generator().manual_seed(0))
    y = head(x)  # one token: the fused int8 kernel
    torch.testing.assert_close(y, x @ expected.T, atol=0.05 * float(y.abs().max()), rtol=0)


def _mapped_rss(path):
    """This process's resident bytes of its mappings of ``path`` (/proc/self/smaps)."""
    path, rss, inside = os.path.realpath(path), 0, False
    with open("/proc/self/smaps") as smaps:
        for line in smaps:
            fields = line.split()
            if "-" in fields[0] and not fields[0].endswith(":"):
                inside = len(fields) > 5 and os.path.realpath(fields[5]) == path
            elif inside and fields[0] == "Rss:":
                rss += int(fields[1]) * 1024
    return rss


@pytest.mark.parametrize("step", ["own_head", "quantize_head"])
def test_a_mapped_head_is_read_a_slice_at_a_time_not_held_whole_beside_its_copy(step, tmp_path, monkeypatch):
    # a bfloat16 checkpoint's head is a view of its file mapping; copied or quantized whole it
    # sat in memory twice at load (a 7B model's: 262 MB more than the budget's room)
    from safetensors import safe_open
    from torch import nn
    from sli import shared_modules
    from sli.page_cache import in_file_mapping

    table = torch.randn(16384, 1024, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)  # 32 MB
    path = tmp_path / "head.safetensors"
    save_file({"weight": table}, str(path))
    monkeypatch.setattr(shared_modules, "SLICE_BYTES", 2 << 20)
    with safe_open(str(path), framework="pt") as f:
        weight = f.get_tensor("weight")
    assert in_file_mapping(weight.data_ptr())
    held = []
    slices = shared_modules.row_slices

    def watched(w):
        for start, part in slices(w):
            yield start, part
            held.append(_mapped_rss(path))  # the slice just read, before it is let go

    monkeypatch.setattr(shared_modules, "row_slices", watched)
    model = nn.Module()
    model.head = nn.Linear(1024, 16384, bias=False, dtype=torch.bfloat16)
    model.head.weight = nn.Parameter(weight, requires_grad=False)
    model.get_output_embeddings = lambda: model.head
    model.set_output_embeddings = lambda module: setattr(model, "head", module)
    if step == "own_head":
        shared_modules.own_head(model)
        assert torch.equal(model.head.weight, table) and not in_file_mapping(model.head.weight.data_ptr())
    else:
        assert shared_modules.quantize_head(model, torch.float32)
        expected = codec_for("int8").quantize(table, shared_modules.INT8_HEAD).tensors
        assert torch.equal(model.head.qweight.tensors["weight"], expected["weight"])
    assert len(held) == 16
    # the slice being read, and the rest of the page cache's large folios (up to 2 MB) it lies in
    assert max(held) <= 6 << 20, f"{max(held) >> 20} MB of the 32 MB table mapped at once"
    assert torch.equal(weight, table)  # what was let go reads back from the file


@pytest.mark.parametrize("tied", [False, True])
def test_the_4bit_modes_multiply_the_head_in_int8_on_cpu(tied, model_factory, tmp_path):
    # llama.cpp's 4-bit files keep their output at 6-8 bits too; a token reads the whole head
    model_dir = model_factory("llama", tie_word_embeddings=tied)
    config = reference_model(model_dir).config
    ids = torch.arange(1, 9)
    table = config.vocab_size * config.hidden_size
    logits, shared = {}, {}
    for head in ("keep", "auto", "int8"):
        quantization = QuantizationConfig(mode="nf4", head=head)
        with UniversalSLIProcessor(model_dir, quantization, cache_dir=tmp_path / "cache", memory_budget_gb=0.0,
                                   device="cpu") as proc:
            module = proc.model.get_output_embeddings()
            assert module.metadata["codec"] == ("none" if head == "keep" else "int8")
            assert proc.model.get_input_embeddings().weight.dtype == torch.bfloat16  # the lookups as stored
            shared[head] = proc.shared_bytes
            head_bytes = sum(b.numel() * b.element_size() for b in module.buffers())
            with torch.no_grad():
                logits[head] = proc.forward(ids)
                generated = proc.generate(ids, max_new_tokens=3, eos_token_id=[])  # the head's one-row kernel
            assert generated.shape == (1, 3)
            rows = torch.randn(3, config.hidden_size, generator=torch.Generator().manual_seed(0))
            with torch.no_grad():  # a row's logits alone equal its logits in a batch (a server's greedy tokens)
                assert torch.equal(module(rows)[1:2], module(rows[1:2]))
    # int8 bytes, a float32 scale a row as stored and as prepared (the scale / 127, made once):
    # beside the tied embedding's table, or instead of the bfloat16 head
    assert table + 8 * config.vocab_size <= head_bytes < table + 8 * config.vocab_size + 64
    assert shared["auto"] == shared["keep"] + head_bytes - (0 if tied else 2 * table)
    assert torch.equal(logits["auto"], logits["int8"])
    error = (logits["auto"] - logits["keep"]).abs().max() / logits["keep"].abs().max()
    assert 0 < error < 0.02


def test_the_head_stays_as_stored_for_int8_and_none_unless_asked(model_factory, tmp_path):
    assert not QuantizationConfig(mode="int8").int8_head and not QuantizationConfig(mode="none").int8_head
    assert QuantizationConfig(mode="int8", head="int8").int8_head
    assert all(QuantizationConfig(mode=m).int8_head for m in ("nf4", "fp4", "int4"))
    assert not QuantizationConfig(mode="nf4", head="keep").int8_head
    with pytest.raises(ValueError, match="head='bf16' is not supported; use one of auto, int8, keep"):
        QuantizationConfig(mode="nf4", head="bf16")
    with open_processor(model_factory("llama"), tmp_path, mode="int8", device="cpu") as proc:
        assert proc.model.get_output_embeddings().metadata["codec"] == "none"


@pytest.mark.parametrize("tied", [False, True])
def test_a_float32_checkpoint_s_head_is_read_from_memory_not_from_the_file(tied, model_factory, tmp_path):
    # loaded as stored, the head was a view of the file mapping (the bfloat16 case: above)
    model_dir = tmp_path / "float32"
    reference = AutoModelForCausalLM.from_pretrained(model_factory("llama", tie_word_embeddings=tied),
                                                     torch_dtype=torch.float32)
    reference.save_pretrained(model_dir)
    ids = torch.arange(1, 9)
    with open_processor(model_dir, tmp_path, device="cpu") as proc:
        head = proc.model.get_output_embeddings().weight
        assert head.dtype == torch.float32
        assert not any(start <= head.data_ptr() < end for start, end in _file_mappings(model_dir))
        assert (proc.model.get_input_embeddings().weight.data_ptr() == head.data_ptr()) == tied
        with torch.no_grad():
            torch.testing.assert_close(proc.forward(ids), reference(ids[None]).logits, atol=1e-5, rtol=1e-5)


_FIRST_TOKEN_COMPILES = """
import sys, torch
from sli import QuantizationConfig, UniversalSLIProcessor, kernels
model_dir, cache_dir, mode = sys.argv[1:4]
proc = UniversalSLIProcessor(model_dir, QuantizationConfig(mode=mode), cache_dir=cache_dir, device="cpu",
                             memory_budget_gb=0.05)
def compiled():
    return {name: len(k.signatures) for name, k in kernels._table().items()}
before = compiled()
proc.generate(torch.tensor([[3, 5, 7, 11, 13, 17, 19, 23, 29, 31, 37, 41, 43, 47, 53, 59, 61, 67]]), max_new_tokens=3)
after = compiled()
print("used", sorted(n for n, c in after.items() if c))
assert after == before, (before, after)
"""


@pytest.mark.parametrize("mode", ["none", "int8", "nf4"])
def test_loading_readies_the_cpu_kernels_so_the_first_prompt_and_token_compile_nothing(mode, model_factory, tmp_path):
    # A fresh process: the kernels are compiled once per process.
    model_dir = model_factory("llama", "tiny")
    done = subprocess.run([sys.executable, "-c", _FIRST_TOKEN_COMPILES, str(model_dir), str(tmp_path / "cache"), mode],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "used []" not in done.stdout  # the kernels did run


_SECOND_PROCESS_COMPILES = """
import gc, sys, torch
from numba.core.caching import NullCache
from numba.core.dispatcher import Dispatcher
from sli import QuantizationConfig, UniversalSLIProcessor
from sli.kernels import dispatch
torch.set_num_threads(2)
dispatch.TEAM_WORK = 0  # every product on the kernel team, from the compiled decode step too
model_dir, cache_dir, mode = sys.argv[1:4]
with UniversalSLIProcessor(model_dir, QuantizationConfig(mode=mode), cache_dir=cache_dir, device="cpu") as proc:
    proc.generate(torch.tensor([[3, 5, 7, 11]]), max_new_tokens=3)
    assert dispatch.team() is not None
cached = [d for d in gc.get_objects() if isinstance(d, Dispatcher) and not isinstance(d._cache, NullCache)]
print("hits", sum(sum(d.stats.cache_hits.values()) for d in cached))
print("compiled", sorted(d.py_func.__qualname__ for d in cached if sum(d.stats.cache_misses.values())))
"""


@pytest.mark.parametrize("mode", ["none", "nf4"])
def test_a_second_process_loads_every_kernel_from_numba_s_cache(mode, model_factory, tmp_path):
    # numba keys a cached function by its closure, pickled: a helper there without a stable id
    # pickles differently in each process, and the kernel compiles again in every one (seconds)
    model_dir = model_factory("llama", "tiny")
    runs = [subprocess.run([sys.executable, "-c", _SECOND_PROCESS_COMPILES, str(model_dir), str(tmp_path), mode],
                           capture_output=True, text=True, timeout=900) for _ in range(2)]
    for done in runs:
        assert done.returncode == 0, done.stderr[-3000:]
    assert "compiled []" in runs[1].stdout, runs[1].stdout
    assert "hits 0" not in runs[1].stdout


_READS_A_WARM_CACHE = """
import sys, torch
from sli import QuantizationConfig, UniversalSLIProcessor
model_dir, cache_dir = sys.argv[1:3]
with UniversalSLIProcessor(model_dir, QuantizationConfig(mode="nf4"), cache_dir=cache_dir, device="cpu") as proc:
    proc.generate(torch.tensor([[3, 5, 7, 11]]), max_new_tokens=2)
print("bitsandbytes imported:", "bitsandbytes" in sys.modules)
"""


def test_a_process_reading_a_warm_nf4_cache_does_not_import_bitsandbytes(model_factory, tmp_path):
    # importing it costs seconds (torch.compile's modules); only quantizing a layer needs it
    model_dir = model_factory("llama", "tiny")
    with UniversalSLIProcessor(model_dir, QuantizationConfig(mode="nf4"), cache_dir=tmp_path, device="cpu") as proc:
        assert proc.prewarm(progress=False) == proc.layout.num_layers
    done = subprocess.run([sys.executable, "-c", _READS_A_WARM_CACHE, str(model_dir), str(tmp_path)],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "bitsandbytes imported: False" in done.stdout, done.stdout


def test_the_runner_runs_any_range_of_layers_on_given_hidden_states(model_factory, tmp_path):
    # What pipeline stages and calibration need: [0, n) in one call, or [0, k) then [k, n).
    with UniversalSLIProcessor(model_factory("llama", num_layers=4), "int8", cache_dir=tmp_path, device="cpu") as proc:
        seen = {}
        first, last = proc.layers[0], proc.layers[-1]
        h1 = first.register_forward_pre_hook(lambda m, args, kwargs: seen.setdefault("in", (args, kwargs)),
                                             with_kwargs=True)
        h2 = last.register_forward_hook(lambda m, args, out: seen.setdefault("out", out))
        proc.forward(torch.tensor([[5, 6, 7, 8]]))
        h1.remove(), h2.remove()
        (hidden,), kwargs = seen["in"]
        expected = seen["out"][0] if isinstance(seen["out"], tuple) else seen["out"]
        whole = proc.runner.run_range(hidden, 0, 4, **kwargs)
        staged = proc.runner.run_range(proc.runner.run_range(hidden, 0, 1, **kwargs), 1, 4, **kwargs)
    assert torch.equal(whole, expected) and torch.equal(staged, expected)
    assert not proc.runner.in_flight  # every streamed layer released


# The dequantize strategy is CUDA's path (layers dequantized into reused buffers, plain
# modules); selectable on CPU so its logic runs here. Only the CUDA calls stay GPU-only.
@pytest.mark.parametrize("family", ["llama", "gpt2", "mixtral", "gemma2"])
def test_dequantize_strategy_equals_transformers(family, model_factory, tmp_path):
    model_dir = model_factory(family)
    reference = reference_model(model_dir)
    ids = torch.randint(0, reference.config.get_text_config().vocab_size, (2, 12), generator=torch.Generator().manual_seed(1))
    with open_processor(model_dir, tmp_path, strategy="dequantize", device="cpu") as proc:
        assert not proc.packed and not any(isinstance(m, QuantizedLinear) for m in proc.layers.modules())
        with torch.no_grad():
            expected = reference(ids).logits
        torch.testing.assert_close(proc.forward(ids), expected, atol=1e-5, rtol=1e-5)
        want = reference.generate(ids[:1], max_new_tokens=6, do_sample=False, eos_token_id=None, pad_token_id=0)[:, 12:]
        assert proc.generate(ids[:1], max_new_tokens=6, eos_token_id=[]).tolist() == want.tolist()


@pytest.mark.parametrize("mode", ["int8", "nf4"])
def test_dequantize_strategy_equals_the_dequantized_reference(mode, model_factory, tmp_path):
    model_dir = model_factory("llama")
    config = QuantizationConfig(mode=mode)
    reference = reference_model(model_dir, config)
    ids = torch.randint(0, 256, (2, 10), generator=torch.Generator().manual_seed(2))
    with UniversalSLIProcessor(model_dir, config, cache_dir=tmp_path / "cache", memory_budget_gb=0.0,
                               strategy="dequantize", device="cpu") as proc:
        with torch.no_grad():
            expected = reference(ids).logits
        torch.testing.assert_close(proc.forward(ids), expected, atol=1e-5, rtol=1e-5)


def test_dequantize_strategy_reuses_its_buffer_slots_and_prefetches_in_order(model_factory, tmp_path):
    model_dir = model_factory("llama", num_layers=4)
    with UniversalSLIProcessor(model_dir, "nf4", cache_dir=tmp_path / "cache", memory_budget_gb=0.0,
                               strategy="dequantize", device="cpu", prefetch_depth=1) as proc:
        loads, real_read = [], proc.streamer._read
        proc.streamer._read = lambda index, owned: loads.append(index) or real_read(index, owned)
        slots = set()
        real_take = proc.streamer.pool.take
        proc.streamer.pool.take = lambda template: (lambda s: slots.add(id(s)) or s)(real_take(template))
        proc.generate(torch.tensor([[1, 2, 3]]), max_new_tokens=3, eos_token_id=[])
        proc.streamer.cancel()  # waits for the last prefetch (the next pass's first layer) to finish
        assert proc.streamer.pool.made == 2  # the running layer and the one prefetched
        assert len(slots) == 2  # the same two slots, pass after pass
        # layer 0 (no pass before it) on this thread while the prefetcher reads layer 1, then each
        # next layer ahead, wrapping to 0 at the end
        assert sorted(loads[:2]) == [0, 1] and loads[2:] == [2, 3, 0, 1, 2, 3, 0, 1, 2, 3, 0]


@pytest.mark.parametrize("slow", ["reading", "computing"])
def test_the_thread_that_would_wait_readies_a_streamed_layer(slow, model_factory, tmp_path, monkeypatch):
    # When reading is the bottleneck (a memory cap) the compute thread, waiting anyway, readies
    # the layer it waits for, and the reader goes on to the next read; otherwise the reader does.
    model_dir = model_factory("llama", num_layers=4)
    ids = torch.arange(1, 6)
    with open_processor(model_dir, tmp_path, mode="nf4") as proc:
        expected = proc.generate(ids, max_new_tokens=3, eos_token_id=[])
    readied = []
    real_packed = LayerStreamer._packed
    monkeypatch.setattr(LayerStreamer, "_packed", lambda self, cached, timing, owned: readied.append(
        threading.current_thread() is threading.main_thread()) or real_packed(self, cached, timing, owned))
    with open_processor(model_dir, tmp_path, mode="nf4") as proc:
        if slow == "reading":
            real_fetch = proc.streamer.fetch_cached
            proc.streamer.fetch_cached = lambda index, owned: time.sleep(0.05) or real_fetch(index, owned)
        else:
            for layer in proc.layers:
                layer.register_forward_hook(lambda module, args, out: time.sleep(0.05))
        got = proc.generate(ids, max_new_tokens=3, eos_token_id=[])
    assert got.tolist() == expected.tolist()
    on_compute_thread = sum(readied[1:])  # the first layer of all has no prefetch: read and readied here
    if slow == "reading":
        assert on_compute_thread >= len(readied) - 3  # (a layer the prefetch thread got to first is readied there)
    else:
        assert on_compute_thread <= 2


def test_dequantize_strategy_plans_in_dequantized_bytes_and_keeps_resident_layers(model_factory, tmp_path):
    model_dir = model_factory("llama", num_layers=4)
    probe = UniversalSLIProcessor(model_dir, "nf4", cache_dir=tmp_path / "cache", strategy="dequantize", device="cpu")
    layer_bytes = sum(p.numel() for p in probe.layers[0].parameters()) * 4  # float32
    # two layers in flight and the prompt's work buffer (probe.plan.streaming_bytes), two resident
    budget = probe.shared_bytes + probe.plan.kv_bytes + probe.plan.streaming_bytes + 2 * layer_bytes + 1
    assert probe.plan.streaming_bytes > 2 * layer_bytes  # the planned context's prompt work counts
    probe.close()
    with UniversalSLIProcessor(model_dir, "nf4", cache_dir=tmp_path / "cache", strategy="dequantize", device="cpu",
                               memory_budget_gb=budget / 2**30) as proc:
        assert proc.plan.layer_bytes == layer_bytes and proc.plan.resident_layers == [0, 1]
        proc.generate(torch.tensor([[1, 2, 3]]), max_new_tokens=2, eos_token_id=[])
        streamed = {t.layer for t in proc.timings if not t.resident}
        assert streamed == {2, 3}


def test_packed_strategy_is_refused_off_cpu_and_unknown_strategies_are_named(model_factory, tmp_path):
    with pytest.raises(ValueError, match="strategy='fast' is not one of packed, dequantize"):
        UniversalSLIProcessor(model_factory("llama"), "int8", cache_dir=tmp_path, strategy="fast", device="cpu")


def test_a_disk_cache_smaller_than_the_model_is_said_once(model_factory, tmp_path, caplog):
    model_dir = model_factory("llama", num_layers=4)
    with UniversalSLIProcessor(model_dir, "none", cache_dir=tmp_path / "c", device="cpu",
                               max_cache_size_gb=0.0002) as proc:  # ~200 KB: about two layers
        with caplog.at_level("WARNING", logger="sli.processor"):
            proc.generate(torch.tensor([[1, 2, 3]]), max_new_tokens=2, eos_token_id=[])
    said = [r.getMessage() for r in caplog.records if "layer cache's limit" in r.getMessage()]
    assert len(said) == 1 and "quantized layers" in said[0] and "--max-cache-size-gb" in said[0]


def test_the_plan_holds_a_planned_prompts_hidden_states_and_one_layers_keys_and_values(model_factory, tmp_path):
    """A long prompt runs layer-major: its hidden states into and out of a layer, and that layer's
    keys and values as float copies, are in the plan (so long contexts stay inside the budget)."""
    from sli.memory_sizing import prompt_work_bytes

    model_dir = model_factory("llama", num_layers=2)
    streaming = {}
    for tokens in (64, 1024):
        with UniversalSLIProcessor(model_dir, "int8", cache_dir=tmp_path / "cache", device="cpu",
                                   max_context_tokens=tokens) as proc:
            streaming[tokens] = proc.plan.streaming_bytes
            config, dtype = proc.config, proc.compute_dtype
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    repeated = text.num_attention_heads if text.num_key_value_heads != text.num_attention_heads else 0
    per_token = (2 * text.hidden_size + 2 * (text.num_key_value_heads + repeated) * text.head_dim) * 4
    assert dtype == torch.float32 and prompt_work_bytes(config, dtype, 1) == per_token
    assert streaming[1024] - streaming[64] == 960 * per_token


def test_a_streamed_layer_is_placed_and_taken_back_without_load_state_dict(model_factory, tmp_path, monkeypatch):
    # load_state_dict and to("meta") cost ~1 ms a small layer each; a layer's tensors are put in
    # place directly, and taken back to meta after the layer ran. A load hook takes the full call.
    ids = torch.tensor([[3, 4, 5, 6]])
    with UniversalSLIProcessor(model_factory("llama"), "int8", cache_dir=tmp_path, device="cpu",
                               memory_budget_gb=0.0) as proc:
        want = proc.generate(ids, max_new_tokens=3, eos_token_id=[])  # warms the cache
        calls = []
        real = torch.nn.Module.load_state_dict
        monkeypatch.setattr(torch.nn.Module, "load_state_dict",
                            lambda module, *a, **k: calls.append(type(module).__name__) or real(module, *a, **k))
        assert proc.generate(ids, max_new_tokens=3, eos_token_id=[]).tolist() == want.tolist()
        assert calls == [] and not proc.runner.resident
        for layer in proc.layers:
            assert {p.device.type for p in layer.parameters()} == {"meta"} and not proc.runner._placed
        proc.layers[1].input_layernorm.register_load_state_dict_pre_hook(lambda *a, **k: None)
        assert proc.generate(ids, max_new_tokens=3, eos_token_id=[]).tolist() == want.tolist()
        assert calls and set(calls) == {type(proc.layers[1]).__name__}
        assert {p.device.type for p in proc.layers[1].parameters()} == {"meta"}
