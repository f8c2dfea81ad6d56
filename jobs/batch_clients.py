"""Send N chat requests to a running mpitpi server one at a time, then all at once; print one
JSON object: aggregate tokens/s both ways, their ratio, and whether every answer was the same.

    python jobs/batch_clients.py http://127.0.0.1:8000 [--n 8] [--max-tokens 64]
"""
import argparse
import json
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor

TOPICS = ["a cat", "the sea", "a robot", "bread", "the moon", "a train", "winter", "a violin",
          "a garden", "rain", "a clock", "a bridge", "tea", "a forest", "snow", "a lamp"]


def ask(url: str, content: str, max_tokens: int) -> dict:
    body = json.dumps({"messages": [{"role": "user", "content": content}], "temperature": 0,
                       "max_tokens": max_tokens}).encode()
    req = urllib.request.Request(url + "/v1/chat/completions", body,
                                 {"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=3600) as r:
        return json.load(r)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("url")
    p.add_argument("--n", type=int, default=8)
    p.add_argument("--max-tokens", type=int, default=64)
    a = p.parse_args()
    prompts = [f"Write a short story about {t}." for t in TOPICS[:a.n]]
    ask(a.url, "Hello", 4)                                   # warm-up
    t0 = time.perf_counter()
    alone = [ask(a.url, q, a.max_tokens) for q in prompts]
    t_alone = time.perf_counter() - t0
    t0 = time.perf_counter()
    with ThreadPoolExecutor(a.n) as pool:
        together = list(pool.map(lambda q: ask(a.url, q, a.max_tokens), prompts))
    t_together = time.perf_counter() - t0
    tokens = sum(r["usage"]["completion_tokens"] for r in together)
    same = [x["choices"][0]["message"]["content"] == y["choices"][0]["message"]["content"]
            for x, y in zip(alone, together)]
    print(json.dumps({"clients": a.n, "completion_tokens": tokens,
                      "one_at_a_time_tokens_per_s": round(tokens / t_alone, 2),
                      "concurrent_tokens_per_s": round(tokens / t_together, 2),
                      "ratio": round(t_alone / t_together, 2), "all_same": all(same)}))


if __name__ == "__main__":
    main()
