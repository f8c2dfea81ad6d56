"""Weight-only int8: symmetric, one fp32 scale per output row and group of input columns.

A matrix w (out, in) is stored as q (out, in) int8 and scale (out, ceil(in / GROUP)) fp32
with w[o, i] ~= q[o, i] * scale[o, i // GROUP]; |q| <= 127 and the largest |w| of each
group maps to 127, so each weight is off by at most scale / 2. Per-row groups rather than
one scale per row: with one scale per row SmolLM2's greedy text left fp32's after a few
tokens on one of the golden prompts (docs/BENCHMARKS.md). Activations stay in fp32.
"""
from __future__ import annotations

import torch

GROUP = 64   # input columns per scale: 1/16 byte of scale per weight


def quantize_int8(w: torch.Tensor, group: int = GROUP) -> tuple[torch.Tensor, torch.Tensor]:
    """w (out, in) any float dtype -> q (out, in) int8, scale (out, ceil(in/group)) fp32."""
    w = w.float()
    out, n_in = w.shape
    n_groups = -(-n_in // group)
    padded = torch.nn.functional.pad(w, (0, n_groups * group - n_in))
    groups = padded.view(out, n_groups, group)                            # (out, G, group)
    amax = groups.abs().amax(dim=2)                                       # (out, G)
    scale = torch.where(amax > 0, amax / 127.0, torch.ones_like(amax))
    q = torch.round(groups / scale[:, :, None]).clamp_(-127, 127).to(torch.int8)
    return q.view(out, -1)[:, :n_in].contiguous(), scale


def dequantize_int8(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """q (rows, in) int8, scale (rows, G) -> (rows, in) fp32."""
    w = q.to(torch.float32)
    full = q.shape[1] // GROUP
    w[:, :full * GROUP].unflatten(1, (full, GROUP)).mul_(scale[:, :full, None])
    if full < scale.shape[1]:                       # the short last group
        w[:, full * GROUP:].mul_(scale[:, full:])
    return w
