"""What goes into :class:`sli.engine.BatchingEngine` and what comes out: a :class:`Request`
(prompt ids, sampling parameters, where its events go), its :class:`Event` stream, and the
exceptions :meth:`BatchingEngine.submit` raises (the server maps each to an HTTP status).
"""
from __future__ import annotations

import itertools
import queue
import random
import threading
import time
from dataclasses import dataclass, field
from typing import Any, List, Optional, Sequence

from .generation import check_sampling
from .stopping import StopStrings

__all__ = ["Event", "Request", "QueueFull", "InvalidRequest", "RequestTooLarge", "EngineStopped"]


class QueueFull(Exception):
    """The waiting queue is at its bound: try again later (HTTP 429)."""


class InvalidRequest(ValueError):
    """The request cannot run: a token id outside the vocabulary, ..."""


class RequestTooLarge(InvalidRequest):
    """The request's keys and values would never fit the engine's KV budget."""


class EngineStopped(RuntimeError):
    """The engine is not running (stopped, or never started)."""


@dataclass
class Event:
    """What a request's output queue receives: after each step, the new token and the text it
    completes; the last event has ``finish_reason`` (``"stop"``, ``"length"``, ``"cancelled"``
    or ``"error"``, with ``error`` saying what went wrong)."""

    text: str = ""
    token_ids: List[int] = field(default_factory=list)
    finish_reason: Optional[str] = None
    error: Optional[str] = None
    prompt_tokens: int = 0
    completion_tokens: int = 0


_ids = itertools.count(1)


class Request:
    """One generation: prompt ids, sampling parameters and where its events go.

    ``temperature`` 0 is greedy; ``top_p`` in (0, 1] and ``min_p`` in [0, 1] filter the
    distribution; ``repetition_penalty`` (> 0, 1 = off) penalizes every token of the prompt and
    the answer, ``frequency_penalty`` and ``presence_penalty`` (OpenAI's, in [-2, 2]) those of the
    answer (see :mod:`sli.generation`); ``seed`` makes a sampled answer repeatable (each request
    has its own generator, so other requests in the batch do not change it); ``stop`` strings
    end the answer before them. ``output`` is any object with ``put(event)`` (default: a
    :class:`queue.Queue`, read with :meth:`events`).
    """

    def __init__(self, prompt_ids: Sequence[int], max_tokens: int = 16, temperature: float = 1.0,
                 top_p: Optional[float] = None, seed: Optional[int] = None, stop: Sequence[str] = (),
                 output: Any = None, ignore_eos: bool = False, min_p: Optional[float] = None,
                 repetition_penalty: float = 1.0, frequency_penalty: float = 0.0,
                 presence_penalty: float = 0.0) -> None:
        if max_tokens < 1:
            raise ValueError(f"max_tokens={max_tokens} must be >= 1")
        check_sampling(temperature, None, top_p, min_p, repetition_penalty)
        for name, value in (("frequency_penalty", frequency_penalty), ("presence_penalty", presence_penalty)):
            if not -2 <= value <= 2:
                raise ValueError(f"{name}={value} must be in [-2, 2]")
        self.id = next(_ids)
        self.prompt_ids = [int(i) for i in prompt_ids]
        if not self.prompt_ids:
            raise ValueError("the prompt is empty; pass at least one token")
        self.max_tokens = int(max_tokens)
        self.temperature = float(temperature)
        self.top_p = top_p
        self.min_p = min_p
        self.repetition_penalty = float(repetition_penalty)
        self.frequency_penalty, self.presence_penalty = float(frequency_penalty), float(presence_penalty)
        self.seed = seed if seed is not None else random.SystemRandom().randrange(2 ** 63)
        self.stop = StopStrings(stop).stops
        self.ignore_eos = bool(ignore_eos)  # run to max_tokens (benchmarks)
        self.output = output if output is not None else queue.Queue()
        self.submitted_at = time.perf_counter()
        self.first_token_at: Optional[float] = None
        self.finished_at: Optional[float] = None
        self._cancelled = threading.Event()

    def cancel(self) -> None:
        """Ask the engine to drop this request at its next step (the client went away)."""
        self._cancelled.set()

    @property
    def cancelled(self) -> bool:
        return self._cancelled.is_set()

    def events(self, timeout: Optional[float] = None):
        """The events of a request made with the default output queue, up to the last one."""
        while True:
            event = self.output.get(timeout=timeout)
            yield event
            if event.finish_reason is not None:
                return
