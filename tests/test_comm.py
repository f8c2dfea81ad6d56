"""All-reduce algorithms: equal to MPI's within fp32 rounding, identical on every rank."""
import json
import os
import sys

import pytest

from conftest import run_cmd, run_mpi, MPIEXEC

CHECK = os.path.join(os.path.dirname(__file__), "mpi", "allreduce_check.py")


@pytest.mark.parametrize("n", [2, 3, 4, 5])
def test_star_and_ring_sum_like_mpi(n):
    r = run_cmd([MPIEXEC, "-n", str(n), sys.executable, CHECK], timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["ok", "mpi", "ok", "star", "ok", "ring"]


@pytest.mark.parametrize("n", [2, 3])
def test_generate_same_tokens_with_every_algorithm(models, n):
    folder, _ = models("llama-gqa")
    got = {}
    for alg in ("mpi", "star", "ring", "auto"):
        r = run_mpi(n, ["generate", "--model", folder, "--prompt-ids", "1,17,42,99",
                        "--max-tokens", "16", "--ignore-eos", "--json", "--allreduce", alg])
        assert r.returncode == 0, r.stderr
        got[alg] = json.loads(r.stdout)["token_ids"]
    assert got["star"] == got["mpi"] and got["ring"] == got["mpi"] and got["auto"] == got["mpi"]
