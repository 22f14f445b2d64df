"""The prompt a model is given: the user's text through the tokenizer's chat template, or raw.

An instruct model (the default SmolLM2-135M-Instruct among them) answers a question only when it
sees the conversation format it was tuned on; given the bare text it may emit its end token at
once. :func:`encode_prompt` applies the tokenizer's own template when it has one, the way
``transformers`` does in ``apply_chat_template(..., tokenize=True)``: the template's text is
tokenized with ``add_special_tokens=False``, since the template writes every special token it
wants (a BOS included) and the tokenizer must not add a second one.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Optional


@dataclass
class EncodedPrompt:
    """Token ids for the model, the text they came from, and whether a chat template made it."""

    ids: List[int]
    text: str
    templated: bool


def has_chat_template(tokenizer) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def messages_for(prompt: str, system: Optional[str] = None) -> List[Dict[str, str]]:
    """``[{"role": "system", ...}?, {"role": "user", "content": prompt}]``."""
    messages = [{"role": "system", "content": system}] if system else []
    return messages + [{"role": "user", "content": prompt}]


def encode_prompt(tokenizer, prompt: str, system: Optional[str] = None, raw: bool = False) -> EncodedPrompt:
    """The ids to generate from.

    With a chat template (and not ``raw``): ``apply_chat_template(messages, tokenize=False,
    add_generation_prompt=True)``, then tokenized without added special tokens. Otherwise the
    prompt as it is, with the tokenizer's usual special tokens. (``verbose=False``: the caller
    checks the length against the model's positions and says so in its own words.)

    :raises ValueError: an empty prompt; a ``system`` prompt with ``raw`` or with a tokenizer
        that has no chat template (there is nowhere to put it).
    """
    if not prompt:
        raise ValueError("the prompt is empty; pass some text")
    if system and raw:
        raise ValueError("--system needs the chat template, which --raw turns off; drop one of them")
    if not raw and has_chat_template(tokenizer):
        text = tokenizer.apply_chat_template(messages_for(prompt, system), tokenize=False, add_generation_prompt=True)
        ids = tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]
        return EncodedPrompt(list(ids), text, True)
    if system:
        raise ValueError("--system needs a chat template, and this model's tokenizer has none; "
                         "put the instructions in the prompt itself")
    return EncodedPrompt(list(tokenizer(prompt, verbose=False)["input_ids"]), prompt, False)


def stop_token_ids(tokenizer, *configs) -> List[int]:
    """The ids that end an answer: the configs' ``eos_token_id`` (int or list) and the tokenizer's."""
    ids: List[int] = []
    for source in (*configs, tokenizer):
        value = getattr(source, "eos_token_id", None) if source is not None else None
        for token_id in (value if isinstance(value, (list, tuple)) else [value]):
            if token_id is not None and int(token_id) not in ids:
                ids.append(int(token_id))
    return ids
