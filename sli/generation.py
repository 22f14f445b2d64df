"""Generation: small sampling functions (logits → next token) and the decode loop over a
model step (as gpt-fast does), independent of how the step runs the model."""
from __future__ import annotations

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


def generate_tokens(step: Step, input_ids: torch.Tensor, attention_mask: torch.Tensor, kv_cache: Any,
                    max_new_tokens: int, eos_token_ids: Sequence[int] = (), do_sample: bool = False,
                    temperature: float = 1.0, top_k: Optional[int] = None, top_p: Optional[float] = None,
                    generator: Optional[torch.Generator] = None,
                    callback: Optional[Callable[[torch.Tensor], None]] = None) -> torch.Tensor:
    """The decode loop over a model ``step``: prefill the (left-padded) prompt, then one token
    per step until ``max_new_tokens`` or every row has emitted an EOS; returns the new ids
    ``[B, T]``. A finished row keeps emitting its EOS. ``callback`` gets each step's tokens ``[B]``.
    """
    device = input_ids.device
    batch = input_ids.shape[0]
    eos = torch.tensor(list(eos_token_ids), device=device, dtype=torch.long)
    tokens: List[torch.Tensor] = []
    mask = attention_mask
    positions = (mask.long().cumsum(-1) - 1).clamp(min=0)
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
        if eos.numel() and bool(finished.all()):
            break
        ids = token[:, None]
        mask = torch.cat([mask, torch.ones(batch, 1, dtype=mask.dtype, device=device)], dim=1)
        positions = positions[:, -1:] + 1
    if not tokens:
        return torch.empty(batch, 0, dtype=torch.long, device=device)
    return torch.stack(tokens, dim=1)
