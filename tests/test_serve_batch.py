"""Fewer round trips per token, across 2 ranks on SmolLM2: concurrent requests decoded
together answer as each does alone, a repeated prefix is reused and reported, a full queue or
KV budget is refused cleanly, drafted tokens leave greedy text unchanged, a file of prompts
runs as one batch, and a chat's second turn reuses the first."""
import json
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from conftest import MPIEXEC, run_mpi
from test_server import STORY, Server

TOPICS = ["a cat", "the sea", "a robot", "bread", "the moon", "a train", "winter", "a violin"]
COPY = ("Repeat this sentence exactly: the quick brown fox jumps over the lazy dog while the "
        "small red hen watches from the old wooden fence.")


def ask(server, content, max_tokens=24, **kw):
    status, body = server.request("POST", "/v1/chat/completions", {
        "messages": [{"role": "user", "content": content}], "max_tokens": max_tokens,
        "temperature": 0, **kw}, timeout=300)
    assert status == 200, body
    return body


@pytest.fixture(scope="module")
def server():
    s = Server(2, ["--max-batch", "8"])
    yield s
    s.stop()


def test_eight_concurrent_requests_answer_as_each_does_alone(server):
    prompts = [f"Write two sentences about {t}." for t in TOPICS]
    alone = [ask(server, p) for p in prompts]
    with ThreadPoolExecutor(8) as pool:
        together = list(pool.map(lambda p: ask(server, p), prompts))
    for a, b in zip(alone, together):
        assert a["choices"][0]["message"]["content"] == b["choices"][0]["message"]["content"]
        assert a["usage"]["completion_tokens"] == b["usage"]["completion_tokens"]
    assert len({a["choices"][0]["message"]["content"] for a in alone}) == 8


def test_a_repeated_prefix_is_reused_and_reported(server):
    first = ask(server, "Tell me about Paris in one sentence.")
    again = ask(server, "Tell me about Paris in one sentence.")
    cached = again["usage"]["prompt_tokens_details"]["cached_tokens"]
    assert cached == again["usage"]["prompt_tokens"] - 1     # all but the last prompt token
    assert first["choices"] == again["choices"]


def test_a_full_queue_gets_429_a_request_past_the_kv_budget_503_and_drafts_change_nothing(
        server):
    plain = ask(server, COPY, max_tokens=40)
    # 60 MB of fp16 keys and values: 4096 positions of SmolLM2's most-KV rank (2 ranks)
    s = Server(2, ["--max-batch", "1", "--max-queue", "1", "--kv-budget", "60M", "--draft",
                   "lookup"])
    try:
        drafted = ask(s, COPY, max_tokens=40)
        assert drafted["choices"][0]["message"] == plain["choices"][0]["message"]
        t = drafted["timings"]
        assert t["draft_accepted"] > 0 and t["forward_passes"] < plain["timings"][
            "forward_passes"]
        status, body = s.request("POST", "/v1/chat/completions", {
            "messages": [{"role": "user", "content": "hi"}], "max_tokens": 6000})
        assert status == 503 and "--kv-budget" in body["error"]["message"], body
        # sampled, so the prompt-lookup drafts seldom hold and each token takes about a pass
        # (greedily the story falls into a loop the drafts predict: 2000 tokens in 3 s); the
        # end-of-text token forbidden, so the story runs for all 4000 (a minute here)
        long = {**STORY, "stream": True, "temperature": 1.0, "seed": 7, "max_tokens": 4000,
                "logit_bias": {"2": -100}}
        first = s.post_raw(long)                   # takes the one slot
        time.sleep(3)
        second = s.post_raw(long)                  # waits in the queue
        time.sleep(1)
        status, body = s.request("POST", "/v1/chat/completions", long)
        assert status == 429 and body["error"]["code"] == "queue_full", body
        first.close()                              # leaving frees the slot: the second runs
        second.settimeout(300)
        got = b""
        while b"\r\n\r\n" not in got:
            got += second.recv(65536)
        assert got.startswith(b"HTTP/1.1 200"), got[:200]
        second.close()                             # its slot is free at its next token
        deadline = time.monotonic() + 20
        while (got := s.request("POST", "/v1/chat/completions", {
                "messages": [{"role": "user", "content": "Say hello."}], "max_tokens": 4}))[0] \
                == 429 and time.monotonic() < deadline:
            time.sleep(0.2)
        assert got[0] == 200 and got[1]["usage"]["completion_tokens"] >= 1, got
    finally:
        s.stop()


def test_generate_with_drafts_makes_the_same_tokens_in_fewer_passes():
    outs = []
    for draft in ("none", "lookup"):
        r = run_mpi(2, ["generate", "--model", "smollm2-135m", "--chat", "--prompt", COPY,
                        "--max-tokens", "40", "--json", "--draft", draft], timeout=300)
        assert r.returncode == 0, r.stderr
        outs.append(json.loads(r.stdout))
    plain, drafted = outs
    assert drafted["token_ids"] == plain["token_ids"]
    assert drafted["forward_passes"] <= 0.5 * len(drafted["token_ids"]) + 1
    assert drafted["draft_accepted"] > 0 and plain["draft_tokens"] == 0


def test_a_prompts_file_runs_as_one_batch_in_input_order(tmp_path):
    lines = [{"messages": [{"role": "user", "content": f"Name {t} in three words."}],
              "max_tokens": 12} for t in TOPICS[:5]]
    lines.insert(2, {"prompt_ids": [1, 2, 3], "max_tokens": 3, "temperature": 0.9, "seed": 1})
    lines.append({"prompt_ids": [1, 2, 3], "max_tokens": 3, "logit_bias": {"42": 100}})
    src = tmp_path / "in.jsonl"
    src.write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    out = tmp_path / "out.jsonl"
    r = run_mpi(2, ["generate", "--model", "smollm2-135m", "--prompts-file", str(src),
                    "--out", str(out), "--max-batch", "4"], timeout=300)
    assert r.returncode == 0, r.stderr
    got = [json.loads(x) for x in out.read_text().splitlines()]
    assert [g["index"] for g in got] == list(range(7))
    assert got[2]["completion_tokens"] == 3
    assert got[6]["token_ids"] == [42, 42, 42]   # logit_bias as in the API
    one = run_mpi(2, ["generate", "--model", "smollm2-135m", "--chat", "--prompt",
                      f"Name {TOPICS[3]} in three words.", "--max-tokens", "12", "--json"],
                  timeout=300)
    assert json.loads(one.stdout)["token_ids"] == got[4]["token_ids"]
    again = run_mpi(1, ["generate", "--model", "smollm2-135m", "--prompts-file", str(src),
                        "--out", str(out)], timeout=120)     # never over the answers
    assert again.returncode != 0 and "not overwritten" in again.stderr
    for line, words in (('{"promt": "y"}', 'needs a "prompt"'),
                        ('{"prompt_ids": [1e999]}', "list of integers"),
                        ('{"prompt": "y", "logit_bias": {"a": 1}}', "logit_bias")):
        bad = tmp_path / "bad.jsonl"
        bad.write_text('{"prompt": "x"}\n' + line + "\n")
        r = run_mpi(1, ["generate", "--model", "smollm2-135m", "--prompts-file", str(bad),
                        "--out", str(tmp_path / "o2.jsonl")], timeout=120)
        assert r.returncode != 0 and "line 2" in r.stderr and words in r.stderr, r.stderr
        assert not (tmp_path / "o2.jsonl").exists()


def test_a_second_chat_turn_reuses_the_first():
    r = subprocess.run([MPIEXEC, "-n", "2", sys.executable, "-m", "mpitpi", "chat", "--model",
                        "smollm2-135m", "--max-tokens", "16"], input="Hello!\nAnd Spain?\n",
                       text=True, capture_output=True, timeout=300)
    assert r.returncode == 0, r.stderr
    turns = [line for line in r.stderr.splitlines() if "prompt tokens cached" in line]
    assert len(turns) == 2, r.stderr
    first, second = (int(t.split(",")[1].split()[0]) for t in turns)
    assert first == 0 and second > 20, turns


def test_a_draft_model_keeps_the_text_and_one_of_another_vocabulary_is_refused(models):
    outs = []
    for extra in ([], ["--draft-model", "smollm2-135m"]):
        r = run_mpi(2, ["generate", "--model", "smollm2-135m", "--dtype", "fp16", "--chat",
                        "--prompt", "Name three rivers in Europe.", "--max-tokens", "24",
                        "--json", *extra], timeout=300)
        assert r.returncode == 0, r.stderr
        outs.append(json.loads(r.stdout))
    plain, drafted = outs
    assert drafted["token_ids"] == plain["token_ids"]
    assert drafted["draft_accepted"] > 0 and drafted["forward_passes"] < plain["forward_passes"]
    folder, _ = models("llama-gqa")                        # a vocabulary of 256 tokens
    r = run_mpi(2, ["generate", "--model", "smollm2-135m", "--prompt", "Hi", "--max-tokens",
                    "4", "--draft-model", folder], timeout=300)
    assert r.returncode != 0 and "vocabulary" in r.stderr and "Traceback" not in r.stderr
