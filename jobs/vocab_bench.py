"""Time one vocabulary product (logits for one row of x) in each integer storage, the
storages' calls alternating so that all see the same moments of a shared host's memory.

    python jobs/vocab_bench.py [--vocab 128256] [--dim 2048] [--rows 1] [--reps 12]

The matrices are random and tiled as the loader tiles them; each is larger than the caches,
so a call streams it from memory. --rows: decode rows at once (a server's batch). Prints
each storage's median ms, its bytes and GB/s.
"""
import argparse
import statistics
import time

import torch

from mpitpi.weights import quantized


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--vocab", type=int, default=128256)
    p.add_argument("--dim", type=int, default=2048)
    p.add_argument("--rows", type=int, default=1)
    p.add_argument("--reps", type=int, default=12)
    p.add_argument("--dtypes", nargs="+", default=["int8", "int6", "int4"])
    a = p.parse_args()
    torch.manual_seed(0)
    w = torch.randn(a.vocab, a.dim) * 0.02
    mats = {k: quantized(w, k) for k in a.dtypes}
    del w
    for m in mats.values():
        m.tile_rows()
    x = torch.randn(a.rows, a.dim)
    times = {k: [] for k in mats}
    for _ in range(a.reps):
        for k, m in mats.items():
            t = time.perf_counter()
            m(x, decode=True, logits=True)
            times[k].append(time.perf_counter() - t)
    for k, m in mats.items():
        ms = statistics.median(times[k]) * 1e3
        print(f"{k}: {ms:.2f} ms, {m.nbytes / 1e6:.0f} MB, {m.nbytes / ms / 1e6:.1f} GB/s")


if __name__ == "__main__":
    main()
