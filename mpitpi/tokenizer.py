"""Text <-> token ids (rank 0 only), and streaming detokenization."""
from __future__ import annotations

from mpitpi.errors import MpitpiError


class Tokenizer:
    """A ``tokenizers`` tokenizer loaded from a tokenizer.json file."""

    def __init__(self, path: str):
        from tokenizers import Tokenizer as HFTokenizer

        try:
            self.tok = HFTokenizer.from_file(path)
        except Exception as e:
            raise MpitpiError(f"cannot load tokenizer {path}: {e}. Fix: restore tokenizer.json, "
                              f"or pass --prompt-ids instead of --prompt.")

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text`` with the tokenizer's own special tokens (e.g. BOS) added."""
        return self.tok.encode(text, add_special_tokens=True).ids

    def decode(self, ids: list[int]) -> str:
        return self.tok.decode(ids, skip_special_tokens=True)


class StreamText:
    """Turns a growing list of token ids into text deltas, holding back what may change.

    A delta is held back while the text ends in an incomplete UTF-8 sequence (U+FFFD), or
    while its tail could be the start of a stop string. ``stopped`` is set once a stop string
    appears; the text is then cut before it.
    """

    def __init__(self, decode, stops: list[str] | None = None):
        self.decode = decode
        self.stops = [s for s in (stops or []) if s]
        self.hold = max((len(s) for s in self.stops), default=1) - 1
        self.ids: list[int] = []
        self.text = ""
        self.sent = 0
        self.stopped = False

    def push(self, token: int) -> str:
        """Add one token; return the text that is now final."""
        self.ids.append(token)
        self.text = self.decode(self.ids)
        for s in self.stops:
            at = self.text.find(s)
            if at >= 0:
                self.text, self.stopped = self.text[:at], True
                return self.flush()
        if self.text.endswith("\ufffd"):
            return ""
        ready = len(self.text) - self.hold
        if ready <= self.sent:
            return ""
        delta, self.sent = self.text[self.sent:ready], ready
        return delta

    def flush(self) -> str:
        """The rest of the text (at the end of generation)."""
        delta, self.sent = self.text[self.sent:], len(self.text)
        return delta
