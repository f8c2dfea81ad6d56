"""Shards sent once: ranks on hosts without their shard file get it from rank 0 over MPI.

Rank 0 holds the shard folder. Every other rank keeps its shard in a local folder: by default
the same path on its own host (on a shared filesystem that is rank 0's folder itself, and
nothing moves), or ``--local-shards``. A rank whose local copy is missing,
of another size, or from another split receives ``rank{r}.h5`` from rank 0 in chunks, writes
it under a temporary name, checks every dataset's CRC32 against the manifest, and only then
renames it into place beside a copy of the manifest. The next run finds it valid and nothing
is sent again.
"""
from __future__ import annotations

import json
import os

import numpy as np
from tqdm import tqdm

from mpitpi.comm import Comm
from mpitpi.errors import MpitpiError
from mpitpi.shards import MANIFEST, ShardReader, is_shard_folder, read_manifest, remove_stale

CHUNK = 8 * 2**20   # bytes per message


def local_folder(template: str | None, shards: str, rank: int) -> str:
    """Where rank ``rank`` keeps its shard: ``template`` with {rank} filled in, or the shard
    folder itself. Rank 0 always uses the shard folder (it is the source)."""
    if template is None or rank == 0:
        return shards
    return template.replace("{rank}", str(rank))


def _local_manifest(folder: str) -> dict | None:
    try:
        with open(os.path.join(folder, MANIFEST)) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def _sees_source(folder: str, shards: str, man: dict, theirs: dict | None) -> bool:
    """True when ``folder`` is rank 0's shard folder itself (a shared filesystem): then
    nothing is sent, and a missing or damaged file there is reported, not replaced."""
    return os.path.abspath(folder) == os.path.abspath(shards) and theirs == man


def _has_valid(folder: str, rank: int, man: dict, theirs: dict | None) -> bool:
    """True when ``folder`` holds this rank's file of the same split, at full size."""
    entry = man["files"][rank]
    path = os.path.join(folder, entry["file"])
    return (theirs is not None and theirs.get("model") == man["model"]
            and theirs.get("plan") == man["plan"] and theirs.get("dtype") == man["dtype"]
            and theirs.get("files", [])[rank:rank + 1] == [entry]
            and os.path.isfile(path) and os.path.getsize(path) == entry["size"])


def ensure_shards(comm: Comm, shards: str, template: str | None, progress: bool = True) -> str:
    """Collective. Returns the folder holding this rank's valid shard, sending what is missing.

    Raises (on every rank) if a received file fails its checksums or cannot be written.
    """
    man = comm.bcast_obj(read_manifest(shards) if comm.rank == 0 else None)
    folder = local_folder(template, shards, comm.rank)
    theirs = _local_manifest(folder) if comm.rank != 0 else None
    need = (comm.rank != 0 and not _sees_source(folder, shards, man, theirs)
            and not _has_valid(folder, comm.rank, man, theirs))
    comm.checked(lambda: _check_target(folder) if need else None)
    flags = comm.gather_obj(need)                     # collective: every rank calls it
    needs = comm.bcast_obj([r for r, n in enumerate(flags) if n] if comm.rank == 0 else None)

    def move():
        if comm.rank == 0:
            for r in needs:
                _send(comm, shards, r, man, progress)
        elif need:
            _receive(comm, folder, man)
        return None
    if needs:
        comm.checked(move)
    return folder


def _check_target(folder: str) -> None:
    """A folder a shard may be received into: new, empty, or one of mpitpi's shard folders
    (after removing what receives killed on this host left). Anything else is the user's:
    refused, before a byte is sent."""
    if os.path.isdir(folder):
        for name in os.listdir(folder):
            if name.startswith(".") and ".partial-" in name:
                remove_stale(os.path.join(folder, name.split(".partial-")[0]))
    problem = receive_problem(folder)
    if problem:
        raise MpitpiError(problem)


def receive_problem(folder: str) -> str | None:
    """Why a shard may not be received into ``folder`` (a file, or a folder holding the
    user's files), with the fix; None when it may. Changes nothing."""
    if not os.path.exists(folder):
        return None
    if not os.path.isdir(folder):
        return (f"--local-shards {folder!r} is a file, not a folder. Fix: give a folder path "
                f"(e.g. /var/tmp/mpitpi-shards).")
    names = os.listdir(folder)
    if names and not is_shard_folder(folder):
        return (f"--local-shards {folder!r} holds files that are not mpitpi shards (e.g. "
                f"{sorted(names)[0]!r}); nothing in it is replaced. Fix: give an empty "
                f"folder, or one that mpitpi made.")
    return None


def shard_state(folder: str, shards: str, rank: int, man: dict) -> str:
    """What ``ensure_shards`` does for rank ``rank`` keeping its shard in ``folder`` (its
    ``local_folder``): 'source' (rank 0 reads the shard folder), 'shared' (``folder`` is
    rank 0's shard folder, seen through a shared filesystem), 'present' (a valid copy from an
    earlier run) or 'send' (rank 0 sends it). Changes nothing."""
    if rank == 0:
        return "source"
    theirs = _local_manifest(folder)
    if _sees_source(folder, shards, man, theirs):
        return "shared"
    return "present" if _has_valid(folder, rank, man, theirs) else "send"


def _send(comm: Comm, shards: str, r: int, man: dict, progress: bool) -> None:
    entry = man["files"][r]
    size = entry["size"]
    buf = np.empty(CHUNK, np.uint8)
    with open(os.path.join(shards, entry["file"]), "rb") as f, tqdm(
            total=size, unit="B", unit_scale=True, desc=f"send rank{r}.h5",
            disable=not progress) as bar:
        done = 0
        while done < size:
            n = f.readinto(memoryview(buf)[:min(CHUNK, size - done)])
            if not n:   # the source is shorter than the manifest says: send zeros, the
                n = min(CHUNK, size - done)   # receiver's checksums then fail loudly
                buf[:n] = 0
            comm.send_bytes(buf[:n], dest=r)
            done += n
            bar.update(n)


def _receive(comm: Comm, folder: str, man: dict) -> None:
    entry = man["files"][comm.rank]
    size, name = entry["size"], entry["file"]
    buf = np.empty(CHUNK, np.uint8)
    error = None
    tmp = os.path.join(folder, f".{name}.partial-{os.getpid()}")
    man_tmp = os.path.join(folder, f".{MANIFEST}.partial-{os.getpid()}")
    try:
        os.makedirs(folder, exist_ok=True)
        out = open(tmp, "wb")
    except OSError as e:
        error, out = e, None
    done = 0
    while done < size:   # receive everything even after an error: rank 0 must not block
        n = min(CHUNK, size - done)
        comm.recv_bytes(buf[:n], source=0)
        if out is not None:
            try:
                out.write(memoryview(buf)[:n])
            except OSError as e:
                error = error or e
        done += n
    try:
        if out is not None:
            out.close()
        if error is None:
            with open(man_tmp, "w") as f:
                json.dump(man, f, indent=1)
            os.replace(tmp, os.path.join(folder, name))
    except OSError as e:
        error = error or e
    if error is not None:
        for path in (tmp, man_tmp):
            if os.path.exists(path):
                os.remove(path)
        raise MpitpiError(f"cannot write the shard into {folder}: "
                          f"{getattr(error, 'strerror', None) or error}. Nothing was left "
                          f"behind. Fix: give --local-shards a folder this rank can write, "
                          f"with room for {size / 2**20:.0f} MiB.")
    man_path = os.path.join(folder, MANIFEST)
    try:
        reader = ShardReader(folder, comm.rank, man, verify=True)
        try:
            for ds in reader.checksums:
                reader.read(ds)
        finally:
            reader.close()
    except MpitpiError as e:
        os.remove(os.path.join(folder, name))
        os.remove(man_tmp)
        raise MpitpiError(f"the shard sent to rank {comm.rank} ({comm.host}) failed its "
                          f"check: {e}")
    os.replace(man_tmp, man_path)
