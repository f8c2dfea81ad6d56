"""int4 decode rows read as two streams per thread (csrc/decode.c's rows_pair: each thread's
part of a product as its two halves side by side) give the numbers of one stream, bit for bit:
coded tiles and fp16 ones (a GGUF file's), rows past the last tile, one rank and several."""
import pytest
import torch

from mpitpi import kernels
from mpitpi.checkpoint import open_checkpoint
from mpitpi.shards import write_shards

from test_house import run_ranks

pytestmark = pytest.mark.skipif(not kernels.available(), reason="the C kernels are not built")


@pytest.mark.parametrize("tiles", ["coded", "fp16"])
@pytest.mark.parametrize("name,n", [("llama-coded", 1), ("llama-coded", 3), ("llama-odd", 2),
                                    ("llama-wide", 1)])
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
