"""Per-host choices of how a Weight multiplies, measured on the host, not baked in.

Three decisions differ between CPUs (docs/BENCHMARKS.md):

- ``prefill[dtype]``: what bf16, int8 and int4 weights compute in for prompt rows that take
  torch's product: ``bf16`` (torch's bf16 product, fast only where the CPU has bf16
  instructions) or ``fp32`` (the weight widened, or dequantized, per call). Without
  avx512_bf16 / amx_bf16 it is fp32 without measuring; with them the faster of the two,
  measured. fp16 weights always widen to fp32: a bf16 copy would round their 10-bit
  mantissas to 7 bits (SmolLM2 fp16, a prompt's last logits 0.27 from the reference in bf16,
  0.024 in fp32, enough to flip a golden answer's first token).
- ``max_t[dtype]``: prompt rows take one path whatever their number, so that a row's numbers
  do not depend on the rows beside it (a prompt cut into chunks, a cached prefix reused,
  several prompts in one pass all give the same numbers, hence the same greedy text): the C
  kernels (every row computed alone; ``max_t`` unbounded) or torch's product (``max_t`` 0).
  Decode rows always take the C kernels.
- ``pad[dtype]``: torch's product gives a row the same numbers whatever the row count only
  for some counts (on the AMD EPYC of docs/BENCHMARKS.md, fp32 on 2 threads: any multiple
  of 4, not 5, 7 or 9 rows; bf16 any multiple of 2). Measured here: the least of 1, 2, 4, 8, 16
  whose multiples all agree, 0 if none: then prompt rows take the C kernels; else the
  faster of the two at prompt-chunk sizes, torch's inputs padded with zero rows to a
  multiple of ``pad``.

The figures are written as JSON beside the kernel library (one file per library, which is
per CPU and compiler) with the CPU they were measured on. One process measures (an exclusive
lock file); others starting at the same moment use the defaults (the C kernels for every
prompt row) for that run. ``python -m mpitpi.choices`` (make install) measures up front;
``mpitpi profile`` prints the choices and why.
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


def _bf16_instructions() -> bool:
    flags = kernels.cpu_flags()
    return "avx512_bf16" in flags or "amx_bf16" in flags


# before (or without) measuring: every prompt row through the C kernels (int4 beyond a
# chunk through torch on a dequantized copy), which compute each row alone
PREFILL_ROWS = 128   # rows of a prompt chunk (batch.PREFILL_CHUNK)
C_ALWAYS = 1 << 30
DEFAULT_MAX_T = {"fp32": C_ALWAYS, "bf16": C_ALWAYS, "fp16": C_ALWAYS, "int8": C_ALWAYS,
                 "int4": PREFILL_ROWS}
VERSION = 7          # of the measurement: a choices file of another version is measured again


@dataclass
class Choices:
    max_t: dict[str, int] = field(default_factory=lambda: dict(DEFAULT_MAX_T))
    prefill: dict[str, str] = field(default_factory=lambda: {
        "bf16": "bf16" if _bf16_instructions() else "fp32", "fp16": "fp32"})
    pad: dict[str, int] = field(default_factory=dict)
    measured: bool = False
    why: list[str] = field(default_factory=list)
    cpu: str = ""
    version: int = VERSION

    def kernel_rows(self, kind: str) -> int:
        """Prompt rows up to which a weight of storage ``kind`` (weights.DTYPES) uses the C
        kernels: unbounded or 0 (torch) for all but int4 (beyond a prompt chunk, torch)."""
        return self.max_t.get(kind, DEFAULT_MAX_T[kind])

    def pad_rows(self, kind: str) -> int:
        """torch's product gives each row the same numbers whenever the row count is a
        multiple of this (prompt inputs are padded with zero rows to one)."""
        return self.pad.get(kind, 1)

    def prefill_dtype(self, dtype: torch.dtype) -> torch.dtype:
        """What a weight stored in ``dtype`` computes in for inputs past ``kernel_rows``
        (int8 and int4: the dtype of the copy dequantized for the call)."""
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


# prompt-pass sizes the path is chosen by (summed times): one row (a server request or chat
# turn past a cached prefix), a short prompt, a longer one, a full chunk
TIMED = (1, 8, 32, PREFILL_ROWS)
NARROW = 576         # a second width checked for invariance (SmolLM2's)
MULTIPLES = (1, 2, 3, 4, 5, 7, 8, 9, 15, 16, 17, 31, 32, 33, 63, 65, 97, 127)


def invariant_from(f, n: int, g: torch.Generator, seeds: int = 3) -> int:
    """The least m of 1, 2, 4, 8, 16 such that ``f`` (x (T, n) -> (T, out)) gives every row
    the numbers it gives it within PREFILL_ROWS rows, wherever the row stands, whenever T is
    a multiple of m: on ``seeds`` random inputs (a bf16 result's rounding can hide a
    different summation order on one), at this thread count, at 2 and at 1. 0 if none is."""
    threads = torch.get_num_threads()
    worst = 1
    for t in sorted({threads, min(2, threads), 1}, reverse=True):
        torch.set_num_threads(t)
        try:
            for _ in range(seeds):
                x = torch.randn(PREFILL_ROWS, n, generator=g)
                full = f(x)
                if not torch.equal(f(x.roll(37, 0)), full.roll(37, 0)):
                    return 0
                m = next((m for m in (1, 2, 4, 8, 16) if m >= worst and all(
                    torch.equal(f(x[:T]), full[:T])
                    for T in {m * k for k in MULTIPLES if m * k < PREFILL_ROWS})), 0)
                if m == 0:
                    return 0
                worst = m
        finally:
            torch.set_num_threads(threads)
    return worst


def _choose(c: Choices, name: str, ours, theirs, n: int, g: torch.Generator, how: str) -> None:
    """Prompt rows of ``name`` through the C kernels (``ours``) or torch (``theirs``, padded
    to the rows from which it is row-invariant, if any)."""
    pads = [invariant_from(theirs, n, g), invariant_from(theirs, NARROW, g)]
    pad = 0 if 0 in pads else max(pads)
    if pad == 0:
        c.max_t[name] = C_ALWAYS
        c.why.append(f"{name}: prompt rows through the C kernels (torch {how} gives a row "
                     f"different numbers with the rows beside it)")
        return
    xs = [torch.randn(t, n, generator=g) for t in TIMED]
    c_ms = sum(_median_ms(lambda: ours(x), reps=5) for x in xs)
    t_ms = sum(_median_ms(lambda: theirs(x), reps=5) for x in xs)
    rows = "+".join(map(str, TIMED))
    if t_ms < c_ms:
        c.max_t[name], c.pad[name] = 0, pad
        c.why.append(f"{name}: prompt rows through torch {how}, rows padded to a multiple of {pad} "
                     f"({rows} rows: {t_ms:.1f} ms, C kernels {c_ms:.1f} ms)")
    else:
        c.max_t[name] = C_ALWAYS
        c.why.append(f"{name}: prompt rows through the C kernels ({rows} rows: {c_ms:.1f} "
                     f"ms, torch {how} {t_ms:.1f} ms)")


def measure(n: int = 2048) -> Choices:
    """Time the kernels against torch on this host (a few seconds)."""
    c = Choices(measured=True, cpu=kernels.cpu_model())
    g = torch.Generator().manual_seed(0)
    w32 = torch.randn(n, n, generator=g)
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        name, w = NAMES[dtype], w32.to(dtype)
        if dtype == torch.bfloat16 and _bf16_instructions():
            x = torch.randn(64, n, generator=g)
            bf = _median_ms(lambda: F.linear(x.to(torch.bfloat16), w.to(torch.bfloat16)))
            fp = _median_ms(lambda: F.linear(x, w.float()))
            c.prefill[name] = "bf16" if bf < fp else "fp32"
            c.why.append(f"{name} prefill (64 rows): bf16 {bf:.2f} ms, fp32 {fp:.2f} ms")
        elif dtype == torch.bfloat16:
            c.why.append(f"{name} prefill in fp32: no avx512_bf16/amx_bf16 on this CPU")
        elif dtype == torch.float16:
            c.why.append(f"{name} prefill in fp32 (a bf16 copy would round the weights)")
        pre = c.prefill_dtype(dtype)

        by_width = {n: w.to(pre), NARROW: w[:, :NARROW].to(pre).contiguous()}

        def theirs(x, by_width=by_width, pre=pre):
            return F.linear(x.to(pre), by_width[x.shape[1]]).float()
        _choose(c, name, lambda x, w=w: kernels.matvec(x, w), theirs, n, g,
                f"in {NAMES[pre]}")
    # torch has no weight-only integer product: it runs on a copy dequantized for the call,
    # in bf16 where the CPU has bf16 instructions and that measured faster, else in fp32
    # the matrices are tiled as the model's are (both paths read the tiles)
    for dtype, quantize, tile in ((torch.int8, quantize_int8, kernels.tile_i8),
                                  (torch.uint8, quantize_int4, kernels.tile_i4)):
        name = NAMES[dtype]
        wide, narrow = quantize(w32), quantize(w32[:, :NARROW].contiguous())
        tiles = {n: tile(*wide), NARROW: tile(*narrow)}

        def dequantized(x, pre, wide=wide, narrow=narrow, tiles=tiles):
            parts = wide if x.shape[1] == n else narrow
            return F.linear(x.to(pre), kernels.dequantize(*parts, dtype=pre,
                                                          tile=tiles[x.shape[1]])).float()
        if _bf16_instructions():
            x = torch.randn(64, n, generator=g)
            bf = _median_ms(lambda: dequantized(x, torch.bfloat16))
            fp = _median_ms(lambda: dequantized(x, torch.float32))
            c.prefill[name] = "bf16" if bf < fp else "fp32"
            c.why.append(f"{name} prefill (64 rows, the copy made included): bf16 {bf:.2f} ms, "
                         f"fp32 {fp:.2f} ms")
        pre = c.prefill_dtype(dtype)
        # int4's C kernel rounds prompt rows to int16 per block (wide=True)
        _choose(c, name, lambda x, parts=wide: kernels.matvec(x, *parts, wide=True,
                                                              tile=tiles[n]),
                lambda x, pre=pre: dequantized(x, pre), n, g,
                f"on a dequantized {NAMES[pre]} copy")
        if name == "int4" and c.max_t[name] == C_ALWAYS:   # the C kernels up to a chunk
            c.max_t[name] = PREFILL_ROWS
            c.why[-1] += f"; beyond {PREFILL_ROWS} rows torch on a dequantized copy"
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
    return kernels.library_path_or_none() + f".choices-v{VERSION}.json"


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
