"""GGUF quantized blocks carried over into mpitpi's integer storages without a float detour.

A GGUF matrix (rows, cols) is stored as rows of blocks along the columns (rows, nb, bytes).
Pure numpy on those bytes, one function per source type; each returns, for the rows given:

    int4 (quant.py): q (rows, cols / 2) uint8, d and m (rows, cols / 32) fp16
    int8 (quant.py, group 32): q (rows, cols) int8, scale (rows, cols / 32) fp32

Q4_0 (18 bytes per 32 columns: fp16 d, 16 bytes of nibbles; w = (n - 8) d) and Q4_1
(20 bytes: fp16 d, fp16 m, 16 bytes; w = n d + m) share mpitpi's nibble order, so their
bytes are copied; Q4_0's offset -8 d is exact in fp16. Q8_0 (34 bytes: fp16 d, 32 int8;
w = q d) becomes int8 with d as an fp32 scale, exactly. Q4_K (144 bytes per 256 columns:
fp16 d and dmin, twelve bytes packing eight 6-bit scales and mins, 128 bytes of nibbles in
which bytes 32c..32c+31 hold sub-block 2c in their low nibbles and 2c+1 in their high ones;
w = d sc n - dmin mn per sub-block of 32) becomes int4 with the nibbles reordered and each
sub-block's d sc and -dmin mn rounded to fp16: the one rounding, at most 2^-11 of a scale.
"""
from __future__ import annotations

import numpy as np

# source type name -> (columns per block, bytes per block)
LAYOUT = {"Q4_0": (32, 18), "Q4_1": (32, 20), "Q8_0": (32, 34), "Q4_K": (256, 144)}
INT4 = ("Q4_0", "Q4_1", "Q4_K")   # carried into int4 shards
INT8 = ("Q8_0",)                  # carried into int8 (and int4) shards


def _f16(raw: np.ndarray) -> np.ndarray:
    """(..., 2) bytes -> (...) fp16."""
    return np.ascontiguousarray(raw).view(np.float16)[..., 0]


def q4_0(raw: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """raw (rows, nb * 18) uint8 -> int4 q, d, m."""
    b = raw.reshape(raw.shape[0], -1, 18)                                 # (rows, nb, 18)
    d = _f16(b[..., 0:2])
    return b[..., 2:].reshape(raw.shape[0], -1).copy(), d, (d * np.float16(-8))


def q4_1(raw: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """raw (rows, nb * 20) uint8 -> int4 q, d, m."""
    b = raw.reshape(raw.shape[0], -1, 20)                                 # (rows, nb, 20)
    return b[..., 4:].reshape(raw.shape[0], -1).copy(), _f16(b[..., 0:2]), _f16(b[..., 2:4])


def q8_0(raw: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """raw (rows, nb * 34) uint8 -> int8 q (rows, nb * 32), scale (rows, nb) fp32."""
    b = raw.reshape(raw.shape[0], -1, 34)                                 # (rows, nb, 34)
    q = np.ascontiguousarray(b[..., 2:]).view(np.int8).reshape(raw.shape[0], -1)
    return q, _f16(b[..., 0:2]).astype(np.float32)


def q4_k(raw: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """raw (rows, ns * 144) uint8 -> int4 q, d, m (eight 32-column blocks per super-block)."""
    rows = raw.shape[0]
    b = raw.reshape(rows, -1, 144)                                        # (rows, ns, 144)
    d = _f16(b[..., 0:2]).astype(np.float32)[..., None]                   # (rows, ns, 1)
    dmin = _f16(b[..., 2:4]).astype(np.float32)[..., None]
    s = b[..., 4:16].astype(np.uint8)
    lo, mid, hi = s[..., 0:4], s[..., 4:8], s[..., 8:12]                  # (rows, ns, 4) each
    # sub-blocks 0-3: 6 bits in lo (scales) and mid (mins); 4-7: low 4 bits in hi, top 2
    # bits in the top of lo (scales) and mid (mins)
    sc = np.concatenate([lo & 63, (hi & 15) | ((lo >> 6) << 4)], axis=-1)  # (rows, ns, 8)
    mn = np.concatenate([mid & 63, (hi >> 4) | ((mid >> 6) << 4)], axis=-1)
    scale = (d * sc.astype(np.float32)).astype(np.float16)
    offset = (-(dmin * mn.astype(np.float32))).astype(np.float16)
    qs = b[..., 16:].reshape(rows, -1, 4, 32)                             # (rows, ns, 4, 32)
    n = np.stack([qs & 15, qs >> 4], axis=3).reshape(rows, -1, 32)        # (rows, 8 ns, 32)
    q = n[..., :16] | (n[..., 16:] << 4)                                  # (rows, 8 ns, 16)
    return q.reshape(rows, -1), scale.reshape(rows, -1), offset.reshape(rows, -1)


DECODE = {"Q4_0": q4_0, "Q4_1": q4_1, "Q4_K": q4_k, "Q8_0": q8_0}
