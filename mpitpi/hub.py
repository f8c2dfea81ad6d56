"""Hugging Face model ids (``owner/name``) resolved from the local Hugging Face cache, offline.

The cache is the one ``huggingface-cli download`` / ``hf download`` / transformers fill:
``$HF_HUB_CACHE``, else ``$HF_HOME/hub``, else ``$XDG_CACHE_HOME/huggingface/hub``, else
``~/.cache/huggingface/hub``. A model id lives there as ``models--owner--name`` with
``refs/<revision>`` naming a folder of ``snapshots/``. Nothing is ever downloaded here.
"""
from __future__ import annotations

import glob
import os
import re

from mpitpi.errors import MpitpiError

ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")   # owner/name, as the Hub spells them


def hub_cache() -> str:
    """The Hugging Face cache folder this environment uses."""
    if os.environ.get("HF_HUB_CACHE"):
        return os.environ["HF_HUB_CACHE"]
    if os.environ.get("HF_HOME"):
        return os.path.join(os.environ["HF_HOME"], "hub")
    xdg = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(xdg, "huggingface", "hub")


def looks_like_id(text: str) -> bool:
    """``owner/name`` that is not a path on this host (a path always wins)."""
    return bool(ID.match(text)) and not os.path.exists(text)


def _snapshot(repo: str, revision: str) -> str | None:
    """The snapshot folder of ``revision`` (a branch or tag in refs/, or a commit hash), or
    the only snapshot there is; None if there is none."""
    ref = os.path.join(repo, "refs", revision)
    if os.path.isfile(ref):
        with open(ref) as f:
            revision = f.read().strip()
    folder = os.path.join(repo, "snapshots", revision)
    if os.path.isdir(folder):
        return folder
    snaps = glob.glob(os.path.join(repo, "snapshots", "*"))
    return snaps[0] if len(snaps) == 1 else None


def resolve_id(model_id: str, revision: str = "main") -> str:
    """The local folder (config.json + safetensors) or .gguf file of ``model_id`` in the
    Hugging Face cache; MpitpiError naming the download command when it is not there."""
    cache = hub_cache()
    repo = os.path.join(cache, "models--" + model_id.replace("/", "--"))
    fix = (f"Fix: download it once on a machine with internet (`huggingface-cli download "
           f"{model_id}`, or `hf download {model_id}`; then copy {repo} here), or pass a "
           f"folder or a .gguf file.")
    folder = _snapshot(repo, revision) if os.path.isdir(repo) else None
    if folder is None:
        raise MpitpiError(f"{model_id!r} is not a file or folder here, and no Hugging Face "
                          f"model of that id is in the local cache {cache} (set HF_HUB_CACHE "
                          f"or HF_HOME if yours is elsewhere). {fix}")
    if os.path.isfile(os.path.join(folder, "config.json")):
        return folder
    ggufs = sorted(glob.glob(os.path.join(folder, "*.gguf")))
    if len(ggufs) == 1:
        return ggufs[0]
    if ggufs:
        raise MpitpiError(f"the cached {model_id!r} holds {len(ggufs)} GGUF files: pass one of "
                          f"them as --model: " + ", ".join(ggufs))
    raise MpitpiError(f"the cached {model_id!r} ({folder}) has no config.json and no .gguf "
                      f"file: an incomplete download. {fix}")
