"""Time one forward pass of B decode rows (B sequences, one new token each, at position P),
split into its parts, on every rank: what bounds the server's batches.

    mpiexec -n 2 python jobs/batch_pass.py [--dtype int4] [--rows 1 8] [--pos 60] [--passes 40]
                                           [--kv-dtype fp16|fp32]

Each rank prints, per row count, the median over --passes passes of: the whole pass, the
attention halves (norm, q/k/v product, rope, attention, o product: `DecodeStep.attn`), the
MLP halves, the all-reduces (waiting for the slower rank included) and the vocabulary product
with its norm (`lm_head`); the rest is embedding, row tables and Python. The caches are
filled with a random prompt of --pos tokens first; every pass writes position --pos again.
"""
import argparse
import statistics
import time

import torch

from mpitpi import fused_step
from mpitpi.llm import LLM
from mpitpi.model import KV_DTYPES, Segment

PARTS = ("attn", "mlp", "reduce", "head")


def timed(spent: dict, name: str, f):
    def g(*a, **k):
        t0 = time.perf_counter()
        out = f(*a, **k)
        spent[name] = spent.get(name, 0.0) + time.perf_counter() - t0
        return out
    return g


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--dtype", default="int4")
    p.add_argument("--rows", type=int, nargs="+", default=[1, 8])
    p.add_argument("--pos", type=int, default=60)
    p.add_argument("--passes", type=int, default=40)
    p.add_argument("--kv-dtype", choices=list(KV_DTYPES), help="default: as mpitpi's")
    a = p.parse_args()
    llm = LLM(a.model, dtype=a.dtype, progress=False, max_batch=max(a.rows),
              kv_dtype=a.kv_dtype)
    model, comm = llm.loaded.model, llm.comm
    spent: dict[str, float] = {}
    fused_step.DecodeStep.attn = timed(spent, "attn", fused_step.DecodeStep.attn)
    fused_step.DecodeStep.mlp = timed(spent, "mlp", fused_step.DecodeStep.mlp)
    model.reduce = timed(spent, "reduce", model.reduce)
    model.top.lm_head = timed(spent, "head", model.top.lm_head)
    g = torch.Generator().manual_seed(0)
    vocab = llm.loaded.args.vocab_size
    for slot in range(max(a.rows)):
        model.forward_batch([Segment(slot, 0, torch.randint(0, vocab, (a.pos,), generator=g))])
    lines = []
    for B in a.rows:
        runs = []
        for _ in range(a.passes):
            segs = [Segment(s, a.pos, torch.randint(0, vocab, (1,), generator=g), prompt=False)
                    for s in range(B)]
            spent.clear()
            comm.barrier()
            t0 = time.perf_counter()
            model.forward_batch(segs)
            runs.append((time.perf_counter() - t0, dict(spent)))
        ms = statistics.median(r[0] for r in runs) * 1e3
        parts = "  ".join(f"{k} {statistics.median(r[1].get(k, 0.0) for r in runs) * 1e3:.2f}"
                          for k in PARTS)
        lines.append(f"rank {comm.rank}, {B} rows at position {a.pos}: pass {ms:.2f} ms  "
                     f"{parts}")
    for r in range(comm.size):   # one rank at a time
        comm.barrier()
        if r == comm.rank:
            print("\n".join(lines), flush=True)


if __name__ == "__main__":
    main()
