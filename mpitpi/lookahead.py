"""Which tile kernels ask for weight lines ahead, chosen while decoding.

Asking for lines ahead (csrc/common.h, mpitpi_prefetch) pays or costs with the moment on a
shared host. 1B int4 decode on a 2-core AMD EPYC VM with VNNI, modes alternating in one
process (docs/BENCHMARKS.md): with memory slow (a torch sum 30-57 GB/s) the int4 and int6
tiles left to the hardware prefetcher took 0.95-0.97x the time of asking (four lines at a
block's start); the int4 tile asking a line as it loads each chunk 0.98-1.0x of that; int8
tiles without requests 1.05-1.34x. In earlier sessions' fast moments (80-90 GB/s) the int4
tiles needed the requests (53-60 -> 72-82 GB/s in a C harness). A choice made once at start
would be wrong part of the time, so each rank tunes its own while it runs, among MODES. The
requests change no number, so ranks need not agree.

Passes are told apart by their model and row count (a decode pass of one sequence, of two,
...); passes of more than MAX_ROWS rows (prompts) are compute-bound and left alone. For each
kind of pass, of every ``period`` passes the last ``probe`` run another mode (the others in
turn) and the ``probe`` before them the current one; when the probes' median time is below
the others' by more than ``margin``, the probed mode becomes current. A probe that confirms
the current mode doubles the period (up to ``max_period``), a switch resets it: probing costs
little while the memory holds still, and a change is found within a few periods. The time of
a pass is the rank's own: its wall time less the time it spent in all-reduce (waiting for the
other ranks included).

A mode also says how a thread reads a single int4 decode row's products: as two streams
(its part's two halves side by side, csrc/decode.c's rows_pair; the default) or, with bit 8,
as one. Two streams took 0.92x the time of one on the AMD host while memory was middling,
0.98x while slow; the AVX2 build's pair kernel, slower in L2 than its single tile there
(compute, not memory), may lose on a host whose memory outruns it: the tuner finds out.

``MPITPI_PREFETCH``: ``auto`` (the default) tunes; a number fixes the mode (bits: 1 int4, 2
int6, 4 int8 tiles ask ahead, 8 one stream; 7 all, 0 none), for benchmarks.
"""
from __future__ import annotations

import os
import statistics

from mpitpi import kernels
from mpitpi.errors import MpitpiError

MAX_ROWS = 8


# the modes tried, the first to start with: int8 tiles alone asking (the int4 and int6 ones
# left to the hardware: as fast or faster in every moment measured on 2026-11-29), every tile
# (what earlier sessions' fast moments wanted), both with two streams; and the first with one
# stream (where the two-stream kernel is slower). Another, int4 and int8 tiles asking,
# measured no better than either of the first two (1B int4, 14 rounds: 1.03x the time of none).
MODES = (kernels.PREFETCH_INT8, kernels.PREFETCH_ALL,
         kernels.PREFETCH_INT8 | kernels.ONE_STREAM)


def describe(mode: int | None) -> str:
    """A mode in words: which tiles ask for lines ahead, and the streams (`mpitpi bench`)."""
    if mode is None:
        return "the build's default (every tile asking, two streams)"
    asking = [n for bit, n in ((kernels.PREFETCH_INT4, "int4"), (kernels.PREFETCH_INT6, "int6"),
                               (kernels.PREFETCH_INT8, "int8")) if mode & bit]
    streams = "one stream" if mode & kernels.ONE_STREAM else "two streams"
    return f"{mode}: {'/'.join(asking) or 'no'} tiles asking, {streams}"


class Tuner:
    """One process's choice among ``modes`` (mpitpi_prefetch values), per kind of pass
    (a key: the Runner's is its model and the pass's row count). With more than two modes
    the probes take the others in turn."""

    def __init__(self, modes: tuple[int, ...] = MODES, period: int = 48, max_period: int = 512,
                 probe: int = 4, margin: float = 0.03):
        if not 2 * probe < period <= max_period or len(modes) < 2:
            raise ValueError(f"need 2 * probe < period <= max_period and two modes or more, "
                             f"got {probe}, {period}, {max_period}, {modes}")
        self.modes, self.period, self.max_period = modes, period, max_period
        self.probe, self.margin = probe, margin
        self.state: dict[object, _Shape] = {}
        self.switches = 0    # how often the current mode changed (every kind of pass)

    def mode(self, key) -> int:
        """The mode for the next pass of this kind."""
        s = self.state.get(key)
        if s is None:
            # the first comparison a few passes in, past the first passes' warm-up
            s = self.state[key] = _Shape(i=self.period - 2 * self.probe - 4,
                                          period=self.period)
        return self.modes[self._probed(s) if s.i % s.period >= s.period - self.probe
                          else s.best]

    def _probed(self, s: _Shape) -> int:
        """The index of the mode this period's probes run."""
        return (s.best + 1 + s.turn % (len(self.modes) - 1)) % len(self.modes)

    def record(self, key, seconds: float) -> None:
        """The time of the pass of this kind just run in ``mode(key)``'s mode."""
        s = self.state.get(key)
        if s is None:
            return
        pos = s.i % s.period
        if pos >= s.period - 2 * self.probe:
            (s.probes if pos >= s.period - self.probe else s.base).append(seconds)
        s.i += 1
        if pos == s.period - 1:
            if statistics.median(s.probes) < statistics.median(s.base) * (1 - self.margin):
                s.best = self._probed(s)
                s.period = self.period
                self.switches += 1
            else:
                s.period = min(2 * s.period, self.max_period)
            s.i, s.base, s.probes, s.turn = 0, [], [], s.turn + 1


class _Shape:
    """A kind of pass's state: passes counted in the period, the current mode's index, the
    period, how many periods have ended (which mode the probes take), and the times of this
    period's last current-mode passes and probes."""

    def __init__(self, i: int, period: int):
        self.i, self.best, self.period, self.turn = i, 0, period, 0
        self.base: list[float] = []
        self.probes: list[float] = []


class Control:
    """What a Runner calls around each pass: sets the kernels' mode before it (tuned, or
    fixed by MPITPI_PREFETCH) and reports its time after."""

    def __init__(self, setting: str | None = None):
        setting = os.environ.get("MPITPI_PREFETCH", "auto") if setting is None else setting
        self.tuner: Tuner | None = None
        self.current: int | None = None
        if setting == "auto":
            self.tuner = Tuner()
        else:
            try:
                fixed = int(setting)
            except ValueError:
                fixed = -1
            if not 0 <= fixed <= kernels.PREFETCH_ALL | kernels.ONE_STREAM:
                raise MpitpiError(f"MPITPI_PREFETCH={setting!r} is not a setting. Fix: auto "
                                  "(the default), or 0-15 (bits: 1 int4 tiles, 2 int6, 4 int8 "
                                  "ask for lines ahead; 8 int4 decode rows as one stream).")
            self._set(fixed)

    def summary(self) -> dict:
        """For `mpitpi bench`: the setting, the mode the kernels are in (None: never set,
        the build's default, every tile asking) and how often the tuner switched."""
        return {"setting": "auto" if self.tuner is not None else str(self.current),
                "mode": self.current,
                "switches": self.tuner.switches if self.tuner is not None else 0}

    def reapply(self) -> None:
        """Set this control's mode in the kernels again: something else (another control,
        another build of the library) may have changed it since (jobs/ab_*.py)."""
        if self.current is not None:
            mode, self.current = self.current, None
            self._set(mode)

    def _set(self, mode: int) -> None:
        if mode != self.current:
            kernels.set_prefetch(mode & kernels.PREFETCH_ALL)
            kernels.set_streams(1 if mode & kernels.ONE_STREAM else 2)
            self.current = mode

    def before(self, model, rows: int) -> None:
        """A pass of ``rows`` rows of ``model`` is about to run."""
        if self.tuner is not None and 0 < rows <= MAX_ROWS:
            self._set(self.tuner.mode((id(model), rows)))

    def after(self, model, rows: int, seconds: float) -> None:
        """It took this rank ``seconds``."""
        if self.tuner is not None and 0 < rows <= MAX_ROWS:
            self.tuner.record((id(model), rows), seconds)


_control: Control | None = None


def control() -> Control:
    """The process's Control (one: the kernels' mode is the process's)."""
    global _control
    if _control is None:
        _control = Control()
    return _control
