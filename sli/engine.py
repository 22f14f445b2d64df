"""Continuous batching: one background thread owns the processor and runs every active
sequence through each pass over the layers.

A streamed model pays for its weights once per pass over the layers, however many sequences
the pass carries. :class:`BatchingEngine` keeps a bounded queue of :class:`Request` objects;
before each step it admits waiting requests (first come, first served) up to a maximum batch
size and while the keys and values of the active sequences fit a byte budget; then one
:meth:`UniversalSLIProcessor.step_many` call feeds new sequences their prompt and running
ones their last token, each with its own positions and KV cache. Each sequence samples its own
next token (its own seeded ``torch.Generator``); text deltas go to the request's output queue;
a sequence that finished (an end token, ``max_tokens``, a stop string) or was cancelled (its
client went away) leaves at once, and its KV cache is freed.

What goes in and out (:class:`Request`, :class:`Event`, the exceptions) is
:mod:`sli.engine_request`; one admitted request's state is :mod:`sli.engine_sequence`. The
engine knows nothing about HTTP: :mod:`sli.server` puts requests in and reads events out.
"""
from __future__ import annotations

import collections
import copy
import logging
import threading
import time
from typing import Any, Deque, Dict, List, Optional, Sequence

import torch

from .engine_request import EngineStopped, Event, InvalidRequest, QueueFull, Request, RequestTooLarge
from .engine_sequence import ActiveSequence

logger = logging.getLogger(__name__)

__all__ = ["BatchingEngine", "Event", "Request", "QueueFull", "InvalidRequest", "RequestTooLarge", "EngineStopped"]


class BatchingEngine:
    """Runs requests in one background thread, several sequences per pass over the layers.

    Args:
        processor: a :class:`sli.processor.UniversalSLIProcessor` (the engine's thread is
            the only one that runs it once started).
        tokenizer: turns generated ids into text (deep-copied: the engine's thread has its
            own); None emits ids only (no text, no stop strings).
        max_batch_size: sequences in one step at most.
        max_queue: requests waiting for admission at most; :meth:`submit` raises
            :class:`QueueFull` beyond it.
        kv_budget_bytes: the keys and values all active sequences may reserve together (each
            reserves its prompt + ``max_tokens`` positions); default: what the processor's
            memory plan declares for its context (``max_context_tokens`` positions).
        eos_token_ids: ids that end an answer (default: the model config's ``eos_token_id``).
    """

    def __init__(self, processor, tokenizer=None, *, max_batch_size: int = 8, max_queue: int = 64,
                 kv_budget_bytes: Optional[int] = None, eos_token_ids: Optional[Sequence[int]] = None) -> None:
        if max_batch_size < 1:
            raise ValueError(f"max_batch_size={max_batch_size} must be >= 1")
        if max_queue < 1:
            raise ValueError(f"max_queue={max_queue} must be >= 1")
        self.processor = processor
        self.tokenizer = copy.deepcopy(tokenizer) if tokenizer is not None else None
        self.max_batch_size = int(max_batch_size)
        self.max_queue = int(max_queue)
        self.kv_bytes_per_token = int(processor.kv_bytes(1))
        if kv_budget_bytes is None:
            kv_budget_bytes = self.kv_bytes_per_token * int(processor.max_context_tokens)
        self.kv_budget_bytes = int(kv_budget_bytes)
        if eos_token_ids is None:
            eos = getattr(processor.config, "eos_token_id", None)
            eos_token_ids = eos if isinstance(eos, (list, tuple)) else [eos] if eos is not None else []
        self.eos_token_ids = [int(i) for i in eos_token_ids]
        self.vocab_size = int(processor.model.get_input_embeddings().num_embeddings)
        self._waiting: Deque[Request] = collections.deque()
        self._active: List[ActiveSequence] = []
        self._cond = threading.Condition()
        self._thread: Optional[threading.Thread] = None
        self._stopping = False
        self.counters: Dict[str, int] = collections.Counter()
        self._counters_lock = threading.Lock()
        self.peak_batch = 0
        self.peak_kv_bytes = 0

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> "BatchingEngine":
        if self._thread is None:
            self._stopping = False
            self._thread = threading.Thread(target=self._loop, name="sli-engine", daemon=True)
            self._thread.start()
        return self

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def stop(self, timeout: Optional[float] = 30.0) -> None:
        """Stop the thread after its current step; requests still waiting or active end with
        an ``"error"`` event."""
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None
        with self._cond:
            waiting, self._waiting = list(self._waiting), collections.deque()
        for request in waiting:
            self._finish_request(request, "error", error="the server is shutting down")
        for seq in self._active:
            self._finish(seq, "error", error="the server is shutting down")
        self._active = []

    def __enter__(self) -> "BatchingEngine":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # ------------------------------------------------------------------ requests
    def kv_bytes_for(self, request: Request) -> int:
        """The KV bytes ``request`` reserves while active: its prompt and ``max_tokens`` positions."""
        return self.kv_bytes_per_token * (len(request.prompt_ids) + request.max_tokens)

    def submit(self, request: Request) -> Request:
        """Queue ``request``; its events go to ``request.output``.

        :raises QueueFull: ``max_queue`` requests are already waiting.
        :raises RequestTooLarge: its KV bytes exceed the whole budget.
        :raises InvalidRequest: a token id is outside the vocabulary.
        :raises EngineStopped: the engine is not running.
        """
        bad = [i for i in request.prompt_ids if not 0 <= i < self.vocab_size]
        if bad:
            raise InvalidRequest(f"token id {bad[0]} is outside the vocabulary [0, {self.vocab_size})")
        need = self.kv_bytes_for(request)
        if need > self.kv_budget_bytes:
            raise RequestTooLarge(
                f"the prompt ({len(request.prompt_ids)} tokens) and max_tokens ({request.max_tokens}) need "
                f"{need / 1e6:.1f} MB of keys and values, more than this server's KV budget of "
                f"{self.kv_budget_bytes / 1e6:.1f} MB ({self.kv_budget_bytes // self.kv_bytes_per_token} "
                "positions); shorten the prompt or lower max_tokens")
        with self._cond:
            if self._stopping or not self.running:
                raise EngineStopped("the engine is not running")
            if len(self._waiting) >= self.max_queue:
                self._count("rejected_queue_full")
                raise QueueFull(f"{len(self._waiting)} requests are already waiting (max_queue={self.max_queue}); "
                                "retry later")
            self._waiting.append(request)
            self._count("submitted")
            self._cond.notify_all()
        return request

    def wake(self) -> None:
        """Have the engine look at its queue now (e.g. after a waiting request was cancelled)."""
        with self._cond:
            self._cond.notify_all()

    def cancel(self, request: Request) -> None:
        """End ``request`` as ``"cancelled"`` at the engine's next look, waiting or active (its
        client went away); its KV cache is freed then."""
        request.cancel()
        self.wake()

    def stats(self) -> Dict[str, Any]:
        with self._cond:
            waiting = len(self._waiting)
        active = list(self._active)
        return {"running": self.running, "active": len(active), "waiting": waiting,
                "max_batch_size": self.max_batch_size, "max_queue": self.max_queue,
                "kv_bytes_active": sum(s.kv_bytes for s in active), "kv_budget_bytes": self.kv_budget_bytes,
                "kv_bytes_per_token": self.kv_bytes_per_token, "peak_batch": self.peak_batch,
                "peak_kv_bytes": self.peak_kv_bytes, **self._counts()}

    def _count(self, name: str, n: int = 1) -> None:
        with self._counters_lock:
            self.counters[name] += n

    def _counts(self) -> Dict[str, int]:
        with self._counters_lock:
            return dict(self.counters)

    # ------------------------------------------------------------------ the thread
    def _loop(self) -> None:
        torch.set_grad_enabled(False)
        while True:
            with self._cond:
                while not self._stopping and not self._active and not self._waiting:
                    self._cond.wait()
                if self._stopping:
                    return
                admitted = self._take_admissible()
            for request in admitted:
                try:
                    self._admit(request)
                except Exception as exc:  # e.g. its KV cache could not be made: this request fails alone
                    logger.exception("admitting request %d failed", request.id)
                    self._finish_request(request, "error", error=f"{type(exc).__name__}: {exc}")
            try:
                self._drop_cancelled()
                if self._active:
                    self._step()
                    self._drop_cancelled()
            except Exception as exc:  # a failed step ends its sequences, never the engine
                logger.exception("engine step failed; ending the %d active sequences", len(self._active))
                for seq in self._active:
                    self._finish(seq, "error", error=f"{type(exc).__name__}: {exc}")
                self._active = [s for s in self._active if not s.done]

    def _take_admissible(self) -> List[Request]:
        """Under the lock: waiting requests (in order) that fit the batch size and the KV budget."""
        taken: List[Request] = []
        used = sum(s.kv_bytes for s in self._active)
        slots = self.max_batch_size - len(self._active)
        while self._waiting:
            request = self._waiting[0]
            if request.cancelled:
                self._waiting.popleft()
                taken.append(request)  # ended as cancelled by _admit
                continue
            need = self.kv_bytes_for(request)
            if slots <= 0 or used + need > self.kv_budget_bytes:
                break  # first come, first served: a large request is not overtaken
            self._waiting.popleft()
            taken.append(request)
            used += need
            slots -= 1
        return taken

    def _new_kv_cache(self, positions: int):
        """An empty KV cache with room for ``positions``: the processor's own when it takes a size."""
        return self.processor.new_session(reserve=positions).kv_cache

    def _admit(self, request: Request) -> None:
        if request.cancelled:
            self._finish_request(request, "cancelled")
            return
        need = self.kv_bytes_for(request)
        seq = ActiveSequence(request, self._new_kv_cache(len(request.prompt_ids) + request.max_tokens), need,
                        self.eos_token_ids, self.processor.device)
        self._active.append(seq)
        self._count("admitted")
        self.peak_batch = max(self.peak_batch, len(self._active))
        self.peak_kv_bytes = max(self.peak_kv_bytes, sum(s.kv_bytes for s in self._active))

    def _drop_cancelled(self) -> None:
        for seq in self._active:
            if seq.request.cancelled and not seq.done:
                self._finish(seq, "cancelled")
        self._active = [s for s in self._active if not s.done]

    def _step(self) -> None:
        items = [seq.step_input(self.processor.device) for seq in self._active]
        logits = self.processor.step_many(items)
        del items
        self._count("steps")
        for seq, row in zip(self._active, logits):
            self._advance(seq, seq.next_token(row))
        self._active = [s for s in self._active if not s.done]

    # ------------------------------------------------------------------ text and endings
    def _decode(self, ids: List[int]) -> str:
        if self.tokenizer is None or not ids:
            return ""
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def _advance(self, seq: ActiveSequence, token: int) -> None:
        request = seq.request
        if request.first_token_at is None:
            request.first_token_at = time.perf_counter()
        self._count("tokens")
        reason, piece = seq.accept(token, self._decode)
        if reason is None:
            self._emit(request, Event(text=piece, token_ids=[token]))
        else:
            self._finish(seq, reason, text=piece, token_ids=[token])

    def _finish(self, seq: ActiveSequence, reason: str, text: str = "", token_ids: Sequence[int] = (),
                error: Optional[str] = None) -> None:
        """End ``seq``; ``text`` is the last piece of its answer (not yet emitted)."""
        if seq.done:
            return
        seq.done = True
        seq.kv_cache = None  # the only reference: its buffers are freed now
        self._finish_request(seq.request, reason, Event(text=text, token_ids=list(token_ids)),
                             completion_tokens=seq.completion_tokens(reason, token_ids), error=error)

    def _finish_request(self, request: Request, reason: str, event: Optional[Event] = None,
                        completion_tokens: int = 0, error: Optional[str] = None) -> None:
        event = event or Event()
        event.finish_reason, event.error = reason, error
        event.prompt_tokens, event.completion_tokens = len(request.prompt_ids), completion_tokens
        request.finished_at = time.perf_counter()
        self._count(f"finished_{reason}")
        self._emit(request, event)

    def _emit(self, request: Request, event: Event) -> None:
        try:
            request.output.put(event)
        except Exception:  # a closed consumer must not stop the engine
            logger.debug("request %d: its output queue refused an event", request.id, exc_info=True)
            request.cancel()
