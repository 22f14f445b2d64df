"""The kernel team (sli.kernels.team): threads that poll for work split a product's rows and
give the one-thread result bit for bit; what it does not take goes the old way."""
import multiprocessing
import threading
import time

import numpy as np
import pytest
import torch

from sli import kernels
from sli.kernels import dispatch, team
from sli.quantization import QuantizationConfig, codec_for


@pytest.fixture
def two_threads(monkeypatch):
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    monkeypatch.delenv("SLI_NO_TEAM", raising=False)
    yield dispatch.team()
    torch.set_num_threads(threads)


@pytest.fixture
def counted(monkeypatch):
    """How many products the team ran, by kernel name."""
    ran = {}
    real = team.Team.run

    def run(self, name, count, args):
        took = real(self, name, count, args)
        ran[name] = ran.get(name, 0) + int(took)
        return took

    monkeypatch.setattr(team.Team, "run", run)
    return ran


def _weight(mode, shape, double_quant=True, group=128):
    g = torch.Generator().manual_seed(1)
    w = (torch.randn(*shape, generator=g) * 0.02).to(torch.bfloat16)
    codec = codec_for(mode)
    config = QuantizationConfig(mode=mode, double_quant=double_quant, compress_statistics=double_quant) if mode in ("nf4", "fp4") else \
        QuantizationConfig(mode=mode, group_size=group)
    return codec, codec.prepare(codec.quantize(w, config))


@pytest.mark.parametrize("mode,double_quant,group,kernel", [
    ("int8", True, 128, "matmul_int8q"), ("nf4", True, 128, "matmul_4bitq"), ("nf4", False, 128, "matmul_4bitq"),
    ("fp4", True, 128, "matmul_4bitq"), ("none", True, 128, "matmul_bf16"),
    # INT4: groups of 128 and 192 have kernels of their own (the same arguments, told apart by the job's kind)
    ("int4", True, 128, "matmul_int4q_g128"), ("int4", True, 192, "matmul_int4q_g192"), ("int4", True, 64, "matmul_int4q")])
@pytest.mark.parametrize("rows", [1, 3])
def test_a_product_split_across_the_team_equals_one_thread_s_bit_for_bit(two_threads, counted, monkeypatch, mode,
                                                                         double_quant, group, kernel, rows):
    monkeypatch.setattr(kernels, "INT8_LEVELS_ROWS", 1)  # NF4/FP4's int8 levels (off by default at 1 row)
    codec, q = _weight(mode, (517, 1024), double_quant, group)  # 517 rows: chunks of unequal size
    x = codec.prepare_input(torch.randn(rows, 1024, generator=torch.Generator().manual_seed(2)))
    monkeypatch.setattr(dispatch, "TEAM_WORK", 1 << 62)
    monkeypatch.setattr(dispatch, "INLINE_WORK", 1 << 62)
    alone = codec.fused_linear(q, x, None)
    assert not counted
    monkeypatch.setattr(dispatch, "TEAM_WORK", 0)
    for _ in range(20):  # the worker awake or asleep, the chunks taken by either thread
        assert torch.equal(codec.fused_linear(q, x, None), alone)
    assert counted == {kernel: 20}


def test_the_worker_sleeps_when_idle_and_a_posted_job_wakes_it(two_threads, monkeypatch):
    codec, q = _weight("int8", (256, 512))
    x = torch.randn(1, 512)
    monkeypatch.setattr(dispatch, "TEAM_WORK", 0)
    expected = codec.fused_linear(q, x, None)
    deadline = time.time() + 5
    while not two_threads.control[team.ASLEEP] and time.time() < deadline:
        time.sleep(team.SPIN_US / 1e6)
    assert two_threads.control[team.ASLEEP] == 1  # it stopped polling
    wakes = two_threads.wakes
    assert torch.equal(codec.fused_linear(q, x, None), expected)  # the leader does not wait for it
    while two_threads.wakes == wakes and time.time() < deadline + 5:
        time.sleep(0.001)
    assert two_threads.wakes > wakes  # woken by the post (it may be asleep again by now)


def test_arguments_of_another_type_or_layout_are_refused_and_nothing_is_written(two_threads):
    rows, cols = 64, 128
    q = np.ones(rows * cols, np.int8)
    scale = np.ones(rows, np.float32)
    xq, xs, corr = np.ones(cols, np.int8), np.ones(1, np.float32), np.zeros(1, np.float32)
    oidx, oval = np.zeros((1, 1), np.int64), np.zeros((1, 1), np.float32)
    y = np.full((1, rows), -1.0, np.float32)
    good = (q, scale, xq, xs, corr, oidx, oval, cols, y)
    assert two_threads.run("matmul_int8q", rows, good)
    assert (y != -1).all()
    y[:] = -1
    for at, wrong in ((2, xq.astype(np.int16)), (8, np.full((rows, 2), -1.0, np.float32)[:, ::2].T),
                      (7, float(cols)), (0, q.reshape(rows, cols))):
        args = list(good)
        args[at] = wrong
        assert not two_threads.run("matmul_int8q", rows, tuple(args)), at
    assert not two_threads.run("matmul_int8q", rows, good[:-1])  # an argument missing
    assert not two_threads.run("dequantize_4bit", rows, good)  # a kernel the team does not run
    assert (y == -1).all()


def test_a_second_leader_splits_through_the_pool_meanwhile(two_threads, monkeypatch):
    # the prefetch thread dequantizes while the compute thread multiplies: one leads the team,
    # the other finds it busy and takes the pool
    codec, q = _weight("int8", (1024, 1024))
    monkeypatch.setattr(dispatch, "TEAM_WORK", 0)
    monkeypatch.setattr(dispatch, "INLINE_WORK", 0)
    xs = [torch.randn(1, 1024, generator=torch.Generator().manual_seed(s)) for s in range(2)]
    expected = [codec.fused_linear(q, x, None) for x in xs]
    pooled = []
    real = dispatch.ThreadPoolExecutor.submit
    monkeypatch.setattr(dispatch.ThreadPoolExecutor, "submit", lambda pool, *a, **k: pooled.append(1) or real(pool, *a, **k))
    errors = []

    def loop(which):  # 200 products each, then on until the threads have met (a loaded machine may keep them apart)
        done, deadline = 0, time.monotonic() + 60
        while done < 200 or (not pooled and time.monotonic() < deadline):
            if not torch.equal(codec.fused_linear(q, xs[which], None), expected[which]):
                errors.append(which)
            done += 1

    threads = [threading.Thread(target=loop, args=(w,)) for w in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert pooled  # the two threads met at least once


def test_sli_no_team_turns_it_off(monkeypatch):
    monkeypatch.setenv("SLI_NO_TEAM", "1")
    assert dispatch.team() is None


def _int8_product(rows=256, cols=512):
    """An INT8 product's kernel arguments as numpy arrays (no torch op: a forked child of a
    process whose torch ran its OpenMP threads may hang in its next one)."""
    g = np.random.default_rng(3)
    xq = g.integers(-127, 128, cols, dtype=np.int8)
    return (g.integers(-127, 128, rows * cols, dtype=np.int8), g.random(rows, dtype=np.float32), xq,
            np.ones(1, np.float32), np.full(1, 128.0 * xq.sum(), np.float32), np.zeros((1, 0), np.int64),
            np.zeros((1, 0), np.float32), cols, np.zeros((1, rows), np.float32))


_CHILD_ARGS = _int8_product()


def _product_in_child(queue):
    dispatch.TEAM_WORK = 0
    *args, y = _CHILD_ARGS
    y[:] = 0
    dispatch.run("matmul_int8q", y.shape[1], 1 << 20, *args, y)
    queue.put((dispatch.team() is not None, y.copy()))


def test_a_forked_child_starts_its_own_team(two_threads, monkeypatch):
    monkeypatch.setattr(dispatch, "TEAM_WORK", 0)
    *args, y = _CHILD_ARGS
    assert two_threads.run("matmul_int8q", y.shape[1], _CHILD_ARGS)
    expected = y.copy()
    context = multiprocessing.get_context("fork")
    queue = context.Queue()
    child = context.Process(target=_product_in_child, args=(queue,))
    child.start()
    has_team, got = queue.get(timeout=120)
    child.join(timeout=60)
    assert child.exitcode == 0 and has_team
    assert np.array_equal(got, expected)


def test_a_pass_that_streams_layers_pauses_the_team(two_threads):
    # its prefetch thread needs the core a polling worker would hold
    with team.paused():
        assert dispatch.team() is None
    assert dispatch.team() is two_threads
