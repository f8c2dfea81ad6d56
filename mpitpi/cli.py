"""The `mpitpi` command: parse arguments, then call one function per subcommand.

    mpitpi split MODEL --out DIR -n N      one shard file per rank, made once, reused
    mpitpi synth --shape S --out DIR       a random checkpoint with a real model's shapes
    mpiexec -n N mpitpi generate --model MODEL --prompt TEXT [--chat] [options]
    mpiexec -n N mpitpi chat --model MODEL [--system TEXT]
    mpiexec -n N mpitpi serve --model MODEL [--port 8000]    OpenAI-compatible HTTP on rank 0
    mpiexec -n N mpitpi bench --model MODEL                  TTFT, ms/token, memory, traffic
    mpiexec -n N mpitpi perplexity --model MODEL [--file F]  how well it predicts a text
    mpiexec -n N mpitpi profile --model MODEL                what --ratios auto would choose
    mpiexec -n N mpitpi commbench                            all-reduce latency per algorithm
    mpiexec -n N mpitpi check --model MODEL                  every host ready? (before a job)

The failure path: an error every rank raised together (a checked step) is printed once by
rank 0 and every rank exits 2; an error on one rank alone is printed with its rank and host
and the whole job is aborted, so no rank is left waiting in a collective. Tracebacks of
user errors are shown with --log-level debug.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import traceback
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from mpitpi import __version__, choices
from mpitpi.bench import format_bench, run_bench
from mpitpi.chat import run_chat
from mpitpi.check import run_check
from mpitpi.checkpoint import natural_dtype, open_checkpoint
from mpitpi.choices import describe
from mpitpi.comm import Comm
from mpitpi.commbench import run_commbench
from mpitpi.errors import CollectiveError, MpitpiError
from mpitpi.draft import ModelDrafter
from mpitpi.generate import generate
from mpitpi.hub import looks_like_id
from mpitpi.loader import Loaded, load_model, measure_ratios, start_model
from mpitpi.offline import read_prompts, run_offline
from mpitpi.options import (add_log_level, args_bench, args_chat, args_check, args_commbench,
                            args_generate, args_perplexity, args_profile, args_serve, args_split,
                            args_synth, check_bias, check_positive, draft_tokens, npy_path,
                            read_prompt,
                            read_text, refuse_existing, sampling_params)
from mpitpi.perplexity import added_bos, check_ctx, cut_windows, default_text, score
from mpitpi.plan import parse_ratios, plan_for_args
from mpitpi.prefetch import parse_size
from mpitpi.sampling import Sampler
from mpitpi.server import ServeOptions, kv_plan, serve
from mpitpi.session import Session, check_prompt
from mpitpi.shards import check_out_folder, read_manifest, write_shards
from mpitpi.synth import synth
from mpitpi.tokenizer import Tokenizer, chat_messages, load_tokenizer

# -- helpers of the commands -------------------------------------------------------------------

def progress(a: argparse.Namespace) -> bool:
    """Progress bars on (rank 0's stderr) unless --log-level warning."""
    return a.log_level != "warning"


def peak_rss_mb() -> float:
    """This process's peak resident set (VmHWM) in MB."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return 0.0


class Tokenizers:
    """Rank 0's tokenizer of a loaded model, loaded once."""

    def __init__(self) -> None:
        self._cache: dict[str, Tokenizer] = {}

    def get(self, loaded: Loaded) -> Tokenizer:
        if loaded.tokenizer_path is None:
            raise MpitpiError("the model has no tokenizer.json, so text cannot be tokenized. "
                              "Fix: pass --prompt-ids 1,2,3 instead, or use a model with "
                              "tokenizer.json or a GGUF file.")
        if loaded.tokenizer_path not in self._cache:
            self._cache[loaded.tokenizer_path] = load_tokenizer(loaded.tokenizer_path)
        return self._cache[loaded.tokenizer_path]


TOKENIZERS = Tokenizers()


def need_tokenizer(comm: Comm, loaded: Loaded, template: bool = False) -> Tokenizer | None:
    """Collective: rank 0's tokenizer (None on the others); an error on every rank if the
    model has none (or, with ``template``, no chat template)."""
    def check():
        tok = TOKENIZERS.get(loaded)
        if template:
            tok.render_chat([{"role": "user", "content": "hi"}])
    comm.root_checked(check)
    return TOKENIZERS.get(loaded) if comm.rank == 0 else None


def start(a: argparse.Namespace, comm: Comm) -> Loaded:
    """Collective: threads, then this rank's model (loader.start_model)."""
    return start_model(comm, a.model, a.shards, a.ratios, a.dtype, threads=a.threads,
                       verify=not a.no_verify, progress=progress(a), window=a.window,
                       memory_budget=a.memory_budget, drop_cache=a.drop_cache,
                       local_shards=a.local_shards, stall_timeout=a.stall_timeout,
                       vocab_dtype=a.vocab_dtype, kv_dtype=a.kv_dtype)


def start_drafter(a: argparse.Namespace, comm: Comm, loaded: Loaded) -> ModelDrafter | None:
    """Collective: rank 0 loads ``--draft-model`` alone (None elsewhere, or without it); a
    model of another vocabulary is refused on every rank."""
    if not a.draft_model:
        return None

    made: list[ModelDrafter] = []

    def load() -> None:   # rank 0; an MpitpiError reaches every rank
        small = load_model(comm.alone(), a.draft_model, None, None, progress=progress(a))
        if small.args.vocab_size != loaded.args.vocab_size:
            raise MpitpiError(f"--draft-model {a.draft_model!r} has a vocabulary of "
                              f"{small.args.vocab_size} tokens, the model {loaded.args.vocab_size}"
                              f": a draft model must share the model's tokenizer.")
        made.append(ModelDrafter(small.model))
    comm.root_checked(load)
    return made[0] if made else None


# -- the subcommands ---------------------------------------------------------------------------

def cmd_split(a: argparse.Namespace) -> int:
    if a.ratios == "auto":
        raise MpitpiError("split runs as one process, so it cannot measure the ranks. Fix: "
                          "let `mpiexec -n N mpitpi generate --ratios auto` split, or run "
                          "`mpiexec -n N mpitpi profile` and pass the ratios it prints.")
    ckpt = open_checkpoint(a.model)
    ratios = parse_ratios(a.ratios, a.world_size)
    plan_for_args(ckpt.args, a.world_size, ratios)   # bad world size / ratios: error first
    check_out_folder(a.out)
    man = write_shards(ckpt, a.out, a.world_size, ratios, a.dtype or natural_dtype(a.model),
                       progress=progress(a), vocab_dtype=a.vocab_dtype)
    total = sum(f["size"] for f in man["files"]) / 2**20
    print(f"wrote {a.world_size} shard files ({total:.1f} MiB) and manifest.json to {a.out}")
    return 0


def cmd_synth(a: argparse.Namespace) -> int:
    cfg = synth(a.shape, a.out, a.layers, a.dtype, a.seed, progress=progress(a))
    print(f"wrote a random {a.shape} ({cfg['num_hidden_layers']} layers, {a.dtype}) to {a.out}")
    return 0


def cmd_generate_many(a: argparse.Namespace, comm: Comm) -> int:
    """generate --prompts-file IN --out OUT: every prompt through one batch."""
    params = sampling_params(a)

    def early():
        params.check()
        check_positive(max_tokens=a.max_tokens, max_batch=a.max_batch)
        draft_tokens(a)
        if not a.out:
            raise MpitpiError("--prompts-file needs --out FILE for the answers.")
        refuse_existing(a.out, "--out")
        if not os.path.isfile(a.prompts_file):
            raise MpitpiError(f"--prompts-file {a.prompts_file!r} is not a file.")
    comm.root_checked(early)
    loaded = start(a, comm)
    tok = TOKENIZERS.get(loaded) if comm.rank == 0 and loaded.tokenizer_path else None
    comm.root_checked(check_bias, params, loaded.args.vocab_size)
    requests = comm.root_checked(lambda: read_prompts(
        a.prompts_file, tok, params, a.max_tokens, a.stop, loaded.args.vocab_size,
        loaded.args.max_seq_len))
    eos = [] if a.ignore_eos else loaded.args.eos_token_ids
    summary = run_offline(comm, loaded.model, requests, a.out, eos,
                          tok.decode if tok else None, a.max_batch, draft_tokens(a),
                          start_drafter(a, comm, loaded))
    loaded.model.layers.close()
    if summary and a.json:
        print(json.dumps(summary))
    return 0


def cmd_generate(a: argparse.Namespace, comm: Comm) -> int:
    if a.prompts_file:
        return cmd_generate_many(a, comm)
    root = comm.rank == 0
    params = sampling_params(a)

    def early():
        params.check()
        check_positive(max_tokens=a.max_tokens)
        draft_tokens(a)
        refuse_existing(a.logits_out and npy_path(a.logits_out), "--logits-out")
        return read_prompt(a)
    text, ids = comm.root_checked(early)
    draft = draft_tokens(a)
    loaded = start(a, comm)

    def prompt_ids() -> list[int]:
        nonlocal ids
        if ids is None:
            tok = TOKENIZERS.get(loaded)
            ids = (tok.encode_chat(chat_messages(text, a.system)) if a.chat else tok.encode(text))
        check_prompt(ids, a.max_tokens, loaded.args.vocab_size, loaded.args.max_seq_len)
        check_bias(params, loaded.args.vocab_size)
        return ids
    ids = comm.root_checked(prompt_ids)

    def emit(piece: str) -> None:
        sys.stdout.write(piece)
        sys.stdout.flush()

    def step_line(step: int, ms: float, comm_ms: float, nbytes: int) -> None:
        print(f"[token {step:4d}] {ms:8.2f} ms  compute {ms - comm_ms:8.2f} ms  all-reduce "
              f"{comm_ms:7.2f} ms  sent {nbytes / 1e3:8.1f} kB", file=sys.stderr, flush=True)

    session = None
    if root:
        decode = TOKENIZERS.get(loaded).decode if loaded.tokenizer_path else None
        session = Session(ids, a.max_tokens, Sampler(params),
                          [] if a.ignore_eos else loaded.args.eos_token_ids, decode, a.stop,
                          on_text=None if a.json else emit, keep_logits=bool(a.logits_out))
    c0, b0 = comm.allreduce_s, comm.allreduce_bytes
    res = generate(comm, loaded.model, session,
                   on_step=step_line if (root and a.verbose) else None, draft=draft,
                   drafter=start_drafter(a, comm, loaded))
    passes = max(1, res.forward_passes)    # every rank timed each forward pass
    comm_ms = comm.gather_obj(round((comm.allreduce_s - c0) * 1e3 / passes, 3))
    sent = comm.gather_obj(int((comm.allreduce_bytes - b0) / passes))
    layers = loaded.model.layers
    io_wait = comm.gather_obj(round(layers.wait_s * 1e3 / passes, 3))
    resident = comm.gather_obj(layers.n_resident)
    layers.close()
    rss = comm.gather_obj(round(peak_rss_mb(), 1))
    if not root:
        return 0
    if a.logits_out:
        with open(npy_path(a.logits_out), "xb") as f:   # x: never over a file made meanwhile
            np.save(f, np.stack(res.logits).astype(np.float32))
    if a.json:
        print(json.dumps({
            "text": res.text, "token_ids": res.token_ids, "prompt_tokens": res.prompt_tokens,
            "ttft_ms": round(res.ttft_ms, 3), "ms_per_token": round(res.ms_per_token, 3),
            "tokens_per_s": round(1e3 / res.ms_per_token, 3) if res.ms_per_token else None,
            "finish_reason": res.finish_reason, "world_size": comm.size, "dtype": loaded.dtype,
            "threads": torch.get_num_threads(),
            "peak_rss_mb": rss, "io_wait_ms_per_token": io_wait,
            "resident_layers": resident, "window": layers.window,
            "allreduce": comm.algorithm + (f" ({comm.small} for small)" if comm.small else ""),
            "comm_ms_per_token": comm_ms,
            "bytes_per_token": sent, "forward_passes": res.forward_passes,
            "draft": a.draft, "draft_tokens": res.drafted, "draft_accepted": res.accepted}))
    else:
        print(flush=True)
        print(f"[mpitpi] {len(res.token_ids)} tokens on {comm.size} ranks ({loaded.dtype}): TTFT "
              f"{res.ttft_ms:.0f} ms, {res.ms_per_token:.1f} ms/token, peak RSS MB per rank "
              f"{rss}", file=sys.stderr)
    return 0


def cmd_chat(a: argparse.Namespace, comm: Comm) -> int:
    params = sampling_params(a)
    comm.root_checked(lambda: (params.check(), check_positive(max_tokens=a.max_tokens),
                               draft_tokens(a)))
    loaded = start(a, comm)
    comm.root_checked(check_bias, params, loaded.args.vocab_size)
    tok = need_tokenizer(comm, loaded, template=True)
    run_chat(comm, loaded, tok, lambda: Sampler(params), a.max_tokens, a.system,
             draft=draft_tokens(a), drafter=start_drafter(a, comm, loaded))
    return 0


def cmd_serve(a: argparse.Namespace, comm: Comm) -> int:
    def check():
        check_positive(max_tokens=a.max_tokens, max_queue=a.max_queue)
        if a.max_batch is not None:
            check_positive(max_batch=a.max_batch)
        if not 0 <= a.port <= 65535:
            raise MpitpiError(f"--port must be in 0..65535 (0: any free port), got {a.port}.")
        draft_tokens(a)
        return None if a.kv_budget is None else parse_size(a.kv_budget, "--kv-budget")
    budget = comm.root_checked(check)
    loaded = start(a, comm)
    tok = need_tokenizer(comm, loaded)
    positions, max_batch = kv_plan(comm, loaded, budget, a.max_batch)
    name = a.name or (a.model if a.model and looks_like_id(a.model) else
                      os.path.basename(os.path.normpath(a.model or loaded.shards)))
    serve(comm, loaded, tok, ServeOptions(name=name, host=a.host, port=a.port,
                                          api_key=a.api_key, default_max_tokens=a.max_tokens,
                                          cors_origins=a.cors_origin, max_batch=max_batch,
                                          kv_positions=positions, max_queue=a.max_queue,
                                          draft=draft_tokens(a),
                                          drafter=start_drafter(a, comm, loaded)))
    loaded.model.layers.close()
    return 0


def cmd_bench(a: argparse.Namespace, comm: Comm) -> int:
    def check():
        check_positive(prompt_len=a.prompt_len, gen_len=a.gen_len, reps=a.reps)
        refuse_existing(a.json, "--json")
    comm.root_checked(check)
    loaded = start(a, comm)

    def room():
        if a.prompt_len + a.gen_len > loaded.args.max_seq_len:
            raise MpitpiError(f"--prompt-len + --gen-len = {a.prompt_len + a.gen_len} is beyond "
                              f"the model's context of {loaded.args.max_seq_len}.")
    comm.root_checked(room)
    res = run_bench(comm, loaded, a.prompt_len, a.gen_len, a.reps, a.prompt_seed, a.disk,
                    rss_fn=peak_rss_mb)
    if comm.rank == 0:
        print(format_bench(res))
        if a.json:
            with open(a.json, "x") as f:
                json.dump(res, f, indent=1)
    return 0


def cmd_perplexity(a: argparse.Namespace, comm: Comm) -> int:
    def early():
        check_ctx(a.ctx)
        if a.max_windows is not None:
            check_positive(max_windows=a.max_windows)
        refuse_existing(a.save_windows, "--save-windows")
        if a.file is None:
            return default_text()
        return read_text(a.file, "--file", "give a file with text in it"), a.file
    text, source = comm.root_checked(early)
    loaded = start(a, comm)
    tok = need_tokenizer(comm, loaded)
    windows = None

    def cut():
        nonlocal windows
        m = loaded.args
        bos = added_bos(tok)
        windows = cut_windows(tok.encode(text, special=False), a.ctx, bos, m.max_seq_len,
                              m.vocab_size, a.max_windows)
        if a.save_windows:
            with open(a.save_windows, "x") as f:
                json.dump({"ctx": a.ctx, "bos": bos, "text": source,
                           "windows": windows.tolist()}, f)
    comm.root_checked(cut)
    res = score(comm, loaded.model, windows, progress=not a.json and progress(a))
    loaded.model.layers.close()
    if comm.rank != 0:
        return 0
    dtype = read_manifest(loaded.shards)["dtype"]
    if a.json:
        print(json.dumps({"perplexity": res.perplexity, "tokens": res.tokens,
                          "windows": res.windows, "ctx": a.ctx, "dtype": dtype,
                          "seconds": round(res.seconds, 3), "text": source}))
    else:
        print(f"perplexity {res.perplexity:.4f} over {res.tokens} tokens of {source} "
              f"({res.windows} windows, ctx {a.ctx}, {dtype}, {comm.size} ranks, "
              f"{res.seconds:.1f} s)")
    return 0


def cmd_profile(a: argparse.Namespace, comm: Comm) -> int:
    ratios, figs = measure_ratios(comm, a.model, a.dtype, a.memory_budget,
                                  progress=not a.json and progress(a))
    if comm.rank == 0 and a.json:
        args = open_checkpoint(a.model).args
        plan = plan_for_args(args, comm.size, parse_ratios(ratios, comm.size))
        print(json.dumps({"ratios": ratios, "ranks": figs, "plan": [s.to_dict() for s in plan]}))
    elif comm.rank == 0:
        print(f"--ratios auto would use: --ratios {ratios}")
        print(describe(choices.host()))
    return 0


def cmd_commbench(a: argparse.Namespace, comm: Comm) -> int:
    comm.root_checked(refuse_existing, a.json, "--json")
    res = run_commbench(comm, reps=a.reps)
    if comm.rank == 0:
        print("all-reduce ms per call (median, slowest rank)")
        print("bytes".rjust(10) + "".join(alg.rjust(10) for alg in res))
        for size in next(iter(res.values())):
            print(f"{size:10d}" + "".join(f"{res[alg][size]:10.3f}" for alg in res))
        if a.json:
            with open(a.json, "x") as f:
                json.dump({"world_size": comm.size, "ms_per_call": res}, f, indent=1)
    return 0


@dataclass(frozen=True)
class Command:
    help: str
    arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[..., int]
    mpi: bool = True   # run(a, comm) under mpiexec; False: run(a) as one process


UNDER_MPI = " (run under mpiexec -n N)"
COMMANDS = {
    "split": Command("write one shard file per rank from a checkpoint", args_split, cmd_split,
                     mpi=False),
    "generate": Command("generate text" + UNDER_MPI, args_generate, cmd_generate),
    "chat": Command("interactive multi-turn chat on rank 0's terminal" + UNDER_MPI, args_chat,
                    cmd_chat),
    "serve": Command("OpenAI-compatible HTTP server on rank 0" + UNDER_MPI, args_serve,
                     cmd_serve),
    "bench": Command("time repeated generations: TTFT, ms/token, memory, communication" +
                     UNDER_MPI, args_bench, cmd_bench),
    "perplexity": Command("perplexity of a text (default: mpitpi's own docs), the quality "
                          "measure of a dtype" + UNDER_MPI, args_perplexity, cmd_perplexity),
    "profile": Command("measure every rank and print the split --ratios auto would choose" +
                       UNDER_MPI, args_profile, cmd_profile),
    "commbench": Command("all-reduce latency per algorithm and message size" + UNDER_MPI,
                         args_commbench, cmd_commbench),
    "check": Command("before a long job: every rank's versions, kernels, memory, disk, shard "
                     "and link to rank 0; one line per problem" + UNDER_MPI, args_check,
                     run_check),
    "synth": Command("write a random-weight checkpoint with a real model's shapes (for "
                     "benchmarks)", args_synth, cmd_synth, mpi=False),
}


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="mpitpi", description="Tensor-parallel Llama inference "
                                 "across MPI ranks. Launch multi-rank commands with mpiexec.")
    ap.add_argument("--version", action="version", version=f"mpitpi {__version__}")
    add_log_level(ap, top=True)
    sub = ap.add_subparsers(dest="command", required=True)
    for name, c in COMMANDS.items():
        c.arguments(p := sub.add_parser(name, help=c.help, description=c.help))
        add_log_level(p, top=False)
    return ap


def main(argv: list[str] | None = None) -> int:
    a = build_parser().parse_args(argv)
    debug = a.log_level == "debug"
    command = COMMANDS[a.command]
    if not command.mpi:
        try:
            return command.run(a)
        except MpitpiError as e:
            if debug:
                traceback.print_exc()
            print(f"mpitpi: error: {e}", file=sys.stderr)
            return 2
    comm = Comm(algorithm=getattr(a, "allreduce", "mpi"))
    try:
        return command.run(a, comm)
    except CollectiveError as e:
        if debug:
            traceback.print_exc()
        if comm.rank == 0:
            print(f"mpitpi: error: {e}", file=sys.stderr, flush=True)
        return 2
    except MpitpiError as e:
        if debug:
            traceback.print_exc()
        print(f"mpitpi: error on rank {comm.rank} ({comm.host}): {e}", file=sys.stderr)
        comm.abort(2)
    except KeyboardInterrupt:
        print(f"mpitpi: interrupted on rank {comm.rank} ({comm.host})", file=sys.stderr)
        comm.abort(130)
    except BaseException as e:  # a bug: show where, then end every rank
        if isinstance(e, SystemExit) and not e.code:
            raise
        print(f"mpitpi: internal error on rank {comm.rank} ({comm.host}):", file=sys.stderr)
        traceback.print_exc()
        comm.abort(1)
    return 1
