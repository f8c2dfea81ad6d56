"""`mpitpi bench`: timings, memory and traffic of repeated generations (collective).

Every rank runs the same generations; each reports its own figures (peak RSS, time in
all-reduce per decode step and in the prefill, time waiting for layer reads, bytes
all-reduced per forward pass), rank 0 gathers and prints them.
Also measured in the same run, so ratios hold on any machine: the memory read bandwidth
(every rank sums a large tensor at once; a host's figure is the sum of its ranks') and, with
``disk=True``, each rank's cold read bandwidth of its shard.
"""
from __future__ import annotations

import os
import statistics
import time

import numpy as np
import torch
from tqdm import tqdm

from mpitpi import lookahead
from mpitpi.generate import generate
from mpitpi.session import Session


def memory_bandwidth_gbs(nbytes: int = 256 * 2**20, reps: int = 5, rounds: int = 5,
                         pause_s: float = 0.2) -> float:
    """Memory read bandwidth, GB/s: the best pass of ``rounds`` rounds of ``reps`` passes
    summing a large tensor (reads only, like a matrix-vector product streaming its weights),
    ``pause_s`` apart. On a shared host the bandwidth other tenants leave moves from second
    to second (the best of five passes at one moment: 51-67 GB/s within a minute); rounds
    spread over about a second find the host's rate, not one moment's."""
    src = torch.ones(nbytes // 4)
    best = float("inf")
    for r in range(rounds):
        if r:
            time.sleep(pause_s)
        for _ in range(reps):
            t0 = time.perf_counter()
            src.sum()
            best = min(best, time.perf_counter() - t0)
    return nbytes / best / 1e9


def disk_bandwidth_gbs(path: str, chunk: int = 64 * 2**20) -> float:
    """GB/s reading ``path`` cold: its cached pages are dropped first (posix_fadvise)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        size = os.fstat(fd).st_size
        os.posix_fadvise(fd, 0, size, os.POSIX_FADV_DONTNEED)
        buf = np.empty(chunk, np.uint8)
        t0, done = time.perf_counter(), 0
        while done < size:
            got = os.preadv(fd, [memoryview(buf)[:min(chunk, size - done)]], done)
            if got <= 0:
                break
            done += got
        dt = time.perf_counter() - t0
        os.posix_fadvise(fd, 0, size, os.POSIX_FADV_DONTNEED)
        return done / dt / 1e9
    finally:
        os.close(fd)


def weight_bytes(model) -> int:
    """Bytes of weights this rank reads per token: its layer slices + lm_head rows. Resident
    layers count as they lie in memory (int4 in coded tiles: a tenth less than stored),
    streamed ones as stored."""
    store = model.layers
    held = sum(store.get(i).nbytes for i in range(store.n_resident))
    return (held + store.layer_nbytes * (len(store) - store.n_resident) +
            model.top.lm_head.nbytes)


def run_bench(comm, loaded, prompt_len: int, gen_len: int, reps: int, seed: int = 0,
              disk: bool = False, rss_fn=None) -> dict | None:
    """Collective; returns the results dict on rank 0 (None elsewhere)."""
    root = comm.rank == 0
    args = loaded.args
    g = torch.Generator().manual_seed(seed)
    prompt = torch.randint(3, args.vocab_size, (prompt_len,), generator=g).tolist()
    layers = loaded.model.layers
    wbytes = weight_bytes(loaded.model)
    ttft, steps, comm_ms, io_ms, calls, nbytes = [], [], [], [], [], []
    prefill_comm: list[float] = []
    bar = tqdm(range(reps + 1), desc="bench", unit="rep", disable=not root)
    # rep 0 warms up (first reads, checksums, allocator) and is not counted; every rep runs
    # the whole prompt (no reuse of the previous rep's cached positions)
    for rep in bar:
        comm.barrier()
        w0 = layers.wait_s
        n0, b0 = comm.allreduce_calls, comm.allreduce_bytes
        step_comm: list[float] = []
        res = generate(comm, loaded.model, Session(prompt, gen_len) if root else None,
                       on_step=lambda i, ms, c, b: step_comm.append(c), reuse=False)
        if rep == 0:
            continue
        passes = res.forward_passes    # every rank counted each forward pass
        ttft.append(res.ttft_ms)
        steps.extend(res.step_ms)
        prefill_comm.append(step_comm[0])
        comm_ms.extend(step_comm[1:] or step_comm)
        io_ms.append((layers.wait_s - w0) * 1e3 / passes)
        calls.append((comm.allreduce_calls - n0) / passes)
        nbytes.append((comm.allreduce_bytes - b0) / passes)
    layers.close()   # stop the reader before measuring bandwidths
    comm.barrier()
    mine = {
        "host": comm.host,
        "peak_rss_mb": round(rss_fn(), 1) if rss_fn else None,
        "comm_ms_per_token": round(statistics.median(comm_ms), 3),      # decode steps
        "prefill_comm_ms": round(statistics.median(prefill_comm), 3),
        "io_wait_ms_per_token": round(statistics.median(io_ms), 3),
        "allreduce_calls_per_token": round(statistics.median(calls), 1),
        "allreduce_bytes_per_token": int(statistics.median(nbytes)),
        "weight_bytes_per_token": wbytes,
        "resident_layers": layers.n_resident,
        "lookahead": lookahead.control().summary(),   # which tiles asked ahead, at the end
        "disk_gbs": round(disk_bandwidth_gbs(os.path.join(
            loaded.shards, f"rank{comm.rank}.h5")), 3) if disk else None,
    }
    comm.barrier()
    # every rank at once, with its own threads: a host's bandwidth is the sum of its ranks'
    mine["memory_gbs"] = round(memory_bandwidth_gbs(), 3)
    per_rank = comm.gather_obj(mine)
    if not root:
        return None
    ms = statistics.median(steps) if steps else float("nan")
    out = {
        "world_size": comm.size, "prompt_len": prompt_len, "gen_len": gen_len, "reps": reps,
        "window": layers.window,
        "ttft_ms": round(statistics.median(ttft), 3), "ms_per_token": round(ms, 4),
        "tokens_per_s": round(1e3 / round(ms, 4), 3),   # consistent with the rounded ms
        "ranks": per_rank,
    }
    # ranks on one host share its memory bandwidth: the slowest host sets the bound
    host_bytes: dict[str, int] = {}
    host_gbs: dict[str, float] = {}
    for r in per_rank:
        host_bytes[r["host"]] = host_bytes.get(r["host"], 0) + r["weight_bytes_per_token"]
        host_gbs[r["host"]] = host_gbs.get(r["host"], 0.0) + r["memory_gbs"]
    out["memory_gbs"] = round(host_gbs[per_rank[0]["host"]], 3)
    out["roofline_ms_per_token"] = round(max(host_bytes[h] / (host_gbs[h] * 1e9) * 1e3
                                             for h in host_bytes), 3)
    if disk:
        streamed = max(r["weight_bytes_per_token"] * (1 - r["resident_layers"] /
                       args.n_layers) / (r["disk_gbs"] * 1e9) * 1e3 for r in per_rank)
        out["disk_bound_ms_per_token"] = round(streamed, 3)
    return out


def format_bench(r: dict) -> str:
    lines = [f"ranks {r['world_size']}, prompt {r['prompt_len']}, {r['gen_len']} tokens x "
             f"{r['reps']} reps, window {r['window']}",
             f"TTFT {r['ttft_ms']:.1f} ms, {r['ms_per_token']:.2f} ms/token "
             f"({r['tokens_per_s']:.1f} tok/s); memory roofline {r['roofline_ms_per_token']:.2f}"
             f" ms/token at {r['memory_gbs']:.1f} GB/s"]
    if "disk_bound_ms_per_token" in r:
        lines.append(f"disk-bound estimate {r['disk_bound_ms_per_token']:.1f} ms/token")
    la = r["ranks"][0]["lookahead"]
    lines.append(f"lines ahead, streams (MPITPI_PREFETCH={la['setting']}): rank 0 ended "
                 f"in mode {lookahead.describe(la['mode'])}, "
                 f"{la['switches']} switch{'' if la['switches'] == 1 else 'es'}")
    lines.append("rank  peak MB  comm ms/tok  io wait ms/tok  all-reduce kB/tok  resident layers")
    for i, x in enumerate(r["ranks"]):
        lines.append(f"{i:4d}  {x['peak_rss_mb']:7.1f}  {x['comm_ms_per_token']:11.2f}  "
                     f"{x['io_wait_ms_per_token']:14.2f}  "
                     f"{x['allreduce_bytes_per_token'] / 1e3:17.1f}  {x['resident_layers']}")
    return "\n".join(lines)
