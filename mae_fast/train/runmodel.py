"""The model of a run: built from a :class:`TrainConfig`, or loaded back from what ``mae-fast pretrain`` wrote.

``loop`` (training), ``eval`` and ``visualize`` all need these; they live here, below all three, so that
none of those modules has to import another to get them.
"""

from __future__ import annotations

import argparse

import torch

from mae_fast.models import create_model, list_models, load_checkpoint
from mae_fast.models.checkpoint import read_checkpoint_file
from mae_fast.train import data
from mae_fast.train.config import TrainConfig


def resolve_device(config: TrainConfig) -> torch.device:
    if config.device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(config.device)


def data_in_chans(config: TrainConfig) -> int:
    return config.data_channels()


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
    """(model on the CPU, TrainConfig) from a training checkpoint or an export of ``mae-fast pretrain``, or
    a full checkpoint of the MAE release (its ``args`` Namespace names the model, image size and mask ratio).

    ``random_init=True`` returns the same architecture at the run's initialisation (same seed), the
    baseline the pretrained encoder is compared with.
    """
    state = read_checkpoint_file(path)
    values = state.get("config") or state.get("args")
    if isinstance(values, argparse.Namespace):
        values = _release_settings(path, vars(values))
    if not isinstance(values, dict):
        raise ValueError(f"{path} holds no run config ('config' or 'args'): was it written by mae-fast pretrain?")
    config = TrainConfig.from_dict({**values, "device": "cpu", "backend": "auto"})
    model = build_model(config, torch.device("cpu"))
    if not random_init:
        load_checkpoint(model, state)
    return model.eval(), config


def _release_settings(path: str, args: dict) -> dict:
    """The TrainConfig fields of the release's training ``args`` (an ImageNet run of a named model)."""
    missing = [name for name in ("model", "input_size", "mask_ratio", "norm_pix_loss") if name not in args]
    if missing:
        raise ValueError(f"{path}: the release's 'args' lack {', '.join(missing)}")
    if args["model"] not in list_models():
        raise ValueError(f"{path}: the release's model {args['model']!r} is none of {', '.join(list_models())}")
    return {
        "model": args["model"],
        "img_size": args["input_size"],
        "mask_ratio": args["mask_ratio"],
        "norm_pix_loss": args["norm_pix_loss"],
        "data": "imagefolder",
        "data_path": args.get("data_path"),
    }


def normalisation(config: TrainConfig) -> tuple[tuple, tuple]:
    """The (mean, std) per channel the run normalised its images with."""
    if config.data == "fashion-mnist":
        return data.FASHION_MNIST_MEAN, data.FASHION_MNIST_STD
    if config.data == "imagefolder":
        return data.IMAGENET_MEAN, data.IMAGENET_STD
    return (0.0,) * 3, (1.0,) * 3
