"""Logits and greedy tokens of mpitpi across N ranks against transformers on the same weights."""
import json

import numpy as np
import pytest

from conftest import run_mpi
from refmodels import logits_vs_reference, reference_greedy, reference_logits

PROMPT = [1, 17, 42, 99, 7, 230, 5]
N_NEW = 32

CASES = [
    ("llama-gqa", 1, None), ("llama-gqa", 2, None), ("llama-gqa", 3, None),
    ("llama-gqa", 4, None), ("llama-gqa", 3, "2,1,1"),
    ("llama-mha", 3, None),
    ("llama-mqa", 1, None), ("llama-mqa", 3, None),          # more ranks than KV heads
    ("llama-tied", 2, None), ("llama-tied", 4, "1,2,2,3"),
    ("llama3-rope", 3, None),
    ("llama-odd", 4, None), ("llama-odd", 5, None),          # 6 heads, 2 KV heads: uneven
    ("qwen2", 1, None), ("qwen2", 3, "3,2,1"),               # q/k/v biases, tied
    ("mistral", 2, None),                                    # sliding window 8 < 39 positions
]


def check_against_reference(hf, result: dict, logits: np.ndarray, prompt=PROMPT, n=N_NEW):
    ours = result["token_ids"]
    ref = reference_greedy(hf, prompt, n)
    eos = hf.config.eos_token_id
    if len(ours) < n:   # stopped at EOS: the reference made EOS there too
        assert result["finish_reason"] == "stop" and ref[len(ours)] == eos
    assert ours == ref[:len(ours)]
    expect = reference_logits(hf, prompt, ref[:logits.shape[0]]).numpy()
    assert logits.shape == expect.shape
    err = float(np.abs(logits - expect).max())
    assert err <= 1e-4, f"max abs logits difference {err}"


@pytest.mark.parametrize("shape,n,ratios", CASES, ids=lambda v: str(v))
def test_logits_and_greedy_tokens_match_transformers(models, tmp_path, shape, n, ratios):
    folder, hf = models(shape)
    out = tmp_path / "logits.npy"
    args = ["generate", "--model", folder, "--prompt-ids", ",".join(map(str, PROMPT)),
            "--max-tokens", str(N_NEW), "--json", "--logits-out", str(out)]
    if ratios:
        args += ["--ratios", ratios]
    r = run_mpi(n, args)
    assert r.returncode == 0, r.stderr
    result = json.loads(r.stdout)
    assert result["world_size"] == n and len(result["peak_rss_mb"]) == n
    assert result["prompt_tokens"] == len(PROMPT)
    check_against_reference(hf, result, np.load(out))


def test_sharded_checkpoint_and_explicit_split(models, tmp_path):
    """A multi-file checkpoint with an index, split by `mpitpi split`, then --shards."""
    folder, hf = models("llama-gqa", shard_size="60KB")
    import os
    assert os.path.exists(os.path.join(folder, "model.safetensors.index.json"))
    shards = tmp_path / "shards"
    r = run_mpi(1, ["split", folder, "--out", str(shards), "--world-size", "2",
                    "--ratios", "1,3"])
    assert r.returncode == 0, r.stderr
    man = json.loads((shards / "manifest.json").read_text())
    assert man["world_size"] == 2 and [p["q_heads"] for p in man["plan"]] == [[0, 2], [2, 8]]
    out = tmp_path / "logits.npy"
    r = run_mpi(2, ["generate", "--model", folder, "--shards", str(shards), "--prompt-ids",
                    ",".join(map(str, PROMPT)), "--max-tokens", str(N_NEW), "--json",
                    "--logits-out", str(out)])
    assert r.returncode == 0, r.stderr
    check_against_reference(hf, json.loads(r.stdout), np.load(out))


def test_bf16_shards_stay_close(models, tmp_path):
    """bf16 storage: logits close to the fp32 reference (rounding of weights only)."""
    folder, hf = models("llama-gqa")
    out = tmp_path / "logits.npy"
    r = run_mpi(2, ["generate", "--model", folder, "--dtype", "bf16", "--prompt-ids",
                    ",".join(map(str, PROMPT)), "--max-tokens", "4", "--json",
                    "--logits-out", str(out)])
    assert r.returncode == 0, r.stderr
    rel, top1 = logits_vs_reference(hf, PROMPT, json.loads(r.stdout)["token_ids"], np.load(out))
    assert rel < 0.05
    assert top1[0]


@pytest.mark.parametrize("shape,n", [("llama-odd", 5), ("qwen2", 3)])
def test_greedy_without_logits_matches_transformers(models, shape, n):
    """Greedy runs send each rank's best (value, index) instead of gathering all logits."""
    folder, hf = models(shape)
    r = run_mpi(n, ["generate", "--model", folder, "--prompt-ids", ",".join(map(str, PROMPT)),
                    "--max-tokens", str(N_NEW), "--ignore-eos", "--json"])
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["token_ids"] == reference_greedy(hf, PROMPT, N_NEW)
