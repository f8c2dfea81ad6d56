"""The fused decode step's side of csrc/decode.c: the C structures (a matrix as stored, the
step's scratch buffers, a row's place, a layer stack, a whole greedy step) and the calls
that run one layer half, every layer, or a world of one rank's whole step for B rows.

``DecodeStep`` is what model.Transformer holds: ``places`` sets a pass's rows, then ``attn``
and ``mlp`` per layer half (several ranks: the caller all-reduces the partial sums between
them), ``layers`` for all of them in one call (one rank, every layer resident), and
``token`` for lookup, layers, final norm, vocabulary product and argmax in one call (the
same, greedy). The library itself is kernels.py's (built for the host on first use).
"""
from __future__ import annotations

import ctypes

import numpy as np
import torch

from mpitpi import kernels
from mpitpi.kernels import ptr
from mpitpi.quant import GROUP, int8_group

_lib = None   # kernels' library, once decode.c's argument types are set on it


def _load():
    """kernels' library with decode.c's functions typed (kernels.available() must hold)."""
    global _lib
    if _lib is None:
        lib = kernels._load()
        p, i64, f = ctypes.c_void_p, ctypes.c_int64, ctypes.c_float
        w, s = ctypes.POINTER(CWeight), ctypes.POINTER(CScratch)
        lib.decode_attn.argtypes = [p, p, f, w, w, p, i64, i64, i64, i64, p, s, p, i64]
        lib.decode_mlp.argtypes = [p, p, f, w, w, i64, s, p, i64]
        lib.attend_rows.argtypes = [p, p, i64, i64, i64, p, p]
        lib.decode_layers.argtypes = [p, i64, p, f, w, p, i64, i64, i64, i64, p, s, p]
        lib.norm_out.argtypes = [p, p, f, i64, i64, p]   # x, w, eps, B, dim, out
        lib.decode_token.argtypes = [ctypes.POINTER(CToken), p, p, p]   # t, tokens, rows, best
        for name in ("decode_attn", "decode_mlp", "attend_rows", "decode_layers", "norm_out",
                     "decode_token"):
            getattr(lib, name).restype = None
        _lib = lib
    return _lib


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
    int4 rows in tiles (kernels.tile_i4; coded with ``steps``, kernels.tile_i4_coded) or
    plain (0)."""
    rows, cols = data.shape[0], data.shape[1] * (2 if data.dtype == torch.uint8 else 1)
    group = int8_group(cols, scale.shape[1]) if data.dtype == torch.int8 else GROUP
    return CWeight(data.data_ptr(), ptr(scale), ptr(min), ptr(bias),
                   rows, cols, DTYPE_CODES[data.dtype], group, tile, ptr(steps))


class CVocab(ctypes.Structure):
    """csrc/decode.c's vocab_t: a vocabulary matrix (a CWeight; int6 as int4 without
    offsets) and int6's top-bit plane."""
    _fields_ = [("w", CWeight), ("hi", ctypes.c_void_p)]


def c_vocab(data: torch.Tensor, scale: torch.Tensor | None, min: torch.Tensor | None,
            tile: int, hi: torch.Tensor | None, steps: torch.Tensor | None) -> CVocab:
    """A CVocab over a bias-less vocabulary matrix as weights.Weight holds it."""
    return CVocab(c_weight(data, scale, min, None, tile, steps), ptr(hi))


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
    _load().attend_rows(q.data_ptr(), rows.ctypes.data, T, n_q, hd, kv_of_q.data_ptr(),
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
        _load()

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
