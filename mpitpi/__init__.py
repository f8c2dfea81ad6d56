"""mpitpi: tensor-parallel Llama inference across MPI ranks on small devices.

The Python API is ``mpitpi.LLM`` (mpitpi/llm.py); the command line is ``mpitpi`` (cli.py).
``mpitpi.LLM`` is loaded on first use (PEP 562): importing the package, or any one module of
it, starts neither torch nor MPI.
"""
import importlib

__version__ = "0.1.0"
__all__ = ["LLM", "Completion", "__version__"]


def __getattr__(name: str):
    if name in ("LLM", "Completion"):
        return getattr(importlib.import_module("mpitpi.llm"), name)
    raise AttributeError(f"module 'mpitpi' has no attribute {name!r}")
