"""Decode kernels in C (csrc/), built for the host on first use.

``matvec(x, w, scale, min)`` returns x (T, in) fp32 @ w (out, in).T as (T, out) fp32,
reading w in its stored dtype (fp32, bf16, fp16, int8 times its group scales, or int4 blocks
with their scales and offsets: quant.py); ``dequantize`` writes an int8 or int4 matrix out
in fp32 (for torch's product on long inputs).
``decode_attn`` / ``decode_mlp`` (csrc/decode.c) run one layer half for one new token in
one call: norm, products, rope, KV-cache append, attention; model.py calls them per layer.
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

import numpy as np
import torch

from mpitpi.files import cache_root
from mpitpi.quant import GROUP, int8_group

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
        w, s, f = ctypes.POINTER(CWeight), ctypes.POINTER(CScratch), ctypes.c_float
        lib.decode_attn.argtypes = [p, p, f, w, w, p, i64, i64, i64, i64, p, s, p, i64]
        lib.decode_mlp.argtypes = [p, p, f, w, w, i64, s, p, i64]
        lib.attend_rows.argtypes = [p, p, i64, i64, i64, p, p]
        lib.decode_layers.argtypes = [p, i64, p, f, w, p, i64, i64, i64, i64, p, s, p]
        lib.decode_attn.restype = lib.decode_mlp.restype = lib.attend_rows.restype = None
        lib.decode_layers.restype = None
        lib.norm_out.argtypes = [p, p, f, i64, i64, p]   # x, w, eps, B, dim, out
        lib.norm_out.restype = None
        lib.decode_token.argtypes = [ctypes.POINTER(CToken), p, p, p]   # t, tokens, rows, best
        lib.decode_token.restype = None
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


def tile_i4(q: torch.Tensor, scale: torch.Tensor, min: torch.Tensor | None,
            hi: torch.Tensor | None = None) -> int:
    """Rearrange an int4 matrix written in plain rows (q (out, in / 2) uint8, scale and min
    (out, in / 32) fp16, all contiguous), or an int6 one (min None, ``hi`` (out, in / 4)
    uint8: quant.py), in place into this build's tiles; returns the tile (0: nothing
    changed). One thread, without the GIL (the layer prefetcher calls it)."""
    tile = weight_tile()
    if tile:
        _lib.tile_i4(q.data_ptr(), scale.data_ptr(), _ptr(min), _ptr(hi), q.shape[0],
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
                         q.shape[1] * 2, _ptr(steps))
    return tile, steps if coded else None

def _ptr(t: torch.Tensor | None) -> int | None:
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
    int6 (quant.py): uint8 ``w`` with ``scale``, ``hi`` and no ``min``; always ``wide``.
    ``steps``: an int4 matrix in coded tiles (``tile_i4_coded``), ``min`` the offsets of its
    rows after the last tile.
    """
    lib = _load()
    x = x.contiguous()
    T, n_in = x.shape
    n_out = w.shape[0]
    out = torch.empty(T, n_out)
    if w.dtype == torch.uint8:
        lib.matvec_i4(x.data_ptr(), w.data_ptr(), scale.data_ptr(), _ptr(min), _ptr(hi),
                      _ptr(steps), out.data_ptr(), T, n_in, n_out, tile, int(wide))
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
        lib.dequant_i4(w.data_ptr(), scale.data_ptr(), _ptr(min), _ptr(hi), _ptr(steps),
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
        _lib.rows_i4(w.data_ptr(), scale.data_ptr(), _ptr(min), _ptr(hi), _ptr(steps),
                     index.data_ptr(), n, out.data_ptr(), w.shape[0], cols, tile)
    else:
        _lib.rows_i8(w.data_ptr(), scale.data_ptr(), index.data_ptr(), n, out.data_ptr(),
                     w.shape[0], cols, int8_group(cols, scale.shape[1]), tile)
    return out


class CWeight(ctypes.Structure):
    """csrc/decode.c's weight_t: one matrix as stored. The tensors it points into must
    outlive it (weights.Weight keeps both)."""
    _fields_ = [("data", ctypes.c_void_p), ("scale", ctypes.c_void_p), ("min", ctypes.c_void_p),
                ("bias", ctypes.c_void_p), ("rows", ctypes.c_int64), ("cols", ctypes.c_int64),
                ("dtype", ctypes.c_int64), ("group", ctypes.c_int64), ("tile", ctypes.c_int64),
                ("steps", ctypes.c_void_p)]


DTYPE_CODES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2, torch.int8: 3,
               torch.uint8: 4}


def c_weight(data: torch.Tensor, scale: torch.Tensor | None, min: torch.Tensor | None,
             bias: torch.Tensor | None, tile: int = 0, steps: torch.Tensor | None = None
             ) -> CWeight:
    """A CWeight over contiguous ``data`` (rows, cols; int4: rows, cols / 2), its int8 or
    int4 ``scale``, int4 ``min`` and fp32 ``bias`` (as weights.Weight holds them); ``tile``:
    int4 rows in tiles (``tile_i4``; coded with ``steps``, ``tile_i4_coded``) or plain (0)."""
    def ptr(t):
        return None if t is None else t.data_ptr()
    rows, cols = data.shape[0], data.shape[1] * (2 if data.dtype == torch.uint8 else 1)
    group = int8_group(cols, scale.shape[1]) if data.dtype == torch.int8 else GROUP
    return CWeight(ptr(data), ptr(scale), ptr(min), ptr(bias), rows, cols,
                   DTYPE_CODES[data.dtype], group, tile, ptr(steps))


class CVocab(ctypes.Structure):
    """csrc/decode.c's vocab_t: a vocabulary matrix (a CWeight; int6 as int4 without
    offsets) and int6's top-bit plane."""
    _fields_ = [("w", CWeight), ("hi", ctypes.c_void_p)]


def c_vocab(data: torch.Tensor, scale: torch.Tensor | None, min: torch.Tensor | None,
            tile: int, hi: torch.Tensor | None, steps: torch.Tensor | None) -> CVocab:
    """A CVocab over a bias-less vocabulary matrix as weights.Weight holds it."""
    return CVocab(c_weight(data, scale, min, None, tile, steps), _ptr(hi))


class CToken(ctypes.Structure):
    """csrc/decode.c's token_t: a world of one rank's whole step for B rows."""
    _fields_ = ([(n, ctypes.c_void_p) for n in ("x", "out", "h", "logits", "embed", "head",
                                                 "norms", "w")] +
                [(n, ctypes.c_int64) for n in ("n_layers", "B", "n_q", "n_kv", "hd")] +
                [(n, ctypes.c_void_p) for n in ("kv_of_q", "s", "norm")] +
                [("eps", ctypes.c_float)])


class CScratch(ctypes.Structure):
    _fields_ = ([(n, ctypes.c_void_p) for n in ("h", "mid", "act", "xq", "xs", "xsum")] +
                [(n, ctypes.c_int64) for n in ("sh", "smid", "sact", "sxq", "sxs", "wide")])


def _stride(n: int) -> int:
    """A row stride of n elements rounded up to 16: every row aligned as row 0 is."""
    return -(-n // 16) * 16


class Scratch:
    """The fused step's buffers for ``rows`` rows, made once per batch size (no per-token
    allocation): per row h (dim,), mid (max(qkv rows, 2 f),), act (max(n_q hd, f),),
    quantized activations (int16 for int8 weights; int8 for int4, int16 for prompt rows),
    their scales per group and block sums."""

    def __init__(self, dim: int, mid: int, act: int, rows: int = 1):
        widest = max(dim, act)
        st = [_stride(dim), _stride(mid), _stride(act), _stride(widest),
              _stride(widest // 32 + 1)]
        self.rows = rows
        self.tensors = [torch.empty(rows * st[0]), torch.empty(rows * st[1]),
                        torch.empty(rows * st[2]), torch.empty(rows * st[3], dtype=torch.int16),
                        torch.empty(rows * st[4]), torch.empty(rows * st[4])]
        self.c = CScratch(*(t.data_ptr() for t in self.tensors), *st, 0)


ROW_WORDS = 8   # csrc/decode.c's row_t: cache_k, cache_v, cos, sin pointers; cap, start, pos,
#                 kv16 (the caches hold fp16)


def attend_rows(q: torch.Tensor, rows: np.ndarray, kv_of_q: torch.Tensor) -> torch.Tensor:
    """Prompt rows' attention with the decode step's loop: q (T, n_q, hd) contiguous fp32
    with rope applied; ``rows`` (T, ROW_WORDS) contiguous int64 row_t of each row (its
    cache of this layer, already written; cap, start, pos) -> (T, n_q hd). Each row is
    computed as it would be alone."""
    T, n_q, hd = q.shape
    out = torch.empty(T, n_q * hd)
    _lib.attend_rows(q.data_ptr(), rows.ctypes.data, T, n_q, hd, kv_of_q.data_ptr(),
                     out.data_ptr())
    return out


class LayerStack:
    """Every layer's norms and matrices as ``DecodeStep.layers`` reads them: ``norms`` (2 n)
    pointers, attention then FFN norm per layer; ``weights`` (4 n) CWeight, wqkv, wo, w13, w2
    per layer (copies of each Weight's ``c``). The layers' tensors must stay where they are
    while it is used: resident layers, which are never refilled."""

    def __init__(self, layers: list):
        self.n = len(layers)
        self.keep = layers   # the tensors the pointers point into
        self.norms = (ctypes.c_void_p * (2 * self.n))(
            *(t.data_ptr() for w in layers for t in (w.attn_norm, w.ffn_norm)))
        self.weights = (CWeight * (4 * self.n))(
            *(m.c for w in layers for m in (w.wqkv, w.wo, w.w13, w.w2)))


class DecodeStep:
    """The fused step for B rows, each a token at its own position of its own KV cache.

    ``places`` sets, once per pass, each row's cache (per layer), rope rows and keys, and
    returns the (B, dim) ``x`` to fill (``part`` receives this rank's partial sums); then
    ``attn`` and ``mlp`` run one layer half each. Buffers grow with B and are kept.

    ``add``: a world of one rank has nothing to all-reduce, so the C step adds its partial
    sum into x itself and the caller skips the reduce (the step returns False); otherwise it
    returns True and the caller must all-reduce ``part`` and add it into x.
    """

    def __init__(self, dims: tuple[int, int, int], kv_of_q: torch.Tensor, n_q: int,
                 n_kv: int, hd: int, eps: float, add: bool):
        self.dims, self.kv_of_q = dims, kv_of_q        # kept alive: C reads kv_of_q
        self.n_q, self.n_kv, self.hd, self.eps, self.add = n_q, n_kv, hd, eps, int(add)
        self.B = 0
        self.resize(1)

    def resize(self, B: int) -> None:
        """Room for B rows (buffers only grow)."""
        if B > self.B:
            dim, mid, act = self.dims
            self.scratch = Scratch(dim, mid, act, B)
            self.x_all, self.part_all = torch.empty(B, dim), torch.empty(B, dim)
            self.h_all = torch.empty(B, dim)
            self.views = {}   # B -> the first B rows of x_all, part_all, h_all; C's pointers
            self.calls = {}   # B -> decode_token's CToken, its best (B,) and what they hold
            self.B = B

    def _view(self, B: int) -> tuple:
        """The first B rows of x_all, part_all, h_all and their C pointers (kept per B: a
        pass's slicing is three torch ops)."""
        if B not in self.views:
            x, part, h = self.x_all[:B], self.part_all[:B], self.h_all[:B]
            ptrs = (x.data_ptr(), part.data_ptr(), self.kv_of_q.data_ptr())
            self.views[B] = (x, part, h, ptrs)
        return self.views[B]

    def places(self, table: np.ndarray, cos: torch.Tensor, sin: torch.Tensor,
               prompt: bool = False) -> torch.Tensor:
        """Set this pass's rows: ``table`` (n_layers, B, ROW_WORDS) int64 row_t of each row
        in each layer (model.Transformer._row_table), pointing into ``cos``, ``sin`` and the
        caches, which the caller keeps alive. ``prompt``: they are prompt rows, whose int4
        products take int16 activations (``matvec``'s ``wide``), not decode's int8. Returns
        the (B, dim) x to fill; the partial sums land in ``part``."""
        B = table.shape[1]
        self.resize(B)
        self.scratch.c.wide = int(prompt)
        self.x, self.part, self.h, self.ptrs = self._view(B)
        self.tables, self.n = (table, cos, sin), B
        self.table_ptr = table.ctypes.data   # layer i's rows: B ROW_WORDS int64 further each
        return self.x

    def attn(self, i: int, norm: torch.Tensor, wqkv: CWeight, wo: CWeight) -> bool:
        """Layer i's attention half for the rows set by ``places``."""
        x, part, kv = self.ptrs
        rows = self.table_ptr + i * self.n * ROW_WORDS * 8
        _lib.decode_attn(x, norm.data_ptr(), self.eps, wqkv, wo, rows, self.n,
                         self.n_q, self.n_kv, self.hd, kv, self.scratch.c, part, self.add)
        return not self.add

    def layers(self, stack: LayerStack) -> None:
        """Every layer of ``stack`` for the rows set by ``places``, in one C call: only in a
        world of one rank (``add``: no all-reduce between halves) with every layer in
        memory. The same numbers as ``attn`` and ``mlp`` layer by layer."""
        assert self.add, "layers() runs in a world of one rank"
        x, part, kv = self.ptrs
        _lib.decode_layers(x, stack.n, stack.norms, self.eps, stack.weights, self.table_ptr,
                           self.n, self.n_q, self.n_kv, self.hd, kv, self.scratch.c, part)

    def token(self, table: np.ndarray, tokens: torch.Tensor | None, x: torch.Tensor | None,
              stack: LayerStack, embed: CVocab | None, head: CVocab, norm: torch.Tensor
              ) -> np.ndarray:
        """A world of one rank with every layer resident, greedy: B decode rows in one C
        call (decode_token) -> their (B,) int64 argmax tokens over ``head``'s rows. The rows
        are ``tokens`` (B,) int64 looked up in ``embed``, or (``embed`` None) the embedded
        rows ``x`` (B, dim); ``table`` as for ``places``. The same numbers and tokens as
        ``places``, ``layers``, ``final_norm`` and the vocabulary product in turn. ``stack``,
        ``embed``, ``head`` and ``norm`` must be the same objects on every call."""
        B = table.shape[1]
        self.resize(B)
        self.scratch.c.wide = 0
        call = self.calls.get(B)
        if call is None:
            xs, part, h, _ = self._view(B)
            logits, best = torch.empty(B, head.w.rows), np.empty(B, np.int64)
            addr = ctypes.addressof
            c = CToken(xs.data_ptr(), part.data_ptr(), h.data_ptr(), logits.data_ptr(),
                       None if embed is None else addr(embed), addr(head),
                       addr(stack.norms), addr(stack.weights), stack.n, B, self.n_q,
                       self.n_kv, self.hd, self.kv_of_q.data_ptr(), addr(self.scratch.c),
                       norm.data_ptr(), self.eps)
            call = self.calls[B] = (c, best, best.ctypes.data, xs, (logits, embed, head, stack))
        c, best, best_ptr, xs = call[:4]
        if x is not None:
            xs.copy_(x)
        _lib.decode_token(c, None if tokens is None else tokens.data_ptr(), table.ctypes.data,
                          best_ptr)
        return best

    def final_norm(self, norm: torch.Tensor) -> torch.Tensor:
        """The rows' (B, dim) x after the last layer, normed by ``norm`` (dim,) in C, into a
        buffer of the step's (valid until the next pass): torch's rms_norm is the first
        torch op after the weights have streamed through the caches, and costs 0.1 ms a
        token there."""
        _lib.norm_out(self.ptrs[0], norm.data_ptr(), self.eps, self.n, self.x.shape[1],
                      self.h.data_ptr())
        return self.h

    def mlp(self, norm: torch.Tensor, w13: CWeight, w2: CWeight) -> bool:
        """A layer's MLP half; w13 holds gate rows, then up rows."""
        x, part, _ = self.ptrs
        _lib.decode_mlp(x, norm.data_ptr(), self.eps, w13, w2, self.n, self.scratch.c, part,
                        self.add)
        return not self.add


if __name__ == "__main__":   # `python -m mpitpi.kernels`: build now (make install runs it)
    t0 = time.perf_counter()
    try:
        path = build()
    except (RuntimeError, OSError) as e:
        sys.exit(f"mpitpi: C kernels not built: {e}")
    print(f"mpitpi: C kernels ready in {time.perf_counter() - t0:.1f} s: {path}")
