"""mpitpi from Python: ``mpitpi.LLM(model).generate(...)`` / ``.chat(...)``.

At world size 1 (a plain ``python`` or a notebook) the whole model runs in this process.
Under ``mpiexec -n N python script.py`` every rank runs the same script: constructing an
LLM and each of its calls are collective, so every rank must make the same calls in the
same order. Rank 0's arguments are the ones used (the others' are ignored), the work is
split across the ranks as in ``mpitpi generate``, and every rank returns the same results.
A bad argument raises MpitpiError on every rank; nothing is left waiting in a collective.

    llm = mpitpi.LLM("smollm2-135m")
    print(llm.chat([{"role": "user", "content": "What is the capital of France?"}]).text)
    for c in llm.generate(["The sky is", "Water is"], max_tokens=16):
        print(c.text)
"""
from __future__ import annotations

from dataclasses import dataclass

from mpitpi.batch import Batch, Runner
from mpitpi.comm import Comm
from mpitpi.errors import MpitpiError
from mpitpi.loader import start_model
from mpitpi.sampling import Sampler, SamplingParams
from mpitpi.session import Session, check_prompt
from mpitpi.tokenizer import load_tokenizer


@dataclass
class Completion:
    """One finished generation (the same on every rank)."""
    text: str
    token_ids: list[int]
    finish_reason: str     # "stop" (EOS or a stop string) or "length" (max_tokens)
    prompt_tokens: int
    cached_tokens: int     # prompt tokens whose KV cache was reused from an earlier call
    ttft_ms: float
    ms_per_token: float


class LLM:
    """A loaded model on every rank of ``comm`` (default: every rank of the job).

    ``model``: a Hugging Face folder, a .gguf file, a Hugging Face id in the local cache or
    ``smollm2-135m``; the other arguments are the command line's (``dtype`` int4, int8,
    bf16, fp16 or fp32, ``vocab_dtype`` that of the vocabulary matrices, ``kv_dtype`` the KV
    cache's (fp16 or fp32; default fp32 for fp32 weights, else fp16); ``window`` streams
    layers from disk; ``max_batch`` prompts of one
    ``generate`` call run together). Loading shows a progress bar on rank 0 unless
    ``progress`` is False."""

    def __init__(self, model: str, *, dtype: str | None = None, shards: str | None = None,
                 ratios: str | None = None, threads: int | str = "auto",
                 window: int | None = None, memory_budget: str | None = None,
                 local_shards: str | None = None, max_batch: int = 8, progress: bool = True,
                 vocab_dtype: str | None = None, kv_dtype: str | None = None,
                 comm: Comm | None = None):
        self.comm = comm or Comm()
        if not (isinstance(max_batch, int) and max_batch >= 1):
            raise MpitpiError(f"max_batch must be a positive integer, got {max_batch!r}.")
        self.max_batch = max_batch
        self.loaded = start_model(self.comm, model, shards, ratios, dtype, threads=threads,
                                  progress=progress, window=window,
                                  memory_budget=memory_budget, local_shards=local_shards,
                                  vocab_dtype=vocab_dtype, kv_dtype=kv_dtype,
                                  freeze=False)   # the user's process
        self.tokenizer = None   # rank 0's

        def tokenizer():
            if path := self.loaded.tokenizer_path:
                self.tokenizer = load_tokenizer(path)
        self._on_root(tokenizer)

    @property
    def rank(self) -> int:
        return self.comm.rank

    @property
    def world_size(self) -> int:
        return self.comm.size

    def generate(self, prompts: str | list[str] | list[int] | list[list[int]], *,
                 max_tokens: int = 128, temperature: float = 0.0, top_k: int = 0,
                 top_p: float = 1.0, min_p: float = 0.0, repeat_penalty: float = 1.0,
                 presence_penalty: float = 0.0, frequency_penalty: float = 0.0,
                 logit_bias: dict[int, float] | None = None, seed: int | None = None,
                 stop: str | list[str] | None = None,
                 ignore_eos: bool = False) -> Completion | list[Completion]:
        """Collective: complete one prompt (a string, or a list of token ids) or a list of
        them (run together, up to ``max_batch`` at a time). Returns a Completion for one
        prompt, a list in input order for a list. Temperature 0 (default) is greedy; the
        sampling options are the server's (docs/API.md)."""
        params = SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p,
                                repeat_penalty=repeat_penalty, seed=seed,
                                presence_penalty=presence_penalty,
                                frequency_penalty=frequency_penalty, logit_bias=logit_bias)

        def encode():
            one = isinstance(prompts, str) or (isinstance(prompts, list) and prompts and all(
                isinstance(i, int) and not isinstance(i, bool) for i in prompts))
            items = [prompts] if one else prompts
            if not isinstance(items, list) or not items:
                raise MpitpiError("prompts must be a string, a list of token ids, or a "
                                  "non-empty list of those.")
            return one, [self._ids(p) for p in items]
        one, ids = self._on_root(encode)
        out = self._run(ids, max_tokens, params, stop, ignore_eos)
        return out[0] if one else out

    def chat(self, messages: list[dict], **options) -> Completion:
        """Collective: the assistant's next message for ``messages`` ([{"role": "system" |
        "user" | "assistant", "content": str}, ...]) through the model's chat template;
        ``options`` as for ``generate``. A conversation that grows turn by turn reuses the
        cached positions of the earlier turns."""
        def render():
            if self.tokenizer is None:
                raise MpitpiError("this model has no tokenizer, so it cannot chat.")
            if not (isinstance(messages, list) and messages and all(
                    isinstance(m, dict) and isinstance(m.get("content"), str) and
                    m.get("role") in ("system", "user", "assistant") for m in messages)):
                raise MpitpiError("messages must be a non-empty list of {'role': 'system' | "
                                  "'user' | 'assistant', 'content': str}.")
            return self.tokenizer.encode_chat(messages)
        ids = self._on_root(render)
        return self.generate(ids, **options)

    def close(self) -> None:
        """Collective: free the model (its streamed layers' reader too)."""
        self.loaded.model.layers.close()

    def __enter__(self) -> LLM:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- rank 0's side -------------------------------------------------------------------------

    def _on_root(self, fn):
        """Collective: ``fn()`` on rank 0, its result on every rank; any exception in it (a
        TypeError from an argument of the wrong type too) is raised on every rank as an
        MpitpiError, so no rank is left in the next collective."""
        def guarded():
            try:
                return fn()
            except MpitpiError:
                raise
            except Exception as e:
                raise MpitpiError(f"{type(e).__name__}: {e}") from e
        return self.comm.root_checked(guarded)

    def _ids(self, prompt) -> list[int]:
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise MpitpiError("this model has no tokenizer: give token ids instead of text.")
            return self.tokenizer.encode(prompt)
        if isinstance(prompt, list) and all(
                isinstance(i, int) and not isinstance(i, bool) for i in prompt):
            return list(prompt)
        raise MpitpiError(f"a prompt must be a string or a list of token ids, got "
                          f"{type(prompt).__name__}.")

    def _run(self, ids: list[list[int]], max_tokens: int, params: SamplingParams, stop,
             ignore_eos: bool) -> list[Completion]:
        """Collective: every prompt through one Batch on rank 0; the results on every rank."""
        args = self.loaded.args
        made: list[Session] = []

        def sessions():
            params.check()
            if not (stop is None or isinstance(stop, str) or isinstance(stop, (list, tuple))
                    and all(isinstance(s, str) for s in stop)):
                raise MpitpiError(f"stop must be a string or a list of strings, got {stop!r}.")
            stops = [stop] if isinstance(stop, str) else list(stop or [])
            decode = self.tokenizer.decode if self.tokenizer else None
            for p in ids:
                if not (isinstance(max_tokens, int) and not isinstance(max_tokens, bool)):
                    raise MpitpiError(f"max_tokens must be an integer, got {max_tokens!r}.")
                check_prompt(p, max_tokens, args.vocab_size, args.max_seq_len)
                made.append(Session(p, max_tokens, Sampler(params),
                                    [] if ignore_eos else args.eos_token_ids, decode, stops))
        self._on_root(sessions)
        if self.comm.rank != 0:
            Runner(self.comm, self.loaded.model).follow()
            return self.comm.bcast_obj(None)
        Batch(self.comm, self.loaded.model, self.max_batch).run_all(made)
        done = [Completion(r.text, r.token_ids, r.finish_reason, r.prompt_tokens,
                           r.cached_tokens, round(r.ttft_ms, 3), round(r.ms_per_token, 3))
                for r in (s.result for s in made)]
        return self.comm.bcast_obj(done)
