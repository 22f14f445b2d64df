import json

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM

from sli.synth import FAMILY_PRESETS, synth_model

TINY_FAMILIES = sorted(f for f, presets in FAMILY_PRESETS.items() if "tiny" in presets)


def _state(path):
    out = {}
    for f in sorted(path.glob("*.safetensors")):
        with safe_open(str(f), "pt") as h:
            for k in h.keys():
                out[k] = h.get_tensor(k)
    return out


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_tiny_family_saves_reloads_and_runs(tmp_path, family):
    path = synth_model(tmp_path / family, family=family, preset="tiny")
    assert (path / "config.json").exists()
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    assert model.config.vocab_size == 256
    for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
        value = getattr(model.config, key, None)
        assert value is None or 0 <= value < 256
    with torch.no_grad():
        logits = model(torch.randint(0, 256, (1, 8))).logits
    assert logits.shape == (1, 8, 256)
    assert torch.isfinite(logits).all()


def test_families_required():
    for fam in ("llama", "mistral", "qwen2", "qwen3", "gemma2", "phi3", "gpt2", "gpt_neox", "mixtral",
                "falcon", "stablelm", "olmo", "phi", "gemma", "qwen2_moe", "qwen3_moe", "gemma3_text", "olmo2",
                "starcoder2", "granite", "cohere"):
        assert "tiny" in FAMILY_PRESETS[fam]
    assert FAMILY_PRESETS["mixtral"]["tiny"]["num_local_experts"] == 4
    assert {"small", "1b", "7b", "168m", "smollm2-135m"} <= set(FAMILY_PRESETS["llama"])
    # The benchmark shapes are the real models' shapes.
    assert FAMILY_PRESETS["llama"]["7b"]["hidden_size"] == 4096
    assert FAMILY_PRESETS["llama"]["7b"]["intermediate_size"] == 11008
    assert FAMILY_PRESETS["llama"]["1b"]["intermediate_size"] == 5632
    assert FAMILY_PRESETS["llama"]["168m"]["hidden_size"] == 1024


@pytest.mark.parametrize("preset, params", [("168m", 168e6), ("1b", 1.1e9), ("7b", 6.7e9), ("smollm2-135m", 135e6)])
def test_large_presets_have_the_real_parameter_counts(preset, params):
    from sli.synth import _param_count, make_config

    assert _param_count(make_config("llama", preset)) == pytest.approx(params, rel=0.03)


def test_deterministic_by_seed(tmp_path):
    torch.manual_seed(123)
    before = torch.random.get_rng_state()
    a = _state(synth_model(tmp_path / "a", "llama", seed=3))
    assert torch.equal(torch.random.get_rng_state(), before)  # the caller's random state is untouched
    b = _state(synth_model(tmp_path / "b", "llama", seed=3))
    c = _state(synth_model(tmp_path / "c", "llama", seed=4))
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], c[k]) for k in a)
    assert all(t.dtype == torch.bfloat16 for t in a.values())


def test_num_layers_and_sharded_save_has_index(tmp_path):
    path = synth_model(tmp_path / "s", "llama", preset="small", num_layers=3, max_shard_size="5MB")
    index = json.loads((path / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    assert json.loads((path / "config.json").read_text())["num_hidden_layers"] == 3
    for name in index["weight_map"].values():
        assert (path / name).exists()


def test_large_writer_matches_save_pretrained_names(tmp_path, monkeypatch):
    import sli.synth as synth

    ref = _state(synth_model(tmp_path / "ref", "llama", preset="smollm2-135m", num_layers=2))
    monkeypatch.setattr(synth, "LARGE_PARAMS", 0)
    path = synth_model(tmp_path / "big", "llama", preset="smollm2-135m", num_layers=2)
    index = json.loads((path / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(ref)
    assert "lm_head.weight" not in index["weight_map"]  # tied embeddings
    assert len(set(index["weight_map"].values())) == 4  # embeddings, 2 layers, final norm
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    with torch.no_grad():
        assert torch.isfinite(model(torch.tensor([[1, 2, 3]])).logits).all()


def test_unknown_family_or_preset(tmp_path):
    with pytest.raises(ValueError, match="llama"):
        synth_model(tmp_path / "x", "nosuchfamily")
    with pytest.raises(ValueError, match="tiny"):
        synth_model(tmp_path / "y", "llama", preset="nosuchpreset")


def test_tie_word_embeddings_override(tmp_path):
    tied = _state(synth_model(tmp_path / "t", "llama", tie_word_embeddings=True))
    untied = _state(synth_model(tmp_path / "u", "llama", tie_word_embeddings=False))
    assert "lm_head.weight" not in tied and "lm_head.weight" in untied
    config = json.loads((tmp_path / "t" / "config.json").read_text())
    assert config["tie_word_embeddings"] is True


@pytest.mark.parametrize("family, preset", [("llama", "tiny"), ("gpt2", "tiny"), ("llama", "168m")])
def test_with_tokenizer_round_trips_text(tmp_path, family, preset):
    from transformers import AutoConfig, AutoTokenizer

    from sli.synth import make_config, write_tokenizer

    if preset == "tiny":
        path = synth_model(tmp_path / family, family, preset, with_tokenizer=True)
        config = AutoConfig.from_pretrained(path)
    else:  # the tokenizer alone: the 168m weights are not needed to test it
        config = make_config(family, preset)
        path = write_tokenizer(tmp_path / preset, config)
    tok = AutoTokenizer.from_pretrained(path)
    text = "Hello, world!\n\tdef f(x): return x ** 2  # Café"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert max(ids) < config.vocab_size
    assert tok.decode(ids) == text
    assert tok.eos_token_id == config.eos_token_id and tok.bos_token_id == config.bos_token_id
    assert len(tok) <= config.vocab_size
