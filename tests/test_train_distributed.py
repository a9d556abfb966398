"""torchrun: a 2-process gloo run on the CPU ends with the weights of a 1-process run on the same global batch,
and a checkpoint resumes under any sharding and number of processes."""

import dataclasses
import json
import os

import pytest
import torch
from train_helpers import TINY, assert_same_weights, run_torchrun, tiny_config

from mae_fast.train import pretrain


def _torchrun(config, sharding, *extra_args):
    args = ["pretrain", "--data", "imagefolder", "--data-path", config.data_path]
    args += ["--model-kwargs", json.dumps(TINY), "--img-size", "16", "--batch-size", str(config.batch_size)]
    args += ["--epochs", str(config.epochs), "--warmup-epochs", "1", "--blr", str(config.blr), "--num-workers", "0"]
    args += ["--output-dir", config.output_dir, "--log-every", "1", "--no-visualize", "--no-progress"]
    args += ["--device", "cpu", "--sharding", sharding, "--clip-grad", "1.0", "--accum-steps", "2", *extra_args]
    return run_torchrun(args)


def _assert_same_weights(export_a, export_b, config):
    assert_same_weights(export_a, export_b, atol=1e-6, key_bias_bound=6 * config.blr * config.batch_size / 256)


@pytest.mark.parametrize("sharding", ["ddp", "fsdp"])
def test_two_gloo_ranks_match_one_process(tmp_path, sharding):
    single = pretrain(tiny_config(tmp_path, "single", epochs=2, clip_grad=1.0, accum_steps=2))
    config = tiny_config(tmp_path, "ranks", epochs=2)
    proc = _torchrun(config, sharding)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "pretrained 6 steps" in proc.stdout
    _assert_same_weights(single.export, os.path.join(config.output_dir, "mae_pretrain.pth"), config)
    with open(os.path.join(config.output_dir, "metrics.jsonl")) as f:
        losses = [json.loads(line)["loss"] for line in f]
    assert losses == pytest.approx([loss for _, loss in single.history], abs=1e-6)


def _run_part(sharding, config):
    """``config`` in this process ("single") or in two FSDP2 ranks ("fsdp"; max_steps and resume carried over)."""
    if sharding == "single":
        pretrain(config)
        return
    extra_args = ["--max-steps", str(config.max_steps)] if config.max_steps else []
    extra_args += ["--resume"] if config.resume == "auto" else []
    proc = _torchrun(config, "fsdp", *extra_args)
    assert proc.returncode == 0, proc.stderr[-4000:]


@pytest.mark.parametrize("first, then", [("fsdp", "single"), ("single", "fsdp")])
def test_checkpoint_resumes_under_another_sharding(tmp_path, first, then):
    """Three steps under one sharding, the last three resumed under the other: the weights of an uninterrupted
    1-process run. The checkpoint's optimizer state is keyed by parameter name, whatever wrote it."""
    single = pretrain(tiny_config(tmp_path, "single", epochs=2, clip_grad=1.0, accum_steps=2))
    config = tiny_config(tmp_path, "switched", epochs=2, clip_grad=1.0, accum_steps=2)
    _run_part(first, dataclasses.replace(config, max_steps=3))
    _run_part(then, dataclasses.replace(config, resume="auto"))
    state = torch.load(os.path.join(config.output_dir, "checkpoints", "checkpoint-00000003.pt"), weights_only=True)
    assert "blocks.0.attn.qkv.weight" in state["optimizer"]["state"]
    _assert_same_weights(single.export, os.path.join(config.output_dir, "mae_pretrain.pth"), config)
