"""``mae-fast finetune``: supervised fine-tuning of a pretrained MAE encoder with the release's recipe.

The recipe of the release's main_finetune.py: the encoder as a classification ViT on mae_fast's blocks
(global average pooling + fc_norm, or the cls token), layer-wise lr decay, stochastic depth, timm's
Mixup / CutMix with soft-target cross-entropy (label smoothing), RandAugment and random erasing through
timm's ``create_transform``, AdamW with lr = blr x batch / 256, warmup then half-cycle cosine per
iteration, optional gradient clipping and accumulation, top-1 / top-5 / loss on the validation split.

Checkpoints are written atomically with everything an exact resume needs (weights, AdamW, the fp16
GradScaler, the data position, every random generator), so a resumed run on the CPU is bit-identical to
an uninterrupted one, also mid-epoch. SIGTERM / SIGINT end the current step in such a checkpoint (the
handler of pretraining, ``loop.StopFlag``) and the run returns with ``interrupted`` set. ``--demo``
fine-tunes the export of ``mae-fast pretrain --demo`` and the same network from random init on the
embedded Fashion-MNIST subset and prints both accuracies. ``--linprobe`` (``linprobe=True``) is the
release's linear probe through the same machinery (main_linprobe.py: the frozen encoder's cls token into
BatchNorm1d + Linear, timm's LARS, RandomResizedCrop + flip; :data:`LINPROBE`).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import random
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset

from mae_fast.interop._common import count_blocks, state_dict_from
from mae_fast.models.classifier import ENCODERS, VisionTransformerClassifier, encoder_state_dict, load_pretrained
from mae_fast.train import checkpointing, data, distributed
from mae_fast.train.config import split_global_batch
from mae_fast.train.loop import StopFlag
from mae_fast.train.schedule import lr_factor

PRECISIONS = ("auto", "fp32", "bf16", "fp16")
MIXUP_MODES = ("batch", "pair", "elem")
DATA_SOURCES = ("fashion-mnist", "imagefolder")

#: The release's fine-tuning settings per model size (FINETUNE.md).
PRESETS = {
    "vit_b": dict(model="vit_base_patch16", blr=5e-4, layer_decay=0.65, drop_path=0.1, epochs=100),
    "vit_l": dict(model="vit_large_patch16", blr=1e-3, layer_decay=0.75, drop_path=0.2, epochs=50),
    "vit_h": dict(model="vit_huge_patch14", blr=1e-3, layer_decay=0.75, drop_path=0.3, epochs=50),
}

#: The release's linear probe (main_linprobe.py / FINETUNE.md), applied under ``linprobe=True`` by
#: :meth:`FinetuneConfig.from_dict` (after a preset, before the settings given): the frozen encoder's cls
#: token into BatchNorm1d(affine=False) + Linear, LARS without weight decay, RandomResizedCrop + flip only.
LINPROBE = dict(
    global_pool=False, epochs=90, warmup_epochs=10.0, batch_size=16384, blr=0.1, min_lr=0.0, weight_decay=0.0,
    layer_decay=1.0, drop_path=0.0, mixup=0.0, cutmix=0.0, smoothing=0.0, aa=None, reprob=0.0,
)  # fmt: skip
#: LARS's momentum and trust coefficient in the release's linear probe (util/lars.py).
LARS_MOMENTUM, LARS_TRUST_COEFF = 0.9, 0.001
#: trunc_normal std of the probe's Linear weight (the release's).
PROBE_HEAD_INIT_STD = 0.01

# Fields a resume may change (where the run executes and reports); all others are fixed by the checkpoint.
RESUME_MAY_CHANGE = ("resume", "output_dir", "num_workers", "device", "log_every", "ckpt_every", "keep_last",
                     "max_steps", "data_path", "progress")  # fmt: skip


# --- layer-wise lr decay -------------------------------------------------------------------------------


def layer_id_for_vit(name: str, num_layers: int) -> int:
    """BEiT's / the release's layer of a timm ViT parameter: 0 for cls_token, pos_embed and patch_embed.*,
    i + 1 for blocks.i.*, ``num_layers`` (depth + 1) for everything else (norms, fc_norm, head)."""
    if name in ("cls_token", "pos_embed") or name.startswith("patch_embed"):
        return 0
    if name.startswith("blocks."):
        return int(name.split(".")[1]) + 1
    return num_layers


def param_groups_layer_decay(
    model: nn.Module, weight_decay: float = 0.05, layer_decay: float = 0.75, no_weight_decay=()
) -> list[dict]:
    """AdamW parameter groups with layer-wise lr decay, the release's ``param_groups_lrd``.

    One group per (layer id, decay or not): ``lr_scale`` = layer_decay ** (depth + 1 - layer id) and
    ``weight_decay`` (0 for 1-D parameters and for the names in ``no_weight_decay``). The depth is the
    number of ``blocks.i`` of ``model``. Frozen parameters are left out. The scheduler multiplies each
    group's lr by its ``lr_scale``.
    """
    if not isinstance(weight_decay, (int, float)) or not math.isfinite(weight_decay) or weight_decay < 0:
        raise ValueError(f"weight_decay must be a finite number >= 0, got {weight_decay!r}")
    if not isinstance(layer_decay, (int, float)) or not 0 < layer_decay <= 1:
        raise ValueError(f"layer_decay must be in (0, 1], got {layer_decay!r}")
    skip = set(no_weight_decay)
    names = [name for name, _ in model.named_parameters()]
    num_layers = count_blocks(dict.fromkeys(names), "blocks.") + 1
    groups: dict[str, dict] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        no_decay = param.ndim == 1 or name in skip
        layer = layer_id_for_vit(name, num_layers)
        key = f"layer_{layer}_{'no_decay' if no_decay else 'decay'}"
        if key not in groups:
            groups[key] = {
                "params": [],
                "param_names": [],
                "lr_scale": float(layer_decay ** (num_layers - layer)),
                "weight_decay": 0.0 if no_decay else float(weight_decay),
                "name": key,
            }
        groups[key]["params"].append(param)
        groups[key]["param_names"].append(name)
    return list(groups.values())


# --- configuration -------------------------------------------------------------------------------------


@dataclass
class FinetuneConfig:
    """Every setting of a fine-tuning run (the release's defaults; see :data:`PRESETS`)."""

    pretrained: str | None = None  # None: train the same network from its random initialisation
    model: str | None = None  # a name of models.classifier.ENCODERS; None: read from the pretrained file
    model_kwargs: dict = field(default_factory=dict)
    preset: str | None = None
    data: str = "imagefolder"
    data_path: str | None = None
    train_limit: int | None = None  # fine-tune on the first N training images (small-data runs, the demo)
    img_size: int | None = None  # None: the pretrained grid (28 for fashion-mnist)
    global_pool: bool = True
    epochs: int = 50
    max_steps: int | None = None
    warmup_epochs: float = 5.0
    batch_size: int = 1024
    accum_steps: int = 1
    blr: float = 1e-3
    lr: float | None = None
    min_lr: float = 1e-6
    weight_decay: float = 0.05
    layer_decay: float = 0.75
    drop_path: float = 0.1
    clip_grad: float | None = None
    mixup: float = 0.8
    cutmix: float = 1.0
    cutmix_minmax: tuple | None = None
    mixup_prob: float = 1.0
    mixup_switch_prob: float = 0.5
    mixup_mode: str = "batch"
    smoothing: float = 0.1
    aa: str | None = "rand-m9-mstd0.5-inc1"
    reprob: float = 0.25
    remode: str = "pixel"
    recount: int = 1
    precision: str = "auto"
    seed: int = 0
    device: str = "auto"
    num_workers: int = 2
    eval_batch_size: int = 256
    output_dir: str = "runs/finetune"
    log_every: int = 20
    ckpt_every: int = 0  # steps between checkpoints; 0: at the end of every epoch
    keep_last: int = 2
    resume: str | None = None
    progress: bool = True
    linprobe: bool = False  # the release's linear probe: frozen encoder, BN + Linear head, LARS (LINPROBE)
    model_ema: bool = False  # also keep timm's ModelEmaV3 of the weights: evaluated, checkpointed, exported
    model_ema_decay: float = 0.9999

    def to_dict(self) -> dict:
        values = dataclasses.asdict(self)
        if values["cutmix_minmax"] is not None:
            values["cutmix_minmax"] = list(values["cutmix_minmax"])
        return values

    @classmethod
    def from_dict(cls, values: dict) -> FinetuneConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown fine-tuning settings: {', '.join(unknown)}")
        preset = values.get("preset")
        defaults = {}
        if preset is not None:
            if preset not in PRESETS:
                raise ValueError(f"preset: unknown preset {preset!r}; known: {', '.join(PRESETS)}")
            defaults.update(PRESETS[preset])
        if values.get("linprobe"):
            defaults.update(LINPROBE)
        if defaults:
            values = {**defaults, **{k: v for k, v in values.items() if v is not None}}
        return cls(**values)

    def validate(self) -> FinetuneConfig:
        """ValueError naming the first setting out of its range."""
        if self.model is not None and self.model not in ENCODERS:
            raise ValueError(f"model: unknown model {self.model!r}; known: {', '.join(sorted(ENCODERS))}")
        if self.data not in DATA_SOURCES:
            raise ValueError(f"data must be one of {', '.join(DATA_SOURCES)}, got {self.data!r}")
        if self.data == "imagefolder":
            if not self.data_path:
                raise ValueError("data_path: --data imagefolder needs --data-path DIR (DIR/train, DIR/val)")
            if not os.path.isdir(os.path.join(self.data_path, "val")):
                raise ValueError(f"data_path: {self.data_path} has no val/ folder (expected DIR/train and DIR/val)")
        for name in ("epochs", "batch_size", "accum_steps", "eval_batch_size", "log_every", "keep_last"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be an int >= 1, got {value!r}")
        for name in ("num_workers", "ckpt_every", "recount", "seed"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ValueError(f"{name} must be an int >= 0, got {value!r}")
        if self.train_limit is not None and (not isinstance(self.train_limit, int) or self.train_limit < 1):
            raise ValueError(f"train_limit must be an int >= 1 or None, got {self.train_limit!r}")
        if self.max_steps is not None and (not isinstance(self.max_steps, int) or self.max_steps < 1):
            raise ValueError(f"max_steps must be an int >= 1 or None, got {self.max_steps!r}")
        if self.batch_size % self.accum_steps:
            raise ValueError(f"batch_size={self.batch_size} must be a multiple of accum_steps={self.accum_steps}")
        in_range = (
            ("mixup", 0.0, None), ("cutmix", 0.0, None), ("mixup_prob", 0.0, 1.0), ("mixup_switch_prob", 0.0, 1.0),
            ("smoothing", 0.0, 1.0), ("reprob", 0.0, 1.0), ("warmup_epochs", 0.0, None), ("blr", 0.0, None),
            ("min_lr", 0.0, None), ("weight_decay", 0.0, None), ("layer_decay", 0.0, 1.0), ("drop_path", 0.0, 1.0),
        )  # fmt: skip
        for name, low, high in in_range:
            value = getattr(self, name)
            bad = not isinstance(value, (int, float)) or not math.isfinite(value) or value < low
            if bad or (high is not None and value > high):
                allowed = f"in [{low}, {high}]" if high is not None else f">= {low}"
                raise ValueError(f"{name} must be a finite number {allowed}, got {value!r}")
        if self.drop_path >= 1.0:
            raise ValueError(f"drop_path must be in [0, 1), got {self.drop_path}")
        if self.layer_decay <= 0:
            raise ValueError(f"layer_decay must be in (0, 1], got {self.layer_decay}")
        if self.mixup_mode not in MIXUP_MODES:
            raise ValueError(f"mixup_mode must be one of {', '.join(MIXUP_MODES)}, got {self.mixup_mode!r}")
        if self.mixup_active and (self.batch_size // self.accum_steps) % 2:
            raise ValueError("batch_size / accum_steps must be even when mixup or cutmix is on (timm's Mixup)")
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}")
        if self.device not in ("auto", "cpu", "cuda"):
            raise ValueError(f"device must be auto, cpu or cuda, got {self.device!r}")
        for name in ("lr", "clip_grad"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0):
                raise ValueError(f"{name} must be a finite number > 0 or None, got {value!r}")
        if self.img_size is not None and (not isinstance(self.img_size, int) or self.img_size < 1):
            raise ValueError(f"img_size must be an int >= 1 or None, got {self.img_size!r}")
        if self.output_dir == "":
            raise ValueError("output_dir must not be empty")
        if not isinstance(self.linprobe, bool):
            raise ValueError(f"linprobe must be True or False, got {self.linprobe!r}")
        if not isinstance(self.model_ema, bool):
            raise ValueError(f"model_ema must be True or False, got {self.model_ema!r}")
        decay = self.model_ema_decay
        if isinstance(decay, bool) or not isinstance(decay, (int, float)) or not 0.0 <= decay < 1.0:
            raise ValueError(f"model_ema_decay must be a number in [0, 1), got {decay!r}")
        if self.linprobe:
            frozen_only = (("mixup", self.mixup, 0.0), ("cutmix", self.cutmix, 0.0), ("drop_path", self.drop_path, 0.0),
                           ("reprob", self.reprob, 0.0), ("aa", self.aa, None),
                           ("cutmix_minmax", self.cutmix_minmax, None))  # fmt: skip
            for name, value, allowed in frozen_only:
                if value != allowed:
                    raise ValueError(
                        f"{name}: the linear probe trains on RandomResizedCrop + flip only, without mixing or "
                        f"drop path; {name} must be {allowed}, got {value!r}"
                    )
        return self

    def capped_to(self, train_images: int) -> FinetuneConfig:
        """The linear probe's batch capped by a small training split: at most ``train_images`` (rounded down
        to a multiple of ``accum_steps``), so that an epoch is one step at least; the lr follows the capped
        batch (blr x batch / 256). Other runs, and batches that fit, are returned as they are."""
        if not self.linprobe or self.batch_size <= train_images:
            return self
        capped = train_images - train_images % self.accum_steps
        if capped < self.accum_steps:
            raise ValueError(
                f"batch_size: {train_images} training image(s) cannot fill accum_steps={self.accum_steps} "
                "micro-batches"
            )
        return dataclasses.replace(self, batch_size=capped)

    @property
    def mixup_active(self) -> bool:
        return self.mixup > 0 or self.cutmix > 0 or self.cutmix_minmax is not None

    @property
    def peak_lr(self) -> float:
        return self.lr if self.lr is not None else self.blr * self.batch_size / 256


# --- the network ---------------------------------------------------------------------------------------


def _pretrained_settings(path: str) -> tuple[dict, dict]:
    """(state_dict, settings) of a pretrained file; settings are the ``args`` / ``config`` dict of an
    export or checkpoint of ``mae-fast pretrain`` (model name, model_kwargs, img_size), else {}."""
    if os.path.isdir(path):  # a transformers save_pretrained folder
        return encoder_state_dict(path), {}
    raw = checkpointing.read_checkpoint_file(path)
    settings = raw.get("args") if isinstance(raw.get("args"), dict) else raw.get("config")
    return state_dict_from(raw), settings if isinstance(settings, dict) else {}


def classifier_kwargs(config: FinetuneConfig, num_classes: int, in_chans: int, state=None, settings=None) -> dict:
    """The classifier's constructor arguments: the named encoder (``config.model``, or the pretrained
    run's model, or the official config whose width, depth and patch match the weights), then
    ``config.model_kwargs``, the data's channels and classes, the image size and the recipe's drop path."""
    settings = settings or {}
    name = config.model
    kwargs: dict = {}
    if name is None and settings.get("model"):
        name = str(settings["model"]).removeprefix("mae_")
        encoder_keys = ("patch_size", "embed_dim", "depth", "num_heads", "mlp_ratio")
        kwargs.update({k: v for k, v in (settings.get("model_kwargs") or {}).items() if k in encoder_keys})
    if name is None and state is not None:
        embed_dim, _, patch, _ = state["patch_embed.proj.weight"].shape
        depth = count_blocks(state, "blocks.")
        matches = [
            n for n, enc in ENCODERS.items()
            if (enc["patch_size"], enc["embed_dim"], enc["depth"]) == (patch, embed_dim, depth)
        ]  # fmt: skip
        if not matches and "num_heads" not in config.model_kwargs:
            raise ValueError(
                f"pretrained: a ViT of width {embed_dim}, depth {depth}, patch {patch} matches no named model "
                f"({', '.join(sorted(ENCODERS))}); pass --model or --model-kwargs num_heads=..."
            )
        name = matches[0] if matches else None
        if name is None:
            kwargs.update(patch_size=int(patch), embed_dim=int(embed_dim), depth=depth)
    if name is None:
        raise ValueError("model: give --model (one of " + ", ".join(sorted(ENCODERS)) + ") or a pretrained file")
    if name not in ENCODERS:
        raise ValueError(f"model: unknown model {name!r}; known: {', '.join(sorted(ENCODERS))}")
    kwargs = {**ENCODERS[name], **kwargs, **config.model_kwargs}
    img_size = config.img_size
    if img_size is None and settings.get("img_size"):
        img_size = int(settings["img_size"])
    if img_size is None and state is not None:  # the pretrained grid (square)
        img_size = math.isqrt(state["pos_embed"].shape[1] - 1) * kwargs["patch_size"]
    if img_size is None:
        img_size = 28 if config.data == "fashion-mnist" else kwargs.get("img_size", 224)
    kwargs.update(
        img_size=img_size,
        in_chans=in_chans,
        num_classes=num_classes,
        drop_path_rate=config.drop_path,
        global_pool=config.global_pool,
    )
    return kwargs


def build_classifier(config: FinetuneConfig, num_classes: int, in_chans: int):
    """(classifier on the CPU, its load report or None): initialised from ``config.seed`` without touching
    the global generators, then loaded from ``config.pretrained`` when given."""
    state, settings = (None, {}) if config.pretrained is None else _pretrained_settings(config.pretrained)
    kwargs = classifier_kwargs(config, num_classes, in_chans, state, settings)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        model = VisionTransformerClassifier(**kwargs)
    report = None if state is None else load_pretrained(model, state, "pretrained")
    return model, report


def with_probe_head(model: VisionTransformerClassifier) -> VisionTransformerClassifier:
    """``model`` with its head replaced by the linear probe's BatchNorm1d(affine=False, eps=1e-6) + the
    same Linear (``head.0``, ``head.1``: the release's layout, which a timm ViT takes after the same swap)."""
    linear = model.head
    model.head = nn.Sequential(nn.BatchNorm1d(linear.in_features, affine=False, eps=1e-6), linear)
    return model


def prepare_linear_probe(model: VisionTransformerClassifier, seed: int) -> VisionTransformerClassifier:
    """The release's probe on ``model``: the head's Linear weight re-drawn trunc_normal(std 0.01) (from
    ``seed``, leaving the global generators alone), the BN + Linear head, and every other parameter frozen."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        nn.init.trunc_normal_(model.head.weight, std=PROBE_HEAD_INIT_STD)
    nn.init.zeros_(model.head.bias)
    with_probe_head(model)
    for name, param in model.named_parameters():
        param.requires_grad_(name.startswith("head."))
    return model


def build_optimizer(model: nn.Module, config: FinetuneConfig) -> torch.optim.Optimizer:
    """Fine-tuning: AdamW on :func:`param_groups_layer_decay`'s groups. Linear probe: timm's LARS on the
    trainable (head) parameters, as the release's: the weights (> 1-D) take the weight decay and the trust
    ratio (momentum 0.9, trust coefficient 0.001), the 1-D ones (the bias) plain momentum SGD."""
    if not config.linprobe:
        groups = param_groups_layer_decay(model, config.weight_decay, config.layer_decay, model.no_weight_decay())
        for group in groups:
            group.pop("param_names")
        return torch.optim.AdamW(groups, lr=config.peak_lr)
    from timm.optim import Lars

    trainable = [param for param in model.parameters() if param.requires_grad]
    groups = [
        {"params": [p for p in trainable if p.ndim > 1], "weight_decay": config.weight_decay, "always_adapt": True,
         "name": "probe_weight"},
        {"params": [p for p in trainable if p.ndim <= 1], "weight_decay": 0.0, "always_adapt": False,
         "name": "probe_bias"},
    ]  # fmt: skip
    return Lars(groups, lr=config.peak_lr, momentum=LARS_MOMENTUM, trust_coeff=LARS_TRUST_COEFF)


# --- data ----------------------------------------------------------------------------------------------


def _pil(image: torch.Tensor):
    from PIL import Image

    array = image.permute(1, 2, 0).numpy()
    return Image.fromarray(array[..., 0] if array.shape[-1] == 1 else array)


def build_transforms(config: FinetuneConfig, img_size: int, mean, std):
    """(train, eval) transforms from a uint8 [C, H, W] image to a normalised float tensor.

    RGB folders: timm's ``create_transform`` (bicubic RandomResizedCrop, flip, RandAugment ``config.aa``,
    random erasing) and the release's eval (bicubic resize to size / 0.875, centre crop; crop 1 above 224);
    the linear probe trains on a bicubic RandomResizedCrop + flip only (the release's). The 1-channel 28 px
    Fashion-MNIST images: RandAugment's colour operations mean little on greyscale, so training uses a
    RandomResizedCrop(scale 0.5-1) + flip + timm's RandomErasing (off in the probe, reprob 0);
    eval is the image as is.
    """
    from timm.data import create_transform
    from timm.data.random_erasing import RandomErasing
    from torchvision import transforms as T

    if config.data == "imagefolder":
        if config.linprobe:  # the release's probe: RandomResizedCrop + flip, nothing else
            train = T.Compose([
                T.RandomResizedCrop(img_size, interpolation=T.InterpolationMode.BICUBIC), T.RandomHorizontalFlip(),
                T.ToTensor(), T.Normalize(mean, std),
            ])  # fmt: skip
        else:
            train = create_transform(
                input_size=img_size, is_training=True, auto_augment=config.aa, interpolation="bicubic",
                re_prob=config.reprob, re_mode=config.remode, re_count=config.recount, mean=mean, std=std,
            )  # fmt: skip
        resize = int(img_size / 0.875) if img_size <= 224 else img_size
        evaluate = T.Compose([
            T.Resize(resize, interpolation=T.InterpolationMode.BICUBIC), T.CenterCrop(img_size), T.ToTensor(),
            T.Normalize(mean, std),
        ])  # fmt: skip
        return (lambda img: train(_pil(img))), (lambda img: evaluate(_pil(img)))
    erase = RandomErasing(config.reprob, mode=config.remode, max_count=config.recount, device="cpu")
    train = T.Compose([
        T.RandomResizedCrop(img_size, scale=(0.5, 1.0), interpolation=T.InterpolationMode.BICUBIC, antialias=True),
        T.RandomHorizontalFlip(),
    ])  # fmt: skip
    mean_t, std_t = torch.tensor(mean).view(-1, 1, 1), torch.tensor(std).view(-1, 1, 1)

    def train_fn(img: torch.Tensor) -> torch.Tensor:
        return erase((train(img.float().div(255)).clamp(0, 1) - mean_t) / std_t)

    def eval_fn(img: torch.Tensor) -> torch.Tensor:
        img = img.float().div(255)
        if img.shape[-2:] != (img_size, img_size):
            img = F.interpolate(img[None], size=(img_size, img_size), mode="bicubic", antialias=True)[0].clamp(0, 1)
        return (img - mean_t) / std_t

    return train_fn, eval_fn


class SeededTransformDataset(Dataset):
    """(image, label) of a source through ``transform``, indexed by (epoch, index): each sample's random
    choices come from generators seeded by (seed, epoch, index), so a batch depends only on its place in
    the run (not on workers or resumes). The caller's global generator states are left as they were."""

    def __init__(self, source, transform, seed: int, num_classes: int):
        self.source, self.transform, self.seed, self.num_classes = source, transform, seed, num_classes

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, key):
        epoch, index = key if isinstance(key, tuple) else (0, key)
        image, label, _ = self.source.load(index)
        if not 0 <= label < self.num_classes:
            raise ValueError(f"labels: sample {index} has label {label}, outside [0, {self.num_classes})")
        seed = data.sample_seed(self.seed, epoch, index)
        py_state, np_state = random.getstate(), np.random.get_state()
        try:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                random.seed(seed)
                np.random.seed(seed % 2**32)
                out = self.transform(image)
        finally:
            random.setstate(py_state)
            np.random.set_state(np_state)
        return out, label


class _FirstImages:
    """The first ``limit`` images of a source (same classes, channels and normalisation)."""

    def __init__(self, source, limit: int):
        self.source, self.limit = source, min(limit, len(source))
        self.classes, self.in_chans, self.mean, self.std = source.classes, source.in_chans, source.mean, source.std

    def __len__(self) -> int:
        return self.limit

    def load(self, index: int):
        return self.source.load(index)


def _num_classes(source) -> int:
    return len(source.classes)


@dataclass
class FinetuneData:
    train_loader: DataLoader
    sampler: data.ResumableSampler
    eval_loader: DataLoader
    steps_per_epoch: int
    num_classes: int
    in_chans: int
    classes: list
    train_images: int


def build_data(
    config: FinetuneConfig,
    img_size: int | None = None,
    training: bool = True,
    ctx: distributed.DistContext | None = None,
) -> FinetuneData:
    """Loaders of the training and validation splits. ``img_size`` None: only the class count, channels and
    number of training images are read (the loaders are built at the size passed later). ``training``
    False: the training loader will not run (a look at the data, an evaluation), so a batch larger than
    the training split is no error. Under torchrun (``ctx``) each rank reads its share of every global batch
    (``batch_size`` is global) and every world-th validation image, from its rank on (nothing twice)."""
    ctx = ctx or distributed.DistContext()
    train_source = data.build_source(_data_view(config), "train")
    if config.train_limit is not None:
        train_source = _FirstImages(train_source, config.train_limit)
    eval_source = data.build_source(_data_view(config), "test", classes=getattr(train_source, "classes", None))
    num_classes = _num_classes(train_source)
    size = img_size or 28
    train_fn, eval_fn = build_transforms(config, size, train_source.mean, train_source.std)
    train_set = SeededTransformDataset(train_source, train_fn, config.seed, num_classes)
    eval_set = SeededTransformDataset(eval_source, eval_fn, config.seed, num_classes)
    micro = split_global_batch(config.batch_size, config.accum_steps, ctx.world_size)
    sampler = data.ResumableSampler(train_set, ctx.world_size, ctx.rank, config.seed)
    steps = sampler.num_samples // micro // config.accum_steps
    if steps < 1 and training:
        raise ValueError(f"batch_size={config.batch_size} is larger than the {len(train_set)} training images")
    workers = config.num_workers
    common = dict(num_workers=workers, persistent_workers=workers > 0, worker_init_fn=data.ignore_stop_signals)
    train_loader = DataLoader(
        train_set, batch_size=micro, sampler=sampler, drop_last=True,
        generator=torch.Generator().manual_seed(config.seed), **common,
    )  # fmt: skip
    if ctx.distributed:
        eval_set = Subset(eval_set, range(ctx.rank, len(eval_set), ctx.world_size))
    eval_loader = DataLoader(
        eval_set, batch_size=config.eval_batch_size, shuffle=False,
        generator=torch.Generator().manual_seed(config.seed), **common,
    )  # fmt: skip
    return FinetuneData(train_loader, sampler, eval_loader, steps, num_classes, train_source.in_chans,
                        list(train_source.classes), len(train_set))  # fmt: skip


def _data_view(config: FinetuneConfig):
    """What train.data.build_source reads of a config (data and data_path)."""
    return argparse.Namespace(data=config.data, data_path=config.data_path)


# --- precision, the step, evaluation --------------------------------------------------------------------


def resolve_device(config: FinetuneConfig) -> torch.device:
    if config.device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if config.device == "cuda" and not torch.cuda.is_available():
        raise ValueError("device: cuda was asked for and no GPU is available")
    return torch.device(config.device)


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype: fp16 and bf16 as asked; "auto" is bf16 on a GPU that supports it, else fp32."""
    if precision == "fp16":
        return torch.float16
    if precision == "bf16":
        return torch.bfloat16
    if precision == "auto" and device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return None


class Trainer:
    """One optimizer step at a time: accumulation, autocast, the fp16 GradScaler, clipping, skipped steps.

    ``skipped_steps`` counts updates not applied: non-finite gradients under fp16 (the scaler skips them
    and lowers its scale) and non-finite losses in the other precisions (the update is skipped too).
    """

    def __init__(
        self, model, optimizer, config: FinetuneConfig, device: torch.device, mixup=None, criterion=None,
        init_scale: float = 2.0**16, ctx: distributed.DistContext | None = None,
    ):  # fmt: skip
        self.model, self.optimizer, self.config, self.device = model, optimizer, config, device
        self.ctx = ctx or distributed.DistContext()
        self.dtype = autocast_dtype(config.precision, device)
        self.scaler = torch.amp.GradScaler(device.type, init_scale=init_scale, enabled=config.precision == "fp16")
        self.mixup = mixup
        self.criterion = criterion or nn.CrossEntropyLoss()
        self.skipped_steps = 0

    def autocast(self):
        return torch.autocast(self.device.type, dtype=self.dtype or torch.float32, enabled=self.dtype is not None)

    def step(self, micro_batches: list[tuple[torch.Tensor, torch.Tensor]], lr: float) -> tuple[float, bool]:
        """Accumulate the gradients of ``micro_batches`` and apply one update at peak-relative ``lr``
        (each group gets lr x its lr_scale). Returns (mean loss, whether the update was applied). Under
        torchrun the loss is the mean over every rank's micro-batches, so all ranks skip the same steps."""
        for group in self.optimizer.param_groups:
            group["lr"] = lr * group.get("lr_scale", 1.0)
        self.optimizer.zero_grad(set_to_none=True)
        total = torch.zeros((), device=self.device)
        for imgs, labels in micro_batches:
            imgs, labels = imgs.to(self.device, non_blocking=True), labels.to(self.device, non_blocking=True)
            targets = labels
            if self.mixup is not None:
                imgs, targets = self.mixup(imgs, labels)
            with self.autocast():
                loss = self.criterion(self.model(imgs), targets)
            self.scaler.scale(loss.float() / len(micro_batches)).backward()
            total += loss.detach().float()
        mean_loss = float(distributed.sum_tensor(total, self.ctx)) / (len(micro_batches) * self.ctx.world_size)
        if not self.scaler.is_enabled() and not math.isfinite(mean_loss):
            self.optimizer.zero_grad(set_to_none=True)
            self.skipped_steps += 1
            return mean_loss, False
        if self.config.clip_grad is not None:
            self.scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.config.clip_grad)
        scale_before = self.scaler.get_scale() if self.scaler.is_enabled() else None
        self.scaler.step(self.optimizer)
        self.scaler.update()
        applied = scale_before is None or self.scaler.get_scale() >= scale_before
        if not applied:
            self.skipped_steps += 1
        return mean_loss, applied


@torch.no_grad()
def evaluate(
    model, loader, device: torch.device, dtype: torch.dtype | None = None, num_classes: int | None = None,
    ctx: distributed.DistContext | None = None,
):  # fmt: skip
    """{"acc1", "acc5", "loss", "count"} of ``model`` over ``loader`` (cross-entropy on hard labels);
    ``confusion`` [C, C] (rows: true class) when ``num_classes`` is given. Under torchrun (``ctx``) every rank
    evaluates its shard of the split and the counts are summed over the ranks: every rank gets the totals."""
    was_training = model.training
    model.eval()
    correct1 = correct5 = count = 0
    loss_sum = 0.0
    confusion = torch.zeros(num_classes, num_classes, dtype=torch.int64) if num_classes else None
    for imgs, labels in loader:
        imgs, labels = imgs.to(device), labels.to(device)
        with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
            logits = model(imgs)
        logits = logits.float()
        loss_sum += float(F.cross_entropy(logits, labels, reduction="sum"))
        top = logits.topk(min(5, logits.shape[1]), dim=1).indices
        correct1 += int((top[:, 0] == labels).sum())
        correct5 += int((top == labels[:, None]).any(dim=1).sum())
        count += labels.numel()
        if confusion is not None:
            pairs = labels.cpu() * num_classes + top[:, 0].cpu()
            confusion += torch.bincount(pairs, minlength=num_classes * num_classes).view(num_classes, num_classes)
    model.train(was_training)
    if ctx is not None and ctx.distributed:
        totals = torch.tensor([correct1, correct5, count, loss_sum], dtype=torch.float64, device=device)
        correct1, correct5, count, loss_sum = distributed.sum_tensor(totals, ctx).tolist()
        correct1, correct5, count = int(correct1), int(correct5), int(count)
        if confusion is not None:
            confusion = distributed.sum_tensor(confusion.to(device), ctx).cpu()
    if count == 0:
        raise ValueError("the validation split holds no images")
    result = {"acc1": correct1 / count, "acc5": correct5 / count, "loss": loss_sum / count, "count": count}
    if confusion is not None:
        result["confusion"] = confusion
    return result


# --- the run -------------------------------------------------------------------------------------------


@dataclass
class FinetuneResult:
    step: int = 0
    epoch: int = 0
    history: list = field(default_factory=list)  # (epoch, acc1, acc5, loss)
    ema_history: list = field(default_factory=list)  # the same of the EMA weights, with --model-ema
    skipped_steps: int = 0
    checkpoint: str | None = None
    export: str | None = None
    final: dict = field(default_factory=dict)
    final_ema: dict = field(default_factory=dict)
    export_ema: str | None = None  # finetuned_ema.pth, with --model-ema
    load_report: str | None = None
    interrupted: str | None = None  # the signal (SIGTERM / SIGINT) that stopped the run at a checkpoint
    is_main: bool = True  # False on the ranks after the first under torchrun (rank 0 reports)


def _build_mixup(config: FinetuneConfig, num_classes: int):
    from timm.data import Mixup
    from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy

    if config.mixup_active:
        mixup = Mixup(
            mixup_alpha=config.mixup, cutmix_alpha=config.cutmix,
            cutmix_minmax=tuple(config.cutmix_minmax) if config.cutmix_minmax else None, prob=config.mixup_prob,
            switch_prob=config.mixup_switch_prob, mode=config.mixup_mode, label_smoothing=config.smoothing,
            num_classes=num_classes,
        )  # fmt: skip
        return mixup, SoftTargetCrossEntropy()
    if config.smoothing > 0:
        return None, LabelSmoothingCrossEntropy(smoothing=config.smoothing)
    return None, nn.CrossEntropyLoss()


def _check_resume(saved: dict, wanted: dict) -> None:
    defaults = FinetuneConfig().to_dict()  # for settings newer than the checkpoint
    conflicts = [
        f"{name}: {saved.get(name, defaults[name])!r} -> {value!r}"
        for name, value in wanted.items()
        if name not in RESUME_MAY_CHANGE and saved.get(name, defaults[name]) != value
    ]
    if conflicts:
        raise ValueError("resume: the checkpoint's run had other settings: " + "; ".join(conflicts))


def finetune(config: FinetuneConfig) -> FinetuneResult:
    """Fine-tune as ``config`` says; checkpoints, metrics.jsonl and finetuned.pth go to ``config.output_dir``."""
    config.validate()
    device = resolve_device(config)
    ctx = distributed.setup(device.type)
    try:
        return _finetune(config, device, ctx)
    finally:
        distributed.teardown(ctx)


def _finetune(config: FinetuneConfig, device: torch.device, ctx: distributed.DistContext) -> FinetuneResult:
    if device.type == "cuda" and ctx.distributed:
        device = torch.device("cuda", ctx.local_rank)
    probe = build_data(config, training=False)
    capped = config.capped_to(probe.train_images)
    if capped is not config and ctx.is_main:
        print(f"linprobe: batch_size {config.batch_size} capped at {capped.batch_size}, the size of the training "
              f"split (lr {capped.peak_lr:.3g} = blr x batch / 256)", flush=True)  # fmt: skip
    config = capped
    model, report = build_classifier(config, probe.num_classes, probe.in_chans)
    if config.linprobe:
        prepare_linear_probe(model, config.seed)
    loaders = build_data(config, model.img_size[0], ctx=ctx)
    try:
        return _train(config, device, model.to(device), report, loaders, ctx)
    finally:
        stop_workers(loaders)


def stop_workers(loaders: FinetuneData) -> None:
    """Shut the loaders' persistent workers down now (:func:`mae_fast.train.data.shutdown_workers`)."""
    for loader in (loaders.train_loader, loaders.eval_loader):
        data.shutdown_workers(loader)


def _train(
    config: FinetuneConfig, device: torch.device, model, report, loaders: FinetuneData, ctx: distributed.DistContext
) -> FinetuneResult:
    """The run of :func:`finetune` on its built model (on ``device``) and loaders. Under torchrun the model
    trains wrapped in DDP; rank 0 writes the checkpoints (with every rank's random state), metrics and export."""
    optimizer = build_optimizer(model, config)
    mixup, criterion = _build_mixup(config, loaders.num_classes)
    ema = _build_ema(model, config)

    ckpt_dir = os.path.join(config.output_dir, "checkpoints")
    steps_per_epoch = loaders.steps_per_epoch
    total_steps = steps_per_epoch * config.epochs
    warmup_steps = int(round(config.warmup_epochs * steps_per_epoch))
    min_ratio = config.min_lr / config.peak_lr
    result = FinetuneResult(load_report=None if report is None else str(report), is_main=ctx.is_main)
    step = 0
    point = checkpointing.resolve_resume(config.resume, ckpt_dir)
    if point is not None:
        state = point.state
        _check_resume(state["config"], config.to_dict())
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scaler_state = state["scaler"]
        skipped = int(state["metrics"]["skipped_steps"])
        result.history = [tuple(item) for item in state["metrics"]["history"]]
        if ema is not None:
            ema.module.load_state_dict(state["model_ema"])
            result.ema_history = [tuple(item) for item in state["metrics"]["ema_history"]]
        rngs = state.get("rngs") or [state["rng"]]
        checkpointing.set_rng_state(rngs[ctx.rank] if len(rngs) == ctx.world_size else rngs[0])
        step = int(state["step"])
        saved_step = step
    else:
        scaler_state, skipped, saved_step = None, 0, None
        if ctx.is_main:
            os.makedirs(config.output_dir, exist_ok=True)
        torch.manual_seed(config.seed + ctx.rank)
        random.seed(config.seed + ctx.rank)
        np.random.seed(config.seed + ctx.rank)
    distributed.barrier(ctx)
    trainer = Trainer(distributed.wrap(model, ctx, "ddp", device), optimizer, config, device, mixup, criterion, ctx=ctx)
    if scaler_state is not None:
        trainer.scaler.load_state_dict(scaler_state)
    trainer.skipped_steps = skipped
    metrics_path = os.path.join(config.output_dir, "metrics.jsonl")
    micro = split_global_batch(config.batch_size, config.accum_steps, ctx.world_size)
    last_step = total_steps if config.max_steps is None else min(total_steps, config.max_steps)
    progress = None
    if config.progress and ctx.is_main:
        from tqdm import tqdm

        progress = tqdm(total=last_step, initial=step, unit="step", dynamic_ncols=True, desc="finetune")
    model.train()
    metrics = open(metrics_path, "a") if ctx.is_main else None  # noqa: SIM115 (closed in the finally below)

    def write(record: dict) -> None:
        if metrics is not None:
            metrics.write(json.dumps(record) + "\n")
            metrics.flush()

    stopping = False
    with StopFlag() as stop:
        try:
            while step < last_step and not stopping:
                epoch, done = divmod(step, steps_per_epoch)
                loaders.sampler.set_position(epoch, done * config.accum_steps * micro)
                batches = iter(loaders.train_loader)
                for _ in range(done, steps_per_epoch):
                    if step >= last_step or stopping:
                        break
                    try:
                        micro_batches = [next(batches) for _ in range(config.accum_steps)]
                    except RuntimeError as error:  # a worker killed by the signal we are stopping for
                        if stop.signal_name is None or ctx.distributed or "DataLoader worker" not in str(error):
                            raise
                        stopping = True
                        break  # the weights are those of `step`, complete
                    lr = config.peak_lr * lr_factor(step, warmup_steps, total_steps, min_ratio)
                    loss, _ = trainer.step(micro_batches, lr)
                    step += 1
                    if ema is not None:
                        ema.update(model, step=step)  # timm's: a copy at the first step, then the decay
                    if progress is not None:
                        progress.update(1)
                    if step % config.log_every == 0 or step == last_step:
                        record = {"step": step, "epoch": epoch, "loss": loss, "lr": lr,
                                  "skipped_steps": trainer.skipped_steps}  # fmt: skip
                        if trainer.scaler.is_enabled():
                            record["scale"] = trainer.scaler.get_scale()
                        write(record)
                        if progress is not None:
                            progress.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}")
                    epoch_end = step % steps_per_epoch == 0
                    if epoch_end:
                        record, line = {"epoch": epoch}, f"epoch {epoch}: loss {loss:.4f}"
                        for network, history, prefix in ((model, result.history, ""),
                                                         (ema and ema.module, result.ema_history, "ema_")):  # fmt: skip
                            if network is None:
                                continue
                            scores = evaluate(network, loaders.eval_loader, device, trainer.dtype, ctx=ctx)
                            history.append((epoch, scores["acc1"], scores["acc5"], scores["loss"]))
                            record.update({f"{prefix}test_{key}": scores[key] for key in ("acc1", "acc5", "loss")})
                            line += f" {prefix.replace('_', ' ').upper()}val top-1 {scores['acc1']:.4f}"
                            line += f" top-5 {scores['acc5']:.4f}"
                        write(record)
                        if progress is not None:
                            progress.write(line)
                    periodic = config.ckpt_every and step % config.ckpt_every == 0
                    if periodic or (not config.ckpt_every and epoch_end) or step == last_step:
                        result.checkpoint = _save(config, model, ema, optimizer, trainer, step, steps_per_epoch, result)
                        saved_step = step
                    stopping = _stop_agreed(stop, ctx, device)
            if stopping and step < last_step:
                result.interrupted = stop.signal_name or "SIGTERM"  # another rank's signal
                if saved_step != step:
                    result.checkpoint = _save(config, model, ema, optimizer, trainer, step, steps_per_epoch, result)
        finally:
            if progress is not None:
                progress.close()
            if metrics is not None:
                metrics.close()
    result.step, result.epoch = step, step // steps_per_epoch
    result.skipped_steps = trainer.skipped_steps
    if step == total_steps:
        result.final = evaluate(model, loaders.eval_loader, device, trainer.dtype, loaders.num_classes, ctx=ctx)
        result.export = os.path.join(config.output_dir, "finetuned.pth")
        if ema is not None:
            result.final_ema = evaluate(ema.module, loaders.eval_loader, device, trainer.dtype, ctx=ctx)
            result.export_ema = os.path.join(config.output_dir, "finetuned_ema.pth")
        if ctx.is_main:
            for weights, path in ((model, result.export), (ema and ema.module, result.export_ema)):
                if path is not None:
                    checkpointing.atomic_save(
                        {"model": _cpu_state(weights), "classifier": model.config(), "args": config.to_dict(),
                         "classes": loaders.classes},
                        path,
                    )  # fmt: skip
            _save_pictures(config.output_dir, result, loaders.classes)
        distributed.barrier(ctx)
    return result


def _build_ema(model: nn.Module, config: FinetuneConfig):
    """timm's ModelEmaV3 of ``model`` (parameters and buffers, on its device and dtype), or None without
    --model-ema. Built before the DDP wrap: every rank keeps the same average of the same weights."""
    if not config.model_ema:
        return None
    from timm.utils import ModelEmaV3

    return ModelEmaV3(model, decay=config.model_ema_decay)


def _stop_agreed(stop: StopFlag, ctx: distributed.DistContext, device: torch.device) -> bool:
    """Whether a stop signal reached this process or, under torchrun, any rank (all ranks stop at one step)."""
    if not ctx.distributed:
        return stop.signal_name is not None
    flag = torch.tensor(float(stop.signal_name is not None), dtype=torch.float64, device=device)
    return bool(distributed.sum_tensor(flag, ctx).item() > 0)


def _cpu_state(model: nn.Module) -> dict:
    return {key: value.detach().to("cpu", copy=True) for key, value in model.state_dict().items()}


def _save(config, model, ema, optimizer, trainer, step, steps_per_epoch, result) -> str:
    """Rank 0 writes the checkpoint of ``step`` (every rank's random state in "rngs"); collective under torchrun.
    Returns its path (on every rank)."""
    epoch, done = divmod(step, steps_per_epoch)
    rngs = distributed.all_gather_objects(checkpointing.rng_state(), trainer.ctx)
    path = checkpointing.checkpoint_path(os.path.join(config.output_dir, "checkpoints"), step)
    if not trainer.ctx.is_main:
        distributed.barrier(trainer.ctx)
        return path
    state = {
        "model": _cpu_state(model),
        "optimizer": optimizer.state_dict(),
        "scheduler": {"kind": "warmup + half-cycle cosine per step, set from the step"},
        "scaler": trainer.scaler.state_dict(),
        "step": step,
        "epoch": epoch,
        "micro_batch": done * config.accum_steps,
        "rng": rngs[0],
        "rngs": rngs,
        "metrics": {"skipped_steps": trainer.skipped_steps, "history": [list(h) for h in result.history],
                    "ema_history": [list(h) for h in result.ema_history]},
        "config": config.to_dict(),
        "classifier": model.config(),
    }  # fmt: skip
    if ema is not None:
        state["model_ema"] = _cpu_state(ema.module)
    checkpointing.save_checkpoint(state, os.path.join(config.output_dir, "checkpoints"), config.keep_last)
    distributed.barrier(trainer.ctx)
    return path


def _save_pictures(output_dir: str, result: FinetuneResult, classes: list) -> None:
    """accuracy_curve.png (val top-1 per epoch) and confusion_matrix.png of the final evaluation."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.5))
    ax.plot([h[0] + 1 for h in result.history], [h[1] for h in result.history], marker="o")
    ax.set_xlabel("epoch")
    ax.set_ylabel("val top-1")
    fig.tight_layout()
    fig.savefig(os.path.join(output_dir, "accuracy_curve.png"))
    plt.close(fig)
    confusion = result.final.get("confusion")
    if confusion is None or len(classes) > 50:
        return
    fig, ax = plt.subplots(figsize=(6, 5))
    ax.imshow(confusion.numpy(), cmap="Blues")
    ax.set_xticks(range(len(classes)), classes, rotation=90, fontsize=7)
    ax.set_yticks(range(len(classes)), classes, fontsize=7)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    fig.tight_layout()
    fig.savefig(os.path.join(output_dir, "confusion_matrix.png"))
    plt.close(fig)


def load_finetuned(path: str) -> tuple[VisionTransformerClassifier, dict]:
    """(classifier, its run settings) from finetuned.pth or a fine-tuning checkpoint."""
    state = checkpointing.read_checkpoint_file(path)
    if "classifier" not in state:
        raise ValueError(f"{path}: not a fine-tuned checkpoint of mae-fast finetune (no 'classifier' entry)")
    model = VisionTransformerClassifier(**{**state["classifier"], "img_size": tuple(state["classifier"]["img_size"])})
    settings = state.get("args") or state.get("config") or {}
    if settings.get("linprobe"):
        with_probe_head(model)
    model.load_state_dict(state["model"])
    return model, settings


def evaluate_checkpoint(path: str, config: FinetuneConfig) -> dict:
    """Top-1 / top-5 / loss of a fine-tuned checkpoint on the validation split of ``config``'s data (sharded
    over the ranks under torchrun; every rank gets the totals)."""
    model, _ = load_finetuned(path)
    device = resolve_device(config)
    ctx = distributed.setup(device.type)
    try:
        if device.type == "cuda" and ctx.distributed:
            device = torch.device("cuda", ctx.local_rank)
        loaders = build_data(config, model.img_size[0], training=False, ctx=ctx)
        if loaders.num_classes != model.num_classes:
            raise ValueError(f"data: {loaders.num_classes} classes, the checkpoint's head has {model.num_classes}")
        try:
            dtype = autocast_dtype(config.precision, device)
            return evaluate(model.to(device), loaders.eval_loader, device, dtype, ctx=ctx)
        finally:
            stop_workers(loaders)
    finally:
        distributed.teardown(ctx)


# --- command line ----------------------------------------------------------------------------------------

# The demo: the 64-wide, 3-block encoder of ``mae-fast pretrain --demo`` fine-tuned on the first 2,000
# training images of the embedded Fashion-MNIST subset (small data: where pretraining shows), evaluated on
# its 2,000 test images; pretrained and random init get the same recipe, epochs and seed. Layer decay 0.75,
# drop path 0.1, label smoothing 0.1; no mixup / cutmix / erasing (10 short epochs of 28 px greyscale images).
DEMO = dict(
    data="fashion-mnist", train_limit=2000, epochs=10, warmup_epochs=1.0, batch_size=64, blr=5e-3,
    layer_decay=0.75, drop_path=0.1, weight_decay=0.05, mixup=0.0, cutmix=0.0, smoothing=0.1, reprob=0.0,
    num_workers=1, log_every=50, precision="fp32", progress=False,
)  # fmt: skip
DEMO_OUTPUT_DIR = "runs/demo"

_FLAGS = (
    "model", "model_kwargs", "preset", "data", "data_path", "train_limit", "img_size", "epochs", "max_steps",
    "warmup_epochs", "batch_size", "accum_steps", "blr", "lr", "min_lr", "weight_decay", "layer_decay", "drop_path",
    "clip_grad", "mixup", "cutmix", "cutmix_minmax", "mixup_prob", "mixup_switch_prob", "mixup_mode", "smoothing",
    "aa", "reprob", "remode", "recount", "precision", "seed", "device", "num_workers", "eval_batch_size",
    "output_dir", "log_every", "ckpt_every", "keep_last", "resume", "model_ema_decay",
)  # fmt: skip


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from mae_fast.train.cli import _model_kwargs

    d = FinetuneConfig()
    parser.add_argument("pretrained", nargs="?", default=None,
                        help="MAE export / release mae_pretrain_vit_*.pth / timm or transformers ViT (none: scratch)")
    parser.add_argument("--demo", action="store_true", help="pretrained vs scratch on the embedded data")
    parser.add_argument("--eval", action="store_true", help="only evaluate PRETRAINED, a fine-tuned checkpoint")
    parser.add_argument("--model", default=None, help=f"one of {', '.join(sorted(ENCODERS))} (default: from the file)")
    parser.add_argument("--model-kwargs", type=_model_kwargs, default=None, help="overrides, e.g. num_heads=4")
    parser.add_argument("--preset", default=None, help=f"the release's settings: {', '.join(PRESETS)}")
    parser.add_argument("--data", default=None, help=f"{' or '.join(DATA_SOURCES)} (default: {d.data})")
    parser.add_argument("--data-path", default=None, help="DIR with DIR/train/<class>/ and DIR/val/<class>/")
    parser.add_argument("--train-limit", type=int, default=None, help="use the first N training images")
    parser.add_argument("--img-size", type=int, default=None, help="default: the pretrained size")
    parser.add_argument("--cls-token", action="store_true", help="pool the cls token (default: average + fc_norm)")
    parser.add_argument("--linprobe", action="store_true",
                        help="the release's linear probe: frozen encoder, cls token, BN + Linear head, LARS")
    for name, kind in (("epochs", int), ("max-steps", int), ("warmup-epochs", float), ("batch-size", int),
                       ("accum-steps", int), ("blr", float), ("lr", float), ("min-lr", float),
                       ("weight-decay", float), ("layer-decay", float), ("drop-path", float), ("clip-grad", float),
                       ("mixup", float), ("cutmix", float), ("mixup-prob", float), ("mixup-switch-prob", float),
                       ("smoothing", float), ("reprob", float), ("recount", int), ("seed", int),
                       ("num-workers", int), ("eval-batch-size", int), ("log-every", int), ("ckpt-every", int),
                       ("keep-last", int)):  # fmt: skip
        default = getattr(d, name.replace("-", "_"))
        parser.add_argument(f"--{name}", type=kind, default=None, help=f"default: {default}")
    parser.add_argument("--cutmix-minmax", type=float, nargs=2, default=None, help="cutmix box ratio range")
    parser.add_argument("--mixup-mode", default=None, help=f"{', '.join(MIXUP_MODES)} (default: {d.mixup_mode})")
    parser.add_argument("--aa", default=None, help=f"timm auto-augment policy (default: {d.aa}; 'none': off)")
    parser.add_argument("--remode", default=None, help=f"random erasing mode (default: {d.remode})")
    parser.add_argument("--precision", default=None, help="auto (bf16 on GPUs, fp32 on the CPU), fp32, bf16, fp16")
    parser.add_argument("--device", default=None, help="auto, cpu or cuda")
    parser.add_argument("--output-dir", default=None, help=f"default: {d.output_dir} (demo: {DEMO_OUTPUT_DIR})")
    parser.add_argument("--resume", nargs="?", const="auto", default=None, help="a checkpoint, or the newest one")
    parser.add_argument("--model-ema", action="store_true",
                        help="also keep an EMA of the weights (timm's ModelEmaV3): evaluated, saved, exported")
    parser.add_argument("--model-ema-decay", type=float, default=None, help=f"default: {d.model_ema_decay}")
    parser.add_argument("--no-progress", action="store_true")


def config_from_args(args: argparse.Namespace) -> FinetuneConfig:
    values = {name: getattr(args, name) for name in _FLAGS if getattr(args, name, None) is not None}
    if values.get("aa") == "none":
        values["aa"] = None
    if args.cls_token:
        values["global_pool"] = False
    if args.no_progress:
        values["progress"] = False
    if args.linprobe:
        values["linprobe"] = True
    if args.model_ema:
        values["model_ema"] = True
    values["pretrained"] = args.pretrained
    return FinetuneConfig.from_dict(values).validate()


def run(args: argparse.Namespace) -> int:
    try:
        if args.demo:
            return _demo(args)
        config = config_from_args(args)
        if args.eval:
            if config.pretrained is None:
                raise ValueError("--eval needs the fine-tuned checkpoint as PRETRAINED")
            scores = evaluate_checkpoint(config.pretrained, config)
            if os.environ.get("RANK", "0") != "0":  # under torchrun rank 0 reports
                return 0
            print(f"top-1 {scores['acc1']:.4f}  top-5 {scores['acc5']:.4f}  loss {scores['loss']:.4f} "
                  f"({scores['count']} images)")  # fmt: skip
            return 0
        result = finetune(config)
    except (ValueError, FileNotFoundError) as error:
        raise SystemExit(f"mae-fast finetune: {error}") from error
    if not result.is_main:
        return 0
    if result.load_report:
        print(f"pretrained weights: {result.load_report}")
    if result.interrupted:
        print(f"interrupted by {result.interrupted} at step {result.step}; continue with --resume "
              f"({result.checkpoint})")  # fmt: skip
    elif result.final:
        final = result.final
        print(f"val top-1 {final['acc1']:.4f}  top-5 {final['acc5']:.4f}  loss {final['loss']:.4f}")
        print(f"fine-tuned (timm VisionTransformer layout): {result.export}")
        if result.final_ema:
            ema = result.final_ema
            print(f"EMA weights: val top-1 {ema['acc1']:.4f}  top-5 {ema['acc5']:.4f}  loss {ema['loss']:.4f} "
                  f"({result.export_ema})")  # fmt: skip
    else:
        print(f"stopped at step {result.step}; continue with --resume ({result.checkpoint})")
    print(f"skipped steps (non-finite): {result.skipped_steps}; metrics: {config.output_dir}/metrics.jsonl")
    return 0


def _raw_pixel_knn(limit: int) -> float:
    from mae_fast.train.eval import knn_accuracy

    def flat(split: str, n: int | None):
        source = data.FashionMNISTSubset(split)
        n = len(source) if n is None else min(n, len(source))
        return source.images[:n].flatten(1).float(), source.labels[:n]

    return knn_accuracy(flat("train", limit), flat("test", None))


def _demo(args: argparse.Namespace) -> int:
    """Pretrain (when the export is missing), then fine-tune pretrained and scratch; one line of result."""
    import time

    from mae_fast.train import cli as pretrain_cli
    from mae_fast.train.config import TrainConfig
    from mae_fast.train.loop import pretrain

    folder = args.output_dir or DEMO_OUTPUT_DIR
    export = os.path.join(folder, "mae_pretrain.pth")
    start = time.perf_counter()
    if not os.path.isfile(export):
        print(f"{export} is missing: running mae-fast pretrain --demo first", flush=True)
        settings = {**pretrain_cli.DEMO, "output_dir": folder, "progress": False}
        pretrain(TrainConfig.from_dict(settings).validate())
    scores = {}
    for name, pretrained in (("pretrained", export), ("scratch", None)):
        values = {**DEMO, "pretrained": pretrained, "output_dir": os.path.join(folder, "finetune", name)}
        if pretrained is None:  # the same architecture as the export
            _, settings = _pretrained_settings(export)
            values["model"] = str(settings["model"]).removeprefix("mae_")
            encoder = ("embed_dim", "depth", "num_heads", "patch_size", "mlp_ratio")
            values["model_kwargs"] = {k: v for k, v in settings["model_kwargs"].items() if k in encoder}
        scores[name] = finetune(FinetuneConfig.from_dict(values).validate()).final["acc1"]
    pixels = _raw_pixel_knn(DEMO["train_limit"])
    margin = 100 * (scores["pretrained"] - scores["scratch"])
    print(
        f"fine-tune top-1: pretrained {scores['pretrained']:.4f} vs scratch {scores['scratch']:.4f} "
        f"(margin {margin:+.1f} points); raw-pixel kNN on the same {DEMO['train_limit']} images {pixels:.4f} "
        f"({DEMO['epochs']} epochs each, 2k test images, {time.perf_counter() - start:.0f} s; "
        f"outputs in {os.path.join(folder, 'finetune')})"
    )
    return 0
