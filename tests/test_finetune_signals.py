"""Fine-tuning stopped by SIGTERM / SIGINT: a checkpoint at the current step, exit 0 from the CLI, and a
resume that continues bit-exactly (the same weights as a run that was never stopped); the progress bar."""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from train_helpers import make_split_image_folder, subprocess_env

from mae_fast.train import finetune as finetune_module
from mae_fast.train.checkpointing import latest_checkpoint

TINY_ENCODER = dict(embed_dim=32, depth=2, num_heads=4)


def _cli_args(data_path: str, output_dir: str) -> list[str]:
    return [
        "--model", "vit_tiny_patch4_32", "--model-kwargs", json.dumps(TINY_ENCODER), "--data", "imagefolder",
        "--data-path", data_path, "--img-size", "16", "--epochs", "10000", "--batch-size", "4",
        "--warmup-epochs", "1", "--num-workers", "1", "--log-every", "1", "--output-dir", output_dir,
        "--device", "cpu", "--no-progress",
    ]  # fmt: skip


def _config(args: list[str], **changes) -> finetune_module.FinetuneConfig:
    """The config the CLI builds from ``args`` (so that the in-process runs below are the same run)."""
    parser = argparse.ArgumentParser()
    finetune_module.add_arguments(parser)
    return dataclasses.replace(finetune_module.config_from_args(parser.parse_args(args)), **changes)


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_ends_in_a_checkpoint_and_the_resume_is_bit_exact(tmp_path, signum):
    data_path = make_split_image_folder(tmp_path / "data", 8, 2, 20, 20)
    output_dir = str(tmp_path / "signalled")
    args = _cli_args(data_path, output_dir)
    proc = subprocess.Popen(
        [sys.executable, "-m", "mae_fast", "finetune", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True, env=subprocess_env(), start_new_session=True,
    )  # fmt: skip
    metrics = os.path.join(output_dir, "metrics.jsonl")
    deadline = time.monotonic() + 120
    while not (os.path.isfile(metrics) and os.path.getsize(metrics) > 0):
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, "the run did not start within 120 s"
        time.sleep(0.1)
    os.killpg(proc.pid, signum)  # the whole group, the data worker included, as a batch scheduler does
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    assert f"interrupted by {signal.Signals(signum).name} at step" in out
    checkpoint = latest_checkpoint(os.path.join(output_dir, "checkpoints"))
    stopped_at = torch.load(checkpoint, weights_only=False)["step"]
    assert f"at step {stopped_at};" in out and 1 <= stopped_at < 40_000
    with open(metrics) as f:
        steps = [json.loads(line)["step"] for line in f if '"step"' in line]
    assert steps[-1] == stopped_at  # the checkpoint is of the last step that ran

    end = stopped_at + 3
    resumed = finetune_module.finetune(_config(args, resume="auto", max_steps=end, num_workers=0))
    straight = finetune_module.finetune(_config(args, output_dir=str(tmp_path / "straight"), max_steps=end))
    assert resumed.step == straight.step == end and resumed.interrupted is None
    a = torch.load(resumed.checkpoint, weights_only=False)
    b = torch.load(straight.checkpoint, weights_only=False)
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in b["model"])
    assert a["metrics"]["history"] == b["metrics"]["history"]


def test_a_signal_in_process_stops_at_the_current_step(tmp_path, monkeypatch):
    """The run returns (no exception, no export) with ``interrupted`` set and a checkpoint of that step,
    also when the signal comes between two checkpoints."""
    data_path = make_split_image_folder(tmp_path / "data", 8, 2, 20, 20)
    config = _config(_cli_args(data_path, str(tmp_path / "run")), num_workers=0, ckpt_every=100)
    real_step = finetune_module.Trainer.step
    calls = {"n": 0}

    def step_then_signal(self, micro_batches, lr):
        calls["n"] += 1
        if calls["n"] == 3:
            os.kill(os.getpid(), signal.SIGTERM)
        return real_step(self, micro_batches, lr)

    monkeypatch.setattr(finetune_module.Trainer, "step", step_then_signal)
    result = finetune_module.finetune(config)
    assert result.interrupted == "SIGTERM" and result.step == 3 and result.export is None
    assert torch.load(result.checkpoint, weights_only=False)["step"] == 3
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # the handler is put back


def test_progress_is_a_bar_with_one_summary_line_per_epoch(tmp_path, capsys):
    data_path = make_split_image_folder(tmp_path / "data", 8, 2, 20, 20)
    args = [*_cli_args(data_path, str(tmp_path / "run")), "--epochs", "2"]
    args.remove("--no-progress")
    result = finetune_module.finetune(_config(args, num_workers=0))
    assert result.step == 8 and result.final
    captured = capsys.readouterr()
    assert [line.split(":")[0] for line in captured.out.splitlines()] == ["epoch 0", "epoch 1"]
    assert "finetune: 100%" in captured.err and "8/8" in captured.err  # tqdm's bar, on stderr


def test_no_data_worker_outlives_the_run(tmp_path):
    """The workers ignore SIGTERM, so one left for interpreter exit would hang it (multiprocessing's exit
    hook terminates daemon children with SIGTERM, then joins them): the run stops them itself, also when a
    reference cycle keeps its loaders alive (the garbage collector is off here to make that certain)."""
    import gc
    import multiprocessing

    data_path = make_split_image_folder(tmp_path / "data", 8, 2, 20, 20)
    config = _config(_cli_args(data_path, str(tmp_path / "run")), epochs=1)
    gc.collect()
    before = set(multiprocessing.active_children())
    gc.disable()
    try:
        result = finetune_module.finetune(config)
        assert result.final and config.num_workers == 1
        assert set(multiprocessing.active_children()) == before
        finetune_module.evaluate_checkpoint(result.export, config)
        assert set(multiprocessing.active_children()) == before
    finally:
        gc.enable()
