"""A model's cache identity comes from its content (sli.checkpoint.checkpoint_identity), not its folder."""
import json
import re
import shutil

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from sli.checkpoint import (IDENTITY_SAMPLE_BYTES, IDENTITY_SAMPLES, Checkpoint, checkpoint_identity,
                            checkpoint_model_id)
from sli.cli import main
from sli.layer_cache import LayerCache
from sli.processor import UniversalSLIProcessor


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from sli.synth import synth_model

    return synth_model(tmp_path_factory.mktemp("ident") / "my-model", family="llama", preset="tiny", with_tokenizer=True)


def _header(path):
    data = path.read_bytes()
    return data[8:8 + int.from_bytes(data[:8], "little")]


def _rewrite_one_tensor(model_dir, name="model.layers.0.self_attn.q_proj.weight"):
    """Re-save model.safetensors with one tensor's values changed (same names, dtypes, shapes)."""
    path = model_dir / "model.safetensors"
    with safe_open(str(path), framework="pt") as f:
        metadata = f.metadata()
    state = load_file(str(path))
    state[name] = state[name] + 1
    save_file(state, str(path), metadata=metadata)


def _model_ids(cache_dir):
    with LayerCache(cache_dir) as cache:
        return sorted({e["model_id"] for e in cache.entries()})


def test_a_copy_under_another_name_has_the_same_id_and_hits_the_warm_cache(tiny, tmp_path):
    copy = tmp_path / "renamed-copy"
    shutil.copytree(tiny, copy)
    cache = tmp_path / "cache"
    with UniversalSLIProcessor(tiny, "int8", cache_dir=cache) as proc:
        assert proc.prewarm(progress=False) == proc.layout.num_layers
        model_id = proc.model_id
    assert re.fullmatch(r"llama-[0-9a-f]{12}", model_id)  # model_type and content hash, no folder name
    assert model_id == checkpoint_model_id(tiny) == checkpoint_model_id(copy)
    assert Checkpoint(copy).identity() == checkpoint_identity(tiny)
    with UniversalSLIProcessor(copy, "int8", cache_dir=cache) as proc:
        assert proc.model_id == model_id
        assert proc.prewarm(progress=False) == 0  # every layer already there
    assert _model_ids(cache) == [model_id]


def test_one_changed_tensor_or_config_gives_another_id(tiny, tmp_path):
    changed = tmp_path / "my-model"  # the same folder name too
    shutil.copytree(tiny, changed)
    _rewrite_one_tensor(changed)
    assert _header(changed / "model.safetensors") == _header(tiny / "model.safetensors")  # same layout
    assert (changed / "model.safetensors").stat().st_size == (tiny / "model.safetensors").stat().st_size
    assert checkpoint_model_id(changed) != checkpoint_model_id(tiny)
    assert checkpoint_model_id(changed).startswith("llama-")

    edited = tmp_path / "edited"
    shutil.copytree(tiny, edited)
    config = json.loads((edited / "config.json").read_text())
    config["rms_norm_eps"] = config.get("rms_norm_eps", 1e-6) * 2
    (edited / "config.json").write_text(json.dumps(config))
    assert checkpoint_identity(edited) != checkpoint_identity(tiny)


def test_sharded_and_bin_checkpoints_have_content_ids(tiny, tmp_path):
    from sli.synth import synth_model

    sharded = synth_model(tmp_path / "sharded", family="llama", preset="tiny", max_shard_size="50KB")
    assert len(list(sharded.glob("*.safetensors"))) > 1
    assert checkpoint_identity(sharded) != checkpoint_identity(tiny)  # other headers
    binary = tmp_path / "bin"
    binary.mkdir()
    shutil.copy(tiny / "config.json", binary / "config.json")
    torch.save(load_file(str(tiny / "model.safetensors")), binary / "pytorch_model.bin")
    first = checkpoint_identity(binary)
    copy = tmp_path / "bin-copy"
    shutil.copytree(binary, copy)
    assert checkpoint_identity(copy) == first
    state = torch.load(binary / "pytorch_model.bin", weights_only=True)
    state["model.embed_tokens.weight"] = state["model.embed_tokens.weight"] * 2
    torch.save(state, binary / "pytorch_model.bin")
    assert checkpoint_identity(binary) != first


def test_a_large_file_is_sampled_not_read_whole(tmp_path):
    """Over 64 x 4 KiB of data, a change to a large tensor is seen; one confined to a gap
    between samples is not (the docstring's stated limit; `sli cache rm` is the remedy)."""
    (tmp_path / "config.json").write_text('{"model_type": "llama"}')
    path = tmp_path / "model.safetensors"
    # 16 tensors of 64 KiB (1 MiB of data): each is longer than the 16 KiB between samples
    state = {f"t{i:02d}": torch.arange(16384, dtype=torch.float32) + i for i in range(16)}
    save_file(state, str(path))
    span = path.stat().st_size - 8 - len(_header(path))
    assert span > IDENTITY_SAMPLES * IDENTITY_SAMPLE_BYTES
    first = checkpoint_identity(tmp_path)

    whole = dict(state, t07=state["t07"] * 3)  # a fine-tune changes whole tensors
    save_file(whole, str(path))
    assert checkpoint_identity(tmp_path) != first

    save_file(state, str(path))
    assert checkpoint_identity(tmp_path) == first
    data = bytearray(path.read_bytes())
    start = 8 + len(_header(path))
    step = (span - IDENTITY_SAMPLE_BYTES) / (IDENTITY_SAMPLES - 1)
    gap = start + round(step) + IDENTITY_SAMPLE_BYTES + 16  # after sample 1, before sample 2
    assert gap + 4 < start + round(2 * step)
    data[gap:gap + 4] = b"\x01\x02\x03\x04"
    path.write_bytes(bytes(data))
    assert checkpoint_identity(tmp_path) == first  # not seen: outside the samples


def test_cache_rm_takes_a_model_directory(tiny, tmp_path, capsys):
    changed = tmp_path / "changed"
    shutil.copytree(tiny, changed)
    _rewrite_one_tensor(changed)
    copy = tmp_path / "copy"
    shutil.copytree(tiny, copy)
    cache = str(tmp_path / "cache")
    for model in (tiny, changed):
        assert main(["warm", str(model), "--mode", "int8", "--cache-dir", cache, "-q"]) == 0
    assert _model_ids(cache) == sorted([checkpoint_model_id(tiny), checkpoint_model_id(changed)])
    capsys.readouterr()
    assert main(["cache", "rm", str(copy), "--cache-dir", cache, "--json"]) == 0  # a copy names the same model
    result = json.loads(capsys.readouterr().out)
    assert result["model_id"] == checkpoint_model_id(tiny) and result["removed"] == 2
    assert _model_ids(cache) == [checkpoint_model_id(changed)]
    assert main(["cache", "rm", str(copy), "--cache-dir", cache]) == 1  # nothing left of it
    err = capsys.readouterr().err
    assert checkpoint_model_id(tiny) in err and checkpoint_model_id(changed) in err
