"""The tensor-parallel forward pass of one rank (no MPI here: it calls ``reduce``).

Rank r holds (see plan.py and shards.py): n_q query heads and the n_kv KV heads they read,
f FFN columns and v vocabulary rows. Per layer it computes its heads' attention and its FFN
columns, producing partial (T, dim) outputs that ``reduce`` sums across ranks in place:

    x = embed(tokens)                     vocab-parallel rows, reduce #0
    for each layer:
        x = x + reduce(attn(norm(x)))     q/k/v column-parallel, o row-parallel
        x = x + reduce(mlp(norm(x)))      gate/up column-parallel, down row-parallel
    logits_r = norm(x[-1]) @ vocab_r.T    this rank's vocabulary rows, gathered by the caller
                                          (``forward_all``: every position's, (T, n_vocab_r))

A pass may carry rows of several sequences (``forward_batch``: a list of Segments, each
with its own KV slot and positions): the matrix products and the all-reduces run once for
all rows, attention per segment against its slot's cache. Every rank keeps, per slot, the
token ids whose keys and values its cache holds (``cached``), so rank 0 can reuse a prefix.

With ``reduce`` the identity and a one-rank plan this is the plain single-process model.
"""
from __future__ import annotations

import math
import os
from itertools import accumulate
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from mpitpi import choices, fused_step, kernels
from mpitpi.config import ModelArgs
from mpitpi.plan import RankSlice, vocab_counts
from mpitpi.prefetch import LayerStore
from mpitpi.weights import LayerWeights, TopWeights

Reduce = Callable[[torch.Tensor], torch.Tensor]
KV_STEP = 256   # a slot's cache grows by this many positions at a time
KV_DTYPES = {"fp32": torch.float32, "fp16": torch.float16}   # what a KV cache may store


def default_kv_dtype(dtype: str) -> str:
    """The KV cache's dtype for weights stored in ``dtype``: fp32 weights keep an fp32 cache
    (the reference's numbers); every other storage, already rounded, takes fp16 (half the
    cache's memory and the bytes attention reads per key; docs/BENCHMARKS.md)."""
    return "fp32" if dtype == "fp32" else "fp16"


def kv_bytes_per_position(args: ModelArgs, n_kv: int, kv_dtype: str) -> int:
    """KV cache bytes one position of one sequence takes on a rank holding ``n_kv`` KV heads:
    a key and a value of head_dim per head and layer, in ``kv_dtype`` (KV_DTYPES)."""
    return 2 * args.n_layers * n_kv * args.head_dim * KV_DTYPES[kv_dtype].itemsize


def kv_positions(n: int) -> int:
    """Cache positions a slot holds for n positions (its growth step rounded up)."""
    return -(-n // KV_STEP) * KV_STEP


@dataclass
class Segment:
    """Rows of one sequence in a forward pass: ``tokens`` (T,) at positions
    [start, start+T) of KV slot ``slot``; the logits of its last ``n_out`` rows are wanted.
    Decode rows (``prompt`` False: a token and the guesses after it) get the numbers each
    would get alone."""
    slot: int
    start: int
    tokens: torch.Tensor
    n_out: int = 1
    prompt: bool = True    # rows of a prompt (Weight.__call__'s prompt path), or decode rows

    @property
    def end(self) -> int:
        return self.start + self.tokens.shape[0]


def common_prefix(a: list[int], b: list[int]) -> int:
    """Length of the common prefix of two token lists."""
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def rope_inv_freq(args: ModelArgs) -> torch.Tensor:
    """(head_dim/2,) rotary inverse frequencies, with linear or llama3 scaling applied."""
    d = args.head_dim
    inv = 1.0 / (args.rope_theta ** (torch.arange(0, d, 2, dtype=torch.int64).float() / d))
    sc = args.rope_scaling
    if sc is None:
        return inv
    if sc["rope_type"] == "linear":
        return inv / sc["factor"]
    if sc["rope_type"] == "freq_factors":   # GGUF's rope_freqs tensor: one divisor per pair
        return inv / torch.tensor(sc["factors"], dtype=torch.float32)
    # llama3: long wavelengths scaled down by `factor`, short ones kept, a smooth ramp between
    factor, lo, hi = sc["factor"], sc["low_freq_factor"], sc["high_freq_factor"]
    old_len = sc["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv
    scaled = torch.where(wavelen > old_len / lo, inv / factor, inv)
    smooth = (old_len / wavelen - lo) / (hi - lo)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelen < old_len / hi) & ~(wavelen > old_len / lo)
    return torch.where(medium, smoothed, scaled)


def rope_tables(args: ModelArgs, max_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin tables, each (max_len, head_dim), in the rotate-half layout."""
    inv = rope_inv_freq(args)
    freqs = torch.arange(max_len, dtype=torch.float32)[:, None] * inv[None, :]  # (L, hd/2)
    emb = torch.cat([freqs, freqs], dim=-1)                                    # (L, hd)
    return emb.cos(), emb.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: (heads, T, hd); cos, sin: (T, hd)."""
    half = x.shape[-1] // 2
    rot = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos + rot * sin


def rms_norm(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    """x (T, dim) scaled to unit root-mean-square per row, times w (dim,): torch's one op,
    bit-equal here to w * (x * rsqrt(mean(x^2) + eps)) written out (432 shapes checked),
    instead of eight. The decode step runs it once a token after streaming the weights,
    when torch's code is out of cache: fewer ops, fewer misses."""
    return F.rms_norm(x, (x.shape[-1],), w, eps)


class Transformer:
    """One rank's share of the model, its KV cache, and the forward pass.

    ``plan[rank]`` says what this rank holds (plan.py); ``top`` its vocabulary rows and final
    norm; ``layers`` a prefetch.LayerStore of its layer slices. ``reduce`` sums a (T, dim)
    fp32 tensor over the ranks in place (comm.Comm.allreduce_; the identity on one rank).
    The KV cache and rope tables are allocated by ``reserve(n)`` before a sequence of n
    positions is run; ``kv_dtype`` (KV_DTYPES) is what the cache stores: keys and values are
    computed in fp32 and, in an fp16 cache, rounded once when written.
    """

    def __init__(self, args: ModelArgs, plan: list[RankSlice], rank: int, top: TopWeights,
                 layers: LayerStore, reduce: Reduce | None = None, kv_dtype: str = "fp32"):
        s = plan[rank]
        self.kv_dtype = KV_DTYPES[kv_dtype]
        self.args, self.s = args, s
        self.vocab_counts = vocab_counts(plan)           # rows of the gathered logits, per rank
        self.vocab_offset = s.vocab[0]                   # this rank's first vocabulary row
        self.reduce = reduce or (lambda t: t)
        self.top = top
        self.layers = layers
        self.n_layers = len(layers)
        g = args.group_size
        # local KV index of each local query head: (n_q,)
        kv_of_q = torch.arange(s.q_heads[0], s.q_heads[1]) // g - s.kv_heads[0]
        grouped = torch.arange(s.n_kv).repeat_interleave(max(1, s.n_q // s.n_kv))
        self.gqa = s.n_q % s.n_kv == 0 and torch.equal(kv_of_q, grouped)
        self.kv_of_q = kv_of_q
        hd = args.head_dim
        self.split_qkv = (s.n_q * hd, s.n_kv * hd, s.n_kv * hd)
        # decode rows run the fused C step per layer half (fused_step.DecodeStep) unless the
        # kernels are missing or MPITPI_FUSED=0; the torch path is the reference
        self.fused = kernels.available() and os.environ.get("MPITPI_FUSED", "1") != "0"
        self.c_attention = kernels.available()   # prompt rows' attention, row by row in C
        self.step: fused_step.DecodeStep | None = None
        # a world of one rank with every layer resident runs all layers in one C call
        # (fused_step.LayerStack); False: one call per layer half, as with several ranks
        self.one_call = True
        self._stack: fused_step.LayerStack | None = None
        if self.fused:
            qkv = (s.n_q + 2 * s.n_kv) * hd
            dims = (args.dim, max(qkv, 2 * s.n_ffn), max(s.n_q * hd, s.n_ffn))
            self.step = fused_step.DecodeStep(dims, kv_of_q, s.n_q, s.n_kv, hd,
                                              args.norm_eps, add=len(plan) == 1)
        self.rope_len = 0
        self.cache_k: dict[int, list[torch.Tensor]] = {}   # slot -> (n_kv, cap, hd) per layer
        self.cache_v: dict[int, list[torch.Tensor]] = {}
        self.cached: dict[int, list[int]] = {}   # slot -> token ids at positions [0, len)
        self.kv_ptrs: dict[int, np.ndarray] = {}  # slot -> (n_layers, 2) k, v data pointers
        self.reserve(1)

    def capacity(self, slot: int = 0) -> int:
        """Positions slot ``slot``'s cache has room for (0 when it has none)."""
        return self.cache_k[slot][0].shape[1] if slot in self.cache_k else 0

    def reserve(self, n: int, slot: int = 0) -> None:
        """Make room for positions [0, n) in KV slot ``slot`` (kept if already larger;
        grown in steps of KV_STEP, the cached positions copied) and in the rope tables."""
        s, hd = self.s, self.args.head_dim
        if n > self.rope_len:
            n_rope = min(max(n, self.rope_len + KV_STEP), max(n, self.args.max_seq_len))
            self.cos, self.sin = (t.contiguous() for t in rope_tables(self.args, n_rope))
            self.rope_len = n_rope                      # (n_rope, hd) each
        old = self.capacity(slot)
        if n <= old:
            return
        cap = kv_positions(n)
        ks, vs = [], []
        # per layer: (n_kv, cap, hd), the old part copied. Not zeroed: a position is written
        # before any row reads it (every reader stops at its row's position), and zeroing a
        # new slot's fresh pages cost about 3 ms (SmolLM2, 1 rank) inside the pass that
        # admitted it, for every rank; untouched pages also stay out of RSS until used
        for i in range(self.n_layers):
            for new, caches in ((ks, self.cache_k), (vs, self.cache_v)):
                t = torch.empty(s.n_kv, cap, hd, dtype=self.kv_dtype)
                if old:
                    t[:, :old] = caches[slot][i]
                new.append(t)
        self.cache_k[slot], self.cache_v[slot] = ks, vs
        self.kv_ptrs[slot] = np.array([[k.data_ptr(), v.data_ptr()] for k, v in zip(ks, vs)],
                                      np.int64).reshape(self.n_layers, 2)
        self.cached.setdefault(slot, [])

    def reusable(self, slot: int, ids: list[int]) -> int:
        """Leading positions of ``ids`` whose keys and values slot ``slot`` already holds
        (all but the last id at most: a pass needs a row to give logits)."""
        return common_prefix(self.cached.get(slot, []), ids[:-1])

    @torch.inference_mode()
    def copy_prefix(self, src: int, dst: int, n: int) -> None:
        """Slot ``dst`` takes the keys and values of slot ``src``'s first ``n`` positions
        (this rank's heads; the same bits, so a copied prefix answers as a computed one)."""
        self.reserve(n, dst)
        for i in range(self.n_layers):
            self.cache_k[dst][i][:, :n] = self.cache_k[src][i][:, :n]
            self.cache_v[dst][i][:, :n] = self.cache_v[src][i][:, :n]
        self.cached[dst] = self.cached[src][:n]

    def drop(self, slot: int) -> None:
        """Free slot ``slot``'s cache (its memory goes back; its prefix is forgotten)."""
        for d in (self.cache_k, self.cache_v, self.cached, self.kv_ptrs):
            d.pop(slot, None)

    def _mask(self, T: int, start: int) -> torch.Tensor | None:
        """Boolean (T, start+T) mask of allowed keys (causal, and the sliding window when the
        model has one); None for one new token with every cached key allowed."""
        L, w = start + T, self.args.sliding_window
        windowed = w is not None and L > w
        if T == 1 and not windowed:
            return None
        qpos = torch.arange(start, L)[:, None]
        kpos = torch.arange(L)[None, :]
        allowed = kpos <= qpos
        if windowed:
            allowed &= (qpos - kpos) < w
        return allowed

    def attention(self, i: int, w: LayerWeights, x: torch.Tensor, segs: list[Segment],
                  masks: list[torch.Tensor | None], table: np.ndarray | None,
                  decode: bool = False) -> torch.Tensor:
        """x: (R, dim) normed rows of ``segs`` -> (R, dim) partial output of this rank's
        heads; each segment attends to its own slot's cache (written here), row by row in
        C when ``table`` (``_row_table``) is given, else by torch with ``masks``.
        ``decode``: the rows are decode rows (Weight.__call__)."""
        s, hd = self.s, self.args.head_dim
        R = x.shape[0]
        q, k, v = w.wqkv(x, decode).split(self.split_qkv, dim=-1)   # (R, (n_q + 2 n_kv) hd)
        q = q.view(R, s.n_q, hd).transpose(0, 1)                 # (n_q, R, hd)
        k = k.view(R, s.n_kv, hd).transpose(0, 1)                # (n_kv, R, hd)
        v = v.view(R, s.n_kv, hd).transpose(0, 1)                # (n_kv, R, hd)
        outs, row = [], 0
        for seg, mask in zip(segs, masks):
            T, start, end = seg.tokens.shape[0], seg.start, seg.end
            cos, sin = self.cos[start:end], self.sin[start:end]
            qs = apply_rope(q[:, row:row + T], cos, sin)          # (n_q, T, hd)
            cache_k, cache_v = self.cache_k[seg.slot][i], self.cache_v[seg.slot][i]
            self._store(cache_k[:, start:end], apply_rope(k[:, row:row + T], cos, sin))
            self._store(cache_v[:, start:end], v[:, row:row + T])
            row += T
            if table is not None:   # each row as it would be alone, whatever the chunk
                outs.append(fused_step.attend_rows(qs.transpose(0, 1).contiguous(),
                                                   table[i, row - T:row], self.kv_of_q))
                continue
            keys, vals = cache_k[:, :end].float(), cache_v[:, :end].float()   # (n_kv, end, hd)
            if not self.gqa:
                keys, vals = keys[self.kv_of_q], vals[self.kv_of_q]     # (n_q, end, hd)
            o = F.scaled_dot_product_attention(qs, keys, vals, attn_mask=mask,
                                               enable_gqa=self.gqa and s.n_q != s.n_kv)
            outs.append(o.transpose(0, 1).reshape(T, s.n_q * hd))  # (T, n_q hd)
        o = outs[0] if len(outs) == 1 else torch.cat(outs)       # (R, n_q hd)
        return w.wo(o, decode)                                    # (R, dim) partial

    def _store(self, dst: torch.Tensor, src: torch.Tensor) -> None:
        """Keys or values (fp32) into a cache slice: an fp16 cache takes them clamped to
        +-65504 and rounded to nearest even, as the C step stores them (csrc/decode.c
        store_kv), so a prompt row and a decode row leave the same bits."""
        dst.copy_(src.clamp(-65504.0, 65504.0) if dst.dtype == torch.float16 else src)

    def _row_table(self, segs: list[Segment]) -> np.ndarray:
        """(n_layers, R, ROW_WORDS) csrc/decode.c row_t of every row of ``segs``: its slot's
        k and v cache of each layer and their row stride, its rope rows, the first key it
        attends (a sliding window's start, else 0) and its position."""
        win, hd = self.args.sliding_window, self.args.head_dim
        pos = np.concatenate([np.arange(g.start, g.end, dtype=np.int64) for g in segs])
        table = np.empty((self.n_layers, pos.size, fused_step.ROW_WORDS), np.int64)
        row = 0
        for g in segs:
            T = g.tokens.shape[0]
            table[:, row:row + T, 0:2] = self.kv_ptrs[g.slot][:, None, :]
            table[:, row:row + T, 4] = self.capacity(g.slot)
            row += T
        table[:, :, 2] = self.cos.data_ptr() + pos * (hd * 4)
        table[:, :, 3] = self.sin.data_ptr() + pos * (hd * 4)
        table[:, :, 5] = np.maximum(0, pos + 1 - win) if win else 0
        table[:, :, 6] = pos
        table[:, :, 7] = int(self.kv_dtype == torch.float16)
        return table

    def mlp(self, w: LayerWeights, x: torch.Tensor, decode: bool = False) -> torch.Tensor:
        """x: (T, dim) normed input -> (T, dim) partial output of this rank's FFN columns."""
        g, u = w.w13(x, decode).chunk(2, dim=-1)                  # (T, f) each
        return w.w2(F.silu(g) * u, decode)                        # (T, dim) partial

    def embed_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens: (T,) int64 -> (T, dim), summed over the ranks' vocabulary rows."""
        v0, v1 = self.s.vocab
        if v0 == 0 and v1 >= self.args.vocab_size:   # every row here (one rank): no masks
            return self.reduce(self.top.embed.rows(tokens))
        mine = (tokens >= v0) & (tokens < v1)
        x = torch.zeros(tokens.shape[0], self.args.dim)
        x[mine] = self.top.embed.rows(tokens[mine] - v0)
        return self.reduce(x)

    def decode_layer(self, i: int, w: LayerWeights) -> None:
        """Layer i for the rows placed in the fused step (fused_step.DecodeStep): its x
        (B, dim) is updated in place, with the same two ``reduce`` calls as the torch path
        on the partial sums (none in a world of one rank: the C step adds them itself)."""
        step = self.step
        if step.attn(i, w.attn_norm, w.wqkv.c, w.wo.c):
            step.x.add_(self.reduce(step.part))
        more = step.mlp(w.ffn_norm, w.w13.c, w.w2.c)
        self.layers.done(i)                                       # the slot may be refilled
        if more:
            step.x.add_(self.reduce(step.part))

    def _fused(self, segs: list[Segment], x: torch.Tensor, prompt: bool = False
               ) -> torch.Tensor:
        """Every row of ``segs`` through the fused step, each with exactly the numbers it
        would get alone -> (R, dim). ``prompt``: prompt rows (int4 products in int16)."""
        xs = self.step.places(self._row_table(segs), self.cos, self.sin, prompt)
        xs.copy_(x)
        if self.step.add and self.layers.n_resident == self.n_layers and self.one_call:
            self.step.layers(self._layer_stack())   # one C call for every layer
            return xs
        for i in range(self.n_layers):
            self.decode_layer(i, self.layers.get(i))
        return xs

    def _layer_stack(self) -> fused_step.LayerStack:
        """Every layer as one C call reads them (made once: only for a world of one rank
        with every layer resident, whose layers never move)."""
        if self._stack is None:
            self._stack = fused_step.LayerStack([self.layers.get(i)
                                                 for i in range(self.n_layers)])
        return self._stack

    def _hold(self, segs: list[Segment]) -> None:
        """Grow each segment's slot cache to hold it; ``cached[slot]`` becomes the tokens
        before ``start`` and the segment's."""
        for seg in segs:
            self.reserve(seg.end, seg.slot)
            held = self.cached[seg.slot]          # in place: a copy grew with the sequence
            del held[seg.start:]
            held.extend(seg.tokens.tolist())

    def greedy_batch(self, segs: list[Segment]) -> list[int] | None:
        """A world of one rank with every layer resident: decode rows of ``segs`` (each
        row's logits wanted) in one C call (fused_step.DecodeStep.token) -> each row's greedy
        token, as ``forward_batch`` and an argmax of its logits give it (the same numbers).
        None, having done nothing, where that call does not apply: several ranks, layers
        streamed, prompt rows, no kernels; the caller runs ``forward_batch`` then."""
        step = self.step
        if (step is None or not step.add or not self.one_call
                or self.layers.n_resident != self.n_layers
                or any(g.prompt or g.n_out != g.tokens.shape[0] for g in segs)):
            return None
        self._hold(segs)
        top, stack = self.top, self._layer_stack()
        tokens = segs[0].tokens if len(segs) == 1 else torch.cat([g.tokens for g in segs])
        table = self._row_table(segs)
        if top.embed.c_rows:
            best = step.token(table, tokens, None, stack, top.embed.c_vocab,
                              top.lm_head.c_vocab, top.norm)
        else:   # plain quantized rows: looked up in torch, as forward_batch does
            with torch.inference_mode():   # the step's buffers are inference tensors
                best = step.token(table, None, self.embed_tokens(tokens), stack, None,
                                  top.lm_head.c_vocab, top.norm)
        return best.tolist()

    @torch.inference_mode()
    def forward_batch(self, segs: list[Segment]) -> torch.Tensor:
        """Rows of every segment in one pass -> (sum of n_out, n_vocab_r) logits of each
        segment's last n_out rows, in segment order (this rank's vocabulary rows).

        Decode rows (segments with ``prompt`` False) run the fused C step and give each row
        the numbers it would get alone, in a batch or not; prompt rows keep fp32 activations
        between products (each product's path per host: Weight.__call__), their attention
        row by row in C (each row's numbers do not depend on how the prompt was cut into
        chunks, nor on which prefix was cached). Where every layer matrix's prompt product
        is the C kernels' for this many rows (choices.py, measured per host),
        prompt rows run the fused step too, in its prompt mode (``_prompt_fused``). Collective:
        1 + 2 n_layers calls of ``reduce``, the same on every rank, whatever the number of
        segments. Each slot's cache is grown as needed and written at its segment's
        positions; ``cached[slot]`` becomes the tokens before ``start`` and these.
        """
        self._hold(segs)
        tokens = segs[0].tokens if len(segs) == 1 else torch.cat([g.tokens for g in segs])
        x = self.embed_tokens(tokens)                             # (R, dim)
        decode = not any(g.prompt for g in segs)
        fused = self.fused and (decode or self._prompt_fused(x.shape[0]))
        x = self._fused(segs, x, prompt=not decode) if fused else self._layers(x, segs, decode)
        ends = list(accumulate(g.tokens.shape[0] for g in segs))
        rows = [r for g, e in zip(segs, ends) for r in range(e - g.n_out, e)]
        if fused and decode and len(rows) == x.shape[0]:   # every row: the step norms in C
            h = self.step.final_norm(self.top.norm)
        else:
            h = x if len(rows) == x.shape[0] else x[rows]         # (n_out total, dim)
            h = rms_norm(h, self.top.norm, self.args.norm_eps)
        return self.top.lm_head(h, decode=decode, logits=True)

    def _prompt_fused(self, R: int) -> bool:
        """Whether R prompt rows run the fused step: where Weight.__call__ would take the C
        kernels for every layer matrix (R within each storage's ``kernel_rows``), the fused
        step computes the same products (int4 with int16 activations, as there) without a
        Python round per operation; each row still gets the numbers it would get alone. The
        answer depends on R and the host only, so a prompt row computed in any chunk, or in
        a cached prefix, got it the same way."""
        c = choices.host()
        return all(R <= c.kernel_rows(k) for k in self.layers.kinds)

    def forward(self, tokens: torch.Tensor, start: int, slot: int = 0) -> torch.Tensor:
        """tokens (T,) at positions [start, start+T) of ``slot`` -> (n_vocab_r,) logits of
        the last one. Collective: as ``forward_batch``."""
        return self.forward_batch([Segment(slot, start, tokens, prompt=tokens.shape[0] > 1)])[0]

    def forward_all(self, tokens: torch.Tensor, start: int, slot: int = 0) -> torch.Tensor:
        """tokens (T,) at positions [start, start+T) -> (T, n_vocab_r) logits of every one
        (this rank's vocabulary rows, from ``vocab_offset``): for scoring text (perplexity).
        Collective: as ``forward_batch``; the cache is written the same way, so a window
        can be run in chunks."""
        return self.forward_batch([Segment(slot, start, tokens, tokens.shape[0])])

    def _layers(self, x: torch.Tensor, segs: list[Segment], decode: bool = False
                ) -> torch.Tensor:
        """x (R, dim) embedded rows of ``segs`` -> (R, dim) after every layer, by torch
        (2 n_layers calls of ``reduce``); ``decode``: they are decode rows, whose products
        take the C kernels as in the fused step (Weight.__call__)."""
        eps = self.args.norm_eps
        masks = [self._mask(g.tokens.shape[0], g.start) for g in segs]
        table = self._row_table(segs) if self.c_attention else None
        for i in range(self.n_layers):
            w = self.layers.get(i)                                # waits if still loading
            h = self.attention(i, w, rms_norm(x, w.attn_norm, eps), segs, masks, table, decode)
            x = x + self.reduce(h)
            h = self.mlp(w, rms_norm(x, w.ffn_norm, eps), decode)
            self.layers.done(i)                                   # the slot may be refilled
            x = x + self.reduce(h)
        return x
