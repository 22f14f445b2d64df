"""A team of kernel threads that wait for work spinning, so a product splits across cores
without waking a thread.

A thread pool hands a kernel's second half to a sleeping thread: on these VMs that costs
~50-100 µs a product (the idle vCPU wakes slowly), as much as a small model's whole product,
so SmolLM2's products ran on one core (docs/benchmarks.md). llama.cpp's threads poll
instead. Here each worker thread stays inside compiled code between jobs (no GIL), polling a
control word with atomic loads (:mod:`sli.kernels.atomics`); the calling thread (the leader)
writes a job (the kernel and its arguments' addresses), publishes it, and claims chunks of
its output rows itself, as each worker does, until none is left. A chunk is claimed with a
compare-and-swap on a word that also holds the job's number and chunk count, so a worker
that is late never runs a chunk of the next job with this one's arguments. The leader then
waits for the chunks others claimed. Every output row is computed by the same kernel call
whichever thread takes it: the result is bit for bit the one-thread result.

A worker spins for ``SPIN_US`` after its last chunk, then sleeps on an event (a generation
between tokens, a streamed layer waiting for the disk, torch's own threads on a prompt get the
core back); the leader wakes it when it posts the next job, and does not wait for it: a
sleeping worker's chunks are claimed by the leader. ``SLI_NO_TEAM=1`` turns the team off
(products split through :mod:`sli.kernels.dispatch`'s pool as before).

Kernels the team runs are those in :data:`ARGUMENTS`; each argument travels as three int64
slots of the job (an array's address and up to two dimensions, or a number) and is rebuilt
by ``run_chunk`` with the dtype the table names, so an argument of another dtype or layout
is refused (:meth:`Team.run` returns False and the caller splits it its own way).
"""
from __future__ import annotations

import atexit
import contextlib
import os
import threading
import time
from typing import Dict, Optional, Sequence, Tuple

import numpy as np

from .. import settings
from .int4 import CONSTANT_GROUPS, constant_group_kernel


_INT4Q = ("u8", "i16", "u8", "i8", "f32", "f32", "i64:2", "f32:2")  # INT4's kernels up to the group size

# The kernels the team runs, with their arguments before (start, stop): a dtype name and
# dimensions ("u8" a 1-d uint8 array, "f32:2" a 2-d float32 one), "int" or "float".
# "xq" is the int8 activations in the form the level's 4-bit kernels read (int16 on the SIMD
# levels, :func:`sli.kernels.levels_buffer`).
ARGUMENTS: Dict[str, Tuple[str, ...]] = {
    "matmul_int8q": ("i8", "f32", "i8", "f32", "f32", "i64:2", "f32:2", "int", "f32:2"),
    "matmul_4bitq": ("u8", "f32", "i8", "f32", "xq", "f32", "i64:2", "f32:2", "int", "f32:2"),
    "matmul_int4q": _INT4Q + ("int", "f32:2"),
    "matmul_bf16": ("u16", "f32", "f32:2", "f32:2"),
    # matmul_int4q built for a group size (sli.kernels.int4.CONSTANT_GROUPS): no group argument
    **{constant_group_kernel(group): _INT4Q + ("f32:2",) for group in CONSTANT_GROUPS},
}
KINDS = tuple(ARGUMENTS)
CONSTANT_KINDS = tuple(constant_group_kernel(group) for group in CONSTANT_GROUPS)  # the last kinds
# an array argument's type code: 4 * (its dtype's place here + 1) + its dimensions
_DTYPES = {"u8": "uint8", "i8": "int8", "u16": "uint16", "i16": "int16", "i64": "int64", "f32": "float32"}
_PLACES = {numpy_name: place for place, numpy_name in enumerate(_DTYPES.values())}
NUMBER_CODES = {"int": 1, "float": 2}

SPIN_US = 2000  # how long a worker polls after its last chunk before it sleeps
CHUNKS_A_THREAD = 4  # a job's rows in this many chunks a thread: a late or slow thread costs 1/4 of its share
SLOTS = 3  # job slots an argument: an array's address and dimensions, or a number
JOB_SLOTS = 3 + SLOTS * max(len(a) for a in ARGUMENTS.values())
# the control words, each on its own cache line (int64 index = 8 a line)
CLAIM, DONE, QUIT, ASLEEP = 0, 8, 16, 24  # ASLEEP + 8 * worker: that worker sleeps


def enabled() -> bool:
    return not settings.flag("SLI_NO_TEAM")


def type_codes(level: str) -> np.ndarray:
    """``[kind, argument]``: the code :func:`_put` gives each argument a kind takes (0 past
    its last), for ``lead`` to refuse a call whose arguments differ."""
    codes = np.zeros((len(KINDS), max(len(a) for a in ARGUMENTS.values())), np.int64)
    for k, kinds in enumerate(ARGUMENTS.values()):
        for i, kind in enumerate(kinds):
            if kind in NUMBER_CODES:
                codes[k, i] = NUMBER_CODES[kind]
                continue
            dtype, _, dims = kind.partition(":")
            dtype = ("i8" if level == "plain" else "i16") if dtype == "xq" else dtype
            codes[k, i] = 4 * (list(_DTYPES).index(dtype) + 1) + int(dims or 1)
    return codes


def accepts(name: str, args: Sequence, level: str) -> bool:
    """Whether the team takes kernel ``name`` with ``args`` (what ``lead`` checks in compiled
    code, for callers that lead it from compiled code themselves)."""
    if name not in ARGUMENTS or len(args) != len(ARGUMENTS[name]):
        return False
    wanted = type_codes(level)[KINDS.index(name)]
    return all(_code(value) == wanted[i] for i, value in enumerate(args))


def _code(value) -> int:
    """An argument's type code as :func:`_put` gives it (0: not one the team takes)."""
    if isinstance(value, np.ndarray):
        names = list(_DTYPES.values())
        if value.dtype.name not in names or value.ndim > 2 or not value.flags.c_contiguous:
            return 0
        return 4 * (names.index(value.dtype.name) + 1) + value.ndim
    if isinstance(value, (int, np.integer)) and not isinstance(value, bool):
        return NUMBER_CODES["int"]
    if isinstance(value, (float, np.floating)):
        return NUMBER_CODES["float"]
    return 0


def _static_code(value) -> int:
    """A numba type's code as :func:`_put` gives it (0: not one the team takes)."""
    from numba import types

    if isinstance(value, types.Array):
        place = _PLACES.get(str(value.dtype))
        if value.layout != "C" or value.ndim > 2 or place is None:
            return 0
        return 4 * (place + 1) + value.ndim
    if isinstance(value, types.Integer):
        return NUMBER_CODES["int"]
    if isinstance(value, types.Float):
        return NUMBER_CODES["float"]
    return 0


def _put(job, numbers, at, value):  # (compiled only: see the overload in _build)
    raise NotImplementedError


def _kind_of(arg_types) -> int:
    """The kind whose arguments have numba types ``arg_types`` (-1: none); "xq" is int8 or
    int16 (its form on the plain level or on a SIMD one)."""
    found = [_static_code(value) for value in arg_types]
    for kind, (plain, simd) in enumerate(zip(type_codes("plain"), type_codes("avx2"))):
        wanted = [(int(p), int(s)) for p, s in zip(plain, simd) if p]
        if len(found) == len(wanted) and all(code in pair for code, pair in zip(found, wanted)):
            return kind
    return -1


_built: Dict[str, dict] = {}


def build(kernels: dict, level: str, variant: str = "") -> dict:
    """The team's compiled functions (``lead``, ``follow``, ``cycles``) over the kernels built
    for ``level`` and the helpers' ``variant`` (:func:`sli.kernels.dispatch.variant`), built once
    a process."""
    key = level + variant  # the helpers' variant (sli.kernels.simd): its kernels are others
    if key not in _built:
        _built[key] = _build(kernels, level, variant)
    return _built[key]


def _build(kernels: dict, level: str, variant: str = "") -> dict:
    from numba import carray, literal_unroll, njit, types
    from numba.extending import overload

    from . import atomics
    from .jit import SOURCE_HASH, stable_id

    load, store, add, swap_if, pause, cycles, pointer = (atomics.load, atomics.store, atomics.add, atomics.swap_if,
                                                         atomics.pause, atomics.cycles, atomics.pointer)
    int8q, four_bit, int4q, bf16, int4q_a, int4q_b = (kernels[name] for name in KINDS)
    i8, u8, i16, u16, i64, f32 = np.int8, np.uint8, np.int16, np.uint16, np.int64, np.float32
    xq = np.int8 if level == "plain" else np.int16
    key = level + variant  # in the ids: compiled code over another variant's kernels is other code
    compiled = njit(nogil=True, cache=True)
    # run_chunk calls every kernel: as a function of its own, its callers linked its whole body in
    # and optimized it again; inlined into follow's numba IR, it is compiled there only (a level's
    # first compile: 5.5 s less). A leader runs its own kind's only (run_own).
    inlined = njit(nogil=True, cache=True, inline="always")

    @overload(_put, jit_options={"nogil": True})
    def _put_overload(job, numbers, at, value):
        # an argument into its slots; returns its type code (0: not one the team takes)
        code = _static_code(value)
        if code == 0:
            return lambda job, numbers, at, value: 0
        if isinstance(value, types.Array) and value.ndim == 1:
            def put_1d(job, numbers, at, value):
                job[at], job[at + 1], job[at + 2] = value.ctypes.data, value.shape[0], 0
                return code
            return put_1d
        if isinstance(value, types.Array):
            def put_2d(job, numbers, at, value):
                job[at], job[at + 1], job[at + 2] = value.ctypes.data, value.shape[0], value.shape[1]
                return code
            return put_2d
        if isinstance(value, types.Integer):
            def put_int(job, numbers, at, value):
                job[at] = value
                return code
            return put_int

        def put_float(job, numbers, at, value):
            numbers[at] = value
            return code
        return put_float

    @compiled
    def a1(job, at, dtype):  # argument slot `at` as a 1-d array
        return carray(pointer(job[at], dtype), job[at + 1])

    @compiled
    def a2(job, at, dtype):  # as a 2-d array
        return carray(pointer(job[at], dtype), (job[at + 1], job[at + 2]))

    stable_id(a1, "team.a1")
    stable_id(a2, "team.a2")

    # each kind's call on chunk [lo, hi) of the job's rows; the job: job[0] the kind, [1] the rows,
    # [2] the chunks, then SLOTS slots an argument (numbers: the same slots as float64, for "float" ones)
    @inlined
    def run_int8q(job, numbers, lo, hi):
        int8q(a1(job, 3, i8), a1(job, 6, f32), a1(job, 9, i8), a1(job, 12, f32), a1(job, 15, f32),
              a2(job, 18, i64), a2(job, 21, f32), job[24], a2(job, 27, f32), lo, hi)

    @inlined
    def run_4bitq(job, numbers, lo, hi):
        four_bit(a1(job, 3, u8), a1(job, 6, f32), a1(job, 9, i8), a1(job, 12, f32), a1(job, 15, xq),
                 a1(job, 18, f32), a2(job, 21, i64), a2(job, 24, f32), job[27], a2(job, 30, f32), lo, hi)

    @inlined
    def run_int4q(job, numbers, lo, hi):
        int4q(a1(job, 3, u8), a1(job, 6, i16), a1(job, 9, u8), a1(job, 12, i8), a1(job, 15, f32),
              a1(job, 18, f32), a2(job, 21, i64), a2(job, 24, f32), job[27], a2(job, 30, f32), lo, hi)

    @inlined
    def run_bf16(job, numbers, lo, hi):
        bf16(a1(job, 3, u16), a1(job, 6, f32), a2(job, 9, f32), a2(job, 12, f32), lo, hi)

    def constant_group_run(kernel):
        @inlined
        def run_int4q_group(job, numbers, lo, hi):
            kernel(a1(job, 3, u8), a1(job, 6, i16), a1(job, 9, u8), a1(job, 12, i8), a1(job, 15, f32),
                   a1(job, 18, f32), a2(job, 21, i64), a2(job, 24, f32), a2(job, 27, f32), lo, hi)

        return run_int4q_group

    run_int4q_a, run_int4q_b = constant_group_run(int4q_a), constant_group_run(int4q_b)  # CONSTANT_GROUPS'
    first_constant = KINDS.index(CONSTANT_KINDS[0])
    runs = (run_int8q, run_4bitq, run_int4q, run_bf16, run_int4q_a, run_int4q_b)  # in KINDS' order
    for kind, run in zip(KINDS, runs):
        stable_id(run, f"team.run_{kind}:{key}")

    def run_own(args, job, numbers, lo, hi):  # (compiled only: the overload below)
        raise NotImplementedError

    # lead holds this stub, pickled by value into its cache key: the name keeps the levels' leads apart
    run_own.__name__ = run_own.__qualname__ = f"run_own_{key.replace('+', '_')}_{SOURCE_HASH}"

    @overload(run_own, jit_options={"nogil": True})
    def _run_own_overload(args, job, numbers, lo, hi):
        # a leader's chunk: the kind whose arguments `args` are, read from the job as a worker
        # reads it (the same bits whoever runs a chunk). So a lead holds its own kind's kernel only,
        # not run_chunk's four (and so does each decode step calling it): less to compile and to
        # load (numba 0.60: 50 MB less RSS). None matches: nothing to run (lead has refused the call)
        kind = _kind_of(args.types)
        if kind < 0:
            return lambda args, job, numbers, lo, hi: None
        if KINDS[kind] in CONSTANT_KINDS:  # their arguments alike: the job's kind (job[0]) tells them apart
            def run_constant_group(args, job, numbers, lo, hi):
                if job[0] == first_constant:
                    run_int4q_a(job, numbers, lo, hi)
                else:
                    run_int4q_b(job, numbers, lo, hi)
            return run_constant_group
        run = runs[kind]
        return lambda args, job, numbers, lo, hi: run(job, numbers, lo, hi)

    @inlined
    def run_chunk(job, numbers, chunk):
        # chunk `chunk` of the job's rows, by a worker
        kind, count, chunks = job[0], job[1], job[2]
        lo, hi = count * chunk // chunks, count * (chunk + 1) // chunks
        if kind == 0:
            run_int8q(job, numbers, lo, hi)
        elif kind == 1:
            run_4bitq(job, numbers, lo, hi)
        elif kind == 2:
            run_int4q(job, numbers, lo, hi)
        elif kind == 3:
            run_bf16(job, numbers, lo, hi)
        elif kind == first_constant:
            run_int4q_a(job, numbers, lo, hi)
        else:
            run_int4q_b(job, numbers, lo, hi)

    stable_id(run_chunk, f"team.run_chunk:{key}")

    @inlined
    def take_chunks(control, job, numbers, number):
        # claim and run chunks of job `number` while it has any left
        while True:
            word = load(control, CLAIM)
            chunk, chunks = word & 0xFFFF, (word >> 16) & 0xFFFF
            if (word >> 32) != number or chunk >= chunks:
                return
            if swap_if(control, CLAIM, word, word + 1):
                run_chunk(job, numbers, chunk)
                add(control, DONE, 1)

    stable_id(take_chunks, f"team.take_chunks:{key}")

    @compiled
    def lead(control, job, numbers, codes, kind, count, chunks, *args):
        # write the job (kernel `kind` over `count` rows in `chunks` chunks, its arguments
        # `args`), publish it, run chunks of it, wait for the others' chunks; False (nothing
        # run) where an argument is not what the kind takes
        i, matches = 0, True
        for value in literal_unroll(args):
            matches &= _put(job, numbers, 3 + SLOTS * i, value) == codes[kind, i]
            i += 1
        if not matches or codes.shape[1] > len(args) and codes[kind, len(args)] != 0:
            return False
        job[0], job[1], job[2] = kind, count, chunks
        number = ((load(control, CLAIM) >> 32) + 1) & 0x7FFFFFFF
        store(control, DONE, 0)
        store(control, CLAIM, (number << 32) | (chunks << 16))
        while True:  # take_chunks, each chunk through run_own (this kind's kernel alone)
            word = load(control, CLAIM)
            chunk = word & 0xFFFF
            if (word >> 32) != number or chunk >= chunks:
                break
            if swap_if(control, CLAIM, word, word + 1):
                run_own(args, job, numbers, count * chunk // chunks, count * (chunk + 1) // chunks)
                add(control, DONE, 1)
        while load(control, DONE) < chunks:
            pause()
        return True

    @compiled
    def follow(control, job, numbers, spin_cycles):
        # a worker: run chunks as jobs come; return 1 to quit, 0 after spin_cycles without work
        idle_since = cycles()
        while load(control, QUIT) == 0:
            word = load(control, CLAIM)
            if (word & 0xFFFF) < ((word >> 16) & 0xFFFF):
                take_chunks(control, job, numbers, word >> 32)
                idle_since = cycles()
            elif cycles() - idle_since > spin_cycles:
                return 0
            else:
                pause()
        return 1

    stable_id(lead, f"team.lead:{key}")  # compiled decode steps call it (sli.kernels.layer_step)

    @njit
    def now():
        return cycles()

    return {"lead": lead, "follow": follow, "cycles": now}


def _cycles_per_us(cycles) -> float:
    """The cycle counter's rate, measured over a few milliseconds."""
    c0, t0 = cycles(), time.perf_counter()
    time.sleep(0.005)
    return (cycles() - c0) / max(1e-9, (time.perf_counter() - t0) * 1e6)


class Team:
    """``workers`` threads that run the kernels of :data:`ARGUMENTS` with the calling thread."""

    def __init__(self, workers: int, functions: dict, level: str, spin_us: float = SPIN_US) -> None:
        self.workers = workers
        self._lead, self._follow = functions["lead"], functions["follow"]
        self._codes = type_codes(level)
        self.control = np.zeros(ASLEEP + 8 * workers, np.int64)
        self.job = np.zeros(JOB_SLOTS, np.int64)
        self.numbers = self.job.view(np.float64)
        self._spin = int(spin_us * _cycles_per_us(functions["cycles"]))
        self._busy = threading.Lock()  # one leader at a time (the prefetch thread may call kernels too)
        self._wake = [threading.Event() for _ in range(workers)]
        self.wakes = 0  # how often a worker woke from sleep
        self._threads = [threading.Thread(target=self._serve, args=(w,), name=f"sli-team-{w}", daemon=True)
                         for w in range(workers)]
        for thread in self._threads:
            thread.start()

    def _serve(self, worker: int) -> None:
        asleep = ASLEEP + 8 * worker
        while self._follow(self.control, self.job, self.numbers, self._spin) == 0:
            self.control[asleep] = 1
            word = int(self.control[CLAIM])
            if (word & 0xFFFF) >= ((word >> 16) & 0xFFFF):  # nothing posted since the last look
                self._wake[worker].wait()
            self._wake[worker].clear()
            self.control[asleep] = 0
            self.wakes += 1

    @property
    def codes(self) -> np.ndarray:
        """:func:`type_codes` for this team's level (what ``lead`` takes)."""
        return self._codes

    @property
    def chunks(self) -> int:
        """How many chunks a job of many rows is cut into."""
        return min(CHUNKS_A_THREAD * (self.workers + 1), 0xFFFF)

    @contextlib.contextmanager
    def leading(self):
        """Lead this team's jobs meanwhile (``lead`` on :attr:`control`, from compiled code
        too): yields True, its sleeping workers woken; False where another thread leads."""
        if not self._busy.acquire(blocking=False):
            yield False
            return
        try:
            for worker in range(self.workers):
                if self.control[ASLEEP + 8 * worker]:
                    self._wake[worker].set()
            yield True
        finally:
            self._busy.release()

    def run(self, name: str, count: int, args: Sequence) -> bool:
        """Kernel ``name`` over rows ``[0, count)`` on the team; False (nothing run) where the
        team does not take it: another kernel, an argument of another type or layout, or
        another thread leading."""
        if name not in ARGUMENTS:
            return False
        with self.leading() as leads:
            return leads and self._lead(self.control, self.job, self.numbers, self._codes, KINDS.index(name), count,
                                        min(count, self.chunks), *args)

    def close(self) -> None:
        """Stop the workers (they finish the chunk in hand)."""
        self.control[QUIT] = 1
        for event in self._wake:
            event.set()
        for thread in self._threads:
            thread.join()


_team: Optional[Team] = None
_team_lock = threading.Lock()
_paused = 0  # passes that stream layers, running now: no team meanwhile


@contextlib.contextmanager
def paused():
    """No team while this runs: a pass that streams layers, whose prefetch thread needs the
    core a polling worker would hold (SmolLM2 with 25 of 30 layers streamed decoded 5.2-5.4
    tokens/s with the team against 8.3-9.5 without, docs/benchmarks.md)."""
    global _paused
    _paused += 1
    try:
        yield
    finally:
        _paused -= 1


def get(kernels: dict, level: str, threads: int, variant: str = "") -> Optional[Team]:
    """The process's team for ``threads`` threads (``threads - 1`` workers), started on first
    use; None with one thread, inside :func:`paused`, or with ``SLI_NO_TEAM=1``."""
    global _team
    if threads <= 1 or _paused or not enabled():
        return None
    current = _team
    if current is not None and current.workers == threads - 1:
        return current
    with _team_lock:
        if _team is None or _team.workers != threads - 1:
            if _team is not None:
                _team.close()  # its leader, if any, takes the chunks left
            _team = Team(threads - 1, build(kernels, level, variant), level)
        return _team


def _forget_after_fork() -> None:  # a forked child has none of the parent's threads
    global _team, _team_lock
    _team, _team_lock = None, threading.Lock()


def _close_at_exit() -> None:  # the workers stop polling before the interpreter goes
    if _team is not None:
        _team.close()


os.register_at_fork(after_in_child=_forget_after_fork)
atexit.register(_close_at_exit)
