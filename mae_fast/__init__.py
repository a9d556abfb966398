"""mae_fast: fast MAE (Masked Autoencoder) pretraining of Vision Transformers on NVIDIA GPUs."""

from mae_fast import backends, models, nn, ops
from mae_fast.dispatch import get_backend, set_backend, use_backend
from mae_fast.interop import patch

__version__ = "0.1.0"

__all__ = ["__version__", "backends", "get_backend", "models", "nn", "ops", "patch", "set_backend", "use_backend"]
