"""The sliding-window memory scheduler: same tokens, less memory, clear errors."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest

from conftest import MPIEXEC, run_mpi, split
from mpitpi.errors import MpitpiError
from mpitpi.prefetch import parse_size, plan_residency

IDS = "1,17,42,99,7"


@pytest.mark.parametrize("n", [1, 3])   # alone, and an uneven split of the heads
def test_tokens_identical_resident_window_and_budget(models, n):
    folder, hf = models("llama-deep")
    layer = sum(p.numel() * 4 for k, p in hf.named_parameters() if ".layers.0." in k)
    fixed = sum(p.numel() * 4 for k, p in hf.named_parameters() if ".layers." not in k)
    budget = int((fixed + 4.5 * layer) / n)   # about 2 layers resident + a window of 2
    modes = [[], ["--window", "1"], ["--window", "2"], ["--memory-budget", str(budget)],
             ["--window", "3", "--drop-cache"]]
    got = []
    for mode in modes:
        r = run_mpi(n, ["generate", "--model", folder, "--prompt-ids", IDS, "--max-tokens",
                        "16", "--ignore-eos", "--json", *mode])
        assert r.returncode == 0, r.stderr
        res = json.loads(r.stdout)
        got.append(res["token_ids"])
        if mode and mode[0] == "--memory-budget":   # some layers resident, some streamed
            assert all(0 < k < 6 for k in res["resident_layers"]), res
            assert res["window"] == 2
    assert all(g == got[0] for g in got), got
    assert len(got[0]) == 16


@pytest.mark.parametrize("dtype", ["int4", "int8"])
def test_streamed_integer_layers_are_tiled_again_in_every_slot(models, dtype):
    """A streamed slot is refilled from the shard in plain rows and rearranged into the
    kernels' tiles again (prefetch.Streamed._fill): the tokens equal those of resident
    layers, with windows of one and two slots."""
    folder, _ = models("llama-deep")
    got = []
    for mode in ([], ["--window", "1"], ["--window", "2"]):
        r = run_mpi(2, ["generate", "--model", folder, "--dtype", dtype, "--prompt-ids", IDS,
                        "--max-tokens", "16", "--ignore-eos", "--json", *mode])
        assert r.returncode == 0, r.stderr
        got.append(json.loads(r.stdout)["token_ids"])
    assert all(g == got[0] for g in got) and len(got[0]) == 16, got


def test_window_peak_rss_is_lower_by_the_predicted_amount(models):
    folder, hf = models("llama-wide")   # 16 layers of about 16.8 MB in fp32
    layer = sum(p.numel() * 4 for n, p in hf.named_parameters() if ".layers.0." in n)
    rss = {}
    for mode in ("resident", "window"):
        extra = ["--window", "2"] if mode == "window" else []
        r = run_mpi(1, ["generate", "--model", folder, "--prompt-ids", IDS, "--max-tokens", "4",
                        "--json", *extra])
        assert r.returncode == 0, r.stderr
        rss[mode] = json.loads(r.stdout)["peak_rss_mb"][0] * 2**20
    predicted = (16 - 2) * layer
    assert rss["resident"] - rss["window"] >= predicted / 2, (rss, predicted)


def test_budget_too_small_names_the_smallest_that_works(models):
    folder, _ = models("llama-deep")
    r = run_mpi(2, ["generate", "--model", folder, "--prompt-ids", IDS,
                    "--memory-budget", "10K"])
    assert r.returncode != 0
    assert "--memory-budget" in r.stderr and "is too small" in r.stderr
    assert "Fix: give at least --memory-budget" in r.stderr


def test_plan_residency_and_sizes():
    assert parse_size("1.5G") == int(1.5 * 2**30) and parse_size("800M") == 800 * 2**20
    assert parse_size("2GiB") == 2 * 2**30 and parse_size("4096") == 4096
    with pytest.raises(MpitpiError):
        parse_size("lots")
    # no budget: resident, or window for all
    assert plan_residency(10, 100, 50, None, None) == (10, None)
    assert plan_residency(10, 100, 50, None, 2) == (0, 2)
    # everything fits: resident
    assert plan_residency(10, 100, 50, 1050, None) == (10, None)
    # room for fixed + window 2 + 3 more layers
    assert plan_residency(10, 100, 50, 50 + 200 + 300, None) == (3, 2)
    with pytest.raises(MpitpiError, match="--window must be at least 1"):
        plan_residency(10, 100, 50, None, 0)
    with pytest.raises(MpitpiError, match="at least --memory-budget"):
        plan_residency(10, 2**20, 2**20, 2 * 2**20, None)


def test_shard_changed_mid_run_fails_promptly_on_every_rank(models, tmp_path):
    folder, _ = models("llama-deep")
    shards = split(folder, tmp_path / "s", 2)
    cmd = [MPIEXEC, "-n", "2", sys.executable, "-m", "mpitpi", "generate", "--model", folder,
           "--shards", str(shards), "--prompt-ids", IDS, "--max-tokens", "4000",
           "--ignore-eos", "--window", "2", "--json", "--verbose"]
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         start_new_session=True)
    try:
        seen = ""
        while "[token" not in seen:   # decoding has begun (a timed sleep raced a fast run)
            line = p.stderr.readline()
            assert line, seen + p.communicate()[1]
            seen += line
        assert p.poll() is None, seen
        with open(shards / "rank1.h5", "ab") as f:   # the file changes under the run
            f.write(b"\0" * 16)
        t0 = time.monotonic()
        out, err = p.communicate(timeout=30)
        elapsed = time.monotonic() - t0
    finally:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
    print(f"[fault-time] shard changed mid-run: {elapsed:.2f} s")
    assert p.returncode != 0
    assert "rank1.h5" in err and "changed on disk" in err and "rank 1" in err, err
    assert elapsed < 15
