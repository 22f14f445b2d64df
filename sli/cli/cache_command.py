"""`sli cache`: info, verify, clear and rm on a layer cache directory."""
from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Optional

from ..errors import SLIError
from .options import check_mode, config_for, emit, valid_modes


def mode_labels_by_fingerprint():
    from ..cache_report import mode_labels
    from ..quantization import QuantizationConfig

    labels = mode_labels(valid_modes(), config_for)
    for fingerprint, mode in mode_labels([m for m in valid_modes() if m != "mixed"],
                                         lambda m: QuantizationConfig(mode=m)).items():
        labels.setdefault(fingerprint, mode)
    return labels


def _when(timestamp: Optional[float]) -> str:
    return "unknown" if timestamp is None else time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(timestamp))


def _megabytes(size: Optional[int]) -> str:
    return "? MB" if size is None else f"{size / 1e6:.1f} MB"


def cmd_cache(args) -> int:
    from ..cache_disk import index_rows, is_layer_cache
    from ..cache_report import Fingerprint, group_entries
    from ..layer_cache import LayerCache
    from ..processor import default_cache_dir

    cache_dir = Path(args.cache_dir or default_cache_dir()).expanduser()
    if not cache_dir.exists():
        raise SLIError(f"no layer cache at {cache_dir}: the folder does not exist (`sli warm MODEL_DIR "
                       f"--cache-dir {cache_dir}` makes one)")
    if not is_layer_cache(cache_dir):
        # Opening it would create an index there: a user's ordinary folder is left as it is.
        raise SLIError(f"{cache_dir} is not a layer cache (no cache.db in it); nothing was changed")
    with LayerCache(cache_dir) as cache:
        if args.action == "info":
            groups = group_entries(cache.entries(), index_rows(cache_dir), mode_labels_by_fingerprint())
            stats = cache.stats()
            data = {"cache_dir": str(cache_dir), "entries": stats.entries, "disk_bytes": stats.disk_bytes,
                    "models": [g.to_dict() for g in groups]}
            lines = [f"{cache_dir}: {stats.entries} entries, {stats.disk_bytes / 1e6:.1f} MB on disk"]
            width = max([len(g.model_id) for g in groups] + [5])
            if groups:
                lines.append(f"  {'model':<{width}}  {'mode':<12}  {'entries':>7}  {'size':>10}  last used")
            for g in groups:
                mode = g.mode if g.mode != "custom" else f"custom:{g.fingerprint[:8]}"
                lines.append(f"  {g.model_id:<{width}}  {mode:<12}  {len(g.layers):>7}  {_megabytes(g.bytes):>10}  "
                             f"{_when(g.last_used)}")
            emit(args, data, "\n".join(lines))
        elif args.action == "verify":
            store_logger = logging.getLogger("sli.layer_store")
            level = store_logger.level
            if not args.remove:
                # The store logs each bad entry as "removed" even when it is not; the lines
                # below say what happened instead.
                store_logger.setLevel(logging.ERROR)
            try:
                total = len(cache.entries())
                bad = cache.verify(remove=args.remove)
            finally:
                store_logger.setLevel(level)
            if not bad:
                line = f"{total} entries checked; no bad entries found"
            elif args.remove:
                line = f"{len(bad)} bad entries found and removed (of {total} checked)"
            else:
                line = (f"{len(bad)} bad entries found (of {total} checked); nothing was removed: rerun with --remove "
                        "to delete them")
            bad_lines = [f"  bad: {b}" for b in bad]
            emit(args, {"cache_dir": str(cache_dir), "checked": total, "bad": [str(b) for b in bad],
                         "removed": bool(args.remove and bad)}, "\n".join(bad_lines + [line]))
            return 1 if bad and not args.remove else 0
        elif args.action == "rm":
            model_dir = Path(args.model_id).expanduser()
            if model_dir.is_dir() and (model_dir / "config.json").is_file():
                from ..checkpoint import checkpoint_model_id

                args.model_id = checkpoint_model_id(model_dir)  # a model directory: its content's id
            entries = [e for e in cache.entries() if e["model_id"] == args.model_id]
            if not entries:
                known = sorted({e["model_id"] for e in cache.entries()})
                raise SLIError(f"no entries for model {args.model_id!r} in {cache_dir}; cached models: "
                               f"{', '.join(known) if known else 'none'} (see `sli cache info`)")
            labels = mode_labels_by_fingerprint()
            if args.mode is not None:
                check_mode(args.mode)
                chosen = [e for e in entries if labels.get(e["fingerprint"]) == args.mode]
                if not chosen:
                    held = sorted({labels.get(e["fingerprint"], "custom") for e in entries})
                    raise SLIError(f"no {args.mode} entries for model {args.model_id!r} in {cache_dir}; it has: "
                                   f"{', '.join(held)}")
                entries = chosen
            removed = sum(cache.delete(e["model_id"], e["layer"], Fingerprint(e["fingerprint"])) for e in entries)
            what = f"{args.model_id}" + (f" ({args.mode})" if args.mode else "")
            emit(args, {"cache_dir": str(cache_dir), "model_id": args.model_id, "mode": args.mode,
                         "removed": removed}, f"removed {removed} entries of {what} from {cache_dir}")
        else:
            count = len(cache.entries())
            cache.clear()
            emit(args, {"cache_dir": str(cache_dir), "cleared": True, "removed": count},
                  f"cleared {cache_dir}: {count} entries removed")
    return 0


