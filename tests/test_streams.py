"""int4 decode rows read as two streams per thread (csrc/decode.c's rows_pair: each thread's
part of a product as its two halves side by side; matvec.c's vocabulary product: the matrix's
two halves) give the numbers of one stream, bit for bit: coded tiles and fp16 ones (a GGUF
file's), int6, rows past the last tile, an odd count of tiles, biases (qwen2), one rank and
several."""
import pytest
import torch

from mpitpi import kernels
from mpitpi.checkpoint import open_checkpoint
from mpitpi.shards import write_shards
from mpitpi.weights import quantized

from test_house import run_ranks

pytestmark = pytest.mark.skipif(not kernels.available(), reason="the C kernels are not built")


@pytest.mark.parametrize("tiles", ["coded", "fp16"])
@pytest.mark.parametrize("name,n", [("llama-coded", 1), ("llama-coded", 3), ("llama-odd", 2),
                                    ("llama-wide", 1), ("qwen2", 1)])
def test_two_streams_give_the_numbers_of_one(models, tmp_path, monkeypatch, name, n, tiles):
    folder, _ = models(name)
    write_shards(open_checkpoint(folder), str(tmp_path / "s"), n, None, "int4",
                 progress=False)
    if tiles == "fp16":   # as a GGUF file's int4: fp16 scales and offsets in the tiles
        monkeypatch.setattr(kernels, "tile_i4_coded",
                            lambda q, s, m: (kernels.tile_i4(q, s, m), None))
    steps = [torch.tensor([1, 17, 42, 5, 99])] + [torch.tensor([t]) for t in (31, 12, 77)]
    starts = [0, 5, 6, 7]
    got = {}
    try:
        for streams in (1, 2):
            kernels.set_streams(streams)
            got[streams] = run_ranks(str(tmp_path / "s"), n, steps, starts, fused=True)
    finally:
        kernels.set_streams(2)
    for a, b in zip(got[1], got[2]):
        assert torch.equal(a, b)


def test_a_wrong_stream_count_is_refused():
    with pytest.raises(ValueError, match="1 or 2"):
        kernels.set_streams(3)


@pytest.mark.parametrize("dtype", ["int4", "int6"])
@pytest.mark.parametrize("rows", [16, 48, 96, 100, 161])
def test_the_vocabulary_product_in_two_streams_gives_the_numbers_of_one(dtype, rows):
    g = torch.Generator().manual_seed(rows)
    w = quantized(torch.randn(rows, 256, generator=g) * 0.05, dtype)
    w.tile_rows()
    plain = quantized(torch.randn(rows, 256, generator=g) * 0.05, dtype) if dtype == "int4" \
        else None
    if plain is not None:   # fp16 tiles (a GGUF file's int4)
        plain.tile_rows(coded=False)
    x = torch.randn(1, 256, generator=g)
    try:
        for m in (w, plain):
            if m is None:
                continue
            got = []
            for streams in (1, 2):
                kernels.set_streams(streams)
                got.append(m(x, decode=True, logits=True))
            assert torch.equal(got[0], got[1])
            ref = x @ m.dequantized().T
            assert torch.allclose(got[1], ref, rtol=0.05, atol=0.05)
    finally:
        kernels.set_streams(2)
