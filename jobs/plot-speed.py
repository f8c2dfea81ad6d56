"""Summarise a jobs/bench.sh run: python jobs/plot-speed.py OUT -> OUT/summary.md, speed.png.

Rows n* are SmolLM2 (compared with transformers.json of the same run); rows big-* are the
llama-3.2-1b shape (random weights: compared with the roofline and with its fp32 row).
"""
import glob
import json
import os
import sys

out = sys.argv[1]
hf = json.load(open(os.path.join(out, "transformers.json")))
lc_path = os.path.join(out, "llamacpp.json")
lc = json.load(open(lc_path)) if os.path.isfile(lc_path) else None
cpu_path = os.path.join(out, "cpu.txt")
cpu = open(cpu_path).read().strip() if os.path.isfile(cpu_path) else "unknown CPU"


def load(pattern):
    return [(os.path.basename(f)[:-5], json.load(open(f)))
            for f in sorted(glob.glob(os.path.join(out, pattern)))]


def row(name, r, vs):
    ms, roof = r["ms_per_token"], r["roofline_ms_per_token"]
    rss = " / ".join(f"{x['peak_rss_mb']:.0f}" for x in r["ranks"])
    return (f"| {name} | {ms:.1f} | {vs} | {r['ttft_ms']:.0f} ms | {roof:.1f} | "
            f"{100 * roof / ms:.0f}% | {rss} |")


small, big = load("n*.json"), load("big-*.json")
head = ["| setting | ms/token | ratio | TTFT | roofline ms/token | % of roofline |"
        " peak RSS MB per rank |", "|---|---|---|---|---|---|---|"]


def vs(ms: float) -> str:
    """ms/token over transformers' (and over llama.cpp's, when it ran) in this run."""
    return f"{ms / hf['ms_per_token']:.2f}" + (f" / {ms / lc['ms_per_token']:.2f}" if lc else "")


lines = [f"Host: {cpu}", "", "SmolLM2-135M, ratio = ms/token over transformers'" +
         (" / over llama.cpp's (same GGUF)" if lc else "") + " in this run", ""] + head + [
    f"| transformers generate, 2 threads | {hf['ms_per_token']:.1f} | {vs(hf['ms_per_token'])} | "
    f"{hf['ttft_ms']:.0f} ms | - | - | - |"]
if lc:
    lines.append(f"| llama.cpp, {os.path.basename(lc['file'])}, 2 threads | "
                 f"{lc['ms_per_token']:.1f} | {vs(lc['ms_per_token'])} | {lc['ttft_ms']:.0f} ms "
                 f"| - | - | {lc['peak_rss_mb']:.0f} |")
lines += [row(n, r, vs(r["ms_per_token"])) for n, r in small]
if big:
    fp32 = {n.split("-")[1]: r["ms_per_token"] for n, r in big if n.endswith("fp32")}
    lines += ["", "llama-3.2-1b shape, ratio = fp32's ms/token at the same N / this row's", ""]
    lines += head + [row(n, r, f"{fp32.get(n.split('-')[1], float('nan')) / r['ms_per_token']:.2f}")
                     for n, r in big]
open(os.path.join(out, "summary.md"), "w").write("\n".join(lines) + "\n")
print("\n".join(lines))
try:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
except ImportError:
    sys.exit(0)
panels = [("SmolLM2-135M", [("transformers", hf)] + ([("llama.cpp", lc)] if lc else []) +
            small)] + ([("llama-3.2-1b shape", big)]
                                                               if big else [])
fig, axes = plt.subplots(1, len(panels), figsize=(7 * len(panels), 4.5), squeeze=False)
for ax, (title, rows) in zip(axes[0], panels):
    names = [n for n, _ in rows]
    vals = [r["ms_per_token"] for _, r in rows]
    ax.bar(names, vals, color=["gray" if n in ("transformers", "llama.cpp") else "C0"
                               for n in names])
    roofs = [r.get("roofline_ms_per_token") for _, r in rows]
    ax.scatter([i for i, v in enumerate(roofs) if v], [v for v in roofs if v], color="C3",
               marker="_", s=400, label="memory roofline", zorder=3)
    for i, v in enumerate(vals):
        ax.text(i, v, f"{v:.1f}", ha="center", va="bottom", fontsize=8)
    ax.set_title(title)
    ax.set_ylabel("decode ms/token (median)")
    ax.tick_params(axis="x", rotation=45)
    ax.legend()
fig.tight_layout()
fig.savefig(os.path.join(out, "speed.png"), dpi=110)
