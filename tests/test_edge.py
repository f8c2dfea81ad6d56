"""The emulated edge cluster: ranks in separate network namespaces, bytes cross the links."""
import json
import os
import re
import shutil
import subprocess

import pytest

from conftest import run_cmd

SCRIPT = os.path.join(os.path.dirname(__file__), "..", "jobs", "edge-cluster.sh")


def can_make_namespaces() -> str | None:
    """None if this process can create network namespaces, else the reason it cannot."""
    if os.geteuid() != 0:
        return "network namespaces need root"
    if not shutil.which("ip") or not shutil.which("tc"):
        return "iproute2 (ip, tc) is not installed"
    probe = f"mpitpi-probe-{os.getpid()}"
    r = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True)
    if r.returncode != 0:
        return f"ip netns add failed: {r.stderr.strip()}"
    subprocess.run(["ip", "netns", "del", probe], capture_output=True)
    return None


REASON = can_make_namespaces()


@pytest.mark.skipif(REASON is not None, reason=f"cannot emulate a cluster here: {REASON}")
@pytest.mark.parametrize("alg", ["mpi", "ring"])
def test_generate_across_namespaces_and_bytes_cross_the_links(models, alg):
    folder, _ = models("llama-gqa")
    r = run_cmd(["bash", SCRIPT, "-k", "2", "-r", "200mbit", "--", "generate", "--model",
                 folder, "--prompt-ids", "1,17,42,99", "--max-tokens", "8", "--ignore-eos",
                 "--json", "--allreduce", alg], timeout=240)
    assert r.returncode == 0, r.stderr
    res = json.loads(r.stdout)
    assert res["world_size"] == 2 and len(res["token_ids"]) == 8
    passes = len(res["token_ids"])
    links = {int(i): int(tx) for i, tx in re.findall(r"link (\d+) tx_bytes=(\d+)", r.stderr)}
    assert sorted(links) == [0, 1]
    for rank, per_token in enumerate(res["bytes_per_token"]):
        assert per_token > 0
        assert links[rank] >= per_token * passes, (links, res["bytes_per_token"])
    prefix = re.search(r"edge cluster (\S+):", r.stderr).group(1)
    leftover = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    assert prefix not in leftover          # everything it made is gone
