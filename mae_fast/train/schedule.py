"""The paper's optimisation recipe: per-iteration warmup + half-cycle cosine, AdamW parameter groups."""

from __future__ import annotations

import math

import torch
from torch import nn


def lr_factor(step: int, warmup_steps: int, total_steps: int, min_ratio: float = 0.0) -> float:
    """Multiplier of the peak lr at iteration ``step`` (0-based; the value used for that step's update).

    Linear warmup (step + 1) / warmup_steps over the first ``warmup_steps`` iterations, then a half cycle
    of cosine from 1 down to ``min_ratio`` at ``total_steps``.
    """
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if total_steps <= warmup_steps:
        return 1.0
    progress = min(1.0, (step - warmup_steps) / (total_steps - warmup_steps))
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def build_scheduler(optimizer, warmup_steps: int, total_steps: int, peak_lr: float, min_lr: float):
    """A LambdaLR over :func:`lr_factor` (stepped once per optimizer step; its state is checkpointed)."""
    min_ratio = min_lr / peak_lr if peak_lr > 0 else 0.0
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_factor(step, warmup_steps, total_steps, min_ratio)
    )


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Two AdamW groups, as the release: weight decay on every parameter with >= 2 dimensions (Linear and
    conv weights, the cls and mask tokens); none on biases, norms and other 1-D parameters. Frozen
    parameters (the sin-cos position tables) are left out: they are not trained."""
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        if param.ndim <= 1 or name.endswith(".bias"):
            no_decay.append(param)
        else:
            decay.append(param)
    return [
        {"params": decay, "weight_decay": weight_decay, "name": "decay"},
        {"params": no_decay, "weight_decay": 0.0, "name": "no_decay"},
    ]


def build_optimizer(model: nn.Module, lr: float, weight_decay: float, betas):
    """AdamW(betas) over :func:`param_groups` with fused=True (torch has fused AdamW for CUDA and CPU).

    The fused kernel also accepts a device-side ``found_inf`` flag, which the training loop uses to skip
    an update after a non-finite loss without waiting for the host.
    """
    return torch.optim.AdamW(param_groups(model, weight_decay), lr=lr, betas=tuple(betas), fused=True)
