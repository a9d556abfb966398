"""Training checkpoints: written atomically, the newest N kept, holding everything an exact resume needs.

A checkpoint is a dict with ``model`` (the release's state_dict, so :func:`mae_fast.models.load_checkpoint`
reads it), ``optimizer``, ``scheduler``, ``step`` (optimizer steps done), ``epoch`` and ``micro_batch``
(the data position: epoch and micro-batches consumed in it), ``rng`` (python, numpy, torch CPU and CUDA
states of every rank), ``metrics`` (losses so far) and ``config``.

Writing: temporary file in the same folder, flush + fsync, ``os.replace`` onto the final name, fsync of
the folder. A crash at any point (even kill -9) leaves either the old set of checkpoints or the old set
plus a complete new one; stray ``*.tmp`` files are ignored and cleaned up by the next save.

Resuming: files are read by :func:`mae_fast.models.checkpoint.read_checkpoint_file`, so an unreadable one
is a ValueError naming it; "auto" takes the newest readable checkpoint of the folder and lists those it
skipped. A resume continues the checkpoint's run: only the fields in :data:`RESUME_MAY_CHANGE` may differ.
"""

from __future__ import annotations

import glob
import os
import random
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import BinaryIO

import numpy as np
import torch

from mae_fast.models.checkpoint import read_checkpoint_file

CHECKPOINT_PATTERN = re.compile(r"^checkpoint-(\d{8})\.pt$")


def checkpoint_path(folder: str, step: int) -> str:
    return os.path.join(folder, f"checkpoint-{step:08d}.pt")


def list_checkpoints(folder: str) -> list[str]:
    """Complete checkpoints in ``folder``, oldest first."""
    if not os.path.isdir(folder):
        return []
    names = sorted(name for name in os.listdir(folder) if CHECKPOINT_PATTERN.match(name))
    return [os.path.join(folder, name) for name in names]


def latest_checkpoint(folder: str) -> str | None:
    found = list_checkpoints(folder)
    return found[-1] if found else None


def _fsync_dir(folder: str) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _atomic_write(path: str, write: Callable[[BinaryIO], None]) -> None:
    """Call ``write`` on a temporary file beside ``path``, then rename it over ``path``: a reader (or a run
    killed meanwhile) sees the old file whole or the new one whole, never a half-written one."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    tmp = f"{path}.{os.getpid()}.tmp"
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    _fsync_dir(folder)


def atomic_save(obj, path: str) -> None:
    """torch.save ``obj`` to ``path`` so that ``path`` is never seen half-written."""
    _atomic_write(path, lambda f: torch.save(obj, f))


def atomic_write_text(path: str, text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` so that ``path`` is never seen half-written."""
    _atomic_write(path, lambda f: f.write(text.encode("utf-8")))


def save_checkpoint(state: dict, folder: str, keep_last: int) -> str:
    """Atomically write ``state`` as checkpoint-<step>.pt, then delete all but the newest ``keep_last``
    checkpoints and any stray temporary files. Returns the path written."""
    path = checkpoint_path(folder, int(state["step"]))
    atomic_save(state, path)
    for old in list_checkpoints(folder)[:-keep_last]:
        os.remove(old)
    for stray in glob.glob(os.path.join(folder, "checkpoint-*.pt.*.tmp")):
        os.remove(stray)
    return path


# What an exact resume reads from a checkpoint.
TRAINING_KEYS = ("model", "optimizer", "scheduler", "step", "epoch", "micro_batch", "rng", "metrics", "config")

# Config fields a resume may change: where and how the run executes and reports, and how long it goes on.
# Every other field is fixed by the checkpoint (weights, optimizer and schedule state, data order).
RESUME_MAY_CHANGE = (
    "resume", "overwrite", "output_dir", "epochs", "max_steps", "num_workers", "decode_on", "device", "backend",
    "compile", "precision", "sharding", "nonfinite", "data_path", "log_every", "ckpt_every", "keep_last",
    "visualize", "num_vis", "progress",
)  # fmt: skip


def load_training_checkpoint(path: str) -> dict:
    """Read a checkpoint written by :func:`save_checkpoint` (``weights_only``: it cannot run code).

    An unreadable file raises :class:`~mae_fast.models.checkpoint.CheckpointReadError`, one that lacks
    what a resume needs a ValueError naming the missing keys (both ValueErrors)."""
    state = read_checkpoint_file(path)
    missing = [key for key in TRAINING_KEYS if key not in state]
    if missing:
        raise ValueError(f"{path} is not a resumable training checkpoint: it lacks {', '.join(map(repr, missing))}")
    return state


@dataclass
class ResumePoint:
    """The checkpoint a run continues from; ``skipped``: the newer, unreadable ones in its folder passed over
    (path -> the reason)."""

    path: str
    state: dict
    skipped: dict[str, str] = field(default_factory=dict)

    @property
    def step(self) -> int:
        return int(self.state["step"])


def resolve_resume(resume: str | None, folder: str) -> ResumePoint | None:
    """The checkpoint to resume from, read: ``resume`` as a path, or for "auto" the newest readable one in
    ``folder`` (None when it holds none; a ValueError when it holds only unreadable ones)."""
    if resume is None:
        return None
    if resume != "auto":
        if not os.path.exists(resume):
            raise FileNotFoundError(f"resume: checkpoint not found: {resume}")
        return ResumePoint(resume, load_training_checkpoint(resume))
    skipped = {}
    for path in reversed(list_checkpoints(folder)):
        try:
            return ResumePoint(path, load_training_checkpoint(path), skipped)
        except ValueError as error:
            skipped[path] = str(error)
    if skipped:
        raise ValueError(f"resume: no readable checkpoint in {folder}: " + "; ".join(skipped.values()))
    return None


def checkpoint_step(path: str) -> int:
    """The step in a checkpoint's file name (checkpoint-<step>.pt)."""
    return int(CHECKPOINT_PATTERN.match(os.path.basename(path)).group(1))


def resume_conflicts(saved: dict, wanted: dict) -> list[str]:
    """The config fields outside :data:`RESUME_MAY_CHANGE` that differ, as 'name: saved -> wanted'."""
    return [
        f"{name}: {saved.get(name)!r} -> {value!r}"
        for name, value in wanted.items()
        if name not in RESUME_MAY_CHANGE and saved.get(name) != value
    ]


def rng_state() -> dict:
    """This process's python, numpy, torch CPU and (when present) CUDA generator states."""
    name, keys, pos, has_gauss, cached = np.random.get_state()
    numpy_state = (name, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(cached))
    state = {"python": random.getstate(), "numpy": numpy_state, "torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def all_finite(module: torch.nn.Module) -> bool:
    """True when every parameter and buffer of ``module`` is finite (one host sync)."""
    flags = [
        torch.isfinite(t).all() for t in list(module.parameters()) + list(module.buffers()) if t.is_floating_point()
    ]
    return bool(torch.stack(flags).all()) if flags else True
