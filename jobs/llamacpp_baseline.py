"""llama.cpp on the same GGUF, for the same-run comparison (run with bench/llama-venv's python,
which holds llama-cpp-python built from source for this host; never mpitpi's .venv).

python jobs/llamacpp_baseline.py GGUF THREADS PROMPT_LEN GEN_LEN REPS -> JSON on stdout
The prompt is PROMPT_LEN token ids drawn as mpitpi bench draws them (ids 3.., seed 0, from
Python's own generator here: llama.cpp's venv has no torch); greedy decoding with EOS ignored,
as `mpitpi bench` decodes. TTFT is the prompt's evaluation plus the first pick; decode
ms/token the median time of one token's evaluation and pick; peak RSS of this process.

python jobs/llamacpp_baseline.py --perplexity WINDOWS.json GGUF THREADS -> JSON on stdout
Scores the token windows `mpitpi perplexity --save-windows WINDOWS.json` wrote (mpitpi's
tokenizer, so both score identical tokens) with mpitpi's convention: each window evaluated
from an empty cache, every token after the first scored given the window before it;
perplexity = exp(mean negative log-likelihood), the log-softmax in float64. The KV cache is
fp32, as mpitpi's (llama.cpp's default fp16 cache moved the figure by 0.7% on SmolLM2);
llama.cpp's products still round the activations to 8 bits (Q8_1), mpitpi's prefill not.
"""
import json
import random
import resource
import statistics
import sys
import time

import numpy as np
from llama_cpp import GGML_TYPE_F32, Llama


def speed(path: str, threads: int, plen: int, glen: int, reps: int) -> dict:
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
    return {"system": "llama.cpp", "file": path, "threads": threads,
            "ttft_ms": statistics.median(ttft), "ms_per_token": statistics.median(steps) * 1e3,
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def perplexity(windows_file: str, path: str, threads: int) -> dict:
    with open(windows_file) as f:
        saved = json.load(f)
    windows = saved["windows"]                       # (W, T) token ids
    T = len(windows[0])
    llm = Llama(model_path=path, n_threads=threads, n_threads_batch=threads, n_ctx=T,
                n_batch=T, n_ubatch=T, verbose=False, logits_all=True,
                type_k=GGML_TYPE_F32, type_v=GGML_TYPE_F32)   # an fp32 KV cache, as mpitpi's
    total, n = 0.0, 0
    t0 = time.perf_counter()
    for w in windows:
        llm.reset()                                  # an empty cache: position 0 again
        llm.eval(w)
        z = llm.scores[:T - 1].astype(np.float64)    # (T-1, vocab): logits predicting w[1:]
        top = z.max(-1)
        lse = np.log(np.exp(z - top[:, None]).sum(-1)) + top
        total += float((lse - z[np.arange(T - 1), w[1:]]).sum())
        n += T - 1
    return {"system": "llama.cpp", "file": path, "threads": threads,
            "perplexity": float(np.exp(total / n)), "tokens": n, "windows": len(windows),
            "ctx": saved["ctx"], "seconds": round(time.perf_counter() - t0, 3)}


if __name__ == "__main__":
    if sys.argv[1] == "--perplexity":
        print(json.dumps(perplexity(sys.argv[2], sys.argv[3], int(sys.argv[4]))))
    else:
        print(json.dumps(speed(sys.argv[1], *map(int, sys.argv[2:6]))))
