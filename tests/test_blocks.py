"""Quantizing and widening int8/int4 matrices a block of rows at a time (to bound memory at
405B widths) gives exactly the numbers of doing it whole."""
import pytest
import torch
import torch.nn.functional as F

from mpitpi import quant, weights


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


@pytest.mark.parametrize("dtype", ["int8", "int4"])
def test_long_input_product_by_blocks_is_exact(monkeypatch, dtype):
    w = weights.quantized(torch.randn(70, 64), dtype)
    x = torch.randn(40, 64)
    whole = w._dequantized_product(x)   # the product of inputs past the C kernels' rows
    assert torch.allclose(whole, F.linear(x, w.dequantized()), rtol=1e-5, atol=1e-5)
    monkeypatch.setattr(weights, "DEQUANT_AT_ONCE", 64 * 16)   # 16 rows at a time
    by_blocks = w._dequantized_product(x)
    assert torch.allclose(by_blocks, whole, rtol=1e-5, atol=1e-5)
    assert torch.equal(by_blocks[:, 16:32], F.linear(x, w.dequantized()[16:32]))
