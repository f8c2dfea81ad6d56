"""Quantizing and widening int8/int4 matrices a block of rows at a time (to bound memory at
405B widths) gives exactly the numbers of doing it whole."""
import pytest
import torch
import torch.nn.functional as F

from mpitpi import choices, kernels, quant, weights


@pytest.mark.parametrize("n_in", [96, 100, 576])
def test_quantize_by_blocks_is_exact(monkeypatch, n_in):
    w = torch.randn(37, n_in).bfloat16()
    monkeypatch.setattr(quant, "ROWS_AT_ONCE", 1 << 30)
    whole = [quant.quantize_int8(w), quant.quantize_int8(w, 32)]
    if n_in % 32 == 0:
        whole.append(quant.quantize_int4(w))
    monkeypatch.setattr(quant, "ROWS_AT_ONCE", 5 * n_in)   # 5 rows at a time, 8 blocks
    blocks = [quant.quantize_int8(w), quant.quantize_int8(w, 32)]
    if n_in % 32 == 0:
        blocks.append(quant.quantize_int4(w))
    for a, b in zip(whole, blocks):
        assert all(torch.equal(x, y) for x, y in zip(a, b))


@pytest.mark.parametrize("pre", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("dtype", ["int8", "int4"])
def test_long_input_product_by_blocks_is_exact(monkeypatch, dtype, pre):
    """Prompt rows past the C kernels multiply a copy dequantized to the host's prefill
    dtype (choices.py; both here), a block of rows at a time."""
    w = weights.quantized(torch.randn(70, 64), dtype)
    x = torch.randn(40, 64)
    whole = w._dequantized_product(x, pre)   # the product of inputs past the C kernels' rows
    assert whole.dtype == torch.float32
    ref = F.linear(x, w.dequantized())   # bf16 rounds x, the copy and the result: 2^-9 each
    err = float((whole - ref).abs().max() / ref.abs().max())
    assert err < (1e-6 if pre == torch.float32 else 1e-2), err
    monkeypatch.setattr(weights, "DEQUANT_AT_ONCE", 64 * 16)   # 16 rows at a time
    by_blocks = w._dequantized_product(x, pre)
    assert torch.allclose(by_blocks, whole, rtol=1e-5, atol=1e-5)
    assert torch.equal(by_blocks[:, 16:32],
                       F.linear(x.to(pre), w.dequantized()[16:32].to(pre)).float())


def _bf16_rounded(y: torch.Tensor) -> bool:
    return not bool((y.view(torch.int32) & 0xFFFF).any())   # bf16 keeps the top 16 bits


@pytest.mark.parametrize("dtype", ["fp16", "bf16", "int8", "int4"])
@pytest.mark.parametrize("with_kernels", [True, False])
def test_logits_are_never_rounded_to_bf16(monkeypatch, dtype, with_kernels):
    """Where prompt rows multiply in bf16 (a host with bf16 instructions: forced here), the
    vocabulary product (logits=True) still gives fp32 results: rounded to bf16, SmolLM2's
    first answer token tied with the second (docs/BENCHMARKS.md)."""
    if with_kernels and not kernels.available():
        pytest.skip("no C compiler")
    if not with_kernels:
        monkeypatch.setattr(kernels, "available", lambda: False)
    c = choices.host()
    monkeypatch.setitem(c.max_t, dtype, 0)
    monkeypatch.setitem(c.prefill, dtype, "bf16")
    monkeypatch.setitem(c.pad, dtype, 1)
    w = weights.quantized(torch.randn(96, 64), dtype)
    x = torch.randn(6, 64)
    assert _bf16_rounded(w(x))                      # the layers' prompt product: bf16
    logits = w(x, logits=True)
    assert not _bf16_rounded(logits)
    ref = F.linear(x.double(), w.dequantized().double())
    # the C kernels' own roundings: int8 x to int16 per group; bf16 weights x to bf16 where
    # the CPU multiplies bf16 pairs (kernels.bf16_rounds_x)
    tol = 1e-2 if dtype == "bf16" and with_kernels and kernels.bf16_rounds_x() else 1e-4
    assert float((logits - ref).abs().max() / ref.abs().max()) < tol
