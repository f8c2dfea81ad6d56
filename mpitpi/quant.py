"""Weight-only int8: symmetric, one fp32 scale per output row (pure functions).

A matrix w (out, in) is stored as q (out, in) int8 and scale (out,) fp32 with
w ~= q * scale[:, None]; |q| <= 127 and the largest |w| of each row maps to 127, so the
error of each weight is at most scale / 2 = max|w_row| / 254. Activations stay in fp32:
nothing about the input is quantised, which is what keeps the logits close to fp32.
"""
from __future__ import annotations

import torch


def quantize_int8(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """w (out, in) any float dtype -> q (out, in) int8, scale (out,) fp32."""
    w = w.float()
    amax = w.abs().amax(dim=1)                                   # (out,)
    scale = torch.where(amax > 0, amax / 127.0, torch.ones_like(amax))
    q = torch.round(w / scale[:, None]).clamp_(-127, 127).to(torch.int8)
    return q, scale


def dequantize_int8(q: torch.Tensor, scale: torch.Tensor,
                    dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """q (out, in) int8, scale (out,) -> (out, in) in ``dtype``."""
    return (q.to(torch.float32) * scale[:, None]).to(dtype)
