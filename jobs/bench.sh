#!/usr/bin/env bash
# `make bench`: mpitpi against transformers' generate and the memory roofline, in one run.
# SmolLM2-135M (the bundled GGUF): transformers with 2 threads; mpitpi at N = 1 in fp32 (with
# and without the C kernels), bf16, fp16 and int8, and at N = 2 and 3. Then the llama-3.2-1b
# shape (random weights from `mpitpi synth`, made once under bench/) in fp32, bf16 and int8
# at N = 1 and 2 (BIG=0 skips it). Every mpitpi row carries the roofline measured in its own
# run. Writes $OUT/*.json, $OUT/summary.md and $OUT/speed.png.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
OUT=${OUT:-bench/speed-$(date +%Y%m%d-%H%M%S)}
MODEL=${MODEL:-smollm2-135m}
BIG_MODEL=${BIG_MODEL:-bench/llama-3.2-1b}
PLEN=${PLEN:-32}; GEN=${GEN:-32}; REPS=${REPS:-3}; BIG=${BIG:-1}
mkdir -p "$OUT"
"$VENV/bin/python" jobs/hf_baseline.py "$MODEL" 2 "$PLEN" "$GEN" "$REPS" > "$OUT/transformers.json"
run() {  # run NAME N MODEL ARGS...
  local name=$1 n=$2 model=$3; shift 3
  echo "bench: $name" >&2
  "$VENV/bin/mpiexec" -n "$n" "$VENV/bin/mpitpi" bench --model "$model" --prompt-len "$PLEN" \
    --gen-len "$GEN" --reps "$REPS" --json "$OUT/$name.json" "$@" >/dev/null 2>"$OUT/$name.log"
}
MPITPI_KERNELS=0 run n1-fp32-torch 1 "$MODEL" --dtype fp32
run n1-fp32 1 "$MODEL" --dtype fp32
run n1-bf16 1 "$MODEL" --dtype bf16
run n1-fp16 1 "$MODEL" --dtype fp16
run n1-int8 1 "$MODEL" --dtype int8
run n2-fp16 2 "$MODEL"
run n2-int8 2 "$MODEL" --dtype int8
run n3-fp16 3 "$MODEL"
if [ "$BIG" = 1 ]; then
  [ -f "$BIG_MODEL/config.json" ] || "$VENV/bin/mpitpi" synth --shape llama-3.2-1b \
    --out "$BIG_MODEL"
  for n in 1 2; do
    for dt in fp32 bf16 int8; do
      GEN=16 REPS=2 run "big-n$n-$dt" "$n" "$BIG_MODEL" --dtype "$dt"
    done
  done
fi
"$VENV/bin/python" jobs/plot-speed.py "$OUT"
