"""The command line's options: one function per subcommand adds its arguments.

Shared groups (model and shard options, --dtype, sampling) are added by one helper each, so
every command that takes them spells and documents them the same way.
"""
from __future__ import annotations

import argparse
import os
import re

from mpitpi.comm import ALGORITHMS
from mpitpi.errors import MpitpiError
from mpitpi.model import KV_DTYPES
from mpitpi.sampling import SamplingParams, bias_outside
from mpitpi.synth import SHAPES
from mpitpi.weights import DTYPES, VOCAB_DTYPES

MODEL_HELP = "a Hugging Face folder (config.json + *.safetensors), a .gguf file, a Hugging " \
             "Face model id found in the local Hugging Face cache (e.g. " \
             "HuggingFaceTB/SmolLM2-135M-Instruct), or the bundled 'smollm2-135m'"
LOG_LEVELS = ("warning", "info", "debug")


def env_default(var: str, fallback=None):
    """An option's default from the environment variable ``var`` (unset or empty: fallback);
    argparse applies the option's type to it, so a bad value is refused like a typed one."""
    return os.environ.get(var) or fallback


def add_log_level(p: argparse.ArgumentParser, top: bool) -> None:
    """--log-level, before the subcommand (``top``, default $MPITPI_LOG_LEVEL or info) or after
    it (no default there: the top-level value stays unless given)."""
    p.add_argument("--log-level", choices=LOG_LEVELS,
                   default=env_default("MPITPI_LOG_LEVEL", "info") if top else argparse.SUPPRESS,
                   help="warning: errors and results only, no progress bars; info (default, "
                   "or $MPITPI_LOG_LEVEL): progress bars too; debug: also the traceback "
                   "behind every error")


def threads_arg(text: str) -> int | str:
    """--threads: 'auto' or a positive integer."""
    if text == "auto":
        return text
    try:
        n = int(text)
    except ValueError:
        n = 0
    if n < 1:
        raise argparse.ArgumentTypeError(f"expected 'auto' or a positive integer, got {text!r}")
    return n


# -- options shared by several commands -------------------------------------------------------

def add_dtype(p: argparse.ArgumentParser, what: str = "weight dtype of the shards",
              vocab: bool = True) -> None:
    p.add_argument("--dtype", choices=DTYPES, help=f"{what}; int8 and int4 are weight-only: "
                   "int8 with one scale per row and 64 columns, int4 in blocks of 32 columns "
                   "with a scale and offset each (default: the checkpoint's own; for a GGUF "
                   "file, what its weights' bits give: int4 for Q4 files)")
    if vocab:
        p.add_argument("--vocab-dtype", choices=VOCAB_DTYPES, help="storage of the embedding "
                       "and lm_head matrices (default: int6 in int4 shards, where GGUF blocks "
                       "do not carry over, else --dtype); int6: 6 bits and a scale per 32 "
                       "columns; int4 reads fewer bytes per token at a cost in quality "
                       "(docs/BENCHMARKS.md)")


def add_model_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=env_default("MPITPI_MODEL"),
                   help=MODEL_HELP + " (default: $MPITPI_MODEL)")
    p.add_argument("--shards", help="a shard folder made by `mpitpi split` (default: split once "
                   "into a cache folder under $MPITPI_CACHE or ~/.cache/mpitpi, then reuse)")
    p.add_argument("--ratios", help="per-rank shares of heads, FFN columns and vocabulary, "
                   "e.g. 2,1,1, or 'auto' to measure each rank (default: uniform)")
    add_dtype(p)
    p.add_argument("--kv-dtype", choices=list(KV_DTYPES), help="what the KV cache stores "
                   "(default: fp32 for fp32 weights, else fp16: half the cache memory per "
                   "position and the bytes attention reads; keys and values are computed in "
                   "fp32 either way)")
    p.add_argument("--threads", type=threads_arg, default="auto",
                   help="threads per rank, or 'auto' (default): of 1 .. the host's cores "
                   "divided by its ranks, the count that runs a decode product fastest at "
                   "start, other work on the host included")
    p.add_argument("--no-verify", action="store_true",
                   help="skip the CRC32 check of shard data as it is read")
    p.add_argument("--allreduce", default="mpi", choices=[*ALGORITHMS, "auto"],
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
    p.add_argument("--stall-timeout", type=float, default=60.0, metavar="SECONDS",
                   help="end the job, naming the rank, when a rank has not answered for this "
                   "long once the model is loaded (default 60; 0: wait forever)")


def add_sampling_options(p: argparse.ArgumentParser, max_tokens: int) -> None:
    """--max-tokens and the SamplingParams fields (checked by SamplingParams.check)."""
    p.add_argument("--max-tokens", type=int, default=max_tokens,
                   help=f"tokens to generate (default {max_tokens})")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-k", type=int, default=0, help="keep the k likeliest tokens (0 = off)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (1 = off)")
    p.add_argument("--min-p", type=float, default=0.0,
                   help="drop tokens below min-p x the top probability (0 = off)")
    p.add_argument("--repeat-penalty", type=float, default=1.0, help="1 = off")
    p.add_argument("--presence-penalty", type=float, default=0.0, help="subtracted once from "
                   "the logit of each token already generated, -2..2 (0 = off; OpenAI's)")
    p.add_argument("--frequency-penalty", type=float, default=0.0, help="subtracted from a "
                   "token's logit per time it was already generated, -2..2 (0 = off; OpenAI's)")
    p.add_argument("--logit-bias", type=logit_bias_arg, action="append", metavar="ID=BIAS",
                   help="add BIAS (-100..100; -100 bans the token) to token ID's logit; "
                   "repeatable")
    p.add_argument("--seed", type=int, help="sampling seed")


def add_draft_options(p: argparse.ArgumentParser) -> None:
    """--draft and --draft-max (speculative decoding on rank 0)."""
    p.add_argument("--draft", choices=["none", "lookup"], default="none",
                   help="speculative decoding: 'lookup' guesses the next tokens from where the "
                   "last ones occurred before in the prompt or the output, and checks the "
                   "guesses in the same forward pass (same text when greedy, same "
                   "distribution when sampling; default none)")
    p.add_argument("--draft-model", metavar="M", help="speculative decoding with a small model "
                   "of the same vocabulary that rank 0 runs alone (a name, folder or GGUF as "
                   "--model; e.g. an int4 SmolLM2 for a larger model of its family)")
    p.add_argument("--draft-max", type=int, default=8, metavar="K",
                   help="tokens guessed per pass with --draft or --draft-model (default 8)")


def draft_tokens(a: argparse.Namespace) -> int:
    """Tokens to draft per pass from --draft/--draft-model/--draft-max (0: off);
    MpitpiError if bad."""
    if a.draft_max < 1:
        raise MpitpiError(f"--draft-max must be at least 1, got {a.draft_max}.")
    if a.draft_model and a.draft == "lookup":
        raise MpitpiError("--draft lookup and --draft-model are two ways to guess; choose one.")
    return a.draft_max if a.draft == "lookup" or a.draft_model else 0


def logit_bias_arg(text: str) -> tuple[int, float]:
    """--logit-bias ID=BIAS -> (id, bias); the range is checked by SamplingParams."""
    tok, _, bias = text.partition("=")
    try:
        return int(tok), float(bias)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected ID=BIAS, e.g. 42=-100, got {text!r}")


def check_bias(params: SamplingParams, vocab_size: int) -> None:
    """--logit-bias ids must be in the model's vocabulary; MpitpiError if not."""
    if bad := bias_outside(params.logit_bias, vocab_size):
        raise MpitpiError(f"--logit-bias names token ids {bad} outside the model's "
                          f"vocabulary [0, {vocab_size}).")


def sampling_params(a: argparse.Namespace) -> SamplingParams:
    """The sampling options of ``a`` (SamplingParams' defaults where a command has none)."""
    given = {k: v for k, v in vars(a).items() if k in SamplingParams.__dataclass_fields__}
    if given.get("logit_bias") is not None:   # [(id, bias), ...] -> {id: bias}
        given["logit_bias"] = dict(given["logit_bias"])
    return SamplingParams(**given)


# -- the subcommands' arguments ---------------------------------------------------------------

def args_split(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help=MODEL_HELP)
    p.add_argument("--out", required=True, help="the shard folder to create (new or empty)")
    p.add_argument("--world-size", "-n", type=int, required=True, help="number of ranks")
    p.add_argument("--ratios", help="per-rank shares, e.g. 2,1,1 (default: uniform)")
    add_dtype(p)


def args_synth(p: argparse.ArgumentParser) -> None:
    p.add_argument("--shape", required=True, choices=list(SHAPES),
                   help="the real model whose shapes to use")
    p.add_argument("--out", required=True, help="a new or empty folder")
    p.add_argument("--layers", type=int, help="keep only this many layers (default: all)")
    p.add_argument("--dtype", default="bf16", choices=["bf16", "fp16", "fp32"],
                   help="dtype of the written weights (default bf16)")
    p.add_argument("--seed", type=int, default=0)


def args_generate(p: argparse.ArgumentParser) -> None:
    add_model_options(p)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", help="the prompt text")
    src.add_argument("--prompt-file", help="read the prompt text from this UTF-8 file")
    src.add_argument("--prompt-ids", help="comma-separated token ids instead of text, or "
                     "@FILE to read them from a file")
    src.add_argument("--prompts-file", help="many prompts, one JSON object a line ({\"prompt\": "
                     "...}, {\"messages\": [...]} or {\"prompt_ids\": [...]}, with optional "
                     "max_tokens, stop and sampling fields), decoded together in a batch; "
                     "answers go to --out as JSON lines in input order")
    p.add_argument("--out", help="with --prompts-file: the JSON-lines file to write (new)")
    p.add_argument("--max-batch", type=int, default=8,
                   help="with --prompts-file: prompts decoded together (default 8)")
    p.add_argument("--chat", action="store_true", help="apply the model's chat template to "
                   "--prompt as a user message")
    p.add_argument("--system", help="system message for --chat")
    add_sampling_options(p, max_tokens=64)
    p.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    add_draft_options(p)
    p.add_argument("--ignore-eos", action="store_true",
                   help="keep generating past end-of-sequence tokens (for benchmarks)")
    p.add_argument("--json", action="store_true", help="print one JSON object at the end "
                   "instead of streaming text")
    p.add_argument("--verbose", "-v", action="store_true", help="print rank 0's timing of "
                   "every token on stderr: total, compute and all-reduce ms, kB sent")
    p.add_argument("--logits-out", help="save the logits of every generated token as a "
                   "float32 .npy array [tokens, vocab] (.npy is added if missing)")


def args_chat(p: argparse.ArgumentParser) -> None:
    add_model_options(p)
    add_sampling_options(p, max_tokens=256)
    add_draft_options(p)
    p.add_argument("--system", help="system message")


def args_serve(p: argparse.ArgumentParser) -> None:
    add_model_options(p)
    p.add_argument("--host", default=env_default("MPITPI_HOST", "127.0.0.1"),
                   help="address to bind (default $MPITPI_HOST or 127.0.0.1; 0.0.0.0: every "
                   "interface)")
    p.add_argument("--port", type=int, default=env_default("MPITPI_PORT", 8000),
                   help="port (default $MPITPI_PORT or 8000; 0 = any free)")
    p.add_argument("--api-key", default=env_default("MPITPI_API_KEY"),
                   help="require 'Authorization: Bearer KEY' on /v1 requests, /tokenize, "
                   "/detokenize and /metrics (docs/ENDPOINTS.md; default $MPITPI_API_KEY: the "
                   "environment keeps the key out of `ps`)")
    p.add_argument("--name", help="model name in the API (default: from --model)")
    p.add_argument("--max-tokens", type=int, default=512,
                   help="completion length when a request gives none (default 512)")
    p.add_argument("--max-batch", type=int, help="requests decoded together, each in its own "
                   "KV cache slot (default: as many as the KV budget holds at 2048 positions "
                   "each, at most 16, at least 1)")
    p.add_argument("--kv-budget", help="KV cache memory per rank for all requests, e.g. 512M "
                   "(default: a quarter of the memory available on the rank with the least); "
                   "a request waits until its prompt plus max_tokens fits")
    p.add_argument("--max-queue", type=int, default=64, help="requests that may wait for a "
                   "slot; more get 429 (default 64)")
    add_draft_options(p)
    p.add_argument("--cors-origin", action="append", default=[], metavar="ORIGIN",
                   help="a web origin (e.g. http://localhost:3000) whose pages may call the "
                   "API from a browser; repeatable, '*' for any (default: none, only the "
                   "server's own chat page)")


def args_bench(p: argparse.ArgumentParser) -> None:
    add_model_options(p)
    p.add_argument("--prompt-len", type=int, default=32, help="prompt tokens (default 32)")
    p.add_argument("--gen-len", type=int, default=32, help="tokens per generation (default 32)")
    p.add_argument("--reps", type=int, default=3, help="timed repetitions after a warm-up "
                   "(default 3)")
    p.add_argument("--disk", action="store_true", help="also measure each rank's cold read "
                   "bandwidth of its shard file")
    p.add_argument("--json", help="write the results to this JSON file")
    p.add_argument("--seed", dest="prompt_seed", type=int, default=0,
                   help="seed of the random prompt")


def args_perplexity(p: argparse.ArgumentParser) -> None:
    add_model_options(p)
    p.add_argument("--file", help="score this UTF-8 text file (default: mpitpi's own README.md "
                   "and docs/*.md, or the copy of them shipped in the package)")
    p.add_argument("--ctx", type=int, default=256, help="tokens per window, the BOS token "
                   "included when the model has one (default 256)")
    p.add_argument("--max-windows", type=int, help="score only the first W windows "
                   "(default: all)")
    p.add_argument("--save-windows", metavar="FILE", help="write the scored windows of token "
                   "ids to this JSON file, to score the same tokens with another engine")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of the "
                   "one-line result, and no progress bar")


def args_profile(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help=MODEL_HELP)
    add_dtype(p, "dtype to measure", vocab=False)
    p.add_argument("--memory-budget", help="memory each rank may use for weights (default: "
                   "its available memory)")
    p.add_argument("--json", action="store_true", help="print JSON instead of the table")


def args_check(p: argparse.ArgumentParser) -> None:
    add_model_options(p)   # the job's own options: the same split, folders and memory plan
    p.add_argument("--reserve-mb", type=float, default=512, help="memory each rank needs "
                   "beside its weights: Python, torch, the KV cache (default 512)")
    p.add_argument("--json", action="store_true", help="print JSON instead of the table")


def args_commbench(p: argparse.ArgumentParser) -> None:
    p.add_argument("--reps", type=int, default=20, help="calls per size (default 20)")
    p.add_argument("--json", help="write the results to this JSON file")


# -- checks of what the options name (rank 0, before a model is loaded) -----------------------

def read_text(path: str, what: str, fill: str = "put the prompt in it") -> str:
    """The UTF-8 text of the file ``path``; an error naming the problem and the fix if it
    cannot be read, is not UTF-8 or is blank (the fix then: ``fill``)."""
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
        raise MpitpiError(f"{what} {path!r} is empty. Fix: {fill}.")
    return text


def read_prompt(a: argparse.Namespace) -> tuple[str | None, list[int] | None]:
    """Rank 0, before any model is loaded: the prompt text, or its ids, from the options."""
    if a.prompt_ids is not None:
        spec = a.prompt_ids
        if spec.startswith("@"):
            spec = read_text(spec[1:], "prompt-ids file")
        try:
            ids = [int(x) for x in re.split(r"[,\s]+", spec) if x]
        except ValueError:
            raise MpitpiError(f"--prompt-ids {a.prompt_ids!r} is not a comma-separated list of "
                              f"integers. Fix: e.g. --prompt-ids 1,15043,29892")
        if not ids:
            raise MpitpiError("--prompt-ids holds no token ids. Fix: e.g. --prompt-ids 1,2,3")
        return None, ids
    if a.prompt_file is not None:
        return read_text(a.prompt_file, "prompt file"), None
    if not a.prompt:
        raise MpitpiError("--prompt is empty. Fix: give a prompt text.")
    return a.prompt, None


def npy_path(path: str) -> str:
    """The file ``np.save(path, ...)`` writes: .npy is added when missing."""
    return path if path.endswith(".npy") else path + ".npy"


def refuse_existing(path: str | None, option: str) -> None:
    """Output files are never overwritten: ``path`` is checked as it will be written."""
    if path and os.path.lexists(path):
        raise MpitpiError(f"{option}: {path!r} exists; it is not overwritten. Fix: remove it "
                          f"or choose another name.")


def check_positive(**values: int) -> None:
    """Each named option (e.g. max_tokens=0) must be at least 1."""
    for name, v in values.items():
        if v < 1:
            raise MpitpiError(f"--{name.replace('_', '-')} must be at least 1, got {v}.")
