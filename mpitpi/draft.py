"""Drafts for speculative decoding, made on rank 0: prompt lookup, or a small model.

A sequence's last few tokens often occurred before (code, quotes, a paragraph being
rewritten): the tokens that followed that earlier occurrence are a good guess for what comes
next (``lookup``, no model). A small model of the same vocabulary that rank 0 runs alone
guesses anywhere (``ModelDrafter``). The guesses are checked in one forward pass of K+1 rows
of the big model (batch.py); the sampler keeps the output distribution (sampling.Sampler's
``draft``), so a bad guess costs only rows, never a different text.
"""
from __future__ import annotations

import numpy as np
import torch

from mpitpi.model import Segment, Transformer

NGRAM_MAX = 3   # the longest suffix looked up
NGRAM_MIN = 1   # the shortest


def lookup(history: list[int], k: int, ngram_max: int = NGRAM_MAX,
           ngram_min: int = NGRAM_MIN) -> list[int]:
    """Up to ``k`` tokens that followed the latest earlier occurrence of the longest suffix
    of ``history`` (from ``ngram_max`` tokens down to ``ngram_min``); [] when none recurs."""
    if k < 1 or len(history) < ngram_min + 1:
        return []
    seq = np.asarray(history, dtype=np.int64)
    for n in range(min(ngram_max, len(seq) - 1), ngram_min - 1, -1):
        windows = np.lib.stride_tricks.sliding_window_view(seq[:-1], n)  # (L - n, n)
        hits = np.flatnonzero((windows == seq[-n:]).all(axis=1))
        if hits.size:
            at = int(hits[-1]) + n               # the token after the latest occurrence
            return seq[at:at + k].tolist()
    return []


class ModelDrafter:
    """Greedy guesses from a small model on rank 0 alone (a world of one rank: its
    ``reduce`` is the identity). It keeps a KV slot per batch slot; each call feeds what its
    cache lacks of the sequence (after a rejected guess: from the first differing token),
    then runs K one-token passes."""

    def __init__(self, model: Transformer):
        self.model = model

    def __call__(self, slot: int, history: list[int], k: int) -> list[int]:
        """Up to ``k`` tokens the small model expects after ``history`` (token ids)."""
        if k < 1:
            return []
        n = self.model.reusable(slot, history)
        new = torch.tensor(history[n:], dtype=torch.int64)
        logits = self.model.forward_batch([Segment(slot, n, new, 1, new.shape[0] > 1)])
        out, pos = [], len(history)
        while True:
            out.append(int(torch.argmax(logits[-1])))
            if len(out) == k:
                return out
            logits = self.model.forward_batch(
                [Segment(slot, pos, torch.tensor(out[-1:]), 1, False)])
            pos += 1

    def drop(self, slot: int) -> None:
        self.model.drop(slot)
