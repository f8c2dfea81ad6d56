"""llama-server's ``/tokenize`` and ``/detokenize``: a request body checked (a BadRequest
naming the field otherwise) and its reply, on rank 0 with the server's tokenizer alone.

- ``POST /tokenize`` ``{"content": str, "add_special": false, "with_pieces": false}`` ->
  ``{"tokens": [ids]}``, or with ``with_pieces`` ``{"tokens": [{"id", "piece"}]}`` (a piece
  that is not whole UTF-8 is a list of its bytes). ``add_special`` adds the tokenizer's own
  BOS etc.; special tokens written in ``content`` are always read as such.
- ``POST /detokenize`` ``{"tokens": [ids]}`` -> ``{"content": str}``, special tokens
  written out.
"""
from __future__ import annotations

import json

from mpitpi.api import BadRequest
from mpitpi.errors import MpitpiError
from mpitpi.tokenizer import Tokenizer


def _flag(body: dict, key: str, default: bool) -> bool:
    if not isinstance(v := body.get(key, default), bool):
        raise BadRequest(400, f"'{key}' must be true or false, got {json.dumps(v)}.", key)
    return v


def tokenize(tok: Tokenizer, body: dict) -> dict:
    if not isinstance(content := body.get("content"), str):
        raise BadRequest(400, f"'content' must be a string, got {json.dumps(content)[:80]}.",
                         "content")
    add_special, pieces = _flag(body, "add_special", False), _flag(body, "with_pieces", False)
    if not _flag(body, "parse_special", True):
        raise BadRequest(400, "'parse_special': false is not supported: special tokens "
                         "written in the text are always read as such. Fix: leave it out.",
                         "parse_special")
    try:
        ids = tok.encode(content, special=add_special)
    except MpitpiError as e:
        raise BadRequest(400, str(e), "content")
    return {"tokens": [{"id": i, "piece": tok.piece(i)} for i in ids] if pieces else ids}


def detokenize(tok: Tokenizer, body: dict) -> dict:
    ids, n = body.get("tokens"), tok.vocab_size
    if not isinstance(ids, list):
        raise BadRequest(400, f"'tokens' must be a list of token ids, got "
                         f"{json.dumps(ids)[:80]}.", "tokens")
    for i, t in enumerate(ids):
        if not isinstance(t, int) or isinstance(t, bool) or not 0 <= t < n:
            raise BadRequest(400, f"'tokens'[{i}] is {json.dumps(t)[:80]}: each token must be "
                             f"an integer id of this model's vocabulary, 0 to {n - 1}.",
                             "tokens")
    return {"content": tok.decode(ids, special=True)}
