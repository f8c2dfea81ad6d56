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


def run_commbench(mpi_comm=None, sizes=SIZES, reps: int = 20,
                  algorithms=ALGORITHMS) -> dict | None:
    results = {}
    for alg in algorithms:
        comm = Comm(mpi_comm, algorithm=alg)
        for nbytes in sizes:
            t = torch.ones(nbytes // 4)
            n = max(3, reps if nbytes <= 64 * 2**10 else reps // 4)
            times = []
            for i in range(n + 2):
                comm.barrier()
                t0 = time.perf_counter()
                comm.allreduce_(t)
                if i >= 2:
                    times.append(time.perf_counter() - t0)
            worst = comm.comm.allreduce(statistics.median(times), op=comm.MPI.MAX)
            results.setdefault(alg, {})[nbytes] = round(worst * 1e3, 4)
    return results if comm.rank == 0 else None
