#!/usr/bin/env bash
# `make bench`: mpitpi against transformers' generate, llama.cpp and the memory roofline, in
# one run. SmolLM2-135M (the bundled GGUF): transformers and llama.cpp (same GGUF) with 2
# threads; mpitpi at N = 1 in fp32 (with and without the C kernels), bf16, fp16, int8 and
# int4 (the GGUF's own Q4_1 blocks; int8 also without the fused step, int8 and int4 beside a
# busy core), 200-token prompts per dtype, and N = 2 and 3. Then the llama-3.2-1b shape
# (random weights from `mpitpi synth`, made once under bench/) in fp32, bf16, int8 and int4
# at N = 1 and 2 (BIG=0 skips it, BIG_RANKS=1 runs N = 1 alone), and the perplexity
# cross-check with llama.cpp (jobs/bench-perplexity.sh; PPL=0 skips it). Every
# mpitpi row carries the roofline measured in its own run. Writes $OUT/*.json,
# $OUT/summary.md and $OUT/speed.png.
set -euo pipefail
trap 'kill ${BUSY:-} 2>/dev/null || true' EXIT
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
OUT=${OUT:-bench/speed-$(date +%Y%m%d-%H%M%S)}
MODEL=${MODEL:-smollm2-135m}
BIG_MODEL=${BIG_MODEL:-bench/llama-3.2-1b}
PLEN=${PLEN:-32}; GEN=${GEN:-32}; REPS=${REPS:-3}; BIG=${BIG:-1}; PPL=${PPL:-1}
BIG_RANKS=${BIG_RANKS:-1 2}   # world sizes of the llama-3.2-1b rows
LLAMA_VENV=${LLAMA_VENV:-bench/llama-venv}
mkdir -p "$OUT"
"$VENV/bin/python" -c "from mpitpi.kernels import cpu_model; print(cpu_model())" > "$OUT/cpu.txt"
"$VENV/bin/python" jobs/hf_baseline.py "$MODEL" 2 "$PLEN" "$GEN" "$REPS" > "$OUT/transformers.json"
# llama.cpp (llama-cpp-python built for this host by `make bench`) on the same GGUF
GGUF=$("$VENV/bin/python" -c "from mpitpi.checkpoint import resolve_model as r; print(r('$MODEL'))")
if [ -x "$LLAMA_VENV/bin/python" ] && [ "${GGUF%.gguf}" != "$GGUF" ]; then
  "$LLAMA_VENV/bin/python" jobs/llamacpp_baseline.py "$GGUF" 2 "$PLEN" "$GEN" "$REPS" \
    > "$OUT/llamacpp.json"
fi
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
run n1-int4 1 "$MODEL" --dtype int4
MPITPI_FUSED=0 run n1-int8-unfused 1 "$MODEL" --dtype int8
yes > /dev/null & BUSY=$!            # one busy core beside it, as on an edge device
run n1-int8-busy 1 "$MODEL" --dtype int8
run n1-int4-busy 1 "$MODEL" --dtype int4
MPITPI_FUSED=0 run n1-int8-unfused-busy 1 "$MODEL" --dtype int8
kill $BUSY
for dt in fp32 bf16 fp16 int8 int4; do   # a 200-token prompt: TTFT per dtype
  PLEN=200 GEN=8 run "n1-p200-$dt" 1 "$MODEL" --dtype "$dt"
done
run n2-fp16 2 "$MODEL" --dtype fp16
run n2-int8 2 "$MODEL" --dtype int8
run n2-int4 2 "$MODEL" --dtype int4
run n3-fp16 3 "$MODEL" --dtype fp16
run n3-int4 3 "$MODEL" --dtype int4
if [ "$BIG" = 1 ]; then
  [ -f "$BIG_MODEL/config.json" ] || "$VENV/bin/mpitpi" synth --shape llama-3.2-1b \
    --out "$BIG_MODEL"
  for n in $BIG_RANKS; do
    for dt in fp32 bf16 int8 int4; do
      GEN=16 REPS=2 run "big-n$n-$dt" "$n" "$BIG_MODEL" --dtype "$dt"
    done
  done
fi
# perplexity on mpitpi's docs, ctx 256: mpitpi fp16 and int4 vs llama.cpp -> $OUT/perplexity.json
# (about 10 minutes; PPL=0 skips it)
if [ "$PPL" = 1 ]; then
  OUT="$OUT" MODEL="$MODEL" VENV="$VENV" LLAMA_VENV="$LLAMA_VENV" jobs/bench-perplexity.sh
fi
"$VENV/bin/python" jobs/plot-speed.py "$OUT"
