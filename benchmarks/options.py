"""Command-line options of the benchmark suite (kept free of heavy imports: ``mae-fast --help`` loads it)."""

from __future__ import annotations

import argparse
from pathlib import Path

SMOKE_BATCH, SMOKE_SWEEP = 2, (1, 4)
BATCH, SWEEP = 256, (32, 64, 128, 512)


def _ints(text: str) -> tuple[int, ...]:
    return tuple(int(v) for v in text.split(",") if v)


def _names(text: str) -> tuple[str, ...]:
    return tuple(v for v in text.split(",") if v)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--smoke", action="store_true", help="tiny shapes on the CPU: checks the suite, claims nothing")
    parser.add_argument("--out", type=Path, default=Path("runs/bench"), help="output folder (default runs/bench)")
    parser.add_argument("--name", default=None, help="file stem (default <device>_<date>)")
    parser.add_argument(
        "--sections", type=_names, default=("kernels", "train", "sweep"), help="comma list of kernels,train,sweep"
    )
    parser.add_argument("--models", type=_names, default=None, help="kernel shapes: vit_b,vit_l,vit_h (default all)")
    parser.add_argument("--train-models", type=_names, default=None, help="training step: vit_b,vit_l (default both)")
    parser.add_argument(
        "--ops", type=_names, default=None, help="only these ops; train_step names the training step (default all)"
    )
    parser.add_argument(
        "--batch", type=int, default=None, help=f"headline batch (default {BATCH}, smoke {SMOKE_BATCH})"
    )
    parser.add_argument("--sweep", type=_ints, default=None, help=f"batch sweep (default {SWEEP}, smoke {SMOKE_SWEEP})")
    parser.add_argument("--budget-s", type=float, default=None, help="stop starting new cases after this many seconds")
    parser.add_argument("--rep-ms", type=int, default=100, help="do_bench time per measurement on a GPU (ms)")
    parser.add_argument("--steps", type=int, default=None, help="timed training steps (default 10, smoke 2)")
    parser.add_argument("--no-compile", action="store_true", help="leave out the torch.compile peers")
    parser.add_argument(
        "--compile", action="store_true", help="keep the torch.compile peers in --smoke (slow on a CPU)"
    )
    parser.add_argument("--no-plots", action="store_true", help="write the JSON only")
