"""The OpenAI API's answers: the reply objects of a finished or streaming completion (chat
or text), with log-probs and tool calls read back from the text."""
from __future__ import annotations

import time
import uuid
from collections.abc import Callable

from mpitpi.session import Result
from mpitpi.tools import parse_tool_calls


class Reply:
    """The API objects of one completion (chat or text): stream chunks, or the whole.
    ``token_text(id)`` -> (text, bytes) of one token (for log-probs); ``tool_names``: the
    tools whose calls are read back from the text (None: none; a stream then holds the
    text back to the end)."""

    def __init__(self, model: str, chat: bool, include_usage: bool,
                 token_text: Callable[[int], tuple[str, bytes]] | None = None,
                 tool_names: set[str] | None = None, parallel_tool_calls: bool = True):
        self.chat, self.include_usage = chat, include_usage
        self.token_text, self.tool_names = token_text, tool_names
        self.parallel = parallel_tool_calls
        self.kind = "chat.completion" if chat else "text_completion"
        self.base = {"id": ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24],
                     "created": int(time.time()), "model": model}
        self.offset = 0        # completions' text_offset of the next token
        self.lp_sent = 0       # Result.logprobs entries already in chunks

    @property
    def holds_text(self) -> bool:
        """A stream's text is sent at the end (it may turn out to be tool calls)."""
        return self.tool_names is not None

    def chunk(self, choice: dict, finish: str | None = None, **more) -> dict:
        return {**self.base, "object": self.kind + (".chunk" if self.chat else ""), **more,
                "choices": [{"index": 0, **choice, "finish_reason": finish}]}

    def delta(self, text: str, entries: list | None = None) -> dict:
        lp = self.logprobs(entries) if entries else None
        self.lp_sent += len(entries or [])
        return self.chunk({"delta": {"content": text}, "logprobs": lp} if self.chat else
                          {"text": text, "logprobs": lp})

    def logprobs(self, entries: list) -> dict | None:
        """Result.logprobs entries in the endpoint's shape (None without a token_text)."""
        if self.token_text is None:
            return None
        if self.chat:
            def one(t, lp):
                text, raw = self.token_text(t)
                return {"token": text, "logprob": lp, "bytes": list(raw)}
            return {"content": [{**one(t, lp), "top_logprobs": [one(a, b) for a, b in alts]}
                                for t, lp, alts in entries], "refusal": None}
        out = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
        for t, lp, alts in entries:
            text = self.token_text(t)[0]
            out["tokens"].append(text)
            out["token_logprobs"].append(lp)
            top: dict[str, float] = {}
            for a, b in alts:   # tokens of one text (U+FFFD...): the likeliest's
                top.setdefault(self.token_text(a)[0], b)
            out["top_logprobs"].append(top)
            out["text_offset"].append(self.offset)
            self.offset += len(text)
        return out

    def _message(self, res: Result) -> tuple[dict, str]:
        """The assistant message (content or tool_calls) and the finish reason."""
        content, calls = res.text, []
        if self.tool_names is not None:
            content, calls = parse_tool_calls(res.text, self.tool_names)
            calls = calls if self.parallel else calls[:1]
        if calls:
            return {"role": "assistant", "content": content, "tool_calls": calls}, "tool_calls"
        return {"role": "assistant", "content": res.text}, res.finish_reason

    def end(self, res: Result) -> list[dict]:
        usage, timings = self.stats(res)
        rest = res.logprobs[self.lp_sent:] if res.logprobs else []
        out, finish = [], res.finish_reason
        if self.chat and self.holds_text:    # the whole text now: content or tool calls
            msg, finish = self._message(res)
            delta = {k: v for k, v in msg.items() if k != "role"}
            if "tool_calls" in delta:
                delta["tool_calls"] = [{"index": i, **c} for i, c in enumerate(msg["tool_calls"])]
            out.append(self.delta("", rest))
            out[-1]["choices"][0]["delta"] = delta
        elif rest:
            out.append(self.delta("", rest))
        last = self.chunk({"delta": {}} if self.chat else {"text": "", "logprobs": None},
                          finish, timings=timings)
        usage = {**self.base, "object": last["object"], "choices": [], "usage": usage}
        return out + ([last, usage] if self.include_usage else [last])

    def whole(self, res: Result) -> dict:
        usage, timings = self.stats(res)
        lp = self.logprobs(res.logprobs) if res.logprobs else None
        if self.chat:
            msg, finish = self._message(res)
            choice = {"message": msg, "logprobs": lp}
        else:
            choice, finish = {"text": res.text, "logprobs": lp}, res.finish_reason
        return {**self.base, "object": self.kind, "usage": usage, "timings": timings,
                "choices": [{"index": 0, **choice, "finish_reason": finish}]}

    @staticmethod
    def stats(res: Result) -> tuple[dict, dict]:   # usage, timings
        n, p = len(res.token_ids), res.prompt_tokens
        timings = {"ttft_ms": round(res.ttft_ms, 1), "ms_per_token": round(res.ms_per_token, 2),
                   "forward_passes": res.forward_passes}
        if res.drafted:
            timings.update(draft_tokens=res.drafted, draft_accepted=res.accepted)
        return ({"prompt_tokens": p, "completion_tokens": n, "total_tokens": p + n,
                 "prompt_tokens_details": {"cached_tokens": res.cached_tokens}}, timings)
