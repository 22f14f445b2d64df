"""What ends an answer: the model's end tokens, and stop strings in the decoded text.

:class:`StopStrings` is shared by ``sli generate``, ``sli chat`` and the server's engine: it
follows the answer's text as it grows, cuts it before the first stop string, and hands out
only what is safe to show (never the start of a stop string that may still complete, nor a
character whose bytes have not all been generated yet).
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Iterable, List, Optional, Union

__all__ = ["StopStrings", "end_token_ids"]


class StopStrings:
    """Stop strings over an answer's text, fed whole after each token with :meth:`update`.

    ``update(text)`` returns the new piece that may be shown; once the text contains a stop
    string, :attr:`stopped` is True, :attr:`text` is the answer cut before the earliest one
    and :attr:`matched` the string found. Text that could be the start of a stop string (and a
    trailing U+FFFD, an incomplete UTF-8 character) is held back until resolved; when the
    answer ends otherwise (an end token, the length limit), :meth:`flush` returns it.
    Without stop strings it still holds back an incomplete character only.
    """

    def __init__(self, stops: Union[None, str, Iterable[str]] = ()) -> None:
        stops = [stops] if isinstance(stops, str) else list(stops or ())
        for stop in stops:
            if not isinstance(stop, str):
                raise TypeError(f"a stop string must be a str, got {type(stop).__name__} {stop!r}")
        self.stops: List[str] = [s for s in dict.fromkeys(stops) if s]
        self.text = ""  # the answer so far (cut before the stop string once one appeared)
        self.sent = 0  # characters of text handed out
        self.matched: Optional[str] = None

    @property
    def stopped(self) -> bool:
        return self.matched is not None

    def __bool__(self) -> bool:  # any stop strings at all
        return bool(self.stops)

    def update(self, text: str) -> str:
        """``text`` is the whole answer decoded so far; returns what is newly safe to show."""
        if self.stopped:
            return ""
        found = [(text.find(stop), stop) for stop in self.stops]
        found = [(at, stop) for at, stop in found if at >= 0]
        if found:
            at, self.matched = min(found)
            self.text = text[:at]
            return self._hand_out(at)
        self.text = text
        safe = len(text.rstrip("\ufffd"))
        hold = 0
        for stop in self.stops:  # the longest end of the text that starts a stop string
            for k in range(min(len(stop) - 1, safe), hold, -1):
                if text.endswith(stop[:k], 0, safe):
                    hold = k
                    break
        return self._hand_out(safe - hold)

    def flush(self) -> str:
        """The text held back, now that the answer has ended without a stop string."""
        return self._hand_out(len(self.text))

    def _hand_out(self, upto: int) -> str:
        # (a decoded text may change characters it already had; what was handed out stays)
        piece = self.text[self.sent:upto] if upto > self.sent else ""
        self.sent = max(self.sent, upto)
        return piece


def end_token_ids(model_dir: Union[str, Path], config, tokenizer) -> List[int]:
    """The ids that end an answer: the model config's ``eos_token_id``, generation_config.json's
    and the tokenizer's (int or list each; a generation_config.json that does not parse is ignored)."""
    from .chat_template import stop_token_ids

    generation_config = None
    path = Path(model_dir) / "generation_config.json"
    if path.is_file():
        try:
            generation_config = argparse.Namespace(**json.loads(path.read_text()))
        except (ValueError, TypeError):
            generation_config = None
    return stop_token_ids(tokenizer, config, generation_config)
