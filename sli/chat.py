"""A conversation with a model in the terminal: the chat template, streamed answers, and the
KV cache kept between turns (a turn feeds only its own tokens)."""
from __future__ import annotations

import signal
import sys
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence, TextIO

import torch

from .chat_template import has_chat_template
from .stopping import StopStrings, end_token_ids

EXIT_COMMANDS = ("/exit", "/quit", "/bye")


def _common_prefix(a: List[int], b: List[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


@dataclass
class Conversation:
    """Turns of one conversation with ``processor``'s model.

    Each :meth:`ask` renders the whole conversation through the tokenizer's chat template and
    feeds only what the KV cache does not hold yet: normally just the new user message; where
    the template renders an earlier answer with other tokens than were generated, the cache is
    rewound to where they agree.
    """

    processor: object
    system: Optional[str] = None
    max_new_tokens: int = 256
    sampling: Dict[str, object] = field(default_factory=dict)  # do_sample, temperature, top_k, top_p, min_p, ...
    messages: List[Dict[str, str]] = field(default_factory=list)
    stop: Sequence[str] = ()  # stop strings: an answer ends before the first (which is not kept)

    def __post_init__(self) -> None:
        self.tokenizer = self.processor.tokenizer()
        if not has_chat_template(self.tokenizer):
            raise ValueError(f"{self.processor.model_dir} has no chat template in its tokenizer; "
                             "`sli chat` needs an instruct model's (use `sli generate --raw` for plain text)")
        if self.system:
            self.messages.append({"role": "system", "content": self.system})
        self.session = self.processor.new_session()
        self.stop_ids = end_token_ids(self.processor.model_dir, self.processor.config, self.tokenizer)
        StopStrings(self.stop)  # a stop that is not a string fails here, not in a turn

    def _conversation_ids(self) -> List[int]:
        text = self.tokenizer.apply_chat_template(self.messages, tokenize=False, add_generation_prompt=True)
        return list(self.tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"])

    def ask(self, text: str, on_text: Callable[[str], None] = lambda piece: None,
            should_stop: Optional[Callable[[], bool]] = None) -> str:
        """The model's answer to ``text``, streamed piece by piece to ``on_text``; ``should_stop()``
        ends it early (the partial answer stays in the conversation), as does a stop string (the
        answer is cut before it; the start of one is not shown until it is known not to be one)."""
        if not text.strip():
            raise ValueError("the message is empty")
        self.messages.append({"role": "user", "content": text})
        wanted = self._conversation_ids()
        session = self.session
        agree = _common_prefix(session.token_ids, wanted)
        if agree < len(session.token_ids):  # the cache (or the pending token) went another way
            session.rewind(min(agree, session.length))
        new_ids = torch.tensor([wanted[len(session.token_ids):]], dtype=torch.long)
        answer: List[int] = []
        shown = StopStrings(self.stop)

        def on_token(token: torch.Tensor) -> None:
            token_id = int(token[0])
            if token_id in self.stop_ids:
                return
            answer.append(token_id)
            piece = shown.update(self.tokenizer.decode(answer, skip_special_tokens=True))
            if piece:
                on_text(piece)

        def stop() -> bool:
            return shown.stopped or (should_stop is not None and should_stop())

        self.processor.generate(new_ids, max_new_tokens=self.max_new_tokens, eos_token_id=self.stop_ids,
                                callback=on_token, session=session, should_stop=stop, **self.sampling)
        rest = shown.flush()
        if rest:
            on_text(rest)
        reply = shown.text
        self.messages.append({"role": "assistant", "content": reply})
        return reply


class _Interrupt:
    """Ctrl-C while an answer streams: stop that answer, keep the conversation."""

    def __init__(self) -> None:
        self.requested = False

    def __enter__(self) -> "_Interrupt":
        self._previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        self.requested = True

    def __exit__(self, *exc) -> None:
        signal.signal(signal.SIGINT, self._previous)


def run_chat(conversation: Conversation, read: Callable[[str], str] = input, out: TextIO = sys.stdout) -> int:
    """The terminal loop: a ``>>> `` prompt, answers as they come; /exit or Ctrl-D quits,
    Ctrl-C stops the current answer (at the prompt it says how to quit)."""
    out.write("Chat with the model: /exit or Ctrl-D quits, Ctrl-C stops an answer.\n")
    out.flush()
    while True:
        try:
            line = read(">>> ")
        except EOFError:
            out.write("\n")
            return 0
        except KeyboardInterrupt:
            out.write("\n(use /exit or Ctrl-D to quit)\n")
            continue
        if line.strip() in EXIT_COMMANDS:
            return 0
        if not line.strip():
            continue
        with _Interrupt() as interrupt:
            conversation.ask(line, on_text=lambda piece: (out.write(piece), out.flush()),
                             should_stop=lambda: interrupt.requested)
        out.write("\n" + ("[stopped]\n" if interrupt.requested else ""))
        out.flush()
