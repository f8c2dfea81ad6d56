"""Per-host choices of how a Weight multiplies, measured on the host, not baked in.

Two decisions differ between CPUs by several times (docs/BENCHMARKS.md):

- ``max_t[dtype]``: the number of input rows up to which the C kernels beat torch's matrix
  product (decode is 1 row; short prompts a few; int8 against a dequantized copy). Measured
  once per kernel build by timing both on a 2048 x 2048 matrix for 1, 2, 4, ... 64 rows.
- ``prefill[dtype]``: what fp16 and bf16 weights compute in for longer inputs: ``bf16``
  (torch's bf16 product, fast only where the CPU has bf16 instructions) or ``fp32`` (the
  weight widened per call). Without avx512_bf16 / amx_bf16 it is fp32 without measuring;
  with them the faster of the two, measured.

The figures are written as JSON beside the kernel library (one file per library, which is
per CPU and compiler) with the CPU they were measured on. One process measures (an exclusive
lock file); others starting at the same moment use the defaults from the CPU's features for
that run. ``python -m mpitpi.choices`` (make install) measures up front; ``mpitpi profile``
prints the choices and why.
"""
from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F

from mpitpi import kernels
from mpitpi.quant import quantize_int4, quantize_int8

NAMES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16",
         torch.int8: "int8", torch.uint8: "int4"}
ROWS = (1, 2, 4, 8, 16, 32, 64)


def _bf16_instructions() -> bool:
    flags = kernels.cpu_flags()
    return "avx512_bf16" in flags or "amx_bf16" in flags


# kernel row counts before (or without) measuring; also what a choices file measured by an
# older version, without some dtype, falls back to
PREFILL_ROWS = 128   # rows of a prompt chunk (batch.PREFILL_CHUNK)
DEFAULT_MAX_T = {"fp32": 8, "bf16": 2, "fp16": 2, "int8": 1 << 30, "int4": PREFILL_ROWS}


@dataclass
class Choices:
    max_t: dict[str, int] = field(default_factory=lambda: dict(DEFAULT_MAX_T))
    prefill: dict[str, str] = field(default_factory=lambda: {
        "bf16": "bf16" if _bf16_instructions() else "fp32",
        "fp16": "bf16" if _bf16_instructions() else "fp32"})
    measured: bool = False
    why: list[str] = field(default_factory=list)
    cpu: str = ""

    def kernel_rows(self, kind: str) -> int:
        """Input rows up to which a weight of storage ``kind`` (weights.DTYPES) uses the C
        kernels (int4 for 2 rows and more: its exact-activation kernel)."""
        return self.max_t.get(kind, DEFAULT_MAX_T[kind])

    def prefill_dtype(self, dtype: torch.dtype) -> torch.dtype:
        """What a weight stored in ``dtype`` computes in for inputs past ``kernel_rows``."""
        if dtype in (torch.int8, torch.uint8):
            return torch.float32
        return {"bf16": torch.bfloat16, "fp32": torch.float32}[self.prefill.get(NAMES[dtype],
                                                                                 "fp32")]


def _median_ms(f, reps: int = 7) -> float:
    f()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        f()
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2] * 1e3


def _crossover(ours, theirs, n: int, g: torch.Generator) -> int:
    """The most rows of x (n,) in ROWS for which ``ours(x)`` is not slower than
    ``theirs(x)``, stopping at the first loss; at least 1."""
    best = 0
    for t in ROWS:
        x = torch.randn(t, n, generator=g)
        if _median_ms(lambda: ours(x)) > _median_ms(lambda: theirs(x)):
            break
        best = t
    return max(best, 1)


def measure(n: int = 2048) -> Choices:
    """Time the kernels against torch on this host (about a second)."""
    c = Choices(measured=True, cpu=kernels.cpu_model())
    g = torch.Generator().manual_seed(0)
    w32 = torch.randn(n, n, generator=g)
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        name, w = NAMES[dtype], w32.to(dtype)
        if dtype != torch.float32 and _bf16_instructions():
            x = torch.randn(64, n, generator=g)
            bf = _median_ms(lambda: F.linear(x.to(torch.bfloat16), w.to(torch.bfloat16)))
            fp = _median_ms(lambda: F.linear(x, w.float()))
            c.prefill[name] = "bf16" if bf < fp else "fp32"
            c.why.append(f"{name} prefill (64 rows): bf16 {bf:.2f} ms, fp32 {fp:.2f} ms")
        elif dtype != torch.float32:
            c.why.append(f"{name} prefill in fp32: no avx512_bf16/amx_bf16 on this CPU")
        pre = c.prefill_dtype(dtype)
        c.max_t[name] = _crossover(lambda x: kernels.matvec(x, w),
                                   lambda x: F.linear(x.to(pre), w.to(pre)), n, g)
        c.why.append(f"{name}: C kernels up to {c.max_t[name]} rows, then torch in "
                     f"{NAMES[pre]}")
    # torch has no weight-only integer product: it runs on a dequantized copy
    parts = quantize_int8(w32)
    c.max_t["int8"] = _crossover(lambda x: kernels.matvec(x, *parts),
                                 lambda x: F.linear(x, kernels.dequantize(*parts)), n, g)
    c.why.append(f"int8: C kernels up to {c.max_t['int8']} rows, then torch on a dequantized "
                 f"fp32 copy")
    # int4 prompt chunks (up to PREFILL_ROWS rows) always take the exact-activation kernel,
    # whose rows are computed independently of each other: a prompt's numbers then do not
    # depend on how it was cut into chunks or which prefix was cached (batch.py), so a
    # reused prefix gives the same answer as a full prefill. Measured, for the record:
    parts = quantize_int4(w32)
    x = torch.randn(PREFILL_ROWS, n, generator=g)
    ex = _median_ms(lambda: kernels.matvec(x, *parts, exact=True))
    dq = _median_ms(lambda: F.linear(x, kernels.dequantize(*parts)))
    c.max_t["int4"] = PREFILL_ROWS
    c.why.append(f"int4: C kernels with int8 activations for decode rows, with fp32 "
                 f"activations for prompt chunks ({PREFILL_ROWS} rows: {ex:.2f} ms, against "
                 f"{dq:.2f} ms on a dequantized fp32 copy), torch on such a copy beyond")
    return c


def best_threads(most: int, n: int = 2048) -> int:
    """Of 1 .. ``most`` threads, the count that runs a decode-sized product (a 32 MB fp32
    matrix, out of cache) fastest now, other work on the host included; fewer threads only
    when clearly (5%) faster. Leaves torch set to it."""
    if most > 1 and kernels.available():
        g = torch.Generator().manual_seed(0)
        w, x = torch.randn(4 * n, n, generator=g), torch.randn(1, n, generator=g)
        best, best_ms = most, float("inf")
        for t in range(most, 0, -1):
            torch.set_num_threads(t)
            ms = _median_ms(lambda: kernels.matvec(x, w), reps=5)
            if ms < 0.95 * best_ms:
                best, best_ms = t, ms
        most = best
    torch.set_num_threads(most)
    return most


def _path() -> str:
    return kernels.library_path_or_none() + ".choices.json"


_choices: Choices | None = None


def host() -> Choices:
    """This host's choices: from the JSON beside the kernels, measured now if there is none
    (by one process at a time), or the CPU-feature defaults."""
    global _choices
    if _choices is not None:
        return _choices
    if not kernels.available():
        _choices = Choices(why=["no C kernels: torch for every product"])
        return _choices
    path = _path()
    try:
        with open(path) as f:
            _choices = Choices(**json.load(f))
        return _choices
    except (OSError, ValueError, TypeError):
        pass
    lock = path + ".lock"
    try:
        if time.time() - os.path.getmtime(lock) > 60:   # left by a process that died
            os.unlink(lock)
    except OSError:
        pass
    try:
        fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    except OSError:   # another process is measuring: the defaults for this run
        _choices = Choices(why=["defaults from CPU features (another process was measuring)"])
        return _choices
    try:
        _choices = measure()
        tmp = f"{path}.{os.getpid()}"
        with open(tmp, "w") as f:
            json.dump(asdict(_choices), f, indent=1)
        os.replace(tmp, path)
    finally:
        os.close(fd)
        os.unlink(lock)
    return _choices


def describe(c: Choices) -> str:
    """The choices and why, for `mpitpi profile` and `python -m mpitpi.choices`."""
    how = "measured" if c.measured else "defaults"
    head = f"host choices ({how}) on {c.cpu or kernels.cpu_model()}:"
    return "\n".join([head] + [f"  {line}" for line in c.why])


if __name__ == "__main__":   # `python -m mpitpi.choices`: build the kernels, measure (make install)
    import sys

    if not kernels.available():
        sys.exit(f"mpitpi: no C kernels ({kernels._why_not}); decoding falls back to torch")
    print(describe(host()))
