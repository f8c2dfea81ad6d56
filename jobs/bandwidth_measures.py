"""Memory read bandwidth by three measures in the same second, round after round: the one
`mpitpi bench` divides a token's bytes by, and two sustained reads of larger tensors.

    python jobs/bandwidth_measures.py [--rounds 40] [--mb 768] [--threads 2]

On a shared host the bandwidth moves from second to second, so the measures are taken
together each round and printed side by side (GB/s):
  bench     memory_bandwidth_gbs(): the best of 25 passes over 256 MB of fp32, over a second
  fp32 MB   the best and median of 5 passes summing an fp32 tensor of --mb megabytes (the
            size of a token's weights: the 1B shape's int4 shards read 763 MB a token)
  int64     the best and median of 5 passes over 500 MB of int64
The ratio of a decode's bytes per second to each is its share of that roofline.
"""
import argparse
import statistics
import time

import torch

from mpitpi.bench import memory_bandwidth_gbs


def passes(t: torch.Tensor, n: int) -> list[float]:
    """GB/s of n sums of t, one figure a pass."""
    out = []
    for _ in range(n):
        t0 = time.perf_counter()
        t.sum()
        out.append(t.numel() * t.element_size() / (time.perf_counter() - t0) / 1e9)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=40)
    p.add_argument("--mb", type=int, default=768, help="size of the fp32 tensor (MB)")
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    big = torch.ones(args.mb * 2**20 // 4)
    wide = torch.ones(500_000_000 // 8, dtype=torch.int64)
    print(f"time      bench | fp32 {args.mb} MB best median | int64 500 MB best median")
    for _ in range(args.rounds):
        bench = memory_bandwidth_gbs()
        f, i = passes(big, 5), passes(wide, 5)
        print(f"{time.strftime('%H:%M:%S')} {bench:6.1f} | {max(f):6.1f} "
              f"{statistics.median(f):6.1f} | {max(i):6.1f} {statistics.median(i):6.1f}",
              flush=True)


if __name__ == "__main__":
    main()
