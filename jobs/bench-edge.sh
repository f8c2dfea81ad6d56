#!/usr/bin/env bash
# Communication benchmark on the emulated edge cluster (jobs/edge-cluster.sh): all-reduce
# latency per algorithm and size across 4 namespaces, then SmolLM2 ms/token at N = 1..4 per
# algorithm, split into compute and all-reduce time. JSON under $OUT; plot with
# `python jobs/plot-edge.py $OUT`.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-bench/edge-$(date +%Y%m%d-%H%M%S)}
RATE=${RATE:-100mbit}
DELAY=${DELAY:-0}          # ms added to every received packet (jobs/netdelay.py)
NS=${NS:-"1 2 3 4"}        # world sizes for the SmolLM2 runs
GEN=${GEN:-16}; REPS=${REPS:-2}
mkdir -p "$OUT"
./jobs/edge-cluster.sh -k 4 -r "$RATE" -d "$DELAY" -- commbench --reps 20 \
  --json "$OUT/commbench-n4.json"
for n in $NS; do
  for alg in mpi star ring; do
    [ "$n" = 1 ] && [ "$alg" != mpi ] && continue      # one rank: nothing to reduce
    ./jobs/edge-cluster.sh -k "$n" -r "$RATE" -d "$DELAY" -- bench --model smollm2-135m \
      --allreduce "$alg" --prompt-len 32 --gen-len "$GEN" --reps "$REPS" \
      --json "$OUT/bench-n$n-$alg.json" >/dev/null
    echo "done n=$n $alg" >&2
  done
done
echo "$OUT"
