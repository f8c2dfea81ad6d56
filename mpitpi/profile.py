"""Uneven devices: measure each rank, then choose shares that balance time per token.

``measure`` (every rank, at the same time, so ranks that share cores see each other) times
matrix-vector products at the model's widths in the compute dtype and reads the memory the
rank may use. ``solve_shares`` (a pure function) turns the figures into per-rank shares:
proportional to speed, capped by memory (the excess goes to ranks with room), at least one
query head each. ``plan_for_args`` then turns shares into heads, FFN columns and vocabulary.
"""
from __future__ import annotations

import statistics
import time
from dataclasses import asdict, dataclass

import torch

from mpitpi.errors import MpitpiError
from mpitpi.plan import plan_for_args
from mpitpi.weights import BYTES_PER_WEIGHT, random_weight


@dataclass
class RankFigures:
    rank: int
    host: str
    gbs: float          # weight bytes a matrix-vector product streams per second, GB/s
    memory_mb: float    # memory this rank may use for weights, MB

    def to_dict(self) -> dict:
        return asdict(self)


NO_LIMIT = 2**60   # a cgroup "limit" at or above this is none (v1 writes 2^63 rounded down)


def _read_int(path: str) -> int | None:
    try:
        with open(path) as f:
            text = f.read().strip()
        return None if text == "max" else int(text)
    except (OSError, ValueError):
        return None


def cgroup_room_mb(proc: str = "/proc/self/cgroup", root: str = "/sys/fs/cgroup") -> float:
    """MB this process's memory cgroup may still take (its limit less its usage: a SLURM job
    step's allocation, a container's limit); inf without a limit. cgroup v2 (memory.max,
    memory.current) and v1 (memory.limit_in_bytes, memory.usage_in_bytes), looked up at the
    process's own cgroup path and at the mount's root (a cgroup namespace shows its own root
    there); the tightest found counts."""
    try:
        with open(proc) as f:
            lines = f.read().splitlines()
    except OSError:
        return float("inf")
    room = float("inf")
    for line in lines:
        hid, ctrls, path = (line.split(":", 2) + ["", ""])[:3]
        if hid == "0":
            where, files = [root + path, root], ("memory.max", "memory.current")
        elif "memory" in ctrls.split(","):
            where = [f"{root}/memory{path}", f"{root}/memory"]
            files = ("memory.limit_in_bytes", "memory.usage_in_bytes")
        else:
            continue
        for folder in where:
            limit, used = (_read_int(f"{folder.rstrip('/')}/{n}") for n in files)
            if limit is not None and limit < NO_LIMIT and used is not None:
                room = min(room, max(0, limit - used) / 2**20)
                break
    return room


def available_memory_mb() -> float:
    """MB this rank can still use: the host's MemAvailable, or less when its cgroup (a SLURM
    allocation, a container) allows less."""
    host = float("inf")
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                host = int(line.split()[1]) / 1024
                break
    return min(host, cgroup_room_mb())


def matvec_gbs(dim: int, ffn: int, dtype: str, seconds: float = 0.5) -> float:
    """GB/s of weights streamed by the model's decode product (weights.Weight) for a matrix
    of shape (ffn, dim) stored in ``dtype``, cycling through enough matrices to leave the
    cache."""
    first = random_weight(ffn, dim, dtype)
    per = first.nbytes   # int8 and int4 scales included
    mats = [first] + [random_weight(ffn, dim, dtype) for _ in range(max(1, (192 << 20) // per))]
    x = torch.randn(1, dim)
    for w in mats[:2]:
        w(x)
    times, t_end = [], time.perf_counter() + seconds
    while time.perf_counter() < t_end or len(times) < 3:
        t0 = time.perf_counter()
        for w in mats:
            w(x)
        times.append((time.perf_counter() - t0) / len(mats))
    return per / statistics.median(times) / 1e9


def measure(comm, dim: int, ffn: int, dtype: str,
            budget_bytes: int | None = None) -> list[RankFigures] | None:
    """Collective: every rank measures itself at once; rank 0 gets the list (others None)."""
    comm.barrier()
    gbs = matvec_gbs(dim, min(ffn, 8192), dtype)
    mem = budget_bytes / 2**20 if budget_bytes else available_memory_mb()
    mine = RankFigures(comm.rank, comm.host, round(gbs, 3), round(mem, 1))
    every = comm.gather_obj(mine)
    return every if comm.rank == 0 else None


def solve_shares(speeds: list[float], memory: list[float], model_mb: float,
                 n_heads: int) -> list[float]:
    """Shares (summing to 1) that equalise time per token = share x model_mb / speed.

    A rank whose proportional share does not fit its ``memory`` (MB) gets what fits; the rest
    is spread over the others by speed. Every share is at least one head's worth
    (1 / n_heads). Raises MpitpiError naming a rank that cannot hold even that.
    """
    n = len(speeds)
    if n != len(memory) or n == 0:
        raise MpitpiError("one speed and one memory figure per rank are needed.")
    if any(not s > 0 for s in speeds):
        raise MpitpiError(f"measured speeds must be positive, got {speeds}.")
    floor = 1.0 / n_heads
    caps = [m / model_mb for m in memory]
    for r, c in enumerate(caps):
        if c < floor:
            raise MpitpiError(f"rank {r} has {memory[r]:.0f} MB for weights, less than one "
                              f"head's share ({floor * model_mb:.0f} MB). Fix: run without "
                              f"that device, give it more memory, or stream layers (--window).")
    if sum(caps) < 1:
        raise MpitpiError(f"the ranks' memory ({sum(memory):.0f} MB) cannot hold the model "
                          f"({model_mb:.0f} MB). Fix: add devices or stream layers (--window).")
    shares = [0.0] * n
    free = set(range(n))
    left = 1.0
    while free:   # water-filling: proportional to speed, capped by memory
        total = sum(speeds[r] for r in free)
        capped = [r for r in free if left * speeds[r] / total > caps[r]]
        if not capped:
            for r in free:
                shares[r] = left * speeds[r] / total
            break
        for r in capped:
            shares[r] = caps[r]
            left -= caps[r]
            free.discard(r)
    short = [r for r in range(n) if shares[r] < floor]
    for r in short:   # at least one head each, taken from the largest shares
        need = floor - shares[r]
        shares[r] = floor
        donors = sorted((d for d in range(n) if shares[d] > floor), key=lambda d: -shares[d])
        for d in donors:
            give = min(need, shares[d] - floor)
            shares[d] -= give
            need -= give
            if need <= 1e-12:
                break
    return shares


def weak_ranks(speeds: list[float], n_heads: int) -> list[int]:
    """Ranks that slow every token down even with one head: their one-head time exceeds
    the time the other ranks need for the whole model without them."""
    out = []
    for r, s in enumerate(speeds):
        others = sum(speeds) - s
        if others > 0 and (1.0 / n_heads) / s > 1.0 / others:
            out.append(r)
    return out


def quantize(shares: list[float]) -> list[float]:
    """Shares relative to the largest, rounded to tenths (at least 0.05): small measurement
    noise then gives the same ratios, the same plan and the same cached shards."""
    top = max(shares)
    return [max(0.05, round(s / top, 1)) for s in shares]


def format_table(figs: list[RankFigures], plan, n_heads: int, ffn: int) -> str:
    lines = ["rank  host              GB/s  memory MB  heads  share of heads  FFN columns"]
    for f, s in zip(figs, plan):
        lines.append(f"{f.rank:4d}  {f.host[:16]:16s} {f.gbs:6.2f}  {f.memory_mb:9.0f}  "
                     f"{s.n_q:5d}  {100 * s.n_q / n_heads:13.0f}%  {s.n_ffn:5d} "
                     f"({100 * s.n_ffn / ffn:.0f}%)")
    return "\n".join(lines)


def model_bytes(args, itemsize: int) -> int:
    """Bytes of all weight matrices (every layer, embedding and lm_head) at ``itemsize``."""
    hd = args.head_dim
    attn = args.dim * (args.n_heads + 2 * args.n_kv_heads) * hd + args.n_heads * hd * args.dim
    layer = attn + 3 * args.dim * args.ffn_dim
    vocab = args.vocab_size * args.dim * (1 if args.tie_embeddings else 2)
    return (args.n_layers * layer + vocab) * itemsize


def auto_ratios(comm, args, dtype: str, budget_bytes: int | None = None,
                log=None) -> tuple[str, list[dict]]:
    """Collective: measure every rank, solve the shares; returns ('r0,r1,...', figures).

    Rank 0 prints the table of figures and the plan it leads to (``log``: a print function),
    and a warning naming any rank too weak to help.
    """
    figs = measure(comm, args.dim, args.ffn_dim, dtype, budget_bytes)

    def solve():
        mb = model_bytes(args, BYTES_PER_WEIGHT[dtype]) / 2**20
        shares = solve_shares([f.gbs for f in figs], [f.memory_mb for f in figs], mb,
                              args.n_heads)
        ratios = quantize(shares)
        if log:
            plan = plan_for_args(args, comm.size, ratios)
            log(format_table(figs, plan, args.n_heads, args.ffn_dim))
            for r in weak_ranks([f.gbs for f in figs], args.n_heads):
                log(f"warning: rank {r} ({figs[r].host}) is too slow to help: even one head "
                    f"there takes longer than the other ranks need for the whole model. Run "
                    f"without it.")
        return ",".join(f"{x:g}" for x in ratios), [f.to_dict() for f in figs]
    return comm.root_checked(solve)
