"""Decode matrix-vector products in C (csrc/matvec.c), built for the host on first use.

``matvec(x, w, scale)`` returns x (T, in) fp32 @ w (out, in).T as (T, out) fp32, reading
w in its stored dtype (fp32, bf16, fp16, or int8 times its group scales, quant.py).
On this project's CPUs torch's own fp32 matrix-vector product streams weights at about a
third of the memory bandwidth and it has no weight-only int8 product worth using; these
loops run near the bandwidth (docs/BENCHMARKS.md).

The library is compiled with the host's C compiler (-march=native: every host builds its
own) into ``$MPITPI_CACHE/kernels`` under a name that hashes the source, the flags, the
compiler and the CPU, written to a temporary file and renamed into place so that ranks
starting together cannot see half a file. It links OpenMP, which resolves to the runtime
torch has already loaded, so torch's thread setting (``--threads``) applies to it too.
Without a compiler, or with ``MPITPI_KERNELS=0``, ``available()`` is False and the model
uses torch alone (slower, same results within rounding).
"""
from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import time

import torch

from mpitpi.files import cache_root
from mpitpi.quant import GROUP

SOURCE = os.path.join(os.path.dirname(__file__), "csrc", "matvec.c")
FLAGS = ["-O3", "-march=native", "-ffast-math", "-fopenmp", "-shared", "-fPIC"]
# rows of x up to which the kernels beat torch's products (measured on AVX-512 and AVX2 hosts,
# docs/BENCHMARKS.md); int8 always: torch has no fast weight-only int8 product
MAX_T = {torch.float32: 8, torch.bfloat16: 2, torch.float16: 2, torch.int8: 1 << 30}

_FUNCS = {torch.float32: "matvec_f32", torch.bfloat16: "matvec_bf16",
          torch.float16: "matvec_f16", torch.int8: "matvec_i8"}
_lib = None          # the loaded library, once built
_why_not = None      # why it is not available, once that is known


def _cpu_id() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(("flags", "Features")):
                    return line
    except OSError:
        pass
    return ""


def _compiler() -> str | None:
    return os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")


def library_path(cc: str) -> str:
    version = subprocess.run([cc, "--version"], capture_output=True, text=True).stdout
    with open(SOURCE, "rb") as f:
        key = f.read() + " ".join(FLAGS).encode() + version.encode() + _cpu_id().encode()
    digest = hashlib.sha256(key).hexdigest()[:16]
    return os.path.join(cache_root(), "kernels", f"matvec-{digest}.so")


def build() -> str:
    """Compile the library if this host has none yet; return its path. Raises on failure."""
    cc = _compiler()
    if cc is None:
        raise RuntimeError("no C compiler (cc/gcc) on this host")
    path = library_path(cc)
    if os.path.isfile(path):
        return path
    os.makedirs(os.path.dirname(path), exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=os.path.dirname(path))
    os.close(fd)
    try:
        r = subprocess.run([cc, *FLAGS, "-o", tmp, SOURCE], capture_output=True, text=True)
        if r.returncode != 0:
            raise RuntimeError(f"{cc} failed: {r.stderr.strip()[-500:]}")
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def _load():
    global _lib, _why_not
    if _lib is not None or _why_not is not None:
        return _lib
    if os.environ.get("MPITPI_KERNELS", "1") == "0":
        _why_not = "MPITPI_KERNELS=0"
        return None
    try:
        lib = ctypes.CDLL(build())
        p, i64 = ctypes.c_void_p, ctypes.c_int64
        for name in _FUNCS.values():   # (x, w, y, T, in, out); int8: (x, w, scale, ...group)
            getattr(lib, name).argtypes = ([p, p, p, p, i64, i64, i64, i64]
                                           if name == "matvec_i8" else [p, p, p, i64, i64, i64])
            getattr(lib, name).restype = None
        _lib = lib
    except (OSError, RuntimeError, subprocess.SubprocessError) as e:
        _why_not = str(e)
        print(f"mpitpi: warning: C kernels unavailable ({e}); decoding with torch alone, "
              f"which is slower. Fix: install a C compiler (e.g. apt-get install gcc).",
              file=sys.stderr)
    return _lib


def available() -> bool:
    return _load() is not None


def matvec(x: torch.Tensor, w: torch.Tensor, scale: torch.Tensor | None = None) -> torch.Tensor:
    """x (T, in) fp32 @ w (out, in).T -> (T, out) fp32; int8 w is times its ``scale``.

    Contract: ``available()`` is True; w and scale are contiguous; int8 w comes with
    ``scale`` (out, ceil(in / quant.GROUP)) fp32 (quant.py), other dtypes without.
    """
    lib = _load()
    x = x.contiguous()
    T, n_in = x.shape
    n_out = w.shape[0]
    out = torch.empty(T, n_out)
    if w.dtype == torch.int8:
        lib.matvec_i8(x.data_ptr(), w.data_ptr(), scale.data_ptr(), out.data_ptr(),
                      T, n_in, n_out, GROUP)
    else:
        getattr(lib, _FUNCS[w.dtype])(x.data_ptr(), w.data_ptr(), out.data_ptr(),
                                      T, n_in, n_out)
    return out


if __name__ == "__main__":   # `python -m mpitpi.kernels`: build now (make install runs it)
    t0 = time.perf_counter()
    try:
        path = build()
    except (RuntimeError, OSError) as e:
        sys.exit(f"mpitpi: C kernels not built: {e}")
    print(f"mpitpi: C kernels ready in {time.perf_counter() - t0:.1f} s: {path}")
