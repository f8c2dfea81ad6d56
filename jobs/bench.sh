#!/usr/bin/env bash
# `make bench`: mpitpi against transformers' generate on the same model, in one run.
# SmolLM2-135M (the bundled GGUF): transformers with 2 threads; mpitpi at N = 1 in fp32, bf16
# and fp16 and at N = 2 and 3 in its default dtype. Every mpitpi row carries the memory
# roofline measured in its own run. Writes $OUT/*.json, $OUT/summary.md and $OUT/speed.png.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
OUT=${OUT:-bench/speed-$(date +%Y%m%d-%H%M%S)}
MODEL=${MODEL:-smollm2-135m}
PLEN=${PLEN:-32}; GEN=${GEN:-32}; REPS=${REPS:-3}
mkdir -p "$OUT"
"$VENV/bin/python" jobs/hf_baseline.py "$MODEL" 2 "$PLEN" "$GEN" "$REPS" > "$OUT/transformers.json"
run() {  # run NAME N ARGS...
  local name=$1 n=$2; shift 2
  "$VENV/bin/mpiexec" -n "$n" "$VENV/bin/mpitpi" bench --model "$MODEL" --prompt-len "$PLEN" \
    --gen-len "$GEN" --reps "$REPS" --json "$OUT/$name.json" "$@" >/dev/null 2>&1
}
run n1-fp32 1 --dtype fp32
run n1-bf16 1 --dtype bf16
run n1-fp16 1 --dtype fp16
run n2-default 2
run n3-default 3
"$VENV/bin/python" jobs/plot-speed.py "$OUT"
