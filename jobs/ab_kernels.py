"""Decode speed of two builds of the C kernels on the same loaded weights, in one process,
alternating: the ratio a kernel change makes, measured under the same background load.

    python jobs/ab_kernels.py SHARDS OTHER_LIB [--rounds 40] [--gen-len 16]

OTHER_LIB is the library another checkout builds, for instance an earlier commit's:

    git worktree add /tmp/old COMMIT
    cd /tmp/old && python -c "from mpitpi import kernels as k; print(k.library_path_or_none())"

On a shared host the memory bandwidth and the arithmetic another tenant leaves move from
second to second, so timing one build after the other compares moments, not builds. Here
the weights are loaded once (tiled as this checkout's loader tiles them: the two builds
must read the same layouts), then rounds of --gen-len greedy tokens run with this
checkout's library and the other one in turn (ABBA order), swapping the library the model
calls between rounds. Prints the median ms per token of each and their ratio, overall and
split by the rounds' speed (a memory that flips between slow and fast moments gives two
answers). World size 1; --threads as for `mpitpi bench`.
"""
import argparse
import ctypes
import statistics

import torch

from mpitpi import fused_step, kernels, lookahead
from mpitpi.comm import Comm
from mpitpi.generate import generate
from mpitpi.loader import start_model
from mpitpi.session import Session

# functions a newer library has and an older one may lack, with what their absence means
OPTIONAL = {"int6_decode_int8": 0}


def load_library(path: str) -> tuple[ctypes.CDLL, ctypes.CDLL]:
    """The library at ``path`` typed as kernels and fused_step type this checkout's: the
    (kernels._lib, fused_step._lib) pair to install while it runs."""
    real_cdll, build = ctypes.CDLL, kernels.build

    class Library(real_cdll):
        def __getattr__(self, name):
            if name in OPTIONAL:
                def stub():
                    return OPTIONAL[name]
                self.__dict__[name] = stub
                return stub
            return super().__getattr__(name)

    ours = kernels._lib, fused_step._lib
    try:
        ctypes.CDLL, kernels.build = Library, (lambda *a, **k: path)
        kernels._lib = fused_step._lib = None
        kernels._load()
        return kernels._lib, fused_step._load()
    finally:
        ctypes.CDLL, kernels.build = real_cdll, build
        kernels._lib, fused_step._lib = ours


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("shards", help="a shard folder made by `mpitpi split -n 1`")
    p.add_argument("other_lib", help="the other build's kernel library (.so)")
    p.add_argument("--rounds", type=int, default=40, help="rounds of each build")
    p.add_argument("--gen-len", type=int, default=16)
    p.add_argument("--prompt-len", type=int, default=16)
    p.add_argument("--threads", default="auto")
    a = p.parse_args()
    comm = Comm()
    if comm.size != 1:
        raise SystemExit("ab_kernels.py runs at world size 1 (plain python).")
    if not kernels.available():
        raise SystemExit("this checkout's kernels are not available: nothing to compare.")
    threads = a.threads if a.threads == "auto" else int(a.threads)
    m = start_model(comm, None, a.shards, threads=threads, progress=False)
    libs = {"this": (kernels._lib, fused_step._load()), "other": load_library(a.other_lib)}
    if libs["other"][0]._name == libs["this"][0]._name:
        raise SystemExit(f"{a.other_lib} is this checkout's own library: nothing to compare.")
    prompt = torch.randint(3, m.args.vocab_size, (a.prompt_len,),
                           generator=torch.Generator().manual_seed(0)).tolist()
    ms: dict[str, list[float]] = {"this": [], "other": []}
    lookahead.control()   # made now, with this library in: a fixed mode is set in it
    try:
        for r in range(a.rounds + 1):   # round 0: a warm-up of each
            for name in (("this", "other") if r % 2 else ("other", "this")):
                kernels._lib, fused_step._lib = libs[name]
                lookahead.control().reapply()   # each library has its own mode
                res = generate(comm, m.model, Session(prompt, a.gen_len), reuse=False)
                if r:
                    ms[name].append(statistics.median(res.step_ms))
    finally:
        kernels._lib, fused_step._lib = libs["this"]
    pairs = list(zip(ms["this"], ms["other"]))
    cut = statistics.median(t + o for t, o in pairs)   # a round's speed: both builds' time
    print(f"{len(pairs)} rounds x {a.gen_len} tokens, {torch.get_num_threads()} threads")
    print(f"{'rounds':10s} {'n':>3s} {'this ms':>8s} {'other ms':>9s} {'this / other':>13s}")
    for label, sel in (("all", pairs), ("faster", [q for q in pairs if sum(q) <= cut]),
                       ("slower", [q for q in pairs if sum(q) > cut])):
        if sel:
            print(f"{label:10s} {len(sel):3d} {statistics.median(t for t, _ in sel):8.2f} "
                  f"{statistics.median(o for _, o in sel):9.2f} "
                  f"{statistics.median(t / o for t, o in sel):13.3f}")


if __name__ == "__main__":
    main()
