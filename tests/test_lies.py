"""Inputs that lie (mislabelled safetensors, edited manifests, absurd options) are refused with
one clear message before any work, and nothing of the user's is overwritten or left behind."""
import json
import os
import re
import struct
import subprocess
import sys

import pytest
import torch

from conftest import MPIEXEC, dead_pid, run_mpi, split
from mpitpi.checkpoint import open_checkpoint
from mpitpi.config import ModelArgs
from mpitpi.errors import MpitpiError
from mpitpi.loader import open_rank
from mpitpi.sampling import Sampler, SamplingParams
from mpitpi.shards import write_shards

IDS = "1,17,42"


def fails_with(r, words: str):
    assert r.returncode != 0, r.stdout
    assert words in r.stderr, r.stderr
    assert "Traceback" not in r.stderr, r.stderr
    assert r.stderr.count("mpitpi: error") == 1, r.stderr


def copy_model(folder: str, dest, edit_header) -> str:
    """The model in ``folder`` copied to ``dest`` with its safetensors header passed through
    ``edit_header(header) -> header`` (tensor data unchanged)."""
    dest.mkdir()
    for name in ("config.json", "generation_config.json"):
        (dest / name).write_bytes(open(os.path.join(folder, name), "rb").read())
    data = open(os.path.join(folder, "model.safetensors"), "rb").read()
    (n,) = struct.unpack("<Q", data[:8])
    header = edit_header(json.loads(data[8:8 + n]))
    raw = json.dumps(header).encode()
    (dest / "model.safetensors").write_bytes(struct.pack("<Q", len(raw)) + raw + data[8 + n:])
    return str(dest)


def relabel(name: str, **fields):
    def edit(h):
        h[name].update(fields)
        return h
    return edit


Q = "model.layers.0.self_attn.q_proj.weight"
LIES = {
    "f32-data-labelled-f16": (relabel(Q, dtype="F16"), "needs 8192 bytes but its range holds"),
    "negative-offsets": (relabel(Q, data_offsets=[-4, 100]), "data_offsets [-4, 100]"),
    "no-offsets": (lambda h: {**h, Q: {"dtype": "F32", "shape": [64, 64]}}, "data_offsets"),
    "header-a-list": (lambda h: [1, 2], "the header is not a JSON object"),
    "one-d-weight": (lambda h: {**h, Q: {**h[Q], "shape": [4096]}},
                     "has shape [4096] but config.json implies [64, 64]"),
}


@pytest.mark.parametrize("lie", LIES)
def test_a_lying_safetensors_file_is_refused(models, tmp_path, lie):
    folder, _ = models("llama-gqa")
    edit, words = LIES[lie]
    bad = copy_model(folder, tmp_path / "bad", edit)
    with pytest.raises(MpitpiError, match=re.escape(words)):
        open_checkpoint(bad)


def test_a_lying_safetensors_file_ends_the_job_with_one_message(models, tmp_path):
    folder, _ = models("llama-gqa")
    bad = copy_model(folder, tmp_path / "bad", relabel(Q, dtype="F16"))
    r = run_mpi(2, ["generate", "--model", bad, "--prompt-ids", IDS])
    fails_with(r, "needs 8192 bytes but its range holds")


def edit_manifest(shards, edit) -> None:
    path = shards / "manifest.json"
    man = json.loads(path.read_text())
    edit(man)
    path.write_text(json.dumps(man))


def shift_vocab(man):
    man["plan"][0]["vocab"] = [0, 140]
    man["plan"][1]["vocab"] = [140, 300]


def fewer_layers(man):
    man["args"]["n_layers"] = 1


def overlapping_vocab(man):
    man["plan"][1]["vocab"] = [100, 300]


EDITS = {"vocabulary-shifted": (shift_vocab, "holds (150, 64) as vocab/embed"),
         "layer-count": (fewer_layers, "the manifest says the model has 1 layers"),
         "vocabulary-overlap": (overlapping_vocab, "do not follow on from 150"),
         "plan-missing": (lambda m: m.pop("plan"), "field 'plan' missing"),
         "zero-width": (lambda m: m["args"].update(dim=0), "hidden size is 0")}


@pytest.mark.parametrize("edit", EDITS)
def test_an_edited_manifest_is_refused(models, tmp_path, edit):
    folder, _ = models("llama-gqa")
    shards = tmp_path / "s"
    write_shards(open_checkpoint(folder), str(shards), 2, progress=False)
    fn, words = EDITS[edit]
    edit_manifest(shards, fn)
    with pytest.raises(MpitpiError, match=re.escape(words)):
        for rank in range(2):
            open_rank(str(shards), rank, 2, None)


def test_an_edited_manifest_ends_the_job_with_one_message(models, tmp_path):
    folder, _ = models("llama-gqa")
    shards = split(folder, tmp_path / "s", 2)
    edit_manifest(shards, fewer_layers)
    r = run_mpi(2, ["generate", "--model", folder, "--shards", str(shards), "--prompt-ids", IDS])
    fails_with(r, "the manifest says the model has 1 layers")


def test_model_shapes_must_be_positive():
    args = ModelArgs("LlamaForCausalLM", dim=64, n_layers=2, n_heads=8, n_kv_heads=4,
                     head_dim=8, ffn_dim=0, vocab_size=300, norm_eps=1e-5, rope_theta=1e4,
                     max_seq_len=256)
    with pytest.raises(MpitpiError, match="FFN width is 0"):
        args.check("a.gguf")


@pytest.mark.parametrize("field,value", [("temperature", float("nan")), ("top_p", float("nan")),
                                         ("min_p", 1.0), ("repeat_penalty", float("inf")),
                                         ("seed", 2**63), ("top_k", -1), ("temperature", 1e9)])
def test_every_sampling_option_is_checked(field, value):
    with pytest.raises(MpitpiError, match=field.replace("_", "-")) as e:
        SamplingParams(**{field: value}).check()
    assert e.value.field == field


def test_a_tiny_temperature_samples_the_top_token():
    logits = torch.randn(300, generator=torch.Generator().manual_seed(0))
    for t in (1e-39, 1e-300, 5e-324):
        sampler = Sampler(SamplingParams(temperature=t, top_p=0.9, min_p=0.1, seed=1))
        assert sampler(logits, [3, 4]) == int(logits.argmax())


@pytest.mark.parametrize("flags,words", [
    (["--repeat-penalty", "nan"], "repeat-penalty must be"),
    (["--max-tokens", "0"], "--max-tokens must be at least 1"),
])
def test_bad_sampling_flags(models, flags, words):
    folder, _ = models("llama-gqa")
    r = run_mpi(1, ["generate", "--model", folder, "--prompt-ids", IDS, *flags])
    fails_with(r, words)


def test_serve_refuses_a_port_out_of_range():
    r = run_mpi(1, ["serve", "--model", "smollm2-135m", "--port", "70000"])
    fails_with(r, "--port must be in 0..65535")


def test_huge_ratios_are_only_ratios(models):
    folder, _ = models("llama-gqa")
    r = run_mpi(2, ["generate", "--model", folder, "--prompt-ids", IDS, "--ratios",
                    "1e308,1e308", "--max-tokens", "2"])
    assert r.returncode == 0, r.stderr


def test_logits_out_checks_the_name_it_writes(models, tmp_path):
    folder, _ = models("llama-gqa")
    mine = tmp_path / "logits.npy"
    mine.write_text("keep me")
    r = run_mpi(2, ["generate", "--model", folder, "--prompt-ids", IDS,
                    "--logits-out", str(tmp_path / "logits")])
    fails_with(r, "logits.npy' exists; it is not overwritten")
    assert mine.read_text() == "keep me"


def test_split_refuses_a_symlink_before_any_work(models, tmp_path):
    folder, _ = models("llama-gqa")
    (tmp_path / "real").mkdir()
    os.symlink(tmp_path / "real", tmp_path / "link")
    with pytest.raises(MpitpiError, match="is a symbolic link"):
        write_shards(open_checkpoint(folder), str(tmp_path / "link"), 2, progress=False)
    assert os.path.islink(tmp_path / "link") and not os.listdir(tmp_path / "real")


def test_split_onto_an_unwritable_place_is_one_message(models):
    folder, _ = models("llama-gqa")
    r = run_mpi(1, ["split", folder, "--out", "/proc/mpitpi-cannot-write-here", "-n", "2"])
    fails_with(r, "cannot write the shards into /proc/mpitpi-cannot-write-here")


def test_split_removes_what_killed_splits_left(models, tmp_path):
    folder, _ = models("llama-gqa")
    stale = tmp_path / f"s.partial-{dead_pid()}"
    stale.mkdir()
    (stale / "rank0.h5").write_bytes(b"half a file")
    live = tmp_path / f"s.partial-{os.getppid()}"   # a split still running: left alone
    live.mkdir()
    write_shards(open_checkpoint(folder), str(tmp_path / "s"), 2, progress=False)
    assert not stale.exists() and live.exists()


def test_chat_survives_a_line_that_is_not_utf8():
    lines = b"What is 2+2?\n\xff\xfe bad\nWhat is the capital of France?\n"
    p = subprocess.run([MPIEXEC, "-n", "2", sys.executable, "-m", "mpitpi", "chat", "--model",
                        "smollm2-135m", "--max-tokens", "12"], input=lines,
                       capture_output=True, timeout=300)
    assert p.returncode == 0, p.stderr
    answers = p.stdout.decode().strip().splitlines()
    assert len(answers) == 2 and "Paris" in answers[1], p.stdout
    assert b"not valid Unicode" in p.stderr or b"not UTF-8" in p.stderr
    assert b"Traceback" not in p.stderr
