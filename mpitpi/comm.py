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
from mpi4py import MPI

from mpitpi.errors import CollectiveError, MpitpiError


ALGORITHMS = ("mpi", "star", "ring")
BYTES_TAG = 31   # the tag of send_bytes/recv_bytes messages


class Comm:
    """One rank's view of the job. ``algorithm`` picks how ``allreduce_`` sums:

    - ``mpi``: MPI's own Allreduce (the library picks its algorithm by size and ranks);
    - ``star``: every rank sends to rank 0, rank 0 sums in rank order and sends the sum back
      (2 message latencies; rank 0 moves 2(N-1) messages);
    - ``ring``: reduce-scatter then all-gather around a ring (2(N-1) latencies; each rank
      moves 2(N-1)/N of the buffer: bandwidth-optimal);
    - ``auto``: at start, time a decode-sized all-reduce with ``mpi`` and ``star`` and use
      the faster for messages up to 64 KiB, ``mpi`` above (measured: the star wins small
      messages on high-latency links, loses large ones everywhere; docs/BENCHMARKS.md).

    ``polite``: wait for messages by polling and yielding the core (for more ranks than
    cores). Each all-reduce is counted: ``allreduce_calls``, ``allreduce_bytes`` (bytes this
    rank sent), ``allreduce_s`` (wall time inside, including waiting for slower ranks).
    """

    def __init__(self, mpi_comm=None, algorithm: str = "mpi", polite: bool = False):
        if algorithm not in ALGORITHMS + ("auto",):
            raise MpitpiError(f"--allreduce {algorithm!r} is not one of {', '.join(ALGORITHMS)}.")
        self.comm = mpi_comm if mpi_comm is not None else MPI.COMM_WORLD
        self.rank = self.comm.Get_rank()
        self.size = self.comm.Get_size()
        self.host = socket.gethostname()
        self.algorithm = algorithm
        self._reduce = {"mpi": self._mpi, "star": self._star, "ring": self._ring,
                        "auto": self._auto}[algorithm]
        self._scratch = np.empty(0, np.float32)
        self.polite = polite  # set when ranks outnumber cores (see cli._start)
        self.small = None     # auto: the algorithm chosen for small messages
        if algorithm == "auto" and self.size > 1:
            self.small = self._calibrate()
        self.allreduce_calls = 0
        self.allreduce_bytes = 0
        self.allreduce_s = 0.0

    def with_algorithm(self, algorithm: str) -> Comm:
        """Collective when ``algorithm`` is ``auto`` (it calibrates), local otherwise: a new
        Comm over the same communicator and ranks that all-reduces with ``algorithm``. It
        copies ``polite``; its counters start at zero."""
        return Comm(self.comm, algorithm=algorithm, polite=self.polite)

    # -- hot path ------------------------------------------------------------------------
    def allreduce_(self, t: torch.Tensor) -> torch.Tensor:
        """Sum the float32 tensor ``t`` over all ranks, in place; every rank ends with the
        same values. ``t`` must be contiguous. Returns ``t``."""
        if self.size == 1:
            return t
        t0 = time.perf_counter()
        self.allreduce_bytes += self._reduce(t.numpy().reshape(-1))
        self.allreduce_s += time.perf_counter() - t0
        self.allreduce_calls += 1
        return t

    def _scratch_for(self, n: int) -> np.ndarray:
        if self._scratch.size < n:
            self._scratch = np.empty(n, np.float32)
        return self._scratch[:n]

    def _wait(self, reqs: list) -> None:
        """Wait for requests. ``polite``: poll and yield the core between polls, so ranks
        that share a core (more ranks than cores) are not starved by a spinning waiter."""
        if not self.polite:
            MPI.Request.Waitall(reqs)
            return
        while not MPI.Request.Testall(reqs):
            os.sched_yield()

    def _calibrate(self, nbytes: int = 4096, reps: int = 5) -> str:
        """Collective: the faster of mpi and star for an ``nbytes`` all-reduce here."""
        best, best_t = "mpi", float("inf")
        buf = np.ones(nbytes // 4, np.float32)
        for name, f in (("mpi", self._mpi), ("star", self._star)):
            f(buf)                                   # warm-up: connections, buffers
            self.comm.Barrier()
            t0 = time.perf_counter()
            for _ in range(reps):
                f(buf)
            t = self.max_all(time.perf_counter() - t0)
            if t < best_t:
                best, best_t = name, t
        return best

    def _auto(self, a: np.ndarray) -> int:
        if a.nbytes <= 64 * 2**10 and self.small == "star":
            return self._star(a)
        return self._mpi(a)

    def _mpi(self, a: np.ndarray) -> int:
        if self.polite:
            self._wait([self.comm.Iallreduce(MPI.IN_PLACE, a)])
        else:
            self.comm.Allreduce(MPI.IN_PLACE, a)
        return 2 * (self.size - 1) * a.nbytes // self.size   # what a ring would send

    def _star(self, a: np.ndarray) -> int:
        if self.rank != 0:
            self._wait([self.comm.Isend(a, dest=0, tag=11)])
            self._wait([self.comm.Irecv(a, source=0, tag=12)])
            return a.nbytes
        tmp = self._scratch_for(a.size)
        for r in range(1, self.size):      # fixed order: the same sum on every run
            self._wait([self.comm.Irecv(tmp, source=r, tag=11)])
            a += tmp
        self._wait([self.comm.Isend(a, dest=r, tag=12) for r in range(1, self.size)])
        return (self.size - 1) * a.nbytes

    def _ring(self, a: np.ndarray) -> int:
        n, r = self.size, self.rank
        right, left = (r + 1) % n, (r - 1) % n
        bounds = np.linspace(0, a.size, n + 1).astype(np.int64)
        chunk = [a[bounds[i]:bounds[i + 1]] for i in range(n)]
        tmp = self._scratch_for(int(max(c.size for c in chunk)))
        sent = 0
        for step in range(n - 1):           # reduce-scatter: rank r ends owning chunk r+1
            s, q = chunk[(r - step) % n], chunk[(r - step - 1) % n]
            self._wait([self.comm.Isend(s, dest=right, tag=21),
                        self.comm.Irecv(tmp[:q.size], source=left, tag=21)])
            q += tmp[:q.size]
            sent += s.nbytes
        for step in range(n - 1):           # all-gather the owned chunks around the ring
            s, q = chunk[(r + 1 - step) % n], chunk[(r - step) % n]
            self._wait([self.comm.Isend(s, dest=right, tag=22),
                        self.comm.Irecv(q, source=left, tag=22)])
            sent += s.nbytes
        return sent

    def bcast_(self, a: np.ndarray, root: int = 0) -> np.ndarray:
        """Broadcast a numpy buffer from ``root`` in place."""
        if self.size > 1:
            self._wait([self.comm.Ibcast(a, root=root)])
        return a

    def gather_rows(self, local: torch.Tensor, counts: list[int]) -> torch.Tensor | None:
        """Concatenate every rank's 1-D float32 ``local`` (rank r has counts[r]) on rank 0."""
        if self.size == 1:
            return local
        out = torch.empty(sum(counts), dtype=torch.float32) if self.rank == 0 else None
        recv = [out.numpy(), counts] if self.rank == 0 else None
        self._wait([self.comm.Igatherv(local.contiguous().numpy(), recv, root=0)])
        return out

    def argmax_rows(self, local: torch.Tensor, offset: int) -> int | None:
        """Greedy choice without moving the logits: each rank sends its best (value, global
        index), 16 bytes, and rank 0 takes the largest (the lowest index on ties, as a full
        argmax would). Returns the token on rank 0, None elsewhere."""
        i = int(torch.argmax(local))
        mine = np.array([float(local[i]), offset + i], dtype=np.float64)
        if self.size == 1:
            return int(mine[1])
        every = np.empty((self.size, 2), np.float64) if self.rank == 0 else None
        self._wait([self.comm.Igather(mine, every, root=0)])
        if self.rank != 0:
            return None
        best = int(np.argmax(every[:, 0]))
        return int(every[best, 1])

    # -- timings and raw bytes (commbench, calibration, shard transfer) ------------------
    def max_all(self, value: float) -> float:
        """Collective (every rank calls it): the largest ``value`` over all ranks, returned
        on every rank (a pickled allreduce with MAX)."""
        if self.size == 1:
            return value
        return self.comm.allreduce(value, op=MPI.MAX)

    def send_bytes(self, buf: np.ndarray, dest: int) -> None:
        """Send the contiguous uint8 array ``buf`` to rank ``dest``, which must call
        ``recv_bytes`` with a buffer of the same length and ``source`` = this rank. Returns
        when ``buf`` may be reused (waiting politely if ``polite``)."""
        self._wait([self.comm.Isend(_as_bytes(buf), dest=dest, tag=BYTES_TAG)])

    def recv_bytes(self, buf: np.ndarray, source: int) -> None:
        """Receive into the contiguous uint8 array ``buf`` what rank ``source`` sent with
        ``send_bytes`` (the same length); returns when ``buf`` holds it."""
        self._wait([self.comm.Irecv(_as_bytes(buf), source=source, tag=BYTES_TAG)])

    # -- start-up ------------------------------------------------------------------------
    def bcast_obj(self, obj, root: int = 0):
        return self.comm.bcast(obj, root=root) if self.size > 1 else obj

    def gather_obj(self, obj, root: int = 0):
        return self.comm.gather(obj, root=root) if self.size > 1 else [obj]

    def send_command(self, obj) -> None:
        """Rank 0: wake the followers waiting in ``wait_command`` and hand them ``obj``."""
        if self.size > 1:
            self.comm.Ibcast(np.ones(1, np.int64), root=0).Wait()
            self.comm.bcast(obj, root=0)

    def wait_command(self, poll_s: float = 0.005):
        """Ranks other than 0: wait for rank 0's next command object without spinning a core
        (a non-blocking broadcast polled with sleeps), then return it."""
        flag = np.zeros(1, np.int64)
        req = self.comm.Ibcast(flag, root=0)
        while not req.Test():
            time.sleep(poll_s)
        return self.comm.bcast(None, root=0)

    def barrier(self) -> None:
        if self.size > 1:
            self.comm.Barrier()

    def local_size(self) -> int:
        """Ranks of this job on this host: those sharing memory with this one, or with the
        same host name (ranks in separate network namespaces of one machine share no memory
        as far as MPI knows, but they do share its cores)."""
        if self.size == 1:
            return 1
        node = self.comm.Split_type(MPI.COMM_TYPE_SHARED)
        n = node.Get_size()
        node.Free()
        same_name = self.comm.allgather(self.host).count(self.host)
        return max(n, same_name)

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


def _as_bytes(buf: np.ndarray) -> np.ndarray:
    """``buf`` itself if it is a contiguous uint8 array; TypeError otherwise."""
    if buf.dtype != np.uint8 or not buf.flags.c_contiguous:
        raise TypeError(f"send_bytes/recv_bytes take a contiguous uint8 array, not a "
                        f"{'' if buf.flags.c_contiguous else 'strided '}{buf.dtype} one")
    return buf


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
