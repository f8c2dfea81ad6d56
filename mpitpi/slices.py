"""What each rank's shard holds, read from a checkpoint: split (shards.write_shards) calls
``rank_tensors`` once per layer and rank. Matrices come as the shards store them: float, or
quantized a piece at a time (quant.py), or a GGUF file's own blocks where they carry over."""
from __future__ import annotations

import torch

from mpitpi.checkpoint import Checkpoint
from mpitpi.config import ModelArgs
from mpitpi.plan import RankSlice
from mpitpi.quant import int4_steps, quantize_int4
from mpitpi.weights import STORAGE, Weight, quantized, storage_for

READ_ROWS_AT_ONCE = 1 << 24   # weights a split reads at a time where it quantizes them


def rank_tensors(ckpt: Checkpoint, args: ModelArgs, s: RankSlice, layer: int | None,
                 dtype: str = "fp32", vocab_dtype: str | None = None,
                 row_steps: dict[str, torch.Tensor] | None = None):
    """Yield (dataset name, tensor or Weight) for rank slice ``s``: one layer, or the
    non-layer tensors. Matrices come as the checkpoint gives them for shards of ``dtype``
    (a GGUF file's own blocks where they carry over: Checkpoint.rows_as). ``row_steps``: the
    int4 code steps of the layer's row-parallel matrices, shared by its ranks' calls."""
    row_steps = {} if row_steps is None else row_steps
    hd = args.head_dim

    def rows(name, a, b):
        return ckpt.rows_as(name, a, b, dtype)

    def part(dataset, name, a, b):
        """Rows [a, b) of ``name`` for ``dataset``. Where the shards store that quantized,
        float rows are read and quantized READ_ROWS_AT_ONCE weights at a time (rows are
        quantized apart: the same numbers as the whole), so a split never holds a rank's
        slice in float: Llama-3.1-405B widths on 16 ranks, a vocabulary slice is 263 MB in
        bf16 and 131 MB in int8."""
        cols = ckpt.shape(name)[1]
        kind = storage_for(dataset, cols, dtype, vocab_dtype)
        if kind in STORAGE:   # float storage: no quantizing, no pieces
            t = rows(name, a, b)
            return t if isinstance(t, Weight) else Weight(t)
        step = max(1, READ_ROWS_AT_ONCE // cols // hd) * hd   # whole heads (GGUF q, k)
        fields, out = ("data", "scale", "min", "hi"), None
        for r in range(a, max(a, b), step):
            t = rows(name, r, min(b, r + step))
            t = t if isinstance(t, Weight) else quantized(t, kind)
            if out is None:   # the whole slice, filled piece by piece (no joined copy)
                out = {f: getattr(t, f).new_empty((b - a, *getattr(t, f).shape[1:]))
                       for f in fields if getattr(t, f) is not None}
            for f, o in out.items():
                o[r - a:r - a + len(getattr(t, f))] = getattr(t, f)
        if out is None:   # no rows
            return quantized(ckpt.rows(name, a, b), kind)
        return Weight(out["data"], out.get("scale"), None, out.get("min"), 0, out.get("hi"))

    def cols(dataset, name, c0, c1):
        """Columns [c0, c1) of the row-parallel ``name`` for ``dataset``. int4 from float
        weights takes each row's code steps from the whole row (quant.int4_steps, read
        READ_ROWS_AT_ONCE weights at a time and kept in ``row_steps`` for the layer's other
        ranks), so that a column gets the same numbers on any number of ranks."""
        t = ckpt.cols_as(name, c0, c1, dtype)
        if isinstance(t, Weight) or storage_for(dataset, c1 - c0, dtype, vocab_dtype) != "int4":
            return t
        n, width = ckpt.shape(name)
        if c1 - c0 == width:   # the whole rows (one rank): their steps need no second read
            row_steps[name] = int4_steps(t)
        elif name not in row_steps:
            step = max(1, READ_ROWS_AT_ONCE // width)
            row_steps[name] = torch.cat([int4_steps(ckpt.rows(name, r, min(n, r + step)))
                                         for r in range(0, n, step)])
        q, d, m = quantize_int4(t, row_steps[name])
        return Weight(q, d, None, m)

    if layer is None:
        yield "vocab/embed", part("vocab/embed", "model.embed_tokens.weight", *s.vocab)
        if not args.tie_embeddings:
            yield "vocab/lm_head", part("vocab/lm_head", "lm_head.weight", *s.vocab)
        yield "norm", ckpt.full("model.norm.weight")
        return
    p = f"model.layers.{layer}."
    q0, q1 = s.q_heads[0] * hd, s.q_heads[1] * hd
    k0, k1 = s.kv_heads[0] * hd, s.kv_heads[1] * hd
    attn, mlp = p + "self_attn.", p + "mlp."
    yield "wqkv", Weight.cat([part("wqkv", attn + "q_proj.weight", q0, q1),
                              part("wqkv", attn + "k_proj.weight", k0, k1),
                              part("wqkv", attn + "v_proj.weight", k0, k1)])
    if ckpt.has(attn + "q_proj.bias"):
        yield "bqkv", torch.cat([ckpt.rows(attn + "q_proj.bias", q0, q1),
                                 ckpt.rows(attn + "k_proj.bias", k0, k1),
                                 ckpt.rows(attn + "v_proj.bias", k0, k1)])
    yield "wo", cols("wo", attn + "o_proj.weight", q0, q1)
    if s.rank == 0 and ckpt.has(attn + "o_proj.bias"):
        yield "bo", ckpt.full(attn + "o_proj.bias")
    f0, f1 = s.ffn
    yield "w13", Weight.cat([part("w13", mlp + "gate_proj.weight", f0, f1),
                             part("w13", mlp + "up_proj.weight", f0, f1)])
    if ckpt.has(mlp + "gate_proj.bias"):
        yield "b13", torch.cat([ckpt.rows(mlp + "gate_proj.bias", f0, f1),
                                ckpt.rows(mlp + "up_proj.bias", f0, f1)])
    yield "w2", cols("w2", mlp + "down_proj.weight", f0, f1)
    if s.rank == 0 and ckpt.has(mlp + "down_proj.bias"):
        yield "b2", ckpt.full(mlp + "down_proj.bias")
    yield "attn_norm", ckpt.full(p + "input_layernorm.weight")
    yield "ffn_norm", ckpt.full(p + "post_attention_layernorm.weight")
