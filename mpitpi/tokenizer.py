"""Text <-> token ids and chat templates (rank 0 only), and streaming detokenization.

Sources: a Hugging Face folder (tokenizer.json, chat template from tokenizer_config.json or
chat_template.jinja) or a GGUF file (tokenizer.ggml.* metadata built into a byte-level BPE
``tokenizers`` tokenizer, chat template from tokenizer.chat_template).
"""
from __future__ import annotations

import json
import os
import re

from jinja2.exceptions import TemplateError
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers, processors
from tokenizers import Tokenizer as HFTokenizer

from mpitpi.errors import MpitpiError
from mpitpi.files import is_gguf
from mpitpi.gguf_file import GGUFFile

# Pre-tokenizer split patterns named by GGUF's tokenizer.ggml.pre (regexes are facts of
# those tokenizers; the default is GPT-2's own, built into ByteLevel).
_LLAMA3 = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}|"
           r" ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2 = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}|"
          r" ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_SPLIT = {"llama-bpe": _LLAMA3, "llama3": _LLAMA3, "qwen2": _QWEN2}
CHAT_FILE = "chat.json"   # mpitpi's own record of the chat template, beside tokenizer.json


def _byte_level_chars() -> dict[str, int]:
    """Byte-level BPE's alphabet: each byte is written as one printable character (itself
    for printable Latin-1 bytes other than the soft hyphen, else chr(256 + n) in byte order)."""
    kept = [b for b in range(256) if 0x21 <= b <= 0x7E or 0xA1 <= b <= 0xFF and b != 0xAD]
    moved = [b for b in range(256) if b not in kept]
    return {**{chr(b): b for b in kept}, **{chr(256 + n): b for n, b in enumerate(moved)}}


_BYTE_OF = _byte_level_chars()   # the character of a byte-level token -> its byte


class Tokenizer:
    """A ``tokenizers`` tokenizer plus the model's chat template and special tokens."""

    def __init__(self, tok, chat_template: str | None = None, bos: str | None = None,
                 eos: str | None = None):
        self.tok = tok
        self.chat_template = chat_template
        self.bos_token, self.eos_token = bos, eos
        self._template = None   # the chat template compiled, at its first use

    def encode(self, text: str, special: bool = True) -> list[int]:
        """Token ids of ``text``; ``special``: add the tokenizer's own BOS etc."""
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as e:
            raise MpitpiError(f"the text holds a character that is not valid Unicode "
                              f"({text[e.start:e.end]!r} at {e.start}, a lone surrogate). "
                              f"Fix: send valid UTF-8 text.")
        return self.tok.encode(text, add_special_tokens=special).ids

    def decode(self, ids: list[int], special: bool = False) -> str:
        """The text of ``ids``; ``special``: special tokens (BOS, EOS...) as their text too."""
        return self.tok.decode(ids, skip_special_tokens=not special)

    @property
    def vocab_size(self) -> int:
        """Ids 0..vocab_size-1 are the tokenizer's (added tokens included)."""
        return self.tok.get_vocab_size(with_added_tokens=True)

    def piece(self, token: int) -> str | list[int]:
        """The text of one token; its bytes as a list of ints when they are not whole UTF-8
        (a byte-level token holding part of a character, or a <0xNN> byte token)."""
        text = self.decode([token], special=True)
        if "\ufffd" not in text:
            return text
        data = self.token_bytes(token)
        try:
            return data.decode("utf-8")
        except UnicodeDecodeError:
            return list(data)

    def render_chat(self, messages: list[dict], tools: list[dict] | None = None) -> str:
        """The chat template applied to ``messages`` with the assistant's turn opened;
        ``tools`` (OpenAI tool objects) are passed as the template's ``tools`` variable."""
        if not self.chat_template:
            raise MpitpiError("this model has no chat template, so --chat cannot be used. "
                              "Fix: pass a plain --prompt without --chat.")
        extra = {"tools": tools} if tools else {}
        try:
            return self._compiled_template().render(
                messages=messages, add_generation_prompt=True,
                bos_token=self.bos_token or "", eos_token=self.eos_token or "", **extra)
        except TemplateError as e:
            raise MpitpiError(f"the model's chat template failed: {e}")

    def _compiled_template(self):
        """The chat template compiled once (about 1.5 ms a compile: every server request
        paid it, holding the GIL, while the engine thread ran passes)."""
        if self._template is None:
            def raise_exception(msg):
                raise TemplateError(msg)

            env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
            env.globals["raise_exception"] = raise_exception
            self._template = env.from_string(self.chat_template)
        return self._template

    def encode_chat(self, messages: list[dict], tools: list[dict] | None = None) -> list[int]:
        return self.encode(self.render_chat(messages, tools), special=False)

    def token_bytes(self, token: int) -> bytes:
        """The bytes one token stands for (byte-level BPE: its characters mapped back to
        bytes; a <0xNN> byte-fallback token: that byte; else its decoded text)."""
        piece = self.tok.id_to_token(token) or ""
        if isinstance(self.tok.decoder, decoders.ByteLevel) and all(c in _BYTE_OF for c in piece):
            return bytes(_BYTE_OF[c] for c in piece)
        if re.fullmatch(r"<0x[0-9A-Fa-f]{2}>", piece):
            return bytes([int(piece[3:5], 16)])
        return self.tok.decode([token], skip_special_tokens=False).encode()

    def save(self, folder: str) -> None:
        """Write tokenizer.json and chat.json (template, BOS/EOS text) into ``folder``."""
        self.tok.save(os.path.join(folder, "tokenizer.json"))
        with open(os.path.join(folder, CHAT_FILE), "w") as f:
            json.dump({"chat_template": self.chat_template, "bos_token": self.bos_token,
                       "eos_token": self.eos_token}, f)


def chat_messages(prompt: str, system: str | None = None) -> list[dict]:
    msgs = [{"role": "system", "content": system}] if system else []
    return msgs + [{"role": "user", "content": prompt}]


def load_tokenizer(source: str) -> Tokenizer:
    """From a GGUF file, or a tokenizer.json path whose folder may hold a chat template
    (chat.json, tokenizer_config.json or chat_template.jinja)."""
    try:
        if is_gguf(source):
            return _from_gguf(source)
        return _from_hf(source)
    except MpitpiError:
        raise
    except Exception as e:
        raise MpitpiError(f"cannot load the tokenizer from {source}: {e}. Fix: restore the "
                          f"model's tokenizer, or pass --prompt-ids instead of --prompt.")


def _from_hf(path: str) -> Tokenizer:
    tok = HFTokenizer.from_file(path)
    folder = os.path.dirname(path)
    template, bos, eos = None, None, None
    cfg_path = os.path.join(folder, "tokenizer_config.json")
    if os.path.isfile(cfg_path):
        with open(cfg_path) as f:
            cfg = json.load(f)
        template = cfg.get("chat_template")
        if isinstance(template, list):   # [{"name": "default", "template": ...}, ...]
            named = {t.get("name"): t.get("template") for t in template}
            template = named.get("default") or next(iter(named.values()), None)
        bos, eos = _token_text(cfg.get("bos_token")), _token_text(cfg.get("eos_token"))
    jinja = os.path.join(folder, "chat_template.jinja")
    if os.path.isfile(jinja):
        with open(jinja) as f:
            template = f.read()
    ours = os.path.join(folder, CHAT_FILE)
    if os.path.isfile(ours):
        with open(ours) as f:
            meta = json.load(f)
        template, bos, eos = meta["chat_template"], meta["bos_token"], meta["eos_token"]
    return Tokenizer(tok, template, bos, eos)


def _token_text(v):
    return v.get("content") if isinstance(v, dict) else v


def _from_gguf(path: str) -> Tokenizer:
    field = GGUFFile(path).field

    kind = field("tokenizer.ggml.model")
    if kind != "gpt2":
        raise MpitpiError(f"{path}: tokenizer model {kind!r} is not supported (only byte-level "
                          f"BPE, 'gpt2'). Fix: pass --prompt-ids instead of --prompt.")
    tokens = field("tokenizer.ggml.tokens")
    types = field("tokenizer.ggml.token_type") or [1] * len(tokens)
    merges = [tuple(m.split(" ", 1)) for m in field("tokenizer.ggml.merges") or []]
    pre = field("tokenizer.ggml.pre", "default")
    bpe = models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges,
                     ignore_merges=pre in ("llama-bpe", "llama3"))
    tok = HFTokenizer(bpe)
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=pre not in _SPLIT)
    if pre in _SPLIT:
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(_SPLIT[pre]), behavior="isolated"), byte_level])
    elif pre == "smollm":   # digits one by one, then GPT-2's split
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Digits(individual_digits=True), byte_level])
    else:
        tok.pre_tokenizer = byte_level
    tok.decoder = decoders.ByteLevel()
    # control (3) and user-defined (4) tokens match whole, before the BPE runs
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False)
                            for t, ty in zip(tokens, types) if ty in (3, 4)])
    bos_id, eos_id = field("tokenizer.ggml.bos_token_id"), field("tokenizer.ggml.eos_token_id")
    bos = tokens[bos_id] if bos_id is not None else None
    if field("tokenizer.ggml.add_bos_token", False) and bos is not None:
        tok.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, bos_id)])
    eos = tokens[eos_id] if eos_id is not None else None
    return Tokenizer(tok, field("tokenizer.chat_template"), bos, eos)


class StreamText:
    """Turns a growing list of token ids into text deltas, holding back what may change.

    A delta is held back while the text ends in an incomplete UTF-8 sequence (U+FFFD), or
    while its tail could be the start of a stop string. ``stopped`` is set once a stop string
    appears; the text is then cut before it.

    Each token decodes a short window, not the whole list: the ids since the last place the
    text was whole (``start``), less the text those ids up to ``ready`` gave (``base``). Both
    decodes start at the same id, so a decoder that drops a leading space treats them alike.
    Decoding every id for each token cost 90 us a token at 1000 tokens and 380 us at 4000
    (SmolLM2's tokenizer), per sequence: 1.5 ms of an 8-row pass at 2000 tokens.
    """

    def __init__(self, decode, stops: list[str] | None = None):
        self.decode = decode
        self.stops = [s for s in (stops or []) if s]
        self.hold = max((len(s) for s in self.stops), default=1) - 1
        self.ids: list[int] = []
        self.text = ""
        self.sent = 0
        self.stopped = False
        self.start = self.ready = 0   # ids[start:ready] gave ``base``, already in ``text``
        self.base = ""

    def _take(self) -> bool:
        """Move the text of the ids not yet in ``text`` into it, unless it ends in an
        incomplete character (or adds nothing); True when it moved."""
        window = self.decode(self.ids[self.start:])
        if window.endswith("\ufffd") or len(window) <= len(self.base):
            return False
        self.text += window[len(self.base):]
        self.start, self.ready = self.ready, len(self.ids)
        self.base = self.decode(self.ids[self.start:self.ready])
        return True

    def push(self, token: int) -> str:
        """Add one token; return the text that is now final."""
        self.ids.append(token)
        before = len(self.text)
        if not self._take():
            return ""
        for s in self.stops:                # a stop string ending in the new text
            at = self.text.find(s, max(0, before - len(s) + 1))
            if at >= 0:
                self.text, self.stopped = self.text[:at], True
                return self.flush()
        final = len(self.text) - self.hold   # what no stop string can still take back
        if final <= self.sent:
            return ""
        delta, self.sent = self.text[self.sent:final], final
        return delta

    def flush(self) -> str:
        """The rest of the text (at the end of generation)."""
        if not self.stopped:                # an incomplete character at the end stays in
            window = self.decode(self.ids[self.start:])
            self.text += window[len(self.base):]
            self.start = self.ready = len(self.ids)
            self.base = ""
        delta, self.sent = self.text[self.sent:], len(self.text)
        return delta
