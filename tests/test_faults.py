"""Reliability: every failure ends the whole job promptly with a clear message; no process
is left behind; nothing of the user's is overwritten.

Each case runs under a timeout, so a hang fails the test instead of freezing the suite.
"""
import json
import os
import signal
import subprocess
import sys
import threading
import time
import uuid

import pytest

from conftest import MPIEXEC, run_mpi, split

IDS = "1,17,42"


def leftovers(marker: str) -> list[int]:
    """PIDs of processes whose command line holds ``marker``."""
    found = []
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                if marker.encode() in f.read():
                    found.append(int(pid))
        except OSError:
            pass
    return found


def rank_pids(marker: str) -> dict[int, int]:
    """rank -> pid of the job's python processes (PMI_RANK from their environment)."""
    out = {}
    for pid in leftovers(marker):
        try:
            with open(f"/proc/{pid}/environ", "rb") as f:
                env = dict(x.split(b"=", 1) for x in f.read().split(b"\0") if b"=" in x)
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                if b"python" not in f.read().split(b"\0")[0]:
                    continue
        except OSError:
            continue
        if b"PMI_RANK" in env:
            out[int(env[b"PMI_RANK"])] = pid
    return out


class Job:
    """A long streaming generation across ``n`` ranks, started in the background."""

    def __init__(self, n: int, extra_env: dict | None = None, args: tuple = ()):
        self.marker = f"mpitpi-fault-{uuid.uuid4().hex[:8]}"
        cmd = [MPIEXEC, "-n", str(n), sys.executable, "-m", "mpitpi", "generate", "--model",
               "smollm2-135m", "--prompt", f"Tell me a very long story. ({self.marker})",
               "--max-tokens", "3000", "--ignore-eos", *args]
        env = {**os.environ, **(extra_env or {})}
        self.p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                  env=env, start_new_session=True)
        self.out, self.err = b"", b""
        self.first_text = threading.Event()
        self.pumps = [threading.Thread(target=self._pump, args=(w,), daemon=True)
                      for w in ("out", "err")]
        for t in self.pumps:
            t.start()

    def _pump(self, which: str) -> None:
        stream = self.p.stdout if which == "out" else self.p.stderr
        while True:
            chunk = stream.read1(4096)
            if not chunk:
                return
            setattr(self, which, getattr(self, which) + chunk)
            if which == "out":
                self.first_text.set()

    def wait_decoding(self, timeout: float = 120) -> None:
        assert self.first_text.wait(timeout), self.err.decode()[-2000:]

    def finish(self, timeout: float) -> float:
        """Seconds until the job ended (fails the test if it did not within ``timeout``)."""
        t0 = time.monotonic()
        try:
            self.p.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(self.p.pid, signal.SIGKILL)
            pytest.fail(f"job still running {timeout}s after the fault: a hang")
        elapsed = time.monotonic() - t0
        for t in self.pumps:      # read the job's output to its end before looking at it
            t.join(timeout=10)
        time.sleep(0.5)
        return elapsed

    def stderr(self) -> str:
        return self.err.decode(errors="replace")

    def kill(self) -> None:
        if self.p.poll() is None:
            os.killpg(self.p.pid, signal.SIGKILL)


@pytest.fixture(scope="module", autouse=True)
def smollm_shards_for_2_ranks():
    """Split once up front, so the timed part of each case measures the fault alone."""
    r = run_mpi(2, ["generate", "--model", "smollm2-135m", "--prompt", "Hi", "--max-tokens",
                    "1"], timeout=300)
    assert r.returncode == 0, r.stderr


def ends_promptly(job: Job, fault, limit: float, label: str) -> None:
    """Once the job decodes, apply ``fault``; the job must end non-zero within ``limit``
    seconds and leave no process behind."""
    try:
        job.wait_decoding()
        fault()
        elapsed = job.finish(timeout=30)
        print(f"[fault-time] {label}: {elapsed:.2f} s")
        assert job.p.returncode != 0
        assert elapsed < limit, elapsed
        assert not leftovers(job.marker)
    finally:
        job.kill()


@pytest.mark.parametrize("victim", [1, 0])
def test_kill9_of_a_rank_mid_generation_ends_the_job(victim):
    job = Job(2)

    def kill():
        pids = rank_pids(job.marker)
        assert sorted(pids) == [0, 1]
        os.kill(pids[victim], signal.SIGKILL)
    ends_promptly(job, kill, 15, f"kill -9 rank {victim}")


@pytest.mark.parametrize("victim", [1, 0])
def test_a_stopped_rank_ends_the_job_with_a_message_naming_it(victim):
    job = Job(2, args=("--stall-timeout", "4"))

    def stop():
        os.kill(rank_pids(job.marker)[victim], signal.SIGSTOP)
    # 4 s without an answer, then a roll call of at most 3 s, then the abort
    ends_promptly(job, stop, 4 + 3 + 5, f"SIGSTOP of rank {victim}, --stall-timeout 4")
    err = job.stderr()
    assert err.count("mpitpi: error") == 1, err
    assert f"rank {victim} (" in err and "stopped answering" in err, err


def test_sigint_ends_a_job_with_a_stopped_rank_at_once():
    job = Job(2)   # the default --stall-timeout of 60 s is not waited for

    def stop_then_interrupt():
        os.kill(rank_pids(job.marker)[1], signal.SIGSTOP)
        time.sleep(1.5)
        os.kill(job.p.pid, signal.SIGINT)
    ends_promptly(job, stop_then_interrupt, 8, "SIGINT with rank 1 stopped")


def test_sigint_to_mpiexec_stops_every_rank():
    job = Job(2)
    ends_promptly(job, lambda: os.kill(job.p.pid, signal.SIGINT), 10, "SIGINT to mpiexec")


def test_exception_on_one_rank_gives_one_message_and_ends_the_job():
    job = Job(3, {"MPITPI_FAULT_INJECT": "2:30"})
    try:
        job.wait_decoding()
        t_text = time.monotonic()
        job.finish(timeout=120)
        print(f"[fault-time] exception on rank 2: {time.monotonic() - t_text:.2f} s after "
              f"the first text")
        err = job.stderr()
        assert job.p.returncode != 0
        assert err.count("internal error on rank") == 1, err
        assert "internal error on rank 2 (" in err and "injected fault at step 30" in err
        assert not leftovers(job.marker)
    finally:
        job.kill()


# -- the input matrix (the rest is in test_errors.py and test_memory.py) -----------------

def fails_with(r, words: str):
    assert r.returncode != 0, r.stdout
    assert words in r.stderr, r.stderr
    assert "Traceback" not in r.stderr, r.stderr
    assert r.stderr.count("mpitpi: error") == 1, r.stderr


def test_a_gguf_that_is_not_one(tmp_path):
    f = tmp_path / "model.gguf"
    f.write_bytes(b"this is not a model" * 100)
    r = run_mpi(2, ["generate", "--model", str(f), "--prompt-ids", IDS])
    fails_with(r, "is not a readable GGUF file")


def test_a_file_that_is_neither(tmp_path):
    f = tmp_path / "weights.bin"
    f.write_bytes(b"\0" * 100)
    r = run_mpi(2, ["generate", "--model", str(f), "--prompt-ids", IDS])
    fails_with(r, "is a file but not a GGUF file")


@pytest.fixture
def split2(models, tmp_path):
    folder, _ = models("llama-gqa")
    return folder, split(folder, tmp_path / "s", 2)


def test_shard_file_missing(split2):
    folder, shards = split2
    os.remove(shards / "rank1.h5")
    r = run_mpi(2, ["generate", "--model", folder, "--shards", str(shards), "--prompt-ids", IDS])
    fails_with(r, "rank1.h5 is missing")


def test_shard_file_truncated(split2):
    folder, shards = split2
    f = shards / "rank0.h5"
    os.truncate(f, os.path.getsize(f) // 2)
    r = run_mpi(2, ["generate", "--model", folder, "--shards", str(shards), "--prompt-ids", IDS])
    fails_with(r, "it is truncated or from another split")


def test_shards_of_another_dtype(split2):
    folder, shards = split2
    r = run_mpi(2, ["generate", "--model", folder, "--shards", str(shards), "--prompt-ids", IDS,
                    "--dtype", "bf16"])
    fails_with(r, "store fp32, not the --dtype bf16 asked for")


def test_shards_of_another_plan(split2):
    folder, shards = split2
    r = run_mpi(2, ["generate", "--model", folder, "--shards", str(shards), "--prompt-ids", IDS,
                    "--ratios", "3,1"])
    fails_with(r, "were made with another split plan")


@pytest.mark.parametrize("content,words", [
    (None, "cannot read prompt file"),
    (b"", "is empty"),
    (b"caf\xe9 au lait", "is not UTF-8 text"),
])
def test_prompt_file_problems(models, tmp_path, content, words):
    folder, _ = models("llama-gqa")
    f = tmp_path / "prompt.txt"
    if content is not None:
        f.write_bytes(content)
    r = run_mpi(2, ["generate", "--model", folder, "--prompt-file", str(f)])
    fails_with(r, words)


def test_prompt_ids_file(models, tmp_path):
    folder, _ = models("llama-gqa")
    f = tmp_path / "ids.txt"
    f.write_text("1, 17\n42\n")
    r = run_mpi(2, ["generate", "--model", folder, "--prompt-ids", f"@{f}", "--max-tokens", "2",
                    "--json"])
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["prompt_tokens"] == 3
    f.write_text("1, seventeen")
    fails_with(run_mpi(2, ["generate", "--model", folder, "--prompt-ids", f"@{f}"]),
               "is not a comma-separated list of integers")


def test_interrupted_split_leaves_nothing_to_trust(models, tmp_path):
    """A split killed midway leaves no folder a later run would take for shards."""
    folder, _ = models("llama-wide")
    out = tmp_path / "s"
    p = subprocess.Popen([sys.executable, "-m", "mpitpi", "split", folder, "--out", str(out),
                          "-n", "2"], stderr=subprocess.PIPE, start_new_session=True)
    deadline = time.monotonic() + 60
    while not any(".partial-" in n for n in os.listdir(tmp_path)):   # writing has begun
        assert time.monotonic() < deadline and p.poll() is None
        time.sleep(0.005)
    p.kill()
    p.wait(timeout=10)
    assert not (out / "manifest.json").exists()
    r = run_mpi(2, ["generate", "--model", folder, "--shards", str(out), "--prompt-ids", IDS])
    assert r.returncode != 0
    assert "not a shard folder" in r.stderr or "does not exist" in r.stderr or \
        "no manifest.json" in r.stderr, r.stderr
