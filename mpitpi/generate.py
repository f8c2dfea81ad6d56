"""Prefill and decode in lockstep across ranks; rank 0's Session picks every token.

Two halves, one per concern:

- ``generate(comm, model, session)`` is the step every rank runs together. Rank 0
  broadcasts the prompt; the prompt is prefilled in chunks of ``PREFILL_CHUNK`` tokens (after
  each chunk but the last, rank 0 broadcasts whether to go on, so a cancelled request or a
  shutdown does not wait for a long prompt); then per token every rank runs its share of
  the forward pass (1 + 2 n_layers all-reduces), the logits reach rank 0 (Gatherv of every
  rank's vocabulary rows, or only each rank's best (value, index) when the choice is
  greedy), and rank 0 broadcasts ``[token, stop]`` (Bcast of two int64).
- ``Session`` lives on rank 0 only: the prompt, the sampler, the stop conditions (length,
  EOS, stop strings, cancellation), the text stream and the result.
"""
from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch

from mpitpi.comm import Comm
from mpitpi.errors import MpitpiError
from mpitpi.model import Transformer
from mpitpi.sampling import Sampler
from mpitpi.tokenizer import StreamText

PREFILL_CHUNK = 128   # prompt tokens per forward pass; cancellation is checked between them


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

    @property
    def ms_per_token(self) -> float:
        """Median decode step (tokens after the first); TTFT if only one token was made."""
        return float(np.median(self.step_ms)) if self.step_ms else self.ttft_ms


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


class Session:
    """Rank 0's side of one generation.

    Stops after ``max_tokens`` tokens, an id in ``eos_ids``, (with ``decode``) a stop string
    in ``stops``, or when ``cancel()`` turns true (finish_reason "cancelled"; checked after
    every token and between prefill chunks). ``on_text`` receives each piece of final text
    as it is made. ``sampler`` None is greedy; ``keep_logits`` keeps every step's logits.
    """

    def __init__(self, prompt_ids: list[int], max_tokens: int, sampler: Sampler | None = None,
                 eos_ids: list[int] | None = None, decode: Callable[[list[int]], str] | None = None,
                 stops: list[str] | None = None, on_text: Callable[[str], None] | None = None,
                 keep_logits: bool = False, cancel: Callable[[], bool] | None = None):
        self.prompt_ids, self.max_tokens = list(prompt_ids), max_tokens
        self.sampler, self.eos = sampler, set(eos_ids or [])
        self.stream = StreamText(decode, stops) if decode else None
        self.on_text, self.keep_logits = on_text, keep_logits
        self.cancelled = cancel or (lambda: False)
        self.history = list(prompt_ids)
        self.result = Result(prompt_tokens=len(prompt_ids))

    @property
    def needs_logits(self) -> bool:
        """True when the whole vocabulary's logits must reach rank 0 (not just the argmax)."""
        return self.keep_logits or (self.sampler is not None and not self.sampler.greedy)

    def pick(self, logits: torch.Tensor | None, best: int | None) -> tuple[int, bool]:
        """The next token from the (vocab,) ``logits`` or the greedy ``best``, and whether
        to stop after it."""
        res = self.result
        if best is not None:
            tok = best
        elif self.sampler is not None:
            tok = self.sampler(logits, self.history)
        else:
            tok = int(torch.argmax(logits))
        if self.keep_logits:
            res.logits.append(logits.numpy().copy())
        if tok in self.eos:
            res.finish_reason = "stop"
            return tok, True
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

    def _emit(self, text: str) -> None:
        if text and self.on_text:
            self.on_text(text)

    def finish(self) -> Result:
        """The result, with the held-back end of the text flushed."""
        if self.stream is not None:
            self._emit(self.stream.flush())
            self.result.text = self.stream.text
        return self.result


def _fault_step(rank: int) -> int | None:
    """MPITPI_FAULT_INJECT=RANK:STEP makes rank RANK raise at decode step STEP: a way to
    check that one rank's failure ends the whole job (used by the fault tests)."""
    spec = os.environ.get("MPITPI_FAULT_INJECT")
    if not spec:
        return None
    r, s = spec.split(":")
    return int(s) if int(r) == rank else None


def _prefill(comm: Comm, model: Transformer, ids: np.ndarray,
             session: Session | None) -> torch.Tensor | None:
    """Every rank: run the prompt through in chunks; (n_vocab_r,) logits of its last token,
    or None when rank 0 cancelled between chunks."""
    go = np.ones(1, dtype=np.int64)
    tokens = torch.from_numpy(ids)
    for start in range(0, len(ids), PREFILL_CHUNK):
        local = model.forward(tokens[start:start + PREFILL_CHUNK], start)
        if start + PREFILL_CHUNK >= len(ids):
            return local
        if session is not None:
            go[0] = not session.cancelled()
        comm.bcast_(go)
        if not go[0]:
            return None
    raise AssertionError("unreachable: a prompt has at least one token")


def generate(comm: Comm, model: Transformer, session: Session | None,
             on_step: Callable[[int, float, float, int], None] | None = None) -> Result:
    """Collective: every rank calls it; rank 0 passes its Session, the others None.

    ``on_step(step, ms, comm_ms, bytes)`` is called on every rank after each token with
    that step's wall time, its time inside all-reduces and the bytes this rank sent in them.
    Returns rank 0's session result on rank 0; elsewhere a Result with the timings.
    """
    root = session is not None
    head = (len(session.prompt_ids), session.max_tokens, session.needs_logits) if root else None
    n, max_tokens, full = comm.bcast_obj(head)
    ids = np.array(session.prompt_ids if root else np.zeros(n), dtype=np.int64)
    comm.bcast_(ids)
    model.reserve(n + max_tokens)
    res = session.result if root else Result(prompt_tokens=n)
    msg = np.zeros(2, dtype=np.int64)   # [token, stop]
    fault = _fault_step(comm.rank)
    t0 = time.perf_counter()
    c0, b0 = comm.allreduce_s, comm.allreduce_bytes
    local = _prefill(comm, model, ids, session)
    if local is None:
        res.finish_reason = "cancelled"
        return session.finish() if root else res
    start = n
    for step in range(max_tokens):
        if step == fault:
            raise RuntimeError(f"injected fault at step {step} (MPITPI_FAULT_INJECT)")
        if step > 0:
            local = model.forward(torch.tensor([int(msg[0])], dtype=torch.int64), start)
            start += 1
        if full:
            logits, best = comm.gather_rows(local, model.vocab_counts), None
        else:
            logits, best = None, comm.argmax_rows(local, model.vocab_offset)
        if root:
            msg[0], msg[1] = session.pick(logits, best)
        comm.bcast_(msg)
        now = time.perf_counter()
        if step == 0:
            res.ttft_ms = (now - t0) * 1e3
        else:
            res.step_ms.append((now - t0) * 1e3)
        if on_step is not None:
            on_step(step, (now - t0) * 1e3, (comm.allreduce_s - c0) * 1e3,
                    comm.allreduce_bytes - b0)
            c0, b0 = comm.allreduce_s, comm.allreduce_bytes
        t0 = now
        if msg[1]:
            break
    return session.finish() if root else res
