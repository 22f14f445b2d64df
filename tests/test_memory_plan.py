"""The memory plan: a pure function of the sizes involved."""
import pytest

from sli.memory_plan import plan_memory

MB = 1 << 20


def plan(budget, **overrides):
    sizes = dict(num_layers=10, shared_bytes=100 * MB, layer_bytes=50 * MB, scratch_bytes=8 * MB, prefetch_depth=1,
                 runtime_bytes=0, available_bytes=10_000 * MB)
    sizes.update(overrides)
    return plan_memory(budget, **sizes)


@pytest.mark.parametrize("budget_mb, resident", [
    (208, 0),          # shared + two layers in flight + scratch: nothing left over
    (257, 0),          # 49 MB spare: short of one layer
    (258, 1),          # 50 MB spare: exactly one layer
    (10_000, 10),      # more than the model: every layer resident, never more than there are
])
def test_resident_layers_fill_what_the_budget_leaves(budget_mb, resident):
    assert plan(budget_mb * MB).resident_layers == list(range(resident))


def test_a_budget_below_the_fixed_part_streams_everything_and_says_so():
    p = plan(150 * MB)
    assert p.resident_layers == [] and p.over_budget and p.fixed_bytes == (100 + 100 + 8) * MB


def test_deeper_prefetch_keeps_more_layers_in_flight():
    assert plan(400 * MB, prefetch_depth=3).streaming_bytes == 4 * 50 * MB + 8 * MB
    assert len(plan(400 * MB, prefetch_depth=3).resident_layers) < len(plan(400 * MB).resident_layers)


def test_no_budget_uses_the_available_memory():
    p = plan(None, available_bytes=308 * MB)
    assert p.resident_layers == [0, 1] and not p.over_budget


def test_kv_the_budget_cannot_hold_spills_from_the_last_layer_back():
    # 10 layers of 20 MB KV: 200 MB will not fit beside the 208 MB fixed part of a 300 MB budget
    p = plan(300 * MB, kv_layer_bytes=20 * MB, kv_can_spill=True)
    # room for KV: 300 - 208 - 20 (one spilled layer in flight) = 72 MB: 3 layers stay in memory
    assert p.kv_spilled_layers == list(range(3, 10)) and p.kv_bytes == 4 * 20 * MB
    assert p.kv_spilled_bytes == 7 * 20 * MB and not p.over_budget and p.resident_layers == []


def test_kv_that_cannot_spill_stays_in_the_plan_whole():
    p = plan(300 * MB, kv_layer_bytes=20 * MB, kv_can_spill=False)
    assert p.kv_spilled_layers == [] and p.kv_bytes == 200 * MB and p.over_budget


@pytest.mark.parametrize("depth, kept, in_flight", [
    (1, 2, 1),  # spread among the disk layers: a disk layer follows each kept one
    (1, 6, 2),  # more kept than disk layers: two kept ones run back to back
    (3, 3, 2),  # four layers in flight reach a second kept layer (kept 1, 4, 6 of 8)
])
def test_the_read_buffers_are_counted_beside_the_kept_layers_that_can_be_in_flight_at_once(depth, kept, in_flight):
    p = plan(1000 * MB, num_layers=8, shared_bytes=0, layer_bytes=100 * MB, scratch_bytes=0, prefetch_depth=depth)
    p.resident_layers = []
    p.split_streamed(kept * 100 * MB, read_buffers=(depth + 1) * 100 * MB)
    assert len(p.streamed_layers) - len(p.page_dropped_layers) == kept
    # the buffers (one a layer in flight) beside the kept layers in flight, less the layers in
    # flight the plan already counted
    assert p.read_buffer_bytes == in_flight * 100 * MB
