"""Shares for uneven devices: a pure function, tested with hand-made figures."""
import pytest

from mpitpi.errors import MpitpiError
from mpitpi.plan import make_plan
from mpitpi.profile import quantize, solve_shares, weak_ranks

INF = float("inf")


def test_shares_follow_speed():
    s = solve_shares([1, 1, 1, 3], [INF] * 4, 1000, 32)
    assert s == pytest.approx([1 / 6, 1 / 6, 1 / 6, 1 / 2])
    assert sum(s) == pytest.approx(1)


def test_the_example_split_is_1_5x_faster_than_uniform():
    speeds = [1 / 3, 1 / 3, 1 / 3, 1]
    s = solve_shares(speeds, [INF] * 4, 1.0, 32)
    t_auto = max(x / v for x, v in zip(s, speeds))
    t_uniform = max(0.25 / v for v in speeds)
    assert t_uniform / t_auto == pytest.approx(1.5)


def test_memory_caps_and_redistributes():
    # rank 3 is fastest but can hold only 20% of a 1000 MB model
    s = solve_shares([1, 1, 1, 3], [INF, INF, INF, 200], 1000, 32)
    assert s[3] == pytest.approx(0.2)
    assert s[:3] == pytest.approx([0.8 / 3] * 3)


def test_at_least_one_head_each():
    s = solve_shares([1, 1000], [INF, INF], 1000, 8)
    assert s[0] == pytest.approx(1 / 8) and sum(s) == pytest.approx(1)
    plan = make_plan(8, 4, 1000, 500, 2, quantize(s))
    assert all(p.n_q >= 1 for p in plan)
    assert sum(p.n_q for p in plan) == 8 and sum(p.n_ffn for p in plan) == 1000


def test_a_rank_with_too_little_memory_is_named():
    with pytest.raises(MpitpiError, match="rank 2 has 10 MB"):
        solve_shares([1, 1, 1], [INF, INF, 10], 1000, 8)
    with pytest.raises(MpitpiError, match="cannot hold the model"):
        solve_shares([1, 1], [300, 300], 1000, 8)


def test_weak_ranks_are_flagged():
    assert weak_ranks([1, 1, 1, 0.01], 8) == [3]
    assert weak_ranks([1, 1, 1, 1], 8) == []


def test_quantize_is_stable_under_noise():
    assert quantize([0.166, 0.167, 0.168, 0.499]) == quantize([0.1665, 0.1671, 0.166, 0.5])


@pytest.mark.parametrize("n", [3])
def test_ratios_auto_gives_the_uniform_greedy_tokens(models, n):
    import json
    from conftest import run_mpi
    folder, _ = models("llama-gqa")
    base = ["generate", "--model", folder, "--prompt-ids", "1,17,42,99", "--max-tokens", "12",
            "--ignore-eos", "--json"]
    uniform = run_mpi(n, base)
    auto = run_mpi(n, base + ["--ratios", "auto"])
    assert uniform.returncode == 0 and auto.returncode == 0, auto.stderr
    assert json.loads(auto.stdout)["token_ids"] == json.loads(uniform.stdout)["token_ids"]
    assert "GB/s" in auto.stderr and "heads" in auto.stderr   # the table was printed


def test_profile_command_json(models):
    import json
    from conftest import run_mpi
    folder, _ = models("llama-gqa")
    r = run_mpi(2, ["profile", "--model", folder, "--json"])
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert len(out["ranks"]) == 2 and all(x["gbs"] > 0 for x in out["ranks"])
    assert sum(p["q_heads"][1] - p["q_heads"][0] for p in out["plan"]) == 8
    assert len(out["ratios"].split(",")) == 2


def test_cgroup_room_counts_a_slurm_or_container_memory_limit(tmp_path):
    from mpitpi.profile import cgroup_room_mb

    def tree(proc: str, files: dict) -> float:
        (tmp_path / "cgroup").write_text(proc)
        for name, text in files.items():
            (tmp_path / "fs" / name).parent.mkdir(parents=True, exist_ok=True)
            (tmp_path / "fs" / name).write_text(text)
        return cgroup_room_mb(str(tmp_path / "cgroup"), str(tmp_path / "fs"))
    # cgroup v2, a SLURM step's own path: 1 GiB allowed, 256 MiB used
    assert tree("0::/slurm/job_7/step_0\n", {"slurm/job_7/step_0/memory.max": str(2**30),
                                              "slurm/job_7/step_0/memory.current": str(2**28)}
                ) == 768
    # cgroup v1 seen from inside a namespace: only the mount's root has the files
    assert tree("4:memory:/docker/abc\n0::/\n", {"memory/memory.limit_in_bytes": str(2**31),
                                                 "memory/memory.usage_in_bytes": str(2**30),
                                                 "memory.max": "max", "memory.current": "5"}
                ) == 1024
    assert tree("0::/\n", {"memory.max": "max", "memory.current": "5"}) == float("inf")
