"""Rank 0's side of one generation: the prompt, the sampler, the stop conditions (length,
EOS, stop strings, cancellation), the text stream and the result."""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch

from mpitpi.errors import MpitpiError
from mpitpi.sampling import Sampler
from mpitpi.tokenizer import StreamText


@dataclass
class Result:
    """What rank 0 knows after a generation (other ranks: prompt_tokens and timings)."""
    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    prompt_tokens: int = 0
    ttft_ms: float = 0.0
    step_ms: list[float] = field(default_factory=list)   # decode steps after the first token
    finish_reason: str = "length"     # "length", "stop" or "cancelled"
    logits: list[np.ndarray] = field(default_factory=list)
    cached_tokens: int = 0            # prompt tokens whose KV was reused, not recomputed
    forward_passes: int = 0           # passes this sequence took part in (prefill chunks too)
    drafted: int = 0                  # draft tokens proposed (speculative decoding)
    accepted: int = 0                 # of which kept
    # with Session(logprobs=k): per token of token_ids, (id, log-prob, [(id, log-prob)] of
    # the k likeliest), of the distribution it was drawn from (see sampling.py)
    logprobs: list[tuple[int, float, list[tuple[int, float]]]] = field(default_factory=list)

    @property
    def ms_per_token(self) -> float:
        """Median decode step (tokens after the first); TTFT if only one token was made.
        With drafts a pass makes several tokens: wall time over the tokens then."""
        if not self.step_ms:
            return self.ttft_ms
        if self.drafted:
            return float(np.sum(self.step_ms)) / len(self.step_ms)
        return float(np.median(self.step_ms))


def check_prompt(ids: list[int], max_tokens: int, vocab_size: int, max_seq_len: int) -> None:
    if not ids:
        raise MpitpiError("the prompt is empty (0 tokens). Fix: give a non-empty --prompt or "
                          "--prompt-ids.")
    bad = [i for i in ids if not 0 <= i < vocab_size]
    if bad:
        raise MpitpiError(f"token ids {bad[:5]} are outside the vocabulary [0, {vocab_size}). "
                          f"Fix: use ids the model knows.")
    if max_tokens < 1:
        raise MpitpiError(f"--max-tokens must be at least 1, got {max_tokens}.")
    if len(ids) + max_tokens > max_seq_len:
        raise MpitpiError(f"prompt ({len(ids)} tokens) plus --max-tokens ({max_tokens}) is "
                          f"{len(ids) + max_tokens}, beyond the model's context of {max_seq_len} "
                          f"tokens. Fix: shorten the prompt or lower --max-tokens.")


def token_logprobs(scores: torch.Tensor, tok: int, k: int
                   ) -> tuple[int, float, list[tuple[int, float]]]:
    """(tok, its log-prob, the ``k`` likeliest (id, log-prob)) of log_softmax(``scores``)."""
    lp = torch.log_softmax(scores.double(), dim=-1)
    top = torch.topk(lp, min(k, lp.shape[0])) if k else None
    alts = list(zip(top.indices.tolist(), top.values.tolist())) if top is not None else []
    # tokens a bias or a grammar ruled out are left out (JSON has no -inf)
    return tok, max(float(lp[tok]), -9999.0), [(i, v) for i, v in alts if v > -1e300]


class Session:
    """Rank 0's side of one generation.

    Stops after ``max_tokens`` tokens, an id in ``eos_ids``, (with ``decode``) a stop string
    in ``stops``, or when ``cancel()`` turns true (finish_reason "cancelled"; checked after
    every token and between prefill chunks). ``on_text`` receives each piece of final text
    as it is made. ``sampler`` None is greedy; ``keep_logits`` keeps every step's logits.
    ``logprobs``: None, or how many alternatives to record with each token's log-prob
    (Result.logprobs). ``grammar``: None, or a grammar.Constraint whose mask is applied to
    the logits before the choice (EOS is then allowed only where the text is complete).
    """

    def __init__(self, prompt_ids: list[int], max_tokens: int, sampler: Sampler | None = None,
                 eos_ids: list[int] | None = None, decode: Callable[[list[int]], str] | None = None,
                 stops: list[str] | None = None, on_text: Callable[[str], None] | None = None,
                 keep_logits: bool = False, cancel: Callable[[], bool] | None = None,
                 logprobs: int | None = None, grammar=None):
        self.prompt_ids, self.max_tokens = list(prompt_ids), max_tokens
        self.sampler, self.eos = sampler, set(eos_ids or [])
        self.stream = StreamText(decode, stops) if decode else None
        self.on_text, self.keep_logits = on_text, keep_logits
        self.cancelled = cancel or (lambda: False)
        self.history = list(prompt_ids)
        self.result = Result(prompt_tokens=len(prompt_ids))
        self.logprobs, self.grammar = logprobs, grammar
        self.logprobs_sent = 0     # Result.logprobs handed out by new_logprobs

    @property
    def needs_logits(self) -> bool:
        """True when the whole vocabulary's logits must reach rank 0 (not just the argmax)."""
        return (self.keep_logits or self.logprobs is not None or self.grammar is not None or
                (self.sampler is not None and not self.sampler.greedy))

    def pick(self, logits: torch.Tensor | None, best: int | None,
             draft: int | None = None) -> tuple[int, bool]:
        """The next token from the (vocab,) ``logits`` or the greedy ``best``, and whether
        to stop after it. ``draft``: the token guessed for this place (speculative
        decoding), which the sampler keeps or replaces without changing the distribution."""
        res, scores = self.result, None
        if best is not None:
            tok = best
        else:
            scores = logits
            if self.sampler is not None:
                scores = self.sampler.adjust(logits, self.history, res.token_ids)
            if self.grammar is not None:
                scores = self.grammar.mask(scores)
            tok = self.sampler.choose(scores, draft) if self.sampler is not None else \
                int(torch.argmax(scores))
        if self.keep_logits:
            res.logits.append(logits.numpy().copy())
        if tok in self.eos:
            res.finish_reason = "stop"
            return tok, True
        if self.grammar is not None and not self.grammar.accept(tok):
            res.finish_reason = "stop"     # the grammar is complete (or broken): nothing fits
            return tok, True
        if self.logprobs is not None:
            res.logprobs.append(token_logprobs(scores, tok, self.logprobs))
        res.token_ids.append(tok)
        self.history.append(tok)
        if self.stream is not None:
            self._emit(self.stream.push(tok))
            if self.stream.stopped:
                res.finish_reason = "stop"
                return tok, True
        if self.cancelled():
            res.finish_reason = "cancelled"
            return tok, True
        return tok, len(res.token_ids) >= self.max_tokens

    def new_logprobs(self) -> list:
        """Result.logprobs entries not handed out before (for a stream's next chunk)."""
        new = self.result.logprobs[self.logprobs_sent:]
        self.logprobs_sent += len(new)
        return new

    def _emit(self, text: str) -> None:
        if text and self.on_text:
            self.on_text(text)

    def finish(self) -> Result:
        """The result, with the held-back end of the text flushed."""
        if self.stream is not None:
            self._emit(self.stream.flush())
            self.result.text = self.stream.text
        return self.result
