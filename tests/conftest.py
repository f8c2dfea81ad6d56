"""Shared fixtures: tiny reference models on disk and a launcher for multi-rank runs."""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys

import pytest

sys.path.insert(0, os.path.dirname(__file__))
import refmodels  # noqa: E402

BIN = os.path.dirname(sys.executable)
MPIEXEC = os.environ.get("MPIEXEC", os.path.join(BIN, "mpiexec"))


def run_mpi(n: int, args: list[str], env: dict | None = None, timeout: float = 180,
            cwd: str | None = None) -> subprocess.CompletedProcess:
    """``mpiexec -n n python -m mpitpi ARGS``; a hang past ``timeout`` kills the job and fails."""
    cmd = [MPIEXEC, "-n", str(n), sys.executable, "-m", "mpitpi", *args]
    return run_cmd(cmd, env=env, timeout=timeout, cwd=cwd)


def run_cmd(cmd: list[str], env: dict | None = None, timeout: float = 180,
            cwd: str | None = None) -> subprocess.CompletedProcess:
    e = refmodels.env()
    e.update(env or {})
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         env=e, cwd=cwd, start_new_session=True)
    try:
        out, err = p.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGKILL)
        out, err = p.communicate()
        pytest.fail(f"timed out after {timeout}s (a hang): {' '.join(cmd)}\n{err[-3000:]}")
    return subprocess.CompletedProcess(cmd, p.returncode, out, err)


def split(folder: str, out, n: int):
    """``mpitpi split folder --out out -n n``, which must succeed; returns ``out``."""
    r = run_mpi(1, ["split", str(folder), "--out", str(out), "-n", str(n)])
    assert r.returncode == 0, r.stderr
    return out


def dead_pid() -> int:
    """A process id no process on this host has (for files a killed process left)."""
    pid = 4_000_000
    while os.path.exists(f"/proc/{pid}"):
        pid -= 1
    return pid


def flip_byte(path, at: int) -> None:
    """Invert the byte ``at`` (negative: from the end) of the file ``path``, in place."""
    data = bytearray(open(path, "rb").read())
    data[at] ^= 0xFF
    open(path, "wb").write(bytes(data))


@pytest.fixture(scope="session")
def models(tmp_path_factory):
    """models(name) -> (folder, transformers model), made once per session."""
    made = {}

    def get(name: str, shard_size: str | None = None):
        key = (name, shard_size)
        if key not in made:
            folder = str(tmp_path_factory.mktemp(name.replace("-", "_")))
            made[key] = (folder, refmodels.save_model(name, folder, shard_size=shard_size))
        return made[key]
    return get


@pytest.fixture(scope="session")
def textmodel(models, tmp_path_factory):
    """(folder, transformers model): the llama-gqa model with a tokenizer.json beside it, for
    tests that give text rather than token ids."""
    folder, hf = models("llama-gqa")
    dst = tmp_path_factory.mktemp("withtok")
    shutil.copytree(folder, dst, dirs_exist_ok=True)
    refmodels.save_tokenizer(str(dst))
    return str(dst), hf


@pytest.fixture(autouse=True)
def shard_cache(tmp_path_factory, monkeypatch):
    """Keep automatically made shards out of the user's ~/.cache."""
    monkeypatch.setenv("MPITPI_CACHE", str(tmp_path_factory.getbasetemp() / "cache"))
