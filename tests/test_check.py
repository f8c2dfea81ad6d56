"""`mpitpi check` at 2 ranks on a tiny model: a ready job passes and writes nothing; a rank
without C kernels (MPITPI_KERNELS=0 on that rank alone), memory short (--reserve-mb) and a
--local-shards folder holding the user's files each give one problem line and exit 1.
``problems`` is also checked on its own for what one machine cannot provoke (versions that
differ, disks on separate hosts)."""
import json
import os
import shutil
import sys

from conftest import MPIEXEC, run_cmd, run_mpi
from mpitpi.check import Need, Report, problems
from mpitpi.checkpoint import open_checkpoint
from mpitpi.plan import plan_for_args


def _cached_splits() -> set[str]:
    folder = os.path.join(os.environ["MPITPI_CACHE"], "shards")
    return set(os.listdir(folder)) if os.path.isdir(folder) else set()


def test_a_ready_job_passes_and_nothing_is_written(models, tmp_path):
    folder, _ = models("llama-gqa")
    fresh = tmp_path / "never-split"   # a name of its own: no earlier test split it
    shutil.copytree(folder, fresh)
    local = tmp_path / "local"
    before = _cached_splits()
    r = run_mpi(2, ["check", "--model", str(fresh), "--local-shards", str(local), "--json"],
                timeout=120)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["problems"] == []
    r0, r1 = out["ranks"]
    assert [r0["rank"], r1["rank"]] == [0, 1]
    for key in ("python", "mpitpi", "torch", "mpi4py", "mpi"):
        assert r0[key] == r1[key] and r0[key]
    assert r0["kernels"] and r1["kernels"]
    assert r0["state"] == "to split" and r1["state"] == "send"
    assert r1["folder"] == str(local)
    # rank 0 splits every rank's file, rank 1 receives its own: both need that room
    assert 0 < r1["need"]["disk_mb"] < r0["need"]["disk_mb"]
    assert r0["need"]["memory_mb"] > 512            # weights + --reserve-mb
    assert r0["rtt_us"] is None and r1["rtt_us"] > 0 and r1["mb_per_s"] > 0
    assert not local.exists() and _cached_splits() == before
    # the KV cache per 1024 positions: a key and a value per layer and KV head the rank holds,
    # fp32 beside fp32 weights unless --kv-dtype says otherwise
    args = open_checkpoint(str(fresh)).args
    plan = plan_for_args(args, 2, None)
    assert out["kv_dtype"] == "fp32"
    for r, s in zip((r0, r1), plan):
        expect = 2 * args.n_layers * s.n_kv * args.head_dim * 4 * 1024 / 2**20
        assert r["need"]["kv_mb_per_1k"] == round(expect, 3) > 0
    r = run_mpi(2, ["check", "--model", str(fresh), "--local-shards", str(local), "--kv-dtype",
                    "fp16"], timeout=120)
    assert r.returncode == 0, r.stderr
    kv = round(2 * args.n_layers * plan[0].n_kv * args.head_dim * 2 * 1024 / 2**20, 1)
    assert f"KV cache (fp16): up to {kv:.1f} MB per rank per 1024 positions" in r.stdout


def test_each_problem_is_one_line_naming_its_fix(models, tmp_path):
    folder, _ = models("llama-gqa")
    theirs = tmp_path / "theirs"
    theirs.mkdir()
    (theirs / "notes.txt").write_text("the user's")
    args = [sys.executable, "-m", "mpitpi", "check", "--model", folder, "--local-shards",
            str(theirs), "--reserve-mb", "1e9"]
    # MPMD: rank 1 alone runs with the kernels switched off (kernels.py's MPITPI_KERNELS)
    r = run_cmd([MPIEXEC, "-n", "1", *args, ":", "-n", "1", "-env", "MPITPI_KERNELS", "0",
                 *args], timeout=120)
    assert r.returncode == 1, r.stdout + r.stderr
    lines = [ln for ln in r.stdout.splitlines() if ln.startswith("problem: ")]
    assert len(lines) == 3, r.stdout
    kern, mem, folder_line = lines
    assert "rank 1 (" in kern and "no C kernels (MPITPI_KERNELS=0)" in kern and "Fix:" in kern
    assert "(ranks 0,1) has" in mem and "memory available" in mem and "--window" in mem
    assert "rank 1 (" in folder_line and "notes.txt" in folder_line and "Fix:" in folder_line
    assert (theirs / "notes.txt").read_text() == "the user's"
    assert os.listdir(theirs) == ["notes.txt"]


def _report(rank, host, **kw):
    base = dict(rank=rank, host=host, python="3.11.7", mpitpi="0.1.0", torch="2.13.0",
                mpi4py="4.1.2", mpi="MPICH 5.0.2", kernels=True, kernels_why=None,
                memory_mb=8000, folder="/var/tmp/s", disk_mb=100, device=1, writable=True,
                state="send", refused=None)
    return Report(**{**base, **kw})


def test_problems_compares_versions_and_sums_needs_per_host():
    reports = [_report(0, "a", state="to split", folder="/cache/s"),
               _report(1, "b", torch="2.12.0", python="3.11.2", disk_mb=1000),  # Python patch: ok
               _report(2, "b", python="3.12.1", disk_mb=1000),
               _report(3, "c", device=7),
               _report(4, "c", device=8, writable=False)]
    needs = [Need(60, 600, 240, False)] + [Need(60, 600, 60, False) for _ in range(4)]
    found = problems(reports, needs)
    assert len(found) == 4, found
    assert found[0].startswith("rank 1 (b) has torch 2.12.0, rank 0 (a) has 2.13.0. Fix:")
    assert found[1].startswith("rank 2 (b) has python 3.12.1, rank 0 (a) has 3.11.7. Fix:")
    # rank 0 splits all files first: 240 MB where 100 are free; host c's two ranks have a
    # disk each with room
    assert found[2].startswith("host a (rank 0) has 100 MB free for /cache/s, the shards "
                               "need 240 MB. Fix:")
    assert found[3] == ("rank 4 (c) cannot write /var/tmp/s. Fix: give --local-shards "
                        "(rank 0: $MPITPI_CACHE or --shards) a folder this rank may write.")
    # two ranks of one host on one disk: their needs add up (2 x 60 MB > 100 MB)
    short = problems([_report(0, "a", state="split"), _report(1, "b"), _report(2, "b")],
                     [Need(60, 600, 0, True)] + [Need(60, 600, 60, True)] * 2)
    assert short == ["host b (ranks 1,2) has 100 MB free for /var/tmp/s, the shards need "
                     "120 MB. Fix: free disk space there, or put the shards on a larger disk "
                     "(--local-shards, or $MPITPI_CACHE / --shards on rank 0)."]
    # and memory the same way: 3 x 600 MB on a host with 1500 MB available
    tight = [_report(r, "a", memory_mb=1500, state="split") for r in range(3)]
    assert problems(tight, [Need(60, 600, 0, True)] * 3)[0].startswith(
        "host a (ranks 0,1,2) has 1500 MB of memory available, its ranks need 1800 MB")
