"""Tool (function) calling through the model's own chat template: whether a template can
show tools, the messages a template expects, and the calls read back from generated text.

A call is read in the forms chat templates teach: ``<tool_call>{"name": ..., "arguments":
{...}}</tool_call>`` (Hermes, Qwen 2.5, SmolLM3) or a bare JSON object with "name" and
"arguments" or "parameters" (Llama 3.1/3.2, optionally after ``<|python_tag|>``).
"""
from __future__ import annotations

import json
import re
import uuid

_TOOLS_VAR = re.compile(r"\btools\b")
_TAGGED = re.compile(r"<tool_call>\s*(.*?)\s*(?:</tool_call>|$)", re.S)


def template_takes_tools(template: str | None) -> bool:
    """Whether a chat template reads a ``tools`` variable (so tools given to it show)."""
    return bool(template) and bool(_TOOLS_VAR.search(template))


def template_messages(messages: list[dict]) -> list[dict]:
    """OpenAI messages as HF chat templates read them: an assistant's tool_calls keep their
    shape with ``arguments`` parsed into an object (templates print it with tojson)."""
    out = []
    for m in messages:
        m = dict(m)
        if m.get("tool_calls"):
            calls = []
            for c in m["tool_calls"]:
                f = dict(c["function"])
                if isinstance(args := f.get("arguments") or "{}", str):
                    try:
                        f["arguments"] = json.loads(args)
                    except ValueError:
                        pass   # not JSON: shown as the client sent it
                else:
                    f["arguments"] = args   # an object already
                calls.append({**c, "function": f})
            m["tool_calls"] = calls
        out.append(m)
    return out


def _call(obj, names: set[str]) -> dict | None:
    """An API tool call from a parsed {"name", "arguments"|"parameters"} of a known tool."""
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str) or \
            obj["name"] not in names:   # model output: a name may be any JSON value
        return None
    args = obj.get("arguments", obj.get("parameters", {}))
    return {"id": "call_" + uuid.uuid4().hex[:24], "type": "function",
            "function": {"name": obj["name"],
                         "arguments": args if isinstance(args, str) else json.dumps(args)}}


def parse_tool_calls(text: str, names: set[str]) -> tuple[str | None, list[dict]]:
    """(the text left as content or None, the calls of tools in ``names`` found in it)."""
    calls, rest = [], text
    for m in _TAGGED.finditer(text):
        try:
            call = _call(json.loads(m.group(1)), names)
        except ValueError:
            call = None
        if call:
            calls.append(call)
            rest = rest.replace(m.group(0), "")
    if not calls:
        bare = text.strip().removeprefix("<|python_tag|>").strip()
        if bare.startswith("{"):
            try:
                found = json.loads(bare)
            except ValueError:
                found = None
            if (call := _call(found, names)) is not None:
                calls, rest = [call], ""
    rest = rest.strip()
    return (rest or None) if calls else text, calls
