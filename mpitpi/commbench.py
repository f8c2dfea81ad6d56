"""`mpitpi commbench`: all-reduce latency per algorithm and message size (collective).

For each algorithm and size, every rank runs ``reps`` all-reduces of a float32 buffer after a
warm-up; rank 0 reports the median time per call. Decode moves hidden-size vectors (2-16 KB),
prefill moves prompt-length x hidden-size blocks (1-4 MB).
"""
from __future__ import annotations

import statistics
import time

import torch

from mpitpi.comm import ALGORITHMS, Comm

SIZES = (2 * 2**10, 4 * 2**10, 8 * 2**10, 16 * 2**10, 2**20, 2 * 2**20, 4 * 2**20)
WARMUP = 2   # untimed calls before the timed ones


def run_commbench(comm: Comm, sizes=SIZES, reps: int = 20,
                  algorithms=ALGORITHMS) -> dict | None:
    """Collective: every rank of ``comm`` calls it with the same arguments. Returns, on rank 0,
    {algorithm: {bytes: ms per call}} where each figure is the slowest rank's median; None on
    the other ranks. Each algorithm runs on ``comm.with_algorithm(name)`` (same ranks, same
    ``polite``); messages above 64 KiB get a quarter of ``reps`` (at least 3)."""
    results = {}
    for alg in algorithms:
        c = comm.with_algorithm(alg)
        for nbytes in sizes:
            n = max(3, reps if nbytes <= 64 * 2**10 else reps // 4)
            worst = c.max_all(_median_s(c, torch.ones(nbytes // 4), n))
            results.setdefault(alg, {})[nbytes] = round(worst * 1e3, 4)
    return results if comm.rank == 0 else None


def _median_s(comm: Comm, t: torch.Tensor, n: int) -> float:
    """Collective: the median seconds of ``n`` timed ``comm.allreduce_(t)`` calls on this rank,
    each started after a barrier, following WARMUP untimed ones."""
    times = []
    for i in range(n + WARMUP):
        t.fill_(1.0 / comm.size)   # the sum stays 1: repeated sums never overflow
        comm.barrier()
        t0 = time.perf_counter()
        comm.allreduce_(t)
        if i >= WARMUP:
            times.append(time.perf_counter() - t0)
    return statistics.median(times)
