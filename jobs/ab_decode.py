"""Decode speed of several shard folders in one process, interleaved: the ratio between
storage formats (int8 / int4, ...) measured under the same background load.

    mpiexec -n 1 python jobs/ab_decode.py bench/s1b-int8 bench/s1b-int4 [--rounds 9]
    python jobs/ab_decode.py bench/s1b-int8 bench/s1b-int4 bench/s1b-int4@7

On a shared host the memory bandwidth another tenant leaves moves from second to second;
timing one folder after the other compares those moments, not the formats. Here every
folder is loaded (all must fit in memory at once), then each round decodes --gen-len tokens
from each folder in turn (the order rotates every round) and records the median ms per
token of that run. Prints each folder's median over the rounds and its speed relative to the
first folder, and with --json the per-round figures. World size 1 (the kernels' question);
--threads as for `mpitpi bench`.

Each round also reads the memory bandwidth right after its decodes (the best of --bw-passes
sums of 256 MB of fp32, as `mpitpi bench` measures it but within a tenth of a second), so
each folder's share of the roofline (its weight bytes a token over that bandwidth, against
its time) is taken in the same second as the ratio. Rounds whose bandwidth is at least
--fast GB/s are summarised apart: a shared host's memory flips between slow and fast moments,
and the two give different answers.

FOLDER@N runs that folder (loaded once, whatever its arms) with the tiles' requests for lines
ahead fixed to mode N (as MPITPI_PREFETCH=N; lookahead.py); arms without @ share the
process's tuner, which tells their models apart. N's bit 8 reads int4 decode rows as one
stream a thread instead of two (FOLDER@12: int8 tiles alone asking, one stream; csrc/decode.c's
rows_pair).
"""
import argparse
import json
import statistics
import time

import torch

from mpitpi import lookahead
from mpitpi.bench import weight_bytes
from mpitpi.comm import Comm
from mpitpi.generate import generate
from mpitpi.loader import start_model
from mpitpi.session import Session


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("shards", nargs="+",
                   help="shard folders made by `mpitpi split -n 1`, each maybe with @MODE")
    p.add_argument("--rounds", type=int, default=9)
    p.add_argument("--gen-len", type=int, default=32)
    p.add_argument("--prompt-len", type=int, default=16)
    p.add_argument("--threads", default="auto")
    p.add_argument("--json", help="write the per-round figures here")
    p.add_argument("--bw-passes", type=int, default=5,
                   help="passes of the bandwidth read after each round (0: none)")
    p.add_argument("--fast", type=float, default=60.0,
                   help="GB/s from which a round counts as a fast moment")
    a = p.parse_args()
    comm = Comm()
    if comm.size != 1:
        raise SystemExit("ab_decode.py runs at world size 1 (mpiexec -n 1 or plain python).")
    threads = a.threads if a.threads == "auto" else int(a.threads)
    arms = [s.rsplit("@", 1) if "@" in s else (s, None) for s in a.shards]
    loaded = {f: start_model(comm, None, f, threads=threads, progress=False)
              for f in {f for f, _ in arms}}
    models = [loaded[f] for f, _ in arms]
    tuned = lookahead.control()
    controls = [lookahead.Control(mode) if mode else tuned for _, mode in arms]
    vocab = min(m.args.vocab_size for m in models)
    prompt = torch.randint(3, vocab, (a.prompt_len,),
                           generator=torch.Generator().manual_seed(0)).tolist()
    for m in loaded.values():   # warm-up: first touches, allocator
        generate(comm, m.model, Session(prompt, 4), reuse=False)
    nbytes = [weight_bytes(m.model) for m in models]
    src = torch.ones(256 * 2**20 // 4)
    ms: list[list[float]] = [[] for _ in models]
    gbs: list[float] = []
    for r in range(a.rounds):
        order = [(r + i) % len(models) for i in range(len(models))]
        for i in order:
            use(controls[i])
            res = generate(comm, models[i].model, Session(prompt, a.gen_len), reuse=False)
            ms[i].append(statistics.median(res.step_ms))
        gbs.append(bandwidth_gbs(src, a.bw_passes))
    print(f"{a.rounds} rounds x {a.gen_len} tokens, {torch.get_num_threads()} threads; the "
          f"tuned arms' lookahead switched {tuned.summary()['switches']} times")
    report(a.shards, ms, nbytes, gbs, a.fast)
    if a.json:
        with open(a.json, "x") as f:   # never overwrite a result
            json.dump({"shards": a.shards, "ms_per_token": ms, "gen_len": a.gen_len,
                       "weight_bytes": nbytes, "memory_gbs": gbs,
                       "threads": torch.get_num_threads()}, f, indent=1)


def use(c: lookahead.Control) -> None:
    """Make ``c`` the process's lookahead control (the one every Runner asks) and put the
    kernels in its mode (another control may have changed them since)."""
    lookahead._control = c
    c.reapply()


def bandwidth_gbs(src: torch.Tensor, passes: int) -> float:
    """GB/s: the best of ``passes`` sums of ``src`` (nan when 0)."""
    best = float("inf")
    for _ in range(passes):
        t0 = time.perf_counter()
        src.sum()
        best = min(best, time.perf_counter() - t0)
    return src.numel() * 4 / best / 1e9 if passes else float("nan")


def report(shards: list[str], ms: list[list[float]], nbytes: list[int], gbs: list[float],
           fast: float) -> None:
    """Per folder, over all rounds and over the fast and slow ones apart: the median
    ms/token, its speed against the first folder's in the same rounds (the median of the
    per-round ratios) and its share of the roofline in each round's bandwidth."""
    groups = [("all", range(len(gbs)))]
    if gbs and gbs[0] == gbs[0]:   # bandwidth measured
        groups += [("fast", [r for r, g in enumerate(gbs) if g >= fast]),
                   ("slow", [r for r, g in enumerate(gbs) if g < fast])]
    print(f"{'rounds':6s} {'n':>4s} {'GB/s':>11s}  {'shards':40s} {'ms/token':>9s} "
          f"{'range':>13s} {'vs first':>9s} {'roofline':>9s}")
    for label, rs in groups:
        if not rs:
            continue
        g = [gbs[r] for r in rs]
        band = f"{min(g):4.0f}-{max(g):<4.0f}" if g[0] == g[0] else "-"
        for s, m, b in zip(shards, ms, nbytes):
            t = [m[r] for r in rs]
            vs = statistics.median(ms[0][r] / m[r] for r in rs)
            roof = statistics.median(b / (gbs[r] * 1e9) * 1e3 / m[r] for r in rs)
            print(f"{label:6s} {len(rs):4d} {band:>11s}  {s[-40:]:40s} {statistics.median(t):9.2f} "
                  f"{min(t):6.2f}-{max(t):<6.2f} {vs:8.3f}x {roof:8.1%}")


if __name__ == "__main__":
    main()
