import dataclasses
import json
import struct

import pytest
import torch

import matplotlib  # noqa: F401  (a test dependency: fail, never skip, without it)

from sli import QuantizationConfig, UniversalSLIProcessor  # noqa: E402
from sli.errors import SLIError  # noqa: E402
from sli.streaming import LayerTiming  # noqa: E402
from sli.timeline import _bars, passes, plot_timeline, timings_from_dicts, timings_to_dicts  # noqa: E402

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def png_size(path):
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC, "not a PNG"
    assert data[12:16] == b"IHDR"
    width, height = struct.unpack(">II", data[16:24])
    assert data.rstrip(b"\0").endswith(b"IEND\xaeB`\x82"), "PNG truncated"
    return width, height


def synthetic(steps=3, layers=4):
    out = []
    for step in range(steps):
        for layer in range(layers):
            out.append(LayerTiming(step=step, layer=layer, start=0.01 * layer + 0.001, read_s=0.001 + 1e-4 * layer,
                                   dequant_s=0.003, wait_s=0.002 if layer else 0.0, compute_s=0.005,
                                   nbytes=1000 + layer, resident=layer == 3))
    return out


def test_json_round_trip_keeps_every_field():
    timings = synthetic()
    dicts = json.loads(json.dumps(timings_to_dicts(timings)))
    assert {f.name for f in dataclasses.fields(LayerTiming)} <= set(dicts[0])
    assert timings_from_dicts(dicts) == timings
    # keys from another version are ignored, missing ones take their defaults
    back = timings_from_dicts([{"step": 2, "layer": 5, "from_the_future": 1}])
    assert back == [LayerTiming(step=2, layer=5)]


def test_passes_regroup_a_layer_prefetched_during_the_previous_pass():
    timings = synthetic(steps=2)
    timings[4].step = 0  # the wrap-around prefetch of layer 0 is created while step 0 runs
    groups = passes(timings)
    assert [s for s, _ in groups] == [0, 1]
    assert [[t.layer for t in g] for _, g in groups] == [[0, 1, 2, 3]] * 2


def test_prefetch_bars_end_when_the_layer_is_ready_and_never_overlap():
    group = [LayerTiming(step=1, layer=0, start=0.001, read_s=0.002, dequant_s=0.003),
             LayerTiming(step=1, layer=1, start=0.004, read_s=0.002, dequant_s=0.004, wait_s=0.003, compute_s=0.001)]
    bars = _bars(group)
    dequant = {layer: (left, width) for layer, left, width in bars["dequant_s"]}
    read = {layer: (left, width) for layer, left, width in bars["read_s"]}
    assert dequant[1] == pytest.approx((0.0, 4.0))  # ends at start (4 ms), the layer waited for it
    assert read[1] == pytest.approx((-2.0, 2.0))
    # layer 0's load cannot end after layer 1's began on the one prefetch thread: pushed earlier
    assert dequant[0][0] + dequant[0][1] == pytest.approx(-2.0)
    assert read[0] == pytest.approx((-7.0, 2.0))
    waits = {layer: (left, width) for layer, left, width in bars["wait_s"]}
    assert waits[1] == pytest.approx((1.0, 3.0))


def test_plot_synthetic_and_from_dicts(tmp_path):
    timings = synthetic()
    out = plot_timeline(timings, tmp_path / "a.png", title="synthetic", prefill=True)
    w, h = png_size(out)
    assert w > 600 and h > 200
    # dicts (as in the benchmark's JSON) draw the same way
    w2, _ = png_size(plot_timeline(timings_to_dicts(timings), tmp_path / "b.png", step=1))
    assert w2 < w  # one panel, not two
    with pytest.raises(SLIError, match="step 9"):
        plot_timeline(timings, tmp_path / "c.png", step=9)
    with pytest.raises(SLIError, match="no layer timings"):
        plot_timeline([], tmp_path / "d.png")


def test_plot_a_real_run(model_factory, tmp_path):
    model_dir = model_factory("llama", "tiny")
    proc = UniversalSLIProcessor(str(model_dir), QuantizationConfig(mode="int8"), cache_dir=str(tmp_path / "cache"),
                                 device="cpu", memory_budget_gb=0.0001, prefetch=True)
    try:
        proc.generate(torch.tensor([[5, 6, 7, 8]]), max_new_tokens=3, eos_token_id=[])
        timings = list(proc.timings)
    finally:
        proc.close()
    groups = passes(timings)
    assert [s for s, _ in groups] == [0, 1, 2]  # prefill + two decode steps, each over every layer
    assert all(sorted(t.layer for t in g) == sorted({t.layer for t in g}) for _, g in groups)
    assert all(t.compute_s > 0 for t in timings)
    restored = timings_from_dicts(json.loads(json.dumps(timings_to_dicts(timings))))
    assert restored == timings
    out = plot_timeline(restored, tmp_path / "tl.png", title="tiny llama int8", prefill=True)
    assert out.stat().st_size > 5000
    png_size(out)
