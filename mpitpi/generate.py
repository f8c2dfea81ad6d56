"""Prefill and decode in lockstep across ranks; rank 0 samples and broadcasts each token.

Per step every rank runs its share of the forward pass (2 all-reduces per layer + 1 for the
embedding), the ranks' vocabulary logits are gathered on rank 0 (Gatherv), rank 0 picks the
token and broadcasts ``[token, stop]`` (Bcast of two int64). Only rank 0 holds the prompt,
the sampler, the text and the timings.
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from typing import Callable

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
    finish_reason: str = "length"
    logits: list[np.ndarray] = field(default_factory=list)

    @property
    def ms_per_token(self) -> float:
        """Median decode step (tokens after the first); TTFT if only one token was made."""
        return float(np.median(self.step_ms)) if self.step_ms else self.ttft_ms


def _fault_step(rank: int) -> int | None:
    """MPITPI_FAULT_INJECT=RANK:STEP makes rank RANK raise at decode step STEP: a way to
    check that one rank's failure ends the whole job (used by the fault tests)."""
    spec = os.environ.get("MPITPI_FAULT_INJECT")
    if not spec:
        return None
    r, s = spec.split(":")
    return int(s) if int(r) == rank else None


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


def generate(comm, model, vocab_counts: list[int], prompt_ids: list[int] | None, max_tokens: int,
             sampler: Sampler | None = None, eos_ids: list[int] | None = None,
             decode: Callable[[list[int]], str] | None = None, stops: list[str] | None = None,
             on_text: Callable[[str], None] | None = None, keep_logits: bool = False,
             cancel: Callable[[], bool] | None = None,
             on_step: Callable[[int, float, float, int], None] | None = None) -> Result:
    """Collective: every rank calls it; ``prompt_ids``, ``sampler``, ``decode`` matter on rank 0.

    ``vocab_counts[r]``: vocabulary rows rank r holds (the plan's), for gathering logits.

    Stops after ``max_tokens`` tokens, an EOS id, (with ``decode``) a stop string, or when
    ``cancel()`` turns true on rank 0 (finish_reason "cancelled"). On rank 0 ``on_text``
    receives each piece of final text as it is made. ``on_step(step, ms, comm_ms, bytes)``
    is called on every rank after each token with that step's wall time, its time inside
    all-reduces and the bytes this rank sent in them.
    """
    root = comm.rank == 0
    # the full logits go to rank 0 only when something needs them; greedy needs the argmax
    full = keep_logits or (sampler is not None and not sampler.greedy)
    n, full = comm.bcast_obj((len(prompt_ids), full) if root else None)
    ids = np.array(prompt_ids if root else np.zeros(n), dtype=np.int64)
    comm.bcast_(ids)
    model.reserve(n + max_tokens)
    res = Result(prompt_tokens=n)
    stream = StreamText(decode, stops) if (root and decode) else None
    eos = set(eos_ids or [])
    history = list(ids.tolist())
    msg = np.zeros(2, dtype=np.int64)   # [token, stop]
    tokens, start = torch.from_numpy(ids), 0
    fault = _fault_step(comm.rank)
    vocab_offset = sum(vocab_counts[:comm.rank])    # this rank's first vocabulary row
    t0 = time.perf_counter()
    c0, b0 = comm.allreduce_s, comm.allreduce_bytes
    for step in range(max_tokens):
        if step == fault:
            raise RuntimeError(f"injected fault at step {step} (MPITPI_FAULT_INJECT)")
        local = model.forward(tokens, start)                       # (n_vocab_r,)
        if full:
            logits = comm.gather_rows(local, vocab_counts)         # (vocab,) on rank 0
        else:
            best = comm.argmax_rows(local, vocab_offset)
        if root:
            if not full:
                tok = best
            elif sampler is not None:
                tok = sampler(logits, history)
            else:
                tok = int(torch.argmax(logits))
            if keep_logits:
                res.logits.append(logits.numpy().copy())
            stop = tok in eos
            if not stop:
                res.token_ids.append(tok)
                history.append(tok)
                if stream is not None:
                    delta = stream.push(tok)
                    if delta and on_text:
                        on_text(delta)
                    stop = stream.stopped
            if stop:
                res.finish_reason = "stop"
            elif cancel is not None and cancel():
                stop, res.finish_reason = True, "cancelled"
            msg[0], msg[1] = tok, stop or step == max_tokens - 1
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
        start += tokens.shape[0]
        tokens = torch.tensor([int(msg[0])], dtype=torch.int64)
    if stream is not None:
        tail = stream.flush()
        if tail and on_text:
            on_text(tail)
        res.text = stream.text
    return res
