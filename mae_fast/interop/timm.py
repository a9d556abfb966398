"""The encoder as a timm VisionTransformer, and timm ViT weights back into mae_fast.

MaskedAutoencoderViT's encoder keys are timm's ``vit_*_patch16_224`` names (cls_token, pos_embed,
patch_embed.proj, blocks.N.{norm1,attn.qkv,attn.proj,norm2,mlp.fc1,mlp.fc2}, norm), so the conversion
is mostly a check that both sides mean the same computation. timm is imported only when needed.
"""

from __future__ import annotations

from functools import partial

import torch
from torch import nn

from mae_fast.interop._common import ConversionReport, model_dims, state_dict_from
from mae_fast.interop.official import is_decoder_key, load_release_state, resolve_model
from mae_fast.models import MaskedAutoencoderViT

_IGNORED_PREFIXES = ("head.",)


def to_timm(model: MaskedAutoencoderViT, *, global_pool: bool = False) -> dict[str, torch.Tensor]:
    """The encoder's weights as a timm VisionTransformer state_dict (detached CPU copies, model dtype).

    ``global_pool=False``: ``norm`` after the blocks and class-token pooling, as ``vit_*_patch16_224``.
    ``global_pool=True``: the release's fine-tuning setup (``global_pool='avg'``): the pretrained ``norm`` is
    dropped and ``fc_norm`` (applied after average pooling) starts at LayerNorm's initial values (weight 1,
    bias 0), as in the release. No classifier ``head`` is included: timm's initialisation keeps it.
    """
    if not isinstance(model, MaskedAutoencoderViT):
        raise TypeError(f"model must be a mae_fast MaskedAutoencoderViT, got {type(model).__name__}")
    state = {
        key: value.detach().to("cpu", copy=True) for key, value in model.state_dict().items() if not is_decoder_key(key)
    }
    if global_pool:
        weight = state.pop("norm.weight")
        state.pop("norm.bias")
        state["fc_norm.weight"] = torch.ones_like(weight)
        state["fc_norm.bias"] = torch.zeros_like(weight)
    return state


def timm_vit(model: MaskedAutoencoderViT, *, num_classes: int = 0, global_pool: bool = False) -> nn.Module:
    """A timm VisionTransformer with the same encoder as ``model`` and its weights (for fine-tuning).

    The classifier ``head`` (``num_classes`` > 0) keeps timm's initialisation; everything else is loaded
    strictly. LayerNorm eps, MLP ratio, image size and channels follow the model. Same device and dtype.
    """
    from timm.models.vision_transformer import VisionTransformer

    dims = model_dims(model)
    if not isinstance(num_classes, int) or num_classes < 0:
        raise ValueError(f"num_classes must be an int >= 0, got {num_classes!r}")
    vit = VisionTransformer(
        img_size=dims["img_size"],
        patch_size=dims["patch_size"],
        in_chans=dims["in_chans"],
        num_classes=num_classes,
        global_pool="avg" if global_pool else "token",
        embed_dim=dims["embed_dim"],
        depth=dims["depth"],
        num_heads=dims["num_heads"],
        mlp_ratio=dims["mlp_hidden"] / dims["embed_dim"],
        qkv_bias=True,
        norm_layer=partial(nn.LayerNorm, eps=dims["layer_norm_eps"]),
    )
    result = vit.load_state_dict(to_timm(model, global_pool=global_pool), strict=False)
    leftover = [key for key in result.missing_keys if not key.startswith(_IGNORED_PREFIXES)]
    if leftover or result.unexpected_keys:
        raise RuntimeError(f"timm layout mismatch: missing {leftover}, unexpected {result.unexpected_keys}")
    return vit.to(device=model.cls_token.device, dtype=model.cls_token.dtype)


def _check_timm_module(vit: nn.Module) -> dict:
    """Refuse timm ViTs whose features an MAE encoder cannot reproduce; return their constructor facts."""
    from timm.layers import Mlp
    from timm.layers.attention import Attention
    from timm.models.vision_transformer import Block, VisionTransformer

    if not isinstance(vit, VisionTransformer):
        raise TypeError(f"expected a timm VisionTransformer, got {type(vit).__name__}")
    problems = []
    if not vit.has_class_token or vit.num_prefix_tokens != 1:
        problems.append("it must have exactly one class token and no register tokens")
    if vit.no_embed_class or vit.pos_embed is None:
        problems.append("its pos_embed must be learned and cover the class token (no_embed_class=False)")
    if not isinstance(vit.norm_pre, nn.Identity):
        problems.append("pre_norm is not part of MAE")
    if getattr(vit, "dynamic_img_size", False):
        problems.append("dynamic_img_size is not supported")
    for i, block in enumerate(vit.blocks):
        if type(block) is not Block or type(block.attn) is not Attention or type(block.mlp) is not Mlp:
            problems.append(f"blocks.{i} is not timm's plain Block / Attention / Mlp")
            continue
        if not isinstance(block.ls1, nn.Identity) or not isinstance(block.ls2, nn.Identity):
            problems.append(f"blocks.{i} uses layer scale")
        if not isinstance(block.attn.q_norm, nn.Identity) or not isinstance(block.attn.norm, nn.Identity):
            problems.append(f"blocks.{i}.attn uses qk_norm / scale_norm")
        act = block.mlp.act
        if type(act) is not nn.GELU or act.approximate != "none":
            problems.append(f"blocks.{i}.mlp uses {act!r}; MAE uses exact (erf) GELU")
        if not isinstance(block.mlp.norm, nn.Identity):
            problems.append(f"blocks.{i}.mlp uses scale_mlp_norm")
        if not isinstance(block.norm1, nn.LayerNorm) or not isinstance(block.norm2, nn.LayerNorm):
            problems.append(f"blocks.{i} norms are {type(block.norm1).__name__}, not LayerNorm")
    if problems:
        raise ValueError("this timm VisionTransformer cannot be an MAE encoder: " + "; ".join(problems))
    patch = vit.patch_embed.patch_size
    if patch[0] != patch[1]:
        raise ValueError(f"non-square patches {patch} are not supported")
    return dict(
        img_size=tuple(vit.patch_embed.img_size),
        num_heads=vit.blocks[0].attn.num_heads if len(vit.blocks) else 1,
        layer_norm_eps=vit.blocks[0].norm1.eps if len(vit.blocks) else 1e-6,
    )


def from_timm(
    timm_vit_or_state_dict,
    model: MaskedAutoencoderViT | str | None = None,
    *,
    strict: bool = True,
    fc_norm_as_norm: bool = False,
    **model_kwargs,
) -> tuple[MaskedAutoencoderViT, ConversionReport]:
    """timm VisionTransformer weights (a module, a state_dict or a file) into a MaskedAutoencoderViT.

    From a module, the config comes from it (heads, LayerNorm eps, image size); from a state_dict, named
    configs are matched by shape, else pass ``num_heads=`` (or ``model=``). The decoder keeps its
    initialisation (timm has none; reported). A classifier ``head`` is skipped and reported. A global-pool
    model has no final ``norm``: its ``fc_norm`` is used as the encoder's norm only if ``fc_norm_as_norm``
    (its features then differ from timm's, which normalise after pooling). Anything else that an MAE
    encoder cannot reproduce (register tokens, layer scale, qk_norm, pre-norm) raises ValueError.
    Returns ``(model, report)``; a model built here is fp32 on the CPU (move it with ``.to()``).
    """
    source = "timm VisionTransformer"
    if isinstance(timm_vit_or_state_dict, nn.Module):
        facts = _check_timm_module(timm_vit_or_state_dict)
        if model is None:
            model_kwargs = {"layer_norm_eps": facts["layer_norm_eps"], **model_kwargs}
            model_kwargs.setdefault("num_heads", facts["num_heads"])
    state = dict(state_dict_from(timm_vit_or_state_dict))
    notes = []
    if "norm.weight" not in state and "fc_norm.weight" in state:
        if not fc_norm_as_norm:
            raise ValueError(
                "the timm weights have no final norm, only a global-pool fc_norm; pass fc_norm_as_norm=True to "
                "load fc_norm as the MAE encoder's norm"
            )
        state["norm.weight"] = state.pop("fc_norm.weight")
        state["norm.bias"] = state.pop("fc_norm.bias")
        notes.append("fc_norm loaded as the encoder's final norm (fc_norm_as_norm=True)")
    ignored = sorted(key for key in state if key.startswith(_IGNORED_PREFIXES) or key.startswith("fc_norm."))
    decoder = sorted(key for key in state if is_decoder_key(key))
    if decoder:
        raise ValueError(f"timm weights hold MAE decoder keys ({decoder[0]}, ...); use from_official for these")
    encoder_state = {key: value for key, value in state.items() if key not in ignored}
    num_heads = model_kwargs.pop("num_heads", None)
    target = resolve_model(encoder_state, model, num_heads=num_heads, **model_kwargs)
    report = ConversionReport(source=source, notes=notes)
    load_release_state(target, encoder_state, report, strict)
    report.ignored_keys = ignored
    return target, report
