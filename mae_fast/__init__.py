"""mae_fast: fast MAE (Masked Autoencoder) pretraining of Vision Transformers on NVIDIA GPUs."""

from mae_fast import models, nn, ops
from mae_fast.dispatch import get_backend, set_backend, use_backend

__version__ = "0.1.0"

__all__ = ["__version__", "get_backend", "models", "nn", "ops", "set_backend", "use_backend"]
