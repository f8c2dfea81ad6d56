"""The SLURM job scripts on a real one-node SLURM (jobs/slurm-local.sh, started for this module
in a folder and on ports of its own, stopped at the end): jobs/slurm.sbatch generates the
reference model's greedy text through mpiexec, jobs/slurm-serve.sbatch serves it (ranks
started by srun --mpi=pmi2) until scancel ends the job. CI installs SLURM (.ci/run)."""
import http.client
import json
import os
import re
import socket
import subprocess
import sys
import time

import pytest

from mpitpi.tokenizer import load_tokenizer
from refmodels import reference_greedy

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SLURM_LOCAL = os.path.join(ROOT, "jobs", "slurm-local.sh")
VENV = os.path.dirname(os.path.dirname(sys.executable))
DONE = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY",
        "PREEMPTED", "BOOT_FAIL", "DEADLINE"}


def free_port_pair() -> int:
    """A port p with p and p + 1 free on this host (slurmctld and slurmd)."""
    for _ in range(50):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            p = s.getsockname()[1]
        try:
            with socket.socket() as s:
                s.bind(("", p + 1))
            return p
        except OSError:
            continue
    raise RuntimeError("no two consecutive free ports")


@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    """The environment that reaches a one-node SLURM of this module's own."""
    state = tmp_path_factory.mktemp("slurm") / "state"
    env = {**os.environ, "SLURM_LOCAL_DIR": str(state), "SLURM_LOCAL_NO_ETC": "1",
           "SLURM_LOCAL_PORT": str(free_port_pair())}
    try:
        up = subprocess.run([SLURM_LOCAL, "up"], env=env, capture_output=True, text=True,
                            timeout=120)
        assert up.returncode == 0, up.stdout + up.stderr
        assert f"export SLURM_CONF={state}/slurm.conf" in up.stdout
        again = subprocess.run([SLURM_LOCAL, "up"], env=env, capture_output=True, text=True,
                               timeout=60)
        assert again.returncode == 0 and "already up" in again.stdout, again.stdout + again.stderr
        yield {**env, "SLURM_CONF": f"{state}/slurm.conf", "HF_HUB_OFFLINE": "1"}
    finally:   # also after a failed start: whatever started is stopped
        down = subprocess.run([SLURM_LOCAL, "down"], env=env, capture_output=True, text=True,
                              timeout=60)
    assert down.returncode == 0, down.stdout + down.stderr
    assert not state.exists()


def submit(env: dict, script: str, folder, exports: dict) -> str:
    """sbatch a job script of jobs/ on 1 node x 2 tasks; returns the job id."""
    export = ",".join(["ALL"] + [f"{k}={v}" for k, v in exports.items()])
    r = subprocess.run(["sbatch", "--parsable", "--nodes=1", "--ntasks-per-node=2",
                        "--cpus-per-task=1", f"--chdir={folder}", f"--output={folder}/%j.out",
                        f"--export={export}", os.path.join(ROOT, "jobs", script)],
                       env=env, capture_output=True, text=True, timeout=30)
    assert r.returncode == 0, r.stderr
    return r.stdout.strip().split(";")[0]


def job_state(env: dict, job: str) -> str:
    r = subprocess.run(["scontrol", "-o", "show", "job", job], env=env, capture_output=True,
                       text=True, timeout=30)
    m = re.search(r"JobState=(\S+)", r.stdout)
    return m.group(1) if m else "GONE"


def wait_done(env: dict, job: str, timeout: float) -> str:
    """The job's final state; past ``timeout`` it is cancelled and the test fails."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        state = job_state(env, job)
        if state in DONE or state == "GONE":
            return state
        time.sleep(0.3)
    subprocess.run(["scancel", job], env=env, timeout=30)
    pytest.fail(f"job {job} still {state} after {timeout} s")


def job_env(tmp_path) -> dict:
    """What the job scripts need from this test run: this venv, these sources, the session's
    cache (the C kernels are built once)."""
    return {"VENV": VENV, "PYTHONPATH": ROOT, "MPITPI_CACHE": os.environ["MPITPI_CACHE"],
            "LOCAL_SHARDS": tmp_path / "local"}


def test_generate_job_prints_the_greedy_text(slurm, textmodel, tmp_path):
    folder, hf = textmodel
    tok = load_tokenizer(f"{folder}/tokenizer.json")
    want = tok.decode(reference_greedy(hf, tok.encode("hello world"), 8))
    job = submit(slurm, "slurm.sbatch", tmp_path, {
        **job_env(tmp_path), "MODEL": folder, "PROMPT": "hello world", "MAX_TOKENS": 8,
        "MPITPI_ARGS": "--ignore-eos"})
    state = wait_done(slurm, job, timeout=60)
    out = (tmp_path / f"{job}.out").read_text()
    assert state == "COMPLETED", out[-3000:]
    assert f"mpitpi: job {job}, 2 ranks" in out
    assert "[mpitpi] 8 tokens on 2 ranks" in out
    assert want in out
    # rank 1 received its shard into LOCAL_SHARDS (rank 0 keeps the one it split)
    assert os.path.isfile(tmp_path / "local" / "rank1.h5")


def test_serve_job_answers_until_scancel(slurm, textmodel, tmp_path):
    folder, hf = textmodel
    tok = load_tokenizer(f"{folder}/tokenizer.json")
    ref = reference_greedy(hf, tok.encode("the quick"), 4)
    port = free_port_pair()
    job = submit(slurm, "slurm-serve.sbatch", tmp_path, {
        **job_env(tmp_path), "MODEL": folder, "SERVE_HOST": "127.0.0.1", "SERVE_PORT": port,
        "LAUNCHER": "srun", "API_KEY": "slurm-key"})
    out = tmp_path / f"{job}.out"
    try:
        deadline, health = time.monotonic() + 60, None
        while time.monotonic() < deadline and health != {"status": "ok", "ranks": 2}:
            assert job_state(slurm, job) in ("PENDING", "RUNNING"), out.read_text()[-3000:]
            try:
                c = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
                c.request("GET", "/health")
                health = json.loads(c.getresponse().read())
            except (OSError, ValueError):
                time.sleep(0.3)
        assert health == {"status": "ok", "ranks": 2}, out.read_text()[-3000:]
        assert f"mpitpi: URL http://127.0.0.1:{port}/v1" in out.read_text()
        req = json.dumps({"prompt": "the quick", "max_tokens": 4, "temperature": 0})
        for key, status in ((None, 401), ("slurm-key", 200)):   # API_KEY: through the env
            c = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
            c.request("POST", "/v1/completions", body=req, headers={
                "Content-Type": "application/json",
                **({"Authorization": f"Bearer {key}"} if key else {})})
            r = c.getresponse()
            body = json.loads(r.read())
            assert r.status == status, body
        assert "slurm-key" not in open(out).read()
        n = body["usage"]["completion_tokens"]
        assert n >= 1 and body["choices"][0]["text"] == tok.decode(ref[:n])
    finally:
        subprocess.run(["scancel", job], env=slurm, timeout=30)
    assert wait_done(slurm, job, timeout=30) == "CANCELLED"
    deadline = time.monotonic() + 20    # the state changes at once; the ranks end after it
    while time.monotonic() < deadline and "mpitpi: server stopped" not in out.read_text():
        time.sleep(0.2)
    assert "mpitpi: server stopped" in out.read_text(), out.read_text()[-3000:]
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", port), timeout=5).close()
