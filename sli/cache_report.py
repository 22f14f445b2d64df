"""What a layer cache directory holds, per model and mode, for ``sli cache info`` and ``rm``.

The entries come from :meth:`LayerCache.entries` (model id, layer, config fingerprint); each
one's bytes and last use from :func:`sli.cache_disk.index_rows` (diskcache's index, read-only);
when it cannot be read the report still lists entries, without bytes or times.
A fingerprint is named by the mode whose config (as ``sli`` builds it for ``--mode``) has it.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Callable, Dict, Iterable, List, Optional, Tuple




@dataclass
class Group:
    """The entries of one model under one config."""

    model_id: str
    mode: str
    fingerprint: str
    layers: List[str] = field(default_factory=list)
    bytes: Optional[int] = 0
    last_used: Optional[float] = None

    def to_dict(self) -> dict:
        data = asdict(self)
        data["entries"] = len(self.layers)
        return data


def mode_labels(modes: Iterable[str], config_for: Callable[[str], object]) -> Dict[str, str]:
    """fingerprint -> mode name, for each mode's config as ``config_for(mode)`` builds it."""
    labels: Dict[str, str] = {}
    for mode in modes:
        try:
            labels.setdefault(config_for(mode).fingerprint(), mode)
        except Exception:  # a mode whose config cannot be built here names nothing
            continue
    return labels


def group_entries(entries: List[Dict[str, str]], rows: Dict[str, Tuple[Optional[int], Optional[float]]],
                  labels: Dict[str, str]) -> List[Group]:
    """Entries grouped by (model id, fingerprint), sorted by model then mode."""
    groups: Dict[Tuple[str, str], Group] = {}
    for entry in entries:
        model_id, layer, fingerprint = entry["model_id"], entry["layer"], entry["fingerprint"]
        group = groups.setdefault((model_id, fingerprint), Group(model_id, labels.get(fingerprint, "custom"),
                                                                 fingerprint))
        group.layers.append(layer)
        size, access = rows.get("\x00".join((model_id, layer, fingerprint)), (None, None))
        if size is None or group.bytes is None:
            group.bytes = None
        else:
            group.bytes += int(size)
        if access is not None and (group.last_used is None or access > group.last_used):
            group.last_used = float(access)
    for group in groups.values():
        group.layers.sort(key=lambda name: (not name.isdigit(), int(name) if name.isdigit() else 0, name))
    return sorted(groups.values(), key=lambda g: (g.model_id, g.mode, g.fingerprint))


class Fingerprint:
    """Names a config by its fingerprint alone, for :meth:`LayerCache.delete` of an entry whose
    config is known only from its key (a ``ConfigKey``: ``fingerprint()`` and ``describe()``)."""

    def __init__(self, fingerprint: str) -> None:
        self._fingerprint = fingerprint

    def fingerprint(self) -> str:
        return self._fingerprint

    def describe(self) -> str:
        return f'{{"fingerprint": "{self._fingerprint}"}}'
