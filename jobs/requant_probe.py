"""Price a storage before building it: rewrite a copy of int4 shards in place so that their
vocabulary holds b-bit symmetric blocks of 32 (the block's largest |w| at code -2^(b-1), an
fp16 scale); with --layers-q4-0, their layers offset-free 4-bit blocks (w = (n - 8) d); with
--layers-subscale B, their layers' per-block scales and offsets as B-bit codes under one
scale and offset per --superblock columns (Q4_K's form: d = D c, m = M k), the nibbles
rounded again to the coarser scales; with --layers-requant, their layers quantized again
from their values by quant.quantize_int4 (whatever it writes at this commit).
The int8 (group 32) and int4 storages hold those numbers exactly, so the existing kernels
then compute what kernels for the new storage would, and `mpitpi perplexity --shards COPY
--no-verify` measures its cost in quality (the checksums no longer match, hence
--no-verify).

    mpitpi split smollm2-135m --out /tmp/base -n 1 --vocab-dtype int8
    cp -r /tmp/base /tmp/six && python jobs/requant_probe.py /tmp/six --vocab-bits 6
    mpiexec -n 1 mpitpi perplexity --shards /tmp/six --no-verify --max-windows 20
"""
import argparse
import glob
import os

import h5py
import torch

from mpitpi import quant


def symmetric(w: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """w (rows, cols) -> codes (rows, cols / 32, 32) in [-2^(b-1), 2^(b-1)), d fp16."""
    blocks = w.reshape(w.shape[0], -1, 32)
    big = blocks.gather(2, blocks.abs().argmax(dim=2, keepdim=True))[..., 0]
    d = (big / -(1 << (bits - 1))).to(torch.float16)
    inv = torch.where(d.float() != 0, 1.0 / d.float(), torch.zeros_like(d.float()))
    n = torch.round(blocks * inv[..., None]).clamp_(-(1 << (bits - 1)), (1 << (bits - 1)) - 1)
    return n, d


def coarse_scales(q: torch.Tensor, d: torch.Tensor, m: torch.Tensor, bits: int,
                  superblock: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """int4 (q, d, m) -> the same matrix with each block's d an unsigned ``bits``-bit code
    times the largest d of its super-block / (2^bits - 1) (rounded up: the block's range
    still fits) and m a signed code times the largest |m| / (2^(bits-1) - 1) (rounded down:
    m' <= m), values rounded again onto the new grid; d, m returned as fp16."""
    w = quant.dequantize_int4(q, d, m).reshape(q.shape[0], -1, 32)       # (rows, B, 32)
    rows, nb = d.shape
    per = nb if superblock == 0 else superblock // 32
    pad = -nb % per   # a short last super-block (576 columns: 2 of 8 blocks, then 2)

    def grouped(t):   # (rows, nb) -> (rows, super-blocks, per), zeros after the row's end
        return torch.nn.functional.pad(t, (0, pad)).reshape(rows, -1, per)

    def flat(t):
        return t.reshape(rows, -1)[:, :nb]
    df, mf = grouped(d.float()), grouped(m.float())
    top_d = df.amax(dim=2, keepdim=True) / ((1 << bits) - 1)
    top_m = mf.abs().amax(dim=2, keepdim=True) / ((1 << (bits - 1)) - 1)
    top_d = torch.where(top_d > 0, top_d, torch.ones_like(top_d))
    top_m = torch.where(top_m > 0, top_m, torch.ones_like(top_m))
    m2 = flat(torch.floor(mf / top_m) * top_m)
    hi = w.amax(dim=2)
    d2 = flat(torch.ceil(grouped((hi - m2) / 15) / top_d) * top_d)
    inv = torch.where(d2 > 0, 1 / d2, torch.zeros_like(d2))
    n = torch.round((w - m2[..., None]) * inv[..., None]).clamp_(0, 15).to(torch.uint8)
    q2 = (n[..., :16] | (n[..., 16:] << 4)).reshape(q.shape)
    return q2, d2.to(torch.float16), m2.to(torch.float16)


def rewrite(path: str, vocab_bits: int, layers_q4_0: bool, subscale: int = 0,
            superblock: int = 256, requant: bool = False) -> None:
    with h5py.File(path, "r+") as f:
        names = []
        f.visititems(lambda n, o: names.append(n) if isinstance(o, h5py.Dataset) else None)
        for name in names:
            if name.endswith((".scale", ".min", ".hi")):
                continue
            if requant and name.startswith("layers/") and name + ".min" in f:
                q, d, m = (torch.from_numpy(f[name + s][()]) for s in ("", ".scale", ".min"))
                arrays = quant.quantize_int4(quant.dequantize_int4(q, d, m))
                for s, a in zip(("", ".scale", ".min"), arrays):
                    f[name + s][...] = a.numpy()
            elif layers_q4_0 and name.startswith("layers/") and name + ".min" in f:
                q, d, m = (torch.from_numpy(f[name + s][()]) for s in ("", ".scale", ".min"))
                n, d4 = symmetric(quant.dequantize_int4(q, d, m), 4)
                n = (n + 8).to(torch.uint8)
                f[name][...] = (n[..., :16] | (n[..., 16:] << 4)).reshape(q.shape).numpy()
                f[name + ".scale"][...] = d4.numpy()
                f[name + ".min"][...] = (d4 * -8).numpy()   # exact in fp16
            elif subscale and name.startswith("layers/") and name + ".min" in f:
                q, d, m = (torch.from_numpy(f[name + s][()]) for s in ("", ".scale", ".min"))
                q2, d2, m2 = coarse_scales(q, d, m, subscale, superblock)
                f[name][...], f[name + ".scale"][...], f[name + ".min"][...] = (
                    q2.numpy(), d2.numpy(), m2.numpy())
            if vocab_bits < 8 and name.startswith("vocab/"):
                if f[name].dtype != "int8" or f[name + ".scale"].shape[1] * 32 != f[name].shape[1]:
                    raise SystemExit(f"{name}: not int8 in groups of 32 (split with "
                                     f"--vocab-dtype int8 from a GGUF Q8_0 file)")
                q, s = (torch.from_numpy(f[name + x][()]) for x in ("", ".scale"))
                n, d = symmetric(quant.dequantize_int8(q, s), vocab_bits)
                f[name][...] = n.to(torch.int8).reshape(q.shape).numpy()
                f[name + ".scale"][...] = d.float().numpy()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("shards", help="a copy of an int4 shard folder: rewritten in place")
    p.add_argument("--vocab-bits", type=int, default=8, choices=range(2, 9))
    p.add_argument("--layers-q4-0", action="store_true")
    p.add_argument("--layers-requant", action="store_true")
    p.add_argument("--layers-subscale", type=int, default=0, metavar="BITS")
    p.add_argument("--superblock", type=int, default=256,
                   help="columns per scale and offset of the codes (0: the whole row)")
    a = p.parse_args()
    for path in sorted(glob.glob(os.path.join(a.shards, "rank*.h5"))):
        rewrite(path, a.vocab_bits, a.layers_q4_0, a.layers_subscale, a.superblock,
                a.layers_requant)


if __name__ == "__main__":
    main()
