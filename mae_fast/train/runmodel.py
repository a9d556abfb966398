"""The model of a run: built from a :class:`TrainConfig`, or loaded back from what ``mae-fast pretrain`` wrote.

``loop`` (training), ``eval`` and ``visualize`` all need these; they live here, below all three, so that
none of those modules has to import another to get them.
"""

from __future__ import annotations

import os

import torch

from mae_fast.models import create_model, load_checkpoint
from mae_fast.train import data
from mae_fast.train.config import TrainConfig


def resolve_device(config: TrainConfig) -> torch.device:
    if config.device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(config.device)


def data_in_chans(config: TrainConfig) -> int:
    return 1 if config.data == "fashion-mnist" else 3


def build_model(config: TrainConfig, device: torch.device):
    """The MAE of ``config``, initialised from config.seed (so every rank and every rerun starts the same)
    without touching the global random state."""
    probe_kwargs = {**config.model_kwargs, "in_chans": data_in_chans(config), "depth": 0, "decoder_depth": 0}
    img_size = data.default_img_size(config, create_model(config.model, **probe_kwargs).img_size[0])
    kwargs = {
        **config.model_kwargs,
        "img_size": img_size,
        "in_chans": data_in_chans(config),
        "norm_pix_loss": config.norm_pix_loss,
        "backend": config.backend,  # "auto": the kernels on a GPU, the torch backend on the CPU
    }
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        model = create_model(config.model, **kwargs)
    return model.to(device)


def model_from_checkpoint(path: str, random_init: bool = False):
    """(model on the CPU, TrainConfig) from a training checkpoint or an export of ``mae-fast pretrain``.

    ``random_init=True`` returns the same architecture at the run's initialisation (same seed), the
    baseline the pretrained encoder is compared with.
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint not found: {path}")
    state = torch.load(path, map_location="cpu", weights_only=True)
    values = state.get("config") or state.get("args")
    if not isinstance(values, dict):
        raise ValueError(f"{path} holds no run config ('config' or 'args'): was it written by mae-fast pretrain?")
    config = TrainConfig.from_dict({**values, "device": "cpu", "backend": "auto"})
    model = build_model(config, torch.device("cpu"))
    if not random_init:
        load_checkpoint(model, state)
    return model.eval(), config


def normalisation(config: TrainConfig) -> tuple[tuple, tuple]:
    """The (mean, std) per channel the run normalised its images with."""
    if config.data == "fashion-mnist":
        return data.FASHION_MNIST_MEAN, data.FASHION_MNIST_STD
    if config.data == "imagefolder":
        return data.IMAGENET_MEAN, data.IMAGENET_STD
    return (0.0,) * 3, (1.0,) * 3
