"""What the converters share: reading checkpoint files safely, the conversion report, model shapes."""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import torch

from mae_fast.models import LoadReport, MaskedAutoencoderViT
from mae_fast.models.checkpoint import read_checkpoint_file

_WRAPPER_KEYS = ("model", "state_dict", "module")


@dataclass
class ConversionReport:
    """What a converter did: the format it read, the keys it loaded, and what it left alone.

    ``load`` is the :class:`~mae_fast.models.LoadReport` of the final load into the mae_fast model
    (missing decoder keys of encoder-only sources live there); ``ignored_keys`` are source keys that have
    no place in an MAE (a classifier head, for example); ``notes`` say what the conversion could not keep.
    """

    source: str
    load: LoadReport = field(default_factory=LoadReport)
    loaded_keys: int = 0
    ignored_keys: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def encoder_only(self) -> bool:
        return self.load.encoder_only

    def __str__(self) -> str:
        lines = [f"{self.source}: {self.loaded_keys} tensors loaded; {self.load}"]
        if self.ignored_keys:
            lines.append(f"source keys ignored: {', '.join(self.ignored_keys)}")
        lines.extend(self.notes)
        return "\n".join(lines)


def load_file(path: str | os.PathLike) -> dict:
    """A checkpoint file's content: safetensors, or :func:`mae_fast.models.checkpoint.read_checkpoint_file`
    (``torch.load(weights_only=True)`` allowing only the release's ``argparse.Namespace``; an unreadable
    file is a ValueError naming it and the reason)."""
    if str(path).endswith(".safetensors"):
        if not os.path.isfile(path):
            raise FileNotFoundError(f"checkpoint not found: {path}")
        from safetensors.torch import load_file as load_safetensors

        return load_safetensors(str(path), device="cpu")
    return read_checkpoint_file(path)


def state_dict_from(path_or_state) -> dict[str, torch.Tensor]:
    """A flat ``{name: tensor}`` from a path, a module or a dict, unwrapped from ``{'model': ...}``,
    ``{'state_dict': ...}`` and a DistributedDataParallel ``module.`` prefix."""
    if isinstance(path_or_state, (str, os.PathLike)):
        state = load_file(path_or_state)
    elif isinstance(path_or_state, torch.nn.Module):
        state = path_or_state.state_dict()
    elif isinstance(path_or_state, dict):
        state = path_or_state
    else:
        raise TypeError(f"expected a checkpoint path, a module or a dict, got {type(path_or_state).__name__}")
    for key in _WRAPPER_KEYS:
        if key in state and isinstance(state[key], dict):
            state = state[key]
            break
    if state and all(key.startswith("module.") for key in state):
        state = {key[len("module.") :]: value for key, value in state.items()}
    bad = [str(key) for key, value in state.items() if not isinstance(value, torch.Tensor)]
    if bad:
        raise ValueError(f"checkpoint entries are not tensors: {', '.join(bad[:5])}")
    if not state:
        raise ValueError("the checkpoint holds no tensors")
    return state


def model_dims(model: MaskedAutoencoderViT) -> dict:
    """The constructor arguments of a MaskedAutoencoderViT, read back from its modules."""
    if not isinstance(model, MaskedAutoencoderViT):
        raise TypeError(f"model must be a mae_fast MaskedAutoencoderViT, got {type(model).__name__}")
    block = model.blocks[0] if len(model.blocks) else None
    decoder_block = model.decoder_blocks[0] if len(model.decoder_blocks) else None
    embed_dim = model.cls_token.shape[-1]
    decoder_dim = model.mask_token.shape[-1]
    return dict(
        img_size=model.img_size,
        patch_size=model.patch_size,
        in_chans=model.in_chans,
        embed_dim=embed_dim,
        depth=len(model.blocks),
        num_heads=block.attn.num_heads if block is not None else 1,
        decoder_embed_dim=decoder_dim,
        decoder_depth=len(model.decoder_blocks),
        decoder_num_heads=decoder_block.attn.num_heads if decoder_block is not None else 1,
        mlp_hidden=block.mlp.fc1.out_features if block is not None else 4 * embed_dim,
        decoder_mlp_hidden=decoder_block.mlp.fc1.out_features if decoder_block is not None else 4 * decoder_dim,
        layer_norm_eps=model.norm.eps,
        norm_pix_loss=model.norm_pix_loss,
    )


def count_blocks(state: dict, prefix: str) -> int:
    """How many ``{prefix}{i}.`` blocks a state dict holds (indices must run 0..n-1)."""
    indices = {int(key[len(prefix) :].split(".", 1)[0]) for key in state if key.startswith(prefix)}
    if indices and indices != set(range(len(indices))):
        raise ValueError(f"block indices under {prefix!r} are not 0..{len(indices) - 1}: {sorted(indices)}")
    return len(indices)
