"""One admitted request inside :class:`sli.engine.BatchingEngine`: its KV cache, what the next
step feeds it, how it picks its next token (its penalties, its own seeded generator) and the
text of its answer so far (what was sent, what is held back as a possible stop string).
The engine decides when a sequence runs; the sequence decides what a token means for it.
"""
from __future__ import annotations

from typing import Callable, List, Optional, Sequence, Tuple

import torch

from .engine_request import Request
from .generation import apply_frequency_presence_penalty, apply_repetition_penalty, sample_next_token, seen_tokens
from .stopping import StopStrings

# step_many's input for one sequence: (new ids [1, S], attention mask [1, P + S], positions [1, S], KV cache)
StepInput = Tuple[torch.Tensor, torch.Tensor, torch.Tensor, object]


class ActiveSequence:
    """An admitted request: its KV cache, what it has fed and generated, the text sent."""

    def __init__(self, request: Request, kv_cache, kv_bytes: int, eos_ids: Sequence[int], device) -> None:
        self.request = request
        self.kv_cache = kv_cache
        self.kv_bytes = kv_bytes
        self.eos_ids = set() if request.ignore_eos else set(eos_ids)
        self.length = 0  # positions in the KV cache
        self.feed: List[int] = list(request.prompt_ids)  # what the next step feeds
        self.generated: List[int] = []
        self.text = StopStrings(request.stop)  # the answer's text: what was emitted, what is held back
        self.done = False
        self.generator = torch.Generator(device=device).manual_seed(request.seed)
        self.seen: Optional[torch.Tensor] = None  # [1, V] tokens of the prompt and the answer
        self.counts: Optional[torch.Tensor] = None  # [1, V] how often the answer has each token

    def step_input(self, device) -> StepInput:
        """What the next step feeds: the prompt (first step) or the last token, after ``length``."""
        count = len(self.feed)
        ids = torch.tensor([self.feed], dtype=torch.long, device=device)
        mask = torch.ones(1, self.length + count, dtype=torch.long, device=device)
        positions = torch.arange(self.length, self.length + count, device=device).view(1, -1)
        return ids, mask, positions, self.kv_cache

    def next_token(self, logits: torch.Tensor) -> int:
        """The token after the step that gave ``logits`` ``[1, V]``: the fed positions are in the
        cache now; penalties, then greedy (temperature 0) or a draw from its own generator."""
        self.length += len(self.feed)
        request = self.request
        token = int(sample_next_token(self.penalized(logits.float()), request.temperature > 0,
                                      request.temperature or 1.0, None, request.top_p, self.generator,
                                      request.min_p)[0])
        self.record(token)
        return token

    def penalized(self, logits: torch.Tensor) -> torch.Tensor:
        """``logits`` ``[1, V]`` after the request's penalties (unchanged without any)."""
        request, vocab = self.request, logits.shape[-1]
        if request.repetition_penalty != 1.0:
            if self.seen is None:
                ids = torch.tensor([request.prompt_ids + self.generated], dtype=torch.long, device=logits.device)
                self.seen = seen_tokens(ids, vocab)
            logits = apply_repetition_penalty(logits, self.seen, request.repetition_penalty)
        if request.frequency_penalty or request.presence_penalty:
            if self.counts is None:
                generated = torch.tensor(self.generated, dtype=torch.long, device=logits.device)
                self.counts = torch.bincount(generated.clamp(max=vocab), minlength=vocab + 1)[:vocab].view(1, -1)
            logits = apply_frequency_presence_penalty(logits, self.counts, request.frequency_penalty,
                                                      request.presence_penalty)
        return logits

    def record(self, token: int) -> None:
        """``token`` was generated: the penalties count it from the next step on."""
        if self.seen is not None:
            self.seen[0, token] = True
        if self.counts is not None:
            self.counts[0, token] += 1

    def accept(self, token: int, decode: Callable[[List[int]], str]) -> Tuple[Optional[str], str]:
        """Take ``token`` into the answer: ``(finish reason or None, text to send now)``.

        An end token finishes with ``"stop"`` (and sends the text held back as the start of a
        stop string that never came); a stop string with ``"stop"`` (the text before it);
        ``max_tokens`` with ``"length"``. ``decode`` turns the answer's ids into its text.
        """
        if token in self.eos_ids:
            return "stop", self.text.flush()
        self.generated.append(token)
        self.feed = [token]
        # a character whose bytes are not all there yet, or the start of a stop string, waits
        piece = self.text.update(decode(self.generated))
        if self.text.stopped:
            return "stop", piece
        if len(self.generated) >= self.request.max_tokens:
            return "length", piece + self.text.flush()
        return None, piece

    def completion_tokens(self, reason: str, token_ids: Sequence[int]) -> int:
        """The answer's length for its usage: what it generated, and the end token that stopped it."""
        ended_by_eos = reason == "stop" and bool(token_ids) and token_ids[-1] in self.eos_ids
        return len(self.generated) + (1 if ended_by_eos else 0)
