"""Bad input: a clear message naming the problem and the fix, a non-zero exit, no hang."""
import json
import os

import pytest

from conftest import flip_byte, run_mpi, split

IDS = "1,17,42"


def fails_with(r, words: str, once: bool = True):
    assert r.returncode != 0, r.stdout
    assert words in r.stderr, r.stderr
    assert "Traceback" not in r.stderr, r.stderr
    if once:   # one message for the job, not one per rank
        assert r.stderr.count("mpitpi: error") == 1, r.stderr


def test_missing_model_folder(tmp_path):
    r = run_mpi(2, ["generate", "--model", str(tmp_path / "nope"), "--prompt-ids", IDS])
    fails_with(r, "does not exist")


def test_unsupported_architecture(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(
        {"architectures": ["GPT2LMHeadModel"], "n_embd": 64}))
    r = run_mpi(2, ["generate", "--model", str(tmp_path), "--prompt-ids", IDS])
    fails_with(r, "unsupported architecture 'GPT2LMHeadModel'")
    assert "LlamaForCausalLM" in r.stderr and "Qwen2ForCausalLM" in r.stderr


def test_config_missing_field(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(
        {"architectures": ["LlamaForCausalLM"], "hidden_size": 64}))
    r = run_mpi(1, ["generate", "--model", str(tmp_path), "--prompt-ids", IDS])
    fails_with(r, "no 'num_attention_heads' field")


def test_truncated_safetensors(models, tmp_path):
    folder, _ = models("llama-gqa")
    bad = tmp_path / "bad"
    bad.mkdir()
    for name in ("config.json", "generation_config.json"):
        (bad / name).write_bytes(open(os.path.join(folder, name), "rb").read())
    data = open(os.path.join(folder, "model.safetensors"), "rb").read()
    (bad / "model.safetensors").write_bytes(data[: len(data) // 2])
    r = run_mpi(2, ["generate", "--model", str(bad), "--prompt-ids", IDS])
    fails_with(r, "is missing, truncated or not safetensors")


def test_a_wrong_lookahead_setting_fails_before_loading(models):
    folder, _ = models("llama-gqa")
    r = run_mpi(2, ["generate", "--model", folder, "--prompt-ids", IDS],
                env={"MPITPI_PREFETCH": "often"})
    fails_with(r, "MPITPI_PREFETCH='often' is not a setting. Fix: auto")
    assert "load rank" not in r.stderr


def test_shards_for_another_world_size(models, tmp_path):
    folder, _ = models("llama-gqa")
    shards = split(folder, tmp_path / "s", 2)
    r = run_mpi(3, ["generate", "--model", folder, "--shards", str(shards), "--prompt-ids", IDS])
    fails_with(r, "were made for 2 ranks but this job has 3")


def test_shards_of_another_model(models, tmp_path):
    folder_a, _ = models("llama-gqa")
    folder_b, _ = models("llama-mha")
    shards = split(folder_a, tmp_path / "s", 2)
    r = run_mpi(2, ["generate", "--model", folder_b, "--shards", str(shards),
                    "--prompt-ids", IDS])
    fails_with(r, "were made from another model")


def test_corrupt_shard_fails_its_checksum(models, tmp_path):
    folder, _ = models("llama-gqa")
    shards = split(folder, tmp_path / "s", 2)
    flip_byte(shards / "rank1.h5", -100)     # inside the last dataset's data
    r = run_mpi(2, ["generate", "--model", folder, "--shards", str(shards), "--prompt-ids", IDS])
    fails_with(r, "rank1.h5")
    assert "[rank 1]" in r.stderr


def test_over_long_prompt(models):
    folder, _ = models("llama-gqa")   # context 256
    r = run_mpi(2, ["generate", "--model", folder, "--prompt-ids", IDS, "--max-tokens", "300"])
    fails_with(r, "beyond the model's context of 256")


def test_token_ids_out_of_range(models):
    folder, _ = models("llama-gqa")   # vocabulary 300
    r = run_mpi(2, ["generate", "--model", folder, "--prompt-ids", "1,299,300"])
    fails_with(r, "outside the vocabulary")


def test_more_ranks_than_heads(models, tmp_path):
    folder, _ = models("llama-odd")   # 6 query heads
    r = run_mpi(1, ["split", folder, "--out", str(tmp_path / "unused"), "-n", "7"])
    fails_with(r, "larger than the model's 6 query heads")
    assert not os.path.exists(tmp_path / "unused")


@pytest.mark.parametrize("ratios,words", [("1,1,1", "has 3 values but the world size is 2"),
                                          ("1,0", "positive")])
def test_bad_ratios(models, ratios, words):
    folder, _ = models("llama-gqa")
    r = run_mpi(2, ["generate", "--model", folder, "--prompt-ids", IDS, "--ratios", ratios])
    fails_with(r, words)


def test_split_never_overwrites_a_users_folder(models, tmp_path):
    folder, _ = models("llama-gqa")
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    r = run_mpi(1, ["split", folder, "--out", str(out), "-n", "2"])
    fails_with(r, "not empty and is not an mpitpi shard folder")
    assert sorted(os.listdir(out)) == ["notes.txt"]
    assert (out / "notes.txt").read_text() == "keep me"
    assert not [p for p in os.listdir(tmp_path) if "partial" in p]


def test_split_replaces_its_own_shard_folder(models, tmp_path):
    folder, _ = models("llama-gqa")
    out = split(folder, tmp_path / "s", 2)
    r = run_mpi(1, ["split", folder, "--out", str(out), "-n", "3"])
    assert r.returncode == 0, r.stderr
    assert sorted(os.listdir(out)) == ["manifest.json", "rank0.h5", "rank1.h5", "rank2.h5"]


def test_logits_out_never_overwrites(models, tmp_path):
    folder, _ = models("llama-gqa")
    f = tmp_path / "mine.npy"
    f.write_text("keep me")
    r = run_mpi(2, ["generate", "--model", folder, "--prompt-ids", IDS,
                    "--logits-out", str(f)])
    fails_with(r, "exists; it is not overwritten")
    assert f.read_text() == "keep me"
