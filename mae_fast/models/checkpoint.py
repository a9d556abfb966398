"""Loading checkpoints in the release's layout (``{'model': state_dict, ...}`` or a bare state_dict)."""

from __future__ import annotations

import os
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


def read_state_dict(path_or_state) -> dict[str, torch.Tensor]:
    """A state_dict from a file path or a dict, unwrapping the release's ``{'model': ...}``.

    Files are read with ``torch.load(weights_only=True)``: a checkpoint cannot run code.
    """
    if isinstance(path_or_state, (str, os.PathLike)):
        if not os.path.isfile(path_or_state):
            raise FileNotFoundError(f"checkpoint file not found: {path_or_state}")
        state = torch.load(path_or_state, map_location="cpu", weights_only=True)
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
