"""Time the C attention (csrc/decode.c, through fused_step.attend_rows) over a server's worth of
KV caches: L layers x B sequences, each with its own fp32 or fp16 cache of P positions.
"cold" cycles through every layer's caches, as a forward pass does (each layer's keys were
last read a pass ago); "hot" reads layer 0's again and again (the caches in cache).

    python jobs/attend_bench.py [--layers 30] [--rows 8] [--heads 6 2] [--hd 64]
                                [--pos 8 60 120 400]

Prints, per cache dtype, position count and mode, the best of 7 runs: ms for all layers and
ns per key and query head.
"""
import argparse
import time

import numpy as np
import torch

from mpitpi import fused_step, kernels


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--layers", type=int, default=30)
    p.add_argument("--rows", type=int, default=8)
    p.add_argument("--heads", type=int, nargs=2, default=[6, 2], metavar=("Q", "KV"))
    p.add_argument("--hd", type=int, default=64)
    p.add_argument("--pos", type=int, nargs="+", default=[8, 60, 120, 400])
    a = p.parse_args()
    if not kernels.available():
        raise SystemExit("the C kernels are not built: make install")
    torch.set_num_threads(1)
    L, B, (nq, nkv), hd = a.layers, a.rows, a.heads, a.hd
    kv_of_q = torch.arange(nq) * nkv // nq                        # (nq,) grouped
    cap = max(a.pos)
    table = torch.zeros(cap, hd)                                  # rope rows: unused here
    rope = table.data_ptr()
    for dt in (torch.float32, torch.float16):
        for P in a.pos:
            caches = [[(torch.randn(nkv, cap, hd).to(dt), torch.randn(nkv, cap, hd).to(dt))
                       for _ in range(B)] for _ in range(L)]      # (nkv, cap, hd) each
            tables = []
            for layer in caches:
                t = np.zeros((B, fused_step.ROW_WORDS), np.int64)    # row_t of each row
                for b, (k, v) in enumerate(layer):
                    t[b, :4] = k.data_ptr(), v.data_ptr(), rope, rope
                    t[b, 4:] = cap, 0, P - 1, int(dt == torch.float16)
                tables.append(t)
            q = torch.randn(B, nq, hd)
            for mode in ("cold", "hot"):
                best = float("inf")
                for _ in range(7):
                    t0 = time.perf_counter()
                    for i in range(L):
                        fused_step.attend_rows(q, tables[i if mode == "cold" else 0], kv_of_q)
                    best = min(best, time.perf_counter() - t0)
                print(f"{str(dt)[6:]:8} P {P:5} {mode}: {best * 1e3:7.3f} ms for {L} layers, "
                      f"{best / (L * B * nq * P) * 1e9:5.2f} ns per key and query head",
                      flush=True)


if __name__ == "__main__":
    main()
