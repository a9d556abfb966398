"""transformers' ViTMAEForPreTraining weights in and out (names of transformers 4.x and 5.x).

transformers keeps separate q/k/v Linears; mae_fast (like the release) has one fused ``qkv`` whose
output rows are q, then k, then v. Its LayerNorm eps (1e-12 by default) is carried into the model.
transformers is imported only when needed.
"""

from __future__ import annotations

import os

import torch
from torch import nn

from mae_fast.interop._common import ConversionReport, count_blocks, load_file, model_dims, state_dict_from
from mae_fast.interop.official import load_release_state
from mae_fast.models import MaskedAutoencoderViT

# release block names -> transformers block names, per major version; "attn.qkv" maps to three Linears.
_BLOCK_NAMES = {
    4: {
        "norm1": "layernorm_before",
        "attn.qkv": ("attention.attention.query", "attention.attention.key", "attention.attention.value"),
        "attn.proj": "attention.output.dense",
        "norm2": "layernorm_after",
        "mlp.fc1": "intermediate.dense",
        "mlp.fc2": "output.dense",
    },
    5: {
        "norm1": "layernorm_before",
        "attn.qkv": ("attention.q_proj", "attention.k_proj", "attention.v_proj"),
        "attn.proj": "attention.o_proj",
        "norm2": "layernorm_after",
        "mlp.fc1": "mlp.fc1",
        "mlp.fc2": "mlp.fc2",
    },
}
_ENCODER_LAYERS = {4: "vit.encoder.layer.", 5: "vit.layers."}
_DECODER_LAYERS = "decoder.decoder_layers."
# transformers 5.x's save_pretrained writes 4.x names, and its renaming of "layers." back to "encoder.layer."
# also turns the decoder's "decoder_layers." into "decoder_encoder.layer." (its loader maps it back).
_SAVED_DECODER_LAYERS = "decoder.decoder_encoder.layer."
_SINGLE_NAMES = {
    "cls_token": "vit.embeddings.cls_token",
    "pos_embed": "vit.embeddings.position_embeddings",
    "patch_embed.proj.weight": "vit.embeddings.patch_embeddings.projection.weight",
    "patch_embed.proj.bias": "vit.embeddings.patch_embeddings.projection.bias",
    "norm.weight": "vit.layernorm.weight",
    "norm.bias": "vit.layernorm.bias",
    "decoder_embed.weight": "decoder.decoder_embed.weight",
    "decoder_embed.bias": "decoder.decoder_embed.bias",
    "mask_token": "decoder.mask_token",
    "decoder_pos_embed": "decoder.decoder_pos_embed",
    "decoder_norm.weight": "decoder.decoder_norm.weight",
    "decoder_norm.bias": "decoder.decoder_norm.bias",
    "decoder_pred.weight": "decoder.decoder_pred.weight",
    "decoder_pred.bias": "decoder.decoder_pred.bias",
}


def _name_version(state: dict) -> int:
    if any(key.startswith(_ENCODER_LAYERS[5]) for key in state):
        return 5
    if any(key.startswith(_ENCODER_LAYERS[4]) for key in state):
        return 4
    raise ValueError(
        "no encoder layers under 'vit.layers.' (transformers 5.x) or 'vit.encoder.layer.' (4.x): "
        "not a ViTMAE state_dict"
    )


def _block_pairs(version: int, release_prefix: str, hf_prefix: str, count: int):
    """(release name, transformers name or names) for every weight/bias of ``count`` blocks."""
    for i in range(count):
        for release, hf in _BLOCK_NAMES[version].items():
            for kind in ("weight", "bias"):
                names = hf if isinstance(hf, tuple) else (hf,)
                yield f"{release_prefix}{i}.{release}.{kind}", tuple(f"{hf_prefix}{i}.{n}.{kind}" for n in names)


def release_from_transformers(state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], list[str], int]:
    """A ViTMAE state_dict (4.x or 5.x names) -> (release-layout state, transformers keys left over, version)."""
    if not any(key.startswith(("vit.", "decoder.")) for key in state):
        state = {f"vit.{key}": value for key, value in state.items()}  # a bare ViTMAEModel
    state = {
        _DECODER_LAYERS + key[len(_SAVED_DECODER_LAYERS) :] if key.startswith(_SAVED_DECODER_LAYERS) else key: value
        for key, value in state.items()
    }
    version = _name_version(state)
    pairs = [(release, (hf,)) for release, hf in _SINGLE_NAMES.items()]
    pairs += _block_pairs(version, "blocks.", _ENCODER_LAYERS[version], count_blocks(state, _ENCODER_LAYERS[version]))
    pairs += _block_pairs(version, "decoder_blocks.", _DECODER_LAYERS, count_blocks(state, _DECODER_LAYERS))
    release, used = {}, set()
    for name, sources in pairs:
        if not all(source in state for source in sources):
            continue
        used.update(sources)
        tensors = [state[source] for source in sources]
        release[name] = torch.cat(tensors, dim=0) if len(tensors) > 1 else tensors[0]
    return release, sorted(set(state) - used), version


def transformers_state_dict(model: MaskedAutoencoderViT, *, version: int = 5) -> dict[str, torch.Tensor]:
    """The model's weights with ViTMAEForPreTraining's names (``version`` 5: transformers 5.x, 4: 4.x)."""
    if version not in _BLOCK_NAMES:
        raise ValueError(f"version must be 4 or 5 (transformers' major version), got {version!r}")
    dims = model_dims(model)
    state = {key: value.detach() for key, value in model.state_dict().items()}
    pairs = [(release, (hf,)) for release, hf in _SINGLE_NAMES.items()]
    pairs += _block_pairs(version, "blocks.", _ENCODER_LAYERS[version], dims["depth"])
    pairs += _block_pairs(version, "decoder_blocks.", _DECODER_LAYERS, dims["decoder_depth"])
    out = {}
    for release, targets in pairs:
        for target, part in zip(targets, state[release].chunk(len(targets), dim=0), strict=True):
            out[target] = part.to("cpu", copy=True)
    return out


def _as_pair(value, name: str) -> tuple[int, int]:
    if isinstance(value, int):
        return value, value
    if isinstance(value, (list, tuple)) and len(value) == 2:
        return int(value[0]), int(value[1])
    raise ValueError(f"config.{name} must be an int or a pair, got {value!r}")


def _model_from_config(config, backend: str | None) -> tuple[MaskedAutoencoderViT, list[str]]:
    if isinstance(config, dict):  # missing fields take ViTMAEConfig's defaults, as transformers does
        from transformers import ViTMAEConfig

        config = ViTMAEConfig.from_dict(config)
    get = lambda name: getattr(config, name)  # noqa: E731
    if get("hidden_act") != "gelu":
        raise ValueError(f"config.hidden_act={get('hidden_act')!r}: MAE blocks use exact GELU ('gelu')")
    if not get("qkv_bias"):
        raise ValueError("config.qkv_bias=False: mae_fast's MAE blocks have a qkv bias")
    patch = _as_pair(get("patch_size"), "patch_size")
    if patch[0] != patch[1]:
        raise ValueError(f"config.patch_size {patch} must be square")
    ratio = get("intermediate_size") / get("hidden_size")
    decoder_ratio = get("decoder_intermediate_size") / get("decoder_hidden_size")
    if ratio != decoder_ratio:
        raise ValueError(
            f"encoder MLP ratio {ratio} (intermediate_size/hidden_size) differs from the decoder's {decoder_ratio}; "
            "mae_fast's MaskedAutoencoderViT has one mlp_ratio"
        )
    model = MaskedAutoencoderViT(
        img_size=_as_pair(get("image_size"), "image_size"),
        patch_size=patch[0],
        in_chans=get("num_channels"),
        embed_dim=get("hidden_size"),
        depth=get("num_hidden_layers"),
        num_heads=get("num_attention_heads"),
        decoder_embed_dim=get("decoder_hidden_size"),
        decoder_depth=get("decoder_num_hidden_layers"),
        decoder_num_heads=get("decoder_num_attention_heads"),
        mlp_ratio=ratio,
        norm_pix_loss=bool(get("norm_pix_loss")),
        layer_norm_eps=get("layer_norm_eps"),
        backend=backend,
    )
    notes = [f"mask ratio of the config: {get('mask_ratio')} (pass it to forward as mask_ratio)"]
    for name in ("hidden_dropout_prob", "attention_probs_dropout_prob"):
        if get(name):
            notes.append(f"config.{name}={get(name)} is not reproduced: mae_fast's MAE has no dropout")
    return model, notes


def _read_pretrained_dir(path: str):
    from transformers import ViTMAEConfig

    config = ViTMAEConfig.from_pretrained(path, local_files_only=True)
    for name in ("model.safetensors", "pytorch_model.bin"):
        if os.path.isfile(os.path.join(path, name)):
            return load_file(os.path.join(path, name)), config
    raise FileNotFoundError(f"{path} has neither model.safetensors nor pytorch_model.bin")


def from_transformers(
    hf_model_or_state_dict, config=None, *, strict: bool = True, backend: str | None = None
) -> tuple[MaskedAutoencoderViT, ConversionReport]:
    """transformers ViTMAE weights into a MaskedAutoencoderViT with the same computation.

    ``hf_model_or_state_dict``: a ViTMAEForPreTraining / ViTMAEModel, its state_dict (4.x or 5.x names),
    a weights file (``.safetensors``, ``.bin``), or a ``save_pretrained`` directory (read offline).
    ``config`` (a ViTMAEConfig, or a dict of its fields with its defaults for the rest) is taken from the
    model or directory when not given, and is needed for a state_dict or file. Sizes, ``layer_norm_eps``
    and ``norm_pix_loss`` come from it. The model is built in fp32 on the CPU (move it with ``.to()``).
    Returns ``(model, report)``: with the same images, mask ratio and ``noise`` both give the same loss,
    pred (transformers' logits) and mask.
    """
    source = hf_model_or_state_dict
    if isinstance(source, nn.Module):
        config = config if config is not None else getattr(source, "config", None)
    elif isinstance(source, (str, os.PathLike)) and os.path.isdir(source):
        source, dir_config = _read_pretrained_dir(os.fspath(source))
        config = config if config is not None else dir_config
    if config is None:
        raise ValueError("config is required with a state_dict or a weights file (a ViTMAEConfig or a dict)")
    model, notes = _model_from_config(config, backend)
    state = state_dict_from(source)
    release, leftover, version = release_from_transformers(state)
    if leftover and strict:
        raise ValueError(f"transformers keys with no place in the MAE: {', '.join(leftover)}")
    report = ConversionReport(source=f"transformers ViTMAE ({version}.x names)", notes=notes)
    load_release_state(model, release, report, strict)
    report.ignored_keys = leftover
    return model, report


def to_transformers(model: MaskedAutoencoderViT, *, mask_ratio: float = 0.75) -> nn.Module:
    """A transformers ViTMAEForPreTraining with the model's weights (same device and dtype).

    Its config carries the sizes, ``layer_norm_eps``, ``norm_pix_loss`` and ``mask_ratio``. transformers
    needs square images and one patch size.
    """
    from transformers import ViTMAEConfig, ViTMAEForPreTraining

    dims = model_dims(model)
    if dims["img_size"][0] != dims["img_size"][1]:
        raise ValueError(f"transformers' ViTMAE needs square images; the model takes {dims['img_size']}")
    if not 0.0 <= mask_ratio < 1.0:
        raise ValueError(f"mask_ratio must be in [0, 1), got {mask_ratio}")
    config = ViTMAEConfig(
        hidden_size=dims["embed_dim"],
        num_hidden_layers=dims["depth"],
        num_attention_heads=dims["num_heads"],
        intermediate_size=dims["mlp_hidden"],
        hidden_act="gelu",
        layer_norm_eps=dims["layer_norm_eps"],
        image_size=dims["img_size"][0],
        patch_size=dims["patch_size"],
        num_channels=dims["in_chans"],
        qkv_bias=True,
        decoder_num_attention_heads=dims["decoder_num_heads"],
        decoder_hidden_size=dims["decoder_embed_dim"],
        decoder_num_hidden_layers=dims["decoder_depth"],
        decoder_intermediate_size=dims["decoder_mlp_hidden"],
        mask_ratio=mask_ratio,
        norm_pix_loss=dims["norm_pix_loss"],
    )
    hf = ViTMAEForPreTraining(config)
    hf.load_state_dict(transformers_state_dict(model, version=5), strict=True)
    return hf.to(device=model.cls_token.device, dtype=model.cls_token.dtype)
