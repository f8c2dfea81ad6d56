"""Drafts for speculative decoding, made on rank 0 with no model: prompt lookup.

A sequence's last few tokens often occurred before (code, quotes, a paragraph being
rewritten): the tokens that followed that earlier occurrence are a good guess for what comes
next. The guesses are checked in one forward pass of K+1 rows (batch.py); the sampler keeps
the output distribution (sampling.Sampler's ``draft``), so a bad guess costs only rows.
"""
from __future__ import annotations

import numpy as np

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
