"""mpitpi: tensor-parallel Llama inference across MPI ranks on small devices."""

__version__ = "0.1.0"
