"""Offline batches: many prompts from a JSON-lines file through the batch, answers to another.

Each input line is one object: ``{"prompt": "text"}``, ``{"messages": [{"role", "content"},
...]}`` (the chat template is applied) or ``{"prompt_ids": [ids]}``, with any of
``max_tokens``, ``stop`` and the sampling fields (``temperature``, ``top_k``, ``top_p``,
``min_p``, ``repeat_penalty``, ``presence_penalty``, ``frequency_penalty``, ``seed``,
``logit_bias`` as in the API) to override the command line's. Each output line:
``{"index", "text", "token_ids", "finish_reason", "prompt_tokens", "completion_tokens",
"cached_tokens"}``, written in input order as soon as every earlier prompt is done.
"""
from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass, fields, replace

from tqdm import tqdm

from mpitpi.batch import Batch, Runner
from mpitpi.errors import MpitpiError
from mpitpi.sampling import BadOption, Sampler, SamplingParams, bias_from_json, bias_outside
from mpitpi.session import Session, check_prompt

KEYS = {"prompt", "messages", "prompt_ids", "max_tokens", "stop",
        *(f.name for f in fields(SamplingParams))}


@dataclass
class Request:
    ids: list[int]
    max_tokens: int
    params: SamplingParams
    stops: list[str]


def read_prompts(path: str, tok, params: SamplingParams, max_tokens: int, stops: list[str],
                 vocab_size: int, max_seq_len: int) -> list[Request]:
    """Rank 0: every line of ``path`` checked and tokenized; an MpitpiError names the first
    bad line and what is wrong with it."""
    try:
        with open(path, encoding="utf-8") as f:
            lines = f.read().splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise MpitpiError(f"cannot read --prompts-file {path!r}: {e}. Fix: give a UTF-8 "
                          f"JSON-lines file.")
    out = []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        where = f"--prompts-file {path!r} line {n}"
        try:
            obj = json.loads(line)
        except ValueError as e:
            raise MpitpiError(f"{where} is not JSON ({e}). Fix: one JSON object per line.")
        if not isinstance(obj, dict) or not {"prompt", "messages", "prompt_ids"} & set(obj):
            raise MpitpiError(f"{where} needs a \"prompt\", \"messages\" or \"prompt_ids\" field.")
        if unknown := sorted(set(obj) - KEYS):
            raise MpitpiError(f"{where}: unknown field(s) {unknown}; known: {sorted(KEYS)}.")
        try:
            if "prompt_ids" in obj:
                ids = obj["prompt_ids"]
                if not (isinstance(ids, list) and all(
                        isinstance(i, int) and not isinstance(i, bool) for i in ids)):
                    raise MpitpiError("\"prompt_ids\" must be a list of integers")
            elif tok is None:
                raise MpitpiError("this model has no tokenizer: give \"prompt_ids\"")
            elif "messages" in obj:
                ids = tok.encode_chat(obj["messages"])
            else:
                ids = tok.encode(str(obj["prompt"]))
            given = {k: obj[k] for k in obj if k in SamplingParams.__dataclass_fields__}
            if "logit_bias" in given:   # as in the API: JSON keys are strings
                given["logit_bias"] = bias_from_json(given["logit_bias"])
                if bad := bias_outside(given["logit_bias"], vocab_size):
                    raise MpitpiError(f"\"logit_bias\" names token ids {bad} outside the "
                                      f"vocabulary [0, {vocab_size})")
            p = replace(params, **given).check()
            m = obj.get("max_tokens", max_tokens)
            if not isinstance(m, int) or isinstance(m, bool):
                raise MpitpiError(f"\"max_tokens\" must be an integer, got {m!r}")
            s = obj.get("stop", stops)
            s = [s] if isinstance(s, str) else list(s)
            check_prompt(ids, m, vocab_size, max_seq_len)
        except (MpitpiError, BadOption, TypeError, ValueError) as e:
            raise MpitpiError(f"{where}: {e}")
        out.append(Request(ids, m, p, s))
    if not out:
        raise MpitpiError(f"--prompts-file {path!r} holds no prompts.")
    return out


def run_offline(comm, model, requests: list[Request] | None, out_path: str | None, eos: list[int],
                decode, max_batch: int, draft: int, drafter=None) -> dict | None:
    """Collective: rank 0 runs ``requests`` through a Batch of ``max_batch`` slots, writes
    ``out_path`` (created, never overwritten) and prints a summary line on stderr; the others
    follow. Returns rank 0's summary."""
    if comm.rank != 0:
        Runner(comm, model).follow()
        return None
    t0 = time.perf_counter()
    sessions = [Session(r.ids, r.max_tokens, Sampler(r.params), eos, decode, r.stops)
                for r in requests]
    batch = Batch(comm, model, max_batch, draft=draft, drafter=drafter)
    index = {id(s): i for i, s in enumerate(sessions)}
    done, written = set(), 0
    with open(out_path, "x", encoding="utf-8") as f, \
            tqdm(total=len(sessions), unit="prompt", file=sys.stderr) as bar:
        def finished(s: Session) -> None:
            nonlocal written
            done.add(index[id(s)])
            bar.update(1)
            while written in done:   # in input order, as soon as the earlier ones are done
                f.write(json.dumps(_line(written, sessions[written])) + "\n")
                f.flush()
                written += 1
        batch.run_all(sessions, finished)
    tokens, passes = sum(len(s.result.token_ids) for s in sessions), batch.runner.passes
    secs = time.perf_counter() - t0
    print(f"[mpitpi] {len(sessions)} prompts, {tokens} tokens in {secs:.1f} s "
          f"({tokens / secs:.1f} tokens/s, {passes} forward passes) on {comm.size} ranks -> "
          f"{out_path}", file=sys.stderr)
    return {"prompts": len(sessions), "completion_tokens": tokens, "forward_passes": passes,
            "seconds": round(secs, 3), "tokens_per_s": round(tokens / secs, 3),
            "max_batch": max_batch, "world_size": comm.size}


def _line(i: int, s: Session) -> dict:
    r = s.result
    return {"index": i, "text": r.text, "token_ids": r.token_ids,
            "finish_reason": r.finish_reason, "prompt_tokens": r.prompt_tokens,
            "completion_tokens": len(r.token_ids), "cached_tokens": r.cached_tokens}
