"""MAE pretraining: ``pretrain(TrainConfig(...))``, data, schedule, checkpoints, pictures and evaluation.

Submodules: ``config`` (TrainConfig), ``data`` (embedded Fashion-MNIST, ImageFolder, synthetic), ``schedule``
(lr rule, AdamW groups), ``checkpointing`` (atomic, exact resume), ``distributed`` (torchrun, DDP / FSDP2),
``runmodel`` (the run's model: built from a config, loaded from a checkpoint), ``loop`` (``pretrain``),
``visualize`` (reconstruction grids, loss curve), ``eval`` (kNN, linear probe).
"""

from mae_fast.train.config import TrainConfig
from mae_fast.train.loop import NonFiniteLossError, PretrainResult, pretrain

__all__ = ["NonFiniteLossError", "PretrainResult", "TrainConfig", "pretrain"]
