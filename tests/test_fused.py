"""The fused decode step (csrc/decode.c) against the torch path it replaces, for every storage
dtype, in one process (one thread per rank): same logits within rounding, same greedy tokens.
The fp32 case against transformers itself is in test_house.py."""
import pytest
import torch

from mpitpi import kernels
from mpitpi.checkpoint import open_checkpoint
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
