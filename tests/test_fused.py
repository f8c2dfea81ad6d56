"""The fused decode step (csrc/decode.c) against the torch path it replaces, for every storage
dtype, in one process (one thread per rank): same logits within rounding, same greedy tokens.
The fp32 case against transformers itself is in test_house.py."""
import pytest
import torch

from mpitpi import kernels
from mpitpi.checkpoint import open_checkpoint
from mpitpi.loader import open_rank
from mpitpi.model import Segment, Transformer
from mpitpi.shards import write_shards

from test_house import run_ranks

PROMPT = [1, 17, 42, 5, 99, 23, 7, 64, 11, 3, 150, 8]
NEW = [31, 12, 77, 200, 4]
CASES = [("llama-odd", 3, [2, 1, 1]), ("qwen2", 2, None), ("mistral", 3, None),
         ("llama-mqa", 4, None), ("llama-wide", 2, None)]
# largest |fused - torch| relative to the largest logit; the int8 kernel rounds activations to
# int16 per group in both paths, bf16/fp16 widen in registers in both: only summation order
# differs (int8: 2e-4, measured 1.3e-4 where the prompt rows take the fused step too, as they
# do where int8 prompt products take the C kernels, choices.py). int4 rounds decode
# activations to int8 per block in both, but a last-bit difference in the norm before it can
# move an activation by a whole 1/127 step, which 16 random layers amplify: 2e-2 (measured
# 8e-3). bf16 on CPUs with AVX512_BF16 rounds activations to bf16
# in both paths (kernels.bf16_rounds_x), with the same amplification: 2e-2 (measured 5e-3)
BOUND = {"fp32": 1e-5, "bf16": 2e-2 if kernels.bf16_rounds_x() else 1e-4, "fp16": 1e-4,
         "int8": 2e-4, "int4": 2e-2}


@pytest.mark.parametrize("dtype", list(BOUND))
@pytest.mark.parametrize("name,n,ratios", CASES, ids=[f"{c[0]}-n{c[1]}" for c in CASES])
def test_fused_decode_matches_the_torch_path(models, tmp_path, name, n, ratios, dtype):
    folder, _ = models(name)
    write_shards(open_checkpoint(folder), str(tmp_path / "s"), n, ratios, dtype,
                 progress=False)
    steps = [torch.tensor(PROMPT)] + [torch.tensor([t]) for t in NEW]
    starts = [0] + [len(PROMPT) + i for i in range(len(NEW))]
    ref = torch.stack(run_ranks(str(tmp_path / "s"), n, steps, starts))
    got = torch.stack(run_ranks(str(tmp_path / "s"), n, steps, starts, fused=True))
    rel = float((got - ref).abs().max() / ref.abs().max())
    assert rel < BOUND[dtype], rel
    assert torch.equal(got.argmax(-1), ref.argmax(-1))


@pytest.mark.parametrize("name,n,ratios", CASES, ids=[f"{c[0]}-n{c[1]}" for c in CASES])
def test_an_fp16_kv_cache_keeps_the_logits_of_an_fp32_one(models, tmp_path, name, n, ratios):
    """fp32 weights: the fused step over fp16 caches (C attention reading fp16 keys and
    values) against the torch path over fp32 ones: the only difference is each key and value
    rounded once to fp16 (2^-11 relative), so the logits stay within 2e-3 and the greedy
    tokens are the same."""
    folder, _ = models(name)
    write_shards(open_checkpoint(folder), str(tmp_path / "s"), n, ratios, "fp32",
                 progress=False)
    steps = [torch.tensor(PROMPT)] + [torch.tensor([t]) for t in NEW]
    starts = [0] + [len(PROMPT) + i for i in range(len(NEW))]
    ref = torch.stack(run_ranks(str(tmp_path / "s"), n, steps, starts))
    got = torch.stack(run_ranks(str(tmp_path / "s"), n, steps, starts, fused=True,
                                kv_dtype="fp16"))
    rel = float((got - ref).abs().max() / ref.abs().max())
    assert 0 < rel < 2e-3, rel
    assert torch.equal(got.argmax(-1), ref.argmax(-1))


def test_prompt_and_decode_rows_store_the_same_fp16_bits(models, tmp_path):
    """The torch path (prompt rows) and the C step (decode rows) write an fp16 cache the
    same way: clamped to +-65504, rounded to nearest even. Layer 0's keys and values come
    from the embeddings alone, so an fp16 cache must hold exactly the fp32 cache's numbers,
    rounded."""
    folder, _ = models("llama-gqa")
    write_shards(open_checkpoint(folder), str(tmp_path / "s"), 1, None, "fp32",
                 progress=False)
    caches = {}
    for kv in ("fp32", "fp16"):
        args, plan, top, layers = open_rank(str(tmp_path / "s"), 0, 1, None)
        model = Transformer(args, plan, 0, top, layers, kv_dtype=kv)
        model.fused = False                                        # the torch path
        model.forward_batch([Segment(0, 0, torch.tensor(PROMPT))])
        model.fused = True                                         # the C step
        for i, t in enumerate(NEW):
            model.forward_batch([Segment(0, len(PROMPT) + i, torch.tensor([t]), 1, False)])
        end = len(PROMPT) + len(NEW)
        caches[kv] = (model.cache_k[0][0][:, :end], model.cache_v[0][0][:, :end])
    for c32, c16 in zip(caches["fp32"], caches["fp16"]):
        assert c16.dtype == torch.float16
        assert torch.equal(c16, c32.clamp(-65504, 65504).half())


@pytest.mark.parametrize("dtype", ["fp32", "int8", "int4"])
@pytest.mark.parametrize("name", ["llama-odd", "qwen2", "llama-coded"])
def test_one_call_for_every_layer_gives_the_numbers_of_a_call_per_half(models, tmp_path,
                                                                       name, dtype):
    """One rank, every layer resident: the step runs all layers in one C call
    (fused_step.LayerStack); the logits are those of one call per layer half, bit for bit, in
    each decode step (batches of two rows too: the one call takes the rows' places per
    layer from the same table)."""
    folder, _ = models(name)
    write_shards(open_checkpoint(folder), str(tmp_path / "s"), 1, None, dtype,
                 progress=False)
    logits = {}
    for one_call in (True, False):
        args, plan, top, layers = open_rank(str(tmp_path / "s"), 0, 1, None)
        model = Transformer(args, plan, 0, top, layers)
        assert model.step is not None and model.step.add
        model.one_call = one_call
        model.forward_batch([Segment(0, 0, torch.tensor(PROMPT)),
                             Segment(1, 0, torch.tensor(PROMPT[:7]))])
        got = []
        for i, t in enumerate(NEW):
            got.append(model.forward_batch([
                Segment(0, len(PROMPT) + i, torch.tensor([t]), 1, False),
                Segment(1, 7 + i, torch.tensor([NEW[-1 - i]]), 1, False)]))
        assert (model._stack is not None) == one_call
        logits[one_call] = torch.stack(got)
    assert torch.equal(logits[True], logits[False])


@pytest.mark.parametrize("dtype", ["fp32", "bf16", "fp16", "int8", "int4"])
@pytest.mark.parametrize("name", ["llama-odd", "qwen2", "llama-coded"])
def test_the_whole_greedy_step_in_one_call_picks_the_tokens_of_the_logits(models, tmp_path,
                                                                           name, dtype):
    """One rank, every layer resident, greedy decode rows: Transformer.greedy_batch runs the
    lookup, the layers, the final norm, the vocabulary product and the argmax in one C call
    (fused_step.DecodeStep.token). Its logits are forward_batch's bit for bit and its tokens
    their argmax, for one row and for two rows of two sequences, each fed its own pick;
    embeddings looked up in C (tied, tiled, float) or in torch (plain quantized rows)."""
    folder, _ = models(name)
    write_shards(open_checkpoint(folder), str(tmp_path / "s"), 1, None, dtype,
                 progress=False)
    runs = []
    for whole in (True, False):
        args, plan, top, layers = open_rank(str(tmp_path / "s"), 0, 1, None)
        model = Transformer(args, plan, 0, top, layers)
        model.forward_batch([Segment(0, 0, torch.tensor(PROMPT)),
                             Segment(1, 0, torch.tensor(PROMPT[:7]))])
        picks, logits, last = [], [], [NEW[0], NEW[1]]
        for i in range(4):
            segs = [Segment(0, len(PROMPT) + i, torch.tensor([last[0]]), 1, False)]
            if i % 2:   # every other step, a second sequence's row beside it
                segs.append(Segment(1, 7 + i // 2, torch.tensor([last[1]]), 1, False))
            if whole:
                got = model.greedy_batch(segs)
                logits.append(model.step.calls[len(segs)][4][0].clone())
            else:
                out = model.forward_batch(segs)
                got = out.argmax(-1).tolist()
                logits.append(out)
            picks.append(got)
            last = got + last[len(got):]
        runs.append((picks, logits))
    (picks, logits), (ref_picks, ref_logits) = runs
    assert picks == ref_picks
    for a, b in zip(logits, ref_logits):
        assert torch.equal(a, b)


def test_the_whole_greedy_step_declines_what_it_does_not_run(models, tmp_path):
    """greedy_batch returns None, with nothing cached, for prompt rows and for rows whose
    logits are not all wanted; the caller runs forward_batch then."""
    folder, _ = models("llama-odd")
    write_shards(open_checkpoint(folder), str(tmp_path / "s"), 1, None, "int4",
                 progress=False)
    args, plan, top, layers = open_rank(str(tmp_path / "s"), 0, 1, None)
    model = Transformer(args, plan, 0, top, layers)
    assert model.greedy_batch([Segment(0, 0, torch.tensor(PROMPT))]) is None
    assert model.greedy_batch([Segment(0, 0, torch.tensor(PROMPT[:2]), 1, False)]) is None
    assert model.cached.get(0, []) == []
    model.one_call = False
    assert model.greedy_batch([Segment(0, 0, torch.tensor(PROMPT[:1]), 1, False)]) is None
