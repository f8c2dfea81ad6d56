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

With ``reduce`` the identity and a one-rank plan this is the plain single-process model.
"""
from __future__ import annotations

import math
import os
from typing import Callable

import torch
import torch.nn.functional as F

from mpitpi import kernels
from mpitpi.config import ModelArgs
from mpitpi.plan import RankSlice, vocab_counts
from mpitpi.prefetch import LayerStore
from mpitpi.weights import LayerWeights, TopWeights

Reduce = Callable[[torch.Tensor], torch.Tensor]


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
    """x (T, dim) scaled to unit root-mean-square per row, times w (dim,)."""
    return w * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))


class Transformer:
    """One rank's share of the model, its KV cache, and the forward pass.

    ``plan[rank]`` says what this rank holds (plan.py); ``top`` its vocabulary rows and final
    norm; ``layers`` a prefetch.LayerStore of its layer slices. ``reduce`` sums a (T, dim)
    fp32 tensor over the ranks in place (comm.Comm.allreduce_; the identity on one rank).
    The KV cache and rope tables are allocated by ``reserve(n)`` before a sequence of n
    positions is run.
    """

    def __init__(self, args: ModelArgs, plan: list[RankSlice], rank: int, top: TopWeights,
                 layers: LayerStore, reduce: Reduce | None = None):
        s = plan[rank]
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
        # one new token runs the fused C step per layer half (kernels.DecodeStep)
        # unless the kernels are missing or MPITPI_FUSED=0; the torch path is the reference
        self.fused = kernels.available() and os.environ.get("MPITPI_FUSED", "1") != "0"
        self.step: kernels.DecodeStep | None = None
        if self.fused:
            qkv = (s.n_q + 2 * s.n_kv) * hd
            self.scratch = kernels.Scratch(args.dim, max(qkv, 2 * s.n_ffn),
                                           max(s.n_q * hd, s.n_ffn))
            self.part = torch.empty(1, args.dim)                    # (1, dim) partial sums
            self.x1 = torch.empty(1, args.dim)                      # (1, dim) the token's x
            self.step = kernels.DecodeStep(self.x1, self.part, self.scratch, kv_of_q, s.n_q,
                                           s.n_kv, hd, args.norm_eps, add=len(plan) == 1)
        self.max_len = 0
        self.reserve(1)

    def reserve(self, n: int) -> None:
        """Make room for positions [0, n): KV cache and rope tables (kept if already larger)."""
        if n <= self.max_len:
            return
        s, hd = self.s, self.args.head_dim
        self.cos, self.sin = rope_tables(self.args, n)          # (n, hd) each
        # KV cache of this rank's KV heads: (n_kv, n, hd) per layer, for k and for v
        self.cache_k = [torch.zeros(s.n_kv, n, hd) for _ in range(self.n_layers)]
        self.cache_v = [torch.zeros(s.n_kv, n, hd) for _ in range(self.n_layers)]
        self.max_len = n
        if self.step is not None:
            self.cos, self.sin = self.cos.contiguous(), self.sin.contiguous()
            self.step.reserve(self.cos, self.sin, self.cache_k, self.cache_v)

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

    def attention(self, i: int, w: LayerWeights, x: torch.Tensor, start: int,
                  mask: torch.Tensor | None) -> torch.Tensor:
        """x: (T, dim) normed input -> (T, dim) partial output of this rank's heads."""
        s, hd = self.s, self.args.head_dim
        T = x.shape[0]
        q, k, v = w.wqkv(x).split(self.split_qkv, dim=-1)       # (T, (n_q + 2 n_kv) hd)
        q = q.view(T, s.n_q, hd).transpose(0, 1)                 # (n_q, T, hd)
        k = k.view(T, s.n_kv, hd).transpose(0, 1)                # (n_kv, T, hd)
        v = v.view(T, s.n_kv, hd).transpose(0, 1)                # (n_kv, T, hd)
        cos, sin = self.cos[start:start + T], self.sin[start:start + T]
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        end = start + T
        self.cache_k[i][:, start:end] = k
        self.cache_v[i][:, start:end] = v
        keys, vals = self.cache_k[i][:, :end], self.cache_v[i][:, :end]  # (n_kv, end, hd)
        if not self.gqa:
            keys, vals = keys[self.kv_of_q], vals[self.kv_of_q]         # (n_q, end, hd)
        o = F.scaled_dot_product_attention(q, keys, vals, attn_mask=mask,
                                           enable_gqa=self.gqa and s.n_q != s.n_kv)
        o = o.transpose(0, 1).reshape(T, s.n_q * hd)              # (T, n_q hd)
        return w.wo(o)                                            # (T, dim) partial

    def mlp(self, w: LayerWeights, x: torch.Tensor) -> torch.Tensor:
        """x: (T, dim) normed input -> (T, dim) partial output of this rank's FFN columns."""
        g, u = w.w13(x).chunk(2, dim=-1)                          # (T, f) each
        return w.w2(F.silu(g) * u)                                # (T, dim) partial

    def embed_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens: (T,) int64 -> (T, dim), summed over the ranks' vocabulary rows."""
        v0, v1 = self.s.vocab
        mine = (tokens >= v0) & (tokens < v1)
        x = torch.zeros(tokens.shape[0], self.args.dim)
        x[mine] = self.top.embed.rows(tokens[mine] - v0)
        return self.reduce(x)

    def decode_layer(self, i: int, w: LayerWeights, pos: int) -> None:
        """Layer i for one token at ``pos``, fused (kernels.DecodeStep): ``x1`` (1, dim) is
        updated in place, with the same two ``reduce`` calls as the torch path on the partial
        sums in ``part`` (none in a world of one rank: the C step adds them itself)."""
        win = self.args.sliding_window
        start = max(0, pos + 1 - win) if win else 0
        if self.step.attn(i, w.attn_norm, w.wqkv.c, w.wo.c, start, pos):
            self.x1.add_(self.reduce(self.part))
        more = self.step.mlp(w.ffn_norm, w.w13.c, w.w2.c)
        self.layers.done(i)                                       # the slot may be refilled
        if more:
            self.x1.add_(self.reduce(self.part))

    @torch.inference_mode()
    def forward(self, tokens: torch.Tensor, start: int) -> torch.Tensor:
        """tokens (T,) at positions [start, start+T) -> (n_vocab_r,) logits of the last one.

        Collective: 1 + 2 n_layers calls of ``reduce``, the same on every rank.
        """
        eps = self.args.norm_eps
        x = self.embed_tokens(tokens)
        if tokens.shape[0] == 1 and self.fused:
            self.x1.copy_(x)
            for i in range(self.n_layers):
                self.decode_layer(i, self.layers.get(i), start)
            return self.top.lm_head(rms_norm(self.x1, self.top.norm, eps))[0]  # (n_vocab_r,)
        x = self._layers(x, start)
        h = rms_norm(x[-1:], self.top.norm, eps)                  # (1, dim)
        return self.top.lm_head(h)[0]                             # (n_vocab_r,)

    @torch.inference_mode()
    def forward_all(self, tokens: torch.Tensor, start: int) -> torch.Tensor:
        """tokens (T,) at positions [start, start+T) -> (T, n_vocab_r) logits of every one
        (this rank's vocabulary rows, from ``vocab_offset``): for scoring text (perplexity).

        Collective: the same 1 + 2 n_layers calls of ``reduce`` as ``forward``; the KV cache
        is written at [start, start+T) the same way, so a window can be run in chunks.
        """
        x = self._layers(self.embed_tokens(tokens), start)
        return self.top.lm_head(rms_norm(x, self.top.norm, self.args.norm_eps))

    def _layers(self, x: torch.Tensor, start: int) -> torch.Tensor:
        """x (T, dim) embedded tokens at [start, start+T) -> (T, dim) after every layer, by
        torch (2 n_layers calls of ``reduce``)."""
        eps = self.args.norm_eps
        mask = self._mask(x.shape[0], start)
        for i in range(self.n_layers):
            w = self.layers.get(i)                                # waits if still loading
            x = x + self.reduce(self.attention(i, w, rms_norm(x, w.attn_norm, eps), start, mask))
            h = self.mlp(w, rms_norm(x, w.ffn_norm, eps))
            self.layers.done(i)                                   # the slot may be refilled
            x = x + self.reduce(h)
        return x
