"""All-reduce algorithms: equal to MPI's within fp32 rounding, identical on every rank; the
small helpers (max_all, send_bytes/recv_bytes, with_algorithm) and commbench on real ranks."""
import json
import os
import sys

import pytest

from conftest import run_cmd, run_mpi, MPIEXEC

CHECK = os.path.join(os.path.dirname(__file__), "mpi", "allreduce_check.py")

# Run under mpiexec -n 3. Rank 0 sends rank r (1, 2) a byte pattern of 5 + r * 1000 bytes in
# two messages and gets one back from rank 2; every rank checks max_all and a with_algorithm
# copy; rank 0 prints "ok" and the ranks that got to the end.
HELPERS = """
import numpy as np
import torch
from mpitpi.comm import Comm

c = Comm()
c.polite = True
assert c.max_all(1.5 * c.rank) == 1.5 * (c.size - 1)
assert c.max_all(-1.0) == -1.0


def pattern(r):
    return (np.arange(5 + r * 1000) * (r + 3) % 251).astype(np.uint8)


if c.rank == 0:
    for r in range(1, c.size):
        p = pattern(r)
        c.send_bytes(p[:7], dest=r)
        c.send_bytes(p[7:], dest=r)
    back = np.zeros(64, np.uint8)
    c.recv_bytes(back, source=2)
    assert (back == 200).all()
else:
    got = np.zeros(5 + c.rank * 1000, np.uint8)
    c.recv_bytes(got[:7], source=0)
    c.recv_bytes(got[7:], source=0)
    assert np.array_equal(got, pattern(c.rank))
    if c.rank == 2:
        c.send_bytes(np.full(64, 200, np.uint8), dest=0)
try:
    c.send_bytes(np.zeros(4, np.float32), dest=0)
    raise AssertionError("a float32 buffer was accepted")
except TypeError:
    pass

ring = c.with_algorithm("ring")
assert ring.algorithm == "ring" and ring.polite and ring.rank == c.rank and ring.size == c.size
t = torch.full((10,), float(c.rank))
ring.allreduce_(t)
assert (t == sum(range(c.size))).all() and ring.allreduce_calls == 1 and c.allreduce_calls == 0
done = c.gather_obj(c.rank)
if c.rank == 0:
    print("ok", *done, flush=True)
"""


@pytest.mark.parametrize("n", [2, 3, 4, 5])
def test_star_and_ring_sum_like_mpi(n):
    r = run_cmd([MPIEXEC, "-n", str(n), sys.executable, CHECK], timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["ok", "mpi", "ok", "star", "ok", "ring"]


@pytest.mark.parametrize("n", [3])   # the sums alone at 2-5 ranks: test_star_and_ring_sum_like_mpi
def test_generate_same_tokens_with_every_algorithm(models, n):
    folder, _ = models("llama-gqa")
    got = {}
    for alg in ("mpi", "star", "ring", "auto"):
        r = run_mpi(n, ["generate", "--model", folder, "--prompt-ids", "1,17,42,99",
                        "--max-tokens", "16", "--ignore-eos", "--json", "--allreduce", alg])
        assert r.returncode == 0, r.stderr
        got[alg] = json.loads(r.stdout)["token_ids"]
    assert got["star"] == got["mpi"] and got["ring"] == got["mpi"] and got["auto"] == got["mpi"]


def test_max_all_bytes_and_with_algorithm_on_three_ranks():
    r = run_cmd([MPIEXEC, "-n", "3", sys.executable, "-c", HELPERS], timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["ok", "0", "1", "2"]


# Before importing mpitpi.comm: these variables removed, then sys.argv[1] (JSON) set
SHM_ENV = """
import json, os, sys
for k in ("MPIR_CVAR_CH4_SHM_POSIX_IQUEUE_CELL_SIZE", "MPIR_CVAR_CH4_PACK_BUFFER_SIZE",
          "MPIR_CVAR_CH4_SHM_POSIX_IQUEUE_NUM_CELLS", "MPIR_CVAR_CH4_IPC_CMA_P2P_THRESHOLD"):
    os.environ.pop(k, None)
os.environ.update(json.loads(sys.argv[1]))
import mpitpi.comm
print(json.dumps({k: os.environ.get(k) for k in mpitpi.comm.SHM_DEFAULTS}))
"""


def test_shared_memory_defaults_unless_the_user_sets_one():
    """comm sets MPICH's shared-memory variables before MPI starts, all of them, and none
    where the environment already holds one (they depend on each other)."""
    from mpitpi.comm import SHM_DEFAULTS
    r = run_cmd([sys.executable, "-c", SHM_ENV, "{}"], timeout=60)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout) == SHM_DEFAULTS
    key = "MPIR_CVAR_CH4_IPC_CMA_P2P_THRESHOLD"
    r = run_cmd([sys.executable, "-c", SHM_ENV, json.dumps({key: "65536"})], timeout=60)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout) == {k: "65536" if k == key else None for k in SHM_DEFAULTS}


def test_commbench_reports_every_algorithm_and_size(tmp_path):
    out = tmp_path / "cb.json"
    r = run_mpi(2, ["commbench", "--reps", "3", "--json", str(out)], timeout=120)
    assert r.returncode == 0, r.stderr
    res = json.loads(out.read_text())
    assert res["world_size"] == 2
    assert sorted(res["ms_per_call"]) == ["mpi", "ring", "star"]
    for by_size in res["ms_per_call"].values():
        assert len(by_size) == 7 and all(ms > 0 for ms in by_size.values())
    assert "all-reduce ms per call" in r.stdout


def test_argmax_rows_takes_the_first_of_ties_and_adds_the_offset():
    """Greedy picks on one rank: each row's largest column (the lowest index on a tie, as a
    full argmax), shifted by the rank's first vocabulary row."""
    import torch
    from mpitpi.comm import Comm
    t = torch.tensor([[1.0, 3.0, 3.0, -2.0], [5.0, -1.0, 5.0, 0.0], [-7.0, -9.0, -8.0, -7.5]])
    assert Comm().argmax_rows(t, 10) == [11, 10, 10]
