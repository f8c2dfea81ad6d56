"""mpitpi: tensor-parallel Llama inference across MPI ranks on small devices.

The Python API is ``mpitpi.LLM`` (mpitpi/llm.py); the command line is ``mpitpi`` (cli.py).
"""

__version__ = "0.1.0"

from mpitpi.llm import LLM, Completion  # noqa: E402  (after __version__, which cli reads)

__all__ = ["LLM", "Completion", "__version__"]
