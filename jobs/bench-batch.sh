#!/usr/bin/env bash
# Fewer round trips per token (JSON under $OUT, a summary table on stdout):
#  1. the server on 2 ranks, loopback: 8 chat clients one at a time, then all at once
#     (jobs/batch_clients.py), per dtype in $DTYPES;
#  2. the emulated edge cluster (2 namespaces, $DELAY ms added per packet): the same 8 prompts
#     through `generate --prompts-file` with --max-batch 1 and 8 (the server's engine, no HTTP);
#  3. `mpitpi chat` on 2 ranks, 5 turns: each turn's TTFT and cached prompt tokens;
#  4. --draft lookup against plain greedy on a rewrite task, loopback and at $DELAY ms.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-bench/batch-$(date +%Y%m%d-%H%M%S)}
DTYPES=${DTYPES:-"int4 fp16"}; DELAY=${DELAY:-5}; GEN=${GEN:-64}; EDGE_GEN=${EDGE_GEN:-24}
PY=.venv/bin/python; MPI=.venv/bin/mpiexec; PORT=${PORT:-8391}
mkdir -p "$OUT"
lscpu | grep -E "Model name|Flags" | cut -c1-400 > "$OUT/host.txt"

for d in $DTYPES; do                                     # 1. server, loopback
  $MPI -n 2 .venv/bin/mpitpi serve --model smollm2-135m --dtype "$d" --port "$PORT" \
    > "$OUT/serve-$d.log" 2>&1 &
  pid=$!
  for _ in $(seq 120); do grep -q "serving" "$OUT/serve-$d.log" && break; sleep 1; done
  $PY jobs/batch_clients.py "http://127.0.0.1:$PORT" --n 8 --max-tokens "$GEN" \
    > "$OUT/server-$d.json"
  kill -INT "$pid"; wait "$pid" || true
  echo "server $d: $(cat "$OUT/server-$d.json")"
done

if [ "$(id -u)" = 0 ] && command -v tc >/dev/null; then   # 2. edge cluster, batch 1 vs 8
  for b in 1 8; do
    rm -f "$OUT/edge-out-b$b.jsonl"
    ./jobs/edge-cluster.sh -k 2 -d "$DELAY" -- generate --model smollm2-135m \
      --prompts-file jobs/data/eight-prompts.jsonl --max-tokens "$EDGE_GEN" --max-batch "$b" \
      --out "$OUT/edge-out-b$b.jsonl" --json > "$OUT/edge-b$b.json" 2>/dev/null
    echo "edge ${DELAY}ms batch $b: $(cat "$OUT/edge-b$b.json")"
  done
fi

$MPI -n 2 .venv/bin/mpitpi chat --model smollm2-135m --max-tokens 48 \
  < jobs/data/five-turns.txt > /dev/null 2> "$OUT/chat.log"       # 3. chat turns
grep "prompt tokens cached" "$OUT/chat.log" | tee "$OUT/chat-turns.txt"

for d in none lookup; do                                 # 4. drafts
  $MPI -n 2 .venv/bin/mpitpi generate --model smollm2-135m --chat \
    --prompt-file jobs/data/rewrite.txt --max-tokens 96 --draft "$d" --json \
    > "$OUT/draft-$d-loopback.json" 2>/dev/null
  echo "draft $d loopback: $($PY -c "import json,sys; d=json.load(open(sys.argv[1])); print(d['forward_passes'], len(d['token_ids']), d['ms_per_token'], d['draft_accepted'])" "$OUT/draft-$d-loopback.json")"
  if [ "$(id -u)" = 0 ] && command -v tc >/dev/null; then
    ./jobs/edge-cluster.sh -k 2 -d "$DELAY" -- generate --model smollm2-135m --chat \
      --prompt-file jobs/data/rewrite.txt --max-tokens 96 --draft "$d" --json \
      > "$OUT/draft-$d-edge.json" 2>/dev/null
    echo "draft $d edge: $($PY -c "import json,sys; d=json.load(open(sys.argv[1])); print(d['forward_passes'], len(d['token_ids']), d['ms_per_token'], d['draft_accepted'])" "$OUT/draft-$d-edge.json")"
  fi
done
echo "$OUT"
