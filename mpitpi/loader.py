"""From a model path to this rank's ready Transformer: find or make shards, check, load.

Collective: every rank calls ``load_model`` together. Rank 0 opens the checkpoint, and (when
no --shards folder is given) splits it once into a cache folder keyed by model fingerprint,
world size, ratios and dtype. Every rank then reads the manifest and opens only its own file.
Errors on any rank are raised on every rank (comm.checked), so nobody waits for a rank that
has given up.
"""
from __future__ import annotations

import gc
import hashlib
import json
import os
import sys
from dataclasses import dataclass

import torch
from tqdm import tqdm

from mpitpi import choices, lookahead
from mpitpi.checkpoint import fingerprint, natural_dtype, open_checkpoint, resolve_model
from mpitpi.comm import Comm
from mpitpi.config import ModelArgs
from mpitpi.errors import MpitpiError
from mpitpi.files import cache_root
from mpitpi.model import KV_DTYPES, Transformer, default_kv_dtype
from mpitpi.plan import RankSlice, parse_ratios, plan_for_args
from mpitpi.prefetch import (LayerStore, Resident, Streamed, layer_bytes, parse_size,
                             plan_residency, read_layer)
from mpitpi.profile import auto_ratios
from mpitpi.quant import BLOCK, GROUP
from mpitpi.shards import MANIFEST, ShardReader, check_manifest, read_manifest, write_shards
from mpitpi.transfer import ensure_shards
from mpitpi.weights import TopWeights, vectors_fp32


def cache_folder(model_path: str, fingerprint: str, world_size: int,
                 ratios: list[float] | None, dtype: str, vocab_dtype: str | None = None) -> str:
    # int4 shards' default vocabulary became int6, then their scales and offsets codes
    # (quant.py): their key says so, so that folders split before are not taken for them
    key = json.dumps([fingerprint, world_size, ratios, dtype] +
                     ([GROUP] if dtype == "int8" else ["int4", BLOCK, "int6", "coded"]
                      if dtype == "int4"
                      else []) + ([] if vocab_dtype is None else ["vocab", vocab_dtype]))
    digest = hashlib.sha256(key.encode()).hexdigest()[:16]
    name = os.path.basename(os.path.normpath(model_path)) or "model"
    return os.path.join(cache_root(), "shards", f"{name}-n{world_size}-{dtype}-{digest}")


@dataclass
class Loaded:
    model: Transformer
    args: ModelArgs
    plan: list[RankSlice]
    shards: str
    tokenizer_path: str | None
    fingerprint: str | None
    dtype: str                 # the shards' storage dtype (manifest)


def _check_asked(shards: str, world_size: int, ratios, dtype, vocab_dtype=None) -> None:
    """--ratios / --dtype / --vocab-dtype given with --shards must agree with how the shards
    were made."""
    man = read_manifest(shards)
    if dtype is not None and man["dtype"] != dtype:
        raise MpitpiError(f"shards in {shards!r} store {man['dtype']}, not the --dtype {dtype} "
                          f"asked for. Fix: drop --dtype, or split again with --dtype {dtype}.")
    if vocab_dtype is not None and man.get("vocab_dtype") != vocab_dtype:
        raise MpitpiError(f"shards in {shards!r} were made without --vocab-dtype {vocab_dtype}. "
                          f"Fix: drop --vocab-dtype, or split again with it.")
    if ratios is not None and man["world_size"] == world_size:
        args = ModelArgs.from_dict(man["args"])
        wanted = [s.to_dict() for s in plan_for_args(args, world_size, ratios)]
        if json.loads(json.dumps(wanted)) != man["plan"]:
            raise MpitpiError(f"shards in {shards!r} were made with another split plan "
                              f"(ratios {man['ratios']}) than --ratios asks for. Fix: drop "
                              f"--ratios, or split again with these ratios.")


def cached_split(model_path: str, fp: str, world_size: int, ratios: list[float] | None,
                 dtype: str, vocab_dtype: str | None = None) -> tuple[str, dict | None]:
    """Rank 0, no writes: the cache folder of this split and its manifest, or None when the
    folder holds no valid split of this model (not made yet, or stale: made again)."""
    folder = cache_folder(model_path, fp, world_size, ratios, dtype, vocab_dtype)
    if os.path.isfile(os.path.join(folder, MANIFEST)):
        try:
            man = read_manifest(folder)
            check_manifest(man, folder, world_size, fp)
            return folder, man
        except MpitpiError:
            pass
    return folder, None


def _resolve_shards(model_path, shards, world_size, ratios_text, dtype, progress,
                    vocab_dtype=None) -> dict:
    """Rank 0: find (or make, from the checkpoint) the shard folder. Returns what all need.

    The checkpoint is opened only to split it: a valid cached split needs only the model's
    fingerprint, which reads headers, not tensors.
    """
    ratios = parse_ratios(ratios_text, world_size)
    if shards is not None:
        _check_asked(shards, world_size, ratios, dtype, vocab_dtype)
    fp = None
    if model_path is None:
        if shards is None:
            raise MpitpiError("no model given. Fix: pass --model MODEL (a Hugging Face folder, "
                              "a .gguf file or smollm2-135m), or --shards DIR from `mpitpi split`.")
    else:
        path = resolve_model(model_path)
        try:
            fp = fingerprint(path)
        except OSError:
            open_checkpoint(path)   # raises the clear error for a missing or broken model
            raise
        if shards is None:
            dtype = dtype or natural_dtype(path)
            shards, man = cached_split(model_path, fp, world_size, ratios, dtype, vocab_dtype)
            if man is None:
                write_shards(open_checkpoint(path), shards, world_size, ratios, dtype,
                             progress=progress, vocab_dtype=vocab_dtype)
    tok = os.path.join(shards, "tokenizer.json")
    return {"shards": shards, "fingerprint": fp, "tokenizer": tok if os.path.isfile(tok) else None,
            "dtype": read_manifest(shards)["dtype"]}


def measure_ratios(comm: Comm, model_path: str | None, dtype: str | None,
                   memory_budget: str | None, progress: bool) -> tuple[str, list[dict]]:
    """Collective (--ratios auto, `mpitpi profile`): measure the ranks; returns the ratios
    and every rank's figures (see profile.py)."""
    def model_info():
        if model_path is None:
            raise MpitpiError("--ratios auto needs --model (the shards already fix a plan).")
        path = resolve_model(model_path)
        args = open_checkpoint(path).args
        return args, dtype or natural_dtype(path)
    args, dt = comm.root_checked(model_info)
    budget = parse_size(memory_budget) if memory_budget else None
    return auto_ratios(comm, args, dt, budget,
                       log=(lambda m: print(m, file=sys.stderr, flush=True)) if progress else None)


def open_rank(folder: str, rank: int, world_size: int, fingerprint: str | None,
              verify: bool = True, drop_cache: bool = False, budget: int | None = None,
              window: int | None = None, progress: bool = False
              ) -> tuple[ModelArgs, list[RankSlice], TopWeights, LayerStore]:
    """One rank, no MPI: read the manifest of ``folder``, check it, open rank ``rank``'s
    file. Returns the model's args, the plan, this rank's vocabulary rows and its layers:
    all resident unless ``window`` (stream every layer through that many slots) or
    ``budget`` bytes (keep as many resident as fit, stream the rest) is given. ``progress``:
    a bar on stderr over the bytes read now (the vocabulary rows, then each resident layer)."""
    man = read_manifest(folder)
    check_manifest(man, folder, world_size, fingerprint)
    args = ModelArgs.from_dict(man["args"])
    plan = [RankSlice.from_dict(d) for d in man["plan"]]
    reader = ShardReader(folder, rank, man, verify=verify, drop_cache=drop_cache)
    top_names = [n for n in reader.checksums if n.startswith("vocab/") or n == "norm"]
    per_layer = layer_bytes(reader)
    bar = tqdm(total=sum(reader.nbytes(n) for n in top_names) + args.n_layers * per_layer,
               desc=f"load rank {rank}", unit="B", unit_scale=True, unit_divisor=1024,
               disable=not progress, file=sys.stderr, mininterval=0.5)
    try:
        # matrices stay in the stored dtype (weights.Weight computes in it); vectors fp32
        stored = {n.removeprefix("vocab/"): reader.read(n) for n in top_names}
        top = TopWeights.from_stored(vectors_fp32(stored)).tile_rows()
        bar.update(sum(reader.nbytes(n) for n in top_names))
        n_res, w = plan_residency(args.n_layers, per_layer, top.nbytes, budget, window)
        if w is None:
            resident = []
            for i in range(args.n_layers):
                resident.append(read_layer(reader, i))
                bar.update(per_layer)
            layers = Resident(resident, per_layer)
            reader.close()
        else:   # the rest streams while generating: the bar ends at what is read now
            bar.total = bar.n
            layers = Streamed(reader, args.n_layers, n_res, w)
    except BaseException:
        reader.close()
        raise
    finally:
        bar.close()
    return args, plan, top, layers


def load_model(comm: Comm, model_path: str | None, shards: str | None, ratios: str | None,
               dtype: str | None = None, verify: bool = True, progress: bool = True,
               window: int | None = None, memory_budget: str | None = None,
               drop_cache: bool = False, local_shards: str | None = None,
               vocab_dtype: str | None = None, kv_dtype: str | None = None) -> Loaded:
    """Collective: every rank gets its Transformer (see ``open_rank`` for its layers), its
    KV cache in ``kv_dtype`` (None: model.default_kv_dtype of the shards' dtype)."""
    if ratios == "auto":
        ratios, _ = measure_ratios(comm, model_path, dtype, memory_budget, progress)
    info = comm.root_checked(_resolve_shards, model_path, shards, comm.size, ratios, dtype,
                             progress, vocab_dtype)
    folder = info["shards"]
    if comm.size > 1:
        folder = ensure_shards(comm, info["shards"], local_shards, progress=progress)
    budget = comm.checked(parse_size, memory_budget) if memory_budget else None
    args, plan, top, layers = comm.checked(open_rank, folder, comm.rank, comm.size,
                                           info["fingerprint"], verify, drop_cache, budget,
                                           window, progress and comm.rank == 0)
    model = Transformer(args, plan, comm.rank, top, layers, reduce=comm.allreduce_,
                        kv_dtype=kv_dtype or default_kv_dtype(info["dtype"]))
    return Loaded(model, args, plan, info["shards"], info["tokenizer"], info["fingerprint"],
                  info["dtype"])


def _threads(local_ranks: int, requested: int | str) -> int:
    """--threads N, or for 'auto' the fastest count up to the host's cores divided by the
    job's ranks on this host (every rank of the host measures at once)."""
    if requested != "auto":
        return int(requested)
    cores = len(os.sched_getaffinity(0))
    return choices.best_threads(max(1, min(cores, (os.cpu_count() or 1) // local_ranks)))


def start_model(comm: Comm, model_path: str | None, shards: str | None = None,
                ratios: str | None = None, dtype: str | None = None,
                threads: int | str = "auto", verify: bool = True, progress: bool = True,
                window: int | None = None, memory_budget: str | None = None,
                drop_cache: bool = False, local_shards: str | None = None,
                stall_timeout: float = 60.0, vocab_dtype: str | None = None,
                kv_dtype: str | None = None, freeze: bool = True) -> Loaded:
    """Collective: torch threads for this rank (``threads``: a count or 'auto'), then its
    model (``load_model``; a progress bar on rank 0 when ``progress``), then the stall
    timeout (seconds a rank may go unanswered once loaded; 0: wait forever). ``freeze``:
    the process is mpitpi's own (the command line), so everything alive now is moved out of
    the garbage collector's sweeps (gc.freeze)."""
    def check():
        if not stall_timeout >= 0:
            raise MpitpiError(f"--stall-timeout must be >= 0 (0: off), got {stall_timeout}.")
        if kv_dtype is not None and kv_dtype not in KV_DTYPES:
            raise MpitpiError(f"unknown KV cache dtype {kv_dtype!r}. Fix: one of "
                              f"{', '.join(KV_DTYPES)}, or none for the default.")
    comm.root_checked(check)
    comm.checked(lookahead.control)   # MPITPI_PREFETCH read now: a wrong one fails before loading
    local_ranks = comm.local_size()
    n = comm.checked(_threads, local_ranks, threads)
    torch.set_num_threads(n)
    # more busy threads than cores on this host: waiting ranks must yield their core
    comm.polite = local_ranks * n > (os.cpu_count() or 1)
    loaded = load_model(comm, model_path, shards, ratios, dtype, verify=verify,
                        progress=progress and comm.rank == 0, window=window,
                        memory_budget=memory_budget, drop_cache=drop_cache,
                        local_shards=local_shards, vocab_dtype=vocab_dtype, kv_dtype=kv_dtype)
    if threads == "auto" and n >= 2 and loaded.model.layers.window is not None:
        torch.set_num_threads(n - 1)   # leave a core to the layer reader (measured)
    comm.stall_timeout = stall_timeout or None   # every rank at once: bcast_obj changes
    # what loading left alive (model, tokenizer tables) is never garbage: the collector's
    # full sweeps stop walking it between tokens (1-2% of a decode step, perf on the 1B shape)
    if freeze:
        gc.collect()
        gc.freeze()
    return loaded
