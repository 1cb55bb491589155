"""Lethe's unlearning engine: architectures, data, training, unlearning methods and verification.

The engine knows nothing about HTTP, queues or databases. Importing the package itself is
cheap and torch-free; the torch-backed parts live in submodules that callers import
explicitly (`engine.unlearning`, `engine.training`, `engine.checkpoint`, ...), so the API
process can use `engine.datasets` and `engine.errors` without loading torch.
"""

__all__ = ["__version__"]
__version__ = "0.1.0"
