"""Summarise a jobs/bench.sh run: python jobs/plot-speed.py OUT -> OUT/summary.md, speed.png."""
import glob
import json
import os
import sys

out = sys.argv[1]
hf = json.load(open(os.path.join(out, "transformers.json")))
rows = []
for f in sorted(glob.glob(os.path.join(out, "n*.json"))):
    r = json.load(open(f))
    name = os.path.basename(f)[:-5]
    rows.append((name, r))
lines = ["| setting | ms/token | x transformers | TTFT | roofline ms/token | % of roofline |"
         " peak RSS MB per rank |", "|---|---|---|---|---|---|---|",
         f"| transformers generate, 2 threads | {hf['ms_per_token']:.1f} | 1.00 | "
         f"{hf['ttft_ms']:.0f} ms | - | - | - |"]
for name, r in rows:
    ms, roof = r["ms_per_token"], r["roofline_ms_per_token"]
    rss = " / ".join(f"{x['peak_rss_mb']:.0f}" for x in r["ranks"])
    lines.append(f"| mpitpi {name} | {ms:.1f} | {ms / hf['ms_per_token']:.2f} | "
                 f"{r['ttft_ms']:.0f} ms | {roof:.1f} | {100 * roof / ms:.0f}% | {rss} |")
open(os.path.join(out, "summary.md"), "w").write("\n".join(lines) + "\n")
print("\n".join(lines))
try:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
except ImportError:
    sys.exit(0)
names = ["transformers"] + [n for n, _ in rows]
vals = [hf["ms_per_token"]] + [r["ms_per_token"] for _, r in rows]
fig, ax = plt.subplots(figsize=(8, 4))
ax.bar(names, vals, color=["gray"] + ["C0"] * len(rows))
ax.set_ylabel("decode ms/token (median)")
ax.set_title("SmolLM2-135M on a 2-core AVX2 machine")
for i, v in enumerate(vals):
    ax.text(i, v, f"{v:.1f}", ha="center", va="bottom")
fig.tight_layout()
fig.savefig(os.path.join(out, "speed.png"), dpi=110)
