"""`mpitpi bench` reports every field with plausible values (a tiny model; no timing asserts)."""
import json

import pytest

from conftest import run_mpi
from mpitpi import lookahead


@pytest.mark.parametrize("n,extra", [(1, []), (2, ["--window", "2", "--disk"])])
def test_bench_json_fields(models, tmp_path, n, extra):
    folder, _ = models("llama-deep")
    out = tmp_path / "bench.json"
    r = run_mpi(n, ["bench", "--model", folder, "--prompt-len", "64", "--gen-len", "8",
                    "--reps", "2", "--json", str(out), *extra])
    assert r.returncode == 0, r.stderr
    b = json.loads(out.read_text())
    assert b["world_size"] == n and b["reps"] == 2 and b["gen_len"] == 8
    assert 0 < b["ms_per_token"] < b["ttft_ms"] * 10
    assert b["tokens_per_s"] == pytest.approx(1e3 / b["ms_per_token"], rel=1e-3)
    assert b["memory_gbs"] > 0 and b["roofline_ms_per_token"] > 0
    assert len(b["ranks"]) == n
    for rank in b["ranks"]:
        assert rank["peak_rss_mb"] > 50
        assert rank["weight_bytes_per_token"] > 0
        assert rank["comm_ms_per_token"] >= 0 and rank["io_wait_ms_per_token"] >= 0
        la = rank["lookahead"]   # tuned (the default): one of its modes by the end
        assert la["setting"] == "auto" and la["mode"] in lookahead.MODES
        assert la["switches"] >= 0
        if n > 1:   # 6 layers x 2 + the embedding
            assert rank["allreduce_calls_per_token"] == 13
            assert rank["allreduce_bytes_per_token"] > 0
    if "--disk" in extra:
        assert b["window"] == 2 and b["disk_bound_ms_per_token"] > 0
        assert all(rank["disk_gbs"] > 0 for rank in b["ranks"])
    assert "ms/token" in r.stdout and "MPITPI_PREFETCH=auto" in r.stdout
