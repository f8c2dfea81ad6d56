#!/usr/bin/env bash
# Memory-scheduler benchmark: resident vs --window 2 vs --window 4, with and without
# --drop-cache, at N = 1 and 2, on a random checkpoint with llama-3.2-1b's shapes (RANKS=
# skips these); then int4 at Llama-2-70B and Llama-3.1-405B widths and the 1B shape's int4
# against fp32 streamed from a cold cache (WIDE=0 skips those; see below).
# Results: one JSON per setting under $OUT, and a summary table on stdout.
set -euo pipefail
cd "$(dirname "$0")/.."
MODEL=${MODEL:-bench/llama-3.2-1b}     # made with: mpitpi synth --shape llama-3.2-1b --out …
OUT=${OUT:-bench/memory-$(date +%Y%m%d-%H%M%S)}
RANKS=${RANKS-"1 2"}
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

# int4 at big widths (WIDE=0 skips): random checkpoints with a few layers of Llama-2-70B and
# Llama-3.1-405B (bench/llama-2-70b-2l 4.3 GB, bench/llama-3.1-405b-1l 14.8 GB, made once and
# kept), split to int4 (split's own peak RSS by /usr/bin/time -v), then one generation with
# --window 2 --drop-cache; every rank's peak RSS against the issue's targets (70B: 600 MB on
# 8 ranks, 405B: 1000 MB on 16). Then the llama-3.2-1b shape at N = 1, window 2, page cache
# dropped: int4 against fp32 per token. Automatic shards go under $MPITPI_CACHE (bench/cache).
WIDE=${WIDE:-1}
export MPITPI_CACHE=${MPITPI_CACHE:-bench/cache}
wide() {   # name shape layers ranks target_mb
  local name=$1 shape=$2 layers=$3 n=$4 target=$5
  local model=bench/$shape-${layers}l shards=bench/$shape-${layers}l-n$4-int4
  [ -d "$model" ] || "$VENV/bin/mpitpi" synth --shape "$shape" --layers "$layers" \
    --out "$model" 2>/dev/null
  [ -f "$shards/manifest.json" ] || /usr/bin/time -v -o "$OUT/$name-split.time" \
    "$VENV/bin/mpitpi" split "$model" --out "$shards" -n "$n" --dtype int4 2>/dev/null >/dev/null
  sync   # cold first reads too: drop the shard files' pages (only theirs) before the run
  "$VENV/bin/python" -c "import glob, os, sys
for p in glob.glob(os.path.join(sys.argv[1], 'rank*.h5')):
    fd = os.open(p, os.O_RDONLY); os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED); os.close(fd)
" "$shards"
  "$VENV/bin/mpiexec" -n "$n" "$VENV/bin/mpitpi" generate --model "$model" --shards "$shards" \
    --window 2 --drop-cache --prompt-ids 1,2,3 --max-tokens 4 --ignore-eos --json \
    > "$OUT/$name.json" 2>/dev/null
  "$VENV/bin/python" - "$OUT/$name.json" "$name" "$target" "$shards" \
    "$OUT/$name-split.time" <<'PY'
import json, os, re, sys
r = json.load(open(sys.argv[1]))
rss, target = r["peak_rss_mb"], float(sys.argv[3])
sizes = [f["size"] for f in json.load(open(os.path.join(sys.argv[4], "manifest.json")))["files"]]
try:
    split = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)",
                          open(sys.argv[5]).read()).group(1)) / 1024
    split = f"{split:.0f} MB"
except (OSError, AttributeError):
    split = "(split earlier)"
print(f"{sys.argv[2]:14s} {len(rss)} ranks int4 window 2 --drop-cache: peak RSS "
      f"{min(rss):.0f}-{max(rss):.0f} MB (target {target:.0f}: "
      f"{'met' if max(rss) <= target else 'NOT met'}), {r['ms_per_token']:.0f} ms/token; "
      f"split peak RSS {split}; shard {max(sizes) / 1e6:.0f} MB per rank")
PY
}
if [ "$WIDE" = 1 ]; then
  wide 70b-2l-n8 llama-2-70b 2 8 600
  wide 405b-1l-n16 llama-3.1-405b 1 16 1000
  for dt in fp32 int4; do
    "$VENV/bin/mpitpi" bench --model "$MODEL" --dtype "$dt" --window 2 --drop-cache \
      --prompt-len 32 --gen-len "$GEN" --reps "$REPS" --disk --json "$OUT/1b-n1-$dt.json" \
      2>/dev/null >/dev/null
    "$VENV/bin/python" -c "import json,sys; r=json.load(open(sys.argv[1])); print(f'llama-3.2-1b \
n1 {sys.argv[2]:4s} window 2 --drop-cache: {r[\"ms_per_token\"]:7.1f} ms/token, TTFT \
{r[\"ttft_ms\"]:.0f} ms, peak RSS {r[\"ranks\"][0][\"peak_rss_mb\"]:.0f} MB')" \
      "$OUT/1b-n1-$dt.json" "$dt"
  done
fi
