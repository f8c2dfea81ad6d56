"""Quantizing and widening int8/int4 matrices a block of rows at a time (to bound memory at
405B widths) gives exactly the numbers of doing it whole."""
import pytest
import torch
import torch.nn.functional as F

from mpitpi import choices, quant, weights


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
    dtype (choices.py; both forced here), a block of rows at a time."""
    w = weights.quantized(torch.randn(70, 64), dtype)
    c = choices.host()
    monkeypatch.setitem(c.prefill, dtype, "bf16" if pre == torch.bfloat16 else "fp32")
    assert c.prefill_dtype(w.data.dtype) == pre
    x = torch.randn(40, 64)
    whole = w._dequantized_product(x)   # the product of inputs past the C kernels' rows
    assert whole.dtype == torch.float32
    ref = F.linear(x, w.dequantized())   # bf16 rounds x, the copy and the result: 2^-9 each
    err = float((whole - ref).abs().max() / ref.abs().max())
    assert err < (1e-6 if pre == torch.float32 else 1e-2), err
    monkeypatch.setattr(weights, "DEQUANT_AT_ONCE", 64 * 16)   # 16 rows at a time
    by_blocks = w._dequantized_product(x)
    assert torch.allclose(by_blocks, whole, rtol=1e-5, atol=1e-5)
    assert torch.equal(by_blocks[:, 16:32],
                       F.linear(x.to(pre), w.dequantized()[16:32].to(pre)).float())
