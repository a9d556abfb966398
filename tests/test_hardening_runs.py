"""Faults and bad input around a run: refused runs leave the run folder as it was, corrupt checkpoints and
metrics are named or skipped, signals to the whole process group end in a checkpoint, CLI paths are honest.

CPU runs of the suite's tiny MAE on a tiny ImageFolder (train_helpers.tiny_config: 3 steps per epoch).
"""

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from train_helpers import TINY, subprocess_env, tiny_config

from mae_fast.cli import main
from mae_fast.train import pretrain
from mae_fast.train.checkpointing import checkpoint_path, list_checkpoints, load_training_checkpoint
from mae_fast.train.data import TrainData


def _folder_snapshot(output_dir) -> dict:
    """Every file under ``output_dir`` (relative path -> bytes)."""
    files = {}
    for root, _, names in os.walk(output_dir):
        for name in names:
            path = os.path.join(root, name)
            with open(path, "rb") as f:
                files[os.path.relpath(path, output_dir)] = f.read()
    return files


def _checkpoint_steps(config) -> list[int]:
    folder = os.path.join(config.output_dir, "checkpoints")
    return [load_training_checkpoint(p)["step"] for p in list_checkpoints(folder)]


# --- 1. a refused run leaves the run folder as it was ---------------------------------------------------------


@pytest.fixture
def finished_run(tmp_path):
    """A 4-step run with a checkpoint at every step (checkpoints 2, 3, 4 kept)."""
    config = tiny_config(tmp_path, max_steps=4, ckpt_every=1)
    pretrain(config)
    return config


@pytest.mark.parametrize(
    "overrides, error, message",
    [
        (dict(lr=0.5), FileExistsError, "already holds checkpoints of another run"),
        (dict(resume="/nonexistent/checkpoint.pt"), FileNotFoundError, "checkpoint not found"),
        (dict(resume="auto", lr=0.5), ValueError, r"lr: None -> 0\.5"),
        (dict(resume="auto", batch_size=4), ValueError, "batch_size: 8 -> 4"),
        (dict(resume="auto", model_kwargs={**TINY, "embed_dim": 64}), ValueError, "model_kwargs"),
        (dict(resume="auto", output_dir=""), ValueError, "output_dir must be a non-empty path"),
    ],
)
def test_a_refused_run_changes_nothing_in_the_folder(tmp_path, finished_run, overrides, error, message):
    before = _folder_snapshot(finished_run.output_dir)
    with pytest.raises(error, match=message):
        pretrain(dataclasses.replace(finished_run, **overrides))
    assert _folder_snapshot(finished_run.output_dir) == before


def test_resuming_an_older_checkpoint_needs_overwrite(tmp_path, finished_run):
    older = checkpoint_path(os.path.join(finished_run.output_dir, "checkpoints"), 2)
    before = _folder_snapshot(finished_run.output_dir)
    with pytest.raises(FileExistsError, match="would replace the checkpoints checkpoint-00000003.pt, checkpoint-0000"):
        pretrain(tiny_config(tmp_path, resume=older, max_steps=5))
    assert _folder_snapshot(finished_run.output_dir) == before
    result = pretrain(tiny_config(tmp_path, resume=older, max_steps=3, overwrite=True))
    assert result.step == 3 and _checkpoint_steps(finished_run) == [2, 3]
    with open(os.path.join(finished_run.output_dir, "metrics.jsonl")) as f:
        assert [json.loads(line)["step"] for line in f] == [1, 2, 3]


def test_a_resume_may_extend_the_run_and_config_json_records_it(tmp_path, finished_run):
    result = pretrain(tiny_config(tmp_path, resume="auto", epochs=4, max_steps=None))
    assert result.step == 12
    with open(os.path.join(finished_run.output_dir, "config.json")) as f:
        recorded = json.load(f)
    assert recorded["epochs"] == 4 and recorded["blr"] == finished_run.blr


def test_cli_resume_takes_the_checkpoints_settings(tmp_path, finished_run, capsys):
    """`--resume` with only the output folder continues the run with its own lr, batch and model."""
    args = ["pretrain", "--resume", "--output-dir", finished_run.output_dir, "--max-steps", "5"]
    args += ["--num-workers", "0", "--no-progress", "--no-visualize", "--device", "cpu"]
    assert main(args) == 0
    assert "resuming from" in capsys.readouterr().out
    assert _checkpoint_steps(finished_run)[-1] == 5
    with pytest.raises(SystemExit, match=r"lr: None -> 0\.5"):
        main([*args, "--lr", "0.5"])


def test_cli_refuses_an_empty_output_dir():
    with pytest.raises(SystemExit, match="--output-dir must not be empty"):
        main(["pretrain", "--output-dir", ""])


# --- 2. corrupt checkpoints and metrics -----------------------------------------------------------------------


def _corrupt(path, kind: str) -> None:
    with open(path, "rb") as f:
        data = f.read()
    with open(path, "wb") as f:
        f.write({"empty": b"", "truncated": data[: len(data) // 2], "random": os.urandom(4096)}[kind])


def test_a_checkpoint_without_rng_names_the_key(tmp_path, finished_run):
    path = list_checkpoints(os.path.join(finished_run.output_dir, "checkpoints"))[-1]
    state = torch.load(path, weights_only=True)
    del state["rng"]
    torch.save(state, path)
    with pytest.raises(ValueError, match="is not a resumable training checkpoint: it lacks 'rng'"):
        load_training_checkpoint(path)


def test_auto_resume_skips_unreadable_checkpoints_and_says_so(tmp_path, finished_run, capsys):
    newest = list_checkpoints(os.path.join(finished_run.output_dir, "checkpoints"))[-1]
    _corrupt(newest, "truncated")
    with open(os.path.join(finished_run.output_dir, "metrics.jsonl"), "a") as f:
        f.write('{"step": 5, "loss": 0.')  # a kill -9 during the append
    capsys.readouterr()
    result = pretrain(tiny_config(tmp_path, resume="auto", max_steps=4))
    printed = capsys.readouterr().out
    assert f"resume: skipped and removed {newest} is not a readable" in printed
    assert "resuming from " + checkpoint_path(os.path.dirname(newest), 3) in printed
    assert "metrics.jsonl: dropped 1 torn line" in printed
    assert result.step == 4 and _checkpoint_steps(finished_run) == [2, 3, 4]  # step 4 written again, readable
    with open(os.path.join(finished_run.output_dir, "metrics.jsonl")) as f:
        assert [json.loads(line)["step"] for line in f] == [1, 2, 3, 4]


def test_auto_resume_with_only_unreadable_checkpoints_is_refused(tmp_path, finished_run):
    for path in list_checkpoints(os.path.join(finished_run.output_dir, "checkpoints")):
        _corrupt(path, "empty")
    with pytest.raises(ValueError, match="no readable checkpoint in .*the file is empty"):
        pretrain(tiny_config(tmp_path, resume="auto"))


@pytest.mark.parametrize("killed_at", ["config.json", "metrics.jsonl"])
def test_a_resume_killed_while_rewriting_metrics_and_config_loses_neither(
    tmp_path, finished_run, monkeypatch, killed_at
):
    """The resume rewrites metrics.jsonl (dropping records past its step) and config.json through a temporary
    file and a rename: a kill in the middle of the write leaves both files as they were, whole."""
    from mae_fast.train import checkpointing

    names = ("metrics.jsonl", "config.json")
    before = {name: open(os.path.join(finished_run.output_dir, name), "rb").read() for name in names}
    real_replace = os.replace

    def killed_before_rename(src, dst):
        if os.path.basename(dst) == killed_at:
            raise KeyboardInterrupt  # the signal lands after the temporary file is written, before the rename
        real_replace(src, dst)

    monkeypatch.setattr(checkpointing.os, "replace", killed_before_rename)
    with pytest.raises(KeyboardInterrupt):
        pretrain(dataclasses.replace(finished_run, resume="auto", max_steps=5))
    monkeypatch.undo()
    for name in names:  # config.json is rewritten first, with the same settings apart from max_steps
        now = open(os.path.join(finished_run.output_dir, name), "rb").read()
        assert now == before[name] or (name == "config.json" and killed_at == "metrics.jsonl"), name
        records = [now] if name == "config.json" else now.splitlines()
        assert records and all(json.loads(record) for record in records)  # whole
    leftovers = [n for n in os.listdir(finished_run.output_dir) if n.endswith(".tmp")]
    assert leftovers == []
    result = pretrain(dataclasses.replace(finished_run, resume="auto", max_steps=5))
    assert result.step == 5


@pytest.mark.parametrize("data_source", ["imagefolder", "fashion-mnist"])
def test_no_data_worker_outlives_a_run_even_one_that_raises(tmp_path, monkeypatch, data_source):
    """Workers ignore SIGTERM, so one still alive at interpreter exit would block it (multiprocessing's exit
    hook terminates and joins them): pretrain shuts them down when the run ends, and when it raises while the
    caller keeps the traceback (whose frames hold the loader)."""
    import gc
    import multiprocessing

    from mae_fast.train import checkpointing

    config = tiny_config(tmp_path, num_workers=1, max_steps=2, data=data_source)
    before = set(multiprocessing.active_children())
    gc.disable()  # only the explicit shutdown may end them, not a collection of the cycle
    try:
        pretrain(config)
        assert set(multiprocessing.active_children()) == before

        def disk_full(*args):
            raise OSError("disk full")

        monkeypatch.setattr(checkpointing, "save_checkpoint", disk_full)
        with pytest.raises(OSError, match="disk full") as caught:
            pretrain(dataclasses.replace(config, output_dir=str(tmp_path / "raises")))
        assert caught.traceback and set(multiprocessing.active_children()) == before
    finally:
        gc.enable()


# --- 3. signals to the whole process group ----------------------------------------------------------------------


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_group_signal_with_workers_ends_in_a_checkpoint(tmp_path, signum):
    config = tiny_config(tmp_path, epochs=10_000)
    args = [sys.executable, "-m", "mae_fast", "pretrain", "--data", "imagefolder", "--data-path", config.data_path]
    args += ["--model-kwargs", json.dumps(TINY), "--img-size", "16", "--batch-size", "8", "--epochs", "10000"]
    args += ["--blr", "1e-2", "--warmup-epochs", "1", "--num-workers", "2", "--output-dir", config.output_dir]
    args += ["--log-every", "1", "--no-visualize", "--no-progress", "--device", "cpu"]
    proc = subprocess.Popen(
        args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=subprocess_env(), start_new_session=True
    )
    metrics = os.path.join(config.output_dir, "metrics.jsonl")
    deadline = time.monotonic() + 120
    while not (os.path.isfile(metrics) and os.path.getsize(metrics) > 0):
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, "the run did not start within 120 s"
        time.sleep(0.1)
    os.killpg(proc.pid, signum)  # what batch schedulers and `kill -TERM -PGID` do: workers included
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    assert f"interrupted by {signal.Signals(signum).name}" in out
    step = _checkpoint_steps(config)[-1]
    resumed = pretrain(tiny_config(tmp_path, epochs=10_000, resume="auto", max_steps=step + 1))
    assert resumed.step == step + 1


@pytest.mark.parametrize("signalled", [True, False])
def test_a_worker_death_after_a_stop_signal_still_checkpoints(tmp_path, monkeypatch, signalled):
    """The main process may see "DataLoader worker killed" (a worker that died with the signal) before it
    reads its stop flag: after a stop signal that ends in a checkpoint, without one it is an error."""
    real_start = TrainData.start

    def start_then_lose_a_worker(self, epoch, micro_batches_done, micro_batch):
        batches = real_start(self, epoch, micro_batches_done, micro_batch)
        yield next(batches)
        yield next(batches)
        if signalled:
            os.kill(os.getpid(), signal.SIGTERM)
        raise RuntimeError("DataLoader worker (pid 1) is killed by signal: Terminated.")

    monkeypatch.setattr(TrainData, "start", start_then_lose_a_worker)
    config = tiny_config(tmp_path)
    if not signalled:
        with pytest.raises(RuntimeError, match="DataLoader worker"):
            pretrain(config)
        return
    result = pretrain(config)
    assert result.interrupted == "SIGTERM" and result.step == 2
    assert _checkpoint_steps(config) == [2]
