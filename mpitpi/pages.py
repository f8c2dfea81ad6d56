"""Weight buffers in 2 MiB pages where the kernel offers them.

A decode step reads every weight once per token, front to back, so its speed is how fast a
core streams memory. With 4 KiB pages the CPU's hardware prefetchers stop at each page edge
and every page costs a TLB walk; in 2 MiB pages (Linux transparent huge pages, which the
kernel gives to memory marked MADV_HUGEPAGE when THP is "madvise" or "always") the same
int4 product streamed 26-35 GB/s against 22-25 GB/s, and the llama-3.2-1b shape decoded
4-11% faster in every dtype (2-core AMD EPYC VM, docs/BENCHMARKS.md).

``empty`` maps buffers of HUGE bytes or more anonymously, starts them on a 2 MiB boundary
and marks only their whole 2 MiB pages, so the last partial page stays in 4 KiB pages: the
resident size is the buffer's, as with np.empty. Elsewhere (other systems, THP "never",
small buffers) it is np.empty. ``empty_many`` lays several buffers (a layer's matrices and
scales) end to end in one such mapping, so that only its last partial page is small: with a
buffer each, the 1B shape's wqkv (3.1 MB) had a third of its bytes, and every scale array all
of its, in 4 KiB pages.
"""
from __future__ import annotations

import mmap

import numpy as np

HUGE = 2 << 20   # bytes in a huge page (x86-64 and most aarch64 kernels)


def thp_mode() -> str:
    """The kernel's transparent huge page setting ("always", "madvise", "never"), or "" where
    there is none to read."""
    try:
        with open("/sys/kernel/mm/transparent_hugepage/enabled") as f:
            return f.read().split("[")[1].split("]")[0]
    except (OSError, IndexError):
        return ""


_ADVISE = hasattr(mmap, "MADV_HUGEPAGE") and thp_mode() in ("always", "madvise")


def empty(shape: tuple, dtype) -> np.ndarray:
    """np.empty(shape, dtype), in 2 MiB pages where the kernel gives them (above)."""
    return empty_many([(shape, dtype)])[0]


ALIGN = 4096     # where each buffer of ``empty_many`` starts in the shared mapping


def empty_many(specs: list[tuple[tuple, object]]) -> list[np.ndarray]:
    """[np.empty(shape, dtype) for shape, dtype in specs], the buffers end to end (each on an
    ALIGN boundary) in one mapping in 2 MiB pages where the kernel gives them (above). The
    mapping lives as long as any of the buffers (or a view of one)."""
    specs = [(tuple(shape), np.dtype(dtype)) for shape, dtype in specs]
    sizes = [int(np.prod(shape, dtype=np.int64)) * dt.itemsize for shape, dt in specs]
    offsets, end = [], 0
    for n in sizes:
        offsets.append(-(-end // ALIGN) * ALIGN)
        end = offsets[-1] + n                # where the last buffer's bytes stop
    if not _ADVISE or end < HUGE:
        return [np.empty(shape, dt) for shape, dt in specs]
    mm = mmap.mmap(-1, end + HUGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    raw = np.frombuffer(mm, np.uint8)   # keeps the mapping alive as long as any view
    start = -raw.ctypes.data % HUGE     # a multiple of 4 KiB: mmap returns whole pages
    mm.madvise(mmap.MADV_HUGEPAGE, start, end // HUGE * HUGE)
    return [raw[start + o:start + o + n].view(dt).reshape(shape)
            for o, n, (shape, dt) in zip(offsets, sizes, specs)]
