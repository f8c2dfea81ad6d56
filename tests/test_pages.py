"""Weight buffers in 2 MiB pages (pages.py): the same arrays as np.empty gives, starting on
a page boundary and backed by huge pages where the kernel offers them."""
import numpy as np

from mpitpi import pages


def anon_huge_kb() -> int:
    with open("/proc/self/smaps_rollup") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("AnonHugePages:"))


def test_buffers_hold_what_np_empty_holds_and_big_ones_sit_in_huge_pages():
    for shape, dtype in (((0,), np.float32), ((7, 3), np.int8), ((1000, 1000), np.uint8),
                         ((1536, 2048), np.float32), ((3, 1 << 20), np.float16)):
        a = pages.empty(shape, dtype)
        assert a.shape == shape and a.dtype == dtype and a.flags.c_contiguous
        assert a.flags.writeable and a.flags.aligned
        a[...] = 3
        assert float(a.sum(dtype=np.float64)) == 3 * a.size
    before = anon_huge_kb()
    big = pages.empty((8, 1 << 20), np.float32)   # 32 MiB: 16 whole huge pages
    big[...] = 1.0
    if pages.thp_mode() in ("always", "madvise"):
        assert big.ctypes.data % pages.HUGE == 0
        # the kernel may fall short of huge pages when memory is fragmented; most of 16
        assert anon_huge_kb() - before >= 8 * pages.HUGE // 1024, (before, anon_huge_kb())
    else:   # no THP to ask for: plain memory
        assert pages.empty((8, 1 << 20), np.float32).base is None


def test_many_buffers_share_one_mapping_each_as_np_empty_gives():
    specs = [((3, 1 << 20), np.uint8), ((3000,), np.float16), ((7, 5), np.int8),
             ((1 << 20,), np.float32), ((0,), np.float32)]
    bufs = pages.empty_many(specs)
    for b, (shape, dtype) in zip(bufs, specs):
        assert b.shape == shape and b.dtype == dtype and b.flags.c_contiguous
        assert b.flags.writeable and b.ctypes.data % pages.ALIGN == 0
    for i, b in enumerate(bufs):   # none overlaps another
        b[...] = i + 1
    for i, b in enumerate(bufs):
        assert np.all(b == i + 1)
    if pages.thp_mode() in ("always", "madvise"):   # one mapping, starting on a huge page
        assert bufs[0].ctypes.data % pages.HUGE == 0
        assert all(b.base is bufs[0].base for b in bufs if b.size)
    small = pages.empty_many([((10,), np.float32), ((3, 3), np.int8)])   # under a huge page
    assert [b.shape for b in small] == [(10,), (3, 3)] and small[0].base is None
