"""Generation: small sampling functions (logits → next token) and the decode loop over a
model step (as gpt-fast does), independent of how the step runs the model."""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, List, Optional, Sequence, Tuple

import torch


def check_sampling(temperature: float = 1.0, top_k: Optional[int] = None, top_p: Optional[float] = None,
                   min_p: Optional[float] = None, repetition_penalty: float = 1.0) -> None:
    """Raise ``ValueError`` (one line naming the valid range) for a sampling parameter out of range."""
    def finite(name: str, value) -> float:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise ValueError(f"{name}={value!r} must be a finite number")
        return float(value)

    if finite("temperature", temperature) < 0:
        raise ValueError(f"temperature={temperature} must be >= 0 (0 = greedy)")
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 0):
        raise ValueError(f"top_k={top_k!r} must be an integer >= 1 (0 or None = all tokens)")
    if top_p is not None and not 0 < finite("top_p", top_p) <= 1:
        raise ValueError(f"top_p={top_p} must be in (0, 1]")
    if min_p is not None and not 0 <= finite("min_p", min_p) <= 1:
        raise ValueError(f"min_p={min_p} must be in [0, 1] (0 = off)")
    if finite("repetition_penalty", repetition_penalty) <= 0:
        raise ValueError(f"repetition_penalty={repetition_penalty} must be > 0 (1 = off)")


def seen_tokens(ids: torch.Tensor, vocab_size: int, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Which tokens occur in each row of ``ids`` ``[B, S]``: a bool ``[B, vocab_size]``. Positions
    where ``mask`` is 0 (padding) and ids past the vocabulary do not count."""
    ids = ids.to(torch.long).clamp(min=0, max=vocab_size)
    if mask is not None:
        ids = ids.masked_fill(~mask.bool(), vocab_size)
    seen = torch.zeros(ids.shape[0], vocab_size + 1, dtype=torch.bool, device=ids.device)
    return seen.scatter_(1, ids, True)[:, :vocab_size]


def apply_repetition_penalty(logits: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """The CTRL penalty (Keskar et al. 2019, as transformers' RepetitionPenaltyLogitsProcessor):
    the logit of every token in ``seen`` ``[B, V]`` (the prompt and what was generated) is
    divided by ``penalty`` where positive, multiplied where negative. 1 leaves the logits alone."""
    if penalty == 1.0:
        return logits
    penalized = torch.where(logits < 0, logits * penalty, logits / penalty)
    return torch.where(seen, penalized, logits)


def apply_frequency_presence_penalty(logits: torch.Tensor, counts: torch.Tensor, frequency: float = 0.0,
                                     presence: float = 0.0) -> torch.Tensor:
    """OpenAI's penalties: ``logit[j] -= counts[j] * frequency + (counts[j] > 0) * presence``, where
    ``counts`` ``[B, V]`` is how often each token was generated so far (the prompt does not count)."""
    if frequency == 0.0 and presence == 0.0:
        return logits
    return logits - counts.to(logits.dtype) * frequency - (counts > 0).to(logits.dtype) * presence


def apply_min_p(logits: torch.Tensor, min_p: Optional[float]) -> torch.Tensor:
    """Min-p filtering (as transformers' MinPLogitsWarper): drop every token whose probability is
    below ``min_p`` times the most likely token's; the most likely token always stays. 0 or None = off."""
    if not min_p:
        return logits
    probs = torch.softmax(logits, dim=-1)
    remove = probs < min_p * probs.amax(dim=-1, keepdim=True)
    remove.scatter_(-1, probs.argmax(dim=-1, keepdim=True), False)
    return logits.masked_fill(remove, float("-inf"))


def logits_to_probs(logits: torch.Tensor, temperature: float = 1.0, top_k: Optional[int] = None,
                    top_p: Optional[float] = None, min_p: Optional[float] = None) -> torch.Tensor:
    """Probabilities ``[B, V]`` after temperature, top-k, nucleus (top-p) and min-p filtering
    (transformers' order: min-p scales with the tempered distribution's most likely token)."""
    logits = logits / max(temperature, 1e-5)
    if top_k is not None and top_k > 0:
        kth = torch.topk(logits, min(top_k, logits.shape[-1]), dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and 0 < top_p < 1:
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
        cumulative = sorted_logits.softmax(-1).cumsum(-1)
        remove = cumulative - sorted_logits.softmax(-1) > top_p  # keep the token that crosses top_p
        sorted_logits = sorted_logits.masked_fill(remove, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    logits = apply_min_p(logits, min_p)
    return torch.softmax(logits, dim=-1)


def sample_next_token(logits: torch.Tensor, do_sample: bool = False, temperature: float = 1.0,
                      top_k: Optional[int] = None, top_p: Optional[float] = None,
                      generator: Optional[torch.Generator] = None, min_p: Optional[float] = None) -> torch.Tensor:
    """The next token ``[B]``: argmax when not sampling, else a draw from the filtered distribution.
    (Penalties change the logits before this: :func:`apply_repetition_penalty`.)"""
    if not do_sample:
        return logits.argmax(dim=-1)
    probs = logits_to_probs(logits, temperature, top_k, top_p, min_p)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


# step(ids [B, S], mask [B, T], positions [B, S], kv_cache) -> (last logits [B, V], kv_cache)
Step = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, Any], Tuple[torch.Tensor, Any]]


@dataclass
class GenerationSession:
    """A conversation's state between :meth:`generate` calls: its KV cache, how many positions
    it holds, and the last generated token, which no forward has consumed yet. A turn feeds
    only what is new, so a chat's second turn does not re-run the first."""

    kv_cache: Any
    length: int = 0  # positions in kv_cache
    pending: List[int] = field(default_factory=list)  # generated, not yet fed
    token_ids: List[int] = field(default_factory=list)  # every token of the conversation so far

    def continue_with(self, new_ids: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """``(ids to feed [1, S], attention mask [1, length + S])`` for a turn adding ``new_ids``."""
        ids = torch.cat([torch.tensor([self.pending], dtype=torch.long, device=new_ids.device).view(1, -1),
                         new_ids.view(1, -1)], dim=1)
        return ids, torch.ones(1, self.length + ids.shape[1], dtype=torch.long, device=new_ids.device)

    def rewind(self, length: int) -> None:
        """Forget every position from ``length`` on (the cache keeps the first ``length``)."""
        if length < self.length:
            for layer in self.kv_cache.layers:
                layer.crop(length)
            self.length = length
        self.token_ids = self.token_ids[:length]
        self.pending = []

    def record(self, fed: torch.Tensor, generated: torch.Tensor) -> None:
        """After a turn: ``fed`` went into the cache, and ``generated`` (all but its last token)."""
        # fed starts with the pending token, which token_ids already ends with
        self.token_ids = self.token_ids[:self.length] + fed.view(-1).tolist() + generated.view(-1).tolist()
        count = generated.numel()
        self.length += fed.shape[-1] + max(0, count - 1)
        self.pending = generated.view(-1)[-1:].tolist() if count else []


def generate_tokens(step: Step, input_ids: torch.Tensor, attention_mask: torch.Tensor, kv_cache: Any,
                    max_new_tokens: int, eos_token_ids: Sequence[int] = (), do_sample: bool = False,
                    temperature: float = 1.0, top_k: Optional[int] = None, top_p: Optional[float] = None,
                    generator: Optional[torch.Generator] = None,
                    callback: Optional[Callable[[torch.Tensor], None]] = None,
                    should_stop: Optional[Callable[[], bool]] = None, min_p: Optional[float] = None,
                    repetition_penalty: float = 1.0, history: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The decode loop over a model ``step``: prefill ``input_ids`` ``[B, S]``, then one token
    per step until ``max_new_tokens`` or every row has emitted an EOS; returns the new ids
    ``[B, T]``. ``attention_mask`` ``[B, P + S]`` covers the ``P`` positions already in
    ``kv_cache`` and the (left-padded) prompt. A finished row keeps emitting its EOS.
    ``callback`` gets each step's tokens ``[B]``; ``should_stop()`` returning True ends the loop
    after the token in hand (a user's Ctrl-C, a stop string), the KV cache consistent.
    ``repetition_penalty`` (:func:`apply_repetition_penalty`, greedy too) counts the prompt's
    tokens (not its padding), the ``history`` ids ``[B, P]`` already in ``kv_cache`` and each
    generated one; ``min_p`` filters a sampled token's distribution (:func:`apply_min_p`).
    """
    check_sampling(temperature, top_k, top_p, min_p, repetition_penalty)
    device = input_ids.device
    batch, new = input_ids.shape
    eos = torch.tensor(list(eos_token_ids), device=device, dtype=torch.long)
    tokens: List[torch.Tensor] = []
    mask = attention_mask
    positions = (mask.long().cumsum(-1) - 1).clamp(min=0)[:, -new:]
    ids, finished = input_ids, torch.zeros(batch, dtype=torch.bool, device=device)
    seen: Optional[torch.Tensor] = None
    for _ in range(max_new_tokens):
        logits, kv_cache = step(ids, mask, positions, kv_cache)
        logits = logits.float()
        if repetition_penalty != 1.0:
            if seen is None:
                seen = seen_tokens(input_ids, logits.shape[-1], attention_mask[:, -new:])
                if history is not None and history.numel():
                    seen |= seen_tokens(history.to(device), logits.shape[-1])
            logits = apply_repetition_penalty(logits, seen, repetition_penalty)
        token = sample_next_token(logits, do_sample, temperature, top_k, top_p, generator, min_p)
        if eos.numel():
            token = torch.where(finished, eos[0], token)
            finished |= torch.isin(token, eos)
        tokens.append(token)
        if seen is not None:
            seen[torch.arange(batch, device=device), token] = True
        if callback is not None:
            callback(token)
        if (eos.numel() and bool(finished.all())) or (should_stop is not None and should_stop()):
            break
        ids = token[:, None]
        mask = torch.cat([mask, torch.ones(batch, 1, dtype=mask.dtype, device=device)], dim=1)
        positions = positions[:, -1:] + 1
    if not tokens:
        return torch.empty(batch, 0, dtype=torch.long, device=device)
    return torch.stack(tokens, dim=1)
