"""Generation: small sampling functions (logits → next token) and the decode loop over a
model step (as gpt-fast does), independent of how the step runs the model."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, List, Optional, Sequence, Tuple

import torch


def logits_to_probs(logits: torch.Tensor, temperature: float = 1.0, top_k: Optional[int] = None,
                    top_p: Optional[float] = None) -> torch.Tensor:
    """Probabilities ``[B, V]`` after temperature, top-k and nucleus (top-p) filtering."""
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
    return torch.softmax(logits, dim=-1)


def sample_next_token(logits: torch.Tensor, do_sample: bool = False, temperature: float = 1.0,
                      top_k: Optional[int] = None, top_p: Optional[float] = None,
                      generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """The next token ``[B]``: argmax when not sampling, else a draw from the filtered distribution."""
    if not do_sample:
        return logits.argmax(dim=-1)
    probs = logits_to_probs(logits, temperature, top_k, top_p)
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
                    should_stop: Optional[Callable[[], bool]] = None) -> torch.Tensor:
    """The decode loop over a model ``step``: prefill ``input_ids`` ``[B, S]``, then one token
    per step until ``max_new_tokens`` or every row has emitted an EOS; returns the new ids
    ``[B, T]``. ``attention_mask`` ``[B, P + S]`` covers the ``P`` positions already in
    ``kv_cache`` and the (left-padded) prompt. A finished row keeps emitting its EOS.
    ``callback`` gets each step's tokens ``[B]``; ``should_stop()`` returning True ends the loop
    after the token in hand (a user's Ctrl-C, a stop string), the KV cache consistent.
    """
    device = input_ids.device
    batch, new = input_ids.shape
    eos = torch.tensor(list(eos_token_ids), device=device, dtype=torch.long)
    tokens: List[torch.Tensor] = []
    mask = attention_mask
    positions = (mask.long().cumsum(-1) - 1).clamp(min=0)[:, -new:]
    ids, finished = input_ids, torch.zeros(batch, dtype=torch.bool, device=device)
    for _ in range(max_new_tokens):
        logits, kv_cache = step(ids, mask, positions, kv_cache)
        token = sample_next_token(logits.float(), do_sample, temperature, top_k, top_p, generator)
        if eos.numel():
            token = torch.where(finished, eos[0], token)
            finished |= torch.isin(token, eos)
        tokens.append(token)
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
