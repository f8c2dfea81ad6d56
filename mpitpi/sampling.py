"""Choosing the next token from full-vocabulary logits (runs on rank 0 only).

Order: ``adjust`` (repetition penalty over prompt and output, OpenAI's presence and frequency
penalties over the output, logit bias), then (in Session) a grammar's mask, then ``choose``:
temperature 0 is greedy (argmax); else temperature, top-k, min-p and top-p filters, then a
draw from a seeded generator. Log-probabilities (``logprobs``) are of the adjusted, masked
logits before temperature and the filters.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, fields

import torch

from mpitpi.errors import MpitpiError

MAX_SEED = 2**63 - 1


class BadOption(MpitpiError):
    """A sampling option out of range; ``field`` names it (a SamplingParams field)."""

    def __init__(self, field: str, message: str):
        super().__init__(message)
        self.field = field


@dataclass
class SamplingParams:
    """Every sampling option, checked in one place (``check``) for the CLI and the server."""
    temperature: float = 0.0     # 0: greedy
    top_k: int = 0               # 0: off
    top_p: float = 1.0           # 1: off
    min_p: float = 0.0           # 0: off
    repeat_penalty: float = 1.0  # 1: off
    presence_penalty: float = 0.0    # OpenAI's: subtracted once from each token already made
    frequency_penalty: float = 0.0   # OpenAI's: subtracted per time a token was already made
    seed: int | None = None
    logit_bias: dict[int, float] | None = None   # token id -> added to its logit; -100 bans it

    # (low, high, low is open, high is open) per number; None: unbounded on that side
    RANGES = {"temperature": (0.0, 100.0, False, False), "top_k": (0, None, False, False),
              "top_p": (0.0, 1.0, True, False), "min_p": (0.0, 1.0, False, True),
              "repeat_penalty": (0.0, 100.0, True, False), "seed": (0, MAX_SEED, False, False),
              "presence_penalty": (-2.0, 2.0, False, False),
              "frequency_penalty": (-2.0, 2.0, False, False)}

    def check(self) -> SamplingParams:
        """Raise BadOption for any option that is not a finite number in its range (NaN and
        infinities included); returns self."""
        for f in fields(self):
            v = getattr(self, f.name)
            if v is None and f.name == "seed":
                continue
            if f.name == "logit_bias":
                self._check_bias(v)
                continue
            lo, hi, lo_open, hi_open = self.RANGES[f.name]
            integer = f.name in ("top_k", "seed")
            ok = isinstance(v, (int, float)) and not isinstance(v, bool)
            ok = ok and (isinstance(v, int) if integer else math.isfinite(v))
            ok = ok and (v > lo if lo_open else v >= lo)
            ok = ok and (hi is None or (v < hi if hi_open else v <= hi))
            if not ok:
                rng = (("(" if lo_open else "[") + f"{lo}, " +
                       ("inf)" if hi is None else f"{hi}" + (")" if hi_open else "]")))
                kind = "an integer" if integer else "a finite number"
                raise BadOption(f.name, f"{f.name.replace('_', '-')} must be {kind} in {rng}, "
                                        f"got {v!r}.")
        return self

    @staticmethod
    def _check_bias(bias) -> None:
        ok = bias is None or isinstance(bias, dict) and all(
            isinstance(k, int) and not isinstance(k, bool) and k >= 0 and
            isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and
            -100 <= v <= 100 for k, v in bias.items())
        if not ok:
            raise BadOption("logit_bias", "logit-bias must map token ids (integers >= 0) to "
                            f"numbers in [-100, 100], got {bias!r}.")


class Sampler:
    def __init__(self, params: SamplingParams):
        params.check()
        self.p = params
        self.gen = torch.Generator()
        if params.seed is not None:
            self.gen.manual_seed(params.seed)
        else:
            self.gen.seed()

    @property
    def greedy(self) -> bool:
        """True when the choice is the plain argmax of the logits."""
        p = self.p
        return (p.temperature == 0 and p.repeat_penalty == 1.0 and not p.logit_bias and
                p.presence_penalty == 0 and p.frequency_penalty == 0)

    def __call__(self, logits: torch.Tensor, history: list[int], draft: int | None = None,
                 generated: list[int] | None = None) -> int:
        """logits: (vocab,) float32; history: token ids seen so far (prompt + generated);
        ``generated``: the output's ids (presence and frequency penalties; None: none).

        ``draft``: a token proposed for this place (speculative decoding). It is kept with
        the probability the sampler gives it, else the token is drawn from the others
        renormalised, so the result is distributed exactly as without a draft.
        """
        return self.choose(self.adjust(logits, history, generated or []), draft)

    def adjust(self, logits: torch.Tensor, history: list[int], generated: list[int]
               ) -> torch.Tensor:
        """A copy of the (vocab,) ``logits`` with the penalties and the bias applied:
        repeat_penalty (llama.cpp's: positive logits of every id in ``history`` divided,
        negative ones multiplied), then OpenAI's ``logit -= frequency_penalty * count +
        presence_penalty * (count > 0)`` over the ids in ``generated``, then ``logit +=
        logit_bias[id]`` (a bias of -100 sets the logit to -inf: the token is banned)."""
        p = self.p
        logits = logits.clone()
        vocab = logits.shape[0]
        if p.repeat_penalty != 1.0 and history:
            ids = torch.tensor(sorted(set(history)), dtype=torch.long)
            ids = ids[ids < vocab]
            seen = logits[ids]
            logits[ids] = torch.where(seen > 0, seen / p.repeat_penalty, seen * p.repeat_penalty)
        if (p.presence_penalty or p.frequency_penalty) and generated:
            counts = torch.bincount(torch.tensor(generated, dtype=torch.long), minlength=vocab)
            counts = counts[:vocab].to(logits.dtype)
            logits -= counts * p.frequency_penalty + (counts > 0).to(logits.dtype) * \
                p.presence_penalty
        for tok, bias in (p.logit_bias or {}).items():
            if tok < vocab:
                logits[tok] = float("-inf") if bias <= -100 else logits[tok] + bias
        return logits

    def choose(self, logits: torch.Tensor, draft: int | None = None) -> int:
        """The token from adjusted (and masked) ``logits``; ``draft`` as in ``__call__``."""
        p = self.p
        if p.temperature == 0:
            return int(torch.argmax(logits))
        probs = self.distribution(logits)
        if draft is not None:
            if float(torch.rand(1, generator=self.gen, dtype=torch.float64)) * probs.sum() < \
                    probs[draft]:
                return draft
            probs[draft] = 0
            if not probs.sum() > 0:
                return draft
        return int(torch.multinomial(probs, 1, generator=self.gen))

    def distribution(self, logits: torch.Tensor) -> torch.Tensor:
        """(vocab,) float64 weights (not normalised) of each token from penalised logits,
        after temperature, top-k, min-p and top-p; temperature > 0."""
        p = self.p
        # in float64, shifted so the largest is 0, the temperature kept normal: a tiny
        # temperature gives -inf for the others (greedy), never inf or NaN
        logits = (logits.double() - logits.max()) / max(p.temperature, 1e-30)
        if p.top_k > 0 and p.top_k < logits.shape[0]:
            kth = torch.topk(logits, p.top_k).values[-1]
            logits[logits < kth] = float("-inf")
        probs = torch.softmax(logits, dim=-1)
        if p.min_p > 0:
            probs[probs < p.min_p * probs.max()] = 0
        if p.top_p < 1:
            sp, idx = torch.sort(probs, descending=True)
            cum = torch.cumsum(sp, dim=0)
            drop = cum - sp > p.top_p * cum[-1]   # keep the smallest prefix reaching top_p
            sp[drop] = 0
            probs = torch.zeros_like(probs).scatter_(0, idx, sp)
        return probs


def bias_from_json(bias) -> dict[int, float] | None:
    """A JSON ``logit_bias`` ({"token id": bias}, keys strings as JSON has them) -> {id: bias};
    BadOption naming the field if a key is not a token id (the values are checked by
    SamplingParams.check)."""
    if bias is None:
        return None
    if not isinstance(bias, dict) or not all(
            isinstance(k, str) and k.isascii() and k.isdigit() and len(k) < 12 for k in bias):
        raise BadOption("logit_bias", "logit_bias must map token ids (as strings, e.g. "
                                      "\"50256\") to numbers in [-100, 100].")
    return {int(k): v for k, v in bias.items()}


def bias_outside(bias: dict[int, float] | None, vocab_size: int) -> list[int]:
    """The token ids of ``bias`` outside a vocabulary of ``vocab_size`` (at most 5)."""
    return [t for t in bias or {} if not 0 <= t < vocab_size][:5]

