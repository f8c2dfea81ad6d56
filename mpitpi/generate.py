"""Prefill and decode in lockstep across ranks; rank 0's Session picks every token.

``generate(comm, model, session)`` is the step every rank runs together for one sequence:
a batch.Batch with one KV slot on rank 0, batch.Runner's passes on the others. Each pass
(a prompt chunk of up to ``batch.PREFILL_CHUNK`` rows, or a token with its drafted
continuation) is one broadcast from rank 0, the forward pass (1 + 2 n_layers all-reduces)
and one gather of the wanted logits (or their argmaxes) to rank 0.
"""
from __future__ import annotations

from collections.abc import Callable

from mpitpi.batch import Batch, Runner
from mpitpi.comm import Comm
from mpitpi.model import Transformer
from mpitpi.session import Result, Session


def generate(comm: Comm, model: Transformer, session: Session | None,
             on_step: Callable[[int, float, float, int], None] | None = None,
             draft: int = 0, reuse: bool = True, drafter=None) -> Result:
    """Collective: every rank calls it; rank 0 passes its Session, the others None.

    One sequence in KV slot 0 (batch.Batch with one slot): the prompt positions still
    cached there from the previous call are reused (unless ``reuse`` is False).
    ``draft``: tokens guessed per pass (0: off), by rank 0's ``drafter`` (a small model,
    draft.ModelDrafter) or by prompt lookup. ``on_step(pass, ms, comm_ms, bytes)`` is
    called on every rank after each forward pass with its wall time, its time inside
    all-reduces and the bytes this rank sent in them. Returns rank 0's session result on
    rank 0; elsewhere a Result with the pass count and timings.
    """
    if session is None:
        ms = Runner(comm, model, on_step).follow()
        return Result(forward_passes=len(ms), step_ms=ms[1:], ttft_ms=ms[0] if ms else 0.0)
    Batch(comm, model, draft=draft, on_pass=on_step, reuse=reuse,
          drafter=drafter).run_all([session])
    return session.result
