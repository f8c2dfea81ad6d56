"""llama.cpp on the same GGUF, for the same-run comparison (run with bench/llama-venv's python,
which holds llama-cpp-python built from source for this host; never mpitpi's .venv).

python jobs/llamacpp_baseline.py GGUF THREADS PROMPT_LEN GEN_LEN REPS -> JSON on stdout
The prompt is PROMPT_LEN token ids drawn as mpitpi bench draws them (ids 3.., seed 0, from
Python's own generator here: llama.cpp's venv has no torch); greedy decoding with EOS ignored,
as `mpitpi bench` decodes. TTFT is the prompt's evaluation plus the first pick; decode
ms/token the median time of one token's evaluation and pick; peak RSS of this process.
"""
import json
import random
import resource
import statistics
import sys
import time

import numpy as np
from llama_cpp import Llama

path, threads, plen, glen, reps = sys.argv[1], *map(int, sys.argv[2:6])
llm = Llama(model_path=path, n_threads=threads, n_threads_batch=threads,
            n_ctx=plen + glen + 8, verbose=False, logits_all=False)
rng = random.Random(0)
prompt = [rng.randrange(3, llm.n_vocab()) for _ in range(plen)]


def run() -> tuple[float, list[float]]:
    llm.reset()
    t0 = time.perf_counter()
    llm.eval(prompt)
    tok = int(np.argmax(llm.scores[llm.n_tokens - 1]))
    ttft = time.perf_counter() - t0
    steps = []
    for _ in range(glen - 1):
        t0 = time.perf_counter()
        llm.eval([tok])
        tok = int(np.argmax(llm.scores[llm.n_tokens - 1]))
        steps.append(time.perf_counter() - t0)
    return ttft * 1e3, steps


run()   # warm-up
ttft, steps = [], []
for _ in range(reps):
    t, s = run()
    ttft.append(t)
    steps.extend(s)
print(json.dumps({"system": "llama.cpp", "file": path, "threads": threads,
                  "ttft_ms": statistics.median(ttft),
                  "ms_per_token": statistics.median(steps) * 1e3,
                  "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
