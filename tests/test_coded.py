"""Coded int4 tiles: quantize_int4 writes each row's scales and offsets as 8-bit codes times
a step of the row, so that the tiles can hold a byte per value instead of fp16 (a tenth
fewer bytes per product). With int16 activations (prompt rows, logits) they compute the very
numbers of fp16 tiles; with int8 ones (decode) the codes multiply the integer sums and the
steps the finished rows, so the numbers differ from fp16 tiles' by float rounding alone.
Also: a row-parallel
matrix quantized in column slices with the whole rows' steps equals the whole one's slices
(a split quantizes alike on any number of ranks)."""
import pytest
import torch

from mpitpi import choices, kernels, quant, weights
from mpitpi.checkpoint import open_checkpoint
from mpitpi.shards import write_shards
from mpitpi.quant import code_step, dequantize_int4, int4_steps, quantize_int4
from mpitpi.weights import Weight

def test_code_steps_are_exact_in_fp16():
    x = torch.tensor([0.0, 1e-12, 3e-7, 3e-5, 0.01, 0.0123, 0.3, 1.0, 7.5])
    s = code_step(x)
    assert (s >= x).all() and (s >= 2.0 ** -22).all()
    f, _ = torch.frexp(s)   # F 2^e with F in 4..7: the significand is 0.5, .625, .75, .875
    assert set((f * 8).tolist()) <= {4.0, 5.0, 6.0, 7.0}
    # the least such step: the one below is under x (where x is above the smallest)
    below = torch.where(f * 8 == 4, s * 7 / 8, s * (f * 8 - 1) / (f * 8))
    assert ((below < x) | (s == 2.0 ** -22)).all()
    codes = torch.arange(-128, 256, dtype=torch.float32)
    for step in s.tolist():
        v = codes * step
        assert torch.equal(v.half().float(), v)   # every code times step is an fp16 value


def test_column_slices_with_the_rows_steps_equal_the_whole():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(40, 320, generator=g) * torch.logspace(-2, 0, 40)[:, None]
    q, d, m = quantize_int4(w)
    steps = int4_steps(w)
    for c0, c1 in ((0, 64), (64, 192), (96, 320)):
        qs, ds, ms = quantize_int4(w[:, c0:c1].contiguous(), steps)
        assert torch.equal(qs, q[:, c0 // 2:c1 // 2])
        assert torch.equal(ds, d[:, c0 // 32:c1 // 32]) and torch.equal(ms, m[:, c0 // 32:c1 // 32])


def pair(n_out, n_in, seed=0):
    """The same int4 matrix twice: tiled as the model tiles it (coded) and in fp16 tiles."""
    g = torch.Generator().manual_seed(seed)
    q, d, m = quantize_int4(torch.randn(n_out, n_in, generator=g) * 0.05 + 0.01)
    coded = Weight(q.clone(), d.clone(), None, m.clone())
    coded.tile_rows()
    plain = Weight(q.clone(), d.clone(), None, m.clone())
    plain.tile = kernels.tile_i4(plain.data, plain.scale, plain.min)
    return coded, plain, dequantize_int4(q, d, m)


# rows: whole tiles, whole tiles and some rows after them, fewer rows than a tile; rows of
# fewer than 4 blocks (no room for the steps in the offsets' rows: fp16 tiles)
@pytest.mark.parametrize("n_out, n_in", [(64, 288), (75, 576), (37, 2048), (5, 96), (32, 96)])
def test_coded_tiles_give_the_numbers_of_fp16_tiles(n_out, n_in, monkeypatch):
    coded, plain, ref = pair(n_out, n_in)
    tile = kernels.weight_tile()   # 0: a build without tiles (plain C) keeps plain rows
    full = n_out // tile * tile if tile else 0
    if full and n_in >= 128:
        assert coded.steps is not None and coded.steps.shape == (n_out // tile, 2 * tile)
        # kept: the steps and the offsets of the rows after the tiles; the rest let go
        assert coded.min.shape == (n_out - full, n_in // 32)
        assert coded.nbytes == plain.nbytes - full * (n_in // 32) * 2 + coded.steps.numel() * 4
        assert coded.c.steps == coded.steps.data_ptr()
    else:
        assert coded.steps is None
    assert torch.equal(coded.dequantized(), ref)
    index = torch.tensor([0, n_out - 1, n_out // 2, 0])
    assert torch.equal(coded.rows(index), ref[index])
    g = torch.Generator().manual_seed(1)
    for T in (1, 3, 9):
        x = torch.randn(T, n_in, generator=g)
        for wide in (False, True):
            a = kernels.matvec(x, coded.data, coded.scale, coded.min, wide, coded.tile,
                               steps=coded.steps)
            b = kernels.matvec(x, plain.data, plain.scale, plain.min, wide, plain.tile)
            if wide or coded.steps is None:
                assert torch.equal(a, b), (T, wide)
            else:   # rounding only: a wrong code or step would be far off
                err = ((a - b).abs().max() / b.abs().max()).item()
                assert err < 2e-6, (T, err)
                assert torch.equal(a[:, full:], b[:, full:])   # the rows after the tiles
    # the prompt path through torch's product: two tiles of rows dequantized at a time
    x = torch.randn(max(65, choices.host().kernel_rows("int4") + 1), n_in, generator=g)
    monkeypatch.setattr(weights, "DEQUANT_AT_ONCE", 2 * max(tile, 1) * n_in)
    assert torch.equal(coded(x), plain(x))


def test_gguf_scales_keep_fp16_tiles():
    """Scales that are no codes (a GGUF file's Q4_1 blocks: any fp16) keep fp16 tiles."""
    g = torch.Generator().manual_seed(2)
    q, d, m = quantize_int4(torch.randn(32, 256, generator=g))
    d = d * torch.tensor(1.0 + 1e-3).half()   # off the codes' grid
    w = Weight(q.clone(), d.clone(), None, m.clone())
    w.tile_rows()
    assert w.tile == kernels.weight_tile() and w.steps is None and w.min.shape == m.shape
    assert torch.equal(w.dequantized(), dequantize_int4(q, d, m))


def test_quantize_int4_rows_at_a_time_equal_the_whole(monkeypatch):
    w = torch.randn(50, 128) * 0.1
    whole = quantize_int4(w)
    monkeypatch.setattr(quant, "ROWS_AT_ONCE", 3 * 128)
    for a, b in zip(whole, quantize_int4(w)):
        assert torch.equal(a, b)
    for a, b in zip(whole, quantize_int4(w, int4_steps(w))):
        assert torch.equal(a, b)


def test_a_refilled_buffer_is_tiled_again_in_fp16():
    """The layer prefetcher reads layer after layer into the same buffers and tiles them
    again (``coded=False``: fp16 tiles, cheaper to make every token); each time the fused
    step's view of the weight (Weight.c, made once) and the products follow the new numbers."""
    g = torch.Generator().manual_seed(3)
    layers = [quantize_int4(torch.randn(48, 256, generator=g) * 0.1) for _ in range(3)]
    w = Weight(*(torch.empty_like(t) for t in layers[0][:2]), None,
               torch.empty_like(layers[0][2]))
    x = torch.randn(2, 256, generator=g)
    pointers = None
    for q, d, m in layers:
        w.data.copy_(q), w.scale.copy_(d), w.min.copy_(m)
        w.tile_rows(coded=False)
        assert w.steps is None and w.tile == kernels.weight_tile()
        c = w.c
        assert pointers in (None, (c.data, c.scale, c.min))
        pointers = (c.data, c.scale, c.min)
        ref = x @ dequantize_int4(q, d, m).T
        assert torch.allclose(w(x, decode=True), ref, rtol=0.05, atol=0.05)
        assert torch.equal(w.dequantized(), dequantize_int4(q, d, m))


def test_the_fused_step_gives_coded_tiles_the_numbers_of_fp16_tiles(models, tmp_path,
                                                                     monkeypatch):
    """A model in int4 on 3 ranks (rows after the last tile in wqkv), decoded through the
    fused C step: the logits with coded tiles equal those with fp16 tiles up to float
    rounding, and the tokens are the same. The decode products take other float steps, and
    a rounding that moves an activation across an int8 step of the next product carries on
    through the layers: 2e-5 of the largest logit on AVX-512, 1.4e-3 on AVX2 (a wrong code or
    step would be off by its whole size)."""
    from test_house import run_ranks
    folder, _ = models("llama-coded")
    write_shards(open_checkpoint(folder), str(tmp_path / "s"), 3, None, "int4",
                 progress=False)
    steps = [torch.tensor([1, 17, 42, 5, 99])] + [torch.tensor([t]) for t in (31, 12, 77)]
    starts = [0, 5, 6, 7]
    coded = run_ranks(str(tmp_path / "s"), 3, steps, starts, fused=True)
    monkeypatch.setattr(kernels, "tile_i4_coded",
                        lambda q, s, m: (kernels.tile_i4(q, s, m), None))
    plain = run_ranks(str(tmp_path / "s"), 3, steps, starts, fused=True)
    for a, b in zip(coded, plain):
        assert ((a - b).abs().max() / b.abs().max()).item() < 1e-2
        assert torch.equal(a.argmax(-1), b.argmax(-1))


def test_the_roofline_counts_resident_coded_layers_as_they_lie_in_memory(models, tmp_path):
    """bench.weight_bytes: resident int4 layers in coded tiles read fewer bytes than their
    shard holds (the tiled offsets are let go); streamed ones (fp16 tiles) as stored."""
    from mpitpi.bench import weight_bytes
    from mpitpi.loader import open_rank
    from mpitpi.model import Transformer
    folder, _ = models("llama-coded")
    write_shards(open_checkpoint(folder), str(tmp_path / "s"), 1, None, "int4",
                 progress=False)
    sizes = {}
    for window in (None, 1):
        args, plan, top, layers = open_rank(str(tmp_path / "s"), 0, 1, None, window=window)
        model = Transformer(args, plan, 0, top, layers)
        sizes[window] = weight_bytes(model)
        stored = layers.layer_nbytes * len(layers) + top.lm_head.nbytes
        layers.close()
    assert sizes[1] == stored   # streamed: as stored
    coded = kernels.weight_tile() > 0
    assert (sizes[None] < stored) == coded and (sizes[None] == stored) == (not coded)
