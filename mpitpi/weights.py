"""A rank's weights as the model uses them: matrices that know their own product.

A ``Weight`` is one (out, in) matrix as stored in a shard, in its storage dtype (fp32, bf16,
fp16, int8 with one fp32 scale per row and group of columns, int4 in blocks of 32 columns
with an fp16 scale and offset each, or int6 in blocks of 32 with an fp16 scale, the
vocabulary only: quant.py), with an optional (out,) fp32 bias.
``w(x)`` is ``x @ w.T + b`` in fp32 for x (T, in) fp32, whatever the storage: the model
reads ``layer.wqkv(x)`` and never looks at dtypes.

``LayerWeights`` names one layer's slices and ``TopWeights`` the vocabulary rows and final
norm. How they are stored (dataset ``wqkv`` with ``wqkv.scale`` beside it for int8 and
``wqkv.scale`` + ``wqkv.min`` for int4, ``embed.scale`` + ``embed.hi`` for int6, bias
``bqkv``, ...) is written down here once:
``stored_arrays`` writes it (shards.py) and ``LayerWeights.from_stored`` /
``TopWeights.from_stored`` read it (loader.py, prefetch.py).
"""
from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from functools import cached_property

import numpy as np
import torch
import torch.nn.functional as F

from mpitpi import choices, fused_step, kernels
from mpitpi.quant import (can_int4, dequantize_int4, dequantize_int6, dequantize_int8,
                          quantize_int4, quantize_int6, quantize_int8)

SCALE = ".scale"                      # int8/int4 matrix "name" has its scales in "name.scale"
MIN = ".min"                          # and int4 its offsets in "name.min"
HI = ".hi"                            # and int6 its values' top 2 bits in "name.hi"
BIAS = {"wqkv": "bqkv", "wo": "bo", "w13": "b13", "w2": "b2"}   # matrix -> its bias
NORMS = ("attn_norm", "ffn_norm")
STORAGE = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
DTYPES = (*STORAGE, "int8", "int4")  # every storage dtype; int8 and int4 with scales (quant.py)
VOCAB_DTYPES = (*DTYPES, "int6")     # int6: the vocabulary's alone (no fused-step kernels)
DEQUANT_AT_ONCE = 1 << 22   # int8/int4 weights dequantized at a time for prompt rows
BYTES_PER_WEIGHT = {"fp32": 4, "fp16": 2, "bf16": 2, "int8": 1, "int4": 0.5,
                    "int6": 0.75}   # no scales


@dataclass
class Weight:
    """One matrix as stored, with what its product needs.

    data:  (out, in) fp32 / bf16 / fp16 / int8, or (out, in / 2) uint8 for int4 and int6
    scale: (out, ceil(in / group)) fp32 for int8; (out, in / 32) fp16 for int4 and int6;
           else None
    min:   (out, in / 32) fp16 offsets for int4, else None
    bias:  (out,) fp32 or None
    tile:  int4 / int6 / int8 whose full groups of ``tile`` rows the kernels rearranged
           (``tile_rows``); 0: plain rows, as stored
    hi:    (out, in / 4) uint8, the values' top 2 bits, for int6; else None
    steps: int4 in coded tiles (``tile_rows``, kernels.tile_i4_coded): (out / tile, 2 tile)
           fp32, each tile's scale and offset steps; ``scale`` then holds the tiles' codes
           (same bytes) and ``min`` the offsets of the rows after the last tile alone. Else
           None.
    """
    data: torch.Tensor
    scale: torch.Tensor | None = None
    bias: torch.Tensor | None = None
    min: torch.Tensor | None = None
    tile: int = 0
    hi: torch.Tensor | None = None
    steps: torch.Tensor | None = None

    @property
    def kind(self) -> str:
        """The storage dtype's name (a key of VOCAB_DTYPES)."""
        if self.data.dtype == torch.uint8:
            return "int4" if self.hi is None else "int6"
        return "int8" if self.data.dtype == torch.int8 else _NAMES[self.data.dtype]

    @property
    def cols(self) -> int:
        return self.data.shape[1] * (2 if self.data.dtype == torch.uint8 else 1)

    def dequantized(self) -> torch.Tensor:
        """The matrix (out, in) in fp32 (without the bias)."""
        if self.tile:
            return kernels.dequantize(self.data, self.scale, self.min, tile=self.tile,
                                      hi=self.hi, steps=self.steps)
        if self.kind == "int6":
            return dequantize_int6(self.data, self.hi, self.scale)
        if self.kind == "int4":
            return dequantize_int4(self.data, self.scale, self.min)
        if self.kind == "int8":
            return dequantize_int8(self.data, self.scale)
        return self.data.float()

    @cached_property
    def c(self) -> fused_step.CWeight:
        """This weight as the fused C step reads it (made once; it points into the tensors
        above, which this object keeps alive). Never int6: only the vocabulary is, whose
        product runs through ``__call__``."""
        assert self.hi is None, "int6 has no fused-step kernels"
        return fused_step.c_weight(self.data, self.scale, self.min, self.bias, self.tile,
                                   self.steps)

    @cached_property
    def c_vocab(self) -> fused_step.CVocab:
        """This vocabulary matrix (bias-less) as csrc/decode.c's decode_token reads it, for
        its product and, where ``c_rows``, its lookups (made once, after ``tile_rows``)."""
        assert self.bias is None, "a vocabulary matrix has no bias"
        return fused_step.c_vocab(self.data, self.scale, self.min, self.tile, self.hi,
                                  self.steps)

    @property
    def c_rows(self) -> bool:
        """Whether ``rows`` gathers in C or plainly (float storage, or tiled rows): then
        decode_token's lookup gives the same numbers."""
        return self.scale is None or bool(self.tile)

    def tile_rows(self, coded: bool = True) -> None:
        """This int4 or int8 matrix's rows were just written, plain: rearrange them in place
        into the tiles the host's kernels read fastest (kernels.tile_i4 / tile_i8: groups of
        16 rows on AVX-512 builds, 8 on AVX2; 8 decode rows of SmolLM2 ran 2-3x faster).
        int4 whose scales and offsets are codes (quant.quantize_int4's, not a GGUF file's)
        goes into coded tiles (``coded``): a tenth fewer bytes to read per product, the same
        numbers. Float dtypes, and builds without tiles, keep their rows."""
        if self.kind == "int4" and kernels.available() and not coded:
            self.tile = kernels.tile_i4(self.data, self.scale, self.min)
        elif self.kind == "int4" and kernels.available():
            self.tile, steps = kernels.tile_i4_coded(self.data, self.scale, self.min)
            if steps is not None:   # keep the steps and the rows after the tiles: one tensor
                full, n = steps.shape[0] * self.tile, steps.numel() * 2
                keep = torch.empty(n + (self.min.shape[0] - full) * self.min.shape[1],
                                   dtype=torch.float16)
                keep[:n] = steps.reshape(-1).view(torch.float16)
                keep[n:] = self.min[full:].reshape(-1)
                self.steps = keep[:n].view(torch.float32).view(steps.shape)
                self.min = keep[n:].view(-1, self.min.shape[1])
                self.__dict__.pop("c", None)
                self.__dict__.pop("c_vocab", None)
        elif self.kind == "int6" and kernels.available():
            self.tile = kernels.tile_i4(self.data, self.scale, self.min, self.hi)
        elif self.kind == "int8" and kernels.available():
            self.tile = kernels.tile_i8(self.data, self.scale)

    def __call__(self, x: torch.Tensor, decode: bool = False, logits: bool = False
                 ) -> torch.Tensor:
        """x (T, in) fp32 -> (T, out) fp32. ``decode``: rows of separate tokens (a batch,
        or drafted tokens), each computed as it would be alone (the C kernels' one-row
        arithmetic, whatever T). ``logits``: the vocabulary product, whose results are
        never rounded to bf16 (SmolLM2's first answer token won by 0.08 over the second;
        rounded to bf16 steps of 0.125 the two tied, and the wrong one was picked).

        Chosen per host by measurement (choices.py): decode rows use the C kernels, which
        widen each weight in registers (int4 in decode rounds x to int8 per block of 32
        columns). Prompt rows take one path whatever their number, so that each row gets
        the same numbers in any chunk: the C kernels (int4 with int16 activations, up to a
        chunk) or torch's matrix product on inputs padded with zero rows to the multiple
        of rows for which it is row-invariant here: fp16 and bf16 in bf16 where the CPU has
        bf16 instructions and it measured faster, else in fp32; int8 and int4 on a copy made
        for the call (kernels.dequantize, in bf16 or fp32 by the same rule),
        ``DEQUANT_AT_ONCE`` weights at a time. int6 (a vocabulary) always takes the C
        kernels, its decode rows against int8 activations where the build has that kernel
        (kernels.int6_decode_int8: AVX-512 with VNNI and GFNI), else int16.
        """
        w, c = self.data, choices.host()
        T = x.shape[0]
        host = c.prefill_dtype(w.dtype)
        pre = torch.float32 if logits else host   # what torch's product computes in
        # logits where the host's prompt products are bf16: the C kernels, which keep fp32
        if kernels.available() and (decode or pre != host or self.hi is not None
                                    or T <= c.kernel_rows(self.kind)):
            # int4: decode rounds x to int8 per block (fast); prompt rows and logits to
            # int16 (an int8 rounding there flipped SmolLM2's near-tie first token,
            # docs/BENCHMARKS.md)
            y = kernels.matvec(x, w, self.scale, self.min, wide=not decode, tile=self.tile,
                               hi=self.hi, steps=self.steps)
            return y if self.bias is None else y + self.bias
        pad = -T % c.pad_rows(self.kind)
        if pad:
            x = F.pad(x, (0, 0, 0, pad))                          # (T + pad, in)
        if self.scale is not None:
            y = self._dequantized_product(x, pre)
        elif w.dtype == pre == torch.float32:
            y = F.linear(x, w)
        else:
            y = F.linear(x.to(pre), w.to(pre)).float()
        if pad:
            y = y[:T]
        return y if self.bias is None else y + self.bias

    def _dequantized_product(self, x: torch.Tensor, pre: torch.dtype) -> torch.Tensor:
        """x @ w.T for an int8 or int4 w, on copies of a block of its rows at a time in
        ``pre`` (bf16 or fp32: the host's prefill dtype, choices.py; fp32 for logits): a
        prompt's products never hold the whole matrix widened (for a Llama-3.1-405B rank of
        16, w13 alone is 436 MB in fp32: a 64-token prompt peaked at 1096 MB with whole
        copies, against 658 MB for a 3-token one)."""
        out = self.data.shape[0]
        x = x.to(pre)
        step = max(1, DEQUANT_AT_ONCE // self.cols)
        if self.tile:   # whole tiles: a block of rows from a tile's start is tiled alike
            step = max(self.tile, step // self.tile * self.tile)
        y = torch.empty(x.shape[0], out) if step < out else None
        for r in range(0, out, step):
            part = self._row_block(r, r + step)
            w = (kernels.dequantize(part.data, part.scale, part.min, pre, part.tile, part.hi,
                                    part.steps)
                 if kernels.available() else part.dequantized().to(pre))
            if y is None:
                return F.linear(x, w).float()
            y[:, r:r + step] = F.linear(x, w)
        return y

    def _row_block(self, r0: int, r1: int) -> Weight:
        """Rows [r0, r1) without the bias, r0 at a tile's start when the rows are tiled."""
        def part(t):
            return None if t is None else t[r0:r1]
        if self.steps is None:
            return Weight(part(self.data), part(self.scale), None, part(self.min), self.tile,
                          part(self.hi))
        full = self.steps.shape[0] * self.tile   # coded: steps per tile, min after the tiles
        return Weight(part(self.data), part(self.scale), None,
                      self.min[max(0, r0 - full):max(0, r1 - full)], self.tile, None,
                      self.steps[r0 // self.tile:-(-r1 // self.tile)])

    def rows(self, index: torch.Tensor) -> torch.Tensor:
        """Rows ``index`` (n,) as (n, in) fp32: an embedding lookup."""
        if self.scale is None:
            return self.data[index].float()
        if self.tile:   # a tiled vocabulary (TopWeights.tile_rows): gathered in C
            return kernels.rows(self.data, self.scale, self.min, index, self.tile, self.hi,
                                self.steps)
        return Weight(self.data[index], self.scale[index], None,
                      None if self.min is None else self.min[index], 0,
                      None if self.hi is None else self.hi[index]).dequantized()

    @property
    def nbytes(self) -> int:
        """Bytes this weight holds in memory: the matrix, its scales and its bias."""
        return sum(t.numel() * t.element_size()
                   for t in (self.data, self.scale, self.min, self.bias, self.hi, self.steps)
                   if t is not None)

    @classmethod
    def from_stored(cls, tensors: Mapping[str, torch.Tensor], name: str) -> Weight:
        """The matrix ``name`` of a layer's or the vocabulary's stored tensors, with its
        scales, offsets and bias when the shard has them."""
        bias = BIAS.get(name)
        return cls(tensors[name], tensors.get(name + SCALE),
                   tensors.get(bias) if bias else None, tensors.get(name + MIN), 0,
                   tensors.get(name + HI))

    @classmethod
    def cat(cls, parts: list[Weight]) -> Weight:
        """The rows of ``parts`` stacked (bias-less matrices of one width). Parts of one
        kind (and int8 group) stay in it; mixed integer kinds (a GGUF file whose q and v
        differ) become int8, anything else fp32 (quantized later for the shard's dtype)."""
        kinds = {p.kind for p in parts}
        assert not any(p.tile for p in parts), "tiles are made after loading, never stacked"
        if len(kinds) == 1 and len({p.data.shape[1:] + p.scale.shape[1:] if p.scale is not None
                                    else p.data.shape[1:] for p in parts}) == 1:
            fields = ("data", "scale", "bias", "min", "tile", "hi")
            return cls(*(0 if f == "tile" else None if getattr(parts[0], f) is None else
                         torch.cat([getattr(p, f) for p in parts]) for f in fields))
        rows = torch.cat([p.dequantized() for p in parts])
        return quantized(rows, "int8") if kinds.isdisjoint(STORAGE) else Weight(rows)


@dataclass
class LayerWeights:
    """One layer's slices on one rank (plan.py says which heads and FFN columns).

    wqkv: ((n_q + 2 n_kv) hd, dim)  column-parallel: this rank's q, k, v rows, fused
    wo:   (dim, n_q hd)             row-parallel: columns of o_proj (bias on rank 0 only)
    w13:  (2 f, dim)                column-parallel: gate rows, then up rows
    w2:   (dim, f)                  row-parallel: columns of down_proj (bias on rank 0 only)
    attn_norm, ffn_norm: (dim,) fp32
    """
    wqkv: Weight
    wo: Weight
    w13: Weight
    w2: Weight
    attn_norm: torch.Tensor
    ffn_norm: torch.Tensor

    @classmethod
    def from_stored(cls, tensors: Mapping[str, torch.Tensor]) -> LayerWeights:
        """From a layer's datasets (names as in shards.py); vectors must already be fp32."""
        return cls(*(Weight.from_stored(tensors, n) for n in BIAS),
                   *(tensors[n] for n in NORMS))

    def tile_rows(self, coded: bool = True) -> LayerWeights:
        """Its matrices were just written (read from a shard): the int4 and int8 ones into
        the kernels' tiles (Weight.tile_rows; int4 coded where it can be and ``coded``), in
        place. Returns self."""
        for w in self.matrices():
            w.tile_rows(coded)
        return self

    def matrices(self) -> tuple[Weight, Weight, Weight, Weight]:
        return self.wqkv, self.wo, self.w13, self.w2

    @property
    def nbytes(self) -> int:
        """Bytes this layer holds in memory: its matrices (as tiled) and norms."""
        return (sum(w.nbytes for w in self.matrices()) +
                4 * (self.attn_norm.numel() + self.ffn_norm.numel()))

    def kinds(self) -> set[str]:
        """The storages of its matrices (keys of DTYPES)."""
        return {w.kind for w in self.matrices()}


@dataclass
class TopWeights:
    """This rank's vocabulary rows and the final norm.

    embed:   (n_vocab_r, dim) rows of the embedding table
    lm_head: (n_vocab_r, dim) rows of lm_head; the same Weight as ``embed`` when tied
    norm:    (dim,) fp32
    """
    embed: Weight
    lm_head: Weight
    norm: torch.Tensor

    @classmethod
    def from_stored(cls, tensors: Mapping[str, torch.Tensor]) -> TopWeights:
        """From the ``vocab/*`` datasets (without the prefix) and ``norm``."""
        embed = Weight.from_stored(tensors, "embed")
        lm_head = Weight.from_stored(tensors, "lm_head") if "lm_head" in tensors else embed
        return cls(embed, lm_head, tensors["norm"].float())

    def tile_rows(self) -> TopWeights:
        """The vocabulary product's matrix was just read: into the kernels' tiles, in place
        (Weight.tile_rows; a tied embedding's lookups gather rows out of them). Returns self."""
        self.lm_head.tile_rows()
        return self

    @property
    def nbytes(self) -> int:
        extra = self.lm_head.nbytes if self.lm_head is not self.embed else 0
        return self.embed.nbytes + extra + self.norm.numel() * 4


_NAMES = {v: k for k, v in STORAGE.items()}


def quantized(t: torch.Tensor, dtype: str) -> Weight:
    """A float matrix (out, in) as a Weight in storage ``dtype``."""
    if dtype == "int4":
        q, d, m = quantize_int4(t)
        return Weight(q, d, None, m)
    if dtype == "int6":
        q, h, d = quantize_int6(t)
        return Weight(q, d, hi=h)
    if dtype == "int8":
        return Weight(*quantize_int8(t))
    return Weight(t.to(STORAGE[dtype]).contiguous())


def storage_for(name: str, cols: int, dtype: str, vocab_dtype: str | None = None) -> str:
    """The storage of matrix ``name`` (a dataset name) with ``cols`` columns in shards of
    ``dtype``: the dtype itself, except that the vocabulary matrices (embedding, lm_head: the
    most sensitive to error) take ``vocab_dtype`` when given and int6 in int4 shards when not
    (GGUF quantizers keep the output matrix at 6 bits too; SmolLM2's vocabulary: +0.4%
    perplexity against int8, 24% fewer bytes), and that a matrix whose width is not a whole
    number of 32-column blocks is int8, not int4 or int6."""
    if name.startswith("vocab/"):
        dtype = vocab_dtype or ("int6" if dtype == "int4" else dtype)
    if dtype in ("int4", "int6") and not can_int4(cols):
        return "int8"
    return dtype


def vectors_fp32(tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Matrices (and their scales) as stored; 1-D vectors (norms, biases) as fp32."""
    return {k: v if v.dim() == 2 else v.float() for k, v in tensors.items()}


def to_numpy(t: torch.Tensor, dtype: str) -> np.ndarray:
    """``t`` in storage ``dtype`` as a numpy array; bf16 as its raw uint16 bits (HDF5 and
    numpy have no bfloat16)."""
    t = t.to(STORAGE[dtype]).contiguous()
    if dtype == "bf16":
        return t.view(torch.uint16).numpy()
    return t.numpy()


def from_numpy(a: np.ndarray) -> torch.Tensor:
    """A stored array as a tensor; uint16 arrays are bf16 bits (see ``to_numpy``)."""
    t = torch.from_numpy(np.ascontiguousarray(a))
    return t.view(torch.bfloat16) if a.dtype == np.uint16 else t


def stored_arrays(name: str, t: torch.Tensor | Weight, dtype: str,
                  vocab_dtype: str | None = None) -> Iterator[tuple[str, np.ndarray]]:
    """(dataset name, array) pairs that store tensor ``name`` in shards of ``dtype``.

    int8 stores a matrix as ``name`` (int8) + ``name.scale`` (fp32), int4 as ``name``
    (uint8) + ``name.scale`` + ``name.min`` (fp16), int6 as ``name`` (uint8) + ``name.scale``
    (fp16) + ``name.hi`` (uint8) (quant.py; ``storage_for`` says which matrices of int4
    shards are int8 or int6); they keep vectors (norms, biases) in fp32; the other
    dtypes store everything in that dtype. ``t`` may be a Weight already quantized (a GGUF
    file's blocks, carried over unchanged): it is stored as it is, unless it is a vocabulary
    matrix and ``vocab_dtype`` asks for another storage.
    """
    if isinstance(t, torch.Tensor) and t.dim() == 1:
        yield name, to_numpy(t, "fp32" if dtype in ("int8", "int4") else dtype)
        return
    if isinstance(t, torch.Tensor):
        t = quantized(t, storage_for(name, t.shape[1], dtype, vocab_dtype))
    elif t.kind in STORAGE:
        t = quantized(t.data, storage_for(name, t.cols, dtype, vocab_dtype))
    elif vocab_dtype and name.startswith("vocab/") and t.kind != (
            want := storage_for(name, t.cols, dtype, vocab_dtype)):
        t = quantized(t.dequantized(), want)
    if t.kind in STORAGE:
        yield name, to_numpy(t.data, t.kind)
        return
    yield name, t.data.numpy()
    yield name + SCALE, t.scale.numpy()
    if t.min is not None:
        yield name + MIN, t.min.numpy()
    if t.hi is not None:
        yield name + HI, t.hi.numpy()


def random_weight(out: int, n_in: int, dtype: str) -> Weight:
    """A random (out, in) Weight in storage ``dtype`` (for measuring products)."""
    return quantized(torch.randn(out, n_in), dtype)
