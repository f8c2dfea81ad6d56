#!/usr/bin/env bash
# Memory-scheduler benchmark: resident vs --window 2 vs --window 4, with and without
# --drop-cache, at N = 1 and 2, on a random checkpoint with llama-3.2-1b's shapes.
# Results: one JSON per setting under $OUT, and a summary table on stdout.
set -euo pipefail
cd "$(dirname "$0")/.."
MODEL=${MODEL:-bench/llama-3.2-1b}     # made with: mpitpi synth --shape llama-3.2-1b --out …
OUT=${OUT:-bench/memory-$(date +%Y%m%d-%H%M%S)}
RANKS=${RANKS:-"1 2"}
GEN=${GEN:-16}
REPS=${REPS:-3}
VENV=${VENV:-.venv}

[ -d "$MODEL" ] || "$VENV/bin/mpitpi" synth --shape llama-3.2-1b --out "$MODEL"
mkdir -p "$OUT"
for n in $RANKS; do
  for mode in resident "window 2" "window 4"; do
    for cache in keep drop; do
      [ "$mode" = resident ] && [ "$cache" = drop ] && continue   # resident reads no disk
      args=()
      [ "$mode" != resident ] && args+=(--window "${mode#window }")
      [ "$cache" = drop ] && args+=(--drop-cache)
      name="n$n-${mode// /}-$cache"
      "$VENV/bin/mpiexec" -n "$n" "$VENV/bin/mpitpi" bench --model "$MODEL" "${args[@]}" \
        --prompt-len 32 --gen-len "$GEN" --reps "$REPS" --disk --json "$OUT/$name.json" \
        2>/dev/null >/dev/null
      "$VENV/bin/python" - "$OUT/$name.json" "$name" <<'PY'
import json, sys
r = json.load(open(sys.argv[1]))
rss = "/".join(f"{x['peak_rss_mb']:.0f}" for x in r["ranks"])
io = max(x["io_wait_ms_per_token"] for x in r["ranks"]) / r["ms_per_token"]
print(f"{sys.argv[2]:22s} TTFT {r['ttft_ms']:8.1f} ms  {r['ms_per_token']:8.1f} ms/token  "
      f"RSS {rss:>11s} MB  io-wait {100 * io:5.1f}%  disk-bound "
      f"{r['disk_bound_ms_per_token']:7.1f} ms  roofline {r['roofline_ms_per_token']:6.1f} ms")
PY
    done
  done
done
