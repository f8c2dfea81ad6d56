"""The aarch64 (NEON) paths of csrc/, cross-compiled with Debian's gcc-aarch64-linux-gnu and
run under qemu-user against torch on this host: correctness only (qemu says nothing about
speed). Built twice: ARMv8.2 with fp16 and dot-product instructions (the int4 product's sdot
path) and plain ARMv8 (NEON without them). Skips, naming the packages, where the cross
compiler or qemu is missing (.ci/run installs both)."""
import os
import shutil
import subprocess

import numpy as np
import pytest
import torch

from mpitpi.kernels import CSRC
from mpitpi.quant import (dequantize_int4, dequantize_int6, dequantize_int8, quantize_int4,
                          quantize_int6, quantize_int8)

CC, QEMU, SYSROOT = "aarch64-linux-gnu-gcc", "qemu-aarch64", "/usr/aarch64-linux-gnu"
HERE = os.path.dirname(os.path.abspath(__file__))
MARCHES = ["armv8.2-a+fp16+dotprod", "armv8-a"]
# (T, in, out): one and several rows, a short last int8 group, rows past 4096 columns
SHAPES = [(1, 64, 9), (3, 576, 40), (2, 4352, 7)]
KINDS = ["fp32", "bf16", "fp16", "int8", "int8-g32", "int4", "int4-wide", "int6"]


@pytest.fixture(scope="module", params=MARCHES)
def binary(request, tmp_path_factory):
    missing = [t for t in (CC, QEMU) if shutil.which(t) is None]
    if missing:
        pytest.skip(f"{' and '.join(missing)} not installed: apt-get install "
                    f"gcc-aarch64-linux-gnu qemu-user")
    out = str(tmp_path_factory.mktemp("neon") / "products")
    r = subprocess.run([CC, "-O3", f"-march={request.param}", "-ffast-math", "-fopenmp",
                        "-static", "-o", out, f"{HERE}/csrc/products.c",
                        f"{CSRC}/matvec.c", f"{CSRC}/decode.c", "-lm"],
                       capture_output=True, text=True)   # decode.c: it must build too
    assert r.returncode == 0, r.stderr[-2000:]
    return out


def weights(kind: str, w: torch.Tensor):
    """(header group, stored arrays, the matrix they hold in fp32)."""
    if kind in ("fp32", "bf16", "fp16"):
        t = w.to({"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[kind])
        raw = t.view(torch.int16) if kind != "fp32" else t
        return 0, [raw.numpy()], t.float()
    if kind.startswith("int8"):
        group = 32 if kind == "int8-g32" else 64
        q, s = quantize_int8(w, group)
        return group, [q.numpy(), s.numpy()], dequantize_int8(q, s)
    if kind == "int6":
        q, h, d = quantize_int6(w)
        return 0, [q.numpy(), h.numpy(), d.numpy()], dequantize_int6(q, h, d)
    q, d, m = quantize_int4(w)
    return 0, [q.numpy(), d.numpy(), m.numpy()], dequantize_int4(q, d, m)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("T,n_in,n_out", SHAPES)
def test_neon_products_match_torch(binary, tmp_path, kind, T, n_in, n_out):
    g = torch.Generator().manual_seed(n_in + T)
    x = torch.randn(T, n_in, generator=g)
    group, arrays, w = weights(kind, torch.randn(n_out, n_in, generator=g))
    code = {"fp32": 0, "bf16": 1, "fp16": 2, "int8": 3, "int8-g32": 3, "int4": 4,
            "int4-wide": 5, "int6": 6}[kind]
    with open(tmp_path / "in", "wb") as f:
        f.write(np.array([code, T, n_in, n_out, group], np.int64).tobytes())
        f.write(x.numpy().tobytes())
        for a in arrays:
            f.write(np.ascontiguousarray(a).tobytes())
    r = subprocess.run([QEMU, "-L", SYSROOT, binary, str(tmp_path / "in"),
                        str(tmp_path / "out")], capture_output=True, text=True, timeout=120,
                       env={**os.environ, "OMP_NUM_THREADS": "2"})
    assert r.returncode == 0, r.stderr
    got = torch.from_numpy(np.fromfile(tmp_path / "out", np.float32).reshape(T, n_out))
    expect = x.double() @ w.double().T
    rel = ((got.double() - expect).norm() / expect.norm()).item()
    # int4 rounds activations to int8 per block (wide: int16); int8 to int16 per group
    bound = {"int4": 2e-2, "int4-wide": 1e-4, "int6": 1e-4, "int8": 1e-4,
             "int8-g32": 1e-4}.get(kind, 1e-5)
    assert rel < bound, rel
