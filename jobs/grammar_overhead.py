"""Per-token cost of a JSON-schema token mask on SmolLM2's tokenizer (vocabulary 49152), on
rank 0's path: compute the allowed set, turn it into a (vocab,) mask, apply it to logits.

    python jobs/grammar_overhead.py [llguidance] [outlines] [xgrammar] [--reps 3]

llguidance is measured through mpitpi.grammar (what the server runs); outlines-core and
xgrammar, where importable, through their own mask calls. Each run walks the tokens of one
fixed JSON answer, then the end-of-text token; prints build time and per-token median/mean.
"""
import argparse
import json
import time

import numpy as np
import torch

from mpitpi.checkpoint import resolve_model
from mpitpi.tokenizer import _BYTE_OF, load_tokenizer

SCHEMA = {"type": "object", "additionalProperties": False, "required": ["name", "age", "tags"],
          "properties": {"name": {"type": "string"}, "age": {"type": "integer"},
                         "tags": {"type": "array", "items": {"type": "string"}}}}
ANSWER = json.dumps({"name": "Ada Lovelace, the first programmer", "age": 36,
                     "tags": ["math", "engines", "poetry", "notes on the analytical engine"]})
EOS = 2


def bits_to_bool(words: torch.Tensor, vocab: int) -> torch.Tensor:
    return ((words.unsqueeze(1) >> torch.arange(32, dtype=torch.int32)) & 1).flatten()[:vocab] \
        .bool()


def walk(name, build_s, ids, step):
    """Time ``step(token)`` (mask, then advance past token) over ``ids``."""
    times = []
    for t in ids:
        t0 = time.perf_counter()
        allowed = step(t)
        times.append(time.perf_counter() - t0)
        assert allowed, f"{name}: token {t} not allowed"
    ms = np.array(times) * 1e3
    print(f"{name:12s} build {build_s * 1e3:7.1f} ms  per token: median {np.median(ms):.3f} ms,"
          f" mean {ms.mean():.3f} ms, max {ms.max():.1f} ms ({len(ms)} tokens)", flush=True)


def llguidance_run(tok, vocab, ids):
    from mpitpi.grammar import Grammars
    g = Grammars(tok, vocab, [EOS])
    t0 = time.perf_counter()
    g.lltok()
    print(f"llguidance   tokenizer index {(time.perf_counter() - t0) * 1e3:.0f} ms (once)")
    t0 = time.perf_counter()
    c = g.json_schema(SCHEMA)
    build = time.perf_counter() - t0
    logits = torch.randn(vocab)

    def step(t):
        ok = bool(c.mask(logits)[t] > float("-inf"))
        return ok and (t == EOS or c.accept(t))
    walk("llguidance", build, ids, step)


def outlines_run(tok, vocab, ids):
    from outlines_core import Guide, Index, Vocabulary
    from outlines_core.json_schema import build_regex_from_schema
    words: dict = {}
    for i in range(vocab):
        piece = tok.tok.id_to_token(i)
        if i != EOS and piece is not None:
            words.setdefault(bytes(_BYTE_OF[c] for c in piece), []).append(i)
    t0 = time.perf_counter()
    guide = Guide(Index(build_regex_from_schema(json.dumps(SCHEMA)), Vocabulary(EOS, words)))
    build = time.perf_counter() - t0
    mask = torch.zeros((vocab + 31) // 32, dtype=torch.int32)
    logits = torch.randn(vocab)

    def step(t):
        guide.write_mask_into(mask.data_ptr(), mask.numel(), 4)
        ok = bool(logits.masked_fill(~bits_to_bool(mask, vocab), float("-inf"))[t] > -1e30)
        if ok and t != EOS:
            guide.advance(t)
        return ok
    walk("outlines", build, ids, step)


def xgrammar_run(tok, vocab, ids):
    import xgrammar as xgr
    info = xgr.TokenizerInfo([tok.tok.id_to_token(i) for i in range(vocab)],
                             xgr.VocabType.BYTE_LEVEL, vocab_size=vocab, stop_token_ids=[EOS])
    t0 = time.perf_counter()
    m = xgr.GrammarMatcher(xgr.GrammarCompiler(info).compile_json_schema(json.dumps(SCHEMA)))
    build = time.perf_counter() - t0
    mask = xgr.allocate_token_bitmask(1, vocab)
    logits = torch.randn(1, vocab)

    def step(t):
        m.fill_next_token_bitmask(mask)
        scores = logits.clone()
        xgr.apply_token_bitmask_inplace(scores, mask)
        return bool(scores[0, t] > -1e30) and (t == EOS or m.accept_token(t))
    walk("xgrammar", build, ids, step)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("libs", nargs="*", default=["llguidance", "outlines", "xgrammar"])
    ap.add_argument("--reps", type=int, default=3)
    a = ap.parse_args()
    tok = load_tokenizer(resolve_model("smollm2-135m"))
    vocab = tok.tok.get_vocab_size()
    ids = tok.encode(ANSWER, special=False) + [EOS]
    runs = {"llguidance": llguidance_run, "outlines": outlines_run, "xgrammar": xgrammar_run}
    for _ in range(a.reps):
        for lib in a.libs:
            try:
                runs[lib](tok, vocab, ids)
            except ImportError as e:
                print(f"{lib}: not installed ({e})")


if __name__ == "__main__":
    main()
