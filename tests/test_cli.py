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


def test_an_error_message_is_one_line_and_v_shows_the_traceback(tmp_path, capsys, monkeypatch):
    import sli.default_model as dm
    from sli.errors import ModelLoadError

    def fails(*args, **kwargs):
        raise ModelLoadError("cannot load GGUF file x.gguf: first line\n  second line")

    monkeypatch.setattr(dm, "import_gguf", fails)
    assert main(["import-gguf", "x.gguf", str(tmp_path / "out")]) == 1
    assert _error_line(capsys) == "sli: error: cannot load GGUF file x.gguf: first line second line"
    with pytest.raises(ModelLoadError):
        main(["import-gguf", "x.gguf", str(tmp_path / "out"), "-v"])


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
    assert main(["warm", model, "--mode", "nf4", "--calibrate", "--memory-budget-gb", "2", "--cache-dir", cache]) == 0
    assert "2 new of 2 layers" in capsys.readouterr().out  # calibrated entries beside the rounded ones
    assert main(["generate", model, "Hello", "--mode", "nf4", "--memory-budget-gb", "0.5", "--cache-dir", cache]) == 0
    captured = capsys.readouterr()
    assert captured.out.startswith("Hello")  # no chat template: the text continues the prompt
    assert "misses 0]" in captured.err  # warmed: every layer came from the cache
    assert main(["eval", model, "--modes", "none,int8"]) == 0
    report = capsys.readouterr().out
    assert "| none |" in report and "| int8 |" in report


# ---------------------------------------------------------------- generate: forms, chat template, prompt files


@pytest.fixture(scope="session")
def default_home(tmp_path_factory):
    """An SLI_HOME holding the converted default model: the user's own if it is converted
    there already (read only), else a conversion into a temporary one (~30 s, once)."""
    import sli.default_model as dm

    if dm._is_complete(dm.default_model_dir()):
        return dm.sli_home()
    root = tmp_path_factory.mktemp("sli-home")
    dm.ensure_default_model(root, progress=False)
    return root


@pytest.fixture(scope="session")
def shared_cache(tmp_path_factory):
    """One layer cache for the tests that run the default model: warmed once."""
    return str(tmp_path_factory.mktemp("layer-cache"))


@pytest.fixture
def default_model(monkeypatch, default_home):
    from sli.default_model import default_model_dir

    monkeypatch.setenv("SLI_HOME", str(default_home))
    return default_model_dir()


@pytest.fixture(scope="session")
def tiny(tmp_path_factory):
    """A tiny random llama with its byte-level tokenizer (no chat template)."""
    from sli.synth import synth_model

    return synth_model(tmp_path_factory.mktemp("tiny") / "llama", "llama", "tiny", with_tokenizer=True)


def _json_out(capsys):
    import json

    out = capsys.readouterr().out
    return json.loads(out)


def test_generate_prompt_alone_asks_the_default_model_paris(default_model, shared_cache, capsys):
    """README: `sli generate "What is the capital of France?" --mode int8`: an instruct model
    answers only through its chat template; the answer is printed alone."""
    assert main(["generate", "What is the capital of France?", "--mode", "int8", "--cache-dir", shared_cache]) == 0
    captured = capsys.readouterr()
    assert "Paris" in captured.out, captured
    assert "capital of France?" not in captured.out and "<|im_start|>" not in captured.out
    assert "im_start" not in captured.out and "assistant" not in captured.out.split("Paris")[0]


def test_generate_applies_the_template_once_with_one_bos(default_model, shared_cache, capsys):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(default_model)
    question = "What is the capital of France?"
    assert main(["generate", "--model", str(default_model), question, "--mode", "int8", "--cache-dir", shared_cache,
                 "--max-new-tokens", "1", "--json", "--system", "Answer briefly."]) == 0
    result = _json_out(capsys)
    text = tok.apply_chat_template([{"role": "system", "content": "Answer briefly."},
                                    {"role": "user", "content": question}], tokenize=False, add_generation_prompt=True)
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert result["chat_template"] is True and result["prompt_tokens"] == len(ids)
    from sli.chat_template import encode_prompt

    encoded = encode_prompt(tok, question, system="Answer briefly.")
    assert encoded.ids == ids and encoded.text == text and "Answer briefly." in text
    assert "You are a helpful AI assistant" not in text  # the template's default system prompt is replaced
    assert encoded.ids[0] == tok.bos_token_id and encoded.ids[1] != tok.bos_token_id  # one BOS, the template's
    raw = encode_prompt(tok, question, raw=True)
    assert raw.ids == tok(question)["input_ids"] and not raw.templated


def test_generate_raw_continues_the_text(default_model, shared_cache, capsys):
    assert main(["generate", "The capital of France is", "--raw", "--mode", "int8", "--cache-dir", shared_cache,
                 "--max-new-tokens", "3"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("The capital of France is Paris"), out


def test_encode_prompt_without_a_template(tiny):
    from transformers import AutoTokenizer

    from sli.chat_template import encode_prompt

    tok = AutoTokenizer.from_pretrained(tiny)
    encoded = encode_prompt(tok, "Hello")
    assert not encoded.templated and encoded.ids == tok("Hello")["input_ids"]
    with pytest.raises(ValueError, match="chat template"):
        encode_prompt(tok, "Hello", system="Be brief.")
    with pytest.raises(ValueError, match="--raw"):
        encode_prompt(tok, "Hello", system="Be brief.", raw=True)
    with pytest.raises(ValueError, match="empty"):
        encode_prompt(tok, "")


@pytest.fixture
def routed(monkeypatch, tiny):
    """The default model replaced by the tiny one, and a record of what each run received."""
    import sli.default_model as dm

    monkeypatch.setattr(dm, "ensure_default_model", lambda *a, **k: tiny)
    return tiny


def _generate_json(capsys, *argv):
    assert main(["generate", *argv, "--mode", "int8", "--max-new-tokens", "1", "--json"]) == 0
    return _json_out(capsys)


def test_generate_forms_route_model_and_prompt(routed, tmp_path, capsys, monkeypatch):
    import io

    from sli.checkpoint import checkpoint_model_id
    from sli.synth import synth_model

    cache = ["--cache-dir", str(tmp_path / "c")]
    # another model (other weights: a copy would share the default's content id)
    other = synth_model(tmp_path / "other", "llama", "tiny", seed=1, with_tokenizer=True)
    other_id = checkpoint_model_id(other)
    # PROMPT alone: the default model
    result = _generate_json(capsys, "Hello there", *cache)
    assert result["prompt"] == "Hello there" and result["model_id"] == checkpoint_model_id(routed) != other_id
    # MODEL PROMPT, and --model DIR PROMPT
    assert _generate_json(capsys, str(other), "Hi", *cache)["model_id"] == other_id
    result = _generate_json(capsys, "--model", str(other), "Hi", *cache)
    assert result["model_id"] == other_id and result["prompt"] == "Hi"
    result = _generate_json(capsys, str(other), *cache, "Options between")  # MODEL --opt ... PROMPT
    assert result["model_id"] == other_id and result["prompt"] == "Options between"
    # an existing directory alone is the model, with the default prompt
    result = _generate_json(capsys, str(other), *cache)
    assert result["model_id"] == other_id and result["prompt"] == "What is the capital of France?"
    # -f FILE and -f - (stdin); one trailing newline dropped
    prompt_file = tmp_path / "prompt.txt"
    prompt_file.write_text("From a file\n")
    assert _generate_json(capsys, "-f", str(prompt_file), *cache)["prompt"] == "From a file"
    monkeypatch.setattr("sys.stdin", io.StringIO("From stdin\n"))
    assert _generate_json(capsys, str(other), "-f", "-", *cache)["prompt"] == "From stdin"


@pytest.mark.parametrize("argv, expected", [
    (["a", "b", "c"], "at most MODEL and PROMPT"),
    (["./no-such-model"], "'./no-such-model' does not exist"),
    (["/no/such/dir", "Hello"], "'/no/such/dir' does not exist"),
    (["Hello", "-f", "-"], "prompt is given twice"),
])
def test_generate_form_errors(routed, tmp_path, capsys, argv, expected):
    assert main(["generate", *argv, "--cache-dir", str(tmp_path / "c")]) == 1
    assert expected in _error_line(capsys)


def test_generate_model_twice_and_empty_prompt_file(routed, tmp_path, capsys):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n")
    assert main(["generate", str(routed), "Hi", "--model", str(routed)]) == 1
    assert "model is given twice" in _error_line(capsys)
    assert main(["generate", "-f", str(empty)]) == 1
    assert "empty" in _error_line(capsys)
    assert main(["generate", "-f", str(tmp_path / "missing.txt")]) == 1
    assert "does not exist" in _error_line(capsys)


# ---------------------------------------------------------------- validation


@pytest.mark.parametrize("option, value, expected", [
    ("--memory-budget-gb", "-1", "must be > 0, got -1"),
    ("--memory-budget-gb", "0", "must be > 0, got 0"),
    ("--temperature", "-1", "must be >= 0"),
    ("--top-p", "1.5", "must be in (0, 1], got 1.5"),
    ("--top-p", "0", "must be in (0, 1], got 0"),
    ("--top-p", "nan", "not a finite number"),
    ("--top-k", "0", "must be an integer >= 1, got 0"),
    ("--max-new-tokens", "-1", "must be an integer >= 0, got -1"),
    ("--device", "tpu", "must be cpu, cuda or cuda:N, got 'tpu'"),
    ("--max-cache-size-gb", "0", "must be > 0, got 0"),
])
def test_generate_rejects_out_of_range_options(tiny, tmp_path, capsys, option, value, expected):
    assert main(["generate", str(tiny), "Hi", option, value, "--cache-dir", str(tmp_path / "c")]) == 2
    line = _error_line(capsys)
    assert option in line and expected in line
    assert not (tmp_path / "c").exists()


def test_warm_rejects_a_bad_device_and_cache_size(tiny, tmp_path, capsys):
    assert main(["warm", str(tiny), "--device", "gpu0"]) == 2
    assert "--device" in _error_line(capsys)
    assert main(["warm", str(tiny), "--max-cache-size-gb", "-2"]) == 2
    assert "must be > 0, got -2" in _error_line(capsys)


@pytest.mark.parametrize("command", ["warm", "generate"])
def test_unknown_mode_lists_the_modes(tiny, tmp_path, capsys, command):
    from sli.quantization import QuantizationMode

    argv = [command, str(tiny)] + (["Hi"] if command == "generate" else [])
    assert main(argv + ["--mode", "int3", "--cache-dir", str(tmp_path / "c")]) == 1
    line = _error_line(capsys)
    assert "'int3'" in line
    assert all(m.value in line for m in QuantizationMode) and "mixed" in line
    assert not (tmp_path / "c").exists()


def test_eval_rejects_an_unknown_mode(tiny, capsys):
    assert main(["eval", str(tiny), "--modes", "none,int3"]) == 1
    line = _error_line(capsys)
    assert "'int3'" in line and "nf4" in line and "mixed" in line


@pytest.fixture(scope="session")
def bert_dir(tmp_path_factory):
    from transformers import BertConfig, BertForMaskedLM

    config = BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                        vocab_size=100)
    out = tmp_path_factory.mktemp("bert") / "bert"
    BertForMaskedLM(config).save_pretrained(out)
    return out


@pytest.mark.parametrize("command", ["warm", "generate", "eval"])
def test_a_bert_masked_lm_is_refused(bert_dir, tmp_path, capsys, command):
    argv = [command, str(bert_dir)] + (["Hi"] if command == "generate" else [])
    if command != "eval":
        argv += ["--cache-dir", str(tmp_path / "c")]
    assert main(argv) == 1
    line = _error_line(capsys)
    assert "decoder-only causal LM" in line and "bert" in line
    assert not (tmp_path / "c").exists()


def test_check_causal_lm_accepts_decoders_and_refuses_the_rest(tmp_path, tiny):
    import json

    from sli.errors import UnsupportedArchitectureError
    from sli.model_check import check_causal_lm

    assert check_causal_lm(tiny)["model_type"] == "llama"
    cases = {"t5": {"model_type": "t5", "is_encoder_decoder": True},
             "roberta": {"model_type": "roberta", "architectures": ["RobertaForSequenceClassification"]},
             "clf": {"model_type": "llama", "architectures": ["LlamaForSequenceClassification"]},
             "unknown": {"model_type": "no-such-type"}}
    for name, config in cases.items():
        (tmp_path / name).mkdir()
        (tmp_path / name / "config.json").write_text(json.dumps(config))
        with pytest.raises(UnsupportedArchitectureError, match="decoder-only causal LM"):
            check_causal_lm(tmp_path / name)
    (tmp_path / "decoder").mkdir()
    (tmp_path / "decoder" / "config.json").write_text(json.dumps({"model_type": "bert", "is_decoder": True}))
    assert check_causal_lm(tmp_path / "decoder")["is_decoder"] is True


def test_a_prompt_longer_than_the_positions_is_refused(tiny, tmp_path, capsys):
    prompt = tmp_path / "long.txt"
    prompt.write_text("a" * 200)  # one token per byte; the tiny model has 128 positions
    assert main(["generate", str(tiny), "-f", str(prompt), "--cache-dir", str(tmp_path / "c")]) == 1
    line = _error_line(capsys)
    assert "200 tokens" in line and "128" in line and "max_position_embeddings" in line
    assert not (tmp_path / "c").exists()  # refused before anything was loaded


def test_new_tokens_are_capped_at_the_positions(tiny, tmp_path, capsys):
    prompt = tmp_path / "p.txt"
    prompt.write_text("a" * 120)
    assert main(["generate", str(tiny), "-f", str(prompt), "--cache-dir", str(tmp_path / "c"), "--json",
                 "--max-new-tokens", "50", "--mode", "int8"]) == 0
    captured = capsys.readouterr()
    import json

    assert json.loads(captured.out)["new_tokens"] <= 128 - 120
    assert "generating at most 8" in captured.err
    prompt.write_text("a" * 128)  # every position taken: nothing left to answer with
    assert main(["generate", str(tiny), "-f", str(prompt), "--cache-dir", str(tmp_path / "c")]) == 1
    assert "none is left" in _error_line(capsys)


# ---------------------------------------------------------------- output noise


def test_the_memory_plan_is_said_once(tiny, tmp_path, capsys):
    assert main(["generate", str(tiny), "Hi", "--mode", "int8", "--max-new-tokens", "2",
                 "--cache-dir", str(tmp_path / "c")]) == 0
    err = capsys.readouterr().err
    assert len([line for line in err.splitlines() if "budget none given" in line]) == 1, err


@pytest.mark.parametrize("where", ["before", "after"])
def test_quiet_anywhere_on_the_command_line(tiny, tmp_path, capsys, where):
    args = ["generate", str(tiny), "Hi", "--mode", "int8", "--max-new-tokens", "2", "--cache-dir", str(tmp_path / "c")]
    assert main(["-q", *args] if where == "before" else [*args, "-q"]) == 0
    captured = capsys.readouterr()
    assert captured.err == "" and captured.out.startswith("Hi")


def test_verbose_and_quiet_parse_on_either_side():
    from sli.cli import build_parser

    parser = build_parser()
    assert parser.parse_args(["warm", "m", "-v"]).verbose and not parser.parse_args(["warm", "m", "-v"]).quiet
    assert parser.parse_args(["-v", "warm", "m"]).verbose
    assert parser.parse_args(["cache", "info", "-q"]).quiet and parser.parse_args(["-q", "cache", "info"]).quiet
    assert not parser.parse_args(["warm", "m"]).quiet and not parser.parse_args(["warm", "m"]).verbose


def _run_sli(argv, stderr_tty: bool, env=None):
    """Run the real `sli` with stdout a pipe and stderr a pipe or a pseudo-terminal; (rc, stderr)."""
    import pty

    env = dict(os.environ if env is None else env)
    env.pop("TQDM_DISABLE", None)  # as a user's shell has it
    if not stderr_tty:
        done = subprocess.run([SLI, *argv], capture_output=True, text=True, env=env, timeout=300)
        return done.returncode, done.stderr
    import fcntl
    import struct
    import termios

    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 80, 0, 0))  # tqdm draws nothing in 0 columns
    proc = subprocess.Popen([SLI, *argv], stdout=subprocess.PIPE, stderr=slave, env=env)
    os.close(slave)
    chunks = []
    while True:
        try:
            data = os.read(master, 65536)
        except OSError:  # EIO: the process closed its end
            break
        if not data:
            break
        chunks.append(data)
    proc.communicate(timeout=300)
    os.close(master)
    return proc.returncode, b"".join(chunks).decode(errors="replace")


def test_progress_bars_only_on_a_terminal(tiny, tmp_path):
    rc, err = _run_sli(["warm", str(tiny), "--mode", "int8", "--cache-dir", str(tmp_path / "a")], stderr_tty=False)
    assert rc == 0 and "layer/s" not in err and "\r" not in err, err
    rc, err = _run_sli(["warm", str(tiny), "--mode", "int8", "--cache-dir", str(tmp_path / "b")], stderr_tty=True)
    assert rc == 0 and "layer/s" in err, err  # the warm-up's bar, drawn on the terminal


def test_synth_saves_without_a_progress_bar_off_a_terminal(tmp_path, capsys):
    assert main(["synth", str(tmp_path / "m")]) == 0
    assert "shards" not in capsys.readouterr().err


def test_demo_does_not_warn_about_its_own_budget(default_model, shared_cache, capsys):
    from sli.cli import DEMO_BUDGET_GB

    assert main(["demo", "--cache-dir", shared_cache, "--max-new-tokens", "8"]) == 0
    captured = capsys.readouterr()
    assert "below" not in captured.err and "every layer streams" not in captured.err, captured.err
    assert "Paris" in captured.out
    resident = int(captured.err.split(" layers resident")[0].rsplit("; ", 1)[1].split("/")[0])
    assert 0 < resident < 30  # the budget leaves room, and most layers still stream
    assert DEMO_BUDGET_GB * 2**30 < 269e6  # below SmolLM2's bf16 weights (134.5 M parameters)


# ---------------------------------------------------------------- help, version, defaults


def test_version(capsys):
    import sli

    assert main(["--version"]) == 0
    assert capsys.readouterr().out.strip() == f"sli {sli.__version__}"


def _subparsers(parser):
    import argparse

    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


def test_every_option_has_help_and_shows_its_default():
    import argparse

    from sli.cli import HelpFormatter, build_parser

    parser = build_parser()
    parsers = {"sli": parser, **{f"sli {name}": p for name, p in _subparsers(parser).items() if name != "bench"}}
    for name, p in parsers.items():
        formatter = HelpFormatter(name)
        for action in p._actions:
            if isinstance(action, (argparse._HelpAction, argparse._SubParsersAction)):
                continue
            label = f"{name} {'/'.join(action.option_strings) or action.dest}"
            assert action.help and action.help.strip(), f"{label} has no help text"
            flag = isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction, argparse._VersionAction))
            if action.option_strings and not flag:
                assert "default" in formatter._get_help_string(action), f"{label} does not show its default"
        p.format_help()  # renders (a bad %-format in a help text raises here)


def test_generate_and_warm_default_to_int8_and_the_mode_list_is_current():
    from sli.cli import MODES, build_parser
    from sli.quantization import QuantizationMode

    parser = build_parser()
    assert parser.parse_args(["generate", "Hi"]).mode == "int8"
    assert parser.parse_args(["warm", "m"]).mode == "int8"
    assert [m.strip() for m in MODES.split(",")] == [m.value for m in QuantizationMode]


def test_head_option_reaches_the_config_of_a_mode_and_of_mixed():
    from sli.cli import build_parser
    from sli.cli.options import quantization_config_of

    parser = build_parser()
    assert quantization_config_of(parser.parse_args(["generate", "Hi", "--mode", "nf4"])).int8_head
    assert not quantization_config_of(parser.parse_args(["generate", "Hi", "--mode", "nf4", "--head", "keep"])).int8_head
    assert quantization_config_of(parser.parse_args(["warm", "m", "--mode", "int8", "--head", "int8"])).int8_head
    assert quantization_config_of(parser.parse_args(["generate", "Hi", "--mode", "mixed", "--head", "int8"])).config.int8_head
    with pytest.raises(SystemExit):
        parser.parse_args(["generate", "Hi", "--head", "bf16"])


HEAVY = ("torch", "transformers", "sli.processor", "sli.layer_cache", "numba")


def test_help_imports_nothing_heavy():
    """`sli --help` in a fresh process imports neither torch nor transformers nor the processor:
    `import sli` loads its names lazily and the CLI imports them inside its commands. (How long
    --help takes is measured by hand, not asserted: see docs/benchmarks.md.)"""
    import json

    probe = ("import json, sys; import sli; before = set(sys.modules); from sli.cli import main, build_parser; "
             "main(['--help']); build_parser(); "
             f"print(json.dumps([[m for m in {HEAVY!r} if m in sys.modules and m not in before], "
             f"[m for m in {HEAVY!r} if m in before]]))")
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    added_by_cli, by_package = json.loads(done.stdout.strip().splitlines()[-1])
    assert added_by_cli == [], f"the CLI's --help imported {added_by_cli}"
    assert by_package == [], f"`import sli` imported {by_package}"


# ---------------------------------------------------------------- sli cache


@pytest.fixture
def two_models_cache(tiny, tmp_path, capsys):
    """A cache with two models (the tiny llama and a tiny qwen2: ids "llama-…" and "qwen2-…"),
    int8 and nf4 each. (A copy of the llama would share its content id.)"""
    from sli.synth import synth_model

    other = synth_model(tmp_path / "other", "qwen2", "tiny")
    cache = tmp_path / "cache"
    for model in (tiny, other):
        for mode in ("int8", "nf4"):
            assert main(["warm", str(model), "--mode", mode, "--cache-dir", str(cache), "-q"]) == 0
    capsys.readouterr()
    return cache


def _cache_json(capsys, *argv):
    assert main(["cache", *argv, "--json"]) == 0
    return _json_out(capsys)


def _model_ids(cache):
    from sli.layer_cache import LayerCache

    with LayerCache(cache) as c:
        return sorted({e["model_id"] for e in c.entries()})


def test_cache_info_per_model_and_mode(two_models_cache, capsys):
    import time

    info = _cache_json(capsys, "info", "--cache-dir", str(two_models_cache))
    groups = {(g["model_id"].split("-")[0], g["mode"]): g for g in info["models"]}
    assert set(groups) == {("llama", "int8"), ("llama", "nf4"), ("qwen2", "int8"), ("qwen2", "nf4")}
    for g in groups.values():
        assert g["entries"] == 2 and g["layers"] == ["0", "1"]
        assert g["bytes"] > 0 and abs(g["last_used"] - time.time()) < 600
    assert groups[("llama", "nf4")]["bytes"] < groups[("llama", "int8")]["bytes"]  # 4 bits against 8
    assert sum(g["bytes"] for g in groups.values()) <= info["disk_bytes"] and info["entries"] == 8
    assert not any("hits" in key or "misses" in key for key in info)  # no per-process counters
    assert main(["cache", "info", "--cache-dir", str(two_models_cache)]) == 0
    text = capsys.readouterr().out
    assert "8 entries" in text and "hits" not in text
    rows = [line.split() for line in text.splitlines()[2:]]
    assert sorted((r[0].split("-")[0], r[1], r[2]) for r in rows) == [
        ("llama", "int8", "2"), ("llama", "nf4", "2"), ("qwen2", "int8", "2"), ("qwen2", "nf4", "2")]


def test_cache_rm_one_mode_then_the_model(two_models_cache, capsys):
    cache = str(two_models_cache)
    llama = next(m for m in _model_ids(two_models_cache) if m.startswith("llama-"))
    assert main(["cache", "rm", llama, "--mode", "nf4", "--cache-dir", cache]) == 0
    assert "removed 2 entries" in capsys.readouterr().out
    info = _cache_json(capsys, "info", "--cache-dir", cache)
    assert sorted((g["model_id"].split("-")[0], g["mode"]) for g in info["models"]) == [
        ("llama", "int8"), ("qwen2", "int8"), ("qwen2", "nf4")]
    assert main(["cache", "rm", llama, "--mode", "nf4", "--cache-dir", cache]) == 1
    assert "no nf4 entries" in _error_line(capsys)
    assert main(["cache", "rm", llama, "--cache-dir", cache]) == 0
    assert [m.split("-")[0] for m in _model_ids(two_models_cache)] == ["qwen2"]
    capsys.readouterr()
    assert main(["cache", "rm", "no-such-model", "--cache-dir", cache]) == 1
    line = _error_line(capsys)
    assert "no-such-model" in line and "qwen2-" in line


def _corrupt_one_entry(cache):
    import sqlite3

    connection = sqlite3.connect(str(cache / "cache.db"))
    (filename,) = connection.execute("SELECT filename FROM Cache ORDER BY rowid LIMIT 1").fetchone()
    connection.close()
    path = cache / filename
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))
    return path


def test_cache_verify_reports_and_removes_only_with_remove(two_models_cache, capsys):
    cache = str(two_models_cache)
    bad_file = _corrupt_one_entry(two_models_cache)
    assert main(["cache", "verify", "--cache-dir", cache]) == 1
    captured = capsys.readouterr()
    assert "1 bad entries found (of 8 checked); nothing was removed: rerun with --remove to delete them" in captured.out
    assert "removed," not in captured.err and "treated as a miss" not in captured.err
    assert bad_file.exists() and _cache_json(capsys, "info", "--cache-dir", cache)["entries"] == 8
    assert main(["cache", "verify", "--cache-dir", cache, "--remove"]) == 0
    assert "1 bad entries found and removed" in capsys.readouterr().out
    assert not bad_file.exists() and _cache_json(capsys, "info", "--cache-dir", cache)["entries"] == 7
    assert main(["cache", "verify", "--cache-dir", cache]) == 0
    assert "no bad entries" in capsys.readouterr().out


@pytest.mark.parametrize("action", ["info", "verify", "clear"])
def test_cache_commands_refuse_a_folder_that_is_not_a_cache(tmp_path, capsys, action):
    folder = tmp_path / "notes"
    folder.mkdir()
    (folder / "todo.txt").write_text("mine")
    assert main(["cache", action, "--cache-dir", str(folder)]) == 1
    assert "not a layer cache" in _error_line(capsys)
    assert sorted(p.name for p in folder.iterdir()) == ["todo.txt"]
    assert main(["cache", action, "--cache-dir", str(tmp_path / "missing")]) == 1
    assert "does not exist" in _error_line(capsys)
    assert not (tmp_path / "missing").exists()


def test_cache_clear_empties_a_cache(two_models_cache, capsys):
    assert main(["cache", "clear", "--cache-dir", str(two_models_cache)]) == 0
    assert "8 entries removed" in capsys.readouterr().out
    assert _cache_json(capsys, "info", "--cache-dir", str(two_models_cache))["entries"] == 0


# ---------------------------------------------------------------- sampling and stop strings


def _stop_in(text):
    """Two printable ASCII characters of ``text`` after its start, and where they first appear."""
    for i in range(2, len(text) - 1):
        pair = text[i:i + 2]
        if pair.isascii() and pair.isprintable():
            return pair, text.index(pair)
    raise AssertionError(f"no two printable ASCII characters in a row to stop at in {text!r}")


def test_generate_stop_cuts_the_answer_before_it_and_ends_early(tiny, tmp_path, capsys):
    base = ["generate", str(tiny), "Hello there", "--mode", "int8", "--max-new-tokens", "32",
            "--cache-dir", str(tmp_path / "c")]
    assert main(base + ["--json"]) == 0
    whole = _json_out(capsys)
    stop, at = _stop_in(whole["text"])
    assert main(base + ["--json", "--stop", "never seen", "--stop", stop]) == 0
    cut = _json_out(capsys)
    assert cut["text"] == whole["text"][:at] and (cut["finish_reason"], cut["stop"]) == ("stop", stop)
    assert cut["new_tokens"] < whole["new_tokens"]  # generation ended at the stop string
    # streamed: what stdout shows is append-only, so a stop string's start printed early would stay in it
    assert main(base + ["-q", "--stop", stop]) == 0
    assert capsys.readouterr().out == "Hello there" + whole["text"][:at] + "\n"
    # the start of a stop string that never comes is held back, then printed all the same
    assert main(base + ["-q", "--stop", stop[0] + "\x01never"]) == 0
    assert capsys.readouterr().out == "Hello there" + whole["text"] + "\n"


def test_generate_passes_min_p_and_the_repetition_penalty(tiny, tmp_path, capsys, monkeypatch):
    from sli.processor import UniversalSLIProcessor

    received = {}
    real = UniversalSLIProcessor.generate

    def generate(self, *args, **kwargs):
        received.update(kwargs)
        return real(self, *args, **kwargs)

    monkeypatch.setattr(UniversalSLIProcessor, "generate", generate)
    base = ["generate", str(tiny), "Hello there", "--mode", "int8", "--max-new-tokens", "24", "--json",
            "--cache-dir", str(tmp_path / "c")]
    assert main(base) == 0
    greedy = _json_out(capsys)["text"]
    assert (received["min_p"], received["repetition_penalty"]) == (None, 1.0)
    assert main(base + ["--repetition-penalty", "1.8"]) == 0
    assert _json_out(capsys)["text"] != greedy and received["repetition_penalty"] == 1.8
    assert main(base + ["--temperature", "0.7", "--min-p", "1", "--seed", "3"]) == 0
    assert _json_out(capsys)["text"] == greedy and received["min_p"] == 1.0  # min-p 1 keeps the top token alone


@pytest.mark.parametrize("command", ["generate", "chat"])
@pytest.mark.parametrize("option, value, expected", [
    ("--min-p", "1.5", "must be in [0, 1] (0 = off), got 1.5"),
    ("--min-p", "-0.1", "must be in [0, 1] (0 = off), got -0.1"),
    ("--min-p", "nan", "not a finite number"),
    ("--repetition-penalty", "0", "must be > 0 (1 = off), got 0"),
    ("--repetition-penalty", "-1.2", "must be > 0 (1 = off), got -1.2"),
    ("--repetition-penalty", "strong", "'strong' is not a number"),
    ("--stop", "", "must be a non-empty string"),
])
def test_sampling_options_out_of_range_are_one_line(tiny, tmp_path, capsys, command, option, value, expected):
    argv = [command, str(tiny)] + (["Hi"] if command == "generate" else [])
    assert main(argv + [option, value, "--cache-dir", str(tmp_path / "c")]) == 2
    line = _error_line(capsys)
    assert option in line and expected in line
    assert not (tmp_path / "c").exists()
