"""torchrun fine-tuning: 2 gloo ranks on the CPU end with the weights, losses and validation scores of one
process on the same global batch; the validation split is sharded (each image counted once) and a checkpoint
written by the ranks resumes in one process."""

import dataclasses
import json
import os
import subprocess

import pytest
import torch
from train_helpers import assert_same_weights, run_torchrun

from mae_fast.train.finetune import FinetuneConfig, finetune

MODEL_KWARGS = dict(embed_dim=32, depth=2, num_heads=4)


def _config(tmp_path, name, **overrides) -> FinetuneConfig:
    """8 steps of 16 images (2 epochs of 64) of the tiny classifier on the embedded data at 16 px, with every
    per-process random choice off (mixup, cutmix, drop path, erasing), so the ranks' sum is one batch."""
    settings = dict(
        model="vit_tiny_patch4_32", model_kwargs=MODEL_KWARGS, data="fashion-mnist", img_size=16, train_limit=64,
        epochs=2, warmup_epochs=0.5, batch_size=16, accum_steps=2, blr=1e-3, drop_path=0.0, mixup=0.0, cutmix=0.0,
        reprob=0.0, smoothing=0.1, clip_grad=1.0, num_workers=0, eval_batch_size=256, log_every=1, progress=False,
        output_dir=str(tmp_path / name),
    )  # fmt: skip
    return FinetuneConfig(**{**settings, **overrides})


def _torchrun(config: FinetuneConfig, *extra_args) -> subprocess.CompletedProcess:
    args = ["finetune", "--model", config.model, "--model-kwargs", json.dumps(MODEL_KWARGS)]
    for flag in ("data", "img_size", "train_limit", "epochs", "warmup_epochs", "batch_size", "accum_steps", "blr",
                 "drop_path", "mixup", "cutmix", "reprob", "smoothing", "clip_grad", "num_workers", "eval_batch_size",
                 "log_every", "output_dir"):  # fmt: skip
        args += ["--" + flag.replace("_", "-"), str(getattr(config, flag))]
    if config.model_ema:
        args += ["--model-ema", "--model-ema-decay", str(config.model_ema_decay)]
    return run_torchrun([*args, "--device", "cpu", "--no-progress", *extra_args])


def _assert_same_weights(path_a: str, path_b: str, config: FinetuneConfig) -> None:
    assert_same_weights(path_a, path_b, atol=1e-5, key_bias_bound=10 * config.blr * config.batch_size / 256)


def _records(config: FinetuneConfig, key: str) -> list[float]:
    with open(os.path.join(config.output_dir, "metrics.jsonl")) as f:
        return [record[key] for record in map(json.loads, f) if key in record]


def test_two_gloo_ranks_match_one_process(tmp_path):
    single = finetune(_config(tmp_path, "single", model_ema=True, model_ema_decay=0.5))
    config = _config(tmp_path, "ranks", model_ema=True, model_ema_decay=0.5)
    proc = _torchrun(config)
    assert proc.returncode == 0, proc.stderr[-4000:]
    lines = proc.stdout.splitlines()  # rank 0 reports, once
    assert sum(line.startswith("val top-1") for line in lines) == 1
    assert sum(line.startswith("EMA weights: val top-1") for line in lines) == 1
    _assert_same_weights(single.export, os.path.join(config.output_dir, "finetuned.pth"), config)
    _assert_same_weights(single.export_ema, os.path.join(config.output_dir, "finetuned_ema.pth"), config)
    assert _records(config, "loss") == pytest.approx(_records(_config(tmp_path, "single"), "loss"), abs=1e-5)
    # the ranks' validation shards add up to the whole split, scored as one process scores it
    ranks_acc = _records(config, "test_acc1")
    assert len(ranks_acc) == 2 and ranks_acc == pytest.approx([h[1] for h in single.history], abs=1.5 / 2000)
    assert _records(config, "test_loss") == pytest.approx([h[3] for h in single.history], abs=1e-4)
    printed = next(line for line in proc.stdout.splitlines() if line.startswith("val top-1"))
    assert float(printed.split()[2]) == pytest.approx(single.final["acc1"], abs=1.5 / 2000)
    # --eval under torchrun: each rank scores its shard, rank 0 prints the totals over all 2,000 images
    export = os.path.join(config.output_dir, "finetuned.pth")
    evaluated = _torchrun(dataclasses.replace(config, output_dir=str(tmp_path / "eval")), "--eval", export)
    assert evaluated.returncode == 0, evaluated.stderr[-4000:]
    (line,) = [line for line in evaluated.stdout.splitlines() if line.startswith("top-1")]
    assert line.endswith("(2000 images)") and float(line.split()[1]) == pytest.approx(single.final["acc1"], abs=1e-3)


def test_a_checkpoint_of_the_ranks_resumes_in_one_process(tmp_path):
    single = finetune(_config(tmp_path, "single"))
    config = _config(tmp_path, "switched")
    proc = _torchrun(config, "--max-steps", "3")
    assert proc.returncode == 0, proc.stderr[-4000:]
    state = torch.load(os.path.join(config.output_dir, "checkpoints", "checkpoint-00000003.pt"), weights_only=False)
    assert len(state["rngs"]) == 2 and state["step"] == 3
    resumed = finetune(dataclasses.replace(config, resume="auto"))
    assert resumed.step == 8
    _assert_same_weights(single.export, resumed.export, config)


def test_the_global_batch_must_split_over_the_ranks(tmp_path):
    proc = _torchrun(_config(tmp_path, "odd", batch_size=6, accum_steps=2))
    assert proc.returncode != 0
    assert "batch_size=6 must be a multiple of accum_steps x processes = 2 x 2" in proc.stderr
