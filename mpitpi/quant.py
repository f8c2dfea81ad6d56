"""Weight-only quantization: int8 (symmetric, fp32 scales), int4 (blocks of 32, fp16 scale
and offset) and int6 (blocks of 32, fp16 scale), the integer storages of weights.py.

int8: a matrix w (out, in) is q (out, in) int8 and scale (out, ceil(in / group)) fp32 with
w[o, i] ~= q[o, i] * scale[o, i // group]; |q| <= 127 and the largest |w| of each group maps
to 127, so each weight is off by at most scale / 2. The group is GROUP (64) columns when
mpitpi quantizes, and 32 when the weights come from a GGUF Q8_0 file, whose blocks carry over
unchanged (its fp16 scales are exact in fp32); ``int8_group`` tells the two apart by shape.
Per-row groups rather than one scale per row: with one scale per row SmolLM2's greedy text
left fp32's after a few tokens on one of the golden prompts (docs/BENCHMARKS.md).

int4: w (out, in), in a multiple of BLOCK (32), is q (out, in / 2) uint8, d and m
(out, in / 32) fp16 with w[o, 32 b + j] ~= d[o, b] * n + m[o, b], n = the 4-bit value of
column j of block b in 0..15. Within a block's 16 bytes, byte j holds column j in its low
nibble and column j + 16 in its high nibble: the layout of GGUF's Q4_0 and Q4_1 blocks, which
therefore carry over unchanged (Q4_0's (n - 8) d is n d + m with m = -8 d, exact in fp16).
Quantizing a float matrix writes coded rows: each row has two steps of the form F 2^e (F in
4..7, code_step), M for its offsets and D for its scales, and every m is k M with k in
-128..127 and every d is c D with c in 0..255, so that a code times its step has at most 11
significant bits and is an fp16 value exactly. The steps are the least that hold every block
(the offset at or below the block's minimum, the range up to its maximum); of the codes
around that, each block keeps the pair with the smaller squared error. The kernels' coded
tiles (kernels.tile_i4_coded) then read one byte per scale and per offset instead of two
and compute the same numbers: a tenth fewer bytes per int4 product. Requantizing
SmolLM2's layers so moved its perplexity 71.42 -> 71.46 (docs/BENCHMARKS.md). A matrix whose
columns are split across ranks takes the whole rows' steps (int4_steps), so a column gets
the same numbers on any number of ranks.

int6 (the vocabulary of int4 shards, as GGUF quantizers keep the output matrix at 6 bits):
w (out, in), in a multiple of 32, is q (out, in / 2) uint8 as int4's (the low 4 bits n & 15
of each column), h (out, in / 4) uint8 (the top 2 bits n >> 4) and d (out, in / 32) fp16 with
w[o, 32 b + j] ~= d[o, b] (n - 32), n in 0..63. A block's 8 bytes of h hold one 4-bit field
per byte of q: byte i (0..7) holds q byte i's in its low 4 bits and q byte i + 8's in its
high ones, and a field holds the top bits of the q byte's low-nibble column in its bits 0-1
and of its high-nibble column in bits 2-3. The block's largest |w| maps to n = 0 (its sign
taken into d), so the other side reaches 31 d: half the step of int4's with no offset to
store, 6.5 bits per weight against int8's 8.5. SmolLM2's vocabulary requantized so: +0.4%
perplexity against its int8 one (docs/BENCHMARKS.md).

All quantize a block of rows at a time (ROWS_AT_ONCE weights): rows are independent, so
the result is the same, and the fp32 temporaries stay a few MB instead of several copies of
the matrix (`mpitpi split` of a 405B vocabulary slice: 525 MB per temporary otherwise).
"""
from __future__ import annotations

import torch

GROUP = 64     # int8: input columns per scale when mpitpi quantizes: 1/16 byte per weight
GGUF_GROUP = 32   # int8 from GGUF Q8_0 blocks
BLOCK = 32     # int4, int6: input columns per scale (and int4 offset): 1/16 byte each
ROWS_AT_ONCE = 1 << 20   # weights quantized at a time (their fp32 temporaries: 4 MB each)


def _by_rows(w: torch.Tensor, quantize, *per_row: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """``quantize`` (rows of w, and the same rows of each of ``per_row`` -> its arrays, one
    row each per row of w) applied ROWS_AT_ONCE weights at a time, the pieces written into
    whole arrays."""
    out, n_in = w.shape
    step = max(1, ROWS_AT_ONCE // max(1, n_in))
    if out == 0:   # the arrays' widths and dtypes, from one row of zeros
        return tuple(p[:0] for p in quantize(w.new_zeros(1, n_in),
                                             *(e.new_ones(1, *e.shape[1:]) for e in per_row)))
    if out <= step:
        return quantize(w, *per_row)
    whole: tuple[torch.Tensor, ...] = ()
    for r in range(0, out, step):
        part = quantize(w[r:r + step], *(e[r:r + step] for e in per_row))
        if not whole:
            whole = tuple(torch.empty(out, *p.shape[1:], dtype=p.dtype) for p in part)
        for a, p in zip(whole, part):
            a[r:r + step] = p
    return whole


def quantize_int8(w: torch.Tensor, group: int = GROUP) -> tuple[torch.Tensor, torch.Tensor]:
    """w (out, in) any float dtype -> q (out, in) int8, scale (out, ceil(in/group)) fp32."""
    return _by_rows(w, lambda rows: _quantize_int8(rows, group))


def _quantize_int8(w: torch.Tensor, group: int) -> tuple[torch.Tensor, torch.Tensor]:
    w = w.float()
    out, n_in = w.shape
    n_groups = -(-n_in // group)
    padded = torch.nn.functional.pad(w, (0, n_groups * group - n_in))
    groups = padded.view(out, n_groups, group)                            # (out, G, group)
    amax = groups.abs().amax(dim=2)                                       # (out, G)
    scale = torch.where(amax > 0, amax / 127.0, torch.ones_like(amax))
    q = torch.round(groups / scale[:, :, None]).clamp_(-127, 127).to(torch.int8)
    return q.view(out, -1)[:, :n_in].contiguous(), scale


def int8_group(cols: int, n_groups: int) -> int:
    """The group size of an int8 matrix with ``cols`` columns and ``n_groups`` scales per
    row: GGUF_GROUP or GROUP (for cols <= 32 there is one group and either reads the same)."""
    return GGUF_GROUP if cols > GGUF_GROUP and n_groups == -(-cols // GGUF_GROUP) else GROUP


def dequantize_int8(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """q (rows, in) int8, scale (rows, G) -> (rows, in) fp32."""
    group = int8_group(q.shape[1], scale.shape[1])
    w = q.to(torch.float32)
    full = q.shape[1] // group
    w[:, :full * group].unflatten(1, (full, group)).mul_(scale[:, :full, None])
    if full < scale.shape[1]:                       # the short last group
        w[:, full * group:].mul_(scale[:, full:])
    return w


def can_int4(cols: int) -> bool:
    """int4 stores matrices whose rows are whole blocks (every width of real models)."""
    return cols > 0 and cols % BLOCK == 0


def quantize_int4(w: torch.Tensor, steps: torch.Tensor | None = None
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """w (out, in) any float dtype, in a multiple of 32 -> q (out, in/2) uint8,
    d (out, in/32) fp16, m (out, in/32) fp16 (the layout in this module's docstring), each
    row's d and m codes times its steps: ``steps`` (out, 2) fp32 where the caller has them
    for the whole rows that w is a column slice of (``int4_steps``: a row-parallel matrix
    quantized alike on any number of ranks), else w's own."""
    assert can_int4(w.shape[1]), w.shape[1]
    return _by_rows(w, _quantize_int4) if steps is None else _by_rows(w, _quantize_int4, steps)


def int4_steps(w: torch.Tensor) -> torch.Tensor:
    """w (out, in) any float dtype, in a multiple of 32 -> (out, 2) fp32: each row's offset
    step M and scale step D, as quantize_int4 chooses them for the whole row."""
    assert can_int4(w.shape[1]), w.shape[1]
    def one(part):
        blocks = part.float().reshape(part.shape[0], -1, BLOCK)
        return (_int4_steps(blocks.amin(dim=2), blocks.amax(dim=2)),)
    return _by_rows(w, one)[0]


def _int4_steps(lo: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:
    """Each block's minimum and maximum lo, hi (out, B) fp32 -> (out, 2): M, the step of the
    offsets' signed 8-bit codes, and D, the step of the scales' unsigned ones, each the least
    that holds every block of the row (the offset at or below the block's minimum, the scale
    reaching its maximum)."""
    M = code_step(lo.abs().amax(dim=1, keepdim=True) / 127)               # (out, 1)
    D = code_step(((hi - torch.floor(lo / M) * M) / 15).amax(dim=1, keepdim=True) / 255)
    return torch.cat([M, D], dim=1)


def code_step(x: torch.Tensor) -> torch.Tensor:
    """x (...) fp32 >= 0 -> the smallest step F 2^e >= x with F in 4..7 and e >= -24 (a code
    of at most 8 bits times it has at most 11 significant bits: an fp16 value, exactly)."""
    f, e = torch.frexp(x)                            # x = f 2^e, f in [0.5, 1) (0 for 0)
    F, e = torch.ceil(f * 8), e - 3
    top = F >= 8
    F, e = torch.where(top, 4.0, F), torch.where(top, e + 1, e)
    low = (e < -24) | (x <= 0)
    return torch.ldexp(torch.where(low, 4.0, F), torch.where(low, -24, e))


def _quantize_int4(w: torch.Tensor, steps: torch.Tensor | None = None
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    out, n_in = w.shape
    blocks = w.float().reshape(out, n_in // BLOCK, BLOCK)                 # (out, B, 32)
    lo, hi = blocks.amin(dim=2), blocks.amax(dim=2)                       # (out, B)
    # coded rows: m = k M (k in -128..127), d = c D (c in 0..255), M and D steps of the row;
    # of the codes around the block's minimum and range, the pair with the least squared
    # error (SmolLM2's layers requantized so: perplexity 71.42 -> 71.46, docs/BENCHMARKS.md)
    M, D = (steps if steps is not None else _int4_steps(lo, hi)).split(1, dim=1)   # (out, 1)
    best = d = m = None
    for k in (torch.floor(lo / M), torch.round(lo / M)):
        mk = k.clamp(-128, 127) * M
        need = (hi - mk) / (15 * D)                                       # (out, B) in steps
        for c in (torch.ceil(need), torch.round(need)):
            dc = c.clamp(0, 255) * D
            inv = torch.where(dc > 0, 1.0 / dc, torch.zeros_like(dc))
            n = torch.round((blocks - mk[..., None]) * inv[..., None]).clamp_(0, 15)
            err = (n.mul_(dc[..., None]).add_(mk[..., None]).sub_(blocks)).square_().sum(2)
            if best is None:
                best, d, m = err, dc, mk
            else:
                won = err < best
                best = torch.where(won, err, best)
                d, m = torch.where(won, dc, d), torch.where(won, mk, m)
    inv = torch.where(d > 0, 1.0 / d, torch.zeros_like(d))
    n = torch.round((blocks - m[..., None]) * inv[..., None]).clamp_(0, 15)
    n = n.to(torch.uint8)                                                 # (out, B, 32)
    q = n[..., :16] | (n[..., 16:] << 4)                                  # (out, B, 16)
    return (q.reshape(out, n_in // 2).contiguous(), d.to(torch.float16).contiguous(),
            m.to(torch.float16).contiguous())


def int4_values(q: torch.Tensor) -> torch.Tensor:
    """q (out, in/2) uint8 -> the 4-bit values (out, in/32, 32) uint8 in column order."""
    b = q.reshape(q.shape[0], q.shape[1] // 16, 16)                      # (out, B, 16)
    return torch.cat([b & 15, b >> 4], dim=2)                             # (out, B, 32)


def dequantize_int4(q: torch.Tensor, d: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """q (rows, in/2) uint8, d and m (rows, in/32) fp16 -> (rows, in) fp32: n * d + m."""
    n = int4_values(q).float()
    w = n * d.float()[..., None] + m.float()[..., None]
    return w.reshape(q.shape[0], q.shape[1] * 2)   # 0 rows too (an empty embedding lookup)


def quantize_int6(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """w (out, in) any float dtype, in a multiple of 32 -> q (out, in/2) uint8, h (out, in/4)
    uint8, d (out, in/32) fp16 (the layout in this module's docstring)."""
    assert can_int4(w.shape[1]), w.shape[1]
    return _by_rows(w, _quantize_int6)


def _quantize_int6(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    out, n_in = w.shape
    blocks = w.float().reshape(out, n_in // BLOCK, BLOCK)                 # (out, B, 32)
    big = blocks.gather(2, blocks.abs().argmax(dim=2, keepdim=True))[..., 0]   # (out, B)
    d = (big / -32.0).to(torch.float16)
    df = d.float()
    inv = torch.where(df != 0, 1.0 / df, torch.zeros_like(df))
    n = (torch.round(blocks * inv[..., None]) + 32).clamp_(0, 63).to(torch.uint8)
    lo, top = n & 15, n >> 4                                              # (out, B, 32)
    q = lo[..., :16] | (lo[..., 16:] << 4)                                # (out, B, 16)
    field = top[..., :16] | (top[..., 16:] << 2)                          # per q byte
    h = field[..., :8] | (field[..., 8:] << 4)                            # (out, B, 8)
    return (q.reshape(out, n_in // 2).contiguous(), h.reshape(out, n_in // 4).contiguous(),
            d.contiguous())


def int6_values(q: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    """q (out, in/2), h (out, in/4) uint8 -> the 6-bit values (out, in/32, 32) in column
    order."""
    hb = h.reshape(h.shape[0], h.shape[1] // 8, 8)                       # (out, B, 8)
    field = torch.cat([hb & 15, hb >> 4], dim=2)                          # (out, B, 16)
    top = torch.cat([field & 3, field >> 2], dim=2)                       # (out, B, 32)
    return int4_values(q) | (top << 4)


def dequantize_int6(q: torch.Tensor, h: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
    """q (rows, in/2), h (rows, in/4) uint8, d (rows, in/32) fp16 -> (rows, in) fp32:
    (n - 32) d."""
    n = int6_values(q, h).float() - 32.0
    return (n * d.float()[..., None]).reshape(q.shape[0], q.shape[1] * 2)
