"""Choosing the next token from full-vocabulary logits (runs on rank 0 only).

Order: repetition penalty, then temperature; temperature 0 is greedy (argmax); then top-k,
top-p and min-p filters, then a draw from a seeded generator.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from mpitpi.errors import MpitpiError


@dataclass
class SamplingParams:
    temperature: float = 0.0
    top_k: int = 0          # 0: off
    top_p: float = 1.0      # 1: off
    min_p: float = 0.0      # 0: off
    repeat_penalty: float = 1.0  # 1: off
    seed: int | None = None

    def check(self) -> None:
        if self.temperature < 0:
            raise MpitpiError(f"--temperature must be >= 0, got {self.temperature}.")
        if self.top_k < 0:
            raise MpitpiError(f"--top-k must be >= 0 (0 turns it off), got {self.top_k}.")
        if not 0 < self.top_p <= 1:
            raise MpitpiError(f"--top-p must be in (0, 1], got {self.top_p}.")
        if not 0 <= self.min_p < 1:
            raise MpitpiError(f"--min-p must be in [0, 1), got {self.min_p}.")
        if self.repeat_penalty <= 0:
            raise MpitpiError(f"--repeat-penalty must be > 0, got {self.repeat_penalty}.")


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
        return self.p.temperature == 0 and self.p.repeat_penalty == 1.0

    def __call__(self, logits: torch.Tensor, history: list[int]) -> int:
        """logits: (vocab,) float32; history: token ids seen so far (prompt + generated)."""
        p = self.p
        logits = logits.clone()
        if p.repeat_penalty != 1.0 and history:
            ids = torch.tensor(sorted(set(history)), dtype=torch.long)
            ids = ids[ids < logits.shape[0]]
            seen = logits[ids]
            logits[ids] = torch.where(seen > 0, seen / p.repeat_penalty, seen * p.repeat_penalty)
        if p.temperature == 0:
            return int(torch.argmax(logits))
        logits = logits / p.temperature
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
        return int(torch.multinomial(probs, 1, generator=self.gen))
