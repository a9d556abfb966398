"""The pretraining loop: exact resume, checkpoints, signals, non-finite losses, recipe and config errors.

Runs on the CPU with a 1-block, 32-wide MAE on a tiny ImageFolder of 16x16 images (16 patches of 4x4),
so every run takes seconds.
"""

import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest
import torch
from train_helpers import TINY, subprocess_env, tiny_config

from mae_fast.models import MaskedAutoencoderViT, create_model, load_checkpoint
from mae_fast.train import NonFiniteLossError, TrainConfig, pretrain
from mae_fast.train.checkpointing import latest_checkpoint, list_checkpoints, load_training_checkpoint
from mae_fast.train.schedule import build_optimizer, lr_factor, param_groups


def final_weights(result) -> dict:
    return torch.load(result.export, weights_only=True)["model"]


def test_resume_is_bitwise_exact_mid_epoch(tmp_path):
    """Stop mid-epoch (step 4 of 9, epoch 1), resume with DataLoader workers: losses and weights equal
    the uninterrupted run bit for bit (accumulation and clipping on)."""
    common = dict(accum_steps=2, clip_grad=0.5)
    full = pretrain(tiny_config(tmp_path, "full", **common))
    assert full.step == 9 and len(full.history) == 9

    first = pretrain(tiny_config(tmp_path, "split", max_steps=4, **common))
    assert first.step == 4
    ckpt = load_training_checkpoint(latest_checkpoint(str(tmp_path / "split" / "checkpoints")))
    assert (ckpt["step"], ckpt["epoch"], ckpt["micro_batch"]) == (4, 1, 2)
    second = pretrain(tiny_config(tmp_path, "split", resume="auto", num_workers=2, **common))
    assert second.step == 9
    assert second.history == full.history  # the first 4 come from the checkpoint, the rest were recomputed
    a, b = final_weights(full), final_weights(second)
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    with open(tmp_path / "split" / "metrics.jsonl") as f:
        assert [json.loads(line)["step"] for line in f] == list(range(1, 10))


def test_resume_at_epoch_boundary_and_explicit_path(tmp_path):
    full = pretrain(tiny_config(tmp_path, "full", epochs=2))
    pretrain(tiny_config(tmp_path, "split", epochs=2, max_steps=3))
    path = latest_checkpoint(str(tmp_path / "split" / "checkpoints"))
    assert load_training_checkpoint(path)["micro_batch"] == 0
    resumed = pretrain(tiny_config(tmp_path, "split", epochs=2, resume=path))
    assert resumed.history == full.history


def test_checkpoints_kept_exported_and_loadable(tmp_path):
    config = tiny_config(tmp_path, ckpt_every=1, keep_last=2, visualize=True, num_vis=2, epochs=1)
    result = pretrain(config)
    ckpts = list_checkpoints(os.path.join(config.output_dir, "checkpoints"))
    assert [os.path.basename(p) for p in ckpts] == ["checkpoint-00000002.pt", "checkpoint-00000003.pt"]
    state = load_training_checkpoint(ckpts[-1])
    for key in ("model", "optimizer", "scheduler", "rng", "config", "metrics"):
        assert key in state
    assert state["scheduler"]["last_epoch"] == 3
    assert set(state["rng"][0]) >= {"python", "numpy", "torch"}
    model = create_model("mae_vit_tiny_patch4_32", **TINY, img_size=16)
    report = load_checkpoint(model, result.export)
    assert not report.missing_encoder_keys and not report.missing_decoder_keys and not report.unexpected_keys
    for key, value in model.state_dict().items():
        assert torch.equal(value, state["model"][key]), key
    pictures = sorted(os.listdir(os.path.join(config.output_dir, "vis")))
    assert pictures == [f"reconstruction-0000000{i}.png" for i in (1, 2, 3)]
    assert os.path.getsize(os.path.join(config.output_dir, "loss_curve.png")) > 1000


def test_a_fresh_run_does_not_silently_mix_with_old_checkpoints(tmp_path):
    pretrain(tiny_config(tmp_path, max_steps=2))
    with pytest.raises(FileExistsError, match="already holds checkpoints"):
        pretrain(tiny_config(tmp_path, max_steps=1))
    pretrain(tiny_config(tmp_path, max_steps=1, overwrite=True))
    ckpts = list_checkpoints(os.path.join(tmp_path, "run", "checkpoints"))
    assert [os.path.basename(p) for p in ckpts] == ["checkpoint-00000001.pt"]


def _poison_loss(monkeypatch, bad_calls):
    """forward_loss returns NaN on the given (0-based) calls."""
    original = MaskedAutoencoderViT.forward_loss
    calls = {"n": 0}

    def poisoned(self, imgs, pred, mask):
        loss = original(self, imgs, pred, mask)
        calls["n"] += 1
        return loss * float("nan") if calls["n"] - 1 in bad_calls else loss

    monkeypatch.setattr(MaskedAutoencoderViT, "forward_loss", poisoned)


def test_nonfinite_loss_stops_without_saving_bad_weights(tmp_path, monkeypatch):
    _poison_loss(monkeypatch, {2})  # step 3; the host reads at the checkpoint steps 2 and 4
    config = tiny_config(tmp_path, ckpt_every=2, log_every=5)
    with pytest.raises(NonFiniteLossError, match=r"steps 3\.\.4"):
        pretrain(config)
    ckpts = list_checkpoints(os.path.join(config.output_dir, "checkpoints"))
    assert [load_training_checkpoint(p)["step"] for p in ckpts] == [2]
    state = load_training_checkpoint(ckpts[0])
    assert all(torch.isfinite(v).all() for v in state["model"].values())


def test_nonfinite_loss_skip_policy_skips_only_that_update(tmp_path, monkeypatch):
    _poison_loss(monkeypatch, {2})
    result = pretrain(tiny_config(tmp_path, nonfinite="skip", log_every=4))
    assert result.step == 9 and result.skipped_steps == 1
    state = load_training_checkpoint(result.checkpoint)
    assert all(torch.isfinite(v).all() for v in state["model"].values())
    steps = {int(s["step"]) for s in state["optimizer"]["state"].values()}
    assert steps == {8}  # AdamW took 8 of the 9 updates
    with open(os.path.join(result.output_dir, "metrics.jsonl")) as f:
        records = [json.loads(line) for line in f]
    assert [r["skipped_steps"] for r in records] == [1, 1, 1]
    assert all(np.isfinite(r["loss"]) for r in records)


def test_lr_schedule_values():
    assert lr_factor(0, 4, 12) == 0.25
    assert lr_factor(3, 4, 12) == 1.0
    assert lr_factor(4, 4, 12) == 1.0
    assert lr_factor(8, 4, 12) == pytest.approx(0.5)
    assert lr_factor(12, 4, 12) == pytest.approx(0.0, abs=1e-12)
    assert lr_factor(8, 4, 12, min_ratio=0.1) == pytest.approx(0.55)
    assert lr_factor(0, 0, 10) == 1.0


def test_lr_follows_the_batch_rule_per_iteration(tmp_path):
    result = pretrain(tiny_config(tmp_path, blr=2e-3, batch_size=8, epochs=2, warmup_epochs=1.0))
    with open(os.path.join(result.output_dir, "metrics.jsonl")) as f:
        lrs = [json.loads(line)["lr"] for line in f]
    peak = 2e-3 * 8 / 256
    # the lr logged after step s is the one step s + 1 will use: warmup 3 steps, cosine over the next 3
    expected = [peak * lr_factor(s, 3, 6) for s in range(1, 7)]
    assert lrs == pytest.approx(expected, rel=1e-12)


def test_weight_decay_groups():
    model = create_model("mae_vit_tiny_patch4_32", **TINY)
    decay, no_decay = param_groups(model, 0.05)
    assert decay["weight_decay"] == 0.05 and no_decay["weight_decay"] == 0.0
    names = {id(p): n for n, p in model.named_parameters()}
    decayed = {names[id(p)] for p in decay["params"]}
    plain = {names[id(p)] for p in no_decay["params"]}
    assert "blocks.0.attn.qkv.weight" in decayed and "patch_embed.proj.weight" in decayed
    assert {"cls_token", "mask_token"} <= decayed  # >= 2-D, decayed as in the release
    assert {"blocks.0.attn.qkv.bias", "blocks.0.norm1.weight", "norm.bias", "decoder_pred.bias"} <= plain
    assert all(p.ndim <= 1 for p in no_decay["params"]) and all(p.ndim >= 2 for p in decay["params"])
    assert "pos_embed" not in decayed | plain and "decoder_pos_embed" not in decayed | plain
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert decayed | plain == trainable
    optimizer = build_optimizer(model, 1e-3, 0.05, (0.9, 0.95))
    assert optimizer.defaults["betas"] == (0.9, 0.95) and optimizer.defaults["fused"]


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(batch_size=10, accum_steps=4), "batch_size=10 must be divisible by accum_steps=4"),
        (dict(model="mae_vit_nope"), "unknown model 'mae_vit_nope'"),
        (dict(data_path="/nonexistent/folder"), "data_path: folder not found"),
        (dict(data_path=None), "data_path is required"),
        (dict(mask_ratio=1.0), r"mask_ratio must be in \[0, 1\)"),
        (dict(mask_ratio=-0.1), r"mask_ratio must be in \[0, 1\)"),
        (dict(data="cifar"), "data must be one of"),
        (dict(epochs=0), "epochs must be a positive int"),
        (dict(warmup_epochs=5.0), "warmup_epochs=5.0 exceeds epochs=3"),
        (dict(precision="fp8"), "precision must be one of"),
        (dict(decode_on="gpu"), "decode_on must be one of"),
        (dict(clip_grad=-1.0), "clip_grad must be positive"),
    ],
)
def test_bad_config_values_are_clear_errors(tmp_path, overrides, message):
    with pytest.raises(ValueError, match=message):
        tiny_config(tmp_path, **overrides).validate()


def test_batch_not_divisible_by_world_size():
    with pytest.raises(ValueError, match="must be divisible by the world size 3"):
        TrainConfig(batch_size=8).micro_batch(3)


def test_sigterm_writes_a_checkpoint_and_exits_cleanly(tmp_path):
    config = tiny_config(tmp_path, epochs=10_000)
    args = [sys.executable, "-m", "mae_fast", "pretrain", "--data", "imagefolder", "--data-path", config.data_path]
    args += ["--model-kwargs", json.dumps(TINY), "--img-size", "16", "--batch-size", "8", "--epochs", "10000"]
    args += ["--blr", "1e-2", "--warmup-epochs", "1"]  # tiny_config's, so that the resume below continues this run
    args += ["--num-workers", "0", "--output-dir", config.output_dir, "--log-every", "1", "--no-visualize"]
    args += ["--no-progress", "--device", "cpu"]
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=subprocess_env())
    metrics = os.path.join(config.output_dir, "metrics.jsonl")
    deadline = time.monotonic() + 120
    while not (os.path.isfile(metrics) and os.path.getsize(metrics) > 0):
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, "the run did not start within 120 s"
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    assert "interrupted by SIGTERM" in out
    path = latest_checkpoint(os.path.join(config.output_dir, "checkpoints"))
    state = load_training_checkpoint(path)
    assert f"at step {state['step']};" in out and 1 <= state["step"] < 30_000
    resumed = pretrain(tiny_config(tmp_path, epochs=10_000, resume="auto", max_steps=state["step"] + 1))
    assert resumed.step == state["step"] + 1


KILL_SCRIPT = textwrap.dedent(
    """
    import os, sys, time, torch
    from mae_fast.train import checkpointing
    folder = sys.argv[1]
    checkpointing.save_checkpoint({"step": 1, "model": {"w": torch.ones(3)}}, folder, keep_last=3)
    real_fsync = os.fsync
    def stalled_fsync(fd):
        print("writing", flush=True)
        time.sleep(600)
    os.fsync = stalled_fsync
    checkpointing.save_checkpoint({"step": 2, "model": {"w": torch.randn(1_000_000)}}, folder, keep_last=3)
    """
)


def test_kill_9_during_a_checkpoint_write_keeps_the_previous_one(tmp_path):
    folder = str(tmp_path / "checkpoints")
    proc = subprocess.Popen(
        [sys.executable, "-c", KILL_SCRIPT, folder], stdout=subprocess.PIPE, text=True, env=subprocess_env()
    )
    assert proc.stdout.readline().strip() == "writing"  # the step-2 file is being written
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    leftovers = sorted(os.listdir(folder))
    assert any(name.endswith(".tmp") for name in leftovers)  # the half-written file never took the real name
    assert [os.path.basename(p) for p in list_checkpoints(folder)] == ["checkpoint-00000001.pt"]
    state = torch.load(latest_checkpoint(folder), weights_only=True)
    assert state["step"] == 1 and torch.equal(state["model"]["w"], torch.ones(3))
    from mae_fast.train.checkpointing import save_checkpoint

    save_checkpoint({"step": 3, "model": {}}, folder, keep_last=3)  # the next save cleans the stray file
    assert not any(name.endswith(".tmp") for name in os.listdir(folder))


@pytest.mark.slow
def test_demo_end_to_end(tmp_path, capsys):
    """The README's main command, shortened: pictures, metrics, a falling loss and the kNN comparison."""
    from mae_fast.cli import main

    out = str(tmp_path / "demo")
    assert main(["pretrain", "--demo", "--max-steps", "40", "--ckpt-every", "20", "--output-dir", out]) == 0
    printed = capsys.readouterr().out
    assert os.path.getsize(os.path.join(out, "loss_curve.png")) > 1000
    assert sorted(os.listdir(os.path.join(out, "vis"))) == [
        "reconstruction-00000020.png",
        "reconstruction-00000040.png",
    ]
    with open(os.path.join(out, "metrics.jsonl")) as f:
        losses = [json.loads(line)["loss"] for line in f]
    assert len(losses) == 4 and losses[-1] < losses[0]
    assert "pretrained 0." in printed and "same encoder at random init 0." in printed
    report = load_checkpoint(
        create_model("mae_vit_tiny_patch4_32", in_chans=1, img_size=28, **_demo_kwargs()),
        os.path.join(out, "mae_pretrain.pth"),
    )
    assert str(report) == "all keys loaded"


def _demo_kwargs():
    from mae_fast.train.cli import DEMO

    return DEMO["model_kwargs"]


@pytest.mark.gpu
def test_pretrain_on_the_gpu_with_the_kernels(tmp_path):
    """bf16 autocast, backend auto (the kernels), pinned-memory loader with workers, DDP-free single GPU."""
    config = tiny_config(tmp_path, device="cuda", backend="auto", num_workers=2, clip_grad=1.0, visualize=True)
    result = pretrain(config)
    assert result.step == 9 and result.skipped_steps == 0
    assert all(np.isfinite(loss) for _, loss in result.history)
    state = load_training_checkpoint(result.checkpoint)
    assert all(v.device.type == "cpu" and torch.isfinite(v).all() for v in state["model"].values())
    resumed = pretrain(tiny_config(tmp_path, device="cuda", backend="auto", epochs=4, resume="auto"))
    assert resumed.step == 12
