"""``mae-fast pretrain``: MAE pretraining from the command line (also under torchrun).

``mae-fast pretrain --demo`` is the README's main command: a small MAE on the embedded Fashion-MNIST
subset (a few minutes on 2 CPU cores), with checkpoints, reconstruction grids and the loss curve, then
the kNN accuracy of the pretrained encoder beside the same encoder at its random initialisation.
"""

from __future__ import annotations

import argparse
import json
import os
import time

from mae_fast.dispatch import BACKENDS
from mae_fast.train import checkpointing
from mae_fast.train.config import DATA_SOURCES, DECODE_ON, NONFINITE_POLICIES, PRECISIONS, SHARDINGS, TrainConfig

# The demo: a 3-block, 64-wide encoder on 28x28 Fashion-MNIST (49 patches of 4x4), 1-block 32-wide decoder,
# 6 epochs of the 10k-image subset at batch 128 (468 steps, peak lr 2.5e-3).
DEMO = dict(
    model="mae_vit_tiny_patch4_32",
    model_kwargs=dict(embed_dim=64, depth=3, num_heads=4, decoder_embed_dim=32, decoder_depth=1, decoder_num_heads=2),
    data="fashion-mnist",
    epochs=6,
    num_workers=1,
    warmup_epochs=1.0,
    batch_size=128,
    blr=5e-3,
    output_dir="runs/demo",
    log_every=10,
    ckpt_every=100,
    overwrite=True,
)
DEMO_KNN_TRAIN_LIMIT = 5_000


def _model_kwargs(text: str) -> dict:
    """'embed_dim=96,depth=4' or a JSON object -> dict."""
    text = text.strip()
    if text.startswith("{"):
        return json.loads(text)
    values = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        key, sep, value = item.partition("=")
        if not sep:
            raise argparse.ArgumentTypeError(f"--model-kwargs: expected key=value, got {item!r}")
        values[key.strip()] = json.loads(value) if value.strip()[:1] in "0123456789-[{tf" else value.strip()
    return values


def add_arguments(parser: argparse.ArgumentParser) -> None:
    d = TrainConfig()
    parser.add_argument("--demo", action="store_true", help="the README demo on the embedded data, then kNN eval")
    parser.add_argument("--model", default=None, help=f"model name (default: {d.model})")
    parser.add_argument("--model-kwargs", type=_model_kwargs, default=None, help="overrides, e.g. embed_dim=96,depth=4")
    parser.add_argument("--img-size", type=int, default=None, help="default: 28 for fashion-mnist, else the model's")
    parser.add_argument("--mask-ratio", type=float, default=None, help=f"default: {d.mask_ratio}")
    parser.add_argument("--no-norm-pix-loss", action="store_true", help="plain pixel targets")
    parser.add_argument("--backend", choices=["auto", *BACKENDS], default=None, help="the ops' backend (default: auto)")
    parser.add_argument("--data", choices=DATA_SOURCES, default=None, help=f"default: {d.data}")
    parser.add_argument("--data-path", default=None, help="ImageNet-layout folder for --data imagefolder")
    parser.add_argument(
        "--decode-on",
        choices=DECODE_ON,
        default=None,
        help="ImageFolder decode + augmentation: device (batched where the model runs, the default on a GPU) or cpu "
        "(Pillow in the DataLoader workers, the default on the CPU); fashion-mnist augments on the device unless cpu",
    )
    parser.add_argument("--num-workers", type=int, default=None, help=f"DataLoader workers (default: {d.num_workers})")
    parser.add_argument("--epochs", type=int, default=None, help=f"default: {d.epochs}")
    parser.add_argument("--max-steps", type=int, default=None, help="stop after this step (schedule unchanged)")
    parser.add_argument("--warmup-epochs", type=float, default=None, help=f"default: {d.warmup_epochs}")
    parser.add_argument("--batch-size", type=int, default=None, help=f"GLOBAL batch per step (default: {d.batch_size})")
    parser.add_argument("--accum-steps", type=int, default=None, help="gradient accumulation steps (default: 1)")
    parser.add_argument("--blr", type=float, default=None, help=f"base lr, lr = blr * batch / 256 (default: {d.blr})")
    parser.add_argument("--lr", type=float, default=None, help="absolute peak lr (overrides --blr)")
    parser.add_argument("--min-lr", type=float, default=None)
    parser.add_argument("--weight-decay", type=float, default=None, help=f"default: {d.weight_decay}")
    parser.add_argument("--clip-grad", type=float, default=None, help="clip the global grad norm to this")
    parser.add_argument(
        "--precision", choices=PRECISIONS, default=None, help="auto: bf16 on GPUs, fp32 on CPUs; fp16 adds a GradScaler"
    )
    parser.add_argument("--compile", action="store_true", help="torch.compile the model")
    parser.add_argument("--nonfinite", choices=NONFINITE_POLICIES, default=None, help="on a NaN/inf loss (stop)")
    parser.add_argument("--sharding", choices=SHARDINGS, default=None, help="under torchrun: ddp or fsdp (FSDP2)")
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default=None)
    parser.add_argument("--output-dir", default=None, help=f"default: {d.output_dir} (demo: {DEMO['output_dir']})")
    parser.add_argument(
        "--log-every", type=int, default=None, help=f"steps between host reads (default: {d.log_every})"
    )
    parser.add_argument("--ckpt-every", type=int, default=None, help="steps between checkpoints (0: at the end)")
    parser.add_argument("--keep-last", type=int, default=None, help=f"checkpoints kept (default: {d.keep_last})")
    parser.add_argument(
        "--resume", nargs="?", const="auto", default=None, help="a checkpoint, or the newest in the output dir"
    )
    parser.add_argument("--overwrite", action="store_true", help="replace the checkpoints of an earlier run")
    parser.add_argument("--no-visualize", action="store_true", help="no PNGs")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


_FLAGS = (
    "model", "model_kwargs", "img_size", "mask_ratio", "backend", "data", "data_path", "num_workers", "decode_on",
    "epochs",
    "max_steps", "warmup_epochs", "batch_size", "accum_steps", "blr", "lr", "min_lr", "weight_decay", "clip_grad",
    "precision", "nonfinite", "sharding", "seed", "device", "output_dir", "log_every", "ckpt_every", "keep_last",
    "resume",
)  # fmt: skip


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    """The run the flags ask for; with --resume, the settings the flags leave out are the checkpoint's."""
    if args.output_dir == "":
        raise ValueError("--output-dir must not be empty (it is the folder the run writes to)")
    values = dict(DEMO) if args.demo else {}
    values.update({name: getattr(args, name) for name in _FLAGS if getattr(args, name) is not None})
    if args.no_norm_pix_loss:
        values["norm_pix_loss"] = False
    if args.compile:
        values["compile"] = True
    if args.overwrite:
        values["overwrite"] = True
    if args.no_visualize:
        values["visualize"] = False
    if args.no_progress:
        values["progress"] = False
    if values.get("resume") is not None:
        values = {**_settings_of_resumed_run(values), **values}
    return TrainConfig.from_dict(values).validate()


def _settings_of_resumed_run(values: dict) -> dict:
    """The settings of the run that ``values["resume"]`` continues (none when "auto" finds no checkpoint),
    which the flags given override: all but resume, overwrite and max_steps, and for "auto" in the folder
    it looked in."""
    folder = values.get("output_dir", TrainConfig.output_dir)
    point = checkpointing.resolve_resume(values["resume"], os.path.join(folder, "checkpoints"))
    if point is None:
        return {}
    saved = {k: v for k, v in point.state["config"].items() if k not in ("resume", "overwrite", "max_steps")}
    if values["resume"] == "auto":
        saved["output_dir"] = folder
    return saved


def run(args: argparse.Namespace) -> int:
    from mae_fast.train.loop import pretrain

    try:
        config = config_from_args(args)
        start = time.perf_counter()
        result = pretrain(config)
    except (ValueError, FileNotFoundError, FileExistsError) as error:
        raise SystemExit(f"mae-fast pretrain: {error}") from error
    if result.interrupted:
        print(f"interrupted by {result.interrupted} at step {result.step}; continue with --resume")
        return 0
    if result.export is None:  # a non-zero rank under torchrun
        return 0
    print(
        f"pretrained {result.step} steps in {time.perf_counter() - start:.0f} s; "
        f"loss {result.history[0][1]:.4f} -> {result.history[-1][1]:.4f}"
        if result.history
        else f"pretrained {result.step} steps"
    )
    print(f"checkpoint: {result.checkpoint}\nexport (release format): {result.export}")
    print(f"pictures and metrics: {config.output_dir}/vis/, loss_curve.png, metrics.jsonl")
    if args.demo:
        _demo_knn(result.export)
    return 0


def _demo_knn(export: str) -> None:
    from mae_fast.train.eval import evaluate
    from mae_fast.train.runmodel import model_from_checkpoint

    start = time.perf_counter()
    scores = {}
    for name, random_init in (("pretrained", False), ("random init", True)):
        model, config = model_from_checkpoint(export, random_init=random_init)
        scores[name] = evaluate(model, config, "knn", "mean", train_limit=DEMO_KNN_TRAIN_LIMIT)
    margin = 100 * (scores["pretrained"] - scores["random init"])
    print(
        f"kNN (k=20, mean-pooled encoder features, 5k train / 2k test Fashion-MNIST) top-1: "
        f"pretrained {scores['pretrained']:.4f} vs same encoder at random init {scores['random init']:.4f} "
        f"(margin {margin:+.1f} points, {time.perf_counter() - start:.0f} s)"
    )
