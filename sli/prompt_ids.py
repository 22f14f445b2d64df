"""A prompt made token ids the model can take: ids or text (one or a batch), checked against
the vocabulary and the model's positions, with the attention mask of a left-padded batch."""
from __future__ import annotations

from typing import Any, Callable, Optional, Tuple

import torch


def check_token_ids(input_ids, vocab_size: int, device: torch.device) -> torch.Tensor:
    """``input_ids`` (a tensor or nested lists, ``[S]`` or ``[B, S]``) as a ``[B, S]`` long tensor
    on ``device``. Raises ``ValueError`` for an empty prompt or an id outside the vocabulary."""
    if not isinstance(input_ids, torch.Tensor):
        input_ids = torch.tensor(input_ids, dtype=torch.long)
    if input_ids.dim() == 1:
        input_ids = input_ids.unsqueeze(0)
    if input_ids.numel() == 0:
        raise ValueError("the prompt is empty; pass at least one token id")
    low, high = int(input_ids.min()), int(input_ids.max())
    if low < 0 or high >= vocab_size:
        raise ValueError(f"token id {high if high >= vocab_size else low} is outside the vocabulary "
                         f"[0, {vocab_size}); use the model's own tokenizer")
    return input_ids.to(device)


def encode_prompts(prompts, tokenizer: Callable[[], Any], vocab_size: int,
                   device: torch.device) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(ids [B, S], attention mask [B, S])`` of token ids, a text or a list of texts; texts go
    through ``tokenizer()`` left-padded (its eos as the pad token when it has none)."""
    if isinstance(prompts, str) or (isinstance(prompts, list) and prompts and isinstance(prompts[0], str)):
        texts = [prompts] if isinstance(prompts, str) else prompts
        if any(not t for t in texts):
            raise ValueError("the prompt is empty; pass some text")
        tok = tokenizer()
        tok.padding_side = "left"
        if tok.pad_token is None:
            tok.pad_token = tok.eos_token
        enc = tok(texts, return_tensors="pt", padding=True)
        return check_token_ids(enc["input_ids"], vocab_size, device), enc["attention_mask"].to(device)
    ids = check_token_ids(prompts, vocab_size, device)
    return ids, torch.ones_like(ids)


def check_length(total: int, max_positions: Optional[int]) -> None:
    """Raise ``ValueError`` when ``total`` positions (prompt + new tokens) exceed the model's."""
    if max_positions is not None and total > max_positions:
        raise ValueError(f"the prompt and new tokens need {total} positions, more than this model's "
                         f"{max_positions} (max_position_embeddings); shorten the prompt or max_new_tokens")
