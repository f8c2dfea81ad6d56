"""The only module that imports MPI: collectives, checked steps and the failure path.

``Comm`` wraps an mpi4py communicator. The hot path uses buffer-based uppercase calls on
contiguous tensors (``Allreduce(IN_PLACE, buf)``, ``Bcast``, ``Gatherv``); pickled objects
only cross at start-up. ``checked`` and ``root_checked`` turn an MpitpiError on some ranks into
the same error on every rank, so no rank waits in a collective for one that has given up.
"""
from __future__ import annotations

import os
import socket
import sys
import time

import numpy as np
import torch

from mpitpi.errors import CollectiveError, MpitpiError


class Comm:
    def __init__(self, mpi_comm=None):
        from mpi4py import MPI

        self.MPI = MPI
        self.comm = mpi_comm if mpi_comm is not None else MPI.COMM_WORLD
        self.rank = self.comm.Get_rank()
        self.size = self.comm.Get_size()
        self.host = socket.gethostname()
        self.allreduce_calls = 0
        self.allreduce_bytes = 0
        self.allreduce_s = 0.0

    # -- hot path ------------------------------------------------------------------------
    def allreduce_(self, t: torch.Tensor) -> torch.Tensor:
        """Sum ``t`` over all ranks, in place. ``t`` must be contiguous. Returns ``t``."""
        if self.size == 1:
            return t
        t0 = time.perf_counter()
        self.comm.Allreduce(self.MPI.IN_PLACE, t.numpy())
        self.allreduce_s += time.perf_counter() - t0
        self.allreduce_calls += 1
        self.allreduce_bytes += t.numel() * t.element_size()
        return t

    def bcast_(self, a: np.ndarray, root: int = 0) -> np.ndarray:
        """Broadcast a numpy buffer from ``root`` in place."""
        if self.size > 1:
            self.comm.Bcast(a, root=root)
        return a

    def gather_rows(self, local: torch.Tensor, counts: list[int]) -> torch.Tensor | None:
        """Concatenate every rank's 1-D float32 ``local`` (rank r has counts[r]) on rank 0."""
        if self.size == 1:
            return local
        out = torch.empty(sum(counts), dtype=torch.float32) if self.rank == 0 else None
        recv = [out.numpy(), counts] if self.rank == 0 else None
        self.comm.Gatherv(local.contiguous().numpy(), recv, root=0)
        return out

    # -- start-up ------------------------------------------------------------------------
    def bcast_obj(self, obj, root: int = 0):
        return self.comm.bcast(obj, root=root) if self.size > 1 else obj

    def gather_obj(self, obj, root: int = 0):
        return self.comm.gather(obj, root=root) if self.size > 1 else [obj]

    def barrier(self) -> None:
        if self.size > 1:
            self.comm.Barrier()

    def local_size(self) -> int:
        """Ranks of this job on this host."""
        if self.size == 1:
            return 1
        node = self.comm.Split_type(self.MPI.COMM_TYPE_SHARED)
        n = node.Get_size()
        node.Free()
        return n

    def checked(self, fn, *a, **kw):
        """Run ``fn`` on every rank; if it raised MpitpiError on any rank, raise on all.

        The raised error names each failing rank and host (duplicates merged).
        """
        try:
            result, err = fn(*a, **kw), None
        except MpitpiError as e:
            result, err = None, str(e)
        errors = self.comm.allgather(err) if self.size > 1 else [err]
        failed = [(r, e) for r, e in enumerate(errors) if e is not None]
        if failed:
            raise CollectiveError(_merge(failed, self.size))
        return result

    def root_checked(self, fn, *a, root: int = 0, **kw):
        """Run ``fn`` on ``root`` only and broadcast its result (or its MpitpiError) to all."""
        result, err = None, None
        if self.rank == root:
            try:
                result = fn(*a, **kw)
            except MpitpiError as e:
                err = str(e)
        result, err = self.bcast_obj((result, err), root=root)
        if err is not None:
            raise CollectiveError(err)
        return result

    def abort(self, code: int = 1) -> None:
        """End every rank of the job now (used when one rank fails outside a checked step)."""
        sys.stdout.flush()
        sys.stderr.flush()
        if self.size > 1:
            self.comm.Abort(code)
        os._exit(code)


def _merge(failed: list[tuple[int, str]], size: int) -> str:
    by_msg: dict[str, list[int]] = {}
    for r, e in failed:
        by_msg.setdefault(e, []).append(r)
    if size == 1:
        return failed[0][1]
    parts = []
    for msg, ranks in by_msg.items():
        who = "all ranks" if len(ranks) == size else "rank " + ",".join(map(str, ranks))
        parts.append(f"[{who}] {msg}")
    return "\n".join(parts)
