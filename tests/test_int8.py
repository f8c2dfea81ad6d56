"""The C decode kernels against torch, int8 quantisation, and int8 models against fp32."""
import json
import os
import sys

import numpy as np
import pytest
import torch

from conftest import run_cmd, run_mpi
from mpitpi import kernels
from mpitpi.quant import GROUP, dequantize_int8, quantize_int4, quantize_int8
from mpitpi.weights import Weight
from refmodels import logits_vs_reference

PROMPT = [1, 17, 42, 99, 7, 230, 5]
HERE = os.path.dirname(os.path.abspath(__file__))

# (T, in, out): one and several rows of x; rows shorter than a group, a short last group
# (and a last step of 1-31 columns in the float products), long rows with an odd number
# of output rows
SHAPES = [(1, 7, 5), (3, 100, 33), (1, 576, 1728), (4, 192, 65), (2, 4100, 11)]


def test_the_kernels_build_on_this_host():
    assert kernels.available(), kernels._why_not


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("T,n_in,n_out", SHAPES)
def test_float_kernels_match_torch(dtype, T, n_in, n_out):
    g = torch.Generator().manual_seed(n_in * 7 + T)
    x = torch.randn(T, n_in, generator=g)
    w = torch.randn(n_out, n_in, generator=g).to(dtype)
    if dtype == torch.bfloat16 and kernels.bf16_rounds_x():   # x in bf16, products exact
        x = x.bfloat16().float()
    expect = x.double() @ w.double().T
    got = kernels.matvec(x, w)
    assert got.shape == (T, n_out) and got.dtype == torch.float32
    rel = ((got.double() - expect).abs().max() / expect.abs().max()).item()
    assert rel < 1e-5, rel


@pytest.mark.parametrize("kind", ["fp32", "bf16", "fp16", "int8", "int4"])
@pytest.mark.parametrize("n_in", [64, 100, 576, 4100])
def test_a_row_gets_the_same_numbers_whatever_rows_share_the_call(kind, n_in):
    """Rows of x go through the products in groups of up to four sharing each widened
    weight: every row's result must still be bit for bit the one it gets alone."""
    if kind == "int4" and n_in % 32:
        n_in = n_in // 32 * 32
    g = torch.Generator().manual_seed(n_in)
    x = torch.randn(9, n_in, generator=g)
    w = torch.randn(37, n_in, generator=g)
    stored = {"fp32": lambda: (w,), "bf16": lambda: (w.bfloat16(),),
              "fp16": lambda: (w.half(),), "int8": lambda: quantize_int8(w),
              "int4": lambda: quantize_int4(w)}[kind]()
    alone = torch.cat([kernels.matvec(x[t:t + 1], *stored) for t in range(9)])
    for T in (2, 3, 4, 5, 9):
        assert torch.equal(kernels.matvec(x[:T], *stored), alone[:T]), T


@pytest.mark.parametrize("T,n_in,n_out", SHAPES)
def test_int8_kernel_matches_dequantized_product(T, n_in, n_out):
    g = torch.Generator().manual_seed(n_in + T)
    x = torch.randn(T, n_in, generator=g)
    x[:, 3] = 40.0   # an outlier column: the activations' int16 steps follow each group's max
    q, scale = quantize_int8(torch.randn(n_out, n_in, generator=g))
    w = dequantize_int8(q, scale)
    for dtype in (torch.float32, torch.bfloat16):   # the copy prompts multiply with
        assert torch.equal(kernels.dequantize(q, scale, dtype=dtype), w.to(dtype))
    expect = x.double() @ w.double().T
    got = kernels.matvec(x, q, scale)
    rel = ((got.double() - expect).abs().max() / expect.abs().max()).item()
    assert rel < 1e-4, rel


@pytest.mark.parametrize("n_in,n_out,group", [(576, 37, 64), (576, 48, 32), (96, 20, 64),
                                               (64, 5, 64), (2048, 16, 32)])
def test_int8_tiles_give_every_row_the_numbers_of_plain_rows(n_in, n_out, group):
    """kernels.tile_i8 rearranges the full groups of 16 (AVX-512) or 8 (AVX2) rows of a matrix
    whose width is a whole number of column groups (elsewhere, and for other widths, the rows
    stay plain). Read through its tiles every row dequantizes exactly as before, an
    embedding lookup gathers the same rows, the product differs by float rounding only, and
    a row of x gets the same numbers whatever rows come with it."""
    g = torch.Generator().manual_seed(n_in + n_out + group)
    q, scale = quantize_int8(torch.randn(n_out, n_in, generator=g), group)
    qt, st = q.clone(), scale.clone()
    tile = kernels.tile_i8(qt, st)
    assert tile == (kernels.weight_tile() if n_in % group == 0 else 0)
    full = n_out // tile * tile if tile else 0
    assert torch.equal(qt[full:], q[full:]) and torch.equal(st[full:], scale[full:])
    if full:
        assert not torch.equal(qt[:full], q[:full])   # rearranged, not copied
    w = dequantize_int8(q, scale)
    assert torch.equal(kernels.dequantize(qt, st, tile=tile), w)
    assert torch.equal(kernels.dequantize(qt, st, dtype=torch.bfloat16, tile=tile), w.bfloat16())
    tiled = Weight(qt, st, None, None, tile)
    index = torch.tensor([n_out - 1, 0, 3, min(17, n_out - 1), 3])
    assert torch.equal(tiled.rows(index), w[index])
    x = torch.randn(9, n_in, generator=g)
    plain, got = kernels.matvec(x, q, scale), kernels.matvec(x, qt, st, tile=tile)
    assert ((got - plain).abs().max() / plain.abs().max()).item() < 1e-5
    for T in (1, 2, 5):
        assert torch.equal(kernels.matvec(x[:T], qt, st, tile=tile), got[:T])
        assert torch.equal(kernels.matvec(x[T:T + 1], qt, st, tile=tile), got[T:T + 1])


@pytest.mark.parametrize("n_in", [5, 64, 100, 130])
def test_quantize_int8_error_is_at_most_half_a_step(n_in):
    w = torch.randn(9, n_in) * torch.logspace(-3, 1, 9)[:, None]   # rows of very different size
    w[4] = 0.0                                                     # an all-zero row
    q, scale = quantize_int8(w)
    n_groups = -(-n_in // GROUP)
    assert q.dtype == torch.int8 and scale.shape == (9, n_groups)
    assert int(q.abs().max()) == 127 and q[4].abs().max() == 0
    step = scale.repeat_interleave(GROUP, dim=1)[:, :n_in]
    assert ((dequantize_int8(q, scale) - w).abs() <= step / 2 + 1e-7).all()


@pytest.mark.parametrize("shape,n", [("llama-gqa", 1), ("llama-gqa", 2), ("qwen2", 3),
                                     ("llama-odd", 3)])
def test_int8_logits_close_to_fp32(models, tmp_path, shape, n):
    """int8 weights, fp32 activations: logits within 5% (relative to the largest) of the fp32
    reference along the generated tokens, the same top-1 at 90% of the steps or more (a
    near-tie may flip), N = 1, 2, 3."""
    folder, hf = models(shape)
    out = tmp_path / "logits.npy"
    r = run_mpi(n, ["generate", "--model", folder, "--dtype", "int8", "--prompt-ids",
                    ",".join(map(str, PROMPT)), "--max-tokens", "12", "--ignore-eos", "--json",
                    "--logits-out", str(out)])
    assert r.returncode == 0, r.stderr
    rel, top1 = logits_vs_reference(hf, PROMPT, json.loads(r.stdout)["token_ids"], np.load(out))
    agree = top1.mean()
    print(f"{shape} N={n}: relative logit error {rel:.4f}, top-1 agreement {agree:.2f}")
    assert rel < 0.05, rel
    assert agree >= 0.9, agree


def test_int8_split_stores_scales_and_refuses_another_group(models, tmp_path):
    folder, _ = models("llama-gqa")
    shards = tmp_path / "shards"
    r = run_mpi(1, ["split", folder, "--out", str(shards), "-n", "2", "--dtype", "int8"])
    assert r.returncode == 0, r.stderr
    man = json.loads((shards / "manifest.json").read_text())
    names = man["files"][1]["checksums"]
    assert man["int8_group"] == GROUP
    assert {"layers/0/wqkv.scale", "layers/0/w2.scale", "vocab/embed.scale"} <= set(names)
    man["int8_group"] = GROUP * 2
    (shards / "manifest.json").write_text(json.dumps(man))
    r = run_mpi(2, ["generate", "--model", folder, "--shards", str(shards), "--prompt-ids",
                    "1,2,3", "--max-tokens", "2"], timeout=60)
    assert r.returncode != 0 and "split the model again" in r.stderr, r.stderr


def test_torch_fallback_gives_the_same_tokens(models):
    """MPITPI_KERNELS=0 (no compiler) decodes with torch alone: same greedy tokens."""
    folder, _ = models("llama-gqa")
    runs = []
    for env in ({}, {"MPITPI_KERNELS": "0"}):
        r = run_mpi(2, ["generate", "--model", folder, "--dtype", "int8", "--prompt-ids",
                        ",".join(map(str, PROMPT)), "--max-tokens", "16", "--ignore-eos",
                        "--json"], env=env)
        assert r.returncode == 0, r.stderr
        runs.append(json.loads(r.stdout)["token_ids"])
    assert runs[0] == runs[1]


# instruction sets the kernels have paths for: (gcc -march, CPU flags it needs)
VARIANTS = {"x86-64": set(), "haswell": {"avx2", "fma", "f16c", "bmi2"},
            "skylake-avx512": {"avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl",
                               "avx512dq", "avx512cd"},
            "icelake-server": {"avx512f", "avx512bw", "avx512vl", "avx512_vnni",
                               "avx512_vbmi2", "avx512_bitalg", "avx512_vpopcntdq"}}


@pytest.mark.parametrize("march", list(VARIANTS))
def test_every_kernel_variant_this_cpu_runs_matches_torch(march, tmp_path):
    """Each instruction-set path of csrc/ (plain C, AVX2, AVX-512 without and with VNNI),
    built with that -march, runs this file's kernel tests and the fused-step tests."""
    import platform
    if platform.machine() != "x86_64":
        pytest.skip(f"{march} is an x86-64 variant; this is {platform.machine()}")
    missing = VARIANTS[march] - kernels.cpu_flags()
    if missing:
        pytest.skip(f"this CPU cannot run -march={march}: it lacks {sorted(missing)}")
    env = {"MPITPI_MARCH": march, "MPITPI_CACHE": str(tmp_path)}
    r = run_cmd([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                 f"{HERE}/test_int8.py::test_the_kernels_build_on_this_host",
                 f"{HERE}/test_int8.py::test_float_kernels_match_torch",
                 f"{HERE}/test_int8.py::test_int8_kernel_matches_dequantized_product",
                 f"{HERE}/test_int8.py::test_int8_tiles_give_every_row_the_numbers_of_plain_rows",
                 f"{HERE}/test_int4.py::test_int4_kernel_matches_dequantized_product",
                 f"{HERE}/test_int4.py::test_int4_tiles_give_every_row_the_numbers_of_plain_rows",
                 f"{HERE}/test_int6.py::test_int6_kernel_matches_dequantized_product",
                 f"{HERE}/test_coded.py", f"{HERE}/test_streams.py",
                 f"{HERE}/test_fused.py", "-k", "not wide"], env=env, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-2000:]
    assert "passed" in r.stdout and "skipped" not in r.stdout, r.stdout[-500:]


def test_host_choices_are_measured_and_kept_beside_the_kernels(monkeypatch):
    from mpitpi import choices
    c = choices.host()
    assert c.measured and c.cpu and os.path.isfile(choices._path())
    assert c.version == choices.VERSION
    for d in ("fp32", "bf16", "fp16", "int8"):   # one prompt path whatever the row count
        assert c.kernel_rows(d) in (0, choices.C_ALWAYS), (d, c.max_t)
        assert c.kernel_rows(d) or c.pad_rows(d) in (1, 2, 4, 8, 16), (d, c.pad)
    # int4: the C kernels up to a prompt chunk (torch beyond), or torch for every prompt row
    assert c.kernel_rows("int4") in (0, choices.PREFILL_ROWS), c.max_t
    assert c.kernel_rows("int4") or c.pad_rows("int4") in (1, 2, 4, 8, 16), c.pad
    for d in ("int8", "int4"):   # bf16 copies only where it was measured faster
        assert c.prefill.get(d, "fp32") in ("bf16", "fp32")
        assert c.prefill.get(d, "fp32") == "fp32" or choices._bf16_instructions()
    # a CPU without bf16 instructions never computes prefill in bf16
    monkeypatch.setattr(kernels, "cpu_flags", lambda: {"avx2", "fma", "f16c"})
    plain = choices.Choices()
    for dtype in (torch.float16, torch.bfloat16, torch.int8, torch.uint8):
        assert plain.prefill_dtype(dtype) == torch.float32


def test_row_invariance_is_found_where_a_product_has_it():
    """choices.invariant_from: a product whose rows do not depend on their neighbours -> 1;
    one that rounds differently unless the row count is a multiple of 4 -> 4; one whose
    numbers depend on a row's place, or on any other row count -> 0."""
    from mpitpi import choices
    g = torch.Generator().manual_seed(0)
    w = torch.randn(16, generator=g)

    def plain(x):   # elementwise: each row alone (a matrix product may not be)
        return x[:, :16] * w

    def by_four(x):
        y = plain(x)
        return y if x.shape[0] % 4 == 0 else y + 1e-3

    def by_place(x):
        return plain(x) + torch.arange(x.shape[0]).unsqueeze(1) * 1e-3

    def by_count(x):
        return plain(x) + x.shape[0] * 1e-3

    assert choices.invariant_from(plain, 64, g) == 1
    assert choices.invariant_from(by_four, 64, g) == 4
    assert choices.invariant_from(by_place, 64, g) == 0
    assert choices.invariant_from(by_count, 64, g) == 0
