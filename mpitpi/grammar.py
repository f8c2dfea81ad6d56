"""Constrained decoding (rank 0): a request's response_format (or a forced tool call) as a
grammar whose token mask is applied to the full-vocabulary logits before each choice.

It uses llguidance (measured against outlines-core and xgrammar on SmolLM2's 49152-token
vocabulary: the least per-token mask time, see docs/BENCHMARKS.md). A ``Constraint`` is one
request's matcher; ``Grammars`` holds the tokenizer view that llguidance builds once per
model (about 0.25 s for SmolLM2) and makes constraints from JSON schemas or Lark grammars.
"""
from __future__ import annotations

import json
import threading

import torch

from mpitpi.errors import MpitpiError

try:   # optional: without it the server runs and refuses constrained requests (400)
    import llguidance
    import llguidance.numpy   # not llguidance.torch: it imports torch's compiler, 2 s a process
except ImportError as e:       # e.g. a platform with no llguidance wheel and no Rust compiler
    llguidance = None
    MISSING = (f"constrained decoding (response_format, forced tool calls) needs llguidance, "
               f"which did not import here ({e}). Fix: pip install llguidance (a wheel, or "
               f"a Rust toolchain to build it), then restart the server.")

# JSON as models usually write it (", " and ": " between items) and no free whitespace:
# no run of blanks can eat max_tokens
JSON_OPTIONS = {"item_separator": ", ", "key_separator": ": ", "whitespace_flexible": False}


class BadGrammar(MpitpiError):
    """A schema or grammar that llguidance cannot use; the message says why."""


class Constraint:
    """One generation's grammar state: ``mask`` the logits, then ``accept`` the choice."""

    def __init__(self, matcher, vocab: int):   # matcher: an llguidance.LLMatcher
        self.m, self.vocab = matcher, vocab
        self.words = llguidance.numpy.allocate_token_bitmask(1, vocab)  # (1, ceil(vocab/32))
        self.bits = torch.from_numpy(self.words)                        # the same memory
        self.shifts = torch.arange(32, dtype=torch.int32)

    def allowed(self) -> torch.Tensor:
        """(vocab,) bool: the tokens the grammar allows next (EOS once it is complete)."""
        llguidance.numpy.fill_next_token_bitmask(self.m, self.words)
        words = self.bits[0].unsqueeze(1)                            # (n_words, 1) int32
        return ((words >> self.shifts) & 1).flatten()[:self.vocab].bool()

    def mask(self, logits: torch.Tensor) -> torch.Tensor:
        """``logits`` (vocab,) with every token the grammar forbids at -inf."""
        ok = self.allowed()[:logits.shape[0]]
        if not bool(ok.any()):        # a broken state: leave the choice to EOS
            return logits
        return logits.masked_fill(~ok, float("-inf"))

    def accept(self, token: int) -> bool:
        """Advance past ``token``; False when the grammar cannot take it (complete)."""
        return self.m.consume_token(token) and not self.m.is_error()


class Grammars:
    """Constraint factory for one tokenizer (mpitpi.tokenizer.Tokenizer) and model vocab."""

    def __init__(self, tokenizer, vocab_size: int, eos_ids: list[int]):
        self.tokenizer, self.vocab, self.eos = tokenizer, vocab_size, list(eos_ids)
        self._lltok = None
        self._lock = threading.Lock()

    def lltok(self):
        """llguidance's view of the tokenizer (an LLTokenizer); BadGrammar without it."""
        if llguidance is None:
            raise BadGrammar(MISSING)
        with self._lock:   # handler threads share it; built on first use
            if self._lltok is None:
                self._lltok = llguidance.LLTokenizer(self.tokenizer.tok.to_str(),
                                                     n_vocab=self.vocab, eos_token=self.eos)
            return self._lltok

    def _make(self, grammar: str) -> Constraint:
        m = llguidance.LLMatcher(self.lltok(), grammar, log_level=0)
        if m.is_error():
            raise BadGrammar(m.get_error())
        return Constraint(m, self.vocab)

    def json_schema(self, schema: dict) -> Constraint:
        """Text that is one JSON value valid under ``schema`` ({"type": "object"}: any object)."""
        self.lltok()   # BadGrammar, naming the fix, where llguidance is missing
        try:
            return self._make(llguidance.LLMatcher.grammar_from_json_schema(
                json.dumps(schema), overrides=JSON_OPTIONS))
        except (ValueError, TypeError) as e:
            raise BadGrammar(str(e))

    def lark(self, grammar: str) -> Constraint:
        """Text matching a Lark grammar (llguidance's dialect: %json {schema} embeds JSON)."""
        self.lltok()
        return self._make(llguidance.LLMatcher.grammar_from_lark(grammar))


def forced_call(grammars: Grammars, template: str | None, tools: list[dict],
                choice: str | dict) -> Constraint:
    """A grammar for one call of a tool (``choice`` "required": any of ``tools``; a named
    function: that one) in the form the chat template teaches: inside <tool_call> tags
    where the template mentions them, else a bare JSON object."""
    names = None if choice == "required" else {choice["function"]["name"]}
    calls = [{"type": "object", "additionalProperties": False, "required": ["name", "arguments"],
              "properties": {"name": {"const": f["name"]},
                             "arguments": f.get("parameters") or {"type": "object"}}}
             for f in (t["function"] for t in tools) if names is None or f["name"] in names]
    schema = {"x-guidance": JSON_OPTIONS, "anyOf": calls}
    if template and "<tool_call>" in template:
        return grammars.lark('start: "<tool_call>\\n" call "\\n</tool_call>"\n'
                             f"call: %json {json.dumps(schema)}\n")
    return grammars.json_schema(schema)
