"""Plot the edge-cluster benchmark: python jobs/plot-edge.py OUT_FOLDER [PNG]."""
import glob
import json
import os
import sys

import matplotlib
matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

out = sys.argv[1]
png = sys.argv[2] if len(sys.argv) > 2 else os.path.join(out, "edge.png")
fig, (a1, a2) = plt.subplots(1, 2, figsize=(12, 4.5))

cb = json.load(open(os.path.join(out, "commbench-n4.json")))
for alg, by_size in cb["ms_per_call"].items():
    sizes = sorted(int(s) for s in by_size)
    a1.plot([s / 1024 for s in sizes], [by_size[str(s)] for s in sizes], marker="o", label=alg)
a1.set_xscale("log")
a1.set_yscale("log")
a1.set_xlabel("message size (KiB)")
a1.set_ylabel("all-reduce ms per call (median)")
a1.set_title(f"all-reduce latency, {cb['world_size']} namespaces")
a1.legend()

bars = []
for f in sorted(glob.glob(os.path.join(out, "bench-n*-*.json"))):
    r = json.load(open(f))
    alg = os.path.basename(f).split("-")[2].split(".")[0]
    comm = max(x["comm_ms_per_token"] for x in r["ranks"])
    bars.append((r["world_size"], alg, r["ms_per_token"], comm))
bars.sort()
labels = [f"N={n}\n{alg}" for n, alg, _, _ in bars]
comm = [c for _, _, _, c in bars]
compute = [max(0.0, t - c) for _, _, t, c in bars]
a2.bar(labels, compute, label="compute (and waiting for other ranks)")
a2.bar(labels, comm, bottom=compute, label="inside all-reduce")
a2.set_ylabel("ms per token (median)")
a2.set_title("SmolLM2-135M decode across namespaces")
a2.legend()
fig.tight_layout()
fig.savefig(png, dpi=110)
print(png)
