"""The only module that imports MPI: collectives, checked steps and the failure path.

``Comm`` wraps an mpi4py communicator. The hot path uses buffer-based uppercase calls on
contiguous tensors (``Iallreduce(IN_PLACE, buf)``, ``Ibcast``, ``Igatherv``); pickled objects
only cross at start-up and once per generation. ``checked`` and ``root_checked`` turn an
MpitpiError on some ranks into the same error on every rank, so no rank waits in a collective
for one that has given up.

A rank that stops answering (a hung device, a stopped process, a dead link) is caught by the
waits themselves: every wait polls its requests, and once ``stall_timeout`` is set (after the
model is loaded) a wait that lasts longer holds a roll call (``_stalled``): every live rank
tells every other one it is alive, and the lowest live rank names the ranks it did not hear
from and ends the job. A signal handler that sets ``stop_requested`` ends a wait stuck for more
than a second the same way, so one Ctrl-C ends a stalled job.
"""
from __future__ import annotations

import os
import pickle
import socket
import sys
import time

import numpy as np
import torch

from mpitpi.errors import CollectiveError, MpitpiError

# MPICH's shared-memory transport, set before MPI starts unless the environment already
# sets any of these (they depend on each other; other MPI libraries ignore them). With
# MPICH's defaults (CMA, the kernel copying between processes, from 8 KiB; 64 cells of
# 8 KiB) an all-reduce between two ranks of one host jumped from 5 us at 16 KiB to 14.7 us
# at 18 KiB (8 decode rows of SmolLM2) and took 303 us at 1 MiB; with cells of 64 KiB (16
# a rank: 1 MiB of shared memory) and CMA only from 8 MiB, 5.1 and 127 us (2 ranks, AMD
# EPYC VM; docs/BENCHMARKS.md, "All-reduce over shared memory").
SHM_DEFAULTS = {"MPIR_CVAR_CH4_SHM_POSIX_IQUEUE_CELL_SIZE": "65536",
                "MPIR_CVAR_CH4_PACK_BUFFER_SIZE": "65536",     # must hold a cell
                "MPIR_CVAR_CH4_SHM_POSIX_IQUEUE_NUM_CELLS": "16",
                "MPIR_CVAR_CH4_IPC_CMA_P2P_THRESHOLD": str(8 << 20)}
if not any(k in os.environ for k in SHM_DEFAULTS):
    os.environ.update(SHM_DEFAULTS)

from mpi4py import MPI  # noqa: E402  (after the variables above)


ALGORITHMS = ("mpi", "star", "ring")
BYTES_TAG = 31   # the tag of send_bytes/recv_bytes messages
ALIVE_TAG = 77   # the roll call of a stalled job
GRACE_S = 3.0    # how long a roll call listens for the other ranks
SPIN_S = 5e-5    # a wait spins this long before it starts yielding the core and the GIL


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

    def __init__(self, mpi_comm=None, algorithm: str = "mpi", polite: bool = False,
                 hosts: list[str] | None = None):
        if algorithm not in ALGORITHMS + ("auto",):
            raise MpitpiError(f"--allreduce {algorithm!r} is not one of {', '.join(ALGORITHMS)}.")
        self.comm = mpi_comm if mpi_comm is not None else MPI.COMM_WORLD
        self.rank = self.comm.Get_rank()
        self.size = self.comm.Get_size()
        self.host = socket.gethostname()
        self.stall_timeout: float | None = None   # seconds a wait may last; None: forever
        self.stop_requested = False               # set by a signal handler (the server)
        self._alive_sends: list = []
        self.polite = polite  # set when ranks outnumber cores (see cli.start)
        # every rank's host name, for messages naming a rank (collective when not given)
        self.hosts = hosts or self.allgather_obj(self.host)
        self.algorithm = algorithm
        self._reduce = {"mpi": self._mpi, "star": self._star, "ring": self._ring,
                        "auto": self._auto}[algorithm]
        self._scratch = np.empty(0, np.float32)
        self.small = None     # auto: the algorithm chosen for small messages
        if algorithm == "auto" and self.size > 1:
            self.small = self._calibrate()
        self.allreduce_calls = 0
        self.allreduce_bytes = 0
        self.allreduce_s = 0.0

    def alone(self) -> Comm:
        """This rank by itself (MPI's COMM_SELF): for what one rank runs alone (a draft
        model on rank 0); not collective."""
        return Comm(MPI.COMM_SELF, hosts=[self.host])

    def with_algorithm(self, algorithm: str) -> Comm:
        """Collective when ``algorithm`` is ``auto`` (it calibrates), local otherwise: a new
        Comm over the same communicator and ranks that all-reduces with ``algorithm``. It
        copies ``polite``; its counters start at zero."""
        c = Comm(self.comm, algorithm=algorithm, polite=self.polite, hosts=self.hosts)
        c.stall_timeout = self.stall_timeout
        return c

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
        """Wait for requests by polling, so a stall and a signal are noticed. After a short
        spin (from the start when ``polite``: more ranks than cores) every poll yields the
        core and the GIL, so ranks sharing a core and the layer reader thread get to run."""
        if MPI.Request.Testall(reqs):
            return
        t0 = time.monotonic()
        while not MPI.Request.Testall(reqs):
            waited = time.monotonic() - t0
            if self.polite or waited > SPIN_S:
                os.sched_yield()
            if waited > 1.0:
                if self.stop_requested:
                    self._end(f"stopped by a signal after waiting {waited:.0f} s for the "
                              f"other ranks")
                if self.stall_timeout and waited > self.stall_timeout:
                    self._stalled(waited)

    def _stalled(self, waited: float) -> None:
        """Every live rank: hold a roll call, then the lowest rank that answered ends the job
        with one message naming the ranks that did not."""
        mine = np.array([self.rank], np.int64)
        self._alive_sends = [self.comm.Isend(mine, dest=r, tag=ALIVE_TAG)
                             for r in range(self.size) if r != self.rank]
        live, got, status = {self.rank}, np.empty(1, np.int64), MPI.Status()
        end = time.monotonic() + GRACE_S
        while time.monotonic() < end and len(live) < self.size:
            if self.comm.Iprobe(source=MPI.ANY_SOURCE, tag=ALIVE_TAG, status=status):
                self.comm.Recv(got, source=status.Get_source(), tag=ALIVE_TAG)
                live.add(int(got[0]))
            else:
                time.sleep(0.01)
        gone = [r for r in range(self.size) if r not in live]
        if self.rank == min(live):
            who = ", ".join(f"rank {r} ({self.hosts[r]})" for r in gone) or "no rank"
            self._end(f"{who} stopped answering: the other ranks waited {waited:.0f} s for it "
                      f"(--stall-timeout {self.stall_timeout:g}). Check that host; a stopped "
                      f"or swapping process, a hung device or a dead link look like this.")
        time.sleep(2 * GRACE_S)   # the lowest live rank ends the job; if not, end it here
        self.abort(3)

    def _end(self, message: str) -> None:
        print(f"mpitpi: error: {message}", file=sys.stderr, flush=True)
        self.abort(3)

    def _calibrate(self, nbytes: int = 4096, reps: int = 5) -> str:
        """Collective: the faster of mpi and star for an ``nbytes`` all-reduce here."""
        best, best_t = "mpi", float("inf")
        buf = np.ones(nbytes // 4, np.float32)
        for name, f in (("mpi", self._mpi), ("star", self._star)):
            f(buf)                                   # warm-up: connections, buffers
            self.barrier()
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
        self._wait([self.comm.Iallreduce(MPI.IN_PLACE, a)])
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

    def allmax_(self, t: torch.Tensor) -> torch.Tensor:
        """Collective: the element-wise largest of the contiguous float32 tensor ``t`` over
        all ranks, in place (MPI's Iallreduce with MAX, polled); every rank ends with the
        same values. Not counted in the all-reduce figures (not the forward pass). Returns
        ``t``."""
        if self.size > 1:
            self._wait([self.comm.Iallreduce(MPI.IN_PLACE, t.numpy().reshape(-1), op=MPI.MAX)])
        return t

    def bcast_(self, a: np.ndarray, root: int = 0) -> np.ndarray:
        """Broadcast a numpy buffer from ``root`` in place."""
        if self.size > 1:
            self._wait([self.comm.Ibcast(a, root=root)])
        return a

    def gather_rows(self, local: torch.Tensor, counts: list[int]) -> torch.Tensor | None:
        """Every rank's (R, counts[rank]) float32 ``local`` (its vocabulary columns of R
        rows) joined into (R, sum(counts)) on rank 0 (one Gatherv); None elsewhere."""
        if self.size == 1:
            return local
        R = local.shape[0]
        out = torch.empty(R * sum(counts), dtype=torch.float32) if self.rank == 0 else None
        recv = [out.numpy(), [R * c for c in counts]] if self.rank == 0 else None
        self._wait([self.comm.Igatherv(local.contiguous().numpy().reshape(-1), recv, root=0)])
        if self.rank != 0:
            return None
        parts = out.split([R * c for c in counts])                # rank r: (R * counts[r],)
        return torch.cat([p.view(R, c) for p, c in zip(parts, counts)], dim=1)

    def argmax_rows(self, local: torch.Tensor, offset: int) -> list[int] | None:
        """Greedy choice for each of R rows without moving the logits: each rank sends its
        best (value, global index) per row of its (R, n_vocab_r) ``local``, 16 bytes a row,
        and rank 0 takes the largest (the lowest index on ties, as a full argmax would).
        Returns the R tokens on rank 0, None elsewhere."""
        a = local.numpy()                                         # (R, n_vocab_r)
        idx = a.argmax(axis=1)              # (R,) first of ties; 10x torch's max here
        if self.size == 1:
            return (idx + offset).tolist()
        mine = np.stack([a[np.arange(a.shape[0]), idx].astype(np.float64),
                         idx.astype(np.float64) + offset], axis=1)
        every = np.empty((self.size,) + mine.shape, np.float64) if self.rank == 0 else None
        self._wait([self.comm.Igather(np.ascontiguousarray(mine), every, root=0)])
        if self.rank != 0:
            return None
        best = np.argmax(every[:, :, 0], axis=0)                  # (R,) the winning rank
        return [int(every[b, r, 1]) for r, b in enumerate(best)]

    # -- timings and raw bytes (commbench, calibration, shard transfer) ------------------
    def max_all(self, value: float) -> float:
        """Collective (every rank calls it): the largest ``value`` over all ranks, returned
        on every rank (an all-reduce with MAX of one float64)."""
        if self.size == 1:
            return value
        buf = np.array([value], np.float64)
        self._wait([self.comm.Iallreduce(MPI.IN_PLACE, buf, op=MPI.MAX)])
        return float(buf[0])

    def send_bytes(self, buf: np.ndarray, dest: int) -> None:
        """Send the contiguous uint8 array ``buf`` to rank ``dest``, which must call
        ``recv_bytes`` with a buffer of the same length and ``source`` = this rank. Returns
        when ``buf`` may be reused (waiting politely if ``polite``)."""
        self._wait([self.comm.Isend(_as_bytes(buf), dest=dest, tag=BYTES_TAG)])

    def recv_bytes(self, buf: np.ndarray, source: int) -> None:
        """Receive into the contiguous uint8 array ``buf`` what rank ``source`` sent with
        ``send_bytes`` (the same length); returns when ``buf`` holds it."""
        self._wait([self.comm.Irecv(_as_bytes(buf), source=source, tag=BYTES_TAG)])

    # -- start-up and per generation ----------------------------------------------------
    # Objects cross pickled, as a length and then the bytes, through polled waits: a signal
    # is handled while waiting (Ctrl-C works at start-up too), and a stall is caught once
    # ``stall_timeout`` is set (start-up, when rank 0 may split a model for minutes, waits on).
    def bcast_obj(self, obj, root: int = 0):
        """Collective: ``root``'s picklable ``obj`` on every rank."""
        if self.size == 1:
            return obj
        data = _pickled(obj) if self.rank == root else None
        n = np.array([0 if data is None else data.size], np.int64)
        self._wait([self.comm.Ibcast(n, root=root)])
        buf = data if data is not None else np.empty(int(n[0]), np.uint8)
        self._wait([self.comm.Ibcast(buf, root=root)])
        return obj if self.rank == root else pickle.loads(buf.tobytes())

    def gather_obj(self, obj, root: int = 0) -> list | None:
        """Collective: every rank's ``obj``, in rank order, on ``root`` (None elsewhere)."""
        if self.size == 1:
            return [obj]
        data = _pickled(obj)
        counts = np.empty(self.size, np.int64)
        self._wait([self.comm.Igather(np.array([data.size], np.int64), counts, root=root)])
        if self.rank != root:
            self._wait([self.comm.Igatherv(data, None, root=root)])
            return None
        out = np.empty(int(counts.sum()), np.uint8)
        self._wait([self.comm.Igatherv(data, [out, counts], root=root)])
        return _unpickled(out, counts)

    def allgather_obj(self, obj) -> list:
        """Collective: every rank's ``obj``, in rank order, on every rank."""
        if self.size == 1:
            return [obj]
        data = _pickled(obj)
        counts = np.empty(self.size, np.int64)
        self._wait([self.comm.Iallgather(np.array([data.size], np.int64), counts)])
        out = np.empty(int(counts.sum()), np.uint8)
        self._wait([self.comm.Iallgatherv(data, [out, counts])])
        return _unpickled(out, counts)

    def send_command(self, obj) -> None:
        """Rank 0: wake the followers waiting in ``wait_command`` and hand them ``obj``."""
        if self.size > 1:
            self._wait([self.comm.Ibcast(np.ones(1, np.int64), root=0)])
            self.bcast_obj(obj)

    def wait_command(self, poll_s: float = 0.005):
        """Ranks other than 0: wait for rank 0's next command object without spinning a core
        (a non-blocking broadcast polled with sleeps), then return it."""
        flag = np.zeros(1, np.int64)
        req = self.comm.Ibcast(flag, root=0)
        while not req.Test():
            time.sleep(poll_s)
        return self.bcast_obj(None)

    def barrier(self) -> None:
        if self.size > 1:
            self._wait([self.comm.Ibarrier()])

    def local_size(self) -> int:
        """Ranks of this job on this host: those sharing memory with this one, or with the
        same host name (ranks in separate network namespaces of one machine share no memory
        as far as MPI knows, but they do share its cores)."""
        if self.size == 1:
            return 1
        node = self.comm.Split_type(MPI.COMM_TYPE_SHARED)
        n = node.Get_size()
        node.Free()
        same_name = self.hosts.count(self.host)
        return max(n, same_name)

    def checked(self, fn, *a, **kw):
        """Run ``fn`` on every rank; if it raised MpitpiError on any rank, raise on all.

        The raised error names each failing rank and host (duplicates merged).
        """
        try:
            result, err = fn(*a, **kw), None
        except MpitpiError as e:
            result, err = None, str(e)
        errors = self.allgather_obj(err)
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
            time.sleep(0.5)   # let the launcher forward what was just printed before it kills
            self.comm.Abort(code)
        os._exit(code)


def _pickled(obj) -> np.ndarray:
    return np.frombuffer(pickle.dumps(obj), np.uint8).copy()


def _unpickled(data: np.ndarray, counts: np.ndarray) -> list:
    ends = np.cumsum(counts)
    return [pickle.loads(data[e - c:e].tobytes()) for c, e in zip(counts, ends)]


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


def mpi_versions() -> dict[str, str]:
    """This process's mpi4py version and MPI library (name and version, e.g. 'MPICH 5.0.2'
    or 'Open MPI v4.1.5'): what must match on every host of a job."""
    import mpi4py

    first = MPI.Get_library_version().strip().splitlines()[0]
    lib = " ".join(first.split(",")[0].replace("Version:", "").split())
    return {"mpi4py": mpi4py.__version__, "mpi": lib}
