"""The MAE release's checkpoints in and out: full ``{'model': ...}``, encoder-only and "visualize" files.

The release saves ``{'model': state_dict, ...}`` (training checkpoints add optimizer, epoch, scaler and
an ``args`` Namespace); its pretrained downloads hold the encoder alone (``mae_pretrain_vit_*.pth``) or
encoder and decoder (``mae_visualize_vit_*.pth``). mae_fast's MaskedAutoencoderViT has the same keys.
"""

from __future__ import annotations

import math

import torch

from mae_fast.interop._common import ConversionReport, count_blocks, state_dict_from
from mae_fast.models import MaskedAutoencoderViT, create_model, list_models, load_checkpoint

_DECODER_PREFIXES = ("decoder_", "mask_token")
# Keys of fine-tuning checkpoints (classifier and global-pool norm): not part of an MAE, skipped and reported.
_FINETUNE_PREFIXES = ("head.", "fc_norm.")


def is_decoder_key(key: str) -> bool:
    return key.startswith(_DECODER_PREFIXES)


def _shapes(model: torch.nn.Module) -> dict[str, torch.Size]:
    return {key: value.shape for key, value in model.state_dict().items()}


def _fits(state: dict[str, torch.Tensor], shapes: dict[str, torch.Size]) -> bool:
    """All encoder keys present, every present key known with the same shape, the decoder whole or absent."""
    encoder = {key for key in shapes if not is_decoder_key(key)}
    decoder = set(shapes) - encoder
    present = {key for key in state if key in shapes or is_decoder_key(key) or key.startswith("blocks.")}
    if not encoder <= set(state) or not present <= set(shapes):
        return False
    if any(is_decoder_key(key) for key in state) and not decoder <= set(state):
        return False
    return all(state[key].shape == shapes[key] for key in present)


def infer_model(state: dict[str, torch.Tensor], num_heads: int | None = None, **model_kwargs) -> MaskedAutoencoderViT:
    """A MaskedAutoencoderViT shaped for ``state`` (release layout).

    Image size, channels and patch size come from ``pos_embed`` and the patch weights. The named configs
    (:func:`mae_fast.models.list_models`) are tried first, since head counts are not visible in the
    weights; failing those, ``num_heads`` (and ``decoder_num_heads`` in ``model_kwargs`` when there is a
    decoder) build a custom one. ``model_kwargs`` go to the constructor (norm_pix_loss, backend, ...).
    """
    for key in ("patch_embed.proj.weight", "pos_embed", "cls_token"):
        if key not in state:
            raise ValueError(f"the checkpoint has no {key!r}: it is not an MAE / ViT encoder in the release's layout")
    embed_dim, in_chans, patch, patch_w = state["patch_embed.proj.weight"].shape
    length = state["pos_embed"].shape[1] - 1
    side = math.isqrt(length)
    if patch != patch_w or side * side != length:
        raise ValueError(
            f"cannot infer the image size from pos_embed {tuple(state['pos_embed'].shape)} and patch weights "
            f"{tuple(state['patch_embed.proj.weight'].shape)} (non-square); build the model and pass model="
        )
    geometry = dict(img_size=side * patch, in_chans=in_chans)
    for name in list_models():
        try:
            with torch.device("meta"):
                candidate = create_model(name, **geometry)
        except ValueError:  # the config's patch size does not divide this image size
            continue
        heads_match = num_heads is None or candidate.blocks[0].attn.num_heads == num_heads
        if candidate.patch_size == patch and heads_match and _fits(state, _shapes(candidate)):
            return create_model(name, **{**geometry, **model_kwargs})
    if num_heads is None:
        raise ValueError(
            f"the checkpoint (embed_dim={embed_dim}, patch {patch}, {count_blocks(state, 'blocks.')} blocks) matches "
            f"none of the named configs ({', '.join(list_models())}); head counts are not stored in the weights, "
            "so pass num_heads= (and decoder sizes) or model="
        )
    depth = count_blocks(state, "blocks.")
    hidden = state["blocks.0.mlp.fc1.weight"].shape[0] if depth else 4 * embed_dim
    config = dict(
        patch_size=int(patch), embed_dim=int(embed_dim), depth=depth, num_heads=num_heads, mlp_ratio=hidden / embed_dim
    )
    if "decoder_embed.weight" in state:
        if "decoder_num_heads" not in model_kwargs:
            raise ValueError("the checkpoint has a decoder of a config that is not named: pass decoder_num_heads=")
        config.update(
            decoder_embed_dim=state["decoder_embed.weight"].shape[0],
            decoder_depth=count_blocks(state, "decoder_blocks."),
        )
    return MaskedAutoencoderViT(**{**geometry, **config, **model_kwargs})


def resolve_model(state, model, num_heads=None, **model_kwargs) -> MaskedAutoencoderViT:
    """``model`` as given (an instance), built by name, or inferred from ``state``."""
    if isinstance(model, MaskedAutoencoderViT):
        if model_kwargs:
            raise ValueError(f"model is already built; constructor arguments {sorted(model_kwargs)} cannot apply")
        return model
    if isinstance(model, str):
        return create_model(model, **model_kwargs)
    if model is not None:
        raise TypeError(f"model must be None, a model name or a MaskedAutoencoderViT, got {type(model).__name__}")
    return infer_model(state, num_heads=num_heads, **model_kwargs)


def load_release_state(
    model: MaskedAutoencoderViT, state: dict[str, torch.Tensor], report: ConversionReport, strict: bool
) -> None:
    """Load release-layout ``state`` into ``model``, checking keys and shapes strictly; fills ``report``.

    Strict: every encoder key present, the decoder whole or absent, no key the model lacks (besides a
    fine-tuning head, which is skipped and listed). Shape mismatches always raise, naming the key.
    """
    own = model.state_dict()
    for key, value in state.items():
        if key in own and own[key].shape != value.shape:
            raise ValueError(f"key {key!r} has shape {tuple(value.shape)}, the model expects {tuple(own[key].shape)}")
    unknown = sorted(set(state) - set(own))
    report.ignored_keys = [key for key in unknown if key.startswith(_FINETUNE_PREFIXES)]
    unexpected = [key for key in unknown if not key.startswith(_FINETUNE_PREFIXES)]
    if strict and unexpected:
        raise ValueError(f"keys the model does not have (another architecture or depth?): {', '.join(unexpected)}")
    decoder_keys = [key for key in own if is_decoder_key(key)]
    present = [key for key in decoder_keys if key in state]
    if strict and present and len(present) != len(decoder_keys):
        missing = sorted(set(decoder_keys) - set(present))
        raise ValueError(f"the checkpoint holds part of a decoder; missing decoder keys: {', '.join(missing)}")
    known = {key: value for key, value in state.items() if key in own}
    report.load = load_checkpoint(model, known, strict_encoder=strict)
    report.load.unexpected_keys = unexpected
    report.loaded_keys = len(known)


def from_official(
    path_or_state, model: MaskedAutoencoderViT | str | None = None, *, strict: bool = True, **model_kwargs
) -> tuple[MaskedAutoencoderViT, ConversionReport]:
    """Load a release checkpoint (file path or dict; wrapped in ``{'model': ...}`` or bare).

    ``model``: a MaskedAutoencoderViT to load into, a config name, or None to infer the config from the
    weights (named configs first). ``model_kwargs`` go to the constructor (``norm_pix_loss``, ``backend``,
    ``num_heads`` for configs that are not named). Returns ``(model, report)``; the weights are copied into
    the model's parameters, keeping its dtype and device (a model built here is fp32 on the CPU).
    Files are read with ``torch.load(weights_only=True)``. With ``strict`` (the default), missing encoder
    keys, a partial decoder and unknown keys raise ValueError; a fine-tuning head is skipped and reported.
    """
    state = state_dict_from(path_or_state)
    if "norm.weight" not in state and "fc_norm.weight" in state:
        raise ValueError(
            "the checkpoint has fc_norm and no encoder norm: a global-pool fine-tuned ViT, not an MAE; "
            "load it with mae_fast.interop.from_timm(..., fc_norm_as_norm=True) if that is what you want"
        )
    num_heads = model_kwargs.pop("num_heads", None)
    if num_heads is not None and model is not None:
        raise ValueError("num_heads is only used when the config is inferred (model=None)")
    target = resolve_model(state, model, num_heads=num_heads, **model_kwargs)
    report = ConversionReport(source="official MAE checkpoint")
    load_release_state(target, state, report, strict)
    return target, report


def to_official(
    model: MaskedAutoencoderViT, *, encoder_only: bool = False, wrap: bool = True
) -> dict[str, torch.Tensor] | dict[str, dict[str, torch.Tensor]]:
    """The model's weights in the release's layout: ``{'model': state_dict}`` (``wrap``) or the bare dict.

    ``encoder_only`` drops the decoder, as in ``mae_pretrain_vit_*.pth``. Tensors are detached CPU copies
    in the model's dtype; ``torch.save`` the result to get a file the release's code loads.
    """
    if not isinstance(model, MaskedAutoencoderViT):
        raise TypeError(f"model must be a mae_fast MaskedAutoencoderViT, got {type(model).__name__}")
    state = {
        key: value.detach().to("cpu", copy=True)
        for key, value in model.state_dict().items()
        if not (encoder_only and is_decoder_key(key))
    }
    return {"model": state} if wrap else state
