"""Where a rank's layers live: all resident, or streamed from its shard through a window.

The model asks ``layers.get(i)`` for layer i's weights (a ``weights.LayerWeights``) and calls
``layers.done(i)`` when it has finished with them; it always walks the layers in order,
0 .. n_layers-1, once per forward pass. ``LayerStore`` writes that contract down; ``Resident``
and ``Streamed`` are the two stores.

``Streamed`` keeps the first ``n_resident`` layers in memory for good and streams the rest:
a background thread reads them, in the order the model will ask, into ``window`` preallocated
slots, so at most ``window`` streamed layers are in memory at once. Reads use ``os.preadv``,
which releases the GIL, so they overlap compute.
"""
from __future__ import annotations

import queue
import re
import threading
import time
from typing import Protocol

import numpy as np
import torch

from mpitpi.errors import MpitpiError
from mpitpi.shards import ShardReader
from mpitpi.weights import LayerWeights, from_numpy, vectors_fp32

_SIZE = re.compile(r"^\s*([0-9]*\.?[0-9]+)\s*([kKmMgGtT]?)(i?[bB])?\s*$")


def parse_size(text: str, flag: str = "--memory-budget") -> int:
    """'1.5G' / '800M' / '2GiB' / '123456' -> bytes (powers of 1024); ``flag`` names the
    option in the error."""
    m = _SIZE.match(str(text))
    if not m:
        raise MpitpiError(f"{flag} {text!r} is not a size. Fix: e.g. 1.5G, 800M.")
    unit = {"": 1, "k": 2**10, "m": 2**20, "g": 2**30, "t": 2**40}[m.group(2).lower()]
    return int(float(m.group(1)) * unit)


class LayerStore(Protocol):
    """Where the model gets its layers. ``get(i)`` may block until layer i is in memory;
    ``done(i)`` says the model has finished with it (its memory may be reused)."""
    n_resident: int            # layers kept in memory for good
    window: int | None         # slots the other layers stream through; None: all resident
    kinds: set[str]            # the storages of the layers' matrices (weights.DTYPES keys)
    layer_nbytes: int          # bytes of one layer's slices as stored
    wait_s: float              # seconds ``get`` has waited for reads so far

    def __len__(self) -> int: ...
    def get(self, i: int) -> LayerWeights: ...
    def done(self, i: int) -> None: ...
    def close(self) -> None: ...


def read_layer(reader: ShardReader, i: int) -> LayerWeights:
    """Layer i of ``reader``'s file, read now (vectors as fp32; int4 and int8 matrices in the
    kernels' tiles)."""
    return LayerWeights.from_stored(vectors_fp32(reader.layer(i))).tile_rows()


class Resident:
    """Every layer in memory (the default)."""

    window = None

    def __init__(self, layers: list[LayerWeights], layer_nbytes: int):
        self.layers = layers
        self.kinds = set().union(*(w.kinds() for w in layers))
        self.n_resident = len(layers)
        self.layer_nbytes = layer_nbytes
        self.wait_s = 0.0

    def __len__(self) -> int:
        return len(self.layers)

    def get(self, i: int) -> LayerWeights:
        return self.layers[i]

    def done(self, i: int) -> None:
        pass

    def close(self) -> None:
        pass


class Streamed:
    """Layers [0, n_resident) resident; the rest read ahead through ``window`` slots.

    A background thread walks the streamed layers in the order the model asks for them. For
    each it takes a free slot, fills it with the layer (``_fill``, overwriting what the slot
    held) and queues it; ``get`` takes the next queued layer, ``done`` frees its slot.
    ``wait_s`` accumulates the time ``get`` waited: I/O not hidden behind compute.

    Slots are filled by copying: ``os.preadv`` into preallocated buffers, which the model
    reads in the stored dtype (1-D vectors are converted to fp32). (Mapping the file
    instead, with MADV_POPULATE_READ to fill and MADV_DONTNEED to drop, was measured slower
    here: the page-table work cost more than the copy.)
    """

    def __init__(self, reader: ShardReader, n_layers: int, n_resident: int, window: int):
        self.reader, self.n = reader, n_layers
        self.layer_nbytes = layer_bytes(reader)
        self.resident = [read_layer(reader, i) for i in range(n_resident)]
        self.n_resident = n_resident
        self.streamed = list(range(n_resident, n_layers))
        self.window = min(window, max(1, len(self.streamed)))
        self.wait_s = 0.0
        self.kinds = set().union(*(w.kinds() for w in self.resident))
        self._stop = threading.Event()
        self._free: queue.Queue = queue.Queue()
        self._ready: queue.Queue = queue.Queue()
        self._thread = None
        if not self.streamed:
            return
        for slot in self._slots():
            self.kinds |= slot[2].kinds()
            self._free.put(slot)
        self._thread = threading.Thread(target=self._run, name="mpitpi-prefetch", daemon=True)
        self._thread.start()

    def _slots(self) -> list:
        """``window`` slots, each (raw buffers as stored, fp32 copies of the 1-D vectors,
        the LayerWeights the model reads: views of the buffers and the copies)."""
        first, names = self.streamed[0], self.reader.layer_names(self.streamed[0])
        slots = []
        for _ in range(self.window):
            raw = dict(zip(names, self.reader.empty_many([f"layers/{first}/{n}"
                                                           for n in names])))
            tensors = {n: from_numpy(a) for n, a in raw.items()}
            vectors = {n: torch.empty(t.shape) for n, t in tensors.items() if t.dim() == 1}
            slots.append((raw, vectors, LayerWeights.from_stored({**tensors, **vectors})))
        return slots

    def _fill(self, layer: int, slot) -> LayerWeights:
        raw, vectors, weights = slot
        for name, buf in raw.items():
            self.reader.read_into(f"layers/{layer}/{name}", buf)
            if name in vectors:
                vectors[name].copy_(from_numpy(buf))
        # fp16 tiles: coding them costs this thread 2.3 ms per layer of the 1B shape, read
        # again every token (--window 2 --drop-cache: 454-514 against 430-452 ms/token)
        return weights.tile_rows(coded=False)

    def __len__(self) -> int:
        return self.n

    def _run(self) -> None:
        i = 0
        try:
            while not self._stop.is_set():
                try:
                    slot = self._free.get(timeout=0.2)
                except queue.Empty:
                    continue
                layer = self.streamed[i % len(self.streamed)]
                self.reader.check_unchanged()
                self._ready.put((layer, slot, self._fill(layer, slot)))
                i += 1
        except BaseException as e:   # handed to the compute thread, which raises it
            self._ready.put((None, e, None))

    def get(self, i: int) -> LayerWeights:
        if i < len(self.resident):
            return self.resident[i]
        t0 = time.perf_counter()
        layer, slot, tensors = self._ready.get()
        self.wait_s += time.perf_counter() - t0
        if layer is None:
            self._stop.set()
            raise MpitpiError(f"reading layer {i} from {self.reader.path} (rank "
                              f"{self.reader.rank}) failed: {slot}")
        if layer != i:
            raise RuntimeError(f"prefetch order broken: wanted layer {i}, got {layer}")
        self._current = slot
        return tensors

    def done(self, i: int) -> None:
        if i >= len(self.resident):
            self._free.put(self._current)

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        self.reader.close()


def layer_bytes(reader: ShardReader, i: int = 0) -> int:
    """Bytes one layer's slices take in memory (as stored)."""
    return sum(reader.nbytes(f"layers/{i}/{n}") for n in reader.layer_names(i))


def _human(n: int, up: bool = False) -> str:
    """Bytes as a --memory-budget value: 1.5G, 300M, 12K (rounded up when ``up``)."""
    for unit, size in (("G", 2**30), ("M", 2**20), ("K", 2**10)):
        if n >= size:
            v = n / size
            v = np.ceil(v * 10) / 10 if up else v
            return f"{v:.1f}{unit}".replace(".0" + unit, unit)
    return str(n)


def plan_residency(n_layers: int, layer_bytes: int, fixed_bytes: int, budget: int | None,
                   window: int | None) -> tuple[int, int | None]:
    """(layers kept resident, window for the rest or None when all are resident).

    ``budget`` covers the weights this rank holds in memory: ``fixed_bytes`` (embedding and
    lm_head rows, norms) + resident layers + ``window`` streaming slots (2 when not given).
    """
    if window is not None and window < 1:
        raise MpitpiError(f"--window must be at least 1, got {window}.")
    if budget is None:
        return (0, window) if window else (n_layers, None)
    w = window or 2
    if fixed_bytes + n_layers * layer_bytes <= budget:
        return n_layers, None
    smallest = fixed_bytes + min(w, n_layers) * layer_bytes
    if budget < smallest:
        raise MpitpiError(f"--memory-budget {_human(budget)} is too small: this rank's "
                          f"embedding rows need {_human(fixed_bytes)} and a window of {w} "
                          f"layers {_human(w * layer_bytes)}. Fix: give at least "
                          f"--memory-budget {_human(smallest, up=True)}, a smaller --window, "
                          f"or more ranks.")
    resident = min(n_layers - 1, (budget - smallest) // layer_bytes)
    return int(resident), w
