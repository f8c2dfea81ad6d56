"""int4 weights: the block layout, GGUF blocks carried over exactly, the C product against the
dequantized one, and int4 models against fp32 (tiny random models and SmolLM2)."""
import json

import numpy as np
import pytest
import torch

from conftest import run_mpi
from mpitpi import gguf_blocks, kernels
from mpitpi.checkpoint import open_checkpoint, resolve_model
from mpitpi.quant import (BLOCK, code_step, dequantize_int4, dequantize_int8, int4_values,
                          quantize_int4, quantize_int8)
from mpitpi.shards import write_shards
from mpitpi.tokenizer import chat_messages, load_tokenizer
from mpitpi.weights import Weight, stored_arrays
from test_house import run_ranks

PROMPT = [1, 17, 42, 99, 7, 230, 5]
# (T, in, out): one and several rows, widths of one block up to past 4096 columns
SHAPES = [(1, 32, 5), (3, 96, 33), (1, 576, 1728), (4, 1536, 65), (2, 4352, 11), (1, 288, 64)]


def test_quantize_int4_layout_and_error():
    w = torch.randn(9, 96) * torch.logspace(-3, 1, 9)[:, None]   # rows of very different size
    w[4] = 0.5                                                    # a constant row
    w[5] = 0.0                                                    # a zero row
    q, d, m = quantize_int4(w)
    assert q.shape == (9, 48) and q.dtype == torch.uint8
    assert d.shape == m.shape == (9, 3) and d.dtype == m.dtype == torch.float16
    n = int4_values(q)
    # byte j of a block: column j in the low nibble, column j + 16 in the high one
    assert torch.equal(n[:, 0, :16], q[:, :16] & 15) and torch.equal(n[:, 0, 16:], q[:, :16] >> 4)
    back = dequantize_int4(q, d, m)
    # coded rows: each scale an unsigned 8-bit code times a step of its row, each offset a
    # signed one, the steps F 2^e (F 4..7) so that code times step is an fp16 value
    D = code_step(d.float().amax(dim=1, keepdim=True) / 255)
    M = code_step(m.float().abs().amax(dim=1, keepdim=True) / 128)
    for v, step, lo, hi in ((d.float(), D, 0, 255), (m.float(), M, -128, 127)):
        c = v / step
        # the row's step is the first at or above the largest code's share, or the one after
        c = torch.where((c == c.round()).all(dim=1, keepdim=True), c, v / code_step(step * 1.01))
        assert torch.equal(c, c.round()) and c.min() >= lo and c.max() <= hi
    # half a step, or a block's top clipped by at most half a code of its scale (15 D / 2):
    # the quantizer keeps whichever codes give the block the smaller squared error
    step = d.float().repeat_interleave(BLOCK, dim=1)
    assert ((back - w).abs() <= step / 2 + 7.5 * D + 1e-7).all()
    rms = (back - w).square().mean(dim=1).sqrt()
    assert (rms <= 0.3 * d.float().amax(dim=1) + 1e-7).all()
    assert (back[4] - 0.5).abs().max() < 0.5 * 2 ** -6 and torch.equal(back[5], torch.zeros(96))
    assert int(n.max()) == 15 and int(n.min()) == 0


@pytest.mark.parametrize("kind", ["Q4_0", "Q4_1", "Q8_0"])
def test_gguf_blocks_carry_over_exactly(kind):
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize, quantize
    w = np.random.default_rng(1).standard_normal((6, 256)).astype(np.float32) * 0.1
    raw = quantize(w, GGMLQuantizationType[kind])
    parts = [torch.from_numpy(p) for p in gguf_blocks.DECODE[kind](raw)]
    ours = (dequantize_int4 if len(parts) == 3 else dequantize_int8)(*parts)
    assert np.array_equal(ours.numpy(), dequantize(raw, GGMLQuantizationType[kind]))


def test_q4_k_becomes_int4_up_to_fp16_scales():
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize
    rng = np.random.default_rng(2)
    raw = rng.integers(0, 256, (4, 3 * 144), dtype=np.uint8)   # any scales, mins, nibbles
    blocks = raw.reshape(4, 3, 144)
    blocks[..., 0:2] = np.float16(0.02).reshape(1, 1, 1).view(np.uint8).reshape(1, 1, 2)
    blocks[..., 2:4] = np.float16(0.005).reshape(1, 1, 1).view(np.uint8).reshape(1, 1, 2)
    q, d, m = (torch.from_numpy(p) for p in gguf_blocks.q4_k(raw))
    ref = torch.from_numpy(dequantize(raw, GGMLQuantizationType.Q4_K))
    ours = dequantize_int4(q, d, m)
    # each sub-block's scale d*sc and offset dmin*mn are rounded to fp16 (2^-11 relative)
    bound = (d.float().abs() * 15 + m.float().abs()).repeat_interleave(32, dim=1) * 2 ** -10
    assert ((ours - ref).abs() <= bound).all()


@pytest.mark.parametrize("T,n_in,n_out", SHAPES)
def test_int4_kernel_matches_dequantized_product(T, n_in, n_out):
    """The int8 activations of the int4 product cost at most 2% of the output's size (an
    outlier in a block coarsens the steps of the other 31 columns)."""
    g = torch.Generator().manual_seed(n_in + T)
    x = torch.randn(T, n_in, generator=g)
    x[:, 3] = 40.0   # an outlier column: each block's int8 steps follow its own max
    q, d, m = quantize_int4(torch.randn(n_out, n_in, generator=g) + 0.3)
    w = dequantize_int4(q, d, m)
    assert torch.equal(kernels.dequantize(q, d, m), w)
    assert torch.equal(kernels.dequantize(q, d, m, torch.bfloat16), w.bfloat16())   # prompts' copy
    expect = x.double() @ w.double().T
    got = kernels.matvec(x, q, d, m)
    rel = ((got.double() - expect).norm() / expect.norm()).item()
    assert rel < 2e-2, rel
    # int16 activations (prompt rows, logits): the outlier's block steps by 40 / 32767
    wide = kernels.matvec(x, q, d, m, wide=True)
    assert ((wide.double() - expect).abs().max() / expect.abs().max()).item() < 2e-4
    for T0 in range(1, T):   # a row's numbers do not depend on the rows beside it
        assert torch.equal(kernels.matvec(x[T0:], q, d, m, wide=True), wide[T0:])


@pytest.mark.parametrize("n_in,n_out", [(576, 37), (96, 16), (288, 64), (64, 5)])
def test_int4_tiles_give_every_row_the_numbers_of_plain_rows(n_in, n_out):
    """kernels.tile_i4 rearranges a matrix's full groups of 16 (AVX-512) or 8 (AVX2) rows in
    place where the build reads tiles, and leaves it as it is elsewhere. Read through its
    tiles, every row dequantizes to exactly the plain rows' numbers and gets the plain rows'
    int16-activation products bit for bit (exact integer sums, the same fused float steps);
    the int8-activation product differs from the plain one by float rounding only (float
    additions run in another order). A row of x gets the same numbers whatever rows come
    with it."""
    g = torch.Generator().manual_seed(n_in + n_out)
    q, d, m = quantize_int4(torch.randn(n_out, n_in, generator=g) + 0.2)
    qt, dt, mt = q.clone(), d.clone(), m.clone()
    tile = kernels.tile_i4(qt, dt, mt)
    assert tile == kernels.weight_tile() and tile in (0, 8, 16)   # none, AVX2, AVX-512
    full = n_out // tile * tile if tile else 0
    assert torch.equal(qt[full:], q[full:]) and torch.equal(dt[full:], d[full:])
    if full:
        assert not torch.equal(qt[:full], q[:full])   # rearranged, not copied
    w = dequantize_int4(q, d, m)
    assert torch.equal(kernels.dequantize(qt, dt, mt, tile=tile), w)
    assert torch.equal(kernels.dequantize(qt, dt, mt, torch.bfloat16, tile), w.bfloat16())
    tiled = Weight(qt, dt, None, mt, tile)
    assert torch.equal(tiled.dequantized(), w)
    assert torch.equal(tiled.rows(torch.tensor([0, n_out - 1])), w[[0, n_out - 1]])
    x = torch.randn(9, n_in, generator=g)
    wide = kernels.matvec(x, qt, dt, mt, wide=True, tile=tile)
    assert torch.equal(wide, kernels.matvec(x, q, d, m, wide=True))   # the same float steps
    plain, got = kernels.matvec(x, q, d, m), kernels.matvec(x, qt, dt, mt, tile=tile)
    assert ((got - plain).abs().max() / plain.abs().max()).item() < 1e-5
    for T in (1, 2, 5):
        assert torch.equal(kernels.matvec(x[:T], qt, dt, mt, tile=tile), got[:T])
        assert torch.equal(kernels.matvec(x[T:T + 1], qt, dt, mt, tile=tile), got[T:T + 1])
        assert torch.equal(kernels.matvec(x[T:], qt, dt, mt, wide=True, tile=tile), wide[T:])


def dequantized_copy(folder: str, out: str) -> None:
    """The shards in ``folder`` with every int8/int4 matrix written out in fp32: the same
    weights, for a reference that differs from them only in how products are computed."""
    import os
    import zlib

    import h5py
    man = json.load(open(os.path.join(folder, "manifest.json")))
    os.makedirs(out)
    for entry in man["files"]:
        sums = {}
        with h5py.File(os.path.join(folder, entry["file"])) as a, \
                h5py.File(os.path.join(out, entry["file"]), "w") as b:
            names = []
            a.visititems(lambda n, o: names.append(n) if isinstance(o, h5py.Dataset) else None)
            for n in names:
                if n.endswith((".scale", ".min", ".hi")):
                    continue
                stored = {n + s: torch.from_numpy(a[n + s][()])
                          for s in ("", ".scale", ".min", ".hi") if n + s in a}
                arr = Weight.from_stored(stored, n).dequantized().numpy().astype(np.float32)
                b.create_dataset(n, data=arr)
                sums[n] = zlib.crc32(arr)
        entry["checksums"] = sums
        entry["size"] = os.path.getsize(os.path.join(out, entry["file"]))
    man.update(dtype="fp32", int4_block=None)
    json.dump(man, open(os.path.join(out, "manifest.json"), "w"))


CASES = [("llama-gqa", 1, None), ("qwen2", 3, None), ("llama-odd", 3, [2, 1, 1]),
         ("llama-wide", 2, None), ("llama-mqa", 4, None)]


@pytest.mark.parametrize("name,n,ratios", CASES, ids=[f"{c[0]}-n{c[1]}" for c in CASES])
def test_int4_model_matches_fp32_on_the_same_weights(models, tmp_path, name, n, ratios):
    """int4 shards (int4 where whole blocks fit, int8 elsewhere) against fp32 shards of the
    numbers they hold, prompt then one-token steps through the fused C step: only the int8
    activations of the int4 products differ, so the logits stay within 6% of the largest and
    the top token agrees wherever the reference's lead over the second exceeds 2% of the
    largest logit (near-ties may flip with the order of a sum). (Against the unquantized
    model, 4 bits cost tiny random models 2-40% of their logits: measured in
    docs/BENCHMARKS.md, a fact about those models.)"""
    folder, _ = models(name)
    write_shards(open_checkpoint(folder), str(tmp_path / "q"), n, ratios, "int4",
                 progress=False)
    dequantized_copy(str(tmp_path / "q"), str(tmp_path / "f"))
    new = [31, 12, 77, 200, 4, 9, 150, 66]
    steps = [torch.tensor(PROMPT)] + [torch.tensor([t]) for t in new]
    starts = [0] + [len(PROMPT) + i for i in range(len(new))]
    ref = torch.stack(run_ranks(str(tmp_path / "f"), n, steps, starts, fused=True))
    got = torch.stack(run_ranks(str(tmp_path / "q"), n, steps, starts, fused=True))
    rel = float((got - ref).abs().max() / ref.abs().max())
    agree = float((got.argmax(-1) == ref.argmax(-1)).float().mean())
    top2 = ref.topk(2, -1).values
    clear = (top2[..., 0] - top2[..., 1]) > 0.02 * ref.abs().max()
    same = got.argmax(-1) == ref.argmax(-1)
    print(f"{name} N={n}: relative logit error {rel:.4f}, top-1 agreement {agree:.2f}, "
          f"{int(clear.sum())} of {clear.numel()} positions with a clear lead")
    assert rel < 0.06, rel
    assert bool(same[clear].all()), (same, clear)
    assert agree >= 0.7, agree


def test_int4_generate_across_ranks(models, tmp_path):
    """The CLI path: `generate --dtype int4` on 2 ranks, tokens equal to 1 rank's up to a
    near tie. int8 activations in decode (the layers, and an int6 vocabulary where the
    kernels have its int8 product) turn the last-bit differences of another split into
    rounding steps: where 1 rank's top two logits lie within 1% of the largest, the other
    split may take the second (README, limits)."""
    folder, _ = models("llama-wide")
    runs = []
    for n in (1, 2):
        r = run_mpi(n, ["generate", "--model", folder, "--dtype", "int4", "--prompt-ids",
                        ",".join(map(str, PROMPT)), "--max-tokens", "8", "--ignore-eos",
                        "--json"])
        assert r.returncode == 0, r.stderr
        runs.append(json.loads(r.stdout)["token_ids"])
    assert len(runs[0]) == len(runs[1]) == 8
    k = next((i for i in range(8) if runs[0][i] != runs[1][i]), 8)
    if k < 8:   # 1 rank's logits at the first difference, along its own tokens
        write_shards(open_checkpoint(folder), str(tmp_path / "s"), 1, None, "int4",
                     progress=False)
        steps = [torch.tensor(PROMPT)] + [torch.tensor([t]) for t in runs[0][:k]]
        starts = [0] + [len(PROMPT) + i for i in range(k)]
        last = run_ranks(str(tmp_path / "s"), 1, steps, starts, fused=True)[-1]
        logits = last.reshape(-1, last.shape[-1])[-1]                     # (vocab,)
        assert int(logits.argmax()) == runs[0][k]
        gap = float(logits[runs[0][k]] - logits[runs[1][k]])
        assert 0 <= gap < 0.01 * float(logits.abs().max()), (k, gap, runs)


def test_vocab_dtype_int4_stores_and_runs_the_vocabulary_in_int4(models, tmp_path):
    """--vocab-dtype int4: the embedding and lm_head in int4 blocks too (fewer bytes per
    token), computed like the other int4 matrices; the manifest says so and --shards with
    another --vocab-dtype is refused. A GGUF's int8 (Q8_0) embedding is requantized."""
    import h5py
    folder, _ = models("llama-wide")
    q = str(tmp_path / "q")
    write_shards(open_checkpoint(folder), q, 2, None, "int4", progress=False, vocab_dtype="int4")
    with h5py.File(f"{q}/rank1.h5") as f:
        assert f["vocab/embed"].dtype == np.uint8 and "vocab/embed.min" in f
    assert json.load(open(f"{q}/manifest.json"))["vocab_dtype"] == "int4"
    dequantized_copy(q, str(tmp_path / "f"))
    steps = [torch.tensor(PROMPT)] + [torch.tensor([t]) for t in (31, 12, 77)]
    starts = [0] + [len(PROMPT) + i for i in range(3)]
    ref = torch.stack(run_ranks(str(tmp_path / "f"), 2, steps, starts, fused=True))
    got = torch.stack(run_ranks(q, 2, steps, starts, fused=True))
    assert float((got - ref).abs().max() / ref.abs().max()) < 0.06
    r = run_mpi(1, ["generate", "--shards", q, "--vocab-dtype", "int8", "--prompt-ids", "1,2",
                    "--max-tokens", "2"], timeout=60)
    assert r.returncode == 2 and "--vocab-dtype int8" in r.stderr
    q8 = Weight(*quantize_int8(torch.randn(4, 64)))
    names = [n for n, _ in stored_arrays("vocab/embed", q8, "int4", "int4")]
    assert names == ["vocab/embed", "vocab/embed.scale", "vocab/embed.min"]
    assert [n for n, _ in stored_arrays("vocab/embed", q8, "int4")] == names[:2]


@pytest.fixture(scope="module")
def smollm2_shards(tmp_path_factory):
    """SmolLM2 (Q4_1 GGUF) split for 2 ranks in int4 and in fp32."""
    path = resolve_model("smollm2-135m")
    out = {}
    for dtype in ("int4", "fp32"):
        out[dtype] = str(tmp_path_factory.mktemp(dtype) / "s")
        write_shards(open_checkpoint(path), out[dtype], 2, None, dtype, progress=False)
    return path, out


def test_gguf_q4_1_split_to_int4_holds_the_files_numbers(smollm2_shards):
    """Every matrix of the int4 shards dequantizes to exactly what the GGUF file holds (its
    Q4_1 layers as int4, its Q8_0 embedding as int8 with groups of 32)."""
    import h5py
    path, folders = smollm2_shards
    for r in range(2):
        with h5py.File(f"{folders['int4']}/rank{r}.h5") as a, \
                h5py.File(f"{folders['fp32']}/rank{r}.h5") as b:
            for name in ("layers/0/wqkv", "layers/0/wo", "layers/0/w13", "layers/29/w2",
                         "vocab/embed"):
                parts = [torch.from_numpy(a[name + s][()]) for s in ("", ".scale", ".min")
                         if name + s in a]
                got = (dequantize_int4 if len(parts) == 3 else dequantize_int8)(*parts)
                assert torch.equal(got, torch.from_numpy(b[name][()])), (r, name)
            assert a["layers/0/w2"].dtype == np.uint8 and a["vocab/embed"].dtype == np.int8


def test_int4_greedy_follows_fp32_on_smollm2(smollm2_shards):
    """Teacher-forced along fp32's own 64 greedy tokens, the int4 decode step (C kernels, int8
    activations) picks fp32's token at 90% of the positions or more, on each golden prompt."""
    path, folders = smollm2_shards
    tok = load_tokenizer(path)
    for question in ("What is the capital of France?", "How many days are in a week?",
                     "What color is the sky on a clear day?"):
        ids = tok.encode_chat(chat_messages(question))
        r = run_mpi(2, ["generate", "--shards", folders["fp32"], "--prompt-ids",
                        ",".join(map(str, ids)), "--max-tokens", "64", "--ignore-eos",
                        "--json"], timeout=300)
        assert r.returncode == 0, r.stderr
        ref = json.loads(r.stdout)["token_ids"]
        steps = [torch.tensor(ids)] + [torch.tensor([t]) for t in ref[:-1]]
        starts = [0] + [len(ids) + i for i in range(len(ref) - 1)]
        got = run_ranks(folders["int4"], 2, steps, starts, fused=True)
        picks = [int(logits.argmax()) for logits in got]   # each step: (vocab,) logits
        agree = np.mean([a == b for a, b in zip(picks, ref)])
        print(f"{question!r}: int4 agrees with fp32 at {agree:.2f} of 64 positions")
        assert agree >= 0.9, (agree, tok.decode(picks), tok.decode(ref))


def test_mixed_gguf_types_split_to_the_nearest_storage_at_least_as_precise(tmp_path):
    """A Q4_K_M-like mix (SmolLM2's Q4_1 file with layer 0's v_proj re-encoded as Q8_0, its
    down_proj as Q4_K and its up_proj as Q6_K): int4 shards keep Q4_K in int4 (scales rounded
    to fp16), store Q6_K and a q/k/v of mixed types in int8, and each matrix holds the file's
    numbers within those roundings."""
    import h5py
    from gguf import GGMLQuantizationType as Q
    from gguf.quants import dequantize, quantize

    from mpitpi.gguf_checkpoint import GGUFCheckpoint
    ckpt = GGUFCheckpoint(resolve_model("smollm2-135m"))
    rng = np.random.default_rng(3)

    def retype(name, kind, raw):
        ckpt.tensors[name] = ckpt.tensors[name]._replace(tensor_type=kind, data=raw)

    p = "model.layers.0."
    v = ckpt.rows(p + "self_attn.v_proj.weight", 0, 192).numpy()
    retype(p + "self_attn.v_proj.weight", Q.Q8_0, quantize(v, Q.Q8_0))
    down = rng.integers(0, 256, (576, 6 * 144), dtype=np.uint8)   # (576, 1536) in Q4_K
    down.reshape(576, 6, 144)[..., 0:4] = np.array([0.004, 0.001], np.float16).view(np.uint8)
    retype(p + "mlp.down_proj.weight", Q.Q4_K, down)
    up = quantize(ckpt.rows(p + "mlp.up_proj.weight", 0, 1536).numpy(), Q.Q5_0)
    retype(p + "mlp.up_proj.weight", Q.Q5_0, up)
    write_shards(ckpt, str(tmp_path / "s"), 2, None, "int4", progress=False)

    with h5py.File(tmp_path / "s" / "rank1.h5") as f:
        def stored(name):
            parts = [torch.from_numpy(f[name + s][()]) for s in ("", ".scale", ".min")
                     if name + s in f]
            return f[name].dtype, (dequantize_int4 if len(parts) == 3 else dequantize_int8)(*parts)
        kind, wqkv = stored("layers/0/wqkv")          # q, k Q4_1 + v Q8_0 -> int8
        assert kind == np.int8
        ref = torch.cat([ckpt.rows(p + "self_attn.q_proj.weight", 320, 576),
                         ckpt.rows(p + "self_attn.k_proj.weight", 64, 192),
                         ckpt.rows(p + "self_attn.v_proj.weight", 64, 192)])
        step = ref.abs().amax(dim=1, keepdim=True) / 127
        assert ((wqkv - ref).abs() <= step / 2 + 1e-6).all()
        kind, w2 = stored("layers/0/w2")              # Q4_K -> int4, fp16 scales
        assert kind == np.uint8
        full = torch.from_numpy(dequantize(down, Q.Q4_K))
        f0, f1 = 768, 1536
        assert (w2 - full[:, f0:f1]).abs().max() <= full.abs().max() * 2 ** -9
        kind, w13 = stored("layers/0/w13")            # Q4_1 gate + Q5_0 up -> int8
        assert kind == np.int8
        up_ref = torch.from_numpy(dequantize(up, Q.Q5_0))[f0:f1]
        err = (w13[768:] - up_ref).abs().max() / up_ref.abs().max()
        assert err <= 1 / 254 + 1e-6, err            # int8 in groups of 32: half a step


def test_gguf_default_dtype_follows_its_bits_and_is_remembered(tmp_path, monkeypatch):
    """The bundled Q4_1 file defaults to int4; the answer is kept per file fingerprint, so a
    later run does not parse the metadata again; a damaged memo is ignored."""
    from mpitpi import checkpoint
    from mpitpi.gguf_checkpoint import GGUFCheckpoint
    monkeypatch.setenv("MPITPI_CACHE", str(tmp_path))
    path = resolve_model("smollm2-135m")
    assert checkpoint.natural_dtype(path) == "int4"

    def parse(self):
        raise AssertionError("parsed again")
    monkeypatch.setattr(GGUFCheckpoint, "natural_dtype", parse)
    assert checkpoint.natural_dtype(path) == "int4"
    memo = tmp_path / "gguf-dtypes.json"
    memo.write_text('{"%s": "int3"}' % next(iter(json.loads(memo.read_text()))))
    with pytest.raises(AssertionError, match="parsed again"):
        checkpoint.natural_dtype(path)
