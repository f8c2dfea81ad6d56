"""int6, the vocabulary of int4 shards: the block layout, the C product (plain rows and
tiles) against the dequantized one, the shards' default, and SmolLM2's perplexity."""
import json

import h5py
import numpy as np
import pytest
import torch

from conftest import run_mpi
from mpitpi import kernels
from mpitpi.quant import BLOCK, dequantize_int6, int4_values, int6_values, quantize_int6
from mpitpi.weights import Weight, quantized, storage_for

# (T, in, out): one and several rows, one block up to past 4096 columns, a partial tile
SHAPES = [(1, 32, 5), (3, 96, 33), (1, 576, 1728), (4, 1536, 65), (2, 4352, 11), (9, 288, 64)]


def test_quantize_int6_layout_and_error():
    w = torch.randn(9, 96) * torch.logspace(-3, 1, 9)[:, None]   # rows of very different size
    w[4] = 0.0                                                    # a zero row
    q, h, d = quantize_int6(w)
    assert (q.shape, h.shape, d.shape) == ((9, 48), (9, 24), (9, 3))
    assert q.dtype == h.dtype == torch.uint8 and d.dtype == torch.float16
    n = int6_values(q, h)                                        # (9, 3, 32) in 0..63
    assert int(n.max()) <= 63 and torch.equal(n & 15, int4_values(q))
    # h byte i of a block: q byte i's top bits in its low 4 bits, q byte i + 8's in the high
    # ones; each 4-bit field: the low-nibble column's top 2 bits, then the high-nibble one's
    top = n >> 4
    field = top[..., :16] | (top[..., 16:] << 2)
    assert torch.equal(h.reshape(9, 3, 8), field[..., :8] | (field[..., 8:] << 4))
    back = dequantize_int6(q, h, d)
    step = d.float().abs().repeat_interleave(BLOCK, dim=1)
    assert ((back - w).abs() <= step * 1.001 + 1e-7).all()        # at most one step
    inside = w.abs() < step * 31                                  # off the clamped edge
    assert ((back - w).abs()[inside] <= step[inside] / 2 * 1.001 + 1e-7).all()
    # each block's largest |w| is a code of its own: n = 0, exact up to fp16's d
    big = w.reshape(9, 3, 32).abs().argmax(dim=2)
    assert (n.gather(2, big[..., None]) == 0)[d != 0].all()
    assert torch.equal(back[4], torch.zeros(96))


def int8_blocks(x: torch.Tensor) -> torch.Tensor:
    """x (T, in) rounded as the decode kernels round it: int8 per block of 32 columns, the
    step the block's largest |x| / 127, to nearest even."""
    b = x.reshape(x.shape[0], -1, BLOCK)
    s = b.abs().amax(dim=2, keepdim=True) / 127
    s = torch.where(s > 0, s, torch.ones_like(s))
    return (torch.round(b * (1 / s)) * s).reshape(x.shape)


@pytest.mark.parametrize("T,n_in,n_out", SHAPES)
def test_int6_kernel_matches_dequantized_product(T, n_in, n_out):
    """The product with int16 activations (prompt rows, logits, plain rows) against the
    dequantized matrix; tiles give plain rows' numbers bit for bit, and a row of x gets the
    same numbers whatever rows come with it. Where the build has the int8 kernel
    (kernels.int6_decode_int8), the decode rows of a tiled matrix are the dequantized
    matrix times x rounded to int8 per block, up to float rounding, the same numbers in its
    tiles and after them."""
    g = torch.Generator().manual_seed(n_in + T)
    x = torch.randn(T, n_in, generator=g)
    x[:, 3] = 40.0   # an outlier column
    q, h, d = quantize_int6(torch.randn(n_out, n_in, generator=g) + 0.3)
    w = dequantize_int6(q, h, d)
    assert torch.equal(kernels.dequantize(q, d, None, hi=h), w)
    assert torch.equal(kernels.dequantize(q, d, None, torch.bfloat16, hi=h), w.bfloat16())
    expect = x.double() @ w.double().T
    plain = kernels.matvec(x, q, d, None, wide=True, hi=h)
    assert ((plain.double() - expect).abs().max() / expect.abs().max()).item() < 2e-4
    qt, dt, ht = q.clone(), d.clone(), h.clone()
    tile = kernels.tile_i4(qt, dt, None, ht)
    assert tile == kernels.weight_tile()
    full = n_out // tile * tile if tile else 0
    if full:
        assert not torch.equal(ht[:full], h[:full])   # the top bits were tiled too
    tiled = Weight(qt, dt, None, None, tile, ht)
    assert tiled.kind == "int6" and torch.equal(tiled.dequantized(), w)
    assert torch.equal(tiled.rows(torch.tensor([0, n_out - 1, n_out // 2])),
                       w[[0, n_out - 1, n_out // 2]])
    got = tiled(x, decode=True)
    assert torch.equal(tiled(x, logits=True), plain)
    if kernels.int6_decode_int8():   # every row with int8 activations
        expect8 = int8_blocks(x).double() @ w.double().T
        err = ((got.double() - expect8).abs().max() / expect8.abs().max()).item()
        assert err < 2e-6, err
        # the outlier's block rounds the others to steps of 40 / 127: far off int16's
        assert ((got.double() - expect).abs().max() / expect.abs().max()).item() < 2e-2
        # rows get the same numbers in a tile and out of one: the last rows of the matrix
        # (the last tile's and those after it) on their own, too few to tile
        if full:
            rest = slice(full - 1, n_out)
            last = Weight(q[rest].clone(), d[rest].clone(), None, None, 0, h[rest].clone())
            assert torch.equal(last(x, decode=True), got[:, rest])
    else:
        assert torch.equal(got, plain)
    for T0 in range(1, T):
        assert torch.equal(tiled(x[T0:T0 + 1], decode=True), got[T0:T0 + 1])
        assert torch.equal(kernels.matvec(x[T0:], q, d, None, wide=True, hi=h), plain[T0:])


def test_int4_shards_store_the_vocabulary_in_int6(tmp_path, models):
    """A float checkpoint split to int4: layers int4, the vocabulary int6 (embed + .scale +
    .hi), unless --vocab-dtype says otherwise; the numbers are quantize_int6's."""
    from mpitpi.checkpoint import open_checkpoint
    from mpitpi.shards import write_shards
    assert storage_for("vocab/embed", 64, "int4") == "int6"
    assert storage_for("vocab/embed", 48, "int4") == "int8"   # not whole blocks
    assert storage_for("vocab/embed", 64, "int4", "int8") == "int8"
    ckpt = open_checkpoint(models("llama-gqa")[0])
    write_shards(ckpt, str(tmp_path / "s"), 2, None, "int4", progress=False)
    man = json.load(open(tmp_path / "s" / "manifest.json"))
    with h5py.File(tmp_path / "s" / "rank1.h5") as f:
        assert f["vocab/embed"].dtype == np.uint8 and "vocab/embed.min" not in f
        assert f["vocab/embed.hi"].shape == (f["vocab/embed"].shape[0],
                                             f["vocab/embed"].shape[1] // 2)
        assert f["layers/0/w13"].dtype == np.uint8 and "layers/0/w13.min" in f
        stored = {k: torch.from_numpy(f["vocab/" + k][()]) for k in ("embed", "embed.scale",
                                                                     "embed.hi")}
    s = man["plan"][1]["vocab"]
    rows = ckpt.rows("model.embed_tokens.weight", s[0], s[1])
    expect = quantized(rows, "int6")
    got = Weight.from_stored(stored, "embed")
    assert got.kind == "int6" and torch.equal(got.dequantized(), expect.dequantized())


def test_smollm2_perplexity_with_an_int6_vocabulary():
    """SmolLM2's int4 shards with its Q8_0 embedding requantized to int6: perplexity within
    1% of the file's own int8 blocks (measured: +0.4%), and a greedy answer still right."""
    def ppl(*extra):
        r = run_mpi(2, ["perplexity", "--model", "smollm2-135m", "--max-windows", "4",
                        "--json", *extra], timeout=600)
        assert r.returncode == 0, r.stderr
        return json.loads(r.stdout)["perplexity"]
    base, six = ppl(), ppl("--vocab-dtype", "int6")
    assert six != base and abs(six / base - 1) < 0.01, (base, six)
