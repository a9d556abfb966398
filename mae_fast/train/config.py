"""TrainConfig: every knob of a pretraining run, validated up front with errors that name the field."""

from __future__ import annotations

import dataclasses
import json
import math
import os
from dataclasses import dataclass, field

from mae_fast.dispatch import BACKENDS

DATA_SOURCES = ("fashion-mnist", "synthetic", "imagefolder")
DECODE_ON = ("device", "cpu")
PRECISIONS = ("auto", "bf16", "fp16", "fp32")
NONFINITE_POLICIES = ("stop", "skip")
SHARDINGS = ("ddp", "fsdp")
FEATURE_POOLS = ("mean", "cls")
DATA_CHANNELS = {"fashion-mnist": 1, "synthetic": 3, "imagefolder": 3}  # imagefolder images are read as RGB
FASHION_MNIST_SIZE = 28


def split_global_batch(batch_size: int, accum_steps: int, world_size: int) -> int:
    """Images per rank per forward: the global ``batch_size`` split over ``accum_steps`` micro-batches and
    ``world_size`` processes (pretraining's and fine-tuning's); ValueError when it does not split evenly."""
    if batch_size % (accum_steps * world_size):
        raise ValueError(
            f"batch_size={batch_size} must be a multiple of accum_steps x processes = {accum_steps} x {world_size}"
            f" (batch_size / accum_steps = {batch_size / accum_steps:g} must be divisible by the world size"
            f" {world_size})"
        )
    return batch_size // (accum_steps * world_size)


@dataclass
class TrainConfig:
    """A pretraining run. ``batch_size`` is the GLOBAL batch per optimizer step (all ranks, all
    accumulation steps); each rank runs micro-batches of batch_size / (world_size * accum_steps).

    The learning rate is ``lr`` when given, else ``blr * batch_size / 256`` (the paper's rule), warmed up
    linearly per iteration for ``warmup_epochs`` and then decayed with a half cycle of cosine to ``min_lr``
    over ``epochs``. ``max_steps`` stops the run early (with a checkpoint) without changing the schedule.
    """

    # model
    model: str = "mae_vit_tiny_patch4_32"
    model_kwargs: dict = field(default_factory=dict)
    img_size: int | None = None  # None: 28 for fashion-mnist, else the model's own
    mask_ratio: float = 0.75
    norm_pix_loss: bool = True
    backend: str = "auto"
    # data
    data: str = "fashion-mnist"
    data_path: str | None = None
    num_workers: int = 2
    decode_on: str | None = None  # "device": augment where the model runs, "cpu": in workers (Pillow); None: the
    # device for fashion-mnist everywhere and for ImageFolder on GPUs
    # optimisation
    epochs: int = 1
    max_steps: int | None = None
    warmup_epochs: float = 0.0
    batch_size: int = 64
    accum_steps: int = 1
    blr: float = 1.5e-4
    lr: float | None = None
    min_lr: float = 0.0
    weight_decay: float = 0.05
    betas: tuple[float, float] = (0.9, 0.95)
    clip_grad: float | None = None
    precision: str = "auto"
    compile: bool = False
    nonfinite: str = "stop"
    sharding: str = "ddp"
    seed: int = 0
    device: str = "auto"
    # output
    output_dir: str = "runs/mae"
    log_every: int = 20
    ckpt_every: int = 0  # steps; 0: at the end only (and on SIGTERM/SIGINT)
    keep_last: int = 3
    resume: str | None = None  # a checkpoint path, or "auto": the newest in output_dir
    overwrite: bool = False  # a fresh run may replace the checkpoints already in output_dir
    visualize: bool = True
    num_vis: int = 8
    progress: bool = True

    def validate(self) -> TrainConfig:
        """Raise ValueError naming the first bad field and its allowed range; returns self."""
        from mae_fast.models import list_models

        if self.model not in list_models():
            raise ValueError(f"model: unknown model {self.model!r}; known models: {', '.join(list_models())}")
        if not isinstance(self.model_kwargs, dict) or not all(isinstance(k, str) for k in self.model_kwargs):
            raise ValueError(f"model_kwargs must be a dict with str keys, got {self.model_kwargs!r}")
        if self.data not in DATA_SOURCES:
            raise ValueError(f"data must be one of {DATA_SOURCES}, got {self.data!r}")
        if self.data == "imagefolder":
            if not self.data_path or not isinstance(self.data_path, str):
                raise ValueError("data_path is required with data='imagefolder' (a folder of class sub-folders)")
            if not os.path.isdir(self.data_path):
                raise ValueError(f"data_path: folder not found: {self.data_path}")
        if isinstance(self.mask_ratio, bool) or not isinstance(self.mask_ratio, (int, float)):
            raise ValueError(f"mask_ratio must be in [0, 1), got {self.mask_ratio!r}")
        if not 0.0 <= self.mask_ratio < 1.0:
            raise ValueError(f"mask_ratio must be in [0, 1), got {self.mask_ratio!r}")
        for name in ("epochs", "batch_size", "accum_steps", "log_every", "keep_last", "num_vis"):
            _positive_int(getattr(self, name), name)
        for name in ("num_workers", "ckpt_every", "seed"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"{name} must be a non-negative int, got {value!r}")
        if self.max_steps is not None:
            _positive_int(self.max_steps, "max_steps")
        if self.img_size is not None:
            _positive_int(self.img_size, "img_size")
        if self.batch_size % self.accum_steps:
            raise ValueError(
                f"batch_size={self.batch_size} must be divisible by accum_steps={self.accum_steps} "
                "(batch_size is the global batch per optimizer step)"
            )
        for name in ("blr", "min_lr", "weight_decay", "warmup_epochs"):
            _finite_number(getattr(self, name), name, "a finite number >= 0", lambda v: v >= 0)
        if self.lr is not None:
            _finite_number(self.lr, "lr", "a finite number > 0 or None", lambda v: v > 0)
        elif self.blr <= 0:
            raise ValueError(f"blr must be > 0 when lr is None (the peak lr is blr * batch_size / 256), got {self.blr}")
        if self.min_lr > self.base_lr():
            source = "lr" if self.lr is not None else f"blr * batch_size / 256 = {self.blr} * {self.batch_size} / 256"
            raise ValueError(
                f"min_lr={self.min_lr} exceeds the peak learning rate {self.base_lr():.6g} ({source}): "
                "min_lr must lie in [0, peak lr], the cosine decays down to it"
            )
        if self.warmup_epochs > self.epochs:
            raise ValueError(f"warmup_epochs={self.warmup_epochs} exceeds epochs={self.epochs}")
        betas_ok = isinstance(self.betas, (tuple, list)) and len(self.betas) == 2
        if not betas_ok or not all(_is_number(b) and 0.0 <= b < 1.0 for b in self.betas):
            raise ValueError(f"betas must be two numbers in [0, 1), got {self.betas!r}")
        if self.clip_grad is not None:
            _finite_number(self.clip_grad, "clip_grad", "positive and finite, or None", lambda v: v > 0)
        for name, choices in (
            ("precision", PRECISIONS),
            ("nonfinite", NONFINITE_POLICIES),
            ("sharding", SHARDINGS),
            ("backend", ("auto", *BACKENDS)),
        ):
            if getattr(self, name) not in choices:
                raise ValueError(f"{name} must be one of {choices}, got {getattr(self, name)!r}")
        if self.decode_on not in (None, *DECODE_ON):
            raise ValueError(
                f"decode_on must be one of {DECODE_ON} or None (device for fashion-mnist, and for imagefolder on a "
                f"GPU), got {self.decode_on!r}"
            )
        if self.precision == "fp16" and self.sharding == "fsdp":
            raise ValueError(
                "precision='fp16' with sharding='fsdp' is not supported (the GradScaler here is not FSDP's sharded "
                "one); use precision='bf16' with fsdp, or sharding='ddp'"
            )
        for name in ("norm_pix_loss", "compile", "overwrite", "visualize", "progress"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be True or False, got {getattr(self, name)!r}")
        if not isinstance(self.output_dir, str) or not self.output_dir:
            raise ValueError(f"output_dir must be a non-empty path, got {self.output_dir!r}")
        if self.resume is not None and (not isinstance(self.resume, str) or not self.resume):
            raise ValueError(f"resume must be a checkpoint path, 'auto' or None, got {self.resume!r}")
        if self.device not in ("auto", "cpu", "cuda"):
            raise ValueError(f"device must be 'auto', 'cpu' or 'cuda', got {self.device!r}")
        if self.device == "cuda":
            import torch

            if not torch.cuda.is_available():
                raise ValueError("device='cuda' but no CUDA GPU is visible")
        self._validate_model()
        return self

    def data_channels(self) -> int:
        """The channel count of the images ``data`` yields (the model's in_chans)."""
        return DATA_CHANNELS[self.data]

    def _validate_model(self) -> None:
        """model_kwargs must not contradict the fields that set the same model arguments (in_chans from the data,
        img_size, norm_pix_loss, backend); the model is then built on the meta device (no memory, no init), so
        every constructor argument is checked before the run writes anything, and mask_ratio is checked
        against its patch count."""
        import torch

        from mae_fast.models import create_model

        given = self.model_kwargs
        owned = {"in_chans": self.data_channels(), "norm_pix_loss": self.norm_pix_loss, "backend": self.backend}
        if self.img_size is not None or self.data == "fashion-mnist":
            owned["img_size"] = self.img_size or FASHION_MNIST_SIZE
        for key, value in owned.items():
            if key in given and given[key] != value:
                if key == "in_chans":
                    where = f"data={self.data!r} yields {value}-channel images (drop in_chans from model_kwargs)"
                else:
                    where = f"the run uses {value!r} (set the {key} field instead)"
                raise ValueError(f"model_kwargs[{key!r}]={given[key]!r} conflicts with the run: {where}")
        try:
            with torch.device("meta"):
                model = create_model(self.model, **{**given, **owned})
        except (TypeError, ValueError) as error:
            settings = {**given, **owned}
            raise ValueError(f"model_kwargs: model={self.model!r} cannot be built with {settings}: {error}") from error
        kept = int(model.num_patches * (1 - self.mask_ratio))
        if not 1 <= kept < model.num_patches:
            raise ValueError(
                f"mask_ratio={self.mask_ratio} keeps {kept} of the model's {model.num_patches} patches: it must "
                f"remove at least one and keep at least one, so it must lie in (0, {1 - 1 / model.num_patches:.6g}]"
            )

    def micro_batch(self, world_size: int) -> int:
        """Images per rank per forward pass; raises ValueError when the global batch does not split."""
        return split_global_batch(self.batch_size, self.accum_steps, world_size)

    def base_lr(self) -> float:
        """The peak learning rate: ``lr`` or ``blr * batch_size / 256``."""
        return self.lr if self.lr is not None else self.blr * self.batch_size / 256

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, values: dict) -> TrainConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown config fields: {', '.join(unknown)}")
        values = dict(values)
        if "betas" in values:
            values["betas"] = tuple(values["betas"])
        return cls(**values)


def _is_number(value) -> bool:
    """A finite real Python number (bools are not numbers here)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _finite_number(value, name: str, allowed: str, in_range) -> float:
    if not _is_number(value) or not in_range(value):
        raise ValueError(f"{name} must be {allowed}, got {value!r}")
    return value


def _positive_int(value, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return value
