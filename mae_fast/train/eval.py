"""Frozen-feature evaluation of a pretrained encoder: weighted kNN and a linear probe.

Features come from ``model.encode(imgs)`` (the whole image, nothing masked, after the final norm):
``pool="mean"`` averages the patch tokens (the default: MAE's cls token is not trained by any loss),
``pool="cls"`` takes the cls token. Images get the eval transform only (no augmentation). The two
classifiers take the training and the test set each as a (features [N, D] float, labels [N] int64) pair,
as :func:`extract_features` returns them. The training split's classes define the labels of both splits;
an unreadable image is left out of the features (never replaced by another) and reported.

The linear probe here is the quick one, on features extracted once. The release's probe (the frozen
encoder under augmentation, BatchNorm + Linear on the cls token, LARS, batch 16384, 90 epochs) is
``mae-fast finetune --linprobe`` (``mae_fast.train.finetune``), with checkpoints and an exact resume.
"""

from __future__ import annotations

import argparse
import math

import torch
import torch.nn.functional as F
from torch import nn

from mae_fast.train import data
from mae_fast.train.config import FEATURE_POOLS, TrainConfig
from mae_fast.train.runmodel import model_from_checkpoint


@torch.no_grad()
def extract_features(
    model,
    source,
    pool: str = "mean",
    batch_size: int = 256,
    limit: int | None = None,
    device="cpu",
    unreadable: list[data.BadImage] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(features float32 [N, D], labels int64 [N]) of the readable ones of the first ``limit`` images of
    ``source``; the records of the unreadable ones are appended to ``unreadable`` when given."""
    if pool not in FEATURE_POOLS:
        raise ValueError(f"pool must be one of {FEATURE_POOLS}, got {pool!r}")
    if limit is not None and limit < 1:
        raise ValueError(f"limit must be >= 1 (or None for all images), got {limit}")
    model.eval()
    feats, labels, skipped = [], [], []
    for imgs, batch_labels in data.eval_batches(source, model.img_size[0], batch_size, limit, skipped):
        tokens = model.encode(imgs.to(device)).float()
        feats.append((tokens[:, 1:].mean(dim=1) if pool == "mean" else tokens[:, 0]).cpu())
        labels.append(batch_labels)
    if unreadable is not None:
        unreadable.extend(skipped)
    if not feats:
        reasons = "; ".join(str(record) for record in skipped[:3])
        raise ValueError(f"no readable image among the first {limit or len(source)} of the split: {reasons}")
    return torch.cat(feats), torch.cat(labels)


Labelled = tuple[torch.Tensor, torch.Tensor]


def _num_classes(train: Labelled, test: Labelled) -> int:
    return int(max(train[1].max(), test[1].max())) + 1


def knn_accuracy(train: Labelled, test: Labelled, k: int = 20, temperature: float = 0.07, chunk: int = 1024) -> float:
    """Top-1 accuracy of a cosine-similarity kNN whose k neighbours vote with weight exp(sim / T)
    (the weighted kNN of Wu et al. 2018 / DINO)."""
    (train_feats, train_labels), (test_feats, test_labels) = train, test
    if k < 1 or k > len(train_feats):
        raise ValueError(f"k must be in [1, {len(train_feats)}], got {k}")
    if temperature <= 0:
        raise ValueError(f"temperature must be positive, got {temperature}")
    num_classes = _num_classes(train, test)
    keys = F.normalize(train_feats.float(), dim=1)
    correct = 0
    for start in range(0, len(test_feats), chunk):
        query = F.normalize(test_feats[start : start + chunk].float(), dim=1)
        sims, idx = (query @ keys.T).topk(k, dim=1)
        votes = torch.zeros(len(query), num_classes).scatter_add_(1, train_labels[idx], (sims / temperature).exp())
        correct += int((votes.argmax(dim=1) == test_labels[start : start + chunk]).sum())
    return correct / len(test_feats)


def linear_probe_accuracy(
    train: Labelled, test: Labelled, epochs: int = 90, batch_size: int = 256, lr: float = 1e-2, seed: int = 0
) -> float:
    """Top-1 accuracy of BatchNorm1d(affine=False) + Linear trained on frozen features (the paper's
    probe head; 90 epochs as the paper), AdamW with a cosine schedule, cross-entropy."""
    (train_feats, train_labels), (test_feats, test_labels) = train, test
    if epochs < 1:
        raise ValueError(f"epochs must be positive, got {epochs}")
    generator = torch.Generator().manual_seed(seed)
    num_classes = _num_classes(train, test)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        head = nn.Sequential(
            nn.BatchNorm1d(train_feats.shape[1], affine=False), nn.Linear(train_feats.shape[1], num_classes)
        )
    optimizer = torch.optim.AdamW(head.parameters(), lr=lr, weight_decay=0.0)
    steps = epochs * math.ceil(len(train_feats) / batch_size)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, steps)
    head.train()
    for _ in range(epochs):
        order = torch.randperm(len(train_feats), generator=generator)
        for start in range(0, len(order), batch_size):
            idx = order[start : start + batch_size]
            if len(idx) < 2:
                continue
            loss = F.cross_entropy(head(train_feats[idx]), train_labels[idx])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
    head.eval()
    with torch.no_grad():
        return float((head(test_feats).argmax(dim=1) == test_labels).float().mean())


def evaluate(
    model,
    config: TrainConfig,
    method: str,
    pool: str = "mean",
    train_limit=None,
    test_limit=None,
    notes: list[str] | None = None,
    **kw,
):
    """kNN or linear-probe accuracy of ``model``'s encoder on the labelled data of ``config``. The test
    split is labelled by the training split's classes (a test class that training lacks is a ValueError).
    What the score leaves out (training classes without test images, unreadable images) is appended to
    ``notes`` as lines for the user when given."""
    if method not in ("knn", "linprobe"):
        raise ValueError(f"method must be 'knn' or 'linprobe', got {method!r}")
    for name, limit in (("train_limit", train_limit), ("test_limit", test_limit)):
        if limit is not None and limit < 1:
            raise ValueError(f"{name} must be >= 1 (or None for all images), got {limit}")
    train_source = data.build_source(config, "train")
    test_source = data.build_source(config, "test", classes=train_source.classes)
    lines = []
    if test_source.missing_classes:
        lines.append(f"the test split has no images of training class(es) {test_source.missing_classes}")
    features = {}
    for split, source, limit in (("training", train_source, train_limit), ("test", test_source, test_limit)):
        unreadable: list[data.BadImage] = []
        features[split] = extract_features(model, source, pool, limit=limit, unreadable=unreadable)
        if unreadable:
            listed = "; ".join(str(record) for record in unreadable[:3])
            lines.append(f"left out {len(unreadable)} unreadable {split} image(s): {listed}")
    if notes is not None:
        notes.extend(lines)
    score = knn_accuracy if method == "knn" else linear_probe_accuracy
    return score(features["training"], features["test"], **kw)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("method", choices=["knn", "linprobe"],
                        help="weighted kNN or linear probe on cached frozen features (the release's probe: "
                        "mae-fast finetune --linprobe)")
    parser.add_argument("checkpoint", help="a training checkpoint or an export (mae_pretrain.pth) of mae-fast pretrain")
    parser.add_argument("--data", choices=["fashion-mnist", "imagefolder"], default=None, help="default: the run's")
    parser.add_argument("--data-path", default=None, help="ImageNet-layout folder (train/ and val/ sub-folders)")
    parser.add_argument("--pool", choices=FEATURE_POOLS, default="mean", help="patch-token mean or the cls token")
    parser.add_argument("--k", type=int, default=20, help="kNN neighbours (default: %(default)s)")
    parser.add_argument("--epochs", type=int, default=90, help="linear-probe epochs (default: %(default)s)")
    parser.add_argument("--lr", type=float, default=1e-2, help="linear-probe AdamW lr (default: %(default)s)")
    parser.add_argument("--train-limit", type=int, default=None, help="use only the first N training images")
    parser.add_argument("--test-limit", type=int, default=None, help="use only the first N test images")
    parser.add_argument("--random-init", action="store_true", help="also score the same encoder at initialisation")


def run(args: argparse.Namespace) -> int:
    try:
        model, config = model_from_checkpoint(args.checkpoint)
    except (FileNotFoundError, ValueError) as error:  # a checkpoint that is missing or unreadable
        raise SystemExit(f"mae-fast eval: {error}") from error
    overrides = {k: v for k, v in (("data", args.data), ("data_path", args.data_path)) if v is not None}
    if overrides.get("data") == "imagefolder" and not overrides.get("data_path"):
        raise SystemExit("--data-path is required with --data imagefolder")
    config = TrainConfig.from_dict({**config.to_dict(), **overrides})
    if config.data == "synthetic":
        raise SystemExit("the run used synthetic data, which has no labels: pass --data fashion-mnist or imagefolder")
    kw = {"k": args.k} if args.method == "knn" else {"epochs": args.epochs, "lr": args.lr}
    limits = {"train_limit": args.train_limit, "test_limit": args.test_limit}
    models = [("pretrained", model)]
    if args.random_init:
        models.append(("random init", model_from_checkpoint(args.checkpoint, random_init=True)[0]))
    shown: set[str] = set()  # the notes are about the data, the same for every model
    for name, candidate in models:
        notes: list[str] = []
        try:
            accuracy = evaluate(candidate, config, args.method, args.pool, **limits, notes=notes, **kw)
        except ValueError as error:  # bad data or flags: the message names them
            raise SystemExit(f"mae-fast eval: {error}") from error
        for note in notes:
            if note not in shown:
                shown.add(note)
                print(f"note: {note}")
        print(f"{args.method} top-1 ({args.pool}-pooled features, {config.data}), {name}: {accuracy:.4f}")
    return 0
