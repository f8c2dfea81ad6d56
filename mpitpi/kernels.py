"""Decode kernels in C (csrc/), built for the host on first use.

``matvec(x, w, scale, min)`` returns x (T, in) fp32 @ w (out, in).T as (T, out) fp32,
reading w in its stored dtype (fp32, bf16, fp16, int8 times its group scales, or int4 blocks
with their scales and offsets: quant.py); ``dequantize`` writes an int8 or int4 matrix out
in fp32 (for torch's product on long inputs).
csrc/decode.c's fused step (a layer half, every layer, or a whole greedy step for one
rank in one call: norm, products, rope, KV-cache append, attention) is in the same library,
called through fused_step.py.
On this project's CPUs torch's own fp32 matrix-vector product streams weights at about a
third of the memory bandwidth and it has no weight-only int8 product worth using; these
loops run near the bandwidth (docs/BENCHMARKS.md).

The library is compiled with the host's C compiler (-march=native: every host builds its
own) into ``$MPITPI_CACHE/kernels`` under a name that hashes the source, the flags, the
compiler and the CPU, written to a temporary file and renamed into place so that ranks
starting together cannot see half a file. It links OpenMP, which resolves to the runtime
torch has already loaded, so torch's thread setting (``--threads``) applies to it too.
Without a compiler, or with ``MPITPI_KERNELS=0``, ``available()`` is False and the model
uses torch alone (slower, same results within rounding).
"""
from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import time

import torch

from mpitpi.files import cache_root
from mpitpi.quant import int8_group

I8_TILE_GROUP = 256   # csrc/common.h: the widest int8 column group whose int32 sums cannot overflow

CSRC = os.path.join(os.path.dirname(__file__), "csrc")
SOURCES = [os.path.join(CSRC, n) for n in ("matvec.c", "decode.c")]
HEADERS = [os.path.join(CSRC, "common.h")]
# the instruction set to build for: the host's own by default; MPITPI_MARCH=haswell (AVX2),
# x86-64 (plain C), ... builds another variant (the tests check each one this CPU can run)
MARCH = os.environ.get("MPITPI_MARCH", "native")
FLAGS = ["-O3", f"-march={MARCH}", "-ffast-math", "-fopenmp", "-shared", "-fPIC"]
LIBS = ["-lm"]   # after the sources: -ffast-math vectorises expf into libm (libmvec) calls

_FUNCS = {torch.float32: "matvec_f32", torch.bfloat16: "matvec_bf16",
          torch.float16: "matvec_f16"}
_lib = None          # the loaded library, once built
_why_not = None      # why it is not available, once that is known


def _cpu_id() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(("flags", "Features")):
                    return line
    except OSError:
        pass
    return ""


def cpu_flags() -> set[str]:
    """The CPU's feature flags (/proc/cpuinfo)."""
    line = _cpu_id()
    return set(line.split(":", 1)[1].split()) if ":" in line else set()


def cpu_model() -> str:
    """The CPU's model name and the vector features the kernels care about."""
    name = ""
    try:
        with open("/proc/cpuinfo") as f:
            name = next((ln.split(":", 1)[1].strip() for ln in f
                         if ln.startswith("model name")), "")
    except OSError:
        pass
    wanted = ("avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512_vnni", "avx512_bf16",
              "amx_bf16", "asimd", "asimddp")
    return f"{name or 'unknown CPU'} ({' '.join(f for f in wanted if f in cpu_flags())})"


def _compiler() -> str | None:
    return os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")


def library_path(cc: str) -> str:
    version = subprocess.run([cc, "--version"], capture_output=True, text=True).stdout
    key = b"".join(open(p, "rb").read() for p in SOURCES + HEADERS)
    key += " ".join(FLAGS + LIBS).encode() + version.encode() + _cpu_id().encode()
    digest = hashlib.sha256(key).hexdigest()[:16]
    return os.path.join(cache_root(), "kernels", f"matvec-{digest}.so")


def build() -> str:
    """Compile the library if this host has none yet; return its path. Raises on failure."""
    cc = _compiler()
    if cc is None:
        raise RuntimeError("no C compiler (cc/gcc) on this host")
    path = library_path(cc)
    if os.path.isfile(path):
        return path
    os.makedirs(os.path.dirname(path), exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=os.path.dirname(path))
    os.close(fd)
    try:
        r = subprocess.run([cc, *FLAGS, "-o", tmp, *SOURCES, *LIBS], capture_output=True,
                           text=True)
        if r.returncode != 0:
            raise RuntimeError(f"{cc} failed: {r.stderr.strip()[-500:]}")
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def _load():
    global _lib, _why_not
    if _lib is not None or _why_not is not None:
        return _lib
    if os.environ.get("MPITPI_KERNELS", "1") == "0":
        _why_not = "MPITPI_KERNELS=0"
        return None
    try:
        lib = ctypes.CDLL(build())
        p, i64 = ctypes.c_void_p, ctypes.c_int64
        for name in _FUNCS.values():   # (x, w, y, T, in, out)
            getattr(lib, name).argtypes = [p, p, p, i64, i64, i64]
        # x, w, scale, y, T, in, out, group, tile
        lib.matvec_i8.argtypes = [p, p, p, p, i64, i64, i64, i64, i64]
        # x, q, d, m, h, y, T, in, out, tile, wide
        lib.matvec_i4.argtypes = [p, p, p, p, p, p, p, i64, i64, i64, i64, i64]
        c_int = ctypes.c_int
        # q, d, m, h, steps, w, rows, in, bf16, tile
        lib.dequant_i4.argtypes = [p, p, p, p, p, p, i64, i64, c_int, i64]
        lib.tile_i4.argtypes = [p, p, p, p, i64, i64, p]   # q, d, m, h, rows, in, steps
        lib.tile_i4.restype = i64
        lib.weight_tile.restype = i64
        lib.int6_decode_int8.restype = i64
        # q, scale, w, rows, in, group, bf16, tile
        lib.dequant_i8.argtypes = [p, p, p, i64, i64, i64, c_int, i64]
        lib.tile_i8.argtypes = [p, p, i64, i64, i64]   # w, scale, rows, in, group
        # w, scale, index, n, out, rows, in, group, tile
        lib.rows_i8.argtypes = [p, p, p, i64, p, i64, i64, i64, i64]
        # q, d, m, h, index, n, out, rows, in, tile
        lib.rows_i4.argtypes = [p, p, p, p, p, p, i64, p, i64, i64, i64]
        for name in (*_FUNCS.values(), "matvec_i8", "matvec_i4", "dequant_i4",
                     "dequant_i8", "tile_i8", "rows_i4", "rows_i8"):
            getattr(lib, name).restype = None
        _lib = lib
    except (OSError, RuntimeError, subprocess.SubprocessError) as e:
        _why_not = str(e)
        print(f"mpitpi: warning: C kernels unavailable ({e}); decoding with torch alone, "
              f"which is slower. Fix: install a C compiler (e.g. apt-get install gcc).",
              file=sys.stderr)
    return _lib


def available() -> bool:
    return _load() is not None


def unavailable_reason() -> str | None:
    """Why the kernels are not available (None when they are): no compiler, a failed
    build, or MPITPI_KERNELS=0. Builds them on first use, as ``available``."""
    return None if available() else _why_not


def bf16_rounds_x() -> bool:
    """Whether bf16 weights round the activations to bf16 in the C products (CPUs with
    AVX512_BF16: vdpbf16ps, twice the multiply-adds per instruction); elsewhere x stays
    fp32 and each weight is widened. False without kernels."""
    return _load() is not None and bool(_lib.bf16_rounds_x())


def library_path_or_none() -> str | None:
    """The loaded library's path (None without kernels)."""
    return _lib._name if _load() is not None else None


def weight_tile() -> int:
    """The rows of an int4 or int8 tile in this host's build (csrc/common.h: 16 where the
    kernels are built for AVX-512, 8 for AVX2), 0 where such matrices keep plain rows (plain
    C, NEON, and without kernels)."""
    return int(_lib.weight_tile()) if _load() is not None else 0


def int6_decode_int8() -> bool:
    """Whether this host's build multiplies int6 decode rows against int8 activations
    (AVX-512 with VNNI and GFNI: csrc/common.h, dot_i6_tile; the rows after the last tile and
    matrices too small to tile get the same numbers from matvec.c's dot_i6_row), not int16
    ones. Prompt rows (``wide``) keep int16 activations."""
    return _load() is not None and bool(_lib.int6_decode_int8())


# csrc/common.h's mpitpi_prefetch: which tiles ask for weight lines ahead, a bit each
PREFETCH_INT4, PREFETCH_INT6, PREFETCH_INT8 = 1, 2, 4
PREFETCH_ALL = 7
# lookahead.py's modes add this bit for int4 decode rows read as one stream (set_streams)
ONE_STREAM = 8


def set_prefetch(mode: int) -> None:
    """Which tile kernels ask for weight lines ahead from now on (bits of PREFETCH_ALL).
    Changes timing only, never a number; call between products. No-op without kernels."""
    if _load() is not None:
        ctypes.c_int.in_dll(_lib, "mpitpi_prefetch").value = mode


def set_streams(n: int) -> None:
    """How many streams each thread reads an int4 product's single decode row from: 2 (the
    default: the two halves of its part side by side, csrc/decode.c's rows_pair) or 1 (in
    order); the vocabulary's product likewise, its matrix's halves. Changes timing only,
    never a number; call between products. No-op without kernels, and on builds without
    tiles (the two-stream kernels are the AVX-512 and AVX2 tiles')."""
    if n not in (1, 2):
        raise ValueError(f"streams must be 1 or 2, got {n}")
    if _load() is not None:
        ctypes.c_int.in_dll(_lib, "mpitpi_streams").value = n


def tile_i4(q: torch.Tensor, scale: torch.Tensor, min: torch.Tensor | None,
            hi: torch.Tensor | None = None) -> int:
    """Rearrange an int4 matrix written in plain rows (q (out, in / 2) uint8, scale and min
    (out, in / 32) fp16, all contiguous), or an int6 one (min None, ``hi`` (out, in / 4)
    uint8: quant.py), in place into this build's tiles; returns the tile (0: nothing
    changed). One thread, without the GIL (the layer prefetcher calls it)."""
    tile = weight_tile()
    if tile:
        _lib.tile_i4(q.data_ptr(), scale.data_ptr(), ptr(min), ptr(hi), q.shape[0],
                     q.shape[1] * 2, None)
    return tile


def tile_i4_coded(q: torch.Tensor, scale: torch.Tensor, min: torch.Tensor
                  ) -> tuple[int, torch.Tensor | None]:
    """As ``tile_i4`` for an int4 matrix, into coded tiles where its tiled rows allow
    (quant.py: every scale and offset an 8-bit code times a step of its row, as
    quantize_int4 writes them): then each block of a tile holds a byte per scale and offset
    instead of fp16 pairs (int4's bytes read per weight 0.625 -> 0.5625), the same numbers.
    Returns (tile, steps): steps (out / tile, 2 tile) fp32, each group's scale steps then
    offset steps, or None where the tiles hold fp16 (a GGUF file's blocks, or rows of fewer
    than 4 blocks). The steps lie in ``min``'s tiled rows, which coded tiles no longer read;
    its rows after the last tile stay offsets. Then ``matvec``, ``dequantize`` and ``rows``
    take ``steps`` and the offsets of the rows after the last tile alone as ``min``
    (weights.Weight keeps those two and lets the rest go)."""
    tile, (out, nb) = weight_tile(), min.shape
    if not tile:
        return tile, None
    steps = (min.view(-1)[:out // tile * tile * 4].view(torch.float32).view(out // tile, 2 * tile)
             if out >= tile and nb >= 4 else None)
    coded = _lib.tile_i4(q.data_ptr(), scale.data_ptr(), min.data_ptr(), None, out,
                         q.shape[1] * 2, ptr(steps))
    return tile, steps if coded else None

def ptr(t: torch.Tensor | None) -> int | None:
    """t.data_ptr(), or None for None (a NULL pointer to C)."""
    return None if t is None else t.data_ptr()


def tile_i8(w: torch.Tensor, scale: torch.Tensor) -> int:
    """As ``tile_i4`` for an int8 matrix (w (out, in) int8, scale (out, in / group) fp32):
    only widths that are a whole number of groups of at most 256 columns are tiled; returns
    the tile (0: nothing changed)."""
    tile, group = weight_tile(), int8_group(w.shape[1], scale.shape[1])
    if not tile or w.shape[1] % group or group > I8_TILE_GROUP:
        return 0
    _lib.tile_i8(w.data_ptr(), scale.data_ptr(), w.shape[0], w.shape[1], group)
    return tile


def matvec(x: torch.Tensor, w: torch.Tensor, scale: torch.Tensor | None = None,
           min: torch.Tensor | None = None, wide: bool = False, tile: int = 0,
           hi: torch.Tensor | None = None, steps: torch.Tensor | None = None) -> torch.Tensor:
    """x (T, in) fp32 @ W.T -> (T, out) fp32 for the matrix W (out, in) stored as ``w``.

    Contract: ``available()`` is True; every tensor contiguous; w is fp32/bf16/fp16
    (out, in) alone, int8 (out, in) with ``scale`` (out, ceil(in / group)) fp32, or uint8
    (out, in / 2) int4 blocks with ``scale`` and ``min`` (out, in / 32) fp16 (quant.py).
    int4 rounds x per block of 32 to int8 (decode) or, ``wide``, to int16 (prompt rows and
    logits: 1/65534 of the block's largest |x|, and a row's numbers do not depend on the rows
    beside it, in a tile or not); ``tile``:
    the int4 or int8 matrix's rows are in tiles (``tile_i4``, ``tile_i8``) or plain (0).
    int6 (quant.py): uint8 ``w`` with ``scale``, ``hi`` and no ``min``; ``wide`` except
    where int6_decode_int8() and the matrix is tiled (or smaller than a tile).
    ``steps``: an int4 matrix in coded tiles (``tile_i4_coded``), ``min`` the offsets of its
    rows after the last tile.
    """
    lib = _load()
    x = x.contiguous()
    T, n_in = x.shape
    n_out = w.shape[0]
    out = torch.empty(T, n_out)
    if w.dtype == torch.uint8:
        lib.matvec_i4(x.data_ptr(), w.data_ptr(), scale.data_ptr(), ptr(min), ptr(hi),
                      ptr(steps), out.data_ptr(), T, n_in, n_out, tile, int(wide))
    elif w.dtype == torch.int8:
        lib.matvec_i8(x.data_ptr(), w.data_ptr(), scale.data_ptr(), out.data_ptr(),
                      T, n_in, n_out, int8_group(n_in, scale.shape[1]), tile)
    else:
        getattr(lib, _FUNCS[w.dtype])(x.data_ptr(), w.data_ptr(), out.data_ptr(),
                                      T, n_in, n_out)
    return out


def dequantize(w: torch.Tensor, scale: torch.Tensor, min: torch.Tensor | None = None,
               dtype: torch.dtype = torch.float32, tile: int = 0,
               hi: torch.Tensor | None = None, steps: torch.Tensor | None = None
               ) -> torch.Tensor:
    """An int8 (w, scale), int4 (w, scale, min) or int6 (w, scale, hi) matrix (rows in tiles
    or plain, coded or not, as ``matvec``) as (out, in) in ``dtype``, fp32 or bf16 (the same
    numbers as quant.dequantize_int8 / dequantize_int4 / dequantize_int6 on plain rows, then
    ``.to(dtype)``), written by all threads."""
    lib = _load()
    bf16 = {torch.float32: 0, torch.bfloat16: 1}[dtype]
    if w.dtype == torch.uint8:
        out = torch.empty(w.shape[0], w.shape[1] * 2, dtype=dtype)
        lib.dequant_i4(w.data_ptr(), scale.data_ptr(), ptr(min), ptr(hi), ptr(steps),
                       out.data_ptr(), w.shape[0], out.shape[1], bf16, tile)
    else:
        out = torch.empty(w.shape, dtype=dtype)
        lib.dequant_i8(w.data_ptr(), scale.data_ptr(), out.data_ptr(), w.shape[0], w.shape[1],
                       int8_group(w.shape[1], scale.shape[1]), bf16, tile)
    return out


def rows(w: torch.Tensor, scale: torch.Tensor, min: torch.Tensor | None, index: torch.Tensor,
         tile: int, hi: torch.Tensor | None = None, steps: torch.Tensor | None = None
         ) -> torch.Tensor:
    """Rows ``index`` (n,) of an int8 (w, scale), int4 (w, scale, min) or int6 (w, scale, hi)
    matrix whose rows are in tiles (``tile``, coded with ``steps``; or plain, 0) as (n, in)
    fp32: the numbers ``dequantize`` gives them. An embedding lookup in a tiled vocabulary."""
    index = index.to(torch.int64).contiguous()
    n, cols = index.shape[0], w.shape[1] * (2 if w.dtype == torch.uint8 else 1)
    out = torch.empty(n, cols)
    if w.dtype == torch.uint8:
        _lib.rows_i4(w.data_ptr(), scale.data_ptr(), ptr(min), ptr(hi), ptr(steps),
                     index.data_ptr(), n, out.data_ptr(), w.shape[0], cols, tile)
    else:
        _lib.rows_i8(w.data_ptr(), scale.data_ptr(), index.data_ptr(), n, out.data_ptr(),
                     w.shape[0], cols, int8_group(cols, scale.shape[1]), tile)
    return out


if __name__ == "__main__":   # `python -m mpitpi.kernels`: build now (make install runs it)
    t0 = time.perf_counter()
    try:
        path = build()
    except (RuntimeError, OSError) as e:
        sys.exit(f"mpitpi: C kernels not built: {e}")
    print(f"mpitpi: C kernels ready in {time.perf_counter() - t0:.1f} s: {path}")
