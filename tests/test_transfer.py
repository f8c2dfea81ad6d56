"""Shards sent once: a rank without its shard gets it from rank 0, checked; never again."""
import json
import os

from conftest import dead_pid, flip_byte, run_mpi, split

IDS = "1,17,42,99"


def generate(folder, shards, local, n=3):
    return run_mpi(n, ["generate", "--model", folder, "--shards", str(shards), "--local-shards",
                       str(local), "--prompt-ids", IDS, "--max-tokens", "8", "--ignore-eos",
                       "--json"])


def test_missing_shards_arrive_verified_and_are_not_sent_again(models, tmp_path):
    folder, _ = models("llama-gqa")
    shards = split(folder, tmp_path / "shards", 3)
    ref = run_mpi(3, ["generate", "--model", folder, "--shards", str(shards), "--prompt-ids",
                      IDS, "--max-tokens", "8", "--ignore-eos", "--json"])
    local = tmp_path / "node{rank}"
    r = generate(folder, shards, local)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["token_ids"] == json.loads(ref.stdout)["token_ids"]
    assert "send rank1.h5" in r.stderr and "send rank2.h5" in r.stderr
    for rank in (1, 2):
        node = tmp_path / f"node{rank}"
        got = (node / f"rank{rank}.h5").read_bytes()
        assert got == (shards / f"rank{rank}.h5").read_bytes()
        assert (node / "manifest.json").exists()
        assert not [p for p in os.listdir(node) if "partial" in p]
    assert not (tmp_path / "node0").exists()     # rank 0 reads the source folder
    stamp = os.stat(tmp_path / "node1" / "rank1.h5").st_mtime_ns
    again = generate(folder, shards, local)
    assert again.returncode == 0, again.stderr
    assert "send rank" not in again.stderr
    assert os.stat(tmp_path / "node1" / "rank1.h5").st_mtime_ns == stamp


def test_a_corrupted_transfer_is_detected_and_not_kept(models, tmp_path):
    folder, _ = models("llama-gqa")
    shards = split(folder, tmp_path / "shards", 2)
    flip_byte(shards / "rank1.h5", -200)     # damaged at the source, after it was split
    r = generate(folder, shards, tmp_path / "node{rank}", n=2)
    assert r.returncode != 0
    assert "the shard sent to rank 1" in r.stderr and "checksum mismatch" in r.stderr
    assert not (tmp_path / "node1" / "rank1.h5").exists()
    assert not (tmp_path / "node1" / "manifest.json").exists()


def test_local_shards_never_replace_a_users_files(models, tmp_path):
    folder, _ = models("llama-gqa")
    shards = split(folder, tmp_path / "shards", 2)
    mine = tmp_path / "node1"
    mine.mkdir()
    (mine / "manifest.json").write_text("my own manifest")
    (mine / "rank1.h5").write_text("my own file")
    r = generate(folder, shards, tmp_path / "node{rank}", n=2)
    assert r.returncode != 0
    assert "holds files that are not mpitpi shards" in r.stderr, r.stderr
    assert "Traceback" not in r.stderr and r.stderr.count("mpitpi: error") == 1, r.stderr
    assert (mine / "manifest.json").read_text() == "my own manifest"
    assert (mine / "rank1.h5").read_text() == "my own file"
    assert sorted(os.listdir(mine)) == ["manifest.json", "rank1.h5"]


def test_what_a_killed_receive_left_is_removed(models, tmp_path):
    folder, _ = models("llama-gqa")
    shards = split(folder, tmp_path / "shards", 2)
    node = tmp_path / "node1"
    node.mkdir()
    (node / f".rank1.h5.partial-{dead_pid()}").write_bytes(b"half a shard")
    r = generate(folder, shards, tmp_path / "node{rank}", n=2)
    assert r.returncode == 0, r.stderr
    assert sorted(os.listdir(node)) == ["manifest.json", "rank1.h5"]
