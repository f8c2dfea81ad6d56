"""The `mpitpi` command: parse arguments, then call one function.

    mpitpi split MODEL --out DIR --world-size N [--ratios 2,1,1] [--dtype fp32|bf16|fp16|int8]
    mpiexec -n N mpitpi generate --model MODEL --prompt TEXT [options]
    mpiexec -n N mpitpi chat --model MODEL [--system TEXT]

The failure path: an error every rank raised together (a checked step) is printed once by
rank 0 and every rank exits 2; an error on one rank alone is printed with its rank and host
and the whole job is aborted, so no rank is left waiting in a collective.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import sys
import traceback

from mpitpi.errors import CollectiveError, MpitpiError


def _add_model_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", help="a Hugging Face folder (config.json + *.safetensors), a "
                   ".gguf file, or the bundled 'smollm2-135m'")
    p.add_argument("--shards", help="a shard folder made by `mpitpi split` (default: split once "
                   "into a cache folder under $MPITPI_CACHE or ~/.cache/mpitpi, then reuse)")
    p.add_argument("--ratios", help="per-rank shares of heads, FFN columns and vocabulary, "
                   "e.g. 2,1,1, or 'auto' to measure each rank (default: uniform)")
    p.add_argument("--dtype", choices=["fp32", "bf16", "fp16", "int8"],
                   help="weight dtype of automatically made shards; int8 is weight-only with "
                   "one scale per row and 64 columns (default: the checkpoint's own; fp16 for GGUF)")
    p.add_argument("--threads", type=int, help="torch threads per rank (default: the host's "
                   "cores divided by the ranks on that host, at least 1)")
    p.add_argument("--no-verify", action="store_true",
                   help="skip the CRC32 check of shard data as it is read")
    p.add_argument("--allreduce", default="mpi", choices=["mpi", "star", "ring", "auto"],
                   help="all-reduce algorithm: MPI's own (default), star through rank 0, ring, "
                   "or auto (measure mpi vs star at start for small messages; for links with "
                   "several ms of latency)")
    p.add_argument("--local-shards", help="where ranks other than 0 keep their shard file, "
                   "e.g. /var/tmp/mpitpi ({rank} is replaced by the rank); a missing or stale "
                   "one is sent from rank 0 once and checked (default: the shard folder)")
    p.add_argument("--window", type=int, help="stream layers from disk, at most W in memory "
                   "(default: all layers resident)")
    p.add_argument("--memory-budget", help="weights this rank may hold, e.g. 1.5G: as many "
                   "layers as fit stay resident, the rest stream through --window (default 2)")
    p.add_argument("--drop-cache", action="store_true", help="drop the shard's pages from the "
                   "page cache after each read, as on a device without spare RAM")


SAMPLING = ("temperature", "top_k", "top_p", "min_p", "repeat_penalty", "seed")


def _add_sampling_options(p: argparse.ArgumentParser) -> None:
    """The options named in SAMPLING (their dests are SamplingParams' fields)."""
    p.add_argument("--max-tokens", type=int, default=64, help="tokens to generate (default 64)")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-k", type=int, default=0, help="keep the k likeliest tokens (0 = off)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (1 = off)")
    p.add_argument("--min-p", type=float, default=0.0,
                   help="drop tokens below min-p x the top probability (0 = off)")
    p.add_argument("--repeat-penalty", type=float, default=1.0, help="1 = off")
    p.add_argument("--seed", type=int, help="sampling seed")


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="mpitpi", description="Tensor-parallel Llama inference "
                                 "across MPI ranks. Launch multi-rank commands with mpiexec.")
    sub = ap.add_subparsers(dest="command", required=True)

    sp = sub.add_parser("split", help="write one shard file per rank from a checkpoint")
    sp.add_argument("model", help="a Hugging Face folder, a .gguf file, or 'smollm2-135m'")
    sp.add_argument("--out", required=True, help="the shard folder to create (new or empty)")
    sp.add_argument("--world-size", "-n", type=int, required=True, help="number of ranks")
    sp.add_argument("--ratios", help="per-rank shares, e.g. 2,1,1 (default: uniform)")
    sp.add_argument("--dtype", choices=["fp32", "bf16", "fp16", "int8"],
                    help="weight dtype; int8 is weight-only with one scale per row and 64 "
                    "columns (default: the checkpoint's own; fp16 for GGUF)")

    gp = sub.add_parser("generate", help="generate text (run under mpiexec -n N)")
    _add_model_options(gp)
    src = gp.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", help="the prompt text")
    src.add_argument("--prompt-file", help="read the prompt text from this UTF-8 file")
    src.add_argument("--prompt-ids", help="comma-separated token ids instead of text, or "
                     "@FILE to read them from a file")
    gp.add_argument("--chat", action="store_true", help="apply the model's chat template to "
                    "--prompt as a user message")
    gp.add_argument("--system", help="system message for --chat")
    _add_sampling_options(gp)
    gp.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    gp.add_argument("--ignore-eos", action="store_true",
                    help="keep generating past end-of-sequence tokens (for benchmarks)")
    gp.add_argument("--json", action="store_true", help="print one JSON object at the end "
                    "instead of streaming text")
    gp.add_argument("--verbose", "-v", action="store_true", help="print rank 0's timing of "
                    "every token on stderr: total, compute and all-reduce ms, kB sent")
    gp.add_argument("--logits-out", help="save the logits of every generated token as a "
                    "float32 .npy array [tokens, vocab]")

    yp = sub.add_parser("synth", help="write a random-weight checkpoint with a real model's "
                        "shapes (for benchmarks)")
    yp.add_argument("--shape", required=True, help="llama-3.2-1b, llama-3.1-8b, llama-2-7b, "
                    "llama-2-70b or smollm2-135m")
    yp.add_argument("--out", required=True, help="a new or empty folder")
    yp.add_argument("--layers", type=int, help="keep only this many layers (default: all)")
    yp.add_argument("--dtype", default="bf16", choices=["bf16", "fp16", "fp32"],
                    help="dtype of the written weights (default bf16)")
    yp.add_argument("--seed", type=int, default=0)

    bp = sub.add_parser("bench", help="time repeated generations: TTFT, ms/token, memory, "
                        "communication (run under mpiexec -n N)")
    _add_model_options(bp)
    bp.add_argument("--prompt-len", type=int, default=32, help="prompt tokens (default 32)")
    bp.add_argument("--gen-len", type=int, default=32, help="tokens per generation (default 32)")
    bp.add_argument("--reps", type=int, default=3, help="timed repetitions after a warm-up "
                    "(default 3)")
    bp.add_argument("--disk", action="store_true", help="also measure each rank's cold read "
                    "bandwidth of its shard file")
    bp.add_argument("--json", help="write the results to this JSON file")
    bp.add_argument("--seed", dest="prompt_seed", type=int, default=0,
                    help="seed of the random prompt")

    vp = sub.add_parser("serve", help="OpenAI-compatible HTTP server on rank 0 (run under "
                        "mpiexec -n N)")
    _add_model_options(vp)
    vp.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    vp.add_argument("--port", type=int, default=8000, help="port (default 8000; 0 = any free)")
    vp.add_argument("--api-key", help="require 'Authorization: Bearer KEY' on /v1 requests")
    vp.add_argument("--name", help="model name in the API (default: from --model)")
    vp.add_argument("--max-tokens", type=int, default=512,
                    help="completion length when a request gives none (default 512)")

    mp = sub.add_parser("commbench", help="all-reduce latency per algorithm and message size "
                        "(run under mpiexec -n N)")
    mp.add_argument("--reps", type=int, default=20, help="calls per size (default 20)")
    mp.add_argument("--json", help="write the results to this JSON file")

    fp = sub.add_parser("profile", help="measure every rank and print the split --ratios auto "
                        "would choose (run under mpiexec -n N)")
    fp.add_argument("--model", required=True, help="a Hugging Face folder, a .gguf file, or "
                    "'smollm2-135m'")
    fp.add_argument("--dtype", choices=["fp32", "bf16", "fp16", "int8"],
                    help="compute dtype to measure (default: the checkpoint's own; fp16 for GGUF)")
    fp.add_argument("--memory-budget", help="memory each rank may use for weights (default: "
                    "its available memory)")
    fp.add_argument("--json", action="store_true", help="print JSON instead of the table")

    cp = sub.add_parser("chat", help="interactive multi-turn chat on rank 0's terminal "
                        "(run under mpiexec -n N)")
    _add_model_options(cp)
    _add_sampling_options(cp)
    cp.add_argument("--system", help="system message")
    cp.set_defaults(max_tokens=256)
    return ap


def cmd_split(a) -> int:
    from mpitpi.checkpoint import open_checkpoint
    from mpitpi.plan import parse_ratios
    from mpitpi.shards import check_out_folder, write_shards

    if a.ratios == "auto":
        raise MpitpiError("split runs as one process, so it cannot measure the ranks. Fix: "
                          "let `mpiexec -n N mpitpi generate --ratios auto` split, or run "
                          "`mpiexec -n N mpitpi profile` and pass the ratios it prints.")
    ckpt = open_checkpoint(a.model)
    ratios = parse_ratios(a.ratios, a.world_size)
    from mpitpi.plan import plan_for_args
    plan_for_args(ckpt.args, a.world_size, ratios)   # bad world size / ratios: error first
    check_out_folder(a.out)
    from mpitpi.checkpoint import natural_dtype
    man = write_shards(ckpt, a.out, a.world_size, ratios, a.dtype or natural_dtype(a.model),
                       progress=True)
    total = sum(f["size"] for f in man["files"]) / 2**20
    print(f"wrote {a.world_size} shard files ({total:.1f} MiB) and manifest.json to {a.out}")
    return 0


def _threads(local_ranks: int, requested: int | None) -> int:
    """--threads, or the host's cores divided by the job's ranks on this host."""
    if requested is not None:
        if requested < 1:
            raise MpitpiError(f"--threads must be at least 1, got {requested}.")
        return requested
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return max(1, min(cores, (os.cpu_count() or 1) // local_ranks))


def peak_rss_mb() -> float:
    """This process's peak resident set (VmHWM) in MB."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return 0.0


def _read_text(path: str, what: str) -> str:
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise MpitpiError(f"cannot read {what} {path!r}: {e.strerror}. Fix: check the path "
                          f"and its permissions.")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise MpitpiError(f"{what} {path!r} is not UTF-8 text (byte {e.start} is invalid). "
                          f"Fix: save it as UTF-8.")
    if not text.strip():
        raise MpitpiError(f"{what} {path!r} is empty. Fix: put the prompt in it.")
    return text


def read_prompt(a) -> tuple[str | None, list[int] | None]:
    """Rank 0, before any model is loaded: the prompt text, or its ids, from the options."""
    if a.prompt_ids is not None:
        spec = a.prompt_ids
        if spec.startswith("@"):
            spec = _read_text(spec[1:], "prompt-ids file")
        try:
            ids = [int(x) for x in re.split(r"[,\s]+", spec) if x]
        except ValueError:
            raise MpitpiError(f"--prompt-ids {a.prompt_ids!r} is not a comma-separated list of "
                              f"integers. Fix: e.g. --prompt-ids 1,15043,29892")
        if not ids:
            raise MpitpiError("--prompt-ids holds no token ids. Fix: e.g. --prompt-ids 1,2,3")
        return None, ids
    if a.prompt_file is not None:
        return _read_text(a.prompt_file, "prompt file"), None
    if not a.prompt:
        raise MpitpiError("--prompt is empty. Fix: give a prompt text.")
    return a.prompt, None


def _prompt_ids(a, loaded, text: str | None, ids: list[int] | None) -> list[int]:
    """Rank 0: the prompt as token ids, checked against the model."""
    from mpitpi.generate import check_prompt

    if ids is None:
        if loaded.tokenizer_path is None:
            raise MpitpiError("the model has no tokenizer.json, so --prompt cannot be "
                              "tokenized. Fix: pass --prompt-ids 1,2,3 instead.")
        tok = _tokenizer(loaded)
        if a.chat:
            from mpitpi.tokenizer import chat_messages
            ids = tok.encode_chat(chat_messages(text, a.system))
        else:
            ids = tok.encode(text)
    check_prompt(ids, a.max_tokens, loaded.args.vocab_size, loaded.args.max_seq_len)
    return ids


_TOKENIZERS: dict = {}


def _tokenizer(loaded):
    from mpitpi.tokenizer import load_tokenizer

    if loaded.tokenizer_path not in _TOKENIZERS:
        _TOKENIZERS[loaded.tokenizer_path] = load_tokenizer(loaded.tokenizer_path)
    return _TOKENIZERS[loaded.tokenizer_path]


def _need_tokenizer(comm, loaded, command: str, template: bool = False):
    """Collective: rank 0's tokenizer (None on the others); an error on every rank if the
    model has none (or, with ``template``, no chat template)."""
    def check():
        if loaded.tokenizer_path is None:
            raise MpitpiError(f"{command} needs a tokenizer and this model has none. Fix: use "
                              f"a model with tokenizer.json or a GGUF file.")
        if template:
            _tokenizer(loaded).render_chat([{"role": "user", "content": "hi"}])
    comm.root_checked(check)
    return _tokenizer(loaded) if comm.rank == 0 else None


def _refuse_existing(path: str | None, option: str) -> None:
    """Output files are never overwritten."""
    if path and os.path.exists(path):
        raise MpitpiError(f"{option} {path!r} exists; it is not overwritten. Fix: remove it "
                          f"or choose another name.")


def _start(a, comm):
    """Collective: threads, sampling parameters and this rank's model."""
    import torch

    from mpitpi.loader import load_model
    from mpitpi.sampling import SamplingParams

    local_ranks = comm.local_size()
    threads = comm.checked(_threads, local_ranks, a.threads)
    torch.set_num_threads(threads)
    # more busy threads than cores on this host: waiting ranks must yield their core
    comm.polite = local_ranks * threads > (os.cpu_count() or 1)
    # commands without sampling options (bench, serve) get SamplingParams' greedy defaults
    params = SamplingParams(**{k: getattr(a, k) for k in SAMPLING if hasattr(a, k)})
    comm.checked(params.check)
    loaded = load_model(comm, a.model, a.shards, a.ratios, a.dtype, verify=not a.no_verify,
                        progress=comm.rank == 0, window=a.window,
                        memory_budget=a.memory_budget, drop_cache=a.drop_cache,
                        local_shards=a.local_shards)
    if a.threads is None and threads >= 2 and hasattr(loaded.model.layers, "reader"):
        torch.set_num_threads(threads - 1)   # leave a core to the layer reader (measured)
    return params, loaded


def cmd_bench(a, comm) -> int:
    from mpitpi.bench import format_bench, run_bench

    def check():
        if a.prompt_len < 1 or a.gen_len < 1 or a.reps < 1:
            raise MpitpiError("--prompt-len, --gen-len and --reps must be at least 1.")
        _refuse_existing(a.json, "--json")
    comm.root_checked(check)
    _, loaded = _start(a, comm)
    comm.root_checked(check_prompt_room, loaded.args, a.prompt_len, a.gen_len)
    res = run_bench(comm, loaded, a.prompt_len, a.gen_len, a.reps, a.prompt_seed, a.disk,
                    rss_fn=peak_rss_mb)
    if comm.rank == 0:
        print(format_bench(res))
        if a.json:
            with open(a.json, "w") as f:
                json.dump(res, f, indent=1)
    return 0


def check_prompt_room(args, prompt_len: int, gen_len: int) -> None:
    if prompt_len + gen_len > args.max_seq_len:
        raise MpitpiError(f"--prompt-len + --gen-len = {prompt_len + gen_len} is beyond the "
                          f"model's context of {args.max_seq_len}.")


def cmd_serve(a, comm) -> int:
    from mpitpi.server import serve

    _, loaded = _start(a, comm)
    tok = _need_tokenizer(comm, loaded, "serve")
    name = a.name or os.path.basename(os.path.normpath(a.model or loaded.shards))
    serve(comm, loaded, tok, name, a.host, a.port, a.api_key, a.max_tokens)
    loaded.model.layers.close()
    return 0


def cmd_commbench(a, comm) -> int:
    from mpitpi.commbench import run_commbench

    comm.root_checked(_refuse_existing, a.json, "--json")
    res = run_commbench(comm.comm, reps=a.reps)
    if comm.rank == 0:
        print("all-reduce ms per call (median, slowest rank)")
        print("bytes".rjust(10) + "".join(alg.rjust(10) for alg in res))
        for size in next(iter(res.values())):
            print(f"{size:10d}" + "".join(f"{res[alg][size]:10.3f}" for alg in res))
        if a.json:
            with open(a.json, "w") as f:
                json.dump({"world_size": comm.size, "ms_per_call": res}, f, indent=1)
    return 0


def cmd_profile(a, comm) -> int:
    from mpitpi.loader import _auto
    from mpitpi.plan import parse_ratios, plan_for_args

    ratios, figs = _auto(comm, a.model, None, a.dtype, a.memory_budget, progress=not a.json)
    if comm.rank == 0 and a.json:
        from mpitpi.checkpoint import open_checkpoint
        args = open_checkpoint(a.model).args
        plan = plan_for_args(args, comm.size, parse_ratios(ratios, comm.size))
        print(json.dumps({"ratios": ratios, "ranks": figs, "plan": [s.to_dict() for s in plan]}))
    elif comm.rank == 0:
        print(f"--ratios auto would use: --ratios {ratios}")
    return 0


def cmd_chat(a, comm) -> int:
    from mpitpi.chat import run_chat
    from mpitpi.sampling import Sampler

    params, loaded = _start(a, comm)
    tok = _need_tokenizer(comm, loaded, "chat", template=True)
    run_chat(comm, loaded, tok, lambda: Sampler(params), a.max_tokens, a.system)
    return 0


def cmd_generate(a, comm) -> int:
    import numpy as np

    from mpitpi.generate import generate
    from mpitpi.sampling import Sampler

    root = comm.rank == 0

    def early():
        _refuse_existing(a.logits_out, "--logits-out")
        return read_prompt(a)
    text, given_ids = comm.root_checked(early)
    params, loaded = _start(a, comm)
    ids = comm.root_checked(_prompt_ids, a, loaded, text, given_ids)
    decode = _tokenizer(loaded).decode if (root and loaded.tokenizer_path) else None

    def emit(text: str) -> None:
        sys.stdout.write(text)
        sys.stdout.flush()

    def step_line(step: int, ms: float, comm_ms: float, nbytes: int) -> None:
        print(f"[token {step:4d}] {ms:8.2f} ms  compute {ms - comm_ms:8.2f} ms  all-reduce "
              f"{comm_ms:7.2f} ms  sent {nbytes / 1e3:8.1f} kB", file=sys.stderr, flush=True)

    c0, b0 = comm.allreduce_s, comm.allreduce_bytes
    res = generate(comm, loaded.model, [s.n_vocab for s in loaded.plan], ids, a.max_tokens,
                   sampler=Sampler(params) if root else None,
                   eos_ids=[] if a.ignore_eos else loaded.args.eos_token_ids,
                   decode=decode, stops=a.stop, on_text=None if a.json else emit,
                   keep_logits=bool(a.logits_out),
                   on_step=step_line if (root and a.verbose) else None)
    passes = 1 + len(res.step_ms)          # every rank timed the prefill and each step
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
        np.save(a.logits_out, np.stack(res.logits).astype(np.float32))
    n = len(res.token_ids)
    if a.json:
        print(json.dumps({
            "text": res.text, "token_ids": res.token_ids, "prompt_tokens": res.prompt_tokens,
            "ttft_ms": round(res.ttft_ms, 3), "ms_per_token": round(res.ms_per_token, 3),
            "tokens_per_s": round(1e3 / res.ms_per_token, 3) if res.ms_per_token else None,
            "finish_reason": res.finish_reason, "world_size": comm.size,
            "peak_rss_mb": rss, "io_wait_ms_per_token": io_wait,
            "resident_layers": resident, "window": getattr(layers, "window", None),
            "allreduce": comm.algorithm + (f" ({comm.small} for small)" if comm.small else ""),
            "comm_ms_per_token": comm_ms,
            "bytes_per_token": sent}))
    else:
        print(flush=True)
        print(f"[mpitpi] {n} tokens on {comm.size} ranks: TTFT {res.ttft_ms:.0f} ms, "
              f"{res.ms_per_token:.1f} ms/token, peak RSS MB per rank {rss}", file=sys.stderr)
    return 0


def main(argv: list[str] | None = None) -> int:
    a = build_parser().parse_args(argv)
    if a.command in ("split", "synth"):
        try:
            if a.command == "synth":
                from mpitpi.synth import synth
                cfg = synth(a.shape, a.out, a.layers, a.dtype, a.seed)
                print(f"wrote a random {a.shape} ({cfg['num_hidden_layers']} layers, {a.dtype})"
                      f" to {a.out}")
                return 0
            return cmd_split(a)
        except MpitpiError as e:
            print(f"mpitpi: error: {e}", file=sys.stderr)
            return 2
    from mpitpi.comm import Comm

    comm = Comm(algorithm=getattr(a, "allreduce", "mpi"))
    try:
        cmd = {"chat": cmd_chat, "profile": cmd_profile, "bench": cmd_bench,
               "generate": cmd_generate, "serve": cmd_serve, "commbench": cmd_commbench}[a.command]
        return cmd(a, comm)
    except CollectiveError as e:
        if comm.rank == 0:
            print(f"mpitpi: error: {e}", file=sys.stderr, flush=True)
        return 2
    except MpitpiError as e:
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
