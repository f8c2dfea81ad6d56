"""A GGUF file's header, parsed into plain Python values, and its tensors as numpy views of
the memory-mapped file.

The gguf package's reader keeps every metadata element as numpy views: a 49,152-token
vocabulary cost 160 MB of memory to open, and a split opened the file twice (tensors, then
the tokenizer). Here a string array becomes one list of str (a few MB), and nothing of the
tensor data is read until a view is sliced.

Layout (little-endian): b"GGUF", version u32 (2 or 3), tensor count u64, metadata count
u64; each metadata entry a string key, a u32 value type and the value (arrays: element type
u32, count u64, elements; strings: u64 length, UTF-8 bytes); each tensor a name, u32 number
of dimensions, u64 dimensions (the fastest-varying first), u32 ggml type, u64 offset from
the data section, which starts at the next multiple of ``general.alignment`` (default 32).
"""
from __future__ import annotations

import mmap
import struct
from typing import NamedTuple

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

# value type -> struct format of one element (8: string, 9: array are read apart)
_SCALAR = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?",
           10: "<Q", 11: "<q", 12: "<d"}
_NUMPY = {0: "<u1", 1: "<i1", 2: "<u2", 3: "<i2", 4: "<u4", 5: "<i4", 6: "<f4", 7: "<?",
          10: "<u8", 11: "<i8", 12: "<f8"}
# ggml types whose elements numpy holds as they are; every other type is rows of blocks
_PLAIN = {GGMLQuantizationType.F32: np.float32, GGMLQuantizationType.F16: np.float16,
          GGMLQuantizationType.F64: np.float64, GGMLQuantizationType.I8: np.int8,
          GGMLQuantizationType.I16: np.int16, GGMLQuantizationType.I32: np.int32,
          GGMLQuantizationType.I64: np.int64}


class GGUFTensor(NamedTuple):
    name: str
    shape: tuple[int, ...]       # GGUF order: the row length (columns) first
    tensor_type: GGMLQuantizationType
    n_elements: int
    data: np.ndarray             # (rows, columns) elements, or (rows, bytes) of blocks


class GGUFFile:
    """``fields``: metadata key -> int / float / bool / str / list; ``tensors``: in file
    order. Raises ValueError on a file that is not GGUF or is cut short."""

    def __init__(self, path: str):
        with open(path, "rb") as f:
            self.mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        self.buf = memoryview(self.mm)
        self.pos = 0
        if self._take(4) != b"GGUF":
            raise ValueError("no GGUF magic at the start")
        version = self._read("<I")
        if version not in (2, 3):
            raise ValueError(f"GGUF version {version} (mpitpi reads 2 and 3; a big-endian file "
                             f"also shows as an odd version)")
        n_tensors, n_fields = self._read("<Q"), self._read("<Q")
        self.fields: dict = {}
        for _ in range(n_fields):
            key = self._string()
            self.fields[key] = self._value(self._read("<I"))
        infos = []
        for _ in range(n_tensors):
            name = self._string()
            dims = tuple(self._read("<Q") for _ in range(self._read("<I")))
            infos.append((name, dims, GGMLQuantizationType(self._read("<I")), self._read("<Q")))
        align = int(self.fields.get("general.alignment", 32))
        start = -(-self.pos // align) * align
        self.tensors = [self._tensor(start, *info) for info in infos]

    def field(self, key: str, default=None):
        return self.fields.get(key, default)

    def _take(self, n: int) -> memoryview:
        if self.pos + n > len(self.buf):
            raise ValueError("the file ends inside its header")
        b = self.buf[self.pos:self.pos + n]
        self.pos += n
        return b

    def _read(self, fmt: str):
        return struct.unpack(fmt, self._take(struct.calcsize(fmt)))[0]

    def _string(self) -> str:
        return str(self._take(self._read("<Q")), "utf-8", errors="replace")

    def _value(self, kind: int):
        if kind == 8:
            return self._string()
        if kind in _SCALAR:
            return self._read(_SCALAR[kind])
        if kind != 9:
            raise ValueError(f"unknown metadata value type {kind}")
        elem, count = self._read("<I"), self._read("<Q")
        if elem in _NUMPY:   # numbers: one read of the whole array
            size = np.dtype(_NUMPY[elem]).itemsize
            return np.frombuffer(self._take(count * size), _NUMPY[elem]).tolist()
        return [self._value(elem) for _ in range(count)]

    def _tensor(self, start: int, name: str, dims: tuple, kind: GGMLQuantizationType,
                offset: int) -> GGUFTensor:
        n = int(np.prod(dims, dtype=np.int64))
        rows = tuple(reversed(dims))[:-1]
        if kind in _PLAIN:
            dtype, last = _PLAIN[kind], dims[0]
        else:
            block, size = GGML_QUANT_SIZES[kind]
            dtype, last = np.uint8, dims[0] // block * size
        count = int(np.prod(rows, dtype=np.int64)) * last
        at = start + offset
        if at + count * np.dtype(dtype).itemsize > len(self.buf):
            raise ValueError(f"tensor {name} lies past the end of the file")
        data = np.frombuffer(self.mm, dtype, count, at).reshape(*rows, last)
        return GGUFTensor(name, dims, kind, n, data)
