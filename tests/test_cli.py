"""The ``sli`` command, run in-process (``sli.cli.main``) or as a real process where that matters."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

from sli.cli import main

SLI = str(Path(sys.executable).with_name("sli"))


def _error_line(capsys):
    """The captured stderr, which must be exactly one ``sli: error: ...`` line (no traceback)."""
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith("sli: error: ") and "Traceback" not in err, err
    return lines[0]


# ---------------------------------------------------------------- import-gguf


@pytest.mark.parametrize("kind", ["folder", "file"])
def test_import_gguf_refuses_an_occupied_path(tmp_path, capsys, kind):
    gguf = tmp_path / "model.gguf"
    gguf.write_bytes(b"GGUF")  # never read: the output is checked first
    out = tmp_path / "out"
    if kind == "folder":
        out.mkdir()
        (out / "notes.txt").write_text("mine")
    else:
        out.write_text("mine")
    assert main(["import-gguf", str(gguf), str(out)]) == 1
    line = _error_line(capsys)
    assert str(out) in line and "--force" in line
    if kind == "folder":
        assert [p.name for p in out.iterdir()] == ["notes.txt"]
    else:
        assert out.read_text() == "mine"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.gguf", "out"]


def test_import_gguf_force_and_empty_folder_reach_the_conversion(tmp_path, capsys, monkeypatch):
    import sli.default_model as dm

    calls = []
    monkeypatch.setattr(dm, "import_gguf", lambda gguf, out, force=False: calls.append((out, force)) or out)
    gguf = tmp_path / "model.gguf"
    gguf.write_bytes(b"GGUF")
    (tmp_path / "empty").mkdir()
    assert main(["import-gguf", str(gguf), str(tmp_path / "empty")]) == 0
    assert main(["import-gguf", str(gguf), str(tmp_path / "x"), "--force"]) == 0
    assert calls == [(tmp_path / "empty", False), (tmp_path / "x", True)]


# ---------------------------------------------------------------- synth and the README's chain


def test_synth_writes_a_tokenizer_unless_told_not_to(tmp_path, capsys):
    from transformers import AutoTokenizer

    assert main(["synth", str(tmp_path / "with"), "--family", "llama", "--preset", "tiny"]) == 0
    tok = AutoTokenizer.from_pretrained(tmp_path / "with")
    assert tok.decode(tok("Hello", add_special_tokens=False)["input_ids"]) == "Hello"
    assert main(["synth", str(tmp_path / "without"), "--no-tokenizer"]) == 0
    assert (tmp_path / "without" / "config.json").is_file()
    assert not (tmp_path / "without" / "tokenizer.json").exists()


def test_readme_synth_warm_generate_eval_chain_runs_as_written(tmp_path, capsys):
    """README's command-line block, paths moved into tmp_path."""
    model, cache = str(tmp_path / "llama"), str(tmp_path / "sli-cache")
    assert main(["synth", model, "--family", "llama", "--preset", "tiny"]) == 0
    assert main(["warm", model, "--mode", "nf4", "--cache-dir", cache]) == 0
    assert "2 new of 2 layers" in capsys.readouterr().out
    assert main(["generate", model, "Hello", "--mode", "nf4", "--memory-budget-gb", "0.5", "--cache-dir", cache]) == 0
    out = capsys.readouterr().out
    assert "misses 0" in out  # warmed: every layer came from the cache
    assert main(["eval", model, "--modes", "none,int8"]) == 0
    report = capsys.readouterr().out
    assert "| none |" in report and "| int8 |" in report
