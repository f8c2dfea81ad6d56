"""Run under mpiexec: each all-reduce algorithm against a float64 sum, for several sizes;
every rank must end with identical values. Prints 'ok ALGORITHM' per algorithm on rank 0."""
import numpy as np
import torch

from mpitpi.comm import Comm


def rank_data(rank: int, size: int) -> torch.Tensor:
    return torch.randn(size, generator=torch.Generator().manual_seed(rank * 1000 + size))


for alg in ("mpi", "star", "ring"):
    c = Comm(algorithm=alg)
    for size in (1, 7, 576, 4096 * 3 + 5, 4608, 2**18 + 3):   # 18 KiB, 1 MiB: past a cell
        t = rank_data(c.rank, size)
        ref = sum(rank_data(r, size).double() for r in range(c.size))
        c.allreduce_(t)
        every = c.bcast_obj(c.gather_obj(t.numpy().copy()))
        assert all(np.array_equal(every[0], x) for x in every), (alg, size, "ranks differ")
        err = (t.double() - ref).abs().max().item()
        assert err < 1e-5, (alg, size, err)
    assert c.allreduce_calls == 6 and c.allreduce_bytes > 0
    if c.rank == 0:
        print("ok", alg, flush=True)
