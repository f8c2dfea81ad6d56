"""Decode speed of several shard folders in one process, interleaved: the ratio between
storage formats (int8 / int4, ...) measured under the same background load.

    mpiexec -n 1 python jobs/ab_decode.py bench/s1b-int8 bench/s1b-int4 [--rounds 9]

On a shared host the memory bandwidth another tenant leaves moves from second to second;
timing one folder after the other compares those moments, not the formats. Here every
folder is loaded (all must fit in memory at once), then each round decodes --gen-len tokens
from each folder in turn (the order rotates every round) and records the median ms per
token of that run. Prints each folder's median over the rounds and its speed relative to the
first folder, and with --json the per-round figures. World size 1 (the kernels' question);
--threads as for `mpitpi bench`.
"""
import argparse
import json
import statistics

import torch

from mpitpi.comm import Comm
from mpitpi.generate import generate
from mpitpi.loader import start_model
from mpitpi.session import Session


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("shards", nargs="+", help="shard folders made by `mpitpi split -n 1`")
    p.add_argument("--rounds", type=int, default=9)
    p.add_argument("--gen-len", type=int, default=32)
    p.add_argument("--prompt-len", type=int, default=16)
    p.add_argument("--threads", default="auto")
    p.add_argument("--json", help="write the per-round figures here")
    a = p.parse_args()
    comm = Comm()
    if comm.size != 1:
        raise SystemExit("ab_decode.py runs at world size 1 (mpiexec -n 1 or plain python).")
    threads = a.threads if a.threads == "auto" else int(a.threads)
    models = [start_model(comm, None, s, threads=threads, progress=False) for s in a.shards]
    vocab = min(m.args.vocab_size for m in models)
    prompt = torch.randint(3, vocab, (a.prompt_len,),
                           generator=torch.Generator().manual_seed(0)).tolist()
    for m in models:   # warm-up: first touches, allocator
        generate(comm, m.model, Session(prompt, 4), reuse=False)
    ms: list[list[float]] = [[] for _ in models]
    for r in range(a.rounds):
        order = [(r + i) % len(models) for i in range(len(models))]
        for i in order:
            res = generate(comm, models[i].model, Session(prompt, a.gen_len), reuse=False)
            ms[i].append(statistics.median(res.step_ms))
    base = statistics.median(ms[0])
    print(f"{a.rounds} rounds x {a.gen_len} tokens, {torch.get_num_threads()} threads")
    print(f"{'shards':40s} {'median ms/token':>16s} {'range':>15s} {'speed vs first':>15s}")
    for s, m in zip(a.shards, ms):
        med = statistics.median(m)
        print(f"{s:40s} {med:16.2f} {min(m):7.2f}-{max(m):<7.2f} {base / med:15.2f}x")
    if a.json:
        with open(a.json, "x") as f:   # never overwrite a result
            json.dump({"shards": a.shards, "ms_per_token": ms, "gen_len": a.gen_len,
                       "threads": torch.get_num_threads()}, f, indent=1)


if __name__ == "__main__":
    main()
