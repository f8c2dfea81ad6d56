"""Hugging Face transformers `generate` on the same model, for the same-run baseline.

python jobs/hf_baseline.py MODEL THREADS PROMPT_LEN GEN_LEN REPS -> JSON on stdout
(MODEL: smollm2-135m, a .gguf file or an HF folder). Decode ms/token is the time of a
GEN_LEN+1-token generation minus a 1-token one, over GEN_LEN, median over REPS.
"""
import json
import os
import statistics
import sys
import time

import torch

from mpitpi.checkpoint import resolve_model

model, threads, plen, glen, reps = sys.argv[1], *map(int, sys.argv[2:6])
torch.set_num_threads(threads)
os.environ["HF_HUB_OFFLINE"] = "1"
from transformers import AutoModelForCausalLM  # noqa: E402

path = resolve_model(model)
if path.endswith(".gguf"):
    m = AutoModelForCausalLM.from_pretrained(os.path.dirname(path),
                                             gguf_file=os.path.basename(path))
else:
    m = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
m.eval()
ids = torch.randint(3, m.config.vocab_size, (1, plen), generator=torch.Generator().manual_seed(0))


def timed(n):
    t0 = time.perf_counter()
    with torch.no_grad():
        m.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0)
    return time.perf_counter() - t0


timed(2)
ttft, per = [], []
for _ in range(reps):
    one = timed(1)
    full = timed(glen + 1)
    ttft.append(one * 1e3)
    per.append((full - one) / glen * 1e3)
print(json.dumps({"system": "transformers", "threads": threads, "ttft_ms":
                  statistics.median(ttft), "ms_per_token": statistics.median(per)}))
