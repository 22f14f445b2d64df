"""Reading a Hugging Face checkpoint directory tensor by tensor, never whole."""
from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import threading
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Union

import torch
from safetensors import SafetensorError, safe_open

from .errors import ModelLoadError

logger = logging.getLogger(__name__)

SAFETENSORS_INDEX = "model.safetensors.index.json"
BIN_INDEX = "pytorch_model.bin.index.json"


def resolve_model_dir(model_name: str | Path) -> Path:
    """The local model directory ``model_name``, or a ModelLoadError saying what is wrong."""
    path = Path(model_name).expanduser()
    if not path.exists():
        hint = (" It looks like a hub id: sli downloads nothing; put the model in a local directory"
                " (config.json + safetensors) and pass its path.") if "/" in str(model_name) and not str(model_name).startswith((".", "/", "~")) else ""
        raise ModelLoadError(f"model directory {str(model_name)!r} does not exist.{hint}")
    if not path.is_dir():
        raise ModelLoadError(f"{str(path)!r} is not a directory; pass the folder holding config.json and the weights")
    if not (path / "config.json").is_file():
        raise ModelLoadError(f"{str(path)!r} has no config.json; pass a Hugging Face model directory")
    return path.resolve()


class Checkpoint:
    """Lazy access to a checkpoint's tensors by name (safetensors, or torch .bin files).

    safetensors shards are memory-mapped through ``safe_open``; older ``pytorch_model*.bin``
    files through ``torch.load(weights_only=True, mmap=True)`` (no pickle code runs).
    """

    def __init__(self, model_dir: Path) -> None:
        self.model_dir = Path(model_dir)
        self._handles: Dict[str, object] = {}
        self.weight_map: Dict[str, str] = self._weight_map()

    def _weight_map(self) -> Dict[str, str]:
        d = self.model_dir
        for index_name in (SAFETENSORS_INDEX, BIN_INDEX):
            if (d / index_name).is_file():
                try:
                    return dict(json.loads((d / index_name).read_text())["weight_map"])
                except (ValueError, KeyError) as exc:
                    raise ModelLoadError(f"{d / index_name} is not a valid shard index ({exc}); re-save the model") from exc
        files = sorted(d.glob("*.safetensors")) or sorted(d.glob("pytorch_model*.bin"))
        if not files:
            raise ModelLoadError(
                f"no weights in {str(d)!r}: expected model.safetensors, shards with {SAFETENSORS_INDEX}, "
                "or pytorch_model*.bin; save the model with save_pretrained")
        weight_map: Dict[str, str] = {}
        for f in files:
            for name in self._open(f.name, f).keys():
                weight_map[name] = f.name
        return weight_map

    def _open(self, file_name: str, path: Optional[Path] = None):
        handle = self._handles.get(file_name)
        if handle is None:
            path = path or self.model_dir / file_name
            if not path.is_file():
                raise ModelLoadError(f"shard {str(path)!r} named in the index is missing; re-download or re-save the model")
            try:
                if path.suffix == ".safetensors":
                    handle = safe_open(str(path), framework="pt")
                else:
                    handle = _BinFile(torch.load(str(path), map_location="cpu", weights_only=True, mmap=True))
            except (SafetensorError, OSError, RuntimeError, ValueError) as exc:
                raise ModelLoadError(f"cannot read shard {str(path)!r} ({exc}); the file is corrupt or truncated: re-save it") from exc
            self._handles[file_name] = handle
        return handle

    def release(self) -> None:
        """Close the shard handles. Pages of a memory-mapped shard that were read count in the
        process's RSS for as long as the map exists (~0.4 GB a 7B layer): closing after each
        layer keeps a warm-up's memory at one layer, not the whole checkpoint. The next read
        reopens the shard (a header parse)."""
        self._handles.clear()

    def names(self) -> List[str]:
        return list(self.weight_map)

    def get(self, name: str) -> torch.Tensor:
        handle = self._open(self.weight_map[name])
        try:
            return handle.get_tensor(name)
        except (SafetensorError, OSError, RuntimeError) as exc:
            raise ModelLoadError(f"cannot read tensor {name!r} from {self.weight_map[name]!r} ({exc}); the shard is corrupt: re-save it") from exc

    def get_many(self, names: Iterable[str]) -> Dict[str, torch.Tensor]:
        return {n: self.get(n) for n in names}

    def storage_dtype(self) -> torch.dtype:
        """The dtype most floating-point tensors are stored in."""
        name = next(n for n in self.weight_map if n.endswith("weight"))
        return self.get(name).dtype

    def identity(self) -> str:
        """The checkpoint's content hash: :func:`checkpoint_identity`."""
        return checkpoint_identity(self.model_dir)


IDENTITY_SAMPLES = 64
IDENTITY_SAMPLE_BYTES = 4096


def _weight_files(model_dir: Path) -> List[Path]:
    """The checkpoint's weight files, as :class:`Checkpoint` finds them (index, else glob)."""
    for index_name in (SAFETENSORS_INDEX, BIN_INDEX):
        if (model_dir / index_name).is_file():
            try:
                names = set(json.loads((model_dir / index_name).read_text())["weight_map"].values())
            except (ValueError, KeyError, AttributeError) as exc:
                raise ModelLoadError(f"{model_dir / index_name} is not a valid shard index ({exc}); re-save the model") from exc
            return [model_dir / n for n in sorted(names)]
    files = sorted(model_dir.glob("*.safetensors")) or sorted(model_dir.glob("pytorch_model*.bin"))
    if not files:
        raise ModelLoadError(f"no weights in {str(model_dir)!r}: expected model.safetensors, shards with "
                             f"{SAFETENSORS_INDEX}, or pytorch_model*.bin; save the model with save_pretrained")
    return files


def _hash_weight_file(h, path: Path) -> None:
    """Feed ``h`` a safetensors file's header, or a .bin file's size, plus sampled data bytes."""
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            start = 0
            if path.suffix == ".safetensors":
                head = f.read(8)
                header_len = int.from_bytes(head, "little") if len(head) == 8 else -1
                if header_len < 0 or 8 + header_len > size:
                    raise ModelLoadError(f"cannot read shard {str(path)!r} (bad safetensors header); the file is "
                                         "corrupt or truncated: re-save it")
                h.update(b"safetensors" + f.read(header_len))  # names, dtypes, shapes, offsets
                start = 8 + header_len
            else:
                h.update(f"bin:{size}".encode())
            span = size - start
            if span <= IDENTITY_SAMPLES * IDENTITY_SAMPLE_BYTES:
                offsets = [start]
                chunk = span
            else:  # evenly spaced, the first at the data's start and the last at its end
                step = (span - IDENTITY_SAMPLE_BYTES) / (IDENTITY_SAMPLES - 1)
                offsets = [start + round(i * step) for i in range(IDENTITY_SAMPLES)]
                chunk = IDENTITY_SAMPLE_BYTES
            for offset in offsets:
                f.seek(offset)
                h.update(f.read(chunk))
    except OSError as exc:
        raise ModelLoadError(f"cannot read shard {str(path)!r} ({exc}); re-download or re-save the model") from exc


def checkpoint_identity(model_dir: Union[str, Path]) -> str:
    """A short hash of what the checkpoint holds, from its content only.

    It covers ``config.json``'s bytes and, for each weight file (in file-name order), the
    safetensors header (tensor names, dtypes, shapes and offsets; for a ``.bin`` file its size)
    plus a sample of the tensor bytes: 64 chunks of 4 KiB at evenly spaced offsets over the
    data (all of it when smaller), ~256 KiB read per file. Neither the folder's name nor its
    path nor the files' names or times enter it: copies of a model share cache entries, and a
    model re-saved with other weights (a fine-tune with the same shapes) gets another id.

    It is a sample, not a full hash (a full one would read every byte, minutes on a large
    model): a change confined to bytes outside the samples (say one small tensor edited in
    place in a large shard) keeps the id, and the cache keeps serving the old layers. Remove
    them with ``sli cache rm MODEL_DIR`` (or the model id) before the next warm-up.
    """
    model_dir = Path(model_dir)
    h = hashlib.sha256()
    try:
        config = (model_dir / "config.json").read_bytes()
    except OSError as exc:
        raise ModelLoadError(f"cannot read {model_dir / 'config.json'} ({exc})") from exc
    h.update(len(config).to_bytes(8, "little") + config)
    for path in _weight_files(model_dir):
        _hash_weight_file(h, path)
    return h.hexdigest()[:12]


def checkpoint_model_id(model_dir: Union[str, Path]) -> str:
    """The cache's id of the model in ``model_dir``: ``{model_type}-{checkpoint_identity}``
    (e.g. ``llama-1f2e3d4c5b6a``), computed without building the model."""
    model_dir = Path(model_dir)
    try:
        model_type = json.loads((model_dir / "config.json").read_text()).get("model_type")
    except (OSError, ValueError, AttributeError) as exc:
        raise ModelLoadError(f"cannot read {model_dir / 'config.json'} ({exc}); is it a transformers model?") from exc
    model_type = re.sub(r"[^A-Za-z0-9_.]+", "_", str(model_type or "model"))
    return f"{model_type}-{checkpoint_identity(model_dir)}"


class _BinFile:
    def __init__(self, state: Dict[str, torch.Tensor]) -> None:
        self.state = state

    def keys(self):
        return self.state.keys()

    def get_tensor(self, name: str) -> torch.Tensor:
        return self.state[name]


class SkeletonLoader:
    """Loads checkpoint tensors into parts of a meta-device skeleton, through transformers'
    own renaming and conversion rules (:class:`sli.transformers_adapter.KeyMapper`)."""

    def __init__(self, checkpoint: Checkpoint, model: torch.nn.Module, layers_path: str) -> None:
        from .transformers_adapter import KeyMapper

        self.checkpoint = checkpoint
        self.model = model
        self.keys = KeyMapper(model)
        layer_re = re.compile(rf"^{re.escape(layers_path)}\.(\d+)\.")
        self.names_by_layer: Dict[Optional[int], List[str]] = {None: []}
        for name in checkpoint.names():
            match = layer_re.match(self.keys.target(name))
            self.names_by_layer.setdefault(int(match.group(1)) if match else None, []).append(name)
        self._lock = threading.Lock()

    def load(self, names: List[str], dtype: Optional[torch.dtype]) -> None:
        """Load the named checkpoint tensors into the skeleton (they land where they belong)."""
        state = self.checkpoint.get_many(names)
        with self._lock:
            self.keys.load(self.model, state, dtype)

    def layer_state(self, index: int, layer: torch.nn.Module) -> Dict[str, torch.Tensor]:
        """Layer ``index``'s tensors, named as in the module, in the checkpoint's dtype."""
        names = self.names_by_layer.get(index, [])
        if not names:
            raise ModelLoadError(f"the checkpoint has no tensors for decoder layer {index}; the model files are incomplete: re-save the model")
        self.load(names, None)
        with self._lock:
            state = layer.state_dict()  # persistent tensors only: all must be in the checkpoint
            layer.to("meta")
        missing = [k for k, v in state.items() if v.device.type == "meta"]
        if missing:
            raise ModelLoadError(f"decoder layer {index} lacks {missing[:3]} in the checkpoint; the model files are incomplete or of another architecture")
        return state
