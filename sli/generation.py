"""Small sampling functions: logits → next token."""
from __future__ import annotations

from typing import Optional

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
