"""Command-line options of the benchmark suite (kept free of heavy imports: ``mae-fast --help`` loads it)."""

from __future__ import annotations

import argparse
from pathlib import Path

SMOKE_BATCH, SMOKE_SWEEP = 2, (1, 4)
BATCH, SWEEP = 256, (32, 64, 128, 512)
SECTIONS = ("kernels", "train", "sweep")
KERNEL_MODELS = ("vit_b", "vit_l", "vit_h")
TRAIN_MODELS = ("vit_b", "vit_l")
OPS = (
    "patchify_gather",
    "patch_embed_gather",
    "unshuffle_mask_tokens",
    "masked_mse_loss",
    "random_masking",
    "resized_crop",
    "visible_attention",
    "visible_attention_varlen",
    "train_step",
)


def _names(allowed: tuple[str, ...]):
    def parse(text: str) -> tuple[str, ...]:
        names = tuple(v for v in text.split(",") if v)
        unknown = [n for n in names if n not in allowed]
        if unknown:
            raise argparse.ArgumentTypeError(f"unknown {', '.join(unknown)}; choose from {', '.join(allowed)}")
        return names

    return parse


def _positive(kind):
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a positive {kind.__name__}, got {text!r}") from None
        if not value > 0:
            raise argparse.ArgumentTypeError(f"expected a positive {kind.__name__}, got {text!r}")
        return value

    return parse


def _batches(text: str) -> tuple[int, ...]:
    return tuple(_positive(int)(v) for v in text.split(",") if v)


def _budget(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"expected a number of seconds >= 0, got {text!r}")
    return value


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add = parser.add_argument
    add("--smoke", action="store_true", help="tiny shapes on the CPU: checks the suite, claims nothing")
    add("--out", type=Path, default=Path("runs/bench"), help="output folder (default runs/bench)")
    add("--name", default=None, help="file stem (default <device>_<date>)")
    add("--sections", type=_names(SECTIONS), default=SECTIONS, help=f"comma list of {','.join(SECTIONS)}")
    add("--models", type=_names(KERNEL_MODELS), default=None, help="kernel shapes: vit_b,vit_l,vit_h (default all)")
    add("--train-models", type=_names(TRAIN_MODELS), default=None, help="training step: vit_b,vit_l (default both)")
    add(
        "--ops", type=_names(OPS), default=None, help="only these ops; train_step names the training step (default all)"
    )
    add("--batch", type=_positive(int), default=None, help=f"headline batch (default {BATCH}, smoke {SMOKE_BATCH})")
    add("--sweep", type=_batches, default=None, help=f"batch sweep, '' for none (default {SWEEP}, smoke {SMOKE_SWEEP})")
    add("--budget-s", type=_budget, default=None, help="stop starting new cases after this many seconds")
    add("--rep-ms", type=_positive(int), default=100, help="do_bench time per measurement on a GPU (ms)")
    add("--steps", type=_positive(int), default=None, help="timed training steps (default 10, smoke 2)")
    add("--no-compile", action="store_true", help="leave out the torch.compile peers")
    add("--compile", action="store_true", help="keep the torch.compile peers in --smoke (slow on a CPU)")
    add("--no-plots", action="store_true", help="write the JSON only")
