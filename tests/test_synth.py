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
                "falcon", "stablelm", "olmo", "phi", "gemma"):
        assert "tiny" in FAMILY_PRESETS[fam]
    assert FAMILY_PRESETS["mixtral"]["tiny"]["num_local_experts"] == 4
    assert {"small", "7b", "168m", "smollm2-135m"} <= set(FAMILY_PRESETS["llama"])


def test_deterministic_by_seed(tmp_path):
    a = _state(synth_model(tmp_path / "a", "llama", seed=3))
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
