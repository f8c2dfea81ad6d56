#!/usr/bin/env bash
# Uneven devices on one machine: 4 ranks, three pinned to core 0 and one to core 1 (MPICH
# binding), so rank 3 is about 3x faster than each of the others. ms/token with uniform
# ratios against --ratios auto, for SmolLM2 and the llama-3.2-1b shape. JSON under $OUT.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
OUT=${OUT:-bench/uneven-$(date +%Y%m%d-%H%M%S)}
MODELS=${MODELS:-"smollm2-135m bench/llama-3.2-1b"}
mkdir -p "$OUT"
for model in $MODELS; do
  [ -e "$model" ] || [ "$model" = smollm2-135m ] || \
    "$VENV/bin/mpitpi" synth --shape llama-3.2-1b --out "$model"
  tag=$(basename "$model")
  for mode in uniform auto; do
    extra=(); [ "$mode" = auto ] && extra=(--ratios auto)
    "$VENV/bin/mpiexec" -bind-to user:0,0,0,1 -n 4 "$VENV/bin/mpitpi" bench --model "$model" \
      --prompt-len 32 --gen-len 16 --reps 3 --json "$OUT/$tag-$mode.json" "${extra[@]}" \
      > "$OUT/$tag-$mode.txt" 2>&1
    "$VENV/bin/python" -c "import json,sys; r=json.load(open(sys.argv[1])); print(sys.argv[2], \
      r['ms_per_token'], 'ms/token, TTFT', r['ttft_ms'])" "$OUT/$tag-$mode.json" "$tag-$mode"
  done
done
