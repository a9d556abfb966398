"""--model-ema: timm's ModelEmaV3 of the fine-tuned weights follows its formula step by step, leaves the training
alone, is checkpointed and resumed bit-exactly, evaluated each epoch and exported to finetuned_ema.pth, which
--eval scores."""

from __future__ import annotations

import argparse
import dataclasses
import json
import os

import pytest
import torch

from mae_fast.train import finetune as finetune_module
from mae_fast.train.checkpointing import list_checkpoints
from mae_fast.train.finetune import FinetuneConfig, evaluate_checkpoint, finetune, load_finetuned


def _config(tmp_path, name, **overrides) -> FinetuneConfig:
    """2 epochs of 3 steps of the tiny classifier on 48 embedded images at 16 px, a checkpoint at every step."""
    settings = dict(
        model="vit_tiny_patch4_32", model_kwargs=dict(embed_dim=32, depth=2, num_heads=4), data="fashion-mnist",
        img_size=16, train_limit=48, epochs=2, warmup_epochs=0.5, batch_size=16, blr=1e-2, mixup=0.0, cutmix=0.0,
        reprob=0.0, num_workers=0, eval_batch_size=500, ckpt_every=1, keep_last=10, log_every=1, progress=False,
        model_ema=True, model_ema_decay=0.6, output_dir=str(tmp_path / name),
    )  # fmt: skip
    return FinetuneConfig(**{**settings, **overrides})


def _states(config: FinetuneConfig) -> list[dict]:
    folder = os.path.join(config.output_dir, "checkpoints")
    return [torch.load(path, weights_only=False) for path in list_checkpoints(folder)]


def test_the_average_follows_timms_formula_at_every_step(tmp_path):
    config = _config(tmp_path, "run")
    result = finetune(config)
    states = _states(config)
    assert [state["step"] for state in states] == list(range(1, 7))
    expected = None
    for state in states:
        weights = state["model"]
        if expected is None:  # the first update copies the weights (timm's decay is 0 at step 1)
            expected = {key: value.clone() for key, value in weights.items()}
        else:
            for key, value in weights.items():
                expected[key] = expected[key] + (1 - config.model_ema_decay) * (value - expected[key])
        assert state["model_ema"].keys() == weights.keys()
        for key, value in state["model_ema"].items():
            torch.testing.assert_close(value, expected[key], rtol=0, atol=1e-6, msg=key)
    moved = [key for key in weights if not torch.equal(state["model_ema"][key], weights[key])]
    assert moved, "the average equals the weights: the test compares nothing"
    # evaluated at each epoch end beside the weights, exported, and scored by --eval as the run scored it
    assert [h[0] for h in result.ema_history] == [0, 1] and result.final_ema["count"] == 2000
    with open(os.path.join(config.output_dir, "metrics.jsonl")) as f:
        epochs = [record for record in map(json.loads, f) if "test_acc1" in record]
    assert [record["ema_test_acc1"] for record in epochs] == [h[1] for h in result.ema_history]
    model, _ = load_finetuned(result.export_ema)
    for key, value in model.state_dict().items():
        assert torch.equal(value, states[-1]["model_ema"][key]), key
    scores = evaluate_checkpoint(result.export_ema, config)
    assert scores["acc1"] == pytest.approx(result.final_ema["acc1"], abs=1e-9)
    # the average leaves the training alone: without it the run ends with the same weights and scores
    plain = finetune(_config(tmp_path, "plain", model_ema=False))
    assert plain.history == result.history and plain.export_ema is None
    plain_weights = torch.load(plain.export, weights_only=True)["model"]
    assert all(torch.equal(plain_weights[key], weights[key]) for key in weights)


def test_a_resumed_run_ends_with_the_same_average(tmp_path):
    straight = finetune(_config(tmp_path, "straight"))
    config = _config(tmp_path, "resumed")
    assert finetune(dataclasses.replace(config, max_steps=4)).step == 4
    resumed = finetune(dataclasses.replace(config, resume="auto"))
    a, b = _states(config)[-1], torch.load(straight.checkpoint, weights_only=False)
    assert a["step"] == b["step"] == 6
    for part in ("model", "model_ema"):
        assert all(torch.equal(a[part][key], b[part][key]) for key in b[part]), part
    assert resumed.ema_history == straight.ema_history


def test_resuming_without_the_average_is_refused(tmp_path):
    config = _config(tmp_path, "run", max_steps=1)
    finetune(config)
    with pytest.raises(ValueError, match=r"model_ema: True -> False"):
        finetune(dataclasses.replace(config, model_ema=False, resume="auto", max_steps=2))


def test_the_flags_and_their_errors():
    parser = argparse.ArgumentParser()
    finetune_module.add_arguments(parser)
    args = parser.parse_args(["--data", "fashion-mnist", "--model-ema", "--model-ema-decay", "0.99"])
    config = finetune_module.config_from_args(args)
    assert config.model_ema is True and config.model_ema_decay == 0.99
    assert finetune_module.config_from_args(parser.parse_args(["--data", "fashion-mnist"])).model_ema is False
    for decay in (1.0, -0.1, float("nan"), "0.9"):
        with pytest.raises(ValueError, match="model_ema_decay must be a number in"):
            FinetuneConfig(data="fashion-mnist", model_ema=True, model_ema_decay=decay).validate()
    with pytest.raises(ValueError, match="model_ema must be True or False"):
        FinetuneConfig(data="fashion-mnist", model_ema=1).validate()
