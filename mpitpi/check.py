"""`mpitpi check`: before a long job, every rank says what its host has; rank 0 says what
is wrong and how to fix it.

Collective: every rank of the job runs ``run_check`` under mpiexec, with the model options
the job will use (--model, --shards, --local-shards, --dtype, --ratios, --window,
--memory-budget). Nothing is written: no split, no transfer.

1. Rank 0 reads the model's header and finds the split the job would use: an existing one
   (--shards, or the cache folder) gives every rank's file size; otherwise the sizes are
   estimated from the plan (``rank_bytes``) and shown with '~'.
2. Every rank reports (``Report``): host, versions, C kernels, available memory, and for the
   folder it keeps its shard in, the free disk and what the job will do there
   (transfer.shard_state).
3. Rank 0 times a ping-pong with every other rank in turn (``ping_pong``): the round trip of
   8 bytes and the one-way bandwidth of 4 MiB.
4. ``problems`` (pure) turns the reports and needs into one line per problem, each naming
   its fix. Rank 0 prints the table and the problems; every rank returns 1 if there is one.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shutil
import statistics
import time
from dataclasses import asdict, dataclass

import numpy as np
import torch

from mpitpi import __version__, kernels
from mpitpi.checkpoint import fingerprint, natural_dtype, open_checkpoint, resolve_model
from mpitpi.comm import Comm, mpi_versions
from mpitpi.config import ModelArgs
from mpitpi.errors import MpitpiError
from mpitpi.loader import cached_split
from mpitpi.model import default_kv_dtype, kv_bytes_per_position
from mpitpi.plan import RankSlice, parse_ratios, plan_for_args
from mpitpi.prefetch import parse_size, plan_residency
from mpitpi.profile import available_memory_mb
from mpitpi.quant import BLOCK, GROUP
from mpitpi.shards import check_manifest, expected_shapes, read_manifest
from mpitpi.transfer import local_folder, receive_problem, shard_state
from mpitpi.weights import BYTES_PER_WEIGHT, storage_for

MB = 2**20
VERSIONS = ("python", "mpitpi", "torch", "mpi4py", "mpi")   # must agree on every rank
SCALE_BYTES = {"int8": 4 / GROUP, "int4": 4 / BLOCK, "int6": 2 / BLOCK}   # per weight, beside it
PING_REPS, BANDWIDTH_BYTES, BANDWIDTH_REPS = 20, 4 * MB, 3


@dataclass
class Report:
    """What one rank found on its host."""
    rank: int
    host: str
    python: str
    mpitpi: str
    torch: str
    mpi4py: str
    mpi: str
    kernels: bool
    kernels_why: str | None     # why not, when not
    memory_mb: float            # available memory (MemAvailable, or less in a cgroup)
    folder: str                 # where this rank's shard is read from (or will be)
    disk_mb: float              # free space on the filesystem of ``folder``
    device: int                 # that filesystem's st_dev (ranks of a host may share it)
    writable: bool              # ``folder`` (or the folder it would be made in) is writable
    state: str                  # 'split', 'to split', 'shared', 'present' or 'send'
    refused: str | None         # why a shard may not be received into ``folder``


@dataclass
class Need:
    """What one rank needs, in MB (``exact``: from the split's manifest, not estimated).
    ``kv_mb_per_1k``: its KV cache per 1024 positions of context (one sequence; a server's
    sequences all together), beside ``memory_mb``, which counts weights only."""
    weights_mb: float
    memory_mb: float
    disk_mb: float
    exact: bool
    kv_mb_per_1k: float = 0.0


def rank_bytes(args: ModelArgs, s: RankSlice, dtype: str,
               vocab_dtype: str | None = None) -> tuple[int, int]:
    """Estimated bytes of rank ``s.rank``'s weights stored in ``dtype``: (embedding, lm_head
    and final norm rows; one layer). Matrices are counted in their storage (weights.
    storage_for) with their int8/int4 scales, vectors in fp32 (int8/int4) or ``dtype``."""
    vec = 4 if dtype in SCALE_BYTES else BYTES_PER_WEIGHT[dtype]
    top = layer = 0.0
    for name, shape in expected_shapes(args, s).items():
        if len(shape) == 2:
            kind = storage_for(name, shape[1], dtype, vocab_dtype)
            n = math.prod(shape) * (BYTES_PER_WEIGHT[kind] + SCALE_BYTES.get(kind, 0))
        else:
            n = math.prod(shape) * vec
        if name.startswith("layers/0/"):
            layer += n
        elif not name.startswith("layers/"):
            top += n
    return int(top), int(layer)


def _existing_split(a: argparse.Namespace, size: int) -> tuple[str, dict | None, ModelArgs,
                                                                 str, list[float] | None]:
    """Rank 0: (shard folder, its manifest or None when not split yet, model args, dtype,
    ratios), as loader._resolve_shards would find them, without writing anything."""
    ratios = None if a.ratios == "auto" else parse_ratios(a.ratios, size)
    if a.shards:
        man = read_manifest(a.shards)
        check_manifest(man, a.shards, size, None)
        return a.shards, man, ModelArgs.from_dict(man["args"]), man["dtype"], man["ratios"]
    if not a.model:
        raise MpitpiError("no model given. Fix: pass --model MODEL (as the job will), or "
                          "--shards DIR.")
    path = resolve_model(a.model)
    args = open_checkpoint(path).args
    fp = fingerprint(path)
    dtype = a.dtype or natural_dtype(path)
    folder, man = cached_split(a.model, fp, size, ratios, dtype, a.vocab_dtype)
    return folder, man, args, dtype, ratios


def plan_needs(a: argparse.Namespace, size: int) -> dict:
    """Rank 0: the shard folder, manifest and every rank's Need for this job."""
    folder, man, args, dtype, ratios = _existing_split(a, size)
    plan = plan_for_args(args, size, ratios)
    budget = parse_size(a.memory_budget) if a.memory_budget else None
    kv_dtype = a.kv_dtype or default_kv_dtype(dtype)
    needs = []
    for s in plan:
        top, layer = rank_bytes(args, s, dtype, a.vocab_dtype)
        total = man["files"][s.rank]["size"] if man else top + args.n_layers * layer
        if man:   # the file's own size; the per-layer figure follows it
            layer = max(0, total - top) // max(1, args.n_layers)
        resident, window = plan_residency(args.n_layers, layer, top, budget, a.window)
        held = top + (resident + (window or 0)) * layer if window else total
        kv = kv_bytes_per_position(args, s.n_kv, kv_dtype) * 1024
        needs.append(Need(round(total / MB, 1), round(min(held, total) / MB + a.reserve_mb, 1),
                          0.0, man is not None, round(kv / MB, 3)))
    if man is None:   # rank 0 writes every rank's file first
        needs[0].disk_mb = round(sum(n.weights_mb for n in needs), 1)
    return {"folder": folder, "manifest": man, "needs": needs, "dtype": dtype,
            "kv_dtype": kv_dtype, "context": args.max_seq_len}


def _nearest_existing(path: str) -> str:
    path = os.path.abspath(path)
    while not os.path.exists(path):
        path = os.path.dirname(path)
    return path


def report(comm: Comm, shards: str, man: dict | None, template: str | None) -> Report:
    """This rank's Report for the job whose shard folder (on rank 0) is ``shards``."""
    folder = local_folder(template, shards, comm.rank)
    if comm.rank == 0:
        state = "split" if man else "to split"
    else:
        state = shard_state(folder, shards, comm.rank, man) if man else "send"
    there = _nearest_existing(folder)
    disk = shutil.disk_usage(there)
    reason = kernels.unavailable_reason()
    return Report(
        rank=comm.rank, host=comm.host, python=platform.python_version(),
        mpitpi=__version__, torch=torch.__version__, **mpi_versions(),
        kernels=reason is None, kernels_why=reason, memory_mb=round(available_memory_mb(), 1),
        folder=folder, disk_mb=round(disk.free / MB, 1), device=os.stat(there).st_dev,
        writable=os.access(there, os.W_OK | os.X_OK),
        refused=receive_problem(folder) if state == "send" else None, state=state)


def ping_pong(comm: Comm, peer: int) -> tuple[float, float] | None:
    """Rank 0 and ``peer`` call it together; rank 0 gets (median round trip of 8 bytes in
    microseconds, one-way MB/s of BANDWIDTH_BYTES less half a round trip, best of
    BANDWIDTH_REPS), ``peer`` None."""
    small, big = np.zeros(8, np.uint8), np.zeros(BANDWIDTH_BYTES, np.uint8)
    if comm.rank != 0:
        for _ in range(PING_REPS + 2):
            comm.recv_bytes(small, 0)
            comm.send_bytes(small, 0)
        for _ in range(BANDWIDTH_REPS):
            comm.recv_bytes(big, 0)
            comm.send_bytes(small, 0)
        return None
    trips = []
    for i in range(PING_REPS + 2):   # 2 warm-ups: connections are made on first use
        t0 = time.perf_counter()
        comm.send_bytes(small, peer)
        comm.recv_bytes(small, peer)
        if i >= 2:
            trips.append(time.perf_counter() - t0)
    rtt = statistics.median(trips)
    best = float("inf")
    for _ in range(BANDWIDTH_REPS):
        t0 = time.perf_counter()
        comm.send_bytes(big, peer)
        comm.recv_bytes(small, peer)
        best = min(best, time.perf_counter() - t0)
    return round(rtt * 1e6, 1), round(BANDWIDTH_BYTES / max(best - rtt / 2, 1e-9) / 1e6, 1)


def _who(r: Report) -> str:
    return f"rank {r.rank} ({r.host})"


def _ranks(rs: list[Report]) -> str:
    return ("rank " if len(rs) == 1 else "ranks ") + ",".join(str(r.rank) for r in rs)


def problems(reports: list[Report], needs: list[Need]) -> list[str]:
    """One line per problem, each with its fix: versions that differ from rank 0's, missing
    C kernels, hosts whose ranks together need more memory or disk than there is, shard
    folders a rank cannot write or may not receive into."""
    out = []
    first = reports[0]
    for r in reports[1:]:
        for key in VERSIONS:
            mine, theirs = getattr(r, key), getattr(first, key)
            if key == "python":   # pickles cross between ranks: major.minor must agree
                mine, theirs = ".".join(mine.split(".")[:2]), ".".join(theirs.split(".")[:2])
            if mine != theirs:
                out.append(f"{_who(r)} has {key} {getattr(r, key)}, {_who(first)} has "
                           f"{getattr(first, key)}. Fix: the same versions on every host: the "
                           f"same checkout and `make install` at the same path on each.")
    for r in reports:
        if not r.kernels:
            out.append(f"{_who(r)} has no C kernels ({r.kernels_why}): it would decode with "
                       f"torch alone, several times slower. Fix: install a C compiler there "
                       f"(e.g. apt-get install gcc) and leave MPITPI_KERNELS unset.")
    by_host: dict[str, list[Report]] = {}
    for r in reports:
        by_host.setdefault(r.host, []).append(r)
    for host, rs in by_host.items():
        need = sum(needs[r.rank].memory_mb for r in rs)
        have = min(r.memory_mb for r in rs)
        if need > have:
            out.append(f"host {host} ({_ranks(rs)}) has {have:.0f} MB of memory available, "
                       f"its ranks need {need:.0f} MB (weights and --reserve-mb). Fix: free "
                       f"memory there, give its ranks smaller shares (--ratios), or stream "
                       f"layers (--window / --memory-budget).")
    by_disk: dict[tuple[str, int], list[Report]] = {}
    for r in reports:
        if needs[r.rank].disk_mb:
            by_disk.setdefault((r.host, r.device), []).append(r)
    for (host, _), rs in by_disk.items():
        need = sum(needs[r.rank].disk_mb for r in rs)
        have = min(r.disk_mb for r in rs)
        if need > have:
            where = ", ".join(sorted({r.folder for r in rs}))
            out.append(f"host {host} ({_ranks(rs)}) has {have:.0f} MB free for {where}, the "
                       f"shards need {need:.0f} MB. Fix: free disk space there, or put the "
                       f"shards on a larger disk (--local-shards, or $MPITPI_CACHE / --shards "
                       f"on rank 0).")
    for r in reports:
        if r.refused:
            out.append(f"{_who(r)}: {r.refused}")
        elif needs[r.rank].disk_mb and not r.writable:
            out.append(f"{_who(r)} cannot write {r.folder}. Fix: give --local-shards (rank 0: "
                       f"$MPITPI_CACHE or --shards) a folder this rank may write.")
    return out


def format_table(reports: list[Report], needs: list[Need],
                 links: list[tuple[float, float] | None]) -> str:
    """The table rank 0 prints: one row per rank; MB figures, '~' before an estimate."""
    cols = [("rank", 4), ("host", -16), ("python", -8), ("mpitpi", -7), ("torch", -12),
            ("mpi4py", -7), ("MPI", -14), ("kernels", -7), ("mem MB", 8), ("needs", 8),
            ("disk MB", 9), ("needs", 8), ("KV/1k", 6), ("shard", -8), ("RTT us", 8),
            ("MB/s", 7), ("folder", 0)]

    def row(values) -> str:
        return " ".join(f"{str(v)[:abs(w)] if w else v:{'<' if w <= 0 else '>'}{abs(w)}}"
                        for v, (_, w) in zip(values, cols)).rstrip()
    lines = [row([name for name, _ in cols])]
    for r, n, link in zip(reports, needs, links):
        approx = "" if n.exact else "~"
        lines.append(row([
            r.rank, r.host, r.python, r.mpitpi, r.torch, r.mpi4py, r.mpi,
            "yes" if r.kernels else "NO", f"{r.memory_mb:.0f}", f"{approx}{n.memory_mb:.0f}",
            f"{r.disk_mb:.0f}", f"{approx}{n.disk_mb:.0f}", f"{n.kv_mb_per_1k:.0f}", r.state,
            f"{link[0]:.1f}" if link else "-", f"{link[1]:.0f}" if link else "-", r.folder]))
    return "\n".join(lines)


def run_check(a: argparse.Namespace, comm: Comm) -> int:
    """Collective: the check; 0 when every rank is ready, 1 when a problem was found (printed
    by rank 0, one line each)."""
    def early():
        if a.reserve_mb < 0:
            raise MpitpiError(f"--reserve-mb must be >= 0, got {a.reserve_mb}.")
        return plan_needs(a, comm.size)
    info = comm.root_checked(early)
    def mine_checked():   # an unreadable folder is a problem to name, on every rank
        try:
            return report(comm, info["folder"], info["manifest"], a.local_shards)
        except OSError as e:
            raise MpitpiError(f"cannot inspect this rank's shard folder: {e}. Fix: make it "
                              f"readable, or choose another --local-shards.")
    mine = comm.checked(mine_checked)
    reports = comm.gather_obj(mine)
    if comm.rank == 0:
        for r in reports[1:]:   # the ranks rank 0 will send a shard to need room for it
            if r.state == "send":
                info["needs"][r.rank].disk_mb = info["needs"][r.rank].weights_mb
    links: list = [None]
    for peer in range(1, comm.size):
        if comm.rank in (0, peer):
            links.append(ping_pong(comm, peer))
    comm.barrier()
    found = problems(reports, info["needs"]) if comm.rank == 0 else None
    found = comm.bcast_obj(found)
    if comm.rank == 0:
        if a.json:
            print(json.dumps({"ranks": [{**asdict(r), "need": asdict(n),
                                         "rtt_us": link and link[0],
                                         "mb_per_s": link and link[1]}
                                        for r, n, link in zip(reports, info["needs"], links)],
                              "dtype": info["dtype"], "kv_dtype": info["kv_dtype"],
                              "problems": found}))
        else:
            print(format_table(reports, info["needs"], links))
            kv = max(n.kv_mb_per_1k for n in info["needs"])
            print(f"KV cache ({info['kv_dtype']}): up to {kv:.1f} MB per rank per 1024 positions "
                  f"of context, beside the weights ('needs'); the model's whole context of "
                  f"{info['context']} positions: {kv * info['context'] / 1024:.0f} MB per "
                  f"sequence. A server holds --kv-budget (default: a quarter of the memory "
                  f"available) for all its sequences.")
            for line in found:
                print(f"problem: {line}")
            if not found:
                hosts = len({r.host for r in reports})
                print(f"ok: {comm.size} ranks on {hosts} host{'s' * (hosts > 1)} are ready "
                      f"for this model ({info['dtype']})")
    return 1 if found else 0
