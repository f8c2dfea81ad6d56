"""Per-rank shard files: write them from a checkpoint once, read one rank's file many times.

A shard folder holds ``manifest.json``, ``rank{r}.h5`` for every rank r, and the model's
tokenizer (``tokenizer.json`` + ``chat.json``) when it has one. Rank r's file holds
only its slices (see plan.py), one HDF5 group per layer:

    vocab/embed            (n_vocab_r, dim)               rows of the embedding table
    vocab/lm_head          (n_vocab_r, dim)               rows of lm_head (untied models only)
    norm                   (dim,)                         final RMSNorm weight
    layers/{i}/wqkv        ((n_q_r + 2 n_kv_r) hd, dim)   column-parallel: q, k, v rows fused
    layers/{i}/bqkv        ((n_q_r + 2 n_kv_r) hd,)       q, k, v biases (Qwen2)
    layers/{i}/wo          (dim, n_q_r hd)                row-parallel: columns of o_proj
    layers/{i}/bo          (dim,)                         o_proj bias, rank 0 only
    layers/{i}/w13         (2 f_r, dim)                   column-parallel: gate rows then up rows
    layers/{i}/b13         (2 f_r,)                       gate/up biases (mlp_bias)
    layers/{i}/w2          (dim, f_r)                     row-parallel: columns of down_proj
    layers/{i}/b2          (dim,)                         down_proj bias, rank 0 only
    layers/{i}/attn_norm   (dim,)
    layers/{i}/ffn_norm    (dim,)

With ``--dtype int8`` every matrix above (embed, lm_head, wqkv, wo, w13, w2) is int8 and has
a ``.scale`` dataset beside it, (rows, ceil(cols / group)) fp32: one scale per output row and
group of 64 columns of this rank's slice, or 32 where the blocks of a GGUF Q8_0 file carried
over (quant.py); vectors are fp32. With ``--dtype int4`` the layer matrices are stored as
(rows, cols / 2) uint8 with ``.scale`` and ``.min`` (rows, cols / 32) fp16 beside them, the
vocabulary matrices as int6 (uint8 with ``.scale`` fp16 and ``.hi`` (rows, cols / 4) uint8:
quant.py), any matrix not a whole number of 32-column blocks wide as int8, and a GGUF
file's own Q4_0/Q4_1/Q8_0 blocks carry over as they are (weights.storage_for).

The manifest names the model (path and fingerprint), ModelArgs, world size, ratios, storage
dtype, the plan and a CRC32 per dataset. A folder without manifest.json is never trusted:
split writes into a staging folder and moves it into place only when complete.
"""
from __future__ import annotations

import ctypes
import json
import os
import shutil
import sys
import zlib

import h5py
import numpy as np
import torch
from tqdm import tqdm

from mpitpi import pages
from mpitpi.checkpoint import Checkpoint
from mpitpi.config import ModelArgs
from mpitpi.errors import MpitpiError
from mpitpi.plan import RankSlice, check_plan, plan_for_args
from mpitpi.quant import BLOCK, GGUF_GROUP, GROUP
from mpitpi.slices import rank_tensors
from mpitpi.tokenizer import load_tokenizer
from mpitpi.weights import DTYPES, VOCAB_DTYPES, from_numpy, stored_arrays

FORMAT = "mpitpi-shards"
VERSION = 1
MANIFEST = "manifest.json"
OWN_FILES = (MANIFEST, "tokenizer.json", "chat.json")   # besides rank*.h5


def rank_file(rank: int) -> str:
    return f"rank{rank}.h5"


def give_back_memory() -> None:
    """Hand freed heap memory back to the system (glibc's malloc_trim; elsewhere nothing).

    Quantizing allocates temporaries of a few MB, below glibc's mmap threshold, between
    HDF5's small allocations; glibc then keeps the freed heap, and a split's RSS grew by
    about 30 MB per rank file written (Llama-2-70B widths, int4, 8 ranks: 470 MB more by
    the end of the vocabulary matrices) without this call after each rank's tensors."""
    try:
        ctypes.CDLL(None).malloc_trim(0)
    except (OSError, AttributeError):
        pass


def is_shard_folder(path: str) -> bool:
    """True if ``path`` holds an mpitpi manifest and nothing but its own files."""
    man = os.path.join(path, MANIFEST)
    if not os.path.isfile(man):
        return False
    try:
        with open(man) as f:
            if json.load(f).get("format") != FORMAT:
                return False
    except (OSError, ValueError):
        return False
    return all(n in OWN_FILES or (n.startswith("rank") and n.endswith(".h5"))
               for n in os.listdir(path))


def check_out_folder(out: str) -> None:
    """Refuse an --out that holds anything of the user's (before any work is done)."""
    if os.path.islink(out):
        raise MpitpiError(f"--out {out!r} is a symbolic link; a split replaces its folder "
                          f"whole, which would replace the link. Fix: pass the folder it "
                          f"points to ({os.path.realpath(out)}) or a new folder.")
    if os.path.exists(out):
        if not os.path.isdir(out):
            raise MpitpiError(f"--out {out!r} is a file, not a folder. Fix: choose a new folder.")
        if os.listdir(out) and not is_shard_folder(out):
            raise MpitpiError(f"--out {out!r} is not empty and is not an mpitpi shard folder; "
                              f"nothing in it is overwritten. Fix: choose a new or empty folder.")


def write_shards(ckpt: Checkpoint, out: str, world_size: int, ratios: list[float] | None = None,
                 dtype: str = "fp32", progress: bool = True,
                 vocab_dtype: str | None = None) -> dict:
    """Split ``ckpt`` into ``out``: one HDF5 file per rank + manifest. Returns the manifest.
    ``vocab_dtype``: the storage of the vocabulary matrices (default: int6 in int4 shards,
    else ``dtype``; weights.storage_for).

    Reads the checkpoint slice by slice (never the whole model). Writes into a staging folder
    beside ``out`` and moves it into place only when every file is complete.
    """
    for flag, d, known in (("--dtype", dtype, DTYPES),
                           ("--vocab-dtype", vocab_dtype or dtype, VOCAB_DTYPES)):
        if d not in known:
            raise MpitpiError(f"{flag} {d!r} is not supported; choose one of "
                              f"{', '.join(known)}.")
    args = ckpt.args
    plan = plan_for_args(args, world_size, ratios)
    check_out_folder(out)
    out = os.path.abspath(out)
    remove_stale(out)
    staging = f"{out}.partial-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    try:
        os.makedirs(staging)
        files = [h5py.File(os.path.join(staging, rank_file(r)), "w") for r in range(world_size)]
        sums: list[dict[str, int]] = [{} for _ in range(world_size)]
        try:
            steps = [None] + list(range(args.n_layers))
            for layer in tqdm(steps, desc="split", unit="layer", disable=not progress):
                row_steps: dict[str, torch.Tensor] = {}   # this layer's, for every rank
                for s in plan:
                    prefix = "" if layer is None else f"layers/{layer}/"
                    for name, t in rank_tensors(ckpt, args, s, layer, dtype, vocab_dtype,
                                                row_steps):
                        for dname, a in stored_arrays(name, t, dtype, vocab_dtype):
                            files[s.rank].create_dataset(prefix + dname, data=a)
                            sums[s.rank][prefix + dname] = zlib.crc32(a)
                        t = a = None   # not held while the next tensor is read
                        give_back_memory()
                ckpt.release()   # both readers drop what they kept for this layer
        finally:
            for f in files:
                f.close()
        manifest = {
            "format": FORMAT, "version": VERSION,
            "model": {"path": os.path.abspath(ckpt.folder), "fingerprint": ckpt.fingerprint()},
            "args": args.to_dict(), "world_size": world_size, "ratios": ratios, "dtype": dtype,
            "vocab_dtype": vocab_dtype,
            "int8_group": GROUP if "int8" in (dtype, vocab_dtype) else None,
            "int4_block": BLOCK if {"int4", "int6"} & {dtype, vocab_dtype} else None,
            "plan": [s.to_dict() for s in plan],
            "files": [{"rank": r, "file": rank_file(r),
                       "size": os.path.getsize(os.path.join(staging, rank_file(r))),
                       "checksums": sums[r]} for r in range(world_size)],
        }
        try:
            tok = load_tokenizer(ckpt.tokenizer_path) if ckpt.tokenizer_path else None
        except MpitpiError as e:
            print(f"mpitpi: warning: shards made without a tokenizer ({e}); prompts must be "
                  f"given as --prompt-ids.", file=sys.stderr)
            tok = None
        if tok is not None:
            tok.save(staging)   # shards carry the tokenizer: no rank reparses the checkpoint
        with open(os.path.join(staging, MANIFEST), "w") as f:
            json.dump(manifest, f, indent=1)
        _move_into_place(staging, out)
    except OSError as e:
        shutil.rmtree(staging, ignore_errors=True)
        raise MpitpiError(f"cannot write the shards into {out}: {e.strerror or e}. Nothing "
                          f"was left behind. Fix: free disk space, or choose a folder you can "
                          f"write (--out, or $MPITPI_CACHE for automatic shards).")
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return manifest


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:   # alive, someone else's
        pass
    return True


def remove_stale(out: str) -> None:
    """Delete ``out.partial-PID`` / ``out.old-PID`` folders (or files) left by splits or
    transfers on this host that were killed (their PID is gone); a live one is left alone."""
    parent, base = os.path.split(out)
    try:
        names = os.listdir(parent or ".")
    except OSError:
        return
    for name in names:
        for mark in (".partial-", ".old-"):
            pid = name[len(base) + len(mark):] if name.startswith(base + mark) else ""
            path = os.path.join(parent, name)
            if pid.isdigit() and not _alive(int(pid)):
                if os.path.isdir(path) and not os.path.islink(path):
                    shutil.rmtree(path, ignore_errors=True)
                else:
                    os.remove(path)


def _move_into_place(staging: str, out: str) -> None:
    if os.path.isdir(out) and not os.listdir(out):
        os.rmdir(out)
    if not os.path.exists(out):
        os.rename(staging, out)
        return
    # ``out`` is an old shard folder of ours: swap it out, then delete it.
    old = f"{out}.old-{os.getpid()}"
    os.rename(out, old)
    os.rename(staging, out)
    shutil.rmtree(old, ignore_errors=True)


def read_manifest(folder: str) -> dict:
    path = os.path.join(folder, MANIFEST)
    if not os.path.isfile(path):
        raise MpitpiError(f"{folder!r} is not a shard folder (no {MANIFEST}). Fix: make one with "
                          f"`mpitpi split MODEL --out {folder} --world-size N`, or leave out "
                          f"--shards to split automatically.")
    try:
        with open(path) as f:
            man = json.load(f)
    except (OSError, ValueError) as e:
        raise MpitpiError(f"cannot read {path}: {e}. Fix: split the model again.")
    if not isinstance(man, dict) or man.get("format") != FORMAT or man.get("version") != VERSION:
        raise MpitpiError(f"{path} is not an mpitpi shard manifest of version {VERSION}. "
                          f"Fix: split the model again.")
    _check_fields(man, path)
    return man


def _check_fields(man: dict, path: str) -> None:
    """Refuse a manifest with missing or mistyped fields, or a plan that does not fit its
    model, before any rank reads a shard by it."""
    def bad(why: str) -> MpitpiError:
        return MpitpiError(f"{path} is damaged or was edited ({why}). Fix: split the model "
                           f"again.")
    try:
        args = ModelArgs.from_dict(man["args"])
        n = man["world_size"]
        plan = [RankSlice.from_dict(d) for d in man["plan"]]
        files = man["files"]
        model = man["model"]
        str(model["path"]), str(model["fingerprint"])
    except (KeyError, TypeError, ValueError, IndexError) as e:
        raise bad(f"field {e} missing or mistyped")
    if man.get("dtype") not in DTYPES:
        raise bad(f"dtype {man.get('dtype')!r}")
    if type(n) is not int or n < 1 or len(plan) != n or not isinstance(files, list) or \
            len(files) != n:
        raise bad(f"world_size {n!r} does not match its plan and files")
    for r, f in enumerate(files):
        if not (isinstance(f, dict) and f.get("rank") == r and f.get("file") == rank_file(r)
                and type(f.get("size")) is int and isinstance(f.get("checksums"), dict)):
            raise bad(f"the entry of rank {r}'s file")
    args.check(path)
    check_plan(plan, args.n_heads, args.n_kv_heads, args.ffn_dim, args.vocab_size)


def expected_shapes(args: ModelArgs, s: RankSlice) -> dict[str, tuple[int, ...]]:
    """The shape of every dataset rank ``s.rank``'s file must hold (biases and int8 scales
    aside), from the model and the plan: the layout in this module's docstring."""
    d, hd = args.dim, args.head_dim
    out = {"vocab/embed": (s.n_vocab, d), "norm": (d,)}
    if not args.tie_embeddings:
        out["vocab/lm_head"] = (s.n_vocab, d)
    for i in range(args.n_layers):
        p = f"layers/{i}/"
        out.update({p + "wqkv": ((s.n_q + 2 * s.n_kv) * hd, d), p + "wo": (d, s.n_q * hd),
                    p + "w13": (2 * s.n_ffn, d), p + "w2": (d, s.n_ffn),
                    p + "attn_norm": (d,), p + "ffn_norm": (d,)})
    return out


def check_manifest(man: dict, folder: str, world_size: int, fingerprint: str | None) -> None:
    """Refuse shards made for another world size, another model or another int8 layout."""
    layout = {"int8": ("int8_group", (GROUP, GGUF_GROUP)), "int4": ("int4_block", (BLOCK,))}
    if man["dtype"] in layout:
        key, known = layout[man["dtype"]]
        if man.get(key) not in known:
            raise MpitpiError(f"{man['dtype']} shards in {folder!r} use {man.get(key)} columns "
                              f"per scale; this version reads {' or '.join(map(str, known))}. "
                              f"Fix: split the model again.")
    if man["world_size"] != world_size:
        raise MpitpiError(f"shards in {folder!r} were made for {man['world_size']} ranks but this "
                          f"job has {world_size}. Fix: run with -n {man['world_size']}, or split "
                          f"again with --world-size {world_size}.")
    if fingerprint is not None and man["model"]["fingerprint"] != fingerprint:
        raise MpitpiError(f"shards in {folder!r} were made from another model "
                          f"({man['model']['path']}). Fix: split this model again, or pass the "
                          f"model the shards were made from.")


class ShardReader:
    """Reads rank ``rank``'s file of a shard folder by raw offset, checking CRC32s.

    HDF5 is used only to find each dataset's byte offset (all datasets are contiguous); data
    is read with ``os.preadv`` into a numpy buffer, which releases the GIL, so a background
    thread can read while torch computes. ``drop_cache`` advises the kernel to drop each
    range's pages after reading it (posix_fadvise DONTNEED): the next read comes from disk.
    """

    def __init__(self, folder: str, rank: int, manifest: dict, verify: bool = True,
                 drop_cache: bool = False):
        self.folder, self.rank, self.verify, self.drop_cache = folder, rank, verify, drop_cache
        self.dtype = manifest["dtype"]
        entry = manifest["files"][rank]
        self.checksums = entry["checksums"]
        path = os.path.join(folder, entry["file"])
        self.path = path
        if not os.path.isfile(path):
            raise MpitpiError(f"shard file {path} is missing. Fix: copy it from the host that "
                              f"made the shards, or split the model again.")
        if os.path.getsize(path) != entry["size"]:
            raise MpitpiError(f"shard file {path} is {os.path.getsize(path)} bytes, the manifest "
                              f"says {entry['size']}: it is truncated or from another split. "
                              f"Fix: split the model again.")
        self.index: dict[str, tuple[int, tuple, np.dtype]] = {}
        try:
            with h5py.File(path, "r") as f:
                for name in self.checksums:
                    ds = f[name]
                    offset = ds.id.get_offset()
                    if offset is None and ds.size:
                        raise OSError(f"dataset {name} is not contiguous")
                    self.index[name] = (offset or 0, tuple(ds.shape), ds.dtype)
        except (OSError, KeyError) as e:
            raise MpitpiError(f"cannot read shard file {path}: {e}. Fix: split the model again.")
        self._check_shapes(manifest)
        self.fd = os.open(path, os.O_RDONLY)
        st = os.fstat(self.fd)
        self.stat = (st.st_size, st.st_mtime_ns)
        self.verified: set[str] = set()   # CRC32 checked on the first read of each dataset

    def _check_shapes(self, manifest: dict) -> None:
        args = ModelArgs.from_dict(manifest["args"])
        s = RankSlice.from_dict(manifest["plan"][self.rank])
        for name, shape in expected_shapes(args, s).items():
            got = self.index[name][1] if name in self.index else "nothing"
            if name in self.index and self.index[name][2] == np.uint8:   # int4: 2 per byte
                got = (*got[:-1], got[-1] * 2)
            if got != shape:
                raise MpitpiError(f"shard file {self.path} holds {got} as {name} where its "
                                  f"manifest's plan needs {shape}: the manifest or the file "
                                  f"was edited. Fix: split the model again.")
        extra = [n for n in self.index if n.startswith("layers/")
                 and int(n.split("/")[1]) >= args.n_layers]
        if extra:
            raise MpitpiError(f"shard file {self.path} holds {extra[0]} but the manifest says "
                              f"the model has {args.n_layers} layers: the manifest was edited. "
                              f"Fix: split the model again.")

    def has(self, name: str) -> bool:
        return name in self.checksums

    def shape(self, name: str) -> tuple:
        return self.index[name][1]

    def nbytes(self, name: str) -> int:
        _, shape, dt = self.index[name]
        return int(np.prod(shape, dtype=np.int64)) * dt.itemsize

    def empty(self, name: str) -> np.ndarray:
        """A buffer of the dataset's shape and stored dtype, for ``read_into`` (in 2 MiB
        pages where the kernel gives them: pages.py)."""
        _, shape, dt = self.index[name]
        return pages.empty(shape, dt)

    def empty_many(self, names: list[str]) -> list[np.ndarray]:
        """Buffers for datasets ``names``, in one mapping (pages.empty_many)."""
        return pages.empty_many([(self.index[n][1], self.index[n][2]) for n in names])

    def read_into(self, name: str, out: np.ndarray) -> np.ndarray:
        """Read dataset ``name`` into ``out`` (from ``empty``); GIL released while reading."""
        offset, shape, dt = self.index[name]
        nbytes = out.nbytes
        got = os.preadv(self.fd, [memoryview(out).cast("B")], offset) if nbytes else 0
        if got != nbytes:
            raise MpitpiError(f"{self.path}: {name} ended after {got} of {nbytes} bytes: the "
                              f"file was truncated. Fix: split the model again.")
        if self.drop_cache and nbytes:
            os.posix_fadvise(self.fd, offset, nbytes, os.POSIX_FADV_DONTNEED)
        if self.verify and name not in self.verified:
            if zlib.crc32(out) != self.checksums[name]:
                raise MpitpiError(f"checksum mismatch for {name} in {self.path}: the file is "
                                  f"corrupt. Fix: split the model again.")
            self.verified.add(name)
        return out

    def check_unchanged(self) -> None:
        """Raise if the file was replaced, truncated or written since it was opened."""
        st = os.fstat(self.fd)
        if (st.st_size, st.st_mtime_ns) != self.stat:
            raise MpitpiError(f"shard file {self.path} changed on disk while in use (size "
                              f"{self.stat[0]} -> {st.st_size} bytes). Fix: do not modify "
                              f"shards during a run; split the model again.")

    def read(self, name: str) -> torch.Tensor:
        if name not in self.index:
            raise MpitpiError(f"{self.path} has no dataset {name}. Fix: split the model again.")
        return from_numpy(self.read_into(name, self.empty(name)))

    def layer_names(self, i: int) -> list[str]:
        """Dataset names of layer i, without the ``layers/{i}/`` prefix."""
        prefix = f"layers/{i}/"
        return [n[len(prefix):] for n in self.checksums if n.startswith(prefix)]

    def layer(self, i: int) -> dict[str, torch.Tensor]:
        """Layer i's datasets: its matrices and scales read into one mapping (empty_many;
        1B shape, int4, 1 rank, fast moments: 0.96-1.0x the time per token), the rest
        each in its own buffer: int4 offsets (``.min``), which coded tiles replace by a small
        tensor (Weight.tile_rows), so that their memory is freed, and the 1-D vectors."""
        names = self.layer_names(i)
        shared = [n for n in names if not n.endswith(".min")   # a missing one: read() says so
                  and len(self.index.get(f"layers/{i}/{n}", (0, ()))[1]) == 2]
        bufs = dict(zip(shared, self.empty_many([f"layers/{i}/{n}" for n in shared])))
        return {n: from_numpy(self.read_into(f"layers/{i}/{n}", bufs[n])) if n in bufs
                else self.read(f"layers/{i}/{n}") for n in names}

    def close(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None
