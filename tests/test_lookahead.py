"""Which tile kernels ask for weight lines ahead (lookahead.py, csrc/common.h): the tuner's
choices on synthetic pass times, the setting's errors, and that no mode changes a number."""
import pytest
import torch

from mpitpi import kernels, lookahead
from mpitpi.errors import MpitpiError
from mpitpi.weights import quantized


def drive(tuner, rows, passes, cost):
    """Run ``passes`` passes of ``rows`` rows, each taking ``cost(mode, i)`` seconds; the
    modes used, in order."""
    used = []
    for i in range(passes):
        mode = tuner.mode(rows)
        used.append(mode)
        tuner.record(rows, cost(mode, i))
    return used


def wobble(i):
    """A pass-to-pass spread of +-1.5%, the same for both modes."""
    return 1 + 0.015 * ((i * 7919) % 13 - 6) / 6


def test_the_tuner_takes_the_faster_mode_and_probes_less_while_it_holds():
    t = lookahead.Tuner(modes=(7, 4), period=32, max_period=256, probe=4)
    used = drive(t, 1, 2000, lambda m, i: (1.0 if m == 4 else 1.05) * wobble(i))
    assert t.state[1].best == 1 and t.switches == 1
    late = used[500:]
    # the slower mode only in probes: 4 passes a period of (by then) 256
    assert late.count(7) <= 4 * (len(late) // 256 + 1)


def test_the_tuner_follows_the_memory_when_it_changes():
    t = lookahead.Tuner(modes=(7, 4), period=32, max_period=256, probe=4)
    slow = lambda m, i: (1.0 if m == 4 else 1.04) * wobble(i)   # noqa: E731
    fast = lambda m, i: (0.6 if m == 7 else 0.8) * wobble(i)    # noqa: E731
    drive(t, 1, 1000, slow)
    assert t.state[1].best == 1
    used = drive(t, 1, 600, fast)
    first = used.index(7, 256 + 4)   # past the longest period: current again, not a probe
    assert used[first:first + 20] == [7] * 20 and t.state[1].best == 0
    drive(t, 1, 600, slow)
    assert t.state[1].best == 1


def test_three_modes_are_probed_in_turn():
    t = lookahead.Tuner(modes=(5, 4, 7), period=32, max_period=256, probe=4)
    cost = {5: 1.05, 4: 1.10, 7: 1.0}   # the last mode the fastest
    used = drive(t, 1, 3000, lambda m, i: cost[m] * wobble(i))
    assert t.modes[t.state[1].best] == 7
    assert {4, 5} <= set(used[1500:])   # the others still probed now and then
    assert used[1500:].count(7) > 0.9 * 1500
    cost = {5: 0.8, 4: 1.10, 7: 1.0}   # the memory changes: the first one now
    drive(t, 1, 1500, lambda m, i: cost[m] * wobble(i))
    assert t.modes[t.state[1].best] == 5


def test_equal_modes_stay_put():
    t = lookahead.Tuner(modes=(7, 4), period=32, max_period=128, probe=4)
    used = drive(t, 2, 3000, lambda m, i: wobble(i))
    # a spread of +-1.5% a pass: the medians of 4 passes never 2% apart
    assert t.switches == 0 and t.state[2].best == 0
    assert used.count(4) <= 4 * (3000 // 128 + 5)


def test_kinds_of_pass_are_tuned_apart_and_prompts_not_at_all(monkeypatch):
    seen = []
    monkeypatch.setattr(kernels, "set_prefetch", seen.append)
    c = lookahead.Control("auto")
    c.tuner = lookahead.Tuner(modes=(7, 4), period=16, max_period=64, probe=2)
    a, b = object(), object()   # two models in one process (a benchmark's, a draft's)
    for _ in range(400):
        for model, rows, faster in ((a, 1, 4), (a, 3, 7), (b, 1, 7)):
            c.before(model, rows)
            c.after(model, rows, 1.0 if seen[-1] == faster else 1.1)
    st = c.tuner.state
    assert st[id(a), 1].best == 1 and st[id(a), 3].best == 0 and st[id(b), 1].best == 0
    n = len(seen)
    c.before(a, lookahead.MAX_ROWS + 1)   # a prompt pass: the mode left as it is
    c.after(a, lookahead.MAX_ROWS + 1, 5.0)
    assert len(seen) == n and (id(a), lookahead.MAX_ROWS + 1) not in st
    with pytest.raises(ValueError, match="2 \\* probe < period"):
        lookahead.Tuner(period=6, probe=3)
    with pytest.raises(ValueError, match="two modes"):
        lookahead.Tuner(modes=(7,))


@pytest.mark.parametrize("setting", ["sometimes", "16", "-1"])
def test_a_wrong_setting_names_the_fix(setting):
    with pytest.raises(MpitpiError, match="MPITPI_PREFETCH.*Fix: auto"):
        lookahead.Control(setting)


def test_a_fixed_setting_is_kept(monkeypatch):
    seen = []
    monkeypatch.setattr(kernels, "set_prefetch", seen.append)
    c = lookahead.Control("4")
    c.before(None, 1)
    c.after(None, 1, 1.0)
    assert seen == [4] and c.tuner is None
    c.reapply()   # after something else changed the kernels' mode: set again
    assert seen == [4, 4]
    a = lookahead.Control("auto")
    a.before(None, 1)
    assert seen == [4, 4, lookahead.MODES[0]]


def test_bit_8_reads_int4_decode_rows_as_one_stream(monkeypatch):
    seen = []
    monkeypatch.setattr(kernels, "set_prefetch", lambda m: seen.append(("prefetch", m)))
    monkeypatch.setattr(kernels, "set_streams", lambda n: seen.append(("streams", n)))
    lookahead.Control("12")
    assert seen == [("prefetch", 4), ("streams", 1)]
    lookahead.Control("7")
    assert seen[2:] == [("prefetch", 7), ("streams", 2)]
    assert kernels.PREFETCH_INT8 | kernels.ONE_STREAM in lookahead.MODES   # the tuner tries it
    assert lookahead.describe(12) == "12: int8 tiles asking, one stream"
    assert lookahead.describe(3) == "3: int4/int6 tiles asking, two streams"
    assert lookahead.describe(0) == "0: no tiles asking, two streams"


@pytest.mark.skipif(not kernels.available(), reason="the C kernels are not built here")
@pytest.mark.parametrize("dtype", ["int4", "int6", "int8"])
def test_asking_ahead_changes_no_number(dtype):
    g = torch.Generator().manual_seed(3)
    w = quantized(torch.randn(200, 640, generator=g) * 0.05, dtype)
    w.tile_rows()
    x = torch.randn(3, 640, generator=g)
    got = {}
    try:
        for mode in (kernels.PREFETCH_ALL, 0, kernels.PREFETCH_INT8):
            kernels.set_prefetch(mode)
            got[mode] = (w(x, decode=True), w(x, logits=True))
    finally:
        kernels.set_prefetch(kernels.PREFETCH_ALL)
    for mode, (dec, full) in got.items():
        assert torch.equal(dec, got[kernels.PREFETCH_ALL][0]), mode
        assert torch.equal(full, got[kernels.PREFETCH_ALL][1]), mode
