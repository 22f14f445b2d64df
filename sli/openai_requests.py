"""An OpenAI request body read and checked, then made an engine :class:`~sli.engine_request.Request`.

The body: JSON object, size bound, the served model's name, no field sli does not do (``n`` > 1,
``echo``, ``logprobs``, ``tools``). The prompt: a chat's messages through the tokenizer's chat
template, or a completion's text or token ids. The parameters: each in OpenAI's range (vLLM's
for ``min_p`` and ``repetition_penalty``), else a 400 naming the field and its range; the
context checked the way OpenAI does (prompt + ``max_tokens`` within the model's positions).
"""
from __future__ import annotations

import json
import math
from typing import Any, Dict, List, Optional

from .engine_request import Request
from .openai_errors import APIError

MAX_BODY_BYTES = 8 * 1024 * 1024
DEFAULT_CHAT_MAX_TOKENS = 256  # when a chat request gives none (OpenAI: up to the context)
DEFAULT_COMPLETION_MAX_TOKENS = 16  # OpenAI's legacy completions default


# ---------------------------------------------------------------------- the body
def parse_body(raw: bytes, model_id: str) -> Dict[str, Any]:
    """The request's JSON object, for the model this server serves, asking only what sli does."""
    if len(raw) > MAX_BODY_BYTES:
        raise APIError(413, f"the request body is over {MAX_BODY_BYTES // (1024 * 1024)} MB")
    try:
        body = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise APIError(400, f"We could not parse the JSON body of your request ({exc}). The body must be "
                            "a JSON object.") from None
    if not isinstance(body, dict):
        raise APIError(400, "the request body must be a JSON object")
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise APIError(400, "you must provide a model parameter", param="model")
    if model != model_id:
        raise APIError(404, f"The model `{model}` does not exist; this server serves `{model_id}`",
                       param="model", code="model_not_found")
    _unsupported(body)
    return body


# ---------------------------------------------------------------------- prompts
def _content_text(content: Any, where: str) -> str:
    """A message's content: a string, or a list of ``{"type": "text", "text": ...}`` parts."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = []
        for part in content:
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise APIError(400, f"{where}: only text content parts ({{'type': 'text', 'text': ...}}) are "
                                    "supported", param="messages")
            parts.append(part["text"])
        return "".join(parts)
    raise APIError(400, f"{where}: content must be a string or a list of text parts", param="messages")


def chat_prompt_ids(tokenizer, body: Dict[str, Any]) -> List[int]:
    """Token ids of a chat request's ``messages`` (:func:`build_chat_prompt`)."""
    return build_chat_prompt(tokenizer, _messages(body))


def _messages(body: Dict[str, Any]) -> List[Dict[str, str]]:
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise APIError(400, "'messages' must be a non-empty list of {role, content} objects", param="messages")
    out = []
    for index, message in enumerate(messages):
        if not isinstance(message, dict) or not isinstance(message.get("role"), str):
            raise APIError(400, f"messages[{index}] must be an object with a string 'role'", param="messages")
        out.append({"role": message["role"], "content": _content_text(message.get("content"), f"messages[{index}]")})
    return out


def build_chat_prompt(tokenizer, messages: List[Dict[str, str]]) -> List[int]:
    """Token ids of a conversation: the tokenizer's chat template (``add_generation_prompt``),
    tokenized without added special tokens (the template writes them). A tokenizer without a
    template gets the plain ``role: content`` lines and ``assistant:``, with its usual special tokens."""
    if getattr(tokenizer, "chat_template", None):
        try:
            text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        except Exception as exc:  # the template's own checks (roles that must alternate, ...)
            raise APIError(400, f"the model's chat template refused these messages: {exc}",
                           param="messages") from None
        return list(tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"])
    text = "\n".join(f"{m['role']}: {m['content']}" for m in messages) + "\nassistant:"
    return list(tokenizer(text, verbose=False)["input_ids"])


def completion_prompt_ids(tokenizer, body: Dict[str, Any]) -> List[int]:
    """Token ids of a completion request's ``prompt``: one text, or one list of token ids."""
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]  # one prompt in a list
    if isinstance(prompt, str):
        if not prompt:
            raise APIError(400, "the prompt is empty", param="prompt")
        return list(tokenizer(prompt, verbose=False)["input_ids"])
    if isinstance(prompt, list) and prompt and all(isinstance(i, int) and not isinstance(i, bool) for i in prompt):
        return list(prompt)
    if isinstance(prompt, list) and len(prompt) > 1:
        raise APIError(400, "one prompt per request is supported; send several requests (they are batched)",
                       param="prompt")
    raise APIError(400, "'prompt' must be a non-empty string or a list of token ids", param="prompt")


# ---------------------------------------------------------------------- parameters
def _number(body: Dict[str, Any], name: str, low: float, high: float, default: Optional[float],
            low_open: bool = False) -> Optional[float]:
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise APIError(400, f"'{name}' must be a finite number", param=name)
    if value < low or value > high or (low_open and value == low):
        where = f"> {low:g}" if high == math.inf else f"in {'(' if low_open else '['}{low:g}, {high:g}]"
        raise APIError(400, f"'{name}' is {value}; it must be {where}", param=name)
    return float(value)


def _integer(body: Dict[str, Any], name: str, low: int) -> Optional[int]:
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise APIError(400, f"'{name}' must be an integer", param=name)
    if value < low:
        raise APIError(400, f"'{name}' is {value}; it must be >= {low}", param=name)
    return value


MAX_STOP_STRINGS = 4  # OpenAI's limit


def _stop(body: Dict[str, Any]) -> List[str]:
    """OpenAI's ``stop``: a string or a list of up to 4; the answer ends before the first one."""
    stop = body.get("stop")
    if stop is None:
        return []
    if isinstance(stop, str):
        return [stop] if stop else []
    if isinstance(stop, list) and all(isinstance(s, str) for s in stop) and len(stop) <= MAX_STOP_STRINGS:
        return [s for s in stop if s]
    raise APIError(400, f"'stop' must be a string or a list of at most {MAX_STOP_STRINGS} strings", param="stop")


def _unsupported(body: Dict[str, Any]) -> None:
    n = body.get("n")
    if n is not None and n != 1:
        raise APIError(400, "only n=1 is supported; send several requests (they are batched)", param="n")
    if body.get("echo"):
        raise APIError(400, "echo is not supported", param="echo")
    if body.get("logprobs") not in (None, False) or body.get("top_logprobs") is not None:
        raise APIError(400, "logprobs are not supported", param="logprobs")
    if body.get("tools") or body.get("functions"):
        raise APIError(400, "tools are not supported", param="tools")
    stream = body.get("stream")
    if stream is not None and not isinstance(stream, bool):
        raise APIError(400, "'stream' must be true or false", param="stream")


def make_request(body: Dict[str, Any], prompt_ids: List[int], *, chat: bool, max_positions: Optional[int],
                 engine, output) -> Request:
    """The engine request of ``body``: context checked the way OpenAI does (prompt + max_tokens
    within the model's positions and ``engine``'s KV budget), ``max_tokens`` defaulted to what
    is left (at most :data:`DEFAULT_CHAT_MAX_TOKENS` or :data:`DEFAULT_COMPLETION_MAX_TOKENS`);
    its events go to ``output``."""
    max_tokens = _integer(body, "max_completion_tokens", 1)
    if max_tokens is None:
        max_tokens = _integer(body, "max_tokens", 1)
    limit = max_positions
    budget_positions = engine.kv_budget_bytes // max(1, engine.kv_bytes_per_token)
    context = min(limit, budget_positions) if limit is not None else budget_positions
    prompt = len(prompt_ids)
    if prompt >= context or (max_tokens is not None and prompt + max_tokens > context):
        asked = f"{prompt + max_tokens} tokens ({prompt} in the prompt, {max_tokens} for the completion)" \
            if max_tokens is not None else f"{prompt} tokens in the prompt, and at least 1 for the completion"
        why = "" if limit is not None and context == limit else \
            f" (this server's KV budget holds {budget_positions} positions)"
        raise APIError(400, f"This model's maximum context length is {context} tokens{why}. However, you "
                            f"requested {asked}. Please reduce the length of the prompt or the completion.",
                       param="messages" if "messages" in body else "prompt", code="context_length_exceeded")
    if max_tokens is None:
        max_tokens = min(DEFAULT_CHAT_MAX_TOKENS if chat else DEFAULT_COMPLETION_MAX_TOKENS, context - prompt)
    temperature = _number(body, "temperature", 0.0, 2.0, 1.0)
    top_p = _number(body, "top_p", 0.0, 1.0, None, low_open=True)
    min_p = _number(body, "min_p", 0.0, 1.0, None)  # vLLM's and llama.cpp's extensions, as transformers applies them
    repetition_penalty = _number(body, "repetition_penalty", 0.0, math.inf, 1.0, low_open=True)
    frequency_penalty = _number(body, "frequency_penalty", -2.0, 2.0, 0.0)
    presence_penalty = _number(body, "presence_penalty", -2.0, 2.0, 0.0)
    seed = body.get("seed")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise APIError(400, "'seed' must be an integer", param="seed")
    ignore_eos = body.get("ignore_eos", False)
    if not isinstance(ignore_eos, bool):
        raise APIError(400, "'ignore_eos' must be true or false", param="ignore_eos")
    return Request(prompt_ids, max_tokens=max_tokens, temperature=temperature, top_p=top_p,
                   seed=None if seed is None else seed % (2 ** 63), stop=_stop(body), output=output,
                   ignore_eos=ignore_eos, min_p=min_p, repetition_penalty=repetition_penalty,
                   frequency_penalty=frequency_penalty, presence_penalty=presence_penalty)
