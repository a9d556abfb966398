"""precision="fp16": float16 autocast with torch.amp's GradScaler in the pretraining loop.

The scaler's state is checkpointed and resumed bit for bit, a gradient overflow at a finite loss is skipped,
counted and backed off without stopping the run, and a non-finite loss still stops it. CPU runs of the tiny
MAE (float16 autocast runs on the CPU too).
"""

import json
import math
import os

import pytest
import torch
from train_helpers import tiny_config

from mae_fast.models import MaskedAutoencoderViT
from mae_fast.train import NonFiniteLossError, pretrain
from mae_fast.train.checkpointing import latest_checkpoint, load_training_checkpoint
from mae_fast.train.loop import FP16_INIT_SCALE


def _scale_loss_on_calls(monkeypatch, factor, calls_to_scale):
    """forward_loss multiplies the loss by ``factor`` on the given (0-based) calls."""
    original = MaskedAutoencoderViT.forward_loss
    calls = {"n": 0}

    def scaled(self, imgs, pred, mask):
        loss = original(self, imgs, pred, mask)
        calls["n"] += 1
        return loss * factor if calls["n"] - 1 in calls_to_scale else loss

    monkeypatch.setattr(MaskedAutoencoderViT, "forward_loss", scaled)


def _records(result) -> list[dict]:
    with open(os.path.join(result.output_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def test_fp16_resume_is_bitwise_exact_with_the_scaler_state(tmp_path):
    common = dict(precision="fp16", accum_steps=2, clip_grad=0.5)
    full = pretrain(tiny_config(tmp_path, "full", **common))
    first = pretrain(tiny_config(tmp_path, "split", max_steps=4, **common))
    saved = load_training_checkpoint(latest_checkpoint(os.path.join(first.output_dir, "checkpoints")))
    assert saved["scaler"]["scale"] == FP16_INIT_SCALE and saved["scaler"]["_growth_tracker"] == 4
    second = pretrain(tiny_config(tmp_path, "split", resume="auto", **common))
    assert second.step == full.step == 9 and second.history == full.history
    a, b = load_training_checkpoint(full.checkpoint), load_training_checkpoint(second.checkpoint)
    assert a["scaler"] == b["scaler"] and a["scaler"]["_growth_tracker"] == 9
    for key, value in a["model"].items():
        assert torch.equal(value, b["model"][key]), key
    assert all(r["loss_scale"] == FP16_INIT_SCALE for r in _records(second))


def test_fp16_gradient_overflow_is_skipped_counted_and_backed_off(tmp_path, monkeypatch):
    """A loss of ~1e35 is finite in fp32, its scaled gradient is not: that update is skipped and counted,
    the scale halves, and the run goes on although nonfinite="stop"."""
    _scale_loss_on_calls(monkeypatch, 1e35, {2})
    result = pretrain(tiny_config(tmp_path, precision="fp16", log_every=1))
    assert result.step == 9 and result.skipped_steps == 1
    state = load_training_checkpoint(result.checkpoint)
    assert {int(s["step"]) for s in state["optimizer"]["state"].values()} == {8}  # 8 of the 9 updates
    assert all(torch.isfinite(v).all() for v in state["model"].values())
    assert state["scaler"]["scale"] == FP16_INIT_SCALE / 2
    records = _records(result)
    assert [r["skipped_steps"] for r in records] == [0, 0] + [1] * 7
    assert [r["loss_scale"] for r in records] == [FP16_INIT_SCALE] * 2 + [FP16_INIT_SCALE / 2] * 7
    losses = [r["loss"] for r in records]
    assert math.isnan(losses[2]) and all(loss < 1e3 for loss in losses[:2] + losses[3:])  # no good step at 3


def test_fp16_nonfinite_loss_still_stops(tmp_path, monkeypatch):
    _scale_loss_on_calls(monkeypatch, float("nan"), {2})
    with pytest.raises(NonFiniteLossError, match=r"steps 3\.\.3"):
        pretrain(tiny_config(tmp_path, precision="fp16", log_every=1))


def test_fp16_with_fsdp_is_refused(tmp_path):
    with pytest.raises(ValueError, match="fp16.*fsdp"):
        tiny_config(tmp_path, precision="fp16", sharding="fsdp").validate()
