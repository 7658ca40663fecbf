"""Token ids to text as they are drawn, with OpenAI stop strings (the parent's side of a
streamed completion; the devices only ever see token ids)."""

from __future__ import annotations


class Detokenizer:
    """Token ids -> text, incrementally, with OpenAI stop strings: text that could still turn
    into a stop string is held back until it cannot; a stop string ends the text before it."""

    def __init__(self, tokenizer, stop: tuple[str, ...]) -> None:
        self.tokenizer = tokenizer
        self.stop = stop
        self.ids: list[int] = []
        self.text = ""  # text released so far
        self.stopped = False

    def push(self, token_id: int) -> str:
        self.ids.append(token_id)
        full = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        if full.endswith("\ufffd"):  # an incomplete UTF-8 sequence: wait for the next token
            return ""
        found = [at for at in (full.find(s) for s in self.stop) if at != -1]
        if found:  # the earliest stop string in the text, whichever it is in the list
            self.stopped = True
            return self._release(full[: min(found)])
        hold = max((_overlap(full, s) for s in self.stop), default=0)
        return self._release(full[: len(full) - hold])

    def flush(self) -> str:
        if self.stopped or not self.ids:
            return ""
        return self._release(self.tokenizer.decode(self.ids, skip_special_tokens=True))

    def _release(self, upto: str) -> str:
        if len(upto) <= len(self.text):
            return ""
        delta, self.text = upto[len(self.text) :], upto
        return delta


def _overlap(text: str, stop: str) -> int:
    """Length of the longest end of `text` that is a beginning of `stop`."""
    for n in range(min(len(text), len(stop) - 1), 0, -1):
        if text.endswith(stop[:n]):
            return n
    return 0
