"""param_groups_layer_decay against an independent reading of the release's grouping, on ViT-B / L / H names."""

from __future__ import annotations

import re
from functools import partial

import pytest
import torch
from torch import nn

from mae_fast.models.classifier import VisionTransformerClassifier
from mae_fast.train.finetune import param_groups_layer_decay

SIZES = {"B": (768, 12, 12, 16), "L": (1024, 24, 16, 16), "H": (1280, 32, 16, 14)}


def timm_vit_on_meta(embed_dim, depth, heads, patch):
    from timm.models.vision_transformer import VisionTransformer

    with torch.device("meta"):
        return VisionTransformer(
            img_size=224, patch_size=patch, embed_dim=embed_dim, depth=depth, num_heads=heads, num_classes=1000,
            global_pool="avg", norm_layer=partial(nn.LayerNorm, eps=1e-6),
        )  # fmt: skip


def expected(name: str, ndim: int, depth: int, decay: float, wd: float, skip: set) -> tuple[str, float, float]:
    """(group key, lr scale, weight decay) written from the rule itself, not from the code under test."""
    match = re.match(r"blocks\.(\d+)\.", name)
    if name in ("cls_token", "pos_embed") or name.startswith("patch_embed"):
        layer = 0
    elif match:
        layer = int(match.group(1)) + 1
    else:
        layer = depth + 1
    no_decay = ndim == 1 or name in skip
    scale = 1.0
    for _ in range(depth + 1 - layer):
        scale *= decay
    return f"layer_{layer}_{'no_decay' if no_decay else 'decay'}", scale, 0.0 if no_decay else wd


@pytest.mark.parametrize("size", sorted(SIZES))
@pytest.mark.parametrize("decay", [0.65, 0.75])
def test_matches_the_release_rule_on_timm_names(size, decay):
    embed_dim, depth, heads, patch = SIZES[size]
    vit = timm_vit_on_meta(embed_dim, depth, heads, patch)
    skip = {"pos_embed", "cls_token"}
    groups = param_groups_layer_decay(vit, weight_decay=0.05, layer_decay=decay, no_weight_decay=skip)
    seen = {}
    for group in groups:
        for name, param in zip(group["param_names"], group["params"], strict=True):
            seen[name] = (group["name"], group["lr_scale"], group["weight_decay"])
            assert param is dict(vit.named_parameters())[name]
    params = dict(vit.named_parameters())
    assert set(seen) == set(params)
    for name, param in params.items():
        key, scale, wd = expected(name, param.ndim, depth, decay, 0.05, skip)
        assert seen[name][0] == key, name
        assert seen[name][1] == pytest.approx(scale, rel=1e-12), name
        assert seen[name][2] == wd, name
    # one group per (layer, decay kind): layer 0 has both (patch weight decays; cls/pos/bias do not)
    assert len(groups) == len({expected(n, p.ndim, depth, decay, 0.05, skip)[0] for n, p in params.items()})
    assert {g["name"]: g["lr_scale"] for g in groups}["layer_0_decay"] == pytest.approx(decay ** (depth + 1))
    assert {g["name"]: g["lr_scale"] for g in groups}[f"layer_{depth + 1}_no_decay"] == 1.0


def test_classifier_has_the_same_names_as_timm():
    embed_dim, depth, heads, patch = 64, 3, 4, 4
    model = VisionTransformerClassifier(
        img_size=32, patch_size=patch, embed_dim=embed_dim, depth=depth, num_heads=heads, num_classes=10
    )
    groups = param_groups_layer_decay(model, 0.05, 0.75, model.no_weight_decay())
    scales = {name: g["lr_scale"] for g in groups for name in g["param_names"]}
    assert scales["cls_token"] == pytest.approx(0.75**4)
    assert scales["blocks.0.attn.qkv.weight"] == pytest.approx(0.75**3)
    assert scales["blocks.2.mlp.fc2.bias"] == pytest.approx(0.75)
    assert scales["head.weight"] == scales["fc_norm.weight"] == 1.0


def test_frozen_parameters_are_left_out():
    model = VisionTransformerClassifier(img_size=8, patch_size=4, embed_dim=8, depth=1, num_heads=2, num_classes=3)
    model.pos_embed.requires_grad_(False)
    names = {n for g in param_groups_layer_decay(model) for n in g["param_names"]}
    assert "pos_embed" not in names and "cls_token" in names


@pytest.mark.parametrize(
    ("kwargs", "word"),
    [
        ({"layer_decay": 0.0}, "layer_decay"),
        ({"layer_decay": 1.5}, "layer_decay"),
        ({"weight_decay": -1.0}, "weight_decay"),
    ],
)
def test_bad_values_name_the_argument(kwargs, word):
    model = VisionTransformerClassifier(img_size=8, patch_size=4, embed_dim=8, depth=1, num_heads=2, num_classes=3)
    with pytest.raises(ValueError, match=word):
        param_groups_layer_decay(model, **kwargs)
