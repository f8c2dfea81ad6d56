"""Price a storage before building it: rewrite a copy of int4 shards in place so that their
vocabulary holds b-bit symmetric blocks of 32 (the block's largest |w| at code -2^(b-1), an
fp16 scale) and, with --layers-q4-0, their layers offset-free 4-bit blocks (w = (n - 8) d).
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


def rewrite(path: str, vocab_bits: int, layers_q4_0: bool) -> None:
    with h5py.File(path, "r+") as f:
        names = []
        f.visititems(lambda n, o: names.append(n) if isinstance(o, h5py.Dataset) else None)
        for name in names:
            if name.endswith((".scale", ".min", ".hi")):
                continue
            if layers_q4_0 and name.startswith("layers/") and name + ".min" in f:
                q, d, m = (torch.from_numpy(f[name + s][()]) for s in ("", ".scale", ".min"))
                n, d4 = symmetric(quant.dequantize_int4(q, d, m), 4)
                n = (n + 8).to(torch.uint8)
                f[name][...] = (n[..., :16] | (n[..., 16:] << 4)).reshape(q.shape).numpy()
                f[name + ".scale"][...] = d4.numpy()
                f[name + ".min"][...] = (d4 * -8).numpy()   # exact in fp16
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
    a = p.parse_args()
    for path in sorted(glob.glob(os.path.join(a.shards, "rank*.h5"))):
        rewrite(path, a.vocab_bits, a.layers_q4_0)


if __name__ == "__main__":
    main()
