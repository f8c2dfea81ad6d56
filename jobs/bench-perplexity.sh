#!/usr/bin/env bash
# Perplexity cross-check, a step of jobs/bench.sh (or alone): mpitpi at fp16 and int4 on one
# rank, and llama.cpp on the same GGUF scoring the very token windows mpitpi cut
# (--save-windows), on mpitpi's own README and docs with --ctx 256. The three figures go to
# $OUT/perplexity.json; each run's own JSON to $OUT/ppl-*.json. They should agree within 1%.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
OUT=${OUT:-bench/perplexity-$(date +%Y%m%d-%H%M%S)}
MODEL=${MODEL:-smollm2-135m}
CTX=${CTX:-256}
THREADS=${THREADS:-2}
LLAMA_VENV=${LLAMA_VENV:-bench/llama-venv}

mkdir -p "$OUT"
rm -f "$OUT/ppl-windows.json"          # mpitpi never overwrites it
ppl() {  # ppl DTYPE ARGS...: mpitpi at DTYPE on one rank -> $OUT/ppl-DTYPE.json
  local dt=$1; shift
  echo "bench: perplexity $dt" >&2
  "$VENV/bin/mpiexec" -n 1 "$VENV/bin/mpitpi" perplexity --model "$MODEL" --dtype "$dt" \
    --ctx "$CTX" --threads "$THREADS" --json "$@" > "$OUT/ppl-$dt.json" 2> "$OUT/ppl-$dt.log"
}
ppl fp16 --save-windows "$OUT/ppl-windows.json"
ppl int4
GGUF=$("$VENV/bin/python" -c "from mpitpi.checkpoint import resolve_model as r; print(r('$MODEL'))")
if [ -x "$LLAMA_VENV/bin/python" ] && [ "${GGUF%.gguf}" != "$GGUF" ]; then
  echo "bench: perplexity llama.cpp" >&2
  "$LLAMA_VENV/bin/python" jobs/llamacpp_baseline.py --perplexity "$OUT/ppl-windows.json" \
    "$GGUF" "$THREADS" > "$OUT/ppl-llamacpp.json"
fi
"$VENV/bin/python" - "$OUT" <<'PY'
import json, os, sys
out = sys.argv[1]
def load(name):
    path = os.path.join(out, f"ppl-{name}.json")
    return json.load(open(path)) if os.path.isfile(path) else None
runs = {"mpitpi_fp16": load("fp16"), "mpitpi_int4": load("int4"), "llamacpp": load("llamacpp")}
res = {"ctx": runs["mpitpi_fp16"]["ctx"], "tokens": runs["mpitpi_fp16"]["tokens"],
       "text": runs["mpitpi_fp16"]["text"],
       "perplexity": {k: r and r["perplexity"] for k, r in runs.items()},
       "seconds": {k: r and r["seconds"] for k, r in runs.items()}}
json.dump(res, open(os.path.join(out, "perplexity.json"), "w"), indent=1)
print(json.dumps(res["perplexity"]))
PY
