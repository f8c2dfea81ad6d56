"""`mpitpi perplexity`: how well the model predicts a text, with the vocabulary split.

The convention (jobs/llamacpp_baseline.py's cross-check keeps the same one):

- rank 0 tokenizes the whole text once, without special tokens (``cut_windows``);
- the ids are cut into non-overlapping windows of ``ctx`` tokens: a BOS token when the
  model's tokenizer adds one to a text (as llama.cpp's tool decides: add_bos_token; the
  Llamas do, SmolLM2 does not), then ctx - 1 text tokens (ctx text tokens without a BOS);
  the last partial window is dropped unless it is the only one;
- every token of a window after its first is scored, given the tokens before it in its
  window: ctx - 1 scored tokens per full window. (llama.cpp's perplexity tool scores only
  the second half of each window; here the short-context tokens count too, so the figures
  are higher than its published ones for the same ctx.)
- perplexity = exp(mean negative log-likelihood of the scored tokens).

Each rank holds only its vocabulary rows, so the log-softmax is taken across ranks without
gathering the logits (``token_nll``): per position the local max, a MAX all-reduce, then
one sum all-reduce of [sum of exp(logit - max), the target's logit] (the target's logit is
non-zero on the rank holding it alone).
"""
from __future__ import annotations

import glob
import math
import os
import time
from dataclasses import dataclass

import numpy as np
import torch
from tqdm import tqdm

from mpitpi.comm import Comm
from mpitpi.errors import MpitpiError
from mpitpi.batch import PREFILL_CHUNK
from mpitpi.model import Transformer
from mpitpi.tokenizer import Tokenizer

PACKAGE = os.path.dirname(os.path.abspath(__file__))
SHIPPED = os.path.join(PACKAGE, "data", "eval.txt")   # README + docs/CODE.md, for installs


@dataclass
class Score:
    """One run's result, the same on every rank."""
    perplexity: float
    tokens: int       # scored tokens (each window's length minus one, summed)
    windows: int
    seconds: float    # rank 0's wall time of the forward passes and log-softmaxes


def default_text() -> tuple[str, str]:
    """(text, where it came from): README.md and docs/*.md of the repository this package
    sits in (an editable install), else the text shipped in the package (mpitpi/data)."""
    repo = os.path.dirname(PACKAGE)
    readme = os.path.join(repo, "README.md")
    if os.path.isfile(readme) and os.path.isfile(os.path.join(repo, "setup.cfg")):
        paths = [readme, *sorted(glob.glob(os.path.join(repo, "docs", "*.md")))]
        parts = []
        for p in paths:
            with open(p, encoding="utf-8") as f:
                parts.append(f.read())
        return "\n\n".join(parts), "README.md + docs/*.md"
    with open(SHIPPED, encoding="utf-8") as f:
        return f.read(), "mpitpi/data/eval.txt"


def added_bos(tok: Tokenizer) -> int | None:
    """The BOS id the tokenizer puts before a text, or None when it puts none."""
    plain, special = tok.encode("a", special=False), tok.encode("a", special=True)
    if len(special) == len(plain) + 1 and special[1:] == plain:
        return special[0]
    return None


def check_ctx(ctx: int) -> None:
    if ctx < 2:
        raise MpitpiError(f"--ctx must be at least 2 (one token to score after one of "
                          f"context), got {ctx}. Fix: e.g. --ctx 256.")


def cut_windows(ids: list[int], ctx: int, bos: int | None, max_seq_len: int,
                vocab_size: int, max_windows: int | None = None) -> np.ndarray:
    """Text ids (no special tokens) -> (W, T) int64 windows, BOS first when ``bos`` is not
    None; T = ctx, or fewer for a text shorter than one window (then W = 1). At most
    ``max_windows`` windows, the first ones. Pure."""
    check_ctx(ctx)
    if ctx > max_seq_len:
        raise MpitpiError(f"--ctx {ctx} is beyond the model's context of {max_seq_len} tokens. "
                          f"Fix: pass --ctx {max_seq_len} or less.")
    bad = [i for i in ids if not 0 <= i < vocab_size]
    if bad:
        raise MpitpiError(f"the tokenizer gave ids {bad[:5]} outside the model's vocabulary "
                          f"[0, {vocab_size}). Fix: use the model's own tokenizer.")
    head = [] if bos is None else [bos]
    per = ctx - len(head)                                  # text tokens per window
    n = max(1, len(ids) // per)
    if max_windows is not None:
        n = min(n, max_windows)
    rows = [head + ids[w * per:(w + 1) * per] for w in range(n)]
    if len(rows[0]) < 2:
        raise MpitpiError(f"the text gives {len(ids)} token(s): nothing to score. Fix: give a "
                          f"longer text (at least {2 - len(head)} tokens).")
    return np.array(rows, dtype=np.int64)


def token_nll(comm: Comm, logits: torch.Tensor, targets: torch.Tensor,
              offset: int) -> torch.Tensor:
    """Collective: logits (C, n_vocab_r) of this rank's rows [offset, offset + n_vocab_r),
    targets (C,) global ids (the same on every rank) -> (C,) fp32 -log p(target), the same on
    every rank. Two all-reduces: MAX of (C,), then sum of (2, C); no logits move."""
    C, v = logits.shape
    top = logits.amax(-1) if v else torch.full((C,), -math.inf)      # (C,)
    comm.allmax_(top)
    sums = torch.zeros(2, C)                                          # [sum exp, target logit]
    sums[0] = torch.exp(logits - top[:, None]).sum(-1)
    mine = (targets >= offset) & (targets < offset + v)
    rows = torch.nonzero(mine).flatten()
    sums[1, rows] = logits[rows, targets[rows] - offset]
    comm.allreduce_(sums)
    return torch.log(sums[0]) + top - sums[1]


def window_nll(comm: Comm, model: Transformer, window: torch.Tensor) -> float:
    """Collective: the summed -log p of window[1:], each given the window before it. The
    window runs from position 0 (the KV cache is overwritten, nothing of the previous
    window is seen) in chunks of PREFILL_CHUNK tokens; its last token is only a target."""
    inputs, targets = window[:-1], window[1:]
    total = 0.0
    for s in range(0, len(inputs), PREFILL_CHUNK):
        logits = model.forward_all(inputs[s:s + PREFILL_CHUNK], s)   # (C, n_vocab_r)
        nll = token_nll(comm, logits, targets[s:s + PREFILL_CHUNK], model.vocab_offset)
        total += float(nll.double().sum())
    return total


def score(comm: Comm, model: Transformer, windows: np.ndarray | None,
          progress: bool = False) -> Score:
    """Collective: rank 0 passes the (W, T) windows (``cut_windows``), the others None; they
    are broadcast (Bcast of W x T int64), then every rank runs every window together. A
    tqdm bar on rank 0 when ``progress``."""
    shape = comm.bcast_obj(None if windows is None else windows.shape)
    ids = (np.ascontiguousarray(windows, np.int64) if windows is not None
           else np.zeros(shape, np.int64))
    comm.bcast_(ids)
    model.reserve(shape[1])
    tokens = torch.from_numpy(ids)
    t0 = time.perf_counter()
    total = 0.0
    for w in tqdm(range(shape[0]), desc="perplexity", unit="window",
                  disable=not (progress and comm.rank == 0)):
        total += window_nll(comm, model, tokens[w])
    seconds = time.perf_counter() - t0
    n = shape[0] * (shape[1] - 1)
    return Score(math.exp(total / n), n, shape[0], seconds)
