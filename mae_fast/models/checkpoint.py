"""Loading checkpoints in the release's layout (``{'model': state_dict, ...}`` or a bare state_dict)."""

from __future__ import annotations

import argparse
import os
import pickle
import re
import stat
from dataclasses import dataclass, field

import torch
from torch import nn

_DECODER_PREFIXES = ("decoder_", "mask_token")


@dataclass
class LoadReport:
    """What :func:`load_checkpoint` did: keys the checkpoint lacked and keys the model does not have."""

    missing_encoder_keys: list[str] = field(default_factory=list)
    missing_decoder_keys: list[str] = field(default_factory=list)
    unexpected_keys: list[str] = field(default_factory=list)

    @property
    def encoder_only(self) -> bool:
        return bool(self.missing_decoder_keys) and not self.missing_encoder_keys

    def __str__(self) -> str:
        lines = []
        if self.missing_decoder_keys:
            lines.append(
                f"{len(self.missing_decoder_keys)} decoder keys missing (an encoder-only release?): "
                "the decoder keeps its initialisation"
            )
        if self.missing_encoder_keys:
            lines.append(f"missing encoder keys: {', '.join(self.missing_encoder_keys)}")
        if self.unexpected_keys:
            lines.append(f"unexpected keys ignored: {', '.join(self.unexpected_keys)}")
        return "; ".join(lines) or "all keys loaded"


class CheckpointReadError(ValueError):
    """A checkpoint file that exists but cannot be read (empty, truncated, another format, or code)."""

    def __init__(self, path, reason: str):
        super().__init__(f"{path} is not a readable mae_fast/release checkpoint: {reason}")
        self.path, self.reason = str(path), reason


def _unreadable_reason(error: Exception) -> str:
    message = str(error)
    if isinstance(error, EOFError):
        return "the data ends early (truncated?)"
    if isinstance(error, RuntimeError) and "zip archive" in message:
        return "not a complete torch.save archive (truncated, or another format)"
    if isinstance(error, pickle.UnpicklingError):
        needed = re.search(r"Unsupported global: GLOBAL ([\w.]+)", message)
        if needed:
            return f"it needs {needed.group(1)} to unpickle, and weights_only=True runs no code from a file"
        return "not torch.save data (unreadable pickle)"
    return f"not torch.save data ({type(error).__name__}: {message.splitlines()[0] if message else 'no detail'})"


def read_checkpoint_file(path: str | os.PathLike) -> dict:
    """The dict a checkpoint file holds (a release file, an export or a training checkpoint of mae_fast).

    Read with ``torch.load(weights_only=True)`` (a checkpoint cannot run code), allowing only
    ``argparse.Namespace``, which the release's training checkpoints store their ``args`` in. A missing
    file raises FileNotFoundError; any file that cannot be read raises :class:`CheckpointReadError`
    (a ValueError) naming the path and the reason.
    """
    if not os.path.exists(path):
        raise FileNotFoundError(f"checkpoint not found: {path}")
    if not stat.S_ISREG(os.stat(path).st_mode):
        raise CheckpointReadError(path, "not a regular file")
    if os.path.getsize(path) == 0:
        raise CheckpointReadError(path, "the file is empty")
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch.load raises many types for bad bytes; all mean "unreadable"
        raise CheckpointReadError(path, _unreadable_reason(error)) from error
    if not isinstance(state, dict):
        raise CheckpointReadError(path, f"it holds a {type(state).__name__}, not a dict")
    return state


def read_state_dict(path_or_state) -> dict[str, torch.Tensor]:
    """A state_dict from a file path (:func:`read_checkpoint_file`) or a dict, unwrapping the release's
    ``{'model': ...}``."""
    if isinstance(path_or_state, (str, os.PathLike)):
        state = read_checkpoint_file(path_or_state)
    elif isinstance(path_or_state, dict):
        state = path_or_state
    else:
        raise TypeError(f"path_or_state must be a path or a dict, got {type(path_or_state).__name__}")
    if "model" in state and isinstance(state["model"], dict):
        state = state["model"]
    bad = [key for key, value in state.items() if not isinstance(value, torch.Tensor)]
    if bad:
        raise ValueError(f"checkpoint entries are not tensors: {', '.join(map(str, bad[:5]))}")
    return state


def load_checkpoint(model: nn.Module, path_or_state, strict_encoder: bool = True) -> LoadReport:
    """Load release-layout weights into ``model``; refuses shape mismatches naming the key.

    Missing decoder keys (encoder-only releases) are reported, not fatal; missing encoder keys raise
    unless ``strict_encoder`` is False.
    """
    state = read_state_dict(path_or_state)
    own = model.state_dict()
    for key, value in state.items():
        if key in own and own[key].shape != value.shape:
            raise ValueError(
                f"checkpoint key {key!r} has shape {tuple(value.shape)}, the model expects {tuple(own[key].shape)}"
            )
    report = LoadReport(unexpected_keys=sorted(set(state) - set(own)))
    for key in sorted(set(own) - set(state)):
        (report.missing_decoder_keys if key.startswith(_DECODER_PREFIXES) else report.missing_encoder_keys).append(key)
    if strict_encoder and report.missing_encoder_keys:
        raise ValueError(f"checkpoint lacks encoder keys: {', '.join(report.missing_encoder_keys)}")
    model.load_state_dict({k: v for k, v in state.items() if k in own}, strict=False)
    return report
