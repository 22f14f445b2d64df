"""A per-layer timeline of one streamed forward pass: where the time goes.

``plot_timeline(proc.timings, "timeline.png")`` draws, for one pass (default: the last
decode step; optionally the prefill beside it), one lane per decoder layer. Each lane
has two half-bars:

* top, the **prefetch thread**: reading the layer's cache entry, then dequantizing it
  into the compute buffers (on CPU, a layer the compute thread already waits for is
  readied by that thread: then the dequantize bar is time inside its wait, drawn on top
  all the same);
* bottom, the **compute thread**: waiting for the layer to be ready, then its forward.

x is milliseconds from the start of the pass. A prefetch that overlaps the previous
layer's compute shows as top bars under the bottom bars of the lane above; wait bars
are the part of the streaming that the prefetch did not hide.

How the bars are placed (from :class:`sli.streaming.LayerTiming`; ``start`` is when the
layer's forward began, ``wait_s`` the compute thread's wait just before it):

* compute: ``[start, start + compute_s]``; wait: ``[start - wait_s, start]`` (exact up
  to the few microseconds spent assigning the buffers to the module between the two);
* read + dequantize: the timings hold their durations, not their start. They are drawn
  ending at the moment the layer became ready, i.e. at ``start`` (exact when
  ``wait_s > 0``: the compute thread was waiting for exactly that moment), and moved
  earlier where needed so that the prefetch thread (one worker, one layer at a time)
  never runs two layers at once. When ``wait_s == 0`` the layer was ready earlier than
  drawn: the placement is the latest consistent with the timings, not a measurement.
  A layer prefetched before its pass began (the first streamed layer, loaded while
  the previous pass finished) shows left of 0.

Resident layers have only a compute bar and are marked "(resident)". Time outside the
decoder layers (embeddings, final norm, head, sampling) is not in the timings and not drawn.

``timings_to_dicts`` / ``timings_from_dicts`` turn timings into JSON-ready dicts and back.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple, Union

from .errors import SLIError

PHASES = (  # (field, label, colour, lane: 0 = prefetch thread, 1 = compute thread)
    ("read_s", "read", "#4C72B0", 0),
    ("dequant_s", "dequantize", "#55A868", 0),
    ("wait_s", "waiting", "#C44E52", 1),
    ("compute_s", "compute", "#8172B2", 1),
)


def _get(t: Any, name: str, default: Any = 0.0) -> Any:
    """A field of a LayerTiming or of its dict (missing fields read as ``default``)."""
    if isinstance(t, Mapping):
        return t.get(name, default)
    return getattr(t, name, default)


def timings_to_dicts(timings: Iterable[Any]) -> List[Dict[str, Any]]:
    """JSON-ready dicts of :class:`LayerTiming` objects (every field, whatever the version)."""
    out = []
    for t in timings:
        if isinstance(t, Mapping):
            out.append(dict(t))
        elif dataclasses.is_dataclass(t):
            out.append(dataclasses.asdict(t))
        else:
            out.append(dict(vars(t)))
    return out


def timings_from_dicts(dicts: Iterable[Mapping[str, Any]]) -> list:
    """:class:`LayerTiming` objects from :func:`timings_to_dicts`'s dicts; keys this version's
    LayerTiming does not have are ignored, missing ones take their defaults."""
    from .streaming import LayerTiming

    names = {f.name for f in dataclasses.fields(LayerTiming)}
    return [LayerTiming(**{k: v for k, v in d.items() if k in names}) for d in dicts]


def passes(timings: Sequence[Any]) -> List[Tuple[int, list]]:
    """Split timings (in the order recorded) into forward passes: ``[(step, [timing, ...]), ...]``.

    A pass ends where the layer index stops increasing. Its step is the largest its entries
    carry: a layer prefetched while the previous pass finished may carry that pass's step.
    """
    groups: List[list] = []
    for t in timings:
        if not groups or _get(t, "layer", 0) <= _get(groups[-1][-1], "layer", 0):
            groups.append([])
        groups[-1].append(t)
    return [(max(_get(t, "step", 0) for t in g), g) for g in groups]


def require_matplotlib():
    """``matplotlib``, or an :class:`SLIError` that says how to install it."""
    try:
        import matplotlib
        from matplotlib.figure import Figure  # noqa: F401
    except ImportError as exc:
        raise SLIError("drawing the timeline needs matplotlib: pip install matplotlib "
                       "(or the bench extra: pip install -e '.[bench]')") from exc
    return matplotlib


def _bars(group: list) -> Dict[str, List[Tuple[int, float, float]]]:
    """Per phase, ``(layer, left_ms, width_ms)`` bars of one pass (placement: module docstring)."""
    bars: Dict[str, List[Tuple[int, float, float]]] = {name: [] for name, *_ in PHASES}
    prefetch_free = float("inf")  # the prefetch thread's next load began here (walking backwards)
    for t in sorted(group, key=lambda t: _get(t, "start"), reverse=True):
        layer, start = _get(t, "layer", 0), _get(t, "start")
        bars["compute_s"].append((layer, start, _get(t, "compute_s")))
        bars["wait_s"].append((layer, start - _get(t, "wait_s"), _get(t, "wait_s")))
        if _get(t, "resident", False):
            continue
        end = min(start, prefetch_free)
        dequant_at = end - _get(t, "dequant_s")
        read_at = dequant_at - _get(t, "read_s")
        bars["dequant_s"].append((layer, dequant_at, _get(t, "dequant_s")))
        bars["read_s"].append((layer, read_at, _get(t, "read_s")))
        prefetch_free = read_at
    return {k: [(layer, left * 1e3, width * 1e3) for layer, left, width in v] for k, v in bars.items()}


def plot_timeline(timings: Sequence[Any], path: Union[str, Path], title: Optional[str] = None,
                  step: Optional[int] = None, prefill: bool = False, dpi: int = 120) -> Path:
    """Draw one pass's per-layer timeline to ``path`` (PNG, SVG, PDF: by its suffix).

    ``timings``: ``proc.timings`` (:class:`LayerTiming` objects) or their dicts.
    ``step``: the pass to draw (0 = prefill; default: the last decode step, or the
    prefill if there is none). ``prefill``: draw the prefill too, in a panel on the left.
    """
    require_matplotlib()
    from matplotlib.figure import Figure
    from matplotlib.patches import Patch

    by_step: Dict[int, list] = {}
    for s, group in passes(list(timings)):
        by_step[s] = group  # steps count up over the processor's life; were one repeated, its last pass wins
    if not by_step:
        raise SLIError("no layer timings to draw: run a generation with the processor first")
    if step is None:
        step = max(by_step)
    if step not in by_step:
        raise SLIError(f"no timings for step {step}; recorded steps: {sorted(by_step)}")
    shown = ([0] if prefill and step != 0 and 0 in by_step else []) + [step]

    layers = sorted({_get(t, "layer", 0) for s in shown for t in by_step[s]})
    resident = {_get(t, "layer", 0) for s in shown for t in by_step[s] if _get(t, "resident", False)}
    fig = Figure(figsize=(6.5 * len(shown), 2.4 + 0.28 * len(layers)), dpi=dpi, layout="constrained")
    axes = fig.subplots(1, len(shown), sharey=True, squeeze=False)[0]
    for ax, s in zip(axes, shown):
        group = by_step[s]
        bars = _bars(group)
        for name, _, colour, lane in PHASES:
            for layer, left, width in bars[name]:
                y = layer - 0.42 + 0.42 * lane  # top half-lane: prefetch thread; bottom: compute
                ax.broken_barh([(left, width)], (y, 0.4), facecolors=colour)
        end_ms = max(_get(t, "start") + _get(t, "compute_s") for t in group) * 1e3
        for x in (0.0, end_ms):
            ax.axvline(x, color="0.6", lw=0.8, ls="--")
        totals = " · ".join(f"{label} {sum(_get(t, name) for t in group) * 1e3:.1f}" for name, label, *_ in PHASES)
        streamed = sum(1 for t in group if not _get(t, "resident", False))
        ax.set_title(f"{'prefill' if s == 0 else f'decode step {s}'}: {len(group)} layers ({streamed} streamed), "
                     f"last done at {end_ms:.1f} ms\nsum over layers (ms): {totals}", fontsize=9)
        ax.set_xlabel("ms from the start of the pass (dashed: pass start, last layer done)", fontsize=9)
        ax.grid(axis="x", color="0.9")
        ax.set_axisbelow(True)
    ax0 = axes[0]
    ax0.set_ylim(max(layers) + 0.6, min(layers) - 0.6)  # layer 0 on top
    if len(layers) <= 48:
        ax0.set_yticks(layers, [f"{i} (resident)" if i in resident else str(i) for i in layers], fontsize=8)
    ax0.set_ylabel("layer")
    threads = ("prefetch thread, top half", "compute thread, bottom half")
    fig.legend(handles=[Patch(color=c, label=f"{label} ({threads[lane]})") for _, label, c, lane in PHASES],
               loc="outside lower center", ncols=4 if len(shown) > 1 else 2, fontsize=8, frameon=False)
    if title:
        fig.suptitle(title, fontsize=11)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    return path
