"""What many modules need to know about files: the cache folder, file types, raw headers.

A leaf module (it imports nothing of mpitpi but errors.py), so checkpoint readers, the
tokenizer, the shard cache and the kernel builder can all use it without importing each other.
"""
from __future__ import annotations

import json
import os
import struct

from mpitpi.errors import MpitpiError


def cache_root() -> str:
    """$MPITPI_CACHE, else ~/.cache/mpitpi: shards made automatically and built kernels."""
    return os.environ.get("MPITPI_CACHE") or os.path.join(
        os.path.expanduser("~"), ".cache", "mpitpi")


def is_gguf(path: str) -> bool:
    """True for a file that starts with the GGUF magic, or a path ending in .gguf."""
    if not os.path.isfile(path):
        return path.endswith(".gguf")
    with open(path, "rb") as f:
        return f.read(4) == b"GGUF" or path.endswith(".gguf")


def safetensors_header(fd: int, path: str) -> tuple[dict, int, int]:
    """(header without __metadata__, offset where tensor data starts, file size).

    Reads an open safetensors file: 8 bytes of little-endian header length, then that many
    bytes of JSON. Raises MpitpiError naming ``path`` for a file that is not one.
    """
    try:
        size = os.fstat(fd).st_size
        (n,) = struct.unpack("<Q", os.pread(fd, 8, 0))
        if n > size - 8:
            raise ValueError("the header runs past the end of the file")
        header = json.loads(os.pread(fd, n, 8))
        if not isinstance(header, dict):
            raise ValueError("the header is not a JSON object")
    except (OSError, ValueError, struct.error) as e:
        raise MpitpiError(f"cannot read {path}: {e}. The file is missing, truncated or not "
                          f"safetensors. Fix: download or copy it again.")
    return {k: v for k, v in header.items() if k != "__metadata__"}, 8 + n, size


def read_safetensors_header(path: str) -> tuple[dict, int, int]:
    """``safetensors_header`` of the file at ``path``."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError as e:
        raise MpitpiError(f"cannot read {path}: {e.strerror}. Fix: check the path.")
    try:
        return safetensors_header(fd, path)
    finally:
        os.close(fd)
